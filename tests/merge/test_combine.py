"""``peftkit.merge.combine``: the element-wise merges, against PEFT's ``merge_utils`` and mergekit (dense tensors)."""

from __future__ import annotations

import pytest
import torch

from peftkit.merge.combine import combine, parse_options
from peftkit.merge.errors import MergeOptionError

WEIGHTS = [0.7, -0.4, 1.2]


def _tasks(n: int = 3, shape: tuple[int, int] = (64, 48), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _ours(method: str, tasks: list[torch.Tensor], weights: list[float], **options) -> torch.Tensor:
    opts = parse_options(method, options)
    gen = torch.Generator().manual_seed(opts.seed) if opts.seed is not None else None
    stack = torch.stack([t.reshape(-1) for t in tasks])
    return combine(stack, torch.tensor(weights), method, opts, gen).reshape(tasks[0].shape)


@pytest.mark.parity
@pytest.mark.parametrize(
    ("method", "sign"),
    [("task_arithmetic", None), ("magnitude_prune", None), ("dare_linear", None)]
    + [(m, s) for m in ("ties", "dare_ties") for s in ("total", "frequency")],
)
def test_matches_peft_merge_utils_with_any_weights(method: str, sign: str | None) -> None:
    """Our defaults are PEFT's ``merge_utils`` functions (used by its ``*_svd`` combination types on dense ΔW):
    same trimming, sign election on the unweighted trimmed tasks, disjoint mean by count, DARE's 1/density."""
    from peft.utils import merge_utils

    tasks = _tasks()
    w = torch.tensor(WEIGHTS)
    options = {"task_arithmetic": {}, "magnitude_prune": {"density": 0.3}}.get(method, {"density": 0.3})
    if sign is not None:
        options["sign"] = sign
    if method.startswith("dare"):
        options["seed"] = 11
        torch.manual_seed(11)  # PEFT draws from the global generator; ours from one seeded alike
    ref = {
        "task_arithmetic": lambda: merge_utils.task_arithmetic(tasks, w),
        "magnitude_prune": lambda: merge_utils.magnitude_prune(tasks, w, 0.3),
        "ties": lambda: merge_utils.ties(tasks, w, 0.3, sign),
        "dare_linear": lambda: merge_utils.dare_linear(tasks, w, 0.3),
        "dare_ties": lambda: merge_utils.dare_ties(tasks, w, 0.3, sign),
    }[method]()
    ours = _ours(method, tasks, WEIGHTS, **options)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parity
@pytest.mark.parametrize(
    ("method", "ours", "params"),
    [
        ("task_arithmetic", {}, {}),
        ("ties", {"density": 0.3, "normalize": "weights"}, {"density": 0.3}),
        ("ties", {"density": 0.3, "normalize": "none"}, {"density": 0.3, "normalize": False}),
        ("ties", {"density": 0.5, "normalize": "weights", "sign": "frequency"}, None),
        ("dare_linear", {"density": 0.6, "rescale": "l1", "seed": 5}, {"density": 0.6}),
        ("dare_ties", {"density": 0.6, "rescale": "l1", "normalize": "none", "seed": 5}, {"density": 0.6}),
        ("dare_ties", {"density": 0.6, "rescale": "none", "normalize": "weights", "seed": 5}, "norm"),
    ],
)
def test_matches_mergekit_generalised_task_arithmetic(method: str, ours: dict, params: dict | str | None) -> None:
    """mergekit 0.1.5's task arithmetic / TIES / DARE (one generalised merge) on dense deltas, same density and
    seed: equal to float precision (random normal tasks have no magnitude ties at the density threshold)."""
    mergekit = pytest.importorskip("mergekit.merge_methods")
    tasks = _tasks()
    weights = [0.7, 0.4, 1.2]  # mergekit's normalisation divides by the agreeing weights: keep them positive
    if params is None:  # mergekit's "count" consensus
        from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod, GeneralizedTaskArithmeticMerge
        from mergekit.sparsify import SparsificationMethod

        custom = GeneralizedTaskArithmeticMerge(
            ConsensusMethod.count, SparsificationMethod.magnitude, True, False, "ties_count", None, None
        )
        method_ref, params = custom, {"density": 0.5}
    elif params == "norm":
        method_ref, params = method, {"density": 0.6, "normalize": True, "rescale": False}
    else:
        method_ref = method
    per_input = {k: {i + 1: v for i in range(len(tasks))} for k, v in params.items() if k == "density"}
    shared = {k: v for k, v in params.items() if k != "density"}
    base = torch.zeros_like(tasks[0])  # base + τ − base = τ exactly
    torch.manual_seed(5)
    ref = mergekit.merge_tensors(
        [base, *[base + t for t in tasks]],
        method_ref,
        parameters={"weight": {i + 1: w for i, w in enumerate(weights)}, **per_input, **shared},
        base_index=0,
    )
    got = _ours(method, tasks, weights, **ours)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


def test_ties_properties() -> None:
    """Trimming keeps int(density·N) entries per task; density 1 with all-agreeing signs is the weighted mean by
    count (PEFT) or by weight (mergekit); entries against the elected sign contribute nothing."""
    tasks = [t.abs() + 0.1 for t in _tasks()]  # all positive: every entry agrees
    w = [1.0, 2.0, 3.0]
    stack = torch.stack(tasks)
    by_count = _ours("ties", tasks, w, density=1.0)
    torch.testing.assert_close(by_count, (torch.tensor(w)[:, None, None] * stack).sum(0) / 3)
    by_weight = _ours("ties", tasks, w, density=1.0, normalize="weights")
    torch.testing.assert_close(by_weight, (torch.tensor(w)[:, None, None] * stack).sum(0) / 6)
    a = torch.tensor([[3.0, -1.0, 2.0, 0.5]])
    b = torch.tensor([[-1.0, -2.0, 1.0, -0.5]])
    merged = _ours("ties", [a, b], [1.0, 1.0], density=1.0)
    # entry 0: γ=+ (3-1), only a counts; 1: γ=- both; 2: both +; 3: sum 0 -> γ=+1, only a counts
    torch.testing.assert_close(merged, torch.tensor([[3.0, -1.5, 1.5, 0.5]]))
    trimmed = _ours("magnitude_prune", [tasks[0]], [1.0], density=0.25)
    assert int((trimmed != 0).sum()) == int(0.25 * tasks[0].numel())


def test_dare_is_reproducible_and_unbiased() -> None:
    """A seed fixes DARE's masks; the kept share is about density; the mean over seeds tends to τ (E[τ̃] = τ)."""
    task = _tasks(1, (40, 50))[0]
    one = _ours("dare_linear", [task], [1.0], density=0.7, seed=3)
    torch.testing.assert_close(one, _ours("dare_linear", [task], [1.0], density=0.7, seed=3), rtol=0, atol=0)
    assert not torch.equal(one, _ours("dare_linear", [task], [1.0], density=0.7, seed=4))
    assert abs(float((one != 0).float().mean()) - 0.7) < 0.03  # 2000 Bernoulli draws: sd 0.01
    mean = torch.stack([_ours("dare_linear", [task], [1.0], density=0.7, seed=s) for s in range(400)]).mean(0)
    # per entry sd of the mean: |τ|·sqrt(0.3/0.7)/sqrt(400) ≈ 0.033|τ|
    assert float((mean - task).norm() / task.norm()) < 0.05


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("ties", {"density": 0.0}, r"density must lie in \(0, 1\], got 0.0"),
        ("ties", {"density": 1.5}, r"density must lie in \(0, 1\], got 1.5"),
        ("dare_linear", {"density": float("nan")}, "density must lie in"),
        ("ties", {"density": "0.5"}, "density must lie in"),
        ("task_arithmetic", {"density": 0.5}, "'task_arithmetic' takes no option 'density'; its options: none"),
        ("ties", {"seed": 1}, "takes no option 'seed'; its options: density, sign, normalize, scope"),
        ("ties", {"sign": "sum"}, "sign must be one of 'total', 'frequency', got 'sum'"),
        ("dare_ties", {"rescale": "l2"}, "rescale must be one of"),
        ("dare_ties", {"seed": 1.5}, "seed must be an int or None"),
        ("slerp", {}, "unknown merge 'slerp'"),
    ],
)
def test_bad_options_are_named(method: str, options: dict, match: str) -> None:
    with pytest.raises(MergeOptionError, match=match):
        parse_options(method, options)

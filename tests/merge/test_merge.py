"""``pk.merge_adapters``: exactness, every method on dense ΔW, any mergeable method and rank, Conv2d and GPT-2
Conv1D, the merged adapter merged into the base, PEFT's ``cat`` parity, save / load / PEFT export."""

from __future__ import annotations

import pytest
import torch
from _helpers import adapted, delta, exact_sum, rel
from conftest import make_tiny_net, tiny_bert, tiny_gpt2

import peftkit as pk
from peftkit.merge.combine import combine, parse_options

W = [0.7, -0.3]


def _tiny_pair(**b_fields) -> pk.AdaptedModel:
    return adapted(
        make_tiny_net(),
        {
            "a": pk.LoRAConfig(r=2, alpha=4.0, targets=["fc1", "fc2", "conv"]),
            "b": pk.LoRAConfig(r=3, alpha=3.0, targets=["fc1", "fc2", "conv"], **b_fields),
        },
    )


def test_task_arithmetic_is_the_exact_weighted_sum_at_the_sum_of_ranks() -> None:
    model = _tiny_pair()
    result = pk.merge_adapters(model, ["a", "b"], W)
    assert result.ranks == {"fc1": 5, "fc2": 5, "conv": 5}
    for path in ("fc1", "fc2", "conv"):
        assert rel(delta(model, "merged", path), exact_sum(model, ["a", "b"], W, path)) < 1e-6
    assert result.error < 1e-6 and result.config.scale == 1.0
    # with weights 1 the merged adapter is the forward with both adapters active (the core adds their changes)
    pk.merge_adapters(model, ["a", "b"], new_name="sum")
    x = torch.randint(0, 40, (4, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.set_adapter(["a", "b"])
        both = model(x)
        model.set_adapter("sum")
        merged = model(x)
    torch.testing.assert_close(merged, both, rtol=1e-5, atol=1e-6 * float(both.abs().max()))


def test_any_mergeable_methods_and_ranks_merge_exactly() -> None:
    """LoRA r=2, LoKr and DoRA (no low-rank form: SVD at the numerical rank) on the same modules."""
    targets = ["fc1", "fc2"]
    model = adapted(
        make_tiny_net(),
        {
            "lora": pk.LoRAConfig(r=2, targets=targets),
            "lokr": pk.get_config("lokr", targets=targets),
            "dora": pk.get_config("dora", r=4, targets=targets),
        },
    )
    weights = [0.5, 1.5, -1.0]
    result = pk.merge_adapters(model, ["lora", "lokr", "dora"], weights)
    for path in targets:
        assert rel(delta(model, "merged", path), exact_sum(model, ["lora", "lokr", "dora"], weights, path)) < 1e-6
        assert result.errors[path] < 1e-6


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_elementwise_methods_run_on_dense_deltas(method: str) -> None:
    """The merged adapter's ΔW is the element-wise merge of the dense ΔW_i (with the same seed), exact at rank None."""
    model = _tiny_pair()
    options = {"density": 0.4, "seed": 3} if method.startswith("dare") else {"density": 0.4}
    result = pk.merge_adapters(model, ["a", "b"], W, method=method, **options)
    opts = parse_options(method, options)
    gen = torch.Generator().manual_seed(3)
    for path in ("fc1", "fc2", "conv"):  # model order: the order DARE draws its masks in
        stack = torch.stack([delta(model, n, path).float().reshape(-1) for n in ("a", "b")])
        want = combine(stack, torch.tensor(W), method, opts, gen).reshape(delta(model, "a", path).shape)
        assert rel(delta(model, "merged", path), want) < 1e-5, path
        assert result.errors[path] < 1e-6
    assert result.ranks["fc1"] > 5  # sparsified: no longer of rank 2 + 3


def test_rank_truncation_is_the_svd_with_its_error_reported() -> None:
    model = _tiny_pair()
    result = pk.merge_adapters(model, ["a", "b"], W, rank=3)
    for path in ("fc1", "fc2", "conv"):
        exact = exact_sum(model, ["a", "b"], W, path)
        s = torch.linalg.svdvals(exact.reshape(exact.shape[0], -1))
        tail = float((s[3:].square().sum() / s.square().sum()).sqrt())
        assert result.ranks[path] == 3
        assert result.errors[path] == pytest.approx(tail, rel=1e-4)
        assert rel(delta(model, "merged", path), exact) == pytest.approx(tail, rel=1e-4)
    norms = {p: float(exact_sum(model, ["a", "b"], W, p).norm()) for p in ("fc1", "fc2", "conv")}
    overall = (sum((result.errors[p] * norms[p]) ** 2 for p in norms) / sum(n**2 for n in norms.values())) ** 0.5
    assert result.error == pytest.approx(overall, rel=1e-4)


def test_gpt2_conv1d_merge_and_merged_into_the_base_is_the_adapted_forward() -> None:
    model = adapted(
        tiny_gpt2(),
        {
            "a": pk.LoRAConfig(r=2, alpha=4.0, targets=["c_attn", "c_fc"]),
            "b": pk.LoRAConfig(r=5, alpha=5.0, targets=["c_attn", "c_fc"]),
        },
    )
    result = pk.merge_adapters(model, ["a", "b"], [1.0, 1.0], method="ties", density=0.5, activate=True)
    assert set(result.ranks) == {f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")}
    pk.merge_adapters(model, ["a", "b"], new_name="sum")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.set_adapter(["a", "b"])
        both = model(ids).logits
        model.set_adapter("sum")
        summed = model(ids).logits
        model.set_adapter("merged")
        adapted_out = model(ids).logits
        plain = model.merge(["merged"])(ids).logits  # folded into the base weights, wrappers removed
    torch.testing.assert_close(summed, both, rtol=1e-5, atol=1e-5 * float(both.abs().max()))
    torch.testing.assert_close(plain, adapted_out, rtol=1e-5, atol=1e-5 * float(adapted_out.abs().max()))


def test_bias_changes_and_saved_modules_are_merged() -> None:
    """LoRA's bias (PEFT lora_bias) and a modules_to_save head: Δb = Σ w Δb_i, the head's dense deltas merged."""
    cfg = dict(targets=["fc1", "fc2"], bias=True, modules_to_save=["head"])
    model = adapted(make_tiny_net(), {"a": pk.LoRAConfig(r=2, **cfg), "b": pk.LoRAConfig(r=3, **cfg)})
    result = pk.merge_adapters(model, ["a", "b"], W)
    assert result.config.modules_to_save == ["head"] and "head" not in result.ranks
    mods = {n: model.adapter_modules(n) for n in ("a", "b", "merged")}
    for path in ("fc1", "fc2", "head"):
        base = model.base_view(path)
        want = sum(w * mods[n][path].delta_bias(base) for n, w in zip("ab", W))
        torch.testing.assert_close(mods["merged"][path].delta_bias(base), want, rtol=1e-5, atol=1e-6)
        assert rel(delta(model, "merged", path), exact_sum(model, ["a", "b"], W, path)) < 1e-6


@pytest.mark.parity
def test_task_arithmetic_equals_peft_cat(tmp_path) -> None:
    """PEFT's add_weighted_adapter(combination_type="cat") on the same two adapters (ranks 4 and 6, different
    alphas, a negative weight): the same ΔW to 1e-6 and the same outputs. PEFT's "linear" (equal ranks only) is far
    off: it combines the A's and the B's separately, adding cross terms B_i A_j."""
    import peft

    cfgs = {
        "a": pk.LoRAConfig(r=4, alpha=8.0, targets=["query", "value"]),
        "b": pk.LoRAConfig(r=6, alpha=3.0, targets=["query", "value"]),
        "c": pk.LoRAConfig(r=4, alpha=8.0, targets=["query", "value"]),  # PEFT's "linear" needs equal ranks
    }
    model = adapted(tiny_bert(), cfgs)
    pk.merge_adapters(model, ["a", "b"], W, activate=True)
    for name in ("a", "b", "c"):
        pk.export_peft(model, tmp_path / name, name)
    pm = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], W, "cat", combination_type="cat")
    pm.load_adapter(tmp_path / "c", adapter_name="c")
    pm.add_weighted_adapter(["a", "c"], W, "linear", combination_type="linear")
    pm.set_adapter("cat")
    pm.eval()
    linear_errors = []
    for path in model.layer_paths["merged"]:
        layer = pm.base_model.model.get_submodule(path)
        ours = delta(model, "merged", path)
        assert rel(ours, layer.get_delta_weight("cat").detach()) < 1e-6
        linear_errors.append(rel(layer.get_delta_weight("linear").detach(), exact_sum(model, ["a", "c"], W, path)))
    assert min(linear_errors) > 0.3
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.set_adapter("merged")
        ours_out = model(input_ids=ids).last_hidden_state
        peft_out = pm(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours_out, peft_out, rtol=1e-5, atol=1e-5 * float(peft_out.abs().max()))


def test_merged_adapter_saves_loads_and_exports_to_peft(tmp_path) -> None:
    import peft

    model = _tiny_pair()
    pk.merge_adapters(model, ["a", "b"], W, method="ties", density=0.5, rank=4)
    x = torch.randint(0, 40, (4, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.set_adapter("merged")
        want = model(x)
    model.save(tmp_path / "saved", "merged")
    loaded = pk.load(make_tiny_net(), tmp_path / "saved").eval()
    pk.export_peft(model, tmp_path / "peft", "merged")
    pm = peft.PeftModel.from_pretrained(make_tiny_net(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
        torch.testing.assert_close(pm(x), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))

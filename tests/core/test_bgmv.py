"""The C++ mixed-batch kernel (``peftkit/core/bgmv.py``, ``bgmv.cpp``): its op against a per-row float64
reference (rows of id -1, adapters of different ranks, several tokens per row, widths that are not a multiple
of the vector width, strided views of one packed bank, one and two threads), its checks of bad input, and what
happens without it: no compiler, or switched off, leaves the PyTorch path with one warning naming the reason."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from peftkit.core import bgmv

needs_kernel = pytest.mark.skipif(not bgmv.available(), reason=f"C++ kernel not built: {bgmv.status()}")
ROOT = Path(__file__).resolve().parents[2]


def _bank(dtype: torch.dtype, k: int = 37, n: int = 45, max_rank: int = 8) -> tuple[torch.Tensor, ...]:
    """A packed bank of 6 slots (as ``bank.py`` lays it out: ``[down | up]`` per row) with ranks
    ``[0, 8, 3, 5, 8, 1]``; every value past a slot's rank is NaN, so reading it would show."""
    ranks = torch.tensor([0, 8, 3, 5, 8, 1])
    packed = torch.randn(len(ranks), max_rank * (k + n), dtype=dtype)
    down = packed[:, : max_rank * k].view(-1, max_rank, k)
    up = packed[:, max_rank * k :].view(-1, max_rank, n)
    for s, r in enumerate(ranks.tolist()):
        down[s, r:], up[s, r:] = float("nan"), float("nan")
    return down, up, ranks


def _reference(out, x, down, up, ids, slot_of_id, ranks) -> torch.Tensor:
    """Per token, in float64: ``out + (x downᵀ) up`` over the slot's own rank."""
    got = out.double().clone()
    per_row = out.shape[0] // ids.numel()
    for t in range(out.shape[0]):
        s = int(slot_of_id[ids[t // per_row]])
        r = int(ranks[s])
        got[t] += (x[t].double() @ down[s, :r].double().T) @ up[s, :r].double()
    return got


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_row", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_a_per_row_reference(dtype, per_row, threads) -> None:
    down, up, ranks = _bank(dtype)
    ids = torch.tensor([2, -1, 0, 3, 3, 1, 4, 2, 2, 2, 2, 0, -1, 5, 1])  # ids 0..5; 5 has no slot in this layer
    slot_of_id = torch.tensor([1, 2, 3, 4, 5, 0, 0])  # id -> slot; the last entry is id -1's (slot 0, rank 0)
    tokens = ids.numel() * per_row
    x = torch.randn(tokens, down.shape[2], dtype=dtype)
    out = torch.randn(tokens, up.shape[2], dtype=dtype)
    want = _reference(out, x, down, up, ids, slot_of_id, ranks)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bgmv.bgmv_(out, x, down, up, ids, slot_of_id, ranks)
    finally:
        torch.set_num_threads(before)
    assert not out.isnan().any()  # nothing past a slot's rank was read
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(out.double(), want, rtol=0, atol=tol * float(want.abs().max()))
    base_rows = (slot_of_id[ids] == 0).repeat_interleave(per_row)
    assert base_rows.sum() == 3 * per_row  # rows of id -1 and of id 5 (no slot): left exactly as they were
    torch.testing.assert_close(out[base_rows].double(), want[base_rows], rtol=0, atol=0)


@needs_kernel
def test_kernel_handles_empty_and_base_only_batches() -> None:
    down, up, ranks = _bank(torch.float32)
    slot_of_id = torch.tensor([1, 0])
    empty = torch.empty(0, up.shape[2])
    bgmv.bgmv_(empty, torch.empty(0, down.shape[2]), down, up, torch.empty(0, dtype=torch.long), slot_of_id, ranks)
    out = torch.randn(4, up.shape[2])
    want = out.clone()
    bgmv.bgmv_(out, torch.randn(4, down.shape[2]), down, up, torch.full((4,), -1), slot_of_id, ranks)
    assert torch.equal(out, want)


@needs_kernel
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ids": torch.tensor([0, 7])}, "adapter id 7 outside"),
        ({"ids": torch.tensor([0, -2])}, "adapter id -2 outside"),
        ({"ranks": torch.tensor([0, 9, 3, 5, 8, 1])}, r"ranks\[1\] = 9 outside"),
        ({"slot_of_id": torch.tensor([9, 0])}, "slot 9 of adapter id 0"),
        ({"x": torch.randn(2, 37, dtype=torch.float64)}, "share one dtype"),
        ({"x": torch.randn(3, 37)}, "out has 2 tokens, x 3"),
        ({"ids": torch.tensor([0, 0], dtype=torch.int32)}, "int64"),
        ({"out": torch.zeros(45, 2).T}, "contiguous"),  # written in place: never copied
        ({"out": torch.zeros(3, 2, 45).transpose(0, 1)}, "view"),  # [2, 3, 45] not viewable as [6, 45]
        ({"out": torch.zeros(1, 2, 45).transpose(0, 1)[..., :44]}, "do not match"),
    ],
)
def test_kernel_rejects_bad_input(change, message) -> None:
    down, up, ranks = _bank(torch.float32)
    args = {"ids": torch.tensor([0, 0]), "slot_of_id": torch.tensor([1, 0]), "ranks": ranks, "x": torch.randn(2, 37)}
    args["out"] = torch.zeros(2, 45)
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        bgmv.bgmv_(args["out"], args["x"], down, up, args["ids"], args["slot_of_id"], args["ranks"])


@needs_kernel
def test_kernel_flattens_leading_dimensions_and_reads_strided_inputs() -> None:
    """A layer's ``[B, L, N]`` output is written in place through the op's own view, and an ``x`` that is not
    contiguous is read as its values: the same result as the flat 2-D call."""
    down, up, ranks = _bank(torch.float32)
    ids, slot_of_id = torch.tensor([0, -1, 0]), torch.tensor([1, 0])
    x = torch.randn(3, 2, 37)
    flat = torch.randn(6, 45)
    want = flat.clone()
    bgmv.bgmv_(want, x.reshape(6, 37), down, up, ids, slot_of_id, ranks)
    out = flat.clone().view(3, 2, 45)
    strided_x = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, leading strides swapped
    bgmv.bgmv_(out, strided_x, down, up, ids, slot_of_id, ranks)
    assert torch.equal(out.view(6, 45), want)
    assert not torch.equal(want, flat)  # the adapter rows changed something


def test_kernel_is_used_only_for_cpu_tensors_of_one_dtype_float32_or_float64() -> None:
    x = torch.randn(2, 3)
    assert bgmv.usable(x, x) == bgmv.available() == bgmv.usable(x.double(), x.double())
    assert not bgmv.usable(x.half(), x.half())
    assert not bgmv.usable(x.bfloat16(), x.bfloat16())
    assert not bgmv.usable(x, x.double())  # a bf16 / quantized base with a float32 bank: the PyTorch path
    assert not bgmv.usable(x.to("meta"), x)
    assert not bgmv.usable(x, x.to("meta"))


# ---------------------------------------------------------------------------------- build and fallback
SCRIPT = textwrap.dedent(
    """
    import torch
    import peftkit as pk
    from peftkit.core import bgmv

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8)).eval()
    model = pk.adapt(net, pk.LoRAConfig(r=2, targets=["0", "2"], seed=0), name="a").eval()
    model.add_adapter("b", pk.LoRAConfig(r=5, targets=["0", "2"], seed=1))
    for m in model.modules():
        if isinstance(m, pk.Adapter):
            torch.nn.init.normal_(m.B)
    x, ids = torch.randn(6, 16), torch.tensor([0, 1, -1, 1, 0, 0])
    with torch.no_grad():
        got = model(x, adapter_ids=ids)
        model(x, adapter_ids=ids)  # a second mixed batch: no second warning
        rows = {}
        for k, name in enumerate(["a", "b"]):
            model.set_adapter(name)
            rows[k] = model(x)
        with model.adapters_disabled():
            rows[-1] = model(x)
    want = torch.stack([rows[k][i] for i, k in enumerate(ids.tolist())])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))
    print("STATUS", bgmv.status())
    """
)


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PEFTKIT_KERNEL_DIR": str(tmp_path / "kernels"), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=full, cwd=ROOT, timeout=600
    )


def test_without_a_compiler_mixed_batches_run_in_pytorch_with_one_warning(tmp_path: Path) -> None:
    """No C++ compiler on the machine: the first mixed batch logs one warning naming the reason, and mixed
    batches give each row its own adapter's output through the PyTorch path."""
    proc = _run(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'ok': False" in proc.stdout and "no C++ compiler found" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "C++ mixed-batch kernel is not available" in line]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0], proc.stderr
    assert not (tmp_path / "kernels").exists() or not list((tmp_path / "kernels").glob("*.so"))


def test_switched_off_by_environment(tmp_path: Path) -> None:
    proc = _run(tmp_path, PEFTKIT_KERNELS="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PEFTKIT_KERNELS=0" in proc.stdout and "PEFTKIT_KERNELS=0" in proc.stderr


def test_a_failing_build_is_reported_and_left_for_pytorch(tmp_path: Path) -> None:
    """A compiler that exits with an error (here: ``false``) is a failed build, not a crash."""
    proc = _run(tmp_path, CXX="false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "false failed (exit 1)" in proc.stdout and "not available" in proc.stderr


def test_a_damaged_library_in_the_cache_is_built_again(tmp_path: Path) -> None:
    """A truncated file where the library should be (a full disk, a killed copy) is rebuilt, not a lasting
    fallback."""
    env = {**os.environ, "PEFTKIT_KERNEL_DIR": str(tmp_path / "kernels"), "CXX": "false"}
    name = subprocess.run(
        [sys.executable, "-c", "from peftkit.core import bgmv; print(bgmv.library_path())"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    Path(name).parent.mkdir(parents=True)
    Path(name).write_bytes(b"\x7fELF truncated")
    proc = _run(tmp_path, CXX="false")  # the rebuild fails here (no real compiler): reported, not a crash
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "false failed (exit 1)" in proc.stdout  # it tried to build again (not: "invalid ELF header")


@pytest.mark.slow  # compiles the kernel from scratch (~10-40 s)
@needs_kernel
def test_builds_into_an_empty_cache_folder_and_is_reused(tmp_path: Path) -> None:
    """A fresh machine: the first process builds the library into the cache folder and uses it; a second
    process loads the same file without building."""
    first = _run(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    built = list((tmp_path / "kernels").glob("peftkit_bgmv_*.so"))
    assert len(built) == 1 and "'ok': True" in first.stdout and str(built[0]) in first.stdout
    assert not list((tmp_path / "kernels").glob("*.tmp.so"))  # the temporary file was renamed
    stamp = built[0].stat().st_mtime_ns
    second = _run(tmp_path)
    assert second.returncode == 0 and "'ok': True" in second.stdout
    assert built[0].stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------------------ torch.compile
@needs_kernel
def test_op_runs_on_fake_tensors_for_tracing() -> None:
    """torch.compile traces ops on fake tensors: the op (its schema says it only writes into ``out`` and returns
    nothing) runs there without the fallback that would run the C++ code on zero-filled real tensors (switched off
    here), so tracing needs no fake implementation of its own."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    down, up, ranks = _bank(torch.float32)
    with FakeTensorMode(allow_fallback_kernels=False) as mode:
        out = mode.from_tensor(torch.zeros(4, up.shape[2]))
        fake = [mode.from_tensor(t) for t in (down, up, ranks)]
        ids, slot_of_id = mode.from_tensor(torch.tensor([0, 1, -1, 1])), mode.from_tensor(torch.tensor([1, 2, 0]))
        bgmv.bgmv_(out, mode.from_tensor(torch.randn(4, down.shape[2])), fake[0], fake[1], ids, slot_of_id, fake[2])
        assert out.shape == (4, up.shape[2])


@needs_kernel
def test_compiled_with_dynamic_shapes_equals_eager() -> None:
    """The op inside one graph (fullgraph) compiled for symbolic batch sizes: each size equals the eager op."""
    down, up, ranks = _bank(torch.float32)
    slot_of_id = torch.tensor([1, 2, 3, 4, 5, 0, 0])

    def step(out: torch.Tensor, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = out * 2
        bgmv.bgmv_(out, x, down, up, ids, slot_of_id, ranks)
        return out + 1

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (5, 11):
        ids = torch.tensor([2, -1, 0, 3, 1, 4, 5, 2, 2, 0, 3])[:rows]
        x, out = torch.randn(rows, down.shape[2]), torch.randn(rows, up.shape[2])
        want = step(out, x, ids)
        torch.testing.assert_close(compiled(out, x, ids), want, rtol=0, atol=1e-6 * float(want.abs().max()))


def test_calling_the_op_when_it_is_not_loaded_says_so(monkeypatch) -> None:
    """``bgmv_`` without a loaded library (callers check ``usable()`` first) names the reason, not a KeyError."""
    monkeypatch.setattr(bgmv, "_state", {"ok": False, "reason": "PEFTKIT_KERNELS=0"})
    x = torch.zeros(1, 4)
    with pytest.raises(RuntimeError, match=r"not loaded .*PEFTKIT_KERNELS=0"):
        bgmv.bgmv_(x, x, torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), torch.zeros(1, dtype=torch.long), x, x)

"""The batched low-rank kernel of mixed-adapter batches on CPU (``bgmv.cpp``), built at first use.

``bgmv_(out, x, down, up, ids, slot_of_id, ranks)`` adds ``(x[t] downₛᵀ) upₛ`` to every token ``t`` of ``out``,
``s`` the bank slot of its row's adapter id: Punica's BGMV/SGMV (Chen et al. 2023, "Punica: Multi-Tenant LoRA
Serving", https://github.com/punica-ai/punica) with S-LoRA's per-slot ranks (Sheng et al. 2024,
https://github.com/S-LoRA/S-LoRA). The C++ op groups the tokens by slot, so each adapter's factors are read once
per call instead of once per row as the bank's PyTorch gather does (``bank.forward_bank``; see ``bgmv.cpp``).

Build: the first call compiles ``bgmv.cpp`` with the system C++ compiler (``$CXX``, else ``c++``) against the
installed torch (``torch.utils.cpp_extension``'s include and library paths; no ninja, no Python binding) into a
cache folder (``$PEFTKIT_KERNEL_DIR``, else ``$TORCH_EXTENSIONS_DIR/peftkit``, else ``~/.cache/peftkit/kernels``),
one file per (source, torch version, CPU instruction set, compiler), so later processes only load it. Without a
compiler (or when the build fails, or with ``PEFTKIT_KERNELS=0``) :func:`available` is ``False``, one warning names
the reason, and the callers use the PyTorch path: same results, slower at one token per row.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("peftkit.core")

SOURCE = Path(__file__).with_name("bgmv.cpp")
DTYPES = (torch.float32, torch.float64)  # what the C++ op implements
# -m flags per instruction set torch itself runs with (torch.backends.cpu.get_cpu_capability()): the kernel uses
# what the CPU has without -march=native, so a cache folder shared by different machines stays safe (the
# instruction set is part of the file name).
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once tried; "reason": why not; "path": the library loaded


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("PEFTKIT_KERNEL_DIR"):
        return Path(os.environ["PEFTKIT_KERNEL_DIR"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "peftkit"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peftkit" / "kernels"


def compile_command(source: Path, target: Path) -> list[str]:
    """The compiler call that builds ``source`` into the shared library ``target``."""
    from torch.utils import cpp_extension

    isa = torch.backends.cpu.get_cpu_capability()
    libs = cpp_extension.library_paths()
    return [
        cpp_extension.get_cxx_compiler(),
        "-shared",
        "-fPIC",
        "-O3",
        "-std=c++20",
        "-fopenmp",  # at::parallel_for runs on torch's OpenMP threads (libgomp.so.1 resolves to torch's own)
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *_ISA_FLAGS.get(isa, []),
        *[f"-I{p}" for p in cpp_extension.include_paths()],
        str(source),
        "-o",
        str(target),
        *[f"-L{p}" for p in libs],
        *[f"-Wl,-rpath,{p}" for p in libs],
        "-lc10",
        "-ltorch_cpu",
    ]


def library_path() -> Path:
    """The built library's path: named by a hash of the source, torch and the compile command."""
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(" ".join([torch.__version__, sys.platform, *compile_command(Path("src"), Path("out"))]).encode())
    return cache_dir() / f"peftkit_bgmv_{key.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    compiler = compile_command(SOURCE, target)[0]
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found ({compiler!r}; set $CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp.so")
    os.close(fd)
    try:
        res = subprocess.run(compile_command(SOURCE, Path(tmp)), capture_output=True, text=True, check=False)
        if res.returncode != 0:
            tail = " | ".join(line for line in res.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"{compiler} failed (exit {res.returncode}): {tail}")
        os.replace(tmp, target)  # atomic: a concurrent process loads either no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def available() -> bool:
    """Whether the C++ op is loaded (building it on the first call); ``False`` logs the reason once."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" not in _state:
            _state.update(_load())
            if not _state["ok"]:
                log.warning(
                    "peftkit: the C++ mixed-batch kernel is not available (%s); mixed-adapter batches use the "
                    "PyTorch gather path (same results, slower at one token per row)",
                    _state["reason"],
                )
    return bool(_state["ok"])


def _load() -> dict[str, object]:
    if os.environ.get("PEFTKIT_KERNELS", "1") == "0":
        return {"ok": False, "reason": "PEFTKIT_KERNELS=0"}
    if not SOURCE.exists():
        return {"ok": False, "reason": f"{SOURCE.name} is not installed with the package"}
    try:
        path = library_path()
        if not path.exists():
            _build(path)
        try:
            torch.ops.load_library(str(path))
        except OSError:  # a damaged file in the cache (a full disk, a killed copy): built again, once
            _build(path)
            torch.ops.load_library(str(path))
        op = torch.ops.peftkit.bgmv_.default  # raises if the library did not register the op
    except Exception as exc:  # any failure to build or load leaves the PyTorch path, with the reason logged
        return {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "reason": "", "path": str(path), "op": op}


def status() -> dict[str, object]:
    """``{"ok": bool, "reason": str, "path": str}`` of the last load (``{}`` before the first)."""
    return {k: v for k, v in _state.items() if k != "op"}


def usable(*tensors: Tensor) -> bool:
    """Whether the C++ op can run on these tensors (all on the CPU, one dtype, float32 or float64) and is
    available."""
    dtype = tensors[0].dtype
    return dtype in DTYPES and all(t.is_cpu and t.dtype == dtype for t in tensors) and available()


def bgmv_(out: Tensor, x: Tensor, down: Tensor, up: Tensor, ids: Tensor, slot_of_id: Tensor, ranks: Tensor) -> None:
    """``out[t] += (x[t] down[s]ᵀ) up[s]`` in place, ``s = slot_of_id[ids[t // L]]`` (``L = T / len(ids)`` tokens
    per row; id ``-1`` takes the last entry of ``slot_of_id``), reading only the first ``ranks[s]`` rows of each
    slot; slots of rank 0 add nothing. ``out [..., N]`` (viewable as ``[T, N]``, e.g. contiguous), ``x [..., K]``
    (``T`` tokens in all), ``down [S, R, K]``, ``up [S, R, N]`` (the last dimension contiguous), ``ids``,
    ``slot_of_id``, ``ranks``: int64. Call only where :func:`usable`."""
    op = _state.get("op")  # the op's overload, kept at load: no lookup per call
    if op is None:
        raise RuntimeError(f"the C++ mixed-batch kernel is not loaded ({status() or 'never tried'}); check usable()")
    op(out, x, down, up, ids, slot_of_id, ranks)  # type: ignore[operator]

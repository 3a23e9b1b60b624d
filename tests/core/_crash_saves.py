"""Kill saves at random and at every file-system step, and check that the folder always loads.

Run as ``python _crash_saves.py FOLDER KILLS``; prints one JSON line of results. Each round forks a child that
saves (alternating two versions of an adapter) and is killed with SIGKILL (no cleanup runs); the parent then
loads the folder and checks that it holds one of the two versions exactly. Forking keeps a round cheap (no
new interpreter and torch import per kill).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

torch.set_num_threads(1)

import peftkit as pk  # noqa: E402
import peftkit.core.io as io  # noqa: E402


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))


def set_version(model: pk.AdaptedModel, version: int) -> None:
    g = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for adapter in model.adapter_modules("default").values():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def which_version(folder: Path, x: torch.Tensor, outputs: list[torch.Tensor]) -> int:
    loaded = pk.load(net(), folder).eval()
    with torch.no_grad():
        out = loaded(x)
    hits = [i for i, o in enumerate(outputs) if torch.equal(out, o)]
    if not hits:
        raise AssertionError("the loaded adapter is neither saved version")
    return hits[0]


def uses_kept_file(folder: Path) -> bool:
    """Whether adapter.json names the kept previous tensor file (the kill fell between the two renames)."""
    meta = json.loads((folder / io.CONFIG_FILE).read_text())
    return hashlib.sha256((folder / io.WEIGHTS_FILE).read_bytes()).hexdigest() != meta[io.CHECKSUM_FIELD]


def child_saving(model: pk.AdaptedModel, folder: Path, die_at_step: int | None, version: int = 0) -> None:
    """Save forever (alternating versions); with ``die_at_step``, die at that file-system call of the save."""
    try:
        if die_at_step is not None:
            calls = [0]
            for fn in ("replace", "link", "unlink", "fsync"):
                real = getattr(os, fn)

                def counted(*args, _real=real, **kwargs):
                    calls[0] += 1
                    if calls[0] == die_at_step:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return _real(*args, **kwargs)

                setattr(io.os, fn, counted)
            set_version(model, version)
            model.save(folder)
            os._exit(0)  # the save finished before the chosen step
        while True:
            version ^= 1
            set_version(model, version)
            model.save(folder)
    finally:
        os._exit(1)


def main() -> None:
    folder, kills = Path(sys.argv[1]), int(sys.argv[2])
    model = pk.adapt(net(), pk.LoRAConfig(r=64, targets=["0", "2"])).eval()
    x = torch.randn(4, 256)
    outputs = []
    for version in (0, 1):
        set_version(model, version)
        with torch.no_grad():
            outputs.append(model(x))
    set_version(model, 0)
    model.save(folder)
    rng = random.Random(0)
    result = {"random_kills": 0, "step_kills": 0, "kept_file_used": 0, "versions": []}
    for _ in range(kills):
        pid = os.fork()
        if pid == 0:
            child_saving(model, folder, None, version=rng.randrange(2))
        time.sleep(rng.uniform(0.001, 0.1))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        result["random_kills"] += 1
        result["kept_file_used"] += uses_kept_file(folder)
        result["versions"].append(which_version(folder, x, outputs))
    result["leftovers_after_random_kills"] = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
    for step in range(1, 16):
        # from a clean save of one version, die at the step-th file-system call of saving the other one
        current = result["versions"][-1]
        set_version(model, current)
        model.save(folder)
        other = 1 - current
        pid = os.fork()
        if pid == 0:
            child_saving(model, folder, step, version=other)
        _, status = os.waitpid(pid, 0)
        result["step_kills"] += os.WIFSIGNALED(status)
        result["kept_file_used"] += uses_kept_file(folder)
        result["versions"].append(which_version(folder, x, outputs))
    set_version(model, 1)
    model.save(folder)
    result["leftovers_after"] = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
    result["final"] = which_version(folder, x, outputs)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

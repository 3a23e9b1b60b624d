"""Multi-process training on ``torch.distributed``: ``peftkit train --nproc N [--fsdp]`` or a plain ``torchrun``.

One process per CPU core group (gloo) or per GPU (NCCL), started by ``torchrun``, which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`session` joins the process group
from them. Every process builds the same base model and adapter from the same seed, then:

* **DDP** (``DistributedDataParallel``): every rank holds the whole model; only the trainable (adapter)
  parameters are registered with DDP, so only their gradients are averaged and the frozen base is never
  broadcast or synchronised.
* **FSDP2** (``--fsdp``; ``torch.distributed.fsdp.fully_shard``): as torchtune's distributed LoRA recipe does,
  each module that holds trainable adapter parameters is sharded as its own unit, then each transformer block
  (the classes of the model's ``_no_split_modules``, else the entries of its largest ``nn.ModuleList``), then the
  root. Frozen float weights are sharded with them. Weights held by bitsandbytes / hqq layers (packed 4- or 8-bit
  data whose quantisation state FSDP2 cannot all-gather) stay whole on every rank (``ignored_params``); a torchao
  ``NF4Tensor`` weight is sharded by torchao's own FSDP2 support, which needs ``numel / (64 · 256)`` (its blocks
  of 64 values, their scales in blocks of 256) divisible by the world size (:func:`check_nf4_sharding`).

Data: with ``W`` processes at per-rank batch ``b`` the global batch is ``W · b``: the trainer draws the same
seeded order on every rank (as one process would) and rank ``r`` takes the ``r``-th contiguous share of each
global batch (:meth:`Distributed.share`), so the global batches are exactly those of one process at batch
``W · b``. Each rank's loss is weighted by the items it averages over (tokens with a label for a causal LM,
rows otherwise) so that the averaged gradient is that of the global batch's mean loss, as on one process.
Random numbers (dropout) are drawn per rank from the same seed, hence differ from one process's draws over the
whole batch: runs compare exactly with dropout off.

Only rank 0 writes adapters, logs, metrics and ``run.json``. Checkpoints hold the trainable parameters and the
optimizer state in ``torch.distributed.checkpoint`` (DCP) format (``dcp/``, each rank its shards; the frozen
base is not saved), plus rank 0's ``trainer.json`` / ``trainer.safetensors`` (step, data order and position,
every rank's RNG states) and ``adapter/`` (for ``peftkit eval`` / ``serve``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from peftkit.core.errors import PeftkitError
from peftkit.train.guards import grad_norm as local_grad_norm

DCP_DIR = "dcp"
# Optimizers whose update is elementwise (AdamW; LoRA+ is AdamW with two learning rates): exact on FSDP2 shards.
FSDP_OPTIMIZERS = ("adamw", "loraplus")
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# torchao's NF4Tensor: 64 values per quantisation block, the blocks' scales quantised in blocks of 256.
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256


class DistributedError(PeftkitError, ValueError):
    """Multi-process settings that cannot work (too many processes, a world size the base cannot be sharded
    over, ``--fsdp`` on one process)."""


# --------------------------------------------------------------------------------------------- launching
def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its environment variables are set)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def env_rank() -> int:
    """This process's rank from the environment (0 outside ``torchrun``); readable before the group exists."""
    return int(os.environ.get("RANK", "0")) if under_torchrun() else 0


def env_world_size() -> int:
    """The number of processes from the environment (1 outside ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1


def max_processes(device: str | None = None) -> int:
    """The most processes this machine runs: one per GPU with CUDA (``device`` ``cuda`` or unset with CUDA
    available), else one per CPU core (``os.cpu_count()``)."""
    if _uses_cuda(device):
        return torch.cuda.device_count()
    return os.cpu_count() or 1


def check_launch(nproc: int | None, fsdp: bool, device: str | None = None) -> int:
    """The number of processes to start for ``--nproc`` / ``--fsdp`` (outside ``torchrun``).

    Raises:
        DistributedError: ``nproc`` below 1 or above :func:`max_processes`, or ``fsdp`` on one process.
    """
    n = 1 if nproc is None else int(nproc)
    if n < 1:
        raise DistributedError(f"--nproc must be at least 1, got {n}")
    limit = max_processes(device)
    if n > limit:
        what = f"{limit} CUDA device(s)" if _uses_cuda(device) else f"{limit} CPU core(s) (os.cpu_count())"
        raise DistributedError(
            f"--nproc {n} is more processes than this machine has: it has {what}; use --nproc {limit} or fewer"
        )
    if fsdp and n < 2:
        raise DistributedError(
            "--fsdp shards the model over several processes: add --nproc 2 (or more), or start the run under "
            "torchrun --nproc-per-node N"
        )
    return n


def launch_command(nproc: int, args: Sequence[str]) -> list[str]:
    """The ``torchrun`` command that runs ``peftkit ARGS`` in ``nproc`` processes on this machine."""
    import sys

    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
        "-m", "peftkit.cli", *args,
    ]  # fmt: skip


def _uses_cuda(device: str | None) -> bool:
    if device is not None:
        return str(device).startswith("cuda")
    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ the group
@dataclass
class Distributed:
    """This process's place in the group, and the collective steps the trainer takes with it.

    A :class:`Distributed` with ``world_size == 1`` (:data:`LOCAL`) makes every method the single-process
    behaviour, so the trainer calls them unconditionally.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # -------------------------------------------------------------------------------------- the model
    def wrap(self, model: nn.Module, optim: str = "adamw") -> nn.Module:
        """The module to call in training: ``model`` under DDP (a wrapper), or ``model`` itself sharded in place
        by FSDP2 (its parameters become ``DTensor`` shards: build the optimizer afterwards).

        Raises:
            DistributedError: FSDP2 with an optimizer that needs whole matrices (``optim`` other than
                :data:`FSDP_OPTIMIZERS`), or NF4 weights the world size cannot shard.
        """
        if not self.active:
            return model
        if self.fsdp and optim not in FSDP_OPTIMIZERS:
            raise DistributedError(
                f"optimizer {optim!r} works on whole matrices (projections, SVDs, 8-bit blocks), which FSDP2 "
                f"splits over the processes: use {' or '.join(FSDP_OPTIMIZERS)} with --fsdp, or drop --fsdp (DDP "
                "keeps whole parameters on every process)"
            )
        if self.fsdp:
            shard_model(model, self.world_size)
            return model
        from torch.nn.parallel import DistributedDataParallel

        # Only the trainable parameters take part: the frozen base (and every buffer) is neither broadcast nor
        # synchronised.
        ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
        ignore += [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        on_gpu = self.device is not None and self.device.type == "cuda"
        return DistributedDataParallel(model, device_ids=[self.device] if on_gpu else None)

    # --------------------------------------------------------------------------------------- the data
    def share(self, items: Sequence[Any]) -> tuple[list[Any], bool]:
        """This rank's contiguous share of one global batch ``items``, and whether it is empty (a last global
        batch smaller than the world size). An empty share is replaced by the batch's first item, whose loss the
        caller weights by 0 (every rank must take part in the forward and backward of a step)."""
        if not self.active:
            return list(items), False
        n, w = len(items), self.world_size
        start = self.rank * (n // w) + min(self.rank, n % w)
        stop = start + n // w + (1 if self.rank < n % w else 0)
        mine = list(items[start:stop])
        return (mine, False) if mine else ([items[0]], True)

    def reduce_loss(self, loss: Tensor, weight: float) -> tuple[Tensor, float]:
        """``(loss to backpropagate, global loss)`` of one micro-batch. ``loss`` is this rank's mean over
        ``weight`` items; the global loss is the mean over all ranks' items, and the returned tensor is scaled by
        ``world_size · weight / total weight`` so that the gradient average DDP / FSDP2 take equals the
        gradient of the global mean (one process, one batch)."""
        if not self.active:
            return loss, loss.item()
        value = loss.detach().double().item()
        sums = torch.tensor([value * weight, float(weight)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(sums)
        total, count = float(sums[0]), float(sums[1])
        if count <= 0:
            return loss * 0.0, float("nan")
        return loss * (self.world_size * weight / count), total / count

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (a signal that reached one process stops all of them together)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def grad_norm(self, params: Sequence[Tensor]) -> float:
        """The global gradient norm: DDP's gradients are already averaged (identical on every rank); FSDP2's
        are shards, whose squared norms are summed over the ranks."""
        if not (self.active and self.fsdp):
            return local_grad_norm(params)
        squares = torch.zeros((), dtype=torch.float64, device=self._comm_device())
        for p in params:
            if p.grad is not None:
                g = _local(p.grad)
                squares += g.double().pow(2).sum().to(squares.device)
        dist.all_reduce(squares)
        return float(squares.sqrt())

    def clip(self, params: Sequence[Tensor], coefficient: float) -> None:
        """Scale every gradient by ``coefficient`` (local shards under FSDP2)."""
        grads = [_local(p.grad) for p in params if p.grad is not None]
        torch._foreach_mul_(grads, coefficient)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _on_gpu(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def _comm_device(self) -> torch.device:
        return self.device if self._on_gpu() else torch.device("cpu")  # type: ignore[return-value]


LOCAL = Distributed()


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@contextlib.contextmanager
def session(fsdp: bool = False, device: str | None = None) -> Iterator[Distributed]:
    """The process group of this ``torchrun`` process (gloo on CPU, NCCL with CUDA), joined on entry and left on
    exit (when this call joined it); :data:`LOCAL` outside ``torchrun``."""
    if not under_torchrun() or env_world_size() < 2:
        if fsdp:
            raise DistributedError(
                "fsdp shards the model over several processes: run with --nproc 2 (or more), or under torchrun"
            )
        yield LOCAL
        return
    rank, world, local_rank = env_rank(), env_world_size(), int(os.environ["LOCAL_RANK"])
    cuda = _uses_cuda(device)
    if cuda:
        torch.cuda.set_device(local_rank)
    where = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
        )
    try:
        yield Distributed(rank, world, local_rank, where, fsdp)
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- FSDP2
def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: modules of the classes Hugging Face's ``_no_split_modules`` names,
    else the entries of its largest ``nn.ModuleList``."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _quantised_params(model: nn.Module) -> set[nn.Parameter]:
    """Parameters FSDP2 must leave whole: those of bitsandbytes / hqq layers (packed codes carrying their
    quantisation state outside the tensor)."""
    kept: set[nn.Parameter] = set()
    for m in model.modules():
        package = type(m).__module__.split(".", 1)[0]
        if package in ("bitsandbytes", "hqq"):
            kept.update(m.parameters(recurse=False))
        for p in m.parameters(recurse=False):
            if type(p).__module__.split(".", 1)[0] in ("bitsandbytes", "hqq"):
                kept.add(p)
    return kept


def nf4_weights(model: nn.Module) -> list[tuple[str, Tensor]]:
    """``(name, weight)`` of the torchao ``NF4Tensor`` parameters of ``model``."""
    return [(n, p) for n, p in model.named_parameters() if type(p).__name__ == "NF4Tensor" or _is_nf4(p)]


def _is_nf4(p: Tensor) -> bool:
    data = getattr(p, "data", None)
    return type(data).__name__ == "NF4Tensor"


def check_nf4_sharding(model: nn.Module, world_size: int) -> None:
    """Refuse a world size torchao's NF4 weights cannot be sharded over under FSDP2.

    FSDP2 splits a weight's quantisation blocks evenly over the ranks: an ``NF4Tensor`` of ``numel`` values has
    ``numel / 64`` blocks whose scales are themselves quantised in groups of 256, so ``numel / (64 · 256)``
    must be divisible by the world size.

    Raises:
        DistributedError: naming the first weight that does not divide, and the world sizes that work for every
            NF4 weight.
    """
    weights = nf4_weights(model)
    if not weights:
        return
    units = {name: _nf4_unit(w) for name, w in weights}
    groups = {name: w.numel() // units[name] if w.numel() % units[name] == 0 else 0 for name, w in weights}
    bad = [(name, g) for name, g in groups.items() if g == 0 or g % world_size]
    if not bad:
        return
    sizes = [n for n in range(1, 65) if all(g and g % n == 0 for g in groups.values())]
    name, g = bad[0]
    w = dict(weights)[name]
    block, scaler = getattr(w, "block_size", NF4_BLOCK), getattr(w, "scaler_block_size", NF4_SCALER_BLOCK)
    raise DistributedError(
        f"FSDP2 cannot shard the NF4 weight {name} ({w.numel()} values, {g} groups of {units[name]}) over "
        f"{world_size} processes: numel / ({block}·{scaler}) must be divisible by the world size; world sizes "
        f"that work for every NF4 weight of this model: {', '.join(map(str, sizes)) or 'none'} "
        "(or drop --fsdp: DDP keeps the whole base on each process)"
    )


def _nf4_unit(w: Tensor) -> int:
    """Values per shardable group of an NF4 weight: its block size times its scalers' block size."""
    return int(getattr(w, "block_size", NF4_BLOCK)) * int(getattr(w, "scaler_block_size", NF4_SCALER_BLOCK))


def shard_model(model: nn.Module, world_size: int) -> nn.Module:
    """Apply FSDP2 in place: each module holding trainable parameters, each transformer block, then the root
    (torchtune's order for LoRA). bitsandbytes / hqq weights stay whole (``ignored_params``)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    check_nf4_sharding(model, world_size)
    ignored = _quantised_params(model) or None
    adapters = [
        m for m in model.modules() if m is not model and any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    for m in adapters:
        fully_shard(m, ignored_params=ignored)
    for block in _blocks(model):
        if not isinstance(block, FSDPModule):
            fully_shard(block, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return model


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Inside, ``model``'s trainable parameters are whole plain tensors (FSDP2's shards are gathered: a
    collective, every rank enters), for reading or saving them; the shards are put back on exit. Frozen
    parameters stay sharded. Nothing happens for a model without sharded parameters."""
    swapped = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and hasattr(p, "full_tensor"):
                full = p.full_tensor()  # modules() runs in the same order on every rank
                swapped.append((module, name, p))
                module._parameters[name] = nn.Parameter(full.detach().clone())
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place: the model itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(model, nn.parallel.DistributedDataParallel) and inner is not None else model


def save_adapter(model: nn.Module, folder: Path, group: Distributed, save: Callable[[nn.Module, Path], None]) -> None:
    """``save(model, folder)`` on rank 0 with whole parameters (FSDP2's are gathered first, on every rank)."""
    model = unwrap(model)
    with full_parameters(model) if group.active and group.fsdp else contextlib.nullcontext():
        if group.is_main:
            save(model, folder)
    group.barrier()


# ------------------------------------------------------------------------------------ DCP checkpoints
def _trainable_state(model: nn.Module) -> dict[str, Tensor]:
    model = unwrap(model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the trainable parameters and the optimizer state to ``folder`` with ``torch.distributed.checkpoint``
    (every rank its shards; the frozen parameters are not saved)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"model": _trainable_state(model), "optim": get_optimizer_state_dict(unwrap(model), optimizer)}
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`save_sharded` wrote into ``model``'s trainable parameters and ``optimizer`` (any rank
    layout: DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    inner = unwrap(model)
    state = {"model": _trainable_state(model), "optim": get_optimizer_state_dict(inner, optimizer)}
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(inner, optimizer, state["optim"], options=StateDictOptions(strict=True))


def write_checkpoint(
    root: Path,
    step: int,
    group: Distributed,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    save_model: Callable[[nn.Module, Path], None],
    write_main: Callable[[Path], None],
) -> Path:
    """A checkpoint ``root/step-<step>`` written by every rank: the DCP shards (``dcp/``) and, from rank 0 with
    whole parameters, ``save_model(model, folder)`` (the adapter) into a hidden staging folder; then rank 0 moves
    them into the checkpoint it writes atomically (:func:`peftkit.train.checkpoint.write_checkpoint`), adding
    ``write_main(folder)`` (the trainer state). Returns the folder, on every rank once it exists."""
    from peftkit.train import checkpoint as ckpt

    root = Path(root)
    staging = None
    if group.is_main:
        root.mkdir(parents=True, exist_ok=True)
        ckpt.remove_dead_temporaries(root, kinds=("staging",))  # left by a killed earlier write
        staging = root / f".{ckpt.checkpoint_name(step)}.staging-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
    staging = group.broadcast(staging)
    assert staging is not None
    save_sharded(staging / DCP_DIR, model, optimizer)
    save_adapter(model, staging, group, save_model)  # ends with a barrier: every rank's shards are written
    final = root / ckpt.checkpoint_name(step)
    if group.is_main:

        def write(folder: Path) -> None:
            for entry in staging.iterdir():
                os.rename(entry, folder / entry.name)
            write_main(folder)

        try:
            final = ckpt.write_checkpoint(root, step, write)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    group.barrier()
    return final

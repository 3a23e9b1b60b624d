"""Partitions of a training set over federated clients.

* ``iid``: a seeded random permutation cut into ``c`` nearly equal parts.
* ``shards``: contiguous rows ``[i·N/c, (i+1)·N/c)`` in data order (the official Fed-SB simulation's split).
* ``dirichlet:α``: label skew (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data Distribution for
  Federated Visual Classification"): for each class, client shares ``q ~ Dir(α·1_c)``, and that class's
  examples (in seeded random order) are cut at the cumulative shares. Small ``α`` gives clients few classes;
  large ``α`` approaches ``iid``. As Flower Datasets' ``DirichletPartitioner`` does, a draw that leaves a
  client with fewer than ``min_size`` examples is redrawn (up to ``max_draws`` times, from the same seeded
  generator), so the split is a function of the seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from peftkit.federated.errors import EmptyClientError, FederatedOptionError

__all__ = ["Split", "parse_split", "partition"]

KINDS = ("iid", "shards", "dirichlet")


@dataclass(frozen=True)
class Split:
    """A parsed split setting: ``kind`` and, for ``dirichlet``, the concentration ``alpha``."""

    kind: str
    alpha: float | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.alpha:g}" if self.alpha is not None else self.kind


def parse_split(text: str | Split) -> Split:
    """``"iid"``, ``"shards"`` or ``"dirichlet:<α>"`` (``α > 0``) as a :class:`Split`.

    Raises:
        FederatedOptionError: another string, or ``α`` that is not a positive number.
    """
    if isinstance(text, Split):
        return text
    kind, _, value = str(text).strip().lower().partition(":")
    if kind not in KINDS:
        raise FederatedOptionError(
            f"unknown split {text!r}; splits: iid, shards, dirichlet:<alpha> (e.g. dirichlet:0.5)"
        )
    if kind != "dirichlet":
        if value:
            raise FederatedOptionError(f"the {kind} split takes no parameter, got {text!r}")
        return Split(kind)
    try:
        alpha = float(value)
    except ValueError:
        alpha = math.nan
    if not (math.isfinite(alpha) and alpha > 0):
        raise FederatedOptionError(f"dirichlet needs a positive concentration, e.g. dirichlet:0.5; got {text!r}")
    return Split(kind, alpha)


def partition(
    size: int,
    clients: int,
    split: str | Split = "iid",
    *,
    labels: Sequence[int] | None = None,
    seed: int = 0,
    min_size: int = 1,
    max_draws: int = 10,
) -> list[list[int]]:
    """Indices ``0 .. size-1`` divided over ``clients`` clients (each list sorted).

    Args:
        labels: class index per example (needed by ``dirichlet``).
        min_size: the fewest examples a client may get.
        max_draws: Dirichlet draws tried before giving up.

    Raises:
        EmptyClientError: a client would get fewer than ``min_size`` examples (more clients than examples, or a
            Dirichlet concentration so small that every draw starves a client).
        FederatedOptionError: a bad split string, fewer than one client, or ``dirichlet`` without labels.
    """
    split = parse_split(split)
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise FederatedOptionError(f"the number of clients must be a whole number of at least 1, got {clients!r}")
    rng = np.random.default_rng(seed)
    if split.kind != "dirichlet":
        order = np.arange(size) if split.kind == "shards" else rng.permutation(size)
        parts = [sorted(int(i) for i in part) for part in np.array_split(order, clients)]
        _check_sizes(parts, min_size, f"{size} training examples cannot give {clients} clients {min_size} each")
        return parts
    if labels is None:
        raise FederatedOptionError(
            "the dirichlet split draws each client's class mix, so it needs class labels (the classify task); "
            "use iid or shards for causal-lm"
        )
    if len(labels) != size:
        raise FederatedOptionError(f"got {len(labels)} labels for {size} examples")
    label_array = np.asarray(labels)
    classes = sorted(set(label_array.tolist()))
    assert split.alpha is not None
    for _ in range(max_draws):
        parts_: list[list[int]] = [[] for _ in range(clients)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(label_array == cls))
            shares = rng.dirichlet([split.alpha] * clients)
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for part, chunk in zip(parts_, np.split(members, cuts)):
                part.extend(int(i) for i in chunk)
        if min(len(p) for p in parts_) >= min_size:
            return [sorted(p) for p in parts_]
    _check_sizes(
        parts_,
        min_size,
        f"dirichlet:{split.alpha:g} over {size} examples and {len(classes)} classes left a client with fewer than "
        f"{min_size} examples in {max_draws} draws: use a larger alpha, fewer clients or another seed",
    )
    return parts_  # pragma: no cover (the check above raises)


def _check_sizes(parts: list[list[int]], min_size: int, why: str) -> None:
    small = [i for i, p in enumerate(parts) if len(p) < min_size]
    if small:
        sizes = [len(parts[i]) for i in small]
        raise EmptyClientError(f"client(s) {small[:5]} would get {sizes[:5]} examples: {why}")

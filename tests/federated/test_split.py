"""peftkit.federated.split: every example goes to exactly one client; iid is balanced, shards contiguous, Dirichlet
skews labels more as alpha shrinks and is a function of the seed; empty clients and bad strings are refused."""

from __future__ import annotations

import numpy as np
import pytest

from peftkit.federated.errors import EmptyClientError, FederatedOptionError
from peftkit.federated.split import Split, parse_split, partition

LABELS = [i % 3 for i in range(600)]


def _check_cover(parts: list[list[int]], n: int) -> None:
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(n))


def test_iid_and_shards() -> None:
    iid = partition(103, 10, "iid", seed=1)
    _check_cover(iid, 103)
    assert sorted(len(p) for p in iid) == [10] * 7 + [11] * 3
    assert iid != partition(103, 10, "iid", seed=2)
    shards = partition(103, 10, "shards")
    assert shards[0] == list(range(11)) and shards[-1] == list(range(93, 103))


def _label_skew(parts: list[list[int]]) -> float:
    """Mean over clients of the share of their largest class."""
    return float(np.mean([np.bincount([LABELS[i] for i in p], minlength=3).max() / len(p) for p in parts]))


def test_dirichlet_skews_labels_by_alpha_and_follows_the_seed() -> None:
    small = partition(600, 10, "dirichlet:0.1", labels=LABELS, seed=0)
    large = partition(600, 10, "dirichlet:100", labels=LABELS, seed=0)
    _check_cover(small, 600)
    _check_cover(large, 600)
    assert _label_skew(small) > 0.75  # most clients hold mainly one class
    assert _label_skew(large) < 0.45  # close to the 1/3 of an even mix
    assert small == partition(600, 10, "dirichlet:0.1", labels=LABELS, seed=0)
    assert small != partition(600, 10, "dirichlet:0.1", labels=LABELS, seed=1)


def test_a_split_that_leaves_a_client_empty_is_refused() -> None:
    with pytest.raises(EmptyClientError, match=r"client\(s\) \[5\] would get \[0\] examples"):
        partition(5, 6, "iid")
    with pytest.raises(EmptyClientError, match=r"dirichlet:0.001 .* in 10 draws: use a larger alpha"):
        partition(12, 6, "dirichlet:0.001", labels=[i % 2 for i in range(12)])
    assert isinstance(EmptyClientError("x"), ValueError)


@pytest.mark.parametrize(
    ("text", "message"),
    [("random", "unknown split 'random'"), ("dirichlet", "positive concentration"),
     ("dirichlet:-1", "positive concentration"), ("dirichlet:x", "positive concentration"),
     ("iid:3", "takes no parameter")],
)  # fmt: skip
def test_bad_split_strings(text: str, message: str) -> None:
    with pytest.raises(FederatedOptionError, match=message):
        parse_split(text)


def test_dirichlet_needs_labels_and_clients_must_be_positive() -> None:
    with pytest.raises(FederatedOptionError, match="needs class labels"):
        partition(10, 2, "dirichlet:0.5")
    with pytest.raises(FederatedOptionError, match="at least 1"):
        partition(10, 0, "iid")
    assert parse_split("Dirichlet:0.50") == Split("dirichlet", 0.5) and str(Split("dirichlet", 0.5)) == "dirichlet:0.5"

"""Bad merge requests: each a specific error naming the problem, raised before the model changes."""

from __future__ import annotations

import pytest
from _helpers import adapted
from conftest import make_tiny_net

import peftkit as pk
from peftkit.errors import AdapterExistsError, AdapterNotFoundError, NotMergeableError
from peftkit.merge import MergeError, MergeOptionError, MergeWeightsError, TargetMismatchError


def _model() -> pk.AdaptedModel:
    return adapted(
        make_tiny_net(),
        {
            "a": pk.LoRAConfig(r=2, targets=["fc1", "fc2"]),
            "b": pk.LoRAConfig(r=3, targets=["fc1", "fc2"]),
            "c": pk.LoRAConfig(r=2, targets=["fc1", "conv"]),
        },
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"names": ["a", "x"]}, AdapterNotFoundError, "no adapter named 'x'"),
        ({"names": []}, MergeError, "give a list of adapter names"),
        ({"names": "a"}, MergeError, "give a list of adapter names"),
        ({"names": ["a", "a"]}, MergeError, r"adapters named more than once: \['a'\]"),
        ({"weights": [1.0]}, MergeWeightsError, r"1 weights for 2 adapters \['a', 'b'\]"),
        ({"weights": [1.0, float("nan")]}, MergeWeightsError, "weights must be finite numbers"),
        ({"weights": [1.0, float("inf")]}, MergeWeightsError, "weights must be finite numbers"),
        ({"weights": "0.5,0.5"}, MergeWeightsError, "weights must be a sequence of numbers"),
        ({"names": ["a", "c"]}, TargetMismatchError, "'a' lacks conv; 'c' lacks fc2"),
        ({"method": "ties", "density": 0.0}, MergeOptionError, r"density must lie in \(0, 1\], got 0.0"),
        ({"method": "dare_ties", "density": 1.01}, MergeOptionError, r"density must lie in \(0, 1\], got 1.01"),
        ({"method": "knots", "merge": "dare_ties", "density": -1}, MergeOptionError, "density must lie in"),
        ({"method": "svd"}, MergeOptionError, "unknown merge method 'svd'; methods: task_arithmetic, "),
        ({"method": "knots", "merge": "knots"}, MergeOptionError, "knots merges the aligned updates by one of"),
        ({"density": 0.5}, MergeOptionError, "'task_arithmetic' takes no option 'density'"),
        ({"rank": 0}, MergeOptionError, "rank must be a positive int or None, got 0"),
        ({"new_name": "a"}, AdapterExistsError, "an adapter named 'a' already exists"),
    ],
)
def test_bad_requests_raise_specific_errors_and_leave_the_model(kwargs: dict, error: type, match: str) -> None:
    model = _model()
    before = model.adapter_names
    with pytest.raises(error, match=match):
        pk.merge_adapters(model, **{"names": ["a", "b"], **kwargs})
    assert model.adapter_names == before


def test_non_mergeable_adapters_are_listed() -> None:
    """A bottleneck adapter has no weight-space update: the error names each such adapter, its method, modules."""
    model = adapted(
        make_tiny_net(),
        {
            "lora": pk.LoRAConfig(r=2, targets=["fc1", "fc2"]),
            "h1": pk.get_config("houlsby", targets=["fc1", "fc2"]),
            "h2": pk.get_config("pfeiffer", targets=["fc1", "fc2"]),
        },
    )
    for method in ("task_arithmetic", "ties", "knots"):
        with pytest.raises(
            NotMergeableError, match="'h1' \\(method 'houlsby'\\) on fc1, fc2; 'h2' \\(method 'pfeiffer'"
        ):
            pk.merge_adapters(model, ["lora", "h1", "h2"], method=method)
        assert model.adapter_names == ["lora", "h1", "h2"]


def test_needs_an_adapted_model() -> None:
    with pytest.raises(TypeError, match="merging needs an AdaptedModel"):
        pk.merge_adapters(make_tiny_net(), ["a"])  # type: ignore[arg-type]

"""The compression errors: each is a PeftkitError and the closest built-in."""

from __future__ import annotations

import pytest

from peftkit.compress import errors
from peftkit.errors import PeftkitError


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.RatioError, ValueError),
        (errors.RankError, ValueError),
        (errors.CalibrationError, ValueError),
        (errors.HeadPruneError, ValueError),
        (errors.CompressorError, ValueError),
        (errors.CompressOptionError, ValueError),
        (errors.UnknownArchitectureError, TypeError),
    ],
)
def test_hierarchy(cls, builtin):
    assert issubclass(cls, errors.CompressError) and issubclass(cls, PeftkitError) and issubclass(cls, builtin)


def test_checks_name_the_problem():
    assert errors.check_fraction("ratio", 0.5) == 0.5
    with pytest.raises(errors.RatioError, match=r"ratio must lie in the open interval \(0, 1\), got 1"):
        errors.check_fraction("ratio", 1)
    assert errors.check_rank(3, (4, 8)) == 3
    with pytest.raises(errors.RankError, match=r"rank 5 does not fit q of shape \(4, 8\).*\[1, 4\]"):
        errors.check_rank(5, (4, 8), "q")
    message = str(errors.UnknownArchitectureError("LoRD", ["q_proj", "k_proj"], "; found none"))
    assert message == "LoRD does not know this architecture: it looked for q_proj, k_proj; found none"

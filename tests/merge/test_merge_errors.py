"""``peftkit.merge.errors``: every merge error is a PeftkitError and a ValueError (generic handlers keep working)."""

from __future__ import annotations

import pytest

from peftkit.errors import PeftkitError
from peftkit.merge.errors import MergeError, MergeOptionError, MergeWeightsError, TargetMismatchError


@pytest.mark.parametrize("error", [MergeError, MergeOptionError, MergeWeightsError, TargetMismatchError])
def test_hierarchy(error: type) -> None:
    assert issubclass(error, PeftkitError) and issubclass(error, ValueError) and issubclass(error, MergeError)
    with pytest.raises(ValueError, match="named"):
        raise error("named")

"""The errors of federated fine-tuning (:mod:`peftkit.federated`).

Each derives from :class:`peftkit.errors.PeftkitError` and from the closest built-in exception, so generic
handlers keep working.
"""

from __future__ import annotations

from peftkit.core.errors import PeftkitError

__all__ = [
    "AdapterMismatchError",
    "EmptyClientError",
    "FederatedError",
    "FederatedOptionError",
    "PrivacyBudgetError",
    "UnknownStrategyError",
]


class FederatedError(PeftkitError):
    """Base class of the federated errors."""


class AdapterMismatchError(FederatedError, ValueError):
    """Client adapters that cannot be aggregated: different ranks, different target modules, different tensor
    names, or (Fed-SB, FFA-LoRA) frozen factors that differ between clients. The message names the client and
    the first tensor that differs."""


class UnknownStrategyError(FederatedError, KeyError):
    """A strategy name that does not exist; the message lists the strategies."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class EmptyClientError(FederatedError, ValueError):
    """A split of the training data that leaves a client without examples."""


class PrivacyBudgetError(FederatedError, ValueError):
    """A target ε that no noise level reaches with the given number of DP-SGD steps, sampling rate and δ."""


class FederatedOptionError(FederatedError, ValueError):
    """A federated setting that is malformed or does not fit the others (a split string, a weighting, DP with
    adapter dropout, user-level DP with FedEx-LoRA, ...)."""

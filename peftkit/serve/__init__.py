"""Multi-adapter serving: :class:`AdapterCache` (disk -> CPU LRU), :class:`Engine` (mixed-adapter continuous
batching on one frozen causal LM; embeddings / classification with an encoder) and, with the ``serve`` extra,
``peftkit.serve.server.create_app`` (an OpenAI-compatible FastAPI app; ``peftkit serve`` on the command line)."""

from peftkit.serve.cache import AdapterCache, AdapterLoadError, AdapterTooLargeError
from peftkit.serve.engine import (
    AdapterRankError,
    Engine,
    EngineClosedError,
    EngineOverloadedError,
    Request,
    SamplingParams,
    SVDLowRank,
    TokenLogprob,
)

__all__ = [
    "AdapterCache",
    "AdapterLoadError",
    "AdapterRankError",
    "AdapterTooLargeError",
    "Engine",
    "EngineClosedError",
    "EngineOverloadedError",
    "Request",
    "SVDLowRank",
    "SamplingParams",
    "TokenLogprob",
]

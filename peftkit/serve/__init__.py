"""Multi-adapter serving: :class:`AdapterCache` (disk -> CPU LRU), :class:`Engine` (mixed-adapter continuous
batching on one frozen causal LM; embeddings / classification with an encoder) and, with the ``serve`` extra,
``peftkit.serve.server.create_app`` (an OpenAI-compatible FastAPI app; ``peftkit serve`` on the command line).

One file per part: ``cache`` (disk to memory), ``folders`` (adapter folders),
``slots`` (adapters in the model; rank-k SVD stand-ins from :mod:`peftkit.interop.svd`), ``scheduler`` (continuous
batching), ``kv`` (the batch's KV cache), ``sampling`` (the next token), ``text`` (tokens to text), ``request``,
``errors``, ``engine`` (all of them together), ``server`` and ``openai_api`` (HTTP).
"""

from peftkit.interop.svd import SVDLowRank

from .cache import AdapterCache
from .engine import Engine
from .errors import AdapterLoadError, AdapterRankError, AdapterTooLargeError, EngineClosedError, EngineOverloadedError
from .request import Request
from .sampling import SamplingParams, TokenLogprob

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

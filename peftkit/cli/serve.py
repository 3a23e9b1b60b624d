"""``peftkit serve``."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Annotated

import typer

from peftkit.cli.app import app


@app.command()
def serve(
    base: Annotated[Path, typer.Option(help="Folder of the base causal LM (save_pretrained: model + tokenizer).")],
    adapters: Annotated[
        Path,
        typer.Option(
            help="Adapters to serve: a folder of adapter folders (name = folder), a training run folder from "
            "'peftkit train' or a folder of such runs (name = run), or a model.save folder of several adapters."
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    name: Annotated[str, typer.Option(help="The 'model' name that selects the base model alone.")] = "base",
    api_key: Annotated[
        str | None, typer.Option(envvar="PEFTKIT_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    max_loras: Annotated[int, typer.Option(help="Adapters held in the model at once.")] = 8,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together.")] = 16,
    max_queue: Annotated[int, typer.Option(help="Waiting requests before answering 429.")] = 256,
    cache_mb: Annotated[float, typer.Option(help="CPU memory for loaded adapters (MiB, LRU).")] = 512.0,
    max_rank: Annotated[int, typer.Option(help="Largest adapter rank accepted (larger: 422).")] = 64,
    svd_rank: Annotated[
        int | None, typer.Option(help="Serve adapters without a low-rank form as rank-k SVDs of their delta.")
    ] = None,
    embedder: Annotated[
        str | None,
        typer.Option(help="Encoder for /v1/embeddings: a model folder, or 'minilm' for the packaged MiniLM."),
    ] = None,
    embedder_name: Annotated[str, typer.Option(help="The 'model' name of the embedder.")] = "embedding",
    embedder_adapters: Annotated[
        Path | None, typer.Option(help="Adapters for the embedder, in any layout --adapters takes.")
    ] = None,
    max_body_kb: Annotated[int, typer.Option(help="Largest request body (KiB; larger: 413).")] = 1024,
) -> None:
    """Serve the base model and every adapter in ADAPTERS over an OpenAI-compatible HTTP API (the adapter of a
    training run is served under the run folder's name)."""
    import uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.serve.cache import AdapterCache
    from peftkit.serve.engine import Engine
    from peftkit.serve.server import create_app

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(base)
    cache = AdapterCache(int(cache_mb * 2**20), root=adapters)
    found = cache.register_dir(adapters)
    engine = Engine(
        model,
        tokenizer,
        cache,
        max_loras=max_loras,
        max_batch=max_batch,
        max_queue=max_queue,
        max_rank=max_rank,
        svd_rank=svd_rank,
    )
    encoder = None
    if embedder is not None:
        from peftkit.assets import load_minilm

        enc_model, enc_tokenizer = load_minilm(None if embedder == "minilm" else embedder)
        enc_cache = AdapterCache(int(cache_mb * 2**20), root=embedder_adapters)
        if embedder_adapters is not None:
            enc_cache.register_dir(embedder_adapters)
        encoder = Engine(enc_model, enc_tokenizer, enc_cache, max_loras=max_loras, max_rank=max_rank)
    typer.echo(f"serving {name!r} and {len(found)} adapters on http://{host}:{port}/v1")
    app_ = create_app(
        engine,
        base_name=name,
        api_key=api_key,
        embedder=encoder,
        embedder_name=embedder_name,
        max_body_bytes=max_body_kb * 1024,
    )
    # Everything alive now (the model, the libraries) lives as long as the process: keep it out of the cyclic
    # garbage collector's full passes, which otherwise stall every request for ~0.2 s each (vLLM does the same).
    gc.collect()
    gc.freeze()
    # timeout_graceful_shutdown: open connections get this long to finish on Ctrl-C / SIGTERM.
    uvicorn.run(app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)

"""Running the HTTP app over a batcher: compile first, then listen until stopped.

`serve` is what `cla-serve` (cla_jax/scripts/serve.py) does once its flags have built the
engine, the batcher, the limits and the chat template; `warm_up` is also what the tests call
before putting an app in front of a batcher.
"""
from __future__ import annotations

import time
from typing import Sequence

from absl import logging

from cla_jax import sharding
from cla_jax.serving import Batcher, PagedBatcher
from cla_jax.serving.http.app import make_app
from cla_jax.serving.http.chat import ChatTemplate
from cla_jax.serving.http.limits import Limits
from cla_jax.serving.http.listener import listen, make_server, url_of


def warm_up(batcher: Batcher | PagedBatcher, everything: bool = True) -> int:
    """Compiles the engine's programs before the server takes requests: for every bucket
    (or only the smallest), so no request waits for XLA while the others stall behind it.
    Returns the number of programs."""
    engine = batcher.engine
    if everything:
        return batcher.warm_up()
    if isinstance(batcher, PagedBatcher):
        return batcher.warm_up(engine.decode_buckets[:1], engine.prefill_shapes[:1],
                               engine.window_buckets[:1])
    return batcher.warm_up(engine.prompt_buckets[:1], engine.window_buckets[:1])


def serve(batcher: Batcher, tokenizer, model_name: str, *, host: str, port: int,
          api_keys: Sequence[str] = (), limits: Limits = Limits(),
          chat_template: ChatTemplate | None = None, warm_up_everything: bool = True,
          description: str = "") -> None:
    """Serves `batcher` (not yet started) at http://host:port/v1 until Ctrl+C: binds the
    socket first (a taken port fails before anything compiles), compiles (`warm_up`), starts
    the batcher's loop, prints one ready line (naming the port, useful with port 0), then runs
    uvicorn; the batcher is stopped on the way out. `description` ends the ready line's first
    clause, e.g. "(step 1000)"."""
    engine = batcher.engine
    sock = listen(host, port)
    start = time.perf_counter()
    programs = warm_up(batcher, warm_up_everything)
    logging.info("compiled %d programs in %.1f s", programs, time.perf_counter() - start)
    batcher.start()
    print(f"serving {model_name}{' ' + description if description else ''} at "
          f"{url_of(sock)}: {engine.describe()}, "
          f"{engine.cache_dtype} KV cache, mesh {sharding.describe(engine.mesh)}, "
          f"{'an API key' if api_keys else 'no API key'}, "
          f"{'a' if chat_template else 'no'} chat template", flush=True)
    app = make_app(batcher, tokenizer, model_name, api_keys=api_keys, limits=limits,
                   chat_template=chat_template)
    try:
        make_server(app, limits).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully first, then re-raised Ctrl+C
        pass
    finally:
        batcher.stop()

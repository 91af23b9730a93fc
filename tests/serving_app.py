"""What the HTTP server tests share (pytest.ini puts tests/ on sys.path): a tiny random
model over bytes, and an app served on a free 127.0.0.1 port in a background thread."""
from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from test_train import tiny_config

from cla_jax.config import ModelConfig
from cla_jax.data.tokenizer import ByteTokenizer
from cla_jax.model import abstract_params
from cla_jax.serving.http.limits import Limits
from cla_jax.serving.http.listener import listen, make_server, url_of

MAX_LENGTH = 64


def tiny_model():
    """A tiny random MQA-CLA2 model over bytes: (config, model, params, tokenizer)."""
    config = tiny_config("files:unused")
    config.model.update(max_seq_len=MAX_LENGTH)
    model = ModelConfig.from_dict(config.model)
    # Drawn on the host (no init compile), with a large std: peaked logits, no near-ties.
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype),
        nn.meta.unbox(abstract_params(model)))
    return config, model, params, ByteTokenizer()


@contextlib.contextmanager
def serving(app, limits: Limits = Limits()):
    """`app` under uvicorn on a free port: yields its base URL (http://127.0.0.1:N/v1)."""
    sock = listen("127.0.0.1", 0)
    server = make_server(app, limits)
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(30)

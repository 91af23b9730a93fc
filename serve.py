"""An OpenAI-compatible HTTP server (/v1/completions, streaming, /v1/models) over a checkpoint,
with continuous batching: concurrent requests share the decode batch.

    python serve.py --workdir=workdir/demo              # http://127.0.0.1:8000/v1
    python serve.py --workdir=workdir/demo --num_slots=16 --cache_dtype=int8 --port=8080

The command itself is cla_jax/scripts/serve.py (also installed as `cla-serve`).
"""
from cla_jax.scripts.serve import run

if __name__ == "__main__":
    run()

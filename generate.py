"""Sample continuations from a trained checkpoint through the grouped KV cache.

    python generate.py --workdir=workdir/demo --prompt="ROMEO:" --max_new_tokens=100
    python generate.py --workdir=workdir/demo --prompt_file=prompts.txt --temperature=0
    python generate.py --random_init --config=configs/default.py --prompt="x"   # smoke test

The command itself is cla_jax/scripts/generate.py (also installed as `cla-generate`).
"""
from cla_jax.scripts.generate import run

if __name__ == "__main__":
    run()

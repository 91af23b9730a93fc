"""Perplexity and bits/byte of a checkpoint over a whole split; writes a JSON file.

    python eval.py --workdir=workdir/demo            # latest checkpoint, validation split
    python eval.py --workdir=workdir/demo --step=400 --split=train
    python eval.py --workdir=workdir/demo --source='files:texts/*.txt' --seq_lens=64,128

The command itself is cla_jax/scripts/eval.py (also installed as `cla-eval`).
"""
from cla_jax.scripts.eval import run

if __name__ == "__main__":
    run()

"""Train a CLA language model; resumes from the workdir's latest checkpoint.

    python train.py --config=configs/default.py --workdir=workdir/demo
    python train.py --config=configs/paper/1b_h128_mqa_cla2.py --config.data.source=tfds:lm1b \
        --workdir=runs/cla2

The command itself is cla_jax/scripts/train.py (also installed as `cla-train`); the data flow
is cla_jax/train/loop.py's train_and_evaluate: corpus -> token store -> packed batches ->
jitted steps over the mesh -> metrics, validation and checkpoints.
"""
from cla_jax.scripts.train import run

if __name__ == "__main__":
    run()

"""Train a CLA language model (train.py, cla-train); resumes from the latest checkpoint.

    python train.py --config=configs/default.py --workdir=workdir/demo
    cla-train --config=configs/paper/1b_h128_mqa_cla2.py --config.data.source=tfds:lm1b \
        --workdir=runs/cla2
"""
import jax
from absl import flags
from ml_collections import config_flags

from cla_jax import cli
from cla_jax.train.loop import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "A configs/*.py file (overrides: "
                                "--config.train.steps=100).", lock_config=True)
flags.DEFINE_integer("stop_at_step", None, "Checkpoint and exit at this step (the schedule "
                     "still follows train.steps; run again to continue).")
flags.DEFINE_bool("restart_data", False, "Resume params and optimizer state but start the "
                  "data from its first batch: needed to resume a checkpoint trained on other "
                  "data, batch size, sequence length or seed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    """cla-train's work once its flags are parsed: trains, then prints the final validation
    metrics."""
    metrics = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.cache_dir,
                                 flags.FLAGS.stop_at_step, restart_data=flags.FLAGS.restart_data)
    if metrics and jax.process_index() == 0:
        print(f"final validation: ppl {metrics['perplexity']:.2f}, "
              f"bits/byte {metrics['bits_per_byte']:.3f} on {metrics['tokens']:,} tokens")


def run():
    """The cla-train console script (and `python train.py`): parses the flags, then runs
    `main`."""
    cli.start(main)


if __name__ == "__main__":
    run()

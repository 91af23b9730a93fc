"""Build a run's token store ahead of training, or audit one: the same store train.py uses.

    python -m cla_jax.data.prepare --config=configs/default.py \
        --config.data.source='files:gs://bucket/fineweb/*.jsonl.zst' \
        --config.data.data_dir=gs://bucket/data
    python -m cla_jax.data.prepare --config=... --verify     # check every shard's crc32,
                                                             # rebuild the damaged ones

Run it on every host of a pod (with --distributed, as train.py) and each builds its share of
the shards; or once, on one big CPU machine, before the accelerators start.
"""
from absl import flags
from ml_collections import config_flags

from cla_jax import cli

config_flags.DEFINE_config_file("config", None, "A configs/*.py file; only config.data and "
                                "model.vocab_size are used.", lock_config=True)
flags.DEFINE_bool("verify", False, "Also read every shard back, compare its crc32, and "
                  "rebuild the shards that fail.")
flags.mark_flags_as_required(["config"])


def main(argv):
    """cla-prepare's work once its flags are parsed: builds (or finds) the run's token store."""
    from cla_jax.data.corpus import prepare_corpus  # noqa: PLC0415 (after flags are parsed)
    from cla_jax.data.store import StoreError  # noqa: PLC0415
    config = flags.FLAGS.config

    def prepare():
        return prepare_corpus(config.data, flags.FLAGS.cache_dir,
                              max_vocab_size=config.model.vocab_size)

    corpus = prepare()
    meta = corpus.store.meta
    print(f"token store {corpus.store.directory}: {meta['num_shards']} shards, tokenizer "
          f"{corpus.tokenizer.identity} ({meta['dtype']})")
    for split, info in meta["splits"].items():
        print(f"  {split}: {info['documents']:,} documents, {info['tokens']:,} tokens")
    if meta["skipped"]:
        print(f"  skipped: {meta['skipped']:,} records whose text is null")
    if flags.FLAGS.verify:
        import jax  # noqa: PLC0415 (prepare_corpus has loaded it)
        # Process 0 audits and forgets damaged shards; then every process builds its share
        # of what is missing (prepare_corpus's barriers wait for process 0).
        damaged = corpus.store.verify() if jax.process_index() == 0 else []
        if damaged:
            corpus.store.discard(damaged)
        corpus = prepare()
        if jax.process_index() != 0:
            return
        still = corpus.store.verify()
        if still:
            raise StoreError(f"shard files {still} fail their crc32 even after a rebuild; "
                             f"is the storage under {corpus.store.directory} sound?")
        if damaged:
            print(f"  rebuilt damaged shard files (crc32 mismatch): {damaged}")
        print("  every shard matches its crc32")


def run():
    """The cla-prepare console script: parses the flags, then runs `main`."""
    cli.start(main)


if __name__ == "__main__":
    run()

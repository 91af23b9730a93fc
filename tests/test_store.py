"""Tests of the token store (sources.py, store.py, corpus.py): formats, identity, split,
parallel and multi-host builds, resume, damage, and bad input.

The expected streams are rebuilt here the obvious way: every document as [bos] + byte ids, in
path (then row) order, train or validation by a sha256 of its identity computed in the test.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import threading

import ml_collections
import numpy as np
import pytest

from cla_jax.data import corpus as corpus_lib
from cla_jax.data import pipeline, sources, store, tokenizer
from cla_jax.data.tokenizer import BOS_ID

BYTE = tokenizer.ByteTokenizer()
WORDS = "the king and queen of a land far away spoke to every lord and lady there".split()


def _docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS, rng.integers(3, 12)))
                 for _ in range(rng.integers(1, 30))]
        docs.append(("\n" if i % 3 else "\n\n").join(lines) + ("—é😀" if i % 5 == 0 else ""))
    return docs


def _is_validation(identity: str, fraction: float) -> bool:
    return int(hashlib.sha256(identity.encode()).hexdigest()[:16], 16) < fraction * 2**64


def _held_out(documents: list[tuple[str, str]], fraction: float) -> set[str]:
    """Rows of jsonl/parquet go by hash; whole text files by rank: the round(fraction x n)
    (at least one) whose paths hash lowest."""
    ids = [i for i, _ in documents]
    if any("#" in i for i in ids):
        return {i for i in ids if _is_validation(i, fraction)}
    count = max(1, round(fraction * len(ids))) if fraction else 0
    return set(sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:count])


def _expected(documents: list[tuple[str, str]], fraction: float) -> dict[str, np.ndarray]:
    out, held_out = {"train": [], "validation": []}, _held_out(documents, fraction)
    for identity, text in documents:
        split = "validation" if identity in held_out else "train"
        out[split].append(np.array([BOS_ID] + BYTE.encode(text), np.int32))
    return {k: np.concatenate(v) if v else np.zeros(0, np.int32) for k, v in out.items()}


def _write(root, fmt: str, files: int = 3, per_file: int = 7):
    """Writes `files` files of format `fmt`; returns (glob, [(identity, text)] in path order)."""
    documents, texts = [], iter(_docs(files * per_file, seed=len(fmt)))
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        if fmt == "txt":  # same stem in different folders: two distinct documents
            path = root / f"dir{f % 2}" / f"part-{f // 2}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            text = next(texts)
            path.write_text(text, encoding="utf-8")
            documents.append((str(path), text))
            continue
        path = root / f"part-{f}.{fmt}"
        rows = [next(texts) for _ in range(per_file)]
        documents += [(f"{path}#{r}", t) for r, t in enumerate(rows)]
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.table({"id": list(range(per_file)), "content": rows}), path,
                           row_group_size=3)
            continue
        lines = "".join(json.dumps({"id": r, "content": t}) + "\n" for r, t in enumerate(rows))
        data = lines.encode()
        if fmt.endswith(".gz"):
            data = gzip.compress(data)
        elif fmt.endswith(".zst"):
            import zstandard
            data = zstandard.ZstdCompressor().compress(data)
        path.write_bytes(data)
    documents.sort(key=lambda d: (d[0].split("#")[0],
                                  int(d[0].split("#")[1]) if "#" in d[0] else 0))
    pattern = str(root / "**" / "*.txt") if fmt == "txt" else str(root / f"*.{fmt}")
    return pattern, documents


def _build(pattern, directory, fraction=0.3, text_field="content", workers=1, **kwargs):
    plan = sources.plan(f"files:{pattern}", text_field=text_field, validation_fraction=fraction)
    return plan, store.build_store(directory, plan, BYTE, workers=workers, progress=False,
                                   **kwargs)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet"])
def test_each_format_round_trips_every_document_once(tmp_path, fmt):
    pattern, documents = _write(tmp_path / "in", fmt)
    assert len({identity for identity, _ in documents}) == len(documents)  # no collisions
    _, built = _build(pattern, tmp_path / "store")
    expected = _expected(documents, 0.3)
    for split in ("train", "validation"):
        np.testing.assert_array_equal(np.asarray(built.split(split)), expected[split])
        held_out = _held_out(documents, 0.3)
        assert built.meta["splits"][split]["documents"] == sum(
            ((i in held_out) == (split == "validation")) for i, _ in documents)
    assert built.meta["dtype"] == "uint16" and built.verify() == []


def test_huge_text_document_is_read_in_pieces_and_stays_one_document(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_BYTES", 1000)
    text = "\n".join(" ".join(WORDS[i % 7:]) for i in range(300)) + "x" * 2500  # no blank line
    (tmp_path / "big.txt").write_text(text)
    pieces = list(sources.read_shard(sources.Shard((str(tmp_path / "big.txt"),), "train", 0),
                                     "text"))
    assert len(pieces) > 5 and [p.first for p in pieces] == [True] + [False] * (len(pieces) - 1)
    assert "".join(p.text for p in pieces) == text and all(p.identity == str(tmp_path / "big.txt")
                                                           for p in pieces)


def test_one_sentence_per_line_files_train_a_bpe_on_a_bounded_sample(tmp_path):
    root = tmp_path / "lines"
    root.mkdir()
    rng = np.random.default_rng(0)
    for f in range(8):  # ~80 KB files, no blank line: SentencePiece used to get no sentence
        lines = [" ".join(rng.choice(WORDS, 10)) + "." for _ in range(1500)]
        (root / f"f{f}.txt").write_text("\n".join(lines))
    data = ml_collections.ConfigDict(dict(source=f"files:{root}/*.txt", tokenizer="bpe:380",
                                          tokenizer_sample_bytes=1 << 20,
                                          data_dir=str(tmp_path / "d"),
                                          validation_fraction=0.25, name="lines"))
    built = corpus_lib.prepare_corpus(data, tmp_path / "cache")
    tok = built.tokenizer
    assert tok.vocab_size == 380 and tok.decode(tok.encode("the king spoke.")) == "the king spoke."
    text = (root / "f0.txt").read_text()
    assert len(tok.encode(text)) < len(text) / 2.5  # it learned merges
    # The sample is bounded and deterministic: its size, not the corpus, sets the text read.
    plan = sources.plan(data.source, validation_fraction=0.25)
    sample = list(sources.training_sample(plan, 50_000))
    assert sum(map(len, sample)) <= 50_000 and sample == list(sources.training_sample(plan, 50_000))


def test_token_stream_reads_across_shards_and_pickles(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SHARD_BYTES", 1500)  # many small shards
    pattern, documents = _write(tmp_path / "in", "txt", files=9)
    plan, built = _build(pattern, tmp_path / "store")
    assert len(plan.shards) >= 3
    stream = built.split("train")
    whole = _expected(documents, 0.3)["train"]
    assert len(stream) == len(whole)
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = int(rng.integers(0, len(whole)))
        b = int(rng.integers(a, len(whole) + 1))
        np.testing.assert_array_equal(stream[a:b], whole[a:b])
    assert stream[-1] == whole[-1] and stream[0] == BOS_ID
    copy = pickle.loads(pickle.dumps(stream))
    np.testing.assert_array_equal(np.asarray(copy), whole)
    # Packing from the store equals packing from the array, window for window.
    ids = np.array([0, 3, len(whole) // 16 - 1, -1])
    for key, value in pipeline.pack_windows(stream, ids, 16, BOS_ID).items():
        np.testing.assert_array_equal(value, pipeline.pack_windows(whole, ids, 16, BOS_ID)[key])


def _tree(directory):
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_two_hosts_each_building_their_share_equal_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SHARD_BYTES", 1500)
    pattern, _ = _write(tmp_path / "in", "txt", files=9)
    plan, _ = _build(pattern, tmp_path / "one", workers=2)  # one host, 2 worker processes
    built_by = {}
    real_build_shard = store.build_shard

    def recording_build_shard(directory, index, *args, **kwargs):
        built_by.setdefault(threading.current_thread().name, []).append(index)
        return real_build_shard(directory, index, *args, **kwargs)

    monkeypatch.setattr(store, "build_shard", recording_build_shard)
    both_done = threading.Barrier(2, timeout=60)
    errors = []

    def host(p):
        try:
            _build(pattern, tmp_path / "two", process_index=p, process_count=2,
                   barrier=both_done.wait)
        except Exception as error:  # noqa: BLE001 (re-raised below, in the test's thread)
            errors.append(error)

    threads = [threading.Thread(target=host, args=(p,), name=f"host{p}") for p in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    n = len(plan.shards)
    assert sorted(built_by["host0"]) == list(range(0, n, 2))
    assert sorted(built_by["host1"]) == list(range(1, n, 2))
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")  # bit for bit


def test_interrupted_build_resumes_from_finished_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SHARD_BYTES", 1500)
    pattern, _ = _write(tmp_path / "in", "txt", files=9)
    plan, _ = _build(pattern, tmp_path / "fresh")
    calls = []
    real_build_shard = store.build_shard

    def dies_on_third_shard(directory, index, *args, **kwargs):
        calls.append(index)
        if len(calls) == 3:  # killed mid-shard: a half-written temporary file stays behind
            shards = tmp_path / "resumed" / "shards"
            (shards / f"{index:05d}.train.tokens.tmp-dead").write_bytes(b"x")
            raise KeyboardInterrupt
        return real_build_shard(directory, index, *args, **kwargs)

    monkeypatch.setattr(store, "build_shard", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        _build(pattern, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "store.json").exists()
    with pytest.raises(store.StoreError, match="not a finished token store"):
        store.TokenStore(tmp_path / "resumed")
    calls.clear()
    monkeypatch.setattr(store, "build_shard", lambda d, i, *a, **k: calls.append(i) or
                        real_build_shard(d, i, *a, **k))
    _, resumed = _build(pattern, tmp_path / "resumed")
    assert calls == list(range(2, len(plan.shards)))  # only what was not committed
    fresh = store.TokenStore(tmp_path / "fresh")
    for split in ("train", "validation"):
        np.testing.assert_array_equal(np.asarray(resumed.split(split)),
                                      np.asarray(fresh.split(split)))


def test_damaged_shards_are_detected(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SHARD_BYTES", 1500)
    pattern, documents = _write(tmp_path / "in", "txt", files=9)
    plan, built = _build(pattern, tmp_path / "store")
    shard_file = tmp_path / "store" / "shards" / "00001.train.tokens"
    good = shard_file.read_bytes()
    shard_file.write_bytes(good[:-4])  # truncated: found by size at the next start, rebuilt
    calls = []
    real_build_shard = store.build_shard
    monkeypatch.setattr(store, "build_shard", lambda d, i, *a, **k: calls.append(i) or
                        real_build_shard(d, i, *a, **k))
    _, rebuilt = _build(pattern, tmp_path / "store")
    assert calls == [1] and shard_file.read_bytes() == good
    flipped = bytearray(good)
    flipped[10] ^= 1  # same size: only the checksum audit sees it
    shard_file.write_bytes(bytes(flipped))
    assert rebuilt.verify() == ["00001.train.tokens"]
    rebuilt.discard(rebuilt.verify())  # its record forgotten: the next build redoes the shard
    calls.clear()
    _, repaired = _build(pattern, tmp_path / "store")
    assert calls == [1] and shard_file.read_bytes() == good and repaired.verify() == []
    shard_file.write_bytes(bytes(flipped))
    (tmp_path / "store" / "shards" / "00001.json").unlink()  # by hand: the same
    calls.clear()
    _build(pattern, tmp_path / "store")
    assert calls == [1] and shard_file.read_bytes() == good
    shard_file.write_bytes(good[:-2])  # damaged under a running reader: one clear error
    with pytest.raises(store.StoreError,
                       match="00001.train.tokens is damaged \\(it is .* bytes, not"):
        np.asarray(store.TokenStore(tmp_path / "store").split("train"))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_records_whose_text_is_null_are_skipped_and_counted_in_every_format(tmp_path, fmt):
    """One rule for both formats: a null text is no document (jsonl used to abort the build,
    parquet to make an empty document), and the store counts what it skipped."""
    root = tmp_path / "in"
    root.mkdir()
    documents = []
    for f in range(2):
        path = root / f"part-{f}.{fmt}"
        rows = ["first text", None, "third text", None] if f else ["alone", None]
        documents += [(f"{path}#{r}", t) for r, t in enumerate(rows) if t is not None]
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.table({"content": rows}), path)
        else:
            path.write_text("".join(json.dumps({"content": t}) + "\n" for t in rows))
    _, built = _build(str(root / f"*.{fmt}"), tmp_path / "store")
    expected = _expected(documents, 0.3)
    for split in ("train", "validation"):
        np.testing.assert_array_equal(np.asarray(built.split(split)), expected[split])
    assert sum(s["documents"] for s in built.meta["splits"].values()) == 3
    assert built.meta["skipped"] == 3


def test_validation_holdout_is_stable_and_near_its_fraction():
    ids = [f"/data/file-{i}.jsonl#{r}" for i in range(40) for r in range(50)]
    held = [i for i in ids if sources.hash_split(i, 0.1) == "validation"]
    assert held == [i for i in ids if _is_validation(i, 0.1)]
    assert 0.08 < len(held) / len(ids) < 0.12
    assert held == [i for i in ids[::-1] if sources.hash_split(i, 0.1) == "validation"][::-1]


def test_explicit_validation_files(tmp_path):
    train_glob, train_docs = _write(tmp_path / "train", "jsonl")
    val_glob, val_docs = _write(tmp_path / "val", "jsonl.gz", files=1)
    plan = sources.plan(f"files:{train_glob}", text_field="content",
                        validation_source=f"files:{val_glob}")
    built = store.build_store(tmp_path / "store", plan, BYTE, workers=1, progress=False)
    np.testing.assert_array_equal(np.asarray(built.split("train")),
                                  _expected(train_docs, 0)["train"])
    np.testing.assert_array_equal(np.asarray(built.split("validation")),
                                  _expected(val_docs, 0)["train"])


def test_tfds_source_reads_a_local_tfds_dataset(tmp_path):
    from cla_jax.data import text_dataset
    documents = {f"doc{i}": t for i, t in enumerate(_docs(10, seed=5))}
    text_dataset.build_text_dataset(documents, tmp_path, name="tiny", validation_fraction=0.3)
    plan = sources.plan("tfds:tiny", data_dir=tmp_path)
    built = store.build_store(tmp_path / "store", plan, BYTE, workers=1, progress=False,
                              read_kwargs={"data_dir": str(tmp_path)})
    names = text_dataset.split_document_names(list(documents), validation_fraction=0.3)
    for split in ("train", "validation"):
        expected = np.concatenate([[BOS_ID] + BYTE.encode(documents[n]) for n in names[split]])
        np.testing.assert_array_equal(np.asarray(built.split(split)), expected)


# A registered TFDS builder, as the catalogue's datasets are (tfds:lm1b). It is written into a
# package, not defined in this module: TFDS locates a packaged builder's code through
# importlib_resources, a dependency it imports only then, so a builder in a top-level module
# would not notice a broken install that every catalogue dataset hits.
REGISTERED_BUILDER = """
import tensorflow_datasets as tfds

TEXTS = {texts!r}


class ClaToyCorpus(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({{"text": tfds.features.Text()}}))

    def _split_generators(self, dl_manager):
        return {{"train": self._generate_examples(TEXTS[:7]),
                 "test": self._generate_examples(TEXTS[7:])}}

    def _generate_examples(self, texts):
        for index, text in enumerate(texts):
            yield index, {{"text": text}}
"""


@pytest.fixture
def registered_tfds_builder(tmp_path, monkeypatch):
    """Registers the builder above (name cla_toy_corpus); returns its documents."""
    texts = _docs(10, seed=7)
    package = tmp_path / "cla_toy_tfds"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "toy_corpus.py").write_text(REGISTERED_BUILDER.format(texts=texts))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    importlib.import_module("cla_toy_tfds.toy_corpus")
    return texts


def test_tfds_source_builds_and_reads_a_registered_builder_offline(tmp_path,
                                                                   registered_tfds_builder):
    """`tfds:<name>` of a registered builder: tfds prepares it under data_dir (no network:
    the builder generates its records; no TensorFlow: array_record), then the store holds
    each record of each split once (in TFDS's stored order, a hash of the keys)."""
    texts = registered_tfds_builder
    plan = sources.plan("tfds:cla_toy_corpus", data_dir=tmp_path / "tfds",
                        validation_split="test")
    built = store.build_store(tmp_path / "store", plan, BYTE, workers=1, progress=False,
                              read_kwargs={"data_dir": str(tmp_path / "tfds")})
    for split, docs in (("train", texts[:7]), ("validation", texts[7:])):
        stream = np.asarray(built.split(split))
        starts = np.flatnonzero(stream == BOS_ID)
        stored = [BYTE.decode(piece[1:].tolist()) for piece in np.split(stream, starts[1:])]
        assert sorted(stored) == sorted(docs)


def test_an_import_failure_inside_tfds_is_reported_as_a_broken_install(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from cla_jax.errors import InstallError

    def broken(*args, **kwargs):  # what a missing lazy dependency of tfds raises
        raise ModuleNotFoundError("No module named 'importlib_resources'",
                                  name="importlib_resources")
    monkeypatch.setattr(tfds, "data_source", broken)
    with pytest.raises(InstallError, match="broken install.*pip install importlib_resources"):
        sources.plan("tfds:lm1b", data_dir=tmp_path)


def test_store_is_reused_and_named_by_source_and_tokenizer(tmp_path):
    pattern, _ = _write(tmp_path / "in", "jsonl", files=6, per_file=10)
    data = ml_collections.ConfigDict(dict(source=f"files:{pattern}", text_field="content",
                                          tokenizer="byte", data_dir=str(tmp_path / "d"),
                                          validation_fraction=0.3))
    first = corpus_lib.prepare_corpus(data, tmp_path / "cache")
    stamp = (first.store.directory / "store.json").stat().mtime
    again = corpus_lib.prepare_corpus(data, tmp_path / "cache")
    assert again.store.directory == first.store.directory
    assert (again.store.directory / "store.json").stat().mtime == stamp  # not rebuilt
    (tmp_path / "in" / "part-0.jsonl").write_text(json.dumps({"content": "changed"}) + "\n")
    changed = corpus_lib.prepare_corpus(data, tmp_path / "cache")
    assert changed.store.directory != first.store.directory
    # The unigram baseline from stored counts equals the direct computation.
    train, val = np.asarray(first.train), np.asarray(first.validation)
    counts = np.bincount(train, minlength=BYTE.vocab_size) + 1.0
    expected = np.exp(-np.log(counts / counts.sum())[val[1:]].mean())
    assert first.unigram_perplexity() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("case, message", [
    ("empty_glob", "matches no file"),
    ("no_field", "line 1 has no text field 'content'.*set --config.data.text_field"),
    ("no_column", "has no column 'content'.*set --config.data.text_field"),
    ("big_tokenizer", "has 4096 tokens but model.vocab_size is 300"),
    ("bad_fraction", "validation_fraction must be in"),
    ("unknown_field", "unknown fields \\['text_feild'\\]"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, case, message):
    (tmp_path / "in").mkdir()
    pattern = str(tmp_path / "in" / "*.jsonl")
    fields = dict(text_field="content", tokenizer="byte", data_dir=str(tmp_path / "d"))
    vocab = None
    if case == "no_field":
        (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    elif case == "no_column":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": ["hi"]}), tmp_path / "in" / "a.parquet")
        pattern = str(tmp_path / "in" / "*.parquet")
    elif case in ("big_tokenizer", "bad_fraction", "unknown_field"):
        (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
        fields.update({"big_tokenizer": dict(tokenizer="bpe:4096"),
                       "bad_fraction": dict(validation_fraction=1.0),
                       "unknown_field": dict(text_feild="x")}[case])
        vocab = 300
    data = ml_collections.ConfigDict(dict(source=f"files:{pattern}", **fields))
    with pytest.raises(ValueError, match=message):
        corpus_lib.prepare_corpus(data, tmp_path / "cache", max_vocab_size=vocab)
    assert not (tmp_path / "d").exists() and not (tmp_path / "cache").exists()


def test_training_batches_from_the_store_resume_bitwise(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SHARD_BYTES", 1500)
    pattern, _ = _write(tmp_path / "in", "txt", files=9)
    _, built = _build(pattern, tmp_path / "store")
    stream = built.split("train")

    def take(iterator, n):
        return [next(iterator) for _ in range(n)]

    iterator = pipeline.train_batches(stream, 16, 4, seed=1)
    take(iterator, 3)
    state = iterator.get_state()
    expected = take(iterator, 40)  # crosses an epoch and every shard boundary
    resumed = pipeline.train_batches(store.TokenStore(tmp_path / "store").split("train"), 16, 4,
                                     seed=1)
    resumed.set_state(state)
    for a, b in zip(take(resumed, 40), expected):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_prepare_command_builds_and_audits_the_store(tmp_path):
    import subprocess
    import sys

    from test_multiprocess import write_config
    from test_train import ROOT
    from configs import default

    pattern, _ = _write(tmp_path / "in", "jsonl", files=4, per_file=10)
    config = default.get_config()
    config.data.update(source=f"files:{pattern}", text_field="content", tokenizer="byte",
                       data_dir=str(tmp_path / "d"), validation_fraction=0.3)
    command = [sys.executable, "-m", "cla_jax.data.prepare",
               f"--config={write_config(config, tmp_path / 'c.py')}", "--verify"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "every shard matches its crc32" in done.stdout
    import re
    documents = [int(n.replace(",", "")) for n in re.findall(r"(\d[\d,]*) documents", done.stdout)]
    assert len(documents) == 2 and sum(documents) == 40  # train + validation: every row once
    shard = next((tmp_path / "d").rglob("00001.train.tokens"))
    good = shard.read_bytes()
    data = bytearray(good)
    data[3] ^= 1
    shard.write_bytes(bytes(data))
    # --verify finds the flipped bit and rebuilds that shard: training reads good tokens again.
    repaired = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    assert "rebuilt damaged shard files (crc32 mismatch): ['00001.train.tokens']" in \
        repaired.stdout
    assert "every shard matches its crc32" in repaired.stdout and shard.read_bytes() == good


@pytest.mark.parametrize("source, name", [
    ("shakespeare", "shakespeare"), ("tfds:lm1b", "lm1b"), ("tfds:wiki40b/en", "wiki40b-en"),
    ("files:/data/fineweb/**/*.jsonl.zst", "fineweb"), ("files:my_texts/*.txt", "my_texts"),
    ("files:gs://bucket/web/part-*.parquet", "part"), ("files:*.txt", "files"),
])
def test_an_unset_data_name_follows_the_source(source, name):
    assert corpus_lib.settings({"source": source})["name"] == name
    assert corpus_lib.settings({"source": source, "name": "mine"})["name"] == "mine"


def test_runs_are_ignored_by_git():
    """Every README example writes under runs/: a clone must not offer them for commit."""
    import pathlib
    import subprocess
    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout: .gitignore is not in use here")
    for path in ("runs/cla2/checkpoints/0", "workdir/demo/metrics.jsonl"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=root).returncode == 0, path

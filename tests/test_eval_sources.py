"""eval.py on another corpus and at several lengths (--source, --text_field, --split,
--seq_lens): the NLL of a corpus given only for evaluation equals a plain reference computed on
that corpus's own tokens, several lengths in one run equal one run per length, the corpus's token
store is built once with the run's tokenizer and reused, and bad flags are one error line before
any checkpoint is read or store built.

The reference runs the model on one piece of the stream at a time (causal attention only,
positions from 0, no segment ids) and sums log-softmax in float64: the windows protocol is
disjoint windows of seq_len inputs, each cut at every bos inside it.
"""
import functools
import json
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from test_train import ROOT, tiny_config

from cla_jax import checkpoint, evaluation
from cla_jax.config import ModelConfig
from cla_jax.data import corpus as corpus_module
from cla_jax.data.corpus import prepare_corpus
from cla_jax.data.tokenizer import ByteTokenizer
from cla_jax.errors import UserError
from cla_jax.model import Transformer, init_params

MAX_SEQ_LEN, TRAIN_SEQ_LEN, STEP = 64, 16, 7
BYTE = ByteTokenizer()
WORDS = "we few we happy few we band of brothers for he today that sheds his blood".split()


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_glob):
    """A tiny initialised byte-level model saved as a run whose own data is the conftest corpus
    (all 8 test devices in its mesh): (workdir, ModelConfig, host params, run config)."""
    config = tiny_config(corpus_glob)
    config.model.update(max_seq_len=MAX_SEQ_LEN)
    config.train.update(seq_len=TRAIN_SEQ_LEN)
    model = ModelConfig.from_dict(config.model)
    params = nn.meta.unbox(init_params(model, jax.random.key(5)))
    workdir = tmp_path_factory.mktemp("run")
    saver = checkpoint.Checkpointer(workdir / "checkpoints")
    saver.save(STEP, types.SimpleNamespace(params=params, opt_state={"count": jnp.zeros(())}),
               {"config": config.to_dict()})
    saver.wait()
    saver.close()
    return workdir, model, params, config


def texts_of(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(n))) + "." for n in rng.integers(1, 40, count)]


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory):
    """A corpus given only for evaluation: one jsonl file, its text in field "content"."""
    root = tmp_path_factory.mktemp("eval_corpus")
    texts = texts_of(11, 9)
    with open(root / "held.jsonl", "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, "content": text}) + "\n")
    return f"files:{root}/held.jsonl", texts


def stream_of(texts) -> np.ndarray:
    """The stream a store holds: [bos] + bytes of each document, in order."""
    return np.array([t for text in texts for t in [BYTE.bos_id] + BYTE.encode(text)], np.int32)


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return Transformer(model).apply({"params": params}, tokens, positions)[0]


def reference_windows_nll(model, params, stream: np.ndarray, seq_len: int) -> float:
    """float64 NLL of every target of `stream`, scored in disjoint windows of seq_len inputs
    cut at every bos: each piece runs alone, right-padded to max_seq_len (unseen: causal)."""
    pieces = []
    for begin in range(0, len(stream) - 1, seq_len):
        end = min(begin + seq_len, len(stream) - 1)  # inputs stream[begin:end]
        cuts = [begin] + [i for i in range(begin + 1, end) if stream[i] == BYTE.bos_id] + [end]
        pieces += [stream[a:b + 1] for a, b in zip(cuts[:-1], cuts[1:])]
    total = 0.0
    for first in range(0, len(pieces), 32):
        chunk = pieces[first:first + 32]
        tokens = np.zeros((32, MAX_SEQ_LEN), np.int32)
        for r, piece in enumerate(chunk):
            tokens[r, :len(piece) - 1] = piece[:-1]
        logits = np.asarray(forward(model, params, tokens), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for r, piece in enumerate(chunk):
            n = len(piece) - 1
            total -= float(logp[r, np.arange(n), piece[1:]].sum())
    return total


def count_words(texts) -> int:
    return sum(len(re.split(r"\s+", t)) for t in texts)  # lm-eval wikitext's rule


def store_files(cache) -> dict[str, int]:
    """{path: mtime_ns} of every file of every token store under the run's data_dir."""
    stores = cache / "datasets" / "stores"
    return {str(p): p.stat().st_mtime_ns for p in stores.rglob("*") if p.is_file()}


def test_another_corpus_at_several_lengths_equals_the_reference_and_single_runs(
        run, jsonl_corpus, tmp_path):
    workdir, model, params, _ = run
    source, texts = jsonl_corpus
    stream = stream_of(texts)
    lengths = [8, 40, MAX_SEQ_LEN]  # shorter and longer than train.seq_len; the limit
    several = evaluation.evaluate_lengths(workdir, tmp_path / "cache", source=source,
                                          text_field="content", seq_lens=lengths)
    assert [r["seq_len"] for r in several] == lengths
    for results in several:
        # The corpus is read whole (every document), with the run's byte tokenizer.
        assert results["split"] == "all" and results["source"] == source
        assert results["text_field"] == "content" and results["step"] == STEP
        assert results["documents"] == len(texts)
        assert results["tokens"] == len(stream) - 1
        assert results["bytes"] == sum(len(t.encode()) for t in texts)
        assert results["words"] == count_words(texts)
        assert results["unigram_perplexity"] is None  # no train split to take counts from
        reference = reference_windows_nll(model, params, stream, results["seq_len"])
        np.testing.assert_allclose(results["nll"], reference, rtol=1e-5)
        single = evaluation.evaluate_checkpoint(workdir, tmp_path / "cache", source=source,
                                                text_field="content",
                                                seq_len=results["seq_len"])
        assert single == results
    nlls = [r["nll"] for r in several]
    assert len(set(nlls)) == len(nlls)  # the lengths differ: each was really evaluated


def test_no_flags_evaluate_the_runs_own_validation_split(run, tmp_path):
    workdir, model, params, config = run
    results = evaluation.evaluate_checkpoint(workdir, tmp_path / "cache")
    assert results["split"] == "validation" and results["source"] == config.data.source
    assert results["seq_len"] == TRAIN_SEQ_LEN and results["unigram_perplexity"] > 1
    validation = np.asarray(prepare_corpus(config.data, tmp_path / "cache").validation)
    assert results["tokens"] == len(validation) - 1
    np.testing.assert_allclose(results["nll"], reference_windows_nll(
        model, params, validation, TRAIN_SEQ_LEN), rtol=1e-5)


def test_a_single_text_file_is_read_whole_and_its_store_is_built_once(run, tmp_path,
                                                                       monkeypatch):
    workdir, model, params, config = run
    text = "\n".join(texts_of(3, 12))
    (tmp_path / "one.txt").write_text(text)
    source, cache = f"files:{tmp_path}/one.txt", tmp_path / "cache"
    tokenizers = []  # the data each tokenizer is made from: never the evaluated corpus
    real = corpus_module.corpus_tokenizer
    monkeypatch.setattr(corpus_module, "corpus_tokenizer",
                        lambda data, *a, **k: tokenizers.append(data["source"]) or real(
                            data, *a, **k))

    first = evaluation.evaluate_checkpoint(workdir, cache, source=source, seq_len=32)
    stream = stream_of([text])
    assert first["documents"] == 1 and first["tokens"] == len(stream) - 1
    np.testing.assert_allclose(first["nll"], reference_windows_nll(model, params, stream, 32),
                               rtol=1e-5)
    built = store_files(cache)
    (meta,) = [json.loads(open(p).read()) for p in built if p.endswith("store.json")]
    assert meta["tokenizer"] == BYTE.identity and meta["source"] == source

    again = evaluation.evaluate_lengths(workdir, cache, source=source, seq_lens=[8, 32],
                                        protocol="documents")
    assert store_files(cache) == built  # no file rewritten, no store added: nothing tokenized
    assert [r["tokens"] for r in again] == [len(text.encode())] * 2  # every byte, once
    assert tokenizers == [config.data.source] * 2


def test_a_tfds_split_is_read_whole(run, tmp_path):
    from cla_jax.data import text_dataset
    workdir, model, params, _ = run
    cache = tmp_path / "cache"
    documents = {f"doc{i}": t for i, t in enumerate(texts_of(5, 10))}
    text_dataset.build_text_dataset(documents, cache / "datasets", name="evaltext",
                                    validation_fraction=0.3)
    results = evaluation.evaluate_checkpoint(workdir, cache, source="tfds:evaltext",
                                             split="validation", seq_len=24)
    names = text_dataset.split_document_names(list(documents), validation_fraction=0.3)
    held = [documents[n] for n in names["validation"]]
    assert results["split"] == "validation" and results["documents"] == len(held)
    assert results["bytes"] == sum(len(t.encode()) for t in held)
    # TFDS stores records in an order of its own: the store's stream, documents as expected.
    store = next((cache / "datasets" / "stores").iterdir())
    stream = np.concatenate([np.fromfile(p, np.uint16) for p in
                             sorted((store / "shards").glob("*.validation.tokens"))])
    starts = np.flatnonzero(stream == BYTE.bos_id)
    stored = [BYTE.decode(piece[1:].tolist()) for piece in np.split(stream, starts[1:])]
    assert sorted(stored) == sorted(held)
    np.testing.assert_allclose(results["nll"], reference_windows_nll(
        model, params, stream.astype(np.int32), 24), rtol=1e-5)


@pytest.mark.parametrize("settings, message", [
    (dict(seq_lens=[8, 65]), "--seq_lens: 65 is past the model's max_seq_len (64"),
    (dict(protocol="strided", stride=12, seq_lens=[8, 40]), "--stride=12 must be in 1..8"),
    (dict(source="nonsense:x"), "--source=nonsense:x is not a source: give files:<glob>"),
    (dict(source="corpus.txt"), "--source=corpus.txt is not a source"),
    (dict(source="files:/no/such/dir/*.txt"), "matches no file"),
    (dict(source="shakespeare", split="test"), "--split=test: shakespeare has the splits all"),
    (dict(source="tfds:lm1b", split="train[:5%]"), "--split=train[:5%]: a TFDS split with ':'"),
])
def test_bad_settings_are_refused_before_any_work(run, tmp_path, monkeypatch, settings,
                                                  message):
    workdir = run[0]

    def no_heavy_work(*args, **kwargs):
        raise AssertionError("the checkpoint's params were read before the settings' check")

    monkeypatch.setattr(checkpoint, "restore_model", no_heavy_work)
    with pytest.raises(UserError, match=re.escape(message)) as error:
        evaluation.evaluate_lengths(workdir, tmp_path / "cache", **settings)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("text, message", [
    ("512,abc", "--seq_lens=512,abc is not a comma-separated list of token counts"),
    ("", "is not a comma-separated list"),
    ("0", "--seq_lens=0: every length must be a positive number of tokens"),
    ("64,-8", "every length must be a positive"),
])
def test_malformed_seq_lens_are_refused(text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        evaluation.parse_seq_lens(text)
    assert evaluation.parse_seq_lens(" 64, 8,64") == [64, 8]


def test_eval_script_at_several_lengths_on_a_jsonl_corpus(run, jsonl_corpus, tmp_path):
    workdir, model, params, _ = run
    source, texts = jsonl_corpus
    command = [sys.executable, "eval.py", f"--workdir={workdir}",
               f"--cache_dir={tmp_path / 'cache'}", f"--source={source}", "--text_field=content"]
    refused = subprocess.run(command + ["--seq_lens=8,100"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: --seq_lens: 100 is past the model's max_seq_len (64, the longest context its "
        "RoPE positions cover); give lengths up to 64"]
    result = subprocess.run(command + ["--seq_lens=8,40"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((workdir / f"eval_held.jsonl-all_{STEP}_seq8-40.json").read_text())
    assert written["seq_lens"] == [8, 40] and written["source"] == source
    assert written["split"] == "all" and written["tokens"] == len(stream_of(texts)) - 1
    for results in written["results"]:
        np.testing.assert_allclose(results["nll"], reference_windows_nll(
            model, params, stream_of(texts), results["seq_len"]), rtol=1e-5)
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("seq_len")] == [
        "seq_len 8", "seq_len 40"]

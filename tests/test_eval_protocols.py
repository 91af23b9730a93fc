"""Eval protocols (windows, strided, documents) against plain references, and exact totals.

The references run the model on one context at a time (causal attention only, positions from
0, no segment ids) and sum log-softmax in float64: strided follows the Hugging Face perplexity
guide's loop, documents lm-evaluation-harness's rolling windows.
"""
import math
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cla_jax import evaluation
from cla_jax.config import ModelConfig
from cla_jax.data import eval_batches
from cla_jax.data.packing import document_spans, pack_spans, strided_spans
from cla_jax.data.tokenizer import ByteTokenizer
from cla_jax.errors import UserError
from cla_jax.evaluation import compensated_sum, make_eval_step
from cla_jax.model import Transformer, init_params
from configs import default

ROOT = pathlib.Path(__file__).parents[1]
SEQ_LEN, BATCH = 16, 3  # batch 3: the last batch of every protocol is partly padding
BOS = 200  # any id: nothing may assume bos == 1, and ids 0, 1, 2 are ordinary tokens here
DOC_LENGTHS = (5, 0, 16, 17, 1, 40, 15, 3, 33)  # empty, short, = / > seq_len, several windows


@pytest.fixture(scope="module")
def model():
    config = default.get_config().model
    config.update(vocab_size=260, d_model=32, num_layers=2, num_heads=4, num_kv_heads=1,
                  head_dim=8, mlp_dim=48, kv_sharing=2, max_seq_len=32)
    model = ModelConfig.from_dict(config)
    params = nn.meta.unbox(init_params(model, jax.random.key(3)))
    token_bytes = ByteTokenizer().token_bytes()
    return model, params, make_eval_step(model, token_bytes), token_bytes


@pytest.fixture(scope="module")
def documents():
    rng = np.random.default_rng(0)
    ids = np.setdiff1d(np.arange(259), [BOS])  # 259 = the byte vocabulary
    return [rng.choice(ids, n).tolist() for n in DOC_LENGTHS]


def stream_of(documents, bos=BOS):
    return np.array([t for d in documents for t in [bos] + list(d)], np.int32)


def reference_nll(model, params, rows):
    """float64 NLL of rows (tokens, scored): tokens = one context's inputs + its last target,
    the last `scored` targets counted. Every row runs alone (causal, positions 0..)."""
    apply = jax.jit(lambda p, x, pos: Transformer(model).apply({"params": p}, x, pos)[0])
    total, chunk = 0.0, 32
    for first in range(0, len(rows), chunk):
        part = rows[first:first + chunk]
        inputs = np.zeros((chunk, SEQ_LEN), np.int32)  # padding after a row: causal, unseen
        for r, (tokens, _) in enumerate(part):
            inputs[r, :len(tokens) - 1] = tokens[:-1]
        positions = np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), inputs.shape)
        logits = np.asarray(apply(params, inputs, positions), np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        for r, (tokens, scored) in enumerate(part):
            n = len(tokens) - 1
            cols = np.arange(n - scored, n)
            total -= float(logp[r, cols, np.asarray(tokens)[cols + 1]].sum())
    return total


def hf_strided_rows(stream, stride):
    """The HF guide's loop (each window scores its last trg_len targets), with a window's
    context cut at every bos inside it, as the windows protocol does."""
    rows, prev_end, n = [], 0, len(stream)
    for begin in range(0, n - 1, stride):
        end = min(begin + SEQ_LEN, n - 1)  # inputs stream[begin:end]
        first_scored = end - (end - prev_end)
        cuts = [begin] + [i for i in range(begin + 1, end) if stream[i] == BOS] + [end]
        for a, b in zip(cuts[:-1], cuts[1:]):
            rows.append((stream[a:b + 1].tolist(), max(0, min(b - a, b - first_scored))))
        prev_end = end
        if end == n - 1:
            break
    return rows


def scored_bytes(token_bytes, rows):
    return sum(int(token_bytes[t[len(t) - s:]].sum()) for t, s in rows)


def test_strided_with_stride_seq_len_equals_windows(model, documents):
    _, params, eval_step, _ = model
    stream = stream_of(documents)
    windows = evaluation.evaluate(eval_step, params,
                                  eval_batches(stream, SEQ_LEN, BATCH, bos_id=BOS), progress=False)
    strided = evaluation.evaluate_spans(eval_step, params, stream,
                                        strided_spans(len(stream), SEQ_LEN, SEQ_LEN), SEQ_LEN,
                                        BATCH, BOS, progress=False)
    assert strided["tokens"] == windows["tokens"] == len(stream) - 1
    assert strided["bytes"] == windows["bytes"]
    np.testing.assert_allclose(strided["nll"], windows["nll"], rtol=1e-6)


@pytest.mark.parametrize("stride", [5, 8])
def test_strided_matches_the_hf_guide_loop(model, documents, stride):
    model_config, params, eval_step, token_bytes = model
    stream = stream_of(documents)
    results = evaluation.evaluate_spans(eval_step, params, stream,
                                        strided_spans(len(stream), SEQ_LEN, stride), SEQ_LEN,
                                        BATCH, BOS, progress=False)
    rows = hf_strided_rows(stream, stride)
    assert results["tokens"] == sum(s for _, s in rows) == len(stream) - 1
    assert results["bytes"] == scored_bytes(token_bytes, rows)
    np.testing.assert_allclose(results["nll"], reference_nll(model_config, params, rows),
                               rtol=1e-5)


def test_documents_match_lm_eval_rolling_windows(model, documents):
    utils = pytest.importorskip("lm_eval.utils")
    model_config, params, eval_step, token_bytes = model
    results = evaluation.evaluate_documents(eval_step, params, documents, SEQ_LEN, BATCH, BOS,
                                            progress=False, words=7)
    # Rows as lm_eval's HFLM.loglikelihood_rolling and _loglikelihood_tokens build them.
    rows_of = [[((context + continuation)[-(SEQ_LEN + 1):], len(continuation))
                for context, continuation in map(utils.make_disjoint_window,
                                                 utils.get_rolling_token_windows(doc, BOS,
                                                                                 SEQ_LEN, 1))]
               for doc in documents]
    rows = [row for doc_rows in rows_of for row in doc_rows]
    assert results["tokens"] == sum(DOC_LENGTHS) and results["documents"] == len(documents)
    assert results["bytes"] == scored_bytes(token_bytes, rows)
    reference = reference_nll(model_config, params, rows)
    np.testing.assert_allclose(results["nll"], reference, rtol=1e-5)
    np.testing.assert_allclose(results["word_perplexity"], math.exp(reference / 7), rtol=1e-5)
    # One document alone scores what it contributes among the others (own segments, rows).
    alone = evaluation.evaluate_documents(eval_step, params, [documents[5]], SEQ_LEN, BATCH,
                                          BOS, progress=False)
    np.testing.assert_allclose(alone["nll"], reference_nll(model_config, params, rows_of[5]),
                               rtol=1e-5)
    empty = evaluation.evaluate_documents(eval_step, params, [[]], SEQ_LEN, BATCH, BOS,
                                          progress=False)
    assert empty["nll"] == 0 and empty["tokens"] == 0


@pytest.mark.parametrize("protocol", ["strided1", "strided3", "strided16", "documents"])
def test_every_target_scored_once_across_processes(protocol):
    # Unique ids: a target's value names its stream index (bos = 5 at document starts).
    lengths = np.array([0, 3, 16, 17, 40, 1, 33])
    bos_indices = np.cumsum(lengths + 1) - lengths - 1
    stream = np.arange(int(np.sum(lengths + 1)), dtype=np.int32) + 10
    stream[bos_indices] = 5
    spans = (document_spans(bos_indices, lengths, SEQ_LEN) if protocol == "documents" else
             strided_spans(len(stream), SEQ_LEN, int(protocol[len("strided"):])))
    scored, inputs = [], []
    for process in range(2):  # a global batch of 4 rows, 2 per process
        batches, count = evaluation.span_batches(stream, spans, SEQ_LEN, 4, 5, process, 2)
        batches = list(batches)
        assert len(batches) == count
        for batch in batches:
            assert batch["inputs"].shape == (2, SEQ_LEN)
            keep = batch["weights"] > 0
            scored += batch["targets"][keep].tolist()
            inputs += batch["inputs"][keep].tolist()
    expected = stream[1:] if protocol != "documents" else stream[stream != 5]
    assert sorted(scored) == sorted(expected.tolist())
    for target, given in zip(scored, inputs):
        if target != 5:
            assert given == stream[target - 10 - 1]


def context_oracle(params, batch):
    """A model whose loss falls with context: 1 / (1 + tokens before the target's input)."""
    scored = batch["weights"] > 0
    nll = 1.0 / (1.0 + batch["positions"].astype(jnp.float32))
    return {"nll": compensated_sum(jnp.where(scored, nll, 0.0)),
            "tokens": jnp.sum(scored, dtype=jnp.int32), "bytes": jnp.sum(scored, dtype=jnp.int32)}


def test_smaller_strides_give_each_target_more_context():
    stream = np.arange(300, dtype=np.int32) + 1000  # one long document
    stream[0] = BOS
    step = jax.jit(context_oracle)
    nlls = []
    for stride in (16, 8, 4, 1):
        results = evaluation.evaluate_spans(step, None, stream,
                                            strided_spans(len(stream), SEQ_LEN, stride), SEQ_LEN,
                                            BATCH, BOS, progress=False)
        # Target t (input t - 1) is scored by the first window k * stride that reaches it.
        expected = 0.0
        for t in range(1, len(stream)):
            k = max(0, -(-(t - SEQ_LEN) // stride))
            expected += 1.0 / (1 + t - 1 - k * stride)
        assert results["tokens"] == len(stream) - 1
        np.testing.assert_allclose(results["nll"], expected, rtol=1e-6)
        nlls.append(results["nll"])
    assert nlls == sorted(nlls, reverse=True) and nlls[0] > nlls[1]


def test_accumulator_counts_exactly_past_2_31_and_sums_like_float64():
    rng = np.random.default_rng(1)
    counts = [2**31 - 1, 2**31 - 1, 7, 2**31 - 1, 2**24 + 1, 0]  # past 2^24, 2^31 and 2^32
    values = np.concatenate([[2.0**25], rng.uniform(0, 1.9, 2000)]).astype(np.float32)
    totals, plain = None, np.float32(0)
    for i, value in enumerate(values):  # each value is below half an ulp of 2^25 in float32
        sums = {"tokens": jnp.int32(counts[i % len(counts)]),
                "nll": jnp.asarray([value, value / 3], jnp.float32)}
        totals = evaluation.accumulate(totals, sums)
        plain = np.float32(plain + value)
    got = evaluation.read_totals(totals)
    assert got["tokens"] == sum(counts[i % len(counts)] for i in range(len(values)))
    assert got["tokens"] > 2**40
    reference = math.fsum(values.astype(np.float64)) + math.fsum(
        (values / np.float32(3)).astype(np.float64))
    assert abs(got["nll"] - reference) < 1e-10 * reference
    assert abs(float(plain) - math.fsum(values.astype(np.float64))) > 1000  # float32 loses it


def test_compensated_batch_sum():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1.9, (5, 333)).astype(np.float32)
    x[2, 7] = 2.0**26
    hi, lo = np.asarray(jax.jit(compensated_sum)(x), np.float64)
    reference = math.fsum(x.astype(np.float64).ravel())
    assert abs(hi + lo - reference) < 1e-14 * reference


def test_words_and_bytes_count_the_decoded_text(model):
    _, params, eval_step, _ = model
    tokenizer = ByteTokenizer()
    texts = ["Hello  wörld\n", "  leading and trailing ", "", "emoji 🎉 ok", "x" * 40 + " y"]
    stream = stream_of([tokenizer.encode(t) for t in texts], tokenizer.bos_id)
    bos_indices, lengths = evaluation.document_bounds(stream, tokenizer.bos_id)
    words = evaluation.split_words(tokenizer, stream, bos_indices, lengths)
    assert words == sum(len(re.split(r"\s+", t)) for t in texts)  # lm-eval wikitext's rule
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    documents = evaluation.evaluate_documents(
        eval_step, params, [tokenizer.encode(t) for t in texts], SEQ_LEN, BATCH,
        tokenizer.bos_id, progress=False, words=words)
    windows = evaluation.evaluate(eval_step, params, eval_batches(stream, SEQ_LEN, BATCH),
                                  progress=False, words=words)
    assert documents["bytes"] == windows["bytes"] == text_bytes == documents["tokens"]
    assert windows["tokens"] == len(stream) - 1
    for r in (documents, windows):
        np.testing.assert_allclose(r["bits_per_byte"], r["nll"] / math.log(2) / text_bytes)
        np.testing.assert_allclose(r["byte_perplexity"], math.exp(r["nll"] / text_bytes))
        np.testing.assert_allclose(r["word_perplexity"], math.exp(r["nll"] / words))
    with pytest.raises(UserError, match="bos"):
        evaluation.document_bounds(stream[1:], tokenizer.bos_id)


@pytest.mark.parametrize("protocol, stride, message", [
    ("windows", 8, "--stride is for --protocol=strided only"),
    ("documents", 8, "--stride is for --protocol=strided only"),
    ("strided", None, "needs --stride"),
    ("strided", 0, "must be in 1..16"),
    ("strided", 17, "must be in 1..16"),
])
def test_bad_protocol_flags_are_refused(protocol, stride, message):
    with pytest.raises(UserError, match=re.escape(message)):
        evaluation.check_protocol(protocol, stride, SEQ_LEN)


def test_eval_script_refuses_a_stride_without_strided_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "eval.py", f"--workdir={tmp_path}", "--protocol=documents",
         "--stride=4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --stride is for --protocol=strided only, not --protocol=documents"]


def test_pack_spans_restarts_attention_and_positions_at_every_span_and_bos():
    stream = np.array([5, 20, 21, 22, 23, 5, 30, 31, 32], np.int32)  # bos = 5
    spans = np.array([[1, 3, 2], [3, 7, 3]])  # no bos at either start; a bos inside the second
    batch = pack_spans(stream, spans, np.array([0, 0]), 2, 8, bos_id=5)
    np.testing.assert_array_equal(batch["inputs"][0], [20, 21, 22, 23, 5, 30, 0, 0])
    np.testing.assert_array_equal(batch["targets"][0], [21, 22, 23, 5, 30, 31, 0, 0])
    np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 2, 2, 3, 3, 0, 0])
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(batch["weights"][0], [0, 1, 1, 1, 1, 1, 0, 0])
    assert not batch["weights"][1].any() and not batch["segment_ids"][1].any()

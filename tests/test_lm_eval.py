"""The lm-evaluation-harness adapter with lm_eval's own code, offline: tasks are local YAML over
local JSONL (tests/fixtures/lm_eval). Its numbers are checked against a numpy computation from
the model's logits, against eval.py's documents protocol (evaluation.evaluate_documents), and
against decoding.generate."""
import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import types

# Before lm_eval imports datasets: no network at all, and its cache out of the home directory.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="cla-jax-hf-datasets-"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402
from test_train import ROOT, tiny_config  # noqa: E402

from cla_jax import checkpoint  # noqa: E402
from cla_jax.config import ModelConfig  # noqa: E402
from cla_jax.data.tokenizer import ByteTokenizer  # noqa: E402
from cla_jax.decoding import Sampling, generate  # noqa: E402
from cla_jax.evaluation import count_words, evaluate_documents, make_eval_step  # noqa: E402
from cla_jax.model import Transformer, abstract_params  # noqa: E402

FIXTURES = pathlib.Path(ROOT) / "tests" / "fixtures" / "lm_eval"
MAX_SEQ_LEN, SEQ_LEN, BATCH = 64, 32, 8  # max_length defaults to the run's train.seq_len
TOKENIZER = ByteTokenizer()
BOS = TOKENIZER.bos_id


def read_jsonl(name):
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny random byte-level model saved as a run (all 8 test devices in its mesh):
    (workdir, ModelConfig, host params)."""
    config = tiny_config("files:unused")
    config.model.update(max_seq_len=MAX_SEQ_LEN)
    config.train.update(seq_len=SEQ_LEN)
    model = ModelConfig.from_dict(config.model)
    rng = np.random.default_rng(3)  # drawn on the host, large: peaked logits, no near-ties
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype),
        nn.meta.unbox(abstract_params(model)))
    workdir = tmp_path_factory.mktemp("run")
    saver = checkpoint.Checkpointer(workdir / "checkpoints")
    saver.save(7, types.SimpleNamespace(params=params, opt_state={"count": jnp.zeros(())}),
               {"config": config.to_dict()})
    saver.wait()
    saver.close()
    return workdir, model, params


@pytest.fixture(scope="module")
def lm(run):
    from cla_jax.lm_eval import ClaJaxLM
    return ClaJaxLM(workdir=str(run[0]), batch_size=BATCH, cache_dir=str(run[0] / "cache"))


@pytest.fixture(scope="module")
def evaluated(lm):
    """simple_evaluate over the three fixture tasks, every document, samples logged."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    cwd = os.getcwd()
    os.chdir(ROOT)  # the YAML files name their JSONL relative to the repository root
    try:
        return lm_eval.simple_evaluate(
            model=lm, tasks=["shakespeare_mc", "shakespeare_rolling", "shakespeare_gen"],
            # Only the fixture tasks: indexing lm_eval's thousands of built-in ones takes 20 s.
            task_manager=TaskManager(include_path=str(FIXTURES), include_defaults=False),
            log_samples=True,
            bootstrap_iters=0)
    finally:
        os.chdir(cwd)


# --- the independent reference: one plain forward pass, numpy log-softmax -------------------

@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, tokens_BL):
    positions = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    return Transformer(model).apply({"params": params}, tokens_BL, positions)[0]


def logits_of(run, rows):
    """float64 logits [len(row), vocab] of each row, from the rows right-padded to
    max_seq_len (a causal model ignores the padding; one compile)."""
    _, model, params = run
    out = []
    for start in range(0, len(rows), 16):
        chunk = rows[start:start + 16]
        tokens = np.zeros((16, MAX_SEQ_LEN), np.int32)
        for b, row in enumerate(chunk):
            tokens[b, :len(row)] = row
        logits = np.asarray(forward(model, params, tokens), np.float64)
        out += [logits[b, :len(row)] for b, row in enumerate(chunk)]
    return out


def numpy_scores(run, rows, num_scored):
    """(sum of logprobs of each row's last num_scored tokens, whether each is the argmax),
    log-softmax in float64."""
    out = []
    for row, n, logits in zip(rows, num_scored, logits_of(run, rows)):
        x = logits[:-1]
        logprobs = x - x.max(-1, keepdims=True)
        logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
        t = np.arange(len(row) - 1 - n, len(row) - 1)
        targets = np.asarray(row)[t + 1]
        out.append((float(logprobs[t, targets].sum()), bool((x[t].argmax(-1) == targets).all())))
    return out


def reference_loglikelihood(run, pairs, max_length=SEQ_LEN):
    """lm_eval's scoring of (context, continuation), by hand for the byte tokenizer: [bos] +
    bytes, trailing spaces of the context moved to the continuation, the last max_length + 1
    tokens kept."""
    rows, num_scored = [], []
    for context, continuation in pairs:
        cut = len(context.rstrip())
        context, continuation = context[:cut], context[cut:] + continuation
        rows.append(([BOS] + TOKENIZER.encode(context + continuation))[-(max_length + 1):])
        num_scored.append(len(TOKENIZER.encode(continuation)))
    return numpy_scores(run, rows, num_scored)


def instances(request_type, arguments):
    from lm_eval.api.instance import Instance
    return [Instance(request_type, {}, args, i) for i, args in enumerate(arguments)]


# --- tests ----------------------------------------------------------------------------------

def test_loglikelihood_of_a_continuation_equals_numpy_from_the_logits(run, lm):
    pairs = [("the king", " and queen"),
             ("the king ", "and queen"),     # the trailing space moves to the continuation
             ("", "ROMEO:"),                 # empty context: bos alone conditions
             ("a" * 50 + "far away", " spoke"),  # longer than max_length: cut from the left
             ("X", "y" * SEQ_LEN)]           # a continuation of max_length tokens
    # And one continuation that is greedy: the most likely next byte after some context.
    contexts = ["the ", "a land", "lord", "queen of", "to every"]
    rows = [[BOS] + TOKENIZER.encode(c) for c in contexts]
    for context, logits in zip(contexts, logits_of(run, rows)):
        token = int(logits[-1].argmax())
        if 32 + 3 <= token < 127 + 3:  # printable ASCII: the byte tokenizer round-trips it
            pairs.append((context, chr(token - 3)))
            break
    assert len(pairs) == 6, "no context with a printable greedy byte"
    got = lm.loglikelihood(instances("loglikelihood", pairs))
    want = reference_loglikelihood(run, pairs)
    for (logprob, greedy), (want_logprob, want_greedy) in zip(got, want):
        assert logprob == pytest.approx(want_logprob, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy
    assert got[-1][1] and not got[0][1]


def test_any_max_length_and_chunk_size_score_the_same(run):
    """A top bucket (max_length 40) and chunks (12 positions) that do not divide each other:
    the chunks are padded, never scored, and the numbers still equal numpy's."""
    from cla_jax.lm_eval import ClaJaxLM
    lm = ClaJaxLM(workdir=str(run[0]), batch_size=BATCH, cache_dir=str(run[0] / "cache"),
                  max_length=40, loss_chunk_size=12)
    pairs = [("a" * 60 + " far away", " spoke"), ("the king", " and queen"), ("", "ROMEO:")]
    got = lm.loglikelihood(instances("loglikelihood", pairs))
    for (logprob, greedy), (want_logprob, want_greedy) in zip(
            got, reference_loglikelihood(run, pairs, max_length=40)):
        assert logprob == pytest.approx(want_logprob, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy


def test_multiple_choice_accuracy_equals_argmax_of_numpy_logprobs(run, evaluated):
    docs = read_jsonl("shakespeare_mc.jsonl")
    samples = sorted(evaluated["samples"]["shakespeare_mc"], key=lambda s: s["doc_id"])
    correct = []
    for doc, sample in zip(docs, samples):
        want = reference_loglikelihood(run, [(doc["question"], " " + c) for c in doc["choices"]])
        got = [resp[0] for resp in sample["resps"]]
        for (logprob, greedy), (want_logprob, want_greedy) in zip(got, want):
            assert float(logprob) == pytest.approx(want_logprob, rel=1e-5, abs=1e-4)
            assert greedy == want_greedy
        correct.append(int(np.argmax([w[0] for w in want])) == doc["answer"])
    assert len(samples) == len(docs) == 8
    assert evaluated["results"]["shakespeare_mc"]["acc,none"] == pytest.approx(np.mean(correct))


def test_loglikelihood_rolling_equals_the_documents_protocol(lm):
    docs = [d["text"] for d in read_jsonl("shakespeare_rolling.jsonl")[:3]]
    docs.append("short")  # one window, shorter than max_length
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(d,) for d in docs]))
    eval_step = make_eval_step(lm.run.model, TOKENIZER.token_bytes(), lm.mesh)
    for text, logprob in zip(docs, got):
        want = evaluate_documents(eval_step, lm.params, [TOKENIZER.encode(text)], SEQ_LEN,
                                  BATCH, BOS, mesh=lm.mesh, progress=False)
        assert logprob == pytest.approx(-want["nll"], rel=1e-5)
    assert len(TOKENIZER.encode(docs[1])) > 10 * SEQ_LEN  # many windows


def test_rolling_task_metrics_equal_the_documents_protocol(lm, evaluated):
    texts = [d["text"] for d in read_jsonl("shakespeare_rolling.jsonl")]
    eval_step = make_eval_step(lm.run.model, TOKENIZER.token_bytes(), lm.mesh)
    want = evaluate_documents(eval_step, lm.params, [TOKENIZER.encode(t) for t in texts],
                              SEQ_LEN, BATCH, BOS, mesh=lm.mesh, progress=False,
                              words=sum(count_words(t) for t in texts))
    results = evaluated["results"]["shakespeare_rolling"]
    assert len(evaluated["samples"]["shakespeare_rolling"]) == len(texts) == 8
    assert results["word_perplexity,none"] == pytest.approx(want["word_perplexity"], rel=1e-5)
    assert results["byte_perplexity,none"] == pytest.approx(want["byte_perplexity"], rel=1e-5)
    assert results["bits_per_byte,none"] == pytest.approx(want["bits_per_byte"], rel=1e-5)
    assert want["bytes"] == sum(len(t.encode()) for t in texts)


GEN_TOKENS = 8  # shakespeare_gen.yaml's max_gen_toks


@pytest.fixture(scope="module")
def greedy(run):
    """decoding.generate's greedy continuation (16 tokens) of [bos] + each context, cut from
    the left to leave room for max_gen_toks = GEN_TOKENS in max_length as lm_eval's HFLM does:
    {context: token ids}. The first n of them are what n new tokens would give."""
    questions = [doc["question"] for doc in read_jsonl("shakespeare_mc.jsonl")]
    contexts = ["the king", "the land"] + questions
    prompts = [([BOS] + TOKENIZER.encode(c))[-(SEQ_LEN - GEN_TOKENS):] for c in contexts]
    rows = generate(run[1], run[2], prompts, 16, Sampling(temperature=0),
                    eos_id=TOKENIZER.stop_ids, cache_dtype="float32")[0]
    return dict(zip(contexts, np.asarray(rows).tolist()))


def greedy_text(greedy, context, max_new_tokens):
    """The text of the first max_new_tokens greedy tokens, up to a stop id."""
    row = greedy[context][:max_new_tokens]
    ends = [i for i, t in enumerate(row) if t in TOKENIZER.stop_ids]
    return TOKENIZER.decode(row[:ends[0]] if ends else row)


def test_generate_until_stops_at_a_stop_string_a_stop_id_and_max_gen_toks(lm, greedy):
    context, ends_early = "the king", "the land"
    free, short = greedy_text(greedy, context, 16), greedy_text(greedy, ends_early, 16)
    assert len(free) == 16, repr(free)  # runs all 16 tokens; `short` ends at eos (id 2)
    assert len(short) == 3, repr(short)
    stop = next(free[i:i + 2] for i in range(4, 14) if free[i:i + 2].isascii()
                and free[i:i + 2].isprintable())
    got = lm.generate_until(instances("generate_until", [
        (context, {"until": [], "max_gen_toks": 16}),
        (context, {"until": ["\x00never", stop], "max_gen_toks": 16}),
        (context, {"until": "\x00never", "max_gen_toks": 5}),
        (context, {"until": [stop], "max_gen_toks": 16, "do_sample": False,
                   "temperature": 0.0}),
        (ends_early, {"until": [], "max_gen_toks": 16}),
        (context, {"until": [], "max_gen_toks": 16, "do_sample": True, "temperature": 1.0})]))
    assert got[0] == free and got[4] == short
    assert got[1] == free[:free.index(stop)] == got[3] and len(got[1]) < len(free)
    assert got[2] == free[:5]
    assert got[5] != free  # sampled


def test_generation_task_outputs_equal_decoding_generate(greedy, evaluated):
    docs = read_jsonl("shakespeare_mc.jsonl")
    samples = sorted(evaluated["samples"]["shakespeare_gen"], key=lambda s: s["doc_id"])
    for doc, sample in zip(docs, samples):
        want = greedy_text(greedy, doc["question"], GEN_TOKENS)
        for stop in ["\n", ",", ".", ":", ";"]:  # shakespeare_gen.yaml's until
            want = want.split(stop)[0]
        assert sample["resps"] == [[want]]
    assert len(samples) == len(docs)


# `python -m cla_jax.lm_eval ARGS`, with lm_eval's task index limited to
# --include_path (the CLI always indexes its built-in tasks too: 20 s).
RUN_AS_MAIN = ("import functools, runpy; from lm_eval.tasks import manager; "
               "manager.TaskManager.__init__ = functools.partialmethod("
               "manager.TaskManager.__init__, include_defaults=False); "
               "runpy.run_module('cla_jax.lm_eval', run_name='__main__')")


def test_the_cli_wrapper_registers_the_model_and_runs_lm_eval(run, evaluated, tmp_path):
    """`python -m cla_jax.lm_eval` is lm_eval's CLI with "cla_jax" registered; its
    model_args batch_size wins over the CLI's default of 1; a fresh process on the run's mesh
    gets what simple_evaluate got."""
    out = subprocess.run(
        [sys.executable, "-c", RUN_AS_MAIN, "--model", "cla_jax", "--model_args",
         f"workdir={run[0]},batch_size={BATCH}", "--include_path", str(FIXTURES),
         "--tasks", "shakespeare_mc", "--limit", "2", "--output_path", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "shakespeare_mc" in out.stdout and "acc" in out.stdout
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    assert results["config"]["model"] == "cla_jax"
    assert results["config"]["cla_jax_batch_size"] == BATCH
    assert results["config"]["cla_jax_mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    first_two = sorted(evaluated["samples"]["shakespeare_mc"], key=lambda s: s["doc_id"])[:2]
    assert results["results"]["shakespeare_mc"]["acc,none"] == np.mean(
        [s["acc"] for s in first_two])


def test_the_former_module_name_still_registers_and_runs_the_adapter():
    """`cla_jax.lm_eval_adapter` (the module the package grew from) is the same adapter:
    importing it registers "cla_jax"; its `main` is lm_eval's CLI."""
    import lm_eval.api.registry as registry

    import cla_jax.lm_eval
    import cla_jax.lm_eval_adapter as former
    assert former.ClaJaxLM is cla_jax.lm_eval.ClaJaxLM and former.main is cla_jax.lm_eval.main
    assert registry.get_model("cla_jax") is cla_jax.lm_eval.ClaJaxLM

"""What an int8 KV cache costs and buys on the trained demo model (CLA2 stacked with int8 KV).

Answers, for the demo run (workdir/demo, configs/default.py: MQA-CLA2, head_dim 64):
(a) Teacher-forced validation perplexity over the WHOLE validation split *through the cache
    path*: every eval window (one document's tokens, positions 0..n-1) is prefilled into a
    fresh cache, so each layer group writes its K/V into the cache (quantised when int8) and
    attention reads them back from it; the logits come through the cache. A query then sees
    exactly what decoding one token at a time would (its own and every earlier token's K/V,
    written once, read back). float32, bfloat16 and int8 caches; the float32 cache must equal
    the no-cache eval (eval.py's figure), which is printed as a check. Goal: int8 within 1%.
(b) Greedy decoding from validation prompts: float32-cache greedy tokens, then the same
    sequence teacher-forced one token per step through an int8 cache (the decode path), and
    the fraction of steps whose int8 argmax equals the float32 token (one divergence cannot
    cascade); also free-running int8 greedy decoding and its first divergence per prompt.
(c) Cached tokens per GiB from the cache arrays' shapes (scales counted) for CLA1-16 bit
    (the demo's no-CLA twin), CLA2-16 bit, CLA2-int8 (and the 1B H128-MQA-CLA2 paper model).

    PYTHONPATH=. python benchmarks/int8_cache.py --workdir=workdir/demo     # ~3 min, 2 CPUs
    PYTHONPATH=. python benchmarks/int8_cache.py --random_init --quick       # smoke run
"""
from __future__ import annotations

import argparse
import functools
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from benchmarks.common import model_from_config_file, provenance, publish, report  # noqa: E402
from cla_jax import checkpoint  # noqa: E402
from cla_jax.cache import init_cache  # noqa: E402
from cla_jax.capacity import cache_bytes, without_cla  # noqa: E402
from cla_jax.config import ModelConfig  # noqa: E402
from cla_jax.data import eval_batches, num_eval_batches  # noqa: E402
from cla_jax.decoding import Sampling, generate  # noqa: E402
from cla_jax.model import Transformer, init_params  # noqa: E402
from cla_jax.model.loss import token_nll  # noqa: E402
from cla_jax.storage import as_path  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE_DTYPES = ("float32", "bfloat16", "int8")
GIB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(ROOT / "workdir/demo"), help="a training run")
    p.add_argument("--cache_dir", default="~/.cache/cla-jax", help="as train.py's --cache_dir")
    p.add_argument("--rows", type=int, default=16, help="eval windows per cache-path batch")
    p.add_argument("--prompts", type=int, default=8, help="validation prompts for (b)")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--random_init", action="store_true",
                   help="smoke run: a tiny random model on a random token stream")
    p.add_argument("--quick", action="store_true", help="a few windows only (smoke runs)")
    p.add_argument("--out", default="", help="results JSON path (default: benchmarks/results/"
                                             "int8_cache_<date>_<device>.json)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ (a) perplexity
def document_rows(batch: dict) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each document piece of a packed eval batch as its own row (inputs, targets, weights),
    so positions start at 0 in every row and slot j of the cache holds position j."""
    rows = []
    for b in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][b]
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(batch["positions"][b, where], np.arange(len(where)))
            rows.append((batch["inputs"][b, where], batch["targets"][b, where],
                         batch["weights"][b, where]))
    return rows


def cache_path_nll_fn(model: ModelConfig, seq_len: int, cache_dtype: str):
    """(params, inputs, targets, weights [R, L], lengths [R]) -> (sum of NLL, tokens): the
    rows prefilled into a fresh cache of `cache_dtype`, logits read through it."""
    @jax.jit
    def fn(params, inputs_RL, targets_RL, weights_RL, lengths_R):
        rows = inputs_RL.shape[0]
        positions = jnp.broadcast_to(jnp.arange(seq_len), inputs_RL.shape)
        segment_ids = (positions < lengths_R[:, None]).astype(jnp.int32)  # 0 = padding
        cache = init_cache(model, rows, seq_len, jnp.dtype(cache_dtype))
        logits, _ = Transformer(model).apply({"params": params}, inputs_RL, positions,
                                             segment_ids, cache)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, targets_RL[..., None], -1)[..., 0]
        return jnp.sum(nll * weights_RL), jnp.sum(weights_RL)
    return fn


def no_cache_nll_fn(model: ModelConfig):
    @jax.jit
    def fn(params, batch):
        return jnp.sum(token_nll(model, params, batch) * batch["weights"]), jnp.sum(
            batch["weights"])
    return fn


def perplexities(model, params, stream, seq_len, batch_size, rows_per_call, quick) -> dict:
    batches = list(eval_batches(stream, seq_len, batch_size))
    if quick:
        batches = batches[:2]
    assert quick or len(batches) == num_eval_batches(stream, seq_len, batch_size)
    no_cache = no_cache_nll_fn(model)
    sums = np.zeros(2)
    rows = []
    for b in batches:
        sums += np.asarray(no_cache(params, b), np.float64)
        rows += document_rows(b)
    out = {"no_cache": dict(tokens=int(sums[1]), mean_nll=sums[0] / sums[1],
                            perplexity=math.exp(sums[0] / sums[1]))}
    calls = [rows[i:i + rows_per_call] for i in range(0, len(rows), rows_per_call)]
    arrays = []
    for call in calls:  # fixed shapes: one compile; short calls padded with weight-0 rows
        inputs, targets, weights = (np.zeros((rows_per_call, seq_len), dt)
                                    for dt in (np.int32, np.int32, np.float32))
        lengths = np.ones((rows_per_call,), np.int32)
        for r, (i, t, w) in enumerate(call):
            inputs[r, :len(i)], targets[r, :len(i)], weights[r, :len(i)] = i, t, w
            lengths[r] = len(i)
        arrays.append((inputs, targets, weights, lengths))
    for dtype in CACHE_DTYPES:
        fn = cache_path_nll_fn(model, seq_len, dtype)
        sums = np.zeros(2)
        for a in arrays:
            sums += np.asarray(fn(params, *a), np.float64)
        out[dtype] = dict(tokens=int(sums[1]), mean_nll=sums[0] / sums[1],
                          perplexity=math.exp(sums[0] / sums[1]))
    out["document_rows"] = len(rows)
    out["windows"] = int(sum(int((b["weights"].sum(1) > 0).sum()) for b in batches))
    base = out["float32"]["perplexity"]
    for dtype in ("bfloat16", "int8"):
        out[dtype]["relative_to_float32"] = out[dtype]["perplexity"] / base - 1
    out["float32_cache_vs_no_cache"] = base / out["no_cache"]["perplexity"] - 1
    return out


# ------------------------------------------------------------------ (b) greedy agreement
@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens, positions, cache):
    return Transformer(model).apply({"params": params}, tokens, positions, None, cache)


def teacher_forced_argmax(model, params, prompts_BP, continuation_BN, cache_dtype):
    """Argmax after the prompt and after each given token, decoded one token per step
    through a cache of `cache_dtype`: [B, N]."""
    batch, p = prompts_BP.shape
    n = continuation_BN.shape[1]
    cache = init_cache(model, batch, p + n, jnp.dtype(cache_dtype))
    positions = np.tile(np.arange(p + n), (batch, 1)).astype(np.int32)
    logits, cache = _forward(model, params, prompts_BP, positions[:, :p], cache)
    chosen = [np.asarray(logits[:, -1])]
    for t in range(n - 1):
        logits, cache = _forward(model, params, continuation_BN[:, t:t + 1],
                                 positions[:, p + t:p + t + 1], cache)
        chosen.append(np.asarray(logits[:, 0]))
    logits_BNV = np.stack(chosen, axis=1)
    return logits_BNV.argmax(-1), logits_BNV


def greedy_agreement(model, params, stream, args) -> dict:
    starts = np.linspace(0, len(stream) - args.prompt_len - 1, args.prompts).astype(int)
    prompts = np.stack([np.asarray(stream[s:s + args.prompt_len], np.int32) for s in starts])
    greedy = Sampling(temperature=0)
    fp32, _ = generate(model, params, prompts.tolist(), args.new_tokens, greedy,
                       cache_dtype="float32")
    free_int8, _ = generate(model, params, prompts.tolist(), args.new_tokens, greedy,
                            cache_dtype="int8")
    fp32, free_int8 = np.asarray(fp32), np.asarray(free_int8)
    # The teacher-forced float32 run must reproduce generate's own tokens (a check).
    check, logits32 = teacher_forced_argmax(model, params, prompts, fp32, "float32")
    forced, _ = teacher_forced_argmax(model, params, prompts, fp32, "int8")
    match = forced == fp32
    top2 = np.sort(logits32, axis=-1)[..., -2:]
    margins = (top2[..., 1] - top2[..., 0])[~match]
    diverged = [int(np.flatnonzero(a != b)[0]) if np.any(a != b) else None
                for a, b in zip(free_int8, fp32)]
    return dict(
        prompts=len(prompts), steps_per_prompt=args.new_tokens,
        teacher_forced_match_rate=float(match.mean()),
        teacher_forced_mismatches=int((~match).sum()),
        float32_top2_margin_at_mismatches=[round(float(m), 4) for m in margins],
        float32_median_top2_margin=float(np.median(top2[..., 1] - top2[..., 0])),
        float32_teacher_forced_reproduces_generate=bool(np.array_equal(check, fp32)),
        free_running_first_divergence=diverged,
        free_running_match_rate=float((free_int8 == fp32).mean()))


# ------------------------------------------------------------------ (c) capacity
def tokens_per_gib(model: ModelConfig, paper: ModelConfig | None) -> dict:
    cases = {"cla1_16bit": (without_cla(model), "bfloat16"), "cla2_16bit": (model, "bfloat16"),
             "cla1_int8": (without_cla(model), "int8"), "cla2_int8": (model, "int8")}
    out = {}
    for name, (cfg, dtype) in cases.items():
        per_token = cache_bytes(cfg, 1, 16, dtype) // 16  # measured from eval_shape shapes
        out[name] = dict(bytes_per_token=per_token, tokens_per_gib=GIB // per_token)
    base = out["cla1_16bit"]["tokens_per_gib"]
    for c in out.values():
        c["vs_cla1_16bit"] = c["tokens_per_gib"] / base
    if paper is not None:
        per = {d: cache_bytes(cfg, 1, 16, d) // 16
               for cfg, d in ((without_cla(paper), "bfloat16"), (paper, "int8"))}
        out["paper_1b_h128_mqa_cla2"] = dict(
            cla1_16bit_bytes_per_token=per["bfloat16"], cla2_int8_bytes_per_token=per["int8"],
            vs_cla1_16bit=per["bfloat16"] / per["int8"])
    return out


def random_setup():
    model = ModelConfig(vocab_size=97, d_model=32, num_layers=4, num_heads=4, num_kv_heads=1,
                        head_dim=16, mlp_dim=64, max_seq_len=64, kv_sharing=2, init_std=0.1)
    params = nn.meta.unbox(init_params(model, jax.random.key(0)))
    stream = np.random.RandomState(0).randint(3, model.vocab_size, 2000).astype(np.int32)
    return "random init", model, params, stream, 32, 4


def main(argv=None):
    args = parse_args(argv)
    if args.random_init:
        step, model, params, stream, seq_len, batch = random_setup()
        args.prompt_len, args.new_tokens, args.prompts = 8, 16, 2
        paper = None
    else:
        from cla_jax.data.corpus import prepare_corpus
        run = checkpoint.restore_model(as_path(args.workdir) / "checkpoints", None, None)
        step, model, params = run.step, run.model, run.params
        corpus = prepare_corpus(run.config.data, str(pathlib.Path(args.cache_dir).expanduser()),
                                max_vocab_size=model.vocab_size)
        stream, seq_len = corpus.validation, run.config.train.seq_len
        batch = run.config.train.batch_size
        paper = model_from_config_file(str(ROOT / "configs/paper/1b_h128_mqa_cla2.py"))
    ppl = perplexities(model, params, stream, seq_len, batch, args.rows, args.quick)
    agreement = greedy_agreement(model, params, stream, args)
    capacity = tokens_per_gib(model, paper)
    settings = dict(workdir=None if args.random_init else args.workdir, step=step,
                    seq_len=seq_len, eval_batch=batch, rows_per_call=args.rows,
                    quick=args.quick, prompts=args.prompts, prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens, model=model.to_dict(),
                    int8="K/V int8, one bfloat16 absmax scale per token and KV head over "
                         "head_dim, rounded up; dequantised to float32 at the attention inputs")
    result = report(
        "int8_cache", "teacher-forced validation perplexity through the KV cache (float32, "
        "bfloat16, int8), greedy-token agreement int8 vs float32, cached tokens per GiB",
        settings, perplexity=ppl, greedy=agreement, capacity=capacity)
    i8 = ppl["int8"]
    table = "\n".join([
        f"int8 KV cache, demo model step {step} ({ppl['int8']['tokens']:,} validation tokens, "
        f"{ppl['windows']} windows)",
        f"  perplexity, no cache {ppl['no_cache']['perplexity']:.3f}; through the cache: "
        f"float32 {ppl['float32']['perplexity']:.3f}, bfloat16 "
        f"{ppl['bfloat16']['perplexity']:.3f} ({ppl['bfloat16']['relative_to_float32']:+.3%}),"
        f" int8 {i8['perplexity']:.3f} ({i8['relative_to_float32']:+.3%})",
        f"  greedy, teacher-forced: {agreement['teacher_forced_match_rate']:.2%} of "
        f"{agreement['prompts'] * agreement['steps_per_prompt']} steps match float32; "
        f"free-running first divergence {agreement['free_running_first_divergence']}",
        "  tokens/GiB: " + ", ".join(f"{k} {v['tokens_per_gib']:,} ({v['vs_cla1_16bit']:.3f}x)"
                                     for k, v in capacity.items() if "tokens_per_gib" in v),
        provenance(result)])
    publish(result, table, args.out or None)
    return result


if __name__ == "__main__":
    main()

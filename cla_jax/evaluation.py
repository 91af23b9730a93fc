"""Perplexity over a whole split or a list of documents, by one of three protocols.

    windows    disjoint windows of seq_len targets (as training reads the stream); a window
               starting inside a document sees none of its earlier tokens
    strided    the Hugging Face perplexity guide's sliding window: windows every `stride`
               tokens, each scoring only the targets the previous one did not, so every target
               has at least seq_len - stride tokens of context (stride = seq_len is `windows`)
    documents  each document scored from its start, rolling windows inside long documents,
               as lm-evaluation-harness's loglikelihood_rolling (see packing.document_spans)

windows and strided run over the split's stream, bos targets (document ends) included, and
attention never crosses a bos; documents scores each document's tokens only. In every protocol
each scored target counts once, no batch is dropped and padding weighs 0. Sums stay on device
(`accumulate`): exact integer counts and double-float NLL, read once at the end.

Reported: token perplexity (exp of mean NLL per scored token), word and byte perplexity and
bits/byte as lm-eval's wikitext task reports them (NLL per word, words = len(re.split(r"\\s+",
text)) of each decoded document; bytes = the UTF-8 bytes of the scored tokens, from the
tokenizer's token_bytes).
"""
from __future__ import annotations

import collections
import math
import re
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from cla_jax import checkpoint, sharding
from cla_jax.config import ModelConfig, kv_bytes_per_token, num_params
from cla_jax.data import eval_batches, num_eval_batches, sources
from cla_jax.data.corpus import DATA_DEFAULTS, prepare_corpus
from cla_jax.data.packing import document_spans, pack_spans, span_rows, strided_spans
from cla_jax.errors import UserError
from cla_jax.model import abstract_params
from cla_jax.model.loss import token_nll

PROTOCOLS = ("windows", "strided", "documents")
# Batches dispatched ahead of the device: enough to keep it busy, few enough that a host which
# packs faster than the device scores does not queue a whole split's inputs in device memory.
MAX_IN_FLIGHT = 8


def safe_exp(x: float) -> float:
    """exp(x), inf where it overflows (a diverged loss): perplexity is reported, not raised."""
    return math.exp(x) if x < math.log(np.finfo(np.float64).max) else math.inf


# --- The evaluation step -------------------------------------------------------------------

def two_sum(a, b):
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth's TwoSum, any magnitudes)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def compensated_sum(x_BL) -> jax.Array:
    """The sum of a float32 [B, L] as float32 [2] (high, low): a pairwise tree of TwoSums, along
    L first (within a device's rows) then over B, carrying each rounding error. high + low is
    the sum to about float64 precision; a plain float32 sum of B*L values loses up to
    log2(B*L) bits."""
    hi, lo = x_BL, jnp.zeros_like(x_BL)
    for axis in (1, 0):
        while hi.shape[axis] > 1:
            if hi.shape[axis] % 2:
                pad = [(0, 1) if a == axis else (0, 0) for a in range(hi.ndim)]
                hi, lo = jnp.pad(hi, pad), jnp.pad(lo, pad)
            hi_even, hi_odd = (jax.lax.slice_in_dim(hi, i, None, 2, axis) for i in (0, 1))
            lo_even, lo_odd = (jax.lax.slice_in_dim(lo, i, None, 2, axis) for i in (0, 1))
            hi, err = two_sum(hi_even, hi_odd)
            lo = lo_even + lo_odd + err
    return jnp.stack([hi.reshape(()), lo.reshape(())])


def make_eval_step(config: ModelConfig, token_bytes, mesh: Mesh | None = None):
    """(params, batch) -> this batch's sums: "nll" float32 [2] (high + low, see
    `compensated_sum`), "tokens" and "bytes" int32 (target tokens and their UTF-8 bytes).

    Weights are 0 (padding, context) or 1 (a scored target); padding is weighed out by
    `where`, so even a non-finite logit there cannot leak in. Sum batches with
    `accumulate`, which keeps them exact on device.
    """
    mesh = mesh or sharding.single_device_mesh()
    token_bytes = np.asarray(token_bytes, np.int32)  # numpy: a constant in every process

    def eval_step(params, batch):
        with sharding.activate(mesh):
            nll = token_nll(config, params, batch)
        scored = batch["weights"] > 0
        target_bytes = jnp.asarray(token_bytes)[batch["targets"]]
        return {"nll": compensated_sum(jnp.where(scored, nll, 0.0)),
                "tokens": jnp.sum(scored, dtype=jnp.int32),
                "bytes": jnp.sum(jnp.where(scored, target_bytes, 0), dtype=jnp.int32)}

    params_sharding = sharding.param_shardings(abstract_params(config), mesh)
    return jax.jit(eval_step, in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


# --- Exact running sums on device ----------------------------------------------------------
# Totals hold, for each leaf of the eval step's sums, two arrays of the leaf's shape: for an
# integer leaf the low and high uint32 limbs of a 64-bit count (x64 is off and int32 wraps at
# 2^31), for a float leaf the high and low float32 parts of a double-float sum (float32 alone
# stops counting whole tokens' NLL past 2^24).

def _add(total, x):
    a, b = total
    if jnp.issubdtype(x.dtype, jnp.integer):  # x >= 0 and < 2^32
        low = a + x.astype(jnp.uint32)
        return low, b + (low < a).astype(jnp.uint32)
    s, err = two_sum(a, x.astype(jnp.float32))
    return two_sum(s, b + err)


@jax.jit
def accumulate(totals, sums):
    """totals + sums (both on device, no host sync); totals None starts from zero."""
    if totals is None:
        totals = {k: (jnp.zeros_like(v, jnp.uint32), jnp.zeros_like(v, jnp.uint32))
                  if jnp.issubdtype(v.dtype, jnp.integer) else
                  (jnp.zeros_like(v, jnp.float32), jnp.zeros_like(v, jnp.float32))
                  for k, v in sums.items()}
    return {k: _add(totals[k], v) for k, v in sums.items()}


def read_totals(totals) -> dict[str, int | float]:
    """One device-to-host copy: each leaf summed over its elements, as a Python int (exact) or
    float (float64)."""
    out = {}
    for key, (a, b) in jax.device_get(totals).items():
        if np.issubdtype(a.dtype, np.integer):
            out[key] = sum((int(hi) << 32) + int(lo) for lo, hi in zip(a.ravel(), b.ravel()))
        else:
            out[key] = math.fsum(np.concatenate([a.ravel(), b.ravel()]).astype(np.float64))
    return out


# --- Metrics --------------------------------------------------------------------------------

def count_words(text: str) -> int:
    """Words of one document as lm-eval's wikitext task counts them (an empty text is 1)."""
    return len(re.split(r"\s+", text))


def metrics(nll: float, tokens: int, num_bytes: int, words: int | None = None) -> dict:
    """Token and byte perplexity, bits/byte, and with `words` word perplexity, of a total NLL
    in nats (all numbers: the train loop logs every value)."""
    out = {"nll": nll, "tokens": tokens, "bytes": num_bytes,
           "mean_nll": nll / max(tokens, 1), "perplexity": safe_exp(nll / max(tokens, 1)),
           "byte_perplexity": safe_exp(nll / max(num_bytes, 1)),
           "bits_per_byte": nll / math.log(2) / max(num_bytes, 1)}
    if words is not None:
        out.update(words=words, word_perplexity=safe_exp(nll / max(words, 1)))
    return out


def evaluate(eval_step: Callable, params, batches: Iterable[dict], num_batches: int | None = None,
             progress: bool = True, words: int | None = None, desc: str = "eval") -> dict:
    """Streams `batches` through `eval_step` (see `make_eval_step`), sums on device
    and reads the totals once: `metrics` of the scored targets. No batch: all zero."""
    totals, in_flight = None, collections.deque()
    for batch in tqdm(batches, total=num_batches, desc=desc, unit="batch",
                      disable=not progress, leave=False):
        totals = accumulate(totals, eval_step(params, batch))
        in_flight.append(totals)
        if len(in_flight) > MAX_IN_FLIGHT:
            jax.block_until_ready(in_flight.popleft())  # waits, copies nothing back
    sums = read_totals(totals) if totals is not None else {"nll": 0.0, "tokens": 0, "bytes": 0}
    return metrics(sums["nll"], sums["tokens"], sums["bytes"], words)


# --- Span protocols (strided, documents) ----------------------------------------------------

def span_batches(stream: Sequence[int], spans: np.ndarray, seq_len: int, batch_size: int,
                 bos_id: int, process_index: int = 0,
                 process_count: int = 1) -> tuple[Iterator[dict], int]:
    """(this process's rows of each global batch of packed spans, number of batches)."""
    rows = span_rows(spans, seq_len)
    num_batches = -(-(int(rows[-1]) + 1) // batch_size) if len(rows) else 0
    share = batch_size // process_count

    def batches():
        for index in range(num_batches):
            first = index * batch_size + process_index * share
            lo, hi = np.searchsorted(rows, [first, first + share])
            yield pack_spans(stream, spans[lo:hi], rows[lo:hi] - first, share, seq_len, bos_id)

    return batches(), num_batches


def evaluate_spans(eval_step: Callable, params, stream: Sequence[int], spans: np.ndarray,
                   seq_len: int, batch_size: int, bos_id: int, mesh=None, progress: bool = True,
                   words: int | None = None, desc: str = "eval") -> dict:
    """`evaluate` over the spans (see cla_jax.data.packing) of a stream."""
    share = sharding.data_share(mesh) if mesh is not None else (0, 1)
    batches, num_batches = span_batches(stream, spans, seq_len, batch_size, bos_id, *share)
    if mesh is not None:
        batches = (sharding.global_batch(b, mesh) for b in batches)
    return evaluate(eval_step, params, batches, num_batches, progress, words, desc)


def evaluate_documents(eval_step: Callable, params, documents: Sequence[Sequence[int]],
                       seq_len: int, batch_size: int, bos_id: int, mesh=None,
                       progress: bool = True, *, words: int | None = None) -> dict:
    """Total NLL of documents, each scored from its start as lm-eval's loglikelihood_rolling.

    eval_step: make_eval_step(model, token_bytes, mesh).
    documents: token ids of each document, without bos (the prefix every document is scored
        after) or eos; every token is scored once, the bos never. An empty document adds 0.
    seq_len: inputs per rolling window (lm-eval's max_length). Windows of several documents
        share a row of the [batch_size, seq_len] batches, each its own segment.
    batch_size: global rows per batch (a multiple of the mesh's batch shards).
    bos_id: the tokenizer's bos (tokenizer.bos_id).
    mesh: the eval step's mesh, for multi-device or multi-process runs (None: one device).
    words: the documents' word count (sum of `count_words` of their texts): adds "words"
        and "word_perplexity" to the results.

    Returns `metrics`: "nll" (total nats: -sum of loglikelihood_rolling), "tokens", "bytes"
    (UTF-8 bytes of the tokens, by token_bytes), "perplexity" (per token), "mean_nll",
    "byte_perplexity", "bits_per_byte", "documents", and with `words` "words" and
    "word_perplexity".
    """
    lengths = np.array([len(d) for d in documents], np.int64)
    bos_indices = np.cumsum(lengths + 1) - lengths - 1
    stream = np.full(int(np.sum(lengths + 1)), bos_id, np.int32)
    for start, document in zip(bos_indices.tolist(), documents):
        stream[start + 1:start + 1 + len(document)] = document
    spans = document_spans(bos_indices, lengths, seq_len)
    results = evaluate_spans(eval_step, params, stream, spans, seq_len, batch_size, bos_id,
                             mesh, progress, words)
    return {**results, "documents": len(documents)}


def document_bounds(tokens: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(index of each document's bos, its number of tokens) in a split's stream."""
    if len(tokens) == 0 or tokens[0] != bos_id:
        raise UserError(f"the token stream does not start with bos (id {bos_id})")
    bos_indices = np.flatnonzero(tokens == bos_id)
    return bos_indices, np.diff(np.append(bos_indices, len(tokens))) - 1


def split_words(tokenizer, tokens: np.ndarray, bos_indices: np.ndarray,
                lengths: np.ndarray) -> int:
    """Words of a split's documents, each decoded on its own (`count_words`)."""
    return sum(count_words(tokenizer.decode(tokens[b + 1:b + 1 + n].tolist()))
               for b, n in zip(bos_indices.tolist(), lengths.tolist()))


def check_protocol(protocol: str, stride: int | None, seq_len: int | None = None) -> None:
    """Refuses a protocol and stride that do not go together (before any work); seq_len: the
    shortest length evaluated."""
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol={protocol} is not one of {', '.join(PROTOCOLS)}")
    if protocol != "strided" and stride is not None:
        raise UserError(f"--stride is for --protocol=strided only, not --protocol={protocol}")
    if protocol == "strided" and stride is None:
        raise UserError("--protocol=strided needs --stride=N: tokens between window starts, "
                        "1 to the run's train.seq_len")
    if stride is not None and (stride <= 0 or (seq_len is not None and stride > seq_len)):
        raise UserError(f"--stride={stride} must be in 1..{seq_len or 'train.seq_len'} (at "
                        "most the window length, the shortest of --seq_lens)")


# --- What to evaluate: the source, its split, the lengths ------------------------------------

WHOLE = "all"  # --split: every document of the source


def parse_seq_lens(text: str) -> list[int]:
    """--seq_lens "512,1024,2048" (or --seq_len 512) -> [512, 1024, 2048], repeats dropped."""
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--seq_lens={text} is not a comma-separated list of token counts; "
                        "give e.g. --seq_lens=512,1024,2048") from None
    if min(lengths) <= 0:
        raise UserError(f"--seq_lens={text}: every length must be a positive number of tokens; "
                        "give e.g. --seq_lens=512,1024,2048")
    return list(dict.fromkeys(lengths))


def check_seq_lens(seq_lens: Sequence[int], max_seq_len: int) -> None:
    """Refuses a length past the model's max_seq_len: positions past it were never trained
    (and past an imported model's max_position_embeddings, its RoPE was never meant to go)."""
    longer = [n for n in seq_lens if n > max_seq_len]
    if longer:
        raise UserError(f"--seq_lens: {', '.join(map(str, longer))} is past the model's "
                        f"max_seq_len ({max_seq_len}, the longest context its RoPE positions "
                        f"cover); give lengths up to {max_seq_len}")


def check_source(source: str) -> None:
    """Refuses a --source that is no kind of source, or a files: glob matching no file (before
    any work; a tfds: name is looked up when it is planned)."""
    if source == "shakespeare" or (source.startswith("tfds:") and len(source) > len("tfds:")):
        return
    if source.startswith("files:"):
        if not sources.list_files(source.removeprefix("files:")):
            raise UserError(f"--source={source} matches no file; give a glob of .txt, "
                            ".jsonl[.gz|.zst] or .parquet files, e.g. "
                            "--source='files:corpus/*.jsonl'")
        return
    raise UserError(f"--source={source} is not a source: give files:<glob> (text, "
                    "jsonl[.gz|.zst] or parquet files, local or gs://), tfds:<name> or "
                    "shakespeare")


def eval_data(run_data, source: str | None = None, text_field: str | None = None,
              split: str | None = None) -> tuple[dict, str, str, bool]:
    """What eval reads, from the run's config.data and the --source/--text_field/--split flags:
    (config.data to prepare, the split as named, the store's split to read, whole).

    No flags: the run's own data, its validation split (as eval.py always did). A files: or
    shakespeare source has the splits "all" (every document, a single file included: the
    default for a source other than the run's), "validation" and "train" (held out as training
    would hold them out). A tfds: source's split is a TFDS split name (default validation;
    "all" is every split), read whole; "validation" and "train" of the run's own TFDS source are
    the run's splits, as training made them.
    whole: the store holds every document of the split asked for, in its validation split.
    """
    data = {**DATA_DEFAULTS, **dict(run_data)}  # a run saved before a field existed
    own = data["source"]
    source = source or own
    if source != own:
        check_source(source)
        data.update(source=source, validation_source="", name="")  # the run's corpus's labels
    if text_field:
        data["text_field"] = text_field
    tfds = source.startswith("tfds:")
    if split is None:
        split = sources.VALIDATION if source == own or tfds else WHOLE
    runs_splits = (sources.TRAIN, sources.VALIDATION)
    if tfds:
        if ":" in split:
            raise UserError(f"--split={split}: a TFDS split with ':' cannot be read; give a "
                            "split name, e.g. --split=test")
        if source == own and split in runs_splits:
            return data, split, split, False
        data["validation_split"] = split
        return data, split, sources.VALIDATION, True
    if split not in (WHOLE, *runs_splits):
        raise UserError(f"--split={split}: {source} has the splits all (every document), "
                        "validation and train; TFDS split names go with --source=tfds:<name>")
    return data, split, (sources.VALIDATION if split == WHOLE else split), split == WHOLE


def evaluate_checkpoint(workdir, cache_dir, step: int | None = None, split: str | None = None,
                        batch_size: int | None = None, mesh_spec=None,
                        protocol: str = "windows", stride: int | None = None, *,
                        source: str | None = None, text_field: str | None = None,
                        seq_len: int | None = None) -> dict:
    """eval.py's work at one length (default: train.seq_len); see `evaluate_lengths`."""
    (results,) = evaluate_lengths(workdir, cache_dir, step, split, batch_size, mesh_spec,
                                  protocol, stride, source=source, text_field=text_field,
                                  seq_lens=None if seq_len is None else [seq_len])
    return results


def evaluate_lengths(workdir, cache_dir, step: int | None = None, split: str | None = None,
                     batch_size: int | None = None, mesh_spec=None, protocol: str = "windows",
                     stride: int | None = None, *, source: str | None = None,
                     text_field: str | None = None,
                     seq_lens: Sequence[int] | None = None) -> list[dict]:
    """eval.py's work: a run's checkpoint (default: latest) over a whole split by `protocol`,
    once per length of `seq_lens` (default: [train.seq_len]), with the model's size, KV
    bytes/token and the split's unigram perplexity (None for a source read whole: it has no
    train split). mesh_spec None = the run's config.mesh.

    source, text_field, split: what to read (see `eval_data`; default: the run's own data and
    its validation split). The tokenizer is always the run's; the token store of (source,
    tokenizer) is built once under the run's data_dir and reused by every later call. Every
    setting is checked against the checkpoint's config before its params are read.
    """
    check_protocol(protocol, stride)
    step, meta = checkpoint.read_meta(workdir, step)  # the config only: no arrays read yet
    config = ml_collections.ConfigDict(meta["config"])
    max_seq_len = ModelConfig.from_dict(config.model).max_seq_len
    seq_lens = list(seq_lens or [config.train.seq_len])
    check_seq_lens(seq_lens, max_seq_len)
    check_protocol(protocol, stride, min(seq_lens))
    data, split, read_split, whole = eval_data(config.data, source, text_field, split)
    run = checkpoint.restore_model(workdir, step, mesh_spec)
    model, mesh = run.model, run.mesh
    batch = batch_size or config.train.batch_size
    sharding.check_batch(batch, mesh, "the eval batch size (--batch_size)")
    corpus = prepare_corpus(data, cache_dir, max_vocab_size=model.vocab_size,
                            tokenizer_data=config.data, whole=whole)
    tokenizer = corpus.tokenizer
    eval_step = make_eval_step(model, tokenizer.token_bytes(), mesh)
    stream = corpus.validation if read_split == sources.VALIDATION else corpus.train
    tokens = np.asarray(stream)  # the whole split: its documents, to count their words
    bos_indices, lengths = document_bounds(tokens, tokenizer.bos_id)
    words = split_words(tokenizer, tokens, bos_indices, lengths)
    unigram = None if whole else corpus.unigram_perplexity(read_split)
    every = []
    for seq_len in seq_lens:
        desc = f"eval seq_len {seq_len}"
        if protocol == "windows":
            batches = eval_batches(tokens, seq_len, batch, *sharding.data_share(mesh),
                                   bos_id=tokenizer.bos_id)
            results = evaluate(eval_step, run.params,
                               (sharding.global_batch(b, mesh) for b in batches),
                               num_eval_batches(tokens, seq_len, batch), words=words, desc=desc)
        else:
            spans = (strided_spans(len(tokens), seq_len, stride) if protocol == "strided" else
                     document_spans(bos_indices, lengths, seq_len))
            results = evaluate_spans(eval_step, run.params, tokens, spans, seq_len, batch,
                                     tokenizer.bos_id, mesh, words=words, desc=desc)
        results.update(protocol=protocol, seq_len=seq_len,
                       stride=seq_len if protocol == "windows" else stride,
                       documents=len(bos_indices), step=step, split=split,
                       source=data["source"], text_field=data["text_field"],
                       mesh=dict(mesh.shape), params=num_params(model),
                       kv_bytes_per_token=kv_bytes_per_token(model), unigram_perplexity=unigram)
        every.append(results)
    return every

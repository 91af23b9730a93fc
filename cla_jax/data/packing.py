"""Cutting a flat token stream into fixed-length training windows (pure numpy).

The stream is every document as `[bos] + tokens`, concatenated. Window k reads
inputs = stream[k*L : k*L + L] and targets = stream[k*L + 1 : k*L + L + 1], so windows never
overlap and every token after stream[0] is a target of exactly one window.

Documents are packed, not padded: a window can hold the end of one document and the start of
the next. `segment_ids` and `positions` tell the model where each document starts so attention
and RoPE can restart there:
  - a segment starts at column 0 and at every bos token;
  - segment_ids count segments from 1 within the window (0 marks padding);
  - positions count from 0 at each segment start.
Padding (only at the end of the stream, or whole rows for window index -1) has pad inputs and
targets, segment id 0, position 0 and weight 0.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


def num_full_windows(stream_length: int, seq_len: int) -> int:
    """Windows whose inputs and targets all exist (the training windows)."""
    return max(0, (stream_length - 1) // seq_len)


def num_windows_covering(stream_length: int, seq_len: int) -> int:
    """Windows needed so that every token after the first is a target (the last padded)."""
    return max(0, -(-(stream_length - 1) // seq_len))


def pack_windows(
    stream: Sequence[int], window_indices: np.ndarray, seq_len: int, bos_id: int, pad_id: int = 0
) -> Batch:
    """Builds a batch [len(window_indices), seq_len] from window numbers (-1 = a padding row).

    `stream` is anything that slices to an integer array: a numpy array, or a store's
    TokenStream, which reads all the batch's windows (seq_len + 1 tokens each) in one call.
    """
    windows = np.asarray(window_indices, np.int64)
    tokens_BL1 = np.full((len(windows), seq_len + 1), pad_id, np.int32)
    lengths_B1 = np.zeros((len(windows), 1), np.int64)
    rows = np.flatnonzero(windows >= 0)
    ranges = [(int(w) * seq_len, (int(w) + 1) * seq_len + 1) for w in windows[rows]]
    read_many = getattr(stream, "read_many", None)
    chunks = read_many(ranges) if read_many else [stream[a:b] for a, b in ranges]
    for row, chunk in zip(rows, chunks):
        tokens_BL1[row, :len(chunk)] = chunk
        lengths_B1[row] = len(chunk)
    columns_L = np.arange(seq_len)
    valid_BL = columns_L + 1 < lengths_B1
    inputs_BL = np.where(valid_BL, tokens_BL1[:, :-1], pad_id)
    targets_BL = np.where(valid_BL, tokens_BL1[:, 1:], pad_id)

    starts_BL = valid_BL & ((inputs_BL == bos_id) | (columns_L == 0))
    segment_ids_BL = np.cumsum(starts_BL, axis=1, dtype=np.int32) * valid_BL
    last_start_BL = np.maximum.accumulate(np.where(starts_BL, columns_L, 0), axis=1)
    positions_BL = np.where(valid_BL, columns_L - last_start_BL, 0)
    return {
        "inputs": inputs_BL,
        "targets": targets_BL,
        "positions": positions_BL.astype(np.int32),
        "segment_ids": segment_ids_BL.astype(np.int32),
        "weights": valid_BL.astype(np.float32),
    }


# --- Eval spans: windows that score only part of their targets --------------------------------
# A span (start, stop, first_scored) of a stream reads inputs stream[start:stop] and targets
# stream[start + 1:stop + 1]; the targets of inputs [first_scored, stop) are scored (weight 1),
# the earlier ones are context only (weight 0). Each span restarts attention and positions at
# its first column, and at every bos inside it, as a window does. The eval protocols differ
# only in their spans (see cla_jax.evaluation).


def strided_spans(stream_length: int, seq_len: int, stride: int) -> np.ndarray:
    """int64 [W, 3]: the Hugging Face perplexity guide's sliding window over the whole stream.

    Span k starts at k * stride and reads up to seq_len inputs; it scores the targets past the
    previous span's end, so every target is scored once, with at least seq_len - stride tokens
    of context after the first span. stride == seq_len gives the disjoint windows of
    `pack_windows`.
    """
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride {stride} must be in (0, {seq_len}]")
    last_input = stream_length - 1  # the last input with a target
    if last_input < 1:
        return np.zeros((0, 3), np.int64)
    count = 1 + max(0, -(-(last_input - seq_len) // stride))
    starts = np.arange(count, dtype=np.int64) * stride
    stops = np.minimum(starts + seq_len, last_input)
    first_scored = np.maximum(starts, np.concatenate([[0], stops[:-1]]))
    return np.stack([starts, stops, first_scored], axis=1)


def document_spans(bos_indices: np.ndarray, doc_lengths: np.ndarray,
                   seq_len: int) -> np.ndarray:
    """int64 [W, 3]: lm-evaluation-harness's rolling loglikelihood windows of each document.

    Document i is stream[b:b + 1 + n] = [bos] + tokens (b = bos_indices[i], n = doc_lengths[i]);
    its n tokens are scored, the bos never (it is the prefix token). As lm_eval's
    get_rolling_token_windows(prefix_token=bos, context_len=1) + make_disjoint_window: the
    first span reads [bos] + tokens[:seq_len - 1]; each later one scores the next (up to)
    seq_len tokens from a fresh context of exactly seq_len inputs ending at its last target's
    predecessor (the previous token for a full window, more for a document's last, short one).
    An empty document has no span.
    """
    bos_indices, doc_lengths = np.asarray(bos_indices, np.int64), np.asarray(doc_lengths, np.int64)
    per_doc = -(-doc_lengths // seq_len)
    doc = np.repeat(np.arange(len(doc_lengths)), per_doc)
    window = np.arange(len(doc)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    predicted = window * seq_len  # tokens of the document scored before this span
    scored = np.minimum(doc_lengths[doc] - predicted, seq_len)
    first_scored = bos_indices[doc] + predicted  # the input that predicts token `predicted`
    stops = first_scored + scored
    starts = np.where(window == 0, first_scored, stops - seq_len)
    return np.stack([starts, stops, first_scored], axis=1)


def span_rows(spans: np.ndarray, seq_len: int) -> np.ndarray:
    """int64 [W]: the row of each span when spans are packed in order, next fit, into rows of
    seq_len columns (a span of seq_len inputs fills a row; short ones share)."""
    rows, row, used = np.zeros(len(spans), np.int64), -1, seq_len
    for i, length in enumerate((spans[:, 1] - spans[:, 0]).tolist()):
        if used + length > seq_len:
            row, used = row + 1, 0
        rows[i], used = row, used + length
    return rows


def pack_spans(stream: Sequence[int], spans: np.ndarray, rows: np.ndarray, num_rows: int,
               seq_len: int, bos_id: int, pad_id: int = 0) -> Batch:
    """A batch [num_rows, seq_len] of spans, span i in row rows[i] (rows in [0, num_rows), each
    row's spans side by side from column 0, in order). Columns no span fills are padding, as in
    `pack_windows`."""
    inputs_BL = np.full((num_rows, seq_len), pad_id, np.int32)
    targets_BL = np.full((num_rows, seq_len), pad_id, np.int32)
    valid_BL = np.zeros((num_rows, seq_len), bool)
    weights_BL = np.zeros((num_rows, seq_len), np.float32)
    starts_BL = np.zeros((num_rows, seq_len), bool)
    ranges = [(int(a), int(b) + 1) for a, b, _ in spans]
    read_many = getattr(stream, "read_many", None)
    chunks = read_many(ranges) if read_many else [stream[a:b] for a, b in ranges]
    column = np.zeros(num_rows, np.int64)
    for (start, stop, first_scored), row, chunk in zip(spans.tolist(), rows.tolist(), chunks):
        at, length = int(column[row]), stop - start
        if at + length > seq_len or len(chunk) != length + 1:
            raise ValueError(f"span {(start, stop)} does not fit row {row} or the stream")
        inputs_BL[row, at:at + length], targets_BL[row, at:at + length] = chunk[:-1], chunk[1:]
        valid_BL[row, at:at + length] = True
        weights_BL[row, at + first_scored - start:at + length] = 1.0
        starts_BL[row, at] = True
        column[row] = at + length
    starts_BL |= valid_BL & (inputs_BL == bos_id)
    columns_L = np.arange(seq_len)
    segment_ids_BL = np.cumsum(starts_BL, axis=1, dtype=np.int32) * valid_BL
    last_start_BL = np.maximum.accumulate(np.where(starts_BL, columns_L, 0), axis=1)
    return {
        "inputs": inputs_BL,
        "targets": targets_BL,
        "positions": np.where(valid_BL, columns_L - last_start_BL, 0).astype(np.int32),
        "segment_ids": segment_ids_BL.astype(np.int32),
        "weights": weights_BL,
    }

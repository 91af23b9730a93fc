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

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
    stream: np.ndarray, window_indices: np.ndarray, seq_len: int, bos_id: int, pad_id: int = 0
) -> Batch:
    """Builds a batch [len(window_indices), seq_len] from window numbers (-1 = a padding row)."""
    windows_B1 = np.asarray(window_indices, np.int64)[:, None]
    columns_L = np.arange(seq_len)
    offsets_BL = windows_B1 * seq_len + columns_L
    valid_BL = (windows_B1 >= 0) & (offsets_BL + 1 < len(stream))
    safe_offsets_BL = np.where(valid_BL, offsets_BL, 0)
    inputs_BL = np.where(valid_BL, stream[safe_offsets_BL], pad_id).astype(np.int32)
    targets_BL = np.where(valid_BL, stream[safe_offsets_BL + 1], pad_id).astype(np.int32)

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

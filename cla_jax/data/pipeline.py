"""From a split's token stream (a store's TokenStream, or any array) to train/eval batches.

Training batches come from a grain pipeline whose whole state is one integer (the number of
global batches consumed), so `get_state()`/`set_state()` and orbax
(`grain.checkpoint.CheckpointSave/CheckpointRestore`) resume on the exact next batch:

    window ids 0..W-1 --shuffle(seed), reshuffled every epoch--> repeat forever
      --> global batch k = the next G window ids --> rows [p*G/P, (p+1)*G/P) for process p
      --> pack_windows (inputs, targets, positions, segment_ids, weights)

Global batch k is the same whatever the number of processes; each process packs only its rows.
`process_index`/`process_count` are really the row share (index, count) that
`cla_jax.sharding.data_share(mesh)` gives a process: processes whose devices hold the same rows
(a tensor axis across hosts) pass the same index.
Batches run across epoch boundaries, so no window is dropped (only the stream's last
< seq_len tokens, which fill no whole window, are never trained on; eval pads and keeps them).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import grain
import numpy as np

from cla_jax.data.packing import Batch, num_full_windows, num_windows_covering, pack_windows
from cla_jax.data.tokenizer import BOS_ID, PAD_ID
from cla_jax.errors import UserError


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if batch_size < 1 or batch_size % process_count:
        raise UserError(
            f"global batch size {batch_size} must be a positive multiple of "
            f"process_count {process_count}"
        )
    return batch_size // process_count


class _PackProcessRows:
    """Packs this process's share (rows [start, stop)) of a global batch of window ids."""

    def __init__(self, stream: Sequence[int], seq_len: int, rows: slice, bos_id: int, pad_id: int):
        self._stream, self._seq_len, self._rows = stream, seq_len, rows
        self._bos_id, self._pad_id = bos_id, pad_id

    def __call__(self, global_window_ids: np.ndarray) -> Batch:
        return pack_windows(
            self._stream, global_window_ids[self._rows], self._seq_len, self._bos_id, self._pad_id
        )


def train_batches(
    stream: Sequence[int],
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    *,
    bos_id: int = BOS_ID,
    pad_id: int = PAD_ID,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's [G/P, seq_len] training batches."""
    rows_per_process = _check_sharding(global_batch_size, process_index, process_count)
    num_windows = num_full_windows(len(stream), seq_len)
    if num_windows < 1:
        raise UserError(
            f"token stream of {len(stream)} tokens is shorter than one window of {seq_len} + 1"
        )
    rows = slice(process_index * rows_per_process, (process_index + 1) * rows_per_process)
    dataset = (
        grain.MapDataset.range(num_windows)
        .shuffle(seed=seed)
        .repeat()  # Reseeds the shuffle each epoch.
        .batch(global_batch_size)
        .map(_PackProcessRows(stream, seq_len, rows, bos_id, pad_id))
    )
    # Batches are built by vectorised numpy from memory: one thread and a short queue keep the
    # next batches ready without holding hundreds of them (grain's default buffer is 500).
    read_options = read_options or grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
    return iter(dataset.to_iter_dataset(read_options))


def num_eval_batches(stream: Sequence[int] | int, seq_len: int, batch_size: int) -> int:
    """Global eval batches needed to cover the whole stream (`stream` or its length)."""
    length = stream if isinstance(stream, int) else len(stream)
    return -(-num_windows_covering(length, seq_len) // batch_size)


def eval_batches(
    stream: Sequence[int],
    seq_len: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    *,
    bos_id: int = BOS_ID,
    pad_id: int = PAD_ID,
) -> Iterator[Batch]:
    """Every window of the stream in order, as this process's rows of global batches.

    `batch_size` is global. The last window is padded and the last batch filled with rows of
    weight 0, so every token after stream[0] is a weight-1 target exactly once and every process
    yields the same number of batches (`num_eval_batches`).
    """
    rows_per_process = _check_sharding(batch_size, process_index, process_count)
    if len(stream) < 2:
        raise UserError(f"token stream of {len(stream)} tokens has nothing to evaluate")
    num_windows = num_windows_covering(len(stream), seq_len)
    first_row = process_index * rows_per_process

    def batches() -> Iterator[Batch]:  # Inner generator: the checks above run at call time.
        for batch_index in range(num_eval_batches(stream, seq_len, batch_size)):
            window_ids = batch_index * batch_size + first_row + np.arange(rows_per_process)
            window_ids[window_ids >= num_windows] = -1
            yield pack_windows(stream, window_ids, seq_len, bos_id, pad_id)

    return batches()

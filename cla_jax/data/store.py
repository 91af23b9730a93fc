"""The token store: a corpus tokenized once into immutable shards, then read by random access.

One store is one directory, named by everything its bytes depend on:

    <data_dir>/stores/<name>-<key>/      key = hash(FORMAT_VERSION, plan fingerprint, tokenizer)
        shards/00012.train.tokens        [bos] + document, concatenated; uint16 (uint32 when
        shards/00012.validation.tokens   the vocabulary needs it), raw little-endian
        shards/00012.counts.npy          int64 [2, vocab]: token counts per split
        shards/00012.json                the shard's commit record: tokens, documents, crc32,
                                         records skipped for having no text (null)
        store.json                       written once every shard is committed

Atomic per shard: data files are written under temporary names and renamed, and the commit
record, written last, is what makes a shard exist. An interrupted build leaves no record for the
shard it was writing, and the next build redoes only that shard. Build work is split by shard
index (shard i belongs to process i % P), so P processes (hosts) with W workers each write
exactly the files one process writes alone, bit for bit: the content of a shard depends on its
inputs and the tokenizer only.

Memory is bounded by the read block and the write buffer (a few MB per worker), never by the
corpus. A split reads as one `TokenStream`: the concatenation of its shards, in shard order.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import sys
import types
import uuid
import zlib
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging
from etils import epath
from tqdm.auto import tqdm

from cla_jax.data.sources import TRAIN, VALIDATION, Plan, Shard, hash_split, read_shard
from cla_jax.data.tokenizer import Tokenizer, text_chunks
from cla_jax.errors import UserError
from cla_jax.storage import is_remote

# 2: null texts are skipped and counted (1 made them empty documents, or failed).
FORMAT_VERSION = 2
SPLITS = (TRAIN, VALIDATION)
WRITE_TOKENS = 1 << 20        # tokens buffered before a write
REPORT_BYTES = 4 << 20        # progress granularity of a worker


class StoreError(UserError):
    """A token store is damaged or does not match its description; the message says how."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype the store keeps token ids of a vocabulary in: uint16 or uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def store_key(plan: Plan, tokenizer: Tokenizer) -> str:
    """The store's name: a hash of the store format, the documents (the plan's fingerprint)
    and the tokenizer, so any change to them makes a new store."""
    identity = [FORMAT_VERSION, plan.fingerprint, tokenizer.identity]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def _shard_path(directory: epath.Path, index: int, suffix: str) -> epath.Path:
    return directory / "shards" / f"{index:05d}.{suffix}"


def _write_atomically(path: epath.Path, data: bytes) -> None:
    temporary = path.parent / f"{path.name}.tmp-{uuid.uuid4().hex}"
    temporary.write_bytes(data)
    temporary.replace(path)


class _TokenFile:
    """Streams one split of one shard to disk: buffered, checksummed, counted."""

    def __init__(self, path: epath.Path, dtype: np.dtype, vocab_size: int):
        self.path, self._dtype = path, dtype
        self._temporary = path.parent / f"{path.name}.tmp-{uuid.uuid4().hex}"
        self._file = self._temporary.open("wb")
        self._buffer, self._buffered = [], 0
        self.tokens = self.documents = self.crc32 = 0
        self.counts = np.zeros(vocab_size, np.int64)

    def add(self, ids: np.ndarray) -> None:
        self._buffer.append(ids)
        self._buffered += len(ids)
        if self._buffered >= WRITE_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        data = np.concatenate(self._buffer).astype(self._dtype.newbyteorder("<"))
        raw = data.tobytes()
        self._file.write(raw)
        self.crc32 = zlib.crc32(raw, self.crc32)
        self.counts += np.bincount(data, minlength=len(self.counts))[:len(self.counts)]
        self.tokens += len(data)
        self._buffer, self._buffered = [], 0

    def commit(self) -> dict:
        self._flush()
        self._file.close()
        self._temporary.replace(self.path)
        return {"file": self.path.name, "tokens": self.tokens, "documents": self.documents,
                "crc32": self.crc32}

    def discard(self) -> None:
        self._file.close()
        self._temporary.unlink(missing_ok=True)


def _encode(tokenizer: Tokenizer, text: str, dtype: np.dtype) -> np.ndarray:
    chunks = text_chunks(text)
    if not chunks:
        return np.zeros(0, dtype)
    return np.concatenate([np.asarray(ids, dtype) for ids in tokenizer.encode_batch(chunks)])


def build_shard(directory: str, index: int, shard: Shard, plan: Plan, tokenizer: Tokenizer,
                key: str, read_kwargs: dict, report: Callable[[int], None] | None = None) -> dict:
    """Tokenizes one shard into its files and commits it; returns its commit record."""
    directory = epath.Path(directory)
    (directory / "shards").mkdir(parents=True, exist_ok=True)
    dtype, vocab = token_dtype(tokenizer.vocab_size), tokenizer.vocab_size
    files = {s: _TokenFile(_shard_path(directory, index, f"{s}.tokens"), dtype, vocab)
             for s in SPLITS}
    bos = np.array([tokenizer.bos_id], dtype)
    out, reported, skipped = None, 0, 0
    try:
        for piece in read_shard(shard, plan.text_field, **read_kwargs):
            if piece.text is None:
                skipped += 1
                continue
            if piece.first:
                out = files[shard.split or hash_split(piece.identity, plan.validation_fraction)]
                out.documents += 1
                out.add(bos)
            out.add(_encode(tokenizer, piece.text, dtype))
            if report and piece.consumed - reported >= REPORT_BYTES:
                report(piece.consumed - reported)
                reported = piece.consumed
    except BaseException:  # an error or Ctrl-C: leave no temporary files behind
        for f in files.values():
            f.discard()
        raise
    if report:
        report(shard.nbytes - reported)
    splits = {s: f.commit() for s, f in files.items()}
    buffer = _npy_bytes(np.stack([files[s].counts for s in SPLITS]))
    _write_atomically(_shard_path(directory, index, "counts.npy"), buffer)
    record = {"format": FORMAT_VERSION, "key": key, "index": index, "inputs": list(shard.inputs),
              "dtype": dtype.name, "splits": splits, "skipped": skipped}
    _write_atomically(_shard_path(directory, index, "json"), json.dumps(record).encode())
    return record


def _load_npy(path: epath.Path) -> np.ndarray:
    return np.load(io.BytesIO(path.read_bytes()))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _committed(directory: epath.Path, index: int, key: str) -> dict | None:
    """The shard's commit record if the shard is whole (record readable, sizes right)."""
    try:
        record = json.loads(_shard_path(directory, index, "json").read_text())
        if record.get("key") != key or record.get("format") != FORMAT_VERSION:
            return None
        itemsize = np.dtype(record["dtype"]).itemsize
        for split in record["splits"].values():
            size = (directory / "shards" / split["file"]).stat().length
            if size != split["tokens"] * itemsize:
                logging.warning("token store shard %s is %d bytes, its record says %d: "
                                "rebuilding it", split["file"], size, split["tokens"] * itemsize)
                return None
        return record
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Building: in parallel over worker processes, and across hosts by shard index

_progress_queue = None


def _init_worker(queue) -> None:
    global _progress_queue
    _progress_queue = queue


def _build_shard_in_worker(*args) -> dict:
    return build_shard(*args, report=_progress_queue.put)


@contextlib.contextmanager
def _main_module_hidden():
    """Spawned workers import the parent's __main__ unless it looks like an interactive one: a
    script without an `if __name__ == "__main__"` guard would start over in every worker, and
    train.py would load jax there. The workers need only this module."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _build_shards(directory: epath.Path, indices: Sequence[int], plan: Plan,
                  tokenizer: Tokenizer, key: str, workers: int, read_kwargs: dict,
                  progress: bool) -> None:
    if not indices:
        return
    unit = "rec" if plan.source.startswith("tfds:") else "B"
    bar = tqdm(total=sum(plan.shards[i].nbytes for i in indices), unit=unit, unit_scale=True,
               desc=f"tokenizing {len(indices)} shards", disable=not progress, smoothing=0.1)
    jobs = [(str(directory), i, plan.shards[i], plan, tokenizer, key, read_kwargs)
            for i in indices]
    try:
        if workers <= 1 or len(indices) == 1:
            for job in jobs:
                build_shard(*job, report=bar.update)
            return
        context = multiprocessing.get_context("spawn")  # no fork of a process running jax
        queue = context.Queue()
        with concurrent.futures.ProcessPoolExecutor(
                min(workers, len(jobs)), mp_context=context, initializer=_init_worker,
                initargs=(queue,)) as pool:
            with _main_module_hidden():  # every worker starts during these submits
                pending = {pool.submit(_build_shard_in_worker, *job) for job in jobs}
            try:
                while pending:
                    done, pending = concurrent.futures.wait(pending, timeout=0.5)
                    for future in done:
                        future.result()  # a worker's error stops the build with its message
                    while not queue.empty():
                        bar.update(queue.get())
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)  # start no further shard
                raise
    finally:
        bar.close()


def build_store(directory: str | epath.Path, plan: Plan, tokenizer: Tokenizer, *,
                workers: int = 0, process_index: int = 0, process_count: int = 1,
                barrier: Callable[[], None] = lambda: None, read_kwargs: dict | None = None,
                progress: bool = True) -> TokenStore:
    """Builds (or finishes, or repairs) the store of `plan` x `tokenizer` in `directory`.

    Process p builds shards p, p + P, ...; then, after `barrier()` (which every process calls
    exactly once), any shard it still cannot see (hosts without shared storage) and store.json.
    workers: processes per host (0 = one per CPU core).
    """
    directory, read_kwargs = epath.Path(directory), read_kwargs or {}
    key = store_key(plan, tokenizer)
    workers = workers or os.cpu_count() or 1
    if not is_complete(directory, key):
        mine = [i for i in range(len(plan.shards)) if i % process_count == process_index]
        todo = _missing(directory, mine, key)
        if todo:
            logging.info("token store %s: %d of %d shards to build", directory, len(todo),
                         len(plan.shards))
        _build_shards(directory, todo, plan, tokenizer, key, workers, read_kwargs, progress)
    barrier()
    if not is_complete(directory, key):
        todo = _missing(directory, range(len(plan.shards)), key)
        _build_shards(directory, todo, plan, tokenizer, key, workers, read_kwargs, progress)
        _finish(directory, plan, tokenizer, key)
    return TokenStore(directory)


def _missing(directory: epath.Path, indices, key: str) -> list[int]:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # stat calls: slow on gs://
        records = list(pool.map(lambda i: _committed(directory, i, key), indices))
    return [i for i, record in zip(indices, records) if record is None]


def _file_sizes(directory: epath.Path) -> dict[str, int]:
    """{name: bytes} of the files in directory/shards: one listing, also on gs://."""
    import fsspec  # noqa: PLC0415 (epath's own backend for gs://)
    fs, path = fsspec.core.url_to_fs(str(directory / "shards"))
    try:
        return {entry["name"].rsplit("/", 1)[-1]: int(entry["size"])
                for entry in fs.ls(path, detail=True)}
    except FileNotFoundError:
        return {}


def is_complete(directory: epath.Path, key: str) -> bool:
    """store.json is there, for this key, every shard has its commit record and every file it
    lists has its recorded size.

    A shard whose file is missing or has another size loses its commit record (and the store
    its store.json), so the next build redoes exactly that shard; so does a shard whose record
    was deleted (`TokenStore.discard`).
    """
    try:
        meta = json.loads((directory / "store.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if meta.get("key") != key:
        return False
    sizes, itemsize = _file_sizes(directory), np.dtype(meta["dtype"]).itemsize
    damaged = [index for index, shard in enumerate(meta["shards"])
               if _shard_path(directory, index, "json").name not in sizes
               or any(sizes.get(split["file"]) != split["tokens"] * itemsize
                      for split in shard.values())]
    for index in damaged:
        logging.warning("token store %s: shard %d is damaged (a file is missing or has the "
                        "wrong size); rebuilding it", directory, index)
        _shard_path(directory, index, "json").unlink(missing_ok=True)
    if damaged:
        (directory / "store.json").unlink(missing_ok=True)
    return not damaged


def _finish(directory: epath.Path, plan: Plan, tokenizer: Tokenizer, key: str) -> None:
    records = [_committed(directory, i, key) for i in range(len(plan.shards))]
    counts = sum(_load_npy(_shard_path(directory, i, "counts.npy"))
                 for i in range(len(plan.shards)))
    _write_atomically(directory / "counts.npy", _npy_bytes(counts))
    meta = {"format": FORMAT_VERSION, "key": key, "source": plan.source,
            "plan": plan.fingerprint, "tokenizer": tokenizer.identity,
            "vocab_size": tokenizer.vocab_size, "dtype": records[0]["dtype"],
            "num_shards": len(records),
            "splits": {s: {"tokens": sum(r["splits"][s]["tokens"] for r in records),
                           "documents": sum(r["splits"][s]["documents"] for r in records)}
                       for s in SPLITS},
            "skipped": sum(r["skipped"] for r in records),
            "shards": [r["splits"] for r in records]}
    _write_atomically(directory / "store.json", json.dumps(meta).encode())
    if meta["skipped"]:
        logging.warning("token store %s: skipped %d records whose text is null", directory,
                        meta["skipped"])


# ---------------------------------------------------------------------------------------------
# Reading


class TokenStream:
    """A split's tokens as one int32 sequence: `len()`, `stream[a:b]`, `stream[i]`, and
    `read_many(ranges)` for a whole batch of windows at once.

    Local shards are memory-mapped. Remote ones (gs://) are read by byte range, a batch's
    ranges in one concurrent request (fsspec `cat_ranges`): no read-ahead cache fetches
    megabytes around each window. Picklable (for grain worker processes).
    """

    def __init__(self, files: Sequence[epath.PathLike], lengths: Sequence[int],
                 dtype: np.dtype):
        self._files, self._dtype = [str(f) for f in files], np.dtype(dtype).newbyteorder("<")
        self._starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self):
        return {"files": self._files, "starts": self._starts, "dtype": self._dtype}

    def __setstate__(self, state):
        self.__init__(state["files"], np.diff(state["starts"]), state["dtype"])

    def __array__(self, dtype=None, copy=None):
        tokens = self[0:len(self)]
        return tokens if dtype is None else tokens.astype(dtype)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("a token stream slices with step 1 only")
            return self.read_many([(start, stop)])[0]
        index = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(key)
        return self.read_many([(index, index + 1)])[0]

    def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """int32 tokens [start, stop) of each range (clipped to the stream)."""
        outs, pieces = [], []  # piece: (out index, out offset, shard, shard offset, count)
        for start, stop in ranges:
            start, stop = max(0, start), min(len(self), stop)
            outs.append(np.empty(max(0, stop - start), np.int32))
            shard = int(np.searchsorted(self._starts, start, side="right")) - 1
            at = start
            while at < stop:
                take = min(stop, int(self._starts[shard + 1])) - at
                if take > 0:
                    pieces.append((len(outs) - 1, at - start, shard,
                                   at - int(self._starts[shard]), take))
                    at += take
                shard += 1
        if is_remote(self._files[0]):
            self._read_remote(outs, pieces)
        else:
            for out, at, shard, offset, count in pieces:
                outs[out][at:at + count] = self._map(shard)[offset:offset + count]
        return outs

    def _read_remote(self, outs, pieces) -> None:
        if not pieces:
            return
        import fsspec  # noqa: PLC0415
        fs, _ = fsspec.core.url_to_fs(self._files[0])
        size = self._dtype.itemsize
        blobs = fs.cat_ranges([self._files[p[2]] for p in pieces],
                              [p[3] * size for p in pieces], [(p[3] + p[4]) * size for p in pieces])
        for (out, at, shard, _, count), blob in zip(pieces, blobs):
            if len(blob) != count * size:
                raise self._damaged(shard, f"a read of {count * size} bytes returned {len(blob)}")
            outs[out][at:at + count] = np.frombuffer(blob, self._dtype)

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            length = int(self._starts[shard + 1] - self._starts[shard])
            size = epath.Path(self._files[shard]).stat().length
            if size != length * self._dtype.itemsize:
                raise self._damaged(shard, f"it is {size} bytes, not "
                                           f"{length * self._dtype.itemsize}")
            self._maps[shard] = (np.memmap(self._files[shard], self._dtype, mode="r")
                                 if length else np.zeros(0, self._dtype))
        return self._maps[shard]

    def _damaged(self, shard: int, what: str) -> StoreError:
        return StoreError(f"token store file {self._files[shard]} is damaged ({what}); run "
                          "training again: its shard is rebuilt at start")


@dataclasses.dataclass
class TokenStore:
    """A finished store: its splits as token streams, counts, and a checksum audit."""
    directory: epath.Path

    def __post_init__(self):
        self.directory = epath.Path(self.directory)
        try:
            self.meta = json.loads((self.directory / "store.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError) as error:
            raise StoreError(f"{self.directory} is not a finished token store ({error}); "
                             "build it with cla_jax.data.corpus.prepare_corpus") from None
        if self.meta.get("format") != FORMAT_VERSION:
            raise StoreError(f"{self.directory} has token store format "
                             f"{self.meta.get('format')}, this code reads {FORMAT_VERSION}")

    def split(self, name: str) -> TokenStream:
        shards = [shard[name] for shard in self.meta["shards"]]
        return TokenStream([self.directory / "shards" / shard["file"] for shard in shards],
                           [shard["tokens"] for shard in shards], np.dtype(self.meta["dtype"]))

    def counts(self, name: str) -> np.ndarray:
        """int64 [vocab]: how often each token occurs in split `name`."""
        counts = _load_npy(self.directory / "counts.npy")
        return counts[SPLITS.index(name)]

    def discard(self, files: Sequence[str]) -> None:
        """Forgets the shards of these files (their commit records and store.json): the next
        build (prepare_corpus) tokenizes exactly those shards again."""
        for index, shard in enumerate(self.meta["shards"]):
            if any(split["file"] in files for split in shard.values()):
                _shard_path(self.directory, index, "json").unlink(missing_ok=True)
        (self.directory / "store.json").unlink(missing_ok=True)

    def verify(self) -> list[str]:
        """Reads every shard file and compares its crc32 with its commit record; returns the
        names of damaged files (empty when the store is intact)."""
        damaged = []
        for shard in self.meta["shards"]:
            for split in shard.values():
                crc, path = 0, self.directory / "shards" / split["file"]
                with path.open("rb") as f:
                    while block := f.read(16 << 20):
                        crc = zlib.crc32(block, crc)
                if crc != split["crc32"]:
                    damaged.append(split["file"])
        return damaged

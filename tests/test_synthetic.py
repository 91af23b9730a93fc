"""The synthetic corpus: every format reads back to the requested size, seeded, three shapes."""
import gzip
import json
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import zstandard

from benchmarks import synthetic_corpus as synthetic

# Quotes, a backslash, a tab and non-ASCII text exercise the JSON escaping.
LINES = [
    "ROMEO:",
    "But, soft! what light through yonder window breaks?",
    'He said "enough" and left \\ the stage.',
    "Fair\tMargaret, sweet café, naïve déjà vu — ’tis so.",
    "[Exit, pursued by a bear]",
] + [" ".join(np.random.default_rng(i).choice(["the", "king", "of", "lords", "and"], 8))
     for i in range(20)]


def read_documents(path: str, text_field: str = "text") -> list[str]:
    if path.endswith(".txt"):
        return [pathlib.Path(path).read_text(encoding="utf-8")]
    if path.endswith(".parquet"):
        return pq.read_table(path).column(text_field).to_pylist()
    if path.endswith(".gz"):
        data = gzip.decompress(pathlib.Path(path).read_bytes())
    elif path.endswith(".zst"):
        data = zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read()
    else:
        data = pathlib.Path(path).read_bytes()
    records = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    assert all(isinstance(record["id"], str) for record in records)
    assert len({record["id"] for record in records}) == len(records)
    return [record[text_field] for record in records]


def corpus_documents(paths: list[str], text_field: str = "text") -> list[str]:
    return [doc for path in paths for doc in read_documents(path, text_field)]


@pytest.mark.parametrize("fmt", synthetic.FORMATS)
def test_every_format_reads_back_to_the_requested_size(tmp_path, fmt):
    paths = synthetic.write_corpus(tmp_path / "out", 300_000, fmt, num_files=3, seed=1,
                                   text_field="content", lines=LINES)
    assert paths == sorted(paths) and len(paths) == 3
    assert all(path.endswith("." + fmt) and pathlib.Path(path).parent == tmp_path / "out"
               for path in paths)
    documents = corpus_documents(paths, "content")
    text_bytes = sum(len(doc.encode()) for doc in documents)
    assert abs(text_bytes - 300_000) <= 3_000
    assert all(documents)
    if fmt == "txt":
        assert len(documents) == 3
    else:
        assert len(documents) > 2 * len(paths)  # several documents per file
    if fmt == "parquet":
        assert pq.read_table(paths[0]).column_names == ["content"]


@pytest.mark.parametrize("fmt", ["txt", "jsonl.gz", "jsonl.zst", "parquet"])
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, fmt):
    def corpus(name, seed):
        paths = synthetic.write_corpus(tmp_path / name, 60_000, fmt, 2, seed=seed, lines=LINES)
        return [pathlib.Path(path).read_bytes() for path in paths]

    assert corpus("a", seed=3) == corpus("b", seed=3)
    assert corpus("c", seed=4) != corpus("a", seed=3)


def test_documents_take_all_three_shapes(tmp_path):
    # Huge lines are 1 document in 250: seed 0 happens to give 2 of them in 4 MB.
    paths = synthetic.write_corpus(tmp_path, 4_000_000, "jsonl", 2, seed=0, lines=LINES)
    documents = corpus_documents(paths)
    huge = synthetic.HUGE_LINE_BYTES[0]
    paragraphs = [doc for doc in documents if "\n\n" in doc]
    lines = [doc for doc in documents if "\n\n" not in doc and doc.count("\n") >= 20]
    huge_lines = [doc for doc in documents if "\n" not in doc and len(doc.encode()) >= huge]
    assert len(paragraphs) > len(lines) > len(huge_lines) >= 1
    assert max(len(doc.encode()) for doc in documents) >= huge
    assert np.median([len(doc.encode()) for doc in documents]) > 1_000
    assert any("\t" in doc and "café" in doc and '"' in doc and "\\" in doc for doc in documents)


def test_txt_files_take_each_shape_and_can_be_large(tmp_path):
    paths = synthetic.write_corpus(tmp_path, 1_200_000, "txt", 6, seed=0, lines=LINES)
    documents = corpus_documents(paths)
    single_line = [doc for doc in documents if "\n" not in doc]
    with_blank_lines = [doc for doc in documents if "\n\n" in doc]
    line_per_line = [doc for doc in documents if "\n\n" not in doc and doc.count("\n") > 100]
    assert len(single_line) == len(with_blank_lines) == len(line_per_line) == 2
    assert min(len(doc.encode()) for doc in single_line) >= 199_000


@pytest.mark.parametrize("kwargs, message", [
    (dict(fmt="csv"), "unknown format"),
    (dict(num_files=0), "num_files"),
    (dict(total_bytes=5_000, num_files=10), "too small"),
    (dict(lines=["", "  "]), "non-blank"),
    (dict(fmt="jsonl", text_field="id"), "collides"),
])
def test_bad_arguments_raise_value_error(tmp_path, kwargs, message):
    arguments = dict(out_dir=tmp_path, total_bytes=100_000, fmt="txt", num_files=2, lines=LINES)
    with pytest.raises(ValueError, match=message):
        synthetic.write_corpus(**{**arguments, **kwargs})


def test_parse_size():
    assert synthetic.parse_size("10K") == 10_000
    assert synthetic.parse_size("500M") == 500_000_000
    assert synthetic.parse_size("2G") == 2_000_000_000
    assert synthetic.parse_size("1.5g") == 1_500_000_000
    assert synthetic.parse_size("12345") == 12_345
    with pytest.raises(ValueError, match="500M"):
        synthetic.parse_size("lots")


def test_command_line_prints_a_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synthetic, "shakespeare_lines", lambda: LINES)
    synthetic.main([f"--out_dir={tmp_path}", "--size=50K", "--format=jsonl.zst",
                    "--num_files=2", "--seed=5"])
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1 and "2 jsonl.zst files" in summary and "MB/s" in summary
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "part-00000.jsonl.zst", "part-00001.jsonl.zst"]

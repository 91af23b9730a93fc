"""Compile a config's programs for TPU topologies and GPU nodes on this host, allocating
nothing, and report what the compiler made of them (cla-compile).

    cla-compile --config=configs/paper/1b_h128_mqa_cla2.py --target=v5p-8,8xh100
    cla-compile --config=configs/paper/3b_h128_mqa_cla2.py --target=2xv5p-128 \
        --programs=train --batch_per_device=4 --largest_batch --out=report.json
    cla-compile --list_targets

Per target and program: memory per device (arguments, outputs, donated, temporaries) and
whether it fits the chip's HBM; the kernels (Pallas/Mosaic, Triton, cuDNN); every collective
with its dtype, bytes and loop count; any buffer shaped like attention scores or full logits;
model FLOPs and a roofline bound on the step time and MFU (see cla_jax/aot/report.py for
which figure comes from XLA, from the formula, or from the datasheet). The compilers are
libtpu and the CUDA plugin, pinned to the installed jax (`python -m cla_jax.aot.stack
install`, or `make compile-stack` in a checkout).
"""
from cla_jax.aot import stack

stack.prepare_process()  # before jax: compile-only devices on a CPU host

import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cla_jax import cli  # noqa: E402
from cla_jax.errors import UserError  # noqa: E402

config_flags.DEFINE_config_file("config", None, "A configs/*.py file (overrides: "
                                "--config.model.remat=full).", lock_config=True)
flags.DEFINE_list("target", [], "Targets, comma-separated (see --list_targets).")
flags.DEFINE_bool("list_targets", False, "Print the known targets and exit.")
flags.DEFINE_list("programs", ["train", "eval", "prefill", "generate", "serve_step",
                               "paged_step"],
                  "Programs to compile: train, eval, prefill, generate, serve_step (the slot "
                  "engine), paged_step (the paged engine).")
flags.DEFINE_integer("batch_per_device", None, "Train/eval rows per batch shard (data x fsdp "
                     "device); default: the config's train.batch_size over the shards.")
flags.DEFINE_integer("seq_len", None, "Train/eval sequence length (default train.seq_len).")
flags.DEFINE_integer("decode_batch_per_device", 8, "generate's prompts and the engine's slots "
                     "per batch shard.")
flags.DEFINE_integer("prompt_len", None, "generate's prompt length and the prefill bucket "
                     "(default: half of model.max_seq_len).")
flags.DEFINE_integer("max_new_tokens", None, "generate's new tokens; the engine's slots hold "
                     "prompt_len + max_new_tokens (default: the other half).")
flags.DEFINE_enum("cache_dtype", "bfloat16", ["bfloat16", "float16", "float32", "int8"],
                  "KV cache dtype of generate and the engine.")
flags.DEFINE_string("serve_param_dtype", "bfloat16", "Param dtype as served.")
flags.DEFINE_bool("largest_batch", False, "Also find, by compiling, the largest train "
                  "batch per device that fits.")
flags.DEFINE_string("out", None, "Write the report as JSON here.")
flags.DEFINE_string("dump_hlo", None, "Write each compiled program's optimized HLO into this "
                    "folder.")
cli.define_mesh_flag()

PROGRAM_NAMES = ("train", "eval", "prefill", "generate", "serve_step", "paged_step")
GIB = 2**30


def compile_target(config, target_name: str) -> dict:
    """Every asked-for program of `config` compiled for one target: the report's entry."""
    from cla_jax import sharding
    from cla_jax.aot import report, targets
    from cla_jax.aot.programs import make_setup

    target = targets.by_name(target_name)
    stack.check(target.platform)
    devices = targets.compile_devices(target)
    f = flags.FLAGS
    setup = make_setup(config, target, devices, mesh_spec=cli.mesh_spec(),
                       batch_per_shard=f.batch_per_device, seq_len=f.seq_len,
                       decode_batch_per_shard=f.decode_batch_per_device,
                       prompt_len=f.prompt_len, max_new_tokens=f.max_new_tokens,
                       cache_dtype=f.cache_dtype, serve_param_dtype=f.serve_param_dtype)
    domains = [targets.network_domain(d) for d in setup.mesh.devices.flat]
    entry = dict(target=target.name, description=target.describe(),
                 chip=dataclasses.asdict(target.chip),
                 mesh=dict(setup.mesh.shape), batch_per_device=setup.batch_per_shard,
                 seq_len=setup.seq_len, programs={})
    print(f"\n{target.describe()}; mesh {sharding.describe(setup.mesh)}", flush=True)
    for name in flags.FLAGS.programs:
        result, compiled = report.compile_program(name, setup, target, domains)
        entry["programs"][name] = result
        if compiled is not None and flags.FLAGS.dump_hlo:
            folder = pathlib.Path(flags.FLAGS.dump_hlo)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{target.name}_{name}.txt").write_text(compiled.as_text())
        print(row(name, result), flush=True)
    if flags.FLAGS.largest_batch and "train" in flags.FLAGS.programs:
        found = report.largest_batch("train", setup, target, domains)
        entry["largest_train_batch_per_device"] = found
        print(f"  largest train batch per device: {found['largest']} "
              f"({found['compiles']} compiles)", flush=True)
    return entry


def row(name: str, result: dict) -> str:
    """One line of the report table for a program's result."""
    if result["status"] != "ok":
        return f"  {name:<10} {result['status']}: {result.get('error', '')[:300]}"
    m, r, c = result["memory"], result["roofline"], result["collective_summary"]
    flagged = {b["kind"] for b in result["suspicious_buffers"]}
    kernels = ", ".join(k for k in result["kernels"] if k not in (
        "AllocateBuffer", "AssumeGatherIndicesInBound")) or "-"
    return (f"  {name:<10} peak {m['peak'] / GIB:7.2f} GiB of {result['hbm_bytes'] / GIB:5.1f}"
            f" ({'fits' if result['fits'] else 'DOES NOT FIT'}), temp {m['temp'] / GIB:6.2f}"
            f" GiB | collectives {c['bytes_per_step'] / 1e9:7.3f} GB/step | roofline "
            f"{r['step_s_lower_bound'] * 1e3:8.2f} ms ({r['bound_by']}), MFU <= "
            f"{r['mfu_upper_bound']:.2f} | kernels {kernels}"
            + (f" | buffers shaped like {', '.join(sorted(flagged))}" if flagged else ""))


def main(argv):
    """cla-compile's work once its flags are parsed: compiles the programs for each target and
    writes the report."""
    from cla_jax.aot import targets

    if flags.FLAGS.list_targets:
        for target in targets.TARGETS.values():
            print(target.describe())
        return
    if flags.FLAGS.config is None or not flags.FLAGS.target:
        raise UserError("give --config=configs/<file>.py and --target=NAME[,NAME...] "
                        "(--list_targets shows the names)")
    unknown = sorted(set(flags.FLAGS.programs) - set(PROGRAM_NAMES))
    if unknown:
        raise UserError(f"unknown program(s) {unknown}; choose from {', '.join(PROGRAM_NAMES)}")
    for name in flags.FLAGS.target:
        try:
            targets.by_name(name)
        except ValueError as error:
            raise UserError(str(error)) from None
    results = dict(config=flags.FLAGS.config.to_dict(), targets=[])
    for name in flags.FLAGS.target:
        try:
            results["targets"].append(compile_target(flags.FLAGS.config, name))
        except stack.StackError as error:
            raise UserError(str(error)) from None
        if flags.FLAGS.out:
            path = pathlib.Path(flags.FLAGS.out).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1, default=str))
    if flags.FLAGS.out:
        print(f"\nwrote {flags.FLAGS.out}", file=sys.stderr)


def run():
    """The cla-compile console script: defines the flags, then runs `main`."""
    cli.start(main)


if __name__ == "__main__":
    run()

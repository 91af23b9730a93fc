"""The paper's 1B and 3B CLA2 train steps compiled for TPU slices, GPU nodes and one pod-scale
target on this CPU host (cla_jax.aot), and MaxText's own compile of the same dimensions beside
ours. Writes benchmarks/results/compile_targets_<date>_cpu-host.json and prints the tables.

    python benchmarks/compile_targets.py                     # everything: about an hour on 2 cores
    python benchmarks/compile_targets.py --only=v5p-8 --no_maxtext --no_largest

Rows: memory per chip at 4 sequences of 2048 tokens per chip, the largest batch per chip that
fits (found by compiling), collective bytes per step, the roofline step time and MFU bound.
MaxText: `maxtext.trainers.pre_train.train_compile` at the same d_model, FFN, layers, heads,
vocabulary, sequence, batch per chip and remat (both "full"), MQA without CLA (MaxText has
none), with its defaults otherwise; cla-jax's MQA twin compiled beside it. MaxText runs in its
own environment (benchmarks/peers/maxtext_env.sh: jax 0.12, libtpu 0.0.52); cla-jax in this
one (jax 0.10.2, libtpu 0.0.42), so the two compilers differ; the results say which ran.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cla_jax.aot import stack  # noqa: E402

stack.prepare_process()

import jax  # noqa: E402

from benchmarks.common import environment, today  # noqa: E402
from cla_jax.aot import hlo, report, targets  # noqa: E402
from cla_jax.aot.programs import make_setup  # noqa: E402
from cla_jax.config import ModelConfig  # noqa: E402

SEQ_LEN, PER_CHIP = 2048, 4
RUNS = [  # (config, target, find the largest batch)
    *((f"configs/paper/{scale}_h128_mqa_cla2.py", target, True)
      for scale in ("1b", "3b")
      for target in ("v5e-16", "v5p-8", "v6e-8", "8xh100", "8xh200")),
    ("configs/paper/3b_h128_mqa_cla2.py", "2xv5p-128", False),  # data parallel across slices
]
MAXTEXT_RUNS = [("configs/paper/1b_h128_mqa.py", "v5p-8"), ("configs/paper/1b_h128_mqa.py",
                                                           "v5e-16")]
GIB = 2**30
HLO_DIR: pathlib.Path | None = None


def load(path: str):
    import importlib.util

    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("bench_config", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def ours(config_path: str, target_name: str, largest: bool, remat: str | None = None) -> dict:
    config = load(config_path)
    if remat:
        config.model.remat = remat
    target = targets.by_name(target_name)
    devices = targets.compile_devices(target)
    setup = make_setup(config, target, devices, batch_per_shard=PER_CHIP, seq_len=SEQ_LEN)
    domains = [targets.network_domain(d) for d in setup.mesh.devices.flat]
    result, compiled = report.compile_program("train", setup, target, domains)
    if compiled is not None and HLO_DIR:  # for re-reading the programs later
        HLO_DIR.mkdir(parents=True, exist_ok=True)
        name = f"{pathlib.Path(config_path).stem}_{target_name}_{setup.model.remat}.hlo.txt"
        (HLO_DIR / name).write_text(compiled.as_text())
    row = dict(config=config_path, target=target_name, remat=setup.model.remat,
               mesh=dict(setup.mesh.shape), batch_per_chip=PER_CHIP, seq_len=SEQ_LEN,
               train=result)
    if largest and result["status"] in ("ok", "does not fit"):  # then from one row up
        known = {PER_CHIP: result["memory"]["peak"]} if result["status"] == "ok" else None
        row["largest_batch_per_chip"] = report.largest_batch("train", setup, target, domains,
                                                             known=known)
    print(describe(row), flush=True)
    return row


def describe(row: dict) -> str:
    r = row["train"]
    if r["status"] != "ok":
        return f"{row['config']:<40} {row['target']:<10} {r['status']}: {r.get('error', '')[:200]}"
    largest = row.get("largest_batch_per_chip", {}).get("largest", "-")
    return (f"{pathlib.Path(row['config']).stem:<22} {row['target']:<10} "
            f"{r['memory']['peak'] / GIB:7.2f} GiB/{r['hbm_bytes'] / GIB:5.1f} "
            f"largest {largest!s:>4} | {r['collective_summary']['bytes_per_step'] / 1e9:7.2f} "
            f"GB/step | {r['roofline']['step_s_lower_bound'] * 1e3:8.1f} ms "
            f"({r['roofline']['bound_by']}) MFU <= {r['roofline']['mfu_upper_bound']:.2f}")


def other_env() -> dict:
    """This process's environment without what loading our libtpu put there (jax sets
    TPU_LIBRARY_PATH to it): MaxText's environment must find its own libtpu."""
    import os

    return {k: v for k, v in os.environ.items() if k not in ("TPU_LIBRARY_PATH",
                                                               "TF_CPP_MIN_LOG_LEVEL")}


def maxtext(config_path: str, target_name: str, out_dir: pathlib.Path) -> dict:
    """MaxText's train_compile of config_path's dimensions, in MaxText's own environment."""
    model = ModelConfig.from_dict(load(config_path).model)
    target = targets.by_name(target_name)
    prefix = out_dir / f"maxtext_{pathlib.Path(config_path).stem}_{target_name}"
    hlo_file = (HLO_DIR or pathlib.Path("/tmp")) / prefix.with_suffix(".hlo.txt").name
    overrides = [
        f"compile_topology={target_name}", f"compile_topology_num_slices={target.slices}",
        "run_name=aot", "decoder_block=llama2", f"vocab_size={model.vocab_size}",
        f"base_emb_dim={model.d_model}", f"base_mlp_dim={model.mlp_dim}",
        f"base_num_decoder_layers={model.num_layers}", f"base_num_query_heads={model.num_heads}",
        f"base_num_kv_heads={model.num_kv_heads}", f"head_dim={model.head_dim}",
        f"max_target_length={SEQ_LEN}", f"per_device_batch_size={PER_CHIP}",
        "remat_policy=full", "dtype=bfloat16", "weight_dtype=float32", "scan_layers=true",
        "ici_fsdp_parallelism=-1", "dataset_type=synthetic", "enable_checkpointing=false"]
    command = (f". {ROOT}/benchmarks/peers/maxtext_env.sh && \"$MAXTEXT_VENV/bin/python\" "
               f"{ROOT}/benchmarks/peers/maxtext_compile.py {prefix} " + " ".join(overrides))
    start = time.perf_counter()
    run = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                         env=other_env())
    if run.returncode:
        return dict(status="error", error=run.stderr[-2000:])
    info = json.loads(prefix.with_suffix(".json").read_text())
    prefix.with_suffix(".hlo.txt").replace(hlo_file)  # MB of text: kept outside the results
    program = hlo.Program(hlo_file.read_text())
    domains = [0] * target.chips if target.slices == 1 else None
    collectives = program.collectives(domains)
    m = info["memory"]
    m["peak"] = m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
    return dict(status="ok", compile_s=time.perf_counter() - start, memory=m,
                collective_summary=report.collective_summary(collectives),
                kernels=program.kernels(), jax=info["jax"], overrides=overrides)


def ours_in_maxtext_env(config_path: str, target_name: str, out_dir: pathlib.Path) -> dict:
    """cla-compile of the same step under MaxText's jax and libtpu: one compiler for both."""
    out = out_dir / f"cla_jax_in_maxtext_env_{pathlib.Path(config_path).stem}_{target_name}.json"
    command = (f". {ROOT}/benchmarks/peers/maxtext_env.sh && CLA_ALLOW_STACK_MISMATCH=1 "
               f"PYTHONPATH={ROOT} \"$MAXTEXT_VENV/bin/python\" -m cla_jax.scripts.compile "
               f"--config={ROOT / config_path} --config.model.remat=full --target={target_name}"
               f" --programs=train --batch_per_device={PER_CHIP} --seq_len={SEQ_LEN} "
               f"--out={out}")
    run = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                         env=other_env())
    if run.returncode:
        return dict(status="error", error=run.stderr[-2000:])
    return json.loads(out.read_text())["targets"][0]["programs"]["train"]


def compare_with_maxtext(config_path: str, target_name: str, out_dir: pathlib.Path) -> dict:
    mine = ours(config_path, target_name, False, remat="full")
    same_compiler = ours_in_maxtext_env(config_path, target_name, out_dir)
    theirs = maxtext(config_path, target_name, out_dir)
    pair = dict(config=config_path, target=target_name, cla_jax=mine,
                cla_jax_same_compiler=same_compiler, maxtext=theirs)
    for name, result in (("", mine["train"]), ("same_compiler_", same_compiler)):
        if theirs["status"] == "ok" and result["status"] == "ok":
            pair[f"{name}memory_ratio"] = result["memory"]["peak"] / theirs["memory"]["peak"]
            pair[f"{name}collective_bytes_ratio"] = (
                result["collective_summary"]["bytes_per_step"] /
                theirs["collective_summary"]["bytes_per_step"])
    print(f"  vs MaxText on {target_name}: {json.dumps({k: round(v, 3) for k, v in pair.items() if k.endswith('ratio')})}"
          if theirs["status"] == "ok" else f"  MaxText: {theirs.get('error', '')[-500:]}",
          flush=True)
    return pair


def reanalyse(results: dict, hlo_dir: pathlib.Path) -> None:
    """Each row's collectives and roofline read again from its kept HLO (after a change to the
    reader), in place; memory and the largest batch come from XLA and stay."""
    import types

    for row in results["rows"]:
        result = row["train"]
        path = hlo_dir / f"{pathlib.Path(row['config']).stem}_{row['target']}_{row['remat']}.hlo.txt"
        if result["status"] != "ok" or not path.exists():
            continue
        target = targets.by_name(row["target"])
        # The mesh's device order puts dcn_data outermost: slice after slice.
        domains = [i // target.chips_per_slice for i in range(target.chips)]
        program = hlo.Program(path.read_text())
        collectives = program.collectives(domains)
        summary = report.collective_summary(collectives)
        old = result["roofline"]
        tokens = old["tokens_per_s_upper_bound"] * old["step_s_lower_bound"]
        stub = types.SimpleNamespace(model_flops=old["model_flops_per_step"], tokens=tokens)
        result["collectives"] = [c.to_dict() for c in collectives]
        result["collective_summary"] = summary
        result["roofline"] = report.roofline(target, stub, program.hbm_traffic(), summary)


def markdown(results: dict) -> str:
    """The results as the README's tables."""
    lines = ["| model | target | mesh | peak memory per chip (HBM) | largest batch per chip | "
             "collective GB per step | roofline step | MFU bound |", "|---" * 8 + "|"]
    for row in results["rows"]:
        r = row["train"]
        if r["status"] != "ok":
            lines.append(f"| {pathlib.Path(row['config']).stem} | {row['target']} | | "
                         f"{r['status']} | | | | |")
            continue
        mesh = " x ".join(f"{k}={v}" for k, v in row["mesh"].items() if v > 1)
        largest = row.get("largest_batch_per_chip", {}).get("largest", "not searched")
        roof = r["roofline"]
        lines.append(
            f"| {pathlib.Path(row['config']).stem.replace('_h128_mqa_cla2', ' H128-MQA-CLA2')}"
            f" | {row['target']} | {mesh} | {r['memory']['peak'] / GIB:.1f} GiB "
            f"({r['hbm_bytes'] / GIB:.0f}) | {largest} | "
            f"{r['collective_summary']['bytes_per_step'] / 1e9:.2f} | "
            f"{roof['step_s_lower_bound'] * 1e3:.0f} ms ({roof['bound_by']}) | "
            f"{roof['mfu_upper_bound']:.2f} |")
    if results.get("maxtext"):
        lines += ["", "| model, remat full | target | compiler | cla-jax peak / MaxText | "
                  "cla-jax collective bytes / MaxText |", "|---" * 5 + "|"]
        for pair in results["maxtext"]:
            theirs = pair["maxtext"]
            for label, key in (("each its own", ""), ("MaxText's (jax 0.12)", "same_compiler_")):
                if f"{key}memory_ratio" in pair:
                    mine = pair["cla_jax"]["train"] if not key else pair["cla_jax_same_compiler"]
                    lines.append(
                        f"| {pathlib.Path(pair['config']).stem} | {pair['target']} | {label} | "
                        f"{pair[key + 'memory_ratio']:.2f} ({mine['memory']['peak'] / GIB:.2f}"
                        f" / {theirs['memory']['peak'] / GIB:.2f} GiB) | "
                        f"{pair[key + 'collective_bytes_ratio']:.2f} "
                        f"({mine['collective_summary']['bytes_per_step'] / 1e9:.2f} / "
                        f"{theirs['collective_summary']['bytes_per_step'] / 1e9:.2f} GB) |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated targets to run")
    parser.add_argument("--no_maxtext", action="store_true")
    parser.add_argument("--no_largest", action="store_true")
    parser.add_argument("--table", action="store_true",
                        help="print the existing results file as markdown tables and exit")
    parser.add_argument("--maxtext_only", action="store_true",
                        help="only the MaxText comparison, into the existing results file")
    parser.add_argument("--out", default=None)
    parser.add_argument("--hlo_dir", default=None, help="keep each train step's optimized HLO")
    args = parser.parse_args()
    global HLO_DIR
    HLO_DIR = pathlib.Path(args.hlo_dir) if args.hlo_dir else None
    only = set(filter(None, args.only.split(",")))
    out = pathlib.Path(args.out or ROOT / "benchmarks" / "results" /
                       f"compile_targets_{today()}_cpu-host.json")
    results = dict(benchmark="compile_targets", date=today(), environment=environment(),
                   what=__doc__.split("\n\n")[0], seq_len=SEQ_LEN, batch_per_chip=PER_CHIP,
                   rows=[], maxtext=[])

    def save():
        out.write_text(json.dumps(results, indent=1, default=str))

    if args.table:
        results = json.loads(out.read_text())
        if args.hlo_dir:
            reanalyse(results, pathlib.Path(args.hlo_dir))
            save_to = out
            save_to.write_text(json.dumps(results, indent=1, default=str))
        print(markdown(results))
        return
    if args.maxtext_only and out.exists():
        results = {**json.loads(out.read_text()), "maxtext": []}
    for config_path, target_name, largest in RUNS:
        if only and target_name not in only or args.maxtext_only:
            continue
        results["rows"].append(ours(config_path, target_name, largest and not args.no_largest))
        save()
    if not args.no_maxtext:
        for config_path, target_name in MAXTEXT_RUNS:
            if only and target_name not in only:
                continue
            results["maxtext"].append(compare_with_maxtext(config_path, target_name,
                                                           out.parent))
            save()
    print(f"wrote {out} (jax {jax.__version__})")


if __name__ == "__main__":
    main()

"""Peak memory of a training step against depth, for each remat policy, attention kernel and
sequence length.

Answers: how much memory does each `model.remat` policy save, how does a training step's
memory grow with depth, and how do a layer's activations grow with the sequence length under
each `model.attention` kernel (quadratic for xla's [T, S] scores, linear for blockwise)? The
batch is packed documents (segment ids passed), as in training. Each figure is XLA's own
buffer assignment for the real jitted train step (`cla_jax.train.step.make_train_step`:
forward, backward, AdamW update, state donated), read from `compiled.memory_analysis()`
after compiling against abstract state, so nothing is allocated and the figures are exact
for this backend (no timing noise):

    peak = arguments + outputs - aliased (donated state reused for the new one) + temporaries

`temporaries` holds the activations kept for the backward pass; its growth per layer is the
activation cost of one layer under each policy.

    PYTHONPATH=. python benchmarks/train_memory.py                      # ~2 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/train_memory.py --depths=4,32 --batch=16 --seq_lens=1024
    PYTHONPATH=. python benchmarks/train_memory.py --depths=4,8 --remats=none \
        --attentions=xla,blockwise --seq_lens=512,2048,8192             # attention kernels
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from benchmarks.common import provenance, publish, report  # noqa: E402
from benchmarks.compile_time import BASE_MODEL  # noqa: E402
from cla_jax import ModelConfig, sharding  # noqa: E402
from cla_jax.config import ATTENTION_KINDS, REMAT_POLICIES  # noqa: E402
from cla_jax.train.optimizer import make_optimizer  # noqa: E402
from cla_jax.train.state import abstract_state  # noqa: E402
from cla_jax.train.step import make_train_step  # noqa: E402

MIB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="4,8,16,32", help="comma-separated layer counts")
    p.add_argument("--remats", default=",".join(REMAT_POLICIES),
                   help=f"comma-separated model.remat policies, of {tuple(REMAT_POLICIES)}")
    p.add_argument("--kv_sharing", type=int, default=2, help="CLA sharing factor (1 = no CLA)")
    p.add_argument("--attentions", default=BASE_MODEL["attention"],
                   help=f"comma-separated model.attention kernels, of {ATTENTION_KINDS}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_lens", "--seq_len", default="512",
                   help="comma-separated sequence lengths (tokens per row)")
    p.add_argument("--out", default="", help="results JSON path (default: benchmarks/results/"
                                             "train_memory_<date>_<device>.json)")
    args = p.parse_args(argv)
    try:
        args.depths = [int(d) for d in args.depths.split(",") if d.strip()]
        args.seq_lens = [int(t) for t in args.seq_lens.split(",") if t.strip()]
    except ValueError:
        p.error(f"--depths and --seq_lens must be comma-separated integers, got "
                f"{args.depths!r}, {args.seq_lens!r}")
    args.attentions = [a.strip() for a in args.attentions.split(",") if a.strip()]
    if not args.seq_lens or not args.attentions or set(args.attentions) - set(ATTENTION_KINDS):
        p.error(f"need sequence lengths and attention kernels from {ATTENTION_KINDS}")
    args.remats = [r.strip() for r in args.remats.split(",") if r.strip()]
    unknown = [r for r in args.remats if r not in REMAT_POLICIES]
    if unknown or not args.remats or not args.depths:
        p.error(f"need depths and remat policies from {tuple(REMAT_POLICIES)}; unknown: {unknown}")
    if any(d % args.kv_sharing for d in args.depths):
        p.error(f"every depth must be a multiple of --kv_sharing={args.kv_sharing}")
    return args


def step_memory(model: ModelConfig, batch: int, seq_len: int) -> dict:
    """Bytes XLA assigns to one compiled train step of `model` (see the module docstring)."""
    train = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, steps=1000, warmup_fraction=0.05, final_lr_fraction=0.1,
        b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0))
    optimizer = make_optimizer(train)
    mesh = sharding.single_device_mesh()
    state = abstract_state(model, optimizer, mesh)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), "int32")
    data = dict(inputs=tokens, targets=tokens, positions=tokens, segment_ids=tokens,
                weights=jax.ShapeDtypeStruct((batch, seq_len), "float32"))
    stats = make_train_step(model, optimizer, mesh=mesh).lower(state, data).compile() \
        .memory_analysis()
    if stats is None:
        raise RuntimeError(f"the {jax.default_backend()} backend reports no memory analysis")
    figures = dict(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
                   aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
                   generated_code=stats.generated_code_size_in_bytes)
    figures["peak"] = (figures["arguments"] + figures["outputs"] - figures["aliased"]
                       + figures["temporaries"])
    return figures


def run(args) -> dict:
    results = []
    for attention in args.attentions:
        for seq_len in args.seq_lens:
            for remat in args.remats:
                for depth in args.depths:
                    model = ModelConfig(**{**BASE_MODEL, "max_seq_len": seq_len,
                                           "attention": attention}, num_layers=depth,
                                        kv_sharing=args.kv_sharing, remat=remat)
                    figures = step_memory(model, args.batch, seq_len)
                    results.append(dict(attention=attention, seq_len=seq_len, remat=remat,
                                        num_layers=depth, **figures))
                    print(f"  attention={attention:<9} seq_len={seq_len:<5} remat={remat:<14} "
                          f"layers={depth:<3} peak {figures['peak'] / MIB:8.1f} MiB  "
                          f"temporaries {figures['temporaries'] / MIB:8.1f} MiB",
                          file=sys.stderr, flush=True)
    # Activation bytes per extra layer: the slope of temporaries between the extreme depths.
    shallow, deep = min(args.depths), max(args.depths)
    per_layer = []
    for attention in args.attentions:
        for seq_len in args.seq_lens:
            for remat in args.remats:
                at = {r["num_layers"]: r for r in results if (r["attention"], r["seq_len"],
                                                               r["remat"]) == (attention, seq_len,
                                                                               remat)}
                if deep > shallow:
                    per_layer.append(dict(attention=attention, seq_len=seq_len, remat=remat,
                                          bytes=(at[deep]["temporaries"]
                                                 - at[shallow]["temporaries"]) / (deep - shallow)))
    return report(
        "train_memory",
        what=("XLA buffer assignment of the jitted train step (forward, backward, AdamW, state "
              "donated) on packed documents, from compiled.memory_analysis(); peak = arguments "
              "+ outputs - aliased + temporaries; exact for this backend, no timing"),
        settings=dict(batch=args.batch, seq_lens=args.seq_lens, kv_sharing=args.kv_sharing,
                      depths=args.depths, remats=args.remats, attentions=args.attentions),
        model=BASE_MODEL,
        temporaries_per_layer_bytes=per_layer,
        results=results)


def table(report) -> str:
    settings = report["settings"]
    depths = settings["depths"]
    rows = ["peak MiB (temporaries MiB) by depth; last column: activation MiB per extra layer",
            f"{'attention':<10} {'seq_len':>7} {'remat':<14} "
            + " ".join(f"{d:>18}" for d in depths) + f" {'MiB/layer':>10}"]
    for attention in settings["attentions"]:
        for seq_len in settings["seq_lens"]:
            for remat in settings["remats"]:
                key = (attention, seq_len, remat)
                cells = []
                for d in depths:
                    r = next(r for r in report["results"]
                             if (r["attention"], r["seq_len"], r["remat"], r["num_layers"])
                             == key + (d,))
                    cells.append(f"{r['peak'] / MIB:9.1f} ({r['temporaries'] / MIB:6.1f})")
                slope = next((p["bytes"] for p in report["temporaries_per_layer_bytes"]
                              if (p["attention"], p["seq_len"], p["remat"]) == key), None)
                rows.append(f"{attention:<10} {seq_len:>7} {remat:<14} "
                            + " ".join(f"{c:>18}" for c in cells)
                            + (f" {slope / MIB:>10.2f}" if slope is not None else ""))
    rows.append(f"{provenance(report)}, batch {settings['batch']} rows of packed documents, "
                f"CLA{settings['kv_sharing']}")
    return "\n".join(rows)


def main(argv=None):
    args = parse_args(argv)
    report = run(args)
    publish(report, table(report), args.out)


if __name__ == "__main__":
    main()

"""Pareto plot of a results table: KV bytes/token (log x) against validation perplexity, CLA
models in one colour and the others in another, seed spread as error bars, the Pareto frontier
drawn through the models that no other model beats on both axes (the paper's Figure 1).

    PYTHONPATH=. python benchmarks/pareto/plot.py benchmarks/results/pareto_<date>_cpu.csv \
        [--out=pareto.png]

Reads any CSV with the columns model, cla, kv_bytes_per_token and val_ppl (one row per run;
rows of one model are its seeds), such as benchmarks/pareto/sweep.py writes.
"""
from __future__ import annotations

import argparse
import csv
import pathlib
import statistics


def read_table(path) -> dict[str, dict]:
    """{model: {cla, kv_bytes_per_token, ppls, mean, spread}} in the table's order."""
    models: dict[str, dict] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            entry = models.setdefault(row["model"], {
                "cla": bool(int(row["cla"])), "kv_bytes_per_token": float(row["kv_bytes_per_token"]),
                "ppls": []})
            entry["ppls"].append(float(row["val_ppl"]))
    if not models:
        raise ValueError(f"{path} has no result rows")
    for entry in models.values():
        ppls = entry["ppls"]
        entry["mean"] = statistics.fmean(ppls)
        entry["spread"] = statistics.stdev(ppls) if len(ppls) > 1 else 0.0
    return models


def pareto_frontier(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points (x, y) that no other point matches or beats on both axes (lower
    is better on both) while beating on one; ordered by x."""
    frontier, best_y = [], float("inf")
    for name, (x, y) in sorted(points.items(), key=lambda item: (item[1][0], item[1][1])):
        if y < best_y:
            frontier.append(name)
            best_y = y
    return frontier


def summary_lines(models: dict[str, dict]) -> list[str]:
    frontier = pareto_frontier({m: (e["kv_bytes_per_token"], e["mean"])
                                for m, e in models.items()})
    lines = [f"{'model':<14} {'KV B/token':>10} {'seeds':>5} {'val ppl mean':>12} "
             f"{'std':>6}  frontier"]
    for name, e in sorted(models.items(), key=lambda item: item[1]["kv_bytes_per_token"]):
        lines.append(f"{name:<14} {e['kv_bytes_per_token']:>10g} {len(e['ppls']):>5} "
                     f"{e['mean']:>12.2f} {e['spread']:>6.2f}  {'*' if name in frontier else ''}")
    return lines


def plot(models: dict[str, dict], out: pathlib.Path, title: str = "",
         xlabel: str = "KV cache bytes per token (16-bit)") -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for cla, colour, label in ((False, "tab:blue", "no CLA"), (True, "tab:orange", "CLA")):
        group = {m: e for m, e in models.items() if e["cla"] == cla}
        if not group:
            continue
        ax.errorbar([e["kv_bytes_per_token"] for e in group.values()],
                    [e["mean"] for e in group.values()],
                    yerr=[e["spread"] for e in group.values()], fmt="o", color=colour,
                    capsize=3, label=label)
        for name, e in group.items():
            ax.annotate(name, (e["kv_bytes_per_token"], e["mean"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    frontier = pareto_frontier({m: (e["kv_bytes_per_token"], e["mean"])
                                for m, e in models.items()})
    ax.step([models[m]["kv_bytes_per_token"] for m in frontier],
            [models[m]["mean"] for m in frontier], where="post", color="grey",
            linestyle="--", linewidth=1, label="Pareto frontier")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation perplexity (mean over seeds, ±1 std)")
    ax.set_title(title or "KV cache size vs perplexity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", type=pathlib.Path, help="results CSV")
    parser.add_argument("--out", type=pathlib.Path, help="PNG (default: the table's name .png)")
    parser.add_argument("--title", default="", help="plot title")
    parser.add_argument("--xlabel", default="KV cache bytes per token (16-bit)",
                        help="x axis label (say the context and dtypes the bytes are at)")
    args = parser.parse_args(argv)
    if not args.table.is_file():
        parser.error(f"{args.table} does not exist; run benchmarks/pareto/sweep.py first")
    models = read_table(args.table)
    out = args.out or args.table.with_suffix(".png")
    plot(models, out, args.title, args.xlabel)
    print("\n".join(summary_lines(models)))
    print(f"plot in {out}")


if __name__ == "__main__":
    main()

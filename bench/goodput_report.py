"""Tables and plots of recorded goodput runs (bench/goodput_bench.py), for docs/benchmarks.md.

For each JSON: the unloaded latencies, each layout's figures at every load, and goodput
per layout (with disaggregated against the best colocated one), as Markdown; and three
PNGs: TTFT and TPOT CDFs per layout at one rate, SLO attainment against the rate, and
goodput bars. ``--update`` writes the Markdown into a file between the markers
``<!-- goodput:NAME -->`` and ``<!-- /goodput:NAME -->`` (NAME: the JSON's stem, or
--name), so no figure there is typed by hand. The SLO is the run's unless given.

    python3 bench/goodput_report.py bench/recorded/goodput_small.json [...]
        [--plots docs] [--update docs/benchmarks.md] [--ttft-slo S] [--tpot-slo S]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from slo import ATTAINMENT, Slo, goodput, summarize


def load_label(run: dict) -> str:
    if run["arrival"] == "poisson":
        return "burst" if run["rate"] == float("inf") else f"{run['rate']:g}/s"
    return f"{run['clients']:g} clients"


def markdown(results: dict, slo: Slo, name: str, plots: list[Path], docs: Path | None) -> str:
    layouts = results["layouts"]
    lines = [f"Model `{Path(results['model']).name}` ({results['dtype']}), {results['cpus']} "
             f"cores, workload `{results['workload']}` (seed {results['seed']}), "
             f"{len(next(iter(layouts.values()))['runs'][0]['records'])} requests per load, "
             f"prefill chunk {results['prefill_chunk_tokens']} tokens, over "
             f"{results['api']}. SLO: TTFT <= {slo.ttft_s:g} s and TPOT <= "
             f"{1e3 * slo.tpot_s:.1f} ms.", "",
             "| layout | workers | unloaded TTFT | unloaded TPOT | goodput (req/s) |",
             "|---|---|---|---|---|"]
    rates = {n: goodput(layout["runs"], slo) for n, layout in layouts.items()}
    for n, layout in layouts.items():
        u = layout["unloaded"]
        lines.append(f"| {n} | {layout['description']} | {1e3 * u['ttft_s']:.0f} ms | "
                     f"{1e3 * u['tpot_s']:.1f} ms | {rates[n]:g} |")
    colocated = [rates[n] for n in layouts if layouts[n]["aggregated"]]
    if "disagg" in rates and colocated:
        best = max(colocated)
        ratio = f"{rates['disagg'] / best:.2f}x" if best else "inf (no colocated layout met it)"
        lines += ["", f"Disaggregated goodput against the best colocated layout: {ratio}."]
    lines += ["", "| layout | load | SLO met | TTFT p50 / p90 / p99 (s) | TPOT p50 / p90 (ms) | "
              "ITL p50 / p99 (ms) | E2E p50 (s) | tokens/s | failed |",
              "|---|---|---|---|---|---|---|---|---|"]
    for n, layout in layouts.items():
        for run in layout["runs"]:
            s = summarize(run["records"], run["wall_s"], slo)
            t, p, i = s["ttft_s"], s["tpot_s"], s["itl_s"]
            failed = s["requests"] - s["completed"]
            errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items())
            lines.append(
                f"| {n} | {load_label(run)} | {s['attainment']:.0%} | {t['p50']:.2f} / "
                f"{t['p90']:.2f} / {t['p99']:.2f} | {1e3 * p['p50']:.1f} / {1e3 * p['p90']:.1f} | "
                f"{1e3 * i['p50']:.1f} / {1e3 * i['p99']:.1f} | {s['e2e_s']['p50']:.2f} | "
                f"{s['throughput_tok_s']:.0f} | {failed}{f' ({errors})' if errors else ''} |")
    for plot in plots:
        where = plot.relative_to(docs) if docs and plot.is_relative_to(docs) else plot
        lines += ["", f"![{name} {plot.stem.rsplit('_', 1)[-1]}]({where})"]
    return "\n".join(lines)


def cdf_rate(results: dict, slo: Slo) -> float:
    """The rate the CDFs show: the highest at which some layout met the SLO (else the
    lowest swept)."""
    rates = sorted({r["rate"] for layout in results["layouts"].values() for r in layout["runs"]
                    if r["arrival"] == "poisson" and r["rate"] != float("inf")})
    met = [r for r in rates if any(
        summarize(run["records"], run["wall_s"], slo)["attainment"] >= ATTAINMENT
        for layout in results["layouts"].values() for run in layout["runs"]
        if run["arrival"] == "poisson" and run["rate"] == r)]
    return (met or rates)[-1]


def plot(results: dict, slo: Slo, prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = results["layouts"]
    paths = []
    rate = cdf_rate(results, slo)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for n, layout in layouts.items():
        run = next(r for r in layout["runs"] if r["arrival"] == "poisson" and r["rate"] == rate)
        done = [r for r in run["records"] if "error" not in r]
        for ax, key, scale in ((axes[0], "ttft", 1.0), (axes[1], "tpot", 1e3)):
            values = np.sort([scale * r[key] for r in done])
            ax.step(values, np.arange(1, len(values) + 1) / len(run["records"]), where="post",
                    label=n)
    for ax, limit, title in ((axes[0], slo.ttft_s, "TTFT (s)"),
                             (axes[1], 1e3 * slo.tpot_s, "TPOT (ms)")):
        ax.axvline(limit, color="grey", linestyle="--", linewidth=1, label="SLO")
        ax.set_xlabel(title)
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Latency CDFs at {rate:g} req/s")
    paths.append(_save(fig, prefix, "cdf"))

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for n, layout in layouts.items():
        runs = sorted((r for r in layout["runs"]
                       if r["arrival"] == "poisson" and r["rate"] != float("inf")),
                      key=lambda r: r["rate"])
        ax.plot([r["rate"] for r in runs],
                [summarize(r["records"], r["wall_s"], slo)["attainment"] for r in runs],
                marker="o", label=n)
    ax.axhline(ATTAINMENT, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("arrival rate (req/s)")
    ax.set_ylabel("requests within the SLO")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, prefix, "attainment"))

    fig, ax = plt.subplots(figsize=(5, 3.4))
    names = list(layouts)
    ax.bar(names, [goodput(layouts[n]["runs"], slo) for n in names],
           color=["tab:blue", "tab:orange", "tab:green"][:len(names)])
    ax.set_ylabel("goodput (req/s)")
    ax.grid(axis="y", alpha=0.3)
    paths.append(_save(fig, prefix, "goodput"))
    return paths


def _save(fig, prefix: Path, kind: str) -> Path:
    path = prefix.with_name(f"{prefix.name}_{kind}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def update(document: Path, name: str, text: str) -> None:
    begin, end = f"<!-- goodput:{name} -->", f"<!-- /goodput:{name} -->"
    content = document.read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(content):
        raise SystemExit(f"{document} has no {begin} ... {end} section")
    document.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", content))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--plots", type=Path, default=None, help="folder for the PNGs")
    parser.add_argument("--update", type=Path, default=None, help="Markdown file to update")
    parser.add_argument("--ttft-slo", type=float, default=None)
    parser.add_argument("--tpot-slo", type=float, default=None)
    parser.add_argument("--name", default=None,
                        help="the section and plot name (default: the JSON's stem), to "
                             "report one run under several SLOs")
    args = parser.parse_args(argv)
    if args.name and len(args.results) > 1:
        parser.error("--name names one report")
    for path in args.results:
        name = args.name or path.stem
        results = json.loads(path.read_text())
        recorded = Slo(**results["slo"])
        slo = Slo(args.ttft_slo or recorded.ttft_s, args.tpot_slo or recorded.tpot_s)
        plots = plot(results, slo, args.plots / name) if args.plots else []
        docs = args.update.parent if args.update else None
        text = markdown(results, slo, name, plots, docs)
        print(f"## {name}\n\n{text}\n")
        if args.update:
            update(args.update, name, text)


if __name__ == "__main__":
    main()

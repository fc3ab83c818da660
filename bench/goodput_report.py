"""Tables and plots of recorded goodput runs (bench/goodput_bench.py), for docs/benchmarks.md.

For each JSON, judged under SLO A (TTFT and TPOT) and, given --itl-slo or recorded, SLO
B (A and each request's ITL p99): per layout its unloaded latencies and its goodput, all
seeds pooled and each seed alone; disaggregated against the best colocated layout of
each SLO (the colocated chunk sweep's best, so the baseline is tuned); then each layout's
figures at every rate, all seeds pooled, with a bootstrap interval (90%) of the share of
requests within each SLO and that share per seed. Three PNGs: TTFT and ITL-p99 CDFs per
layout at one rate, attainment against the rate (with the intervals), goodput bars (with
each seed's). ``--update`` writes the Markdown into a file between the markers
``<!-- goodput:NAME -->`` and ``<!-- /goodput:NAME -->`` (NAME: the JSON's stem, or
--name), so no figure there is typed by hand. The SLO is the run's unless given.

    python3 bench/goodput_report.py bench/recorded/goodput_small.json [...] [--merge]
        [--plots docs] [--update docs/benchmarks.md] [--ttft-slo S] [--tpot-slo S]
        [--itl-slo S] [--layouts NAME ...]

``--merge`` reports several JSONs as one run, their layouts side by side (bench runs of
the same model, workload, seeds and rates that split the layouts between them).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from slo import (
    ATTAINMENT,
    Slo,
    attainment_interval,
    by_rate,
    goodput,
    goodput_per_seed,
    itl_p99,
    pooled_attainment,
    summarize,
)


def best_colocated(layouts: dict, slo: Slo) -> str | None:
    colocated = [n for n in layouts if layouts[n]["aggregated"]]
    return max(colocated, key=lambda n: goodput(layouts[n]["runs"], slo)) if colocated else None


def goodput_cell(runs: list[dict], slo: Slo) -> str:
    alone = goodput_per_seed(runs, slo)
    text = f"{goodput(runs, slo):g}"
    return text + (f" ({', '.join(f'{v:g}' for v in alone.values())})" if len(alone) > 1 else "")


def markdown(results: dict, slos: list[Slo], name: str, plots: list[Path],
             docs: Path | None) -> str:
    layouts = results["layouts"]
    first = next(iter(layouts.values()))["runs"][0]
    used = results.get("seeds", [results.get("seed", 0)])
    labels = "AB"[:len(slos)]
    lines = [f"Model `{Path(results['model']).name}` ({results['dtype']}), {results['cpus']} "
             f"cores, workload `{results['workload']}`, seeds {', '.join(map(str, used))} "
             f"(interleaved), {len(first['records'])} requests per seed and rate, over "
             f"{results['api']}. "
             + " ".join(f"SLO {label}: {slo.describe()}." for label, slo in zip(labels, slos)),
             "", "| layout | workers | prefill chunk | unloaded TTFT | unloaded TPOT | "
             + " | ".join(f"goodput {label} (req/s; per seed)" for label in labels) + " |",
             "|---|---|---|---|---|" + "---|" * len(slos)]
    for n, layout in layouts.items():
        u = layout["unloaded"]
        chunk = layout.get("chunk_tokens", results["prefill_chunk_tokens"])
        lines.append(f"| {n} | {layout['description']} | {chunk} | {1e3 * u['ttft_s']:.0f} ms "
                     f"| {1e3 * u['tpot_s']:.1f} ms | "
                     + " | ".join(goodput_cell(layout["runs"], slo) for slo in slos) + " |")
    if "disagg" in layouts:
        lines.append("")
        for label, slo in zip(labels, slos):
            best = best_colocated(layouts, slo)
            if best is None:
                continue
            ours, theirs = goodput(layouts["disagg"]["runs"], slo), goodput(
                layouts[best]["runs"], slo)
            ratio = (f"{ours / theirs:.2f}x" if theirs else "n/a (no layout met it)"
                     if not ours else "inf (no colocated layout met it)")
            colocated = [goodput_per_seed(layout["runs"], slo) for layout in layouts.values()
                         if layout["aggregated"]]
            per_seed = [f"{d / c:.2f}x" if c else "inf" if d else "n/a" for d, c in (
                (d, max(alone[seed] for alone in colocated)) for seed, d in
                goodput_per_seed(layouts["disagg"]["runs"], slo).items())]
            lines.append(f"- SLO {label}: disaggregated {ours:g} req/s against the best "
                         f"colocated layout, {best}, {theirs:g}: **{ratio}** (per seed, "
                         f"against that seed's best colocated layout: {', '.join(per_seed)}).")
    lines += ["", "| layout | rate | " + " | ".join(
        f"SLO {label} met (90% CI; per seed)" for label in labels)
        + " | TTFT p50 / p90 / p99 (s) | TPOT p50 / p90 (ms) | ITL p50 / p99 (ms) | "
          "tokens/s | failed |", "|---|---|" + "---|" * len(slos) + "---|---|---|---|---|"]
    for n, layout in layouts.items():
        for rate, records in by_rate(layout["runs"]).items():
            runs = [r for r in layout["runs"] if r["arrival"] == "poisson" and r["rate"] == rate]
            s = summarize(records, sum(r["wall_s"] for r in runs), slos[0])
            t, p, i = s["ttft_s"], s["tpot_s"], s["itl_s"]
            failed = s["requests"] - s["completed"]
            errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items())
            met = []
            for slo in slos:
                low, high = attainment_interval(records, slo)
                shares = [summarize(r["records"], r["wall_s"], slo)["attainment"] for r in runs]
                met.append(f"{summarize(records, 1, slo)['attainment']:.0%} ({low:.0%}-"
                           f"{high:.0%}; {', '.join(f'{x:.0%}' for x in shares)})")
            lines.append(
                f"| {n} | {rate:g}/s | {' | '.join(met)} | {t['p50']:.2f} / {t['p90']:.2f} / "
                f"{t['p99']:.2f} | {1e3 * p['p50']:.1f} / {1e3 * p['p90']:.1f} | "
                f"{1e3 * i['p50']:.1f} / {1e3 * i['p99']:.1f} | {s['throughput_tok_s']:.0f} | "
                f"{failed}{f' ({errors})' if errors else ''} |")
    for path in plots:
        where = path.relative_to(docs) if docs and path.is_relative_to(docs) else path
        lines += ["", f"![{name} {path.stem.rsplit('_', 1)[-1]}]({where})"]
    return "\n".join(lines)


def cdf_rate(results: dict, slo: Slo) -> float:
    """The rate the CDFs show: the highest at which some layout met the SLO (else the
    lowest swept)."""
    attained = [pooled_attainment(layout["runs"], slo) for layout in results["layouts"].values()]
    rates = sorted({rate for shares in attained for rate in shares})
    met = [rate for rate in rates if any(shares.get(rate, 0) >= ATTAINMENT
                                         for shares in attained)]
    return (met or rates)[-1]


def plot(results: dict, slos: list[Slo], prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = results["layouts"]
    slo = slos[-1]
    paths = []
    rate = cdf_rate(results, slos[0])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for n, layout in layouts.items():
        records = by_rate(layout["runs"]).get(rate, [])
        done = [r for r in records if "error" not in r]
        for ax, values in ((axes[0], [r["ttft"] for r in done]),
                           (axes[1], [1e3 * itl_p99(r) for r in done])):
            ax.step(np.sort(values), np.arange(1, len(values) + 1) / max(1, len(records)),
                    where="post", label=n)
    limits = [(axes[0], slo.ttft_s, "TTFT (s)"),
              (axes[1], 1e3 * slo.itl_p99_s if slo.itl_p99_s else None,
               "each request's ITL p99 (ms)")]
    for ax, limit, title in limits:
        if limit is not None:
            ax.axvline(limit, color="grey", linestyle="--", linewidth=1, label="SLO")
        ax.set_xlabel(title)
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Latency CDFs at {rate:g} req/s, all seeds")
    paths.append(_save(fig, prefix, "cdf"))

    fig, axes = plt.subplots(1, len(slos), figsize=(6 * len(slos), 3.8), squeeze=False)
    for ax, judged, label in zip(axes[0], slos, "AB"):
        for n, layout in layouts.items():
            pooled = by_rate(layout["runs"])
            shares = list(pooled_attainment(layout["runs"], judged).values())
            bounds = np.asarray([attainment_interval(rs, judged) for rs in pooled.values()])
            ax.errorbar(list(pooled), shares, yerr=[np.subtract(shares, bounds[:, 0]),
                                                    np.subtract(bounds[:, 1], shares)],
                        marker="o", capsize=3, label=n)
        ax.axhline(ATTAINMENT, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"SLO {label}", fontsize=9)
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel("requests within the SLO (90% CI)")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    paths.append(_save(fig, prefix, "attainment"))

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(layouts)), 3.6))
    names = list(layouts)
    width = 0.8 / len(slos)
    for k, (judged, label) in enumerate(zip(slos, "AB")):
        x = np.arange(len(names)) + (k - (len(slos) - 1) / 2) * width
        ax.bar(x, [goodput(layouts[n]["runs"], judged) for n in names], width,
               label=f"SLO {label}, seeds pooled")
        for xi, n in zip(x, names):
            alone = list(goodput_per_seed(layouts[n]["runs"], judged).values())
            ax.scatter([xi] * len(alone), alone, color="black", s=10, zorder=3)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("goodput (req/s); dots: per seed")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
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


SAME_IN_A_MERGE = ("model", "dtype", "cpus", "api", "workload", "seeds")


def merged(parts: list[dict]) -> dict:
    """One run of several runs' layouts; the first's SLO."""
    for key in SAME_IN_A_MERGE:
        if len({json.dumps(part.get(key)) for part in parts}) > 1:
            raise SystemExit(f"the runs differ in {key}: they are not one run")
    out = dict(parts[0], layouts={})
    for part in parts:
        out["layouts"].update(part["layouts"])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--plots", type=Path, default=None, help="folder for the PNGs")
    parser.add_argument("--update", type=Path, default=None, help="Markdown file to update")
    parser.add_argument("--ttft-slo", type=float, default=None)
    parser.add_argument("--tpot-slo", type=float, default=None)
    parser.add_argument("--itl-slo", type=float, default=None,
                        help="also judge SLO B: A and each request's ITL p99 within this")
    parser.add_argument("--layouts", nargs="+", default=None, help="report these only")
    parser.add_argument("--merge", action="store_true",
                        help="the JSONs are one run's parts: report them as one")
    parser.add_argument("--name", default=None,
                        help="the section and plot name (default: the JSON's stem), to "
                             "report one run under several SLOs")
    args = parser.parse_args(argv)
    if args.name and len(args.results) > 1 and not args.merge:
        parser.error("--name names one report")
    reports = [(path.stem, json.loads(path.read_text())) for path in args.results]
    if args.merge:
        reports = [(args.results[0].stem, merged([results for _, results in reports]))]
    for stem, results in reports:
        name = args.name or stem
        if args.layouts:
            results["layouts"] = {n: results["layouts"][n] for n in args.layouts}
        recorded = Slo(**results["slo"])
        a = Slo(args.ttft_slo or recorded.ttft_s, args.tpot_slo or recorded.tpot_s)
        itl = args.itl_slo or recorded.itl_p99_s
        slos = [a] + ([Slo(a.ttft_s, a.tpot_s, itl)] if itl else [])
        plots = plot(results, slos, args.plots / name) if args.plots else []
        docs = args.update.parent if args.update else None
        text = markdown(results, slos, name, plots, docs)
        print(f"## {name}\n\n{text}\n")
        if args.update:
            update(args.update, name, text)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Tables and plots from bench/results/{quality,speed}.json.

Records of the held-out protocol (bench/quality.py --profile heldout, issue 13) get
their own table (heldout_tables): the ft-owl recipe and its parts against plain
admm-grad at each setting, as means over calibration seeds with their spread.

    python bench/report.py                 # print the Markdown tables, write the plots
    python bench/report.py --write-docs    # also put the tables into docs/benchmarks.md

The tables in docs/benchmarks.md sit between `<!-- BEGIN name -->` and
`<!-- END name -->` markers and are replaced wholesale, so every number in them
comes from the JSON files.
"""
from __future__ import annotations

import argparse
import re
import textwrap
from collections import defaultdict
from pathlib import Path

from common import REPO, load_records

RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs" / "benchmarks.md"
COLUMNS = [("unstructured", 0.5), ("unstructured", 0.6), ("unstructured", 0.7), ("unstructured", 0.8),
           ("2:4", 0.5), ("4:8", 0.5)]
METHOD_ORDER = ["dense", "magnitude", "wanda", "sparsegpt", "admm", "admm-grad"]
PLOT_METHODS = ["magnitude", "wanda", "sparsegpt", "admm", "admm-grad", "admm-grad-owl"]


def _col_name(pattern: str, sparsity: float) -> str:
    return f"{sparsity:.0%}" if pattern == "unstructured" else pattern


def _method_key(name: str):
    return (METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER), name)


def is_heldout(record: dict) -> bool:
    return "heldout" in record["protocol"]


def quality_tables(records: list[dict]) -> str:
    """Per protocol: one table per metric, methods down, sparsity patterns across
    (held-out records: see heldout_tables)."""
    out = []
    by_protocol = defaultdict(list)
    for r in records:
        if is_heldout(r):
            continue
        by_protocol[(r["model"], r["protocol"])].append(r)
    for (model, protocol), recs in by_protocol.items():
        cells = {(r["method"], r["pattern"], round(r["sparsity"], 4)): r for r in recs}
        methods = sorted({r["method"] for r in recs}, key=_method_key)
        commits = sorted({r["commit"] for r in recs})
        devices = sorted({r.get("device", "?") for r in recs})
        out.append(f"Model `{model}`, protocol `{protocol}`; {len(recs)} records, "
                   f"commit(s) {', '.join(f'`{c}`' for c in commits)}, "
                   f"device(s) {', '.join(f'`{d}`' for d in devices)}.\n")
        for metric, title, fmt in (("wikitext2_ppl", "WikiText-2 perplexity", "{:.2f}"),
                                   ("c4_ppl", "C4 validation perplexity", "{:.2f}"),
                                   ("prune_seconds", "Prune seconds (wall, shared CPU: indicative only)",
                                    "{:.0f}")):
            out.append(f"**{title}** (lower is better; dense: sparsity 0)\n")
            out.append("| method | " + " | ".join(_col_name(*c) for c in COLUMNS) + " |")
            out.append("|---" * (len(COLUMNS) + 1) + "|")
            for m in methods:
                row = []
                for pattern, sparsity in COLUMNS:
                    r = cells.get((m, pattern, sparsity))
                    if m == "dense":
                        r = cells.get((m, "unstructured", 0.0))
                    row.append(fmt.format(r[metric]) if r else "")
                out.append(f"| {m} | " + " | ".join(row) + " |")
            out.append("")
    return "\n".join(out)


def quality_plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = sorted({r["protocol"] for r in records if not is_heldout(r)})
    fig, axes = plt.subplots(len(protocols), 2, figsize=(11, 4.2 * len(protocols)), squeeze=False)
    for row, protocol in enumerate(protocols):
        recs = [r for r in records if r["protocol"] == protocol and r["pattern"] == "unstructured"]
        for col, (metric, title) in enumerate((("wikitext2_ppl", "WikiText-2"), ("c4_ppl", "C4 validation"))):
            ax = axes[row][col]
            for m in PLOT_METHODS:
                pts = sorted((r["sparsity"], r[metric]) for r in recs if r["method"] == m)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            dense = [r[metric] for r in recs if r["method"] == "dense"]
            if dense:
                ax.axhline(dense[0], color="gray", linestyle="--", label="dense")
            ax.set_yscale("log")
            ax.set_xlabel("unstructured sparsity")
            ax.set_ylabel("perplexity (log scale)")
            ax.set_title(title + "\n" + "\n".join(textwrap.wrap(protocol, 70)), fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


HELDOUT_METHODS = [("admm-grad", "admm-grad (plain)"), ("admm-grad-owl", "+ OWL only"),
                   ("admm-grad-ft", "+ block fine-tune only"), ("admm-grad-ft-owl", "recipe: + OWL + fine-tune")]
# Issue 13: the recipe's mean WikiText-2 change against plain admm-grad must be at most
# this (C4 no worse at every setting, prune time at most 3x).
HELDOUT_TARGETS = {("unstructured", 0.6): -0.10, ("unstructured", 0.7): -0.10, ("2:4", 0.5): -0.05,
                   ("unstructured", 0.5): 0.0, ("unstructured", 0.8): 0.0}
TIME_LIMIT = 3.0


def _setting_key(setting: tuple[str, float]):
    pattern, sparsity = setting
    return (pattern != "unstructured", pattern, sparsity)


def heldout_tables(records: list[dict]) -> str:
    """Per held-out protocol: each setting's methods with mean ± sample standard
    deviation over the seeds, the change against plain admm-grad, and whether the
    recipe meets issue 13's target there."""
    out = []
    groups = defaultdict(list)
    for r in records:
        if is_heldout(r):
            groups[(r["model"], r["protocol"])].append(r)
    for (model, protocol), recs in groups.items():
        commits = sorted({r["commit"] for r in recs})
        devices = sorted({r.get("device", "?") for r in recs})
        out.append(f"Model `{model}`, protocol `{protocol}`; {len(recs)} records (each the mean of "
                   f"{len(recs[0].get('seeds', [])) or '?'} seeds), commit(s) {', '.join(f'`{c}`' for c in commits)}, "
                   f"device(s) {', '.join(f'`{d}`' for d in devices)}. ± is the sample standard deviation "
                   f"over the seeds; Δ is against plain admm-grad's mean at the same setting.\n")
        out.append("| setting | method | WikiText-2 | Δ | C4 | Δ | prune s | x plain | target |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        cells = {(r["pattern"], round(r["sparsity"], 4), r["method"]): r for r in recs}
        for setting in sorted({(r["pattern"], round(r["sparsity"], 4)) for r in recs}, key=_setting_key):
            plain = cells.get((*setting, "admm-grad"))
            for method, label in HELDOUT_METHODS:
                r = cells.get((*setting, method))
                if r is None:
                    continue
                row = [_col_name(*setting), label,
                       f"{r['wikitext2_ppl']:.2f} ± {r.get('wikitext2_ppl_std', 0):.2f}", "",
                       f"{r['c4_ppl']:.2f} ± {r.get('c4_ppl_std', 0):.2f}", "", f"{r['prune_seconds']:.1f}", "", ""]
                if plain is not None and r is not plain:
                    wiki = r["wikitext2_ppl"] / plain["wikitext2_ppl"] - 1
                    c4 = r["c4_ppl"] / plain["c4_ppl"] - 1
                    time = r["prune_seconds"] / plain["prune_seconds"]
                    row[3], row[5], row[7] = f"{wiki:+.1%}", f"{c4:+.1%}", f"{time:.2f}"
                    target = HELDOUT_TARGETS.get(setting)
                    if r["commit"] != plain["commit"]:
                        # The issue judges the recipe only against plain admm-grad at the same commit.
                        row[8] = f"not judged: commit {r['commit']}, plain's {plain['commit']}"
                    elif method == "admm-grad-ft-owl" and target is not None:
                        met = wiki <= target and c4 <= 0 and time <= TIME_LIMIT
                        row[8] = f"{'met' if met else 'missed'} (WikiText-2 ≤ {target:+.0%}, C4 ≤ 0, ≤ {TIME_LIMIT:g}x)"
                out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def speed_tables(records: list[dict]) -> str:
    out = []
    groups = defaultdict(list)
    for r in records:
        groups[(r["profile"], r["device"])].append(r)
    for (profile, device), recs in groups.items():
        commits = sorted({r["commit"] for r in recs})
        out.append(f"Profile `{profile}`, device `{device}`, commit(s) {', '.join(f'`{c}`' for c in commits)}; "
                   f"50 % unstructured; peak memory: {recs[0]['peak_kind']}.\n")
        layer = [r for r in recs if r["scope"] == "layer"]
        methods = sorted({r["method"] for r in layer}, key=lambda m: (m != "wanda", m != "sparsegpt", m))
        if layer:
            out.append("**Per-layer solve seconds** (median; d_out x d_in; ratio = admm-grad / sparsegpt)\n")
            out.append("| series | shape | " + " | ".join(methods) + " | ratio |")
            out.append("|---" * (len(methods) + 3) + "|")
            seen = []
            for r in layer:
                if (r["series"], r["shape"]) not in seen:
                    seen.append((r["series"], r["shape"]))
            for series, shape in seen:
                cell = {r["method"]: r for r in layer if r["series"] == series and r["shape"] == shape}
                ratio = ""
                if "admm-grad" in cell and "sparsegpt" in cell:
                    ratio = f"{cell['admm-grad']['seconds'] / cell['sparsegpt']['seconds']:.2f}"
                out.append(f"| {series} | {shape} | "
                           + " | ".join(f"{cell[m]['seconds']:.3f}" if m in cell else "" for m in methods)
                           + f" | {ratio} |")
            out.append("")
        model = [r for r in recs if r["scope"] == "model"]
        if model:
            ref = next((r["seconds"] for r in model if r["method"] == "sparsegpt" and r.get("seconds")), None)
            out.append("**Whole-model prune** (wall seconds from the start of calibration capture to the last "
                       "block's propagation; capture / gram / solve / propagate split; peaks: device, host)\n")
            out.append("| model | method | seconds | capture | gram | solve | propagate | x sparsegpt "
                       "| peak GiB | host peak GiB |")
            out.append("|---|---|---|---|---|---|---|---|---|---|")
            for r in model:
                if not r.get("seconds"):
                    why = f"timed out after {r['limit_s']:.0f} s" if r.get("timed_out") else "failed"
                    out.append(f"| {r['shape']} | {r['method']} | {why} | | | | | | | |")
                    continue
                # Older records (before the phase split) have only capture and solve seconds.
                phases = r.get("phase_seconds") or {p: r[f"{p}_seconds"] for p in ("capture", "solve")
                                                     if r.get(f"{p}_seconds") is not None}
                host = f"{r['host_peak_gib']:.2f}" if r.get("host_peak_gib") is not None else ""
                ratio = f"{r['seconds'] / ref:.2f}" if ref else ""
                out.append(f"| {r['shape']} | {r['method']} | {r['seconds']:.1f} | "
                           + " | ".join(f"{phases[p]:.1f}" if p in phases else ""
                                        for p in ("capture", "gram", "solve", "propagate"))
                           + f" | {ratio} | {r['peak_gib']:.2f} | {host} |")
            out.append("")
    return "\n".join(out)


def speed_plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in records if r["scope"] == "layer" and r["series"] == "d_in sweep"]
    if not sweep:
        return
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for (profile, device) in sorted({(r["profile"], r["device"]) for r in sweep}):
        for m in sorted({r["method"] for r in sweep}):
            pts = sorted((int(r["shape"].split("x")[1]), r["seconds"]) for r in sweep
                         if r["method"] == m and r["profile"] == profile and r["device"] == device)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{m} ({device})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("d_in")
    ax.set_ylabel("seconds per layer (median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"docs: no <!-- BEGIN {name} --> ... <!-- END {name} --> markers")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quality", type=Path, default=RESULTS / "quality.json")
    parser.add_argument("--speed", type=Path, default=RESULTS / "speed.json")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    quality, speed = load_records(args.quality), load_records(args.speed)
    q_table, s_table = quality_tables(quality), speed_tables(speed)
    print(q_table)
    print(heldout_tables(quality))
    print(s_table)
    if quality:
        quality_plot(quality, RESULTS / "quality_ppl_vs_sparsity.png")
    if speed:
        speed_plot(speed, RESULTS / "speed_vs_din.png")
    if args.write_docs:
        text = DOCS.read_text(encoding="utf-8")
        text = replace_section(text, "quality", q_table or "_No records yet._")
        text = replace_section(text, "heldout", heldout_tables(quality) or "_No records yet._")
        text = replace_section(text, "speed", s_table or "_No records yet._")
        DOCS.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()

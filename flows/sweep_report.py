"""What a finished sweep writes: one table row per run and a perplexity-vs-sparsity
plot per model, under sweeps/<stamp>/ in the workspace.

  results.csv                    the table (model, method, sparsity, pattern, dense
                                 and pruned perplexities, status, experiment, ...)
  results.md                     the same table and the plots, for reading
  ppl-vs-sparsity-<model>.png    per model: one line per method (and N:M pattern),
                                 the dense model as a dashed line; WikiText-2 and C4

The row's model, method, sparsity and pattern come from the run's own params (what
was checked before it was submitted), its numbers from its metrics/eval.json, so a
failed run still has its row.
"""
from __future__ import annotations

import re
from pathlib import Path

from pruning.masks import parse_pattern
from stages.artifact_io import write_csv

SWEEPS_DIR = Path("sweeps")  # under the workspace; git-ignored

COLUMNS = ("model", "method", "sparsity", "pattern", "dense_wikitext2_ppl", "pruned_wikitext2_ppl",
           "dense_c4_ppl", "pruned_c4_ppl", "achieved_sparsity", "status", "seconds", "stages_run", "run",
           "experiment")
DATASETS = (("wikitext2", "WikiText-2"), ("c4", "C4"))


def slug(text) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:40]


def target_sparsity(prune: dict) -> float:
    """The sparsity a run aims at: prune.sparsity, or 1 - N/M for an N:M pattern."""
    nm = parse_pattern(prune["pattern"])
    return round(1 - nm[0] / nm[1], 6) if nm else prune["sparsity"]


def table_row(name: str, params: dict, outcome: dict) -> dict:
    """One run's row. outcome: the sweep task's result, or {"status": "failed", ...}."""
    metrics = outcome.get("metrics") or {}
    row = {"model": params["model"]["source"], "method": params["prune"]["method"],
           "sparsity": target_sparsity(params["prune"]), "pattern": params["prune"]["pattern"]}
    for key, _ in DATASETS:
        row[f"dense_{key}_ppl"] = metrics.get(f"dense_{key}_ppl")
        row[f"pruned_{key}_ppl"] = metrics.get(f"{key}_ppl")
    row.update({"achieved_sparsity": metrics.get("sparsity"), "status": outcome["status"],
                "seconds": outcome.get("seconds"), "stages_run": ",".join(outcome.get("ran", [])) or "-",
                "run": name, "experiment": outcome.get("experiment") or outcome.get("error")})
    return row


def ppl_vs_sparsity_figure(rows: list[dict], model: str):
    """Perplexity against target sparsity for one model: a line per method (and
    pattern), the dense model as a dashed horizontal line; log perplexity axis."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    done = [r for r in rows if r["status"] == "finished"]
    fig, axes = plt.subplots(1, len(DATASETS), figsize=(11, 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], DATASETS):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in done:
            label = r["method"] if r["pattern"] == "unstructured" else f"{r['method']} ({r['pattern']})"
            series.setdefault(label, []).append((r["sparsity"], r[f"pruned_{key}_ppl"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        dense = [r[f"dense_{key}_ppl"] for r in done if r[f"dense_{key}_ppl"] is not None]
        if dense:
            ax.axhline(dense[0], color="black", ls="--", lw=1, label="dense")
        ax.set_yscale("log")
        # Plain numbers (274, not 2.74x10^2), on the minor ticks too when the range is narrow.
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
        ax.set_xlabel("sparsity")
        ax.set_ylabel(f"{title} perplexity")
        ax.set_title(f"{model}: {title}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _markdown_table(rows: list[dict], columns) -> list[str]:
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows])


def write_sweep_outputs(out_dir: Path, rows: list[dict]) -> dict:
    """results.csv, one PNG per model, results.md; returns their paths."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "results.csv", rows)
    plots = []
    for model in dict.fromkeys(r["model"] for r in rows):
        model_rows = [r for r in rows if r["model"] == model]
        if not any(r["status"] == "finished" for r in model_rows):
            continue
        fig = ppl_vs_sparsity_figure(model_rows, model)
        path = out_dir / f"ppl-vs-sparsity-{slug(model)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        plots.append(path)
    failed = sum(r["status"] != "finished" for r in rows)
    lines = [f"# Sweep {out_dir.name}: {len(rows)} runs" + (f", {failed} failed" if failed else ""), "",
             *_markdown_table(rows, COLUMNS), "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    (out_dir / "results.md").write_text("\n".join(lines), encoding="utf-8")
    return {"csv": out_dir / "results.csv", "markdown": out_dir / "results.md", "plots": plots}

"""Stage `report`: the Markdown report, run_meta.json and the exported pruned model.

reports/report.md      dense vs pruned table, pruning cost, per-layer plots
reports/plots/*.png    per-layer relative error and sparsity
reports/run_meta.json  git commit, sha256 of every input artifact, library
                       versions, device, seeds and params: enough to trace any
                       number in the report to the bytes that produced it
reports/model/         the pruned model (safetensors + config + tokenizer), loadable
                       with AutoModelForCausalLM.from_pretrained, with a model card
                       (README.md: method, sparsity, metrics and protocol, lineage):
                       ready for `admm-prune publish`
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

from .artifact_io import read_csv, read_json, write_json
from .hashing import code_fingerprint, hash_json, library_fingerprint, tree_manifest
from .model_card import CardFacts, calibration_sentence, source_facts, write_card
from .params import LOCAL_TEXT_SUFFIXES, load_params
from .paths import (CALIBRATION_DIR, CONVERT_METRICS, CONVERTED_DIR, EVAL_LAYERS_PLOT, EVAL_METRICS,
                    MODEL_DIR, MODEL_SOURCE_JSON, PRUNE_LAYERS_PLOT, PRUNE_LOG, PRUNE_METRICS, PRUNED_DIR,
                    REPORT_DIR)
from .runtime import EXPERIMENT_ENV, main_wrapper, say

STAGE = "report"
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "datasets", "numpy", "accelerate",
            "gguf", "dvc", "prefect", "admm-prune")


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info(eval_device: str) -> dict:
    import torch
    info = {"evaluate": eval_device, "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def input_artifacts(params: dict) -> dict:
    paths = [MODEL_DIR, CALIBRATION_DIR, PRUNED_DIR, CONVERTED_DIR, PRUNE_METRICS, CONVERT_METRICS,
             EVAL_METRICS, PRUNE_LAYERS_PLOT, EVAL_LAYERS_PLOT]
    for spec in (params["calibrate"]["data"], params["evaluate"]["wikitext2"], params["evaluate"]["c4"]):
        if Path(spec["path"]).suffix in LOCAL_TEXT_SUFFIXES:
            paths.append(Path(spec["path"]))
    out = {}
    for path in paths:
        files = tree_manifest(path)
        out[str(path)] = {"sha256": hash_json(files) if path.is_dir() else next(iter(files.values())),
                          "files": files if path.is_dir() else None}
    return out


def layer_targets(prune_log: dict) -> dict[str, float]:
    """Target sparsity of every pruned layer (full name), from the settings the prune
    stage resolved per block (an N:M pattern without a sparsity targets 1 - N/M; a
    layer with a user mask targets what its mask prunes)."""
    from pruning.masks import parse_pattern

    targets = {}
    for layer in prune_log["layers"]:
        in_block = prune_log["block_settings"][int(layer["block"])]["layers"]
        settings = next(v for k, v in in_block.items() if layer["name"].endswith("." + k))
        if settings.get("user_mask"):  # the user's mask sets it: its own fraction of pruned weights
            targets[layer["name"]] = layer["sparsity"]
            continue
        nm = parse_pattern(settings["pattern"])
        targets[layer["name"]] = settings["sparsity"] if settings["sparsity"] is not None else 1 - nm[0] / nm[1]
    return targets


SPARSITY_TOLERANCE = 0.005  # |achieved - target| below this counts as "on target"


def sparsity_rows(prune_rows: list[dict], eval_rows: list[dict], targets: dict[str, float]) -> list[dict]:
    """Per pruned layer: block, layer, achieved sparsity (measured by evaluate), target."""
    block_of = {row["layer"]: int(row["block"]) for row in prune_rows}
    return [{"block": block_of[row["layer"]], "layer": row["layer"], "sparsity": float(row["sparsity"]),
             "target": targets[row["layer"]]} for row in eval_rows]


def uniform_sparsity(rows: list[dict]) -> float | None:
    """The common sparsity when every layer has one target and meets it (a plot of it
    would be a flat line); None otherwise."""
    targets = {round(r["target"], 6) for r in rows}
    if len(targets) == 1 and all(abs(r["sparsity"] - r["target"]) < SPARSITY_TOLERANCE for r in rows):
        return targets.pop()
    return None


def _by_kind(rows: list[dict], key: str) -> dict[str, list[tuple[int, float]]]:
    """Points (block, value) per layer kind (q_proj, ..., down_proj)."""
    kinds: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        kinds.setdefault(row["layer"].rsplit(".", 1)[-1], []).append((int(row["block"]), float(row[key])))
    return dict(sorted(kinds.items()))


def _block_axes(figsize=(10, 4)):
    """A figure whose x axis is the decoder block, with integer ticks only."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=figsize)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder block")
    ax.grid(alpha=0.3)
    return fig, ax


def _legend_below(ax, n: int) -> None:
    ax.legend(fontsize=7, ncol=min(n, 7), loc="upper center", bbox_to_anchor=(0.5, -0.15))


def error_figure(prune_rows: list[dict]):
    """Relative output error of every layer, one line per layer kind across the blocks."""
    fig, ax = _block_axes()
    kinds = _by_kind(prune_rows, "rel_error")
    for kind, pts in kinds.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=0.8, label=kind)
    ax.set_yscale("log")
    ax.set_ylabel("relative output error ‖XΔWᵀ‖²/‖XWᵀ‖²")
    _legend_below(ax, len(kinds))
    fig.tight_layout()
    return fig


def sparsity_figure(rows: list[dict]):
    """Achieved sparsity per layer kind across the blocks, with every layer's target
    as a black tick: overrides and layers that miss their target stand out."""
    fig, ax = _block_axes()
    kinds = _by_kind(rows, "sparsity")
    for kind, pts in kinds.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=0.8, label=kind)
    targets = sorted({(r["block"], round(r["target"], 6)) for r in rows})
    ax.scatter([t[0] for t in targets], [t[1] for t in targets], marker="_", s=300, color="black",
               label="target", zorder=3)
    ax.set_ylabel("fraction of zero weights")
    _legend_below(ax, len(kinds) + 1)
    fig.tight_layout()
    return fig


def layer_plots(prune_rows: list[dict], eval_rows: list[dict], prune_log: dict, out_dir: Path) -> list[str]:
    """Write the per-layer plots; return the report's Markdown lines for them.

    layer_error.png always. layer_sparsity.png only when the sparsity varies across
    layers or misses its target: for a uniform run it would be a flat line, so the
    report states the one value instead."""
    import matplotlib.pyplot as plt

    rows = sparsity_rows(prune_rows, eval_rows, layer_targets(prune_log))
    uniform = uniform_sparsity(rows)
    figures = {"layer_error.png": error_figure(prune_rows)}
    if uniform is None:
        figures["layer_sparsity.png"] = sparsity_figure(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
    lines = [f"![{name}]({out_dir.name}/{name})" for name in figures]
    if uniform is not None:
        lines.append(f"Every one of the {len(rows)} pruned layers has its target sparsity "
                     f"{uniform:.4f} (within {SPARSITY_TOLERANCE}), so there is no per-layer sparsity plot.")
    return lines


def _fmt(value, digits=3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(params: dict, source: dict, ev: dict, pr: dict, conv: dict, meta: dict, plot_lines: list[str]) -> str:
    p, e = params["prune"], params["evaluate"]
    protocol = ("full protocol" if ev["protocol"] == "full"
                else f"CPU subset, not the paper protocol: at most {e['max_windows']} windows per dataset")
    lines = [
        f"# Pruning report: {source['source']}, {p['method']} at sparsity {p['sparsity']} ({p['pattern']})",
        "",
        f"Perplexity on windows of {ev['seqlen']} tokens, batch 1 ({protocol}; "
        f"WikiText-2: {ev['wikitext2_windows']} windows, C4 validation: {ev['c4_windows']} windows"
        + ("; every window is BOS + seqlen - 1 text tokens, as this model family needs" if ev.get("window_bos") else "")
        + ").",
        "",
        "| | dense | pruned |",
        "|---|---:|---:|",
        f"| WikiText-2 perplexity | {_fmt(ev.get('dense_wikitext2_ppl'))} | {_fmt(ev['wikitext2_ppl'])} |",
        f"| C4 perplexity | {_fmt(ev.get('dense_c4_ppl'))} | {_fmt(ev['c4_ppl'])} |",
        f"| sparsity of the pruned linear layers | 0 | {_fmt(ev['sparsity'], 4)} |",
    ]
    if ev.get("nm_valid") is not None:
        lines.append(f"| {p['pattern']} pattern valid in every layer | — | {ev['nm_valid']} |")
    if conv.get("packed"):
        lines.append(f"| linear weights on disk (MiB) | {conv['dense_bytes'] / 2**20:.1f} | "
                     f"{conv['packed_bytes'] / 2**20:.1f} ({conv.get('format', 'packed')} {p['pattern']}) |")
    lines += [
        "",
        f"Calibration: {params['calibrate']['nsamples']} windows x {params['calibrate']['seqlen']} tokens of "
        f"{params['calibrate']['data']['path']}, seed {params['calibrate']['seed']}.",
        f"Pruning: {pr['prune_seconds']:.1f} s, peak RSS {pr['peak_rss_mib']:.0f} MiB"
        + (f", peak CUDA {pr['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in pr else "")
        + f"; {len(pr['computed_blocks'])} of {pr['blocks']} blocks computed, {len(pr['reused_blocks'])} reused from the "
          f"block store; mean relative layer error {pr['mean_rel_error']:.4g}.",
        "",
        *plot_lines,
        "",
        "## Provenance",
        "",
        f"- git commit: `{meta['git']['commit']}`" + (" (with uncommitted changes)" if meta["git"]["dirty"] else ""),
        f"- model: {source['source']} ({source['architecture']}, {source['parameters'] / 1e6:.1f}M parameters, "
        f"{source['dtype']}), artifact sha256 `{meta['inputs'][str(MODEL_DIR)]['sha256'][:16]}`",
        f"- calibration sha256 `{meta['inputs'][str(CALIBRATION_DIR)]['sha256'][:16]}`, "
        f"pruned model sha256 `{meta['inputs'][str(PRUNED_DIR)]['sha256'][:16]}`",
        f"- torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}, "
        f"device {meta['device']['evaluate']}",
        "- everything else: `run_meta.json`; the pruned model: `model/` (`AutoModelForCausalLM.from_pretrained`; "
        "its model card is `model/README.md`)",
        "",
    ]
    return "\n".join(lines)


def lineage(source: dict, meta: dict) -> dict:
    """What the card says this model came from: commit, experiment, input hashes."""
    git = meta["git"]
    inputs = meta["inputs"]
    origin = {"alias": f"alias {source['source']}", "local": "a local directory", "hub": "the Hugging Face hub"}
    model_line = f"{source_facts(source)['source']} from {origin.get(source.get('kind'), 'unknown')}"
    if source.get("file"):
        model_line += f" (`{source['file']}`, sha256 `{source['sha256']}`)"
    elif source.get("sha256"):
        model_line += f" (sha256 `{source['sha256']}`)"
    if source.get("commit"):
        model_line += f", hub commit `{source['commit']}`"
    out = {
        "git commit": f"`{git['commit']}`" + (" (with uncommitted changes)" if git["dirty"] else ""),
        # The pipeline names the experiment it saves the run as (run_meta.json's experiment).
        "experiment": (f"`{meta['experiment']['name']}` (`admm-prune runs`)" if meta["experiment"]["name"]
                       else "none (a run not saved as an experiment)"),
        "params sha256": f"`{hash_json(meta['params'])}`",
        "model source": model_line,
    }
    for path, entry in inputs.items():
        if not path.startswith("metrics/") and not path.startswith("plots/"):
            out[f"`{path}` sha256"] = f"`{entry['sha256']}`"
    return out


def run() -> None:
    params = load_params()
    source = read_json(MODEL_DIR / MODEL_SOURCE_JSON)
    ev, pr, conv = read_json(EVAL_METRICS), read_json(PRUNE_METRICS), read_json(CONVERT_METRICS)

    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    export = REPORT_DIR / "model"
    if export.exists():
        shutil.rmtree(export)
    shutil.copytree(PRUNED_DIR, export)

    git = git_state()
    meta = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git,
        # The experiment this run is saved as, on top of git.commit (its baseline);
        # null for a plain `dvc repro` or a run with --no-save.
        "experiment": {"name": os.environ.get(EXPERIMENT_ENV) or None, "baseline": git["commit"]},
        "torch_threads": {"prune": pr.get("torch_threads")},
        "params": {k: params[k] for k in ("model", "calibrate", "prune", "convert", "evaluate")},
        "seeds": {"calibrate.seed": params["calibrate"]["seed"],
                  **({"tiny-random-llama weights": 0} if source["source"] == "tiny-random-llama" else {})},
        "device": device_info(ev["device"]),
        "versions": versions(),
        "code": {"pruning": library_fingerprint(), "stages": code_fingerprint(Path(__file__).parent),
                 "flows": code_fingerprint(Path(__file__).parents[1] / "flows")},
        "model_source": source,
        "inputs": input_artifacts(params),
        "metrics": {"evaluate": ev, "prune": pr, "convert": conv},
    }
    write_json(REPORT_DIR / "run_meta.json", meta)
    plot_lines = layer_plots(read_csv(PRUNE_LAYERS_PLOT), read_csv(EVAL_LAYERS_PLOT),
                             read_json(PRUNED_DIR / PRUNE_LOG), REPORT_DIR / "plots")
    (REPORT_DIR / "report.md").write_text(markdown(params, source, ev, pr, conv, meta, plot_lines), encoding="utf-8")
    c = params["calibrate"]
    write_card(export, CardFacts(
        **source_facts(source), evaluation=ev, lineage=lineage(source, meta),
        calibration=calibration_sentence(c["nsamples"], c["seqlen"], c["seed"], f"`{c['data']['path']}`")))
    say(STAGE, f"report -> {REPORT_DIR / 'report.md'}, exported model -> {export}")


if __name__ == "__main__":
    main_wrapper(STAGE, run)

"""Stage `report`: the Markdown report, run_meta.json and the exported pruned model.

reports/report.md      dense vs pruned table, pruning cost, per-layer plots
reports/plots/*.png    per-layer relative error and sparsity
reports/run_meta.json  git commit, sha256 of every input artifact, library
                       versions, device, seeds and params: enough to trace any
                       number in the report to the bytes that produced it
reports/model/         the pruned model (safetensors + config + tokenizer), loadable
                       with AutoModelForCausalLM.from_pretrained
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
from .params import LOCAL_TEXT_SUFFIXES, load_params
from .paths import (CALIBRATION_DIR, CONVERT_METRICS, CONVERTED_DIR, EVAL_LAYERS_PLOT, EVAL_METRICS,
                    MODEL_DIR, MODEL_SOURCE_JSON, PRUNE_LAYERS_PLOT, PRUNE_METRICS, PRUNED_DIR, REPORT_DIR)
from .runtime import main_wrapper, say

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


def plot_layers(prune_rows: list[dict], eval_rows: list[dict], out_dir: Path) -> list[str]:
    """One line per layer kind (q_proj, ..., down_proj) across the blocks."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    block_of = {row["layer"]: int(row["block"]) for row in prune_rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, rows, key, ylabel, log in (
            ("layer_error.png", prune_rows, "rel_error", "relative output error ‖XΔWᵀ‖²/‖XWᵀ‖²", True),
            ("layer_sparsity.png", eval_rows, "sparsity", "fraction of zero weights", False)):
        fig, ax = plt.subplots(figsize=(10, 4))
        kinds = sorted({r["layer"].rsplit(".", 1)[-1] for r in rows})
        for kind in kinds:
            pts = [(block_of.get(r["layer"], int(r["index"])), float(r[key]))
                   for r in rows if r["layer"].endswith("." + kind)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=0.8, label=kind)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("decoder block")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, ncol=min(len(kinds), 7), loc="upper center", bbox_to_anchor=(0.5, -0.15))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        figures.append(name)
    return figures


def _fmt(value, digits=3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(params: dict, source: dict, ev: dict, pr: dict, conv: dict, meta: dict, figures: list[str]) -> str:
    p, e = params["prune"], params["evaluate"]
    protocol = ("full protocol" if ev["protocol"] == "full"
                else f"CPU subset, not the paper protocol: at most {e['max_windows']} windows per dataset")
    lines = [
        f"# Pruning report: {source['source']}, {p['method']} at sparsity {p['sparsity']} ({p['pattern']})",
        "",
        f"Perplexity on windows of {ev['seqlen']} tokens, batch 1 ({protocol}; "
        f"WikiText-2: {ev['wikitext2_windows']} windows, C4 validation: {ev['c4_windows']} windows).",
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
        *[f"![{name}](plots/{name})" for name in figures],
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
        "- everything else: `run_meta.json`; the pruned model: `model/` (`AutoModelForCausalLM.from_pretrained`)",
        "",
    ]
    return "\n".join(lines)


def run() -> None:
    params = load_params()
    source = read_json(MODEL_DIR / MODEL_SOURCE_JSON)
    ev, pr, conv = read_json(EVAL_METRICS), read_json(PRUNE_METRICS), read_json(CONVERT_METRICS)

    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    export = REPORT_DIR / "model"
    if export.exists():
        shutil.rmtree(export)
    shutil.copytree(PRUNED_DIR, export)

    meta = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git_state(),
        "params": {k: params[k] for k in ("model", "calibrate", "prune", "convert", "evaluate")},
        "seeds": {"calibrate.seed": params["calibrate"]["seed"],
                  **({"tiny-random-llama weights": 0} if source["source"] == "tiny-random-llama" else {})},
        "device": device_info(ev["device"]),
        "versions": versions(),
        "code": {"pruning": library_fingerprint(), "stages": code_fingerprint(Path(__file__).parent)},
        "model_source": source,
        "inputs": input_artifacts(params),
        "metrics": {"evaluate": ev, "prune": pr, "convert": conv},
    }
    write_json(REPORT_DIR / "run_meta.json", meta)
    figures = plot_layers(read_csv(PRUNE_LAYERS_PLOT), read_csv(EVAL_LAYERS_PLOT), REPORT_DIR / "plots")
    (REPORT_DIR / "report.md").write_text(markdown(params, source, ev, pr, conv, meta, figures), encoding="utf-8")
    say(STAGE, f"report -> {REPORT_DIR / 'report.md'}, exported model -> {export}")


if __name__ == "__main__":
    main_wrapper(STAGE, run)

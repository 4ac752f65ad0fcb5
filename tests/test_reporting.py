"""What people read: the per-run report's plots, the sweep's table and plot, images
embedded in Prefect artifacts, stage output kept for the logs, and the CLI/repo
small print (serve's options, ignored files, the README's DAG). Fast: no pipeline
runs here (the end-to-end checks are in test_flows.py and test_pipeline_dvc.py)."""
from __future__ import annotations

import base64
import csv
import subprocess
import sys

import pytest

from pipeline_support import ROOT

BLOCKS = 4
KINDS = ("self_attn.q_proj", "mlp.down_proj")


def _prune_log(block_sparsity=None, pattern="unstructured"):
    """A prune_log.json as the prune stage writes it, for a 4-block model."""
    layers, block_settings = [], []
    for b in range(BLOCKS):
        sparsity = None if pattern != "unstructured" else (block_sparsity or {}).get(b, 0.5)
        block_settings.append({"layers": {k: {"method": "wanda", "sparsity": sparsity, "pattern": pattern,
                                              "options": {}} for k in KINDS}})
        layers += [{"name": f"model.layers.{b}.{k}", "block": b, "sparsity": sparsity or 0.5,
                    "rel_error": 0.01 * (b + 1)} for k in KINDS]
    return {"block_settings": block_settings, "layers": layers}


def _rows(log, achieved=None):
    prune_rows = [{"index": str(i), "block": str(r["block"]), "layer": r["name"], "rel_error": str(r["rel_error"]),
                   "sparsity": str(r["sparsity"])} for i, r in enumerate(log["layers"])]
    eval_rows = [{"index": str(i), "layer": r["name"], "sparsity": str((achieved or {}).get(r["name"], r["sparsity"]))}
                 for i, r in enumerate(log["layers"])]
    return prune_rows, eval_rows


def test_block_axis_has_integer_ticks_only():
    """Red if the block axis lets matplotlib pick 0.5-steps (0.5, 1.5, ... on a 4-block model)."""
    from stages.report import error_figure

    fig = error_figure(_rows(_prune_log())[0])
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_uniform_run_states_its_sparsity_instead_of_a_flat_plot(tmp_path):
    """Red if a uniform run draws layer_sparsity.png again (a flat line), or the
    report stops saying what the common sparsity is."""
    from stages.report import layer_plots

    log = _prune_log()
    lines = layer_plots(*_rows(log), log, tmp_path / "plots")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["layer_error.png"]
    assert lines[0] == "![layer_error.png](plots/layer_error.png)"
    assert "target sparsity 0.5000" in lines[-1] and "8 pruned layers" in lines[-1]


def test_nm_pattern_targets_one_minus_n_over_m(tmp_path):
    """Red if an N:M layer (sparsity None in its settings) gets no target or a wrong one."""
    from stages.report import layer_targets

    targets = layer_targets(_prune_log(pattern="2:4"))
    assert set(targets.values()) == {0.5} and len(targets) == BLOCKS * len(KINDS)
    assert layer_targets(_prune_log(pattern="4:8"))["model.layers.0.mlp.down_proj"] == 0.5


def test_block_overrides_and_missed_targets_get_a_sparsity_plot_with_target_ticks(tmp_path):
    """Red if varying sparsity is not plotted, or the plot lacks the per-layer targets."""
    from stages.report import layer_plots, layer_targets, sparsity_figure, sparsity_rows

    log = _prune_log({3: 0.7})
    lines = layer_plots(*_rows(log), log, tmp_path / "a")
    assert (tmp_path / "a" / "layer_sparsity.png").stat().st_size > 1000
    assert "![layer_sparsity.png](a/layer_sparsity.png)" in lines

    rows = sparsity_rows(*_rows(log), layer_targets(log))
    targets = [c for c in sparsity_figure(rows).axes[0].collections if c.get_label() == "target"]
    assert len(targets) == 1 and sorted({round(y, 6) for _, y in targets[0].get_offsets()}) == [0.5, 0.7]

    log = _prune_log()  # uniform targets, but one layer misses its target
    layer_plots(*_rows(log, achieved={"model.layers.1.mlp.down_proj": 0.45}), log, tmp_path / "b")
    assert (tmp_path / "b" / "layer_sparsity.png").is_file()


def test_report_images_are_embedded_as_data_uris(tmp_path):
    """Red if the artifact keeps the relative path (Prefect's UI cannot load it) or
    mangles the image bytes."""
    from flows.artifacts import embed_images

    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_bytes(png)
    text = "x ![a](plots/a.png) y ![gone](plots/missing.png) ![web](https://e.org/b.png)"
    out = embed_images(text, tmp_path)
    assert "plots/a.png" not in out
    data = out.split("data:image/png;base64,")[1].split(")")[0]
    assert base64.b64decode(data) == png
    assert "![gone](plots/missing.png)" in out and "![web](https://e.org/b.png)" in out


def test_stage_output_keeps_messages_and_final_progress_bars_without_dvc_hints():
    """Red if progress-bar redraws flood the log, the bar's final state or the stage's
    own messages are dropped, or DVC's git/push advice comes through."""
    from flows.dvc_runner import readable_output

    output = ("Running stage 'prune':\n> python -m stages.prune\n"
              "blocks:  25%|##  | 1/4\rblocks:  50%|#### | 2/4\rblocks: 100%|########| 4/4 [00:03]\r\n"
              "[prune] pruned in 3.1 s, peak RSS 900 MiB -> artifacts/pruned\n\n"
              "Updating lock file 'dvc.lock'\nTo track the changes with git, run:\n\tgit add dvc.lock\n")
    assert readable_output(output) == ["Running stage 'prune':", "> python -m stages.prune",
                                       "blocks: 100%|########| 4/4 [00:03]",
                                       "[prune] pruned in 3.1 s, peak RSS 900 MiB -> artifacts/pruned"]


def _sweep_rows():
    from flows.sweep_report import table_row

    rows = []
    for method, base in (("wanda", 40.0), ("admm-grad", 30.0)):
        for sparsity in (0.5, 0.6):
            params = {"model": {"source": "tiny-random-llama"},
                      "prune": {"method": method, "sparsity": sparsity, "pattern": "unstructured"}}
            metrics = {"wikitext2_ppl": base * sparsity * 2, "c4_ppl": base * sparsity * 3, "sparsity": sparsity,
                       "dense_wikitext2_ppl": 20.0, "dense_c4_ppl": 25.0}
            rows.append(table_row(f"sweep-{method}-{sparsity}", params, {"status": "finished", "metrics": metrics,
                                                                        "seconds": 3.0, "ran": ["prune"],
                                                                        "experiment": "exp-x"}))
    params = {"model": {"source": "tiny-random-llama"}, "prune": {"method": "sparsegpt", "sparsity": 0.5,
                                                                  "pattern": "2:4"}}
    rows.append(table_row("sweep-failed", params, {"status": "failed", "error": "stage 'prune' failed (exit 1)"}))
    return rows


def test_sweep_table_has_model_method_sparsity_pattern_and_both_perplexities(tmp_path):
    """Red if a column is dropped, a failed run loses its row, or N:M runs show the
    sparsity param instead of 1 - N/M."""
    from flows.sweep_report import COLUMNS, write_sweep_outputs

    rows = _sweep_rows()
    written = write_sweep_outputs(tmp_path, rows)
    with open(written["csv"], newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == list(COLUMNS)
    assert {"model", "method", "sparsity", "pattern", "dense_wikitext2_ppl", "pruned_wikitext2_ppl"} <= set(COLUMNS)
    assert table[0]["dense_wikitext2_ppl"] == "20.0" and table[0]["pruned_wikitext2_ppl"] == "40.0"
    assert table[-1]["status"] == "failed" and table[-1]["pattern"] == "2:4" and table[-1]["sparsity"] == "0.5"
    assert "failed (exit 1)" in table[-1]["experiment"]
    markdown = written["markdown"].read_text()
    assert "| model | method | sparsity | pattern |" in markdown and "5 runs, 1 failed" in markdown


def test_sweep_plot_per_model_has_a_line_per_method_and_the_dense_line(tmp_path):
    """Red if the PNG is not written, or a method or the dense baseline is missing."""
    from flows.sweep_report import ppl_vs_sparsity_figure, write_sweep_outputs

    rows = _sweep_rows()
    written = write_sweep_outputs(tmp_path, rows)
    assert [p.name for p in written["plots"]] == ["ppl-vs-sparsity-tiny-random-llama.png"]
    assert written["plots"][0].stat().st_size > 1000
    assert "![ppl-vs-sparsity-tiny-random-llama](ppl-vs-sparsity-tiny-random-llama.png)" in \
        written["markdown"].read_text()
    fig = ppl_vs_sparsity_figure(rows, "tiny-random-llama")
    for ax in fig.axes:  # WikiText-2 and C4
        labels = {line.get_label() for line in ax.get_lines()}
        assert labels == {"wanda", "admm-grad", "dense"}
        wanda = next(line for line in ax.get_lines() if line.get_label() == "wanda")
        assert list(wanda.get_xdata()) == [0.5, 0.6]


def test_serve_takes_a_profile_and_documents_set_and_force():
    """Red if serve loses --profile, or --set/--force lose their help text."""
    from flows.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "--profile", "tiny", "--set", "prune.sparsity=0.6", "--force", "model"])
    assert (args.profile, args.sets, args.force) == ("tiny", ["prune.sparsity=0.6"], ["model"])
    serve = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "serve")[1]
    helps = {action.dest: action.help for action in serve._actions}
    assert helps["sets"] and helps["force"] and helps["profile"]


def test_dvc_plots_and_sweep_outputs_are_git_ignored():
    """Red if `dvc plots show` output or sweep results would show up in `git status`."""
    for path in ("dvc_plots/index.html", "sweeps/0101000000/results.csv"):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert proc.returncode == 0, f"{path} is not git-ignored"


def test_readme_shows_the_stage_graph_as_dvc_dag_md_prints_it():
    """Red if dvc.yaml's graph changes and the README's diagram is not regenerated."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "dag", "--md"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    graph = proc.stdout.strip()
    assert graph.startswith("```mermaid") and graph in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", ["params-tiny.yaml", "README.md"])
def test_tiny_profile_is_not_sold_as_a_one_minute_run(name):
    """Red if the old 'about a minute' / 'one-minute' claim comes back (measured:
    2.5-3 min, mostly six Python start-ups with torch and Prefect's server)."""
    text = (ROOT / name).read_text().lower()
    assert "about a minute" not in text and "one-minute" not in text


def test_layer_targets_of_a_user_mask_layer_are_its_masks_own():
    """Red when a user-mask layer (resolved as method admm with no sparsity or pattern
    of its own) makes the report stage crash on its missing target."""
    from stages.report import layer_targets
    log = {"block_settings": [{"layers": {
               "self_attn.q_proj": {"method": "admm", "sparsity": None, "pattern": "unstructured",
                                    "options": {}, "user_mask": True},
               "mlp.down_proj": {"method": "admm-grad", "sparsity": None, "pattern": "2:4", "options": {}}}}],
           "layers": [{"block": 0, "name": "model.layers.0.self_attn.q_proj", "sparsity": 0.3125},
                      {"block": 0, "name": "model.layers.0.mlp.down_proj", "sparsity": 0.5}]}
    assert layer_targets(log) == {"model.layers.0.self_attn.q_proj": 0.3125, "model.layers.0.mlp.down_proj": 0.5}

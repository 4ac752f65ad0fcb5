"""The DVC pipeline end to end, on tiny-random-llama in a temporary git + DVC repo.

Every claim is checked against DVC's own words ("Running stage", "didn't change",
"is cached") and against the bytes of the artifacts. The tests share one workspace
(building it runs the whole pipeline once); each test puts params.yaml back the way
it found it.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline_support import ROOT, decisions, dvc, make_repo, run, set_params, tree_digest

pytestmark = pytest.mark.slow

STAGES = ("model", "calibrate", "prune", "convert", "evaluate", "report")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("pipeline"))
    output = dvc(repo, "repro")
    assert decisions(output) == {stage: "ran" for stage in STAGES}, output
    return repo


def read_json(path):
    return json.loads(path.read_text())


def test_first_run_writes_metrics_report_and_loadable_model(repo):
    ev = read_json(repo / "metrics" / "eval.json")
    assert {"wikitext2_ppl", "c4_ppl", "sparsity"} <= set(ev)
    assert ev["wikitext2_ppl"] > 1 and ev["c4_ppl"] > 1
    assert ev["sparsity"] == pytest.approx(0.5, abs=1e-3)  # pruned linears only

    meta = read_json(repo / "reports" / "run_meta.json")
    assert len(meta["git"]["commit"]) == 40
    assert meta["seeds"]["calibrate.seed"] == 0
    assert meta["versions"]["torch"] and meta["device"]["evaluate"] == "cpu"
    for artifact in ("artifacts/model", "artifacts/calibration", "artifacts/pruned", "data/wikitext2-raw-test.txt"):
        assert len(meta["inputs"][artifact]["sha256"]) == 64
    assert meta["inputs"]["artifacts/pruned"]["sha256"] == tree_digest(repo / "artifacts" / "pruned")
    report = (repo / "reports" / "report.md").read_text()
    assert "| WikiText-2 perplexity |" in report
    assert (repo / "reports" / "plots" / "layer_error.png").stat().st_size > 1000
    # A uniform run: no flat sparsity plot, the report states the value instead.
    assert not (repo / "reports" / "plots" / "layer_sparsity.png").exists()
    assert "has its target sparsity 0.5000" in report

    # Hub-ready: a model card with the metrics and lineage, sparsity_config, no machine-local fields.
    card = (repo / "reports" / "model" / "README.md").read_text()
    assert f"| {ev['wikitext2_ppl']:.3f} |" in card and meta["git"]["commit"] in card
    assert meta["inputs"]["artifacts/pruned"]["sha256"] in card and "from_pretrained" in card
    config = read_json(repo / "reports" / "model" / "config.json")
    assert config["sparsity_config"]["method"] == "admm-grad" and config["sparsity_config"]["sparsity"] == 0.5
    assert not {"is_local", "local_files_only"} & set(read_json(repo / "reports" / "model" / "tokenizer_config.json"))

    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(repo / "reports" / "model")
    pruned = load_file(repo / "artifacts" / "pruned" / "model.safetensors")
    for name, tensor in exported.state_dict().items():
        if name in pruned:
            assert torch.equal(tensor, pruned[name]), name

    # Nothing changed: DVC does no work.
    assert decisions(dvc(repo, "repro")) == {stage: "skipped" for stage in STAGES}


def test_evaluate_param_reruns_only_evaluate_and_report(repo):
    set_params(repo, "evaluate.max_windows=1")
    try:
        got = decisions(dvc(repo, "repro"))
        assert got == {"model": "skipped", "calibrate": "skipped", "prune": "skipped", "convert": "skipped",
                       "evaluate": "ran", "report": "ran"}
        assert read_json(repo / "metrics" / "eval.json")["wikitext2_windows"] == 1
    finally:
        set_params(repo, "evaluate.max_windows=2")
        dvc(repo, "repro")


def test_sparsity_change_reruns_prune_onward_and_revert_restores_from_cache(repo):
    before = {p: tree_digest(repo / p) for p in ("artifacts/pruned", "metrics/eval.json", "reports/report.md")}
    set_params(repo, "prune.sparsity=0.6")
    try:
        got = decisions(dvc(repo, "repro"))
        assert got["model"] == got["calibrate"] == "skipped"
        assert all(got[s] == "ran" for s in ("prune", "convert", "evaluate", "report")), got
        assert read_json(repo / "metrics" / "eval.json")["sparsity"] == pytest.approx(0.6, abs=1e-3)
    finally:
        set_params(repo, "prune.sparsity=0.5")
    output = dvc(repo, "repro")
    assert "Running stage" not in output, output
    got = decisions(output)
    assert all(got[s] == "restored" for s in ("prune", "convert", "evaluate", "report")), got
    assert {p: tree_digest(repo / p) for p in before} == before


def test_two_four_pattern_is_packed_checked_and_evaluated_from_the_packed_model(repo):
    set_params(repo, "prune.pattern=2:4")
    try:
        got = decisions(dvc(repo, "repro"))
        assert got["calibrate"] == "skipped" and got["convert"] == "ran", got
        convert = read_json(repo / "metrics" / "convert.json")
        assert convert["packed"] and convert["packed_layers"] == 28
        assert convert["packed_bytes"] < 0.6 * convert["dense_bytes"]
        ev = read_json(repo / "metrics" / "eval.json")
        assert ev["nm_valid"] is True and ev["evaluated_packed"] is True
        assert ev["sparsity"] == pytest.approx(0.5)
        # What evaluate read back (the packed model) scores exactly like the unpacked one.
        from transformers import AutoModelForCausalLM

        from pruning import perplexity
        from pruning.packing import load_packed_model
        packed = load_packed_model(repo / "artifacts" / "converted")
        assert "load_packed_model" in (repo / "artifacts" / "converted" / "README.md").read_text()
        unpacked = AutoModelForCausalLM.from_pretrained(repo / "artifacts" / "pruned")
        windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
        assert perplexity(packed, windows, progress=False) == perplexity(unpacked, windows, progress=False)
    finally:
        set_params(repo, "prune.pattern=unstructured")
    dvc(repo, "repro")
    note = read_json(repo / "artifacts" / "converted" / "convert.json")
    assert note["packed"] is False and "pass through" in note["reason"]


def test_packed_fp8_format_is_written_and_evaluated_from_the_fp8_weights(repo):
    """convert.format=packed-fp8 reruns convert onward only, writes e4m3 weights, and
    evaluate scores exactly their dequantisation (each pruned linear rounded per row)."""
    from pruning.fp8 import round_rows
    from pruning.packing import load_packed_model

    set_params(repo, "prune.pattern=2:4", "convert.format=packed-fp8")
    try:
        got = decisions(dvc(repo, "repro"))
        assert got["convert"] == got["evaluate"] == "ran" and got["calibrate"] == "skipped", got
        convert = read_json(repo / "metrics" / "convert.json")
        assert convert["format"] == "packed-fp8" and convert["packed_layers"] == 28
        # tiny-random-llama: d_in 64 and 128, so the per-row scales weigh 2/64 and 2/128 of fp16
        assert convert["fp16_size_ratio"] < 0.35 and convert["dense_bytes"] == 2 * convert["fp16_dense_bytes"]
        ev = read_json(repo / "metrics" / "eval.json")
        assert ev["evaluated_format"] == "packed-fp8" and ev["nm_valid"] is True
        pruned = load_file(repo / "artifacts" / "pruned" / "model.safetensors")
        fp8 = load_packed_model(repo / "artifacts" / "converted").state_dict()
        linears = [f"{layer['name']}.weight" for layer in read_json(repo / "artifacts" / "pruned" / "prune_log.json")["layers"]]
        assert all(torch.equal(fp8[name], round_rows(pruned[name])) for name in linears)
        assert "packed-fp8 2:4" in (repo / "reports" / "report.md").read_text()
    finally:
        set_params(repo, "prune.pattern=unstructured", "convert.format=packed")
    dvc(repo, "repro")


def test_corrupted_or_missing_artifact_is_detected_and_rebuilt(repo):
    ids = repo / "artifacts" / "calibration" / "input_ids.safetensors"
    good = tree_digest(ids)
    data = bytearray(ids.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the token ids
    ids.write_bytes(bytes(data))
    assert "calibrate" in dvc(repo, "status")
    got = decisions(dvc(repo, "repro"))
    assert got["calibrate"] in ("ran", "restored")
    assert got["prune"] == "skipped"  # the rebuilt calibration is the same, so nothing downstream moves
    assert tree_digest(ids) == good

    pruned = repo / "artifacts" / "pruned"
    good = tree_digest(pruned)
    import shutil
    shutil.rmtree(pruned)
    got = decisions(dvc(repo, "repro"))
    assert got["prune"] in ("ran", "restored")
    assert tree_digest(pruned) == good


# The 34 bad settings of ../shared/bad-inputs-2026-11-23.md (numbered as there; #25, a
# YAML syntax error, has its own test), and the drift and data cases of issue 10.
# {tmp} is a directory outside the workspace holding mask and data files.
BAD_SETTINGS = [
    ("1", ["--set", "prune.sparsity=1.5"], "prune.sparsity"),
    ("2", ["--set", "prune.sparsity=-0.1"], "prune.sparsity"),
    ("3", ["--set", "prune.sparsity=abc"], "prune.sparsity"),
    ("4", ["--set", "prune.pattern=4:2"], "prune.pattern"),
    ("5", ["--set", "prune.pattern=foo"], "prune.pattern"),
    ("6", ["--set", "prune.method=bogus"], "prune.method"),
    ("7", ["--set", "prune.pattern=2:3"], "prune.sparsity"),
    ("8", ["--set", "prune.pattern=2:3", "--set", "prune.sparsity=null"], "prune.pattern"),
    ("9", ["--set", "prune.bogus_key=1"], "prune.bogus_key"),
    ("10", ["--set", "prune.options.foo=1"], "prune.options.foo"),
    ("11", ["--set", "prune.options.blocksize=64"], "prune.options.blocksize"),
    ("12", ["--set", "calibrate.nsamples=0"], "calibrate.nsamples"),
    ("13", ["--set", "calibrate.nsamples=2.5"], "calibrate.nsamples"),
    ("14", ["--set", "calibrate.seqlen=100000"], "calibrate.seqlen"),
    ("15", ["--set", "evaluate.seqlen=100000"], "evaluate.seqlen"),
    ("16", ["--set", "model.dtype=int8"], "model.dtype"),
    ("17", ["--set", "model.device=cuda"], "model.device"),
    ("18", ["--set", "model.source=/nonexistent/model"], "model.source"),
    ("19", ["--set", "model.source=someorg/nonexistent-model-xyz"], "model.source"),
    ("20", ["--set", "calibrate.data.path=data/missing.jsonl"], "calibrate.data.path"),
    ("21", ["--set", "prune.block_overrides.7.sparsity=0.7"], "prune.block_overrides.7"),
    ("22", ["--set", "prune.mask_file={tmp}/shape.safetensors"], "prune.mask_file"),
    ("23", ["--set", "prune.mask_file={tmp}/layer9.safetensors"], "prune.mask_file"),
    ("24", ["--set", "prune.mask_file=nope.safetensors"], "prune.mask_file"),
    ("26", ["--set", "prune.sparsity=null"], "prune.sparsity"),
    ("27", ["--set", "prune.pattern=4:8", "--set", "prune.sparsity=0.6"], "prune.sparsity"),
    ("28", ["--profile", "bogus"], "--profile"),
    ("29", ["--set", "calibrate.data.text_field=body"], "calibrate.data.text_field"),
    ("30", ["--set", "prune.layer_overrides.mlp.down_prj.sparsity=0.9"], "prune.layer_overrides.mlp.down_prj"),
    ("31", ["--set", "prune.block_overrides.0.foo=1"], "prune.block_overrides.0.foo"),
    ("32", ["--set", "prune.sparsity"], "prune.sparsity"),
    ("33", ["--set", "prune.options.iters=0"], "prune.options.iters"),
    ("34", ["--set", "prune.options.rho=-1"], "prune.options.rho"),
    ("block 2:4 + layer 0.7", ["--set", "prune.block_overrides.1.pattern=2:4",
                               "--set", "prune.layer_overrides.mlp.down_proj.sparsity=0.7"],
     "prune.layer_overrides.mlp.down_proj.sparsity"),
    ("empty data file", ["--set", "evaluate.wikitext2.path={tmp}/empty.txt"], "evaluate.wikitext2.path"),
    ("empty calibration text", ["--set", "calibrate.data.path={tmp}/blank.jsonl"], "calibrate.data.path"),
    ("unparsable --set value", ["--set", "prune.options={iters: 3"], "--set prune.options"),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-inputs")
    save_file({"model.layers.1.self_attn.o_proj": torch.ones(3, 3, dtype=torch.bool)}, tmp / "shape.safetensors")
    save_file({"model.layers.9.self_attn.o_proj": torch.ones(64, 64, dtype=torch.bool)}, tmp / "layer9.safetensors")
    (tmp / "empty.txt").write_text("")
    (tmp / "blank.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    return tmp


def workspace_state(repo) -> dict:
    """Every file of the workspace (git and DVC internals included) with size and mtime."""
    return {str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in repo.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.parametrize("case, args, key", BAD_SETTINGS, ids=[case for case, _, _ in BAD_SETTINGS])
def test_bad_settings_are_refused_before_any_stage_and_change_no_file(repo, bad_files, case, args, key, capsys):
    """Each is refused by `admm-prune run` with exit 2 and a one-paragraph message that
    starts with the key, before params.yaml is written or any stage runs: params.yaml
    byte-identical, every file of the workspace untouched. Red for each case the
    preflight misses (at b295bc5: #8, #19, #22, #23, #29, #30 and the empty files)."""
    from flows.cli import main

    if case == "17" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    params, before = (repo / "params.yaml").read_bytes(), workspace_state(repo)
    argv = [arg.replace("{tmp}", str(bad_files)) for arg in args]
    assert main(["-C", str(repo), "run", "--no-prefect", "--no-save", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key}: "), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert (repo / "params.yaml").read_bytes() == params
    assert workspace_state(repo) == before


def test_a_yaml_syntax_error_is_one_paragraph_naming_file_line_and_column(repo, capsys):
    """#25: a 66-line ruamel traceback at b295bc5."""
    from flows.cli import main

    original = (repo / "params.yaml").read_text()
    broken = original + "prune: [unclosed\n"
    (repo / "params.yaml").write_text(broken)
    try:
        assert main(["-C", str(repo), "run", "--no-prefect", "--no-save"]) == 2
        err = capsys.readouterr().err
        lines = len(original.splitlines())
        assert err.startswith("error: params.yaml: is not valid YAML at line "), err
        assert f"line {lines + 2}, column 1" in err and len(err.strip().splitlines()) == 1, err
        assert (repo / "params.yaml").read_text() == broken
    finally:
        (repo / "params.yaml").write_text(original)


def test_plain_dvc_repro_with_a_bad_param_fails_in_the_stage_naming_the_key(repo):
    original = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(original.replace("method: admm-grad", "method: obs"))
    try:
        output = dvc(repo, "repro", check=False)
        assert "prune.method: expected one of" in output
        after_start = output.split("Running stage 'prune'")[1]
        assert "Loading weights" not in after_start  # refused before loading the model
    finally:
        (repo / "params.yaml").write_text(original)
    assert decisions(dvc(repo, "repro"))["prune"] in ("skipped", "restored")


def test_second_pipeline_in_the_same_workspace_is_refused(repo):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom stages.workspace_lock import WorkspaceLock\n"
                               "lock = WorkspaceLock(sys.argv[1]).acquire()\nprint('held', flush=True)\nsys.stdin.read()",
         str(repo)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run([sys.executable, "-m", "flows.cli", "run", "--no-prefect"], repo)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "another pipeline is running" in proc.stderr
        # A plain `dvc repro` is refused too, by the first stage it would run.
        output = dvc(repo, "repro", "--force", "--single-item", "report", check=False)
        assert "another pipeline is running" in output
    finally:
        holder.stdin.close()
        holder.wait()
    assert decisions(dvc(repo, "repro"))["report"] in ("skipped", "restored")


def test_killed_prune_resumes_at_the_block_and_matches_an_uninterrupted_run(repo, tmp_path):
    store = {"ADMM_PRUNE_WORK_CACHE": str(tmp_path / "store")}
    prune = [sys.executable, "-m", "stages.prune"]
    try:
        # The fault injection lives in tests/kill_at_block.py, never in the stage.
        killed = run([sys.executable, str(ROOT / "tests" / "kill_at_block.py"), "2"], repo, store)
        assert killed.returncode == -9, killed.stderr  # SIGKILL while starting block 2
        assert len(list((tmp_path / "store" / "blocks").glob("*.json"))) == 2

        resumed = run(prune, repo, store)
        assert resumed.returncode == 0, resumed.stderr
        log = read_json(repo / "metrics" / "prune.json")
        assert (log["reused_blocks"], log["computed_blocks"]) == ([0, 1], [2, 3])
        resumed_weights = load_file(repo / "artifacts" / "pruned" / "model.safetensors")
        resumed_artifact = tree_digest(repo / "artifacts" / "pruned")

        fresh = run(prune, repo, {"ADMM_PRUNE_WORK_CACHE": str(tmp_path / "fresh")})
        assert fresh.returncode == 0, fresh.stderr
        assert read_json(repo / "metrics" / "prune.json")["computed_blocks"] == [0, 1, 2, 3]
        uninterrupted = load_file(repo / "artifacts" / "pruned" / "model.safetensors")
        assert resumed_weights.keys() == uninterrupted.keys()
        for name in uninterrupted:
            assert torch.equal(resumed_weights[name], uninterrupted[name]), name
        assert tree_digest(repo / "artifacts" / "pruned") == resumed_artifact  # config, tokenizer, log too
    finally:
        dvc(repo, "checkout", "--force", "prune")  # the stage outputs back to what dvc.lock says


def test_a_forced_prune_reuses_every_block_and_leaves_downstream_alone(repo):
    got = decisions(dvc(repo, "repro", "--force", "--single-item", "prune"))
    assert got == {"prune": "ran"}
    assert read_json(repo / "metrics" / "prune.json")["reused_blocks"] == [0, 1, 2, 3]
    got = decisions(dvc(repo, "repro"))  # the pruned model is byte-identical: nothing after prune reruns
    assert got["convert"] == got["evaluate"] == "skipped", got


def test_override_of_the_last_block_recomputes_only_that_block(repo):
    set_params(repo, "prune.block_overrides.-1.sparsity=0.7")
    try:
        got = decisions(dvc(repo, "repro"))
        assert got["model"] == got["calibrate"] == "skipped" and got["prune"] == "ran"
        log = read_json(repo / "metrics" / "prune.json")
        assert (log["reused_blocks"], log["computed_blocks"]) == ([0, 1, 2], [3])
        layers = {row["layer"]: float(row["sparsity"]) for row in _csv(repo / "plots" / "eval_layers.csv")}
        assert layers["model.layers.3.mlp.down_proj"] == pytest.approx(0.7, abs=1e-3)
        assert layers["model.layers.2.mlp.down_proj"] == pytest.approx(0.5, abs=1e-3)
        # Sparsity now varies across blocks: the report plots it against the targets.
        assert (repo / "reports" / "plots" / "layer_sparsity.png").stat().st_size > 1000
        assert "![layer_sparsity.png](plots/layer_sparsity.png)" in (repo / "reports" / "report.md").read_text()
    finally:
        set_params(repo, "prune.block_overrides={}")
        dvc(repo, "repro")


def test_the_ft_owl_recipe_reaches_every_block_key_and_the_pruned_model(repo):
    """prune.owl's per-block sparsities and prune.finetune are in each block's settings:
    every block is recomputed, the log's block settings carry OWL's sparsities (mean =
    prune.sparsity) and the fine-tune, and the pruned layers have those sparsities.
    Red when the stage computes the block keys before OWL (the store would then reuse
    the uniform blocks) or drops either setting."""
    set_params(repo, "prune.owl=true", "prune.finetune=standard")
    try:
        got = decisions(dvc(repo, "repro"))
        assert got["prune"] == "ran"
        assert read_json(repo / "metrics" / "prune.json")["computed_blocks"] == [0, 1, 2, 3]
        log = read_json(repo / "artifacts" / "pruned" / "prune_log.json")
        blocks = [b["layers"]["mlp.down_proj"]["sparsity"] for b in log["block_settings"]]
        assert len(set(blocks)) > 1 and sum(blocks) / 4 == pytest.approx(0.5, abs=1e-9)
        assert all(b["owl"] is True and b["finetune"] == "standard" for b in log["block_settings"])
        layers = {row["layer"]: float(row["sparsity"]) for row in _csv(repo / "plots" / "eval_layers.csv")}
        for i, target in enumerate(blocks):
            assert layers[f"model.layers.{i}.mlp.down_proj"] == pytest.approx(target, abs=2e-3)
    finally:
        set_params(repo, "prune.owl=false", "prune.finetune=none")
        dvc(repo, "repro")


def test_user_mask_gets_the_admm_update_and_its_content_is_tracked(repo, capsys):
    from flows.cli import main

    layer = "model.layers.1.self_attn.o_proj"
    weight = load_file(repo / "artifacts" / "model" / "model.safetensors")[layer + ".weight"]
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(weight.shape, generator=generator) > 0.3
    mask_file = repo / "my_mask.safetensors"
    save_file({layer: mask}, mask_file)
    try:
        assert main(["-C", str(repo), "run", "--no-prefect", "--no-save",
                     "--set", f"prune.mask_file={mask_file.name}"]) == 0
        log = read_json(repo / "artifacts" / "pruned" / "prune_log.json")
        entry = next(e for e in log["layers"] if e["name"] == layer)
        assert entry["method"].startswith("admm (user mask)")
        pruned = load_file(repo / "artifacts" / "pruned" / "model.safetensors")[layer + ".weight"]
        assert torch.equal(pruned != 0, mask & (weight != 0))

        # The mask's content changes. Its hash is a param, so the CLI's plan sees it...
        save_file({layer: ~mask}, mask_file)
        capsys.readouterr()
        assert main(["-C", str(repo), "plan"]) == 0
        plan = capsys.readouterr().out
        assert "prune      run" in plan and "param prune.mask_sha256" in plan
        # ...and a prune run that has not been told refuses instead of using it silently.
        output = dvc(repo, "repro", "--force", "--single-item", "prune", check=False)
        assert "prune.mask_sha256" in output and "Loading weights" not in output
    finally:
        set_params(repo, "prune.mask_file=null", "prune.mask_sha256=null")
        mask_file.unlink(missing_ok=True)
        dvc(repo, "repro")


def _csv(path):
    import csv
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))

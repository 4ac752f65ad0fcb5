"""Fast tests of the pipeline's parts: the block store, parameter checks and edits,
the workspace lock, DVC output parsing, and the stored calibration inputs."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import save_file

from pipeline_support import ROOT, write_data


# ---------------------------------------------------------------- block store

def _settings(sparsities):
    return [{"layers": {"mlp.down_proj": {"sparsity": s}}} for s in sparsities]


def test_block_fingerprints_change_from_the_changed_block_onward_only():
    from stages.block_store import block_fingerprints

    base = {"model": "m", "calibration": "c"}
    before = block_fingerprints(base, _settings([0.5, 0.5, 0.5, 0.5]))
    after = block_fingerprints(base, _settings([0.5, 0.5, 0.7, 0.5]))
    assert before[:2] == after[:2] and all(b != a for b, a in zip(before[2:], after[2:], strict=True))
    assert block_fingerprints({**base, "model": "other"}, _settings([0.5] * 4))[0] != before[0]
    assert len(set(before)) == 4  # identical settings in different blocks still get distinct keys


def test_block_store_round_trip_and_damaged_entries_are_recomputed(tmp_path):
    from stages.block_store import FingerprintBlockStore

    messages = []
    store = FingerprintBlockStore(tmp_path, ["a" * 64, "b" * 64], log=messages.append)
    state = {"mlp.down_proj": torch.randn(4, 8)}
    assert store.load(0) is None
    store.save(0, state, [{"name": "x", "rel_error": 0.1}])
    loaded, stats = store.load(0)
    assert torch.equal(loaded["mlp.down_proj"], state["mlp.down_proj"]) and stats[0]["rel_error"] == 0.1

    tensors = tmp_path / ("a" * 64 + ".safetensors")
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0x01  # a flipped bit inside the weights: still a valid safetensors file
    tensors.write_bytes(bytes(data))
    assert store.load(0) is None and "damaged" in messages[-1]
    assert not tensors.exists()  # never used again

    store.save(1, state, [])
    (tmp_path / ("b" * 64 + ".json")).write_text("{not json")
    assert store.load(1) is None


# ---------------------------------------------------------------- params

@pytest.fixture
def workspace(tmp_path):
    """A directory with params.yaml (tiny profile) and synthetic data, as cwd."""
    from flows.params_edit import apply_overrides, parse_assignment
    from pipeline_support import TINY

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    write_data(tmp_path / "data")
    apply_overrides(tmp_path / "params.yaml", [parse_assignment(s) for s in TINY])
    with contextlib.chdir(tmp_path):
        yield tmp_path


def _params(workspace):
    from stages.params import load_params
    return load_params(workspace / "params.yaml")


@pytest.mark.parametrize("section, key, value, named", [
    ("prune", "method", "obs", "prune.method"),
    ("prune", "sparsity", 1.5, "prune.sparsity"),
    ("prune", "sparsity", "half", "prune.sparsity"),
    ("prune", "pattern", "2-4", "prune.pattern"),
    ("prune", "pattern", 124, "prune.pattern"),  # what YAML 1.1 makes of an unquoted 2:4
    ("prune", "options", {"iters": 0}, "prune.options.iters"),
    ("prune", "options", {"schedule": "linear"}, "prune.options.schedule"),
    ("prune", "block_overrides", {9: {"sparsity": 0.6}}, "prune.block_overrides.9"),
    ("prune", "block_overrides", {0: {"sparsity": 2}}, "prune.block_overrides.0.sparsity"),
    ("prune", "layer_overrides", {"mlp.down_proj": {"spars": 0.6}}, "prune.layer_overrides.mlp.down_proj.spars"),
    ("prune", "mask_file", "missing.safetensors", "prune.mask_file"),
    ("model", "source", "./no/such/dir", "model.source"),
    ("model", "dtype", "float8", "model.dtype"),
    ("calibrate", "seqlen", 100000, "calibrate.seqlen"),
    ("calibrate", "nsamples", 0, "calibrate.nsamples"),
    ("evaluate", "seqlen", 4096, "evaluate.seqlen"),
    ("evaluate", "max_windows", -1, "evaluate.max_windows"),
    ("evaluate", "typo", 1, "evaluate.typo"),
    ("convert", "format", "fp8", "convert.format"),
    ("convert", "format", "packed-fp8", "convert.format"),  # the tiny params prune unstructured: nothing to store
])
def test_bad_params_are_refused_naming_the_key(workspace, section, key, value, named):
    from stages.params import ParamError
    from stages.preflight import check_all

    params = copy.deepcopy(_params(workspace))
    params[section][key] = value
    with pytest.raises(ParamError) as err:
        check_all(params)
    assert str(err.value).startswith(named + ":") and err.value.key == named


def test_default_and_tiny_params_are_valid(workspace):
    from stages.params import load_params
    from stages.preflight import check_all
    check_all(_params(workspace))
    default = load_params(ROOT / "params.yaml")
    assert default["model"]["source"] == "smollm2-135m"
    check_all(default | {"calibrate": _params(workspace)["calibrate"], "evaluate": _params(workspace)["evaluate"]})


def test_missing_data_file_names_the_key_and_the_fix(workspace):
    from stages.params import ParamError
    from stages.preflight import check_all
    (workspace / "data" / "wikitext2-raw-test.txt").unlink()
    with pytest.raises(ParamError, match=r"^evaluate\.wikitext2\.path: .*dvc pull"):
        check_all(_params(workspace))


def test_text_loads_from_a_local_file_or_by_dataset_name(tmp_path):
    """A dataset *name* goes through load_dataset(name, config, data_files, split), the
    hub route; a local directory stands in for a hub dataset here."""
    from stages.params import ParamError
    from stages.textdata import load_texts

    hub_like = tmp_path / "my-org-c4"
    (hub_like / "en").mkdir(parents=True)
    (hub_like / "en" / "part-0.jsonl").write_text('{"text": "first"}\n{"text": "second"}\n')
    spec = {"path": str(hub_like), "name": None, "data_files": "en/part-0.jsonl", "split": "train",
            "text_field": "text"}
    assert load_texts("calibrate.data", spec) == ["first", "second"]

    local = tmp_path / "lines.txt"
    local.write_text("a line\nanother\n")
    assert load_texts("evaluate.wikitext2", {**spec, "path": str(local)}) == ["a line", "another"]
    with pytest.raises(ParamError, match=r"^calibrate\.data\.text_field"):
        load_texts("calibrate.data", {**spec, "text_field": "content"})


# ---------------------------------------------------------------- --set / --profile

def test_set_keeps_comments_quotes_nm_patterns_and_refuses_unknown_keys(workspace):
    from flows.params_edit import apply_overrides, parse_assignment
    from stages.params import ParamError

    path = workspace / "params.yaml"
    params, changes = apply_overrides(path, [parse_assignment("prune.pattern=2:4"),
                                             parse_assignment("prune.sparsity=null"),
                                             parse_assignment("prune.block_overrides.-1.sparsity=0.7"),
                                             parse_assignment("prune.layer_overrides.mlp.down_proj.method=wanda")])
    text = path.read_text()
    assert 'pattern: "2:4"' in text and "# magnitude | wanda" in text  # quoted, comments kept
    assert params["prune"]["pattern"] == "2:4" and params["prune"]["sparsity"] is None
    assert params["prune"]["block_overrides"] == {-1: {"sparsity": 0.7}}
    assert params["prune"]["layer_overrides"] == {"mlp.down_proj": {"method": "wanda"}}
    assert "prune.pattern: 'unstructured' -> '2:4'" in changes
    import yaml  # a YAML 1.1 reader must not see the integer 124
    assert yaml.safe_load(text)["prune"]["pattern"] == "2:4"

    for bad in ("prune.sparsty=0.5", "evaluate.c4.pth=x", "novel.key=1"):
        with pytest.raises(ParamError):
            apply_overrides(path, [parse_assignment(bad)])
    with pytest.raises(ParamError, match="key=value"):
        parse_assignment("prune.sparsity")


def test_profiles_apply_their_leaves(workspace):
    from flows.params_edit import apply_overrides, profile_overrides
    from stages.params import ParamError

    paper = profile_overrides("paper", ROOT)
    params, _ = apply_overrides(workspace / "params.yaml", paper, write=False)
    assert params["calibrate"]["nsamples"] == 128 and params["calibrate"]["seqlen"] == 2048
    assert params["evaluate"]["max_windows"] is None
    with pytest.raises(ParamError, match="--profile"):
        profile_overrides("nonexistent", ROOT)


# ---------------------------------------------------------------- lock, DVC output, plan

def test_workspace_lock_refuses_a_second_holder_and_lets_its_own_stages_in(tmp_path, monkeypatch):
    from stages import workspace_lock
    from stages.workspace_lock import TOKEN_ENV, PipelineBusy, WorkspaceLock

    monkeypatch.chdir(tmp_path)
    with WorkspaceLock(tmp_path) as lock:
        with pytest.raises(PipelineBusy, match="another pipeline is running"):
            WorkspaceLock(tmp_path).acquire()
        with pytest.raises(PipelineBusy):
            workspace_lock.guard_stage("prune")  # a stage started by someone else
        monkeypatch.setenv(TOKEN_ENV, lock.token)
        workspace_lock.guard_stage("prune")      # a stage started by this pipeline
    # The pipeline's process is gone, its stage is not: the workspace is still held.
    with pytest.raises(PipelineBusy, match="a stage is still running"):
        WorkspaceLock(tmp_path).acquire()
    for handle in workspace_lock._held:          # the stage ends
        handle.close()
    workspace_lock._held.clear()
    WorkspaceLock(tmp_path).acquire().release()  # free again once released


def test_dvc_decisions_are_parsed_from_its_own_lines():
    from flows.dvc_runner import parse_outcomes
    text = ("Stage 'model' didn't change, skipping\n"
            "Stage 'prune' is cached - skipping run, checking out outputs\n"
            "Running stage 'evaluate':\n> python -m stages.evaluate\n")
    assert parse_outcomes(text) == {"model": "skipped", "prune": "restored", "evaluate": "ran"}


def test_plan_diff_names_changed_leaves():
    from flows.plan import _diff
    old = {"method": "admm-grad", "sparsity": 0.5, "options": {}}
    new = {"method": "admm-grad", "sparsity": 0.6, "options": {"iters": 5}}
    assert _diff("prune", old, new) == [("prune.options.iters", "<missing>", 5), ("prune.sparsity", 0.5, 0.6)]


def test_cli_refuses_a_directory_without_dvc_yaml(tmp_path, capsys):
    from flows.cli import main
    assert main(["-C", str(tmp_path), "plan"]) == 2
    assert "no dvc.yaml" in capsys.readouterr().err


# ---------------------------------------------------------------- calibration artifact

def test_block_inputs_round_trip_through_safetensors_and_json(tmp_path):
    from pruning.models import load_model
    from pruning.runner import capture_block_inputs, run_block
    from stages.block_inputs import load_block_inputs, save_block_inputs

    model, _ = load_model("tiny-random-llama")
    ids = torch.randint(0, 250, (3, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, ids)
    structure = save_block_inputs(tmp_path / "inputs.safetensors", inputs)
    json.dumps(structure)  # the structure is plain JSON
    loaded = load_block_inputs(tmp_path / "inputs.safetensors", structure, "cpu")
    assert torch.equal(loaded.hidden, inputs.hidden)
    block = model.model.layers[1]
    with torch.no_grad():
        expected = run_block(block, inputs.hidden[:1], inputs.calls[1])
        got = run_block(block, loaded.hidden[:1], loaded.calls[1])
    assert torch.equal(expected, got)


# ---------------------------------------------------------------- issue 11: params and inputs

def test_set_keeps_null_as_null(tmp_path):
    from flows.params_edit import apply_overrides, parse_assignment
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    nulls = params.read_text().count(": null")
    assert nulls > 3
    apply_overrides(params, [parse_assignment("prune.sparsity=0.6")])
    assert params.read_text().count(": null") == nulls  # ruamel's default writes an empty value


def test_the_default_profile_is_params_yaml_as_committed():
    from flows.params_edit import profile_overrides
    committed = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True)
    defaults = yaml.safe_load(committed.stdout if committed.returncode == 0 else (ROOT / "params.yaml").read_text())
    assert yaml.safe_load((ROOT / "params-default.yaml").read_text()) == defaults
    paths = {tuple(path) for path, _ in profile_overrides("default", ROOT)}
    assert ("prune", "sparsity") in paths and ("calibrate", "data", "path") in paths


def test_a_mask_file_edited_in_place_changes_the_recorded_hash(tmp_path):
    from flows.params_edit import apply_overrides
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    save_file({"model.layers.0.mlp.down_proj": torch.ones(4, 4, dtype=torch.bool)}, tmp_path / "masks.safetensors")
    apply_overrides(params, [(["prune", "mask_file"], "masks.safetensors")])
    _, changes = apply_overrides(params, [])
    assert changes == []  # recorded: a second run sees no change
    save_file({"model.layers.0.mlp.down_proj": torch.zeros(4, 4, dtype=torch.bool)}, tmp_path / "masks.safetensors")
    _, changes = apply_overrides(params, [], write=False)
    assert len(changes) == 1 and changes[0].startswith("prune.mask_sha256:") and "masks.safetensors" in changes[0]


def test_a_tracked_file_edited_in_place_is_named_before_anything_runs(tmp_path):
    from flows.inputs import InputChanged, check_tracked_data
    (tmp_path / "data").mkdir()
    text = tmp_path / "data" / "calib.jsonl"
    text.write_text('{"text": "a"}\n')
    digest = hashlib.md5(text.read_bytes()).hexdigest()
    (tmp_path / "data" / "calib.jsonl.dvc").write_text(f"outs:\n- md5: {digest}\n  size: 15\n  hash: md5\n  path: calib.jsonl\n")
    check_tracked_data(tmp_path)
    text.write_text('{"text": "b"}\n')
    with pytest.raises(InputChanged, match="data/calib.jsonl was changed in place"):
        check_tracked_data(tmp_path)


def test_the_same_thread_count_gives_bitwise_identical_pruned_weights():
    from pruning import PruneSpec, prunable_linear_names, prune_model
    from pruning.models import build_tiny_model
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    weights = []
    for _ in range(2):
        model, _ = build_tiny_model("llama")
        prune_model(model, ids, PruneSpec("admm-grad", 0.5), progress=False)
        modules = dict(model.named_modules())
        weights.append({n: modules[n].weight.detach().clone() for n in prunable_linear_names(model)})
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_cli_help_names_every_profile_file(capsys):
    """--profile's help lists the params-*.yaml files, so a new profile cannot be missing from it."""
    from flows.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for path in ROOT.glob("params-*.yaml"):
        assert path.stem.removeprefix("params-") in text

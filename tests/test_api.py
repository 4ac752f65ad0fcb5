"""The Python API (stages/api.py): one call from a model and some text to a pruned
model and its per-layer report, checked by the code that checks params.yaml."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from pruning.settings import SettingsError

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the model prunes weights of every layer while a small window of text goes through each block".split()
TEXTS = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(40)) for i in range(12)]
FAST = {"iters": 4, "mask_steps": 3}
SMALL = {"calibrate": {"nsamples": 4, "seqlen": 32}, "model": {"device": "cpu"}}


def recipe(**prune):
    return {**SMALL, "prune": {"method": "admm-grad", "sparsity": 0.5, "options": FAST, **prune}}


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if name.startswith("model.layers.") and p.dim() == 2}


def test_prune_an_alias_on_a_list_of_strings_returns_the_model_and_its_per_layer_report():
    from stages.api import prune

    model, report = prune("tiny-random-llama", TEXTS, recipe(), progress=False)
    weights = linear_weights(model)
    assert len(report.layers) == len(weights) == 28
    for layer in report.layers:
        assert layer["sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert 0 <= layer["rel_error"] < 1
        assert float((weights[layer["name"] + ".weight"] == 0).float().mean()) == pytest.approx(layer["sparsity"])
    assert report.settings["calibrate"]["nsamples"] == 4 and report.settings["prune"]["method"] == "admm-grad"
    assert model.config.sparsity_config["method"] == "admm-grad"
    assert model.config.sparsity_config["measured_sparsity"]["mean_over_layers"] == pytest.approx(0.5, abs=1e-3)
    assert report.tokenizer is not None and "4 windows of 32 tokens from 12 given texts" in report.calibration


def test_a_model_object_a_local_folder_and_the_alias_give_the_same_pruned_weights(tmp_path):
    """The same weights reach the same code whatever form the model is given in."""
    from pruning.models import build_tiny_model, export_model
    from stages.api import prune

    obj, tokenizer = build_tiny_model("llama", seed=0)
    export_model(obj, tokenizer, tmp_path / "dense")
    from_alias, _ = prune("tiny-random-llama", TEXTS, recipe(), progress=False)
    from_folder, _ = prune(str(tmp_path / "dense"), TEXTS, recipe(), progress=False)
    from_object, report = prune(obj, TEXTS, recipe(), tokenizer=tokenizer, progress=False)
    assert from_object is obj and report.source == "LlamaForCausalLM"
    alias, folder, given = map(linear_weights, (from_alias, from_folder, from_object))
    for name in alias:
        assert torch.equal(alias[name], folder[name]) and torch.equal(alias[name], given[name]), name


def test_a_hub_id_is_loaded_through_the_projects_model_loader(monkeypatch):
    """A hub id goes to pruning.models.load_model with the recipe's dtype (a stand-in
    loader here: the hub is unreachable)."""
    import pruning.models
    from stages.api import prune

    calls = []

    def fake_load_model(source, *, dtype, device, cache_dir=None):
        calls.append((source, dtype))
        return pruning.models.build_tiny_model("llama", seed=0)

    monkeypatch.setattr(pruning.models, "load_model", fake_load_model)
    _, report = prune("some-org/some-model", TEXTS, {**recipe(), "model": {"device": "cpu", "dtype": "float32"}},
                      progress=False)
    assert calls == [("some-org/some-model", "float32")] and report.source == "some-org/some-model"


def test_a_yaml_recipe_like_params_yaml_names_the_model_and_the_data_file(tmp_path):
    """A params-like YAML file (evaluate and convert sections included) is a recipe;
    its calibrate.data file is read like the calibrate stage reads it; 2:4 is applied."""
    from stages.api import prune

    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
model: {{source: tiny-random-llama, dtype: float32, device: cpu}}
calibrate:
  data: {{path: {data}, name: null, data_files: null, split: train, text_field: text}}
  nsamples: 4
  seqlen: 32
  seed: 0
prune: {{method: wanda, pattern: "2:4", sparsity: null}}
evaluate: {{seqlen: 32}}
convert: {{format: packed}}
""")
    model, report = prune(recipe=path, progress=False)
    assert model.config.sparsity_config["pattern"] == "2:4" and model.config.sparsity_config["sparsity"] == 0.5
    assert all(layer["pattern"] == "2:4" for layer in report.layers)
    assert str(data) in report.calibration


def test_a_dataset_name_goes_through_datasets_load_dataset(tmp_path):
    """Any path that is not a local text file is a dataset for `datasets`; a local
    dataset folder stands in for a hub dataset name here."""
    from stages.api import prune

    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in TEXTS))
    _, report = prune("tiny-random-llama", {"path": str(folder), "text_field": "content"}, recipe(), progress=False)
    assert len(report.layers) == 28


def test_a_prune_section_alone_is_a_recipe_and_defaults_fill_the_rest():
    from stages.api import DEFAULTS, recipe_sections, with_defaults

    settings = with_defaults(recipe_sections({"method": "wanda", "sparsity": 0.6}))
    assert settings["prune"] == {"method": "wanda", "sparsity": 0.6}
    assert settings["calibrate"] == DEFAULTS["calibrate"] and settings["model"] == DEFAULTS["model"]


@pytest.mark.parametrize("kwargs, key", [
    ({"recipe": {"methd": "wanda"}}, "prune.methd"),
    ({"recipe": {"prune": {"method": "admm-grad", "sparsity": 1.5}}}, "prune.sparsity"),
    ({"recipe": {"prune": {"method": "wanda"}, "prunning": {}}}, "prunning"),
    ({"recipe": {"calibrate": {"nsamples": 4, "seqlen": 4096}}}, "calibrate.seqlen"),   # beyond the context
    ({"recipe": {"model": {"device": "gpu"}}}, "model.device"),
    ({"data": []}, "data"),
    ({"data": "missing.jsonl"}, "calibrate.data.path"),
    ({"recipe": {**SMALL, "prune": {"method": "wanda", "layer_overrides": {"mlp.down_prj": {"sparsity": 0.7}}}}},
     "prune.layer_overrides.mlp.down_prj"),                                           # needs the model's layers
])
def test_bad_settings_are_refused_naming_the_params_yaml_key(kwargs, key):
    from stages.api import prune

    args = {"model": "tiny-random-llama", "data": TEXTS, **kwargs}
    with pytest.raises(SettingsError) as err:
        prune(args.pop("model"), args.pop("data"), progress=False, **args)
    assert err.value.key == key, str(err.value)


def test_a_model_object_needs_its_tokenizer_and_keeps_its_dtype():
    from pruning.models import build_tiny_model
    from stages.api import prune

    model, _ = build_tiny_model("llama", seed=0)
    with pytest.raises(SettingsError) as err:
        prune(model, TEXTS, recipe(), progress=False)
    assert err.value.key == "tokenizer"
    _, tokenizer = build_tiny_model("llama", seed=0)
    with pytest.raises(SettingsError) as err:
        prune(model, TEXTS, {**recipe(), "model": {"dtype": "bfloat16"}}, tokenizer=tokenizer, progress=False)
    assert err.value.key == "model.dtype" and "float32" in str(err.value)


def test_the_prune_stage_and_the_api_share_one_pruning_path():
    """Red when either calls the library's prune_model (or builds its own spec) itself
    instead of going through stages/pruner.py."""
    for module in ("prune", "api"):
        tree = ast.parse((ROOT / "stages" / f"{module}.py").read_text())
        called = {node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                  for node in ast.walk(tree) if isinstance(node, ast.Call)}
        imported = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    for alias in node.names}
        assert ("pruner", "prune") in imported, module
        assert not called & {"prune_model", "build_spec", "PruneSpec"}, module


def test_save_writes_a_hub_ready_folder_that_loads_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.api import prune, save

    model, report = prune("tiny-random-llama", TEXTS, recipe(), progress=False)
    out = save(model, report, tmp_path / "out")
    card = (out / "README.md").read_text()
    assert "admm-grad" in card and "target sparsity 0.5" in card and "from_pretrained" in card
    assert json.loads((out / "config.json").read_text())["sparsity_config"]["pattern"] == "unstructured"
    assert "is_local" not in json.loads((out / "tokenizer_config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the model", return_tensors="pt").input_ids
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    for name, weight in linear_weights(loaded).items():
        assert torch.equal(weight, dict(model.named_parameters())[name]), name

"""A pruned model ready to share: model cards, sparsity_config, no machine-local
tokenizer fields, the packed folder's own card, and `admm-prune publish` (against a
stand-in for huggingface_hub's HfApi: no network)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

EVAL = {"wikitext2_ppl": 41.5, "c4_ppl": 38.25, "dense_wikitext2_ppl": 22.24, "dense_c4_ppl": 20.5,
        "sparsity": 0.5, "seqlen": 256, "wikitext2_windows": 16, "c4_windows": 16, "protocol": "subset"}
SPARSITY = {"tool": "admm-prune", "method": "admm-grad", "sparsity": 0.5, "pattern": "2:4", "options": {"iters": 20},
            "varies_by_layer": False, "pruned_layers": 28,
            "measured_sparsity": {"mean_over_layers": 0.5, "min": 0.5, "max": 0.5}}


def pruned_tiny(pattern="2:4"):
    """The tiny model pruned to `pattern` through the one pruning path."""
    from pruning.data import calibration_windows
    from pruning.models import build_tiny_model
    from stages.pruner import prune

    model, tokenizer = build_tiny_model("llama", seed=0)
    texts = ["the model prunes weights of every layer while a window of text goes through " * 3] * 4
    ids = calibration_windows(texts, tokenizer, 4, 32, 0)
    params = {"model": {"device": "cpu"}, "prune": {"method": "wanda", "sparsity": None, "pattern": pattern}}
    prune(model, params, ids, progress=False)
    return model, tokenizer


def test_exported_tokenizer_config_has_no_machine_local_fields(tmp_path):
    """A tokenizer loaded from a local folder records is_local/local_files_only; the
    pipeline's exports (every stage re-saves a tokenizer it loaded) must not carry them."""
    from transformers import AutoTokenizer

    from pruning.models import build_tiny_model, export_model

    model, tokenizer = build_tiny_model("llama", seed=0)
    export_model(model, tokenizer, tmp_path / "a")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "a")
    export_model(model, reloaded, tmp_path / "b")
    config = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(config), config
    assert AutoTokenizer.from_pretrained(tmp_path / "b")("abc").input_ids == reloaded("abc").input_ids


def test_pruning_writes_sparsity_config_into_config_json(tmp_path):
    from pruning.models import export_model

    model, tokenizer = pruned_tiny("2:4")
    export_model(model, tokenizer, tmp_path / "m")
    entry = json.loads((tmp_path / "m" / "config.json").read_text())["sparsity_config"]
    assert entry["method"] == "wanda" and entry["pattern"] == "2:4" and entry["sparsity"] == 0.5
    assert entry["pruned_layers"] == 28 and entry["measured_sparsity"]["min"] == pytest.approx(0.5)


def test_dense_card_has_method_sparsity_metrics_protocol_lineage_and_loading(tmp_path):
    from huggingface_hub import ModelCard

    from stages.model_card import CardFacts, write_card

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "sparsity_config": SPARSITY}))
    facts = CardFacts(source="HuggingFaceTB/SmolLM2-135M", base_model="HuggingFaceTB/SmolLM2-135M",
                      calibration="32 windows of 256 tokens from `data/c4.jsonl`, seed 0", evaluation=EVAL,
                      lineage={"git commit": "`abc123`", "experiment": "`exp-1`", "`artifacts/model` sha256": "`f00`"})
    card = ModelCard.load(write_card(tmp_path, facts))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M" and card.data.library_name == "transformers"
    assert "admm-grad" in card.data.tags and card.data.pipeline_tag == "text-generation"
    text = card.text
    for needed in ("ADMM-Grad", "target sparsity 0.5, pattern `2:4`", "| WikiText-2 perplexity | 22.240 | 41.500 |",
                   "| C4 perplexity | 20.500 | 38.250 |", "windows of 256 tokens", "16 windows",
                   "not the papers' full protocol", "32 windows of 256 tokens", "`abc123`", "`exp-1`", "`f00`",
                   "AutoModelForCausalLM.from_pretrained"):
        assert needed in text, needed


def test_the_packed_folder_card_says_how_to_load_it_and_that_way_works(tmp_path):
    """Plain from_pretrained fails on a packed folder; its README names the project's
    loader, and that loader gives back the pruned weights."""
    from transformers import AutoModelForCausalLM

    from pruning import packing
    from stages.model_card import CardFacts, write_card

    model, tokenizer = pruned_tiny("2:4")
    entry = packing.save_packed_model(model, tokenizer, tmp_path / "packed", "2:4")
    write_card(tmp_path / "packed", CardFacts(source="tiny-random-llama"), packing=entry)
    card = (tmp_path / "packed" / "README.md").read_text()
    assert "from pruning.packing import load_packed_model" in card and "nm-packed" in card
    assert "library_name: transformers" not in card
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    loader = getattr(packing, card.split("from pruning.packing import ")[1].split(",")[0])
    loaded = loader(tmp_path / "packed")
    for name, weight in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], weight), name
    assert not {"is_local", "local_files_only"} & set(json.loads((tmp_path / "packed" / "tokenizer_config.json")
                                                                 .read_text()))


def test_report_lineage_names_commit_params_and_input_hashes_but_no_local_path():
    from stages.report import lineage

    source = {"source": "/home/someone/models/my-llama", "kind": "local", "path": "/home/someone/models/my-llama",
              "sha256": "d" * 64}
    meta = {"git": {"commit": "c" * 40, "dirty": True}, "params": {"prune": {"sparsity": 0.5}},
            "experiment": {"name": "run-261207-101500", "baseline": "c" * 40},
            "inputs": {"artifacts/model": {"sha256": "a" * 64}, "metrics/eval.json": {"sha256": "e" * 64}}}
    out = lineage(source, meta)
    text = "\n".join(f"{k}: {v}" for k, v in out.items())
    assert "c" * 40 in text and "uncommitted" in text and "a" * 64 in text and "d" * 64 in text
    assert "params sha256" in out and "run-261207-101500" in out["experiment"]
    assert "/home/someone" not in text and "my-llama" in text


# ---------------------------------------------------------------- publish


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records the calls, uploads nothing."""
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        FakeHfApi.calls.append(("files", files))

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/0123"
        return Commit()


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    import flows.publish

    FakeHfApi.calls = []
    monkeypatch.setattr(flows.publish, "HfApi", FakeHfApi)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    folder = tmp_path / "reports" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("---\ntags: [admm-prune]\n---\n# card\n")
    return tmp_path


def test_publish_creates_the_repo_and_uploads_the_folder_in_one_commit(workspace, capsys):
    from flows.cli import main

    assert main(["-C", str(workspace), "publish", "me/tiny-pruned", "--private"]) == 0
    (create, repo, kwargs), (upload, repo2, up), files = FakeHfApi.calls
    assert (create, repo, kwargs["private"], kwargs["exist_ok"]) == ("create_repo", "me/tiny-pruned", True, True)
    assert (upload, repo2, Path(up["folder_path"])) == ("upload_folder", "me/tiny-pruned",
                                                        workspace / "reports" / "model")
    assert files == ("files", ["README.md", "config.json"])
    assert "commit/0123" in capsys.readouterr().out


def test_publish_refuses_a_folder_without_a_model_card(workspace, capsys):
    from flows.cli import main

    (workspace / "reports" / "model" / "README.md").unlink()
    assert main(["-C", str(workspace), "publish", "me/tiny-pruned"]) == 1
    assert "no README.md" in capsys.readouterr().err and FakeHfApi.calls == []


def test_publish_turns_a_hub_refusal_into_one_clear_line(workspace, capsys, monkeypatch):
    from huggingface_hub import errors

    from flows.cli import main

    def refuse(self, repo_id, **kwargs):
        # The HTTP client huggingface_hub itself uses (httpx or its fork httpx2, by version).
        http = sys.modules[errors.Response.__module__.split(".")[0]]
        response = http.Response(403, request=http.Request("POST", "https://huggingface.co/api/repos/create"))
        raise errors.HfHubHTTPError("403 Forbidden: you cannot write to this namespace", response=response)

    monkeypatch.setattr(FakeHfApi, "create_repo", refuse)
    assert main(["-C", str(workspace), "publish", "someone-else/model"]) == 1
    assert "the hub refused the upload to someone-else/model" in capsys.readouterr().err


def test_publish_is_not_part_of_the_default_run():
    """Red if the pipeline flow or the no-Prefect run starts importing the publish step
    or calling the hub's upload API."""
    import ast

    root = Path(__file__).resolve().parents[1]
    for name in ("cli.py", "pipeline.py", "workspace.py", "dvc_runner.py"):
        text = (root / "flows" / name).read_text()
        top_level = {node.module for node in ast.parse(text).body if isinstance(node, ast.ImportFrom)}
        assert not top_level & {"publish", "flows.publish", "huggingface_hub"}, name
        if name != "cli.py":  # the CLI imports it inside `publish` only
            assert "HfApi" not in text and "upload_folder" not in text and ".publish import" not in text, name

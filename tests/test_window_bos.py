"""Gemma needs a BOS token first in every window; other families keep the papers'
windows of plain text tokens. One rule (pruning.data.window_bos), read by the
calibrate and evaluate stages alike."""
import shutil

import pytest
import torch
from tokenizers import processors

from pipeline_support import ROOT, TINY, write_data
from pruning.data import c4_validation_ids, calibration_windows, split_windows, window_bos, window_bos_id
from pruning.models import build_tiny_model, byte_level_tokenizer, export_model, tiny_config
from pruning.settings import SettingsError

DOCS = ["short", "a longer document " * 10, "y" * 300]


def bos_tokenizer():
    """The byte-level tokenizer, putting <bos> first as Llama's and Gemma's do."""
    tokenizer = byte_level_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)])
    return tokenizer


def test_the_rule_names_gemma_only():
    assert window_bos(tiny_config("gemma3"))
    assert not any(window_bos(tiny_config(arch)) for arch in ("llama", "qwen2", "mistral", "opt", "gpt2"))
    tokenizer = bos_tokenizer()
    assert window_bos_id(tiny_config("gemma3"), tokenizer) == tokenizer.bos_token_id
    assert window_bos_id(tiny_config("llama"), tokenizer) is None
    tokenizer.bos_token = None
    with pytest.raises(SettingsError, match="needs a BOS token"):
        window_bos_id(tiny_config("gemma3"), tokenizer)


def _is_text_slice(window, texts) -> bool:
    n = len(window)
    return any(torch.equal(window, ids[s:s + n]) for ids in texts for s in range(len(ids) - n + 1))


def test_bos_windows_are_bos_then_text():
    tokenizer = bos_tokenizer()
    bos = tokenizer.bos_token_id
    texts = [tokenizer(d, return_tensors="pt").input_ids[0, 1:] for d in DOCS]  # without the tokenizer's BOS
    calib = calibration_windows(DOCS, tokenizer, nsamples=8, seqlen=40, seed=0, bos_id=bos)
    assert calib.shape == (8, 40) and (calib[:, 0] == bos).all() and not (calib[:, 1:] == bos).any()
    assert all(_is_text_slice(w[1:], texts) for w in calib)

    stream = tokenizer(" ".join(DOCS), return_tensors="pt").input_ids
    windows = split_windows(stream, 16, bos_id=bos)
    assert windows.shape == ((stream.shape[1] - 1) // 15, 16) and (windows[:, 0] == bos).all()
    assert torch.equal(windows[:, 1:].reshape(-1), stream[0, 1:1 + 15 * len(windows)])  # no text token lost
    c4 = c4_validation_ids(DOCS, tokenizer, seqlen=16, nwindows=3, bos_id=bos)
    assert split_windows(c4, 16, bos_id=bos).shape == (3, 16)  # exactly c4_windows windows


def test_without_bos_id_windows_are_unchanged():
    """The papers' windows for every other family: seqlen text tokens, the stream's own
    first token (BOS for a Llama tokenizer) left where it is."""
    tokenizer = bos_tokenizer()
    stream = tokenizer(" ".join(DOCS), return_tensors="pt").input_ids
    assert torch.equal(split_windows(stream, 16), stream[0, : 16 * (stream.shape[1] // 16)].reshape(-1, 16))
    assert torch.equal(c4_validation_ids(DOCS, tokenizer, seqlen=16, nwindows=3), stream[:, :48])


def _run_stages(tmp_path, monkeypatch, arch: str):
    """model -> calibrate -> prune -> convert -> evaluate, in process, on a tiny model of
    `arch` with the BOS-adding tokenizer; returns (calibration ids, evaluation windows)."""
    from flows.params_edit import apply_overrides, parse_assignment
    from stages import calibrate, convert, evaluate, model, prune
    from stages.artifact_io import read_json, read_tensors
    from stages.paths import CALIB_IDS, CALIB_META, CALIBRATION_DIR, EVAL_METRICS

    source = tmp_path / f"tiny-{arch}"
    export_model(build_tiny_model(arch)[0], bos_tokenizer(), source)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    shutil.copy2(ROOT / "params.yaml", workspace / "params.yaml")
    write_data(workspace / "data")
    apply_overrides(workspace / "params.yaml", [parse_assignment(s) for s in TINY + [
        f"model.source={source}", "prune.method=magnitude", "prune.options={}"]])
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("ADMM_PRUNE_WORK_CACHE", str(tmp_path / "work-cache"))
    scored = {}

    def perplexities(model, windows, device, label, batch_size):
        scored[label] = windows
        return {f"{name}_ppl": 1.0 for name in windows}

    monkeypatch.setattr(evaluate, "perplexities", perplexities)
    for stage in (model, calibrate, prune, convert, evaluate):
        stage.run()
    ids = read_tensors(CALIBRATION_DIR / CALIB_IDS)["input_ids"]
    flags = read_json(CALIBRATION_DIR / CALIB_META)["window_bos"], read_json(EVAL_METRICS)["window_bos"]
    return ids, scored["pruned"], flags


@pytest.mark.slow
def test_calibrate_and_evaluate_stages_start_gemma_windows_with_bos(tmp_path, monkeypatch):
    ids, windows, flags = _run_stages(tmp_path, monkeypatch, "gemma3")
    bos = bos_tokenizer().bos_token_id
    assert flags == (True, True)
    for w in (ids, windows["wikitext2"], windows["c4"]):
        assert (w[:, 0] == bos).all() and not (w[:, 1:] == bos).any()


@pytest.mark.slow
def test_llama_stage_windows_keep_the_papers_rule(tmp_path, monkeypatch):
    ids, windows, flags = _run_stages(tmp_path, monkeypatch, "llama")
    bos = bos_tokenizer().bos_token_id
    assert flags == (False, False)
    assert not (ids[:, 0] == bos).all()
    assert windows["wikitext2"][0, 0] == bos and not (windows["wikitext2"][1:, 0] == bos).any()

"""Data windows, perplexity and model loading (offline stand-ins only)."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pruning import perplexity
from pruning.data import calibration_windows, c4_validation_ids, split_windows, wikitext2_ids
from pruning.models import byte_level_tokenizer, build_tiny_model, export_model, load_model, max_context

DOCS = ["short", "x" * 50, "a longer document " * 10, "tiny", "y" * 300]


def test_byte_tokenizer_roundtrip():
    tok = byte_level_tokenizer()
    text = "héllo, wörld\n\nnew para"
    ids = tok(text).input_ids
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_calibration_windows_follow_the_rule():
    tok = byte_level_tokenizer()
    a = calibration_windows(DOCS, tok, nsamples=6, seqlen=40, seed=0)
    b = calibration_windows(DOCS, tok, nsamples=6, seqlen=40, seed=0)
    c = calibration_windows(DOCS, tok, nsamples=6, seqlen=40, seed=1)
    assert a.shape == (6, 40) and torch.equal(a, b) and not torch.equal(a, c)
    # every window is a contiguous slice of a document longer than seqlen
    long_ids = [tok(d, return_tensors="pt").input_ids[0] for d in DOCS if len(d.encode()) > 40]
    for window in a:
        assert any(any(torch.equal(window, ids[s:s + 40]) for s in range(len(ids) - 39)) for ids in long_ids)
    with pytest.raises(ValueError, match="seqlen"):
        calibration_windows(DOCS, tok, nsamples=1, seqlen=1000, seed=0)


def test_eval_token_streams_and_windows():
    tok = byte_level_tokenizer()
    ids = wikitext2_ids(["line one", "line two"], tok)
    assert tok.decode(ids[0]) == "line one\n\nline two"
    c4 = c4_validation_ids(["aa", "bb"], tok, seqlen=2, nwindows=1)
    assert tok.decode(c4[0]) == "aa"
    windows = split_windows(torch.arange(10)[None], 3)
    assert windows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]       # tail dropped
    assert split_windows(torch.arange(10)[None], 3, max_windows=2).shape == (2, 3)
    with pytest.raises(ValueError, match="seqlen"):
        split_windows(torch.arange(2)[None], 3)


def test_perplexity_is_exp_of_mean_token_nll():
    model, _ = build_tiny_model("llama")
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(model(w[None]).logits[0, :-1], w[1:]) for w in windows]
    expected = math.exp(sum(x.item() for x in nll) / len(nll))
    assert perplexity(model, windows, progress=False) == pytest.approx(expected, rel=1e-5)


def test_export_loads_with_from_pretrained(tmp_path):
    model, tok = load_model("tiny-random-llama")
    export_model(model, tok, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = tok2("hello world", return_tensors="pt").input_ids
    assert ids.tolist() == tok("hello world", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
    assert max_context(again) == 512


def test_tiny_model_is_deterministic():
    a, _ = load_model("tiny-random-llama")
    b, _ = load_model("tiny-random-llama")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("source", ["./no/such/dir", "/definitely/missing", "a/b/c"])
def test_missing_local_model_is_a_clear_error(source):
    from pruning.settings import SettingsError
    with pytest.raises(SettingsError, match="does not exist") as err:
        load_model(source)
    assert err.value.path == ("source",)


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny-random-llama", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            load_model("tiny-random-llama", device="cuda")

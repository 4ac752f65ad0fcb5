"""nm-packed format (pruning/packing.py) and semi-structured execution (pruning/sparse_exec.py).
Fast, CPU; GPU tests are marked `gpu`. The FP8 variant: test_fp8.py; the bench: test_sparse24.py."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pruning.masks import nm_mask
from pruning.runner import layers_prefix, prunable_linear_names
from pruning.packing import (
    CONFIG_KEY,
    WEIGHTS_FILE,
    find_nm_violation,
    flatten_packed,
    load_packed_model,
    load_packed_tokenizer,
    pack_nm,
    packed_size_report,
    save_packed_model,
    unpack_nm,
)
from pruning.sparse_exec import to_semi_structured

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def nm_sparse(shape, n, m, dtype, seed=0):
    """Random weight with the n largest magnitudes of each group of m kept (+0.0 elsewhere)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    keep = nm_mask(w.abs().float(), n, m)
    return torch.where(keep, w, torch.zeros_like(w))


def bits(t):
    return t.view(_INT_VIEW[t.dtype])


# ----------------------------------------------------------------- pack / unpack

@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_is_bitwise_exact(n, m, dtype):
    w = nm_sparse((24, 6 * m), n, m, dtype)
    w[0] = 0                        # a row with no nonzeros at all
    w[1, :m] = 0
    w[1, 1] = 3.0                   # a group with fewer than n nonzeros
    w[2, m:2 * m] = 0
    w[2, m + m - 1] = float("inf")  # non-finite values are kept as they are
    packed = pack_nm(w, n, m)
    assert packed["values"].dtype == dtype
    assert packed["values"].shape == (24, 6 * n)
    out = unpack_nm(packed)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(bits(out), bits(w))


def test_index_bits_per_pattern():
    w24 = nm_sparse((8, 4096), 2, 4, torch.float16)
    # 2:4: two 2-bit positions per group of 4 -> half a byte per 4 weights
    assert pack_nm(w24, 2, 4)["indices"].shape == (8, 4096 // 8)
    w48 = nm_sparse((8, 4096), 4, 8, torch.float16)
    # 4:8: four 3-bit positions per group of 8 -> 12 bits per 8 weights
    assert pack_nm(w48, 4, 8)["indices"].shape == (8, 4096 * 12 // 8 // 8)


def test_negative_zero_in_pruned_slot_comes_back_as_equal_zero():
    w = torch.tensor([[1.0, -0.0, 2.0, -0.0], [-0.0, 0.0, 5.0, 0.0]], dtype=torch.float16)
    out = unpack_nm(pack_nm(w, 2, 4))
    assert torch.equal(out, w)  # numerically equal: -0.0 == 0.0
    # row 1 has a spare slot, and the -0.0 is preferred for it, so its sign survives
    assert torch.signbit(out[1, 0])


def test_unpack_dtype_and_device_arguments():
    w = nm_sparse((4, 16), 2, 4, torch.bfloat16)
    out = unpack_nm(pack_nm(w, 2, 4), dtype=torch.float32, device="cpu")
    assert out.dtype == torch.float32 and torch.equal(out, w.float())


def test_find_nm_violation_names_first_bad_row_and_group():
    w = nm_sparse((6, 32), 2, 4, torch.float32)
    assert find_nm_violation(w, 2, 4) is None
    w[3, 20:24] = 1.0
    w[5, 0:4] = 1.0
    msg = find_nm_violation(w, 2, 4)
    assert "row 3, group 5" in msg and "columns 20..23" in msg and "4 nonzeros" in msg
    assert "multiple of M=8" in find_nm_violation(torch.zeros(2, 12), 4, 8)
    with pytest.raises(ValueError, match="row 3, group 5"):
        pack_nm(w, 2, 4)


def test_unpack_rejects_corrupt_indices():
    packed = pack_nm(nm_sparse((4, 16), 2, 4, torch.float16), 2, 4)
    packed["indices"] = torch.zeros_like(packed["indices"])  # both slots at position 0
    with pytest.raises(ValueError, match="corrupt indices"):
        unpack_nm(packed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_file_size_ratio_for_24_linears(tmp_path, dtype):
    shapes = {"q": (256, 256), "up": (512, 256), "down": (256, 512)}
    packed, dense = {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        w = nm_sparse(shape, 2, 4, dtype, seed=i)
        dense[f"{name}.weight"] = w
        packed.update(flatten_packed(f"{name}.weight", pack_nm(w, 2, 4)))
    save_file(packed, tmp_path / "packed.safetensors")
    save_file(dense, tmp_path / "dense.safetensors")
    ratio = (tmp_path / "packed.safetensors").stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio <= 0.57, ratio
    report = packed_size_report(tmp_path / "packed.safetensors")
    assert report["num_packed"] == 3
    assert report["dense_bytes"] == sum(a * b for a, b in shapes.values()) * 2
    assert 0.5625 <= report["size_ratio"] <= 0.57
    assert packed_size_report(packed)["packed_bytes"] == report["packed_bytes"]


# ------------------------------------------------------------ model save / load

def tiny_llama(*, tie=False, dtype=torch.float32, make_24=True):
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                         tie_word_embeddings=tie)
    torch.manual_seed(0)
    # dtype via from_config, as from_pretrained would do: `.to(dtype)` would also cast
    # the fp32 RoPE inv_freq buffer, which no loader reproduces.
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if make_24:
        with torch.no_grad():
            for name in prunable_linear_names(model):
                weight = model.get_submodule(name).weight
                weight.mul_(nm_mask(weight.abs().float(), 2, 4))
    return model


def logits(model, seed=1):
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


EXPECTED_LINEARS = [f"model.layers.{i}.{sub}" for i in range(2) for sub in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_eligible_layers_are_decoder_linears_only():
    model = tiny_llama(make_24=False)
    assert layers_prefix(model) == "model.layers"
    assert prunable_linear_names(model) == EXPECTED_LINEARS  # no lm_head, no embeddings


def test_decoder_layers_found_for_opt():
    from transformers import AutoModelForCausalLM, OPTConfig
    config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                       vocab_size=100, word_embed_proj_dim=32, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config)
    assert layers_prefix(model) == "model.decoder.layers"
    names = prunable_linear_names(model)
    assert len(names) == 12 and all(n.startswith("model.decoder.layers.") for n in names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_gives_identical_logits(tmp_path, dtype):
    model = tiny_llama(dtype=dtype)
    want = logits(model)
    entry = save_packed_model(model, None, tmp_path / "packed", "2:4")
    assert entry["packed"] == [f"{n}.weight" for n in EXPECTED_LINEARS]

    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert config[CONFIG_KEY]["format"] == "nm-packed" and config[CONFIG_KEY]["version"] == 1
    assert config[CONFIG_KEY]["pattern"] == "2:4"
    assert config[CONFIG_KEY]["packed"] == entry["packed"]
    assert not (tmp_path / "packed" / "model.safetensors").exists()
    with safe_open(str(tmp_path / "packed" / WEIGHTS_FILE), "pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.mlp.up_proj.weight" not in keys       # not stored dense
    assert "model.layers.0.mlp.up_proj.weight.nm_values" in keys
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys

    loaded = load_packed_model(tmp_path / "packed")
    assert loaded.dtype == dtype
    assert not hasattr(loaded.config, CONFIG_KEY)
    assert torch.equal(logits(loaded), want)
    assert load_packed_tokenizer(tmp_path / "packed") is None


def test_size_report_of_saved_fp16_model(tmp_path):
    save_packed_model(tiny_llama(dtype=torch.float16), None, tmp_path, "2:4")
    report = packed_size_report(tmp_path)
    assert report["num_packed"] == 14
    assert report["size_ratio"] <= 0.57
    assert report["file_bytes"] == (tmp_path / WEIGHTS_FILE).stat().st_size


def test_tied_embeddings_saved_once_and_reloaded(tmp_path):
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    want = logits(model)
    entry = save_packed_model(model, None, tmp_path, "2:4")
    assert entry["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as handle:
        assert "lm_head.weight" not in set(handle.keys())
    loaded = load_packed_model(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(loaded), want)


def test_subset_of_layers(tmp_path):
    model = tiny_llama(make_24=False)
    with torch.no_grad():
        weight = model.model.layers[0].self_attn.q_proj.weight
        weight.mul_(nm_mask(weight.abs(), 2, 4))
    want = logits(model)
    entry = save_packed_model(model, None, tmp_path, "2:4",
                              layer_names=["model.layers.0.self_attn.q_proj.weight"])
    assert entry["packed"] == ["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(logits(load_packed_model(tmp_path)), want)


def test_invalid_layer_refused_before_writing(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[2, 4:8] = 1.0
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj .*row 2, group 1"):
        save_packed_model(model, None, out, "2:4")
    assert not out.exists()
    with pytest.raises(ValueError, match="N:M pattern"):
        save_packed_model(tiny_llama(), None, tmp_path / "u", "unstructured")
    with pytest.raises(ValueError, match="not 1:4-sparse"):  # a 2:4 model is not 1:4
        save_packed_model(tiny_llama(), None, tmp_path / "x", "1:4")


def test_load_refuses_dense_dir(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a packed model"):
        load_packed_model(tmp_path)


# ------------------------------------------------------ semi-structured execution

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_semi_structured_is_reported_noop_without_cuda():
    model = tiny_llama(dtype=torch.float16)
    want = logits(model)
    report = to_semi_structured(model)
    assert report["converted"] == []
    assert report["fell_back"] == {name: "no CUDA" for name in EXPECTED_LINEARS}
    assert torch.equal(logits(model), want)


def tiny_llama_gpu(dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig
    # Dimensions that are multiples of 64: within both backends' shape limits.
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to("cuda", dtype).eval()
    with torch.no_grad():
        for name in prunable_linear_names(model):
            weight = model.get_submodule(name).weight
            weight.mul_(nm_mask(weight.abs().float(), 2, 4))
    return model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_matches_dense_on_gpu():
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("2:4 kernels need compute capability >= 8.0")
    model = tiny_llama_gpu(torch.float16)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0:4] = 1.0  # no longer 2:4
    ids = torch.randint(0, 300, (2, 40), device="cuda")
    with torch.no_grad():
        want = model(ids).logits.float()
    report = to_semi_structured(model)
    assert "not 2:4" in report["fell_back"]["model.layers.1.mlp.up_proj"]
    assert len(report["converted"]) == 13, report["fell_back"]
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ != "Parameter" or \
        "SparseSemiStructured" in type(model.model.layers[0].mlp.up_proj.weight.data).__name__
    with torch.no_grad():
        got = model(ids).logits.float()
    assert torch.isfinite(got).all()
    assert float((got - want).norm() / want.norm()) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_falls_back_for_fp32_on_gpu():
    model = tiny_llama_gpu(torch.float32)
    report = to_semi_structured(model)
    assert report["converted"] == []
    assert all("not supported" in r or "capability" in r for r in report["fell_back"].values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_packed_model_on_gpu(tmp_path):
    model = tiny_llama(dtype=torch.float16)
    save_packed_model(model, None, tmp_path, "2:4")
    loaded = load_packed_model(tmp_path, device="cuda")
    assert loaded.model.embed_tokens.weight.is_cuda
    for name in EXPECTED_LINEARS:
        assert torch.equal(loaded.get_submodule(name).weight.cpu(), model.get_submodule(name).weight)


# ------------------------------------------------------------ architectures

@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3", "opt"])
def test_roundtrip_across_architectures_with_tokenizer(tmp_path, arch):
    from pruning.models import build_tiny_model
    model, tokenizer = build_tiny_model(arch, dtype=torch.float16)
    with torch.no_grad():
        for name in prunable_linear_names(model):
            weight = model.get_submodule(name).weight
            weight.mul_(nm_mask(weight.abs().float(), 2, 4))
    ids = torch.randint(0, 200, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    save_packed_model(model, tokenizer, tmp_path, "2:4")
    with torch.no_grad():
        assert torch.equal(load_packed_model(tmp_path)(ids).logits, want)
    assert load_packed_tokenizer(tmp_path)("abc")["input_ids"] == tokenizer("abc")["input_ids"]

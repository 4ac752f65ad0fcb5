"""Finding decoder blocks and prunable layers (pruning/discovery.py), and GPT-2's
transformers Conv1D layers (weight stored (d_in, d_out)) through the whole library."""
import json

import pytest
import torch
from torch import nn

from pruning.discovery import (check_prunable, check_prunable_config, decoder_layers, layers_prefix,
                               prunable_linear_names)
from pruning.masks import is_nm_valid
from pruning.models import build_tiny_model, tiny_config
from pruning.runner import PruneSpec, prune_model

GPT2_LAYERS = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}


def calib(n=4, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


class _Block(nn.Module):
    def __init__(self, prunable=True):
        super().__init__()
        self.proj = nn.Linear(8, 8) if prunable else nn.LayerNorm(8)


class _ByClass(nn.Module):
    """Blocks at a path no fallback knows; only `_no_split_modules` can find them."""
    _no_split_modules = ["_Block"]

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.stack = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(8, 8)


class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8))


class _NothingToPrune(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Block(prunable=False)])


def test_blocks_are_found_by_their_declared_class_then_by_path():
    """Red if the `_no_split_modules` search is dropped (the toy's path is unknown) or
    if the fallback paths are (the other toy declares no block class)."""
    toy = _ByClass()
    assert decoder_layers(toy) is toy.backbone.stack
    assert prunable_linear_names(toy) == ["backbone.stack.0.proj", "backbone.stack.1.proj"]  # not head
    fallback = _NothingToPrune()
    assert decoder_layers(fallback) is fallback.model.layers
    for arch in ("llama", "opt", "gemma3", "gpt2"):
        with torch.device("meta"):
            model, _ = build_tiny_model(arch)
        blocks = decoder_layers(model)
        assert {type(b).__name__ for b in blocks} <= set(model._no_split_modules), arch
        assert len(blocks) == model.config.num_hidden_layers, arch
    assert layers_prefix(model) == "transformer.h"


def test_unsupported_models_are_refused_naming_the_class():
    """Red if check_prunable accepts a model without blocks or without prunable layers,
    or its message stops naming the model class."""
    with pytest.raises(ValueError, match="_NoBlocks is not supported: cannot find its decoder blocks"):
        check_prunable(_NoBlocks())
    with pytest.raises(ValueError, match="_NothingToPrune is not supported: .* no nn.Linear or Conv1D"):
        check_prunable(_NothingToPrune())
    config = tiny_config("llama").to_dict()
    config["num_hidden_layers"] = 0
    with pytest.raises(ValueError, match="LlamaForCausalLM is not supported"):
        check_prunable_config(config)
    check_prunable_config(tiny_config("gpt2").to_dict())  # GPT-2's Conv1D layers count


def test_plan_refuses_a_model_without_prunable_layers(tmp_path):
    """`admm-prune plan/run` learn the layers in the preflight (stages.preflight.model_facts,
    from the config on the meta device): red if that stops refusing a model with none."""
    from stages.params import ParamError
    from stages.preflight import model_facts
    config = tiny_config("llama").to_dict()
    config["num_hidden_layers"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ParamError, match="model.source: LlamaForCausalLM is not supported"):
        model_facts(str(tmp_path))


# ---------------------------------------------------------------- GPT-2 (Conv1D)

def stored(model, name):
    """The parameter as stored: (d_in, d_out) for Conv1D."""
    return model.get_submodule(name).weight.detach()


def test_gpt2_runner_prunes_every_conv1d_in_blocks_and_nothing_else():
    """Red if Conv1D is not a prunable type, if sparsity is off, or if N:M groups run
    along d_out (the stored rows) instead of d_in (checked on the transpose)."""
    model, _ = build_tiny_model("gpt2")
    names = prunable_linear_names(model)
    assert len(names) == 4 * 4 and {n.split(".", 3)[3] for n in names} == GPT2_LAYERS
    before = {k: v.clone() for k, v in model.state_dict().items()
              if not any(k.startswith(n + ".") for n in names)}
    result = prune_model(model, calib(), PruneSpec("admm", None, "2:4"), progress=False)
    assert {s["name"] for s in result.layers} == set(names)
    for name in names:
        w = stored(model, name)
        assert (w == 0).sum().item() == w.numel() // 2, name
        assert is_nm_valid(w.t() != 0, 2, 4), name      # along d_in
        assert not is_nm_valid(w != 0, 2, 4), name      # and so (random weights) not along d_out
    for key, value in model.state_dict().items():
        if key in before:
            assert torch.equal(value, before[key]), f"{key} changed"
    assert torch.isfinite(model(calib(1)).logits).all()


def test_gpt2_unstructured_sparsity_is_exact_and_user_mask_is_kept():
    """A user mask comes laid out like the weight parameter ((d_in, d_out) for Conv1D).
    Red if the runner does not transpose it: the square attn.c_proj would then keep
    the transposed pattern."""
    model, _ = build_tiny_model("gpt2")
    names = prunable_linear_names(model)
    target = "transformer.h.1.attn.c_proj"
    mask = torch.rand(stored(model, target).shape, generator=torch.Generator().manual_seed(1)) > 0.3
    spec = PruneSpec("magnitude", 0.6, masks={target: mask})  # the masked layer gets the ADMM update
    prune_model(model, calib(), spec, progress=False)
    assert torch.equal(stored(model, target) != 0, mask)
    for name in names:
        if name != target:
            w = stored(model, name)
            assert (w == 0).sum().item() == round(0.6 * w.numel()), name


def test_gpt2_layer_report_and_owl_read_the_transposed_view():
    """Red if the evaluate stage's layer report checks N:M on the stored layout."""
    from pruning.owl import block_outlier_ratios
    from pruning.runner import capture_block_inputs
    from stages.evaluate import layer_report
    model, _ = build_tiny_model("gpt2")
    ratios = block_outlier_ratios(model, capture_block_inputs(model, calib()))
    assert len(ratios) == 4 and all(0 <= r < 1 for r in ratios)
    prune_model(model, calib(), PruneSpec("magnitude", None, "2:4"), progress=False)
    rows, sparsity, valid = layer_report(model, {n: "2:4" for n in prunable_linear_names(model)})
    assert valid is True and sparsity == pytest.approx(0.5) and len(rows) == 16


def test_gpt2_packing_round_trip(tmp_path):
    """Red if packing reads the stored (d_in, d_out) layout (not 2:4 along its rows:
    refused) or unpacking writes it back untransposed (weights differ)."""
    from pruning.packing import load_packed_model, save_packed_model
    model, tokenizer = build_tiny_model("gpt2")
    prune_model(model, calib(), PruneSpec("magnitude", None, "2:4"), progress=False)
    entry = save_packed_model(model, tokenizer, tmp_path, "2:4")
    assert len(entry["packed"]) == 16
    loaded = load_packed_model(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids = calib(1)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_gpt2_semi_structured_fallback_names_every_conv1d():
    """Without CUDA every Conv1D is reported and stays dense. Red if Conv1D layers are
    left out of the report; the conversion itself is the GPU test's."""
    from pruning.sparse_exec import to_semi_structured
    model, _ = build_tiny_model("gpt2")
    before = model(calib(1)).logits
    report = to_semi_structured(model)
    names = prunable_linear_names(model)
    if not torch.cuda.is_available():
        assert report["fell_back"] == {n: "no CUDA" for n in names}
        assert torch.equal(model(calib(1)).logits, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpt2_semi_structured_on_gpu_matches_dense():
    """Conv1D's addmm(bias, x, weight) runs on the transposed sparse tensor. Red if the
    weight is not transposed back (shape error or wrong output)."""
    from pruning.sparse_exec import to_semi_structured
    model, _ = build_tiny_model("gpt2", dtype=torch.float16)
    prune_model(model, calib(), PruneSpec("magnitude", None, "2:4"), device="cuda", progress=False)
    ids = calib(2).cuda()
    want = model(ids).logits.float()
    report = to_semi_structured(model)
    assert report["converted"] == prunable_linear_names(model), report["fell_back"]
    got = model(ids).logits.float()
    assert float((got - want).norm() / want.norm()) < 1e-2

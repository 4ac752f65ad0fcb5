"""Which modules of a model get pruned: its decoder blocks and their prunable layers.

Blocks are found the way transformers describes a model: the classes it names in
`_no_split_modules` (the units it never splits across devices, i.e. its blocks)
inside `model.base_model`. A model that names none, or several lists of them,
falls back to the usual attribute paths.

Prunable layers are the nn.Linear and transformers `Conv1D` modules inside the
blocks (never embeddings or lm_head). Conv1D (GPT-2) stores its weight as
(d_in, d_out), the transpose of nn.Linear: everything that reads or writes a
layer's weight goes through `layer_weight` / `set_layer_weight`, which always
speak (d_out, d_in), so masks, N:M groups (along d_in) and packing need no
special case.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

PRUNABLE_TYPES = (nn.Linear, Conv1D)
LAYER_PATHS = ("model.layers", "model.decoder.layers", "model.language_model.layers",
               "transformer.h", "gpt_neox.layers")


def _block_lists_by_class(model: nn.Module) -> list[nn.ModuleList]:
    """Non-empty ModuleLists in the base model whose entries are all of a block class
    named in `_no_split_modules`."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    if not classes:
        return []
    base = getattr(model, "base_model", model)
    return [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m)
            and all(type(block).__name__ in classes for block in m)]


def _block_list_at_paths(model: nn.Module) -> nn.ModuleList | None:
    for path in LAYER_PATHS:
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, in order. ValueError naming the model class when
    they cannot be found."""
    by_class = _block_lists_by_class(model)
    if len(by_class) == 1:
        return by_class[0]
    at_path = _block_list_at_paths(model)
    if at_path is not None:
        return at_path
    named = sorted(getattr(model, "_no_split_modules", None) or ())
    raise ValueError(f"model: {type(model).__name__} is not supported: cannot find its decoder blocks "
                     f"(block classes {named or 'not declared'} gave {len(by_class)} lists; "
                     f"no ModuleList at {', '.join(LAYER_PATHS)})")


def layers_prefix(model: nn.Module) -> str:
    """Module name of the block list, e.g. 'model.layers'."""
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, PRUNABLE_TYPES)


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The prunable layers of one block (nn.Linear or Conv1D), by name inside the block."""
    return {name: m for name, m in block.named_modules() if is_prunable(m)}


def prunable_linear_names(model: nn.Module) -> list[str]:
    """Full module names of the prunable layers inside decoder blocks (never embeddings or lm_head)."""
    prefix = layers_prefix(model)
    return [f"{prefix}.{i}.{name}" for i, block in enumerate(decoder_layers(model))
            for name in block_linears(block)]


def check_prunable(model: nn.Module) -> None:
    """Refuse, before any work, a model whose blocks or prunable layers cannot be
    found. Cheap on a model built on the meta device."""
    names = prunable_linear_names(model)
    if not names:
        raise ValueError(f"model: {type(model).__name__} is not supported: its decoder blocks "
                         f"({layers_prefix(model)}, {len(decoder_layers(model))} blocks) hold no "
                         f"nn.Linear or Conv1D layer to prune")


def check_prunable_config(config) -> None:
    """check_prunable on the model a config (object or config.json dict) builds on the
    meta device: no weights, no memory. A config transformers cannot build a causal
    LM from is left to the model stage (its own error is clearer)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        if isinstance(config, dict):
            config = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:
        return
    check_prunable(model)


# ---------------------------------------------------------------- weights, as (d_out, d_in)

def to_out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like `module.weight` (a weight, a mask), as a (d_out, d_in)
    view; the inverse too (a transpose is its own inverse)."""
    return tensor.t() if isinstance(module, Conv1D) else tensor


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a (d_out, d_in) view (no copy): writes go to the layer."""
    return to_out_in(module, module.weight.data)


def set_layer_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace the layer's weight with a (d_out, d_in) tensor."""
    module.weight.data = to_out_in(module, weight).contiguous() if isinstance(module, Conv1D) else weight


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a prunable layer."""
    d_out, d_in = layer_weight(module).shape
    return d_out, d_in

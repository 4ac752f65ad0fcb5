"""The prunable linear layers of a model, with their shapes: what the settings
resolver (pruning.settings.PruneSettings.plan) checks against.

linear_shapes learns them from a config alone: the model is built on the meta
device, so no weights are read and no memory is taken, in seconds even for a 70B
config.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from .discovery import block_linears, check_prunable, decoder_layers, layer_shape, layers_prefix
from .settings import LayerShape, SettingsError


def describe_linears(model) -> list[LayerShape]:
    """The prunable layers (nn.Linear or Conv1D inside decoder blocks) with their
    (d_out, d_in); a model without any is refused, naming its class."""
    try:
        check_prunable(model)
    except ValueError as err:
        raise SettingsError(("model", "source"), str(err).partition(": ")[2]) from None
    prefix = layers_prefix(model)
    return [LayerShape(i, name, f"{prefix}.{i}.{name}", *layer_shape(layer))
            for i, block in enumerate(decoder_layers(model)) for name, layer in block_linears(block).items()]


def linear_shapes(config) -> list[LayerShape]:
    """describe_linears of the model a config builds, built on the meta device: no
    memory, no weights, seconds even for a 70B config."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return describe_linears(model)

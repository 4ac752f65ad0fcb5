"""The prunable linear layers of a model, with their shapes: what the settings
resolver (pruning.settings.PruneSettings.plan) checks against.

linear_shapes learns them from a config alone: the model is built on the meta
device, so no weights are read and no memory is taken, in seconds even for a 70B
config.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from .runner import block_linears, decoder_layers, layers_prefix
from .settings import LayerShape


def describe_linears(model) -> list[LayerShape]:
    """The prunable linear layers (inside decoder blocks) with their shapes."""
    prefix = layers_prefix(model)
    return [LayerShape(i, name, f"{prefix}.{i}.{name}", linear.out_features, linear.in_features)
            for i, block in enumerate(decoder_layers(model)) for name, linear in block_linears(block).items()]


def linear_shapes(config) -> list[LayerShape]:
    """describe_linears of the model a config builds, built on the meta device: no
    memory, no weights, seconds even for a 70B config."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return describe_linears(model)

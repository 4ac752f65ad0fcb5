"""The preflight: what params.yaml asks for, checked against the data files, the
device and the model's config before params.yaml is written and before any stage
(or Prefect) starts. It reads; it never writes a file.

Cheapest first, so a setting that needs no model config is refused in well under
two seconds:
1. device: CUDA must be there when model.device asks for it (probed without
   importing torch, which takes seconds);
2. data: every text source is read with the stages' own reader (local files:
   pruning.data.read_documents; an HF dataset name: its builder's features), so a
   missing text field or an empty file is refused here, not 60 s into calibrate;
3. model: its config (an alias, a local directory, or a hub id: cached or fetched,
   config.json only) gives the context length and, built on the meta device (no
   weights, no memory), every prunable layer's name and shape. The prune settings
   are then resolved for every layer with the library's one resolver
   (pruning.settings.PruneSettings.plan): N:M divisibility, overrides and mask names
   that reach no layer (with the nearest valid name), mask shapes read from the
   safetensors header.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .params import ParamError, check_static, prune_settings, section
from .paths import MODEL_DIR, MODEL_SOURCE_JSON
from .textdata import check_source


@dataclass
class ModelFacts:
    context: int | None
    layers: list          # pruning.settings.LayerShape of every prunable linear


def data_specs(params: dict) -> dict[str, dict]:
    return {"calibrate.data": section(params, "calibrate")["data"],
            "evaluate.wikitext2": section(params, "evaluate")["wikitext2"],
            "evaluate.c4": section(params, "evaluate")["c4"]}


def check_data(params: dict) -> None:
    for key, spec in data_specs(params).items():
        check_source(key, spec)


def cuda_ruled_out() -> bool:
    """True when CUDA certainly cannot be used, found without importing torch (which
    takes seconds): torch is a CPU-only build, or (Linux) there is no NVIDIA driver."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return True
    lib = Path(spec.origin).parent / "lib"
    if not any(lib.glob("*torch_cuda*")) and not any(lib.glob("*torch_hip*")):
        return True
    if sys.platform.startswith("linux") and not any(lib.glob("*torch_hip*")):
        try:
            ctypes.CDLL("libcuda.so.1")
        except OSError:
            return True
    return False


def check_device(params: dict) -> None:
    device = section(params, "model").get("device", "auto")
    if device.startswith("cuda"):
        if not cuda_ruled_out():
            import torch
            if torch.cuda.is_available():
                return
        raise ParamError("model.device", f"{device!r} requested but CUDA is not available here; use auto "
                                         f"(CUDA when present) or cpu")


def _imported_config(source: str):
    """The config of the model the model stage already imported from `source`, if any."""
    record = MODEL_DIR / MODEL_SOURCE_JSON
    try:
        if json.loads(record.read_text()).get("source") != source:
            return None
    except (OSError, ValueError):
        return None
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(MODEL_DIR)


def model_facts(source: str) -> ModelFacts:
    from pruning.models import load_config, max_context
    from pruning.shapes import linear_shapes
    from pruning.settings import SettingsError

    try:
        config = _imported_config(source) or load_config(source)
    except SettingsError as err:
        raise err.within("model") from None
    except (OSError, ValueError) as err:  # a config transformers cannot read
        raise ParamError("model.source", f"cannot read the config of {source!r}: {err}") from None
    try:
        context = max_context(config)
    except ValueError:
        context = None
    return ModelFacts(context, linear_shapes(config))


def mask_shapes(mask_file: str) -> dict[str, tuple]:
    """{key: shape} from the safetensors header; no tensor is read."""
    from safetensors import safe_open
    try:
        with safe_open(mask_file, framework="numpy") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ParamError("prune.mask_file", f"{mask_file} is not a readable safetensors file ({err})") from None


def check_against_model(params: dict, facts: ModelFacts) -> None:
    from .params import check_context

    check_context("calibrate.seqlen", section(params, "calibrate")["seqlen"], facts.context)
    check_context("evaluate.seqlen", section(params, "evaluate")["seqlen"], facts.context)
    prune = section(params, "prune")
    masks = mask_shapes(prune["mask_file"]) if prune.get("mask_file") else None
    settings = prune_settings(params)
    try:
        settings.plan(facts.layers, masks, mask_path=("mask_file",))
    except ParamError as err:
        raise err.within("prune") from None


def check_all(params: dict) -> ModelFacts:
    """Everything, before any stage runs (the CLI and the flows call this): the static
    checks first (milliseconds), then the preflight."""
    check_static(params)
    return preflight(params)


def preflight(params: dict) -> ModelFacts:
    """Everything that needs the data, the device or the model's config (after
    stages.params.check_static, as check_all does)."""
    check_device(params)
    check_data(params)
    facts = model_facts(section(params, "model")["source"])
    check_against_model(params, facts)
    return facts


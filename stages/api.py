"""The Python API: prune a model in one call, the pipeline's prune step without DVC.

    from stages.api import prune, save

    model, report = prune("HuggingFaceTB/SmolLM2-135M", "data/c4-train-first1000.jsonl",
                          {"method": "admm-grad", "sparsity": 0.6})
    save(model, report, "smollm2-admm-grad-60")      # from_pretrained-ready, with a model card

- model: a transformers model object (then pass tokenizer=), a local model
  directory, a hub id or an alias (smollm2-135m, tiny-random-llama); None takes
  the recipe's model.source.
- data: the calibration text: a list of strings, a local .jsonl/.json/.parquet/.txt
  file, an HF dataset name (its train split, field `text`), or a mapping like
  params.yaml's calibrate.data (path, name, data_files, split, text_field); None
  takes the recipe's calibrate.data.
- recipe: params.yaml's settings, as a mapping or a YAML file, in one of two shapes:
  a params-like document (sections model, calibrate, prune; evaluate and convert
  may be there and are not used: params.yaml itself works), or just the prune
  section (method, sparsity, pattern, options, block_overrides, layer_overrides,
  true_sequential, mask_file/mask_sha256). What it leaves out takes DEFAULTS
  below (the papers' calibration: 128 windows of 2048 tokens, seed 0; ADMM-Grad at
  50 %).

Everything is checked by the same code that checks params.yaml, and errors name
the params.yaml key (a SettingsError such as `calibrate.seqlen: 2048 is beyond
the model's context of 512 tokens; use at most 512`). The pruning itself is
stages/pruner.py, the path the prune stage takes; the windows are cut like the
calibrate stage's (stages/textdata.py). The model is pruned in place and returned
with a PruneReport; model.config.sparsity_config records what was done.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from pruning.data import TEXT_SUFFIXES, window_bos_id
from pruning.settings import MODEL_ALIASES, SettingsError

from .model_card import calibration_sentence
from .params import SECTIONS, check_calibrate, check_data_spec, check_model, check_prune, read_yaml
from .pruner import prune as prune_with_params
from .textdata import calibration_ids, load_texts

# What a recipe leaves out. Model keys as params.yaml's; calibrate and prune: the papers' protocol.
DEFAULTS = {
    "model": {"dtype": "float32", "device": "auto", "offload": False, "batch_size": 8},
    "calibrate": {"nsamples": 128, "seqlen": 2048, "seed": 0},
    "prune": {"method": "admm-grad", "sparsity": 0.5},
}
DATA_DEFAULTS = {"name": None, "data_files": None, "split": "train", "text_field": "text"}


@dataclass
class PruneReport:
    """What `prune` did. layers: one row per pruned linear layer (block, name, method,
    pattern, sparsity, rel_error = ‖XΔWᵀ‖²/‖XWᵀ‖² on the calibration data, seconds)."""
    layers: list[dict]
    settings: dict                 # the recipe as used: sections model, calibrate, prune, defaults filled in
    sparsity_config: dict          # what went into model.config.sparsity_config
    seconds: float
    source: str                    # the model argument as given (a class name for a model object)
    calibration: str               # the calibration text and windows, in words
    tokenizer: object = field(default=None, repr=False)   # the tokenizer the windows were cut with

    @property
    def sparsity(self) -> float:
        """The pruned layers' sparsity, averaged over the layers."""
        return self.sparsity_config["measured_sparsity"]["mean_over_layers"]


def recipe_sections(recipe) -> dict:
    """A recipe (None, a mapping or a YAML file) as the sections it sets (a prune
    section alone becomes {"prune": ...})."""
    if recipe is None:
        return {}
    if isinstance(recipe, (str, Path)):
        if not Path(recipe).is_file():
            raise SettingsError(("recipe",), f"{str(recipe)!r} is not a file; give a YAML file or a mapping")
        recipe = read_yaml(recipe) or {}
    if not isinstance(recipe, Mapping):
        raise SettingsError(("recipe",), f"expected a mapping (params.yaml's sections, or its prune section), "
                                         f"got {type(recipe).__name__}")
    if not any(key in SECTIONS for key in recipe):
        return {"prune": dict(recipe)}
    unknown = [key for key in recipe if key not in SECTIONS]
    if unknown:
        raise SettingsError((unknown[0],), f"unknown section (known: {', '.join(SECTIONS)}); a recipe is "
                                           f"params.yaml's sections or its prune section alone")
    for name, values in recipe.items():
        if values is not None and not isinstance(values, Mapping):
            raise SettingsError((name,), f"expected a mapping, got {values!r}")
    return {name: dict(values or {}) for name, values in recipe.items()}


def with_defaults(sections: dict) -> dict:
    """Sections model, calibrate and prune: the recipe's keys over DEFAULTS."""
    return {name: {**copy.deepcopy(defaults), **copy.deepcopy(sections.get(name) or {})}
            for name, defaults in DEFAULTS.items()}


def text_source(data) -> list[str] | dict:
    """The `data` argument as texts (a list of strings) or a checked data spec."""
    if isinstance(data, (list, tuple)):
        if not data or not all(isinstance(text, str) for text in data):
            raise SettingsError(("data",), "expected a non-empty list of strings (the calibration texts)")
        return list(data)
    if isinstance(data, (str, Path)):
        data = {"path": str(data)}
    if not isinstance(data, Mapping):
        raise SettingsError(("data",), f"expected a list of strings, a local {'/'.join(TEXT_SUFFIXES)} file, "
                                       f"an HF dataset name or a data mapping, got {type(data).__name__}")
    return check_data_spec("calibrate.data", {**DATA_DEFAULTS, **data})


def _load_model(model, tokenizer, m: dict, given: dict):
    """(model, tokenizer, source) from a model object or a source string."""
    if not isinstance(model, str):
        if not hasattr(model, "config"):
            raise SettingsError(("model",), f"expected a transformers model, a local directory, a hub id or one of "
                                            f"{', '.join(MODEL_ALIASES)}, got {type(model).__name__}")
        if tokenizer is None:
            raise SettingsError(("tokenizer",), "a model object needs its tokenizer: prune(model, data, "
                                                "tokenizer=AutoTokenizer.from_pretrained(...))")
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if "dtype" in given and given["dtype"] != dtype:
            raise SettingsError(("model", "dtype"), f"is {given['dtype']!r} but the model object is {dtype}; "
                                                    f"convert it first (model.to(torch.{given['dtype']})) "
                                                    f"or leave model.dtype out")
        # A model object has no source to check: its other model keys are checked as an alias's would be.
        check_model({"model": {**m, "source": MODEL_ALIASES[-1], "dtype": dtype}})
        return model, tokenizer, type(model).__name__
    check_model({"model": {**m, "source": model}})
    from pruning.models import load_model
    try:
        loaded, loaded_tokenizer = load_model(model, dtype=m["dtype"], device="cpu")
    except SettingsError as err:
        raise err.within("model") from None
    return loaded, tokenizer or loaded_tokenizer, model


def prune(model=None, data=None, recipe=None, *, tokenizer=None, masks: dict | None = None,
          progress: bool = True):
    """Prune `model` on calibration windows cut from `data` with the settings of
    `recipe` (see the module doc); returns (the pruned model, a PruneReport).

    tokenizer: needed with a model object; otherwise the model's own.
    masks: {layer name: bool tensor, True = kept}: the ADMM update on your masks
    (like prune.mask_file, without a file)."""
    given = recipe_sections(recipe)
    settings = with_defaults(given)
    m, c = settings["model"], settings["calibrate"]
    source = m.pop("source", None)
    model = model if model is not None else source
    if model is None:
        raise SettingsError(("model",), "give a model (object, directory, hub id or alias) or model.source "
                                        "in the recipe")
    data = data if data is not None else c.get("data")
    if data is None:
        raise SettingsError(("data",), "give the calibration text (a list of strings, a file or a dataset "
                                       "name) or calibrate.data in the recipe")

    check_prune(settings)  # what needs no model, before anything is loaded
    texts = text_source(data)
    model, tokenizer, source = _load_model(model, tokenizer, m, given.get("model") or {})
    from pruning.models import max_context
    try:
        context = max_context(model)
    except ValueError:
        context = None
    in_memory = isinstance(texts, list)
    c["data"] = None if in_memory else texts
    check_calibrate(settings, context, texts_given=in_memory)
    documents = texts if in_memory else load_texts("calibrate.data", texts)
    ids = calibration_ids(documents, tokenizer, c, window_bos_id(model.config, tokenizer))

    pruned = prune_with_params(model, settings, ids, masks=masks, progress=progress)
    what = f"{len(documents)} given texts" if in_memory else texts["path"]
    c["data"] = f"<{len(documents)} texts>" if in_memory else texts
    report = PruneReport(
        layers=pruned.result.layers, settings=settings, sparsity_config=model.config.sparsity_config,
        seconds=pruned.result.seconds, source=source, tokenizer=tokenizer,
        calibration=calibration_sentence(c["nsamples"], c["seqlen"], c["seed"], what))
    return model, report


def save(model, report: PruneReport, out_dir: str | Path) -> Path:
    """Write a hub-ready folder: safetensors, config (with sparsity_config), the
    tokenizer without machine-local fields, and a model card (README.md)."""
    from pruning.models import export_model

    from .model_card import CardFacts, hub_base_model, write_card

    out_dir = export_model(model, report.tokenizer, out_dir)
    write_card(out_dir, CardFacts(source=report.source, calibration=report.calibration,
                                  base_model=hub_base_model(report.source)))
    return out_dir

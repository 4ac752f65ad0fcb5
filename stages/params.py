"""Reading and checking params.yaml.

The checks come in two steps, both before any stage does work:
- check_static (this module): every value on its own and the prune settings through
  the library's settings model (pruning.settings: one resolver for the params
  check, `admm-prune plan/run`, the prune stage and the library). No torch, no
  transformers, no data files read: milliseconds.
- stages.preflight: what needs the data files or the model's config (data columns,
  CUDA, layer names and shapes, user masks, context length).
stages.preflight.check_all runs both; the CLI runs it before params.yaml is written,
and each stage checks its own section again (a plain `dvc repro` does not go
through the CLI). The stages never import the preflight: their code (and so their
DVC deps) stays small.

Every error is a SettingsError (ParamError here) whose path is the full key in
params.yaml, so a user knows which line to fix. params.yaml is parsed as YAML 1.2
(ruamel, like DVC itself): PyYAML's YAML 1.1 reads an unquoted `2:4` as the
base-60 integer 124.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pruning.data import TEXT_SUFFIXES
from pruning.settings import PACKED_FORMATS, ModelSettings, PruneSettings, SettingsError, did_you_mean

from .paths import PARAMS_FILE

# One error type for the library and the pipeline: its path is data, never parsed back.
ParamError = SettingsError

LOCAL_TEXT_SUFFIXES = TEXT_SUFFIXES
SECTIONS = ("model", "calibrate", "prune", "evaluate", "convert")
CALIBRATE_KEYS = ("data", "nsamples", "seqlen", "seed")
EVALUATE_KEYS = ("seqlen", "max_windows", "c4_windows", "dense", "wikitext2", "c4")
DATA_KEYS = ("path", "name", "data_files", "split", "text_field")
PRUNE_FILE_KEYS = ("mask_file", "mask_sha256")  # the pipeline's own prune keys: a mask file and its hash
CONVERT_FORMATS = tuple(PACKED_FORMATS)          # packed: N:M packed weights; packed-fp8: FP8 2:4
CONVERT_DEFAULTS = {"format": "packed"}


def yaml_loader() -> YAML:
    return YAML(typ="safe", pure=True)


@contextlib.contextmanager
def yaml_errors(path: str | Path):
    """A YAML syntax error becomes one paragraph naming the file, line and column."""
    try:
        yield
    except YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        problem = "; ".join(str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p)
        raise ParamError((str(path),), f"is not valid YAML at {where}: {problem or err}. Fix the syntax there "
                                       f"(indentation, a missing ':' or an unclosed quote or bracket; quote "
                                       f"values such as \"2:4\") and run again") from None


def read_yaml(path: str | Path):
    path = Path(path)
    with yaml_errors(path):
        return yaml_loader().load(path.read_text(encoding="utf-8"))


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run from the workspace root (where dvc.yaml is)")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ParamError((str(path),), "expected a mapping of sections (model, calibrate, prune, evaluate)")
    return data


def section(params: dict, name: str) -> dict:
    """One section (convert may be left out: it has defaults)."""
    if name == "convert" and params.get("convert") is None:
        return dict(CONVERT_DEFAULTS)
    if name not in params or not isinstance(params[name], dict):
        raise ParamError((name,), f"section missing from {PARAMS_FILE} (or not a mapping)")
    return params[name]


def _known(key: tuple, values: dict, known) -> None:
    for name in values:
        if name not in known:
            raise ParamError((*key, name), f"unknown parameter (known: {', '.join(known)})"
                                           + did_you_mean(name, known))


# ------------------------------------------------------------------ small checks

def _int(key: str, value, minimum: int, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParamError(key, f"expected an integer >= {minimum}{' or null' if allow_none else ''}, got {value!r}")
    return value


def _bool(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ParamError(key, f"expected true or false, got {value!r}")
    return value


def check_model(params: dict) -> dict:
    """model.*: the source exists (as an alias, a local model directory or a hub id
    in form), dtype and device are known names. Whether CUDA is there: preflight."""
    m = section(params, "model")
    try:
        ModelSettings.from_mapping(m)
    except SettingsError as err:
        raise err.within("model") from None
    return m


def check_data_spec(key: str, spec) -> dict:
    """A text source: a local .jsonl/.json/.parquet/.txt file, or an HF dataset name."""
    if not isinstance(spec, dict):
        raise ParamError(key, f"expected a mapping with {', '.join(DATA_KEYS)}, got {spec!r}")
    _known(tuple(key.split(".")), spec, DATA_KEYS)
    path = spec.get("path")
    if not isinstance(path, str) or not path:
        raise ParamError(f"{key}.path", f"expected a local text file or an HF dataset name, got {path!r}")
    if Path(path).suffix in LOCAL_TEXT_SUFFIXES and not Path(path).is_file():
        raise ParamError(f"{key}.path", f"{path} does not exist (DVC-tracked data: run `dvc pull --allow-missing`)")
    for sub in ("split", "text_field"):
        if not isinstance(spec.get(sub), str) or not spec.get(sub):
            raise ParamError(f"{key}.{sub}", f"expected a non-empty string, got {spec.get(sub)!r}")
    if spec.get("name") is not None and not isinstance(spec["name"], str):
        raise ParamError(f"{key}.name", f"expected an HF config name or null, got {spec['name']!r}")
    if spec.get("data_files") is not None and not isinstance(spec["data_files"], (str, list, dict)):
        raise ParamError(f"{key}.data_files", f"expected a path pattern, list or mapping, got {spec['data_files']!r}")
    return spec


def check_context(key: str, seqlen: int, context: int | None) -> None:
    if context is not None and seqlen > context:
        raise ParamError(key, f"{seqlen} is beyond the model's context of {context} tokens; use at most {context}")


def check_calibrate(params: dict, context: int | None = None, texts_given: bool = False) -> dict:
    """texts_given: the Python API was handed the texts themselves, so there is no
    calibrate.data to check."""
    c = section(params, "calibrate")
    _known(("calibrate",), c, CALIBRATE_KEYS)
    if not texts_given:
        check_data_spec("calibrate.data", c.get("data"))
    _int("calibrate.nsamples", c.get("nsamples"), 1)
    _int("calibrate.seqlen", c.get("seqlen"), 2)
    _int("calibrate.seed", c.get("seed"), 0)
    check_context("calibrate.seqlen", c["seqlen"], context)
    return c


def check_evaluate(params: dict, context: int | None = None) -> dict:
    e = section(params, "evaluate")
    _known(("evaluate",), e, EVALUATE_KEYS)
    _int("evaluate.seqlen", e.get("seqlen"), 2)
    _int("evaluate.max_windows", e.get("max_windows"), 1, allow_none=True)
    _int("evaluate.c4_windows", e.get("c4_windows"), 1)
    check_data_spec("evaluate.wikitext2", e.get("wikitext2"))
    check_data_spec("evaluate.c4", e.get("c4"))
    _bool("evaluate.dense", e.get("dense"))
    check_context("evaluate.seqlen", e["seqlen"], context)
    return e


def check_convert(params: dict) -> dict:
    c = {**CONVERT_DEFAULTS, **section(params, "convert")}
    _known(("convert",), c, tuple(CONVERT_DEFAULTS))
    if c["format"] not in CONVERT_FORMATS:
        raise ParamError("convert.format", f"expected one of {', '.join(CONVERT_FORMATS)}, got {c['format']!r}"
                                           + did_you_mean(c["format"], CONVERT_FORMATS))
    if c["format"] == "packed-fp8" and params.get("prune", {}).get("pattern") == "unstructured":
        raise ParamError("convert.format", "packed-fp8 stores N:M weights, but prune.pattern is 'unstructured'; "
                                           "set prune.pattern to \"2:4\" or convert.format to packed")
    return c


# ------------------------------------------------------------------ prune

def prune_settings(params: dict) -> PruneSettings:
    """The prune section as the library's typed settings, checked as far as possible
    without the model (pruning.settings.PruneSettings.check)."""
    try:
        return PruneSettings.from_mapping(section(params, "prune"), extra_keys=PRUNE_FILE_KEYS)
    except SettingsError as err:
        raise err.within("prune") from None


def check_prune(params: dict) -> dict:
    p = section(params, "prune")
    prune_settings(params)
    check_mask_file(p.get("mask_file"), p.get("mask_sha256"))
    return p


def check_mask_file(mask_file, mask_sha256) -> None:
    """A user mask is read by prune but lives outside DVC's deps (its path is a param),
    so its content hash is a param too: then DVC reruns prune when the mask changes,
    and a mask edited behind DVC's back is refused instead of silently used."""
    if mask_file in (None, ""):
        return
    if not isinstance(mask_file, str) or not Path(mask_file).is_file():
        raise ParamError("prune.mask_file", f"{mask_file!r} is not a file (give a path relative to the workspace)")
    if Path(mask_file).suffix != ".safetensors":
        raise ParamError("prune.mask_file", "expected a .safetensors file of bool masks keyed by layer name")
    from .hashing import sha256_file

    actual = sha256_file(mask_file)
    if mask_sha256 != actual:
        raise ParamError("prune.mask_sha256", f"is {mask_sha256!r} but {mask_file} has sha256 {actual}; set "
                                              f"prune.mask_sha256={actual} (`admm-prune run` fills it in)")


# ------------------------------------------------------------------ all of it

def check_static(params: dict) -> None:
    """Every section on its own: no model config, no data read, no torch."""
    _known((), params, SECTIONS)
    check_model(params)
    check_calibrate(params)
    check_prune(params)
    check_evaluate(params)
    check_convert(params)


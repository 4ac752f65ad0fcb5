"""Reading and checking params.yaml.

Every check raises ParamError, whose message starts with the full dotted key
(`prune.sparsity: ...`), so a user knows which line of params.yaml to fix. The
checks are cheap (no model weights, no data) so they run before any heavy work:
the CLI checks every section up front, and each stage checks its own again (a
plain `dvc repro` does not go through the CLI).

params.yaml is parsed as YAML 1.2 (ruamel, like DVC itself): PyYAML's YAML 1.1
reads an unquoted `2:4` as the base-60 integer 124.
"""
from __future__ import annotations

import json
from pathlib import Path

from ruamel.yaml import YAML

from .paths import MODEL_DIR, MODEL_SOURCE_JSON, PARAMS_FILE

MODEL_ALIASES = ("smollm2-135m", "tiny-random-llama")
DTYPES = ("float32", "float16", "bfloat16")
LOCAL_TEXT_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")

# The keys each section may hold; anything else is a typo and is refused.
SECTION_KEYS = {
    "model": {"source", "dtype", "device", "offload"},
    "calibrate": {"data", "nsamples", "seqlen", "seed"},
    "prune": {"method", "sparsity", "pattern", "options", "true_sequential",
              "block_overrides", "layer_overrides", "mask_file", "mask_sha256"},
    "convert": {"format"},
    "evaluate": {"seqlen", "max_windows", "c4_windows", "wikitext2", "c4", "dense"},
}
DATA_KEYS = {"path", "name", "data_files", "split", "text_field"}
OVERRIDE_KEYS = {"method", "sparsity", "pattern", "options"}
# Arguments of pruning.validate_settings that are top-level prune params; every other
# argument it names is one of the method's options.
_TOP_LEVEL_SETTINGS = ("method", "sparsity", "pattern")


class ParamError(ValueError):
    """A bad parameter; `key` is its dotted name in params.yaml."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def yaml_loader() -> YAML:
    return YAML(typ="safe", pure=True)


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run from the workspace root (where dvc.yaml is)")
    data = yaml_loader().load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ParamError(str(path), "expected a mapping of sections")
    return data


def section(params: dict, name: str) -> dict:
    """One section, with unknown keys refused."""
    if name not in params or not isinstance(params[name], dict):
        raise ParamError(name, f"section missing from {PARAMS_FILE}")
    values = params[name]
    known = SECTION_KEYS.get(name)
    if known is not None:
        unknown = sorted(set(values) - known)
        if unknown:
            raise ParamError(f"{name}.{unknown[0]}", f"unknown parameter (known: {', '.join(sorted(known))})")
    return values


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


def _looks_like_path(source: str) -> bool:
    # Hub ids are 'name' or 'org/name'; anything starting like a path, or deeper, is a path.
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def check_model(params: dict) -> dict:
    m = section(params, "model")
    source = m.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ParamError("model.source", f"expected an alias ({', '.join(MODEL_ALIASES)}), "
                                         f"a local directory or a hub id, got {source!r}")
    if source not in MODEL_ALIASES:
        path = Path(source).expanduser()
        if path.exists():
            if not (path / "config.json").is_file():
                raise ParamError("model.source", f"{source!r} exists but is not a model directory (no config.json)")
        elif _looks_like_path(source):
            raise ParamError("model.source", f"local path {source!r} does not exist")
    if m.get("dtype") not in DTYPES:
        raise ParamError("model.dtype", f"expected one of {', '.join(DTYPES)}, got {m.get('dtype')!r}")
    device = m.get("device")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "mps") or device.split(":")[0] == "cuda"):
        raise ParamError("model.device", f"expected auto, cpu, cuda or cuda:N, got {device!r}")
    _bool("model.offload", m.get("offload", False))
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ParamError("model.device", f"{device!r} requested but CUDA is not available (use auto or cpu)")
    return m


def check_data_spec(key: str, spec) -> dict:
    """A text source: a local .jsonl/.json/.parquet/.txt file, or an HF dataset name."""
    if not isinstance(spec, dict):
        raise ParamError(key, f"expected a mapping with {', '.join(sorted(DATA_KEYS))}, got {spec!r}")
    unknown = sorted(set(spec) - DATA_KEYS)
    if unknown:
        raise ParamError(f"{key}.{unknown[0]}", f"unknown parameter (known: {', '.join(sorted(DATA_KEYS))})")
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
        raise ParamError(key, f"{seqlen} is beyond the model's context of {context} tokens")


def check_calibrate(params: dict, context: int | None = None) -> dict:
    c = section(params, "calibrate")
    check_data_spec("calibrate.data", c.get("data"))
    _int("calibrate.nsamples", c.get("nsamples"), 1)
    _int("calibrate.seqlen", c.get("seqlen"), 2)
    _int("calibrate.seed", c.get("seed"), 0)
    check_context("calibrate.seqlen", c["seqlen"], context)
    return c


def check_evaluate(params: dict, context: int | None = None) -> dict:
    e = section(params, "evaluate")
    _int("evaluate.seqlen", e.get("seqlen"), 2)
    _int("evaluate.max_windows", e.get("max_windows"), 1, allow_none=True)
    _int("evaluate.c4_windows", e.get("c4_windows"), 1)
    check_data_spec("evaluate.wikitext2", e.get("wikitext2"))
    check_data_spec("evaluate.c4", e.get("c4"))
    _bool("evaluate.dense", e.get("dense"))
    check_context("evaluate.seqlen", e["seqlen"], context)
    return e


def check_convert(params: dict) -> dict:
    """convert.format names a weight format of pruning.packing; packed-fp8 needs
    N:M weights to store (an unstructured model passes through dense)."""
    from pruning.masks import parse_pattern
    from pruning.packing import FORMATS

    c = section(params, "convert")
    if c.get("format") not in FORMATS:
        raise ParamError("convert.format", f"expected one of {', '.join(FORMATS)}, got {c.get('format')!r}")
    pattern = params.get("prune", {}).get("pattern")
    if c["format"] == "packed-fp8" and isinstance(pattern, str) and parse_pattern(pattern) is None:
        raise ParamError("convert.format", f"packed-fp8 stores N:M weights, but prune.pattern is {pattern!r}; "
                                           "set prune.pattern to \"2:4\" or convert.format to packed")
    return c


# ------------------------------------------------------------------ prune

def _validate_level(key: str, method, sparsity, pattern, options) -> None:
    """pruning.validate_settings, with its argument names mapped to params keys."""
    from pruning import validate_settings

    if not isinstance(options, dict):
        raise ParamError(f"{key}.options", f"expected a mapping of method options, got {options!r}")
    if not isinstance(pattern, str):
        # e.g. an unquoted 2:4 read by a YAML 1.1 parser; say what to write instead.
        raise ParamError(f"{key}.pattern", f"expected 'unstructured' or a quoted 'N:M' string, got {pattern!r}")
    try:
        validate_settings(method, sparsity, pattern, **options)
    except ValueError as err:
        arg, _, rest = str(err).partition(": ")
        name = f"{key}.{arg}" if arg in _TOP_LEVEL_SETTINGS else f"{key}.options.{arg}"
        raise ParamError(name, rest or str(err)) from None


def _override_settings(key: str, base: dict, override) -> dict:
    """The settings one override level produces, merged like pruning.runner.PruneSpec does."""
    if not isinstance(override, dict):
        raise ParamError(key, f"expected a mapping of {', '.join(sorted(OVERRIDE_KEYS))}, got {override!r}")
    unknown = sorted(set(override) - OVERRIDE_KEYS)
    if unknown:
        raise ParamError(f"{key}.{unknown[0]}", f"not a per-block/per-layer setting "
                                                f"(use {', '.join(sorted(OVERRIDE_KEYS))})")
    merged = dict(base)
    if "pattern" in override and "sparsity" not in override and override["pattern"] != "unstructured":
        merged["sparsity"] = None  # an N:M pattern implies its own sparsity
    merged.update({k: v for k, v in override.items() if k != "options"})
    extra = override.get("options", {})
    if not isinstance(extra, dict):
        raise ParamError(f"{key}.options", f"expected a mapping, got {extra!r}")
    merged["options"] = {**base["options"], **extra}
    return merged


def normalise_block_overrides(overrides, n_blocks: int | None = None) -> dict[int, dict]:
    """Keys as ints; negative keys count from the last block (-1 = last) once the
    number of blocks is known."""
    if not isinstance(overrides, dict):
        raise ParamError("prune.block_overrides", f"expected a mapping {{block index: settings}}, got {overrides!r}")
    out: dict[int, dict] = {}
    for raw, value in overrides.items():
        try:
            index = int(raw)
        except (TypeError, ValueError):
            raise ParamError(f"prune.block_overrides.{raw}", "block keys must be integers (negative counts from the end)") from None
        if n_blocks is not None:
            if not -n_blocks <= index < n_blocks:
                raise ParamError(f"prune.block_overrides.{raw}", f"the model has blocks 0..{n_blocks - 1}")
            index %= n_blocks
        if index in out:
            raise ParamError(f"prune.block_overrides.{raw}", f"block {index} is given twice")
        out[index] = value
    return out


def check_prune(params: dict, n_blocks: int | None = None) -> dict:
    p = section(params, "prune")
    options = p.get("options") if p.get("options") is not None else {}
    base = {"method": p.get("method"), "sparsity": p.get("sparsity"), "pattern": p.get("pattern"),
            "options": options}
    _validate_level("prune", **base)
    _bool("prune.true_sequential", p.get("true_sequential"))
    for index, override in normalise_block_overrides(p.get("block_overrides") or {}, n_blocks).items():
        key = f"prune.block_overrides.{index}"
        _validate_level(key, **_override_settings(key, base, override))
    layer_overrides = p.get("layer_overrides") or {}
    if not isinstance(layer_overrides, dict):
        raise ParamError("prune.layer_overrides", f"expected a mapping {{layer name suffix: settings}}, got {layer_overrides!r}")
    for suffix, override in layer_overrides.items():
        key = f"prune.layer_overrides.{suffix}"
        _validate_level(key, **_override_settings(key, base, override))
    check_mask_file(p.get("mask_file"), p.get("mask_sha256"))
    return p


def check_mask_file(mask_file, mask_sha256) -> None:
    """A user mask is read by prune but lives outside DVC's deps (its path is a param),
    so its content hash is a param too: then DVC reruns prune when the mask changes,
    and a mask edited behind DVC's back is refused instead of silently used."""
    if mask_file in (None, ""):
        return
    if not isinstance(mask_file, str) or not Path(mask_file).is_file():
        raise ParamError("prune.mask_file", f"{mask_file!r} is not a file")
    if Path(mask_file).suffix != ".safetensors":
        raise ParamError("prune.mask_file", "expected a .safetensors file of bool masks keyed by layer name")
    from .hashing import sha256_file

    actual = sha256_file(mask_file)
    if mask_sha256 != actual:
        raise ParamError("prune.mask_sha256", f"is {mask_sha256!r} but {mask_file} has sha256 {actual}; set "
                                              f"prune.mask_sha256={actual} (`admm-prune run` fills it in)")


# ------------------------------------------------------------------ model facts

def model_facts(source: str) -> dict:
    """The model's maximum context and number of blocks, when they can be known
    without loading weights ({} entries are None when they cannot, e.g. an uncached
    hub id offline): the stages check again against the imported model."""
    try:
        imported = MODEL_DIR / MODEL_SOURCE_JSON
        if imported.is_file() and json.loads(imported.read_text()).get("source") == source:
            return _facts(json.loads((MODEL_DIR / "config.json").read_text()))
        if source == "tiny-random-llama":
            from pruning.models import tiny_config
            return _facts(tiny_config("llama").to_dict())
        if source == "smollm2-135m":
            from pruning.models import default_cache_dir, smollm2_gguf_path
            cached = default_cache_dir() / "smollm2-135m" / "config.json"
            if cached.is_file():
                return _facts(json.loads(cached.read_text()))
            import gguf  # reads the shipped GGUF's metadata, not its weights
            fields = gguf.GGUFReader(str(smollm2_gguf_path())).fields

            def value(key):
                return int(fields[key].parts[fields[key].data[0]][0])
            return {"context": value("llama.context_length"), "blocks": value("llama.block_count")}
        path = Path(source).expanduser()
        if (path / "config.json").is_file():
            return _facts(json.loads((path / "config.json").read_text()))
        from transformers import AutoConfig
        # Only a cached config: a validation must not wait on the network.
        return _facts(AutoConfig.from_pretrained(source, local_files_only=True).to_dict())
    except Exception:  # unknown here; checked later against the imported model
        return {"context": None, "blocks": None}


def _facts(config: dict) -> dict:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    merged = {**text, **{k: v for k, v in config.items() if v is not None}}
    context = next((int(merged[k]) for k in ("max_position_embeddings", "n_positions", "max_sequence_length",
                                             "seq_length") if merged.get(k)), None)
    blocks = next((int(merged[k]) for k in ("num_hidden_layers", "n_layer", "num_layers") if merged.get(k)), None)
    return {"context": context, "blocks": blocks}


def check_all(params: dict) -> None:
    """Every section, before any stage runs (the CLI and the flow call this)."""
    check_model(params)
    facts = model_facts(params["model"]["source"])
    check_calibrate(params, facts["context"])
    check_prune(params, facts["blocks"])
    check_convert(params)
    check_evaluate(params, facts["context"])

"""The pruning settings: one typed model, one resolver, errors that name the parameter.

Pure Python (no torch, no transformers), so checking settings costs milliseconds and
can run before anything heavy is imported.

- METHODS, the method registry: each method has an options type, a frozen
  dataclass whose fields are its options with the paper defaults.
- PruneSettings: a default (method, sparsity, pattern, options), per-block and
  per-layer overrides, true_sequential, and two steps beyond the paper: `finetune`
  (a few optimiser steps per pruned block, masks fixed; FINETUNE_SCHEDULES) and
  `owl` (per-block sparsity from outlier ratios, pruning.owl).
- The one resolver: the default, then the block's override, then every layer
  override whose key matches the end of the layer's name ("mlp.down_proj" matches
  "mlp.down_proj" and "x.mlp.down_proj"). A level that sets an N:M pattern without
  a sparsity takes the pattern's own (1 - N/M); a level that changes the method
  drops the options inherited for the old one. A layer with a user mask gets the
  ADMM update on that mask; its options are the ADMM update's.
- The rules, the same for every caller (the params check, `admm-prune plan/run`,
  the prune stage and pruning.runner): the default, each block override merged onto
  the default and each layer override merged onto the default must each be valid;
  with the model's layers known, every layer's resolved settings must be valid for
  that layer (an N:M pattern's M must divide its in_features), every override must
  reach a layer, and every user mask must name a layer and match its shape.
- Every error is a SettingsError whose `path` is the parameter as data, e.g.
  ("layer_overrides", "mlp.down_proj", "sparsity"); `within("prune")` roots it in a
  larger document such as params.yaml.

It also holds the facts about models that a check needs without torch: the model
aliases, the dtype names and the config keys of context length and block count.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence


class SettingsError(ValueError):
    """A bad setting. `path` names it as data (a tuple of keys and block indices);
    `key` is the dotted form users see in params.yaml."""

    def __init__(self, path: tuple | list | str, message: str, refs: Sequence[tuple] = ()):
        if isinstance(path, str):
            path = tuple(path.split(".")) if path else ()
        self.path = tuple(path)
        self.message = message
        # Other parameters the message names ({0}, {1}, ...), as paths: rooted with the error.
        self.refs = tuple(tuple(ref) for ref in refs)
        super().__init__(f"{self.key}: {self.text}" if self.path else self.text)

    @property
    def key(self) -> str:
        return _dotted(self.path)

    @property
    def text(self) -> str:
        try:
            return self.message.format(*map(_dotted, self.refs)) if self.refs else self.message
        except (IndexError, KeyError, ValueError):  # braces of a quoted value
            return self.message

    def within(self, *prefix) -> "SettingsError":
        """The same error, rooted under `prefix` (e.g. within("prune"))."""
        return type(self)((*prefix, *self.path), self.message, [(*prefix, *ref) for ref in self.refs])

    def __reduce__(self):  # picklable across processes (Prefect, Dask)
        return type(self), (self.path, self.message, self.refs)


def _dotted(path: Sequence) -> str:
    return ".".join(str(part) for part in path)


class _Invalid(Exception):
    """A value check failed; the caller knows the path (a cross-option check names
    the option to blame in `key`)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def nearest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to a mistyped name, if any is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    guess = nearest(name, candidates)
    return f"; did you mean {guess!r}?" if guess else ""


# ---------------------------------------------------------------------------- models

MODEL_ALIASES = ("smollm2-135m", "gemma3-270m", "tiny-random-llama")  # pruning.models resolves them
DTYPE_NAMES = ("float32", "float16", "bfloat16")
# convert.format (user-facing name) -> the format name pruning.packing writes on disk.
PACKED_FORMATS = {"packed": "nm-packed", "packed-fp8": "nm-packed-fp8"}
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
BLOCK_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def looks_like_path(source: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything starting like a path, or deeper, is a path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def source_kind(source) -> str:
    """'alias', 'local' (a model directory) or 'hub'. A path that does not exist, or
    a directory that is not a model, is an error naming ("source",)."""
    if not isinstance(source, str) or not source.strip():
        raise SettingsError(("source",), f"expected an alias ({', '.join(MODEL_ALIASES)}), a local model "
                                         f"directory or a hub id, got {source!r}")
    if source in MODEL_ALIASES:
        return "alias"
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise SettingsError(("source",), f"{source!r} exists but is not a model directory (no config.json)")
        return "local"
    if looks_like_path(source):
        raise SettingsError(("source",), f"local path {source!r} does not exist; give an existing model "
                                         f"directory, a hub id (org/name) or one of {', '.join(MODEL_ALIASES)}")
    return "hub"


def check_dtype(dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise SettingsError(("dtype",), f"expected one of {', '.join(DTYPE_NAMES)}, got {dtype!r}"
                                        + did_you_mean(dtype, DTYPE_NAMES))
    return dtype


def check_device(device) -> str:
    """Syntax only; whether CUDA is there is the caller's question (it needs torch)."""
    if not isinstance(device, str) or not (device in ("auto", "cpu", "mps") or device.split(":")[0] == "cuda"):
        raise SettingsError(("device",), f"expected auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def config_value(config: Mapping, keys: Sequence[str]) -> int | None:
    """The first of `keys` set in a config dict (or its text_config, for multimodal models)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
    for source in (config, text):
        for key in keys:
            if source.get(key):
                return int(source[key])
    return None


@dataclass(frozen=True)
class ModelSettings:
    """Which model, in which dtype, on which device (what pruning.models.load_model takes)."""
    source: str
    dtype: str = "float32"
    device: str = "auto"
    offload: bool = False
    batch_size: int = 8

    @classmethod
    def from_mapping(cls, values: Mapping) -> "ModelSettings":
        _known_keys(values, [f.name for f in fields(cls)], ())
        source_kind(values.get("source"))
        check_dtype(values.get("dtype", "float32"))
        check_device(values.get("device", "auto"))
        if not isinstance(values.get("offload", False), bool):
            raise SettingsError(("offload",), f"expected true or false, got {values['offload']!r}")
        try:
            _integer(1)(values.get("batch_size", 8))
        except _Invalid as err:
            raise SettingsError(("batch_size",), str(err)) from None
        return cls(**values)


# ---------------------------------------------------------------------------- patterns

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' with 0 < N < M -> (N, M)."""
    if pattern == "unstructured":
        return None
    if not isinstance(pattern, str):
        # e.g. 124: what a YAML 1.1 reader makes of an unquoted 2:4
        raise SettingsError(("pattern",), f"expected 'unstructured' or a quoted N:M string such as \"2:4\", "
                                          f"got {pattern!r}")
    match = _NM.match(pattern)
    if match is None:
        raise SettingsError(("pattern",), f"expected 'unstructured' or 'N:M' such as '2:4', got {pattern!r}"
                                          + did_you_mean(pattern, ["unstructured"]))
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        hint = f" (did you mean '{m}:{n}'?)" if 0 < m < n else ""
        raise SettingsError(("pattern",), f"N:M needs 0 < N < M, got {pattern!r}{hint}")
    return n, m


# ---------------------------------------------------------------------------- options

def _integer(minimum: int):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _Invalid(f"expected an integer >= {minimum}, got {value!r}")
        return value
    return check


def _number(minimum: float, *, strict: bool):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise _Invalid(f"expected a number {'>' if strict else '>='} {minimum:g}, got {value!r}")
        if value < minimum or (strict and value == minimum):
            raise _Invalid(f"must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
        return float(value)
    return check


def _choice(*choices: str):
    def check(value):
        if value not in choices:
            raise _Invalid(f"expected one of {', '.join(map(repr, choices))}, got {value!r}"
                           + did_you_mean(value, choices))
        return value
    return check


def _option(default, check, doc: str):
    return field(default=default, metadata={"check": check, "doc": doc})


_GROUP = "compare weights across the whole layer ('layer') or within each output row ('row')"
_SOLVE = "dtype of the ADMM solve (float64 for reference runs)"


@dataclass(frozen=True)
class MagnitudeOptions:
    group: str = _option("layer", _choice("layer", "row"), _GROUP)


@dataclass(frozen=True)
class WandaOptions:
    group: str = _option("row", _choice("layer", "row"), _GROUP)


@dataclass(frozen=True)
class SparseGPTOptions:
    damping: float = _option(0.01, _number(0, strict=False), "dampening, a fraction of the mean Hessian diagonal")
    blocksize: int = _option(128, _integer(1), "columns per lazy update block")


@dataclass(frozen=True)
class AdmmUpdateOptions:
    """The ADMM weight update on a fixed mask (a user mask, or method admm)."""
    iters: int = _option(20, _integer(1), "ADMM iterations")
    rho: float = _option(1.0, _number(0, strict=True), "ADMM penalty")
    damping: float = _option(0.1, _number(0, strict=False), "dampening, a fraction of the mean Gram diagonal")
    solve_dtype: str = _option("float32", _choice("float32", "float64"), _SOLVE)
    matmul: str = _option("fp32", _choice("fp32", "tf32"),
                          "the solve's GEMMs on CUDA: fp32, or tf32 (faster; operands rounded to 10 bits)")


@dataclass(frozen=True)
class AdmmOptions(AdmmUpdateOptions):
    """ADMM with one Wanda mask chosen up front."""
    group: str = _option("layer", _choice("layer", "row"), _GROUP)


@dataclass(frozen=True)
class AdmmGradOptions(AdmmOptions):
    """ADMM-Grad: the mask is chosen gradually over the first mask_steps iterations."""
    mask_steps: int = _option(15, _integer(1), "iterations that update the mask (<= iters)")
    schedule: str = _option("cubic", _choice("cubic", "constant"), "sparsity schedule of the mask steps")

    def check(self) -> None:
        if self.mask_steps > self.iters:
            raise _Invalid(f"mask_steps={self.mask_steps} exceeds iters={self.iters}; "
                           f"expected mask_steps in [1, iters]", key="mask_steps")


@dataclass(frozen=True)
class Method:
    name: str
    options: type
    summary: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("magnitude", MagnitudeOptions, "keep the largest |W|"),
    Method("wanda", WandaOptions, "keep the largest |W| * ||X|| (no weight update)"),
    Method("sparsegpt", SparseGPTOptions, "OBS-style column sweep with lazy block updates"),
    Method("admm", AdmmOptions, "one Wanda mask up front, then the ADMM weight update"),
    Method("admm-grad", AdmmGradOptions, "gradual mask selection inside the ADMM iterations"),
)}
ADMM_METHODS = ("admm", "admm-grad")


def build_options(options_type: type, values: Mapping, path_of: Callable[[str], tuple], owner: str,
                  refs: Sequence[tuple] = ()):
    """An options instance from a mapping; an unknown key or a bad value is a
    SettingsError at path_of(key). `owner` names the method (it may refer to refs)."""
    known = {f.name: f for f in fields(options_type)}
    for key in values:
        if key not in known:
            raise SettingsError(path_of(key), f"not an option of {owner} (its options: "
                                              f"{', '.join(sorted(known)) or 'none'})" + did_you_mean(key, known),
                                refs)
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = known[key].metadata["check"](value)
        except _Invalid as err:
            raise SettingsError(path_of(key), str(err)) from None
    options = options_type(**checked)
    if hasattr(options, "check"):
        try:
            options.check()
        except _Invalid as err:
            raise SettingsError(path_of(err.key), str(err)) from None
    return options


# ---------------------------------------------------------------------------- layers

@dataclass(frozen=True)
class LayerShape:
    """A prunable linear layer: block index, name inside the block, full module name, shape."""
    block: int
    name: str
    full_name: str
    out_features: int
    in_features: int


@dataclass(frozen=True)
class LayerSettings:
    """What to do to one layer, resolved: sparsity is a number (an N:M pattern's own),
    options hold every option of the method with its defaults filled in."""
    method: str
    sparsity: float | None
    pattern: str
    options: dict
    user_mask: bool = False

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    def as_dict(self) -> dict:
        out = {"method": self.method, "sparsity": self.sparsity, "pattern": self.pattern,
               "options": dict(sorted(self.options.items()))}
        if self.user_mask:
            out["user_mask"] = True
        return out


def layer_settings(method, sparsity, pattern="unstructured", options: Mapping | None = None,
                   in_features: int | None = None) -> LayerSettings:
    """One layer's settings checked on their own (paths: "method", "sparsity",
    "pattern", option names): what pruning.prune_layer accepts."""
    level = {"method": method, "sparsity": sparsity, "pattern": pattern, "options": dict(options or {})}
    _check_level((), level)
    merged = _merge([((), level)])
    return _finish(merged, None, in_features, option_paths=lambda key: (key,))


def user_mask_settings(resolved: LayerSettings) -> LayerSettings:
    """A layer with a user mask gets the ADMM update on that mask (method admm, no
    sparsity or pattern of its own): with the ADMM update options of its resolved
    settings when its method is an ADMM method, the defaults otherwise (another
    method's options mean nothing to ADMM)."""
    keep = {f.name for f in fields(AdmmUpdateOptions)}
    own = resolved.options if resolved.method in ADMM_METHODS else {}
    options = AdmmUpdateOptions(**{k: v for k, v in own.items() if k in keep})
    return LayerSettings("admm", None, "unstructured", asdict(options), user_mask=True)


# ---------------------------------------------------------------------------- the model

_LEVEL_KEYS = ("method", "sparsity", "pattern", "options")
_SECTION_KEYS = ("method", "sparsity", "pattern", "options", "true_sequential", "finetune", "owl",
                 "block_overrides", "layer_overrides")


@dataclass(frozen=True)
class FinetuneSchedule:
    """Optimiser steps on one pruned block (pruning.finetune): Adam, full-batch
    gradients over the block's calibration inputs, the dense block's outputs as target."""
    steps: int
    lr: float


# prune.finetune: the names a user picks, and what each runs.
FINETUNE_SCHEDULES: dict[str, FinetuneSchedule | None] = {
    "none": None,
    "standard": FinetuneSchedule(steps=4, lr=1e-3),
}
# OWL moves each block's sparsity by at most this much (the OWL paper's lambda).
OWL_LAMBDA = 0.08


def _known_keys(values, known: Sequence[str], path: tuple, what: str = "parameter") -> None:
    if not isinstance(values, Mapping):
        raise SettingsError(path, f"expected a mapping of {', '.join(known)}, got {values!r}")
    for key in values:
        if key not in known:
            raise SettingsError((*path, key), f"unknown {what} (known: {', '.join(known)})"
                                              + did_you_mean(key, known))


def _check_level(path: tuple, level) -> None:
    """The values of one level on their own (method known, sparsity a fraction or
    null, pattern parseable, options a mapping)."""
    _known_keys(level, _LEVEL_KEYS, path, "per-block/per-layer setting" if path else "setting")
    if "method" in level and level["method"] not in METHODS:
        raise SettingsError((*path, "method"), f"expected one of {', '.join(METHODS)}, got {level['method']!r}"
                                               + did_you_mean(level["method"], METHODS))
    if "sparsity" in level:
        s = level["sparsity"]
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1):
            raise SettingsError((*path, "sparsity"), f"expected a fraction in [0, 1) (or null with an N:M "
                                                     f"pattern), got {s!r}")
    if "pattern" in level:
        try:
            parse_pattern(level["pattern"])
        except SettingsError as err:
            raise err.within(*path) from None
    if "options" in level and level["options"] is not None and not isinstance(level["options"], Mapping):
        raise SettingsError((*path, "options"), f"expected a mapping of method options, got {level['options']!r}")


@dataclass
class _Merged:
    values: dict = field(default_factory=dict)    # method, sparsity, pattern
    origin: dict = field(default_factory=dict)    # field -> path of the key that set it
    options: dict = field(default_factory=dict)
    option_level: dict = field(default_factory=dict)  # option -> path of the level that set it
    method_level: tuple = ()


def _merge(levels: Sequence[tuple[tuple, Mapping]]) -> _Merged:
    m = _Merged()
    for path, level in levels:
        if "method" in level and level["method"] != m.values.get("method"):
            m.options, m.option_level = {}, {}  # options belong to a method: a new method starts clean
            m.method_level = path
        if "pattern" in level and "sparsity" not in level and parse_pattern(level["pattern"]) is not None:
            m.values["sparsity"], m.origin["sparsity"] = None, (*path, "pattern")
        for key in ("method", "sparsity", "pattern"):
            if key in level:
                m.values[key], m.origin[key] = level[key], (*path, key)
        for key, value in (level.get("options") or {}).items():
            m.options[key], m.option_level[key] = value, path
    return m


def _finish(m: _Merged, layer: tuple[int, str] | None, in_features: int | None,
            option_paths: Callable[[str], tuple] | None = None) -> LayerSettings:
    """The merged settings of one layer (block, name) or of one level (layer None), checked."""
    method, pattern, sparsity = m.values["method"], m.values["pattern"], m.values["sparsity"]
    where = f" (block {layer[0]}, layer {layer[1]})" if layer else ""
    nm = parse_pattern(pattern)
    if nm is not None:
        implied = 1.0 - nm[0] / nm[1]
        if sparsity is None:
            sparsity = implied
        elif abs(float(sparsity) - implied) > 1e-9:
            raise SettingsError(m.origin["sparsity"], f"pattern {pattern!r} (from {{0}}) implies sparsity "
                                                      f"{implied:g}, got {sparsity!r}{where}; leave it out "
                                                      f"(null) or set {implied:g}", [m.origin["pattern"]])
        if in_features is not None and in_features % nm[1]:
            layer_text = f"layer {layer[1]} of block {layer[0]}" if layer else "the layer"
            raise SettingsError(m.origin["pattern"], f"{pattern} needs in_features divisible by {nm[1]}, but "
                                                     f"{layer_text} has in_features={in_features}; choose an M "
                                                     f"that divides it, or give that layer its own pattern "
                                                     f"in layer_overrides")
    elif sparsity is None:
        raise SettingsError(m.origin["sparsity"], f"null needs an N:M pattern, and the pattern is 'unstructured' "
                                                  f"(from {{0}}){where}; give a fraction in [0, 1)",
                            [m.origin["pattern"]])
    if option_paths is None:
        paths = lambda key: (*m.option_level.get(key, m.method_level), "options", key)  # noqa: E731
        owner, refs = f"method {method!r} (from {{0}}){where}", [m.origin["method"]]
    else:
        paths, owner, refs = option_paths, f"method {method!r}", []
    options = build_options(METHODS[method].options, m.options, paths, owner, refs)
    return LayerSettings(method, float(sparsity), pattern, asdict(options))


def _matches(suffix: str, layer_name: str) -> bool:
    return layer_name == suffix or layer_name.endswith("." + suffix)


def _suffixes(names: Iterable[str]) -> list[str]:
    """Every valid layer-override key: the names and their tails at dots."""
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[i:]) for i in range(len(parts)))
    return sorted(out)


@dataclass
class PruneSettings:
    """What to do to every layer: a default, then per-block and per-layer overrides.

    block_overrides: {block index: {"sparsity": 0.7, ...}}; a negative index counts
                     from the last block (-1 = last).
    layer_overrides: {"mlp.down_proj": {...}}: keys match the end of a layer's name
                     inside its block.
    Each override holds any of method, sparsity, pattern, options.
    finetune:        a FINETUNE_SCHEDULES name: after a block is pruned, its kept
                     weights are fitted to the dense block's outputs.
    owl:             per-block sparsity from the dense model's outlier ratios (mean
                     = sparsity, each within ±OWL_LAMBDA), applied by PruneSpec.apply_owl
                     under the user's block overrides. A no-op when the default
                     pattern is N:M (the pattern fixes the sparsity); a block whose
                     override sets its own sparsity or pattern keeps it.
    """
    method: str
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    options: dict = field(default_factory=dict)
    block_overrides: dict = field(default_factory=dict)
    layer_overrides: dict = field(default_factory=dict)
    true_sequential: bool = False
    finetune: str = "none"
    owl: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping, extra_keys: Sequence[str] = ()) -> "PruneSettings":
        """From a plain mapping (e.g. params.yaml's prune section); keys in `extra_keys`
        belong to the caller and are skipped. Block keys may be strings of integers."""
        _known_keys(values, [*_SECTION_KEYS, *extra_keys], ())
        kwargs = {k: v for k, v in values.items() if k in _SECTION_KEYS}
        if kwargs.get("options") is None:
            kwargs["options"] = {}
        for key in ("block_overrides", "layer_overrides"):
            if kwargs.get(key) is None:
                kwargs[key] = {}
            elif not isinstance(kwargs[key], Mapping):
                raise SettingsError((key,), f"expected a mapping {{{'block index' if key[0] == 'b' else 'layer name'}"
                                            f": settings}}, got {kwargs[key]!r}")
        blocks = {}
        for raw, override in kwargs["block_overrides"].items():
            try:
                index = raw if isinstance(raw, int) and not isinstance(raw, bool) else int(str(raw))
            except ValueError:
                raise SettingsError(("block_overrides", raw), "block keys are integers (negative counts from "
                                                              "the last block)") from None
            blocks[index] = override
        kwargs["block_overrides"] = blocks
        settings = cls(**kwargs)
        settings.check()
        return settings

    # -------------------------------------------------------------- checks

    def _default_level(self) -> tuple[tuple, dict]:
        return (), {"method": self.method, "sparsity": self.sparsity, "pattern": self.pattern,
                    "options": self.options}

    def _levels(self):
        """Every level with its path, field-checked."""
        path, default = self._default_level()
        _check_level(path, default)
        if "method" not in default or default["method"] is None:
            raise SettingsError(("method",), f"expected one of {', '.join(METHODS)}")
        if not isinstance(self.true_sequential, bool):
            raise SettingsError(("true_sequential",), f"expected true or false, got {self.true_sequential!r}")
        if not isinstance(self.finetune, str) or self.finetune not in FINETUNE_SCHEDULES:
            raise SettingsError(("finetune",), f"expected one of {', '.join(FINETUNE_SCHEDULES)}, got "
                                               f"{self.finetune!r}" + did_you_mean(self.finetune, FINETUNE_SCHEDULES))
        if not isinstance(self.owl, bool):
            raise SettingsError(("owl",), f"expected true or false, got {self.owl!r}")
        blocks, layers = [], []
        for key, override in self._mapping("block_overrides").items():
            if isinstance(key, bool) or not isinstance(key, int):
                raise SettingsError(("block_overrides", key), "block keys are integers (negative counts from "
                                                              "the last block)")
            _check_level(("block_overrides", key), override)
            blocks.append((("block_overrides", key), override))
        for key, override in self._mapping("layer_overrides").items():
            if not isinstance(key, str) or not key:
                raise SettingsError(("layer_overrides", key), "layer keys are name suffixes such as mlp.down_proj")
            _check_level(("layer_overrides", key), override)
            layers.append((("layer_overrides", key), override))
        return (path, default), blocks, layers

    def _mapping(self, name: str) -> Mapping:
        value = getattr(self, name)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise SettingsError((name,), f"expected a mapping, got {value!r}")
        return value

    def check(self) -> None:
        """The checks that need no model: the default, each block override merged onto
        it and each layer override merged onto it are valid settings."""
        default, blocks, layers = self._levels()
        base = _finish(_merge([default]), None, None)
        if self.owl and base.nm is None and not OWL_LAMBDA <= base.sparsity < 1 - OWL_LAMBDA:
            raise SettingsError(("owl",), f"OWL moves each block's sparsity by up to ±{OWL_LAMBDA:g}, so it needs "
                                          f"{{0}} in [{OWL_LAMBDA:g}, {1 - OWL_LAMBDA:g}); got {base.sparsity:g}. "
                                          f"Set owl to false or choose another sparsity", [("sparsity",)])
        for level in (*blocks, *layers):
            _finish(_merge([default, level]), None, None)

    def _block_levels(self, n_blocks: int | None) -> dict[int, tuple[tuple, Mapping]]:
        """Block overrides by block index; negative keys count from the end once the
        number of blocks is known."""
        out: dict[int, tuple[tuple, Mapping]] = {}
        for key, override in self._mapping("block_overrides").items():
            index = key
            if n_blocks is not None:
                if not -n_blocks <= key < n_blocks:
                    raise SettingsError(("block_overrides", key), f"the model has blocks 0..{n_blocks - 1} "
                                                                  f"(or -1..-{n_blocks} from the end)")
                index = key % n_blocks
            elif key < 0:
                raise SettingsError(("block_overrides", key), "a negative block index needs the number of "
                                                              "blocks: check against the model first")
            if index in out:
                raise SettingsError(("block_overrides", key), f"block {index} is given twice "
                                                              f"(as {out[index][0][-1]} and {key})")
            out[index] = (("block_overrides", key), override)
        return out

    def resolve(self, block: int, name: str, *, n_blocks: int | None = None, in_features: int | None = None,
                user_mask: bool = False) -> LayerSettings:
        """The one resolver: default, then block override, then matching layer overrides."""
        default, _, layers = self._levels()
        levels = [default]
        block_level = self._block_levels(n_blocks).get(block)
        if block_level is not None:
            levels.append(block_level)
        levels += [(path, o) for path, o in layers if _matches(path[-1], name)]
        settings = _finish(_merge(levels), (block, name), in_features)
        return user_mask_settings(settings) if user_mask else settings

    def plan(self, layers: Sequence[LayerShape], masks: Mapping[str, tuple] | None = None,
             mask_path: tuple = ("masks",)) -> dict[str, LayerSettings]:
        """Check everything against the model's layers and resolve every layer.

        masks: {layer name (with or without '.weight'): mask shape}. Returns
        {full layer name: settings}. Overrides and masks that reach no layer are errors
        that suggest the nearest name."""
        self.check()
        n_blocks = max((layer.block for layer in layers), default=-1) + 1
        self._block_levels(n_blocks)
        in_block = {layer.name for layer in layers}
        for suffix in self._mapping("layer_overrides"):
            if not any(_matches(suffix, name) for name in in_block):
                raise SettingsError(("layer_overrides", suffix), "matches no layer of this model"
                                    + did_you_mean(suffix, _suffixes(in_block))
                                    + f" (layers of a block: {', '.join(sorted(in_block))})")
        by_name = {layer.full_name: layer for layer in layers}
        masked = {}
        for key, shape in (masks or {}).items():
            name = key.removesuffix(".weight")
            if name not in by_name:
                raise SettingsError(mask_path, f"{key!r} is not a prunable linear layer of this model"
                                               + did_you_mean(name, by_name)
                                               + (f" (names look like {layers[0].full_name!r})" if layers else ""))
            layer = by_name[name]
            if tuple(shape) != (layer.out_features, layer.in_features):
                raise SettingsError(mask_path, f"the mask for {name} has shape {tuple(shape)}, but the layer's "
                                               f"weight is ({layer.out_features}, {layer.in_features}); a mask "
                                               f"is a bool tensor shaped like the weight (True = kept)")
            masked[name] = True
        return {layer.full_name: self.resolve(layer.block, layer.name, n_blocks=n_blocks,
                                              in_features=layer.in_features,
                                              user_mask=layer.full_name in masked)
                for layer in layers}

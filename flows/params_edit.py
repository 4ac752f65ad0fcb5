"""`--set key=value` and `--profile NAME`: edits of params.yaml.

Like `dvc exp run --set-param`, an override is written into params.yaml (comments
and layout kept, via ruamel's round-trip mode), because params.yaml is what DVC
compares against dvc.lock to decide what reruns. Values are parsed as YAML 1.2, so
`0.6` is a number, `null` is None and `2:4` stays the string "2:4".
"""
from __future__ import annotations

import io
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.representer import RoundTripRepresenter
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from pruning.settings import did_you_mean
from stages.params import ParamError, read_yaml, yaml_errors

# Below these keys new entries may be created (they are user-keyed mappings);
# everywhere else a key must already exist in params.yaml, so typos are refused.
OPEN_MAPPINGS = ("prune.block_overrides", "prune.layer_overrides", "prune.options")
_LAYER_FIELDS = ("method", "sparsity", "pattern", "options")


class _NullKeepingRepresenter(RoundTripRepresenter):
    """ruamel's round trip writes None as an empty value; params.yaml says `null`."""


_NullKeepingRepresenter.add_representer(
    type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))


def parse_value(text: str):
    return YAML(typ="safe", pure=True).load(io.StringIO(text)) if text.strip() else ""


def parse_assignment(assignment: str) -> tuple[list, object]:
    """'prune.sparsity=0.6' -> (['prune', 'sparsity'], 0.6)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ParamError((assignment,), "expected key=value, e.g. prune.sparsity=0.6")
    with yaml_errors(f"--set {key.strip()}"):
        return split_key(key.strip()), parse_value(value)


def split_key(key: str) -> list:
    """Dotted path; block indices become ints, and a layer name suffix (which has
    dots itself, e.g. mlp.down_proj) is kept whole."""
    parts = key.split(".")
    if parts[:2] == ["prune", "layer_overrides"] and len(parts) > 2:
        rest = parts[2:]
        cut = next((i for i, p in enumerate(rest) if p in _LAYER_FIELDS and i > 0), len(rest))
        return ["prune", "layer_overrides", ".".join(rest[:cut]), *rest[cut:]]
    if parts[:2] == ["prune", "block_overrides"] and len(parts) > 2:
        try:
            parts[2] = int(parts[2])
        except ValueError:
            raise ParamError(key, "block keys are integers, e.g. prune.block_overrides.-1.sparsity=0.7") from None
    return parts


def _dotted(path: list) -> str:
    return ".".join(str(p) for p in path)


def set_in(doc: dict, path: list, value) -> tuple[object, object]:
    """Set doc[path] = value; return (old value, new value). Unknown keys are refused
    except below OPEN_MAPPINGS."""
    node = doc
    for depth, part in enumerate(path[:-1]):
        if part not in node or node[part] is None:
            if not any(_dotted(path[:depth + 1]).startswith(m) for m in OPEN_MAPPINGS):
                raise ParamError(_dotted(path[:depth + 1]), "no such parameter in params.yaml"
                                 + did_you_mean(part, node))
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ParamError(_dotted(path[:depth + 1]), f"is {node!r}, not a mapping")
    last = path[-1]
    if last not in node and not any(_dotted(path).startswith(m + ".") for m in OPEN_MAPPINGS):
        raise ParamError(_dotted(path), "no such parameter in params.yaml" + did_you_mean(last, node))
    old = node.get(last)
    if isinstance(value, str) and ":" in value:
        # Quote "2:4" on disk so that YAML 1.1 readers (PyYAML) do not see the integer 124.
        value = DoubleQuotedScalarString(value)
    node[last] = value
    return old, value


def known_profiles(workspace: str | Path = ".") -> list[str]:
    """The profiles a workspace offers: one per params-<profile>.yaml file."""
    return sorted(p.stem.removeprefix("params-") for p in Path(workspace).glob("params-*.yaml"))


def profile_overrides(profile: str, workspace: str | Path = ".") -> list[tuple[list, object]]:
    """The leaf values of params-<profile>.yaml as (path, value) pairs."""
    path = Path(workspace) / f"params-{profile}.yaml"
    if not path.is_file():
        known = known_profiles(workspace)
        raise ParamError("--profile", f"no {path.name} (profiles here: {', '.join(known) or 'none'})")
    data = read_yaml(path) or {}
    out: list[tuple[list, object]] = []

    def walk(prefix: list, node):
        if isinstance(node, dict) and node and not any(_dotted(prefix).startswith(m) for m in OPEN_MAPPINGS):
            for k, v in node.items():
                walk(prefix + [k], v)
        else:
            out.append((prefix, node))
    walk([], data)
    return out


def apply_overrides(params_file: str | Path, assignments: list[tuple[list, object]],
                    write: bool = True) -> tuple[dict, list[str]]:
    """Apply (path, value) pairs to params.yaml; return (new params as plain dicts,
    human-readable changes). write=False computes without touching the file (plan)."""
    params_file = Path(params_file)
    yaml = YAML()  # round-trip: keeps comments and key order
    yaml.Representer = _NullKeepingRepresenter
    yaml.preserve_quotes = True
    with yaml_errors(params_file.name):
        doc = yaml.load(params_file.read_text(encoding="utf-8"))
    changes = []
    for path, value in assignments:
        old, new = set_in(doc, path, value)
        if old != new:
            changes.append(f"{_dotted(path)}: {old!r} -> {new!r}")
    _fill_mask_hash(doc, changes, params_file.parent)
    buffer = io.StringIO()
    yaml.dump(doc, buffer)
    text = buffer.getvalue()
    if write and changes:
        tmp = params_file.with_name(params_file.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(params_file)
    return YAML(typ="safe", pure=True).load(text), changes


def _fill_mask_hash(doc, changes: list[str], workspace: Path) -> None:
    """prune.mask_sha256 follows the content of prune.mask_file (see stages.params)."""
    prune = doc.get("prune") or {}
    mask_file = prune.get("mask_file")
    if not mask_file or not (workspace / mask_file).is_file():
        return
    from stages.hashing import sha256_file
    digest = sha256_file(workspace / mask_file)
    if prune.get("mask_sha256") != digest:
        changes.append(f"prune.mask_sha256: {prune.get('mask_sha256')!r} -> {digest!r} (content of {mask_file})")
        prune["mask_sha256"] = digest


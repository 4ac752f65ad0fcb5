"""Storing pruning.runner.BlockInputs: the calibration set's block-0 inputs and the
arguments the model passes each block.

BlockInputs holds tensors nested in tuples/dicts (e.g. RoPE's (cos, sin) pair) next
to plain values (use_cache=False, attention_mask=None). Tensors go to safetensors
under generated keys, the structure to JSON; a tensor shared by several blocks
(the same RoPE pair) is stored once, which safetensors requires anyway.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pruning.runner import BlockCall, BlockInputs

from .artifact_io import read_tensors, write_tensors


def _encode(value, key: str, tensors: dict, seen: dict):
    if isinstance(value, torch.Tensor):
        if id(value) not in seen:
            seen[id(value)] = f"t{len(seen)}"
            tensors[seen[id(value)]] = value
        return {"tensor": seen[id(value)]}
    if isinstance(value, (tuple, list)):
        return {"tuple" if isinstance(value, tuple) else "list":
                [_encode(v, f"{key}.{i}", tensors, seen) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        return {"dict": {str(k): _encode(v, f"{key}.{k}", tensors, seen) for k, v in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"{key}: cannot store a {type(value).__name__} in the calibration artifact")


def _decode(node, tensors: dict, device):
    if "tensor" in node:
        return tensors[node["tensor"]].to(device)
    if "tuple" in node:
        return tuple(_decode(v, tensors, device) for v in node["tuple"])
    if "list" in node:
        return [_decode(v, tensors, device) for v in node["list"]]
    if "dict" in node:
        return {k: _decode(v, tensors, device) for k, v in node["dict"].items()}
    return node["value"]


def save_block_inputs(path: str | Path, inputs: BlockInputs) -> dict:
    """Write the tensors to `path` (safetensors); return the JSON structure of the calls."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    calls = [{"args": _encode(call.args, f"calls.{i}.args", tensors, seen),
              "kwargs": _encode(call.kwargs, f"calls.{i}.kwargs", tensors, seen)}
             for i, call in enumerate(inputs.calls)]
    tensors["hidden"] = inputs.hidden
    write_tensors(path, tensors)
    return {"calls": calls}


def load_block_inputs(path: str | Path, structure: dict, device) -> BlockInputs:
    tensors = read_tensors(path)
    calls = [BlockCall(_decode(c["args"], tensors, device), _decode(c["kwargs"], tensors, device))
             for c in structure["calls"]]
    return BlockInputs(hidden=tensors["hidden"].to(device), calls=calls)

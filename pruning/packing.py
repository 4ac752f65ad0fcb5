"""Packed on-disk format for N:M-sparse linear weights ("nm-packed", version 1).

Why: a pruned model saved as dense tensors full of zeros is exactly as large as the
dense model. Storing only the N kept values of every group of M inputs, plus where
in the group each one sat, makes a 2:4 fp16/bf16 weight 0.5625x its dense size.

Layout of one packed weight W of shape (d_out, d_in), groups of M consecutive
input columns of one row (the same groups `masks.nm_mask` uses):

  values   (d_out, d_in // M * N), W's dtype: the N slots of every group, in
           increasing column order. A group with fewer than N nonzeros still fills
           N slots (with zeros from that group), so the layout is fixed-size.
  indices  (d_out, ceil(d_in // M * N * B / 8)) uint8: the in-group position
           (0..M-1) of every slot, B = ceil(log2 M) bits each (2 for 2:4, 3 for
           4:8), written as one little-endian bit stream per row: slot k of the
           row occupies bits k*B .. k*B+B-1, bit j of the stream is bit (j % 8)
           of byte j // 8. Rows are padded to whole bytes independently.
  shape    int64 [d_out, d_in]
  pattern  int64 [N, M]

In a safetensors file the parts of parameter `p` are stored as `p.nm_values`,
`p.nm_indices`, `p.nm_shape`, `p.nm_pattern`; every other tensor is stored
dense under its own name. `save_packed_model` writes a model directory:

  config.json               the model config plus a `sparsity_packing` entry
                            (format, version, pattern, index_bits, dtype,
                            weights_file, packed: [param names], tied: {alias: kept})
  packed_model.safetensors  the tensors (deliberately not `model.safetensors`, so
                            a plain `from_pretrained` fails loudly instead of
                            silently initialising the packed weights at random)
  tokenizer files, generation_config.json when available.

Round trip: unpack(pack(W)) is bitwise equal to W, with one documented exception:
a negative zero in a slot that is not stored comes back as +0.0 (the format keeps
no sign for pruned entries). -0.0 == +0.0 numerically, so matmul outputs match.

FP8 variant ("nm-packed-fp8", version 1; `weight_format="packed-fp8"`): the same
layout, except that `values` are float8_e4m3fn and a fifth part holds the scales:

  scale    (d_out,) float32: one scale per output channel (pruning.fp8.quantize_rows:
           max |row| / 448), so W ~= values * scale[:, None].

For 2:4 this is 0.25 (values) + 0.0625 (2-bit positions) of the fp16 dense bytes,
plus 2 / d_in for the scales: 0.3130 at d_in = 4096. Loading dequantises to the
model's dtype; the round trip equals pruning.fp8.round_rows(W) exactly (the pruned
zeros stay zeros, so the pattern survives).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .fp8 import E4M3, SCALE_DTYPE, dequantize_rows, quantize_rows
from .masks import find_nm_violation, parse_pattern
from .discovery import is_prunable, layer_weight, prunable_linear_names, to_out_in
from .settings import PACKED_FORMATS

log = logging.getLogger(__name__)

FORMATS = PACKED_FORMATS  # params.yaml convert.format -> on-disk format name
FORMAT_NAME = FORMATS["packed"]
FORMAT_VERSION = 1
WEIGHTS_FILE = "packed_model.safetensors"
CONFIG_KEY = "sparsity_packing"
PARTS = ("values", "indices", "shape", "pattern")
SCALE_PART = "scale"  # the fifth part, FP8 variant only
_SUFFIX = ".nm_"  # on-disk name of a part: f"{param}{_SUFFIX}{part}"

# Bound the temporaries of (un)packing (int32 positions, bit expansions) to a few
# hundred MB even for 7B-sized layers: work on blocks of rows of this many elements.
_CHUNK_ELEMENTS = 1 << 23

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "vocab.json", "spiece.model")


# --------------------------------------------------------------------------- checks

def index_bits(m: int) -> int:
    """Bits needed to store a position 0..m-1 (at least 1)."""
    return max(1, (m - 1).bit_length())


# ------------------------------------------------------------------ bit packing

def _pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, k) integer codes < 2**bits -> (rows, ceil(k*bits/8)) uint8, LSB first."""
    rows, k = codes.shape
    shifts = torch.arange(bits, device=codes.device, dtype=codes.dtype)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(rows, k * bits).to(torch.uint8)
    pad = (-stream.shape[1]) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    byte_shifts = torch.arange(8, device=codes.device, dtype=torch.uint8)
    # The 8 shifted bits are disjoint, so their sum is their bitwise OR (< 256).
    return (stream.reshape(rows, -1, 8) << byte_shifts).sum(-1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of _pack_bits: (rows, nbytes) uint8 -> (rows, k) int64 codes."""
    rows = packed.shape[0]
    byte_shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> byte_shifts) & 1).reshape(rows, -1)[:, : k * bits]
    shifts = torch.arange(bits, device=packed.device, dtype=torch.int64)
    return (stream.reshape(rows, k, bits).to(torch.int64) << shifts).sum(-1)


def _row_chunks(d_out: int, d_in: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, d_in))
    for start in range(0, d_out, step):
        yield start, min(d_out, start + step)


# ------------------------------------------------------------------ pack / unpack

def pack_nm(weight: torch.Tensor, n: int, m: int) -> dict[str, torch.Tensor]:
    """Pack an N:M-sparse 2-D weight into {values, indices, shape, pattern} (see module doc).

    Raises ValueError when the weight is not N:M (message from find_nm_violation).
    Tensors stay on the weight's device; values keep its dtype.
    """
    if not 0 < n < m:
        raise ValueError(f"pack_nm: need 0 < N < M, got {n}:{m}")
    if not weight.is_floating_point():
        raise ValueError(f"pack_nm: expected a floating-point weight, got {weight.dtype}")
    problem = find_nm_violation(weight, n, m)
    if problem is not None:
        raise ValueError(f"weight is not {n}:{m}-sparse: {problem}")
    w = weight.detach()
    d_out, d_in = w.shape
    groups = d_in // m
    bits = index_bits(m)
    values = torch.empty(d_out, groups * n, dtype=w.dtype, device=w.device)
    nbytes = (groups * n * bits + 7) // 8
    indices = torch.empty(d_out, nbytes, dtype=torch.uint8, device=w.device)
    for lo, hi in _row_chunks(d_out, d_in):
        block = w[lo:hi].reshape(hi - lo, groups, m)
        # Slot preference: nonzeros first, then -0.0 (so its sign survives when
        # a spare slot exists), then +0.0; stable sort keeps column order within each.
        zero = block == 0
        rank = zero.to(torch.int8) * 2 - (zero & torch.signbit(block)).to(torch.int8)
        chosen = torch.argsort(rank, dim=-1, stable=True)[..., :n]
        chosen = torch.sort(chosen, dim=-1).values  # canonical: increasing columns
        values[lo:hi] = torch.gather(block, -1, chosen).reshape(hi - lo, groups * n)
        codes = chosen.reshape(hi - lo, groups * n).to(torch.int32)
        indices[lo:hi] = _pack_bits(codes, bits)
    return {
        "values": values,
        "indices": indices,
        "shape": torch.tensor([d_out, d_in], dtype=torch.int64),
        "pattern": torch.tensor([n, m], dtype=torch.int64),
    }


def pack_nm_fp8(weight: torch.Tensor, n: int, m: int) -> dict[str, torch.Tensor]:
    """pack_nm, then the kept values rounded to e4m3 with one float32 scale per output
    channel: {values (float8_e4m3fn), indices, shape, pattern, scale (d_out,)}.

    The positions come from the unrounded weight, so a value that rounds to zero
    keeps its slot. Raises ValueError for a non-N:M or non-finite weight.
    """
    packed = pack_nm(weight, n, m)
    values = packed["values"]
    if not bool(torch.isfinite(values).all()):
        raise ValueError("pack_nm_fp8: the weight holds inf or NaN; it has no FP8 scale")
    # A row's largest magnitude is among its kept values (the rest are zeros), so
    # the scales of the kept values are the scales of the rows of W.
    q = torch.empty(values.shape, dtype=E4M3, device=values.device)
    scale = torch.empty(values.shape[0], dtype=SCALE_DTYPE, device=values.device)
    for lo, hi in _row_chunks(*values.shape):
        q[lo:hi], scale[lo:hi] = quantize_rows(values[lo:hi])
    return {**packed, "values": q, SCALE_PART: scale}


def unpack_nm(packed: Mapping[str, torch.Tensor], *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild the dense weight from pack_nm's (or pack_nm_fp8's) dict. Exact (see
    module doc on -0.0); FP8 values come back as values * scale.

    device/dtype: where and in which dtype to return it (default: the device of
    values, and their dtype; float32 for FP8 values). For the plain format the cast,
    if any, happens after unpacking. Raises ValueError on malformed input.
    """
    missing = [p for p in PARTS if p not in packed]
    if missing:
        raise ValueError(f"unpack_nm: packed weight lacks parts {missing}")
    d_out, d_in = (int(v) for v in packed["shape"].tolist())
    n, m = (int(v) for v in packed["pattern"].tolist())
    if not 0 < n < m or d_in % m:
        raise ValueError(f"unpack_nm: inconsistent pattern {n}:{m} for shape {(d_out, d_in)}")
    groups, bits = d_in // m, index_bits(m)
    values = packed["values"]
    indices = packed["indices"]
    scale = packed.get(SCALE_PART)
    if device is not None:
        values, indices = values.to(device), indices.to(device)
        scale = None if scale is None else scale.to(device)
    nbytes = (groups * n * bits + 7) // 8
    if tuple(values.shape) != (d_out, groups * n) or tuple(indices.shape) != (d_out, nbytes):
        raise ValueError(f"unpack_nm: parts have shapes values={tuple(values.shape)}, "
                         f"indices={tuple(indices.shape)}; expected {(d_out, groups * n)} "
                         f"and {(d_out, nbytes)} for shape {(d_out, d_in)} at {n}:{m}")
    if indices.dtype != torch.uint8:
        raise ValueError(f"unpack_nm: indices must be uint8, got {indices.dtype}")
    if (values.dtype == E4M3) != (scale is not None):
        raise ValueError(f"unpack_nm: {values.dtype} values {'with' if scale is not None else 'without'} "
                         f"a '{SCALE_PART}' part; FP8 values need their scales and only FP8 values have them")
    if scale is not None and (tuple(scale.shape) != (d_out,) or scale.dtype != SCALE_DTYPE):
        raise ValueError(f"unpack_nm: scale must be {SCALE_DTYPE} of shape {(d_out,)}, "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    # FP8 values are dequantised chunk by chunk straight into the target dtype.
    work_dtype = values.dtype if scale is None else (dtype or torch.float32)
    out = torch.zeros(d_out, groups, m, dtype=work_dtype, device=values.device)
    for lo, hi in _row_chunks(d_out, d_in):
        pos = _unpack_bits(indices[lo:hi], bits, groups * n).reshape(hi - lo, groups, n)
        # pack_nm writes increasing, in-range positions; anything else is a corrupt
        # file and would make scatter silently overwrite or index out of the group.
        if pos.numel() and (int(pos.max()) >= m or (n > 1 and not bool((pos[..., 1:] > pos[..., :-1]).all()))):
            raise ValueError(f"unpack_nm: corrupt indices in rows {lo}..{hi - 1} "
                             f"(positions must be increasing and < M={m})")
        chunk = values[lo:hi] if scale is None else dequantize_rows(values[lo:hi], scale[lo:hi], work_dtype)
        out[lo:hi].scatter_(-1, pos, chunk.reshape(hi - lo, groups, n))
    out = out.reshape(d_out, d_in)
    return out if dtype is None else out.to(dtype)


def flatten_packed(param_name: str, packed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pack_nm's (or pack_nm_fp8's) dict -> the on-disk tensor names of one parameter."""
    return {f"{param_name}{_SUFFIX}{part}": packed[part] for part in (*PARTS, SCALE_PART) if part in packed}


def _split_packed_names(names) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group on-disk names into {param: {part: name}} and the list of dense names."""
    packed: dict[str, dict[str, str]] = {}
    dense: list[str] = []
    for name in names:
        base, sep, part = name.rpartition(_SUFFIX)
        if sep and (part in PARTS or part == SCALE_PART):
            packed.setdefault(base, {})[part] = name
        else:
            dense.append(name)
    return packed, dense


# ------------------------------------------------------- which layers are packed

def _resolve_linears(model: nn.Module, layer_names: list[str] | None) -> list[str]:
    names = prunable_linear_names(model) if layer_names is None else [
        name[: -len(".weight")] if name.endswith(".weight") else name for name in layer_names]
    for name in names:
        module = model.get_submodule(name)
        if not is_prunable(module):
            raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear or Conv1D")
    return names


# --------------------------------------------------------------- save / load

def _dedupe_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop entries that alias an earlier one (tied embeddings); return kept + {alias: kept}.

    Safetensors refuses tensors that share memory. Identical views are tied weights
    and are written once; any other overlap is stored as an independent copy.
    """
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        key = (ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        if ptr in storages and tensor.numel():
            tensor = tensor.clone()
        seen[key] = name
        storages.add(ptr)
        kept[name] = tensor
    return kept, aliases


def save_packed_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike, pattern: str,
                      layer_names: list[str] | None = None, weight_format: str = "packed") -> dict:
    """Write `model` to out_dir with its decoder linears packed (format in the module doc).

    layer_names: module (or `.weight` parameter) names to pack; default: every nn.Linear
    or Conv1D inside the decoder blocks (a Conv1D weight is packed as its (d_out, d_in)
    transpose). Every one must be N:M-valid for `pattern`; otherwise a ValueError names the first bad layer, row and group, and nothing is written.
    weight_format: "packed" (values in the model's dtype) or "packed-fp8" (e4m3 values
    with per-output-channel scales); layers not packed stay dense in the model's dtype.
    tokenizer: saved alongside when not None. Returns the config entry written, plus
    a `size` report (see packed_size_report).
    """
    if weight_format not in FORMATS:
        raise ValueError(f"weight_format: expected one of {', '.join(FORMATS)}, got {weight_format!r}")
    pack = pack_nm_fp8 if weight_format == "packed-fp8" else pack_nm
    nm = parse_pattern(pattern)
    if nm is None:
        raise ValueError("save_packed_model needs an N:M pattern such as '2:4'; "
                         "an unstructured model has no packed format (save it dense)")
    n, m = nm
    names = _resolve_linears(model, layer_names)
    # Validate everything before touching the disk, so a bad layer leaves no half-written model.
    for name in names:
        weight = layer_weight(model.get_submodule(name))
        problem = find_nm_violation(weight, n, m)
        if problem is not None:
            raise ValueError(f"layer {name} is not {n}:{m}-sparse: {problem}; nothing was written")
        if pack is pack_nm_fp8 and not bool(torch.isfinite(weight).all()):
            raise ValueError(f"layer {name} holds inf or NaN, which FP8 cannot scale; nothing was written")

    state, aliases = _dedupe_state(model.state_dict())
    packed_params = [f"{name}.weight" for name in names]
    for param in packed_params:
        if param in aliases or param in aliases.values():
            raise ValueError(f"{param} is tied to another tensor; tied weights cannot be packed")

    tensors: dict[str, torch.Tensor] = {}
    packed_set = set(packed_params)
    for name, tensor in state.items():
        if name in packed_set:
            # Packed as (d_out, d_in), N:M groups along d_in (Conv1D stores the transpose).
            packed = pack(to_out_in(model.get_submodule(name.removesuffix(".weight")), tensor), n, m)
            tensors.update({k: v.cpu().contiguous() for k, v in flatten_packed(name, packed).items()})
        else:
            tensors[name] = tensor.detach().cpu().contiguous()
    clash = [k for k in state if k not in packed_set and _split_packed_names([k])[0]]
    if clash:
        raise ValueError(f"tensor names clash with the packed naming scheme: {clash[:3]}")

    first = model.get_submodule(names[0]).weight if names else next(model.parameters())
    entry = {
        "format": FORMATS[weight_format],
        "version": FORMAT_VERSION,
        "pattern": f"{n}:{m}",
        "index_bits": index_bits(m),
        "dtype": str(first.dtype).removeprefix("torch."),
        **({"values_dtype": str(E4M3).removeprefix("torch."), "scale": "float32 per output channel"}
           if pack is pack_nm_fp8 else {}),
        "weights_file": WEIGHTS_FILE,
        "packed": packed_params,
        "tied": aliases,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    setattr(config, CONFIG_KEY, entry)
    config.save_pretrained(out)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        try:
            generation_config.save_pretrained(out)
        except Exception as exc:  # an invalid generation config must not lose the weights
            log.warning("generation_config not saved: %s", exc)
    from safetensors.torch import save_file
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", CONFIG_KEY: json.dumps(entry)})
    os.replace(tmp, out / WEIGHTS_FILE)  # readers never see a half-written file
    if tokenizer is not None:
        from .models import save_tokenizer
        save_tokenizer(tokenizer, out)
    return {**entry, "size": packed_size_report(out)}


def read_packing_entry(model_dir: str | os.PathLike) -> dict:
    """The `sparsity_packing` entry of a packed model dir; ValueError if absent/unknown."""
    path = Path(model_dir) / "config.json"
    entry = json.loads(path.read_text()).get(CONFIG_KEY)
    if not isinstance(entry, dict):
        raise ValueError(f"{path} has no '{CONFIG_KEY}' entry: not a packed model "
                         "(load a dense model with from_pretrained)")
    if entry.get("format") not in FORMATS.values() or entry.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported packing {entry.get('format')!r} version {entry.get('version')!r}; "
                         f"this code reads {' and '.join(map(repr, FORMATS.values()))} v{FORMAT_VERSION}")
    return entry


def load_packed_model(model_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                      device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a model written by save_packed_model: from_config, unpack, load. Returns the model.

    dtype: default = the dtype the weights were saved in (then outputs equal the
    saved model's exactly; for packed-fp8, FP8 weights are dequantised to it and equal
    pruning.fp8.round_rows of the saved ones). device: where the model is built and
    weights unpacked.
    The returned model is in eval mode; its config no longer carries the packing
    entry (its weights are dense now). The tokenizer: load_packed_tokenizer(model_dir).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    entry = read_packing_entry(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    target = dtype if dtype is not None else getattr(torch, entry["dtype"])
    device = torch.device(device)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=target)
    state = model.state_dict()
    aliases: dict[str, str] = entry.get("tied", {})

    weights = Path(model_dir) / entry["weights_file"]
    loaded: set[str] = set()
    with safe_open(str(weights), framework="pt", device="cpu") as handle, torch.no_grad():
        packed_names, dense_names = _split_packed_names(handle.keys())
        if sorted(packed_names) != sorted(entry["packed"]):
            raise ValueError(f"{weights}: packed tensors {sorted(packed_names)[:3]}... do not match "
                             f"config.json's list {sorted(entry['packed'])[:3]}...")
        unknown = [k for k in list(dense_names) + list(packed_names) if k not in state]
        if unknown:
            raise ValueError(f"{weights} holds tensors this model does not have: {unknown[:5]}")
        for name in dense_names:
            state[name].copy_(handle.get_tensor(name).to(device))
            loaded.add(name)
        for name, parts in packed_names.items():
            packed = {part: handle.get_tensor(key) for part, key in parts.items()}
            to_out_in(model.get_submodule(name.removesuffix(".weight")), state[name]).copy_(
                unpack_nm(packed, device=device, dtype=state[name].dtype))
            loaded.add(name)
        for alias, source in aliases.items():
            # from_config normally re-ties these already; copy only if it did not.
            if state[alias].data_ptr() != state[source].data_ptr():
                state[alias].copy_(state[source])
            loaded.add(alias)
    missing = [k for k in state if k not in loaded]
    if missing:
        raise ValueError(f"{weights} lacks tensors the model needs: {missing[:5]}")
    model.eval()
    return model


def load_packed_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer saved next to a packed model, or None when none was saved."""
    if not any((Path(model_dir) / name).exists() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


# ----------------------------------------------------------------- size report

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2,
                "U32": 4, "U64": 8}


def _safetensors_header(path: Path) -> tuple[dict, dict]:
    """The JSON header of a safetensors file: ({name: {dtype, shape, data_offsets}}, metadata).

    (Format: 8-byte little-endian header length, then the JSON.) Reading it gives
    exact stored sizes without loading any tensor data.
    """
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return header, header.pop("__metadata__", None) or {}


def packed_size_report(source, dense_dtype: torch.dtype | None = None) -> dict:
    """Bytes of the packed linear weights vs the same weights stored dense.

    source: a packed model directory, a .safetensors file, or a mapping of on-disk
    tensor names (as flatten_packed / the file use) to tensors.
    dense_dtype: the dtype of the dense comparison. Default: the dtype the weights
    load back as: the model's dtype recorded in a file's packing entry, else the
    values' dtype (a mapping of FP8 parts has no such record: pass it).
    Returns {packed_bytes, dense_bytes, size_ratio, fp16_dense_bytes, fp16_size_ratio,
    num_packed, other_bytes} and, for files, file_bytes (whole file, header included).
    packed_bytes counts every part; dense_bytes = d_out * d_in * itemsize of
    dense_dtype; fp16_* compare with the same weights dense at 16 bits.
    """
    report: dict = {}
    if isinstance(source, Mapping):
        sizes = {k: v.numel() * v.element_size() for k, v in source.items()}
        packed_names, dense_names = _split_packed_names(sizes)
        shapes = {p: [int(x) for x in source[parts["shape"]].tolist()] for p, parts in packed_names.items()}
        values = {p: source[parts["values"]] for p, parts in packed_names.items()}
        values_itemsize = {p: v.element_size() for p, v in values.items()}
        fp8 = {p for p, v in values.items() if v.dtype == E4M3}
    else:
        path = Path(source)
        if path.is_dir():
            path = path / read_packing_entry(path)["weights_file"]
        header, metadata = _safetensors_header(path)
        if dense_dtype is None and CONFIG_KEY in metadata:
            dense_dtype = getattr(torch, json.loads(metadata[CONFIG_KEY])["dtype"])
        sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
        packed_names, dense_names = _split_packed_names(sizes)
        from safetensors import safe_open
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            shapes = {p: [int(x) for x in handle.get_tensor(parts["shape"]).tolist()]
                      for p, parts in packed_names.items()}
        values_itemsize = {p: _DTYPE_BYTES[header[parts["values"]]["dtype"]] for p, parts in packed_names.items()}
        fp8 = {p for p, parts in packed_names.items() if header[parts["values"]]["dtype"] == "F8_E4M3"}
        report["file_bytes"] = path.stat().st_size
    if dense_dtype is None and fp8:
        raise ValueError("packed_size_report: FP8 parts load back in another dtype; pass dense_dtype")
    itemsize = {p: dense_dtype.itemsize if dense_dtype is not None else values_itemsize[p] for p in packed_names}

    elements = sum(shapes[p][0] * shapes[p][1] for p in packed_names)
    packed_bytes = sum(sizes[name] for parts in packed_names.values() for name in parts.values())
    dense_bytes = sum(shapes[p][0] * shapes[p][1] * itemsize[p] for p in packed_names)
    report.update({
        "packed_bytes": packed_bytes,
        "dense_bytes": dense_bytes,
        "size_ratio": packed_bytes / dense_bytes if dense_bytes else None,
        "fp16_dense_bytes": 2 * elements,
        "fp16_size_ratio": packed_bytes / (2 * elements) if elements else None,
        "num_packed": len(packed_names),
        "other_bytes": sum(sizes[name] for name in dense_names),
    })
    return report

"""FP8 (e4m3) rounding with one scale per row: the one definition the project uses.

The `packed-fp8` format (pruning.packing) stores each linear weight W (d_out, d_in)
as e4m3 values with one float32 scale per output channel (row of W). The FP8 GPU
paths (pruning.sparse_exec) quantise activations X (tokens, d_in) the same way, one
scale per token (row of X), and multiply the two scales back after the FP8 matmul.

Scale of a row = max|row| / 448 (448 is the largest finite e4m3fn value), so the
row's largest magnitude maps to +-448 and nothing overflows; a row of zeros gets
scale 1. Zeros stay exactly zero, so a 2:4 weight stays 2:4 after rounding (a tiny
value may also round to zero: at most 2 nonzeros per group of 4 either way).
"""
from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
SCALE_DTYPE = torch.float32


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., k) -> (q (..., k) in `dtype`, scale (...) float32), x ~= q * scale[..., None].

    The division and the clamp run in float32; the clamp only catches the last-ulp
    overshoot of amax / (amax / 448) (a cast beyond 448 would give NaN in e4m3fn).
    """
    if not x.is_floating_point():
        raise ValueError(f"quantize_rows: expected a floating-point tensor, got {x.dtype}")
    finite_max = torch.finfo(dtype).max
    x32 = x.to(SCALE_DTYPE)
    amax = x32.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / finite_max, torch.ones_like(amax))
    q = (x32 / scale.unsqueeze(-1)).clamp_(-finite_max, finite_max).to(dtype)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_rows up to rounding: q * scale[..., None] in `dtype` (computed in float32)."""
    return (q.to(SCALE_DTYPE) * scale.to(SCALE_DTYPE).unsqueeze(-1)).to(dtype)


def round_rows(x: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """x rounded through FP8 with per-row scales, returned in x's dtype (fake quantisation)."""
    q, scale = quantize_rows(x, dtype)
    return dequantize_rows(q, scale, x.dtype)

"""Run 2:4-sparse linear layers on GPU sparse tensor cores (PyTorch semi-structured).

`to_semi_structured(model)` swaps the weight of every eligible nn.Linear for a
`torch.sparse.to_sparse_semi_structured` tensor, so F.linear dispatches to the
cuSPARSELt or CUTLASS 2:4 kernels. Each layer is converted only if it can be done
safely, and otherwise stays dense; the report says which and why:

- CUDA only, compute capability >= 8.0 (Ampere or newer);
- fp16/bf16 weights (the dtypes this project benchmarks);
- the weight is exactly 2:4 (the kernels would silently drop a third nonzero);
- the shape meets the backend's minimum/multiple constraints;
- with check=True, the layer's output on random inputs matches the dense output
  within fp16-level tolerance; a layer that fails keeps its dense weight.

On a machine without CUDA nothing is converted and every layer is reported as
fallen back with reason "no CUDA" (a clear no-op, so CPU pipelines still run).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .masks import find_nm_violation
from .discovery import is_prunable, layer_weight, prunable_linear_names, to_out_in

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# Relative Frobenius error allowed between sparse-kernel and dense outputs. Both
# accumulate in fp32 and round to 16 bits, so honest kernels differ by ~1e-3;
# a wrong mask or broken kernel gives O(1).
DEFAULT_RTOL = 1e-2
# Token counts for the check: 1 (decode) and an odd count that forces padding.
_CHECK_TOKENS = (1, 37)


def _backend_class(backend: str):
    """The semi-structured tensor class `backend` ('auto', 'cusparselt', 'cutlass') selects."""
    sparse = torch.sparse
    if backend == "auto":
        cusparselt = getattr(torch.backends, "cusparselt", None)
        backend = "cusparselt" if cusparselt is not None and cusparselt.is_available() else "cutlass"
    if backend == "cusparselt":
        return sparse.SparseSemiStructuredTensorCUSPARSELT
    if backend == "cutlass":
        return sparse.SparseSemiStructuredTensorCUTLASS
    raise ValueError(f"backend: expected 'auto', 'cusparselt' or 'cutlass', got {backend!r}")


def unsupported_reason(weight: torch.Tensor, backend_cls=None) -> str | None:
    """Why this weight cannot become a semi-structured tensor, or None if it can."""
    if not weight.is_cuda:
        return f"weight on {weight.device}, not CUDA"
    major, minor = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        return f"compute capability {major}.{minor} < 8.0 (no sparse tensor cores)"
    if weight.dtype not in SUPPORTED_DTYPES:
        return f"dtype {weight.dtype} not supported (fp16/bf16 only)"
    if weight.dim() != 2:
        return f"expected a 2-D weight, got shape {tuple(weight.shape)}"
    if backend_cls is not None:
        # Private table of the kernels' limits; if a torch release drops it, from_dense
        # still validates and its error becomes the fallback reason.
        table = getattr(backend_cls, "_DTYPE_SHAPE_CONSTRAINTS", None)
        limits = None if table is None else table.get(weight.dtype)
        if table is not None and limits is None:
            return f"{backend_cls.BACKEND} has no kernel for {weight.dtype}"
        rows, cols = weight.shape
        if limits is not None and (rows < limits.sparse_min_rows or rows % limits.sparse_min_rows
                or cols < limits.sparse_min_cols or cols % limits.sparse_min_cols):
            return (f"shape {tuple(weight.shape)} not a multiple of ({limits.sparse_min_rows}, "
                    f"{limits.sparse_min_cols}) required by {backend_cls.BACKEND}")
    problem = find_nm_violation(weight, 2, 4)
    if problem is not None:
        return f"not 2:4: {problem}"
    return None


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


@torch.no_grad()
def convert_linear(module: nn.Module, *, check: bool = True, rtol: float = DEFAULT_RTOL,
                   backend: str = "auto") -> str | None:
    """Make one nn.Linear (or Conv1D) run semi-structured sparse. Returns None on
    success, else the reason it stayed dense (the module is then left untouched)."""
    if not torch.cuda.is_available():
        return "no CUDA"
    cls = _backend_class(backend)
    dense = layer_weight(module).detach()  # (d_out, d_in): 2:4 along d_in
    reason = unsupported_reason(dense, cls)
    if reason is not None:
        return reason
    try:
        sparse_weight = cls.from_dense(dense.contiguous())
    except Exception as exc:  # kernel/driver limits we could not predict
        return f"conversion failed: {type(exc).__name__}: {exc}"
    if check:
        bias = None if module.bias is None else module.bias.detach()
        generator = torch.Generator(device=dense.device).manual_seed(0)
        for tokens in _CHECK_TOKENS:
            x = torch.randn(tokens, dense.shape[1], generator=generator,
                            device=dense.device, dtype=dense.dtype)
            want = nn.functional.linear(x, dense, bias)
            try:
                got = nn.functional.linear(x, sparse_weight, bias)
            except Exception as exc:
                return f"sparse matmul failed: {type(exc).__name__}: {exc}"
            err = _relative_error(got, want)
            if not err <= rtol:  # also catches NaN
                return f"output check failed: relative error {err:.3g} > {rtol:g} at {tokens} tokens"
    # Conv1D computes addmm(bias, x, weight): its weight is the sparse tensor's transpose,
    # which the semi-structured addmm handles as linear(x, sparse).
    module.weight = nn.Parameter(to_out_in(module, sparse_weight), requires_grad=False)
    return None


def to_semi_structured(model: nn.Module, *, layer_names: list[str] | None = None,
                       check: bool = True, rtol: float = DEFAULT_RTOL,
                       backend: str = "auto") -> dict:
    """Convert eligible linears of `model` in place; returns
    {"converted": [names], "fell_back": {name: reason}, "backend": name}.

    layer_names: module names to convert; default: every nn.Linear or Conv1D in the decoder
    blocks (embeddings and lm_head stay dense). Fallbacks are logged as warnings.
    """
    names = prunable_linear_names(model) if layer_names is None else list(layer_names)
    report: dict = {"converted": [], "fell_back": {}, "backend": None}
    if not torch.cuda.is_available():
        report["fell_back"] = {name: "no CUDA" for name in names}
        log.warning("to_semi_structured: no CUDA device; all %d layers stay dense", len(names))
        return report
    report["backend"] = _backend_class(backend).BACKEND
    for name in names:
        module = model.get_submodule(name)
        if not is_prunable(module):
            reason = f"{type(module).__name__} is not an nn.Linear or Conv1D"
        else:
            reason = convert_linear(module, check=check, rtol=rtol, backend=backend)
        if reason is None:
            report["converted"].append(name)
        else:
            report["fell_back"][name] = reason
            log.warning("to_semi_structured: %s stays dense: %s", name, reason)
    return report

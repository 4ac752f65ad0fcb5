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

`to_fp8(model, kernel)` does the same for FP8: per-output-channel e4m3 weights and
per-token e4m3 activations on FP8 tensor cores, dense (torch._scaled_mm) or 2:4
(torchao's CUTLASS sm90 kernel, or cuSPARSELt FP8); see the FP8 section below.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .fp8 import quantize_rows, round_rows
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


# ----------------------------------------------------------------------- FP8
#
# FP8 linears: the weight is stored as e4m3 with one scale per output channel and
# the input is quantised per token at call time (pruning.fp8, the same rounding the
# packed-fp8 format uses), then an FP8 tensor-core matmul applies both scales:
#   "dense"      torch._scaled_mm (cuBLASLt, row-wise scales); also runs on CPU
#   "torchao"    2:4 weight, torchao's CUTLASS sm90 kernel (rowwise_scaled_linear_sparse_cutlass_f8f8)
#   "cusparselt" 2:4 weight, cuSPARSELt FP8 through torch._cslt_sparse_mm (weight scales as
#                alpha, token scales applied to its output)
# A kernel that cannot run here is reported with the reason, never faked.

FP8_KERNELS = ("dense", "torchao", "cusparselt")
SPARSE_FP8_KERNELS = ("torchao", "cusparselt")
# Relative error allowed against the FP8 reference (same rounded operands, fp32 math):
# the kernels differ by accumulation order and a bf16/fp16 output rounding.
FP8_RTOL = 2e-2
# cuBLASLt and cuSPARSELt FP8 need the token count to be a multiple of 16.
_FP8_ROW_MULTIPLE = 16


def fp8_unavailable_reason(kernel: str, device: torch.device | str) -> str | None:
    """Why `kernel` cannot run FP8 linears on `device`, or None if it can."""
    if kernel not in FP8_KERNELS:
        raise ValueError(f"kernel: expected one of {', '.join(FP8_KERNELS)}, got {kernel!r}")
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no _scaled_mm"
    if kernel == "torchao":
        _, reason = _torchao_ops()
        if reason is not None:
            return reason
    if device.type != "cuda":
        return None if kernel == "dense" else f"the {kernel} FP8 2:4 kernel needs CUDA, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"compute capability {major}.{minor} < 8.9 (no FP8 tensor cores)"
    if kernel == "torchao" and major != 9:
        return f"torchao's FP8 2:4 kernels are built for sm90, this GPU is sm{major}{minor}"
    if kernel == "cusparselt":
        cusparselt = getattr(torch.backends, "cusparselt", None)
        if cusparselt is None or not cusparselt.is_available():
            return "cuSPARSELt is not available in this torch build"
        if cusparselt.version() < 600:
            return f"cuSPARSELt {cusparselt.version()} has no FP8 (needs 0.6.0 or newer)"
    return None


def _torchao_ops():
    """(torchao.ops module, None), or (None, why it cannot be used)."""
    import importlib.util
    if importlib.util.find_spec("torchao") is None:
        return None, ("torchao is not installed (pip install torchao, a wheel built for this torch "
                      f"{torch.__version__})")
    try:
        import torchao.ops as ops
    except Exception as exc:  # an ABI mismatch with this torch shows up here
        return None, f"torchao import failed: {type(exc).__name__}: {exc}"
    missing = [name for name in ("to_sparse_semi_structured_cutlass_sm9x_f8",
                                 "rowwise_scaled_linear_sparse_cutlass_f8f8") if not hasattr(ops, name)]
    if missing:
        return None, f"this torchao lacks {', '.join(missing)}"
    return ops, None


class Fp8Linear(nn.Module):
    """An nn.Linear replacement computing x W^T + b with FP8 operands (see above).

    Built from a dense (or 2:4) weight with `from_linear`; the module keeps the
    quantised weight (`weight_fp8`, `weight_scale`) for the dense kernel and the
    kernel's own compressed form for the sparse ones. Output dtype = input dtype.
    """

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 kernel: str):
        super().__init__()
        self.kernel = kernel
        self.out_features, self.in_features = weight_fp8.shape
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)
        self._sparse: tuple = ()
        if kernel == "torchao":
            self._torchao, reason = _torchao_ops()
            if reason is not None:
                raise RuntimeError(reason)
            self._sparse = self._torchao.to_sparse_semi_structured_cutlass_sm9x_f8(weight_fp8)
        elif kernel == "cusparselt":
            self._sparse = (torch._cslt_compress(weight_fp8),)
        if self._sparse:
            # The sparse kernels read only their compressed copy: keep no dense one.
            self.weight_fp8 = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, module: nn.Linear, kernel: str = "dense") -> "Fp8Linear":
        weight_fp8, weight_scale = quantize_rows(module.weight.detach())
        bias = None if module.bias is None else module.bias.detach().clone()
        return cls(weight_fp8.contiguous(), weight_scale, bias, kernel)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, tokens = x.shape[:-1], x.reshape(-1, x.shape[-1])
        rows = tokens.shape[0]
        pad = (-rows) % _FP8_ROW_MULTIPLE
        if pad:  # zero rows (scale 1) whose outputs are dropped
            tokens = nn.functional.pad(tokens, (0, 0, 0, pad))
        q, scale = quantize_rows(tokens)
        out = self._matmul(q, scale, x.dtype)[:rows]
        return out.reshape(*lead, self.out_features)

    def _matmul(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.kernel == "dense":
            return torch._scaled_mm(q, self.weight_fp8.t(), scale_a=scale[:, None],
                                    scale_b=self.weight_scale[None, :], bias=bias, out_dtype=dtype)
        if self.kernel == "torchao":
            sparse, meta = self._sparse
            return self._torchao.rowwise_scaled_linear_sparse_cutlass_f8f8(q, scale, sparse, meta,
                                                                           self.weight_scale, bias, dtype)
        # cuSPARSELt: (W q^T) with the weight scales as its per-row alpha, then the token scales.
        out = torch._cslt_sparse_mm(self._sparse[0], q.t(), alpha=self.weight_scale, out_dtype=dtype).t()
        out = out * scale[:, None].to(dtype)
        return out if bias is None else out + bias


def fp8_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What every FP8 kernel computes, in float32: rows of x and of weight rounded
    through e4m3 with per-row scales (pruning.fp8.round_rows), then x W^T + b."""
    out = round_rows(x.float()) @ round_rows(weight.float()).t()
    return out if bias is None else out + bias.float()


@torch.no_grad()
def convert_linear_fp8(module: nn.Linear, kernel: str = "dense", *, check: bool = True,
                       rtol: float = FP8_RTOL) -> tuple[Fp8Linear | None, str | None]:
    """(Fp8Linear for `module`, None), or (None, why it stays as it is).

    The sparse kernels need an exactly 2:4 weight. With check=True the new module's
    output on random inputs must match fp8_reference within rtol.
    """
    weight = module.weight.detach()
    reason = fp8_unavailable_reason(kernel, weight.device)
    if reason is None and kernel in SPARSE_FP8_KERNELS:
        problem = find_nm_violation(weight, 2, 4)
        reason = None if problem is None else f"not 2:4: {problem}"
    if reason is not None:
        return None, reason
    try:
        new = Fp8Linear.from_linear(module, kernel)
    except Exception as exc:  # kernel/driver limits we could not predict
        return None, f"conversion failed: {type(exc).__name__}: {exc}"
    if check:
        bias = None if module.bias is None else module.bias.detach()
        generator = torch.Generator(device=weight.device).manual_seed(0)
        for tokens in _CHECK_TOKENS:
            x = torch.randn(tokens, weight.shape[1], generator=generator, device=weight.device,
                            dtype=weight.dtype)
            try:
                got = new(x)
            except Exception as exc:
                return None, f"FP8 matmul failed: {type(exc).__name__}: {exc}"
            err = _relative_error(got, fp8_reference(x, weight, bias))
            if not err <= rtol:  # also catches NaN
                return None, f"output check failed: relative error {err:.3g} > {rtol:g} at {tokens} tokens"
    return new, None


def to_fp8(model: nn.Module, kernel: str = "dense", *, layer_names: list[str] | None = None,
           check: bool = True, rtol: float = FP8_RTOL) -> dict:
    """Swap eligible linears of `model` for Fp8Linear in place; returns
    {"converted": [names], "fell_back": {name: reason}, "kernel": kernel}.

    kernel: "dense" (FP8 GEMM), "torchao" or "cusparselt" (FP8 2:4), or "sparse" =
    the first sparse kernel that can run here. layer_names: default every nn.Linear
    in the decoder blocks. A layer that cannot be converted stays as it was.
    """
    names = prunable_linear_names(model) if layer_names is None else list(layer_names)
    unavailable = None
    if kernel == "sparse":
        device = next(model.parameters()).device
        reasons = {k: fp8_unavailable_reason(k, device) for k in SPARSE_FP8_KERNELS}
        kernel = next((k for k, reason in reasons.items() if reason is None), "sparse")
        if kernel == "sparse":
            unavailable = "no FP8 2:4 kernel here: " + "; ".join(f"{k}: {r}" for k, r in reasons.items())
    report: dict = {"converted": [], "fell_back": {}, "kernel": kernel}
    for name in names:
        module = model.get_submodule(name)
        if unavailable is not None:
            new, reason = None, unavailable
        elif not isinstance(module, nn.Linear):
            new, reason = None, f"{type(module).__name__} is not an nn.Linear"
        else:
            new, reason = convert_linear_fp8(module, kernel, check=check, rtol=rtol)
        if new is None:
            report["fell_back"][name] = reason
            log.warning("to_fp8: %s stays as it is: %s", name, reason)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        report["converted"].append(name)
    return report

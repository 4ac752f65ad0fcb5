"""One entry point per layer: validate, dispatch to a method, return in the caller's dtype."""
from __future__ import annotations

from dataclasses import asdict

import torch

from . import baselines, settings
from .admm import AdmmSystem, admm_solve
from .masks import select_mask

METHODS = tuple(settings.METHODS)
# The paper defaults, from the options types of the settings model.
ADMM_DEFAULTS = {k: v for k, v in asdict(settings.AdmmGradOptions()).items() if k != "solve_dtype"}
SPARSEGPT_DEFAULTS = asdict(settings.SparseGPTOptions())
_SOLVE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def validate_settings(method: str, sparsity: float | None, pattern: str = "unstructured",
                      **opts) -> tuple[float, tuple[int, int] | None]:
    """Check a method's settings before any work; return (sparsity, N:M or None).

    Errors are SettingsErrors (ValueErrors) whose path names the offending argument.
    For an N:M pattern the sparsity is 1 - N/M; None means "take it from the pattern".
    """
    resolved = settings.layer_settings(method, sparsity, pattern, opts)
    return resolved.sparsity, resolved.nm


def _check_tensors(weight: torch.Tensor, gram: torch.Tensor, nm) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D (d_out, d_in) tensor, got shape {tuple(weight.shape)}")
    d_in = weight.shape[1]
    if gram.shape != (d_in, d_in):
        raise ValueError(f"gram: expected shape ({d_in}, {d_in}) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(gram.shape)}")
    if nm is not None and d_in % nm[1]:
        raise ValueError(f"pattern: {nm[0]}:{nm[1]} needs d_in divisible by {nm[1]}, got d_in={d_in}")


def _admm_system(gram, opts, cache) -> AdmmSystem:
    key = ("admm", opts["damping"], opts["rho"], opts["solve_dtype"])
    if cache is None or key not in cache:
        system = AdmmSystem.from_gram(gram, damping=opts["damping"], rho=opts["rho"],
                                      dtype=_SOLVE_DTYPES[opts["solve_dtype"]])
        if cache is None:
            return system
        cache[key] = system
    return cache[key]


def _admm_opts(opts: dict) -> dict:
    return {**ADMM_DEFAULTS, "solve_dtype": "float32", **opts}


def prune_layer(weight: torch.Tensor, gram: torch.Tensor, *, method: str, sparsity: float | None = None,
                pattern: str = "unstructured", cache: dict | None = None, **opts):
    """Prune one linear layer. Returns (new_weight, mask); mask is bool, True = kept.

    weight: (d_out, d_in) in fp32/fp16/bf16, returned in the same dtype and device.
    gram:   XᵀX of the layer's calibration inputs, (d_in, d_in), ideally fp32.
    cache:  a dict shared by layers that have the same Gram, so they share its
            normalisation and factorisation.
    """
    sparsity, nm = validate_settings(method, sparsity, pattern, **opts)
    _check_tensors(weight, gram, nm)
    gram = gram.to(weight.device)
    if method == "magnitude":
        new, mask = baselines.magnitude(weight, sparsity, nm, opts.get("group", "layer"))
    elif method == "wanda":
        new, mask = baselines.wanda(weight, gram, sparsity, nm, opts.get("group", "row"))
    elif method == "sparsegpt":
        o = {**SPARSEGPT_DEFAULTS, **opts}
        hinv = None
        if cache is not None:
            key = ("sparsegpt", o["damping"])
            if key not in cache:
                cache[key] = baselines.sparsegpt_factor(gram, o["damping"])
            hinv = cache[key]
        new, mask = baselines.sparsegpt(weight, gram, sparsity, nm, o["damping"], o["blocksize"], hinv)
    else:
        o = _admm_opts(opts)
        system = _admm_system(gram, o, cache)
        iters = o["iters"]
        if method == "admm":
            # One mask up front (Wanda's score, which is |Ŵ| in normalised coordinates).
            score = weight.to(system.scale.dtype).abs() * system.scale[None, :]
            fixed = select_mask(score, sparsity, nm, o["group"])
            new, mask = admm_solve(weight, system, mask=fixed, iters=iters)
        else:
            new, mask = admm_solve(weight, system, sparsity=sparsity, nm=nm, iters=iters,
                                   mask_steps=o["mask_steps"], schedule=o["schedule"], group=o["group"])
    return new.to(weight.dtype), mask


def admm_update(weight: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor, *,
                cache: dict | None = None, **opts) -> torch.Tensor:
    """The ADMM weight update for a mask the caller brings (True = kept).
    Options: those of settings.AdmmUpdateOptions (iters, rho, damping, solve_dtype)."""
    o = asdict(settings.build_options(settings.AdmmUpdateOptions, opts, lambda key: (key,), "admm_update"))
    _check_tensors(weight, gram, None)
    if mask.shape != weight.shape:
        raise ValueError(f"mask: expected shape {tuple(weight.shape)} like weight, got {tuple(mask.shape)}")
    o = _admm_opts(o)
    system = _admm_system(gram.to(weight.device), o, cache)
    new, _ = admm_solve(weight, system, mask=mask.to(torch.bool), iters=o["iters"])
    return new.to(weight.dtype)

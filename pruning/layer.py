"""One entry point per layer: validate, dispatch to a method, return in the caller's dtype."""
from __future__ import annotations

import torch

from . import baselines
from .admm import AdmmSystem, admm_solve
from .masks import parse_pattern, select_mask

METHODS = ("magnitude", "wanda", "sparsegpt", "admm", "admm-grad")
ADMM_DEFAULTS = dict(iters=20, mask_steps=15, rho=1.0, damping=0.1, schedule="cubic", group="layer")
SPARSEGPT_DEFAULTS = dict(damping=0.01, blocksize=128)
_GROUP_DEFAULT = {"magnitude": "layer", "wanda": "row"}
_OPTIONS = {
    "magnitude": {"group"},
    "wanda": {"group"},
    "sparsegpt": set(SPARSEGPT_DEFAULTS),
    "admm": set(ADMM_DEFAULTS),
    "admm-grad": set(ADMM_DEFAULTS),
}
_SOLVE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def validate_settings(method: str, sparsity: float | None, pattern: str = "unstructured",
                      **opts) -> tuple[float, tuple[int, int] | None]:
    """Check a method's settings before any work; return (sparsity, N:M or None).

    Errors are ValueErrors that name the offending argument. For an N:M pattern the
    sparsity is 1 - N/M; None means "take it from the pattern".
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    nm = parse_pattern(pattern)
    if nm is not None:
        implied = 1.0 - nm[0] / nm[1]
        if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
            raise ValueError(f"sparsity: pattern {pattern!r} implies sparsity {implied:g}, "
                             f"got {sparsity!r}; leave it out or pass {implied:g}")
        sparsity = implied
    if sparsity is None or isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity: expected a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity: expected a fraction in [0, 1), got {sparsity!r}")
    unknown = set(opts) - _OPTIONS[method] - {"solve_dtype"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: not an option of method {method!r} "
                         f"(options: {', '.join(sorted(_OPTIONS[method]))})")
    if opts.get("group", "layer") not in ("layer", "row"):
        raise ValueError(f"group: expected 'layer' or 'row', got {opts['group']!r}")
    if opts.get("schedule", "cubic") not in ("cubic", "constant"):
        raise ValueError(f"schedule: expected 'cubic' or 'constant', got {opts['schedule']!r}")
    if opts.get("solve_dtype", "float32") not in _SOLVE_DTYPES:
        raise ValueError(f"solve_dtype: expected one of {list(_SOLVE_DTYPES)}, got {opts['solve_dtype']!r}")
    iters = opts.get("iters", ADMM_DEFAULTS["iters"])
    mask_steps = opts.get("mask_steps", ADMM_DEFAULTS["mask_steps"])
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected an integer >= 1, got {iters!r}")
    if method == "admm-grad" and (not isinstance(mask_steps, int) or not 1 <= mask_steps <= iters):
        raise ValueError(f"mask_steps: expected an integer in [1, iters={iters}], got {mask_steps!r}")
    if float(opts.get("rho", 1.0)) <= 0:
        raise ValueError(f"rho: must be > 0, got {opts['rho']!r}")
    if float(opts.get("damping", 0.1)) < 0:
        raise ValueError(f"damping: must be >= 0, got {opts['damping']!r}")
    return float(sparsity), nm


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
    """The ADMM weight update for a mask the caller brings (True = kept)."""
    unknown = set(opts) - set(ADMM_DEFAULTS) - {"solve_dtype"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: not an option of admm_update "
                         f"(options: {', '.join(sorted(ADMM_DEFAULTS))})")
    validate_settings("admm", 0.0, "unstructured", **opts)
    _check_tensors(weight, gram, None)
    if mask.shape != weight.shape:
        raise ValueError(f"mask: expected shape {tuple(weight.shape)} like weight, got {tuple(mask.shape)}")
    o = _admm_opts(opts)
    system = _admm_system(gram.to(weight.device), o, cache)
    new, _ = admm_solve(weight, system, mask=mask.to(torch.bool), iters=o["iters"])
    return new.to(weight.dtype)

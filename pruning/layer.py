"""One entry point per layer: validate, dispatch to a method, return in the caller's dtype."""
from __future__ import annotations

import torch

from . import baselines
from dataclasses import dataclass, field

from .admm import MATMUL_PRECISIONS, AdmmSystem, MaskRule, admm_solve_group
from .finite import located, require_finite
from .masks import parse_pattern, select_mask

METHODS = ("magnitude", "wanda", "sparsegpt", "admm", "admm-grad")
ADMM_METHODS = ("admm", "admm-grad")
ADMM_DEFAULTS = dict(iters=20, mask_steps=15, rho=1.0, damping=0.1, schedule="cubic", group="layer",
                     matmul="fp32")
# Options that shape the shared solve (one factorisation, one GEMM per iteration):
# layers that share a Gram are solved together only when these agree.
_SOLVER_KEYS = ("iters", "rho", "damping", "solve_dtype", "matmul")
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
    if opts.get("matmul", "fp32") not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul: expected one of {', '.join(MATMUL_PRECISIONS)}, got {opts['matmul']!r}")
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


@dataclass
class LayerJob:
    """One layer to prune: its weight, its settings, and optionally a user mask
    (True = kept), which replaces mask selection by an ADMM update on that mask."""
    weight: torch.Tensor
    method: str
    sparsity: float | None = None
    pattern: str = "unstructured"
    options: dict = field(default_factory=dict)
    user_mask: torch.Tensor | None = None

    def admm_options(self) -> dict:
        """Solver options: the layer's own for an ADMM method; for a user mask under
        another method, the ADMM defaults (that method's options mean nothing here)."""
        own = self.options if self.method in ADMM_METHODS else {}
        if self.user_mask is not None:
            own = {k: v for k, v in own.items() if k != "mask_steps"}
        return _admm_opts(own)


def _admm_rule(job: LayerJob, system: AdmmSystem, sparsity: float, nm, o: dict) -> MaskRule:
    if job.user_mask is not None:
        return MaskRule(fixed=job.user_mask.to(device=job.weight.device, dtype=torch.bool))
    if job.method == "admm":
        # One mask up front (Wanda's score, which is |Ŵ| in normalised coordinates).
        score = job.weight.to(system.scale.dtype).abs() * system.scale[None, :]
        return MaskRule(fixed=select_mask(score, sparsity, nm, o["group"]))
    return MaskRule(sparsity=sparsity, nm=nm, mask_steps=o["mask_steps"], schedule=o["schedule"],
                    group=o["group"])


def _check_job(job: LayerJob, gram: torch.Tensor):
    if job.user_mask is not None:
        validate_settings("admm", 0.0, "unstructured", **job.admm_options())
        _check_tensors(job.weight, gram, None)
        if job.user_mask.shape != job.weight.shape:
            raise ValueError(f"mask: expected shape {tuple(job.weight.shape)} like weight, "
                             f"got {tuple(job.user_mask.shape)}")
        return 0.0, None
    sparsity, nm = validate_settings(job.method, job.sparsity, job.pattern, **job.options)
    _check_tensors(job.weight, gram, nm)
    return sparsity, nm


def prune_layers(jobs: dict[str, LayerJob], gram: torch.Tensor, *, cache: dict | None = None,
                 select_path: str = "auto") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Prune layers that read the same input (so share `gram`), e.g. q/k/v or gate/up.

    ADMM layers whose solver options agree are solved together: one factorisation
    and one GEMM per iteration on their concatenated columns (`admm_solve_group`).
    Others go one by one. Returns {name: (new weight in its dtype, bool mask)}.
    """
    cache = {} if cache is None else cache
    checked = {name: _check_job(job, gram) for name, job in jobs.items()}  # all, before any work
    require_finite_layers(jobs, gram)
    gram = gram.to(next(iter(jobs.values())).weight.device)
    with located(f"layers {', '.join(jobs)}"):
        return _prune_checked(jobs, gram, checked, cache, select_path)


def require_finite_layers(jobs: dict[str, LayerJob], gram: torch.Tensor) -> None:
    """NaN or inf in a weight or in the shared Gram: refused before any solve, by name."""
    for name, job in jobs.items():
        require_finite_weight(name, job.weight)
    require_finite_gram(list(jobs), gram)


def require_finite_weight(name: str, weight: torch.Tensor) -> None:
    require_finite(weight, f"weight of layer {name}",
                   "the model's weights are damaged; check the checkpoint and its dtype")


def require_finite_gram(names: list[str], gram: torch.Tensor) -> None:
    require_finite(gram, f"Gram of the input of layers {', '.join(names)}",
                   "these activations overflow or are damaged; load the model in bfloat16 or float32")


def _prune_checked(jobs, gram, checked, cache, select_path):
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    admm_batches: dict[tuple, list[str]] = {}
    for name, job in jobs.items():
        if job.user_mask is not None or job.method in ADMM_METHODS:
            o = job.admm_options()
            admm_batches.setdefault(tuple(o[k] for k in _SOLVER_KEYS), []).append(name)
        else:
            out[name] = _prune_baseline(job, gram, *checked[name], cache)
    for names in admm_batches.values():
        o = jobs[names[0]].admm_options()
        system = _admm_system(gram, o, cache)
        rules = [_admm_rule(jobs[n], system, *checked[n], jobs[n].admm_options()) for n in names]
        solved = admm_solve_group([jobs[n].weight for n in names], system, rules, iters=o["iters"],
                                  select_path=select_path, matmul=o["matmul"])
        for n, (new, mask) in zip(names, solved):
            out[n] = (new.to(jobs[n].weight.dtype), mask)
    return {name: out[name] for name in jobs}


def _prune_baseline(job: LayerJob, gram, sparsity, nm, cache):
    weight, opts = job.weight, job.options
    if job.method == "magnitude":
        new, mask = baselines.magnitude(weight, sparsity, nm, opts.get("group", "layer"))
    elif job.method == "wanda":
        new, mask = baselines.wanda(weight, gram, sparsity, nm, opts.get("group", "row"))
    else:
        o = {**SPARSEGPT_DEFAULTS, **opts}
        key = ("sparsegpt", o["damping"])
        if key not in cache:
            cache[key] = baselines.sparsegpt_factor(gram, o["damping"])
        new, mask = baselines.sparsegpt(weight, gram, sparsity, nm, o["damping"], o["blocksize"], cache[key])
    return new.to(weight.dtype), mask


def prune_layer(weight: torch.Tensor, gram: torch.Tensor, *, method: str, sparsity: float | None = None,
                pattern: str = "unstructured", cache: dict | None = None, **opts):
    """Prune one linear layer. Returns (new_weight, mask); mask is bool, True = kept.

    weight: (d_out, d_in) in fp32/fp16/bf16, returned in the same dtype and device.
    gram:   XᵀX of the layer's calibration inputs, (d_in, d_in), ideally fp32.
    cache:  a dict shared by layers that have the same Gram, so they share its
            normalisation and factorisation.
    """
    job = LayerJob(weight, method, sparsity, pattern, opts)
    return prune_layers({"layer": job}, gram, cache=cache)["layer"]


def admm_update(weight: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor, *,
                cache: dict | None = None, **opts) -> torch.Tensor:
    """The ADMM weight update for a mask the caller brings (True = kept)."""
    unknown = set(opts) - set(ADMM_DEFAULTS) - {"solve_dtype"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: not an option of admm_update "
                         f"(options: {', '.join(sorted(ADMM_DEFAULTS))})")
    job = LayerJob(weight, "admm", None, "unstructured", opts, user_mask=mask)
    return prune_layers({"layer": job}, gram, cache=cache)["layer"][0]

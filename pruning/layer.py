"""One entry point per layer: validate, dispatch to a method, return in the caller's dtype."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from . import baselines, settings
from .admm import AdmmSystem, MaskRule, admm_solve_group
from .finite import located, require_finite
from .masks import select_mask

METHODS = tuple(settings.METHODS)
ADMM_METHODS = settings.ADMM_METHODS
# The paper defaults, from the options types of the settings model.
ADMM_DEFAULTS = {k: v for k, v in asdict(settings.AdmmGradOptions()).items() if k != "solve_dtype"}
SPARSEGPT_DEFAULTS = asdict(settings.SparseGPTOptions())
_UPDATE_KEYS = tuple(f.name for f in fields(settings.AdmmUpdateOptions))
# Options that shape the shared solve (one factorisation, one GEMM per iteration):
# layers that share a Gram are solved together only when these agree.
_SOLVER_KEYS = ("iters", "rho", "damping", "solve_dtype", "matmul")
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
        """Solver options: the layer's own for an ADMM method; for a user mask, only the
        ADMM update's (settings.user_mask_settings), and for a user mask under another
        method the defaults (that method's options mean nothing here)."""
        own = self.options if self.method in ADMM_METHODS else {}
        if self.user_mask is not None:
            own = {k: v for k, v in own.items() if k in _UPDATE_KEYS}
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
        own = job.options if job.method in ADMM_METHODS else {}
        settings.build_options(settings.AdmmUpdateOptions, {k: v for k, v in own.items() if k in _UPDATE_KEYS},
                               lambda key: (key,), "the ADMM update on a user mask")
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
    """The ADMM weight update for a mask the caller brings (True = kept).
    Options: those of settings.AdmmUpdateOptions (iters, rho, damping, solve_dtype, matmul)."""
    settings.build_options(settings.AdmmUpdateOptions, opts, lambda key: (key,), "admm_update")
    job = LayerJob(weight, "admm", None, "unstructured", opts, user_mask=mask)
    return prune_layers({"layer": job}, gram, cache=cache)["layer"][0]

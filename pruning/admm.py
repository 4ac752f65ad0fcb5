"""The ADMM weight update for pruned layers (Boza, TMLR 2024), in normalised coordinates.

For a layer y = W x with Gram G = XᵀX, we scale inputs to unit norm
(d_j = sqrt(G_jj) + eps, Ĝ = G / d dᵀ) and work with V = diag(d) Wᵀ of shape
(d_in, d_out). There |V_ji| is Wanda's score |W_ij|·‖X_j‖, and one damping λ suits
every layer. ADMM splits "close to the dense output" (V) from "sparse" (Z):

    V ← (Ĝ + (λ+ρ) I)⁻¹ (B + ρ (Z − U)),  B = (Ĝ + λI) Ŵ
    Z ← (V + U) ⊙ M,                       U ← U + V − Z

which minimises ½ tr((V−Ŵ)ᵀ (Ĝ+λI) (V−Ŵ)) over V with the mask M; in original
coordinates that is ‖X(W−W0)ᵀ‖² + λ Σ_j d_j² ‖W_:j − W0_:j‖².
ADMM-Grad re-chooses M from |V + U| during the first K iterations, raising the
sparsity on a schedule, so that weights get a chance to recover before they go.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import gradual_nm_mask, unstructured_mask

EPS = 1e-8


@dataclass
class AdmmSystem:
    """Everything that depends on the Gram only, shared by layers with the same input."""

    scale: torch.Tensor       # d, shape (d_in,)
    gram_hat: torch.Tensor    # Ĝ + λI, shape (d_in, d_in)
    inverse: torch.Tensor     # (Ĝ + (λ+ρ)I)⁻¹, computed from its Cholesky factor
    rho: float

    @classmethod
    def from_gram(cls, gram: torch.Tensor, *, damping: float = 0.1, rho: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> "AdmmSystem":
        gram = gram.to(dtype)
        scale = gram.diagonal().clamp_min(0).sqrt() + EPS
        gram_hat = gram / scale[:, None] / scale[None, :]
        lam = damping * gram_hat.diagonal().mean()
        eye = torch.eye(gram.shape[0], dtype=dtype, device=gram.device)
        gram_hat = gram_hat + lam * eye
        # Ĝ has a unit diagonal and is PSD, so the eigenvalues of Ĝ + (λ+ρ)I lie in
        # [λ+ρ, d_in+λ+ρ]: with ρ = 1 it is well conditioned and an explicit inverse
        # (via Cholesky) is as accurate as triangular solves, while one GEMM per
        # iteration is ~2.5x faster than two solves (measured on CPU, 576..1536).
        inverse = torch.cholesky_solve(eye, torch.linalg.cholesky(gram_hat + rho * eye))
        return cls(scale=scale, gram_hat=gram_hat, inverse=inverse, rho=rho)

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        return self.inverse @ rhs


def sparsity_schedule(step: int, mask_steps: int, sparsity: float, schedule: str) -> float:
    """Target sparsity at mask-update step `step` (0-based) out of `mask_steps`."""
    if schedule == "constant":
        return sparsity
    if schedule == "cubic":
        return sparsity * (1.0 - (1.0 - (step + 1) / mask_steps) ** 3)
    raise ValueError(f"schedule: expected 'cubic' or 'constant', got {schedule!r}")


def admm_solve(weight: torch.Tensor, system: AdmmSystem, *, mask: torch.Tensor | None = None,
               sparsity: float = 0.0, nm: tuple[int, int] | None = None, iters: int = 20,
               mask_steps: int = 15, schedule: str = "cubic", group: str = "layer",
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ADMM on one layer. With `mask` given it stays fixed; otherwise the mask is
    chosen gradually from |V + U| over the first `mask_steps` iterations (ADMM-Grad).

    Returns (new weight in the system's dtype, bool mask), both (d_out, d_in).
    """
    scale, rho = system.scale, system.rho
    dtype = system.inverse.dtype
    # Everything in the loop is contiguous (d_in, d_out) and the mask is a float
    # multiplier: mixed layouts and bool casts made the elementwise work ~2x slower.
    w_hat = (weight.to(dtype).t() * scale[:, None]).contiguous()          # (d_in, d_out)
    b = system.gram_hat @ w_hat
    v, u = w_hat.clone(), torch.zeros_like(w_hat)
    mask_t = None if mask is None else mask.t().to(w_hat.device, dtype).contiguous()
    for step in range(iters):
        if mask is None and step < mask_steps:
            score = (v + u).abs().t()
            if nm is None:
                target = sparsity_schedule(step, mask_steps, sparsity, schedule)
                chosen = unstructured_mask(score, target, group)
            else:
                target = sparsity_schedule(step, mask_steps, 1.0 - nm[0] / nm[1], schedule)
                chosen = gradual_nm_mask(score, nm[0], nm[1], target)
            mask_t = chosen.t().to(dtype).contiguous()
        z = (v + u) * mask_t
        u = u + v - z
        v = system.solve(b + rho * (z - u))
    final = ((v + u) * mask_t).t() / scale[None, :]
    return final, mask_t.t() > 0

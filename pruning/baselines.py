"""Baselines on the same data: magnitude, Wanda, SparseGPT.

Each returns (new weight in fp32, bool mask), shapes (d_out, d_in).
"""
from __future__ import annotations

import torch

from .masks import nm_mask, select_mask


def magnitude(weight: torch.Tensor, sparsity: float, nm, group: str = "layer"):
    w = weight.float()
    mask = select_mask(w.abs(), sparsity, nm, group)
    return w * mask, mask


def wanda(weight: torch.Tensor, gram: torch.Tensor, sparsity: float, nm, group: str = "row"):
    """Score |W_ij|·‖X_j‖ (‖X_j‖² is the Gram's diagonal); no weight update."""
    w = weight.float()
    col_norm = gram.float().diagonal().clamp_min(0).sqrt()
    mask = select_mask(w.abs() * col_norm[None, :], sparsity, nm, group)
    return w * mask, mask


def sparsegpt_factor(gram: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of (G + λI)⁻¹, λ = damping · mean diag; shareable by layers."""
    h = gram.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # a channel that never fires: any weight there is free
    h += damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True)


def sparsegpt(weight: torch.Tensor, gram: torch.Tensor, sparsity: float, nm,
              damping: float = 0.01, blocksize: int = 128, hinv: torch.Tensor | None = None):
    """OBS-style column sweep with lazy block updates (SparseGPT).

    H = G + λI; R = upper Cholesky factor of H⁻¹. Columns are visited left to right
    in blocks; each block picks its mask by w² / R_jj², then prunes column by column,
    spreading each column's error onto the block's later columns through R's rows;
    the block's accumulated error reaches later blocks in one matrix product.
    `hinv` (R) may be passed in when several layers share the Gram.
    """
    w = weight.float().clone()
    d_out, d_in = w.shape
    dead = gram.diagonal() == 0
    if hinv is None:
        hinv = sparsegpt_factor(gram, damping)
    w[:, dead] = 0.0
    mask = torch.ones_like(w, dtype=torch.bool)
    if nm is not None:  # N:M groups must not straddle two blocks
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])
    total_prune = d_out * d_in * sparsity

    for start in range(0, d_in, blocksize):
        end = min(start + blocksize, d_in)
        w_blk = w[:, start:end].clone()
        r_blk = hinv[start:end, start:end]
        err_blk = torch.zeros_like(w_blk)
        score = w_blk ** 2 / r_blk.diagonal()[None, :] ** 2
        if nm is None:
            # Cumulative rounding keeps the layer's total exactly round(s · numel).
            n_prune = round(total_prune * end / d_in) - round(total_prune * start / d_in)
            flat = torch.ones(score.numel(), dtype=torch.bool, device=w.device)
            flat[torch.argsort(score.reshape(-1), stable=True)[:n_prune]] = False
            mask_blk = flat.view_as(score)
        else:
            mask_blk = nm_mask(score, *nm)
        for j in range(end - start):
            col = w_blk[:, j]
            pruned_col = col * mask_blk[:, j]
            err = (col - pruned_col) / r_blk[j, j]
            w_blk[:, j:] -= err[:, None] * r_blk[j, j:][None, :]
            w_blk[:, j] = pruned_col
            err_blk[:, j] = err
        w[:, start:end] = w_blk
        mask[:, start:end] = mask_blk
        w[:, end:] -= err_blk @ hinv[start:end, end:]
    return w * mask, mask

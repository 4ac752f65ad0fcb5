"""Non-uniform per-block sparsity from outlier counts (after OWL, Yin et al. 2024).

Blocks whose Wanda scores have many outliers are hurt more by pruning, so they get
a lower sparsity, and blocks with few outliers a higher one; the mean stays s.

For block i (a "layer" in the OWL paper), with the dense model's inputs:

    score_jk  = |W_jk| · ‖X_k‖            over all linear layers of the block
    D_i       = fraction of the block's scores above M · mean(block's scores)
    n_i       = (D_i − min D) / (max D − min D)          (0 when all D are equal)
    s_i       = clip(s + λ (1 − 2 n_i) + c,  s − λ,  s + λ)

The offset c is found by bisection so that mean_i s_i = s (to ~1e-12): the
unshifted values already lie in [s − λ, s + λ] but their mean is s only when the
n_i average to 1/2, and clipping after a shift would move the mean again.
Defaults M = 5 and λ = 0.08 are the OWL paper's.

Only unstructured sparsity is meaningful here: N:M fixes the sparsity per group.
"""
from __future__ import annotations

import torch

from .discovery import block_linears, decoder_layers, layer_weight
from .runner import BlockInputs
from .settings import OWL_LAMBDA
from .walk import DEFAULT_BATCH_SIZE, LinearTap, walk_block


class InputNorms(LinearTap):
    """Σ over tokens of x² per input channel, per linear layer: ‖X_k‖² for Wanda's score."""

    def __init__(self, linears):
        super().__init__(linears)
        self.sq_norms: dict[str, torch.Tensor] = {}

    def observe(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sq_norms[name] = self.sq_norms.get(name, 0) + (x * x).sum(dim=0)


@torch.no_grad()
def block_outlier_ratios(model, inputs: BlockInputs, *, m: float = 5.0,
                         batch_size: int = DEFAULT_BATCH_SIZE) -> list[float]:
    """D_i of every block: the dense model is walked block by block on the calibration
    inputs (its own outputs feed the next block; nothing is pruned)."""
    ratios = []
    hidden = inputs.hidden.clone()
    for i, block in enumerate(decoder_layers(model)):
        home = next(block.parameters()).device
        block.to(hidden.device)  # an offloaded block visits the activations' device
        linears = block_linears(block)
        norms = InputNorms(linears)
        walk_block(block, hidden, inputs.calls[i], batch_size=batch_size, taps=[norms], write_back=True)
        block.to(home)
        scores = torch.cat([(layer_weight(lin).float().abs() * norms.sq_norms[name].sqrt()[None, :]).reshape(-1)
                            for name, lin in linears.items() if name in norms.sq_norms])
        ratios.append(float((scores > m * scores.mean()).float().mean()))
    return ratios


def owl_sparsities(ratios: list[float], sparsity: float, lam: float = OWL_LAMBDA) -> list[float]:
    """Per-block sparsities from outlier ratios D_i (see the module docstring)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity: expected a fraction in [0, 1), got {sparsity!r}")
    if lam < 0 or sparsity - lam < 0 or sparsity + lam >= 1:
        raise ValueError(f"lam: sparsity ± lam must stay in [0, 1); got sparsity={sparsity}, lam={lam}")
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = d.max() - d.min()
    norm = (d - d.min()) / spread if spread > 0 else torch.zeros_like(d)
    base = sparsity + lam * (1.0 - 2.0 * norm)

    def shifted(c: float) -> torch.Tensor:
        return (base + c).clamp(sparsity - lam, sparsity + lam)

    # mean(shifted(c)) is continuous and non-decreasing in c; c = ±2λ brackets s.
    lo, hi = -2.0 * lam, 2.0 * lam
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(shifted(mid).mean()) < sparsity:
            lo = mid
        else:
            hi = mid
    return [float(v) for v in shifted(0.5 * (lo + hi))]


def owl_block_overrides(model, inputs: BlockInputs, sparsity: float, *, lam: float = OWL_LAMBDA,
                        m: float = 5.0, batch_size: int = DEFAULT_BATCH_SIZE) -> dict[int, dict]:
    """`block_overrides` for PruneSpec: {block index: {"sparsity": s_i}}.

    `inputs` are the dense model's block-0 inputs (capture_block_inputs); call this
    before pruning, on the dense model.
    """
    ratios = block_outlier_ratios(model, inputs, m=m, batch_size=batch_size)
    return {i: {"sparsity": s} for i, s in enumerate(owl_sparsities(ratios, sparsity, lam))}

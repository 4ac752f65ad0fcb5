"""Perplexity = exp(mean token NLL) over windows (the papers' protocol).

Windows are scored independently (no carry-over, no cache); `batch_size` windows go
through the model at a time, which changes only fp rounding, not what is scored.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .walk import DEFAULT_BATCH_SIZE, batch_slices


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, *, device: str = "cpu", progress: bool = True,
               desc: str = "perplexity", batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """windows: (n, seqlen) token ids."""
    total_nll = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per batch
    for rows in tqdm(batch_slices(windows.shape[0], batch_size), desc=desc, disable=not progress, unit="batch"):
        ids = windows[rows].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total_nll += nll.double()
    total_tokens = windows.shape[0] * (windows.shape[1] - 1)
    return float(torch.exp(total_nll / total_tokens))

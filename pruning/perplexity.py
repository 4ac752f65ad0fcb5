"""Perplexity = exp(mean token NLL) over windows, batch 1 (the papers' protocol)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, *, device: str = "cpu", progress: bool = True,
               desc: str = "perplexity") -> float:
    """windows: (n, seqlen) token ids. Each window is scored on its own (no carry-over)."""
    total_nll, total_tokens = 0.0, 0
    for window in tqdm(windows, desc=desc, disable=not progress, unit="win"):
        ids = window[None].to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        total_nll += nll.item()
        total_tokens += ids.shape[1] - 1
    return float(torch.exp(torch.tensor(total_nll / total_tokens)))

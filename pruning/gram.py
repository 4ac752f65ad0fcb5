"""Gram accumulation: G = XᵀX of every linear layer's inputs, via forward pre-hooks.

Layers that read the same tensor in one forward (q/k/v; gate/up) are grouped and
share one Gram, so they can also share its normalisation and factorisation. The
grouping is found by identity of the input tensor, which works for any
architecture without a table of layer names.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class GramCollector:
    def __init__(self, linears: dict[str, nn.Linear], active: set[str] | None = None):
        self.linears = linears
        self.active = active            # leaders to accumulate for; None = all
        self.leader: dict[str, str] = {}  # layer name -> name of the first layer with its input
        self.grams: dict[str, torch.Tensor] = {}
        self.order: list[str] = []      # layer names in the order the forward reaches them
        self._inputs_this_forward: list[tuple[torch.Tensor, str]] = []

    def new_forward(self) -> None:
        self._inputs_this_forward = []

    def _hook(self, name: str, module: nn.Module, args) -> None:
        x = args[0]
        leader = next((lead for seen, lead in self._inputs_this_forward if seen is x), None)
        if leader is None:
            self._inputs_this_forward.append((x, name))
            leader = name
        self.leader.setdefault(name, leader)
        if name not in self.order:
            self.order.append(name)
        if leader != name or (self.active is not None and leader not in self.active):
            return
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if leader not in self.grams:
            self.grams[leader] = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
        self.grams[leader].addmm_(flat.T, flat)

    @contextmanager
    def attached(self):
        handles = [m.register_forward_pre_hook(lambda mod, args, n=name: self._hook(n, mod, args))
                   for name, m in self.linears.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def groups(self) -> list[list[str]]:
        """Layer names grouped by shared input, in forward order."""
        out: dict[str, list[str]] = {}
        for name in self.order:
            out.setdefault(self.leader[name], []).append(name)
        return list(out.values())

    def gram_of(self, name: str) -> torch.Tensor:
        return self.grams[self.leader[name]]


@contextmanager
def exact_fp32_matmul():
    """TF32 off while Grams and solves run: their sums must be fp32-exact enough."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

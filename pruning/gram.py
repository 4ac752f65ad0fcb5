"""Gram accumulation: G = XᵀX of every linear layer's inputs, as a tap on a block walk.

Layers that read the same tensor in one forward (q/k/v; gate/up) are grouped and
share one Gram, so they can also share its normalisation and factorisation. The
grouping is found by identity of the input tensor, which works for any
architecture without a table of layer names.

Precision: Grams are summed in fp32. fp16/bf16 inputs are multiplied as they are
(their products are exact in fp32) and summed in fp32 by one GEMM with an fp32
output where torch offers it (CUDA); elsewhere they are widened to fp32 first.
fp32 inputs use a plain fp32 GEMM, with TF32 off (exact_fp32_matmul).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .walk import LinearTap

_HALF = (torch.float16, torch.bfloat16)


def add_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram += xᵀx for x of shape (tokens, d), summed in fp32 (gram is fp32)."""
    if x.dtype in _HALF and x.is_cuda:
        gram.add_(torch.mm(x.T, x, out_dtype=torch.float32))
    else:
        x = x.float()
        gram.addmm_(x.T, x)


class GramCollector(LinearTap):
    def __init__(self, linears: dict[str, nn.Linear], active: set[str] | None = None):
        super().__init__(linears)
        self.active = active            # leaders to accumulate for; None = all
        self.leader: dict[str, str] = {}  # layer name -> name of the first layer with its input
        self.grams: dict[str, torch.Tensor] = {}
        self.order: list[str] = []      # layer names in the order the forward reaches them
        self._inputs_this_forward: list[tuple[torch.Tensor, str]] = []
        self._seen: set[str] = set()    # layers whose input this batch has shown

    def new_batch(self) -> None:
        self._inputs_this_forward = []
        self._seen: set[str] = set()

    def finished(self) -> bool:
        # The first batch runs to the end: it is what tells the layer order and groups.
        needed = self.linears.keys() if self.active is None else self.active
        return len(self.order) == len(self.linears) and self._seen >= set(needed)

    def observe(self, name: str, x: torch.Tensor) -> None:
        self._seen.add(name)
        leader = next((lead for seen, lead in self._inputs_this_forward if seen is x), None)
        if leader is None:
            self._inputs_this_forward.append((x, name))
            leader = name
        self.leader.setdefault(name, leader)
        if name not in self.order:
            self.order.append(name)
        if leader != name or (self.active is not None and leader not in self.active):
            return
        flat = x.detach().reshape(-1, x.shape[-1])
        if leader not in self.grams:
            self.grams[leader] = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
        add_gram(self.grams[leader], flat)

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

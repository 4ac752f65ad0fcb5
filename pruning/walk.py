"""Running a decoder block over every calibration sample, in batches.

One walk serves every pass that needs a block's activations: Gram accumulation,
OWL's input norms and propagation to the next block (capture and perplexity batch
the whole model the same way, see runner.capture_block_inputs and perplexity).
Taps watch the inputs of a block's linear layers while it runs.

The samples sit in one preallocated (N, seqlen, hidden) buffer. Propagation writes
each batch's outputs over its own inputs: a block treats samples independently, so
a batch's outputs depend on that batch alone, and no per-block torch.cat is needed.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_BATCH_SIZE = 8


@dataclass
class BlockCall:
    """How the model calls one block, minus the hidden states."""
    args: tuple
    kwargs: dict


def batch_slices(n: int, batch_size: int) -> list[slice]:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """One block on a batch (hidden: (batch, seqlen, d); a 2-D tensor is one sample).
    The call's tensors were recorded with batch 1 and broadcast over the batch."""
    out = block(hidden if hidden.dim() == 3 else hidden[None], *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


class LinearTap:
    """Sees the input of each watched linear layer, batch by batch."""

    def __init__(self, linears: dict[str, nn.Module]):
        self.linears = linears

    def new_batch(self) -> None:
        """Called before each batch goes through the block."""

    def observe(self, name: str, x: torch.Tensor) -> None:
        raise NotImplementedError

    def finished(self) -> bool:
        """True once this batch has shown the tap every input it needs; a walk that
        keeps no outputs then stops the batch there (e.g. before down_proj runs)."""
        return False


class _BatchDone(Exception):
    pass


@contextmanager
def tapped(taps: list[LinearTap], stop_when_finished: bool = False):
    def hook(tap, name, x):
        tap.observe(name, x)
        if stop_when_finished and all(t.finished() for t in taps):
            raise _BatchDone

    handles = [module.register_forward_pre_hook(lambda mod, args, t=tap, n=name: hook(t, n, args[0]))
               for tap in taps for name, module in tap.linears.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def walk_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall, *, batch_size: int,
               taps: list[LinearTap] = (), write_back: bool = False) -> None:
    """Run `block` over all samples of `hidden` (N, seqlen, d) in batches, with `taps`
    watching. With `write_back`, each batch's outputs replace its inputs in `hidden`;
    without, a batch stops as soon as every tap has what it needs."""
    taps = list(taps)
    with tapped(taps, stop_when_finished=bool(taps) and not write_back):
        for rows in batch_slices(hidden.shape[0], batch_size):
            for tap in taps:
                tap.new_batch()
            try:
                out = run_block(block, hidden[rows], call)
            except _BatchDone:
                continue
            if write_back:
                hidden[rows] = out


def propagate(block: nn.Module, hidden: torch.Tensor, call: BlockCall, *,
              batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """The block's outputs for every sample, as a new tensor (`hidden` is left as is)."""
    out = hidden.clone()
    walk_block(block, out, call, batch_size=batch_size, write_back=True)
    return out

"""Fitting a pruned block's kept weights to the dense block's outputs (prune.finetune).

Layer-wise pruning minimises each layer's own output error; the errors of a block's
layers then add up through attention, the MLP and the residual stream. A few
optimiser steps on the whole block, with the dense block's outputs on the same
calibration inputs as the target, win back part of that (the block-level step of
Wanda++ and similar methods).

The masks stay fixed: the kept set of every linear is what the pruning chose, the
gradients of pruned weights are zeroed before each step and the masks re-applied
after it, so the block's sparsity (and any N:M pattern) is exactly the pruned one.
Only the prunable linear weights move; norms, embeddings and biases do not.

Each step is one full-batch gradient (summed over batches of `batch_size` samples)
and one Adam update. The optimisation runs in float32 whatever the model's dtype
(Adam in fp16 loses updates below the weights' resolution), and the block is cast
back afterwards.
"""
from __future__ import annotations

import torch
from torch import nn

from .walk import BlockCall, batch_slices, run_block


def _cast_floats(value, dtype: torch.dtype):
    """The call's floating tensors (RoPE tables, additive masks) in `dtype`, recursively."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def block_output_error(block: nn.Module, hidden: torch.Tensor, call: BlockCall, targets: torch.Tensor, *,
                       batch_size: int) -> float:
    """Mean squared error of the block's outputs against `targets`, over every sample."""
    total = 0.0
    with torch.no_grad():
        for rows in batch_slices(hidden.shape[0], batch_size):
            out = run_block(block, hidden[rows], call)
            total += float(((out.float() - targets[rows].float()) ** 2).sum())
    return total / targets.numel()


def finetune_block(block: nn.Module, linears: dict[str, nn.Module], hidden: torch.Tensor, call: BlockCall,
                   targets: torch.Tensor, *, steps: int, lr: float, batch_size: int) -> None:
    """Adam on the kept weights of `linears` (the block's pruned linear layers, masks =
    their nonzero weights now), minimising the mean squared error between the block's
    outputs on `hidden` and `targets` (the dense block's outputs on `hidden`). In place."""
    dtypes = {id(t): t.dtype for t in (*block.parameters(), *block.buffers())}
    trainable = {id(linear.weight) for linear in linears.values()}
    frozen = [p for p in block.parameters() if id(p) not in trainable]
    was_trainable = {id(p): p.requires_grad for p in block.parameters()}
    block.float()  # in place: the parameter objects stay the same
    weights = [linear.weight for linear in linears.values()]
    masks = [w.detach() != 0 for w in weights]
    call32 = BlockCall(_cast_floats(call.args, torch.float32), _cast_floats(call.kwargs, torch.float32))
    for p in frozen:
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=lr)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                for rows in batch_slices(hidden.shape[0], batch_size):
                    out = run_block(block, hidden[rows].float(), call32)
                    diff = out - targets[rows].float()
                    # Summed over batches, this is the mean over all samples.
                    ((diff * diff).sum() / targets.numel()).backward()
                for w, mask in zip(weights, masks):
                    w.grad.mul_(mask)
                optimizer.step()
                with torch.no_grad():
                    for w, mask in zip(weights, masks):
                        w.mul_(mask)
    finally:
        for p in block.parameters():
            p.grad = None
            p.requires_grad_(was_trainable[id(p)])
        for t in (*block.parameters(), *block.buffers()):
            t.data = t.data.to(dtypes[id(t)])

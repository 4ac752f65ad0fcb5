"""Mask selection: which weights to keep, given a score per weight.

All functions take a score matrix of shape (d_out, d_in) (higher = more important)
and return a bool mask of the same shape, True = kept. Counts are exact: ties are
broken by index order on the device, never by a threshold that could keep too many.
`path` chooses how the threshold is found ("kthvalue", "sort", or "auto" by device);
both paths give the same mask.
"""
from __future__ import annotations

import torch

from .settings import parse_pattern  # noqa: F401 (one parser of N:M patterns, re-exported)


SELECT_PATHS = ("auto", "kthvalue", "sort")


def resolve_select_path(path: str, device: torch.device) -> str:
    """'auto' picks what is fast where the scores live: an O(n) kthvalue on the CPU,
    a sort on CUDA (CUDA's kthvalue took ~120 ms on a 16M-entry layer, measured)."""
    if path not in SELECT_PATHS:
        raise ValueError(f"select_path: expected one of {', '.join(SELECT_PATHS)}, got {path!r}")
    if path == "auto":
        return "kthvalue" if torch.device(device).type == "cpu" else "sort"
    return path


def _keep_lowest_out(scores: torch.Tensor, n_prune: int, path: str = "auto") -> torch.Tensor:
    """Keep-mask over the last dim of `scores` that prunes exactly the n_prune lowest
    of each row (a 1-D tensor is one row).

    The k-th lowest value is found by kthvalue or by a sort (`path`); entries equal
    to it are pruned in index order until the count is exact. Everything stays on
    the device: no nonzero, no .item(), so a CUDA caller never waits on the host.
    """
    width = scores.shape[-1]
    if n_prune <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if n_prune >= width:
        return torch.zeros_like(scores, dtype=torch.bool)
    if resolve_select_path(path, scores.device) == "kthvalue":
        threshold = torch.kthvalue(scores, n_prune, dim=-1, keepdim=True).values
    else:
        threshold = torch.sort(scores, dim=-1).values.narrow(-1, n_prune - 1, 1)
    below = scores < threshold
    ties = scores == threshold
    ties_to_prune = n_prune - below.sum(-1, keepdim=True, dtype=torch.int32)
    tie_rank = ties.cumsum(-1, dtype=torch.int32)  # 1 for the first tie of a row, 2 for the next...
    return ~(below | (ties & (tie_rank <= ties_to_prune)))


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "layer",
                      path: str = "auto") -> torch.Tensor:
    """Prune the lowest-scoring fraction `sparsity`, over the whole layer or per output row."""
    if group == "layer":
        n_prune = round(sparsity * scores.numel())
        return _keep_lowest_out(scores.reshape(-1), n_prune, path).view_as(scores)
    if group == "row":
        n_prune = round(sparsity * scores.shape[1])
        return _keep_lowest_out(scores, n_prune, path)
    raise ValueError(f"group: expected 'layer' or 'row', got {group!r}")


def nm_mask(scores: torch.Tensor, n: int, m: int, path: str = "auto") -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive inputs of a row."""
    d_out, d_in = scores.shape
    grouped = scores.reshape(d_out, d_in // m, m)
    return _keep_lowest_out(grouped, m - n, path).view(d_out, d_in)


def gradual_nm_mask(scores: torch.Tensor, n: int, m: int, sparsity: float,
                    path: str = "auto") -> torch.Tensor:
    """An intermediate step towards an exact N:M pattern.

    The n best entries of every group are protected; among the others, the lowest
    ones are pruned layer-wide until a fraction `sparsity` (<= 1 - n/m) of all
    entries is pruned. At sparsity = 1 - n/m the result is exactly N:M.
    """
    protected = nm_mask(scores, n, m, path)
    n_prune = round(sparsity * scores.numel())
    unprotected_scores = scores.masked_fill(protected, float("inf"))
    return _keep_lowest_out(unprotected_scores.reshape(-1), n_prune, path).view_as(scores)


def select_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                group: str = "layer", path: str = "auto") -> torch.Tensor:
    """The final mask for a pattern: N:M groups when nm is given, else unstructured."""
    if nm is None:
        return unstructured_mask(scores, sparsity, group, path)
    return nm_mask(scores, *nm, path=path)


def find_nm_violation(weight: torch.Tensor, n: int, m: int) -> str | None:
    """None when every group of m consecutive inputs of every row has <= n nonzeros.

    Otherwise a message naming the first offending row and group (row-major order).
    "Nonzero" is numeric (x != 0), so -0.0 counts as pruned and NaN/inf as kept.
    """
    if weight.dim() != 2:
        return f"expected a 2-D weight, got shape {tuple(weight.shape)}"
    d_out, d_in = weight.shape
    if d_in % m:
        return f"input size {d_in} is not a multiple of M={m}"
    counts = (weight.detach().reshape(d_out, d_in // m, m) != 0).sum(-1)
    bad = (counts > n).nonzero()
    if bad.numel() == 0:
        return None
    row, group = (int(v) for v in bad[0])
    return (f"row {row}, group {group} (columns {group * m}..{group * m + m - 1}) has "
            f"{int(counts[row, group])} nonzeros, more than N={n}")


def is_nm_valid(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive inputs keeps at most n weights."""
    return find_nm_violation(mask, n, m) is None

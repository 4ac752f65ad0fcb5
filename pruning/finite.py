"""Refusing NaN and inf before they reach a solve.

A NaN or inf weight passes through magnitude and Wanda unnoticed (the result is a
NaN rel_error and non-finite logits), and makes Cholesky fail in ADMM and SparseGPT
with an error that names nothing. So weights, Grams and block activations are
checked first, and the error says where and what.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

# Rows checked at once: the check's bool temporary stays small for a big activation buffer.
_CHUNK_ROWS = 8


class NonFiniteError(ValueError):
    """A weight, Gram or activation holds NaN or inf."""


class FactorisationError(torch.linalg.LinAlgError):
    """A Cholesky factorisation failed; the message says where and what to change."""


def _is_finite(tensor: torch.Tensor) -> bool:
    if tensor.dim() == 0 or tensor.shape[0] <= _CHUNK_ROWS:
        return bool(torch.isfinite(tensor).all())
    flags = torch.stack([torch.isfinite(tensor[i:i + _CHUNK_ROWS]).all()
                         for i in range(0, tensor.shape[0], _CHUNK_ROWS)])
    return bool(flags.all())  # one device sync for the whole tensor


def describe_non_finite(tensor: torch.Tensor) -> str:
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    return f"{nan} NaN and {inf} inf of {tensor.numel()} values ({tensor.dtype})"


def require_finite(tensor: torch.Tensor, what: str, hint: str = "") -> None:
    """Raise NonFiniteError naming `what` (e.g. "weight of layer mlp.up_proj") when
    `tensor` holds NaN or inf. Counting them happens only on that path."""
    if not _is_finite(tensor):
        raise NonFiniteError(f"{what} holds {describe_non_finite(tensor)}" + (f"; {hint}" if hint else ""))


@contextmanager
def located(where: str):
    """Errors from a numerical step (a non-finite input, a failed Cholesky) get `where`
    (block and layer names) in front of their message. A bare LinAlgError becomes a
    FactorisationError (still a LinAlgError) that says what to change."""
    try:
        yield
    except (NonFiniteError, FactorisationError) as err:
        raise type(err)(f"{where}: {err}") from err
    except torch.linalg.LinAlgError as err:
        raise FactorisationError(
            f"{where}: Cholesky factorisation of the damped Gram failed ({err}); "
            f"raise the method's damping option, or check the calibration data") from err

"""Input validation and mask helpers shared by every op.

Every op takes ``q`` shaped ``[B, Tq, H, D]`` and ``k, v`` shaped ``[B, Tk, H, D]`` and boolean
padding masks ``[B, T]`` where ``True`` marks a real token. Problems raise ``ValueError`` naming the
argument and what was expected.
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, same_length: bool = False) -> None:
    """Check the ``[B, T, H, D]`` layout of ``q, k, v`` and that their sizes agree."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor shaped [B, T, H, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [B, T, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Tk, H, D], got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size B, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same number of heads H, got {q.shape[2]} and {k.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim D, got {q.shape[3]} and {k.shape[3]}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"sequence lengths must be at least 1, got Tq={q.shape[1]}, Tk={k.shape[1]}")
    if same_length and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"this op needs q and k of the same length, got Tq={q.shape[1]} and Tk={k.shape[1]}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_mask(mask: torch.Tensor | None, batch: int, length: int, name: str) -> torch.Tensor | None:
    """Validate a boolean padding mask ``[B, T]`` (True = real token); return it or ``None``."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a bool tensor shaped [B, T] = [{batch}, {length}], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must have dtype torch.bool (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must be shaped [B, T] = [{batch}, {length}], got {tuple(mask.shape)}")
    return mask


def check_landmarks(c: torch.Tensor, heads: int, dim: int, name: str) -> None:
    """Check a landmark tensor shaped ``[H, c, D]``."""
    if not isinstance(c, torch.Tensor) or c.dim() != 3 or c.shape[0] != heads or c.shape[2] != dim:
        shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
        raise ValueError(f"{name} must be shaped [H, c, D] = [{heads}, c, {dim}], got {shape}")
    if c.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one landmark (c >= 1), got c = {c.shape[1]}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: float32 for half types, the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def padded_rows_to_zero(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the rows of ``x`` (``[B, T, ...]``) where ``mask`` (``[B, T]``) is False, by selection (a
    NaN or inf in such a row gives 0, where multiplying by a zero mask would give NaN)."""
    if mask is None:
        return x
    keep = mask.view(mask.shape + (1,) * (x.dim() - 2))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def real_counts(mask: torch.Tensor | None, batch: int, length: int, dtype, device) -> torch.Tensor:
    """Number of real tokens per batch row, shaped ``[B]``."""
    if mask is None:
        return torch.full((batch,), float(length), dtype=dtype, device=device)
    return mask.sum(1).to(dtype)


def select_real_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_mask: torch.Tensor | None,
                     kv_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q``, ``k``, ``v`` with their padded rows set to zero by selection, at the entry of an op whose
    statistics sum over every row (AMLP): padded rows then add nothing, and a NaN or inf there reaches
    no statistic, no real output and no gradient."""
    return padded_rows_to_zero(q, q_mask), padded_rows_to_zero(k, kv_mask), padded_rows_to_zero(v, kv_mask)


def guard_padded(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` (``[B, T, ...]``) with its padded rows set to zero by selection when it holds a non-finite
    value (always on an accelerator); see :func:`guard_padded_rows`."""
    if mask is None:
        return x
    # On the CPU a selection costs several passes over the tensor while a sum costs one; a sum is
    # finite only when every element is (NaN and inf propagate; an overflow errs towards selecting).
    # On an accelerator the selection is cheap and a test would wait for the device: select always.
    # (Under torch.compile the selection is fused and the test would break the graph: select always.)
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and bool(torch.isfinite(x.detach().sum())):
        return x
    return padded_rows_to_zero(x, mask)


def guard_padded_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_mask: torch.Tensor | None,
                      kv_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At the entry of an op that masks padded rows out itself (their finite values reach no real output
    and no real gradient): ``q``, ``k``, ``v`` with padded rows set to zero by selection when a tensor
    holds a non-finite value, so that a NaN or inf there (uninitialised memory, say) cannot reach a real
    output through a zero weight (0 x NaN is NaN). A tensor with only finite values is returned as it
    is on the CPU, where the selection would cost more than the test."""
    return guard_padded(q, q_mask), guard_padded(k, kv_mask), guard_padded(v, kv_mask)

r"""Cross-covariance attention, XCA (Ali et al. 2021, "XCiT: Cross-Covariance Image Transformers",
section 3, the XC-Attention definition).

Attention runs between the D feature channels of a head instead of between the T tokens:

    Q^ = Q / ||Q||_col,  K^ = K / ||K||_col          (each column L2-normalised over the sequence)
    A  = softmax(tau * K^T^ Q^)                       (D x D, normalised over the key channels)
    out = V A                                         (T x D; O(T D^2) time, linear in T)

``tau`` is a learned temperature per head, a multiplier (the paper writes ``softmax(K^T^ Q^ / tau)``;
learning ``1 / tau`` is the same family). In index form, ``out[t, i] = sum_j v[t, j] A[j, i]`` with
``A[:, i] = softmax_j(tau * q^_i . k^_j)``: column i of the output mixes the value channels by the
similarity of query channel i to each key channel (XCiT's ``softmax(q k^T) v`` in its transposed
``[D, T]`` layout).

XCA needs queries and keys on one sequence (self-attention) and has no causal form: the column
norms and the covariance sum over the whole sequence.

Padding: padded rows of q and k are zeroed before the normalisation, so the norms and the
covariance are over real tokens only; outputs at padded positions are zero.
"""

from __future__ import annotations

import torch

from ._checks import check_mask, check_qkv, compute_dtype, padded_rows_to_zero
from ._sequence_passes import masked_gram, masked_sumsq

DEFAULT_EPS = 1e-12


def _check_temperature(temperature, heads):
    if not isinstance(temperature, torch.Tensor) or tuple(temperature.shape) != (heads,):
        shape = tuple(temperature.shape) if isinstance(temperature, torch.Tensor) else type(temperature).__name__
        raise ValueError(f"temperature must be shaped [H] = [{heads}], got {shape}")


def cross_covariance_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    temperature: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """XCA on ``[B, T, H, D]`` tensors (self-attention: Tq == Tk).

    Args:
        q, k, v: ``[B, T, H, D]``.
        temperature: tau, ``[H]``.
        q_mask, kv_mask: boolean ``[B, T]``, True = real token.
        eps: floor of the column norms (as :func:`torch.nn.functional.normalize`).

    Returns ``[B, T, H, D]`` in the dtype of ``q``.
    """
    check_qkv(q, k, v, same_length=True)
    B, T, H, D = q.shape
    check_mask(q_mask, B, T, "q_mask")
    check_mask(kv_mask, B, T, "kv_mask")
    _check_temperature(temperature, H)
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    # Q^T K over real rows, then divide by the column norms: no normalised copy of q or k is made
    gram = masked_gram(q, k, None if q_mask is None and kv_mask is None else _both(q_mask, kv_mask))
    q_norm = masked_sumsq(q, q_mask).clamp_min(eps * eps).sqrt()  # [B, H, D]
    k_norm = masked_sumsq(k, kv_mask).clamp_min(eps * eps).sqrt()
    logits = gram / (q_norm.unsqueeze(-1) * k_norm.unsqueeze(-2)) * temperature.to(cdt).view(1, H, 1, 1)
    attn = torch.softmax(logits, dim=-1)  # [B, H, D_query, D_key]
    out = torch.einsum("bthj,bhij->bthi", padded_rows_to_zero(v, kv_mask), attn)
    out = padded_rows_to_zero(out, q_mask)
    return out.to(out_dtype)


def _both(q_mask, kv_mask):
    if q_mask is None:
        return kv_mask
    if kv_mask is None:
        return q_mask
    return q_mask & kv_mask


def cross_covariance_attention_reference(q, k, v, temperature, *, q_mask=None, kv_mask=None, eps=DEFAULT_EPS):
    """Reference XCA, one batch row and head at a time, written as in XCiT's ``[D, T]`` layout:
    ``softmax(tau * q^ k^T) v`` on the transposed, zero-padded, column-normalised tensors."""
    B, T, H, D = q.shape
    out = torch.zeros_like(q)
    qz = q if q_mask is None else q * q_mask[:, :, None, None].to(q.dtype)
    kz = k if kv_mask is None else k * kv_mask[:, :, None, None].to(k.dtype)
    vz = v if kv_mask is None else v * kv_mask[:, :, None, None].to(v.dtype)
    for b in range(B):
        for h in range(H):
            qt = torch.nn.functional.normalize(qz[b, :, h].T, dim=-1, eps=eps)  # [D, T]
            kt = torch.nn.functional.normalize(kz[b, :, h].T, dim=-1, eps=eps)
            attn = torch.softmax(temperature[h] * (qt @ kt.T), dim=-1)  # [D, D]
            out[b, :, h] = (attn @ vz[b, :, h].T).T
    if q_mask is not None:
        out = out * q_mask[:, :, None, None].to(out.dtype)
    return out

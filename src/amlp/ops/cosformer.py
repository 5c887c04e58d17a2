r"""cosFormer attention (Qin et al. 2022, "cosFormer: Rethinking Softmax in Attention", ICLR 2022,
eqs. 9-11): a ReLU kernel re-weighted by a cosine of the distance between positions.

    s(q_i, k_j) = relu(q_i) . relu(k_j) * cos(pi/2 * (i - j) / M)                       (eq. 9)
    out_i       = sum_j s(q_i, k_j) v_j / max(sum_j s(q_i, k_j), eps)

Since cos(a - b) = cos a cos b + sin a sin b, the score splits into two linear-attention terms
(eqs. 10-11) with ``q^cos_i = relu(q_i) cos(pi i / 2M)``, ``q^sin_i = relu(q_i) sin(pi i / 2M)`` and
the same for keys:

    out_i = [q^cos_i sum_j k^cos_j v_j^T + q^sin_i sum_j k^sin_j v_j^T]
            / max(q^cos_i sum_j k^cos_j + q^sin_i sum_j k^sin_j, eps)

so time and memory are linear in the length. The causal form uses prefix sums over ``j <= i``,
computed in chunks (:mod:`amlp.ops._causal_linear`).

Positions and the horizon M
---------------------------
Positions are 1-based ranks among the real tokens of each side (``cumsum`` of the mask), so
padding anywhere leaves the real tokens' positions unchanged. ``M``:

* non-causal, ``max_length=None``: per batch row, ``M = max(n_q, n_k)``, the larger number of real
  tokens of the two sides (for self-attention, the sequence length; for cross-attention each side
  keeps its own positions, as in the paper's code);
* ``max_length=L`` (required for the causal form): a fixed horizon ``M = L``. A causal query can
  not know the final length, so a fixed horizon is what makes the prefix-sum form, the recurrent
  step and the parallel form agree. Positions beyond ``L`` are refused.

In the causal form queries are end-aligned to the keys (query i sits at key position
``i + Tk - Tq``, as in :func:`amlp.ops.softmax.causal_mask`), and that is also its position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._causal_linear import DEFAULT_CHUNK, causal_linear_attention
from ._checks import check_mask, check_qkv, compute_dtype, guard_padded_rows, padded_rows_to_zero
from ._sequence_passes import masked_gram

DEFAULT_EPS = 1e-6


def positions(mask: torch.Tensor | None, batch: int, length: int, device, dtype) -> torch.Tensor:
    """1-based position of every token among the real tokens of its row, ``[B, T]``."""
    if mask is None:
        return torch.arange(1, length + 1, device=device, dtype=dtype).expand(batch, length)
    return mask.long().cumsum(1).to(dtype)


def reweighting_angles(pos: torch.Tensor, horizon: torch.Tensor) -> torch.Tensor:
    """``pi/2 * i / M`` for positions ``[B, T]`` and horizons ``[B]``."""
    return (math.pi / 2) * pos / horizon.unsqueeze(1)


def _horizon(q_mask, kv_mask, B, Tq, Tk, max_length, device, dtype):
    if max_length is not None:
        return torch.full((B,), float(max_length), device=device, dtype=dtype)
    n_q = torch.full((B,), Tq, device=device) if q_mask is None else q_mask.sum(1)
    n_k = torch.full((B,), Tk, device=device) if kv_mask is None else kv_mask.sum(1)
    return torch.maximum(n_q, n_k).clamp_min(1).to(dtype)


def _check_options(B, Tq, Tk, causal, max_length, eps):
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be an int >= 1 or None, got {max_length!r}")
    if causal:
        if max_length is None:
            raise ValueError("the causal cosFormer needs a fixed horizon: pass max_length (an int >= 1)")
        if Tq > Tk:
            raise ValueError(f"causal attention needs Tq <= Tk (queries end-aligned to keys), got Tq={Tq}, Tk={Tk}")
    if max_length is not None and max(Tq, Tk) > max_length:
        raise ValueError(f"cosFormer positions go up to max_length={max_length}, got Tq={Tq}, Tk={Tk}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")


def _query_positions(q_mask, B, Tq, Tk, causal, device, dtype):
    pos = positions(q_mask, B, Tq, device, dtype)
    return pos + (Tk - Tq) if causal else pos


def cosformer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    causal: bool = False,
    max_length: int | None = None,
    eps: float = DEFAULT_EPS,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """cosFormer attention (module docstring) on ``[B, T, H, D]`` tensors.

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, H, D]``.
        q_mask, kv_mask: boolean ``[B, Tq]`` / ``[B, Tk]``, True = real token.
        causal: prefix-sum form, query i sees keys ``j <= i + Tk - Tq``; needs ``max_length``.
        max_length: fixed re-weighting horizon M (None: per-row ``max(n_q, n_k)``, non-causal only).
        eps: floor of the denominator.
        chunk: chunk length of the causal form (prefix sums across chunks, explicit products inside).

    Returns ``[B, Tq, H, D]`` in the dtype of ``q``; zero at padded queries and in rows without keys.
    """
    check_qkv(q, k, v)
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    check_mask(q_mask, B, Tq, "q_mask")
    check_mask(kv_mask, B, Tk, "kv_mask")
    q, k, v = guard_padded_rows(q, k, v, q_mask, kv_mask)
    _check_options(B, Tq, Tk, causal, max_length, eps)
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)

    horizon = _horizon(q_mask, kv_mask, B, Tq, Tk, max_length, q.device, cdt)
    ang_q = reweighting_angles(_query_positions(q_mask, B, Tq, Tk, causal, q.device, cdt), horizon)[..., None, None]
    ang_k = reweighting_angles(positions(kv_mask, B, Tk, q.device, cdt), horizon)[..., None, None]
    rq, rk = F.relu(q), padded_rows_to_zero(F.relu(k), kv_mask)
    q_cos, q_sin = rq * torch.cos(ang_q), rq * torch.sin(ang_q)
    k_cos, k_sin = rk * torch.cos(ang_k), rk * torch.sin(ang_k)
    if causal:  # [q_cos, q_sin] . [k_cos, k_sin] is the cos-re-weighted score: one 2D-feature map
        num, den = causal_linear_attention(torch.cat([q_cos, q_sin], -1), torch.cat([k_cos, k_sin], -1), v, chunk)
    else:
        kv_cos, kv_sin = masked_gram(k_cos, v, None), masked_gram(k_sin, v, None)  # [B, H, D, D]
        z_cos, z_sin = k_cos.sum(1), k_sin.sum(1)  # [B, H, D]
        num = torch.einsum("bthd,bhde->bthe", q_cos, kv_cos) + torch.einsum("bthd,bhde->bthe", q_sin, kv_sin)
        den = torch.einsum("bthd,bhd->bth", q_cos, z_cos) + torch.einsum("bthd,bhd->bth", q_sin, z_sin)
    out = num / den.clamp_min(eps).unsqueeze(-1)
    return padded_rows_to_zero(out, q_mask).to(out_dtype)


def cosformer_attention_reference(q, k, v, *, q_mask=None, kv_mask=None, causal=False, max_length=None,
                                  eps=DEFAULT_EPS):
    """Dense reference of eq. 9: the full score matrix ``relu(Q) relu(K)^T * cos(pi/2 (i - j)/M)``
    masked by padding and causality, divided by its clamped row sums. Same contract as
    :func:`cosformer_attention`."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    _check_options(B, Tq, Tk, causal, max_length, eps)
    out = torch.zeros_like(q)
    for b in range(B):
        qi = torch.arange(Tq) if q_mask is None else torch.nonzero(q_mask[b]).flatten()
        kj = torch.arange(Tk) if kv_mask is None else torch.nonzero(kv_mask[b]).flatten()
        if len(kj) == 0:
            continue
        M = float(max_length) if max_length is not None else float(max(len(qi), len(kj)))
        pos_q = torch.arange(1, len(qi) + 1, dtype=q.dtype) + (Tk - Tq if causal else 0)
        pos_k = torch.arange(1, len(kj) + 1, dtype=q.dtype)
        reweight = torch.cos(math.pi / 2 * (pos_q[:, None] - pos_k[None, :]) / M)
        for h in range(H):
            Q, K, V = torch.relu(q[b, qi, h]), torch.relu(k[b, kj, h]), v[b, kj, h]
            scores = (Q @ K.T) * reweight
            if causal:
                scores = scores * (kj[None, :] <= qi[:, None] + Tk - Tq).to(scores.dtype)
            out[b, qi, h] = (scores @ V) / scores.sum(-1, keepdim=True).clamp_min(eps)
    return out

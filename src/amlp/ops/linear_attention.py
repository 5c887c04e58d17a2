r"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention", ICML 2020).

The softmax similarity is replaced by a kernel ``phi(q) . phi(k)`` with the positive feature map

    phi(x) = elu(x) + 1

so that, by associativity, the sums over keys factor out of the sum over queries:

    out_i = phi(q_i)^T sum_j phi(k_j) v_j^T  /  phi(q_i)^T sum_j phi(k_j)

and time and memory are linear in the length: ``S = sum_j phi(k_j) v_j^T`` is ``D x D`` and
``z = sum_j phi(k_j)`` is ``D`` per (batch, head). The causal form replaces both sums by
prefix sums over ``j <= i``: in training they are computed in chunks
(:mod:`amlp.ops._causal_linear`), and in decoding the state ``(S, z)`` is updated one token at a time
(``S_i = S_{i-1} + phi(k_i) v_i^T``, ``z_i = z_{i-1} + phi(k_i)``; the layer's ``step``): the
paper's view of the causal transformer as an RNN.

Cross attention takes queries from one sequence and keys and values from another, of any length
(``Tq != Tk``). In the causal form queries are end-aligned to the keys (query i sits at key position
``i + Tk - Tq``, as in :func:`amlp.ops.softmax.causal_mask`).

Padding and the denominator
---------------------------
Padded queries, keys and values are replaced by zeros *by selection* before anything is computed
from them, and padded keys are given zero features (``phi(0) = 1`` would otherwise count them), so
whatever a padded position holds (NaN and inf included) reaches no real output and no gradient of a
real position. Padded query rows output zero.

The denominator ``den_i = phi(q_i)^T sum_j phi(k_j)`` is floored at ``eps`` (default
``DEFAULT_EPS = 1e-6``, in the compute dtype: float32 for half-precision inputs):

    out_i = num_i / max(den_i, eps)

Since ``phi > 0``, ``den_i`` is a sum of positive terms and in practice of the order of ``Tk``, far
above ``eps``, where the floor changes nothing. It acts only (a) on a query with no real key (every
key padded, or in the causal form none visible yet), where ``num_i = den_i = 0`` and the output is
exactly zero instead of 0/0, and (b) when the features are vanishingly small (the components of
``q_i``, or of every ``k_j``, far below zero, where ``phi(x) = exp(x)``), where the output shrinks
toward zero instead of dividing by a vanishing number. Below the floor the output's gradient with
respect to ``den_i`` is zero, so the gradient of the division never exceeds ``|num_i| / eps^2``.
The reference and the recurrent step apply the same floor, so all three agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._causal_linear import DEFAULT_CHUNK, causal_linear_attention
from ._checks import check_mask, check_qkv, compute_dtype, padded_rows_to_zero

#: floor of the denominator ``phi(q_i)^T sum_j phi(k_j)`` (module docstring)
DEFAULT_EPS = 1e-6


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = elu(x) + 1`` element-wise: ``x + 1`` for ``x > 0``, ``exp(x)`` otherwise (always > 0)."""
    return F.elu(x) + 1.0


def _check_options(Tq: int, Tk: int, causal: bool, eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a number > 0, got {eps!r}")
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk (queries end-aligned to keys), got Tq={Tq}, Tk={Tk}")


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    causal: bool = False,
    eps: float = DEFAULT_EPS,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Linear attention with ``phi(x) = elu(x) + 1`` (module docstring) on ``[B, T, H, D]`` tensors.

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, H, D]`` (``Tq`` and ``Tk`` may differ).
        q_mask, kv_mask: boolean ``[B, Tq]`` / ``[B, Tk]``, True = real token.
        causal: prefix-sum form, query i sees keys ``j <= i + Tk - Tq``; needs ``Tq <= Tk``.
        eps: floor of the denominator ``phi(q_i)^T sum_j phi(k_j)`` (module docstring).
        chunk: chunk length of the causal form (prefix sums across chunks, explicit products inside).

    Returns ``[B, Tq, H, D]`` in the dtype of ``q``; zero at padded queries and for queries without
    a real key.
    """
    check_qkv(q, k, v)
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    check_mask(q_mask, B, Tq, "q_mask")
    check_mask(kv_mask, B, Tk, "kv_mask")
    _check_options(Tq, Tk, causal, eps)
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    # padding is selected out first: no value of a padded position enters any product
    q = padded_rows_to_zero(q.to(cdt), q_mask)
    k = padded_rows_to_zero(k.to(cdt), kv_mask)
    v = padded_rows_to_zero(v.to(cdt), kv_mask)

    phi_q = elu_feature_map(q)  # [B, Tq, H, D]
    phi_k = padded_rows_to_zero(elu_feature_map(k), kv_mask)  # [B, Tk, H, D], zero at padded keys
    if causal:
        num, den = causal_linear_attention(phi_q, phi_k, v, chunk)
    else:
        kv = torch.einsum("bthd,bthe->bhde", phi_k, v)  # S = sum_j phi(k_j) v_j^T
        z = phi_k.sum(1)  # z = sum_j phi(k_j), [B, H, D]
        num = torch.einsum("bthd,bhde->bthe", phi_q, kv)
        den = torch.einsum("bthd,bhd->bth", phi_q, z)
    out = num / den.clamp_min(eps).unsqueeze(-1)
    return padded_rows_to_zero(out, q_mask).to(out_dtype)


def linear_attention_reference(q, k, v, *, q_mask=None, kv_mask=None, causal=False, eps=DEFAULT_EPS):
    """Plain reference: per batch row and head, the explicit ``n_q x n_k`` kernel matrix
    ``phi(Q) phi(K)^T`` over the real tokens only (selected by index), causal entries kept where
    ``j <= i + Tk - Tq``, then ``weights @ V / max(row sum, eps)``. Same contract as
    :func:`linear_attention`."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    _check_options(Tq, Tk, causal, eps)
    out = torch.zeros_like(q)
    for b in range(B):
        qi = torch.arange(Tq) if q_mask is None else torch.nonzero(q_mask[b].cpu()).flatten()
        kj = torch.arange(Tk) if kv_mask is None else torch.nonzero(kv_mask[b].cpu()).flatten()
        if len(qi) == 0:
            continue
        for h in range(H):
            Q = F.elu(q[b, qi, h]) + 1.0
            K = F.elu(k[b, kj, h]) + 1.0
            scores = Q @ K.T  # [n_q, n_k]
            if causal:
                visible = kj[None, :] <= qi[:, None] + Tk - Tq
                scores = torch.where(visible.to(scores.device), scores, torch.zeros_like(scores))
            out[b, qi, h] = (scores @ v[b, kj, h]) / scores.sum(-1, keepdim=True).clamp_min(eps)
    return out

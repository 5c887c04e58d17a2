r"""Linear randomized attention, LARA (Zheng, Wang and Kong 2022, "Linear Complexity Randomized
Self-attention Mechanism", ICML 2022, sections 3-4).

What is implemented (the equations, as read from the paper; numbering follows the paper's
sections rather than equation numbers):

1. Randomized attention (section 3). With ``xi(x, w) = exp(w . x - |x|^2/2)`` (the positive
   randomized mapping, q and k scaled by ``D^(-1/4)``), softmax attention is an expectation

       SoftmaxAttn(q_n, K, V) = E_{p_n(w)}[ f_n(w) ],
       p_n(w) = sum_m pi_nm N(w; q_n + k_m, I) ∝ N(w; 0, I) xi(q_n, w) sum_m xi(k_m, w),
       f_n(w) = xi(q_n, w) sum_m xi(k_m, w) v_m^T / xi(q_n, w) sum_m xi(k_m, w),

   with ``pi_nm = softmax_m(q_n . k_m)``; the normaliser of ``p_n`` is quadratic to compute.

2. Multiple importance sampling (section 4.1): one sample ``w_c ~ q_c`` from each of ``C``
   proposals and the self-normalised estimator

       LARA(q_n) = sum_c a_nc(w_c) p_n(w_c)/q_c(w_c) f_n(w_c) / sum_c a_nc(w_c) p_n(w_c)/q_c(w_c),

   in which the normaliser of ``p_n`` cancels, leaving the linear-time form

       LARA(q_n) = sum_c a'_nc xi(q_n, w_c) beta_c / sum_c a'_nc xi(q_n, w_c) gamma_c,
       beta_c = sum_m xi(k_m, w_c) v_m,   gamma_c = sum_m xi(k_m, w_c),
       a'_nc = a_nc(w_c) N(w_c; 0, I) / q_c(w_c).

3. Proposals (section 4.2): ``q_c(w) = N(w; q~_c + k~_c, I)``, centred on the sum of the c-th
   segment means of the queries and keys (the landmarks; cut as in :mod:`amlp.ops._segments`).

4. Weighting functions (section 4.2), which must sum to one over ``c`` for every ``w``:

   * ``mis_weights="query"`` (default), query-dependent:
     ``a_nc(w) = q_c(w) / sum_c' q_c'(w) + r_nc - 1/C`` with ``r_nc = softmax_c(q_n . k~_c)``;
   * ``mis_weights="balance"``, the balance heuristic ``a_c(w) = q_c(w) / sum_c' q_c'(w)``.

   The query-dependent form is reconstructed from the paper's description (a balance-heuristic
   term plus a query-to-landmark relevance ``r_nc`` centred so the weights still sum to one); it is
   the one point where this implementation may differ in detail from the authors' code.

Simplifications: one sample per proposal (so ``C`` is both the number of landmarks and of random
samples), the scalar positive mapping ``xi`` above, and the Gaussian noise ``w_c - mu_c`` is an
input (``noise``, standard normal ``[H, C, D]``), so the op is deterministic; the layer draws it
from a seeded ``torch.Generator``. A row with ``n_q`` real queries and ``n_k`` real keys uses
``C = min(landmarks, n_q, n_k)`` proposals. Non-causal only (the landmarks summarise the whole
sequence).

Numerics: the exponents of ``a'_nc xi(q_n, w_c)`` are shifted by each query's (detached) max over
``c`` and those of ``xi(k_m, w_c)`` by one (detached) max per (batch, head) over real keys and
samples; both shifts cancel in the ratio. ``log N(w; 0, I) - log N(w; mu, I) = |mu|^2/2 - w . mu``.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_mask, check_qkv, compute_dtype, guard_padded_rows, padded_rows_to_zero
from ._segments import (
    landmark_counts,
    landmark_valid,
    masked_softmax,
    real_token_counts,
    segment_ids,
    segment_means,
    segment_means_reference,
)

MIS_WEIGHTS = ("query", "balance")


def _check_options(noise, mis_weights, H, D):
    if not isinstance(noise, torch.Tensor) or noise.dim() != 3 or noise.shape[0] != H or noise.shape[2] != D \
            or noise.shape[1] < 1:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be shaped [H, C, D] = [{H}, C, {D}] with C >= 1, got {shape}")
    if mis_weights not in MIS_WEIGHTS:
        raise ValueError(f"mis_weights must be one of {MIS_WEIGHTS}, got {mis_weights!r}")


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(den.dtype).tiny
    den = torch.where(den.abs() > tiny, den, torch.full_like(den, tiny))
    return num / den.unsqueeze(-1)


def lara_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    noise: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    mis_weights: str = "query",
) -> torch.Tensor:
    """LARA (module docstring) on ``[B, T, H, D]`` tensors (non-causal; self or cross).

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, H, D]``.
        noise: standard normal ``[H, C, D]``; sample ``c`` of a head is ``mu_c + noise[h, c]``. ``C``
            is the number of proposals (fewer are used when a row has fewer real tokens).
        q_mask, kv_mask: boolean ``[B, Tq]`` / ``[B, Tk]``, True = real token.
        mis_weights: ``"query"`` (query-dependent weights) or ``"balance"`` (balance heuristic).

    Returns ``[B, Tq, H, D]`` in the dtype of ``q``; zero at padded queries and in rows without keys.
    """
    check_qkv(q, k, v)
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    check_mask(q_mask, B, Tq, "q_mask")
    check_mask(kv_mask, B, Tk, "kv_mask")
    q, k, v = guard_padded_rows(q, k, v, q_mask, kv_mask)
    _check_options(noise, mis_weights, H, D)
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    s = D ** -0.25
    q, k, v = q.to(cdt) * s, k.to(cdt) * s, v.to(cdt)

    n_q = real_token_counts(q_mask, B, Tq, q.device)
    n_k = real_token_counts(kv_mask, B, Tk, q.device)
    c_row = landmark_counts([n_q, n_k], noise.shape[1])  # [B]
    width = min(noise.shape[1], Tq, Tk)
    q_land = segment_means(q, segment_ids(q_mask, c_row, B, Tq, q.device), width)  # [B, H, C, D]
    k_land = segment_means(k, segment_ids(kv_mask, c_row, B, Tk, q.device), width)
    valid = landmark_valid(c_row, width)[:, None, None, :]  # [B, 1, 1, C]
    mu = q_land + k_land  # proposal means
    omega = mu + noise[:, :width].to(cdt)  # one sample per proposal, [B, H, C, D]

    # MIS weights a_nc(w_c), [B, H, Tq, C]
    log_prop = -0.5 * (omega.unsqueeze(-2) - mu.unsqueeze(-3)).square().sum(-1)  # log q_c'(w_c) + const, [B,H,C,C']
    balance = torch.diagonal(masked_softmax(log_prop, valid), dim1=-2, dim2=-1)  # q_c(w_c) / sum_c' q_c'(w_c)
    alpha = balance.unsqueeze(-2).expand(B, H, Tq, width)
    if mis_weights == "query":
        qh = q.transpose(1, 2)  # [B, H, Tq, D]
        relevance = masked_softmax(qh @ k_land.transpose(-1, -2), valid)  # r_nc
        alpha = alpha + relevance - 1.0 / c_row.clamp_min(1).to(cdt)[:, None, None, None]

    # a'_nc xi(q_n, w_c) = a_nc exp(|mu_c|^2/2 - w_c.mu_c + w_c.q_n - |q_n|^2/2), shifted per query
    log_ratio = 0.5 * mu.square().sum(-1) - (omega * mu).sum(-1)  # [B, H, C]
    log_q = torch.einsum("bthd,bhcd->bhtc", q, omega) - 0.5 * q.square().sum(-1).transpose(1, 2).unsqueeze(-1)
    log_w = (log_q + log_ratio.unsqueeze(-2)).masked_fill(~valid, float("-inf"))
    shift = log_w.amax(-1, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = alpha * torch.exp(log_w - shift)  # [B, H, Tq, C]

    # xi(k_m, w_c) with one shift per (batch, head)
    log_k = torch.einsum("bthd,bhcd->bhtc", k, omega) - 0.5 * k.square().sum(-1).transpose(1, 2).unsqueeze(-1)
    allowed = valid if kv_mask is None else valid & kv_mask[:, None, :, None]
    log_k = log_k.masked_fill(~allowed, float("-inf"))
    shift_k = log_k.amax(dim=(-2, -1), keepdim=True).detach()
    shift_k = torch.where(torch.isfinite(shift_k), shift_k, torch.zeros_like(shift_k))
    xi_k = torch.exp(log_k - shift_k)  # [B, H, Tk, C], zero where not allowed
    beta = torch.einsum("bhtc,bthd->bhcd", xi_k, v)
    gamma = xi_k.sum(-2)  # [B, H, C]

    out = _safe_divide(weights @ beta, (weights * gamma.unsqueeze(-2)).sum(-1)).transpose(1, 2)
    return padded_rows_to_zero(out, q_mask).to(out_dtype)


def _gaussian(w: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Density of ``N(mean, I)`` at ``w`` (last dim is the dimension)."""
    d = w.shape[-1]
    return torch.exp(-0.5 * (w - mean).square().sum(-1)) / (2 * math.pi) ** (d / 2)


def lara_attention_reference(q, k, v, noise, *, q_mask=None, kv_mask=None, mis_weights="query"):
    """Reference LARA: per batch row and head, on the real tokens only, with explicit Gaussian
    densities, explicit MIS weights ``a_nc(w_c)`` and importance ratios ``N(w_c; 0, I) / q_c(w_c)``,
    no stabilising shifts. Same contract as :func:`lara_attention`."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    s = D ** -0.25
    out = torch.zeros_like(q)
    for b in range(B):
        qi = torch.arange(Tq) if q_mask is None else torch.nonzero(q_mask[b]).flatten()
        kj = torch.arange(Tk) if kv_mask is None else torch.nonzero(kv_mask[b]).flatten()
        C = min(noise.shape[1], len(qi), len(kj))
        if C == 0:
            continue
        for h in range(H):
            Q, K, V = q[b, qi, h] * s, k[b, kj, h] * s, v[b, kj, h]
            Q_land, K_land = segment_means_reference(Q, C), segment_means_reference(K, C)
            mu = Q_land + K_land
            omega = mu + noise[h, :C]
            num = torch.zeros(len(qi), D, dtype=q.dtype)
            den = torch.zeros(len(qi), dtype=q.dtype)
            relevance = torch.softmax(Q @ K_land.T, dim=-1)  # r_nc, [n, C]
            for c in range(C):
                proposal_densities = torch.stack([_gaussian(omega[c], mu[j]) for j in range(C)])
                alpha = proposal_densities[c] / proposal_densities.sum()
                if mis_weights == "query":
                    alpha = alpha + relevance[:, c] - 1.0 / C
                ratio = _gaussian(omega[c], torch.zeros(D, dtype=q.dtype)) / _gaussian(omega[c], mu[c])
                xi_q = torch.exp(Q @ omega[c] - 0.5 * (Q * Q).sum(-1))  # [n]
                xi_k = torch.exp(K @ omega[c] - 0.5 * (K * K).sum(-1))  # [m]
                weight = alpha * ratio * xi_q
                num = num + weight[:, None] * (xi_k @ V)[None, :]
                den = den + weight * xi_k.sum()
            out[b, qi, h] = num / den[:, None]
    return out

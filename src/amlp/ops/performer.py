r"""Performer attention with FAVOR+ positive orthogonal random features (Choromanski et al. 2021,
"Rethinking Attention with Performers", ICLR 2021, Lemma 1 and section 2.4).

The softmax kernel is an expectation over Gaussian ``w`` (Lemma 1, eq. 7 with h(x) = exp(-|x|^2/2)):

    exp(q . k) = E_w[ exp(w . q - |q|^2/2) exp(w . k - |k|^2/2) ],   w ~ N(0, I_D)

so with ``m`` draws ``w_1..w_m`` the positive random features

    phi(x)_i = exp(w_i . x - |x|^2 / 2) / sqrt(m)

give ``exp(q . k) ~= phi(q) . phi(k)`` and attention becomes linear in the length:

    out_i = phi(q_i)^T sum_j phi(k_j) v_j^T  /  phi(q_i)^T sum_j phi(k_j)

with ``q`` and ``k`` scaled by ``D^(-1/4)`` so the kernel approximates ``exp(q . k / sqrt(D))``.
The causal form replaces the sums by prefix sums over ``j <= i`` (section 2.6), computed in
chunks (:mod:`amlp.ops._causal_linear`) so memory stays linear in the length.

The ``w_i`` are orthogonal random features (section 2.4): blocks of ``D`` exactly orthogonal
directions (QR of a Gaussian matrix), their norms drawn independently from the chi distribution
with ``D`` degrees of freedom (the norm of a ``D``-dim standard Gaussian), so each ``w_i`` is still
marginally ``N(0, I_D)``. :func:`orthogonal_gaussian_features` draws them from a given
``torch.Generator``, so a seed fixes them.

Numerical stabilisation: a constant subtracted from the exponent of every feature of one query
cancels between numerator and denominator, and so does a constant shared by all keys of a (batch,
head) row. Queries subtract their own max over the ``m`` features; keys subtract one max over all
real keys and features of the row. Both stabilisers are detached (they cancel, so their gradient is
zero in exact arithmetic). The key stabiliser looks at every key, including later ones in the causal
form; the result is unchanged up to rounding, and the recurrent step keeps a running max instead,
rescaling its state when the max grows.
"""

from __future__ import annotations

import math

import torch

from ._causal_linear import DEFAULT_CHUNK, causal_linear_attention
from ._checks import check_mask, check_qkv, compute_dtype, guard_padded_rows, padded_rows_to_zero


def orthogonal_gaussian_features(num_features: int, dim: int, *, generator: torch.Generator | None = None,
                                 dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``[num_features, dim]`` block-orthogonal Gaussian directions with chi-distributed norms
    (Performer section 2.4), drawn on the CPU from ``generator`` (reproducible under its seed)."""
    if not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be an int >= 1, got {num_features!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an int >= 1, got {dim!r}")
    blocks = []
    remaining = num_features
    while remaining > 0:
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar-distributed orthogonal matrix
        blocks.append(q.T[: min(dim, remaining)])
        remaining -= dim
    directions = torch.cat(blocks, 0)
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (directions * norms.unsqueeze(1)).to(dtype=dtype, device=device)


def _check_features(features, H, D):
    ok = isinstance(features, torch.Tensor) and (
        (features.dim() == 2 and features.shape[1] == D) or (features.dim() == 3 and features.shape[0] == H
                                                             and features.shape[2] == D)
    )
    if not ok or features.shape[-2] < 1:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be shaped [m, D] = [m, {D}] or [H, m, D] = [{H}, m, {D}] with m >= 1, "
                         f"got {shape}")


def feature_logits(x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Exponents of the positive features before stabilisation: ``w_i . x' - |x'|^2/2`` with
    ``x' = x D^(-1/4)``; ``x`` ``[B, T, H, D]``, features ``[m, D]`` or ``[H, m, D]`` ->
    ``[B, T, H, m]``."""
    D = x.shape[-1]
    scale = D ** -0.25
    # the scale goes on the (small) features and on the squared norms, not on a copy of x
    w = (features if features.dim() == 3 else features.unsqueeze(0).expand(x.shape[2], -1, -1)) * scale
    half_sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() * (0.5 * scale * scale)
    # in place on the product's own output, which its backward does not need
    return torch.einsum("bthd,hmd->bthm", x, w).sub_(half_sq)


def query_features(logits: torch.Tensor) -> torch.Tensor:
    """``phi(q)`` from :func:`feature_logits`, stabilised by each query's own (detached) max."""
    m = logits.shape[-1]
    # 1/sqrt(m) folded into the exponent; exp in place on the difference (one [B, T, H, m] tensor)
    return (logits - (logits.amax(-1, keepdim=True).detach() + 0.5 * math.log(m))).exp_()


def key_features(logits: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
    """``phi(k)`` from :func:`feature_logits`, stabilised by one (detached) max per (batch, head)
    over the real keys and all features; padded keys give zero features."""
    m = logits.shape[-1]
    real = logits.detach() if kv_mask is None else logits.detach().masked_fill(~kv_mask[:, :, None, None],
                                                                                float("-inf"))
    stab = real.amax(dim=(1, 3), keepdim=True)
    stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))
    phi = (logits - (stab + 0.5 * math.log(m))).exp_()
    return padded_rows_to_zero(phi, kv_mask)


def performer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    features: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    causal: bool = False,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """FAVOR+ attention (module docstring) on ``[B, T, H, D]`` tensors.

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, H, D]``.
        features: random directions ``w``, ``[m, D]`` (shared by the heads) or ``[H, m, D]``, e.g.
            from :func:`orthogonal_gaussian_features`.
        q_mask, kv_mask: boolean ``[B, Tq]`` / ``[B, Tk]``, True = real token.
        causal: query i sees keys ``j <= i + Tk - Tq`` (end-aligned, as in softmax attention).
        chunk: chunk length of the causal form (prefix sums across chunks, explicit products inside).

    Returns ``[B, Tq, H, D]`` in the dtype of ``q``; zero at padded queries and in rows without keys.
    """
    check_qkv(q, k, v)
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    check_mask(q_mask, B, Tq, "q_mask")
    check_mask(kv_mask, B, Tk, "kv_mask")
    q, k, v = guard_padded_rows(q, k, v, q_mask, kv_mask)
    _check_features(features, H, D)
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk (queries end-aligned to keys), got Tq={Tq}, Tk={Tk}")
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    q, k, v, w = q.to(cdt), k.to(cdt), v.to(cdt), features.to(cdt)

    phi_q = query_features(feature_logits(q, w))  # [B, Tq, H, m]
    phi_k = key_features(feature_logits(k, w), kv_mask)  # [B, Tk, H, m]
    if causal:
        num, den = causal_linear_attention(phi_q, phi_k, v, chunk)
    else:
        kv = torch.einsum("bthm,bthd->bhmd", phi_k, v)
        z = phi_k.sum(1)  # [B, H, m]
        num = torch.einsum("bthm,bhmd->bthd", phi_q, kv)
        den = torch.einsum("bthm,bhm->bth", phi_q, z)
    out = num / den.clamp_min(torch.finfo(cdt).tiny).unsqueeze(-1)
    return padded_rows_to_zero(out, q_mask).to(out_dtype)


def performer_attention_reference(q, k, v, features, *, q_mask=None, kv_mask=None, causal=False):
    """Dense reference: unstabilised features ``phi(x)_i = exp(w_i . x' - |x'|^2/2)/sqrt(m)``, the
    explicit ``Tq x Tk`` kernel matrix ``phi(Q) phi(K)^T`` masked by padding and causality, then a
    row-normalised weighted sum. Same contract as :func:`performer_attention`."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    w = features if features.dim() == 3 else features.unsqueeze(0).expand(H, -1, -1)
    m = w.shape[1]
    qs, ks = q * D ** -0.25, k * D ** -0.25
    phi_q = torch.exp(torch.einsum("bihd,hmd->bhim", qs, w) - 0.5 * (qs * qs).sum(-1).transpose(1, 2)[..., None])
    phi_k = torch.exp(torch.einsum("bjhd,hmd->bhjm", ks, w) - 0.5 * (ks * ks).sum(-1).transpose(1, 2)[..., None])
    kernel = torch.einsum("bhim,bhjm->bhij", phi_q / math.sqrt(m), phi_k / math.sqrt(m))
    allowed = torch.ones(B, 1, Tq, Tk, dtype=torch.bool)
    if kv_mask is not None:
        allowed = allowed & kv_mask[:, None, None, :]
    if causal:
        i = torch.arange(Tq).unsqueeze(1)
        j = torch.arange(Tk).unsqueeze(0)
        allowed = allowed & (j <= i + Tk - Tq)
    kernel = kernel * allowed.to(kernel.dtype)
    den = kernel.sum(-1, keepdim=True)
    weights = torch.where(den > 0, kernel / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(kernel))
    out = torch.einsum("bhij,bjhd->bihd", weights, v)
    if q_mask is not None:
        out = out * q_mask[:, :, None, None].to(out.dtype)
    return out

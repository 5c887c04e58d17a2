r"""Nystromformer attention (Xiong et al. 2021, "Nystromformer: A Nystrom-Based Algorithm for
Approximating Self-Attention", AAAI 2021, eqs. 13-15 and section "Linearized self-attention").

With ``c`` landmarks ``Q~ = segment means of Q`` and ``K~ = segment means of K`` (eq. 14 uses
contiguous segments of ``n / c`` tokens), softmax attention is approximated by the Nystrom form

    F = softmax(Q K~^T / sqrt(D))      [Tq x c]
    A = softmax(Q~ K~^T / sqrt(D))     [c x c]
    B = softmax(Q~ K^T / sqrt(D))      [c x Tk]
    out = F A^+ B V                                                                   (eq. 15)

with the Moore-Penrose pseudo-inverse ``A^+`` from the iterative scheme of Razavi et al. (eq. 16),

    Z_0 = A^T / (||A||_1 ||A||_inf),
    Z_{j+1} = 1/4 Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j))),

run for 6 iterations by default. The norms are those of each (batch, head) matrix (the paper's
code takes the largest over the batch, which would tie a sequence's output to its batch
neighbours). Products are formed right to left (``B V`` first), so time and memory are linear in the
length. An optional depthwise convolution of V along the sequence is added as a skip
(self-attention only; the paper uses kernel 33).

Landmarks and padding
---------------------
A row with ``n_q`` real queries and ``n_k`` real keys uses ``c = min(landmarks, n_q, n_k)``
landmarks; each side's real tokens are cut into ``c`` contiguous segments with the sizes of
:func:`torch.tensor_split` (so the length need not be a multiple of ``c``), and padded tokens
belong to no segment. Padded keys are left out of the key-side softmaxes (``B``) and of the key
landmarks; padded queries of the query landmarks. Rows with fewer landmarks than the batch
maximum carry identity blocks in ``A`` for the missing landmarks (a block-diagonal matrix keeps
its blocks through the iteration, and ``F`` gives those landmarks zero weight), so a padded row
gives exactly the numbers of the row alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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

DEFAULT_LANDMARKS = 16
DEFAULT_PINV_ITERATIONS = 6


def iterative_pinv(a: torch.Tensor, iterations: int = DEFAULT_PINV_ITERATIONS) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of each matrix in ``a`` (``[..., c, c]``) by the iteration of
    eq. 16, started from ``A^T / (||A||_1 ||A||_inf)`` with the norms of each matrix."""
    abs_a = a.abs()
    norm_1 = abs_a.sum(-2).amax(-1)  # largest column sum
    norm_inf = abs_a.sum(-1).amax(-1)  # largest row sum
    z = a.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _check_options(landmarks, pinv_iterations, conv_weight, H, Tq, Tk):
    if not isinstance(landmarks, int) or landmarks < 1:
        raise ValueError(f"landmarks must be an int >= 1, got {landmarks!r}")
    if not isinstance(pinv_iterations, int) or pinv_iterations < 0:
        raise ValueError(f"pinv_iterations must be an int >= 0, got {pinv_iterations!r}")
    if conv_weight is not None:
        if not isinstance(conv_weight, torch.Tensor) or conv_weight.dim() != 2 or conv_weight.shape[0] != H \
                or conv_weight.shape[1] % 2 != 1:
            shape = tuple(conv_weight.shape) if isinstance(conv_weight, torch.Tensor) else type(conv_weight).__name__
            raise ValueError(f"conv_weight must be shaped [H, kernel] = [{H}, kernel] with an odd kernel, got {shape}")
        if Tq != Tk:
            raise ValueError(f"the convolution skip needs self-attention (Tq == Tk), got Tq={Tq}, Tk={Tk}")


def _depthwise_conv(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise convolution of ``v`` (``[B, T, H, D]``) along T, one kernel per head, zero padded."""
    B, T, H, D = v.shape
    kernel = weight.shape[1]
    x = v.permute(0, 2, 3, 1).reshape(B, H * D, T)
    w = weight.repeat_interleave(D, dim=0).unsqueeze(1)  # [H*D, 1, kernel]
    y = F.conv1d(x, w, padding=kernel // 2, groups=H * D)
    return y.reshape(B, H, D, T).permute(0, 3, 1, 2)


def nystrom_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    landmarks: int = DEFAULT_LANDMARKS,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    pinv_iterations: int = DEFAULT_PINV_ITERATIONS,
    conv_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Nystromformer attention (module docstring) on ``[B, T, H, D]`` tensors (non-causal).

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, H, D]`` (cross-attention: key landmarks come from k).
        landmarks: at most this many landmarks per row (fewer when a side has fewer real tokens).
        q_mask, kv_mask: boolean ``[B, Tq]`` / ``[B, Tk]``, True = real token.
        pinv_iterations: iterations of eq. 16.
        conv_weight: ``[H, kernel]`` (odd kernel) depthwise convolution of V added to the output;
            self-attention only. None: no skip.

    Returns ``[B, Tq, H, D]`` in the dtype of ``q``; zero at padded queries and in rows without keys.
    """
    check_qkv(q, k, v)
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    check_mask(q_mask, B, Tq, "q_mask")
    check_mask(kv_mask, B, Tk, "kv_mask")
    q, k, v = guard_padded_rows(q, k, v, q_mask, kv_mask)
    _check_options(landmarks, pinv_iterations, conv_weight, H, Tq, Tk)
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    scale = 1.0 / math.sqrt(D)

    n_q = real_token_counts(q_mask, B, Tq, q.device)
    n_k = real_token_counts(kv_mask, B, Tk, q.device)
    c_row = landmark_counts([n_q, n_k], landmarks)  # [B]
    width = min(landmarks, Tq, Tk)
    q_land = segment_means(q, segment_ids(q_mask, c_row, B, Tq, q.device), width)  # [B, H, c, D]
    k_land = segment_means(k, segment_ids(kv_mask, c_row, B, Tk, q.device), width)
    valid = landmark_valid(c_row, width)  # [B, c]

    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    kernel_f = masked_softmax(qh @ k_land.transpose(-1, -2) * scale, valid[:, None, None, :])  # [B, H, Tq, c]
    pair = valid[:, :, None] & valid[:, None, :]  # [B, c, c]
    kernel_a = masked_softmax(q_land @ k_land.transpose(-1, -2) * scale, pair[:, None])
    eye = torch.eye(width, dtype=cdt, device=q.device)
    kernel_a = torch.where(pair[:, None], kernel_a, eye)  # identity blocks for missing landmarks
    key_ok = torch.ones(B, Tk, dtype=torch.bool, device=q.device) if kv_mask is None else kv_mask
    kernel_b = masked_softmax(q_land @ kh.transpose(-1, -2) * scale, key_ok[:, None, None, :])  # [B, H, c, Tk]

    pinv_a = iterative_pinv(kernel_a, pinv_iterations)
    out = kernel_f @ (pinv_a @ (kernel_b @ vh))  # [B, H, Tq, D]
    out = out.transpose(1, 2)
    if conv_weight is not None:
        out = out + _depthwise_conv(padded_rows_to_zero(v, kv_mask), conv_weight.to(cdt))
    if kv_mask is not None:
        has_keys = kv_mask.any(1)
        out = padded_rows_to_zero(out, has_keys.unsqueeze(1).expand(B, Tq))
    return padded_rows_to_zero(out, q_mask).to(out_dtype)


def iterative_pinv_reference(a: torch.Tensor, iterations: int = DEFAULT_PINV_ITERATIONS) -> torch.Tensor:
    """Eq. 16 for one matrix, with the induced 1- and inf-norms from :func:`torch.linalg.matrix_norm`."""
    z = a.T / (torch.linalg.matrix_norm(a, ord=1) * torch.linalg.matrix_norm(a, ord=float("inf")))
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    for _ in range(iterations):
        z = 0.25 * z @ (13 * eye - a @ z @ (15 * eye - a @ z @ (7 * eye - a @ z)))
    return z


def nystrom_attention_reference(q, k, v, *, landmarks=DEFAULT_LANDMARKS, q_mask=None, kv_mask=None,
                                pinv_iterations=DEFAULT_PINV_ITERATIONS, conv_weight=None, pinv="iterative"):
    """Reference Nystromformer, one batch row and head at a time on the real tokens only.

    ``pinv="iterative"`` uses eq. 16 (the same numbers as :func:`nystrom_attention`);
    ``pinv="exact"`` uses :func:`torch.linalg.pinv` instead (the Nystrom approximation itself).
    """
    if pinv not in ("iterative", "exact"):
        raise ValueError(f"pinv must be 'iterative' or 'exact', got {pinv!r}")
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    scale = 1.0 / math.sqrt(D)
    out = torch.zeros_like(q)
    for b in range(B):
        qi = torch.arange(Tq) if q_mask is None else torch.nonzero(q_mask[b]).flatten()
        kj = torch.arange(Tk) if kv_mask is None else torch.nonzero(kv_mask[b]).flatten()
        c = min(landmarks, len(qi), len(kj))
        if c == 0:
            continue
        for h in range(H):
            Q, K, V = q[b, qi, h], k[b, kj, h], v[b, kj, h]
            Q_land, K_land = segment_means_reference(Q, c), segment_means_reference(K, c)
            kernel_f = torch.softmax(Q @ K_land.T * scale, -1)
            kernel_a = torch.softmax(Q_land @ K_land.T * scale, -1)
            kernel_b = torch.softmax(Q_land @ K.T * scale, -1)
            a_plus = (iterative_pinv_reference(kernel_a, pinv_iterations) if pinv == "iterative"
                      else torch.linalg.pinv(kernel_a))
            out[b, qi, h] = kernel_f @ a_plus @ kernel_b @ V
    if conv_weight is not None:
        vm = v if kv_mask is None else v * kv_mask[:, :, None, None].to(v.dtype)
        half = conv_weight.shape[1] // 2
        skip = torch.zeros_like(v)
        for t in range(Tk):
            for offset in range(-half, half + 1):
                if 0 <= t + offset < Tk:
                    skip[:, t] = skip[:, t] + conv_weight[:, offset + half].view(1, H, 1) * vm[:, t + offset]
        if kv_mask is not None:
            skip = skip * kv_mask.any(1).view(B, 1, 1, 1).to(v.dtype)
        out = out + skip
        if q_mask is not None:
            out = out * q_mask[:, :, None, None].to(out.dtype)
    return out

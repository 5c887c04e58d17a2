"""The passes over the sequence that linear-time mixers are made of, each with its hand-written
vector-Jacobian product (VJP).

Tensors over the sequence are ``[B, T, H, D]``; per-head summaries are small (``[B, H, c, D]``,
``[B, H, D, D]``). The VJPs *accumulate* into caller-owned gradient buffers, chunk by chunk along
T, so a backward pass that uses them allocates nothing of size T beyond the input gradients
themselves. This is what lets a fused autograd function (see :mod:`amlp.ops.amlp`) train with the
peak memory of a flash-style kernel.

Masks are ``[B, T]`` bool (True = real token) or None.
"""

from __future__ import annotations

import torch

from ._common import activate

#: size of one chunk of a [B, T, H, D] tensor in the chunked passes: small enough that the
#: temporaries of a backward pass stay far below one input gradient, large enough that the matrix
#: products stay efficient
CHUNK_BYTES = 256 * 1024
MIN_CHUNK_ROWS = 64
#: the most chunks a pass makes: past ``MAX_CHUNKS * CHUNK_BYTES`` the chunks grow with the sequence
#: instead, so the number of operator calls of a call stops growing with T. The temporaries of a chunk
#: grow with it, to about ``1 / MAX_CHUNKS`` of one input: at T = 8,192 (B 1, H 8, D 64) a training
#: step's peak was 1.02 times SDPA's with 32 chunks, 1.03-1.05 with 16 and 1.07-1.11 with 8.
MAX_CHUNKS = 32


def row_chunks(x: torch.Tensor):
    """Slices of the time axis of ``x`` (``[B, T, ...]``): about ``CHUNK_BYTES`` each, at most
    ``MAX_CHUNKS`` of them."""
    length = x.shape[1]
    row_bytes = max(1, x[:, :1].numel() * x.element_size())
    rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // row_bytes, -(-length // MAX_CHUNKS))
    return [slice(i, min(i + rows, length)) for i in range(0, length, rows)]


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """A contiguous ``[B, H, t, D]`` copy of a ``[B, t, H, D]`` slice: matrix products over heads run
    markedly faster on it than on the strided view."""
    return x.transpose(1, 2).contiguous()


def _select(x: torch.Tensor, mask: torch.Tensor | None, rows=slice(None)) -> torch.Tensor:
    """The rows ``rows`` of ``x`` (``[B, T, ...]``, or already sliced when ``x`` has ``len(rows)``
    rows) with padded rows set to zero by selection, never by multiplying with a zero mask."""
    if mask is None:
        return x
    keep = mask[:, rows].view(mask.shape[0], -1, *([1] * (x.dim() - 2)))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------------------------------------
# Gram matrices and column sums of squares


def gram(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``G[b, h] = sum_t m_t x_t^T y_t``: ``[B, T, H, D] x [B, T, H, E] -> [B, H, D, E]``."""
    return torch.einsum("bthd,bthe->bhde", _select(x, mask), _select(y, mask))


def sumsq(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-column sum of squares over real positions: ``[B, T, H, D] -> [B, H, D]``."""
    return _select(x, mask).square().sum(1)


def write(grad_buf: torch.Tensor, rows: slice, part: torch.Tensor, first: bool) -> None:
    """``grad_buf[:, rows] = part`` for the first contribution to a buffer, ``+=`` afterwards."""
    if first:
        grad_buf[:, rows] = part
    else:
        grad_buf[:, rows] += part


def add_linear_vjp(grad_buf: torch.Tensor, xs: tuple[torch.Tensor, ...], mats: tuple[torch.Tensor, ...],
                   mask: torch.Tensor | None, *, first: bool = False) -> None:
    """``grad_buf += m * sum_i xs[i] @ mats[i]`` per head (``xs[i]`` ``[B, T, H, D]``, ``mats[i]``
    ``[B, H, D, E]``), as one matrix product per chunk of rows.

    This is the VJP of Gram matrices: for ``G = X^T diag(m) Y``, ``dY += diag(m) X dG`` and
    ``dX += diag(m) Y dG^T``; for a symmetric use ``G = X^T X``, ``dX += diag(m) X (dG + dG^T)``.
    """
    mat = torch.cat(mats, dim=-2) if len(mats) > 1 else mats[0]
    for rows in row_chunks(xs[0]):
        x = torch.cat([heads_first(t[:, rows]) for t in xs], dim=-1) if len(xs) > 1 else heads_first(xs[0][:, rows])
        part = torch.matmul(x, mat).transpose(1, 2)  # [B, t, H, E]
        write(grad_buf, rows, _select(part, mask, rows), first)


def add_sumsq_vjp(grad_buf: torch.Tensor, x: torch.Tensor, grad_sumsq: torch.Tensor, mask: torch.Tensor | None) -> None:
    """VJP of :func:`sumsq`: ``grad_buf += 2 m x * dS`` (``dS`` is ``[B, H, D]``)."""
    scale = (2.0 * grad_sumsq).unsqueeze(1)  # [B, 1, H, D]
    for rows in row_chunks(x):
        grad_buf[:, rows].addcmul_(_select(x[:, rows], mask, rows), scale)


class _MaskedGram(torch.autograd.Function):
    """``G[b, h] = sum_t m[b, t] x[b, t, h]^T y[b, t, h]`` (``[B, H, D, D]``) from ``[B, T, H, D]`` inputs.

    Only the inputs are kept for backward (no masked or transposed copies), and the backward
    writes the input gradients chunk by chunk, which keeps the peak memory of a training step at
    the size of the inputs themselves.
    """

    @staticmethod
    def forward(ctx, x, y, mask):
        ctx.save_for_backward(x, y, mask)
        return gram(x, y, mask)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, y, mask = ctx.saved_tensors
        gx = gy = None
        if ctx.needs_input_grad[0]:
            gx = torch.empty_like(x)
            add_linear_vjp(gx, (y,), (grad.transpose(-1, -2),), mask, first=True)
        if ctx.needs_input_grad[1]:
            gy = torch.empty_like(y)
            add_linear_vjp(gy, (x,), (grad,), mask, first=True)
        return gx, gy, None


def masked_gram(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``X^T diag(m) Y`` per batch and head: ``[B, T, H, D] x [B, T, H, E] -> [B, H, D, E]``."""
    return _MaskedGram.apply(x, y, mask)


def masked_sumsq(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-column sum of squares over real positions: ``[B, T, H, D] -> [B, H, D]``."""
    return sumsq(x, mask)


# ---------------------------------------------------------------------------------------------
# Softmax pooling over positions: c pseudo-queries attend over the sequence


def open_empty_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A key mask in which rows with no real key are opened to every key, so that no softmax over
    positions meets an all-masked row (their outputs are zeroed by the caller)."""
    if mask is None:
        return None
    empty = ~mask.any(1, keepdim=True)
    return mask | empty


def pool_logits(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``scale * query keys^T`` with padded keys at -inf: ``[B, H, c, D] x [B, T, H, D] -> [B, H, c, T]``."""
    logits = torch.einsum("bhcd,bthd->bhct", query, keys) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    return logits


def pool(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax_t(scale * query keys_t^T) values``.

    ``query`` ``[B, H, c, D]``, ``keys, values`` ``[B, T, H, D]``, ``mask`` ``[B, T]`` (already
    passed through :func:`open_empty_rows`). Returns the pooled ``[B, H, c, D]`` and the
    log-normaliser ``[B, H, c]`` that the VJP needs.
    """
    logits = pool_logits(query, keys, mask, scale)
    top = logits.amax(-1, keepdim=True)  # finite: every row has a real key (open_empty_rows)
    probs = logits.sub_(top).exp_()  # one exponential per logit
    total = probs.sum(-1, keepdim=True)
    probs = probs.div_(total)
    return torch.einsum("bhct,bthd->bhcd", probs, values), (top + total.log()).squeeze(-1)


def pool_vjp(grad_out, out, lse, query, keys, values, mask, scale, grad_keys, grad_values, *, first=False):
    """VJP of :func:`pool`; accumulates into ``grad_keys`` and ``grad_values`` (either may be None,
    or the same buffer when keys and values are one tensor; ``first``: the buffers hold nothing
    yet) and returns the query gradient.

    Uses ``sum_t p_t (g . v_t) = g . out`` so each chunk of the sequence is handled on its own.
    """
    delta = (grad_out * out).sum(-1, keepdim=True)  # [B, H, c, 1]
    grad_query = torch.zeros_like(query)
    for rows in row_chunks(keys):
        k_c = heads_first(keys[:, rows])  # [B, H, t, D]
        v_c = k_c if values is keys else heads_first(values[:, rows])
        logits = torch.matmul(query, k_c.transpose(-1, -2)).mul_(scale)  # [B, H, c, t]
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, rows], float("-inf"))
        probs = torch.exp(logits.sub_(lse.unsqueeze(-1)))
        if grad_values is not None:
            write(grad_values, rows, torch.matmul(probs.transpose(-1, -2), grad_out).transpose(1, 2), first)
        dlogits = probs * (torch.matmul(grad_out, v_c.transpose(-1, -2)) - delta) * scale
        grad_query += torch.matmul(dlogits, k_c)
        if grad_keys is not None:
            write(grad_keys, rows, torch.matmul(dlogits.transpose(-1, -2), query).transpose(1, 2),
                  first and grad_keys is not grad_values)
    return grad_query


# ---------------------------------------------------------------------------------------------
# Readout: sigma_1(q keys^T) values, the second layer of the dynamic MLP


def activation_vjp(logits, hidden, grad_hidden, activation):
    """VJP of ``hidden = sigma_1(logits)`` (the activations of :func:`amlp.ops._common.activate`)."""
    if activation == "softmax":
        return hidden * (grad_hidden - (grad_hidden * hidden).sum(-1, keepdim=True))
    if activation == "relu":
        return grad_hidden * (logits > 0).to(grad_hidden.dtype)
    if activation == "sigmoid":
        return grad_hidden * hidden * (1.0 - hidden)
    return grad_hidden


def readout(q, keys, values, activation: str, scale: float) -> torch.Tensor:
    """``sigma_1(scale * q keys^T) values``: ``q`` ``[B, T, H, D]``, ``keys, values`` ``[B, H, c, D]``."""
    out = torch.empty(q.shape[:3] + (values.shape[-1],), dtype=q.dtype, device=q.device)
    keys_t = keys.transpose(-1, -2)
    for rows in row_chunks(q):
        hidden = activate(torch.matmul(heads_first(q[:, rows]), keys_t).mul_(scale), activation)
        out[:, rows] = torch.matmul(hidden, values).transpose(1, 2)
    return out


def readout_vjp(grad_out, q, keys, values, activation, scale, grad_q, *, first=False):
    """VJP of :func:`readout`; accumulates into ``grad_q`` (``first``: it holds nothing yet),
    returns ``(grad_keys, grad_values)``."""
    grad_keys = torch.zeros_like(keys)
    grad_values = torch.zeros_like(values)
    keys_t, values_t = keys.transpose(-1, -2), values.transpose(-1, -2)
    for rows in row_chunks(q):
        q_c, g_c = heads_first(q[:, rows]), heads_first(grad_out[:, rows])  # [B, H, t, D]
        logits = torch.matmul(q_c, keys_t).mul_(scale)  # [B, H, t, c]
        hidden = activate(logits, activation)
        grad_values += torch.matmul(hidden.transpose(-1, -2), g_c)
        dlogits = activation_vjp(logits, hidden, torch.matmul(g_c, values_t), activation).mul_(scale)
        write(grad_q, rows, torch.matmul(dlogits, keys).transpose(1, 2), first)
        grad_keys += torch.matmul(dlogits.transpose(-1, -2), q_c)
    return grad_keys, grad_values

"""Linear attention layer: multi-head attention with the ``elu(x) + 1`` kernel, linear in the length."""

from __future__ import annotations

import torch

from ..ops.linear_attention import DEFAULT_EPS, elu_feature_map, linear_attention, linear_attention_reference
from .base import Capabilities, ProjectedMixer
from .registry import register_mixer


@register_mixer("linear", description="linear attention: elu(x) + 1 kernel, prefix sums when causal (linear time)",
                reference="Katharopoulos et al. 2020, Transformers are RNNs (elu + 1 feature map, causal prefix sums)")
class LinearAttention(ProjectedMixer):
    r"""Linear attention (see :mod:`amlp.ops.linear_attention`):

        out_i = phi(q_i)^T sum_j phi(k_j) v_j^T / max(phi(q_i)^T sum_j phi(k_j), eps),
        phi(x) = elu(x) + 1

    Args:
        dim, heads: model width E and heads H (head dim D = E / H).
        causal: prefix sums over ``j <= i``, trained in chunks, with a recurrent :meth:`step` whose
            state is ``S = sum phi(k) v^T`` (``[B, H, D, D]``) and ``z = sum phi(k)`` (``[B, H, D]``).
        cross: accept a separate context (queries from ``x``, keys and values from the context).
        eps: floor of the denominator (default 1e-6); it changes the output only for a query
            without a real key (output zero) or with vanishing features.
        dropout, bias: output dropout and projection biases.
    """

    capabilities = Capabilities(causal=True, noncausal=True, cross=True, padding=True, recurrent=True)

    def __init__(self, dim: int, heads: int, *, causal: bool = False, cross: bool = False,
                 eps: float = DEFAULT_EPS, dropout: float = 0.0, bias: bool = True):
        super().__init__(dim, heads, causal=causal, cross=cross, dropout=dropout, bias=bias)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        self.eps = float(eps)

    def mix_heads(self, q, k, v, q_mask, kv_mask):
        return linear_attention(q, k, v, q_mask=q_mask, kv_mask=kv_mask, causal=self.causal, eps=self.eps)

    def mix_heads_reference(self, q, k, v, q_mask, kv_mask):
        return linear_attention_reference(q, k, v, q_mask=q_mask, kv_mask=kv_mask, causal=self.causal,
                                          eps=self.eps)

    # -- recurrent form ---------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None):
        if not self.causal:
            raise ValueError("step() needs a causal mixer; build it with causal=True")
        p = self.q_proj.weight
        device, dtype = device or p.device, dtype or p.dtype
        H, D = self.heads, self.head_dim
        return {
            "kv": torch.zeros(batch_size, H, D, D, device=device, dtype=dtype),  # S = sum phi(k) v^T
            "z": torch.zeros(batch_size, H, D, device=device, dtype=dtype),  # z = sum phi(k)
        }

    def step(self, x_t: torch.Tensor, state):
        x = x_t.unsqueeze(1)
        phi_q = elu_feature_map(self.split_heads(self.q_proj(x))[:, 0])  # [B, H, D]
        phi_k = elu_feature_map(self.split_heads(self.k_proj(x))[:, 0])
        v = self.split_heads(self.v_proj(x))[:, 0]
        kv = state["kv"] + phi_k.unsqueeze(-1) * v.unsqueeze(-2)
        z = state["z"] + phi_k
        num = torch.einsum("bhd,bhde->bhe", phi_q, kv)
        den = (phi_q * z).sum(-1).clamp_min(self.eps)
        out = (num / den.unsqueeze(-1)).reshape(x_t.shape[0], self.dim)
        return self.dropout(self.out_proj(out)), {"kv": kv, "z": z}

    def state_size(self, length: int) -> int:
        return self.heads * (self.head_dim * self.head_dim + self.head_dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, causal={self.causal}, eps={self.eps}"

"""Pure functions on per-head tensors ``[B, T, H, D]``: one mechanism per module, each with a plain
reference beside its fast form."""

from .amlp import amlp_cov, amlp_cov_reference, amlp_pquery, amlp_pquery_reference
from .softmax import softmax_attention, softmax_attention_reference

__all__ = [
    "amlp_cov",
    "amlp_cov_reference",
    "amlp_pquery",
    "amlp_pquery_reference",
    "softmax_attention",
    "softmax_attention_reference",
]
from .causal_rn import (  # noqa: E402  isort: skip
    causal_rn_linear,
    causal_rn_linear_reference,
    causal_rn_quadratic,
    causal_rn_quadratic_reference,
    layer_norm0,
)

__all__ += [
    "causal_rn_linear",
    "causal_rn_linear_reference",
    "causal_rn_quadratic",
    "causal_rn_quadratic_reference",
    "layer_norm0",
]
from .amlp_causal import amlp_cov_causal, amlp_cov_causal_reference  # noqa: E402  isort: skip

__all__ += ["amlp_cov_causal", "amlp_cov_causal_reference"]

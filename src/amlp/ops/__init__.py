"""Pure functions on per-head tensors ``[B, T, H, D]``: one mechanism per module, each with a plain
reference beside its fast form."""

from .amlp import amlp_cov, amlp_cov_reference, amlp_pquery, amlp_pquery_reference
from .softmax import softmax_attention, softmax_attention_reference
from .hypermlp import hyper_attention, hyper_attention_reference  # noqa: E402  isort: skip

__all__ = [
    "amlp_cov",
    "amlp_cov_reference",
    "amlp_pquery",
    "amlp_pquery_reference",
    "softmax_attention",
    "softmax_attention_reference",
    "hyper_attention",
    "hyper_attention_reference",
]

"""Pure functions on per-head tensors ``[B, T, H, D]``: one mechanism per module, each with a plain
reference beside its fast form."""

from .amlp import amlp_cov, amlp_cov_reference, amlp_pquery, amlp_pquery_reference
from .softmax import softmax_attention, softmax_attention_reference
from .performer import orthogonal_gaussian_features, performer_attention, performer_attention_reference
from .cosformer import cosformer_attention, cosformer_attention_reference
from .nystrom import nystrom_attention, nystrom_attention_reference
from .lara import lara_attention, lara_attention_reference

__all__ = [
    "amlp_cov",
    "amlp_cov_reference",
    "amlp_pquery",
    "amlp_pquery_reference",
    "cosformer_attention",
    "cosformer_attention_reference",
    "lara_attention",
    "lara_attention_reference",
    "nystrom_attention",
    "nystrom_attention_reference",
    "orthogonal_gaussian_features",
    "performer_attention",
    "performer_attention_reference",
    "softmax_attention",
    "softmax_attention_reference",
]

"""Pure functions on per-head tensors ``[B, T, H, D]``: one mechanism per module, each with a plain
reference beside its fast form.

Padding masks select inside the ops: a padded row, NaN included, reaches no real output. Causality
is a weight of zero, not a selection: a non-finite value at a future position of a causal op reaches
earlier outputs through its zero weight (0 x NaN is NaN), as in any attention computed by matrix
products. The mixer layers (:mod:`amlp.layers`) select non-finite tokens out before they mix, so a
layer keeps the causal contract whole; call the layers where the inputs may hold non-finite values.
"""

from .abc import abc_attention, abc_attention_reference, abc_step
from .amlp import amlp_cov, amlp_cov_reference, amlp_pquery, amlp_pquery_reference
from .amlp_causal import amlp_cov_causal, amlp_cov_causal_reference, amlp_cov_causal_step
from .causal_rn import (
    causal_rn_linear,
    causal_rn_linear_reference,
    causal_rn_quadratic,
    causal_rn_quadratic_reference,
    layer_norm0,
)
from .cosformer import cosformer_attention, cosformer_attention_reference
from .gmlp import spatial_gating_unit, spatial_gating_unit_reference
from .hypermlp import hyper_attention, hyper_attention_reference
from .lara import lara_attention, lara_attention_reference
from .linear_attention import elu_feature_map, linear_attention, linear_attention_reference
from .linformer import linformer_attention, linformer_attention_reference
from .local import local_attention, local_attention_reference
from .nystrom import nystrom_attention, nystrom_attention_reference
from .performer import orthogonal_gaussian_features, performer_attention, performer_attention_reference
from .softmax import softmax_attention, softmax_attention_reference
from .xca import cross_covariance_attention, cross_covariance_attention_reference

__all__ = [
    "abc_attention", "abc_attention_reference", "abc_step",
    "amlp_cov", "amlp_cov_reference", "amlp_pquery", "amlp_pquery_reference",
    "amlp_cov_causal", "amlp_cov_causal_reference", "amlp_cov_causal_step",
    "causal_rn_linear", "causal_rn_linear_reference", "causal_rn_quadratic", "causal_rn_quadratic_reference",
    "layer_norm0",
    "cosformer_attention", "cosformer_attention_reference",
    "cross_covariance_attention", "cross_covariance_attention_reference",
    "hyper_attention", "hyper_attention_reference",
    "lara_attention", "lara_attention_reference",
    "elu_feature_map", "linear_attention", "linear_attention_reference",
    "linformer_attention", "linformer_attention_reference",
    "local_attention", "local_attention_reference",
    "nystrom_attention", "nystrom_attention_reference",
    "orthogonal_gaussian_features", "performer_attention", "performer_attention_reference",
    "softmax_attention", "softmax_attention_reference",
    "spatial_gating_unit", "spatial_gating_unit_reference",
]

"""nn.Modules: projections, parameters, masks and recurrent state behind one interface, and the
registry that knows what each mixer can do. Importing this package registers every mixer."""

from .base import Capabilities, Mixer, ProjectedMixer
from .registry import MixerInfo, build_mixer, get_mixer_info, list_mixers, mixer_names, register_mixer

# Mixer modules register themselves on import, in the order `amlp list` shows them.
from .softmax import SoftmaxAttention  # noqa: E402  isort: skip
from .amlp import AMLP, AMLPCov, AMLPPQuery  # noqa: E402  isort: skip
from .local import LocalAttention  # noqa: E402  isort: skip
from .abc import ABCAttention  # noqa: E402  isort: skip
from .xca import CrossCovarianceAttention  # noqa: E402  isort: skip
from .gmlp import SpatialGatingMixer  # noqa: E402  isort: skip
from .linear_attention import LinearAttention  # noqa: E402  isort: skip
from .performer import Performer  # noqa: E402  isort: skip
from .cosformer import CosFormer  # noqa: E402  isort: skip
from .linformer import LinformerAttention  # noqa: E402  isort: skip
from .nystrom import Nystromformer  # noqa: E402  isort: skip
from .lara import LARA  # noqa: E402  isort: skip
from .causal_rn import CausalRN, CausalRNQuadratic  # noqa: E402  isort: skip
from .hypermlp import HyperGLU, HyperHead, HyperMLP  # noqa: E402  isort: skip

__all__ = [
    "AMLP", "AMLPCov", "AMLPPQuery", "ABCAttention", "Capabilities", "CausalRN", "CausalRNQuadratic", "CosFormer", "CrossCovarianceAttention",
    "HyperGLU", "HyperHead", "HyperMLP", "LARA", "LinearAttention", "LinformerAttention", "LocalAttention", "Mixer",
    "MixerInfo", "Nystromformer", "Performer", "ProjectedMixer", "SoftmaxAttention", "SpatialGatingMixer",
    "build_mixer", "get_mixer_info", "list_mixers", "mixer_names", "register_mixer",
]

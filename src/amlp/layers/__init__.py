"""nn.Modules: projections, parameters, masks and recurrent state behind one interface, and the
registry that knows what each mixer can do. Importing this package registers every mixer."""

from .base import Capabilities, Mixer, ProjectedMixer
from .registry import MixerInfo, build_mixer, get_mixer_info, list_mixers, mixer_names, register_mixer

# Mixer modules register themselves on import; one line each.
from .softmax import SoftmaxAttention  # noqa: E402  isort: skip
from .amlp import AMLP, AMLPCov, AMLPPQuery  # noqa: E402  isort: skip

__all__ = [
    "AMLP",
    "AMLPCov",
    "AMLPPQuery",
    "Capabilities",
    "Mixer",
    "MixerInfo",
    "ProjectedMixer",
    "SoftmaxAttention",
    "build_mixer",
    "get_mixer_info",
    "list_mixers",
    "mixer_names",
    "register_mixer",
]
from .causal_rn import CausalRN, CausalRNQuadratic  # noqa: E402  isort: skip

__all__ += ["CausalRN", "CausalRNQuadratic"]

"""amlp: attentive MLPs, sequence mixers whose MLP weights are computed from the context.

    >>> import torch, amlp
    >>> mixer = amlp.build_mixer("amlp-cov", dim=64, heads=4, form="official")
    >>> mixer(torch.randn(2, 100, 64)).shape
    torch.Size([2, 100, 64])
"""

from . import ops
from .layers import AMLP, Capabilities, Mixer, SoftmaxAttention, build_mixer, list_mixers, mixer_names

__version__ = "0.1.0"

__all__ = ["AMLP", "Capabilities", "Mixer", "SoftmaxAttention", "build_mixer", "list_mixers", "mixer_names", "ops",
           "__version__"]

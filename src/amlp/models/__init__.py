"""models"""

from .blocks import CausalRNBlock

__all__ = ["CausalRNBlock"]
from .decoder import DecoderLM, greedy_decode  # noqa: E402

__all__ += ["DecoderLM", "greedy_decode"]

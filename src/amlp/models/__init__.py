"""models"""

from .blocks import CausalRNBlock

__all__ = ["CausalRNBlock"]

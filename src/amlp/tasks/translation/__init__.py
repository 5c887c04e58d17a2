"""Machine translation on Multi30k: AR Transformer and NAR GLAT with any registered mixer."""

from .config import TranslationDataConfig, TranslationModelConfig
from .task import TranslationTask, translate_lines

__all__ = ["TranslationDataConfig", "TranslationModelConfig", "TranslationTask", "translate_lines"]

"""Character-level language modelling (tiny Shakespeare) with any causal mixer, the matched-parameter
rule, and text generation through the mixers' recurrent step."""

from .config import LMDataConfig, LMModelConfig
from .data import CharVocab, EvalWindows, TrainWindows, UnknownCharactersError, split_text
from .matching import MatchResult, count_parameters, format_match_report, match_params, match_report
from .task import LMTask, bits_per_char, config_match_report, lm_loss
from .text import TextGeneration, generate_text, load_lm

__all__ = ["CharVocab", "EvalWindows", "LMDataConfig", "LMModelConfig", "LMTask", "MatchResult", "TextGeneration",
           "TrainWindows", "UnknownCharactersError", "bits_per_char", "config_match_report", "count_parameters",
           "format_match_report", "generate_text", "lm_loss", "load_lm", "match_params", "match_report",
           "split_text"]

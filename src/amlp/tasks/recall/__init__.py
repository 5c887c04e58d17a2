"""In-context recall: the copying task (CausalRN / Jelassi et al.) and multi-query associative recall
(zoology), trained on a decoder-only model with any causal mixer."""

from .config import CopyingDataConfig, DecoderModelConfig, MQARDataConfig
from .data import (BOS, COPY_VOCAB_SIZE, EOS, IGNORE_INDEX, SEP, CopyingDataset, MQARDataset, copy_example,
                   copy_hard_accuracy, mqar_sequence)

__all__ = ["BOS", "COPY_VOCAB_SIZE", "CopyingDataConfig", "CopyingDataset", "DecoderModelConfig", "EOS",
           "IGNORE_INDEX", "MQARDataConfig", "MQARDataset", "SEP", "copy_example", "copy_hard_accuracy",
           "mqar_sequence"]

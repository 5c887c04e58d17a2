"""The MAD synthetic task suite (Poli et al. 2024): in-context recall, fuzzy and noisy in-context
recall, selective copying, compression and memorization, trained on a decoder-only model with any
causal mixer (``task: mad`` with ``data.task: <name>``)."""

from .config import MADDataConfig
from .data import (IGNORE_INDEX, MAD_DIFFICULTY, MAD_TASK_NAMES, MAD_TASKS, MAD_TEST_EXAMPLES, MAD_TRAIN_EXAMPLES,
                   CompressionSettings, FuzzyInContextRecallSettings, InContextRecallSettings, MADDataset, MADExample,
                   MemorizationSettings, NoisyInContextRecallSettings, SelectiveCopyingSettings, SettingsError,
                   compression, example_rng, fuzzy_in_context_recall, generate, in_context_recall, mad_benchmark_grid,
                   mad_score, make_settings, memorization, memorization_map, noisy_in_context_recall,
                   selective_copying)
from .model import CompressionAutoencoder

__all__ = ["CompressionAutoencoder", "CompressionSettings", "FuzzyInContextRecallSettings", "IGNORE_INDEX",
           "InContextRecallSettings", "MADDataConfig", "MADDataset", "MADExample", "MAD_DIFFICULTY", "MAD_TASKS",
           "MAD_TASK_NAMES", "MAD_TEST_EXAMPLES", "MAD_TRAIN_EXAMPLES", "MemorizationSettings",
           "NoisyInContextRecallSettings", "SelectiveCopyingSettings", "SettingsError", "compression", "example_rng",
           "fuzzy_in_context_recall", "generate", "in_context_recall", "mad_benchmark_grid", "mad_score",
           "make_settings", "memorization", "memorization_map", "noisy_in_context_recall", "selective_copying"]

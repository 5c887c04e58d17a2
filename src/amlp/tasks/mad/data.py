"""The six synthetic tasks of MAD (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid
Architectures"): in-context recall, fuzzy in-context recall, noisy in-context recall, selective
copying, compression and memorization.

Every generator is a pure function ``generate(settings, rng, train=True) -> MADExample`` of a frozen
settings dataclass and a :class:`numpy.random.Generator`: the same settings and the same generator
state give the same example. An example holds three arrays of one length ``T`` (the model input):

* ``inputs``: the tokens fed to the model (int64);
* ``targets``: what the model predicts at each input position (int64), :data:`IGNORE_INDEX` where no
  loss is taken;
* ``scored``: the positions that are scored (bool), a subset of those with a target.

For the three recall tasks MAD trains on every next token (``targets`` is the whole sequence shifted
by one) and scores only the recalls; for the other three ``targets`` is set exactly at the scored
positions. ``train`` changes the draw only for fuzzy recall (MAD always queries at the longest key
size outside training); the other generators ignore it.

Default settings are MAD's baseline ("standard") setting of each task, as the benchmark released with
the paper defines it (``configs/tasks/<task>.yml``, ``baseline:``; the number of test examples from its
``MADConfig``). :data:`MAD_DIFFICULTY` lists the harder settings the benchmark averages over
(``changes:``; one variable changed at a time), and :func:`mad_score` the suite's score.

Departures from the released generators (the definitions follow the paper's task descriptions):

* selective copying places the tokens to copy at uniform random positions of the noise region (the
  released code inserts noise only before each token, so the last token to copy always sits just
  before the copy token, and it draws the positions from numpy's global generator);
* noisy recall guarantees a key-value pair among the pairs before the final query, and fuzzy recall
  always presents the final query's key earlier in the sequence (the released code can, rarely,
  miss either, leaving a query whose key was never shown);
* the random draws come in another order (and from one generator per example), so the examples
  follow the same distributions as the released code's without matching them number for number.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch

IGNORE_INDEX = -100

MAD_TASK_NAMES = ("in-context-recall", "fuzzy-in-context-recall", "noisy-in-context-recall", "selective-copying",
                  "compression", "memorization")


class MADExample(NamedTuple):
    """One example: ``inputs``, ``targets`` (:data:`IGNORE_INDEX` where no loss) and ``scored``,
    all of the model's input length."""

    inputs: np.ndarray
    targets: np.ndarray
    scored: np.ndarray


class SettingsError(ValueError):
    """An invalid task setting; ``field`` names the offending setting."""

    def __init__(self, field: str, message: str):
        super().__init__(f"'{field}' {message}")
        self.field, self.reason = field, message


def _at_least(obj, name: str, low: int) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SettingsError(name, f"must be an int >= {low}, got {value!r}")


def _even(obj, name: str) -> None:
    if getattr(obj, name) % 2:
        raise SettingsError(name, f"must be even (key-value pairs of two tokens), got {getattr(obj, name)}")


# -- settings --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InContextRecallSettings:
    """In-context recall; MAD's baseline: vocabulary 16 (keys 0-7, values 8-15), sequences of 128 tokens.

    The full sequence holds ``seq_len`` tokens (``seq_len / 2`` key-value pairs, the last one the
    final query); the model input is its first ``seq_len - 1`` tokens."""

    vocab_size: int = 16
    seq_len: int = 128

    def __post_init__(self):
        _at_least(self, "vocab_size", 2)
        _at_least(self, "seq_len", 4)
        _even(self, "seq_len")

    @property
    def input_length(self) -> int:
        return self.seq_len - 1


@dataclass(frozen=True)
class NoisyInContextRecallSettings:
    """Noisy in-context recall; MAD's baseline: vocabulary 32 of which the last 16 are noise tokens
    (keys 0-7, values 8-15, noise 16-31), sequences of 128 tokens, each pair slot noise with
    probability 0.2. Same layout as :class:`InContextRecallSettings`."""

    vocab_size: int = 32
    seq_len: int = 128
    noise_vocab_size: int = 16
    frac_noise: float = 0.2

    def __post_init__(self):
        _at_least(self, "vocab_size", 2)
        _at_least(self, "seq_len", 4)
        _even(self, "seq_len")
        _at_least(self, "noise_vocab_size", 0)
        if not 0.0 <= self.frac_noise < 1.0:
            raise SettingsError("frac_noise", f"must be in [0, 1), got {self.frac_noise!r}")
        if self.frac_noise > 0 and self.noise_vocab_size < 1:
            raise SettingsError("noise_vocab_size", "must be >= 1 when frac_noise > 0")
        if self.vocab_size - self.noise_vocab_size < 2:
            raise SettingsError("vocab_size", f"({self.vocab_size}) leaves fewer than 2 key/value tokens beside "
                                              f"{self.noise_vocab_size} noise tokens")

    @property
    def input_length(self) -> int:
        return self.seq_len - 1


@dataclass(frozen=True)
class FuzzyInContextRecallSettings:
    """Fuzzy in-context recall; MAD's baseline: vocabulary 16 (keys are 1-3 distinct tokens of 0-6,
    values 1-3 distinct tokens of 7-14, 15 pads), sequences of 128 tokens, motif sizes up to 3.

    The full sequence holds ``seq_len + 1`` tokens, left-padded; the model input is its first
    ``seq_len``."""

    vocab_size: int = 16
    seq_len: int = 128
    k_motif_size: int = 3
    v_motif_size: int = 3

    def __post_init__(self):
        _at_least(self, "vocab_size", 3)
        _at_least(self, "k_motif_size", 1)
        _at_least(self, "v_motif_size", 1)
        n = self.vocab_size - 1
        if n // 2 < self.k_motif_size or n - n // 2 < self.v_motif_size:
            raise SettingsError("vocab_size", f"({self.vocab_size}) is too small for keys of {self.k_motif_size} "
                                              f"and values of {self.v_motif_size} distinct tokens")
        _at_least(self, "seq_len", 2 * (self.k_motif_size + self.v_motif_size))

    @property
    def input_length(self) -> int:
        return self.seq_len


@dataclass(frozen=True)
class SelectiveCopyingSettings:
    """Selective copying; MAD's baseline: vocabulary 16 (tokens 0-13, noise 14, copy 15), sequences of
    256 tokens, 16 tokens to copy."""

    vocab_size: int = 16
    seq_len: int = 256
    num_tokens_to_copy: int = 16

    def __post_init__(self):
        _at_least(self, "vocab_size", 3)
        _at_least(self, "num_tokens_to_copy", 1)
        _at_least(self, "seq_len", 2 * self.num_tokens_to_copy + 2)

    @property
    def input_length(self) -> int:
        return self.seq_len


@dataclass(frozen=True)
class CompressionSettings:
    """Compression; MAD's baseline: vocabulary 16 (tokens 0-14, compression token 15), sequences of 32."""

    vocab_size: int = 16
    seq_len: int = 32

    def __post_init__(self):
        _at_least(self, "vocab_size", 2)
        _at_least(self, "seq_len", 2)

    @property
    def input_length(self) -> int:
        return self.seq_len


@dataclass(frozen=True)
class MemorizationSettings:
    """Memorization; MAD's baseline: vocabulary 256 (keys 0-126, values 127-254, insert token 255),
    sequences of 32 tokens (16 keys). ``map_seed`` fixes the key-value map (MAD's seed 12345)."""

    vocab_size: int = 256
    seq_len: int = 32
    map_seed: int = 12345

    def __post_init__(self):
        _at_least(self, "vocab_size", 4)
        _at_least(self, "seq_len", 2)
        _even(self, "seq_len")
        _at_least(self, "map_seed", 0)

    @property
    def input_length(self) -> int:
        return self.seq_len


# -- the recall family -------------------------------------------------------------------------------------
def _pair_recall(vocab_size: int, seq_len: int, noise_vocab_size: int, frac_noise: float,
                 rng: np.random.Generator) -> MADExample:
    n_tokens = vocab_size - noise_vocab_size
    n_keys = n_tokens // 2  # keys 0 .. n_keys-1, values n_keys .. n_tokens-1, noise n_tokens .. vocab_size-1
    slots = seq_len // 2 - 1  # pair slots before the final query
    keys = rng.integers(0, n_keys, size=slots)
    table = rng.integers(n_keys, n_tokens, size=n_keys)  # this sequence's key -> value map
    pairs = np.stack([keys, table[keys]], axis=1)
    noise = np.zeros(slots, dtype=bool)
    if frac_noise > 0:
        noise = rng.random(slots) < frac_noise
        noise[rng.integers(slots)] = False  # at least one key-value pair before the query
        noise_tokens = rng.integers(n_tokens, vocab_size, size=(slots, 2))
        pairs[noise] = noise_tokens[noise]
    recalled = np.zeros(slots, dtype=bool)
    seen: set[int] = set()
    for i in np.flatnonzero(~noise).tolist():
        key = int(keys[i])
        recalled[i] = key in seen
        seen.add(key)
    shown = sorted(seen)
    query = shown[int(rng.integers(len(shown)))]
    full = np.concatenate([pairs.reshape(-1), [query, table[query]]]).astype(np.int64)
    scored_full = np.zeros(seq_len, dtype=bool)
    scored_full[1:2 * slots:2] = recalled
    scored_full[-1] = True
    return MADExample(full[:-1], full[1:].copy(), scored_full[1:].copy())


def in_context_recall(settings: InContextRecallSettings, rng: np.random.Generator, train: bool = True) -> MADExample:
    """Multi-query associative recall (MAD's "in-context recall").

    Keys are tokens ``0 .. V/2-1``, values ``V/2 .. V-1``. Each sequence draws its own key -> value map
    (a uniform value per key, so two keys may share a value) and ``seq_len/2 - 1`` uniform keys, each
    followed by its value; a final query repeats one of the keys shown (uniform over the distinct keys)
    with its value. Training targets are every next token; scored are the positions where a key that
    appeared earlier in the sequence is shown, whose target is its value (the final query included).
    ``train`` is ignored.

    Worked example (vocabulary 6: keys 0-2, values 3-5; ``seq_len = 10``, four pairs and the query)::

        >>> ex = in_context_recall(InContextRecallSettings(vocab_size=6, seq_len=10), np.random.default_rng(3))
        >>> full = ex.inputs.tolist() + ex.targets[-1:].tolist()
        >>> full                            # pairs 2 5 | 0 3 | 0 3 | 0 3, then the query 2 5
        [2, 5, 0, 3, 0, 3, 0, 3, 2, 5]
        >>> ex.inputs.tolist() == full[:-1] and ex.targets.tolist() == full[1:]
        True
        >>> ex.scored.astype(int).tolist()  # key 0 again at inputs 4 and 6 (-> 3), key 2 at 8 (-> 5)
        [0, 0, 0, 0, 1, 0, 1, 0, 1]
    """
    return _pair_recall(settings.vocab_size, settings.seq_len, 0, 0.0, rng)


def noisy_in_context_recall(settings: NoisyInContextRecallSettings, rng: np.random.Generator,
                            train: bool = True) -> MADExample:
    """In-context recall with noise (MAD's "noisy in-context recall").

    As :func:`in_context_recall` over the first ``V - noise_vocab_size`` tokens, but each pair slot
    before the final query is, with probability ``frac_noise``, two uniform tokens of the noise
    vocabulary (the last ``noise_vocab_size`` tokens) instead of a key-value pair; one slot is always a
    pair. Noise is never scored; training targets are every next token, noise included.
    ``train`` is ignored.

    Worked example (vocabulary 8 of which 4 noise: keys 0-1, values 2-3, noise 4-7; ``seq_len = 10``;
    ``frac_noise = 0.5``)::

        >>> s = NoisyInContextRecallSettings(vocab_size=8, seq_len=10, noise_vocab_size=4, frac_noise=0.5)
        >>> ex = noisy_in_context_recall(s, np.random.default_rng(7))
        >>> ex.inputs.tolist() + ex.targets[-1:].tolist()   # noise 7 4 | pairs 1 3 | 1 3 | noise 5 5 | query 1 3
        [7, 4, 1, 3, 1, 3, 5, 5, 1, 3]
        >>> ex.scored.astype(int).tolist()                    # key 1 again at inputs 4 and 8 (-> 3)
        [0, 0, 0, 0, 1, 0, 0, 0, 1]
    """
    return _pair_recall(settings.vocab_size, settings.seq_len, settings.noise_vocab_size, settings.frac_noise, rng)


def fuzzy_in_context_recall(settings: FuzzyInContextRecallSettings, rng: np.random.Generator,
                            train: bool = True) -> MADExample:
    """In-context recall of multi-token keys and values (MAD's "fuzzy in-context recall").

    With ``n = V - 1`` (token ``V-1`` pads), a key is 1 to ``k_motif_size`` distinct tokens of
    ``0 .. n/2-1`` and a value 1 to ``v_motif_size`` distinct tokens of ``n/2 .. n-1`` (sizes uniform;
    outside training (``train=False``) every key has ``k_motif_size`` tokens, as MAD's test sets).
    Each sequence draws key-value pairs (a key seen before keeps its value) until about
    ``seq_len`` tokens, presents the final query's pair at a random place among them, ends with that
    query pair and is left-padded to ``seq_len + 1`` tokens. Training targets are every next token;
    scored are the positions whose target is a token of a value whose key appeared earlier.

    Worked example (vocabulary 9: key tokens 0-3, value tokens 4-7, pad 8; ``seq_len = 14``; motifs up
    to 2 tokens)::

        >>> s = FuzzyInContextRecallSettings(vocab_size=9, seq_len=14, k_motif_size=2, v_motif_size=2)
        >>> ex = fuzzy_in_context_recall(s, np.random.default_rng(1))
        >>> ex.inputs.tolist() + ex.targets[-1:].tolist()   # pad | 0 -> 5 | 2 -> 5 | 1 0 -> 5 7 | 1 0 -> 5 7 | 0 -> 5
        [8, 0, 5, 2, 5, 1, 0, 5, 7, 1, 0, 5, 7, 0, 5]
        >>> ex.scored.astype(int).tolist()                    # the second 1 0 -> 5 7 and the final query
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 1]
    """
    V, L = settings.vocab_size, settings.seq_len
    K, M = settings.k_motif_size, settings.v_motif_size
    n = V - 1
    n_keys = n // 2
    key_sizes = list(range(1, K + 1)) if train else [K]

    def draw_key() -> tuple[int, ...]:
        size = key_sizes[int(rng.integers(len(key_sizes)))]
        return tuple(rng.permutation(n_keys)[:size].tolist())

    def draw_value() -> tuple[int, ...]:
        size = 1 + int(rng.integers(M))
        return tuple((n_keys + rng.permutation(n - n_keys)[:size]).tolist())

    query = draw_key()
    table = {query: draw_value()}
    query_len = len(query) + len(table[query])
    room = L + 1 - query_len  # padding and every pair before the final query
    order: list[tuple[int, ...]] = []
    length = query_len  # the query's pair is presented once among the others
    while length < room - (K + M):
        key = draw_key()
        if key not in table:
            table[key] = draw_value()
        order.append(key)
        length += len(key) + len(table[key])
    order.insert(int(rng.integers(len(order) + 1)), query)
    order.append(query)
    tokens: list[int] = []
    scored: list[bool] = []
    seen: set[tuple[int, ...]] = set()
    for key in order:
        value = table[key]
        tokens += list(key) + list(value)
        scored += [False] * len(key) + [key in seen] * len(value)
        seen.add(key)
    pad = L + 1 - len(tokens)
    full = np.array([n] * pad + tokens, dtype=np.int64)
    scored_full = np.array([False] * pad + scored, dtype=bool)
    return MADExample(full[:-1], full[1:].copy(), scored_full[1:].copy())


# -- selective copying, compression, memorization -----------------------------------------------------------
def selective_copying(settings: SelectiveCopyingSettings, rng: np.random.Generator, train: bool = True) -> MADExample:
    """Selective copying (MAD).

    ``N = num_tokens_to_copy`` uniform tokens of ``0 .. V-3`` sit, in order, at uniform random
    positions among the first ``seq_len - N - 1`` positions; every other position there holds the
    noise token ``V-2``. Then comes the copy token ``V-1`` and ``N`` more noise tokens, at which the
    model must output the ``N`` tokens in their order. Targets and scored positions are those last
    ``N``. ``train`` is ignored.

    Worked example (vocabulary 6: tokens 0-3, noise 4, copy 5; ``seq_len = 10``; 3 tokens)::

        >>> ex = selective_copying(SelectiveCopyingSettings(6, 10, 3), np.random.default_rng(2))
        >>> ex.inputs.tolist()
        [3, 4, 1, 4, 0, 4, 5, 4, 4, 4]
        >>> ex.targets.tolist()
        [-100, -100, -100, -100, -100, -100, -100, 3, 1, 0]
        >>> ex.scored.astype(int).tolist()
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    """
    V, L, N = settings.vocab_size, settings.seq_len, settings.num_tokens_to_copy
    noise_token, copy_token = V - 2, V - 1
    to_copy = rng.integers(0, V - 2, size=N)
    region = L - N - 1
    where = np.sort(rng.permutation(region)[:N])
    inputs = np.full(L, noise_token, dtype=np.int64)
    inputs[where] = to_copy
    inputs[region] = copy_token
    targets = np.full(L, IGNORE_INDEX, dtype=np.int64)
    targets[region + 1:] = to_copy
    return MADExample(inputs, targets, targets != IGNORE_INDEX)


def compression(settings: CompressionSettings, rng: np.random.Generator, train: bool = True) -> MADExample:
    """Compression (MAD).

    ``seq_len - 1`` uniform tokens of ``0 .. V-2`` followed by the compression token ``V-1``; the model
    must reconstruct the whole input (compression token included, as MAD scores it) from its
    representation at the compression token: targets are the inputs, every position scored.
    ``train`` is ignored.

    Worked example (vocabulary 5: tokens 0-3, compression token 4; ``seq_len = 6``)::

        >>> ex = compression(CompressionSettings(vocab_size=5, seq_len=6), np.random.default_rng(0))
        >>> ex.inputs.tolist(), ex.targets.tolist()
        ([3, 2, 2, 1, 1, 4], [3, 2, 2, 1, 1, 4])
        >>> bool(ex.scored.all())
        True
    """
    data = rng.integers(0, settings.vocab_size - 1, size=settings.seq_len - 1)
    inputs = np.concatenate([data, [settings.vocab_size - 1]]).astype(np.int64)
    return MADExample(inputs, inputs.copy(), np.ones(settings.seq_len, dtype=bool))


@functools.lru_cache(maxsize=32)
def _memorization_map(vocab_size: int, map_seed: int) -> np.ndarray:
    n = vocab_size - 1
    n_keys = n // 2
    values = n_keys + np.random.default_rng(map_seed).permutation(n - n_keys)[:n_keys]
    values.setflags(write=False)
    return values


def memorization_map(settings: MemorizationSettings) -> np.ndarray:
    """The fixed key -> value map of the memorization task: ``map[k]`` is the value of key ``k``.

    With ``n = V - 1`` (token ``V-1`` is the insert token), keys are ``0 .. n/2-1`` and each gets a
    distinct value of ``n/2 .. n-1``: a random one-to-one map drawn from ``map_seed`` alone, the
    same for every split."""
    return _memorization_map(settings.vocab_size, settings.map_seed)


def memorization(settings: MemorizationSettings, rng: np.random.Generator, train: bool = True) -> MADExample:
    """Memorization of a fixed key -> value map (MAD).

    ``seq_len/2`` uniform keys, each followed by the insert token ``V-1``; at each insert token the
    model must output the key's value under :func:`memorization_map`, which never changes: the
    answer is learnt from training, not found in the sequence. Targets and scored positions are the
    insert tokens. ``train`` is ignored.

    Worked example (vocabulary 9: keys 0-3, values 4-7, insert 8; ``seq_len = 8``; map seed 0)::

        >>> s = MemorizationSettings(vocab_size=9, seq_len=8, map_seed=0)
        >>> memorization_map(s).tolist()     # 0->6, 1->4, 2->5, 3->7
        [6, 4, 5, 7]
        >>> ex = memorization(s, np.random.default_rng(0))
        >>> ex.inputs.tolist()
        [3, 8, 2, 8, 2, 8, 1, 8]
        >>> ex.targets.tolist()
        [-100, 7, -100, 5, -100, 5, -100, 4]
    """
    table = memorization_map(settings)
    keys = rng.integers(0, len(table), size=settings.seq_len // 2)
    inputs = np.stack([keys, np.full_like(keys, settings.vocab_size - 1)], axis=1).reshape(-1).astype(np.int64)
    targets = np.full(settings.seq_len, IGNORE_INDEX, dtype=np.int64)
    targets[1::2] = table[keys]
    return MADExample(inputs, targets, targets != IGNORE_INDEX)


# -- the suite -----------------------------------------------------------------------------------------------
#: task name -> (settings class, generator)
MAD_TASKS: dict[str, tuple[type, Callable[..., MADExample]]] = {
    "in-context-recall": (InContextRecallSettings, in_context_recall),
    "fuzzy-in-context-recall": (FuzzyInContextRecallSettings, fuzzy_in_context_recall),
    "noisy-in-context-recall": (NoisyInContextRecallSettings, noisy_in_context_recall),
    "selective-copying": (SelectiveCopyingSettings, selective_copying),
    "compression": (CompressionSettings, compression),
    "memorization": (MemorizationSettings, memorization),
}

#: training examples of MAD's baseline setting (the test sets hold :data:`MAD_TEST_EXAMPLES`)
MAD_TRAIN_EXAMPLES = {"in-context-recall": 12_800, "fuzzy-in-context-recall": 12_800,
                      "noisy-in-context-recall": 12_800, "selective-copying": 12_800, "compression": 12_800,
                      "memorization": 256}
MAD_TEST_EXAMPLES = 1_280

#: the harder settings MAD averages over: each value replaces the baseline's, one variable at a time
#: (noisy recall's vocabularies include its 16 noise tokens)
MAD_DIFFICULTY: dict[str, dict[str, list]] = {
    "in-context-recall": {"vocab_size": [32, 64, 128], "seq_len": [256, 512, 1024],
                          "train_examples": [6400, 3200, 1600, 800]},
    "fuzzy-in-context-recall": {"vocab_size": [32, 64, 128], "seq_len": [256, 512, 1024],
                                "train_examples": [6400, 3200, 1600, 800]},
    "noisy-in-context-recall": {"vocab_size": [48, 80, 144], "seq_len": [256, 512, 1024],
                                "train_examples": [6400, 3200, 1600, 800], "frac_noise": [0.4, 0.6, 0.8]},
    "selective-copying": {"vocab_size": [32, 64, 128], "seq_len": [512, 1024],
                          "train_examples": [6400, 3200, 1600, 800], "num_tokens_to_copy": [32, 64, 96]},
    "compression": {"vocab_size": [32, 64, 128], "seq_len": [64, 128, 256],
                    "train_examples": [6400, 3200, 1600, 800]},
    "memorization": {"vocab_size": [512, 1024, 2048, 4096, 8192]},
}


def _check_task(task: str) -> None:
    if task not in MAD_TASKS:
        raise ValueError(f"unknown MAD task {task!r}; expected one of {', '.join(MAD_TASK_NAMES)}")


def make_settings(task: str, **values):
    """The settings of ``task``: MAD's baseline with ``values`` replaced (unknown names raise)."""
    _check_task(task)
    cls = MAD_TASKS[task][0]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SettingsError(unknown[0], f"is not a setting of {task} (its settings: {', '.join(sorted(names))})")
    return cls(**values)


def generate(task: str, settings, rng: np.random.Generator, train: bool = True) -> MADExample:
    """One example of ``task`` (dispatch to its generator)."""
    _check_task(task)
    cls, fn = MAD_TASKS[task]
    if not isinstance(settings, cls):
        raise TypeError(f"{task} takes {cls.__name__}, got {type(settings).__name__}")
    return fn(settings, rng, train)


def mad_benchmark_grid(task: str) -> list[dict]:
    """MAD's settings of ``task``: the baseline, then each harder setting of :data:`MAD_DIFFICULTY`
    (one variable changed). Each is a dict of settings plus ``train_examples``."""
    _check_task(task)
    baseline = {f.name: f.default for f in fields(MAD_TASKS[task][0])}
    baseline["train_examples"] = MAD_TRAIN_EXAMPLES[task]
    grid = [dict(baseline)]
    for name, values in MAD_DIFFICULTY[task].items():
        grid += [{**baseline, name: v} for v in values]
    return grid


def mad_score(accuracies: Mapping[str, float]) -> float:
    """The suite's score: the mean accuracy over the six tasks.

    ``accuracies`` maps every task of :data:`MAD_TASK_NAMES` to its score (its test accuracy; in the
    full protocol the mean over :func:`mad_benchmark_grid` of the best run of the learning-rate x
    weight-decay sweep)."""
    missing = [t for t in MAD_TASK_NAMES if t not in accuracies]
    unknown = sorted(set(accuracies) - set(MAD_TASK_NAMES))
    if missing or unknown:
        raise ValueError(f"mad_score needs exactly the six MAD tasks; missing {missing}, unknown {unknown}")
    return float(np.mean([float(accuracies[t]) for t in MAD_TASK_NAMES]))


# -- datasets -------------------------------------------------------------------------------------------------
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of example ``index`` of ``split``: seeded by ``(seed, split code, index)``, so the
    splits draw from disjoint seeds whatever ``seed`` is."""
    return np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])


class MADDataset(torch.utils.data.Dataset):
    """``size`` examples of ``task`` for ``split``, generated once when built; example ``i`` is
    ``generate(task, settings, example_rng(seed, split, i), train=split == "train")``.

    Items are dicts of ``tokens``, ``targets`` (int64) and ``scored`` (bool), each ``[T]``."""

    def __init__(self, task: str, settings, size: int, seed: int, split: str):
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.task, self.settings, self.seed, self.split = task, settings, seed, split
        T = settings.input_length
        tokens = np.empty((size, T), dtype=np.int64)
        targets = np.empty((size, T), dtype=np.int64)
        scored = np.empty((size, T), dtype=bool)
        for i in range(size):
            ex = generate(task, settings, example_rng(seed, split, i), train=split == "train")
            tokens[i], targets[i], scored[i] = ex
        self.tokens, self.targets = torch.from_numpy(tokens), torch.from_numpy(targets)
        self.scored = torch.from_numpy(scored)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return {"tokens": self.tokens[index], "targets": self.targets[index], "scored": self.scored[index]}

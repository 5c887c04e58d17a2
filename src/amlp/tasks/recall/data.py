"""Synthetic in-context recall data: the copying task and multi-query associative recall (MQAR).

Every example is a pure function of ``(seed, index)``: example ``i`` of a split is drawn from its
own generator seeded with ``seed * 1_000_003 + i``. The training split is a long range of indices
that the loop visits in a shuffled order, so every batch holds fresh random examples and the run is
deterministic given the seed and the step; validation and test splits are fixed sets drawn from
other seeds.

Token sequences come as ``tokens`` (the model input, the full sequence without its last token) and
``targets`` (the full sequence shifted by one), with :data:`IGNORE_INDEX` wherever no loss is taken.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

# -- copying (CausalRN / Jelassi et al. protocol, the CausalRN code's src_copying) ---------------------
BOS, SEP, EOS = 0, 1, 2
FIRST_LETTER = 3
COPY_VOCAB_SIZE = 29  # BOS, SEP, EOS and 26 letters


def copy_length(string_len: int) -> int:
    """Length of the model input for strings of ``string_len`` letters: ``2 * (S + 1)``."""
    return 2 * (string_len + 1)


def copy_sequence(string: torch.Tensor) -> torch.Tensor:
    """The full sequence ``[BOS, s_1..s_S, SEP, s_1..s_S, EOS]`` (length ``2S + 3``) of ``string`` [S]."""
    one = string.new_tensor
    return torch.cat([one([BOS]), string, one([SEP]), string, one([EOS])])


def copy_example(string: torch.Tensor, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Input, targets and mask of one copying example.

    ``tokens`` is the full sequence without its last token, ``targets`` the full sequence without its
    first: the loss is taken only where a copied letter or the final EOS is predicted (input
    positions ``S+1 .. 2S+1``), everything else is :data:`IGNORE_INDEX`. With ``pad_to`` the three
    are padded on the right to that length (tokens 0, targets ignored, mask False).

    Example (S = 2, string "ab" = [3, 4])::

        full    = [BOS, 3, 4, SEP, 3, 4, EOS]
        tokens  = [BOS, 3, 4, SEP, 3, 4]          # = [0, 3, 4, 1, 3, 4]
        targets = [-100, -100, -100, 3, 4, EOS]   # = [-100, -100, -100, 3, 4, 2]
    """
    S = string.shape[0]
    full = copy_sequence(string.long())
    tokens, targets = full[:-1].clone(), full[1:].clone()
    targets[:S + 1] = IGNORE_INDEX
    mask = torch.ones_like(tokens, dtype=torch.bool)
    length = torch.tensor(S)
    if pad_to is not None:
        extra = pad_to - tokens.shape[0]
        if extra < 0:
            raise ValueError(f"a string of {S} letters needs {tokens.shape[0]} positions, more than pad_to={pad_to}")
        tokens = torch.cat([tokens, tokens.new_zeros(extra)])
        targets = torch.cat([targets, targets.new_full((extra,), IGNORE_INDEX)])
        mask = torch.cat([mask, mask.new_zeros(extra)])
    return {"tokens": tokens, "targets": targets, "mask": mask, "length": length}


def example_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


class CopyingDataset(torch.utils.data.Dataset):
    """``size`` copying examples; example ``i`` has a uniform random length in ``lengths`` (or the one
    length) and uniform random letters, drawn from its own seeded generator.

    Args:
        size: number of examples.
        lengths: the string lengths to draw from (uniformly).
        seed: seed of the split.
        pad_to: pad every example on the right to this input length (default: that of the longest length).
    """

    def __init__(self, size: int, lengths: list[int] | tuple[int, ...], seed: int, pad_to: int | None = None):
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if not lengths or any(n < 1 for n in lengths):
            raise ValueError(f"lengths must be a non-empty list of positive ints, got {lengths!r}")
        self.size, self.lengths, self.seed = size, list(lengths), seed
        self.pad_to = pad_to if pad_to is not None else copy_length(max(self.lengths))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        g = example_generator(self.seed, index)
        if len(self.lengths) == 1:
            S = self.lengths[0]
        else:
            S = self.lengths[int(torch.randint(len(self.lengths), (1,), generator=g))]
        string = torch.randint(FIRST_LETTER, COPY_VOCAB_SIZE, (S,), generator=g)
        return copy_example(string, self.pad_to)


def copy_hard_accuracy(generated: torch.Tensor, strings: torch.Tensor) -> torch.Tensor:
    """Per-sample hard accuracy of greedy copies (scored as in the CausalRN code's ``src_copying``).

    Args:
        generated: ``[B, S+1]``, the tokens produced after ``[BOS, s, SEP]``.
        strings: ``[B, S]``, the strings to copy.

    Returns ``[B]``: the fraction of the S copied positions that are correct, forced to 0 when the
    last generated token is not EOS or when EOS appears inside the copy span.
    """
    if generated.dim() != 2 or strings.dim() != 2 or generated.shape != (strings.shape[0], strings.shape[1] + 1):
        raise ValueError(f"generated must be [B, S+1] for strings [B, S]; got {tuple(generated.shape)} and "
                         f"{tuple(strings.shape)}")
    copy = generated[:, :-1]
    frac = (copy == strings).double().mean(dim=1) if strings.shape[1] else generated.new_ones(
        generated.shape[0], dtype=torch.float64)
    valid = (generated[:, -1] == EOS) & ~(copy == EOS).any(dim=1)
    return torch.where(valid, frac, torch.zeros_like(frac))


# -- multi-query associative recall (zoology protocol) ------------------------------------------------
def mqar_sequence(keys: torch.Tensor, values: torch.Tensor, gaps: torch.Tensor, seq_len: int,
                  filler: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and targets of one MQAR example from explicit choices.

    The full sequence has ``seq_len + 1`` tokens: first the P key-value pairs ``k_1 v_1 .. k_P v_P``,
    then a query region in which key ``k_i`` is repeated at full-sequence position
    ``2P + 2 * gaps[i]``; every other position of the region holds a filler token (0, or the
    matching entry of ``filler``). The model input is the full sequence without its last token, the
    targets are the full sequence shifted by one with only the query positions kept: at input
    position ``2P + 2 * gaps[i]`` (the query ``k_i``) the target is ``v_i``; everywhere else
    :data:`IGNORE_INDEX`.

    Worked example (vocabulary 8: keys from 1..3, values from 4..7; P = 2, seq_len = 8)::

        keys = [3, 1], values = [5, 6], gaps = [1, 0], no filler
        full    = [3, 5, 1, 6,  1, 0, 3, 0, 0]        # pairs (3->5) (1->6); queries 1 at 4, 3 at 6
        tokens  = [3, 5, 1, 6,  1, 0, 3, 0]
        targets = [-100, -100, -100, -100,  6, -100, 5, -100]

    Args:
        keys, values: ``[P]`` ints.
        gaps: ``[P]`` distinct ints in ``[0, (seq_len - 2P) // 2)``.
        seq_len: length of the model input.
        filler: ``[seq_len + 1 - 2P]`` tokens for the non-query positions of the region (default 0).
    """
    P = keys.shape[0]
    space = (seq_len - 2 * P) // 2
    if values.shape != (P,) or gaps.shape != (P,):
        raise ValueError(f"keys, values and gaps must all be [P]; got {tuple(keys.shape)}, "
                         f"{tuple(values.shape)}, {tuple(gaps.shape)}")
    if P and (int(gaps.min()) < 0 or int(gaps.max()) >= space or gaps.unique().numel() != P):
        raise ValueError(f"gaps must be {P} distinct ints in [0, {space}), got {gaps.tolist()}")
    region_len = seq_len + 1 - 2 * P
    region = torch.zeros(region_len, dtype=torch.long) if filler is None else filler.long().clone()
    if region.shape != (region_len,):
        raise ValueError(f"filler must hold {region_len} tokens, got {tuple(region.shape)}")
    pairs = torch.stack([keys.long(), values.long()], dim=1).reshape(-1)
    region[2 * gaps.long()] = keys.long()
    full = torch.cat([pairs, region])
    labels = torch.full_like(full, IGNORE_INDEX)
    labels[2 * P + 2 * gaps.long() + 1] = values.long()
    return full[:-1], labels[1:]


def check_mqar_sizes(vocab_size: int, num_pairs: int, seq_len: int, prefix: str = "") -> None:
    """Raise ValueError (naming ``prefix``-ed config keys) if the sizes cannot hold an example."""
    p = prefix
    if num_pairs < 1:
        raise ValueError(f"config key '{p}num_pairs' must be >= 1, got {num_pairs}")
    if vocab_size // 2 - 1 < num_pairs or vocab_size - vocab_size // 2 < num_pairs:
        raise ValueError(f"config key '{p}vocab_size' ({vocab_size}) is too small for {num_pairs} distinct keys "
                         f"and values (needs vocab_size >= {2 * num_pairs + 2})")
    if (seq_len - 2 * num_pairs) // 2 < num_pairs:
        raise ValueError(f"config key '{p}seq_len' ({seq_len}) is too short for {num_pairs} pairs and their "
                         f"queries (needs seq_len >= {4 * num_pairs})")


def mqar_gap_weights(space: int, power_a: float) -> torch.Tensor:
    """Sampling weights of the query gaps ``g = 0 .. space-1``: ``(g + 1) ** (power_a - 1)``
    (a power law; ``power_a < 1`` favours short gaps, as in zoology's ``power_a = 0.01``)."""
    return torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1.0)


class MQARDataset(torch.utils.data.Dataset):
    """``size`` MQAR examples (zoology's multi-query associative recall).

    Keys are drawn without replacement from ``1 .. V/2 - 1``, values without replacement from
    ``V/2 .. V - 1``, the query gaps without replacement with the power-law weights of
    :func:`mqar_gap_weights`; with ``random_filler`` the non-query positions of the query region
    hold uniform random tokens instead of 0. See :func:`mqar_sequence` for the layout.
    """

    def __init__(self, size: int, *, vocab_size: int, num_pairs: int, seq_len: int, power_a: float, seed: int,
                 random_filler: bool = True):
        check_mqar_sizes(vocab_size, num_pairs, seq_len)
        if power_a <= 0:
            raise ValueError(f"power_a must be > 0, got {power_a}")
        self.size, self.vocab_size, self.num_pairs, self.seq_len = size, vocab_size, num_pairs, seq_len
        self.power_a, self.seed, self.random_filler = power_a, seed, random_filler
        self.gap_weights = mqar_gap_weights((seq_len - 2 * num_pairs) // 2, power_a)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        g = example_generator(self.seed, index)
        V, P, half = self.vocab_size, self.num_pairs, self.vocab_size // 2
        keys = torch.randperm(half - 1, generator=g)[:P] + 1
        values = torch.randperm(V - half, generator=g)[:P] + half
        gaps = torch.multinomial(self.gap_weights, P, replacement=False, generator=g)
        filler = None
        if self.random_filler:
            filler = torch.randint(V, (self.seq_len + 1 - 2 * P,), generator=g)
        tokens, targets = mqar_sequence(keys, values, gaps, self.seq_len, filler)
        return {"tokens": tokens, "targets": targets, "mask": torch.ones_like(tokens, dtype=torch.bool)}

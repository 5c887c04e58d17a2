"""Decoding for the translation models: AR greedy and beam search through the decoder's recurrent
``step``, the AR teacher-forced reference, and the NAR pass of GLAT with a length beam and optional
mask-predict iterations.

Every function returns one list of token ids per source row, without BOS, EOS or padding.
"""

from __future__ import annotations

import torch

from .translation import BOS, EOS, GLAT, PAD, TransformerMT

_NEG = -1e9
#: ids that are never produced (the decoder may still emit EOS in the AR model)
_AR_BANNED = (PAD, BOS)
_NAR_BANNED = (PAD, BOS, EOS)


def _ban(logits: torch.Tensor, ids) -> torch.Tensor:
    logits = logits.clone()
    logits[..., list(ids)] = float("-inf")
    return logits


def _most_likely(logits: torch.Tensor, banned) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability, id) of the most likely allowed token at every position, without a second
    vocabulary-sized copy of the logits (they are changed in place)."""
    logits = logits.float()
    logits[..., list(banned)] = float("-inf")
    best, tokens = logits.max(-1)
    return best - torch.logsumexp(logits, -1), tokens


def _strip(row: list[int]) -> list[int]:
    out = []
    for t in row:
        if t == EOS:
            break
        if t not in (PAD, BOS):
            out.append(t)
    return out


def _limits(src_mask: torch.Tensor, model, max_len_a: float, max_len_b: int) -> torch.Tensor:
    """Tokens (EOS included) each row may produce: ``max_len_a * its source length + max_len_b``, at most
    the model's positions. Per row, so that a translation does not depend on its batch."""
    lengths = src_mask.sum(1).to(torch.float64)
    return (max_len_a * lengths + max_len_b).floor().long().clamp(1, model.max_length)


@torch.no_grad()
def ar_greedy(model: TransformerMT, src: torch.Tensor, src_mask: torch.Tensor, *, max_len_a: float = 1.2,
              max_len_b: int = 10) -> list[list[int]]:
    """Greedy decoding through ``model.step``; at most ``max_len_a * S + max_len_b`` tokens, EOS included
    (the last one is always EOS)."""
    B = src.shape[0]
    memory = model.encode(src, src_mask)
    state = model.init_state(B, device=src.device)
    token = torch.full((B,), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    out = []
    limits = _limits(src_mask, model, max_len_a, max_len_b)
    for t in range(int(limits.max())):
        logits, state = model.step(token, state, memory, src_mask)
        token = _ban(logits.float(), _AR_BANNED).argmax(-1)
        # a row's last step ends its sentence, as in beam search
        token = torch.where(limits - 1 == t, torch.full_like(token, EOS), token)
        token = torch.where(done, torch.full_like(token, PAD), token)
        out.append(token)
        done |= token == EOS
        if bool(done.all()):
            break
    rows = torch.stack(out, 1).tolist() if out else [[] for _ in range(B)]
    return [_strip(r) for r in rows]


@torch.no_grad()
def ar_teacher_forced_argmax(model: TransformerMT, src, src_mask, hyps: list[list[int]]) -> list[list[int]]:
    """The argmax of the full teacher-forced forward on ``[BOS] + hyp`` at each position of ``hyp``
    (the reference that step-by-step decoding must agree with: it equals ``hyp``)."""
    B = src.shape[0]
    T = max(len(h) for h in hyps) + 1
    tgt_in = torch.full((B, T), PAD, dtype=torch.long, device=src.device)
    for b, h in enumerate(hyps):
        tgt_in[b, 0] = BOS
        tgt_in[b, 1:len(h) + 1] = torch.tensor(h, dtype=torch.long)
    mask = tgt_in != PAD
    logits = _ban(model(src, src_mask, tgt_in, mask).float(), _AR_BANNED)
    pred = logits.argmax(-1).tolist()
    return [pred[b][:len(h)] for b, h in enumerate(hyps)]


@torch.no_grad()
def beam_search(model: TransformerMT, src: torch.Tensor, src_mask: torch.Tensor, *, beam: int = 4,
                length_penalty: float = 1.0, max_len_a: float = 1.2, max_len_b: int = 10) -> list[list[int]]:
    """Beam search through ``model.step``.

    At every step the ``2 * beam`` best extensions of the live hypotheses are ranked by total
    log-probability; an extension ending in EOS among the first ``beam`` is finished, the best
    non-EOS extensions fill the ``beam`` live slots. A sentence stops once it has ``beam`` finished
    hypotheses (or at the length limit, where the live ones are finished with EOS). The answer is the
    finished hypothesis with the best ``sum log p / length ** length_penalty`` (length counting EOS,
    as fairseq). With ``beam=1`` this is exactly greedy decoding.
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    B, K, device = src.shape[0], beam, src.device
    memory = model.encode(src, src_mask)
    rows = torch.arange(B, device=device).repeat_interleave(K)
    memory, mask = memory.index_select(0, rows), src_mask.index_select(0, rows)
    state = model.init_state(B * K, device=device)
    scores = torch.full((B, K), _NEG, device=device)
    scores[:, 0] = 0.0  # one live hypothesis at the start, so the beam does not hold K copies
    tokens = torch.full((B * K, 1), BOS, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    limits = _limits(src_mask, model, max_len_a, max_len_b)
    last = (limits - 1).repeat_interleave(K)                                   # per beam row
    for t in range(int(limits.max())):
        logits, state = model.step(tokens[:, -1], state, memory, mask)
        logp = torch.log_softmax(_ban(logits.float(), _AR_BANNED), -1)
        V = logp.shape[-1]
        ending = last == t  # a sentence's last step: only EOS may follow
        if bool(ending.any()):
            forced = torch.full_like(logp, float("-inf"))
            forced[:, EOS] = logp[:, EOS]
            logp = torch.where(ending[:, None], forced, logp)
        total = (scores.reshape(-1, 1) + logp).reshape(B, K * V)
        top_scores, top_index = total.topk(min(2 * K, K * V), dim=1)
        next_scores = torch.full((B, K), _NEG, device=device)
        origin = torch.zeros((B, K), dtype=torch.long, device=device)
        next_token = torch.full((B, K), PAD, dtype=torch.long, device=device)
        top_scores_l, top_index_l = top_scores.tolist(), top_index.tolist()
        for b in range(B):
            if done[b]:
                continue
            slot = 0
            for rank, (s, idx) in enumerate(zip(top_scores_l[b], top_index_l[b])):
                if s <= _NEG / 2:
                    break
                k, v = divmod(idx, V)
                if v == EOS:
                    if rank < K and len(finished[b]) < K:
                        hyp = tokens[b * K + k, 1:].tolist()
                        finished[b].append((s / (len(hyp) + 1) ** length_penalty, hyp))
                    continue
                if slot < K:
                    next_scores[b, slot], origin[b, slot], next_token[b, slot] = s, k, v
                    slot += 1
                if slot == K:
                    break
            if len(finished[b]) >= K or slot == 0:
                done[b] = True
        if all(done):
            break
        index = (torch.arange(B, device=device)[:, None] * K + origin).reshape(-1)
        tokens = torch.cat([tokens.index_select(0, index), next_token.reshape(-1, 1)], dim=1)
        state = model.reorder_state(state, index)
        scores = next_scores
        for b in range(B):
            if done[b]:
                scores[b] = _NEG
    out = []
    for b in range(B):
        best = max(finished[b], key=lambda item: item[0])[1] if finished[b] else []
        out.append(_strip(best))
    return out


@torch.no_grad()
def nar_decode(model: GLAT, src: torch.Tensor, src_mask: torch.Tensor, *, length_beam: int = 3,
               iterations: int = 1, collapse_repeats: bool = False) -> list[list[int]]:
    """GLAT decoding: the ``length_beam`` most likely target lengths, one parallel pass each, and the
    candidate with the best mean token log-probability (no AR re-ranking).

    ``iterations > 1`` adds mask-predict (Ghazvininejad et al. 2019, CMLM): at iteration ``i`` (1-based,
    after the first pass) the ``floor(L * (N - i) / N)`` least confident tokens go back to their copied
    source embeddings and are predicted again, the rest are given to the decoder as revealed tokens.

    ``collapse_repeats`` turns every run of one token into a single token in the chosen output (the
    candidate is chosen before, on the uncollapsed pass).
    """
    if length_beam < 1 or iterations < 1:
        raise ValueError(f"length_beam and iterations must be >= 1, got {length_beam} and {iterations}")
    B, device = src.shape[0], src.device
    memory = model.encode(src, src_mask)
    length_logits = model.length_logits(memory, src_mask).float()
    length_logits[:, 0] = float("-inf")
    k = min(length_beam, model.max_length)
    lengths = length_logits.topk(k, dim=1).indices.reshape(-1)                       # [B * k]
    rows = torch.arange(B, device=device).repeat_interleave(k)
    src_k, mask_k, memory_k = src[rows], src_mask[rows], memory[rows]
    T = int(lengths.max())
    tgt_mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    logits, _ = model(src_k, mask_k, tgt_mask, memory=memory_k)
    probs, tokens = _most_likely(logits, _NAR_BANNED)
    del logits
    for i in range(1, iterations):
        n_mask = (lengths.double() * (iterations - i) / iterations).floor().long()
        confidence = torch.where(tgt_mask, probs, torch.full_like(probs, float("inf")))
        order = confidence.argsort(dim=1)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(T, device=device).expand_as(order))
        remask = (rank < n_mask[:, None]) & tgt_mask
        if not bool(remask.any()):
            break
        logits, _ = model(src_k, mask_k, tgt_mask, revealed=~remask & tgt_mask, tgt=tokens, memory=memory_k)
        new_probs, new_tokens = _most_likely(logits, _NAR_BANNED)
        del logits
        tokens = torch.where(remask, new_tokens, tokens)
        probs = torch.where(remask, new_probs, probs)
    mean_logp = torch.where(tgt_mask, probs, torch.zeros_like(probs)).sum(1) / lengths.clamp_min(1)
    best = mean_logp.reshape(B, k).argmax(1)
    chosen = torch.arange(B, device=device) * k + best
    out_tokens, out_lengths = tokens[chosen].tolist(), lengths[chosen].tolist()
    out = [row[:n] for row, n in zip(out_tokens, out_lengths)]
    return [collapse_runs(row) for row in out] if collapse_repeats else out


def collapse_runs(tokens: list[int]) -> list[int]:
    """``tokens`` with every run of one repeated token reduced to one: ``[5, 5, 7, 5]`` → ``[5, 7, 5]``."""
    return [t for i, t in enumerate(tokens) if i == 0 or tokens[i - 1] != t]

"""Sampling through the decoder's recurrent step: greedy against the parallel forward, top-k / nucleus
filtering, streaming, the window refresh past the learned positions, step against forward inside the
LM for every causal mixer, and the optional Hugging Face wrapper against the project's own decoding."""

import math

import pytest
import torch

from amlp.layers import get_mixer_info, mixer_names
from amlp.models.decoder import DecoderLM, greedy_decode, greedy_decode_full
from amlp.models.generation import GenerationResult, filter_logits, generate, sample_logits

from conftest import chosen


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lm_options(mixer, length):
    opts = chosen(mixer)
    length_option = get_mixer_info(mixer).capabilities.max_length_option
    if length_option:
        opts[length_option] = length
    if mixer.startswith("hyper"):
        opts["max_lag"] = 16
    return opts


def tiny_lm(mixer="softmax", vocab=13, length=24, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    heads = 1 if mixer.startswith("causal-rn") else 2
    model = DecoderLM(vocab, length, dim=16, heads=heads, n_layers=2, mixer=mixer,
                      mixer_options=lm_options(mixer, length), embed_init_std=1.0)
    return model.to(dtype).eval()


# -- greedy ---------------------------------------------------------------------------------------------
def test_temperature_zero_is_deterministic_and_equals_greedy_argmax_of_the_forward():
    model = tiny_lm()
    prompt = torch.randint(0, 13, (3, 5), generator=torch.Generator().manual_seed(1))
    first = generate(model, prompt, 12, temperature=0.0)
    torch.manual_seed(123)  # the global generator does not matter at temperature 0
    second = generate(model, prompt, 12, temperature=0.0, top_k=3, top_p=0.5)
    assert isinstance(first, GenerationResult) and first.ids.shape == (3, 12)
    assert torch.equal(first.ids, second.ids)
    assert torch.equal(first.ids, greedy_decode_full(model, prompt, 12))  # re-running the parallel forward
    assert torch.equal(first.ids, greedy_decode(model, prompt, 12))
    # by hand: the first new token is the argmax of the forward's last logits
    assert torch.equal(first.ids[:, 0], model(prompt)[:, -1].argmax(-1))
    assert first.tokens_per_second > 0 and first.seconds >= 0 and first.prompt_seconds >= 0
    ids, rate, *_ = first  # unpacks as (ids, tokens/s, ...)
    assert ids is first.ids and rate == first.tokens_per_second


def test_one_dimensional_prompt_gives_one_dimensional_ids_and_leaves_the_mode_alone():
    model = tiny_lm().train()
    prompt = torch.tensor([1, 2, 3])
    out = generate(model, prompt, 6, temperature=0)
    assert out.ids.shape == (6,)
    assert torch.equal(out.ids, greedy_decode_full(model.eval(), prompt[None], 6)[0])
    model.train()
    generate(model, prompt, 2, temperature=0)
    assert model.training  # put back as it was
    assert generate(model, prompt, 0).ids.shape == (0,)


def test_top_k_one_equals_greedy_whatever_the_temperature():
    model = tiny_lm(seed=3)
    prompt = torch.randint(0, 13, (4, 3), generator=torch.Generator().manual_seed(2))
    greedy = generate(model, prompt, 15, temperature=0).ids
    for temperature in (0.5, 1.0, 3.0):
        sampled = generate(model, prompt, 15, temperature=temperature, top_k=1,
                           generator=torch.Generator().manual_seed(9)).ids
        assert torch.equal(sampled, greedy)


# -- sampling -------------------------------------------------------------------------------------------
def test_sampling_follows_the_seed_and_differs_between_seeds():
    model = tiny_lm(seed=4)
    prompt = torch.tensor([[0, 1], [2, 3]])
    a = generate(model, prompt, 20, generator=torch.Generator().manual_seed(0)).ids
    b = generate(model, prompt, 20, generator=torch.Generator().manual_seed(0)).ids
    c = generate(model, prompt, 20, generator=torch.Generator().manual_seed(1)).ids
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_filter_logits_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    inf = -math.inf
    assert filter_logits(logits, top_k=2).isinf().tolist() == [[False, False, True, True, True]]
    # nucleus: 0.5 < 0.6 so the second token is needed; 0.5 + 0.2 >= 0.6, the rest goes
    kept = ~filter_logits(logits, top_p=0.6).isinf()
    assert kept.tolist() == [[True, True, False, False, False]]
    assert (~filter_logits(logits, top_p=0.5).isinf()).sum() == 1  # exactly reached: the top token alone
    assert (~filter_logits(logits, top_p=0.1).isinf()).tolist() == [[True, False, False, False, False]]
    assert not filter_logits(logits, top_p=1.0).isinf().any()
    both = filter_logits(logits, top_k=3, top_p=0.9)  # the top 3 hold 0.85 < 0.9: all three stay
    assert (~both.isinf()).tolist() == [[True, True, True, False, False]]
    # rows are filtered independently, in any order of the vocabulary
    two = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.7, 0.2, 0.1]]))
    assert (~filter_logits(two, top_p=0.8).isinf()).tolist() == [[False, True, True], [True, True, False]]
    assert filter_logits(two, top_k=1)[0].tolist()[0] == inf


def test_sampled_tokens_stay_in_the_nucleus_and_the_frequencies_follow_the_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    tokens = sample_logits(logits, 1.0, top_p=0.75, generator=g)
    assert set(tokens.tolist()) == {0, 1}
    freq = torch.bincount(tokens, minlength=4).double() / 4000
    torch.testing.assert_close(freq[:2], torch.tensor([0.625, 0.375], dtype=torch.float64), atol=0.03, rtol=0)
    plain = torch.bincount(sample_logits(logits, 1.0, generator=g), minlength=4).double() / 4000
    torch.testing.assert_close(plain, probs.double(), atol=0.03, rtol=0)


def test_stream_gets_every_token_in_order():
    model = tiny_lm(seed=5)
    seen, rows = [], []
    out = generate(model, torch.tensor([4, 5]), 9, temperature=0.7, generator=torch.Generator().manual_seed(3),
                   stream=seen.append)
    assert seen == out.ids.tolist() and all(isinstance(t, int) for t in seen)
    batch = generate(model, torch.tensor([[4, 5], [6, 7]]), 5, temperature=0, stream=rows.append)
    assert torch.equal(torch.stack(rows, 1), batch.ids)


def test_bad_arguments_are_refused():
    model = tiny_lm()
    p = torch.tensor([1, 2])
    for kwargs, needle in [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"),
                           ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                           ({"refresh_keep": 24}, "refresh_keep")]:
        with pytest.raises(ValueError, match=needle):
            generate(model, p, 3, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, p, -1)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, torch.zeros(0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="prompt ids"):
        generate(model, torch.tensor([13]), 3)
    with pytest.raises(ValueError, match="integer tensor"):
        generate(model, torch.zeros(2, 3), 3)


# -- past the learned positions ------------------------------------------------------------------------
def windowed_greedy_reference(model, prompt, new_tokens, keep):
    """Greedy decoding by re-running the parallel forward on the current window: when a token has no
    position left, the window becomes the last `keep` tokens before it and that token."""
    seq, start, out = prompt.tolist(), 0, []
    limit = model.max_length
    for i in range(len(seq)):
        if i - start >= limit:
            start = i - keep
    for _ in range(new_tokens):
        token = int(model(torch.tensor([seq[start:]]))[0, -1].argmax())
        out.append(token)
        seq.append(token)
        if len(seq) - 1 - start >= limit:
            start = len(seq) - 1 - keep
    return out


@pytest.mark.parametrize("keep", [None, 0, 5])
def test_context_refreshes_past_the_learned_positions(keep):
    model = tiny_lm(length=8, seed=6)
    prompt = torch.randint(0, 13, (11,), generator=torch.Generator().manual_seed(4))  # longer than 8 already
    out = generate(model, prompt, 20, temperature=0, refresh_keep=keep)
    assert out.ids.tolist() == windowed_greedy_reference(model, prompt, 20, 4 if keep is None else keep)


# -- step against forward in the LM, every causal mixer -------------------------------------------------
@pytest.mark.parametrize("mixer", mixer_names(causal=True))
def test_step_decoding_equals_the_parallel_forward_in_the_lm(mixer):
    model = tiny_lm(mixer, length=12, seed=7)
    tokens = torch.randint(0, 13, (2, 12), generator=torch.Generator().manual_seed(5))
    full = model(tokens)
    state = model.init_state(2, dtype=torch.float64)
    steps = []
    for t in range(12):
        logits, state = model.step(tokens[:, t], state)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-8, atol=1e-9)
    # and so greedy generation through the step equals greedy re-running of the forward
    assert torch.equal(generate(model, tokens[:, :4], 8, temperature=0).ids, greedy_decode_full(model, tokens[:, :4], 8))


# -- the Hugging Face wrapper (optional) -----------------------------------------------------------------
@pytest.mark.parametrize("mixer", ["softmax", "amlp-cov", "hyper-mlp"])
def test_hf_greedy_generate_equals_step_decoding(mixer, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoModelForCausalLM

    from amlp.hf import AmlpLMConfig, AmlpForCausalLM

    lm = tiny_lm(mixer, length=32, seed=8, dtype=torch.float32)
    hf = AmlpForCausalLM.from_decoder(lm, lm_options(mixer, 32), vocab_chars="abcdefghijklm").eval()
    prompt = torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(6))
    ours = generate(lm, prompt, 10, temperature=0).ids
    ones = torch.ones_like(prompt)  # every id is a character: nothing is padding
    out = hf.generate(prompt, attention_mask=ones, max_new_tokens=10, do_sample=False)
    assert torch.equal(out[:, 5:], ours)
    # beam search reorders the state with the beams: the scores are the forward's log-probabilities
    beams = hf.generate(prompt, attention_mask=ones, max_new_tokens=6, num_beams=3, do_sample=False,
                        length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        logp = torch.log_softmax(lm(beams.sequences), -1)[:, 4:-1]
    torch.testing.assert_close(logp.gather(-1, beams.sequences[:, 5:, None]).sum((1, 2)), beams.sequences_scores)
    # the parallel forward of the wrapper is the model's, and the loss is the shifted next-token NLL
    full = hf(prompt, labels=prompt)
    torch.testing.assert_close(full.logits, lm(prompt))
    manual = torch.nn.functional.cross_entropy(lm(prompt)[:, :-1].reshape(-1, 13), prompt[:, 1:].reshape(-1))
    torch.testing.assert_close(full.loss, manual)
    # save_pretrained / from_pretrained (safetensors), through the Auto classes
    hf.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "m"), AmlpLMConfig)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert isinstance(again, AmlpForCausalLM) and again.config.vocab_chars == "abcdefghijklm"
    assert torch.equal(again.generate(prompt, attention_mask=ones, max_new_tokens=10, do_sample=False)[:, 5:], ours)
    if mixer == "hyper-mlp":  # options a model cannot tell from its weights must be given
        with pytest.raises(ValueError, match="mixer_options"):
            AmlpForCausalLM.from_decoder(lm, {**lm_options(mixer, 32), "conv_kernel": 4, "sequence_mixing": "qk"})

"""TTS acoustic models: the length regulator, FastSpeech 2 and Transformer-TTS (masks, padding,
step decoding, mixer sites, overfitting two utterances)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from amlp.models.tts import PAD, FastSpeech2, TransformerTTS, length_regulate

torch.set_num_threads(1)

N_MELS = 8
V = 20


def _fs2(**kwargs):
    torch.manual_seed(0)
    opts = dict(dim=16, heads=2, ffn_dim=32, encoder_layers=1, decoder_layers=1, variance_dim=16, bins=16,
                postnet_layers=3, postnet_dim=16, max_phones=16, max_frames=64, dropout=0.0,
                variance_dropout=0.0, postnet_dropout=0.0)
    opts.update(kwargs)
    return FastSpeech2(V, N_MELS, **opts)


def _tts(**kwargs):
    torch.manual_seed(0)
    opts = dict(dim=16, heads=2, ffn_dim=32, encoder_layers=1, decoder_layers=2, encoder_prenet_layers=1,
                prenet_dim=16, postnet_layers=3, postnet_dim=16, max_phones=16, max_frames=48, dropout=0.0,
                postnet_dropout=0.0)
    opts.update(kwargs)
    return TransformerTTS(V, N_MELS, **opts)


def _batch():
    """Two utterances: 6 phones and 4 phones (+2 padding); durations, pitch, energy per phone."""
    g = torch.Generator().manual_seed(1)
    phones = torch.randint(1, V, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    phones[1, 4:], mask[1, 4:] = PAD, False
    durations = torch.tensor([[2, 1, 0, 3, 2, 1], [1, 3, 2, 1, 0, 0]])
    pitch = torch.randn(2, 6, generator=g)
    energy = torch.randn(2, 6, generator=g)
    return phones, mask, durations, pitch, energy


def _smooth_mel(T: int, phase: float) -> torch.Tensor:
    t = torch.arange(T, dtype=torch.float32)[:, None]
    f = torch.arange(N_MELS, dtype=torch.float32)[None, :]
    return torch.sin(0.3 * t + 0.7 * f + phase) * 0.8 + 0.1 * torch.cos(0.11 * t * (f + 1))


def _frames(durations: torch.Tensor):
    """Smooth synthetic mels ``[B, T, N_MELS]`` and frame masks for the durations."""
    totals = durations.sum(1)
    T = int(totals.max())
    mel = torch.stack([_smooth_mel(T, 1.3 * b) for b in range(durations.shape[0])])
    mask = torch.arange(T)[None, :] < totals[:, None]
    return torch.where(mask[..., None], mel, torch.zeros(())), mask


# -- length regulator -----------------------------------------------------------------------------------
def _regulate_loop(x, durations):
    rows = []
    for b in range(x.shape[0]):
        rows.append([x[b, i] for i in range(x.shape[1]) for _ in range(int(durations[b, i]))])
    T = max(len(r) for r in rows)
    out = torch.zeros(x.shape[0], T, x.shape[2])
    mask = torch.zeros(x.shape[0], T, dtype=torch.bool)
    for b, r in enumerate(rows):
        for t, v in enumerate(r):
            out[b, t], mask[b, t] = v, True
    return out, mask


def test_length_regulate_matches_a_loop_with_zero_durations_and_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 5, generator=g)
    durations = torch.randint(0, 4, (4, 7), generator=g)
    durations[1, 5:] = 0  # padding phones
    x[1, 5:] = float("nan")  # what padding holds reaches nothing
    durations[2, :3] = 0  # leading zero durations
    durations[3] = torch.tensor([0, 0, 5, 0, 0, 1, 0])
    y, mask = length_regulate(x, durations)
    ref, ref_mask = _regulate_loop(torch.nan_to_num(x, nan=123.0), durations)
    assert torch.equal(mask, ref_mask)
    assert torch.equal(y, ref)
    assert torch.equal(mask.sum(1), durations.sum(1))
    y2, mask2 = length_regulate(x, durations, max_frames=40)
    assert y2.shape == (4, 40, 5) and torch.equal(y2[:, : y.shape[1]], y) and not y2[:, y.shape[1]:].any()
    assert torch.equal(mask2[:, : y.shape[1]], mask)
    with pytest.raises(ValueError, match="max_frames"):
        length_regulate(x, durations, max_frames=int(durations.sum(1).max()) - 1)
    with pytest.raises(ValueError, match=">= 0"):
        length_regulate(x, -durations - 1)
    with pytest.raises(ValueError, match="integer"):
        length_regulate(x, durations.float())


# -- FastSpeech 2 ---------------------------------------------------------------------------------------
def test_fastspeech2_shapes_masks_and_durations():
    model = _fs2()
    phones, mask, durations, pitch, energy = _batch()
    out = model(phones, mask, durations, pitch, energy)
    T = int(durations.sum(1).max())
    assert out["mel"].shape == out["mel_post"].shape == (2, T, N_MELS)
    assert torch.equal(out["frame_mask"].sum(1), durations.sum(1))
    for key in ("log_duration", "pitch", "energy"):
        assert out[key].shape == (2, 6) and not out[key][~mask].any()
    assert not out["mel"][~out["frame_mask"]].any() and not out["mel_post"][~out["frame_mask"]].any()
    # durations given at padded phones are ignored
    noisy = durations.clone()
    noisy[1, 4:] = 7
    assert torch.equal(model(phones, mask, noisy, pitch, energy)["frame_mask"], out["frame_mask"])
    model.eval()
    mel, frame_mask = model.infer(phones, mask)
    assert mel.shape[:2] == frame_mask.shape and mel.shape[2] == N_MELS and bool(frame_mask.any(1).all())
    # at least one frame per utterance, and duration_scale stretches the predictions
    with torch.no_grad():
        model.duration_predictor.out.bias.fill_(-10.0)
    assert torch.equal(model.infer(phones, mask)[1].sum(1), torch.tensor([1, 1]))
    with torch.no_grad():
        model.duration_predictor.out.bias.fill_(1.0)  # exp(1) - 1 = 1.7 -> 2 frames a phone
    base = model.infer(phones, mask)[1].sum(1)
    slow = model.infer(phones, mask, duration_scale=2.0)[1].sum(1)
    assert torch.all(slow > base)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_fastspeech2_frames_and_phones_past_the_limits_are_refused():
    model = _fs2(max_frames=10).eval()
    phones, mask, durations, pitch, energy = _batch()
    with pytest.raises(ValueError, match=r"utterance 0 has 15 given frames.*max_frames=10.*larger max_frames"):
        model(phones, mask, durations + mask.long(), pitch, energy)
    with torch.no_grad():
        model.duration_predictor.out.bias.fill_(3.0)
    with pytest.raises(ValueError, match=r"predicted frames.*max_frames=10.*duration_scale"):
        model.infer(phones, mask)
    long_phones = torch.ones(1, 17, dtype=torch.long)
    with pytest.raises(ValueError, match="max_phones=16"):
        model.infer(long_phones, torch.ones_like(long_phones, dtype=torch.bool))


def _poison_padding(module, mask_of):
    """A forward hook writing NaN into the padded positions of ``module``'s output."""
    def hook(_, __, out):
        mask = mask_of(out)
        return torch.where(mask[..., None], out, torch.full((), float("nan")))
    return module.register_forward_hook(hook)


def test_fastspeech2_nan_in_padded_phones_and_frames_reaches_no_real_output():
    model = _fs2(encoder_layers=2, decoder_layers=2)
    phones, mask, durations, pitch, energy = _batch()
    clean = model(phones, mask, durations, pitch, energy)
    frame_mask = clean["frame_mask"]
    hooks = [_poison_padding(model.phone_embedding, lambda out: mask)]
    hooks.append(model.decoder[0].register_forward_pre_hook(
        lambda _, args: (torch.where(args[1][..., None], args[0], torch.full((), float("nan"))), args[1])))
    hooks.append(_poison_padding(model.encoder[0], lambda out: mask))
    bad_pitch, bad_energy = pitch.clone(), energy.clone()
    bad_pitch[~mask], bad_energy[~mask] = float("nan"), float("inf")
    out = model(phones, mask, durations, bad_pitch, bad_energy)
    for key in ("mel", "mel_post"):
        assert torch.isfinite(out[key]).all()
        torch.testing.assert_close(out[key][frame_mask], clean[key][frame_mask])
    for key in ("log_duration", "pitch", "energy"):
        torch.testing.assert_close(out[key][mask], clean[key][mask])
    loss = out["mel"][frame_mask].abs().mean() + out["mel_post"][frame_mask].abs().mean() + out["pitch"][mask].sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for h in hooks:
        h.remove()


def _alone_vs_padded(run, phones, mask, *per_phone):
    """Outputs of the first utterance alone and padded in a batch with a longer second one."""
    n = int(mask[1].sum())
    alone = run(phones[1:, :n], mask[1:, :n], *(p[1:, :n] for p in per_phone))
    together = run(phones, mask, *per_phone)
    return alone, together


@pytest.mark.parametrize("mixer,options", [("softmax", {}), ("gmlp", {}), ("amlp-cov", {"form": "paper"}),
                                           ("local", {"wsize": 3})])
def test_fastspeech2_output_does_not_depend_on_padding(mixer, options):
    model = _fs2(encoder_mixer=mixer, decoder_mixer=mixer, encoder_options=options,
                 decoder_options=options).eval()
    phones, mask, durations, pitch, energy = _batch()
    with torch.no_grad():
        alone, together = _alone_vs_padded(model, phones, mask, durations, pitch, energy)
        T = int(alone["frame_mask"].sum())
        torch.testing.assert_close(together["mel_post"][1, :T], alone["mel_post"][0])
        torch.testing.assert_close(together["log_duration"][1, :4], alone["log_duration"][0])
        mel_alone, fm_alone = model.infer(phones[1:, :4], mask[1:, :4])
        mel_together, fm_together = model.infer(phones, mask)
    T = int(fm_alone.sum())
    assert int(fm_together[1].sum()) == T
    torch.testing.assert_close(mel_together[1, :T], mel_alone[0])


FS2_MIXERS = [("softmax", {}), ("local", {"wsize": 5}), ("abc", {"landmarks": 4}), ("xca", {}), ("gmlp", {}),
              ("cosformer", {}), ("performer", {"approx_attn_dim": 8}), ("amlp-cov", {"form": "paper"}),
              ("amlp-pquery", {"form": "paper", "landmarks": 4}), ("linformer", {"proj_len": 4}),
              ("nystrom", {"landmarks": 2}), ("lara", {"landmarks": 4})]


@pytest.mark.parametrize("mixer,options", FS2_MIXERS, ids=[m for m, _ in FS2_MIXERS])
def test_fastspeech2_builds_and_trains_with_registered_mixers(mixer, options):
    model = _fs2(encoder_mixer=mixer, decoder_mixer=mixer, encoder_options=options, decoder_options=options)
    phones, mask, durations, pitch, energy = _batch()
    out = model(phones, mask, durations, pitch, energy)
    frame_mask = out["frame_mask"]
    assert torch.isfinite(out["mel_post"]).all()
    out["mel_post"][frame_mask].abs().mean().backward()
    assert torch.isfinite(model.mel_linear.weight.grad).all()
    model.eval()
    mel, fm = model.infer(phones, mask)
    assert torch.isfinite(mel).all() and bool(fm.any(1).all())


def test_mixer_lengths_follow_the_model_limits():
    fs2 = _fs2(encoder_mixer="gmlp", decoder_mixer="linformer", decoder_options={"proj_len": 4})
    assert fs2.encoder[0].mixer.max_length == 16 and fs2.decoder[0].mixer.max_length == 64
    tts = _tts(encoder_mixer="gmlp", self_mixer="cosformer", cross_mixer="cosformer")
    assert tts.encoder[0].mixer.max_length == 16
    assert tts.decoder[0].self_mixer.max_length == 48 and tts.decoder[0].cross_mixer.max_length == 48
    with pytest.raises(ValueError, match="max_length=8 is below the model's max_frames=64"):
        _fs2(decoder_mixer="gmlp", decoder_options={"max_length": 8})


def test_sites_a_mixer_cannot_serve_are_refused():
    with pytest.raises(ValueError, match="encoder self site.*capability 'noncausal'"):
        _fs2(encoder_mixer="hyper-mlp")
    with pytest.raises(ValueError, match="decoder self site.*no default form"):
        _fs2(decoder_mixer="amlp-cov")
    with pytest.raises(ValueError, match="decoder self site.*capability 'causal'"):
        _tts(self_mixer="xca")
    with pytest.raises(ValueError, match="decoder cross site.*capability 'cross'"):
        _tts(cross_mixer="local")
    with pytest.raises(ValueError, match="see later target tokens"):
        _tts(cross_mixer="amlp-pquery", cross_options={"form": "paper"})
    with pytest.raises(ValueError, match="decoder self site.*capability 'causal'"):
        _tts(self_mixer="nystrom")


# -- Transformer-TTS ------------------------------------------------------------------------------------
def test_transformer_tts_shapes_and_teacher_forcing_is_causal():
    model = _tts().eval()
    model.prenet_dropout_at_inference = False
    phones, mask, durations, _, _ = _batch()
    mel, frame_mask = _frames(durations)
    out = model(phones, mask, mel, frame_mask)
    assert out["mel"].shape == out["mel_post"].shape == mel.shape and out["stop_logits"].shape == frame_mask.shape
    assert not out["mel"][~frame_mask].any() and not out["stop_logits"][~frame_mask].any()
    # frame t depends on frames < t only
    changed = mel.clone()
    changed[:, 4:] += 1.0
    out2 = model(phones, mask, changed, frame_mask)
    torch.testing.assert_close(out2["mel"][:, :5], out["mel"][:, :5])
    assert not torch.allclose(out2["mel"][0, 5:], out["mel"][0, 5:])
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="max_frames=48"):
        model(phones, mask, torch.zeros(2, 49, N_MELS), torch.ones(2, 49, dtype=torch.bool))


def test_transformer_tts_prenet_dropout_stays_on_at_inference_unless_switched_off():
    model = _tts().eval()
    phones, mask, durations, _, _ = _batch()
    mel, frame_mask = _frames(durations)
    with torch.no_grad():
        a, b = model(phones, mask, mel, frame_mask)["mel"], model(phones, mask, mel, frame_mask)["mel"]
        assert not torch.allclose(a, b)
        model.prenet_dropout_at_inference = False
        a, b = model(phones, mask, mel, frame_mask)["mel"], model(phones, mask, mel, frame_mask)["mel"]
        assert torch.equal(a, b)


def test_transformer_tts_nan_in_padded_phones_and_frames_reaches_no_real_output():
    model = _tts()
    model.prenet_dropout_at_inference = False
    model.decoder_prenet.p = 0.0  # training mode, deterministic
    phones, mask, durations, _, _ = _batch()
    mel, frame_mask = _frames(durations)
    clean = model(phones, mask, mel, frame_mask)
    bad = mel.clone()
    bad[~frame_mask] = float("nan")
    hook = _poison_padding(model.phone_embedding, lambda out: mask)
    out = model(phones, mask, bad, frame_mask)
    hook.remove()
    for key in ("mel", "mel_post", "stop_logits"):
        assert torch.isfinite(out[key]).all()
        torch.testing.assert_close(out[key][frame_mask], clean[key][frame_mask])
    (out["mel_post"][frame_mask].abs().mean() + out["stop_logits"][frame_mask].sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_transformer_tts_output_does_not_depend_on_padding():
    model = _tts().eval()
    model.prenet_dropout_at_inference = False
    phones, mask, durations, _, _ = _batch()
    mel, frame_mask = _frames(durations)
    n, T = int(mask[1].sum()), int(frame_mask[1].sum())
    with torch.no_grad():
        alone = model(phones[1:, :n], mask[1:, :n], mel[1:, :T], frame_mask[1:, :T])
        together = model(phones, mask, mel, frame_mask)
    for key in ("mel", "mel_post", "stop_logits"):
        torch.testing.assert_close(together[key][1, :T], alone[key][0])


AR_SITES = [("softmax", {}, "softmax", {}), ("performer", {"approx_attn_dim": 8}, "performer", {"approx_attn_dim": 8}),
            ("local", {"wsize": 3}, "abc", {"landmarks": 4}), ("cosformer", {}, "cosformer", {}),
            ("amlp-cov", {"form": "paper"}, "softmax", {}), ("gmlp", {}, "softmax", {})]


@pytest.mark.parametrize("self_mixer,self_options,cross_mixer,cross_options", AR_SITES,
                         ids=[s[0] + "/" + s[2] for s in AR_SITES])
def test_transformer_tts_step_decoding_equals_teacher_forcing_on_its_own_frames(
        self_mixer, self_options, cross_mixer, cross_options):
    model = _tts(self_mixer=self_mixer, self_options=self_options, cross_mixer=cross_mixer,
                 cross_options=cross_options).eval()
    model.prenet_dropout_at_inference = False
    phones, mask, _, _, _ = _batch()
    with torch.no_grad():
        model.stop_linear.bias.fill_(-20.0)  # never stop: 9 frames each
        out = model.decode(phones, mask, max_frames=9)
        assert out["frame_mask"].all() and out["mel"].shape == (2, 9, N_MELS)
        forced = model(phones, mask, out["mel"], out["frame_mask"])
    for key in ("mel", "mel_post", "stop_logits"):
        torch.testing.assert_close(forced[key], out[key], atol=2e-5, rtol=1e-4)


def test_transformer_tts_infer_stops_each_row_at_its_stop_token():
    model = _tts().eval()
    model.prenet_dropout_at_inference = False
    phones, mask, _, _, _ = _batch()
    ends = torch.tensor([3, 6])
    original = model.step

    def step(prev, state, memory, phone_mask):
        mel_t, _, new = original(prev, state, memory, phone_mask)
        stop = torch.where(ends == new["position"], 10.0, -10.0)
        return mel_t, stop, new

    model.step = step
    mel, frame_mask = model.infer(phones, mask, max_frames=20)
    assert mel.shape == (2, 6, N_MELS) and torch.equal(frame_mask.sum(1), ends)
    assert not mel[~frame_mask].any()
    del model.step
    with torch.no_grad():
        model.stop_linear.bias.fill_(-20.0)
    mel, frame_mask = model.infer(phones, mask, max_frames=7)
    assert mel.shape == (2, 7, N_MELS) and frame_mask.all()
    with pytest.raises(ValueError, match="max_frames=48"):
        model.infer(phones, mask, max_frames=49)
    # a decoder self mixer without a recurrent step (every registered causal mixer has one, so the
    # capability is switched off on an instance)
    mixer = model.decoder[0].self_mixer
    mixer.capabilities = replace(type(mixer).capabilities, recurrent=False)
    with pytest.raises(ValueError, match="capability 'recurrent'"):
        model.infer(phones, mask, max_frames=4)


# -- overfitting ----------------------------------------------------------------------------------------
def _two_utterances():
    g = torch.Generator().manual_seed(3)
    phones = torch.randint(1, V, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    phones[1, 5:], mask[1, 5:] = PAD, False
    durations = torch.tensor([[3, 2, 4, 1, 3, 2, 3], [2, 4, 3, 2, 3, 0, 0]])
    pitch = torch.randn(2, 7, generator=g)
    energy = torch.randn(2, 7, generator=g)
    mel, frame_mask = _frames(durations)
    return phones, mask, durations, pitch, energy, mel, frame_mask


def _l1(pred, target, mask):
    return (pred - target).abs()[mask].mean()


def test_fastspeech2_overfits_two_utterances():
    phones, mask, durations, pitch, energy, mel, frame_mask = _two_utterances()
    model = _fs2(dim=32, ffn_dim=64, variance_dim=32, postnet_dim=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        out = model(phones, mask, durations, pitch, energy)
        loss = (_l1(out["mel"], mel, frame_mask) + _l1(out["mel_post"], mel, frame_mask)
                + (out["log_duration"] - torch.log1p(durations.float()))[mask].pow(2).mean()
                + (out["pitch"] - pitch)[mask].pow(2).mean() + (out["energy"] - energy)[mask].pow(2).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(phones, mask, durations, pitch, energy)
        assert _l1(out["mel_post"], mel, frame_mask) < 0.08
        mel_inf, fm = model.infer(phones, mask)
    assert torch.equal(fm, frame_mask)  # the durations were learnt
    assert _l1(mel_inf, mel, frame_mask) < 0.15


def test_transformer_tts_overfits_two_utterances():
    phones, mask, durations, _, _, mel, frame_mask = _two_utterances()
    model = _tts(dim=32, ffn_dim=64, prenet_dim=32, postnet_dim=32, prenet_dropout=0.0)
    stop_target = torch.zeros_like(frame_mask, dtype=torch.float32)
    stop_target[torch.arange(2), frame_mask.sum(1) - 1] = 1.0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        out = model(phones, mask, mel, frame_mask)
        loss = (_l1(out["mel"], mel, frame_mask) + _l1(out["mel_post"], mel, frame_mask)
                + torch.nn.functional.binary_cross_entropy_with_logits(out["stop_logits"][frame_mask],
                                                                       stop_target[frame_mask]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(phones, mask, mel, frame_mask)
        assert _l1(out["mel_post"], mel, frame_mask) < 0.08
        model.prenet_dropout_at_inference = False
        decoded = model.decode(phones, mask, max_frames=30)
    # the stop token fires at the last real frame (teacher forcing), and free-running decoding stops
    stops = (torch.sigmoid(out["stop_logits"]) > 0.5) & frame_mask
    assert torch.equal(stops, stop_target.bool())
    assert bool((decoded["frame_mask"].sum(1) < 30).all())

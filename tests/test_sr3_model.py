"""SR3: the noise schedule, the forward process and the posterior against their closed forms, the
samplers with a perfect noise predictor, MixerAttention2d with every registered non-causal mixer,
the U-Net, and a tiny model overfitting one 32x32 image pair.

Images are always full (no padding), so no mask is involved anywhere: MixerAttention2d calls its
mixer without one (checked below).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from amlp.layers import get_mixer_info, mixer_names
from amlp.layers.registry import choice_options
from amlp.models.sr3 import Diffusion, MixerAttention2d, SR3UNet, noise_level_embedding

torch.set_num_threads(1)


def _abar(betas: list[float]) -> list[float]:
    """alpha_bar_t for t = 0 .. T (alpha_bar_0 = 1), by a plain running product."""
    out, prod = [1.0], 1.0
    for b in betas:
        prod *= 1.0 - b
        out.append(prod)
    return out


class PerfectPredictor(torch.nn.Module):
    """Returns the true noise of ``x_t = gamma x0 + sqrt(1 - gamma^2) eps`` for a known ``x0``."""

    out_channels = 1

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0

    def forward(self, x, gamma):
        g = gamma.reshape(-1, 1, 1, 1).to(x.dtype)
        return (x[:, :1] - g * self.x0) / (1 - g * g).sqrt()


# -- schedule and forward process ------------------------------------------------------------------------
def test_schedule_matches_its_closed_form():
    d = Diffusion(steps=50, beta_start=1e-4, beta_end=0.05)
    betas = [1e-4 + (0.05 - 1e-4) * i / 49 for i in range(50)]
    abar = _abar(betas)
    assert torch.allclose(d.betas, torch.tensor(betas, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.allclose(d.alphas_cumprod, torch.cumprod(1 - d.betas, 0))
    assert torch.allclose(d.alphas_cumprod, torch.tensor(abar[1:], dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.allclose(d.alphas_cumprod_prev, torch.tensor(abar[:-1], dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.allclose(d.gammas, torch.tensor(abar, dtype=torch.float64).sqrt(), rtol=1e-12, atol=0)
    assert d.gammas[0] == 1.0 and bool((d.gammas[1:] < d.gammas[:-1]).all())


def test_schedule_and_sampler_arguments_are_checked():
    with pytest.raises(ValueError, match="beta_start"):
        Diffusion(beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match="loss"):
        Diffusion(loss="huber")
    d = Diffusion(steps=10)
    with pytest.raises(ValueError, match=r"1 \.\. T = 10"):
        d.q_sample(torch.zeros(2, 1, 4, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="exactly one"):
        d.q_sample(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="exceed"):
        d.ddim_timesteps(11)


def test_q_sample_mean_and_variance():
    d = Diffusion(steps=100, beta_start=1e-4, beta_end=0.05)
    x0 = torch.tensor([-0.9, -0.2, 0.4, 1.0], dtype=torch.float64).reshape(1, 1, 1, 4)
    n = 40000
    g = torch.Generator().manual_seed(0)
    t = 40
    abar = _abar([1e-4 + (0.05 - 1e-4) * i / 99 for i in range(100)])[t]
    xs = d.q_sample(x0.expand(n, -1, -1, -1), torch.full((n,), t), generator=g)
    assert torch.allclose(xs.mean(0), math.sqrt(abar) * x0[0], atol=0.02)
    assert torch.allclose(xs.var(0), torch.full_like(x0[0], 1 - abar), atol=0.03)
    # a continuous noise level: mean gamma x0, variance 1 - gamma^2
    gamma = torch.full((n,), 0.3, dtype=torch.float64)
    xs = d.q_sample(x0.expand(n, -1, -1, -1), gamma=gamma, generator=g)
    assert torch.allclose(xs.mean(0), 0.3 * x0[0], atol=0.02)
    assert torch.allclose(xs.var(0), torch.full_like(x0[0], 0.91), atol=0.03)
    # with the noise given, exactly the closed form
    eps = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    x0b = torch.rand(3, 1, 2, 2, generator=g, dtype=torch.float64)
    tb = torch.tensor([1, 50, 100])
    ab = torch.tensor([_abar(d.betas.tolist())[k] for k in tb.tolist()], dtype=torch.float64).reshape(3, 1, 1, 1)
    assert torch.allclose(d.q_sample(x0b, tb, eps), ab.sqrt() * x0b + (1 - ab).sqrt() * eps, atol=1e-12)


def test_training_noise_levels_lie_between_neighbouring_steps():
    d = Diffusion(steps=20, beta_start=1e-3, beta_end=0.2)
    t, gamma = d.sample_noise_level(4000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) == 1 and int(t.max()) == 20
    assert set(t.tolist()) == set(range(1, 21))
    low, high = d.gammas[t].float(), d.gammas[t - 1].float()
    assert bool((gamma >= low - 1e-7).all()) and bool((gamma <= high + 1e-7).all())
    # uniform within the interval: the relative position averages 1/2
    assert abs(float(((gamma - low) / (high - low)).mean()) - 0.5) < 0.03
    t2, gamma2 = d.sample_noise_level(4000, torch.Generator().manual_seed(0))
    assert torch.equal(t, t2) and torch.equal(gamma, gamma2)


def test_training_loss_is_l1_or_l2_on_the_noise():
    torch.manual_seed(0)
    model = SR3UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(16,), image_size=32)
    for p in model.parameters():  # not the zero-initialised output
        torch.nn.init.normal_(p, std=0.05)
    hr, lr_up = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    for kind, fn in (("l1", F.l1_loss), ("l2", F.mse_loss)):
        d = Diffusion(steps=10, loss=kind)
        loss = d.training_loss(model, hr, lr_up, torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        _, gamma = d.sample_noise_level(2, g)
        noise = torch.randn(hr.shape, generator=g)
        x = gamma.reshape(-1, 1, 1, 1) * hr + (1 - gamma.reshape(-1, 1, 1, 1) ** 2).sqrt() * noise
        expected = fn(model(torch.cat([x, lr_up], 1), gamma), noise)
        assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)


# -- posterior and samplers --------------------------------------------------------------------------------
def test_posterior_matches_the_closed_forms():
    d = Diffusion(steps=30, beta_start=1e-3, beta_end=0.1)
    betas = d.betas.tolist()
    abar = _abar(betas)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    xt = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 17, 30])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    for i, k in enumerate(t.tolist()):
        beta, a, ab, ab_prev = betas[k - 1], 1 - betas[k - 1], abar[k], abar[k - 1]
        # Ho et al. 2020, eq. 7
        m = math.sqrt(ab_prev) * beta / (1 - ab) * x0[i] + math.sqrt(a) * (1 - ab_prev) / (1 - ab) * xt[i]
        v = (1 - ab_prev) / (1 - ab) * beta
        assert torch.allclose(mean[i], m, atol=1e-12)
        assert var[i].item() == pytest.approx(v, abs=1e-15)
        # the same by Bayes: q(x_{t-1} | x0) = N(sqrt(ab_prev) x0, 1 - ab_prev), q(x_t | x_{t-1}) = N(sqrt(a) x_{t-1}, beta)
        if k > 1:
            precision = 1 / (1 - ab_prev) + a / beta
            m_bayes = (math.sqrt(ab_prev) * x0[i] / (1 - ab_prev) + math.sqrt(a) * xt[i] / beta) / precision
            assert torch.allclose(mean[i], m_bayes, atol=1e-10)
            assert var[i].item() == pytest.approx(1 / precision, rel=1e-10)
            assert log_var[i].item() == pytest.approx(math.log(v), rel=1e-10)
    # t = 1: no variance and the mean is x0; its log variance is clipped to that of t = 2
    assert var[0].item() == 0.0 and torch.allclose(mean[0], x0[0], atol=1e-12)
    assert log_var[0].item() == pytest.approx(math.log((1 - abar[1]) / (1 - abar[2]) * betas[1]))


def test_x0_prediction_inverts_the_forward_process():
    d = Diffusion(steps=40, beta_start=1e-3, beta_end=0.1)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 20, 40])
    assert torch.allclose(d.predict_x0(d.q_sample(x0, t, eps), t, eps), x0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_perfect_noise_predictor_makes_every_sampler_return_x0(dtype):
    d = Diffusion(steps=50, beta_start=1e-4, beta_end=0.1)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(3, 1, 8, 8, generator=g) * 2 - 1).to(dtype)
    lr_up = torch.zeros_like(x0)
    model = PerfectPredictor(x0)
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    for eta in (0.0, 0.5, 1.0):
        for steps in (1, 7, 50):
            out = d.ddim_sample(model, lr_up, steps=steps, eta=eta, generator=torch.Generator().manual_seed(2))
            assert out.dtype == dtype and torch.allclose(out, x0, atol=atol), (eta, steps)
    out = d.ddpm_sample(model, lr_up, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(out, x0, atol=atol)


def test_ddim_with_a_slightly_wrong_predictor_lands_near_x0():
    """A predictor whose noise is off by a small amount still gives a sample close to x0 (the
    samplers do not amplify a small error into a large one)."""
    d = Diffusion(steps=100, beta_start=1e-4, beta_end=0.05)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    perfect = PerfectPredictor(x0)

    def model(x, gamma):
        return perfect(x, gamma) + 0.01 * torch.sin(7 * x[:, :1])

    out = d.ddim_sample(model, torch.zeros_like(x0), steps=20, generator=torch.Generator().manual_seed(1))
    assert F.mse_loss(out, x0).item() < 1e-3


class ConstantNoise(torch.nn.Module):
    """Predicts the same noise at every call and records the x_t it was given: the samplers' steps
    can then be worked out by hand from the recorded inputs (a perfect predictor cannot show a wrong
    step, since its x0 estimate is exact wherever the sampler has wandered)."""

    out_channels = 1

    def __init__(self, eps: torch.Tensor):
        super().__init__()
        self.eps, self.seen = eps, []

    def forward(self, x, gamma):
        self.seen.append((x[:, :1].clone(), gamma.clone()))
        return self.eps


def _abar_at(d, t):
    return 1.0 if t == 0 else float(torch.prod(1 - d.betas[:t]))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_steps_follow_eq_12_of_song_et_al(eta):
    d = Diffusion(steps=30, beta_start=1e-3, beta_end=0.2)
    eps = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model = ConstantNoise(eps)
    lr_up = torch.zeros(1, 1, 64, 64, dtype=torch.float64)
    out = d.ddim_sample(model, lr_up, steps=3, eta=eta, clip=False, generator=torch.Generator().manual_seed(4))
    ts = d.ddim_timesteps(3)
    assert len(model.seen) == len(ts) == 3
    for k, t in enumerate(ts):
        x_t, gamma = model.seen[k]
        assert torch.allclose(gamma, torch.full_like(gamma, math.sqrt(_abar_at(d, t))))
        a, a_prev = _abar_at(d, t), _abar_at(d, ts[k + 1] if k + 1 < len(ts) else 0)
        x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
        nxt = model.seen[k + 1][0] if k + 1 < len(ts) else out
        residual = nxt - mean
        if sigma == 0:
            torch.testing.assert_close(nxt, mean, rtol=1e-10, atol=1e-10)
        else:  # the added noise has the variance of eq. 16 (4,096 draws)
            assert abs(residual.std().item() / sigma - 1) < 0.05 and abs(residual.mean().item()) < 0.1 * sigma


def test_ddpm_steps_draw_from_the_posterior_of_ho_et_al():
    d = Diffusion(steps=20, beta_start=1e-3, beta_end=0.2)
    eps = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model = ConstantNoise(eps)
    out = d.ddpm_sample(model, torch.zeros(1, 1, 64, 64, dtype=torch.float64), clip=False,
                        generator=torch.Generator().manual_seed(4))
    assert len(model.seen) == 20
    for t in (20, 11, 2, 1):
        x_t = model.seen[20 - t][0]
        a, a_prev, beta = _abar_at(d, t), _abar_at(d, t - 1), float(d.betas[t - 1])
        x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
        mean = (math.sqrt(a_prev) * beta / (1 - a)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)) * x_t
        nxt = model.seen[20 - t + 1][0] if t > 1 else out
        if t == 1:  # the last step adds no noise
            torch.testing.assert_close(nxt, mean, rtol=1e-10, atol=1e-10)
        else:
            sd = math.sqrt((1 - a_prev) / (1 - a) * beta)
            residual = nxt - mean
            assert abs(residual.std().item() / sd - 1) < 0.05 and abs(residual.mean().item()) < 0.1 * sd


def test_ddim_timesteps():
    d = Diffusion(steps=100)
    ts = d.ddim_timesteps(20)
    assert ts[0] == 100 and ts[-1] == 1 and len(ts) == 20 and ts == sorted(ts, reverse=True)
    assert d.ddim_timesteps(1) == [100] and d.ddim_timesteps(100) == list(range(100, 0, -1))


def test_samplers_are_reproducible_with_a_generator():
    torch.manual_seed(0)
    model = SR3UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(16,), image_size=32).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    d = Diffusion(steps=10, beta_start=1e-3, beta_end=0.2)
    lr_up = torch.rand(2, 1, 32, 32) * 2 - 1

    def run(sampler, seed, **kw):
        return sampler(model, lr_up, generator=torch.Generator().manual_seed(seed), **kw)

    for sampler, kw in ((d.ddim_sample, dict(steps=5, eta=0.0)), (d.ddim_sample, dict(steps=5, eta=1.0)),
                        (d.ddpm_sample, {})):
        a, b, c = run(sampler, 1, **kw), run(sampler, 1, **kw), run(sampler, 2, **kw)
        assert a.shape == (2, 1, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
        assert float(a.abs().max()) <= 1.0  # every sampler ends on a clipped x0 estimate (t = 1 -> 0)


# -- MixerAttention2d ---------------------------------------------------------------------------------------
NONCAUSAL = [(name, opts) for name in mixer_names(causal=False) for opts in choice_options(name)]
CAUSAL_ONLY = [name for name in mixer_names(causal=True) if name not in mixer_names(causal=False)]


def test_the_registry_loops_cover_every_mixer():
    from amlp.layers import list_mixers

    names = {info.name for info in list_mixers()}
    assert {n for n, _ in NONCAUSAL} | set(CAUSAL_ONLY) == names
    assert "hyper-mlp" in CAUSAL_ONLY and "softmax" in {n for n, _ in NONCAUSAL}
    assert {"amlp-cov", "amlp-pquery"} <= {n for n, o in NONCAUSAL if "form" in o}


@pytest.mark.parametrize("name,options", NONCAUSAL, ids=[f"{n}-{'-'.join(o.values()) or 'default'}" for n, o in NONCAUSAL])
def test_mixer_attention_keeps_the_shape_and_mixes_raster_tokens(name, options):
    torch.manual_seed(0)
    H, W, C = 6, 8, 16
    layer = MixerAttention2d(C, (H, W), name, options, heads=2, groups=4)
    caps = get_mixer_info(name).capabilities
    if caps.max_length_option is not None:  # gMLP, Linformer, cosFormer get H*W
        assert layer.mixer.max_length == H * W
    seen = {}

    def hook(module, args, kwargs, out):
        seen["x"], seen["kwargs"], seen["out"] = args[0], kwargs, out

    layer.mixer.register_forward_hook(hook, with_kwargs=True)
    x = torch.randn(2, C, H, W)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert seen["x"].shape == (2, H * W, C)
    # raster order: token r * W + c is pixel (r, c) of the normalised map
    normed = layer.norm(x)
    for r, c in ((0, 0), (0, W - 1), (1, 0), (H - 1, 3)):
        assert torch.equal(seen["x"][:, r * W + c], normed[:, :, r, c])
    # images are full: no padding mask reaches the mixer
    assert seen["kwargs"].get("x_mask") is None and seen["kwargs"].get("context_mask") is None
    # the residual: y = x + the mixer's output put back on the grid
    assert torch.allclose(y, x + seen["out"].transpose(1, 2).reshape(2, C, H, W), atol=1e-6)
    y.square().mean().backward()
    assert layer.norm.weight.grad is not None and layer.norm.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.mixer.parameters())


@pytest.mark.parametrize("name", CAUSAL_ONLY)
def test_causal_only_mixers_are_refused_with_the_registry_message(name):
    with pytest.raises(ValueError, match=rf"attention at 8x8 site: mixer '{name}' has no non-causal form"):
        MixerAttention2d(16, 8, name)
    with pytest.raises(ValueError, match=rf"mixer '{name}' has no non-causal form"):
        SR3UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(16,), image_size=32, mixer=name)


def test_mixer_attention_refusals():
    with pytest.raises(ValueError, match="registered mixers"):
        MixerAttention2d(16, 8, "no-such-mixer")
    with pytest.raises(ValueError, match="no default form"):
        MixerAttention2d(16, 8, "amlp-cov")
    with pytest.raises(ValueError, match=r"max_length=32 is below the model's H\*W=64"):
        MixerAttention2d(16, 8, "linformer", {"max_length": 32})
    layer = MixerAttention2d(16, 8)
    with pytest.raises(ValueError, match=r"\[B, C, 8, 8\]"):
        layer(torch.randn(1, 16, 8, 4))


# -- the U-Net -------------------------------------------------------------------------------------------------
def test_unet_output_shape_attention_sites_and_parameter_count():
    torch.manual_seed(0)
    model = SR3UNet(base_channels=8, image_size=32)  # levels at sides 32, 16, 8; attention at 32 and 16
    sites = [(m.size, m.mixer.dim) for m in model.modules() if isinstance(m, MixerAttention2d)]
    # down: one per level at 32, 16; middle at 8; up: two per level at 16, 32
    assert sorted(sites) == sorted([((32, 32), 8), ((16, 16), 16), ((8, 8), 32), ((16, 16), 16), ((16, 16), 16),
                                    ((32, 32), 8), ((32, 32), 8)])
    tokens = []
    for m in model.modules():
        if isinstance(m, MixerAttention2d):
            m.mixer.register_forward_hook(lambda mod, args, out: tokens.append(tuple(args[0].shape)))
    x, gamma = torch.randn(3, 2, 32, 32), torch.rand(3)
    eps = model(x, gamma)
    assert eps.shape == (3, 1, 32, 32)
    assert set(tokens) == {(3, 1024, 8), (3, 256, 16), (3, 64, 32)}
    assert torch.count_nonzero(eps) == 0  # the output conv starts at zero
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    for p in model.conv_out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    eps = model(x, gamma)
    assert torch.isfinite(eps).all() and eps.abs().sum() > 0
    # the noise level matters, and each image is computed alone
    assert not torch.allclose(model(x, gamma), model(x, 1 - gamma))
    assert torch.allclose(model(x[1:2], gamma[1:2]), eps[1:2], atol=1e-5)
    eps.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unet_at_64x64_and_with_amlp():
    torch.manual_seed(0)
    model = SR3UNet(base_channels=8, image_size=64, mixer="amlp-cov", mixer_options={"form": "official", "landmarks": 8})
    assert model(torch.randn(1, 2, 64, 64), torch.rand(1)).shape == (1, 1, 64, 64)


def test_unet_refusals():
    with pytest.raises(ValueError, match="match no level"):
        SR3UNet(base_channels=8, image_size=16)  # sides 16, 8, 4: no 32
    with pytest.raises(ValueError, match="divisible by 2"):
        SR3UNet(base_channels=8, image_size=30)
    with pytest.raises(ValueError, match="groups"):
        SR3UNet(base_channels=12, groups=8)
    model = SR3UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(16,), image_size=32)
    with pytest.raises(ValueError, match=r"\[B, 2, 32, 32\]"):
        model(torch.randn(1, 2, 64, 64), torch.rand(1))
    with pytest.raises(ValueError, match="noise_level"):
        model(torch.randn(2, 2, 32, 32), torch.rand(3))


def test_noise_level_embedding_separates_nearby_levels():
    emb = noise_level_embedding(torch.tensor([0.5, 0.501, 0.9]), 16)
    assert emb.shape == (3, 16)
    assert (emb[0] - emb[1]).abs().max() > 0.1  # SR3's neighbouring training levels are this close
    assert noise_level_embedding(torch.tensor([0.5]), 7).shape == (1, 7)


# -- overfitting one image pair -------------------------------------------------------------------------------
def test_tiny_model_overfits_one_image_pair():
    """A tiny model learns one 32x32 pair: the noise-prediction loss falls well below its start, and
    DDIM samples (20 steps) are closer to the target than the conditioning input is. With a few
    hundred steps, stochastic DDIM (eta 1) does this reliably; deterministic DDIM (eta 0) keeps the
    errors of its first, high-noise, x0 estimates and is about as close as the input here."""
    torch.manual_seed(0)
    r = torch.linspace(-1, 1, 32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    hr = (0.6 * torch.sin(6 * xx) * torch.cos(4 * yy) + 0.3 * torch.sign(torch.sin(12 * xx + 8 * yy))).clamp(-1, 1)
    hr = hr[None, None]
    # the detail that a 4x down-sampling removes is what the model has to add back
    lr_up = F.interpolate(F.avg_pool2d(hr, 4), scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    model = SR3UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(16,), image_size=32)
    d = Diffusion(steps=100, beta_start=1e-4, beta_end=0.05, loss="l1")
    batch = 8

    def held_out_loss():
        with torch.no_grad():
            return d.training_loss(model, hr.expand(64, -1, -1, -1), lr_up.expand(64, -1, -1, -1),
                                   torch.Generator().manual_seed(123)).item()

    start = held_out_loss()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        opt.zero_grad()
        d.training_loss(model, hr.expand(batch, -1, -1, -1), lr_up.expand(batch, -1, -1, -1), g).backward()
        opt.step()
    end = held_out_loss()
    assert end < 0.3 * start, (start, end)
    model.eval()
    samples = d.ddim_sample(model, lr_up.expand(8, -1, -1, -1), steps=20, eta=1.0,
                            generator=torch.Generator().manual_seed(1))
    mse = F.mse_loss(samples, hr.expand_as(samples)).item()
    baseline = F.mse_loss(lr_up, hr).item()
    print(f"held-out loss {start:.3f} -> {end:.3f}; sample MSE {mse:.4f} vs input {baseline:.4f}")
    assert mse < baseline, (mse, baseline)

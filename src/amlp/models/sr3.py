"""SR3 super-resolution (Saharia et al. 2021, Image Super-Resolution via Iterative Refinement): a
conditional diffusion model whose U-Net sees the noisy high-resolution image concatenated with the
bicubic-upsampled low-resolution image, and the noise level, and predicts the noise.

* :class:`SR3UNet`, the noise predictor::

      [x_noisy, lr_up] (B, 2, H, W) -> conv 3x3 -> down path -> middle -> up path
                                    -> GroupNorm, SiLU, conv 3x3 -> eps (B, 1, H, W)
      noise level gamma (B,) -> sinusoidal embedding -> Linear, SiLU, Linear = e   (added in every
                                                                                   residual block)
      residual block: h = conv(SiLU(GN(x))); h += Linear(SiLU(e)); h = conv(dropout(SiLU(GN(h))));
                      out = h + skip(x)            (skip: 1x1 conv when the width changes)
      down path: per level, ``res_blocks`` residual blocks (each followed by a MixerAttention2d when
                 the level's side is in ``attention_resolutions``), then a stride-2 conv (not after
                 the last level); every output is kept for the up path
      middle:    residual block, MixerAttention2d, residual block
      up path:   per level (reversed), ``res_blocks + 1`` residual blocks on [h, skip] concatenated
                 along channels (each followed by a MixerAttention2d at the attention sides), then a
                 nearest x2 upsampling and conv 3x3 (not after the first level)

  The output conv starts at zero, so an untrained model predicts eps = 0.

* :class:`MixerAttention2d`, the attention layer: GroupNorm, then any registered mixer with a
  non-causal form over the pixels flattened to tokens ``[B, H*W, C]`` in raster order (token
  ``r * W + c`` is row ``r``, column ``c``), and a residual. Images are always full, so no padding
  mask is involved.

* :class:`Diffusion`, the linear beta schedule with SR3's continuous noise-level training, the
  posterior closed forms (Ho et al. 2020, eq. 6-7), ancestral (DDPM) sampling and DDIM sampling
  (Song et al. 2021).

Notation: steps are numbered ``t = 1 .. T`` as in the papers; ``alphas_cumprod[t - 1]`` is
``alpha_bar_t = prod_{s <= t} (1 - beta_s)`` and ``alpha_bar_0 = 1``. The model is conditioned on
the continuous noise level ``gamma = sqrt(alpha_bar)`` (SR3's parameterisation), not on ``t``, so a
model trained with one schedule can be sampled with another (SR3 samples with fewer steps than it
trains with).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import build_mixer
from .translation import check_site
from .tts import site_options

__all__ = ["Diffusion", "MixerAttention2d", "ResidualBlock", "SR3UNet", "noise_level_embedding"]

#: gamma in [0, 1] is multiplied by this before the sinusoidal embedding, so the fastest
#: frequencies resolve small changes of the noise level (WaveGrad scales its noise level likewise)
NOISE_LEVEL_SCALE = 1000.0


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def noise_level_embedding(gamma: torch.Tensor, dim: int, scale: float = NOISE_LEVEL_SCALE) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of the noise levels ``gamma`` ``[B]``: sin in the first half of
    the channels and cos in the second, of ``scale * gamma / 10000^(i / half)`` (a zero column is added
    when ``dim`` is odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=gamma.device, dtype=torch.float32) / max(half, 1))
    args = scale * gamma.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(gamma.dtype)


class MixerAttention2d(nn.Module):
    """Attention over a feature map with any registered mixer that has a non-causal form.

    ``y = x + mixer(GroupNorm(x))``, the mixer running over the ``H*W`` pixels flattened to tokens
    ``[B, H*W, C]`` in raster order (token ``r * W + c`` is row ``r``, column ``c``; a mixer that uses
    positions, such as a local window or cosFormer's re-weighting, sees this order). The feature map is
    always full, so no padding mask is passed.

    Args:
        channels: C, the mixer's width.
        size: the feature-map side (square) or ``(H, W)``; a mixer whose maximum length is a
            constructor option (gMLP, Linformer, cosFormer) gets ``H*W`` there, and a smaller value
            given in ``mixer_options`` is refused.
        mixer: registry name; a mixer with only a causal form (HyperMLP) is refused at construction
            with the registry's message.
        mixer_options: options of the mixer (AMLP needs ``form=``).
        heads: heads of the mixer (``channels`` must be divisible by it).
        groups: groups of the GroupNorm.
    """

    def __init__(self, channels: int, size: int | tuple[int, int], mixer: str = "softmax",
                 mixer_options: dict | None = None, heads: int = 1, groups: int = 8):
        super().__init__()
        _positive_int("channels", channels)
        _positive_int("groups", groups)
        if channels % groups:
            raise ValueError(f"channels ({channels}) must be divisible by groups ({groups}) for the GroupNorm")
        height, width = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
        _positive_int("height", height)
        _positive_int("width", width)
        self.size = (height, width)
        site = f"attention at {height}x{width}"
        options = site_options(mixer, mixer_options, height * width, fixed=True, what="H*W")
        check_site(mixer, site, options=options)
        self.norm = nn.GroupNorm(groups, channels)
        self.mixer = build_mixer(mixer, dim=channels, heads=heads, causal=False, **options)
        self.mixer_name = mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[2:]) != self.size:
            raise ValueError(f"x must be shaped [B, C, {self.size[0]}, {self.size[1]}], got {_shape(x)}")
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, H*W, C], raster order
        y = self.mixer(tokens)
        return x + y.transpose(1, 2).reshape(B, C, H, W)

    def extra_repr(self) -> str:
        return f"size={self.size}, mixer={self.mixer_name!r}"


class ResidualBlock(nn.Module):
    """GroupNorm, SiLU, conv 3x3, plus a linear map of the noise-level embedding; GroupNorm, SiLU,
    dropout, conv 3x3; plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class _Level(nn.Module):
    """One U-Net level: residual blocks, each followed by its attention layer (identity where the
    level has no attention)."""

    def __init__(self, blocks: list[ResidualBlock], attentions: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)


class SR3UNet(nn.Module):
    """SR3's noise predictor: a U-Net on ``[x_noisy, lr_up]`` conditioned on the noise level.

    Args:
        in_channels: input channels (2: the noisy high-resolution image and the upsampled
            low-resolution image, grey).
        out_channels: channels of the predicted noise (1).
        base_channels: width of the first level; level ``i`` has ``base_channels * channel_mults[i]``.
        channel_mults: one multiplier per level; the side halves between levels, so ``image_size``
            must be divisible by ``2 ** (len(channel_mults) - 1)``.
        res_blocks: residual blocks per level on the down path (``res_blocks + 1`` on the up path).
        attention_resolutions: feature-map sides after whose residual blocks a
            :class:`MixerAttention2d` is placed (16 and 32 of a 64x64 image: 256 and 1,024 tokens);
            each must be the side of some level. The middle always has one.
        image_size: the side of the (square) images; the model takes this size only.
        mixer, mixer_options, heads: the registered mixer of every attention layer (see
            :class:`MixerAttention2d`).
        dropout: in every residual block.
        groups: groups of every GroupNorm (every level width must be divisible by it).

    ``forward(x [B, in_channels, H, W], noise_level [B]) -> eps [B, out_channels, H, W]``, where
    ``noise_level`` is ``gamma = sqrt(alpha_bar)`` in ``[0, 1]``.
    """

    def __init__(self, in_channels: int = 2, out_channels: int = 1, base_channels: int = 32,
                 channel_mults: Sequence[int] = (1, 2, 4), res_blocks: int = 1,
                 attention_resolutions: Sequence[int] = (16, 32), image_size: int = 64, mixer: str = "softmax",
                 mixer_options: dict | None = None, heads: int = 1, dropout: float = 0.0, groups: int = 8):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("base_channels", base_channels), ("res_blocks", res_blocks),
                            ("image_size", image_size), ("heads", heads), ("groups", groups)):
            _positive_int(name, value)
        channel_mults = tuple(channel_mults)
        if not channel_mults:
            raise ValueError("channel_mults must name at least one level")
        for m in channel_mults:
            _positive_int("each of channel_mults", m)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        levels = len(channel_mults)
        if image_size % (2 ** (levels - 1)):
            raise ValueError(f"image_size={image_size} must be divisible by 2 ** (levels - 1) = {2 ** (levels - 1)} "
                             f"({levels} levels in channel_mults)")
        sides = [image_size // 2 ** i for i in range(levels)]
        attention_resolutions = tuple(attention_resolutions)
        unknown = [r for r in attention_resolutions if r not in sides]
        if unknown:
            raise ValueError(f"attention_resolutions {unknown} match no level: the feature-map sides are "
                             f"{', '.join(map(str, sides))} (image_size={image_size}, {levels} levels)")
        widths = [base_channels * m for m in channel_mults]
        for w in widths:
            if w % groups:
                raise ValueError(f"level width {w} (base_channels * channel_mults) is not divisible by groups={groups}")
            if w % heads:
                raise ValueError(f"level width {w} (base_channels * channel_mults) is not divisible by heads={heads}")

        self.in_channels, self.out_channels, self.image_size = in_channels, out_channels, image_size
        self.base_channels, self.channel_mults = base_channels, channel_mults
        self.attention_resolutions = attention_resolutions
        self.mixer_name = mixer
        emb_dim = 4 * base_channels
        self.base_emb_dim = base_channels
        self.noise_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def attention(width: int, side: int) -> nn.Module:
            if side in attention_resolutions:
                return MixerAttention2d(width, side, mixer, mixer_options, heads, groups)
            return nn.Identity()

        def block(cin: int, cout: int) -> ResidualBlock:
            return ResidualBlock(cin, cout, emb_dim, float(dropout), groups)

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        skip_widths = [base_channels]
        width = base_channels
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, (w, side) in enumerate(zip(widths, sides)):
            blocks, attns = [], []
            for _ in range(res_blocks):
                blocks.append(block(width, w))
                attns.append(attention(w, side))
                width = w
                skip_widths.append(width)
            self.down.append(_Level(blocks, attns))
            if i < levels - 1:
                self.downsample.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skip_widths.append(width)

        self.mid_block1 = block(width, width)
        self.mid_attention = MixerAttention2d(width, sides[-1], mixer, mixer_options, heads, groups)
        self.mid_block2 = block(width, width)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(levels)):
            w, side = widths[i], sides[i]
            blocks, attns = [], []
            for _ in range(res_blocks + 1):
                blocks.append(block(width + skip_widths.pop(), w))
                attns.append(attention(w, side))
                width = w
            self.up.append(_Level(blocks, attns))
            if i > 0:
                self.upsample.append(nn.Conv2d(width, width, 3, padding=1))
        assert not skip_widths

        self.norm_out = nn.GroupNorm(groups, width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be shaped [B, {expected[0]}, {expected[1]}, {expected[2]}] (noisy image and "
                             f"conditioning concatenated; image_size={self.image_size}), got {_shape(x)}")
        B = x.shape[0]
        if not isinstance(noise_level, torch.Tensor):
            noise_level = torch.as_tensor(noise_level, dtype=x.dtype, device=x.device)
        if noise_level.dim() == 0:
            noise_level = noise_level.expand(B)
        noise_level = noise_level.reshape(-1) if noise_level.numel() == B else noise_level
        if noise_level.shape != (B,):
            raise ValueError(f"noise_level must be shaped [B] = [{B}] (gamma = sqrt(alpha_bar) per image), "
                             f"got {tuple(noise_level.shape)}")
        emb = self.noise_mlp(noise_level_embedding(noise_level.to(x.dtype), self.base_emb_dim))

        h = self.conv_in(x)
        skips = [h]
        for i, level in enumerate(self.down):
            for blk, attn in zip(level.blocks, level.attentions):
                h = attn(blk(h, emb))
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)
        h = self.mid_block2(self.mid_attention(self.mid_block1(h, emb)), emb)
        for i, level in enumerate(self.up):
            for blk, attn in zip(level.blocks, level.attentions):
                h = attn(blk(torch.cat([h, skips.pop()], dim=1), emb))
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def _noise(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (so a CPU generator gives the same
    numbers whatever the model's device), then moved."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def _uniform(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


class Diffusion:
    """Linear beta schedule, SR3's continuous noise-level training, DDPM and DDIM sampling.

    Args:
        steps: T, the number of diffusion steps.
        beta_start, beta_end: ``beta_t`` goes linearly from ``beta_start`` (t = 1) to ``beta_end``
            (t = T) (Ho et al. 2020: 1e-4 .. 0.02 over 1000 steps).
        loss: ``"l1"`` (SR3's released code) or ``"l2"``: the mean absolute / squared error between
            the predicted and the true noise.

    The schedule is held in float64 (``betas``, ``alphas``, ``alphas_cumprod`` ``[T]``, entry
    ``t - 1`` for step ``t``; ``gammas`` ``[T + 1]`` = ``sqrt(alpha_bar_t)`` for ``t = 0 .. T``,
    ``gammas[0] = 1``) and cast to the data's dtype where used.

    A model is called as ``model(torch.cat([x_t, lr_up], dim=1), gamma)`` with ``gamma`` ``[B]`` and
    returns the predicted noise. The samplers run under ``torch.no_grad()`` and leave the model's
    mode alone (put it in ``eval()`` so dropout is off).
    """

    def __init__(self, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, loss: str = "l1"):
        _positive_int("steps", steps)
        if not (0.0 < beta_start <= beta_end < 1.0):
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
        if loss not in ("l1", "l2"):
            raise ValueError(f"loss must be 'l1' or 'l2', got {loss!r}")
        self.steps, self.beta_start, self.beta_end, self.loss = steps, float(beta_start), float(beta_end), loss
        self.betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.gammas = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod.sqrt()])
        # q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 6-7)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the variance is 0 at t = 1; its log takes the value of t = 2 there (Ho et al.'s code)
        clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]) if steps > 1 \
            else self.betas.clone()
        self.posterior_log_variance_clipped = clipped.log()
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

    def __repr__(self) -> str:
        return (f"Diffusion(steps={self.steps}, beta_start={self.beta_start}, beta_end={self.beta_end}, "
                f"loss={self.loss!r})")

    # -- indexing ------------------------------------------------------------------------------------
    def _check_t(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.is_floating_point() or t.shape != (batch,):
            raise ValueError(f"t must be an integer step (or a [B] = [{batch}] tensor of them), got {t!r}")
        if bool((t < 1).any()) or bool((t > self.steps).any()):
            raise ValueError(f"t must be in 1 .. T = {self.steps}, got {t.tolist()}")
        return t.long().cpu()

    @staticmethod
    def _at(table: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[index]`` shaped ``[B, 1, 1, ...]`` in the dtype and on the device of ``like``."""
        v = table[index].to(device=like.device, dtype=like.dtype)
        return v.reshape(-1, *([1] * (like.dim() - 1)))

    # -- forward process ----------------------------------------------------------------------------
    def sample_noise_level(self, batch: int, generator: torch.Generator | None = None, device=None,
                           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """SR3's training noise levels: ``t ~ U{1 .. T}`` and ``gamma ~ U(sqrt(alpha_bar_t),
        sqrt(alpha_bar_{t-1}))``; returns ``(t [B] long, gamma [B])``."""
        _positive_int("batch", batch)
        gen_device = generator.device if generator is not None else (device or "cpu")
        t = torch.randint(1, self.steps + 1, (batch,), generator=generator, device=gen_device).cpu()
        low, high = self.gammas[t], self.gammas[t - 1]
        u = _uniform((batch,), generator, "cpu", torch.float64)
        gamma = low + u * (high - low)
        return t.to(device or "cpu"), gamma.to(device=device or "cpu", dtype=dtype)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int | None = None, noise: torch.Tensor | None = None,
                 *, gamma: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x_t = gamma * x0 + sqrt(1 - gamma^2) * noise``: a draw from ``q(x_t | x0)``, with
        ``gamma = sqrt(alpha_bar_t)`` from the step ``t`` (1 .. T) or given directly (continuous, ``[B]``);
        pass exactly one. ``noise`` defaults to a standard normal draw from ``generator``."""
        if (t is None) == (gamma is None):
            raise ValueError("pass exactly one of t (a step 1 .. T) and gamma (a continuous noise level)")
        if gamma is None:
            g = self._at(self.gammas, self._check_t(t, x0.shape[0]), x0)
        else:
            gamma = torch.as_tensor(gamma, dtype=x0.dtype, device=x0.device)
            g = (gamma.expand(x0.shape[0]) if gamma.dim() == 0 else gamma).reshape(-1, *([1] * (x0.dim() - 1)))
        if noise is None:
            noise = _noise(x0.shape, generator, x0.device, x0.dtype)
        return g * x0 + (1.0 - g * g).clamp_min(0).sqrt() * noise

    def training_loss(self, model: Callable, hr: torch.Tensor, lr_up: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """SR3's loss on one batch: draw ``gamma`` (:meth:`sample_noise_level`) and the noise, noise
        ``hr`` to ``x_noisy``, and return the mean L1 (or L2) distance between
        ``model(cat[x_noisy, lr_up], gamma)`` and the noise (a scalar)."""
        if not isinstance(hr, torch.Tensor) or hr.dim() != 4 or not isinstance(lr_up, torch.Tensor) \
                or lr_up.shape[0] != hr.shape[0] or lr_up.shape[2:] != hr.shape[2:]:
            raise ValueError(f"hr and lr_up must be [B, C, H, W] with the same B, H, W; got {_shape(hr)} and "
                             f"{_shape(lr_up)}")
        _, gamma = self.sample_noise_level(hr.shape[0], generator, hr.device, hr.dtype)
        noise = _noise(hr.shape, generator, hr.device, hr.dtype)
        x_noisy = self.q_sample(hr, gamma=gamma, noise=noise)
        pred = model(torch.cat([x_noisy, lr_up], dim=1), gamma)
        if self.loss == "l1":
            return F.l1_loss(pred, noise)
        return F.mse_loss(pred, noise)

    # -- reverse process ----------------------------------------------------------------------------
    def predict_x0(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """``x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)``."""
        t = self._check_t(t, x_t.shape[0])
        abar = self._at(self.alphas_cumprod, t - 1, x_t)
        return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of ``q(x_{t-1} | x_t, x0)`` (Ho et al. 2020, eq. 6-7):
        ``mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t``,
        ``variance = (1 - abar_{t-1}) / (1 - abar_t) beta_t`` (zero at ``t = 1``); the variance and its log
        are ``[B, 1, 1, 1]``."""
        t = self._check_t(t, x_t.shape[0])
        i = t - 1
        mean = self._at(self.posterior_mean_coef1, i, x_t) * x0 + self._at(self.posterior_mean_coef2, i, x_t) * x_t
        return mean, self._at(self.posterior_variance, i, x_t), self._at(self.posterior_log_variance_clipped, i, x_t)

    def _predict(self, model, x_t, lr_up, t: int, clip: bool):
        B = x_t.shape[0]
        gamma = self.gammas[t].to(device=x_t.device, dtype=x_t.dtype).expand(B)
        eps = model(torch.cat([x_t, lr_up], dim=1), gamma)
        x0 = self.predict_x0(x_t, t, eps)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        return x0

    def _start(self, model, lr_up: torch.Tensor, generator):
        if not isinstance(lr_up, torch.Tensor) or lr_up.dim() != 4:
            raise ValueError(f"lr_up must be shaped [B, C, H, W], got {_shape(lr_up)}")
        channels = getattr(model, "out_channels", lr_up.shape[1])
        shape = (lr_up.shape[0], channels, *lr_up.shape[2:])
        return _noise(shape, generator, lr_up.device, lr_up.dtype)

    @torch.no_grad()
    def ddpm_sample(self, model: Callable, lr_up: torch.Tensor, generator: torch.Generator | None = None,
                    clip: bool = True) -> torch.Tensor:
        """Ancestral sampling (Ho et al. 2020): T steps from ``x_T ~ N(0, I)``; at step t the model
        gets ``gamma = sqrt(alpha_bar_t)``, its x0 estimate is clipped to [-1, 1] (``clip``) and
        ``x_{t-1} = posterior mean + sqrt(posterior variance) z`` (no noise at t = 1)."""
        x = self._start(model, lr_up, generator)
        for t in range(self.steps, 0, -1):
            x0 = self._predict(model, x, lr_up, t, clip)
            mean, _, log_var = self.q_posterior_mean_variance(x0, x, t)
            if t > 1:
                x = mean + (0.5 * log_var).exp() * _noise(x.shape, generator, x.device, x.dtype)
            else:
                x = mean
        return x

    def ddim_timesteps(self, steps: int) -> list[int]:
        """The ``steps`` steps DDIM visits, from T down to 1, evenly spaced (rounded)."""
        _positive_int("steps", steps)
        if steps > self.steps:
            raise ValueError(f"DDIM steps ({steps}) cannot exceed the schedule's T = {self.steps}")
        if steps == 1:
            return [self.steps]
        ts = torch.linspace(self.steps, 1, steps, dtype=torch.float64).round().long().tolist()
        return sorted(set(ts), reverse=True)

    @torch.no_grad()
    def ddim_sample(self, model: Callable, lr_up: torch.Tensor, steps: int = 50, eta: float = 0.0,
                    generator: torch.Generator | None = None, clip: bool = True) -> torch.Tensor:
        """DDIM (Song et al. 2021, eq. 12) over a subset of ``steps`` steps (:meth:`ddim_timesteps`),
        ending at ``alpha_bar_0 = 1``. With ``x0`` the (clipped) estimate and ``eps`` recomputed from
        it, ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z``,
        ``sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)``; ``eta = 0`` is
        deterministic given ``x_T``, ``eta = 1`` matches DDPM's variance."""
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
            raise ValueError(f"eta must be a float >= 0, got {eta!r}")
        ts = self.ddim_timesteps(steps)
        x = self._start(model, lr_up, generator)
        for k, t in enumerate(ts):
            t_prev = ts[k + 1] if k + 1 < len(ts) else 0
            x0 = self._predict(model, x, lr_up, t, clip)
            abar = float(self.alphas_cumprod[t - 1])
            abar_prev = float(self.alphas_cumprod[t_prev - 1]) if t_prev > 0 else 1.0
            sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar)) * math.sqrt(1 - abar / abar_prev)
            eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
            x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma ** 2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * _noise(x.shape, generator, x.device, x.dtype)
        return x

"""The super-resolution task of the training loop: SR3 (a conditional diffusion model) on ORL faces,
16x16 -> 64x64 grey, with any registered non-causal mixer in the U-Net's attention layers.

Training loss: SR3's noise-prediction loss (:class:`amlp.models.sr3.Diffusion`, L1 by default) at a
continuous noise level drawn per image.

Evaluation reports ``loss`` (the same loss with noise drawn from a fixed seed, so that it is comparable
between validations), ``psnr`` and ``ssim`` of the sampled high-resolution images against the truth
(:mod:`amlp.tasks.super_resolution.metrics`: grey, uint8, 64x64, data range 255), the same for bicubic
upsampling (``bicubic_psnr``, ``bicubic_ssim``), ``seconds_per_image`` of sampling, and ``params``.
Sampling uses ``model.sampler`` (DDIM with ``model.sample_steps`` steps by default) from noise drawn
with seed 0, so an evaluation gives the same numbers every time.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable

import numpy as np
import torch

from .config import SRDataConfig, SRModelConfig

IMAGE_SIZE = 64


def _unwrap(model):
    return getattr(model, "module", model)


class SuperResolutionTask:
    data_config = SRDataConfig
    model_config = SRModelConfig

    def __init__(self, config):
        from ...models.sr3 import Diffusion

        self.config = config
        m: SRModelConfig = config.model
        self.diffusion = Diffusion(steps=m.timesteps, beta_start=m.beta_start, beta_end=m.beta_end, loss=m.loss)
        self._splits: dict[str, torch.utils.data.Dataset] = {}

    # -- data -----------------------------------------------------------------------------------------
    def dataset(self, split: str):
        if split not in ("train", "val", "test"):
            return None
        if split not in self._splits:
            from .data import FaceSRDataset, load_orl

            d: SRDataConfig = self.config.data
            people = {"train": d.train_people, "val": d.val_people, "test": d.test_people}[split]
            faces = load_orl(d.data_dir)
            self._splits[split] = FaceSRDataset(faces, people, train=(split == "train" and d.flip),
                                                seed=self.config.seed)
        return self._splits[split]

    # -- model ----------------------------------------------------------------------------------------
    def build_model(self):
        from ...models.sr3 import SR3UNet

        m: SRModelConfig = self.config.model
        model = SR3UNet(in_channels=2, out_channels=1, base_channels=m.base_channels,
                        channel_mults=tuple(m.channel_mults), res_blocks=m.res_blocks,
                        attention_resolutions=tuple(m.attention_resolutions), image_size=IMAGE_SIZE, mixer=m.mixer,
                        mixer_options=dict(m.mixer_options), heads=m.heads, dropout=m.dropout)
        print(f"sr: SR3 U-Net ({m.mixer}), {model.num_parameters():,} parameters", file=sys.stderr, flush=True)
        return model

    def loss(self, model, batch) -> torch.Tensor:
        return self.diffusion.training_loss(model, batch["hr"], batch["lr_up"])

    # -- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def super_resolve(self, model, lr_up: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """High-resolution images ``[B, 1, 64, 64]`` in [-1, 1] from bicubic-upsampled inputs ``lr_up``."""
        m: SRModelConfig = self.config.model
        net = _unwrap(model)
        generator = torch.Generator(device=lr_up.device).manual_seed(seed)
        if m.sampler == "ddpm":
            return self.diffusion.ddpm_sample(net, lr_up, generator=generator)
        return self.diffusion.ddim_sample(net, lr_up, steps=m.sample_steps, eta=m.eta, generator=generator)

    def evaluate(self, model, batches: Iterable[dict], split: str = "val") -> dict[str, float]:
        from .metrics import psnr, ssim

        net = _unwrap(model)
        limit = self.config.data.val_sample_examples if split == "val" else None
        loss_sum, rows = 0.0, 0
        scores = {"psnr": [], "ssim": [], "bicubic_psnr": [], "bicubic_ssim": []}
        seconds, sampled = 0.0, 0
        generator = torch.Generator(device="cpu").manual_seed(1234)
        from tqdm.auto import tqdm

        for batch in tqdm(batches, desc=f"sampling {split}", unit="batch", leave=False, file=sys.stderr,
                          disable=not sys.stderr.isatty()):
            B = batch["hr"].shape[0]
            loss = self.diffusion.training_loss(net, batch["hr"], batch["lr_up"], generator=generator)
            loss_sum += float(loss) * B
            rows += B
            keep = torch.ones(B, dtype=torch.bool) if limit is None else batch["index"].cpu() < limit
            if not bool(keep.any()):
                continue
            idx = keep.nonzero().flatten().to(batch["hr"].device)
            hr, lr_up = batch["hr"][idx], batch["lr_up"][idx]
            start = time.perf_counter()
            sr = self.super_resolve(net, lr_up, seed=int(batch["index"][idx][0]))
            seconds += time.perf_counter() - start
            sampled += len(idx)
            for b in range(len(idx)):
                scores["psnr"].append(psnr(sr[b], hr[b]))
                scores["ssim"].append(ssim(sr[b], hr[b]))
                scores["bicubic_psnr"].append(psnr(lr_up[b], hr[b]))
                scores["bicubic_ssim"].append(ssim(lr_up[b], hr[b]))
        metrics = {"loss": loss_sum / max(rows, 1)}
        metrics.update({k: float(np.mean(v)) for k, v in scores.items() if v})
        metrics["sampled_images"] = float(sampled)
        metrics["seconds_per_image"] = seconds / max(sampled, 1)
        metrics["params"] = float(net.num_parameters())
        return metrics


def upscale_file(task: SuperResolutionTask, model, input_path: str, output_path: str, *, resize: bool = False,
                 seed: int = 0) -> str | None:
    """Super-resolve the 16x16 grey image at ``input_path`` into a 64x64 PNG at ``output_path``; returns a
    note when the input was resized or converted (only with ``resize``), else None. An image that is not
    16x16 grey raises ``ValueError`` without ``resize``."""
    from .data import bicubic_upsample, load_face_image, save_image

    lr, note = load_face_image(input_path, resize=resize)
    device = next(_unwrap(model).parameters()).device
    lr_up = bicubic_upsample(lr).to(device)[None]
    sr = task.super_resolve(model, lr_up, seed=seed)[0]
    save_image(output_path, sr)
    return note

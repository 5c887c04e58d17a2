"""PSNR and SSIM of super-resolved grey faces, from scikit-image, on 8-bit pixels.

Inputs are ``[-1, 1]`` float tensors/arrays (``[1, H, W]`` or ``[H, W]``) or uint8 pixels
(``[H, W]``); floats are first rounded to uint8 by
:func:`amlp.tasks.super_resolution.data.to_image` (``round((x + 1) * 127.5)``, clipped to 0..255),
i.e. the pixels a saved PNG holds. The two images must have the same shape (the HR size, 64 x 64, in
the study). Both metrics are computed on the whole image, grey, with ``data_range = 255``:

* PSNR: ``skimage.metrics.peak_signal_noise_ratio(target, pred, data_range=255)``
  ``= 10 log10(255^2 / MSE)`` in dB, with the MSE over all pixels. Identical images (MSE 0) give
  ``inf`` in scikit-image; here they give ``PSNR_CAP = 100.0`` dB so means stay finite. (The
  largest PSNR of two different 8-bit 64 x 64 images is ``10 log10(255^2 * 4096) = 84.3`` dB, so
  the cap only ever stands for "identical".)
* SSIM: ``skimage.metrics.structural_similarity(target, pred, data_range=255)`` with scikit-image's
  documented defaults: a 7 x 7 uniform (box) window, ``K1 = 0.01``, ``K2 = 0.03``,
  ``C1 = (K1 * 255)^2``, ``C2 = (K2 * 255)^2``, sample (``N - 1``) variances and covariance in each
  window, and the mean of the SSIM map over the pixels whose window lies inside the image (a
  3-pixel border is left out). Identical images give 1.

Batch helpers (:func:`psnr_batch`, :func:`ssim_batch`) return per-image lists;
:func:`bicubic_baseline` scores the bicubic upsampling ``lr_up`` against ``hr`` (the study's
reference row).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from .data import FaceSRDataset, to_image

PSNR_CAP = 100.0
DATA_RANGE = 255.0
SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p, t = to_image(pred), to_image(target)
    if p.ndim != 2 or t.ndim != 2:
        raise ValueError(f"expected one grey image each ([1, H, W] or [H, W]), got shapes "
                         f"{tuple(p.shape)} and {tuple(t.shape)}")
    if p.shape != t.shape:
        raise ValueError(f"prediction and target differ in shape: {tuple(p.shape)} vs {tuple(t.shape)}")
    return p, t


def psnr(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> float:
    """PSNR in dB of one grey image against its target (module doc), capped at ``PSNR_CAP``."""
    from skimage.metrics import peak_signal_noise_ratio

    p, t = _pair(pred, target)
    if np.array_equal(p, t):
        return PSNR_CAP
    return min(float(peak_signal_noise_ratio(t, p, data_range=DATA_RANGE)), PSNR_CAP)


def ssim(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> float:
    """SSIM of one grey image against its target (module doc): in ``[-1, 1]``, 1 when identical."""
    from skimage.metrics import structural_similarity

    p, t = _pair(pred, target)
    return float(structural_similarity(t, p, win_size=SSIM_WINDOW, K1=SSIM_K1, K2=SSIM_K2,
                                       gaussian_weights=False, use_sample_covariance=True,
                                       data_range=DATA_RANGE))


def _unbatch(images) -> list:
    """A batch as a list of single images: ``[B, 1, H, W]`` and ``[B, H, W]`` split along the first
    axis (a ``[1, H, W]`` image is a batch of one either way), ``[H, W]`` is one image, any other
    sequence is taken as a list of images."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return list(images) if images.ndim >= 3 else [images]
    return list(images)


def psnr_batch(preds: torch.Tensor | np.ndarray | Iterable,
               targets: torch.Tensor | np.ndarray | Iterable) -> list[float]:
    """Per-image PSNRs of a batch: ``[B, 1, H, W]`` tensors/arrays (or uint8 ``[B, H, W]``), or
    sequences of single images."""
    ps, ts = _unbatch(preds), _unbatch(targets)
    if len(ps) != len(ts):
        raise ValueError(f"{len(ps)} predictions but {len(ts)} targets")
    return [psnr(p, t) for p, t in zip(ps, ts)]


def ssim_batch(preds: torch.Tensor | np.ndarray | Iterable,
               targets: torch.Tensor | np.ndarray | Iterable) -> list[float]:
    """Per-image SSIMs of a batch (shapes as :func:`psnr_batch`)."""
    ps, ts = _unbatch(preds), _unbatch(targets)
    if len(ps) != len(ts):
        raise ValueError(f"{len(ps)} predictions but {len(ts)} targets")
    return [ssim(p, t) for p, t in zip(ps, ts)]


def bicubic_baseline(dataset: FaceSRDataset) -> dict:
    """PSNR / SSIM of the bicubic upsampling ``lr_up`` against ``hr`` for every image of
    ``dataset`` (unflipped; a flip changes neither), the study's reference row.

    Returns ``{"psnr": [...], "ssim": [...], "person": [...], "image": [...], "psnr_mean": float,
    "ssim_mean": float}``: per-image lists in the dataset's order (item ``j`` at position ``j``;
    ``person``/``image`` name its file ``s<k>/<i>.pgm``) and their plain means.
    """
    scores_p = [psnr(up, hr) for up, hr in zip(dataset.lr_up_pixels, dataset.hr_pixels)]
    scores_s = [ssim(up, hr) for up, hr in zip(dataset.lr_up_pixels, dataset.hr_pixels)]
    return {"psnr": scores_p, "ssim": scores_s,
            "person": [k for k, _ in dataset.keys], "image": [i for _, i in dataset.keys],
            "psnr_mean": float(np.mean(scores_p)) if scores_p else math.nan,
            "ssim_mean": float(np.mean(scores_s)) if scores_s else math.nan}

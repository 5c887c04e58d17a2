"""ORL faces for x4 face super-resolution (16x16 to 64x64, grey): reading, the person split, the
HR / LR / bicubic-upsampled triplets, flips, and image conversion helpers.

**Files.** ``<data_dir>/orl_faces/s<k>/<i>.pgm`` for persons ``k = 1..40`` and images ``i = 1..10``:
binary PGM, 92 wide x 112 high, 8-bit grey (the AT&T / Olivetti Research Laboratory "Database of
Faces", Samaria & Harter 1994; credit the Olivetti Research Laboratory when using the images).
``data_dir`` is resolved by :func:`amlp.tasks.forecasting.data.resolve_data_dir`: the argument, else
``$AMLP_DATA_DIR``, else ``../shared/data`` beside the repository root when it exists, else
``./data``. A ``data_dir`` that is itself the ``orl_faces`` folder (it holds ``s1/``) is accepted too.
Images are read with Pillow (:func:`load_orl`).

**Split** (:func:`make_splits`): by person, so no identity is in two splits. Default train
``s1``-``s32`` (320 images), val ``s33``-``s36`` (40), test ``s37``-``s40`` (40).

**Preprocessing** (all in Pillow, on 8-bit grey images, every result rounded and clipped to uint8
by Pillow, as an image saved to disk would hold):

1. centre crop to a square: a 92 x 112 ORL image keeps all 92 columns and rows 10..101
   (inclusive), i.e. ``Image.crop((0, 10, 92, 102))`` (:func:`centre_crop_square`);
2. HR: that 92 x 92 crop resized to 64 x 64 with ``Image.Resampling.BICUBIC`` (:func:`make_hr`);
3. LR: the 64 x 64 HR resized to 16 x 16 with ``Image.Resampling.BICUBIC`` (SR3's down-sampling;
   :func:`make_lr`);
4. ``lr_up``: the 16 x 16 LR resized back to 64 x 64 with ``Image.Resampling.BICUBIC`` (the
   "bicubic upsampling" that conditions the model, and the reference row of the study;
   :func:`make_lr_up`).

Pillow's ``BICUBIC`` is the separable cubic convolution kernel of Keys with ``a = -0.5``; when
shrinking, Pillow widens the kernel's support by the scale factor (92/64 for the HR, 4 for the
LR), so the downsample is antialiased (like MATLAB's ``imresize``), not point-sampled. Pixel centres
are aligned (``(x + 0.5) * scale - 0.5``). It is exactly mirror-symmetric, so a horizontal flip
commutes with every step above.

**Tensors** are ``float32`` in ``[-1, 1]``, shape ``[1, H, W]`` (one grey channel):
``x = u / 127.5 - 1`` for a uint8 pixel ``u`` (:func:`from_image`); back to pixels by
``round((x + 1) * 127.5)`` (ties to even) clipped to ``[0, 255]`` (:func:`to_image`); the round trip
is exact.

**Items** of :class:`FaceSRDataset`: ``{"hr": [1, 64, 64], "lr_up": [1, 64, 64], "lr": [1, 16, 16],
"person": k, "image": i, "index": j, "flipped": bool}`` where ``(person, image)`` names the file
``s<k>/<i>.pgm`` and ``index`` is the item's position ``j`` in the dataset (0-based). With
``train=True`` each item is flipped horizontally (all three images together) with probability
``flip_prob`` (0.5), drawn either from a ``torch.Generator`` passed in or, by default, from a
generator seeded per item from ``(seed, epoch, index)`` (:meth:`FaceSRDataset.set_epoch`), so every
run, and every DataLoader worker layout, sees the same flips. :func:`make_datasets` builds the three
splits with flips in "train" only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from amlp.tasks.forecasting.data import resolve_data_dir

ORL_FOLDER = "orl_faces"
ORL_PEOPLE = 40
ORL_IMAGES_PER_PERSON = 10
ORL_WIDTH, ORL_HEIGHT = 92, 112
HR_SIZE = 64
LR_SIZE = 16
SPLITS = ("train", "val", "test")
DEFAULT_SPLITS = {
    "train": tuple(range(1, 33)),
    "val": tuple(range(33, 37)),
    "test": tuple(range(37, 41)),
}
BICUBIC = Image.Resampling.BICUBIC

_READ_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError)


# -- reading -----------------------------------------------------------------------------------------
def orl_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The ``orl_faces`` folder: ``<resolved data_dir>/orl_faces``, or ``data_dir`` itself when it
    already holds ``s1/``. Raises ``FileNotFoundError`` naming the path and ``AMLP_DATA_DIR`` when
    the folder does not exist."""
    base = resolve_data_dir(data_dir)
    if (base / "s1").is_dir() and base.name != "s1":
        return base
    folder = base / ORL_FOLDER
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ORL faces folder not found: {str(folder)!r} does not exist. Point --data-dir or the "
            f"environment variable AMLP_DATA_DIR to the folder that holds {ORL_FOLDER}/ "
            f"(with s1/ ... s40/ of 1.pgm ... 10.pgm).")
    return folder


def read_grey_image(path: str | os.PathLike) -> Image.Image:
    """Open and decode an image file with Pillow. Raises ``FileNotFoundError`` if it is missing and
    ``ValueError`` naming the file if Pillow cannot decode it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {str(path)!r}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except _READ_ERRORS as err:
        raise ValueError(f"{path}: cannot be read as an image ({type(err).__name__}: {err})") from None


def read_orl_image(path: str | os.PathLike) -> np.ndarray:
    """One ORL image as ``np.uint8 [112, 92]`` (rows, columns), read with Pillow. Raises
    ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing, unreadable, not 8-bit
    grey, or not 92 wide x 112 high."""
    img = read_grey_image(path)
    if img.mode != "L":
        raise ValueError(f"{path}: expected an 8-bit grey image (Pillow mode 'L'), got mode {img.mode!r}")
    if img.size != (ORL_WIDTH, ORL_HEIGHT):
        raise ValueError(f"{path}: expected {ORL_WIDTH} wide x {ORL_HEIGHT} high, got {img.size[0]} x {img.size[1]}")
    return np.array(img, dtype=np.uint8)


def load_orl(data_dir: str | os.PathLike | None = None,
             persons: Iterable[int] | None = None) -> dict[int, list[np.ndarray]]:
    """The ORL images: ``{person k: [image 1, ..., image 10]}``, each ``np.uint8 [112, 92]``.

    ``persons`` (default ``1..40``) picks which ``s<k>`` folders to read. Raises
    ``FileNotFoundError`` naming the path (and ``AMLP_DATA_DIR``) when the folder, a person's
    folder or an image is missing, and ``ValueError`` naming the file when an image is unreadable or
    has the wrong size or mode.
    """
    folder = orl_dir(data_dir)
    wanted = list(range(1, ORL_PEOPLE + 1)) if persons is None else [int(p) for p in persons]
    faces: dict[int, list[np.ndarray]] = {}
    for k in wanted:
        person_dir = folder / f"s{k}"
        if not person_dir.is_dir():
            raise FileNotFoundError(f"ORL person folder not found: {str(person_dir)!r} (in {str(folder)!r})")
        faces[k] = [read_orl_image(person_dir / f"{i}.pgm") for i in range(1, ORL_IMAGES_PER_PERSON + 1)]
    return faces


# -- splits ------------------------------------------------------------------------------------------
def make_splits(train: Iterable[int] | None = None, val: Iterable[int] | None = None,
                test: Iterable[int] | None = None, *, people: int = ORL_PEOPLE) -> dict[str, list[int]]:
    """``{"train": [...], "val": [...], "test": [...]}``: lists of person ids (the ``k`` of
    ``s<k>``). Any list not given takes its default (train 1-32, val 33-36, test 37-40).

    Raises ``ValueError`` when a person is in two splits, is repeated within one, or is outside
    ``1..people``.
    """
    given = {"train": train, "val": val, "test": test}
    splits: dict[str, list[int]] = {}
    for name in SPLITS:
        persons = given[name]
        splits[name] = list(DEFAULT_SPLITS[name]) if persons is None else [int(p) for p in persons]
        bad = [p for p in splits[name] if not 1 <= p <= people]
        if bad:
            raise ValueError(f"split {name!r}: person(s) {bad} outside 1..{people}")
        if len(set(splits[name])) != len(splits[name]):
            dup = sorted({p for p in splits[name] if splits[name].count(p) > 1})
            raise ValueError(f"split {name!r}: person(s) {dup} listed more than once")
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            shared = sorted(set(splits[a]) & set(splits[b]))
            if shared:
                raise ValueError(f"person(s) {shared} are in both the {a!r} and the {b!r} split; "
                                 f"the split must be by person")
    return splits


# -- preprocessing (uint8 arrays in, uint8 arrays out) -------------------------------------------------
def resize_bicubic(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a ``np.uint8 [H, W]`` grey image to ``size`` (an int for a square, or
    ``(width, height)``) with Pillow's ``Image.Resampling.BICUBIC``; returns ``np.uint8``
    ``[height, width]`` (Pillow rounds and clips to 0..255)."""
    width, height = (size, size) if isinstance(size, int) else size
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 2:
        raise ValueError(f"expected a grey image [H, W], got shape {tuple(image.shape)}")
    return np.asarray(Image.fromarray(image).resize((width, height), BICUBIC), dtype=np.uint8)


def centre_crop_square(image: np.ndarray) -> np.ndarray:
    """The centred square of side ``min(H, W)`` of a ``[H, W]`` image: top ``(H - s) // 2``, left
    ``(W - s) // 2``. For a 92 x 112 ORL image: rows 10..101 (inclusive), all 92 columns."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[top:top + s, left:left + s]


def make_hr(image: np.ndarray, hr_size: int = HR_SIZE) -> np.ndarray:
    """HR image ``np.uint8 [hr_size, hr_size]``: centre square crop, then Pillow bicubic resize."""
    return resize_bicubic(centre_crop_square(image), hr_size)


def make_lr(hr: np.ndarray, lr_size: int = LR_SIZE) -> np.ndarray:
    """LR image ``np.uint8 [lr_size, lr_size]``: the HR resized with Pillow bicubic (antialiased)."""
    return resize_bicubic(hr, lr_size)


def make_lr_up(lr: np.ndarray, hr_size: int = HR_SIZE) -> np.ndarray:
    """The model's conditioning ``np.uint8 [hr_size, hr_size]``: the LR resized back with Pillow
    bicubic."""
    return resize_bicubic(lr, hr_size)


def make_triplet(image: np.ndarray, hr_size: int = HR_SIZE,
                 lr_size: int = LR_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hr, lr, lr_up)`` uint8 arrays of one original image (steps 1-4 of the module doc)."""
    hr = make_hr(image, hr_size)
    lr = make_lr(hr, lr_size)
    return hr, lr, make_lr_up(lr, hr_size)


# -- tensors <-> pixels --------------------------------------------------------------------------------
def to_image(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Pixels of a ``[-1, 1]`` image: ``np.uint8``, ``round((x + 1) * 127.5)`` (ties to even)
    clipped to ``[0, 255]``, computed in float64. A channel axis of size 1 in position -3 is dropped:
    ``[1, H, W]`` -> ``[H, W]``, ``[B, 1, H, W]`` -> ``[B, H, W]``; ``[H, W]`` stays. A uint8 input
    (array or tensor) is taken as pixels already and only loses that channel axis."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim >= 3 and arr.shape[-3] == 1:
        arr = arr.squeeze(-3)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"expected a float image in [-1, 1] or uint8 pixels, got dtype {arr.dtype}")
    return np.clip(np.round((arr.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_image(image: np.ndarray) -> torch.Tensor:
    """``float32`` tensor in ``[-1, 1]`` of uint8 pixels: ``u / 127.5 - 1``, with a channel axis
    added: ``[H, W]`` -> ``[1, H, W]``, ``[B, H, W]`` -> ``[B, 1, H, W]``."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected [H, W] or [B, H, W] pixels, got shape {tuple(arr.shape)}")
    t = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)
    return t.unsqueeze(-3)


def bicubic_upsample(lr: torch.Tensor | np.ndarray, hr_size: int = HR_SIZE) -> torch.Tensor:
    """The model's conditioning ``lr_up`` (``float32 [1, hr_size, hr_size]`` in ``[-1, 1]``) of an
    LR image given as a ``[-1, 1]`` tensor ``[1, h, w]`` / ``[h, w]`` or uint8 pixels: rounded to
    pixels (:func:`to_image`), Pillow bicubic to ``hr_size``, back to ``[-1, 1]``."""
    return from_image(make_lr_up(to_image(lr), hr_size))


# -- user images (``amlp upscale``) ------------------------------------------------------------------
class FaceImage(NamedTuple):
    """A user's LR face: ``lr`` ``float32 [1, 16, 16]`` in ``[-1, 1]``; ``note`` says how the file was
    converted, ``None`` when it was used as is (so ``lr, note = load_face_image(...)`` works)."""
    lr: torch.Tensor
    note: str | None

    @property
    def resized(self) -> bool:
        """Whether the file had to be converted to 16x16 grey."""
        return self.note is not None


def save_image(path: str | os.PathLike, image: torch.Tensor | np.ndarray) -> Path:
    """Save a grey image as an 8-bit grey file (format from the suffix, e.g. PNG). ``image`` is a
    ``[-1, 1]`` float tensor/array ``[1, H, W]`` or ``[H, W]`` (rounded by :func:`to_image`) or uint8
    pixels ``[H, W]``. Creates missing parent folders; returns the path."""
    pixels = to_image(image)
    if pixels.ndim != 2:
        raise ValueError(f"save_image saves one grey image [1, H, W] or [H, W], got shape {tuple(pixels.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def load_face_image(path: str | os.PathLike, *, resize: bool = False, lr_size: int = LR_SIZE,
                    hr_size: int = HR_SIZE) -> FaceImage:
    """A user's LR face image (any format Pillow reads, e.g. PNG) for the model.

    Without ``resize`` the file must be ``lr_size x lr_size`` (16 x 16) 8-bit grey (Pillow mode
    ``'L'``); anything else raises ``ValueError`` naming the file, its size and mode. With
    ``resize=True`` any other image is converted with Pillow's ``convert("L")`` (ITU-R 601-2 luma
    for colour, alpha dropped), centre-cropped to a square, resized to ``hr_size`` and then to
    ``lr_size`` with Pillow bicubic (the dataset's own preprocessing, so an original ORL image gives
    exactly the dataset's LR); the returned ``note`` (``None`` when used as is) and ``resized``
    say so. A missing file
    raises ``FileNotFoundError``, an undecodable one ``ValueError``, both naming the path.
    """
    img = read_grey_image(path)
    width, height = img.size
    if img.mode == "L" and img.size == (lr_size, lr_size):
        return FaceImage(from_image(np.array(img, dtype=np.uint8)), None)
    if not resize:
        problems = []
        if img.size != (lr_size, lr_size):
            problems.append(f"is {width}x{height}, expected {lr_size}x{lr_size}")
        if img.mode != "L":
            problems.append(f"has Pillow mode {img.mode!r}, expected 8-bit grey ('L')")
        raise ValueError(f"{path}: {' and '.join(problems)}. Give a {lr_size}x{lr_size} grey image, or "
                         f"resize it (--resize) to convert it to grey, centre-crop and bicubic-resize it.")
    grey = np.array(img if img.mode == "L" else img.convert("L"), dtype=np.uint8)
    side = min(width, height)
    lr = make_lr(make_hr(grey, hr_size), lr_size)
    message = (f"{path}: resized from {width}x{height} (mode {img.mode!r}) to {lr_size}x{lr_size} grey: "
               + ("" if img.mode == "L" else "converted to grey, ")
               + (f"centre-cropped to {side}x{side}, " if width != height else "")
               + f"bicubic to {hr_size}x{hr_size}, then to {lr_size}x{lr_size}")
    return FaceImage(from_image(lr), message)


# -- dataset -----------------------------------------------------------------------------------------
def _item_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit torch seed mixed from (seed, epoch, position) by numpy's SeedSequence."""
    state = np.random.SeedSequence([seed % 2 ** 64, epoch % 2 ** 64, position])
    return int(state.generate_state(1, dtype=np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF


class FaceSRDataset(Dataset):
    """HR / LR / bicubic-upsampled ORL faces of some persons (see the module doc for every step).

    ``faces`` is the output of :func:`load_orl` (read from ``data_dir`` when ``None``). ``persons``
    lists the person ids to use (e.g. ``make_splits()["val"]``), or names a default split
    (``"train"``, ``"val"``, ``"test"``); ``None`` takes every person of ``faces``. Items are ordered
    by person (in the order given), then image; all images are prepared once, at construction.

    Item ``j``: ``{"hr": float32 [1, hr_size, hr_size], "lr_up": float32 [1, hr_size, hr_size],
    "lr": float32 [1, lr_size, lr_size]`` (all in ``[-1, 1]``), ``"person": k, "image": i`` (file
    ``s<k>/<i>.pgm``), ``"index": j, "flipped": bool}``.

    Flips: when ``train`` (default ``False``) each item is mirrored left-right (HR, LR and lr_up
    together) with probability ``flip_prob``. The draw uses ``generator`` when one is given
    (order-dependent: reproducible with ``num_workers=0`` and a seeded generator); otherwise a
    generator seeded from ``(seed, epoch, j)``, so item ``j`` of epoch ``e`` is flipped the same way in
    every run whatever the DataLoader's workers; call :meth:`set_epoch` each epoch for fresh flips.
    With ``train=False`` nothing is ever flipped.
    """

    def __init__(self, faces: Mapping[int, Sequence[np.ndarray]] | None = None,
                 persons: Sequence[int] | str | None = None, *, data_dir: str | os.PathLike | None = None,
                 train: bool = False, flip_prob: float = 0.5, seed: int = 0,
                 generator: torch.Generator | None = None, hr_size: int = HR_SIZE, lr_size: int = LR_SIZE):
        if isinstance(persons, str):
            if persons not in SPLITS:
                raise ValueError(f"unknown split {persons!r}; expected one of {', '.join(SPLITS)} or a list of persons")
            persons = make_splits()[persons]
        if persons is not None:
            persons = [int(p) for p in persons]
            if len(set(persons)) != len(persons):
                raise ValueError(f"persons {persons} has repeats")
        if faces is None:
            faces = load_orl(data_dir, persons)
        if persons is None:
            persons = sorted(faces)
        if not persons:
            raise ValueError("no persons to build the dataset from")
        missing = [p for p in persons if p not in faces]
        if missing:
            raise KeyError(f"faces has no images for person(s) {missing}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.persons = persons
        self.train = bool(train)
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self.generator = generator
        self.epoch = 0
        self.hr_size, self.lr_size = int(hr_size), int(lr_size)
        keys, hrs, lrs, ups = [], [], [], []
        for k in persons:
            for i, image in enumerate(faces[k], start=1):
                hr, lr, up = make_triplet(np.asarray(image, dtype=np.uint8), self.hr_size, self.lr_size)
                keys.append((k, i))
                hrs.append(hr)
                lrs.append(lr)
                ups.append(up)
        #: ``(person, image)`` of each item
        self.keys: list[tuple[int, int]] = keys
        #: uint8 pixels, unflipped: ``[N, hr, hr]``, ``[N, lr, lr]``, ``[N, hr, hr]``
        self.hr_pixels = np.stack(hrs)
        self.lr_pixels = np.stack(lrs)
        self.lr_up_pixels = np.stack(ups)

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose per-item flips are drawn (no effect when a generator was given)."""
        self.epoch = int(epoch)

    def flips(self, j: int) -> bool:
        """Whether item ``j`` is flipped now (draws from the generator when one was given)."""
        if not self.train or self.flip_prob == 0.0:
            return False
        gen = self.generator
        if gen is None:
            gen = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, j))
        return bool(torch.rand((), generator=gen).item() < self.flip_prob)

    def item(self, j: int, flip: bool = False) -> dict:
        """Item ``j`` with the flip given explicitly (no random draw)."""
        hr, lr, up = self.hr_pixels[j], self.lr_pixels[j], self.lr_up_pixels[j]
        if flip:
            hr, lr, up = hr[:, ::-1], lr[:, ::-1], up[:, ::-1]
        k, i = self.keys[j]
        return {"hr": from_image(np.ascontiguousarray(hr)), "lr_up": from_image(np.ascontiguousarray(up)),
                "lr": from_image(np.ascontiguousarray(lr)), "person": k, "image": i, "index": j,
                "flipped": bool(flip)}

    def __getitem__(self, j: int) -> dict:
        if not -len(self) <= j < len(self):
            raise IndexError(f"item {j} out of range for {len(self)} items")
        j = j % len(self)
        return self.item(j, self.flips(j))


def make_datasets(data_dir: str | os.PathLike | None = None, *,
                  splits: Mapping[str, Sequence[int]] | None = None, seed: int = 0, flip_prob: float = 0.5,
                  hr_size: int = HR_SIZE, lr_size: int = LR_SIZE) -> dict[str, FaceSRDataset]:
    """``{"train", "val", "test"}`` datasets of :func:`make_splits` (``splits`` overrides any of its
    lists), reading the files once; flips in "train" only. Empty splits are left out."""
    chosen = make_splits(**dict(splits or {}))
    faces = load_orl(data_dir, [p for name in SPLITS for p in chosen[name]])
    return {name: FaceSRDataset(faces, chosen[name], train=(name == "train"), flip_prob=flip_prob, seed=seed,
                                hr_size=hr_size, lr_size=lr_size)
            for name in SPLITS if chosen[name]}

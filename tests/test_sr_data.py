"""ORL face super-resolution data and metrics: split, preprocessing, flips, PSNR/SSIM, user images."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("skimage", reason="scikit-image is needed for PSNR/SSIM (pip install scikit-image)")

from amlp.tasks.forecasting.data import resolve_data_dir  # noqa: E402
from amlp.tasks.super_resolution import data as srd  # noqa: E402
from amlp.tasks.super_resolution import metrics as srm  # noqa: E402

ORL = resolve_data_dir() / "orl_faces"


@pytest.fixture(scope="module")
def faces():
    if not (ORL / "s1" / "1.pgm").is_file():
        pytest.skip(f"ORL faces not found at {ORL} (set AMLP_DATA_DIR to the folder holding orl_faces/)")
    return srd.load_orl()


@pytest.fixture(scope="module")
def datasets(faces):
    splits = srd.make_splits()
    return {name: srd.FaceSRDataset(faces, splits[name], train=(name == "train")) for name in srd.SPLITS}


# -- split --------------------------------------------------------------------------------------------
def test_default_split_is_by_person_and_covers_everyone():
    splits = srd.make_splits()
    sizes = {name: len(persons) for name, persons in splits.items()}
    assert sizes == {"train": 32, "val": 4, "test": 4}
    everyone = [p for persons in splits.values() for p in persons]
    assert sorted(everyone) == list(range(1, 41))          # 40 people, none twice
    assert splits["val"] == [33, 34, 35, 36] and splits["test"] == [37, 38, 39, 40]


def test_split_rejects_a_person_in_two_splits_or_out_of_range():
    with pytest.raises(ValueError, match=r"\[5\].*'train'.*'test'"):
        srd.make_splits(test=[5, 37])
    with pytest.raises(ValueError, match="outside"):
        srd.make_splits(val=[41])
    custom = srd.make_splits(train=range(1, 31), val=range(31, 36), test=range(36, 41))
    assert len(custom["train"]) == 30 and len(custom["val"]) == 5 and len(custom["test"]) == 5


def test_datasets_follow_the_split(faces, datasets):
    assert len(faces) == 40 and all(len(v) == 10 for v in faces.values())
    assert all(img.dtype == np.uint8 and img.shape == (112, 92) for img in faces[1])
    seen = {name: {k for k, _ in ds.keys} for name, ds in datasets.items()}
    assert {name: len(ds) for name, ds in datasets.items()} == {"train": 320, "val": 40, "test": 40}
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    assert seen["train"] | seen["val"] | seen["test"] == set(range(1, 41))


# -- items ---------------------------------------------------------------------------------------------
def test_item_shapes_ranges_and_keys(datasets):
    item = datasets["val"][3]
    assert item["hr"].shape == (1, 64, 64) and item["lr_up"].shape == (1, 64, 64) and item["lr"].shape == (1, 16, 16)
    for key in ("hr", "lr_up", "lr"):
        assert item[key].dtype == torch.float32
        assert -1.0 <= float(item[key].min()) and float(item[key].max()) <= 1.0
    assert (item["person"], item["image"], item["index"], item["flipped"]) == (33, 4, 3, False)
    batch = next(iter(torch.utils.data.DataLoader(datasets["test"], batch_size=4)))
    assert batch["hr"].shape == (4, 1, 64, 64) and batch["person"].tolist() == [37] * 4


def _pil_bicubic(img: Image.Image, side: int) -> Image.Image:
    return img.resize((side, side), Image.BICUBIC)


def test_lr_is_the_pil_bicubic_downsample_of_the_hr(datasets):
    ds = datasets["test"]
    for j in (0, 17, 39):
        item = ds[j]
        original = Image.open(ORL / f"s{item['person']}" / f"{item['image']}.pgm")
        hr = _pil_bicubic(original.crop((0, 10, 92, 102)), 64)
        lr = _pil_bicubic(hr, 16)
        lr_up = _pil_bicubic(lr, 64)
        assert np.array_equal(srd.to_image(item["hr"]), np.asarray(hr))
        assert np.array_equal(srd.to_image(item["lr"]), np.asarray(lr))
        assert np.array_equal(srd.to_image(item["lr_up"]), np.asarray(lr_up))
        assert torch.equal(item["hr"], torch.from_numpy(np.asarray(hr, np.float32) / 127.5 - 1)[None])


def test_pixel_round_trip_is_exact():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    t = srd.from_image(pixels)
    assert t.shape == (1, 16, 16) and t.dtype == torch.float32
    assert float(t.min()) == -1.0 and float(t.max()) == 1.0
    assert np.array_equal(srd.to_image(t), pixels)
    assert np.array_equal(srd.to_image(torch.full((1, 2, 2), 3.0)), np.full((2, 2), 255, np.uint8))


def test_flips_reproducible_and_only_in_training(faces, datasets):
    train = srd.FaceSRDataset(faces, "train", train=True, seed=3)
    again = srd.FaceSRDataset(faces, "train", train=True, seed=3)
    flags = [train[j]["flipped"] for j in range(len(train))]
    assert flags == [again[j]["flipped"] for j in range(len(again))]
    assert flags == [train[j]["flipped"] for j in range(len(train))]    # same again within the epoch
    assert 100 < sum(flags) < 220                                       # about half of 320
    train.set_epoch(1)
    assert flags != [train[j]["flipped"] for j in range(len(train))]
    j = flags.index(True)
    train.set_epoch(0)
    flipped, plain = train[j], train.item(j, flip=False)
    for key in ("hr", "lr_up", "lr"):
        assert torch.equal(flipped[key], plain[key].flip(-1))
    # the flipped LR is still the bicubic downsample of the flipped HR
    assert np.array_equal(srd.to_image(flipped["lr"]), srd.make_lr(srd.to_image(flipped["hr"])))
    # an explicit generator: same seed, same sequence
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = srd.FaceSRDataset(faces, [1, 2], train=True, generator=g1)
    b = srd.FaceSRDataset(faces, [1, 2], train=True, generator=g2)
    assert [a[j]["flipped"] for j in range(20)] == [b[j]["flipped"] for j in range(20)]
    made = srd.make_datasets()
    assert made["train"].train and not made["val"].train and not made["test"].train
    for name in ("val", "test"):
        assert not datasets[name].train
        assert not any(datasets[name][j]["flipped"] for j in range(len(datasets[name])))


# -- metrics -------------------------------------------------------------------------------------------
def _numpy_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM written out: 7x7 box windows inside the image, sample (co)variances, K1 0.01, K2 0.03."""
    wx = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), (7, 7)).reshape(-1, 49)
    wy = np.lib.stride_tricks.sliding_window_view(y.astype(np.float64), (7, 7)).reshape(-1, 49)
    mx, my = wx.mean(1), wy.mean(1)
    vx, vy = wx.var(1, ddof=1), wy.var(1, ddof=1)
    cxy = ((wx - mx[:, None]) * (wy - my[:, None])).sum(1) / 48
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return float(np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))))


def test_identical_images_give_the_cap_and_ssim_one():
    img = torch.rand(1, 64, 64) * 2 - 1
    assert srm.PSNR_CAP == 100.0
    assert srm.psnr(img, img) == srm.PSNR_CAP
    assert srm.ssim(img, img) == pytest.approx(1.0, abs=1e-12)


def test_psnr_and_ssim_of_a_known_noise():
    rng = np.random.default_rng(0)
    target = rng.integers(20, 236, size=(64, 64)).astype(np.uint8)
    noise = np.where(rng.random((64, 64)) < 0.5, -10, 10)              # +-10 everywhere: MSE = 100
    pred = (target.astype(int) + noise).astype(np.uint8)
    expected = 10 * math.log10(255 ** 2 / 100)                          # 28.1308 dB
    assert srm.psnr(pred, target) == pytest.approx(expected, abs=1e-9)
    assert srm.ssim(pred, target) == pytest.approx(_numpy_ssim(pred, target), abs=1e-9)
    # [-1, 1] tensors of the same pixels give the same numbers
    assert srm.psnr(srd.from_image(pred), srd.from_image(target)) == pytest.approx(expected, abs=1e-9)
    assert srm.psnr_batch(np.stack([pred, target]), np.stack([target, target])) == pytest.approx([expected, 100.0])
    preds, targets = np.stack([pred, target, pred]), np.stack([target, target, pred])
    assert srm.ssim_batch(preds, targets) == pytest.approx([srm.ssim(p, t) for p, t in zip(preds, targets)])
    assert srm.ssim_batch(preds, targets)[1] == pytest.approx(1.0) and srm.ssim_batch(preds, targets)[0] < 1


def test_bicubic_baseline_on_test_split(datasets):
    base = srm.bicubic_baseline(datasets["test"])
    assert len(base["psnr"]) == len(base["ssim"]) == 40
    assert all(math.isfinite(v) for v in base["psnr"] + base["ssim"])
    assert 15 < base["psnr_mean"] < 40 and 0 < base["ssim_mean"] < 1
    item = datasets["test"][5]
    assert base["psnr"][5] == pytest.approx(srm.psnr(item["lr_up"], item["hr"]))
    print(f"bicubic test PSNR {base['psnr_mean']:.3f} dB, SSIM {base['ssim_mean']:.4f}")


# -- errors and user images ----------------------------------------------------------------------------
def test_missing_data_dir_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        srd.load_orl(missing)
    assert str(missing / "orl_faces") in str(err.value) and "AMLP_DATA_DIR" in str(err.value)


def test_unreadable_image_names_the_file(tmp_path):
    person = tmp_path / "orl_faces" / "s1"
    person.mkdir(parents=True)
    (person / "1.pgm").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"1\.pgm.*cannot be read"):
        srd.load_orl(tmp_path, persons=[1])
    Image.new("L", (50, 50)).save(person / "1.pgm")
    with pytest.raises(ValueError, match=r"1\.pgm.*92 wide x 112 high"):
        srd.load_orl(tmp_path, persons=[1])


def test_load_face_image_checks_size_and_colour(tmp_path):
    colour = tmp_path / "colour.png"
    Image.new("RGB", (32, 32), (200, 30, 90)).save(colour)
    with pytest.raises(ValueError, match=r"colour\.png.*32x32.*16x16.*'RGB'"):
        srd.load_face_image(colour)
    converted = srd.load_face_image(colour, resize=True)
    assert converted.resized and "resized from 32x32" in converted.note
    assert converted.lr.shape == (1, 16, 16)
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    grey = srd.save_image(tmp_path / "sub" / "grey.png", srd.from_image(pixels))
    loaded = srd.load_face_image(grey)
    lr, note = loaded
    assert not loaded.resized and note is None
    assert np.array_equal(srd.to_image(loaded.lr), pixels)
    assert srd.bicubic_upsample(lr).shape == (1, 64, 64)
    with pytest.raises(FileNotFoundError, match="absent.png"):
        srd.load_face_image(tmp_path / "absent.png")


def test_resize_of_an_orl_original_gives_the_dataset_lr(datasets):
    item = datasets["test"][0]
    loaded = srd.load_face_image(ORL / "s37" / "1.pgm", resize=True)
    assert loaded.resized and torch.equal(loaded.lr, item["lr"])

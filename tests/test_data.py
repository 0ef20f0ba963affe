"""Augmentation and datasets: shapes, shared randomness, the −1 label quirk, determinism per sample seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy import write_preprocessed

from brats_core.data import transforms as T
from brats_core.data.dataset import EpochSampler, EvalDataset, TrainDataset, check_cases
from brats_core.modalities import SCENARIOS


def _volume(shape=(24, 26, 22)):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(*shape, 4)).astype(np.float32)
    label = rng.integers(0, 4, size=shape).astype(np.uint8)
    return image, label


def test_crop_shares_window_and_rejects_small_volumes():
    image, label = _volume()
    image[..., 0] = label  # channel 0 carries the label, so a shared crop keeps them equal
    img, lab = T.RandCrop3D(16)(image, label, np.random.default_rng(1))
    assert img.shape == (16, 16, 16, 4) and lab.shape == (16, 16, 16)
    assert np.array_equal(img[..., 0], lab)
    with pytest.raises(ValueError, match="smaller than the 32³ training patch"):
        T.RandCrop3D(32)(image, label, np.random.default_rng(1))


@pytest.mark.parametrize("quirks, fill", [(False, 0), (True, -1)])
def test_rotation_label_fill(quirks, fill):
    label = np.ones((16, 16, 16), np.uint8)
    image = np.ones((16, 16, 16, 4), np.float32)
    pipe = T.rfnet_augmentation(16, intensity=False, reference_quirks=quirks)
    rotation = next(t for t in pipe.transforms if isinstance(t, T.RandomRotation))
    # find a seed with a non-zero angle: outside the rotated cube the image is −1 and the label `fill`
    for seed in range(20):
        img, lab = rotation(image, label, np.random.default_rng(seed))
        if (img == -1).any():
            break
    outside = img[..., 0] == -1
    assert outside.any() and (lab[outside] == fill).all() and (lab[~outside] == 1).all()


def test_flip_keeps_alignment():
    image, label = _volume((16, 16, 16))
    image[..., 1] = label
    flipped_any = False
    for seed in range(4):
        img, lab = T.RandomFlip()(image, label, np.random.default_rng(seed))
        assert np.array_equal(img[..., 1], lab)
        flipped_any |= not np.array_equal(lab, label)
    assert flipped_any


def test_intensity_factors_shape():
    image = np.ones((8, 6, 5, 4), np.float32)
    out, _ = T.RandomIntensityChange(0.1, 0.1)(image, None, np.random.default_rng(0))
    # constant input: output constant over W and D, varying over H and channels
    assert np.allclose(out, out[:, :1, :1, :])
    assert np.unique(out[:, 0, 0, 0]).size == 8 and np.unique(out[0, 0, 0, :]).size == 4
    assert np.all(np.abs(out - 1) <= 0.1 * 1 + 0.1 + 1e-6)
    # M3AE's factors vary along Z (axis 2), as upstream augments (Z, Y, X) arrays
    out, _ = T.RandomIntensityChange(0.1, 0.1, axis=2)(image, None, np.random.default_rng(0))
    assert np.allclose(out, out[:1, :1, :, :]) and np.unique(out[0, 0, :, 0]).size == 5


def test_train_dataset_is_a_function_of_the_sample_seed(tmp_path):
    cases = write_preprocessed(tmp_path, n=3)
    ds = TrainDataset(tmp_path, cases, T.rfnet_augmentation(16))
    a, b, c = ds[(1, 123)], ds[(1, 123)], ds[(1, 124)]
    assert a["image"].shape == (4, 16, 16, 16) and a["image"].dtype == torch.float32
    assert a["label"].shape == (16, 16, 16) and a["label"].dtype == torch.int64
    assert a["mask"].dtype == torch.bool and a["mask"].any() and a["name"] == cases[1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])
    # the uniform rule draws every scenario
    seen = {tuple(ds[(0, s)]["mask"].tolist()) for s in range(300)}
    assert seen == {s.mask for s in SCENARIOS}


def test_epoch_sampler_streams():
    s = EpochSampler(num_cases=4, num_samples=10, seed=5)
    s.set_epoch(0)
    e0 = list(s)
    assert len(e0) == 10 and sorted(i for i, _ in e0[:4]) == [0, 1, 2, 3]  # whole passes, shuffled
    s.set_epoch(0, skip=3)
    assert list(s) == e0[3:] and len(s) == 7
    s.set_epoch(1)
    assert list(s) != e0
    ranks = [EpochSampler(4, 5, 5, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(0)
    assert sorted(list(ranks[0]) + list(ranks[1])) == sorted(e0)


def test_eval_dataset_and_missing_files(tmp_path):
    cases = write_preprocessed(tmp_path, n=2)
    ds = EvalDataset(tmp_path, [(cases[0], SCENARIOS[0].mask)])
    item = ds[0]
    assert item["image"].shape == (4, 20, 22, 18) and item["label"].shape == (20, 22, 18)
    assert item["mask"].tolist() == list(SCENARIOS[0].mask)
    (tmp_path / "seg" / f"{cases[1]}_seg.npy").unlink()
    with pytest.raises(FileNotFoundError, match=f"{cases[1]}_seg.npy"):
        check_cases(tmp_path, cases)
    check_cases(tmp_path, cases, need_labels=False)

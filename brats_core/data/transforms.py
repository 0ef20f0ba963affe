"""Training augmentation of the RFNet family, as plain composable classes.

Every transform maps ``(image, label, rng) -> (image, label)`` with ``image`` ``(H, W, D, C)`` float32,
``label`` ``(H, W, D)`` int and ``rng`` a ``numpy.random.Generator``; random parameters are drawn once per sample
and shared by image and label. Drawing from an explicit generator (not numpy's global state) makes every sample a
pure function of its seed, which is what lets training resume bit-for-bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from scipy import ndimage


class Transform(Protocol):
    def __call__(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]: ...


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        for t in self.transforms:
            image, label = t(image, label, rng)
        return image, label

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandCrop3D:
    """Crop a ``size``³ patch at a uniform integer start per axis in ``[0, dim − size]``."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, image, label, rng):
        dims = image.shape[:3]
        if any(d < self.size for d in dims):
            raise ValueError(
                f"volume {dims} is smaller than the {self.size}³ training patch; preprocess with "
                f"--patch_size {self.size} (the crop box is enlarged to at least the patch size)"
            )
        start = [int(rng.integers(0, d - self.size + 1)) for d in dims]
        sl = tuple(slice(s, s + self.size) for s in start)
        return image[sl], (label[sl] if label is not None else None)

    def __repr__(self) -> str:
        return f"RandCrop3D({self.size})"


class RandomRotation:
    """Rotate by an integer angle in ``[−max_angle, max_angle − 1]`` degrees in one random axis plane.

    Nearest-neighbour, no reshape, constant fill −1 for the image (upstream). Upstream also fills the LABEL with −1,
    which its one-hot encoding turns into ET (up to ≈8 % of a patch); ``label_fill=-1`` reproduces that
    (``--reference-quirks``), the default 0 makes the area outside the rotated cube background.
    """

    PLANES = ((1, 0), (2, 1), (2, 0))

    def __init__(self, max_angle: int = 10, label_fill: int = 0) -> None:
        self.max_angle = int(max_angle)
        self.label_fill = int(label_fill)

    def __call__(self, image, label, rng):
        plane = self.PLANES[int(rng.integers(0, 3))]
        angle = int(rng.integers(-self.max_angle, self.max_angle))
        rot = dict(angle=angle, axes=plane, reshape=False, order=0, mode="constant")
        image = np.stack([ndimage.rotate(image[..., c], cval=-1.0, **rot) for c in range(image.shape[-1])], axis=-1)
        if label is not None:
            label = ndimage.rotate(label.astype(np.int16), cval=self.label_fill, **rot)
        return image, label

    def __repr__(self) -> str:
        return f"RandomRotation({self.max_angle}, label_fill={self.label_fill})"


class RandomIntensityChange:
    """``x ← x·scale + shift``, shift ~ U(−s, s), scale ~ U(1 − f, 1 + f).

    As upstream, the factors are drawn with shape (H, 1, 1, C): one per index along the FIRST spatial axis of
    upstream's array and per channel (probably meant per channel only, but it changes the augmentation distribution,
    so it is kept). ``axis`` names that axis in the (X, Y, Z, C) image: 0 for the RFNet family (upstream's (H, W, D)
    volumes), 2 for M3AE (upstream augments (Z, Y, X) arrays).
    """

    def __init__(self, shift: float = 0.1, scale: float = 0.1, axis: int = 0) -> None:
        self.shift, self.scale, self.axis = float(shift), float(scale), int(axis)

    def __call__(self, image, label, rng):
        shape = [1, 1, 1, image.shape[-1]]
        shape[self.axis] = image.shape[self.axis]
        shift = rng.uniform(-self.shift, self.shift, size=shape)
        scale = rng.uniform(1.0 - self.scale, 1.0 + self.scale, size=shape)
        return (image * scale + shift).astype(np.float32), label

    def __repr__(self) -> str:
        return f"RandomIntensityChange({self.shift}, {self.scale}, axis={self.axis})"


class RandomFlip:
    """Flip each spatial axis independently with probability 0.5."""

    def __call__(self, image, label, rng):
        for axis in range(3):
            if rng.random() < 0.5:
                image = np.flip(image, axis)
                label = np.flip(label, axis) if label is not None else None
        return image, label

    def __repr__(self) -> str:
        return "RandomFlip()"


def rfnet_augmentation(
    patch_size: int, rotation: bool = True, intensity: bool = True, reference_quirks: bool = False
) -> Compose:
    """The shared training pipeline: crop → rotate → intensity change → flip.

    Args:
        patch_size: training patch side (IM-Fuse/mmFormer 128, RobustSeg 80, U-HVED 112).
        rotation: False for M3AE. intensity: False for SFusion.
        reference_quirks: fill rotated labels with −1 (→ ET after upstream's one-hot) as upstream does.
    """
    steps: list[Transform] = [RandCrop3D(patch_size)]
    if rotation:
        steps.append(RandomRotation(10, label_fill=-1 if reference_quirks else 0))
    if intensity:
        steps.append(RandomIntensityChange(0.1, 0.1))
    steps.append(RandomFlip())
    return Compose(steps)

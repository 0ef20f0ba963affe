"""Synthetic BraTS-like cases: a deformed-ellipsoid brain with grey/white matter, ventricles and a glioma.

Each case has four co-registered modalities with distinct, MRI-like contrasts and a label map with all three
tumour sub-regions (1 NCR, 2 ED, 3 ET), a zero background outside the brain and BraTS' LPS-style affine (first two
axes flipped). Contrasts per tissue (arbitrary units, scaled per case and modality like different scanners):

=========  ====  ====  ====  =========  ===========  ==========
modality   WM    GM    CSF   ED         ET           NCR
=========  ====  ====  ====  =========  ===========  ==========
FLAIR      mid   mid+  dark  bright     bright-ish   mid
T1ce       high  mid   dark  mid-       very bright  dark
T1         high  mid   dark  mid-       mid          dark
T2         low   mid   very  bright     bright-ish   bright
=========  ====  ====  ====  =========  ===========  ==========

so that each sub-region is best seen in the modalities where it is in real data (ET on T1ce, ED on FLAIR/T2),
which makes the missing-modality problem meaningful, while a small CNN can still learn it.

Cases are deterministic: case ``i`` of ``seed`` is the same whatever ``n_cases``.
``python -m brats_core.data.synthetic --out DIR --n 8 --shape 96 96 80 --seed 0`` writes a dataset.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from brats_core.labels import ED, ET, NCR
from brats_core.modalities import BRATS2023_SUFFIXES, LEGACY_SUFFIXES, MODALITIES
from brats_core.utils.cli import run_main
from brats_core.utils.io import LABEL_KEY, save_nifti

DEFAULT_SHAPE = (240, 240, 155)

# Tissue classes of the intensity model; the tumour ones reuse the label values.
_WM, _GM, _CSF = 10, 11, 12
# Mean intensity per tissue and modality (see the module table).
_CONTRAST: dict[str, dict[int, float]] = {
    "flair": {_WM: 500, _GM: 600, _CSF: 120, ED: 1050, ET: 850, NCR: 450},
    "t1ce": {_WM: 850, _GM: 600, _CSF: 250, ED: 520, ET: 1400, NCR: 280},
    "t1": {_WM: 800, _GM: 580, _CSF: 240, ED: 480, ET: 600, NCR: 260},
    "t2": {_WM: 420, _GM: 620, _CSF: 1500, ED: 1050, ET: 850, NCR: 1350},
}
_NAMINGS = {"brats2023": ("-", BRATS2023_SUFFIXES), "legacy": ("_", LEGACY_SUFFIXES)}


def synthetic_affine(shape: Sequence[int]) -> np.ndarray:
    """BraTS' voxel-to-world matrix for a 1 mm grid of ``shape``: x and y flipped (LPS-style), ``(4, 4)``."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = shape[1] - 1
    return affine


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Smooth random field in [-1, 1], ``(X, Y, Z)`` float32, varying over about ``shape / cells`` voxels.

    A coarse random grid is upsampled with separable Gaussian interpolation weights: one small tensor contraction,
    far cheaper than Gaussian-filtering full-size white noise or ``ndimage.map_coordinates``.
    """
    coarse = rng.uniform(-1.0, 1.0, size=(cells + 1,) * 3).astype(np.float32)
    nodes = np.arange(cells + 1, dtype=np.float32)
    weights = []
    for n in shape:
        w = np.exp(-0.5 * ((np.linspace(0, cells, n, dtype=np.float32)[:, None] - nodes) / 0.6) ** 2)
        weights.append(w / w.sum(axis=1, keepdims=True))
    field = np.einsum("ia,jb,kc,abc->ijk", *weights, coarse, optimize=True)
    return field / max(float(np.abs(field).max()), 1e-6)


def make_synthetic_case(
    shape: Sequence[int] = DEFAULT_SHAPE, seed: int | Sequence[int] = 0
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Generate one case in memory.

    Args:
        shape: ``(X, Y, Z)``; at least about 32 voxels per axis for all tumour labels to appear.
        seed: integer or sequence of integers for ``numpy.random.default_rng``.

    Returns:
        ``(images, label)``: modality key -> float32 ``(X, Y, Z)`` (zero outside the brain, positive inside) in
        canonical order, and uint8 labels ``(X, Y, Z)`` in {0, 1, 2, 3}.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be 3 sizes of at least 16 voxels, got {shape}")
    rng = np.random.default_rng(seed)
    size = np.asarray(shape, dtype=np.float32)

    def radius_from(centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
        """Ellipsoidal radius ``(X, Y, Z)`` float32: 1 on the surface of the ellipsoid (centre, radii)."""
        axes = np.ogrid[tuple(slice(0, n) for n in shape)]
        terms = [((a.astype(np.float32) - c) / r) ** 2 for a, c, r in zip(axes, centre, radii, strict=True)]
        return np.sqrt(terms[0] + terms[1] + terms[2])

    # Brain: an ellipsoid with a smoothly deformed surface.
    centre = size / 2 + rng.uniform(-0.03, 0.03, 3) * size
    rho = radius_from(centre, rng.uniform(0.36, 0.43, 3) * size)
    rho *= 1 + 0.08 * _smooth_field(rng, shape, 4)
    brain = rho < 1

    tissue = np.full(shape, _GM, dtype=np.uint8)
    tissue[rho < 0.72 + 0.1 * _smooth_field(rng, shape, 8)] = _WM
    tissue[rho > 0.94] = _CSF  # sulcal CSF under the surface
    for side in (-1, 1):  # lateral ventricles, left and right of the midline
        offset = np.array([side * 0.11, 0.04, 0.06]) * size
        ventricle = radius_from(centre + offset, np.array([0.06, 0.2, 0.1]) * size) < 1
        tissue[ventricle] = _CSF

    # Tumour: nested deformed spheres ED ⊃ ET ⊃ NCR at a random position inside the brain.
    radius = rng.uniform(0.14, 0.24) * min(shape)
    direction = rng.normal(size=3)
    t_centre = centre + direction / np.linalg.norm(direction) * rng.uniform(0.0, 0.4) * 0.38 * size
    dist = radius_from(t_centre, np.full(3, radius)) * (1 + 0.25 * _smooth_field(rng, shape, 6))
    core, necrosis = rng.uniform(0.6, 0.75), rng.uniform(0.35, 0.5)
    label = np.zeros(shape, dtype=np.uint8)
    label[dist < 1] = ED
    label[dist < core] = ET
    label[dist < necrosis] = NCR
    label[~brain] = 0
    tissue[label > 0] = label[label > 0]

    bias = 1 + 0.1 * _smooth_field(rng, shape, 2)
    # Tissue micro-structure is anatomical, hence shared; each modality mixes two fields in its own proportion.
    cells = max(4, min(shape) // 8)
    textures = _smooth_field(rng, shape, cells), _smooth_field(rng, shape, cells)
    images: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        lut = np.zeros(256, dtype=np.float32)
        for t, value in _CONTRAST[m].items():
            lut[t] = value
        mix = rng.uniform(0.0, 1.0)
        texture = 1 + 0.06 * (mix * textures[0] + (1 - mix) * textures[1])
        image = lut[tissue] * texture * bias * np.float32(rng.uniform(0.7, 1.3))
        image += rng.standard_normal(shape, dtype=np.float32) * np.float32(30.0)
        # A little partial-volume blur at tissue boundaries, then the skull-stripped zero background. Integer
        # values like scanner output (BraTS files hold integers even when stored as float); they also compress 2x.
        image = np.rint(ndimage.gaussian_filter(image, 0.6, truncate=2.0))
        images[m] = np.where(brain, np.maximum(image, np.float32(1.0)), np.float32(0.0))
    return images, label


def case_id(index: int) -> str:
    """Case id of the ``index``-th synthetic case: ``BraTS-SYN-00000-000`` …"""
    return f"BraTS-SYN-{index:05d}-000"


def write_synthetic_case(
    out_dir: str | os.PathLike[str],
    case: str,
    images: dict[str, np.ndarray],
    label: np.ndarray | None,
    naming: str = "brats2023",
) -> Path:
    """Write one case folder ``out_dir/case`` with BraTS file names.

    Args:
        out_dir: dataset folder.
        case: case id (folder name and file prefix).
        images: modality key -> ``(X, Y, Z)``; any subset (missing files are simply not written).
        label: ``(X, Y, Z)`` labels, or None for a case without label map.
        naming: ``"brats2023"`` (``<case>-t2f.nii.gz`` …) or ``"legacy"`` (``<case>_flair.nii.gz`` …).

    Returns:
        The case folder.
    """
    if naming not in _NAMINGS:
        raise ValueError(f"naming must be one of {sorted(_NAMINGS)}, got {naming!r}")
    sep, suffixes = _NAMINGS[naming]
    folder = Path(out_dir) / case
    affine = synthetic_affine(next(iter(images.values())).shape)
    for m, image in images.items():
        save_nifti(folder / f"{case}{sep}{suffixes[m]}.nii.gz", image, affine)
    if label is not None:
        save_nifti(folder / f"{case}{sep}{LABEL_KEY}.nii.gz", label.astype(np.uint8), affine)
    return folder


def write_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    n_cases: int,
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    naming: str = "brats2023",
) -> list[str]:
    """Write ``n_cases`` synthetic cases in BraTS layout (one folder per case, NIfTI ``.nii.gz``).

    Args:
        out_dir: dataset folder (created).
        n_cases: number of cases.
        shape: ``(X, Y, Z)`` of every case.
        seed: dataset seed; case ``i`` uses ``default_rng([seed, i])``.
        naming: ``"brats2023"`` or ``"legacy"`` file names.

    Returns:
        The case ids, in order.
    """
    cases = []
    for i in range(n_cases):
        images, label = make_synthetic_case(shape, (seed, i))
        write_synthetic_case(out_dir, case_id(i), images, label, naming)
        cases.append(case_id(i))
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m brats_core.data.synthetic --out DIR --n 8 --shape 96 96 80 --seed 0``."""
    parser = argparse.ArgumentParser(prog="python -m brats_core.data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset folder to write (one sub-folder per case)")
    parser.add_argument("--n", type=int, default=8, help="number of cases (default %(default)s)")
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--naming", choices=sorted(_NAMINGS), default="brats2023")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be positive, got {args.n}")
    if min(args.shape) < 16:
        parser.error(f"--shape: every size must be at least 16, got {args.shape}")
    cases = write_synthetic_dataset(args.out, args.n, args.shape, args.seed, args.naming)
    print(f"wrote {len(cases)} synthetic cases of shape {tuple(args.shape)} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))

"""Train/val/test splits: read upstream's split files, download them verified, or generate a split by the same rules.

Upstream formats: ``train.txt`` (one case id per line), ``val15splits.csv`` / ``test15splits.csv``
(header ``case,mask``; ``mask`` a Python-literal list of four booleans, True = available, in the file's modality
order), ShaSpec's ``BraTS23_*.csv`` (single ``case`` column holding absolute paths). Masks are returned canonical.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import logging
import os
import random
import re
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from brats_core.data.preprocessing import is_finished, list_cases
from brats_core.modalities import MODALITIES, Mask, format_bool_list, parse_bool_list
from brats_core.utils.cli import UsageError, run_main
from brats_core.utils.io import atomic_path, has_case_files, save_text

log = logging.getLogger(__name__)

UPSTREAM_REPO = "AImageLab-zip/IM-Fuse"
UPSTREAM_COMMIT = "fbbd48e"
UPSTREAM_URL = f"https://github.com/{UPSTREAM_REPO}/raw/{UPSTREAM_COMMIT}"

# file name → (path in the upstream repository, sha256 of the published file)
REFERENCE_FILES: dict[str, tuple[str, str]] = {
    "train.txt": ("IMFuse/datalist/train.txt", "1bf95a2c6c9983bac79e428df0c817a6c3cf8b19f6d13ca13d568ea4f6c2ee68"),
    "val15splits.csv": (
        "IMFuse/datalist/val15splits.csv",
        "36572f11746985d79ef1c4bc8cade194b5b5b6b252a198ee6c7e399082ba8ac2",
    ),
    "test15splits.csv": (
        "IMFuse/datalist/test15splits.csv",
        "51777261e5e3ea2e9858334333b7af67f64ca911813d010b441426b2934c56fb",
    ),
    "val.txt": ("templates/datalist/val.txt", "b291844da11834fa1e0ec104025dcacab265a85e8da0c72d9dddb2c13eade34d"),
    "test.txt": ("templates/datalist/test.txt", "02403f8f23b4a9aff2aa290290f9cd87a935c6cd71f6ae27292b77c689f5646a"),
}

SFUSION_TRAIN_FILE = "train2.txt"
SFUSION_EXCLUDED: tuple[str, ...] = ("BraTS-GLI-00165-000", "BraTS-GLI-00498-001", "BraTS-GLI-01130-000")
"""The paper's SFusion run trained on ``train2.txt`` (872 cases): upstream's ``train.txt`` minus these three (the copies
in upstream's RobustSeg/ and UHVED/ folders). :func:`download` derives it."""


def write_sfusion_train_list(split_dir: str | Path) -> Path:
    """Write ``train2.txt`` = ``train.txt`` minus :data:`SFUSION_EXCLUDED` into ``split_dir`` (atomically)."""
    d = Path(split_dir)
    train = read_case_list(d / "train.txt")
    absent = [c for c in SFUSION_EXCLUDED if c not in train]
    if absent:
        raise ValueError(f"{d / 'train.txt'} is not the paper's training list: it lacks {', '.join(absent)}")
    return save_text(d / SFUSION_TRAIN_FILE, "".join(f"{c}\n" for c in train if c not in SFUSION_EXCLUDED))


# The order in which upstream's val/test CSVs cycle through the 15 subsets (canonical bits), read off the files.
CSV_CYCLE: tuple[str, ...] = (
    "0001", "0010", "0100", "1000", "0011", "0110", "1100", "0101",
    "1001", "1010", "1110", "1101", "1011", "0111", "1111",
)  # fmt: skip

_CASE_RE = re.compile(r"^(?P<patient>.+)-(?P<scan>\d{3})$")


@dataclass
class Split:
    """A train/val/test split; val and test cases carry the one scenario mask used for validation."""

    train: list[str]
    val: list[tuple[str, Mask]]
    test: list[tuple[str, Mask]]

    def check_disjoint(self) -> None:
        """Raise if a case appears twice within or across the three parts."""
        seen: dict[str, str] = {}
        for part, cases in (
            ("train", self.train),
            ("val", [c for c, _ in self.val]),
            ("test", [c for c, _ in self.test]),
        ):
            for c in cases:
                if c in seen:
                    raise ValueError(f"case {c} appears in both {seen[c]} and {part}")
                seen[c] = part

    def write(self, out_dir: str | Path) -> None:
        """Write the split in upstream's formats (``train.txt``, ``val15splits.csv``, ``test15splits.csv``)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_text(out / "train.txt", "".join(f"{c}\n" for c in self.train))
        for name, rows in (("val15splits.csv", self.val), ("test15splits.csv", self.test)):
            lines = ["case,mask\n"] + [f'{c},"{format_bool_list(m)}"\n' for c, m in rows]
            save_text(out / name, "".join(lines))


def _case_id(value: str) -> str:
    """Strip ShaSpec-style absolute paths (and a trailing slash) down to the case id."""
    return os.path.basename(value.strip().rstrip("/"))


@contextlib.contextmanager
def _list_errors(path: Path) -> Iterator[None]:
    """A list that is not text (a binary file given by mistake) or not CSV is a usage error naming it."""
    try:
        yield
    except (UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"{path}: not a readable case list ({type(err).__name__}: {err})") from None


def _require_cases(path: Path, rows: Sequence[object]) -> None:
    """Refuse a list without cases: a run over it would do nothing (or, for validation, average nothing)."""
    if not rows:
        raise UsageError(
            f"{path} lists no cases (the file is empty or holds a header only): add the case ids, or write a split "
            "with `python -m brats_core.data.splits generate` (or `download` for the paper's)"
        )


def read_case_list(path: str | Path, allow_empty: bool = False) -> list[str]:
    """Read case ids from a ``.txt`` list (one per line) or a CSV with a ``case`` column (paths allowed).

    Raises:
        FileNotFoundError: no such file.
        UsageError: a CSV without a ``case`` column, or (unless ``allow_empty``) a list without cases.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    with _list_errors(path):
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is not None and "case" not in reader.fieldnames:
                    raise UsageError(f"{path}: expected a CSV with a 'case' column, got header {reader.fieldnames}")
                cases = [_case_id(row["case"]) for row in reader if (row["case"] or "").strip()]
        else:
            cases = [_case_id(line) for line in path.read_text().splitlines() if line.strip()]
    if not allow_empty:
        _require_cases(path, cases)
    return cases


def read_mask_csv(
    path: str | Path, order: Sequence[str] = MODALITIES, allow_empty: bool = False
) -> list[tuple[str, Mask]]:
    """Read a ``case,mask`` CSV (``val15splits.csv`` / ``test15splits.csv``) into (case, canonical mask) rows.

    Args:
        path: the CSV.
        order: modality order of the file's boolean lists (canonical for IM-Fuse's files; SFusion, U-HVED and M3AE
            ship re-ordered copies, see ``modalities.METHOD_ORDERS``).
        allow_empty: accept a file without rows (a split with no validation case); otherwise a usage error.

    Raises:
        FileNotFoundError: no such file.
        UsageError: another header, a malformed row (its line is named) or, unless ``allow_empty``, no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    rows = []
    with _list_errors(path), path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is not None and not {"case", "mask"} <= set(reader.fieldnames):
            raise UsageError(f"{path}: expected header 'case,mask', got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                rows.append((_case_id(row["case"] or ""), parse_bool_list(row["mask"] or "", order)))
            except ValueError as err:
                raise UsageError(f"{path}, line {line}: {err}") from err
    if not allow_empty:
        _require_cases(path, rows)
    return rows


def load_split(split_dir: str | Path, test_file: str | Path | None = None) -> Split:
    """Load ``train.txt``, ``val15splits.csv`` and ``test15splits.csv`` (or ``test_file``) from a folder."""
    d = Path(split_dir)
    missing = [n for n in ("train.txt", "val15splits.csv") if not (d / n).is_file()]
    test_path = Path(test_file) if test_file else d / "test15splits.csv"
    if not test_path.is_absolute() and test_file and not test_path.is_file():
        test_path = d / test_path
    if not test_path.is_file():
        missing.append(str(test_path.name))
    if missing:
        raise FileNotFoundError(
            f"split folder {d} lacks {', '.join(missing)}; run `python -m brats_core.data.splits download --out {d}` "
            f"for the paper's split or `python -m brats_core.data.splits generate` for a new one"
        )
    split = Split(
        read_case_list(d / "train.txt"),
        read_mask_csv(d / "val15splits.csv", allow_empty=True),  # a small split has none; training decides
        read_mask_csv(test_path, allow_empty=True),  # training does not use it; test scripts read it themselves
    )
    try:
        split.check_disjoint()
    except ValueError as err:
        raise UsageError(f"split folder {d}: {err}") from err
    return split


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(out_dir: str | Path, base_url: str | None = None, overwrite: bool = False) -> list[Path]:
    """Download the paper's split files from the upstream repository and verify their sha256 checksums.

    Args:
        out_dir: destination folder.
        base_url: alternative location holding the five files side by side (e.g. a mirror or ``file://`` folder);
            default: the upstream repository at commit ``fbbd48e``.
        overwrite: re-download files that are already present and valid.

    Returns:
        The five file paths (``train2.txt`` for SFusion is derived beside them, see :data:`SFUSION_EXCLUDED`). A file
        whose checksum does not match is deleted and a ``ValueError`` raised.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (upstream_path, digest) in REFERENCE_FILES.items():
        dest = out / name
        paths.append(dest)
        if dest.is_file() and not overwrite and sha256(dest) == digest:
            continue
        url = f"{base_url.rstrip('/')}/{name}" if base_url else f"{UPSTREAM_URL}/{upstream_path}"
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                f.write(response.read())
            got = sha256(tmp)
            if got != digest:
                raise ValueError(f"{url}: sha256 {got} does not match the expected {digest}; file not kept")
        log.info("downloaded %s", dest)
    write_sfusion_train_list(out)
    return paths


def verify(split_dir: str | Path) -> dict[str, bool]:
    """Which of the reference files in ``split_dir`` are present with the published checksum."""
    d = Path(split_dir)
    return {n: (d / n).is_file() and sha256(d / n) == digest for n, (_, digest) in REFERENCE_FILES.items()}


def generate(case_ids: Sequence[str], seed: int = 42, fractions: tuple[float, float] = (0.7, 0.1)) -> Split:
    """A new split by upstream's rules (``ShaSpec/create_BraTS23.py``).

    Every patient with several scans (same ``BraTS-GLI-XXXXX`` prefix) goes to train; single-scan cases are shuffled
    with ``random.Random(seed)`` and fill train up to ``int(0.7·N)``, then val ``int(0.1·N)``, test the rest. Val and
    test cases get one scenario each, cycling through the 15 subsets in upstream's CSV order.
    The result cannot reproduce the paper's split (upstream shuffled in unrecorded file-system order): use
    :func:`download` for that.
    """
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ValueError("duplicate case ids")
    patients: dict[str, list[str]] = {}
    for c in ids:
        m = _CASE_RE.match(c)
        patients.setdefault(m.group("patient") if m else c, []).append(c)
    multi = [c for cs in patients.values() if len(cs) > 1 for c in cs]
    single = [cs[0] for cs in patients.values() if len(cs) == 1]
    random.Random(seed).shuffle(single)
    n = len(ids)
    n_train, n_val = int(fractions[0] * n), int(fractions[1] * n)
    if len(multi) > n_train:
        log.warning("%d multi-scan cases exceed the train quota %d; all go to train", len(multi), n_train)
    fill = max(0, n_train - len(multi))
    train = sorted(multi + single[:fill])
    val = sorted(single[fill : fill + n_val])
    test = sorted(single[fill + n_val :])

    def cycle(cases: list[str]) -> list[tuple[str, Mask]]:
        return [(c, tuple(b == "1" for b in CSV_CYCLE[i % 15])) for i, c in enumerate(cases)]  # type: ignore[misc]

    split = Split(train, cycle(val), cycle(test))
    split.check_disjoint()
    return split


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brats_core.data.splits", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download", help="download the paper's split files (checksums verified)")
    p.add_argument("--out", required=True, help="destination folder")
    p.add_argument("--base_url", default=None, help="mirror holding the five files (default: upstream repository)")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("verify", help="check split files against the published checksums")
    p.add_argument("--split_dir", required=True)
    p = sub.add_parser("generate", help="generate a seeded 70/10/20 split from a preprocessed or raw data folder")
    p.add_argument("--datapath", required=True, help="preprocessed folder (vol/*.npy) or BraTS folder (case dirs)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "download":
        out = Path(args.out)
        created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
        try:
            paths = download(out, args.base_url, args.overwrite)
        except (OSError, ValueError) as err:  # URLError is an OSError: no network, a wrong --base_url, a bad file
            for folder in created:  # the folders this command made, while they are empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
            parser.error(f"download failed: {err} (offline? pass --base_url with a mirror or a file:// folder)")
        for path in paths:
            print(f"{path}  OK")
        return 0
    if args.command == "verify":
        status = verify(args.split_dir)
        for name, ok in status.items():
            print(f"{name}: {'OK' if ok else 'missing or different'}")
        return 0 if all(status.values()) else 1
    root = Path(args.datapath)
    if not root.is_dir():
        parser.error(f"--datapath {root}: not a folder")
    vol = root / "vol"
    if vol.is_dir():
        names = [p.name[: -len("_vol.npy")] for p in vol.glob("*_vol.npy")]
        if (root / "meta").is_dir():  # preprocess.py's: finished cases only (an interrupted run leaves some unfinished)
            cases = [c for c in names if is_finished(root, c)]
        else:  # upstream's preprocessing writes vol/ and seg/ only
            cases = [c for c in names if (root / "seg" / f"{c}_seg.npy").is_file()]
    else:  # case folders: those holding modality files (not splits/, .ipynb_checkpoints/, …)
        cases = [c for c in list_cases(root) if has_case_files(root / c)]
    if not cases:
        parser.error(
            f"no cases found in {root} (expected finished preprocessed cases, vol/<case>_vol.npy with meta/ or seg/, "
            "or case folders holding NIfTI files)"
        )
    split = generate(cases, args.seed)
    split.write(args.out)
    print(f"{len(split.train)} train / {len(split.val)} val / {len(split.test)} test cases written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))

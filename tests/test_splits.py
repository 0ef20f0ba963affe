"""Split files: the paper's files parse into 875/125/251 disjoint cases; download with checksums; generation rules."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import shared_path

from brats_core.data import splits
from brats_core.modalities import SCENARIOS


def test_reference_splits_parse_and_match_checksums():
    d = shared_path("data", "reference_splits")
    assert all(splits.verify(d).values())
    split = splits.load_split(d)
    assert (len(split.train), len(split.val), len(split.test)) == (875, 125, 251)
    split.check_disjoint()
    assert splits.read_case_list(d / "val.txt") == [c for c, _ in split.val]
    assert splits.read_case_list(d / "test.txt") == [c for c, _ in split.test]
    # each case one scenario, cycling through all 15 (test: 16 or 17 per subset)
    counts = {s.mask: 0 for s in SCENARIOS}
    for _, m in split.test:
        counts[m] += 1
    assert set(counts.values()) == {16, 17}
    assert [m for _, m in split.test[:15]] == [tuple(b == "1" for b in bits) for bits in splits.CSV_CYCLE]


def test_download_verifies_checksums(tmp_path):
    src = shared_path("data", "reference_splits")
    mirror = tmp_path / "mirror"
    shutil.copytree(src, mirror)
    out = tmp_path / "out"
    paths = splits.download(out, base_url=mirror.as_uri())
    assert [p.name for p in paths] == list(splits.REFERENCE_FILES)
    assert all(splits.verify(out).values())
    # SFusion's train2.txt: the paper's train list minus three cases (872)
    train2 = splits.read_case_list(out / "train2.txt")
    train = splits.read_case_list(out / "train.txt")
    assert len(train2) == 872 and train2 == [c for c in train if c not in splits.SFUSION_EXCLUDED]
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.txt").write_text("BraTS-GLI-00498-001\n")
    with pytest.raises(ValueError, match="not the paper's training list: it lacks BraTS-GLI-00165-000"):
        splits.write_sfusion_train_list(other)
    # a tampered file is rejected and nothing is kept
    (mirror / "train.txt").write_text("BraTS-GLI-99999-000\n")
    bad = tmp_path / "bad"
    with pytest.raises(ValueError, match="sha256"):
        splits.download(bad, base_url=mirror.as_uri())
    assert list(bad.iterdir()) == []


def test_shaspec_style_paths_and_bad_files(tmp_path):
    f = tmp_path / "BraTS23_test.csv"
    f.write_text("case\n/cluster/grana_neuro/data/BraTS-GLI-00001-000\n/x/BraTS-GLI-00002-000/\n")
    assert splits.read_case_list(f) == ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000"]
    g = tmp_path / "v.csv"
    g.write_text('case,mask\nA,"[True, False, False, False]"\nB,"[False, False, False, False]"\n')
    with pytest.raises(ValueError, match="line 3"):
        splits.read_mask_csv(g)
    with pytest.raises(FileNotFoundError, match="lacks"):
        splits.load_split(tmp_path)


def test_generate_follows_upstream_rules(tmp_path):
    ids = [f"BraTS-GLI-{i:05d}-000" for i in range(100)] + ["BraTS-GLI-00003-001", "BraTS-GLI-00007-001"]
    split = splits.generate(ids, seed=42)
    n = len(ids)
    assert len(split.train) == int(0.7 * n) and len(split.val) == int(0.1 * n)
    assert len(split.train) + len(split.val) + len(split.test) == n
    multi = {"BraTS-GLI-00003-000", "BraTS-GLI-00003-001", "BraTS-GLI-00007-000", "BraTS-GLI-00007-001"}
    assert multi <= set(split.train)
    assert [m for _, m in split.test[:15]] == [tuple(b == "1" for b in bits) for bits in splits.CSV_CYCLE]
    assert splits.generate(ids, seed=42) == split
    assert splits.generate(ids, seed=1) != split
    split.write(tmp_path)
    assert splits.load_split(tmp_path) == split


def test_generate_cli_takes_only_cases(tmp_path):
    from toy import write_preprocessed

    from brats_core.data.preprocessing import META_FORMAT, output_paths
    from brats_core.data.synthetic import write_synthetic_dataset

    raw = tmp_path / "raw"
    cases = write_synthetic_dataset(raw, 10, shape=(16, 16, 16), seed=0)
    (raw / ".ipynb_checkpoints").mkdir()
    (raw / "splits").mkdir()  # a folder of split files beside the cases
    assert splits.main(["generate", "--datapath", str(raw), "--out", str(tmp_path / "s1")]) == 0
    split = splits.load_split(tmp_path / "s1")
    assert sorted(split.train + [c for c, _ in split.val] + [c for c, _ in split.test]) == sorted(cases)
    # a preprocessed folder: cases without metadata (an interrupted preprocess.py) are not finished, not taken
    pre = tmp_path / "pre"
    names = write_preprocessed(pre, n=10)
    shape = [20, 22, 18]
    meta = {"format": META_FORMAT, "original_shape": shape, "affine": np.eye(4).tolist(),
            "crop_box": [[0, n] for n in shape], "cropped_shape": shape, "channels": [], "available": [],
            "has_label": True}  # fmt: skip
    for case in names[1:]:
        output_paths(pre, case).meta.parent.mkdir(exist_ok=True)
        output_paths(pre, case).meta.write_text(json.dumps(meta | {"case": case}))
    assert splits.main(["generate", "--datapath", str(pre), "--out", str(tmp_path / "s2")]) == 0
    split = splits.load_split(tmp_path / "s2")
    assert sorted(split.train + [c for c, _ in split.val] + [c for c, _ in split.test]) == sorted(names[1:])
    # a folder preprocessed by the upstream code (vol/ and seg/, no meta/): every case with both files
    upstream = tmp_path / "upstream"
    names = write_preprocessed(upstream, n=10)
    (upstream / "seg" / f"{names[0]}_seg.npy").unlink()
    assert splits.main(["generate", "--datapath", str(upstream), "--out", str(tmp_path / "s3")]) == 0
    split = splits.load_split(tmp_path / "s3")
    assert sorted(split.train + [c for c, _ in split.val] + [c for c, _ in split.test]) == sorted(names[1:])


def test_download_failure_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new" / "splits"
    with pytest.raises(SystemExit) as exit_info:
        splits.main(["download", "--out", str(out), "--base_url", (tmp_path / "no_mirror").as_uri()])
    assert exit_info.value.code == 2 and "download failed" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # the folders it made are gone again
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit):
        splits.main(["download", "--out", str(tmp_path / "a_file" / "splits")])
    assert "download failed" in capsys.readouterr().err


def test_lists_without_cases_or_text_are_usage_errors_naming_the_file(tmp_path):
    from brats_core.utils.cli import UsageError

    (tmp_path / "val15splits.csv").write_text("case,mask\n")
    (tmp_path / "train.txt").write_text("\n\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81")
    for read, name in ((splits.read_mask_csv, "val15splits.csv"), (splits.read_case_list, "train.txt")):
        with pytest.raises(UsageError, match=rf"{name} lists no cases"):
            read(tmp_path / name)
        assert read(tmp_path / name, allow_empty=True) == []
    with pytest.raises(UsageError, match=r"binary\.txt: not a readable case list"):
        splits.read_case_list(tmp_path / "binary.txt")
    # a split folder may have no validation or test case (a small generated split): training decides
    (tmp_path / "train.txt").write_text("A\nB\n")
    (tmp_path / "test15splits.csv").write_text("case,mask\n")
    assert splits.load_split(tmp_path) == splits.Split(["A", "B"], [], [])

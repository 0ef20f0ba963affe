"""The plumbing shared by the method scripts: validation schedules and the common test-script flags."""

from __future__ import annotations

import pytest

from brats_core.scripts import add_val_args, build_test_parser, select_val_epochs


def test_select_val_epochs():
    upstream = [5, 10, 20]
    assert select_val_epochs(upstream, 12) == [5, 10]
    assert select_val_epochs(upstream, 45) == [5, 10, 20, 30, 40]  # continued every 10 past upstream's end
    assert select_val_epochs(upstream, 4, debug=True) == [1, 2, 3, 4]
    assert select_val_epochs(upstream, 12, val_every=4) == [4, 8, 12]
    assert select_val_epochs([], 3) == []  # a run shorter than upstream's first validation


def test_val_flags_and_test_parser():
    p = build_test_parser("x", "y")
    add_val_args(p.add_argument_group("v"))
    args = p.parse_args(["--datapath", "d", "--resume", "r.pth", "--batch_size", "2", "--val_every", "3"])
    assert (args.savepath, args.batch_size, args.val_every, args.scenarios) == ("eval", 2, 3, "all")
    with pytest.raises(SystemExit):
        p.parse_args(["--datapath", "d", "--resume", "r.pth", "--val_every", "0"])

"""Scenario table, mask formats of every upstream method, labels and regions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from brats_core import labels
from brats_core import modalities as M


def test_fifteen_unique_scenarios_in_upstream_order():
    assert len(M.SCENARIOS) == 15
    assert len({s.mask for s in M.SCENARIOS}) == 15
    all_nonempty = {m for m in itertools.product([False, True], repeat=4) if any(m)}
    assert {s.mask for s in M.SCENARIOS} == all_nonempty
    # bit strings and labels of upstream's hard-coded test list, in order
    assert [s.bits for s in M.SCENARIOS] == [
        "0001", "0100", "0010", "1000", "0101", "0110", "1010", "0011",
        "1001", "1100", "1110", "1011", "1101", "0111", "1111",
    ]  # fmt: skip
    assert [s.upstream_label for s in M.SCENARIOS] == [
        "t2", "t1c", "t1", "flair", "t1cet2", "t1cet1", "flairt1", "t1t2", "flairt2", "flairt1ce",
        "flairt1cet1", "flairt1t2", "flairt1cet2", "t1cet1t2", "flairt1cet1t2",
    ]  # fmt: skip
    assert M.SCENARIOS[9].name == "flair+t1ce" and M.SCENARIOS[9].display == "FLAIR + T1ce"
    assert M.FULL.mask == (True, True, True, True)


def test_names_bits_masks_round_trip():
    for s in M.SCENARIOS:
        assert M.scenario_for(s.mask) is s
        assert M.parse_scenarios(s.name) == [s]
        assert M.parse_scenarios(s.bits) == [s]
        assert M.parse_scenarios(str(s.index + 1)) == [s]
        assert M.parse_bool_list(M.format_bool_list(s.mask)) == s.mask
        assert M.parse_shaspec_mode(M.format_shaspec_mode(s.mask)) == s.mask
        assert M.parse_mam_bits(M.format_mam_bits(s.mask)) == s.mask
        assert s.tensor(2).shape == (2, 4) and s.tensor().dtype == torch.bool
    assert M.parse_scenarios("all") == list(M.SCENARIOS)
    assert M.parse_scenarios("flair, 1111,flair") == [M.SCENARIOS[3], M.FULL]


def test_upstream_formats_translate_to_canonical():
    # ShaSpec --mode: present indices in FLAIR, T1, T1ce, T2 order → "1" is T1, "2" is T1ce
    assert M.parse_shaspec_mode("1") == (False, False, True, False)
    assert M.parse_shaspec_mode("2") == (False, True, False, False)
    assert M.parse_shaspec_mode("0,1,3") == (True, False, True, True)
    # the 15 strings ShaSpec's README enumerates cover every scenario once
    readme = [
        "0",
        "0,1",
        "0,1,2",
        "0,1,2,3",
        "0,1,3",
        "0,2",
        "0,2,3",
        "0,3",
        "1",
        "1,2",
        "1,2,3",
        "1,3",
        "2",
        "2,3",
        "3",
    ]
    assert {M.parse_shaspec_mode(t) for t in readme} == {s.mask for s in M.SCENARIOS}
    # MaM bits m1m2m3m4 in FLAIR, T1, T1ce, T2 order
    assert M.parse_mam_bits("0100") == (False, False, True, False)
    assert M.parse_mam_bits("0010") == (False, True, False, False)
    # SFusion's CSVs list T1ce, T1, T2, FLAIR: [F, F, F, T] there is FLAIR
    assert M.parse_bool_list("[False, False, False, True]", M.METHOD_ORDERS["sfusion"]) == (True, False, False, False)
    # U-HVED/M3AE: T1, T1ce, T2, FLAIR
    assert M.parse_bool_list("[True, False, False, False]", M.METHOD_ORDERS["uhved"]) == (False, False, True, False)
    for order in M.METHOD_ORDERS.values():
        for s in M.SCENARIOS:
            assert M.to_canonical(M.from_canonical(s.mask, order), order) == s.mask
            x = torch.arange(4)
            assert x[M.permutation(order)].tolist() == [M.MODALITIES.index(m) for m in order]


@pytest.mark.parametrize(
    "call, text, message",
    [
        (M.parse_bool_list, "[False, False, False, False]", "at least one"),
        (M.parse_bool_list, "[True, False]", "4 entries"),
        (M.parse_bool_list, "[1, 0, 0, 0]", "not a boolean list"),
        (M.parse_bool_list, "__import__('os')", "not a boolean list"),
        (M.parse_shaspec_mode, "4", "indices 0..3"),
        (M.parse_shaspec_mode, "0,0", "distinct"),
        (M.parse_shaspec_mode, "a", "comma-separated"),
        (M.parse_mam_bits, "0000", "at least one"),
        (M.parse_mam_bits, "012", "4 characters"),
        (M.parse_scenarios, "flair+dwi", "unknown scenario"),
    ],
)
def test_bad_masks_rejected_with_clear_messages(call, text, message):
    with pytest.raises(ValueError, match=message):
        call(text)


def test_regions_and_label_round_trip():
    lab = np.array([0, 1, 2, 3, 4])
    assert labels.remap_legacy(lab).tolist() == [0, 1, 2, 3, 3]
    reg = labels.label_to_regions(np.array([0, 1, 2, 3]))
    assert reg.tolist() == [[False, True, True, True], [False, True, False, True], [False, False, False, True]]
    assert labels.regions_to_labels(reg).tolist() == [0, 1, 2, 3]
    # another channel order (M3AE's head is ET, TC, WT) and torch input
    rev = torch.from_numpy(reg[::-1].copy())
    assert labels.regions_to_labels(rev, ("ET", "TC", "WT")).tolist() == [0, 1, 2, 3]
    # nesting resolved towards the inner region: ET outside WT is still ET, TC-only outside WT is NCR
    odd = np.array([[0, 0], [1, 0], [0, 1]], dtype=bool)  # WT, TC, ET
    assert labels.regions_to_labels(odd).tolist() == [1, 3]

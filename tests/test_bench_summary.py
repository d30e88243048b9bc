"""`make bench`'s summary table (src/benchmarks/summary.py) on results written by hand."""

from __future__ import annotations

import pytest

from crf_rnn_3d.benchmarks.summary import Row, dense_crf_rows, lattice_rows, markdown


def _dense(peer_s, pyd_s, default_s, peer_mib, ours_mib, agreement):
    return {
        "cases": {
            "brats": {
                "seconds": {
                    "pydensecrf2": peer_s,
                    "ours-pydensecrf-mode": pyd_s,
                    "ours-default-mode": default_s,
                },
                "peak_mib": {
                    "pydensecrf2": peer_mib,
                    "ours-pydensecrf-mode": ours_mib,
                    "ours-default-mode": ours_mib,
                },
                "agreement": {
                    "pydensecrf2": 1.0,
                    "ours-pydensecrf-mode": agreement,
                    "ours-default-mode": 0.99,
                },
            }
        }
    }


def test_dense_crf_rows_take_medians_and_judge_each_goal():
    # medians: peer 16, pydensecrf mode 4 (ratio 0.25: met), default mode 6 (0.375: not met)
    two = _dense([15.0, 16.0, 30.0], [4.0, 3.0, 9.0], [6.0, 6.0, 5.0], 2000.0, 2500.0, 0.9995)
    # one thread: peer 16 (median of 3), ours 7 and 9 -> 0.4375 (met) and 0.5625 (not met)
    one = _dense([16.0, 14.0, 17.0], [7.0, 7.0, 7.0], [9.0, 8.0, 10.0], 2000.0, 1000.0, 0.9)
    rows = {r.figure: r for r in dense_crf_rows(two, one)}
    assert rows["time, pydensecrf-mode"].ratio == pytest.approx(0.25)
    assert rows["time, pydensecrf-mode"].met is True
    assert rows["time, default-mode"].ratio == pytest.approx(6.0 / 16.0)
    assert rows["time, default-mode"].met is False
    assert rows["time, pydensecrf-mode, 1 thread"].ratio == pytest.approx(7.0 / 16.0)
    assert rows["time, pydensecrf-mode, 1 thread"].met is True
    assert rows["time, default-mode, 1 thread"].ratio == pytest.approx(9.0 / 16.0)
    assert rows["time, default-mode, 1 thread"].met is False
    assert rows["peak memory, default-mode"].ratio == pytest.approx(1.25)
    assert rows["peak memory, default-mode"].met is False
    # only the pydensecrf mode is held to the agreement goal
    agree = rows["labels equal to pydensecrf2's, pydensecrf mode"]
    assert agree.ours == 0.9995 and agree.met is True and agree.ratio is None


def test_dense_crf_rows_without_a_one_thread_run():
    two = _dense([10.0], [2.0], [3.0], 100.0, 50.0, 0.99)
    figures = [r.figure for r in dense_crf_rows(two)]
    assert not any("1 thread" in f for f in figures)
    agree = next(r for r in dense_crf_rows(two) if r.unit == "fraction")
    assert agree.met is False  # 0.99 < 0.999


def test_lattice_rows():
    results = {
        "references": {
            "promise": {
                "ours": {"crf_s": 1.0, "rss_increase_mib": 200.0},
                "threads_1": {"crf_s": 1.9},
                "dcrf": {"total_s": 4.0, "rss_increase_mib": 400.0},
            },
            "brats": {"ours": {"crf_s": 1.0, "rss_increase_mib": 1.0}},  # no peer: no rows
        }
    }
    rows = lattice_rows(results)
    assert [r.case for r in rows] == ["promise"] * 3
    assert rows[0].ratio == pytest.approx(0.25) and rows[0].met is True
    assert rows[1].ratio == pytest.approx(0.5) and rows[1].met is True
    assert rows[2].ours == pytest.approx(1.9) and rows[2].met is True


def test_markdown_table():
    rows = [
        Row("p", "c", "time", 0.5, 2.0, "s", "<= 0.25x", False),
        Row("p", "c", "agreement", 0.99999, None, "fraction", ">= 0.999", True),
    ]
    text = markdown(rows, {"commit": "abc1234"})
    assert "- commit: abc1234" in text
    assert "| p | c | time | 0.5 s | 2.00 s | **0.25x** | <= 0.25x | **no** |" in text
    assert "| p | c | agreement | 99.999% | - | - | >= 0.999 | yes |" in text


def test_accuracy_rows_hold_the_setting_to_half_the_peers_error_at_twice_the_cost():
    from crf_rnn_3d.benchmarks.summary import accuracy_rows

    results = {
        "errors": [
            {"case": "dense", "F": 5, "values": "smooth",  # below F = 7: left out
             "error": {"default": 0.1, "copies=2": 0.05, "pydensecrf2": 0.1}},
            {"case": "dense", "F": 7, "values": "noise",
             "error": {"default": 0.2, "copies=2": 0.09, "pydensecrf2": 0.2}},
            {"case": "sparse", "F": 10, "values": "smooth",
             "error": {"default": 0.3, "copies=2": 0.2, "pydensecrf2": 0.31}},
        ],
        "cost": [
            {"F": 7, "voxels": 110592, "seconds": {"default": 1.0, "copies=2": 1.9}},
            {"F": 10, "voxels": 110592, "seconds": {"default": 1.0, "copies=2": 2.5}},
        ],
    }  # fmt: skip
    rows = accuracy_rows(results)
    assert len(rows) == 2 * 2 + 2
    by = {(r.case, r.figure): r for r in rows}
    f7 = by[("dense, F = 7, noise values", "error, copies=2")]
    assert f7.ratio == pytest.approx(0.45) and f7.met is True
    f10 = by[("sparse, F = 10, smooth values", "error, copies=2")]
    assert f10.ratio == pytest.approx(0.2 / 0.31) and f10.met is False
    assert by[("dense, F = 7, noise values", "error, default")].met is None  # no goal
    assert by[("F = 7, 110,592 voxels", "time, copies=2 (build + 10 filters)")].met is True
    assert by[("F = 10, 110,592 voxels", "time, copies=2 (build + 10 filters)")].met is False


def test_train_rows_compare_recompute_with_the_plain_step():
    from crf_rnn_3d.benchmarks.summary import train_rows

    results = {
        "iterations": 5,
        "steps": [
            {"case": "promise", "backend": "compiled", "recompute": False, "note": "",
             "seconds": 2.0, "peak_mib": 400.0},
            {"case": "promise", "backend": "compiled", "recompute": True, "note": "",
             "seconds": 3.0, "peak_mib": 180.0},
            {"case": "promise", "backend": "tf", "recompute": False, "note": "over the cap"},
            {"case": "promise", "backend": "tf", "recompute": True, "note": "",
             "seconds": 9.0, "peak_mib": 900.0},
        ],
    }  # fmt: skip
    rows = train_rows(results)
    assert [r.case for r in rows] == ["promise, compiled, 5 iterations"] * 2  # tf: no pair
    memory, time = rows
    assert memory.ratio == pytest.approx(0.45) and memory.met is True
    assert time.ratio == pytest.approx(1.5) and time.met is None

"""The load test's own checks catch wrong answers, and a short Locust run passes."""

from __future__ import annotations

import json
import os

import pytest

from serving.load.checks import check_ours
from serving.load.photos import load_mix
from serving.load.runner import cpu_between, paired_rounds, run_locust, seconds, summarize, workers_cpu

PHOTO = load_mix()[0]  # chelsea.jpg, 451 x 300


def answer(**overrides) -> dict:
    entry = {"format": "array", "width": 32, "height": 21, "data": [[0.0] * 32] * 21}
    body = {
        "predictions": [{"index": 1, "label": "x", "probability": 0.5}],
        "image": {"width": 451, "height": 300},
        "explanations": {"dve": entry},
    }
    body.update(overrides)
    return body


def test_a_correct_answer_passes_and_wrong_ones_fail():
    check_ours(answer(), PHOTO, 1, ("dve",), "array", 32)
    for wrong in (
        answer(predictions=[]),
        answer(image={"width": 300, "height": 451}),
        answer(explanations={}),
        answer(explanations={"dve": {"format": "array", "width": 32, "height": 32, "data": [[0.0] * 32] * 32}}),
    ):
        with pytest.raises(AssertionError):
            check_ours(wrong, PHOTO, 1, ("dve",), "array", 32)


def test_durations_in_locust_syntax():
    assert [seconds(d) for d in ("90", "90s", "2m", "1h30m")] == [90, 90, 120, 5400]


def test_a_short_locust_run_of_the_mix_has_no_failure(server, tmp_path):
    results = tmp_path / "requests.jsonl"
    before = workers_cpu(server, "efficientnet_lite0")
    code = run_locust(server, "mix", users=2, duration=8, prefix=tmp_path / "mix", results=results)
    cpu = cpu_between(before, workers_cpu(server, "efficientnet_lite0"))
    summary = summarize(results, {"mix": 8}, {"mix": cpu})["mix"]
    # each user answered at least once (a loaded machine may allow no more in 8 s), none failed
    assert code == 0 and summary["requests"] >= 2 and summary["failures"] == 0, summary
    # the worker's CPU per answer: at least a forward pass's worth, at most all of 8 s on every core
    assert 5.0 < summary["worker_cpu_ms"] < 8000.0 * os.cpu_count() / summary["requests"], summary
    assert (tmp_path / "mix_stats.csv").exists()
    assert all(json.loads(line)["ok"] for line in results.read_text().splitlines())


def test_rounds_are_compared_phase_by_phase(tmp_path):
    """Each round's ratio comes from its own two phases, in the order they ran; a 503 that
    was sent again is no answer."""
    phases = [("stock", [200] * 3), ("explain", [150, 170, 190]), ("noexplain", [100] * 6), ("explain", [120] * 4)]
    phases.append(("noexplain", [120] * 4))
    records = [{"scenario": scenario, "ms": ms} for scenario, times in phases for ms in times]
    records.insert(4, {"scenario": "explain", "ms": 1, "retried": True})
    results = tmp_path / "requests.jsonl"
    results.write_text("".join(json.dumps(record) + "\n" for record in records))
    rounds = paired_rounds(results, "explain", "noexplain")
    assert rounds == [(0.5, 1.7), (1.0, 1.0)]


def test_a_replaced_worker_counts_from_its_start():
    assert cpu_between({10: 5.0, 11: 2.0}, {10: 7.5, 12: 1.0}) == 3.5

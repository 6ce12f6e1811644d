"""The load test's own checks catch wrong answers, and a short Locust run passes."""

from __future__ import annotations

import json

import pytest

from serving.load.checks import check_ours
from serving.load.photos import load_mix
from serving.load.runner import paired_rounds, run_locust, seconds, summarize

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
    code = run_locust(server, "mix", users=2, duration=8, prefix=tmp_path / "mix", results=results)
    summary = summarize(results, {"mix": 8})["mix"]
    # each user answered at least once (a loaded machine may allow no more in 8 s), none failed
    assert code == 0 and summary["requests"] >= 2 and summary["failures"] == 0, summary
    assert (tmp_path / "mix_stats.csv").exists()
    assert all(json.loads(line)["ok"] for line in results.read_text().splitlines())


def test_rounds_are_compared_phase_by_phase(tmp_path):
    """Each round's ratio comes from its own two phases, in the order they ran."""
    header = "Type,Name,Request Count,Failure Count,Median Response Time,Requests/s,50%\n"
    phases = [
        ("stock", 30, 200),
        ("explain", 20, 150),
        ("noexplain", 25, 100),
        ("explain", 40, 120),
        ("noexplain", 40, 120),
    ]
    for i, (scenario, rps, p50) in enumerate(phases):
        rows = f"POST,x,1,0,{p50},{rps},{p50}\n,Aggregated,1,0,{p50},{rps},{p50}\n"
        (tmp_path / f"{i:02d}-{scenario}_stats.csv").write_text(header + rows)
        (tmp_path / f"{i:02d}-{scenario}_stats_history.csv").write_text(header)  # not a phase's totals
    assert paired_rounds(tmp_path, "explain", "noexplain") == [(0.8, 1.5), (1.0, 1.0)]

"""scripts/client.py as people script with it (run as a command), against the real TorchServe of the session:
each file answered on its own, raw JSON lines, the API's options as flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.photos import CAT_CLASSES
from tests.conftest import cli


@pytest.fixture
def files(tmp_path, photos) -> dict[str, Path]:
    """A real photo, a text file with an image's name, and a path that does not exist."""
    chelsea = tmp_path / "chelsea.jpg"
    chelsea.write_bytes(photos["chelsea"])
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image at all\n")
    return {"chelsea": chelsea, "notes": notes, "missing": tmp_path / "missing.jpg"}


def run(server, *args: str | Path) -> int:
    return cli("scripts/client.py", *args, "--url", server.inference_url, "--key-file", server.key_file)


def test_every_file_is_answered_on_its_own_and_the_exit_status_says_some_failed(server, files, tmp_path, capsys):
    status = run(server, files["notes"], files["missing"], files["chelsea"], "--out", tmp_path / "out")
    out, err = capsys.readouterr()
    assert status == 1
    assert f"{files['notes']}: error: HTTP 400" in err and "not an image" in err
    assert f"{files['missing']}: error: cannot read the file" in err
    assert "2 of 3 images failed" in err
    assert f"{files['chelsea']}  (451 x 300)" in out  # the good one after two bad ones
    assert (tmp_path / "out" / "chelsea_dve.png").exists() and (tmp_path / "out" / "chelsea_overlay.png").exists()


def test_json_prints_one_raw_answer_per_line_in_order(server, files, capsys):
    status = run(server, files["chelsea"], files["notes"], files["missing"], "--json")
    lines = capsys.readouterr().out.splitlines()
    assert status == 1 and len(lines) == 3
    answer, refused, unread = map(json.loads, lines)
    assert answer["predictions"][0]["index"] in CAT_CLASSES and set(answer["explanations"]) == {"dve", "targeted_dve"}
    assert refused["code"] == 400 and refused["type"] == "BadRequest"  # TorchServe's own error shape
    assert unread["code"] is None and "cannot read the file" in unread["message"]


def test_the_flags_are_the_apis_options(server, files, tmp_path, capsys):
    status = run(
        server,
        files["chelsea"],
        "--json",
        "--topk",
        "2",
        "--explanations",
        "dve",
        "--format",
        "array",
        "--map-size",
        "32",
        "--class-conditional",
        "--out",
        tmp_path / "out",
    )
    (answer,) = map(json.loads, capsys.readouterr().out.splitlines())
    assert status == 0 and len(answer["predictions"]) == 2
    assert list(answer["explanations"]) == ["dve"] and answer["explanations"]["dve"]["format"] == "array"
    assert (
        answer["explanations"]["dve"]["width"] == 32
        and answer["explained_class"]["index"] == answer["predictions"][0]["index"]
    )
    saved = np.load(tmp_path / "out" / "chelsea_dve.npy")
    assert saved.shape == (21, 32) and 0.0 <= saved.min() and saved.max() == pytest.approx(1.0)


def test_overlays_and_stages_are_written_as_the_server_sent_them(server, files, tmp_path, capsys):
    status = run(
        server,
        files["chelsea"],
        "--format",
        "overlay",
        "--map-size",
        "64",
        "--stages",
        "--explanations",
        "targeted_dve",
        "--out",
        tmp_path,
    )
    out = capsys.readouterr().out
    assert status == 0 and "salient patch (targeted DVE): [" in out
    with Image.open(tmp_path / "chelsea_targeted_dve.png") as overlay:
        assert overlay.mode == "RGB" and overlay.size == (64, 43)
    stages = sorted(tmp_path.glob("chelsea_stage*.png"))
    assert len(stages) >= 2 and all(Image.open(path).size == (64, 43) for path in stages)


def test_no_maps_asked_prints_the_classes_only(server, files, tmp_path, capsys):
    assert run(server, files["chelsea"], "--explanations", "none", "--out", tmp_path) == 0
    out = capsys.readouterr().out
    assert "salient patch" not in out and not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("flag", [["--explanations", "heatmap"], ["--map-size", "big"], ["--format", "jpeg"]])
def test_a_wrong_flag_is_a_usage_error_before_anything_is_sent(flag, files, capsys):
    assert cli("scripts/client.py", files["chelsea"], *flag) == 2 and flag[1] in capsys.readouterr().err


def test_a_server_that_is_not_running_is_named(files, tmp_path, capsys):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "k"}}))
    status = cli("scripts/client.py", files["chelsea"], "--url", "http://127.0.0.1:9", "--key-file", key_file)
    assert status == 1 and "cannot reach http://127.0.0.1:9" in capsys.readouterr().err


@pytest.mark.parametrize(("target", "index"), [("281", 281), ("lynx", 287)])
def test_target_explains_the_class_asked_for_by_index_or_label(server, files, capsys, target, index):
    assert run(server, files["chelsea"], "--json", "--target", target) == 0
    (answer,) = map(json.loads, capsys.readouterr().out.splitlines())
    assert answer["explained_class"]["index"] == index and set(answer["explanations"]) == {"dve", "targeted_dve"}

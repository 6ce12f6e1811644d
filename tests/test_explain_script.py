"""scripts/explain.py answers offline exactly as the server answers over HTTP."""

from __future__ import annotations

import json

import requests

from tests.conftest import cli


def test_offline_answer_equals_the_served_one(server, model_store, photos, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"  # the command's TMPDIR: the archive is extracted there
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    image = tmp_path / "chelsea.jpg"
    image.write_bytes(photos["chelsea"])
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    code = cli(
        "scripts/explain.py",
        image,
        bad,
        "--archive",
        model_store / "efficientnet_lite0.mar",
        "--out",
        tmp_path / "out",
        "--device",
        "cpu",
    )
    assert code == 1  # one of the two files is no image
    assert list(scratch.iterdir()) == []  # the extracted archive (19 MB) is not left behind
    offline = json.loads((tmp_path / "out" / "chelsea.json").read_text())
    served = requests.post(
        f"{server.inference_url}/predictions/efficientnet_lite0",
        data=photos["chelsea"],
        headers={"Authorization": f"Bearer {server.token()}", "Content-Type": "image/jpeg"},
        timeout=60,
    ).json()
    assert offline == served
    assert {p.name for p in (tmp_path / "out").glob("chelsea_*.png")} == {
        "chelsea_dve.png",
        "chelsea_targeted_dve.png",
        "chelsea_overlay.png",
    }
    assert json.loads((tmp_path / "out" / "notes.json").read_text())["code"] == 400

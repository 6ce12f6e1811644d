"""scripts/stages.py draws Fig. 7 through the handler's own path, and refuses clearly."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tests.conftest import cli


def test_the_figure_is_written_for_lite0_on_one_image(photos, tmp_path, capsys):
    image = tmp_path / "coffee.jpg"
    image.write_bytes(photos["coffee"])
    out = tmp_path / "figures" / "stages.png"
    assert cli("scripts/stages.py", "--images", image, "--out", out, "--device", "cpu", "--panel", "64") == 0
    printed = capsys.readouterr().out
    assert "stages: _blocks.0 16x112x112, _blocks.2 24x56x56" in printed and "_avg_pooling:input 1280x7x7" in printed
    assert "coffee: espresso" in printed and f"wrote {out}" in printed
    figure = Image.open(out)
    assert figure.format == "PNG" and figure.width > 6 * 64 and figure.height > 64  # the crop, then 5 stages
    pixels = np.asarray(figure.convert("RGB"), dtype=int)
    assert pixels.std() > 20  # photos and maps, not a blank page


def test_vgg16_without_weights_stops_with_one_clear_line(tmp_path, capsys):
    out = tmp_path / "stages.png"
    assert cli("scripts/stages.py", "--model", "vgg16", "--out", out) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: vgg16 needs weights: --weights FILE")
    assert "--random-weights" in error and not out.exists()
    assert cli("scripts/stages.py", "--model", "no_such_net", "--out", out) == 2
    assert "unknown model 'no_such_net'" in capsys.readouterr().err

"""scripts/figures.py (evaluation/figures.py): ground truth, the handler's numbers, the blur sweep, the PNGs."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import figures, saliency
from evaluation.photos import PHOTOS, TRUTH, Truth, load_photos
from evaluation.photos import encode_image as encode
from handler import imaging
from handler.models import imagenet_labels
from handler.options import ParsedRequest, RequestOptions
from tests.conftest import cli

LABELS = imagenet_labels()


def test_judge_right_wrong_unknown():
    cat = Truth("a cat", frozenset({281, 282, 285}), "")
    assert figures.judge(285, cat) == figures.RIGHT
    assert figures.judge(283, cat) == figures.WRONG
    assert figures.judge(665, Truth("a motorcycle", frozenset(), "")) == figures.WRONG  # no class is right
    assert figures.judge(285, None) == figures.UNKNOWN


def test_parse_truth_indices_labels_and_errors():
    name, truth = figures.parse_truth("my photo=281, Tiger Cat ,espresso", LABELS)
    assert name == "my photo" and truth.classes == {281, 282, 967}
    assert figures.parse_truth("bike=", LABELS)[1].classes == frozenset()
    for bad in ("chelsea", "=281", "chelsea=1000", "chelsea=latte"):
        with pytest.raises(ValueError):
            figures.parse_truth(bad, LABELS)


def test_truth_table_names_every_class_it_counts():
    """Each default photo has a truth, and its reason names every class it counts as right."""
    assert set(figures.DEFAULT_IMAGES) <= set(TRUTH) <= set(PHOTOS)
    for name, truth in TRUTH.items():
        named = {int(i) for i in re.findall(r"\((\d+)", truth.reason)}
        assert truth.classes <= named, name
        assert all(0 <= c < 1000 for c in truth.classes)
    assert figures.default_truths(SimpleNamespace(labels=LABELS)) == TRUTH
    assert figures.default_truths(SimpleNamespace(labels=["dark", "bright"])) == {}  # not ImageNet: no truth


def test_default_photos_hold_right_and_wrong_answers(lite0_explainer):
    """As the paper's Fig. 4: the default grid shows correct and incorrect predictions."""
    photos = load_photos(list(figures.DEFAULT_IMAGES))
    pixels = torch.stack([saliency.model_crop(lite0_explainer, photos[name]) for name in figures.DEFAULT_IMAGES])
    classes = saliency.forward_batch(lite0_explainer, pixels).classes.tolist()
    verdicts = {name: figures.judge(c, TRUTH[name]) for name, c in zip(figures.DEFAULT_IMAGES, classes)}
    assert verdicts == {
        "chelsea": "right",
        "coffee": "right",
        "rocket": "right",
        "astronaut": "wrong",
        "motorcycle_left": "wrong",
    }


def _served(explainer, image_bytes: bytes) -> tuple[dict, object]:
    """What the handler answers for these bytes, and where its crop lies."""
    request = ParsedRequest(image_bytes, RequestOptions(1, ("targeted_dve",), "png", 224))
    (result,) = explainer.run([request])
    assert result.status == 200
    return result.body, explainer.prepare(request).geometry


def test_grid_row_is_what_the_handler_answers(lite0_explainer):
    photo = load_photos(["chelsea"])["chelsea"]
    data = imaging.encode_png(photo)
    (row,) = figures.grid_rows(lite0_explainer, [("chelsea", data)], TRUTH)
    body, geometry = _served(lite0_explainer, data)
    assert row.top == body["predictions"][0]["index"]
    assert row.probability == pytest.approx(body["predictions"][0]["probability"], abs=1e-5)
    assert row.box is not None and geometry.box_to_original(row.box) == body["explanations"]["targeted_dve"]["box"]
    assert row.verdict == figures.RIGHT
    assert row.gradcam is not None and row.gradcam.shape == row.dve.shape


def test_grid_row_maps_and_box_match_the_slow_reference(lite0_explainer):
    """The row's maps and box, recomputed from the crop with a hook of our own and the numpy reference."""
    from tests.test_dve import reference_bicubic, reference_explain

    photo = load_photos(["chelsea"])["chelsea"]
    (row,) = figures.grid_rows(lite0_explainer, [("chelsea", imaging.encode_png(photo))], TRUTH)
    config = lite0_explainer.config
    x = (row.pixels.permute(2, 0, 1).double() / 255 - torch.tensor(config.mean)[:, None, None]) / torch.tensor(
        config.std
    )[:, None, None]
    captured = []
    hook = lite0_explainer.model._avg_pooling.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            lite0_explainer.model(x[None].float())
    finally:
        hook.remove()
    dve_map, targeted_map, ((box, valid),) = reference_explain(captured[0].double().numpy(), config.dve, (224, 224))
    np.testing.assert_allclose(row.dve.numpy(), reference_bicubic(dve_map[0], (224, 224)), atol=1e-4)
    np.testing.assert_allclose(row.targeted.numpy(), reference_bicubic(targeted_map[0], (224, 224)), atol=1e-4)
    assert valid and row.box == tuple(box)


def test_blur_keeps_the_crop_at_zero_and_smooths_it():
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    assert torch.equal(figures.blur(pixels, 0), pixels)
    variances = [float(figures.blur(pixels, s).float().var()) for s in (0, 1, 4, 100)]  # 100: kernel capped, no error
    assert variances == sorted(variances, reverse=True) and variances[-1] < variances[0] / 100
    assert figures.blur(pixels, 2).dtype == torch.uint8 and figures.blur(pixels, 2).shape == pixels.shape
    with pytest.raises(ValueError):
        figures.blur(pixels, -1)


def test_blur_is_torchvisions_two_dimensional_gaussian_blur():
    """Two 1-D passes give what one k x k ``gaussian_blur`` call gives (to a grey level)."""
    from torchvision.transforms.functional import gaussian_blur

    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8))
    for sigma, kernel in ((1.5, 11), (30.0, 95)):  # 95: capped at 2 x 48 - 1
        direct = (
            gaussian_blur(pixels.permute(2, 0, 1).float(), [kernel, kernel], [sigma, sigma]).round().permute(1, 2, 0)
        )
        assert (figures.blur(pixels, sigma).float() - direct).abs().max() <= 1


def test_blur_sweep_starts_at_the_handler_answer_and_loses_the_cat(lite0_explainer):
    data = imaging.encode_png(load_photos(["chelsea"])["chelsea"])
    original, steps = figures.blur_sweep(
        lite0_explainer, saliency.model_crop(lite0_explainer, data), [0, 16], TRUTH["chelsea"]
    )
    body, _ = _served(lite0_explainer, data)
    unblurred, blurred = steps
    assert original == unblurred.top == body["predictions"][0]["index"]
    assert (
        unblurred.probability
        == unblurred.original_probability
        == pytest.approx(body["predictions"][0]["probability"], abs=1e-5)
    )
    assert unblurred.verdict == figures.RIGHT
    assert blurred.original_probability < unblurred.original_probability / 10
    assert blurred.top != original and blurred.verdict == figures.WRONG


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_grid_png_has_its_size_and_the_crop_in_place(lite0_explainer, tmp_path):
    rows = figures.grid_rows(lite0_explainer, [("coffee", load_photos(["coffee"])["coffee"])], TRUTH)
    out = tmp_path / "grid.png"
    size = figures.draw_grid(rows, LABELS, "efficientnet_lite0", out)
    width, height = figures.grid_size(1)
    assert _png_size(out) == size == (round(width * figures.DPI), round(height * figures.DPI)) == (980, 380)
    # the first tile is the model's crop itself: its centre matches the crop's centre
    drawn = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)
    tile = figures.GRID_TILE * figures.DPI
    cx = figures.MARGIN * figures.DPI + tile / 2
    cy = (figures.GRID_HEADER + figures.GRID_ROW_TITLE) * figures.DPI + tile / 2  # from the top
    patch = drawn[int(cy) - 5 : int(cy) + 5, int(cx) - 5 : int(cx) + 5].mean(axis=(0, 1))
    crop = rows[0].pixels.numpy().astype(np.float32)[107:117, 107:117].mean(axis=(0, 1))
    assert np.abs(patch - crop).max() < 12


def test_blur_command_prints_the_table_and_writes_the_png(tmp_path, capsys):
    out = tmp_path / "blur.png"
    assert (
        cli(
            "scripts/figures.py",
            "blur",
            "--image",
            "chelsea",
            "--sigmas",
            "0",
            "2",
            "16",
            "--out",
            out,
            "--device",
            "cpu",
        )
        == 0
    )
    width, height = figures.blur_size(3)
    assert _png_size(out) == (round(width * figures.DPI), round(height * figures.DPI))
    printed = capsys.readouterr().out
    assert "P(Egyptian cat)" in printed and re.search(r"^\s+16\s+\S.*wrong", printed, re.M)
    assert out.stat().st_size < 1_500_000


def test_grid_command_judges_a_users_photo_only_with_truth(tmp_path, capsys):
    data = encode(load_photos(["coffee"])["coffee"], quality=92)
    (tmp_path / "my_cup.jpg").write_bytes(data)
    (tmp_path / "judged_cup.jpg").write_bytes(data)
    out = tmp_path / "grid.png"
    images = [str(tmp_path / "my_cup.jpg"), str(tmp_path / "judged_cup.jpg")]
    assert (
        cli(
            "scripts/figures.py",
            "grid",
            "--images",
            *images,
            "--truth",
            "judged_cup=coffee mug",
            "--out",
            out,
            "--device",
            "cpu",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert re.search(r"^my_cup\s+espresso \(967\).*truth unknown", printed, re.M)
    assert re.search(r"^judged_cup\s+espresso \(967\).*wrong", printed, re.M)
    width, height = figures.grid_size(2)
    assert _png_size(out) == (round(width * figures.DPI), round(height * figures.DPI))


def test_unknown_photo_fails_before_loading_a_model(capsys):
    assert cli("scripts/figures.py", "grid", "--images", "no_such_photo", "--out", "unused.png") == 2
    out, err = capsys.readouterr()
    assert "neither an image file nor a known photo" in err and "explained layer" not in out  # no model was loaded

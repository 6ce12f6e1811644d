"""In-process: the real default model, batches, formats, and errors that stay per request."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from evaluation.photos import CAT_CLASSES, SAMPLES, encode_image
from handler.config import RequestDefaults
from handler.errors import INTERNAL_ERROR_MESSAGE, RequestError
from handler.explainer import Explainer
from handler.options import OPTION_NAMES, ParsedRequest, RequestOptions
from tests.conftest import SCENE_SIDE, centred_gaussian, hottest_in

ESPRESSO = 967
DEFAULT = RequestOptions(topk=5, explanations=("dve", "targeted_dve"), format="png", map_size=224)


def ask(explainer: Explainer, image: bytes, **options) -> dict:
    result = explainer.run([ParsedRequest(image, RequestOptions(**{**DEFAULT.__dict__, **options}))])[0]
    assert result.status == 200, result.body
    return result.body


def png(entry: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(entry["data"])))


def test_default_response_joins_prediction_and_both_explanations(lite0_explainer, photos):
    body = ask(lite0_explainer, photos["chelsea"])
    assert body["predictions"][0]["index"] in CAT_CLASSES
    assert len(body["predictions"]) == 5
    probabilities = [p["probability"] for p in body["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0 + 1e-6
    assert body["image"] == {"width": 451, "height": 300}
    assert body["layer"] == "_avg_pooling:input"
    for name in ("dve", "targeted_dve"):
        entry = body["explanations"][name]
        assert (entry["format"], entry["width"], entry["height"]) == ("png", 224, 149)  # aspect ratio kept
        image = png(entry)
        assert image.mode == "L" and image.size == (224, 149)
        assert np.asarray(image).max() == 255
    x0, y0, x1, y1 = body["explanations"]["targeted_dve"]["box"]
    assert 0 <= x0 < x1 <= 451 and 0 <= y0 < y1 <= 300


def test_map_outside_the_models_crop_is_zero(lite0_explainer, photos):
    body = ask(lite0_explainer, photos["coffee"], map_size=None)  # 600 x 400, original size
    dve_map = np.asarray(png(body["explanations"]["dve"]))
    assert dve_map.shape == (400, 600)
    crop_side = 224 * 400 / 256  # the model saw the centre 350 x 350
    left = int((600 - crop_side) / 2)
    assert dve_map[:, : left - 1].max() == 0 and dve_map[:, 600 - left + 1 :].max() == 0
    assert dve_map[:, left + 1 : 600 - left - 1].max() == 255


def test_overlay_and_array_formats(lite0_explainer, photos):
    overlay = ask(lite0_explainer, photos["coffee"], format="overlay", map_size=120, explanations=("dve",))
    assert set(overlay["explanations"]) == {"dve"}
    image = png(overlay["explanations"]["dve"])
    assert image.mode == "RGB" and image.size == (120, 80)
    array = ask(lite0_explainer, photos["coffee"], format="array", map_size=30)
    values = np.array(array["explanations"]["targeted_dve"]["data"])
    assert values.shape == (20, 30) and values.min() >= 0 and values.max() == pytest.approx(1.0, abs=0.05)


def test_no_explanations_gives_the_prediction_alone(lite0_explainer, photos):
    body = ask(lite0_explainer, photos["chelsea"], explanations=(), topk=1)
    assert body["explanations"] == {} and len(body["predictions"]) == 1


def test_batch_answers_each_request_as_if_alone(lite0_explainer, photos):
    names = list(SAMPLES)
    options = [DEFAULT, RequestOptions(2, ("targeted_dve",), "png", 64), DEFAULT, RequestOptions(1, (), "png", 224)]
    batch = lite0_explainer.run([ParsedRequest(photos[n], o) for n, o in zip(names, options)])
    for name, option, result in zip(names, options, batch):
        alone = lite0_explainer.run([ParsedRequest(photos[name], option)])[0]
        assert result.status == alone.status == 200
        assert [p["index"] for p in result.body["predictions"]] == [p["index"] for p in alone.body["predictions"]]
        for p, q in zip(result.body["predictions"], alone.body["predictions"]):
            assert p["probability"] == pytest.approx(q["probability"], abs=1e-4)
        assert set(result.body["explanations"]) == set(option.explanations)
        for name_ in option.explanations:
            a = np.asarray(png(result.body["explanations"][name_]), dtype=int)
            b = np.asarray(png(alone.body["explanations"][name_]), dtype=int)
            assert np.abs(a - b).max() <= 2


def test_bad_requests_fail_alone_and_the_rest_of_the_batch_succeeds(lite0_explainer, photos):
    requests = [
        ParsedRequest(photos["chelsea"], DEFAULT),
        ParsedRequest(b"definitely not an image", DEFAULT),
        RequestError("'topk' must be an integer"),
        ParsedRequest(photos["coffee"][:2000], DEFAULT),
        ParsedRequest(photos["coffee"], RequestOptions(5, ("dve",), "array", None)),  # 600 x 400 floats: allowed
        ParsedRequest(photos["coffee"], DEFAULT),
    ]
    results = lite0_explainer.run(requests)
    assert [r.status for r in results] == [200, 400, 400, 400, 200, 200]
    assert "not an image" in results[1].body["message"]
    assert results[2].body == {"code": 400, "type": "BadRequest", "message": "'topk' must be an integer"}
    assert results[5].body["predictions"][0]["label"] == "espresso"


def test_a_bug_answers_its_own_request_with_500_and_logs_no_request(lite0_explainer, photos, monkeypatch, caplog):
    """An unexpected exception while decoding one image fails that request only."""
    admit = lite0_explainer.admit

    def buggy(request):
        if request.image == photos["rocket"]:
            raise ZeroDivisionError("a bug")
        return admit(request)

    monkeypatch.setattr(lite0_explainer, "admit", buggy)
    results = lite0_explainer.run([ParsedRequest(photos[name], DEFAULT) for name in ("chelsea", "rocket", "coffee")])
    assert [r.status for r in results] == [200, 500, 200]
    assert results[1].body == {"code": 500, "type": "InternalServerError", "message": INTERNAL_ERROR_MESSAGE}
    assert "ZeroDivisionError: a bug" in caplog.text and "Traceback" in caplog.text
    assert base64.b64encode(photos["rocket"][:60]).decode() not in caplog.text


def test_a_failed_forward_pass_fails_its_batch_requests_but_not_the_bad_ones(
    lite0_explainer, photos, monkeypatch, caplog
):
    def out_of_order(pixels):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(lite0_explainer, "forward", out_of_order)
    results = lite0_explainer.run([ParsedRequest(photos["chelsea"], DEFAULT), ParsedRequest(b"not an image", DEFAULT)])
    assert [r.status for r in results] == [500, 400]
    assert "RuntimeError: the device went away" in caplog.text


def test_too_large_float_array_is_refused_with_a_hint(lite0_explainer, photos):
    big = Image.open(io.BytesIO(photos["coffee"])).resize((1800, 1200))
    result = lite0_explainer.run(
        [ParsedRequest(encode_image(big, "JPEG"), RequestOptions(5, ("dve",), "array", None))]
    )[0]
    # 1254 x 836 = 1,048,344 values is the largest map within the 1,048,576 allowed
    assert result.status == 413 and "map_size of at most 1254" in result.body["message"]


def test_dve_peaks_on_off_centre_objects_where_a_centre_prior_misses(lite0_explainer, off_centre_objects):
    """Objects in a corner: DVE's hottest pixel lies on the object; a centred Gaussian's does not."""
    for name, image, box in off_centre_objects:
        body = ask(lite0_explainer, image, map_size=None, format="array", explanations=("dve",))
        dve_map = np.array(body["explanations"]["dve"]["data"])
        assert dve_map.shape == (SCENE_SIDE, SCENE_SIDE)
        assert body["predictions"][0]["index"] in (CAT_CLASSES | {ESPRESSO}), name
        assert not hottest_in(centred_gaussian(*dve_map.shape), box), name
        assert hottest_in(dve_map, box), name


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_handler_section() -> dict:
    """The ``handler:`` block of README's "Serving options", parsed as YAML."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(handler:\n.*?)```", text, re.S)
    assert block, "README has no handler: YAML block"
    return yaml.safe_load(block.group(1))["handler"]


def readme_option_defaults() -> dict[str, str]:
    """The "default" column of README's table of request options, by option name."""
    text = README.read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", text.split("Options, per request:")[1].split("\n\n")[1], re.M
    )
    return {name: default.strip() for name, default in rows}


def test_defaults_match_the_documented_ones():
    """The code's defaults are the ones README documents, in its YAML block and its options table."""
    from handler.config import Limits
    from handler.dve import DVEParams

    documented = readme_handler_section()
    assert documented["defaults"] == {
        k: list(v) if isinstance(v, tuple) else v for k, v in asdict(RequestDefaults()).items()
    }
    assert documented["dve"] == asdict(DVEParams())
    assert documented["limits"] == asdict(Limits())
    table = readme_option_defaults()
    code = RequestDefaults()
    # Every option is in the table; the one an archive sets no default for says "none".
    assert table.keys() == set(OPTION_NAMES) == {f.name for f in fields(RequestDefaults)} | {"target"}
    assert table.pop("target") == "none" and RequestOptions(5, (), "png", 224).target is None
    assert table["explanations"] == "both" and code.explanations == ("dve", "targeted_dve")
    assert {k: v.strip("`") for k, v in table.items() if k != "explanations"} == {
        k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in asdict(code).items() if k != "explanations"
    }


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_answer(lite0_explainer, photos):
    import torch

    gpu = Explainer(lite0_explainer.model, lite0_explainer.config, lite0_explainer.labels, torch.device("cuda"))
    requests = [ParsedRequest(photos[name], DEFAULT) for name in ("chelsea", "coffee", "rocket")]
    try:
        on_gpu = gpu.run(requests)
    finally:
        lite0_explainer.model.to("cpu")  # the shared fixture's model moved with it
    on_cpu = lite0_explainer.run(requests)
    for a, b in zip(on_gpu, on_cpu):
        assert [p["index"] for p in a.body["predictions"]] == [p["index"] for p in b.body["predictions"]]
        for name in ("dve", "targeted_dve"):
            diff = np.abs(
                np.asarray(png(a.body["explanations"][name]), dtype=int)
                - np.asarray(png(b.body["explanations"][name]), dtype=int)
            )
            assert diff.max() <= 3
        box_a, box_b = a.body["explanations"]["targeted_dve"]["box"], b.body["explanations"]["targeted_dve"]["box"]
        assert np.abs(np.array(box_a) - np.array(box_b)).max() <= 3


LITE0_STAGES = [
    ("_blocks.0", [16, 112, 112]),
    ("_blocks.2", [24, 56, 56]),
    ("_blocks.4", [40, 28, 28]),
    ("_blocks.10", [112, 14, 14]),
    ("_avg_pooling:input", [1280, 7, 7]),
]


def test_stages_are_answered_to_the_requests_that_ask_and_the_others_are_unchanged(lite0_explainer, photos):
    names = list(SAMPLES)
    asked = [
        RequestOptions(5, ("dve", "targeted_dve"), "png", 224, stages=True),
        DEFAULT,
        RequestOptions(1, (), "array", 32, stages=True),
        RequestOptions(3, ("dve",), "overlay", 100),
    ]
    batch = lite0_explainer.run([ParsedRequest(photos[n], o) for n, o in zip(names, asked)])
    plain = lite0_explainer.run(
        [ParsedRequest(photos[n], RequestOptions(**{**o.__dict__, "stages": False})) for n, o in zip(names, asked)]
    )
    assert [r.status for r in batch] == [200] * 4
    for option, result, without in zip(asked, batch, plain):
        body = dict(result.body)
        stages = body.pop("stages", None)
        assert body == without.body  # everything else is what the request gets without stages
        if not option.stages:
            assert stages is None
            continue
        assert [(s["layer"], s["shape"]) for s in stages] == LITE0_STAGES
        for stage in stages:
            entry = stage["dve"]
            if option.format == "array":
                values = np.array(entry["data"])
                assert (entry["width"], entry["height"]) == (32, 21) and values.shape == (21, 32)
                assert values.min() >= 0 and 0.85 <= values.max() <= 1.0  # 112 x 112 drawn on 19 x 19 pixels
            else:
                image = png(entry)
                assert image.mode == "L" and image.size == (entry["width"], entry["height"]) == (224, 149)
                assert np.asarray(image).max() >= 245  # a fine map's peak may fall between two pixels
    # The last stage is the explained layer: its map is the response's dve map.
    last = np.asarray(png(batch[0].body["stages"][-1]["dve"]), dtype=int)
    assert np.abs(last - np.asarray(png(batch[0].body["explanations"]["dve"]), dtype=int)).max() <= 1
    # Early stages are finer: the first stage's map is not the last one's.
    first = np.asarray(png(batch[0].body["stages"][0]["dve"]), dtype=int)
    assert np.abs(first - last).mean() > 10


def test_requests_without_stages_never_capture_them(lite0_explainer, photos, monkeypatch):
    def forbidden(pixels):
        raise AssertionError("a batch without a stages request captured the stages")

    monkeypatch.setattr(lite0_explainer, "forward_stages", forbidden)
    results = lite0_explainer.run(
        [ParsedRequest(photos["coffee"], DEFAULT), ParsedRequest(photos["rocket"], RequestOptions(1, (), "png", 64))]
    )
    assert [r.status for r in results] == [200, 200] and all("stages" not in r.body for r in results)


def test_stages_alone_as_overlays_and_errors_stay_per_request(lite0_explainer, photos):
    stages_only = RequestOptions(1, (), "overlay", 96, stages=True)
    too_many_floats = RequestOptions(5, ("dve",), "array", None, stages=True)  # 600 x 400 x 6 maps > 1,048,576
    results = lite0_explainer.run(
        [
            ParsedRequest(photos["coffee"], stages_only),
            ParsedRequest(b"not an image", stages_only),
            ParsedRequest(photos["coffee"], too_many_floats),
            ParsedRequest(photos["chelsea"], DEFAULT),
        ]
    )
    assert [r.status for r in results] == [200, 400, 413, 200]
    assert results[0].body["explanations"] == {}
    overlays = [png(stage["dve"]) for stage in results[0].body["stages"]]
    assert len(overlays) == 5 and all(o.mode == "RGB" and o.size == (96, 64) for o in overlays)
    message = results[2].body["message"]
    assert "1440000 values" in message and "map_size of at most" in message and "stages false" in message
    assert "stages" not in results[3].body


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_stages(lite0_explainer, photos):
    import torch

    gpu = Explainer(lite0_explainer.model, lite0_explainer.config, lite0_explainer.labels, torch.device("cuda"))
    requests = [
        ParsedRequest(photos[name], RequestOptions(1, (), "png", 224, stages=name != "coffee"))
        for name in ("chelsea", "coffee", "rocket")
    ]
    try:
        on_gpu = gpu.run(requests)
    finally:
        lite0_explainer.model.to("cpu")  # the shared fixture's model moved with it
    on_cpu = lite0_explainer.run(requests)
    assert "stages" not in on_gpu[1].body and "stages" not in on_cpu[1].body
    for a, b in zip(on_gpu[::2], on_cpu[::2]):
        assert [s["layer"] for s in a.body["stages"]] == [s["layer"] for s in b.body["stages"]]
        for sa, sb in zip(a.body["stages"], b.body["stages"]):
            diff = np.abs(np.asarray(png(sa["dve"]), dtype=int) - np.asarray(png(sb["dve"]), dtype=int))
            # Fine maps have long edges where psi cuts at the mean: rounding (cuDNN's TF32)
            # flips a few pixels across it. Features perturbed by 2e-3 on the CPU give a mean
            # difference under 0.2 levels, with rare pixels up to 61.
            assert diff.mean() < 1.5 and (diff > 10).mean() < 0.01, sa["layer"]


def test_class_conditional_maps_only_for_the_requests_that_ask(lite0_explainer, photos):
    from handler import dve, rendering

    options = RequestOptions(5, ("dve", "targeted_dve"), "array", 16)
    conditional = RequestOptions(5, ("dve", "targeted_dve"), "array", 16, class_conditional=True)
    requests = [
        ParsedRequest(photos["chelsea"], options),
        ParsedRequest(photos["chelsea"], conditional),
        ParsedRequest(photos["coffee"], options),
    ]
    mixed = lite0_explainer.run(requests)
    plain = lite0_explainer.run([requests[0], requests[2]])
    assert [r.status for r in mixed] == [200, 200, 200]
    assert (
        mixed[0].body == plain[0].body and mixed[2].body == plain[1].body
    )  # the others get the paper's DVE, unchanged
    assert "explained_class" not in mixed[0].body
    body = mixed[1].body
    assert body["explained_class"] == body["predictions"][0]
    # The map is DVE with each feature map weighted by the classifier's row for the top class.
    prepared = lite0_explainer.prepare(requests[1])
    _, features = lite0_explainer.forward(prepared.pixels[None])
    weights = lite0_explainer.model._fc.weight.detach()[body["predictions"][0]["index"]][None]
    expected = dve.explain(features, lite0_explainer.config.dve, lite0_explainer.input_size, weights)
    size = prepared.geometry.map_size(16)
    drawn = rendering.draw(
        [rendering.Drawing(grid, prepared.geometry, size, "array") for grid in (expected.dve[0], expected.targeted[0])]
    )
    assert body["explanations"]["dve"]["data"] == drawn[0].tolist()
    assert body["explanations"]["targeted_dve"]["data"] == drawn[1].tolist()
    assert body["explanations"]["dve"]["data"] != mixed[0].body["explanations"]["dve"]["data"]


def test_class_conditional_is_refused_per_request_for_a_model_without_a_linear_head(photos):
    import torch

    from handler.config import ServingConfig
    from handler.models import build_model, imagenet_labels

    torch.manual_seed(0)
    vgg = Explainer(
        build_model("vgg16", 1000), ServingConfig(architecture="vgg16"), imagenet_labels(), torch.device("cpu")
    )
    asked = ParsedRequest(photos["coffee"], RequestOptions(1, ("dve",), "png", 32, class_conditional=True))
    refused, answered = vgg.run([asked, ParsedRequest(photos["coffee"], RequestOptions(1, ("dve",), "png", 32))])
    assert refused.status == 400 and "class_conditional needs a linear classifier" in refused.body["message"]
    assert answered.status == 200


def test_target_explains_the_class_asked_for(lite0_explainer, photos):
    chelsea = photos["chelsea"]
    conditional = RequestOptions(5, ("dve", "targeted_dve"), "array", 16, class_conditional=True)
    today = lite0_explainer.run([ParsedRequest(chelsea, conditional)])[0].body
    top = today["predictions"][0]["index"]
    at_top = ask(lite0_explainer, chelsea, format="array", map_size=16, class_conditional=True, target=top)
    assert at_top == today  # the top class as target is exactly class_conditional's answer
    tabby = ask(lite0_explainer, chelsea, format="array", map_size=16, class_conditional=True, target=281)
    lynx = ask(lite0_explainer, chelsea, format="array", map_size=16, class_conditional=True, target=287)
    assert tabby["predictions"] == lynx["predictions"] == today["predictions"]  # the prediction does not change
    for name in ("dve", "targeted_dve"):
        maps = [np.array(body["explanations"][name]["data"]) for body in (today, tabby, lynx)]
        assert not np.array_equal(maps[0], maps[1]) and not np.array_equal(maps[1], maps[2]), name
    listed = {p["index"]: p for p in today["predictions"]}
    assert (
        tabby["explained_class"]
        == listed[281]
        == {"index": 281, "label": "tabby", "probability": listed[281]["probability"]}
    )
    assert lynx["explained_class"] == listed[287]
    # A class outside the top k: its own probability, from the same softmax.
    far = ask(lite0_explainer, chelsea, topk=1, explanations=(), class_conditional=True, target=954)
    assert (
        far["explained_class"]["label"] == "banana"
        and 0 <= far["explained_class"]["probability"] < listed[287]["probability"]
    )


def test_each_request_of_a_batch_explains_its_own_target(lite0_explainer, photos):
    def options(target):
        return RequestOptions(
            3, ("dve", "targeted_dve"), "png", 32, class_conditional=target is not None, target=target
        )

    requests = [ParsedRequest(photos["chelsea"], options(t)) for t in (281, 287, None)] + [
        ParsedRequest(photos["coffee"], options(968))
    ]
    batch = lite0_explainer.run(requests)
    alone = [lite0_explainer.run([request])[0] for request in requests]
    assert [r.body for r in batch] == [r.body for r in alone]
    assert [r.body.get("explained_class", {}).get("index") for r in batch] == [281, 287, None, 968]


def test_target_is_refused_per_request_for_a_model_without_a_linear_head(photos):
    import torch

    from handler.config import ServingConfig
    from handler.models import build_model, imagenet_labels

    torch.manual_seed(0)
    vgg = Explainer(
        build_model("vgg16", 1000), ServingConfig(architecture="vgg16"), imagenet_labels(), torch.device("cpu")
    )
    asked = ParsedRequest(photos["coffee"], RequestOptions(1, ("dve",), "png", 32, class_conditional=True, target=967))
    refused, answered = vgg.run([asked, ParsedRequest(photos["coffee"], RequestOptions(1, ("dve",), "png", 32))])
    assert refused.status == 400
    assert (
        refused.body["message"]
        == "target needs a linear classifier reading the 512 channels of the explained layer features.30; "
        "this model has none"
    )
    assert answered.status == 200


def test_running_out_of_memory_is_a_503_for_that_request_only(lite0_explainer, photos, monkeypatch, caplog):
    """Out of memory while decoding or while drawing one answer: that request gets 503, never a 400."""
    from handler import imaging, rendering

    decode, encode_png = imaging.decode, rendering.encode_png

    def decode_short_of_memory(opened, scale=1.0):
        if opened.width == 640:  # the rocket photo (640 x 427)
            raise MemoryError()
        return decode(opened, scale)

    def encode_short_of_memory(array):
        if array.shape == (224, 224):  # astronaut (512 x 512) at 224 px: its maps only
            raise MemoryError()
        return encode_png(array)

    monkeypatch.setattr(imaging, "decode", decode_short_of_memory)
    monkeypatch.setattr(rendering, "encode_png", encode_short_of_memory)
    results = lite0_explainer.run(
        [ParsedRequest(photos[name], DEFAULT) for name in ("chelsea", "rocket", "coffee", "astronaut")]
    )
    assert [r.status for r in results] == [200, 503, 200, 503]
    assert results[1].body["type"] == "ServiceUnavailable" and "out of memory" in results[1].body["message"]
    assert "out of memory while decoding an image" in caplog.text and "out of memory while drawing" in caplog.text


def test_cuda_out_of_memory_in_the_forward_pass_is_a_503(lite0_explainer, photos, monkeypatch):
    import torch

    def no_memory(pixels):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(lite0_explainer, "forward", no_memory)
    results = lite0_explainer.run([ParsedRequest(photos["chelsea"], DEFAULT), ParsedRequest(b"", DEFAULT)])
    assert [r.status for r in results] == [503, 400]

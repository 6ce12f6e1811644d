"""Per-request options from raw, JSON and multipart bodies; every mistake a clear 4xx."""

from __future__ import annotations

import base64
import json

import pytest

from handler.config import Limits, RequestDefaults
from handler.errors import RequestError
from handler.options import RequestOptions, parse_request

IMAGE = b"\xff\xd8\xff fake jpeg bytes"
B64 = base64.b64encode(IMAGE).decode()


def parse(data, content_type=None, **limits):
    return parse_request(
        data, content_type=content_type, defaults=RequestDefaults(), limits=Limits(**limits), num_classes=1000
    )


def test_raw_body_uses_the_defaults():
    parsed = parse({"body": bytearray(IMAGE)}, "image/jpeg")
    assert parsed.image == IMAGE
    assert parsed.options == RequestOptions(topk=5, explanations=("dve", "targeted_dve"), format="png", map_size=224)


def test_json_body_sets_every_option():
    parsed = parse(
        {
            "body": {
                "image": B64,
                "topk": 3,
                "explanations": ["targeted_dve"],
                "format": "overlay",
                "map_size": "original",
            }
        },
        "application/json",
    )
    assert parsed.image == IMAGE
    assert parsed.options == RequestOptions(topk=3, explanations=("targeted_dve",), format="overlay", map_size=None)


def test_multipart_fields_arrive_as_text():
    parsed = parse(
        {
            "image": bytearray(IMAGE),
            "topk": "2",
            "explanations": "dve, targeted_dve",
            "format": b"array",
            "map_size": "64",
        }
    )
    assert parsed.options == RequestOptions(topk=2, explanations=("dve", "targeted_dve"), format="array", map_size=64)


@pytest.mark.parametrize("value", [[], "", "[]", "none"])
def test_no_explanations_can_be_asked_for(value):
    assert parse({"body": {"image": B64, "explanations": value}}).options.explanations == ()


def test_a_form_image_part_sent_as_base64_text_is_accepted():
    assert parse({"image": B64, "topk": "2"}).image == IMAGE


def test_data_url_base64_is_accepted():
    assert parse({"body": {"image": "data:image/jpeg;base64," + B64}}).image == IMAGE


@pytest.mark.parametrize(
    "data, content_type, status, message",
    [
        ({"body": {"topk": 3}}, "application/json", 400, "no image"),
        ({"body": {"image": "not base64!"}}, "application/json", 400, "not valid base64"),
        ({"body": {"image": B64, "colour": "red"}}, "application/json", 400, "unknown field"),
        ({"body": {"image": B64, "topk": 0}}, "application/json", 400, "between 1 and 1000"),
        ({"body": {"image": B64, "topk": 1001}}, "application/json", 400, "between 1 and 1000"),
        ({"body": {"image": B64, "topk": "three"}}, "application/json", 400, "must be an integer"),
        ({"body": {"image": B64, "topk": True}}, "application/json", 400, "not a boolean"),
        ({"body": {"image": B64, "topk": "\u00b2"}}, "application/json", 400, "must be an integer"),
        ({"body": {"image": B64, "explanations": ["gradcam"]}}, "application/json", 400, "unknown explanation"),
        ({"body": {"image": B64, "explanations": "[dve"}}, "application/json", 400, "not a valid JSON list"),
        ({"body": {"image": B64, "explanations": 3}}, "application/json", 400, "must be a list"),
        ({"body": {"image": B64, "format": "jpeg"}}, "application/json", 400, "'format' must be one of"),
        ({"body": {"image": B64, "map_size": 4}}, "application/json", 400, "'map_size'"),
        ({"body": {"image": B64, "map_size": 5000}}, "application/json", 400, "'map_size'"),
        ({"body": {"image": 12}}, "application/json", 400, "base64 text or bytes"),
        ({"body": bytearray(b"{not json")}, "application/json", 400, "not valid JSON"),
        ({"body": ["a", "list"]}, "application/json", 400, "must be an object"),
        ({"image": bytearray(IMAGE), "topk": b"\xff\xfe"}, None, 400, "UTF-8"),
        ({"body": bytearray(IMAGE), "topk": "3"}, None, 400, "either a body or form fields"),
        ({"body": "a text file\n"}, "text/plain", 400, "the body is text, not an image"),
        ({"image": "Dear user,\na text file.\n", "topk": "3"}, None, 400, "form field 'image' is text, not an image"),
        ({"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}, None, 400, "datatype 'FP32'"),
        (
            {"name": "x", "datatype": "BYTES", "shape": [1], "data": B64, "parameters": {"image": B64}},
            None,
            400,
            "not in its 'parameters'",
        ),
        (
            {"name": "x", "datatype": "BYTES", "shape": [1], "data": B64, "parameters": {"top": 3}},
            None,
            400,
            "unknown field",
        ),
        (
            {"name": "x", "datatype": "BYTES", "shape": [1], "data": B64, "parameters": [3]},
            None,
            400,
            "must be an object",
        ),
    ],
)
def test_bad_requests_get_a_clear_message(data, content_type, status, message):
    with pytest.raises(RequestError, match=message) as caught:
        parse(data, content_type)
    assert caught.value.status == status


def test_oversized_image_is_413():
    with pytest.raises(RequestError, match="limit is 10") as caught:
        parse({"body": bytearray(IMAGE)}, max_image_bytes=10)
    assert caught.value.status == 413


def test_base64_text_body_is_an_image():
    assert parse({"body": B64}, "text/plain").image == IMAGE


def test_kserve_v2_tensor_carries_the_image_and_its_options():
    """What TorchServe's kservev2 envelope hands over for one BYTES input tensor."""
    tensor = {
        "name": "photo",
        "datatype": "BYTES",
        "shape": [1],
        "data": B64,
        "parameters": {"topk": 2, "explanations": ["dve"]},
    }
    request = parse(tensor, None)
    assert request.image == IMAGE
    assert request.options.topk == 2 and request.options.explanations == ("dve",)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"body": {"image": B64}}, False),  # off unless asked for
        ({"body": {"image": B64, "stages": True}}, True),
        ({"body": {"image": B64, "stages": False}}, False),
        ({"image": bytearray(IMAGE), "stages": b"true"}, True),  # multipart text
        ({"image": bytearray(IMAGE), "stages": " False "}, False),
        (
            {"name": "x", "datatype": "BYTES", "shape": [1], "data": B64, "parameters": {"stages": True}},
            True,
        ),  # KServe v2
    ],
)
def test_stages_option_from_every_kind_of_body(data, expected):
    assert parse(data).options.stages is expected


@pytest.mark.parametrize("value", [1, 0, "yes", "1", "", None, ["true"], {"on": True}])
def test_a_bad_stages_value_is_a_clear_400(value):
    with pytest.raises(RequestError, match=r"'stages' must be true or false, got") as caught:
        parse({"body": {"image": B64, "stages": value}}, "application/json")
    assert caught.value.status == 400


def test_a_models_default_can_turn_stages_on():
    defaults = RequestDefaults(stages=True)
    parsed = parse_request(
        {"body": bytearray(IMAGE)}, content_type="image/jpeg", defaults=defaults, limits=Limits(), num_classes=10
    )
    assert parsed.options.stages is True


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"body": {"image": B64}}, False),  # the paper's DVE unless asked for
        ({"body": {"image": B64, "class_conditional": True}}, True),
        ({"image": bytearray(IMAGE), "class_conditional": "true"}, True),  # multipart text
        (
            {"name": "x", "datatype": "BYTES", "shape": [1], "data": B64, "parameters": {"class_conditional": True}},
            True,
        ),
    ],
)
def test_class_conditional_option_from_every_kind_of_body(data, expected):
    assert parse(data).options.class_conditional is expected


def test_a_bad_class_conditional_value_is_a_clear_400():
    with pytest.raises(RequestError, match=r"'class_conditional' must be true or false, got 'maybe'") as caught:
        parse({"body": {"image": B64, "class_conditional": "maybe"}}, "application/json")
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "value",
    ["9" * 5000, "9" * 10, 10**4000, 10**5000, 10**10],
    ids=["5000-digit text", "10-digit text", "4001-digit number", "5001-digit number", "11-digit number"],
)
def test_absurd_numbers_are_a_short_400(value):
    for name in ("topk", "map_size"):
        with pytest.raises(RequestError) as caught:
            parse({"body": {"image": B64, name: value}}, content_type="application/json")
        assert caught.value.status == 400
        assert len(str(caught.value)) < 200  # the message never echoes the whole number


def test_a_json_body_with_a_huge_number_is_a_400_naming_it():
    """TorchServe's own JSON parser refuses numbers over 4300 digits and forwards the bytes."""
    body = f'{{"image": "{B64}", "topk": {"9" * 5000}}}'.encode()
    with pytest.raises(RequestError, match="5000 digits") as caught:
        parse({"body": body}, content_type="application/json")
    assert caught.value.status == 400


def test_a_json_body_as_bytes_is_parsed():
    body = json.dumps({"image": B64, "topk": 3}).encode()
    assert parse({"body": body}, content_type="application/json").options.topk == 3


LABELS = ("dark", "bright", "Cardigan", "cardigan", "tabby")  # ImageNet has both cardigans too (dog, sweater)


def parse_target(data, content_type=None):
    return parse_request(
        data,
        content_type=content_type,
        defaults=RequestDefaults(),
        limits=Limits(),
        num_classes=len(LABELS),
        labels=LABELS,
    )


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"body": {"image": B64, "target": 4}}, 4),
        ({"body": {"image": B64, "target": "4"}}, 4),  # digits are an index in every body
        ({"body": {"image": B64, "target": "tabby"}}, 4),
        ({"body": {"image": B64, "target": " TABBY "}}, 4),  # any case, spaces trimmed
        ({"body": {"image": B64, "target": "cardigan"}}, 3),  # the exact label wins over the other case
        ({"image": bytearray(IMAGE), "target": "1"}, 1),  # multipart text
        ({"image": bytearray(IMAGE), "target": b"bright"}, 1),
        ({"name": "x", "datatype": "BYTES", "shape": [1], "data": B64, "parameters": {"target": "dark"}}, 0),
        ({"body": {"image": B64, "target": 0, "class_conditional": True}}, 0),
    ],
)
def test_target_by_index_or_label_from_every_kind_of_body(data, expected):
    options = parse_target(data).options
    assert options.target == expected
    assert options.class_conditional is True  # the target is explained through the class-conditional weighting


def test_a_raw_body_has_no_target():
    options = parse_target({"body": bytearray(IMAGE)}, "image/jpeg").options
    assert options.target is None and options.class_conditional is False


@pytest.mark.parametrize(
    "target, message",
    [
        (5, r"'target' 5 is not a class index: the model's classes are 0 \.\. 4"),
        (-1, r"'target' -1 is not a class index"),
        ("lynx", r"'target' 'lynx' is neither a class index nor one of the model's labels"),
        ("x" * 500, r"'target' 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\.\.\. \(502 characters\) is neither"),
        ("CARDIGAN", r"'target' 'CARDIGAN' names 2 classes \(2, 3\): send its index"),
        (True, r"'target' must be a class index or a label, got True"),
        ([1], r"'target' must be a class index or a label, got \[1\]"),
        ("1234567890", r"'target' has 10 digits"),
    ],
)
def test_an_unknown_or_ill_typed_target_is_a_400_naming_it(target, message):
    with pytest.raises(RequestError, match=message) as caught:
        parse_target({"body": {"image": B64, "target": target}}, "application/json")
    assert caught.value.status == 400


def test_target_with_class_conditional_false_is_a_contradiction():
    with pytest.raises(
        RequestError, match=r"'target' explains a class through the class-conditional weighting"
    ) as caught:
        parse_target({"body": {"image": B64, "target": 1, "class_conditional": False}}, "application/json")
    assert caught.value.status == 400


def test_without_labels_a_target_is_an_index_only():
    assert parse({"body": {"image": B64, "target": 999}}).options.target == 999
    with pytest.raises(RequestError, match="neither a class index nor one of the model's labels"):
        parse({"body": {"image": B64, "target": "tabby"}})

"""Per-request input: the image and the options, from any body TorchServe hands over.

A request arrives in one of three shapes (TorchServe decodes the body by its
Content-Type before the handler sees it):

* a raw image body (``image/jpeg``, ``application/octet-stream``, ...): ``{"body": bytes}``,
  every option at its default;
* a JSON object (``application/json``): ``{"body": {"image": "<base64>", "topk": 3, ...}}``;
* multipart form fields (``multipart/form-data``): ``{"image": bytes, "topk": "3", ...}``;
* under TorchServe's ``kservev2`` envelope, one input tensor of a KServe v2 / Open
  Inference Protocol request: ``{"name": ..., "datatype": "BYTES", "data": "<base64>",
  "parameters": {"topk": 3, ...}}`` (see ``is_inference_tensor``).

Every problem becomes a ``RequestError`` carrying the HTTP status for that one request.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from handler.config import EXPLANATIONS, FORMATS, Limits, RequestDefaults
from handler.errors import RequestError

OPTION_NAMES = ("topk", "explanations", "format", "map_size", "stages", "class_conditional", "target")
BODY_KEYS = ("body", "data")
MIN_MAP_SIZE = 8
# No option takes a number of more digits: a longer one is refused before Python's int()
# (which refuses over 4300 digits with a ValueError) ever sees it.
MAX_DIGITS = 9
SHOWN_CHARS = 40  # how much of a refused value an error message quotes


@dataclass(frozen=True)
class RequestOptions:
    """What one request asked for.

    Attributes:
        topk: how many classes to return, most probable first.
        explanations: which maps to return: a subset of ``("dve", "targeted_dve")``.
        format: ``png`` (8-bit gray map), ``overlay`` (colour map over the photo, PNG)
            or ``array`` (floats in [0, 1], row-major lists).
        map_size: long side of the returned maps in pixels; None for the original size.
        stages: also return the DVE map of every stage of the model (VGG-16: pool1..pool5),
            in ``format`` and ``map_size`` like the other maps.
        class_conditional: weight each feature map by the classifier's weight for the
            explained class (not the paper's DVE; only for models whose linear classifier
            reads the explained maps' channels).
        target: the class to explain, by index; None for the top prediction. Setting it
            sets ``class_conditional``: the weighting is what makes a map class-specific.
    """

    topk: int
    explanations: tuple[str, ...]
    format: str
    map_size: int | None
    stages: bool = False
    class_conditional: bool = False
    target: int | None = None


@dataclass(frozen=True)
class ParsedRequest:
    image: bytes
    options: RequestOptions


def parse_request(
    data: Mapping[str, Any],
    *,
    content_type: str | None,
    defaults: RequestDefaults,
    limits: Limits,
    num_classes: int,
    labels: Sequence[str] = (),
) -> ParsedRequest:
    """Extracts and validates the image bytes and options of one request.

    Args:
        data: the request as TorchServe passes it to ``handle`` (one list entry).
        content_type: the body's Content-Type, if known.
        defaults: values of the options the request leaves out.
        limits: size bounds.
        num_classes: the model's number of classes (bounds ``topk`` and a ``target`` index).
        labels: the model's class names, for a ``target`` given by name; without them
            only indices are accepted.
    """
    fields = _fields(data, content_type)
    unknown = sorted(set(fields) - {"image", *OPTION_NAMES})
    if unknown:
        raise RequestError(f"unknown field(s) {_shown(unknown)}; allowed: {['image', *OPTION_NAMES]}")
    if fields.get("image") is None:
        raise RequestError(
            "the request has no image: send the image as the body, as a JSON field 'image' (base64) "
            "or as a multipart field 'image'"
        )
    image = _image_bytes(fields["image"])
    if len(image) > limits.max_image_bytes:
        raise RequestError(f"image is {len(image)} bytes; the limit is {limits.max_image_bytes}", 413)
    target = parse_target(fields["target"], num_classes, labels) if "target" in fields else None
    class_conditional = parse_flag(fields.get("class_conditional", defaults.class_conditional), "class_conditional")
    if target is not None and "class_conditional" in fields and not class_conditional:
        raise RequestError(
            "'target' explains a class through the class-conditional weighting: "
            "leave out 'class_conditional' or set it to true"
        )
    options = RequestOptions(
        topk=_topk(fields.get("topk", defaults.topk), num_classes),
        explanations=parse_explanations(fields.get("explanations", defaults.explanations)),
        format=_format(fields.get("format", defaults.format)),
        map_size=_map_size(fields.get("map_size", defaults.map_size), limits),
        stages=parse_flag(fields.get("stages", defaults.stages), "stages"),
        class_conditional=class_conditional or target is not None,
        target=target,
    )
    return ParsedRequest(image, options)


def is_inference_tensor(data: Any) -> bool:
    """True for one input tensor of a KServe v2 / Open Inference Protocol request.

    TorchServe's ``kservev2`` envelope hands the handler the ``inputs`` of one HTTP
    request, one tensor per list entry, with ``name``, ``datatype``, ``shape``, any
    ``parameters``, and as ``data`` the first element of a BYTES tensor's data.
    """
    return isinstance(data, Mapping) and "datatype" in data and "name" in data


def _tensor_fields(tensor: Mapping[str, Any]) -> dict[str, Any]:
    """The image (the tensor's data) and the options (its parameters) of one input tensor."""
    if tensor["datatype"] != "BYTES":
        raise RequestError(
            f"input {_shown(tensor['name'])} has datatype {_shown(tensor['datatype'])}; "
            "send the image as a BYTES tensor whose one element is the image's base64"
        )
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise RequestError("an input's 'parameters' must be an object of options such as {\"topk\": 3}")
    if "image" in parameters:
        raise RequestError("the image goes in the input's 'data', not in its 'parameters'")
    return {**parameters, "image": tensor.get("data")}


def _fields(data: Mapping[str, Any], content_type: str | None) -> dict[str, Any]:
    if is_inference_tensor(data):
        return _tensor_fields(data)
    body_keys = [key for key in BODY_KEYS if key in data]
    if not body_keys:
        fields = {key: _text_field(value) if key != "image" else value for key, value in data.items()}
        if isinstance(fields.get("image"), str):
            fields["image"] = _image_from_text(fields["image"], "form field 'image'", "its base64")
        return fields
    if len(data) > 1:
        raise RequestError(f"send either a body or form fields, not both (got {sorted(data)})")
    body = data[body_keys[0]]
    is_json = content_type is not None and content_type.split(";")[0].strip().lower() == "application/json"
    if is_json and isinstance(body, (bytes, bytearray)):
        body = _json_body(bytes(body))  # TorchServe forwards the bytes of a body its own parser refused
    if isinstance(body, Mapping):
        return dict(body)
    if is_json:
        raise RequestError('a JSON body must be an object such as {"image": "<base64>", "topk": 5}')
    if isinstance(body, str):
        return {"image": _image_from_text(body, "the body", 'JSON {"image": "<base64>"}')}
    return {"image": body}


def _image_from_text(text: str, what: str, other_way: str) -> bytes:
    """An image part or body that TorchServe handed over as text (it decodes text/* ones
    that are valid UTF-8, which no binary image is): only base64 text can be an image."""
    try:
        return _image_bytes(text)
    except RequestError:
        raise RequestError(
            f"{what} is text, not an image: send the image's bytes with Content-Type image/jpeg, "
            f"image/png or application/octet-stream, or {other_way}"
        ) from None


def _json_body(body: bytes) -> Any:
    """A JSON body's value, parsed with integers bounded to ``MAX_DIGITS`` digits."""
    try:
        return json.loads(body, parse_int=_json_int)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError("the body is declared application/json but is not valid JSON") from None


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise RequestError(
            f"the JSON body holds a number of {len(text)} digits; options take integers of at most {MAX_DIGITS} digits"
        )
    return int(text)


def _shown(value: Any) -> str:
    """``repr(value)``, cut to ``SHOWN_CHARS`` characters: error messages never echo a whole value."""
    if isinstance(value, int) and value.bit_length() > 128:  # repr() itself fails past 4300 digits
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def _text_field(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("form fields other than 'image' must be UTF-8 text") from None
    return value


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("'image' is not valid base64") from None
    raise RequestError(f"'image' must be base64 text or bytes, not {type(value).__name__}")


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise RequestError(f"'{name}' must be an integer, not a boolean")
    if isinstance(value, int):
        return value
    digits = value.strip().lstrip("+") if isinstance(value, str) else ""
    if digits.isascii() and digits.isdigit():  # str.isdigit alone accepts "²", which int() refuses
        if len(digits) > MAX_DIGITS:
            raise RequestError(f"'{name}' has {len(digits)} digits; it takes an integer of at most {MAX_DIGITS}")
        return int(digits)
    raise RequestError(f"'{name}' must be an integer, got {_shown(value)}")


def _topk(value: Any, num_classes: int) -> int:
    topk = _int(value, "topk")
    if not 1 <= topk <= num_classes:
        raise RequestError(f"'topk' must lie between 1 and {num_classes} (the model's classes), got {_shown(topk)}")
    return topk


def parse_explanations(value: Any) -> tuple[str, ...]:
    """Explanation names from a list, a JSON list or comma-separated text; ``[]``/``none`` for none."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise RequestError(f"'explanations' is not a valid JSON list: {_shown(text)}") from None
        else:
            value = [] if text.lower() in ("", "none") else [part.strip() for part in text.split(",")]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RequestError(f"'explanations' must be a list drawn from {list(EXPLANATIONS)}, got {_shown(value)}")
    unknown = sorted(set(value) - set(EXPLANATIONS))
    if unknown:
        raise RequestError(f"unknown explanation(s) {_shown(unknown)}; choose from {list(EXPLANATIONS)} or [] for none")
    return tuple(name for name in EXPLANATIONS if name in value)


def parse_target(value: Any, num_classes: int, labels: Sequence[str]) -> int:
    """The class index a ``target`` names: an index (JSON integer or digits, as multipart
    text always is) or a label, exact or else in any case; an ambiguous label is refused."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = _int(value, "target")
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < num_classes:
            raise RequestError(
                f"'target' {_shown(value)} is not a class index: the model's classes are 0 .. {num_classes - 1}"
            )
        return value
    if not isinstance(value, str):
        raise RequestError(f"'target' must be a class index or a label, got {_shown(value)}")
    name = value.strip()
    matches = [i for i, label in enumerate(labels) if label == name]
    if not matches:
        matches = [i for i, label in enumerate(labels) if label.casefold() == name.casefold()]
    if not matches:
        raise RequestError(f"'target' {_shown(value)} is neither a class index nor one of the model's labels")
    if len(matches) > 1:
        raise RequestError(
            f"'target' {_shown(value)} names {len(matches)} classes ({', '.join(map(str, matches))}): send its index"
        )
    return matches[0]


def parse_flag(value: Any, name: str) -> bool:
    """A yes/no option: JSON ``true``/``false``, or the text ``true``/``false`` (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RequestError(f"'{name}' must be true or false, got {_shown(value)}")


def _format(value: Any) -> str:
    if value not in FORMATS:
        raise RequestError(f"'format' must be one of {list(FORMATS)}, got {_shown(value)}")
    return str(value)


def _map_size(value: Any, limits: Limits) -> int | None:
    if value == "original":
        return None
    size = _int(value, "map_size")
    if not MIN_MAP_SIZE <= size <= limits.max_map_size:
        raise RequestError(
            f"'map_size' must be \"original\" or lie between {MIN_MAP_SIZE} and {limits.max_map_size}, "
            f"got {_shown(size)}"
        )
    return size

"""Models by name, weights as state dicts, labels in the formats users have."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from handler.models import build_model, imagenet_labels, load_weights, read_labels, read_state_dict


def test_labels_in_every_supported_format(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"0": "benign", "1": "malignant"}))
    (tmp_path / "b.json").write_text(json.dumps({"1": ["n2", "malignant"], "0": ["n1", "benign"]}))
    (tmp_path / "c.json").write_text(json.dumps(["benign", "malignant"]))
    (tmp_path / "d.txt").write_text("benign\nmalignant\n\n")
    for name in ("a.json", "b.json", "c.json", "d.txt"):
        assert read_labels(tmp_path / name) == ["benign", "malignant"]
    (tmp_path / "gap.json").write_text(json.dumps({"0": "a", "2": "c"}))
    with pytest.raises(ValueError, match="without gaps"):
        read_labels(tmp_path / "gap.json")


def test_imagenet_labels_ship_offline():
    labels = imagenet_labels()
    assert len(labels) == 1000 and labels[285] == "Egyptian cat"


def test_state_dict_wrappers_are_unwrapped(tmp_path):
    model = nn.Linear(3, 2)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pth")
    assert set(read_state_dict(tmp_path / "w.pth")) == {"weight", "bias"}
    load_weights(nn.Linear(3, 2), tmp_path / "w.pth")


def test_pickled_modules_and_mismatched_weights_are_refused(tmp_path):
    torch.save(nn.Linear(3, 2), tmp_path / "module.pth")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        read_state_dict(tmp_path / "module.pth")  # weights_only=True: no arbitrary pickles
    torch.save(nn.Linear(4, 2).state_dict(), tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_weights(nn.Linear(3, 2), tmp_path / "other.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="do not fit the model"):
        load_weights(nn.Linear(3, 2), tmp_path / "foreign.pth")


def test_architectures_by_name(tmp_path):
    assert build_model("resnet18", 7).fc.out_features == 7
    assert build_model("efficientnet_lite0", 3)._fc.out_features == 3
    (tmp_path / "net.py").write_text(
        "from torch import nn\nclass Net(nn.Sequential):\n"
        "    def __init__(self, width=4):\n        super().__init__(nn.Conv2d(3, width, 3))\n"
    )
    assert (
        build_model("custom", 2, model_file=tmp_path / "net.py", model_class="Net", model_kwargs={"width": 6})[
            0
        ].out_channels
        == 6
    )
    with pytest.raises(ValueError, match="no nn.Module subclass named 'Nope'"):
        build_model("custom", 2, model_file=tmp_path / "net.py", model_class="Nope")
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg17", 10)


def test_build_mar_sets_dve_parameters_and_refuses_bad_ones():
    from handler.dve import DVEParams
    from serving.archive import BuildError, dve_params

    assert dve_params([]) == DVEParams()
    assert dve_params(["sigma_low=2", "sigma_high=1", "box_threshold=0.5", "psi=none"]) == DVEParams(
        sigma_low=2.0, sigma_high=1.0, box_threshold=0.5, psi="none"
    )
    for pairs, message in [
        (["sigma"], "KEY=VALUE"),
        (["sigma_low=two"], "not a number"),
        (["sigmaa=1"], "unknown DVE parameter"),
        (["psi=median"], "psi must be one of"),
    ]:
        with pytest.raises(BuildError, match=message):
            dve_params(pairs)


# Which torchvision classifiers answer class_conditional and target (random weights: the question is
# the architecture's head, not what it learned). It needs the model's last nn.Linear to
# read the explained layer's channels directly (handler.layers.find_classifier).
CLASS_CONDITIONAL = [
    ("mobilenet_v2", True),  # features -> pool -> Dropout, Linear(1280, 1000)
    ("mobilenet_v3_small", False),  # pool -> Linear(576, 1024), Hardswish, Dropout, Linear(1024, 1000)
    ("mobilenet_v3_large", False),  # pool -> Linear(960, 1280), Hardswish, Dropout, Linear(1280, 1000)
    ("resnet18", True),  # pool -> fc: Linear(512, 1000)
    ("efficientnet_b0", True),  # pool -> Dropout, Linear(1280, 1000)
    ("densenet121", True),  # relu, pool -> Linear(1024, 1000)
]


@pytest.mark.parametrize("architecture, supported", CLASS_CONDITIONAL)
def test_which_models_answer_class_conditional(architecture, supported, photos):
    from handler.config import ServingConfig
    from handler.explainer import Explainer
    from handler.options import ParsedRequest, RequestOptions

    torch.manual_seed(0)
    explainer = Explainer(
        build_model(architecture, 1000),
        ServingConfig(architecture=architecture),
        imagenet_labels(),
        torch.device("cpu"),
    )
    asked = ParsedRequest(photos["coffee"], RequestOptions(1, ("dve",), "png", 32, class_conditional=True))
    plain = ParsedRequest(photos["coffee"], RequestOptions(1, ("dve",), "png", 32))
    targeted = ParsedRequest(
        photos["coffee"], RequestOptions(1, ("dve",), "png", 32, class_conditional=True, target=967)
    )
    conditional, ordinary, target = explainer.run([asked, plain, targeted])
    assert ordinary.status == 200  # every one of them explains the paper's way
    if supported:
        assert conditional.status == target.status == 200, (conditional.body, target.body)
        assert conditional.body["explained_class"] == conditional.body["predictions"][0]
        assert target.body["explained_class"]["index"] == 967
    else:
        assert conditional.status == target.status == 400
        assert conditional.body["message"].startswith("class_conditional needs a linear classifier")
        assert target.body["message"].startswith("target needs a linear classifier")

"""The hooked layer: found automatically for common CNNs, and no hook outlives its use."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from handler.layers import (
    FeatureCapture,
    FeatureLayer,
    Stage,
    StageCapture,
    find_classifier,
    find_feature_layer,
    find_stages,
    resolve_feature_layer,
)
from handler.models import build_model

EXAMPLE = torch.zeros(1, 3, 224, 224)


@pytest.mark.parametrize(
    "name, expected, shape",
    [
        ("vgg16", "features.30", (512, 7, 7)),  # the paper's final pooling layer
        ("resnet18", "avgpool:input", (512, 7, 7)),  # global pooling: the map entering it
        ("mobilenet_v2", "features.18.2", (1280, 7, 7)),  # pooling done functionally
        ("densenet121", "features.norm5", (1024, 7, 7)),  # pooling modules only inside blocks
    ],
)
def test_final_pooling_layer_is_found(name, expected, shape):
    model = torchvision.models.get_model(name, weights=None).eval()
    layer, found_shape = resolve_feature_layer(model, EXAMPLE)
    assert str(layer) == expected
    assert found_shape == shape


def test_efficientnet_lite0_explains_the_map_entering_global_pooling():
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0").eval()
    assert str(find_feature_layer(model, EXAMPLE)) == "_avg_pooling:input"


def test_named_layer_overrides_detection_and_is_checked():
    model = torchvision.models.vgg16(weights=None).eval()
    layer, shape = resolve_feature_layer(model, EXAMPLE, "features.23")
    assert layer == FeatureLayer("features.23") and shape == (512, 14, 14)
    with pytest.raises(ValueError, match="no module named"):
        resolve_feature_layer(model, EXAMPLE, "features.99")
    with pytest.raises(ValueError, match="does not yield"):
        resolve_feature_layer(model, EXAMPLE, "classifier.0")
    with pytest.raises(ValueError, match="name:input"):
        FeatureLayer.parse("avgpool:inputs")


def count_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_capture_returns_the_features_and_removes_its_hook_even_on_error():
    model = torchvision.models.resnet18(weights=None).eval()
    with FeatureCapture(model, FeatureLayer("avgpool", "input")) as capture:
        model(EXAMPLE)
    assert capture.features.shape == (1, 512, 7, 7)
    assert count_hooks(model) == 0
    with pytest.raises(RuntimeError):
        with FeatureCapture(model, FeatureLayer("layer4")):
            model(torch.zeros(1, 5, 224, 224))  # wrong channel count: forward fails
    assert count_hooks(model) == 0
    find_feature_layer(model, EXAMPLE)
    assert count_hooks(model) == 0


def test_a_model_without_spatial_maps_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with pytest.raises(ValueError, match="no spatial"):
        find_feature_layer(model, torch.zeros(1, 3, 8, 8))


# Fig. 7: the stages of a model, one per spatial resolution, ending with the explained layer.
@pytest.mark.parametrize(
    "name, expected",
    [
        (  # the paper's pool1..pool5
            "vgg16",
            [
                ("features.4", (64, 112, 112)),
                ("features.9", (128, 56, 56)),
                ("features.16", (256, 28, 28)),
                ("features.23", (512, 14, 14)),
                ("features.30", (512, 7, 7)),
            ],
        ),
        (  # strided convolutions: the end of each resolution
            "resnet18",
            [
                ("relu", (64, 112, 112)),
                ("layer1", (64, 56, 56)),
                ("layer2", (128, 28, 28)),
                ("layer3", (256, 14, 14)),
                ("avgpool:input", (512, 7, 7)),
            ],
        ),
        (  # inverted residuals: the expansion at the old size belongs to the step down
            "efficientnet_lite0",
            [
                ("_blocks.0", (16, 112, 112)),
                ("_blocks.2", (24, 56, 56)),
                ("_blocks.4", (40, 28, 28)),
                ("_blocks.10", (112, 14, 14)),
                ("_avg_pooling:input", (1280, 7, 7)),
            ],
        ),
    ],
)
def test_stages_are_found_and_end_with_the_explained_layer(name, expected):
    model = build_model(name, 1000).eval()
    stages = find_stages(model, EXAMPLE)
    assert [(str(stage), stage.shape) for stage in stages] == expected
    layer, shape = resolve_feature_layer(model, EXAMPLE)
    assert stages[-1] == Stage(layer, shape)
    assert count_all_hooks(model) == 0
    with StageCapture(model, stages) as capture:
        model(torch.zeros(2, 3, 224, 224))
    assert [tuple(f.shape) for f in capture.features] == [(2, *stage.shape) for stage in stages]
    assert count_all_hooks(model) == 0


def test_stages_stop_at_a_named_explained_layer():
    model = torchvision.models.vgg16(weights=None).eval()
    stages = find_stages(model, EXAMPLE, FeatureLayer("features.23"))
    assert [str(stage) for stage in stages] == ["features.4", "features.9", "features.16", "features.23"]
    resnet = torchvision.models.resnet18(weights=None).eval()
    stages = find_stages(resnet, EXAMPLE, FeatureLayer("layer4", "input"))  # entering layer4: 14 x 14
    assert [(str(s), s.shape) for s in stages][-2:] == [("layer2", (128, 28, 28)), ("layer4:input", (256, 14, 14))]


class SharedPoolNet(nn.Module):
    """A user's net in the style of PyTorch's tutorial: one pooling module used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.pool, self.conv2, self.conv3 = (
            nn.Conv2d(3, 6, 5),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.Conv2d(16, 8, 3),
        )
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv3(x)), 1).flatten(1))


def test_a_module_that_runs_twice_is_captured_at_the_right_call():
    torch.manual_seed(0)
    model = SharedPoolNet().eval()
    x = torch.randn(2, 3, 64, 64)
    stages = find_stages(model, x[:1])
    assert [(str(s), s.shape, s.call) for s in stages] == [
        ("pool#1", (6, 30, 30), 0),
        ("pool", (16, 13, 13), None),
        ("conv3", (8, 11, 11), None),
    ]
    with torch.inference_mode(), StageCapture(model, stages) as capture:
        model(x)
        first_pool = model.pool(torch.relu(model.conv1(x)))
        second_pool = model.pool(torch.relu(model.conv2(first_pool)))
    assert torch.equal(capture.features[0], first_pool)  # not the last call's output
    assert torch.equal(capture.features[1], second_pool)


def test_a_resolution_seen_only_inside_a_step_down_still_has_its_stage():
    """Sequential(conv, relu, pool, conv, relu): the full-resolution maps live inside the
    one container that shrinks the map, and are still the end of their resolution."""
    model = nn.Sequential(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        ),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()
    stages = find_stages(model, torch.zeros(1, 3, 32, 32))
    assert [(str(s), s.shape) for s in stages] == [("0.1", (4, 32, 32)), ("1:input", (4, 16, 16))]


def test_stage_capture_removes_its_hooks_even_when_the_forward_pass_fails():
    model = torchvision.models.resnet18(weights=None).eval()
    stages = find_stages(model, EXAMPLE)
    with pytest.raises(RuntimeError):
        with StageCapture(model, stages):
            model(torch.zeros(1, 5, 224, 224))
    assert count_all_hooks(model) == 0
    with pytest.raises(ValueError, match="no module"):
        StageCapture(model, [Stage(FeatureLayer("layer9"), (1, 2, 2))])
    assert count_all_hooks(model) == 0


def count_all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name, expected", [("resnet18", "fc"), ("efficientnet_lite0", "_fc"), ("vgg16", None)])
def test_the_classifier_is_found_only_where_it_reads_the_explained_channels(name, expected):
    model = build_model(name, 1000).eval()
    layer, shape = resolve_feature_layer(model, torch.zeros(1, 3, 224, 224))
    found = find_classifier(model, shape[0], 1000)
    names = {module: module_name for module_name, module in model.named_modules()}
    assert (names[found] if found is not None else None) == expected
    assert find_classifier(model, shape[0], 10) is None  # a head for other classes is not it

"""The hooked layer: found automatically for common CNNs, and no hook outlives its use."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from handler.layers import FeatureCapture, FeatureLayer, find_feature_layer, resolve_feature_layer

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

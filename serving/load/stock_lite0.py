"""EfficientNet-Lite0 in the form TorchServe's stock handlers load an eager model.

The stock ``image_classifier`` handler imports the archive's model file, instantiates
its only class without arguments and loads the state dict into it. The load test serves
the same weights this way, as the floor our handler is compared against.
"""

from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import get_model_params


class EfficientNetLite0(EfficientNet):
    def __init__(self) -> None:
        blocks_args, global_params = get_model_params("efficientnet-lite0", {"num_classes": 1000})
        super().__init__(blocks_args, global_params)

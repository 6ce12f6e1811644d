"""What ``make evaluate`` (``scripts/evaluate.py``) computes and writes.

How faithful DVE and targeted DVE are, next to Grad-CAM and two baselines.

On EfficientNet-Lite0 with its real ImageNet weights, through the handler's own forward
hook and DVE code (``evaluation/saliency.py``, the measures in ``evaluation/metrics.py``), it measures for every method:

* deletion and insertion AUC (RISE) on every real photo scikit-image and scikit-learn
  ship, for the class the model predicts, as RISE defines them (the area under the
  class's probability). ``results.json`` also keeps each area divided by the photo's
  own probability;
* the pointing game and the energy-based pointing game on a localisation set built
  with a fixed seed: real objects cut from those photos, pasted on real textures at
  known boxes, kept only where the model gives the composite the object's class. The
  pointing game is also reported on the composites whose box leaves out the image's
  centre, where a centre prior cannot hit;
* the milliseconds each method adds per image (DVE: after the forward pass the
  prediction needs anyway; Grad-CAM: its own forward and backward pass).

Methods: DVE and targeted DVE at the handler's defaults; a sweep of sigma_low x
sigma_high; the psi modes, the input-resolution mode and the class-conditional variant
around the defaults; Grad-CAM on the same layer; a random map; a centred Gaussian.
Writes ``report.md`` (tables: mean and standard deviation over images, paired
comparisons, the parameter sets ranked), ``results.json`` (every number per image) and
``overlays.png``.
8-9 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from evaluation import metrics
from evaluation.localisation import Composite, build_localisation_set
from evaluation.saliency import (
    Batch,
    CentredGaussian,
    DVEMap,
    ExplanationCache,
    GradCAMMap,
    RandomMap,
    SaliencyMethod,
    forward_batch,
    model_crop,
    overlay_tile,
)
from handler import dve
from handler.dve import DVEParams

SIGMAS_LOW = (1.0, 2.0, 3.0, 4.0)
SIGMAS_HIGH = (0.5, 1.0, 2.0)
QUANTILE = 0.75  # the psi "quantile" variant keeps the top quarter
BASELINES = ("random", "centred gaussian")
BOX_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)  # fractions of the targeted map's maximum
METRICS = ("deletion", "insertion", "pointing", "pointing_off_centre", "energy")
BETTER = {"deletion": -1, "insertion": 1, "pointing": 1, "pointing_off_centre": 1, "energy": 1}  # sign of "better"


def label(params: DVEParams, kind: str = "dve") -> str:
    """A method's name: its kind and every DVE parameter that differs from nothing."""
    psi = f"q{params.psi_quantile:g}" if params.psi == "quantile" else params.psi
    return f"{kind} s1={params.sigma_low:g} s2={params.sigma_high:g} psi={psi} res={params.resolution}"


def build_methods(defaults: DVEParams, quick: bool = False) -> list[SaliencyMethod]:
    """Every method the report compares, the handler's defaults first."""
    configs = [defaults]
    if not quick:
        configs += [replace(defaults, sigma_low=s1, sigma_high=s2) for s1 in SIGMAS_LOW for s2 in SIGMAS_HIGH]
        configs += [replace(defaults, psi="none"), replace(defaults, psi="quantile", psi_quantile=QUANTILE)]
        configs += [replace(defaults, resolution="input")]
    unique = list(dict.fromkeys(configs))
    cache = ExplanationCache()  # DVE and targeted DVE of one setting: one dve.explain call
    methods: list[SaliencyMethod] = []
    for params in unique:
        methods += [
            DVEMap(label(params, "dve"), params, cache=cache),
            DVEMap(label(params, "targeted"), params, targeted=True, cache=cache),
        ]
    methods += [
        DVEMap(label(defaults, "dve-class"), defaults, class_conditional=True, cache=cache),
        DVEMap(label(defaults, "targeted-class"), defaults, targeted=True, class_conditional=True, cache=cache),
        GradCAMMap(),
        RandomMap(),
        CentredGaussian(),
    ]
    return methods


class Progress:
    """One line per step with the elapsed time and an estimate of what is left."""

    def __init__(self, total_units: float) -> None:
        self.start = time.perf_counter()
        self.total = total_units
        self.done = 0.0

    def step(self, units: float, message: str) -> None:
        self.done += units
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        print(
            f"[{100 * self.done / self.total:3.0f}% {_clock(elapsed)}, ~{_clock(left)} left] {message}",
            file=sys.stderr,
            flush=True,
        )


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


@dataclass
class MethodResults:
    """Per-image figures of one method."""

    name: str
    deletion: list[float] = field(default_factory=list)
    insertion: list[float] = field(default_factory=list)
    deletion_relative: list[float] = field(default_factory=list)
    insertion_relative: list[float] = field(default_factory=list)
    pointing: list[float] = field(default_factory=list)
    pointing_off_centre: list[float] = field(default_factory=list)
    energy: list[float] = field(default_factory=list)
    ms_per_image: float = 0.0


def timed_maps(method: SaliencyMethod, explainer, batch: Batch, warm_up: Batch) -> tuple[torch.Tensor, float]:
    """The method's maps for a batch and the milliseconds per image they took.

    The method first runs once on ``warm_up`` (one image), and is then timed on its own:
    targeted DVE is not allowed to reuse the explanation DVE just computed.
    """
    method.maps(explainer, warm_up)
    method.forget()
    start = time.perf_counter()
    maps = method.maps(explainer, batch)
    return maps, (time.perf_counter() - start) * 1000.0 / batch.pixels.shape[0]


def evaluate(
    explainer, photos: dict[str, np.ndarray], methods: list[SaliencyMethod], steps: int, per_object: int, seed: int = 0
):
    """Runs every measure for every method; returns the results, the names and the examples to draw."""
    results = {m.name: MethodResults(m.name) for m in methods}
    scorer = metrics.Scorer(explainer)
    # Units of progress: one photo's deletion and insertion for one method (about half a
    # second on 2 cores); the other stages weigh what they took in a full run.
    maps_units, set_units, composite_units = 4 * len(methods), len(methods) / 2, 4 * len(methods)
    progress = Progress(total_units=len(photos) * len(methods) + maps_units + set_units + composite_units)

    batch = forward_batch(explainer, torch.stack([model_crop(explainer, a) for a in photos.values()]))
    start = time.perf_counter()
    forward_batch(explainer, batch.pixels)
    forward_ms = (time.perf_counter() - start) * 1000.0 / len(photos)
    warm_up = Batch(batch.pixels[:1], batch.x[:1], batch.features[:1], batch.probabilities[:1], batch.classes[:1])
    photo_maps = {}
    for method in methods:
        photo_maps[method.name], results[method.name].ms_per_image = timed_maps(method, explainer, batch, warm_up)
    progress.step(maps_units, f"maps of {len(methods)} methods for {len(photos)} photos")

    predictions = {}
    for i, name in enumerate(photos):
        target = int(batch.classes[i])
        substrates = metrics.Substrates.of(scorer, batch.x[i], target)
        predictions[name] = {"label": explainer.labels[target], "probability": substrates.p_full}
        for method in methods:
            curves = metrics.deletion_insertion(
                scorer, substrates, photo_maps[method.name][i], target, steps, seed=seed + i
            )
            r = results[method.name]
            r.deletion.append(curves.deletion_auc)
            r.insertion.append(curves.insertion_auc)
            r.deletion_relative.append(curves.deletion_auc / substrates.p_full)
            r.insertion_relative.append(curves.insertion_auc / substrates.p_full)
            progress.step(
                1, f"deletion/insertion: photo {i + 1}/{len(photos)} {name} ({explainer.labels[target]}), {method.name}"
            )

    composites, made = build_localisation_set(explainer, per_object=per_object, seed=seed)
    progress.step(set_units, f"localisation set: {len(composites)} of {made} composites kept")
    chunks = [composites[i : i + 16] for i in range(0, len(composites), 16)]
    parts: dict[str, list[torch.Tensor]] = {m.name: [] for m in methods}
    for n, chunk in enumerate(chunks):
        chunk_batch = forward_batch(explainer, torch.stack([c.pixels for c in chunk]))
        for method in methods:
            parts[method.name].append(method.maps(explainer, chunk_batch))
        progress.step(
            composite_units / max(1, len(chunks)),
            f"localisation set maps: {sum(map(len, chunks[: n + 1]))}/{len(composites)} composites",
        )
    composite_maps = {
        name: torch.cat(maps) if maps else torch.zeros(0, *explainer.input_size) for name, maps in parts.items()
    }
    for method in methods:
        for composite, saliency in zip(composites, composite_maps[method.name]):
            hit = float(metrics.pointing_hit(saliency, composite.box))
            results[method.name].pointing.append(hit)
            if composite.off_centre:
                results[method.name].pointing_off_centre.append(hit)
            results[method.name].energy.append(metrics.energy_in_box(saliency, composite.box))
    box_ious = targeted_box_ious(composite_maps[methods[1].name], composites)
    examples = {"photos": (batch.pixels, photo_maps, list(photos)), "composites": (composites, composite_maps)}
    return results, predictions, composites, made, forward_ms, examples, box_ious


def targeted_box_ious(maps: torch.Tensor, composites: list[Composite]) -> dict[float, list[float]]:
    """IoU of the handler's salient box (``dve.salient_boxes``) with each object's box, per threshold."""
    ious: dict[float, list[float]] = {}
    for threshold in BOX_THRESHOLDS:
        boxes, valid = dve.salient_boxes(maps, threshold) if len(composites) else (torch.zeros(0, 4), torch.zeros(0))
        ious[threshold] = [
            metrics.box_iou(tuple(box), c.box) if ok else 0.0
            for box, ok, c in zip(boxes.tolist(), valid.tolist(), composites)
        ]
    return ious


def summary(values: list[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; NaN for no values."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values)


def paired_t(gains: list[float]) -> float:
    """The paired t statistic of per-image differences; NaN under 2 images, +-inf without variance."""
    if len(gains) < 2:
        return float("nan")
    mean, std = statistics.fmean(gains), statistics.stdev(gains)
    if std == 0:
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / (std / math.sqrt(len(gains)))


def compare(a: MethodResults, b: MethodResults, metric: str) -> dict[str, float]:
    """Paired comparison of two methods on one metric over the same images.

    ``gain`` is the mean difference in the metric's "better" direction; ``t`` the
    paired t statistic (gain over its standard error); ``spread`` the larger of the two
    methods' standard deviations over images; ``wins`` how many images ``a`` does
    strictly better on.
    """
    x, y = getattr(a, metric), getattr(b, metric)
    sign = BETTER[metric]
    gains = [sign * (p - q) for p, q in zip(x, y)]
    gain = summary(gains)[0]
    return {
        "gain": gain,
        "t": paired_t(gains),
        "spread": max(summary(x)[1], summary(y)[1]),
        "wins": sum(g > 0 for g in gains),
        "n": len(gains),
    }


def _cell(values: list[float], percent: bool = False) -> str:
    mean, std = summary(values)
    if math.isnan(mean):
        return "-"
    if percent:
        return f"{100 * mean:.0f}% ± {100 * std:.0f}"
    return f"{mean:.3f} ± {std:.3f}"


def rank_settings(results: dict[str, MethodResults], methods: list[SaliencyMethod]) -> list[tuple[str, float]]:
    """DVE settings ranked by the mean of their ranks on every metric, DVE and targeted DVE both.

    One setting governs both maps the handler returns, so each setting is ranked on the
    10 figures (2 maps x 5 metrics) by their means; 1 is best. Ties share the lower rank.
    """
    settings: dict[str, list[str]] = {}
    for method in methods:
        if isinstance(method, DVEMap):
            kind, _, rest = method.name.partition(" ")
            variant = "class-conditional " if method.class_conditional else ""
            settings.setdefault(variant + rest, []).append(method.name)
    ranks: dict[str, list[int]] = {setting: [] for setting in settings}
    for position in (0, 1):  # DVE, then targeted DVE
        for metric in METRICS:
            means = {
                setting: BETTER[metric] * summary(getattr(results[names[position]], metric))[0]
                for setting, names in settings.items()
            }
            for setting, value in means.items():
                ranks[setting].append(1 + sum(other > value for other in means.values()))
    return sorted(((setting, statistics.fmean(r)) for setting, r in ranks.items()), key=lambda item: item[1])


def write_report(
    out: Path, args, explainer, results, predictions, composites, made, forward_ms, methods, box_ious, elapsed
) -> str:
    """The Markdown report, also returned."""
    default_dve, default_targeted = methods[0].name, methods[1].name
    off_centre = sum(c.off_centre for c in composites)
    lines = [
        "# Faithfulness of DVE: evaluation report",
        "",
        f"Generated by `make evaluate` (`scripts/evaluate.py --steps {args.steps} --per-object {args.per_object}`) in "
        f"{_clock(elapsed)} on {torch.get_num_threads()} CPU threads, torch {torch.__version__}. "
        "Model: EfficientNet-Lite0, real "
        f"ImageNet weights, explained layer `{explainer.layer}` {tuple(explainer.feature_shape)}.",
        "",
        f"- Deletion / insertion (RISE): {len(predictions)} photos, {args.steps} steps, "
        "area under the probability of the "
        "class predicted for the photo (deletion: lower is better; insertion: higher is better).",
        f"- Pointing game / energy: {len(composites)} composites kept of {made} made (seed {args.seed}); a hit is the "
        f"map's maximum inside the object's box. `off-centre`: the {off_centre} composites whose box leaves out the "
        "image's centre.",
        f"- Cost: milliseconds a method adds per image, measured on the {len(predictions)} photos in one batch; "
        f"the forward pass alone takes {forward_ms:.1f} ms per image here. "
        "DVE's figure comes after the forward pass the "
        "prediction needs anyway; Grad-CAM's includes its own forward and backward pass.",
        "- Cells are mean ± standard deviation over images.",
        "",
        "## All methods",
        "",
        "| method | deletion ↓ | insertion ↑ | pointing ↑ | off-centre ↑ | energy ↑ | ms / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {_cell(r.deletion)} | {_cell(r.insertion)} | {_cell(r.pointing, percent=True)} | "
            f"{_cell(r.pointing_off_centre, percent=True)} | {_cell(r.energy)} | {r.ms_per_image:.2f} |"
        )
    lines += [
        "",
        "## DVE settings ranked",
        "",
        "Mean rank of each setting over its 10 figures (DVE and targeted DVE, 5 metrics each, by their means); "
        "1 is best.",
        "",
        "| setting | mean rank |",
        "|---|---|",
    ]
    lines += [f"| {setting} | {rank:.1f} |" for setting, rank in rank_settings(results, methods)]
    lines += [
        "",
        "## The targeted salient box",
        "",
        f"IoU of the box around the targeted map's pixels at or above a fraction of its maximum ({methods[1].name}) "
        f"with the object's box, on the {len(composites)} composites. The handler uses `box_threshold` "
        f"{explainer.config.dve.box_threshold:g}.",
        "",
        "| box_threshold | IoU ↑ |",
        "|---|---|",
    ]
    lines += [f"| {threshold:g} | {_cell(values)} |" for threshold, values in box_ious.items()]
    lines += [
        "",
        "## Paired comparisons at the defaults",
        "",
        "`gain`: mean per-image difference in the better direction; `t`: paired t statistic (gain over its standard "
        "error; beyond about 2 the difference is unlikely to be chance); `spread`: the larger standard deviation over "
        "images of the two methods; `wins`: images where the first method is strictly better.",
        "",
        "| method | against | metric | gain | t | spread | gain > spread | wins |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in (default_dve, default_targeted):
        for other in (*BASELINES, "grad-cam"):
            for metric in METRICS:
                c = compare(results[name], results[other], metric)
                lines.append(
                    f"| {name.split(' ')[0]} | {other} | {metric.replace('_', '-')} | "
                    f"{c['gain']:+.3f} | {c['t']:+.1f} | "
                    f"{c['spread']:.3f} | {'yes' if c['gain'] > c['spread'] else 'no'} | {c['wins']}/{c['n']} |"
                )
    lines += [
        "",
        "## Predictions explained (deletion / insertion set)",
        "",
        "| photo | top-1 | probability |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {p['label']} | {p['probability']:.3f} |" for name, p in predictions.items()]
    lines += ["", "## Examples", "", "![overlays](overlays.png)", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def write_overlays(out: Path, explainer, examples, methods: list[SaliencyMethod], count: int = 4) -> None:
    """A grid: a few photos and composites, each with the defaults' maps, Grad-CAM and the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    shown = [methods[0].name, methods[1].name, *[m.name for m in methods[-5:]]]
    pixels, photo_maps, names = examples["photos"]
    composites, composite_maps = examples["composites"]
    rows = [(names[i], pixels[i], {n: photo_maps[n][i] for n in shown}, None) for i in range(min(count, len(names)))]
    step = max(1, len(composites) // count)
    rows += [
        (c.name, c.pixels, {n: composite_maps[n][j] for n in shown}, c.box)
        for j, c in list(enumerate(composites))[::step][:count]
    ]
    fig, axes = plt.subplots(
        len(rows), len(shown) + 1, figsize=(1.9 * (len(shown) + 1), 2.0 * len(rows)), squeeze=False
    )
    for r, (name, image, maps, box) in enumerate(rows):
        tiles = [("image", image.cpu().numpy())] + [(n, overlay_tile(image, maps[n])) for n in shown]
        for c, (title, tile) in enumerate(tiles):
            ax = axes[r][c]
            ax.imshow(tile)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(title.split(" s1=")[0] + ("\n(defaults)" if " s1=" in title else ""), fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
            if box is not None:
                x0, y0, x1, y1 = box
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.2))
    fig.tight_layout()
    fig.savefig(out / "overlays.png", dpi=80)
    plt.close(fig)


def write_results(out: Path, steps: int, explainer, predictions, composites, results, box_ious) -> None:
    """``results.json``: every number per image."""
    payload = {
        "steps": steps,
        "photos": predictions,
        "composites": [{"name": c.name, "box": list(c.box), "label": explainer.labels[c.label]} for c in composites],
        "methods": {name: vars(r) for name, r in results.items()},
        "targeted_box_iou": {str(threshold): values for threshold, values in box_ious.items()},
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1))


def clock(seconds: float) -> str:
    """Minutes and seconds, as the progress lines and the report write them."""
    return _clock(seconds)

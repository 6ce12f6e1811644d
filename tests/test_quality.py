"""The faithfulness measures behind ``make evaluate``, on cases whose answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluation import localisation, metrics, saliency
from evaluation import report as evaluate
from evaluation.photos import OBJECTS
from tests.conftest import cli


class RegionScorer:
    """A judge that is sure in proportion to how much of the top-left 4 x 4 block is intact (value 1)."""

    def probability(self, x: torch.Tensor, target: int) -> torch.Tensor:
        return x[:, 0, :4, :4].mean(dim=(1, 2)).clamp(0, 1)


def region_image() -> torch.Tensor:
    x = torch.zeros(3, 8, 8)
    x[:, :4, :4] = 1.0
    return x


def region_map(inverted: bool = False) -> torch.Tensor:
    saliency = torch.zeros(8, 8)
    saliency[:4, :4] = 1.0
    return 1.0 - saliency if inverted else saliency


def test_auc_is_the_trapezoid_area_over_the_unit_interval():
    assert metrics.auc(np.array([1.0, 1.0])) == 1.0
    assert metrics.auc(np.array([1.0, 0.0, 0.0])) == pytest.approx(0.25)
    assert metrics.auc(np.array([0.0, 0.5, 1.0])) == pytest.approx(0.5)


def test_deletion_of_the_true_evidence_first_drops_the_score_at_once():
    scorer = RegionScorer()
    substrates = metrics.Substrates.of(scorer, region_image(), 0)
    good = metrics.deletion_insertion(scorer, substrates, region_map(), 0, steps=4)
    bad = metrics.deletion_insertion(scorer, substrates, region_map(inverted=True), 0, steps=4)
    # 64 pixels, 16 per step: the right map removes the whole block in the first step.
    np.testing.assert_allclose(good.deletion, [1, 0, 0, 0, 0])
    np.testing.assert_allclose(bad.deletion, [1, 1, 1, 1, 0])
    assert good.deletion_auc == pytest.approx(0.125) and bad.deletion_auc == pytest.approx(0.875)
    # Insertion puts the block back first for the right map: full score after one step.
    np.testing.assert_allclose(good.insertion[1:], [1, 1, 1, 1])
    assert good.insertion_auc > bad.insertion_auc


def test_insertion_starts_from_the_blurred_image():
    scorer = RegionScorer()
    substrates = metrics.Substrates.of(scorer, region_image(), 0)
    assert 0 < substrates.p_start < 1  # the blur smears the block: partly there
    assert substrates.p_removed == 0 and substrates.p_full == 1


def test_ties_are_ordered_at_random_but_reproducibly():
    saliency = torch.zeros(6, 6)
    saliency[2, 3] = 1.0
    saliency[0, 0] = 0.5
    rank = metrics.saliency_order(saliency, seed=3)
    assert sorted(rank.flatten().tolist()) == list(range(36))
    assert rank[2, 3] == 0 and rank[0, 0] == 1
    assert torch.equal(rank, metrics.saliency_order(saliency, seed=3))
    assert not torch.equal(rank, metrics.saliency_order(saliency, seed=4))


def test_pointing_game_and_energy():
    saliency = torch.zeros(10, 10)
    saliency[6, 2] = 3.0  # the peak: x = 2, y = 6
    saliency[0, 0] = 1.0
    assert metrics.pointing_hit(saliency, (0, 5, 4, 10))
    assert not metrics.pointing_hit(saliency, (3, 5, 10, 10))  # exclusive x0 bound misses x = 2
    assert metrics.energy_in_box(saliency, (0, 5, 4, 10)) == pytest.approx(0.75)
    assert metrics.energy_in_box(torch.zeros(4, 4), (0, 0, 2, 2)) == 0.0


def test_localisation_set_is_reproducible_and_classified_as_its_object(lite0_explainer):
    kept, made = localisation.build_localisation_set(lite0_explainer, per_object=3, seed=5)
    again, _ = localisation.build_localisation_set(lite0_explainer, per_object=3, seed=5)
    assert made == 3 * len(OBJECTS) and 0 < len(kept) <= made
    assert [(c.name, c.box) for c in kept] == [(c.name, c.box) for c in again]
    batch = saliency.forward_batch(lite0_explainer, torch.stack([c.pixels for c in kept]))
    assert batch.classes.tolist() == [c.label for c in kept]
    for composite in kept:
        x0, y0, x1, y1 = composite.box
        assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
        assert composite.pixels.shape == (224, 224, 3)


def test_methods_give_one_map_in_the_unit_range_per_image(lite0_explainer, photos):
    crops = torch.stack([lite0_explainer.prepare(_request(photos[name])).pixels for name in ("chelsea", "coffee")])
    batch = saliency.forward_batch(lite0_explainer, crops)
    for method in evaluate.build_methods(lite0_explainer.config.dve, quick=True):
        maps = method.maps(lite0_explainer, batch)
        assert maps.shape == (2, 224, 224), method.name
        assert maps.min() >= 0 and maps.max() <= 1 and maps.max() > 0, method.name


def test_evaluate_writes_a_report_with_every_method(tmp_path, capsys):
    out = tmp_path / "evaluation"
    assert (
        cli(
            "scripts/evaluate.py",
            "--quick",
            "--photos",
            "chelsea",
            "coffee",
            "--per-object",
            "2",
            "--steps",
            "4",
            "--out",
            out,
        )
        == 0
    )
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    names = list(results["methods"])
    assert names[:2] == [evaluate.label(lite0_defaults(), "dve"), evaluate.label(lite0_defaults(), "targeted")]
    assert {"grad-cam", "random", "centred gaussian"} <= set(names)
    for name in names:
        assert f"| {name} |" in report
        figures = results["methods"][name]
        assert len(figures["deletion"]) == 2 and len(figures["pointing"]) == len(results["composites"])
    assert (out / "overlays.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## DVE settings ranked" in report and "## The targeted salient box" in report
    ious = results["targeted_box_iou"]
    assert [float(t) for t in ious] == list(evaluate.BOX_THRESHOLDS)
    assert all(len(v) == len(results["composites"]) and all(0 <= x <= 1 for x in v) for v in ious.values())
    assert "Faithfulness of DVE" in capsys.readouterr().out


def test_settings_are_ranked_on_both_maps_and_every_metric():
    from handler.dve import DVEParams

    good, poor = DVEParams(sigma_low=1.0), DVEParams(sigma_low=3.0)
    methods = [
        saliency.DVEMap(evaluate.label(p, kind), p, targeted=kind == "targeted")
        for p in (good, poor)
        for kind in ("dve", "targeted")
    ]
    results = {}
    for method in methods:
        better = method.params == good
        results[method.name] = evaluate.MethodResults(
            method.name,
            deletion=[0.1 if better else 0.2],
            insertion=[0.5 if better else 0.4],
            pointing=[1.0 if better else 0.0],
            pointing_off_centre=[1.0 if better else 0.0],
            energy=[0.9 if better else 0.5],
        )
    ranked = evaluate.rank_settings(results, methods)
    assert ranked == [
        (evaluate.label(good, "dve").partition(" ")[2], 1.0),
        (evaluate.label(poor, "dve").partition(" ")[2], 2.0),
    ]


def test_paired_t_and_box_iou():
    assert evaluate.paired_t([1.0]) != evaluate.paired_t([1.0])  # NaN below two images
    assert evaluate.paired_t([0.1, 0.1]) == float("inf") and evaluate.paired_t([0.0, 0.0]) == 0.0
    assert evaluate.paired_t([1.0, 3.0]) == pytest.approx(2.0)  # mean 2 over standard error 1
    assert metrics.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert metrics.box_iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0


def lite0_defaults():
    from handler.dve import DVEParams

    return DVEParams()


def _request(image: bytes):
    from handler.options import ParsedRequest, RequestOptions

    return ParsedRequest(image, RequestOptions(1, (), "png", None))


def test_dve_and_targeted_dve_share_one_explanation_only_through_the_cache_they_are_given(
    lite0_explainer, photos, monkeypatch
):
    crops = torch.stack([lite0_explainer.prepare(_request(photos["chelsea"])).pixels])
    batch = saliency.forward_batch(lite0_explainer, crops)
    params = lite0_explainer.config.dve
    calls = []
    explain = saliency.dve.explain
    monkeypatch.setattr(saliency.dve, "explain", lambda *args: calls.append(1) or explain(*args))
    shared = saliency.ExplanationCache()
    dve, targeted = (
        saliency.DVEMap("dve", params, cache=shared),
        saliency.DVEMap("targeted", params, targeted=True, cache=shared),
    )
    first = (dve.maps(lite0_explainer, batch), targeted.maps(lite0_explainer, batch))
    assert len(calls) == 1  # one dve.explain call for both maps, as in the handler
    alone = saliency.DVEMap("dve", params), saliency.DVEMap("targeted", params, targeted=True)
    assert (
        all(torch.equal(m.maps(lite0_explainer, batch), f) for m, f in zip(alone, first)) and len(calls) == 3
    )  # no state shared
    targeted.forget()
    dve.maps(lite0_explainer, batch)
    assert len(calls) == 4  # forgotten by both: their cache is one object

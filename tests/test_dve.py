"""DVE math against a slow, obviously-correct numpy reference written from the formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from handler import dve
from handler.dve import DVEParams, explain


def reference_gaussian(h: int, w: int, sigma: float) -> np.ndarray:
    """G_s(u, v) on the integer frequency grid in FFT order, one entry at a time."""
    g = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            u = i if i <= h // 2 else i - h  # FFT order: 0, 1, ..., -2, -1 (sign moot: squared)
            v = j if j <= w // 2 else j - w
            g[i, j] = np.exp(-(u * u + v * v) / (2 * sigma * sigma))
    return g


def reference_band_product(x: np.ndarray, s1: float, s2: float) -> np.ndarray:
    """Re F^-1(F(x) G_s1) * Re F^-1(F(x) (1 - G_s2)) with the full complex FFT."""
    h, w = x.shape
    spectrum = np.fft.fft2(x)
    low = np.real(np.fft.ifft2(spectrum * reference_gaussian(h, w, s1)))
    high = np.real(np.fft.ifft2(spectrum * (1 - reference_gaussian(h, w, s2))))
    return low * high


def reference_psi(s: np.ndarray, mode: str, q: float) -> np.ndarray:
    if mode == "none":
        return s
    tau = s.mean() if mode == "mean" else np.quantile(s, q)
    return np.where(s >= tau, s, 0.0)


def reference_dve(features: np.ndarray, p: DVEParams, weights: np.ndarray | None = None) -> np.ndarray:
    """Algorithm 1, one image and one feature map at a time (``weights``: B x C, class-conditional)."""
    maps = []
    for b, image in enumerate(features):
        s = np.zeros(image.shape[1:])
        for i, channel in enumerate(image):
            weight = 1.0 if weights is None else weights[b, i]
            s += weight * reference_band_product(channel, p.sigma_low, p.sigma_high)
        maps.append(reference_psi(s, p.psi, p.psi_quantile))
    return np.stack(maps)


def reference_targeted(dve_maps: np.ndarray, p: DVEParams) -> np.ndarray:
    return np.stack(
        [reference_psi(reference_band_product(s, p.sigma_low, p.sigma_high), p.psi, p.psi_quantile) for s in dve_maps]
    )


def random_features(b=3, c=16, h=7, w=7, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Post-ReLU-like activations: non-negative, with some spatial structure.
    return torch.relu(torch.randn(b, c, h, w, generator=generator, dtype=torch.float64)).float()


# The defaults (sigma 1 / 0.5), the first defaults (sigma 2 / 1) and two other corners.
PARAMS = [
    DVEParams(),
    DVEParams(sigma_low=2.0, sigma_high=1.0),
    DVEParams(sigma_low=3.0, sigma_high=1.5, psi="quantile", psi_quantile=0.7),
    DVEParams(sigma_low=2.0, sigma_high=2.0, psi="none"),
]


def test_the_parameter_settings_differ_and_include_the_old_defaults():
    assert len(set(PARAMS)) == len(PARAMS)
    assert (PARAMS[1].sigma_low, PARAMS[1].sigma_high) == (2.0, 1.0) != (DVEParams().sigma_low, DVEParams().sigma_high)


@pytest.mark.parametrize("shape", [(7, 7), (8, 6), (13, 13), (6, 9)])
def test_gaussian_transfer_matches_formula(shape):
    h, w = shape
    np.testing.assert_allclose(dve.gaussian_transfer(h, w, 1.7).numpy(), reference_gaussian(h, w, 1.7), rtol=1e-6)


@pytest.mark.parametrize("method", ["fft", "matrix"])
@pytest.mark.parametrize("shape", [(7, 7), (6, 8), (13, 13)])
def test_both_filter_methods_match_reference(method, shape):
    x = random_features(b=2, c=3, h=shape[0], w=shape[1])
    expected = np.stack([[reference_band_product(m, 2.0, 1.0) for m in image] for image in x.double().numpy()])
    got = dve.band_product(x, 2.0, 1.0, method=method).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_large_maps_take_the_fft_path_and_match_reference():
    x = random_features(b=1, c=2, h=40, w=36)  # 1440 pixels > MATRIX_MAX_PIXELS
    expected = np.stack([[reference_band_product(m, 3.0, 1.5) for m in image] for image in x.double().numpy()])
    got = dve.band_product(x, 3.0, 1.5).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("params", PARAMS, ids=str)
@pytest.mark.parametrize("shape", [(7, 7), (6, 8)])
def test_dve_matches_reference(params, shape):
    features = random_features(h=shape[0], w=shape[1])
    expected = reference_dve(features.double().numpy(), params)
    got = dve.dve(features, params).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("params", PARAMS, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_channels_last_feature_maps_give_the_reference_maps(params, weighted):
    """EfficientNet's hooked maps arrive channels-last; they take another (copy-free) path."""
    features = random_features(b=2, c=16, h=7, w=6)
    weights = torch.randn(2, 16, generator=torch.Generator().manual_seed(2)) if weighted else None
    channels_last = features.contiguous(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous() and channels_last.permute(0, 2, 3, 1).is_contiguous()
    expected = reference_dve(features.double().numpy(), params, None if weights is None else weights.double().numpy())
    got = dve.dve(channels_last, params, channel_weights=weights).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("params", PARAMS, ids=str)
def test_targeted_dve_matches_reference(params):
    raw = dve.dve(random_features(), params)
    expected = reference_targeted(raw.double().numpy(), params)
    got = dve.targeted_dve(raw, params).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("params", PARAMS, ids=str)
def test_class_conditional_dve_weights_each_feature_map(params):
    features = random_features(b=2, c=16)
    weights = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    expected = reference_dve(features.double().numpy(), params, weights.double().numpy())
    got = dve.dve(features, params, channel_weights=weights).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    with pytest.raises(ValueError, match="B x C"):
        dve.dve(features, params, channel_weights=weights[:, :8])


def test_input_resolution_mode_upsamples_before_filtering():
    features = random_features(b=2, c=4)
    params = DVEParams(resolution="input")
    up = torch.nn.functional.interpolate(features, size=(32, 32), mode="bilinear", align_corners=False)
    expected = reference_dve(up.double().numpy(), params)
    got = dve.dve(features, params, input_size=(32, 32))
    assert got.shape == (2, 32, 32)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_batch_gives_the_same_maps_as_each_image_alone():
    features = random_features(b=5, c=32)
    batch = dve.explain(features, DVEParams(), (224, 224))
    for i in range(5):
        alone = dve.explain(features[i : i + 1], DVEParams(), (224, 224))
        torch.testing.assert_close(batch.dve[i], alone.dve[0])
        torch.testing.assert_close(batch.targeted[i], alone.targeted[0])
        assert batch.boxes[i].tolist() == alone.boxes[0].tolist()


def test_psi_keeps_values_at_or_above_the_mean_and_zeroes_the_rest():
    s = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])  # mean 3
    assert dve.noise_filter(s, DVEParams()).tolist() == [[[0.0, 0.0], [3.0, 6.0]]]


def test_normalized_maps_lie_in_unit_interval_and_empty_maps_stay_zero():
    maps = torch.stack([torch.linspace(-1, 4, 49).view(7, 7), torch.full((7, 7), -2.0)])
    normalized = dve.normalize_maps(maps)
    assert normalized[0].max().item() == pytest.approx(1.0)
    assert normalized.min().item() == 0.0
    assert normalized[1].abs().sum().item() == 0.0


def test_salient_boxes_match_brute_force():
    generator = torch.Generator().manual_seed(1)
    maps = torch.rand(4, 20, 30, generator=generator) ** 4
    maps[3] = 0.0
    boxes, valid = dve.salient_boxes(maps, 0.5)
    for b in range(3):
        ys, xs = np.nonzero((maps[b] >= 0.5 * maps[b].max()).numpy())
        assert boxes[b].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert valid[b]
    assert not valid[3]


def test_unknown_parameters_are_refused():
    with pytest.raises(ValueError, match="unknown DVE parameter"):
        DVEParams.from_mapping({"sigma": 2})
    with pytest.raises(ValueError, match="psi must be one of"):
        DVEParams(psi="otsu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_stays_on_device():
    features = random_features(b=8, c=1280)
    cpu = dve.explain(features, DVEParams(), (224, 224))
    gpu = dve.explain(features.cuda(), DVEParams(), (224, 224))
    assert gpu.dve.is_cuda and gpu.targeted.is_cuda and gpu.boxes.is_cuda
    torch.testing.assert_close(gpu.dve.cpu(), cpu.dve, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.targeted.cpu(), cpu.targeted, rtol=1e-4, atol=1e-5)
    assert (gpu.boxes.cpu() - cpu.boxes).abs().max().item() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 8])
def test_compiled_dve_equals_eager_on_cuda(batch):
    from handler.explainer import CompiledExplain

    features = torch.rand(batch, 1280, 7, 7, device="cuda", generator=torch.Generator("cuda").manual_seed(batch))
    params = DVEParams()
    compiled = CompiledExplain()
    for _ in range(3):  # warm-up, capture, replay
        got = compiled(features, params, (224, 224), None)
    assert not compiled.failed
    expected = explain(features, params, (224, 224))
    assert torch.allclose(got.dve, expected.dve, atol=1e-5) and torch.allclose(
        got.targeted, expected.targeted, atol=1e-5
    )
    assert (got.boxes - expected.boxes).abs().max() <= 1 and torch.equal(got.box_valid, expected.box_valid)


def test_compiled_dve_falls_back_to_eager_for_good(monkeypatch):
    from handler.explainer import CompiledExplain

    compiled = CompiledExplain()

    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(compiled, "compiled", broken)
    features = torch.rand(2, 16, 7, 7, generator=torch.Generator().manual_seed(0))
    got = compiled(features, DVEParams(), (224, 224), None)
    assert compiled.failed and torch.equal(got.dve, explain(features, DVEParams(), (224, 224)).dve)


def test_upsampling_for_the_box_equals_bicubic_interpolation():
    """The box's upsampling (two cached matrix products) is F.interpolate's bicubic, so the boxes do not move."""
    import torch.nn.functional as F

    maps = dve.normalize_maps(torch.rand(4, 7, 7, generator=torch.Generator().manual_seed(5)) ** 3)
    expected = (
        F.interpolate(maps.unsqueeze(1), size=(224, 224), mode="bicubic", align_corners=False)
        .squeeze(1)
        .clamp(0.0, 1.0)
    )
    got = dve.upsample_maps(maps, (224, 224))
    assert (got - expected).abs().max() < 1e-5
    for threshold in (0.2, 0.5):
        boxes, _ = dve.salient_boxes(got, threshold)
        reference, _ = dve.salient_boxes(expected, threshold)
        assert (boxes - reference).abs().max() <= 1


# The whole explain path, slowly: normalise, targeted map, upsampling, box.


def reference_normalize(s: np.ndarray) -> np.ndarray:
    """Negative values to 0, then divided by the maximum (an all-zero map stays zero)."""
    positive = np.maximum(s, 0.0)
    peak = positive.max()
    return positive / peak if peak > 0 else positive


def cubic_weight(t: float) -> float:
    """Keys' cubic convolution kernel with a = -0.75 (what torch's bicubic uses)."""
    a, t = -0.75, abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def reference_bicubic(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic upsampling, half-pixel centres, edges repeated, one output pixel at a time."""
    h, w = m.shape
    out = np.zeros(size)
    for oy in range(size[0]):
        sy = (oy + 0.5) * h / size[0] - 0.5
        for ox in range(size[1]):
            sx = (ox + 0.5) * w / size[1] - 0.5
            total = 0.0
            for iy in range(int(np.floor(sy)) - 1, int(np.floor(sy)) + 3):
                for ix in range(int(np.floor(sx)) - 1, int(np.floor(sx)) + 3):
                    pixel = m[min(max(iy, 0), h - 1), min(max(ix, 0), w - 1)]
                    total += cubic_weight(sy - iy) * cubic_weight(sx - ix) * pixel
            out[oy, ox] = total
    return np.clip(out, 0.0, 1.0)


def reference_bilinear(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling, half-pixel centres (source clamped at 0), one output pixel at a time."""
    h, w = m.shape
    out = np.zeros(size)
    for oy in range(size[0]):
        sy = max((oy + 0.5) * h / size[0] - 0.5, 0.0)
        y0 = int(sy)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for ox in range(size[1]):
            sx = max((ox + 0.5) * w / size[1] - 0.5, 0.0)
            x0 = int(sx)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = (1 - fx) * m[y0, x0] + fx * m[y0, x1]
            bottom = (1 - fx) * m[y1, x0] + fx * m[y1, x1]
            out[oy, ox] = (1 - fy) * top + fy * bottom
    return out


def reference_box(m: np.ndarray, threshold: float) -> tuple[list[int], bool]:
    """The box (x0, y0, x1, y1, exclusive ends) of every pixel at or above threshold x max."""
    if m.max() <= 0:
        return [0, 0, 0, 0], False
    ys, xs = np.nonzero(m >= threshold * m.max())
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1], True


def reference_explain(
    features: np.ndarray, p: DVEParams, input_size: tuple[int, int], weights: np.ndarray | None = None
):
    """DVE, targeted DVE (of the raw DVE map) and the targeted map's box at the input size."""
    if p.resolution == "input":
        features = np.stack([[reference_bilinear(channel, input_size) for channel in image] for image in features])
    raw = reference_dve(features, p, weights)
    targeted = reference_targeted(raw, p)
    dve_maps = np.stack([reference_normalize(s) for s in raw])
    targeted_maps = np.stack([reference_normalize(s) for s in targeted])
    boxes = [reference_box(reference_bicubic(t, input_size), p.box_threshold) for t in targeted_maps]
    return dve_maps, targeted_maps, boxes


EXPLAIN_CASES = {
    "defaults": (DVEParams(), (7, 7), (64, 64), False),
    "old-defaults-box-0.5": (DVEParams(sigma_low=2.0, sigma_high=1.0, box_threshold=0.5), (7, 7), (64, 64), False),
    "quantile-oblong": (DVEParams(psi="quantile", psi_quantile=0.7), (6, 8), (48, 80), False),
    "class-conditional": (DVEParams(), (7, 7), (64, 64), True),
    # negative evidence survives psi "none": the targeted map must come from the raw map, not the clipped one
    "class-conditional-no-psi": (DVEParams(psi="none"), (7, 7), (64, 64), True),
    "input-resolution": (DVEParams(resolution="input"), (5, 5), (20, 20), False),
}


@pytest.mark.parametrize("case", list(EXPLAIN_CASES))
def test_explain_matches_the_slow_reference_end_to_end(case):
    params, (h, w), input_size, conditional = EXPLAIN_CASES[case]
    features = random_features(b=3, c=8, h=h, w=w, seed=2)
    weights = torch.randn(3, 8, generator=torch.Generator().manual_seed(3)) if conditional else None
    expected_dve, expected_targeted, expected_boxes = reference_explain(
        features.double().numpy(), params, input_size, None if weights is None else weights.double().numpy()
    )
    got = dve.explain(features, params, input_size, weights)
    np.testing.assert_allclose(got.dve.numpy(), expected_dve, atol=1e-5)
    np.testing.assert_allclose(got.targeted.numpy(), expected_targeted, atol=1e-5)
    assert [[box.tolist(), bool(valid)] for box, valid in zip(got.boxes, got.box_valid)] == [
        [box, valid] for box, valid in expected_boxes
    ]


def test_explain_of_an_empty_map_has_no_box():
    got = dve.explain(torch.zeros(1, 4, 7, 7), DVEParams(), (32, 32))
    assert got.dve.abs().sum() == 0 and got.targeted.abs().sum() == 0 and not got.box_valid[0]


def test_salient_boxes_of_an_unclipped_upsampling_equal_those_of_the_clipped_one():
    """explain() skips clipping the box's upsampling: overshoot above 1 and below 0 must not move the box."""
    generator = torch.Generator().manual_seed(7)
    maps = dve.normalize_maps(torch.rand(6, 7, 7, generator=generator) ** 4)
    unclipped = dve._bicubic_upsample(maps, (224, 160))
    assert unclipped.max() > 1.0 and unclipped.min() < 0.0  # the case under test does occur
    for threshold in (0.2, 0.5, 1.0):
        boxes, valid = dve.salient_boxes(unclipped, threshold)
        expected, expected_valid = dve.salient_boxes(unclipped.clamp(0.0, 1.0), threshold)
        assert torch.equal(boxes, expected) and torch.equal(valid, expected_valid)

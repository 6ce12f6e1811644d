"""Maps drawn over the original image: aligned, batched, coloured, copied and encoded."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from handler import rendering
from handler.imaging import CropGeometry
from handler.rendering import Drawing, draw, overlay, render_levels, render_maps


def grid_sample_reference(maps: torch.Tensor, geometry: CropGeometry, size: tuple[int, int]) -> torch.Tensor:
    """The slow, obvious drawing: sample every output pixel's centre with grid_sample."""
    out_w, out_h = size
    xs = (torch.arange(out_w, dtype=torch.float64) + 0.5) * (geometry.width / out_w)
    ys = (torch.arange(out_h, dtype=torch.float64) + 0.5) * (geometry.height / out_h)
    gx = 2.0 * (xs - geometry.left) / geometry.side - 1.0
    gy = 2.0 * (ys - geometry.top) / geometry.side - 1.0
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).unsqueeze(0).float()
    sampled = F.grid_sample(maps[None].float(), grid, mode="bicubic", padding_mode="border", align_corners=False)[0]
    inside = (gy.abs() <= 1.0)[:, None] & (gx.abs() <= 1.0)[None, :]
    return torch.where(inside, sampled.clamp(0.0, 1.0), torch.zeros_like(sampled))


@pytest.mark.parametrize(
    "width, height, size, cells",
    [
        (451, 300, (224, 149), 7),
        (400, 200, (400, 200), 7),
        (3000, 4000, (300, 400), 14),
        (451, 300, (451, 300), 112),
        (1, 5000, (8, 4096), 7),
    ],
)
def test_drawing_equals_grid_sample(width, height, size, cells):
    geometry = CropGeometry.centre_crop(width, height, 256, 224)
    maps = torch.rand(3, cells, cells, generator=torch.Generator().manual_seed(0))
    drawn, expected = render_maps(maps, geometry, size), grid_sample_reference(maps, geometry, size)
    assert (drawn - expected).abs().max() < 1e-4
    levels = (rendering.to_uint8(drawn).int() - rendering.to_uint8(expected).int()).abs()
    assert levels.max() <= 1  # within one grey level where rounding falls either way
    # The levels PNGs are made of, rounded inside the product, are the same within one level.
    levels = (render_levels(maps, geometry, size).int() - rendering.to_uint8(expected).int()).abs()
    assert levels.max() <= 1 and (levels > 0).float().mean() < 0.01


def test_rendered_map_covers_the_image_and_is_zero_outside_the_crop():
    geometry = CropGeometry.centre_crop(400, 200, 256, 224)
    drawn = render_maps(torch.ones(2, 7, 7), geometry, (400, 200))
    assert drawn.shape == (2, 200, 400)
    assert torch.equal(drawn[0], drawn[1])
    drawn = drawn[0]
    columns = drawn.sum(dim=0) > 0
    rows = drawn.sum(dim=1) > 0
    assert columns.nonzero().min().item() == 112 and columns.nonzero().max().item() == 287
    assert rows.nonzero().min().item() == 12 and rows.nonzero().max().item() == 187
    assert torch.allclose(drawn[13:187, 113:287], torch.ones(1))


def test_rendered_map_is_aligned_with_the_crop():
    geometry = CropGeometry.centre_crop(300, 300, 224, 224)  # crop = whole image
    cell = torch.zeros(7, 7)
    cell[0, 6] = 1.0  # top-right cell of the crop
    drawn = render_maps(cell[None], geometry, (300, 300))[0]
    y, x = np.unravel_index(drawn.argmax().item(), drawn.shape)
    assert 300 * 6 / 7 <= x < 300 and 0 <= y < 300 / 7


def test_a_batch_is_drawn_as_each_map_alone_and_copied_in_order():
    """Maps of several grids, sizes, geometries and formats, drawn together, equal each drawn alone."""
    generator = torch.Generator().manual_seed(1)
    geometries = [CropGeometry.centre_crop(w, h, 256, 224) for w, h in ((451, 300), (600, 400), (300, 451))]
    drawings = []
    for geometry in geometries:
        for fmt in ("png", "overlay", "array"):
            for cells in (7, 28):
                size = geometry.map_size(96)
                photo = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=generator)
                drawings.append(Drawing(torch.rand(cells, cells, generator=generator), geometry, size, fmt, photo))
    together = draw(drawings)
    for drawing, picture in zip(drawings, together):
        alone = draw([drawing])[0]
        assert picture.dtype == alone.dtype and np.array_equal(picture, alone)
        width, height = drawing.size
        if drawing.format == "array":
            expected = render_maps(drawing.grid[None], drawing.geometry, drawing.size)[0].double().numpy().round(4)
            assert picture.shape == (height, width) and np.array_equal(picture, expected)
        else:
            levels = render_levels(drawing.grid[None], drawing.geometry, drawing.size)[0].numpy()
            if drawing.format == "png":
                assert np.array_equal(picture, levels)
            else:
                assert np.array_equal(picture, overlay(drawing.photo.numpy(), levels))


def test_a_map_that_cannot_be_drawn_fails_alone(monkeypatch):
    geometry = CropGeometry.centre_crop(451, 300, 256, 224)
    drawings = [Drawing(torch.rand(7, 7), geometry, (96, 64), "png") for _ in range(3)]
    group = rendering._draw_group

    def failing_group(all_drawings, members):  # the batched product runs out of memory, and so does map 1 alone
        if len(members) > 1 or members[0] == 1:
            raise MemoryError()
        return group(all_drawings, members)

    monkeypatch.setattr(rendering, "_draw_group", failing_group)
    pictures = draw(drawings)
    assert isinstance(pictures[1], MemoryError)
    assert all(isinstance(pictures[i], np.ndarray) and pictures[i].shape == (64, 96) for i in (0, 2))


def test_overlay_colours_by_the_map_and_leaves_zero_untouched():
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (10, 1))
    photo = Image.new("RGB", (128, 20), (10, 20, 30))
    coloured = overlay(photo, gray)
    assert coloured.shape == (10, 64, 3)
    assert tuple(coloured[0, 0]) == (10, 20, 30)  # map 0: the photo untouched
    assert tuple(coloured[0, -1]) != (10, 20, 30)
    exact = np.asarray(photo.resize((64, 10)), dtype=np.float64) * (1 - gray[..., None] / 255 * 0.6)
    exact += rendering.COLORMAP[gray] * (gray[..., None] / 255 * 0.6)
    assert np.abs(coloured - exact).max() <= 1.0  # integer blending, within one grey level


def test_pngs_are_encoded_in_parallel_and_a_failure_stays_with_its_picture():
    pictures = [np.full((600, 700), level, dtype=np.uint8) for level in (0, 128, 255)]  # over PARALLEL_MIN_BYTES
    pictures.insert(1, np.zeros((2, 2, 5), dtype=np.uint8))  # no PNG has 5 channels
    encoded = rendering.encode_pngs(pictures)
    assert isinstance(encoded[1], Exception)
    for picture, data in zip([pictures[0], *pictures[2:]], [encoded[0], *encoded[2:]]):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), picture)

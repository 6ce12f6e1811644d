"""Maps to pictures: every map of a batch drawn on the model's device, copied to the host once.

A map is computed on the model's input crop (7 x 7 for the explained layer, larger for
early stages) and drawn over the whole original image, pixel-aligned, with zeros where
the model saw nothing (``handler.imaging.CropGeometry``). Bicubic interpolation is
separable, so drawing a map is two matrix products, ``rows @ map @ columns.T``, whose
weights are exactly ``grid_sample``'s (bicubic, border padding, ``align_corners=False``).

``draw`` takes every map of a batch at once: maps that share their grid and output size
are drawn by one batched matrix product whatever their photos' geometry, quantised to
8 bits and, for overlays, coloured and blended with the photo, all on the device; then
the whole batch comes to the host in one copy. ``encode_pngs`` compresses the results on
a thread pool (the deflate libraries release the GIL), one PNG per map.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from handler.imaging import OVERLAY_RESAMPLING, CropGeometry, encode_png

ARRAY_DECIMALS = 4
OPACITY = 0.6  # the colour's weight where the map is at its maximum
BLEND_ROWS = 256  # rows blended at a time: bounded temporaries whatever the overlay's size
_CUBIC_A = -0.75  # the cubic convolution constant of PyTorch's (and OpenCV's) bicubic

# Colour map anchors (value, RGB) from dark blue through cyan and yellow to red, as in
# the paper's figures; interpolated linearly into a 256-entry table.
_ANCHORS = [
    (0.00, (0, 0, 131)),
    (0.125, (0, 60, 170)),
    (0.375, (5, 255, 255)),
    (0.625, (255, 255, 0)),
    (0.875, (250, 0, 0)),
    (1.00, (128, 0, 0)),
]
_LEVELS = np.linspace(0.0, 1.0, 256)
COLORMAP = (
    np.stack([np.interp(_LEVELS, [a[0] for a in _ANCHORS], [a[1][c] for a in _ANCHORS]) for c in range(3)], axis=1)
    .round()
    .astype(np.uint8)
)


@dataclass(frozen=True)
class Drawing:
    """One map to draw.

    Attributes:
        grid: the map on the model's crop, h x w in [0, 1], on the model's device.
        geometry: where the crop lies in the original image.
        size: (width, height) of the picture, with the original's aspect ratio.
        format: ``png`` (8-bit gray), ``overlay`` (the photo coloured by the map) or
            ``array`` (floats, rounded to ``ARRAY_DECIMALS``).
        photo: for ``overlay``: the photo at ``size``, height x width x 3 uint8, any device.
    """

    grid: torch.Tensor
    geometry: CropGeometry
    size: tuple[int, int]
    format: str
    photo: torch.Tensor | None = None


def render_maps(maps: torch.Tensor, geometry: CropGeometry, size: tuple[int, int]) -> torch.Tensor:
    """Draws maps of one crop (C x h x w, in [0, 1]) over the whole original image.

    Returns:
        ``C x height x width`` tensor in [0, 1] on the maps' device: bicubic inside the
        crop (sampled at each output pixel's centre), zero where the model saw nothing.
    """
    return _render(maps, [geometry] * len(maps), size)


def render_levels(maps: torch.Tensor, geometry: CropGeometry, size: tuple[int, int]) -> torch.Tensor:
    """``render_maps`` as uint8 grey levels (``to_uint8`` of it, within one level where
    float rounding falls either way): what PNGs and overlays are made of."""
    return _render(maps, [geometry] * len(maps), size, levels=True)


def _render(
    grids: torch.Tensor, geometries: list[CropGeometry], size: tuple[int, int], *, levels: bool = False
) -> torch.Tensor:
    """G maps (G x h x w), each over its own crop (``geometries``). One batched
    ``rows @ map @ columns.T``: G x height x width, floats in [0, 1], or with ``levels``
    uint8 grey levels."""
    out_w, out_h = size
    _, h, w = grids.shape
    rows = batched_bicubic_weights(out_h, [(g.height, g.top, g.side) for g in geometries], h, grids.device)
    columns = batched_bicubic_weights(out_w, [(g.width, g.left, g.side) for g in geometries], w, grids.device)
    if not levels:
        return (rows @ grids.float() @ columns.transpose(1, 2)).clamp_(0.0, 1.0)
    # 255 x the map + 0.5 from the second product itself, clipped, then truncated: the
    # rounding of to_uint8, in two passes over the picture instead of four.
    half = torch.full((), 0.5, device=grids.device)
    scaled = torch.baddbmm(half, rows @ grids.float(), columns.transpose(1, 2), alpha=255.0)
    return scaled.clamp_(0.5, 255.5).to(torch.uint8)


def batched_bicubic_weights(
    out_n: int, axes: list[tuple[float, float, float]], n_in: int, device: torch.device
) -> torch.Tensor:
    """``out_n x n_in`` weights sampling a crop of ``n_in`` cells along one axis, for G crops at once.

    ``axes`` holds G (full, start, side): output pixel i is centred at
    ``(i + 0.5) * full / out_n`` original pixels, the crop spans ``[start, start + side]``;
    rows of pixels outside the crop are zero. Returns G x out_n x n_in on ``device``.
    Small ones (default-size maps) come from a cache: a server sees the same few photo
    sizes (a camera's, a client's resize) again and again, and computing them costs more
    than the drawing itself at batch 1.
    """
    if out_n * n_in > CACHED_WEIGHTS_MAX_VALUES:
        geometry = np.array(axes, dtype=np.float64)
        return torch.from_numpy(_axis_weights(out_n, geometry, n_in)).to(device, non_blocking=True)
    if len(set(axes)) == 1:  # one photo's maps (or photos of one size): one matrix for all
        return _cached_axis_weights(out_n, *axes[0], n_in, device)[None].expand(len(axes), -1, -1)
    return torch.stack([_cached_axis_weights(out_n, *axis, n_in, device) for axis in axes])


# At most 256 cached axes of at most 16,384 weights: 16 MB.
CACHED_WEIGHTS_MAX_VALUES = 16_384


@lru_cache(maxsize=256)
def _cached_axis_weights(
    out_n: int, full: float, start: float, side: float, n_in: int, device: torch.device
) -> torch.Tensor:
    """One axis's weights on ``device``, shared by every later caller (never written to)."""
    return torch.from_numpy(_axis_weights(out_n, np.array([[full, start, side]]), n_in)[0]).to(device)


def _axis_weights(out_n: int, geometry: np.ndarray, n_in: int) -> np.ndarray:
    """``batched_bicubic_weights`` as float32 numpy (a few dozen operations on small arrays,
    where each of PyTorch's costs more than numpy's)."""
    full, start, side = geometry.T
    centres = (np.arange(out_n) + 0.5)[None, :] * (full / out_n)[:, None]
    grid = 2.0 * (centres - start[:, None]) / side[:, None] - 1.0
    source = ((grid + 1.0) * n_in - 1.0) / 2.0  # grid_sample's unnormalisation, align_corners=False
    base = np.floor(source)
    t = (source - base)[..., None]
    a = _CUBIC_A
    offsets = np.array([1.0, 0.0, -1.0, -2.0])  # distance from each of the 4 taps: t + 1, t, 1 - t, 2 - t
    x = np.abs(t + offsets)
    taps = np.where(x <= 1.0, ((a + 2) * x - (a + 3)) * x * x + 1, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a)
    index = np.clip(base.astype(np.int64)[..., None] + np.arange(-1, 3), 0, n_in - 1)  # border padding
    # Each cell's weight sums the taps that land on it (clamped taps share a border cell).
    weights = np.einsum("gok,gokn->gon", taps, index[..., None] == np.arange(n_in))
    weights[np.abs(grid) > 1.0] = 0.0
    return np.asarray(weights, dtype=np.float32)


def to_uint8(map01: torch.Tensor) -> torch.Tensor:
    """[0, 1] values as uint8 levels, on their device."""
    return (map01 * 255.0).add_(0.5).to(torch.uint8)


@lru_cache(maxsize=8)
def _blend_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per map level: the photo's weight, and the colour times its weight, in 1/256ths."""
    weight = torch.from_numpy(np.round(np.arange(256) / 255.0 * OPACITY * 256.0)).to(torch.int32)
    colour = torch.from_numpy(COLORMAP).to(torch.int32) * weight[:, None]
    return (256 - weight).to(device), colour.to(device)


def blend(levels: torch.Tensor, photos: torch.Tensor) -> torch.Tensor:
    """Colours photos by maps: opaque where the map is high, untouched where it is 0.

    Args:
        levels: maps as uint8, ... x H x W.
        photos: the photos at the maps' size, ... x H x W x 3 uint8, on the same device.

    Integer arithmetic in 1/256ths of the colour's weight (within one grey level of the
    exact blend), on bands of rows so that a large overlay needs no large temporaries.
    """
    keep, colour = _blend_tables(levels.device)
    out = torch.empty_like(photos)
    height = levels.shape[-2]
    for top in range(0, height, BLEND_ROWS):
        band = levels[..., top : top + BLEND_ROWS, :].long()
        mixed = photos[..., top : top + BLEND_ROWS, :, :].int() * keep[band].unsqueeze(-1) + colour[band] + 128
        out[..., top : top + BLEND_ROWS, :, :] = (mixed >> 8).to(torch.uint8)
    return out


def overlay(photo: Image.Image | np.ndarray, map_u8: np.ndarray) -> np.ndarray:
    """One photo coloured by one map (H x W uint8), on the host, as the server draws it.

    A Pillow photo of another size is first scaled to the map's; an array must have it.
    """
    height, width = map_u8.shape
    if isinstance(photo, Image.Image):
        if photo.size != (width, height):
            photo = photo.resize((width, height), OVERLAY_RESAMPLING)
        photo = np.array(photo.convert("RGB"))
    return blend(
        torch.from_numpy(np.array(map_u8, dtype=np.uint8)), torch.from_numpy(np.array(photo, dtype=np.uint8))
    ).numpy()


def draw(drawings: list[Drawing]) -> list[np.ndarray | Exception]:
    """Every map of a batch as a host array (or the exception that stopped it).

    ``png``: height x width uint8; ``overlay``: height x width x 3 uint8; ``array``:
    height x width float64 rounded to ``ARRAY_DECIMALS``. Maps with the same grid and
    output size are drawn together; if a group fails (out of memory, say), each of its
    maps is tried alone, so that a failure stays with the requests it belongs to.
    """
    groups: dict[tuple[int, int, int, int, bool], list[int]] = {}
    for i, drawing in enumerate(drawings):
        groups.setdefault((*drawing.grid.shape, *drawing.size, drawing.format == "array"), []).append(i)
    blocks: list[tuple[list[int], torch.Tensor]] = []
    failed: dict[int, Exception] = {}
    for members in groups.values():
        try:
            blocks += _draw_group(drawings, members)
        except Exception:
            for i in members:
                try:
                    blocks += _draw_group(drawings, [i])
                except Exception as error:  # noqa: PERF203 - one map at a time, on purpose
                    failed[i] = error
    return _to_host(len(drawings), blocks, failed)


def _draw_group(drawings: list[Drawing], members: list[int]) -> list[tuple[list[int], torch.Tensor]]:
    """Maps of one grid and output size, either all ``array`` or none, drawn by one batched product.

    Returns blocks of (drawing indices, their pictures stacked): float maps for ``array``,
    uint8 levels for ``png``, uint8 RGB for ``overlay``.
    """
    group = [drawings[i] for i in members]
    device = group[0].grid.device
    geometries = [d.geometry for d in group]
    grids = torch.stack([d.grid for d in group])
    if group[0].format == "array":
        return [(members, _render(grids, geometries, group[0].size))]
    levels = _render(grids, geometries, group[0].size, levels=True)
    overlays = [k for k, d in enumerate(group) if d.format == "overlay"]
    if not overlays:
        return [(members, levels)]
    photos = torch.stack([group[k].photo for k in overlays]).to(device, non_blocking=True)  # type: ignore[misc]
    if len(overlays) == len(group):  # no copy of the levels: a worst case's overlays are large
        return [(members, blend(levels, photos))]
    maps = [k for k, d in enumerate(group) if d.format != "overlay"]
    return [
        ([members[k] for k in overlays], blend(levels[overlays], photos)),
        ([members[k] for k in maps], levels[maps]),
    ]


def _to_host(
    count: int, blocks: list[tuple[list[int], torch.Tensor]], failed: dict[int, Exception]
) -> list[np.ndarray | Exception]:
    """One device-to-host copy for every drawn map: the blocks' bytes, concatenated, 4-byte aligned.

    Blocks already on the host are read where they lie (nothing to copy on a CPU)."""
    if all(block.device.type == "cpu" for _, block in blocks):
        return _split(count, [(members, _host_values(block.numpy())) for members, block in blocks], failed)
    pieces, offsets, position = [], [], 0
    for _, block in blocks:
        data = block.contiguous().view(-1).view(torch.uint8)
        pad = -data.numel() % 4  # the float maps that follow stay aligned
        pieces += [data, torch.zeros(pad, dtype=torch.uint8, device=data.device)] if pad else [data]
        offsets.append(position)
        position += data.numel() + pad
    host = torch.cat(pieces).cpu().numpy() if pieces else np.empty(0, dtype=np.uint8)
    arrays = []
    for (members, block), offset in zip(blocks, offsets):
        raw = host[offset : offset + block.numel() * block.element_size()]
        dtype = np.float32 if block.dtype == torch.float32 else np.uint8
        arrays.append((members, _host_values(raw.view(dtype).reshape(block.shape))))
    return _split(count, arrays, failed)


def _host_values(values: np.ndarray) -> np.ndarray:
    """Float maps as float64 rounded to ``ARRAY_DECIMALS``; uint8 pictures as they are."""
    return values.astype(np.float64).round(ARRAY_DECIMALS) if values.dtype == np.float32 else values


def _split(
    count: int, arrays: list[tuple[list[int], np.ndarray]], failed: dict[int, Exception]
) -> list[np.ndarray | Exception]:
    """Each drawing's picture from the stacked blocks, or its error."""
    results: list[np.ndarray | Exception] = [failed.get(i, RuntimeError("not drawn")) for i in range(count)]
    for members, values in arrays:
        for i, picture in zip(members, values):
            results[i] = picture
    return results


@lru_cache(maxsize=1)
def _encoders() -> ThreadPoolExecutor:
    """Threads for PNG encoding: as many as the cores this process may run on."""
    return ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)), thread_name_prefix="png")


PARALLEL_MIN_BYTES = 1 << 20  # below this, handing pictures to threads costs more than it saves


def encode_pngs(pictures: list[np.ndarray]) -> list[bytes | Exception]:
    """PNG bytes of each uint8 picture (gray or RGB), encoded concurrently; an exception
    (out of memory, say) is returned in its place, so that it fails its own request only."""
    if len(pictures) <= 1 or sum(picture.nbytes for picture in pictures) < PARALLEL_MIN_BYTES:
        return [_encode(picture) for picture in pictures]
    return list(_encoders().map(_encode, pictures))


def _encode(picture: np.ndarray) -> bytes | Exception:
    try:
        return encode_png(picture)
    except Exception as error:
        return error

"""Images in, maps out: decoding, the crop the model sees, and maps aligned to the photo.

The model sees a centre crop of the image scaled so that its short side is
``resize_size``. ``CropGeometry`` records where that crop lies in the *original* image,
so a map computed on the crop can be drawn over the whole original image, pixel-aligned,
with zeros where the model saw nothing.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from math import ceil, floor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from handler.errors import RequestError

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


@dataclass(frozen=True)
class CropGeometry:
    """Where the model's square input crop lies in the upright original image.

    Attributes:
        width, height: the original image's size in pixels (after EXIF orientation).
        left, top, side: the crop's top-left corner and side, in original pixels.
        input_size: the side of the model's input in pixels.
    """

    width: int
    height: int
    left: float
    top: float
    side: float
    input_size: int

    @classmethod
    def centre_crop(cls, width: int, height: int, resize_size: int, crop_size: int) -> "CropGeometry":
        """The crop of "scale the short side to resize_size, then centre-crop crop_size"."""
        side = crop_size * min(width, height) / resize_size
        return cls(width, height, (width - side) / 2, (height - side) / 2, side, crop_size)

    def box_to_original(self, box: tuple[float, float, float, float]) -> list[int]:
        """Maps a box in input pixels (exclusive ends) to whole original pixels, clamped."""
        scale = self.side / self.input_size
        x0, y0, x1, y1 = box
        return [
            max(0, int(floor(self.left + x0 * scale))),
            max(0, int(floor(self.top + y0 * scale))),
            min(self.width, int(ceil(self.left + x1 * scale))),
            min(self.height, int(ceil(self.top + y1 * scale))),
        ]

    def map_size(self, long_side: int | None) -> tuple[int, int]:
        """(width, height) of a map with the image's aspect ratio; None: original size."""
        if long_side is None:
            return self.width, self.height
        scale = long_side / max(self.width, self.height)
        return max(1, round(self.width * scale)), max(1, round(self.height * scale))


@dataclass
class DecodedImage:
    """An upright RGB image, possibly decoded at reduced scale, and its original size."""

    image: Image.Image
    width: int
    height: int


def decode_image(data: bytes, *, max_pixels: int, short_side: int | None = None) -> DecodedImage:
    """Decodes any still image Pillow reads into upright 8-bit RGB.

    Grayscale, palette, CMYK and 16-bit images are converted; transparent pixels are
    composited on white. The pixel limit is checked from the header, before any
    decoding, so a decompression bomb costs nothing. With ``short_side``, a JPEG
    decodes at the smallest power-of-two scale whose short side still covers it (a
    12 MP photo decodes at 1/8 size: several times faster, same model input).

    Raises:
        RequestError: 400 if the bytes are no readable image, 413 if it is too large.
    """
    if not data:
        raise RequestError("the request carries no image data (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise RequestError(
                    f"image is {width} x {height} = {width * height} pixels; the limit is {max_pixels}", 413
                )
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            if orientation in _TRANSPOSED_ORIENTATIONS:
                width, height = height, width
            if short_side is not None and image.format == "JPEG":
                scale = short_side / min(width, height)
                if scale < 1.0:
                    image.draft("RGB", (ceil(image.width * scale), ceil(image.height * scale)))
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(f"image is too large: {exc}", 413) from None
    except Image.UnidentifiedImageError:
        raise RequestError("the data is not an image in a format the server reads (JPEG, PNG, WebP, BMP, TIFF, GIF, ...)") from None
    except Exception as exc:  # Pillow's decoders fail corrupt data with many exception types
        raise RequestError(f"the image is truncated or corrupt: {exc}") from None
    return DecodedImage(image, width, height)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        top = float(array.max()) if array.size else 0.0
        if image.mode.startswith("I;16"):
            peak = 65535.0
        elif image.mode == "I":
            peak = 255.0 if top <= 255.0 else 65535.0 if top <= 65535.0 else top
        else:
            peak = 1.0 if top <= 1.0 else top
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def model_input(decoded: DecodedImage, geometry: CropGeometry) -> torch.Tensor:
    """The model's input crop as an ``input_size x input_size x 3`` uint8 tensor.

    One Pillow resize with a source box does crop and scale at once, with
    antialiasing, exactly over ``geometry``'s crop (scaled if the JPEG was decoded small).
    """
    scale = decoded.image.width / decoded.width
    box = (
        geometry.left * scale,
        geometry.top * scale,
        (geometry.left + geometry.side) * scale,
        (geometry.top + geometry.side) * scale,
    )
    size = (geometry.input_size, geometry.input_size)
    crop = decoded.image.resize(size, Image.Resampling.BILINEAR, box=box)
    return torch.from_numpy(np.asarray(crop).copy())


def render_maps(maps: torch.Tensor, geometry: CropGeometry, size: tuple[int, int]) -> torch.Tensor:
    """Draws maps of the crop (C x h x w, in [0, 1]) over the whole original image.

    Args:
        maps: normalised maps of the model's input crop, drawn together in one call.
        geometry: where that crop lies in the original image.
        size: (width, height) of the output, with the original's aspect ratio.

    Returns:
        ``C x height x width`` tensor in [0, 1] on the maps' device: bicubic inside the
        crop (sampled at each output pixel's centre), zero where the model saw nothing.
    """
    out_w, out_h = size
    device = maps.device
    xs = (torch.arange(out_w, device=device, dtype=torch.float32) + 0.5) * (geometry.width / out_w)
    ys = (torch.arange(out_h, device=device, dtype=torch.float32) + 0.5) * (geometry.height / out_h)
    gx = 2.0 * (xs - geometry.left) / geometry.side - 1.0
    gy = 2.0 * (ys - geometry.top) / geometry.side - 1.0
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).unsqueeze(0)
    sampled = F.grid_sample(maps[None].float(), grid, mode="bicubic", padding_mode="border", align_corners=False)[0]
    inside = (gy.abs() <= 1.0)[:, None] & (gx.abs() <= 1.0)[None, :]
    return torch.where(inside, sampled.clamp(0.0, 1.0), torch.zeros_like(sampled))


def to_uint8(map01: torch.Tensor) -> np.ndarray:
    """[0, 1] maps as a uint8 array on the host: the only device-to-host copy of the maps."""
    return (map01 * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 gray (h x w) or RGB (h x w x 3) array.

    Compression level 1: maps are smooth, so it is already small, and far faster than 6.
    """
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


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
COLORMAP = np.stack(
    [np.interp(_LEVELS, [a[0] for a in _ANCHORS], [a[1][c] for a in _ANCHORS]) for c in range(3)], axis=1
).round().astype(np.uint8)


OVERLAY_RESAMPLING = Image.Resampling.BILINEAR


def overlay(image: Image.Image, map_u8: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """Colours the photo by the map: opaque where the map is high, untouched where it is 0.

    Args:
        image: the RGB photo at any size; it is resized to the map's size unless it has it
            already (a caller drawing several maps resizes it once).
        map_u8: the map (h x w, uint8).
        opacity: the colour's weight where the map is at its maximum.
    """
    height, width = map_u8.shape
    if image.size != (width, height):
        image = image.resize((width, height), OVERLAY_RESAMPLING)
    photo = np.asarray(image, dtype=np.float32)
    alpha = (map_u8.astype(np.float32) / 255.0 * opacity)[..., None]
    blended = photo * (1.0 - alpha) + COLORMAP[map_u8].astype(np.float32) * alpha
    return (blended + 0.5).astype(np.uint8)

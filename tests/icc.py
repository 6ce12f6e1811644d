"""Real RGB display ICC profiles built from their primaries, for the colour tests.

Nothing here can download a profile and neither Pillow nor LittleCMS ships Display P3 or
Adobe RGB, so the tests build them: ICC v4.3 matrix/TRC display profiles (header, desc,
cprt, wtpt, chad, rXYZ/gXYZ/bXYZ, rTRC/gTRC/bTRC) as the specification (ICC.1:2022)
lays them out. The primaries are adapted from D65 to the PCS's D50 with Bradford, as
Apple's Display P3 and Adobe's profiles are.
"""

from __future__ import annotations

import struct

import numpy as np

D50 = np.array([0.9642, 1.0, 0.8249])
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
D65_XY = (0.3127, 0.3290)
SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)  # ICC parametric curve type 3

# name: (red, green, blue chromaticities, the transfer curve's parameters)
PRIMARIES = {
    "Display P3": (((0.680, 0.320), (0.265, 0.690), (0.150, 0.060)), SRGB_CURVE),
    "Adobe RGB (1998)": (((0.64, 0.33), (0.21, 0.71), (0.15, 0.06)), (563 / 256,)),  # type 0: a pure gamma
    "sRGB": (((0.64, 0.33), (0.30, 0.60), (0.15, 0.06)), SRGB_CURVE),
}


def _xyz(xy: tuple[float, float]) -> np.ndarray:
    x, y = xy
    return np.array([x / y, 1.0, (1 - x - y) / y])


def _s15(values) -> bytes:
    return b"".join(struct.pack(">i", round(float(v) * 65536)) for v in values)


def _mluc(text: str) -> bytes:
    encoded = text.encode("utf-16-be")
    return b"mluc" + bytes(4) + struct.pack(">II", 1, 12) + b"enUS" + struct.pack(">II", len(encoded), 28) + encoded


def _para(parameters: tuple[float, ...]) -> bytes:
    kind = {1: 0, 5: 3}[len(parameters)]
    return b"para" + bytes(4) + struct.pack(">HH", kind, 0) + _s15(parameters)


def adapted_matrix(primaries: tuple[tuple[float, float], ...]) -> tuple[np.ndarray, np.ndarray]:
    """RGB -> XYZ (D50) of linear RGB with these primaries and a D65 white.

    With the Bradford D65 -> D50 adaptation in it.
    """
    columns = np.stack([_xyz(p) for p in primaries], axis=1)
    white = _xyz(D65_XY)
    matrix = columns * np.linalg.solve(columns, white)  # scale each primary so R = G = B = 1 is white
    cone = BRADFORD @ D50 / (BRADFORD @ white)
    adaptation = np.linalg.inv(BRADFORD) @ np.diag(cone) @ BRADFORD
    return adaptation @ matrix, adaptation


def display_profile(name: str) -> bytes:
    """The bytes of an ICC v4.3 RGB display profile named ``name`` (a key of ``PRIMARIES``)."""
    primaries, curve = PRIMARIES[name]
    matrix, adaptation = adapted_matrix(primaries)
    trc = _para(curve)
    tags = [
        (b"desc", _mluc(name)),
        (b"cprt", _mluc("No copyright, use freely")),
        (b"wtpt", b"XYZ " + bytes(4) + _s15(D50)),
        (b"chad", b"sf32" + bytes(4) + _s15(adaptation.flatten())),
        (b"rXYZ", b"XYZ " + bytes(4) + _s15(matrix[:, 0])),
        (b"gXYZ", b"XYZ " + bytes(4) + _s15(matrix[:, 1])),
        (b"bXYZ", b"XYZ " + bytes(4) + _s15(matrix[:, 2])),
        (b"rTRC", trc),
        (b"gTRC", trc),  # the three curves share one copy, as the specification allows
        (b"bTRC", trc),
    ]
    table_end = 128 + 4 + 12 * len(tags)
    entries, data, placed = [], b"", {}
    for signature, body in tags:
        if body not in placed:
            placed[body] = table_end + len(data)
            data += body + bytes(-len(body) % 4)  # every tag starts on a 4-byte boundary
        entries.append(struct.pack(">4sII", signature, placed[body], len(body)))
    size = table_end + len(data)
    header = (
        struct.pack(">I4sI4s4s4s", size, b"lcms", 0x04300000, b"mntr", b"RGB ", b"XYZ ")
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
        + b"acsp"
        + bytes(24)  # platform, flags, manufacturer, model, attributes
        + struct.pack(">I", 0)  # perceptual rendering intent
        + _s15(D50)  # the PCS illuminant
        + bytes(4 + 16 + 28)  # creator, profile ID (none), reserved
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + b"".join(entries) + data

#!/usr/bin/env python3
"""Writes tests/fixtures/formats/: one small, well-formed file in each image format the service refuses
(everything but PNG, JPEG, GIF, BMP, WebP and TIFF), plus the OpenEXR file that once killed the server.

Written by hand with the standard library only, byte for byte reproducible, so the fixtures never depend on
which codecs some imaging library happens to ship.

  python3 scripts/make_format_fixtures.py
"""

import pathlib
import struct
import zlib

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "formats"
W = H = 8


def garment(w=W, h=H):
    """A light diamond on a dark background, 8-bit gray, row-major."""
    return bytes(200 if abs(x - w / 2 + 0.5) + abs(y - h / 2 + 0.5) < w / 2 else 10 for y in range(h) for x in range(w))


def png(w, h, gray):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + gray[y * w:(y + 1) * w] for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def exr_bomb():
    """A valid 64x64 ZIP-compressed RGB OpenEXR whose dataWindow.xmin is then set to -369,098,752.
    The display window stays 64x64, so an EXR decoder's dimension limits pass, and its own threads then try to
    allocate 35,433,486,336 bytes: an allocation failure aborts the process (the issue said "493-byte request"; the file written here is 509 bytes)."""
    side = 64

    def attr(name, kind, value):
        return name + b"\0" + kind + b"\0" + struct.pack("<i", len(value)) + value

    # B, G, R (a chlist is sorted by name): HALF, not linear, 1x1 sampling.
    channels = b"".join(c + b"\0" + struct.pack("<iB3xii", 1, 0, 1, 1) for c in (b"B", b"G", b"R")) + b"\0"
    header = (
        attr(b"channels", b"chlist", channels)
        + attr(b"compression", b"compression", b"\x03")  # ZIP: 16 scanlines per chunk
        + attr(b"dataWindow", b"box2i", struct.pack("<4i", 0, 0, side - 1, side - 1))
        + attr(b"displayWindow", b"box2i", struct.pack("<4i", 0, 0, side - 1, side - 1))
        + attr(b"lineOrder", b"lineOrder", b"\x00")
        + attr(b"pixelAspectRatio", b"float", struct.pack("<f", 1.0))
        + attr(b"screenWindowCenter", b"v2f", struct.pack("<2f", 0.0, 0.0))
        + attr(b"screenWindowWidth", b"float", struct.pack("<f", 1.0))
        + b"\0"
    )
    prefix = b"\x76\x2f\x31\x01" + struct.pack("<i", 2) + header
    chunks = []
    for y0 in range(0, side, 16):
        # 16 scanlines x 3 channels of half-float 0.5 (0x3800), then EXR's ZIP preprocessing: interleave,
        # then delta.
        plain = struct.pack("<H", 0x3800) * (side * 3 * 16)
        split = plain[0::2] + plain[1::2]
        delta = bytes([split[0]] + [(split[i] - split[i - 1] + 128) & 0xFF for i in range(1, len(split))])
        data = zlib.compress(delta, 9)
        chunks.append(struct.pack("<ii", y0, len(data)) + data)
    table_end = len(prefix) + 8 * len(chunks)
    offsets, at = [], table_end
    for c in chunks:
        offsets.append(at)
        at += len(c)
    exr = bytearray(prefix + b"".join(struct.pack("<Q", o) for o in offsets) + b"".join(chunks))
    at = exr.index(b"dataWindow\0box2i\0") + len(b"dataWindow\0box2i\0") + 4
    exr[at:at + 4] = struct.pack("<i", -369_098_752)
    return bytes(exr)


def radiance_hdr():
    gray = garment()
    pixels = b"".join(bytes([v, v, v, 128]) for v in gray)  # RGBE, flat scanlines (width < 8)
    return b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y %d +X %d\n" % (H, W) + pixels


def farbfeld():
    return b"farbfeld" + struct.pack(">II", W, H) + b"".join(struct.pack(">4H", v * 257, v * 257, v * 257, 65535) for v in garment())


def qoi():
    body = b"".join(bytes([0xFE, v, v, v]) for v in garment())  # QOI_OP_RGB per pixel
    return b"qoif" + struct.pack(">IIBB", W, H, 3, 0) + body + b"\0" * 7 + b"\1"


def pgm():
    return b"P5\n%d %d\n255\n" % (W, H) + garment()


def tga():
    # Uncompressed grayscale (image type 3), origin top-left.
    return struct.pack("<BBBHHBHHHHBB", 0, 0, 3, 0, 0, 0, 0, 0, W, H, 8, 0x20) + garment()


def ico():
    image = png(W, H, garment())
    entry = struct.pack("<BBBBHHII", W, H, 0, 0, 1, 32, len(image), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + image


def dds():
    # 4x4 DXT1: one 8-byte block. Header: size 124, flags CAPS|HEIGHT|WIDTH|PIXELFORMAT|LINEARSIZE.
    pixel_format = struct.pack("<II4s5I", 32, 0x4, b"DXT1", 0, 0, 0, 0, 0)
    header = struct.pack("<7I", 124, 0x1 | 0x2 | 0x4 | 0x1000 | 0x80000, 4, 4, 8, 0, 1) + b"\0" * 44
    header += pixel_format + struct.pack("<5I", 0x1000, 0, 0, 0, 0)
    return b"DDS " + header + struct.pack("<HHI", 0xFFFF, 0x0000, 0x00000000)


FILES = {
    "exr-bomb.exr": exr_bomb,
    "garment.hdr": radiance_hdr,
    "garment.ff": farbfeld,
    "garment.qoi": qoi,
    "garment.pgm": pgm,
    "garment.tga": tga,
    "garment.ico": ico,
    "garment.dds": dds,
}

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in FILES.items():
        data = make()
        (OUT / name).write_bytes(data)
        print(f"{OUT / name}: {len(data)} bytes")

"""Write the torchvision preprocessing goldens that tests/it/transforms.rs
compares against, so no Python is needed at Rust test time.

Needs the reference environment (torch 2.11.0, torchvision 0.26.0, pillow):
    . scripts/golden_env.sh && tch_vis_golden_setup
    "$TCH_VIS_GOLDEN_VENV/bin/python" scripts/make_preprocess_goldens.py

What it generates, under tests/golden/transforms/:
  images/*.png         small seeded pictures (smooth gradients, shapes and
                       noise, so resampling filters differ visibly): RGB,
                       grayscale and RGBA, landscape, portrait, extreme
                       (1000 x 20, 20 x 1000), odd sizes, sizes that are
                       scaled up and down. PNG is lossless, so every decoder
                       reads the same uint8 pixels.
  images/*.jpg         JPEGs for the decoder comparison: quality 90 4:2:0, and
                       (from a second seed) 4:2:2, 4:4:4, progressive,
                       grayscale, quality 50 and 100, restart markers, odd
                       sizes down to 9 x 7. The torchvision recipe is also
                       run on some of them (cases named jpeg_*). CMYK JPEGs
                       (Adobe polarity, as PIL writes them; from a third
                       seed), 4:4:4 and with the first component at 2 x 2,
                       and a YCCK JPEG (Adobe transform 2) copied from
                       tests/golden/sources/ (PIL writes no YCCK: libjpeg-turbo
                       wrote it, through the mozjpeg crate 0.10.13, from a
                       seeded CMYK picture with jpeg_set_colorspace(JCS_YCCK),
                       quality 90, its Y and K at 2 x 2).
  <case>.npy           float32 (C, H, W): the model input torchvision.transforms.v2
                       makes from the decoded uint8 RGB tensor
                       (torchvision.io.decode_image, mode RGB):
                         [Grayscale(1) when channels == 1,]
                         Resize(resize, interpolation, antialias),
                         CenterCrop(crop), ToDtype(float32, scale=True),
                         Normalize(mean, std)
  jpeg_<name>.tv.npy   uint8 (H, W, 3): torchvision.io.decode_jpeg of the JPEG
  jpeg_<name>.pil.npy  uint8 (H, W, 3): PIL's decode of the JPEG
  draft_<name>_<k>.pil.npy  uint8: PIL's decode of images/<name>.jpg with
                       draft("RGB", (W // k, H // k)), at scale 1/k (the
                       YCCK JPEG's too)
  images/*.tif         TIFF layouts (from a fourth seed) that need more than
                       the image crate: palette (PIL's 8-bit, plain and LZW;
                       1, 2 and 4-bit indices in both byte orders, written by
                       palette_tiff), grey with alpha, CMYK with black ink,
                       JPEG-compressed RGB (one strip, three, tiles written
                       by jpeg_tiled_tiff) and grey
  images/*.bmp         16-bit BMPs (written by bmp16: 5-6-5 and 5-5-5, with and
                       without bit fields, 40 and 108-byte headers, top-down)
  tiff_<stem>.pil.npy, bmp<stem>.pil.npy
                       uint8 (H, W, 3): PIL's convert("RGB") of each
  manifest.json        {"torch", "torchvision", "pillow", "cpu_capability",
                        "max_steps": 1.0, "mean_steps": 0.05,
                        "cases": [{"name", "image", "sidecar", "expected"}],
                        "jpegs": [{"name", "image", "torchvision", "pil"}],
                        "drafts": [{"image", "scale", "pil"}],
                        "layouts": [{"image", "mode", "pil"}]}
"sidecar" is the tch-vis sidecar of the case (input_size, channels, mean,
std, resize, interpolation, antialias, crop), "image" and the .npy names are
relative to tests/golden/transforms/. Everything is seeded: a rerun with the
same library versions writes the same bytes.
"""

import json
import os
import shutil

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "golden", "transforms")
SOURCES = os.path.join(ROOT, "tests", "golden", "sources")
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def picture(rng, h, w, mode="RGB"):
    """Gradient + shapes + a little noise: smooth areas, sharp edges, texture."""
    c0 = rng.integers(0, 256, 3).astype(np.float32)
    c1 = rng.integers(0, 256, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx / max(w - 1, 1) + yy / max(h - 1, 1)) / 2
    arr = c0 + (c1 - c0) * t[..., None]
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(1, max(w // 2, 2))), y0 + int(rng.integers(1, max(h // 2, 2)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(radius=0.7))
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if mode == "L":
        return img.convert("L")
    if mode == "RGBA":
        a = Image.fromarray(rng.integers(0, 256, (h, w)).astype(np.uint8), "L")
        img = img.copy()
        img.putalpha(a)
    return img


# (file stem, height, width, mode)
IMAGES = [
    ("land_120x160", 120, 160, "RGB"),
    ("port_160x120", 160, 120, "RGB"),
    ("wide_20x1000", 20, 1000, "RGB"),
    ("tall_1000x20", 1000, 20, "RGB"),
    ("small_30x45", 30, 45, "RGB"),
    ("odd_151x103", 151, 103, "RGB"),
    ("exact_28x37", 28, 37, "RGB"),
    ("gray_90x70", 90, 70, "L"),
    ("rgba_75x100", 75, 100, "RGBA"),
]

# (case suffix, sidecar keys beyond input_size/channels/mean/std, input_size)
RECIPES = [
    # Resize(28) + CenterCrop((24, 26)): the usual recipe, non-square crop.
    ("s28", {"resize": 28, "crop": [24, 26]}, [24, 26]),
]
EXTRA = [
    # resize [h, w] without crop; crop larger than the resize (zero padding);
    # odd crop offsets (x.5 rounds to even); channels 1 (Grayscale first).
    ("land_120x160", "exact", {"resize": [24, 26]}, [24, 26], 3),
    ("land_120x160", "pad", {"resize": 19, "crop": [24, 26]}, [24, 26], 3),
    ("odd_151x103", "oddcrop", {"resize": 31, "crop": [24, 26]}, [24, 26], 3),
    ("land_120x160", "gray", {"resize": 28, "crop": [24, 26]}, [24, 26], 1),
    ("gray_90x70", "gray", {"resize": 28, "crop": [24, 26]}, [24, 26], 1),
    ("wide_20x1000", "up", {"resize": 40, "crop": [24, 26]}, [24, 26], 3),
]
FILTERS = [("bilinear", True), ("bilinear", False), ("bicubic", True), ("bicubic", False)]
JPEGS = [("photo_120x160", 120, 160), ("photo_87x131", 87, 131)]
# (stem, h, w, PIL save options, mode): drawn from a second seed, so the
# pictures above keep their bytes.
MORE_JPEGS = [
    ("q90_422_75x101", 75, 101, {"quality": 90, "subsampling": 1}, "RGB"),
    ("q90_444_64x48", 64, 48, {"quality": 90, "subsampling": 0}, "RGB"),
    ("q85_420_prog_97x133", 97, 133, {"quality": 85, "subsampling": 2, "progressive": True}, "RGB"),
    ("q50_420_33x47", 33, 47, {"quality": 50, "subsampling": 2}, "RGB"),
    ("q100_420_9x7", 9, 7, {"quality": 100, "subsampling": 2}, "RGB"),
    ("q90_420_rst_81x117", 81, 117, {"quality": 90, "subsampling": 2, "restart_marker_blocks": 3}, "RGB"),
    ("q90_gray_70x90", 70, 90, {"quality": 90}, "L"),
]
# (stem, h, w, PIL save options): CMYK pictures, from a third seed.
CMYK_JPEGS = [
    ("cmyk_q90_444_61x83", 61, 83, {"quality": 90, "subsampling": 0}),
    ("cmyk_q90_420_70x52", 70, 52, {"quality": 90, "subsampling": 2}),
]
YCCK_JPEGS = ["ycck_q90_77x103"]
DRAFT_JPEGS = [
    ("q90_420_203x261", 203, 261, {"quality": 90, "subsampling": 2}),
    ("q90_444_117x171", 117, 171, {"quality": 90, "subsampling": 0}),
]
# TIFF layouts the `image` crate refuses or converts unlike PIL, from a
# fourth seed: (stem, h, w, how). "pil:MODE[:compression]" is PIL's own
# writer; "palette:BITS:ORDER" a palette TIFF written by `palette_tiff`
# (PIL writes only 8-bit indices), II or MM byte order.
TIFF_LAYOUTS = [
    ("p8_45x61", 45, 61, "pil:P"),
    ("p8_lzw_45x61", 45, 61, "pil:P:tiff_lzw"),
    ("p4_mm_37x53", 37, 53, "palette:4:MM"),
    ("p2_ii_29x31", 29, 31, "palette:2:II"),
    ("p1_mm_23x19", 23, 19, "palette:1:MM"),
    ("la_41x57", 41, 57, "pil:LA"),
    ("la_deflate_41x57", 41, 57, "pil:LA:tiff_adobe_deflate"),
    ("cmyk_43x59", 43, 59, "pil:CMYK"),
    ("cmyk_lzw_43x59", 43, 59, "pil:CMYK:tiff_lzw"),
]
# 16-bit BMPs (PIL writes none), written by `bmp16`, from the same seed
# after the TIFFs: (stem, h, w, "565" or "555", header size, bit fields?,
# top-down?).
BMP16 = [
    ("bmp565_40_33x47", 33, 47, "565", 40, True, False),
    ("bmp555_rgb_31x29", 31, 29, "555", 40, False, False),
    ("bmp555_40_td_27x35", 27, 35, "555", 40, True, True),
    ("bmp565_v4_29x43", 29, 43, "565", 108, True, False),
]
# JPEG-compressed TIFFs (PIL writes RGB ones with R, G, B components, no
# colour transform), drawn after the BMPs: one strip, three strips, grey.
JPEG_TIFFS = [
    ("jpeg_rgb_45x61", 45, 61, "pil:RGB:jpeg"),
    ("jpeg_rgb_3strips_300x200", 300, 200, "pil:RGB:jpeg"),
    ("jpeg_l_57x41", 57, 41, "pil:L:jpeg"),
    ("jpeg_rgb_tiled_37x45", 37, 45, "tiles:16"),
]


def jpeg_tiled_tiff(path, rgb, tile):
    """A tiled JPEG-compressed RGB TIFF (PIL writes no tiles): each
    `tile` x `tile` tile a whole JPEG of its own (PIL's encoder, R, G, B
    components, no colour transform or subsampling; no JPEGTables), the
    tiles at the right and bottom edges padded by repeating the last pixels."""
    import io
    h, w, _ = rgb.shape
    across, down = -(-w // tile), -(-h // tile)
    padded = np.pad(rgb, ((0, down * tile - h), (0, across * tile - w), (0, 0)), mode="edge")
    tiles = []
    for ty in range(down):
        for tx in range(across):
            part = padded[ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile]
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(part)).save(buf, "JPEG", quality=90, subsampling=0,
                                                              keep_rgb=True)
            tiles.append(buf.getvalue())
    e = "<"
    data = b"".join(tiles)
    data_at = 8
    bits_at = data_at + len(data)
    offs_at = bits_at + 6
    counts_at = offs_at + 4 * len(tiles)
    offsets, at = [], data_at
    for t in tiles:
        offsets.append(at)
        at += len(t)
    entries = [
        (256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, bits_at), (259, 3, 1, 7), (262, 3, 1, 2),
        (277, 3, 1, 3), (284, 3, 1, 1), (322, 3, 1, tile), (323, 3, 1, tile),
        (324, 4, len(tiles), offs_at), (325, 4, len(tiles), counts_at),
    ]
    body = data + np.array([8, 8, 8], e + "u2").tobytes()
    body += np.array(offsets, e + "u4").tobytes() + np.array([len(t) for t in tiles], e + "u4").tobytes()
    write_tiff(path, "II", body, entries)


def palette_tiff(path, indices, bits, order, colormap):
    """An uncompressed one-strip palette TIFF: `indices` (h, w) packed
    `bits` to a byte, first pixel in the high bits, rows byte-aligned;
    `colormap` (3, 2**bits) uint16 in TIFF's order (all red, then green,
    then blue)."""
    h, w = indices.shape
    per = 8 // bits
    row = -(-w // per)
    data = bytearray(row * h)
    for y in range(h):
        for x in range(w):
            data[y * row + x // per] |= int(indices[y, x]) << (8 - bits * (x % per + 1))
    e = "<" if order == "II" else ">"
    entries = []  # (tag, type, count, value bytes or offset-held bytes)
    cmap = np.asarray(colormap, dtype=e + "u2").tobytes()
    # Laid out as: header, strip, colour map, directory.
    strip_at = 8
    cmap_at = strip_at + len(data)
    entries = [
        (256, 3, 1, w), (257, 3, 1, h), (258, 3, 1, bits), (259, 3, 1, 1),
        (262, 3, 1, 3), (273, 4, 1, strip_at), (277, 3, 1, 1), (278, 3, 1, h),
        (279, 4, 1, len(data)), (320, 3, len(cmap) // 2, cmap_at),
    ]
    write_tiff(path, order, data + cmap, entries)


def write_tiff(path, order, body, entries):
    """A classic TIFF: the 8-byte header, `body` (what the entries' offsets
    point into, from byte 8), then the one directory of `entries` (tag,
    type, count, value or offset; SHORT (3) or LONG (4))."""
    e = "<" if order == "II" else ">"
    out = bytearray(order.encode() + np.array([42], e + "u2").tobytes()
                    + np.array([8 + len(body)], e + "u4").tobytes())
    out += body
    out += np.array([len(entries)], e + "u2").tobytes()
    for tag, typ, count, value in entries:
        out += np.array([tag, typ], e + "u2").tobytes() + np.array([count], e + "u4").tobytes()
        if typ == 3 and count == 1:
            out += np.array([value, 0], e + "u2").tobytes()
        else:
            out += np.array([value], e + "u4").tobytes()
    out += np.array([0], e + "u4").tobytes()
    with open(path, "wb") as f:
        f.write(bytes(out))


def bmp16(path, rgb, layout, header, bitfields, top_down):
    """A 16-bit BMP of `rgb` (h, w, 3) uint8, each channel cut to its top
    5 (or green's 6) bits: `header` 40 (masks after it when `bitfields`)
    or 108 (masks inside), rows padded to 4 bytes, bottom-up unless
    `top_down`. Without `bitfields`, 5-5-5 as BI_RGB."""
    h, w, _ = rgb.shape
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    if layout == "565":
        masks, px = (0xF800, 0x7E0, 0x1F), (r >> 3) << 11 | (g >> 2) << 5 | (b >> 3)
    else:
        masks, px = (0x7C00, 0x3E0, 0x1F), (r >> 3) << 10 | (g >> 3) << 5 | (b >> 3)
    assert bitfields or layout == "555"
    row = (w * 2 + 3) // 4 * 4
    rows = px if top_down else px[::-1]
    data = b"".join(rows[y].astype("<u2").tobytes().ljust(row, b"\0") for y in range(h))
    extra = 12 if bitfields and header == 40 else 0
    offset = 14 + header + extra
    info = np.array([header, w, -h if top_down else h], "<i4").tobytes()
    info += np.array([1, 16], "<u2").tobytes()
    info += np.array([3 if bitfields else 0, len(data), 2835, 2835, 0, 0], "<u4").tobytes()
    if header == 108:
        info += np.array(list(masks) + [0], "<u4").tobytes()
        info = info.ljust(108, b"\0")
    elif bitfields:
        info += np.array(masks, "<u4").tobytes()
    out = b"BM" + np.array([offset + len(data), 0, offset], "<u4").tobytes() + info + data
    with open(path, "wb") as f:
        f.write(out)


def tiff_layout(rng, path, h, w, how):
    kind, *rest = how.split(":")
    if kind == "tiles":
        jpeg_tiled_tiff(path, np.asarray(picture(rng, h, w)), int(rest[0]))
        return
    if kind == "palette":
        bits, order = int(rest[0]), rest[1]
        n = 1 << bits
        colormap = rng.integers(0, 65536, (3, n))
        # Indices from a picture's luma, so neighbours share colours.
        luma = np.asarray(picture(rng, h, w).convert("L")).astype(np.int64)
        palette_tiff(path, luma * n // 256, bits, order, colormap)
        return
    mode = rest[0]
    options = {"compression": rest[1]} if len(rest) > 1 else {}
    img = picture(rng, h, w)
    if mode == "P":
        img = img.quantize(64)
    elif mode == "L":
        img = img.convert("L")
    elif mode == "LA":
        img = img.convert("L")
        img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w)).astype(np.uint8), "L"))
    elif mode == "CMYK":
        # Ink from the picture, black from another's luma.
        k = np.asarray(picture(rng, h, w).convert("L"))
        img = Image.fromarray(np.dstack([255 - np.asarray(img), k]).astype(np.uint8), "CMYK")
    img.save(path, **options)


JPEG_RECIPES = [
    ("photo_120x160", {"resize": 28, "crop": [24, 26]}),
    ("q85_420_prog_97x133", {"resize": [24, 26]}),
    ("q90_422_75x101", {"resize": 31, "crop": [24, 26]}),
]


def expected(path, keys, input_size, channels):
    img = decode_image(read_file(path), mode=ImageReadMode.RGB)
    pil = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(img, pil.contiguous()), f"{path}: torchvision and PIL decode differently"
    interp = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[
        keys.get("interpolation", "bilinear")
    ]
    ops = []
    if channels == 1:
        ops.append(v2.Grayscale(1))
    r = keys["resize"]
    ops.append(v2.Resize(r if isinstance(r, int) else list(r), interpolation=interp,
                         antialias=keys.get("antialias", True)))
    ops.append(v2.CenterCrop(keys.get("crop", input_size)))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    ops.append(v2.Normalize(MEAN[:channels] if channels == 3 else [MEAN[0]],
                            STD[:channels] if channels == 3 else [STD[0]]))
    x = v2.Compose(ops)(img)
    assert tuple(x.shape) == (channels, *input_size), x.shape
    return x.numpy().astype(np.float32)


def main():
    torch.set_num_threads(1)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(os.path.join(OUT, "images"))
    rng = np.random.default_rng(0)
    for stem, h, w, mode in IMAGES:
        picture(rng, h, w, mode).save(os.path.join(OUT, "images", stem + ".png"), optimize=True)
    jpegs = []

    def save_jpeg(stem, img, **options):
        """Writes images/STEM.jpg (a copy of tests/golden/sources/STEM.jpg
        when `img` is None) and torchvision's and PIL's decodes of it."""
        rel = f"images/{stem}.jpg"
        path = os.path.join(OUT, rel)
        if img is None:
            shutil.copyfile(os.path.join(SOURCES, stem + ".jpg"), path)
        else:
            img.save(path, **options)
        tv = decode_jpeg(read_file(path), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
        pil = np.asarray(Image.open(path).convert("RGB"))
        np.save(os.path.join(OUT, f"jpeg_{stem}.tv.npy"), np.ascontiguousarray(tv))
        np.save(os.path.join(OUT, f"jpeg_{stem}.pil.npy"), np.ascontiguousarray(pil))
        jpegs.append({"name": stem, "image": rel, "torchvision": f"jpeg_{stem}.tv.npy",
                      "pil": f"jpeg_{stem}.pil.npy"})

    for stem, h, w in JPEGS:
        save_jpeg(stem, picture(rng, h, w), quality=90, subsampling=2)
    rng_jpeg = np.random.default_rng(1)
    for stem, h, w, options, mode in MORE_JPEGS:
        img = picture(rng_jpeg, h, w)
        save_jpeg(stem, img.convert("L") if mode == "L" else img, **options)
    rng_cmyk = np.random.default_rng(2)
    for stem, h, w, options in CMYK_JPEGS:
        # Ink from one picture, black from another's luma (below full ink).
        rgb = np.asarray(picture(rng_cmyk, h, w))
        k = np.asarray(picture(rng_cmyk, h, w).convert("L")) // 2
        cmyk = np.dstack([255 - rgb, k]).astype(np.uint8)
        save_jpeg(stem, Image.fromarray(cmyk, "CMYK"), **options)
    for stem in YCCK_JPEGS:
        save_jpeg(stem, None)

    # PIL's draft mode (libjpeg's scaled IDCT) at each scale, on a JPEG
    # drawn after the others (their pictures keep their bytes).
    drafts = []
    for stem, h, w, options in DRAFT_JPEGS + [(s, None, None, None) for s in YCCK_JPEGS]:
        rel = f"images/{stem}.jpg"
        path = os.path.join(OUT, rel)
        if options is None:
            # The YCCK JPEG, written above: CMYK's drafts too.
            w, h = Image.open(path).size
        else:
            picture(rng_jpeg, h, w).save(path, **options)
        for k in (2, 4, 8):
            im = Image.open(path)
            im.draft("RGB", (w // k, h // k))
            arr = np.asarray(im.convert("RGB"))
            assert arr.shape[:2] == (-(-h // k), -(-w // k)), (arr.shape, k)
            name = f"draft_{stem}_{k}.pil.npy"
            np.save(os.path.join(OUT, name), np.ascontiguousarray(arr))
            drafts.append({"image": rel, "scale": k, "pil": name})

    # Other TIFF layouts and 16-bit BMPs, PIL's RGB conversion of each.
    layouts = []
    rng_tiff = np.random.default_rng(3)

    def tiff_golden(stem, h, w, how):
        rel = f"images/{stem}.tif"
        path = os.path.join(OUT, rel)
        tiff_layout(rng_tiff, path, h, w, how)
        im = Image.open(path)
        assert im.mode == {"pil": how.split(":")[1:2], "palette": ["P"], "tiles": ["RGB"]}[
            how.split(":")[0]][0], im.mode
        pil = np.asarray(im.convert("RGB"))
        assert pil.shape == (h, w, 3), pil.shape
        name = f"tiff_{stem}.pil.npy"
        np.save(os.path.join(OUT, name), np.ascontiguousarray(pil))
        jpeg = "jpeg" in how or how.startswith("tiles")
        layouts.append({"image": rel, "mode": im.mode + ";jpeg" if jpeg else im.mode, "pil": name})

    for stem, h, w, how in TIFF_LAYOUTS:
        tiff_golden(stem, h, w, how)
    for stem, h, w, layout, header, bitfields, top_down in BMP16:
        rel = f"images/{stem}.bmp"
        path = os.path.join(OUT, rel)
        bmp16(path, np.asarray(picture(rng_tiff, h, w)), layout, header, bitfields, top_down)
        im = Image.open(path)
        assert im.mode == "RGB", im.mode
        pil = np.asarray(im.convert("RGB"))
        assert pil.shape == (h, w, 3), pil.shape
        name = f"{stem}.pil.npy"
        np.save(os.path.join(OUT, name), np.ascontiguousarray(pil))
        layouts.append({"image": rel, "mode": "RGB;16" if layout == "565" else "RGB;15",
                        "pil": name})
    for stem, h, w, how in JPEG_TIFFS:
        tiff_golden(stem, h, w, how)

    plan = []
    for stem, _, _, _ in IMAGES:
        for suffix, keys, size in RECIPES:
            plan.append((stem, suffix, keys, size, 3))
    plan += EXTRA
    cases = []
    plan = [(f"images/{stem}.png", stem, suffix, keys, size, channels)
            for stem, suffix, keys, size, channels in plan]
    plan += [(f"images/{stem}.jpg", f"jpeg_{stem}", "tv", keys, [24, 26], 3)
             for stem, keys in JPEG_RECIPES]
    for rel, stem, suffix, keys, size, channels in plan:
        for interp, aa in FILTERS:
            name = f"{stem}.{suffix}.{interp}.{'aa' if aa else 'noaa'}.c{channels}"
            k = dict(keys, interpolation=interp, antialias=aa)
            x = expected(os.path.join(OUT, rel), k, size, channels)
            np.save(os.path.join(OUT, name + ".npy"), x)
            sidecar = {
                "input_size": size,
                "channels": channels,
                "mean": MEAN if channels == 3 else [MEAN[0]],
                "std": STD if channels == 3 else [STD[0]],
                **k,
            }
            cases.append({"name": name, "image": rel, "sidecar": sidecar, "expected": name + ".npy"})

    manifest = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "max_steps": 1.0,
        "mean_steps": 0.05,
        "cases": cases,
        "jpegs": jpegs,
        "drafts": drafts,
        "layouts": layouts,
    }
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {len(cases)} cases and {len(jpegs)} JPEGs to {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

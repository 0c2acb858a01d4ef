"""The bad-input corpus: every kind of body a client can get wrong, each with the answer it must get.

``corpus()`` builds it in memory (about a second, seeded, the same bytes every time): a list of ``Case`` with

* ``kind``: which models it is for: ``image`` (the image classifiers and super-resolution), ``text`` (the text
  models), ``any`` (every model: the same status, and reason where one is given, from all of them);
* ``content_type``: the ``Content-Type`` a client sends with it, exactly (multipart with its boundary); ``""`` means
  no ``Content-Type`` header at all;
* ``status``: the status ``/predictions`` answers (200 for the unusual inputs that are fine: a 16-bit PNG, a
  CMYK JPEG, an animated GIF, ...), or None for "any 4xx"; ``reason``: the ``error`` of the JSON body, or None for
  any. ``/explanations`` answers the same refusals; a model that does not explain answers 400 ``no_explanations``
  to an input it would have accepted.

The expectations hold for the models as ``archives/*.yaml`` configure them (image ``max_pixels`` from 1 MP for
super-resolution to 40 MP, the handlers' default bounds otherwise) and for every way to reach them: through the
front door (nginx forwards multipart and form-urlencoded bodies as ``application/octet-stream`` with the client's
Content-Type in ``X-Original-Content-Type``) and straight to TorchServe for the other Content-Types. Nothing in it
may ever get a 5xx.

Categories: not an image, empty, truncated, corrupt; decompression bombs and huge declared sizes in tiny files; extreme
aspect ratios both ways (EXIF rotation included); unusual but valid images (16-bit, CMYK, palette with transparency,
animated GIF with many frames, multi-page TIFF); text that is not UTF-8, empty, blank, too long, too many; JSON
nested deep, of the wrong types, with numbers too long to convert, with lone surrogates; base64 that is not base64;
form-urlencoded bodies; malformed multipart bodies (no boundary, wrong boundary, cut short, no parts, too many parts,
parts without names, LF line ends) and well-formed ones without a file.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

SEED = 20240611
BOUNDARY = "----corpus7MA4YWxkTrZu0gW"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
FORM = "application/x-www-form-urlencoded"
OCTETS = "application/octet-stream"
PNG = "image/png"
JSON = "application/json"
TEXT = "text/plain"
NONE = ""  # no Content-Type header


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "image" | "text" | "any"
    content_type: str  # as the client sends it; "" for none
    body: bytes
    status: int | None  # None: any 4xx
    reason: str | None  # None: any


# --- images ----------------------------------------------------------------------------------------------------------

def saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, idat: bytes, bit_depth: int = 8, color: int = 0) -> bytes:
    """A PNG that declares width x height (grayscale) and carries ``idat`` as its compressed rows."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def declared_png(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge size: one row of data, then nothing."""
    return png_header(width, height, zlib.compress(bytes(width + 1)))


def bomb_png(width: int, height: int) -> bytes:
    """A real decompression bomb: every row is there, zeros, deflated about 1000 to 1."""
    return png_header(width, height, zlib.compress(bytes((width + 1) * height), 6))


def minimal_tiff(width: int, height: int, strip_offset: int = 8, strip_bytes: int = 1, tile: int = 0) -> bytes:
    """A little-endian TIFF of one 8-bit grayscale strip (or tile) that declares its own size and data offsets."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1)]
    if tile:
        tags += [(322, 4, tile), (323, 4, tile), (324, 4, strip_offset), (325, 4, strip_bytes)]
    else:
        tags += [(273, 4, strip_offset), (278, 4, height), (279, 4, strip_bytes)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", tag, kind, 1, value)
                                                    for tag, kind, value in sorted(tags)) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 16) + bytes(8) + ifd


def patched(data: bytes, offset: int, packed: bytes) -> bytes:
    return data[:offset] + packed + data[offset + len(packed):]


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0) declares another size; the scan data stays that of the small image."""
    sof = jpeg.index(b"\xff\xc0")
    return patched(jpeg, sof + 5, struct.pack(">HH", height, width))


def with_orientation(image: Image.Image, orientation: int, **options) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return saved(image, "JPEG", exif=exif.tobytes(), **options)


def repeated_scans(progressive_jpeg: bytes, times: int) -> bytes:
    """A progressive JPEG with its last scan repeated: libjpeg decodes every one of them over the whole image."""
    last, end = progressive_jpeg.rindex(b"\xff\xda"), progressive_jpeg.rindex(b"\xff\xd9")
    return progressive_jpeg[:end] + progressive_jpeg[last:end] * times + progressive_jpeg[end:]


def padded_png(png: bytes, chunks: int) -> bytes:
    """A valid PNG with ``chunks`` empty ancillary chunks of an unknown kind between its header and its data: each
    one is a read (and a CRC) for Pillow."""
    header_end = 8 + 25  # the signature and the IHDR chunk
    return png[:header_end] + chunk(b"abCd", b"") * chunks + png[header_end:]


def filled_jpeg(jpeg: bytes, fill: int) -> bytes:
    """A JPEG with ``fill`` 0xFF fill bytes before its first marker after SOI (allowed by the standard; Pillow reads
    them one at a time)."""
    return jpeg[:2] + b"\xff" * fill + jpeg[2:]


def commented_gif(gif: bytes, blocks: int) -> bytes:
    """A GIF with one comment extension of ``blocks`` one-byte sub-blocks before its image."""
    image = gif.index(b",")  # the image descriptor
    return gif[:image] + b"!\xfe" + b"\x01x" * blocks + b"\x00" + gif[image:]


def ico_with_png(declared: int, png: bytes) -> bytes:
    """An ICO whose directory says declared x declared, holding a PNG of another size."""
    entry = struct.pack("<BBBBHHII", declared, declared, 0, 0, 1, 32, len(png), 22)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


# --- multipart -------------------------------------------------------------------------------------------------------

def part(name: str | None, data: bytes, filename: str | None = None, content_type: str | None = None) -> bytes:
    disposition = "form-data" + (f'; name="{name}"' if name is not None else "")
    disposition += f'; filename="{filename}"' if filename is not None else ""
    lines = [f"Content-Disposition: {disposition}"] + ([f"Content-Type: {content_type}"] if content_type else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def multipart(*parts: bytes, boundary: str = BOUNDARY) -> bytes:
    """A multipart/form-data body as curl -F writes it."""
    mark = f"--{boundary}".encode()
    return b"".join(mark + b"\r\n" + p + b"\r\n" for p in parts) + mark + b"--\r\n"


# --- the corpus ------------------------------------------------------------------------------------------------------

def image_cases(rng: np.random.RandomState) -> list[Case]:
    photo = Image.fromarray(rng.randint(0, 256, (48, 64, 3), dtype=np.uint8))
    png, jpeg = saved(photo, "PNG"), saved(photo, "JPEG", quality=90)
    big_jpeg = saved(Image.fromarray(rng.randint(0, 256, (240, 320, 3), dtype=np.uint8)), "JPEG", quality=90)
    strip_tall, strip_wide = Image.new("L", (1, 60_000), 128), Image.new("L", (60_000, 1), 128)
    bmp = saved(Image.new("RGB", (4, 4)), "BMP")
    gif = saved(Image.new("P", (4, 4)), "GIF")
    frames = [Image.new("P", (16, 16), index % 256) for index in range(300)]
    pages = [Image.new("L", (32, 24), 60 * index) for index in range(3)]
    palette = Image.new("P", (40, 30), 1)
    palette.info["transparency"] = 1
    deep = Image.fromarray((rng.randint(0, 65536, (30, 40))).astype(np.uint16))
    corrupt_png = bytearray(png)
    corrupt_png[60:160] = rng.randint(0, 256, 100, dtype=np.uint8).tobytes()
    zero_png = declared_png(0, 100)

    def case(name, body, status, reason, content_type=OCTETS):
        return Case(name, "image", content_type, body, status, reason)

    return [
        # not an image
        case("text as image", b"hello, this is not an image", 400, "not_an_image"),
        case("html as image", b"<!doctype html><html><body>hi</body></html>", 400, "not_an_image"),
        # valid files made of very many small pieces: each a read of Python code in Pillow
        case("png with 100000 empty chunks", padded_png(png, 100_000), 400, "too_many_segments"),
        case("jpeg with 100000 fill bytes", filled_jpeg(jpeg, 100_000), 400, "too_many_segments"),
        case("gif with 100000 comment blocks", commented_gif(gif, 100_000), 400, "too_many_segments"),
        case("png with 100 empty chunks", padded_png(png, 100), 200, None),
        case("postscript (eps) that loops for ever", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n"
                                                     b"{ } loop\nshowpage\n", 400, "not_an_image"),
        case("random bytes", rng.randint(0, 256, 2000, dtype=np.uint8).tobytes(), 400, "not_an_image"),
        case("png signature only", b"\x89PNG\r\n\x1a\n", 400, "not_an_image"),
        case("json object to an image model", b'{"image": "cat.jpg"}', 400, "unexpected_json", JSON),
        case("json list to an image model", b"[1, 2, 3]", 400, "unreadable_body", JSON),
        case("json number to an image model", b"12345", 400, "unreadable_body", JSON),
        case("json null to an image model", b"null", 400, "empty_body", JSON),
        case("text that is not base64", b"this is not base64!", 400, "not_base64", TEXT),
        case("json string that is not base64", b'"not base64 either"', 400, "not_base64", JSON),
        case("base64 of text", base64.b64encode(b"just some text"), 400, "not_an_image", TEXT),
        case("form-urlencoded fields", b"data=cat.jpg&x=1", 400, "not_an_image", FORM),
        # truncated and corrupt
        case("truncated jpeg", big_jpeg[: len(big_jpeg) // 2], 400, "truncated_image"),
        case("truncated png", png[: len(png) // 2], 400, "truncated_image"),
        case("jpeg header only", big_jpeg[:200], 400, "truncated_image"),
        case("corrupt png data", bytes(corrupt_png), 400, "corrupt_image"),
        case("png of zero width", zero_png, 400, None),
        case("tiff whose strip is past the end", minimal_tiff(64, 64, strip_offset=1_000_000, strip_bytes=4096),
             400, "truncated_image"),
        case("tiff with a huge tile", minimal_tiff(16, 16, strip_offset=8, strip_bytes=16, tile=65_536), 400, None),
        case("ico declaring a size its png is not", ico_with_png(16, saved(Image.new("RGBA", (64, 64)), "PNG")),
             200, None),  # Pillow reads the PNG's own header: the bounds see its real size
        case("ico whose png declares 10000x10000", ico_with_png(16, declared_png(10_000, 10_000)), 413,
             "image_too_large"),
        # bombs and huge declared sizes in tiny files
        case("png bomb 10000x10000", bomb_png(10_000, 10_000), 413, "image_too_large"),
        case("png declaring 8000x6000", declared_png(8000, 6000), 413, "image_too_large"),
        case("png declaring 100000x100000", declared_png(100_000, 100_000), 413, "image_too_large"),
        case("jpeg declaring 65000x65000", jpeg_with_size(jpeg, 65_000, 65_000), 413, "image_too_large"),
        case("gif declaring a 65535x65535 screen", patched(gif, 6, struct.pack("<HH", 65_535, 65_535)),
             413, "image_too_large"),
        case("bmp declaring 50000x50000", patched(bmp, 18, struct.pack("<ii", 50_000, 50_000)),
             413, "image_too_large"),
        case("tiff declaring 100000x100000", minimal_tiff(100_000, 100_000), 413, "image_too_large"),
        case("progressive jpeg of 1000 scans", repeated_scans(saved(Image.new("RGB", (640, 480)), "JPEG",
                                                                    progressive=True), 990), 400, "too_many_scans"),
        # extreme aspect ratios, both ways, EXIF rotation included
        case("png 1x60000", saved(strip_tall, "PNG"), 400, "extreme_aspect_ratio"),
        case("png 60000x1", saved(strip_wide, "PNG"), 400, "extreme_aspect_ratio"),
        case("png 2x1000", saved(Image.new("L", (2, 1000)), "PNG"), 400, "extreme_aspect_ratio"),
        case("bmp top-down 1x60000", patched(bmp, 18, struct.pack("<ii", 1, -60_000)), 400, "extreme_aspect_ratio"),
        case("jpeg 60000x1 rotated by exif", with_orientation(strip_wide.convert("RGB"), 6), 400,
             "extreme_aspect_ratio"),
        case("jpeg 1x60000 rotated by exif", with_orientation(strip_tall.convert("RGB"), 8), 400,
             "extreme_aspect_ratio"),
        case("16-bit png 1x5000", saved(Image.fromarray(np.zeros((5000, 1), np.uint16)), "PNG"), 400,
             "extreme_aspect_ratio"),
        case("gif of 300 frames 1x40 each", saved(Image.new("P", (1, 40)), "GIF", save_all=True,
                                                  append_images=[Image.new("P", (1, 40), 1)] * 299), 400,
             "extreme_aspect_ratio"),
        # unusual but valid: answered
        case("panorama 3000x100 rotated by exif", with_orientation(Image.new("RGB", (3000, 100), (90, 120, 200)), 8),
             200, None),
        case("16-bit grayscale png", saved(deep, "PNG"), 200, None),
        case("png 1x1", saved(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), 200, None),
        case("png 1x32 (the largest ratio allowed)", saved(Image.new("L", (1, 32), 99), "PNG"), 200, None),
        case("cmyk jpeg", saved(Image.new("CMYK", (64, 48), (10, 200, 30, 0)), "JPEG"), 200, None),
        case("palette png with transparency", saved(palette, "PNG"), 200, None),
        case("animated gif of 300 frames", saved(frames[0], "GIF", save_all=True, append_images=frames[1:]), 200,
             None),
        case("multi-page tiff", saved(pages[0], "TIFF", save_all=True, append_images=pages[1:]), 200, None),
        case("1-bit bmp", saved(Image.new("1", (33, 17), 1), "BMP"), 200, None),
        case("png sent as application/json", png, 200, None, JSON),
        case("png sent as text/plain", png, 200, None, TEXT),
        case("png sent as form-urlencoded (curl --data-binary)", png, 200, None, FORM),
        case("png sent without a content type", png, 200, None, NONE),
        case("png sent as image/png", png, 200, None, PNG),
        case("jpeg labelled image/png", jpeg, 200, None, PNG),
        case("text labelled image/png", b"a cat on a mat", 400, "not_an_image", PNG),
        case("truncated png labelled image/png", png[:100], 400, None, PNG),
        case("png as base64 text", base64.b64encode(png), 200, None, TEXT),
        # multipart: well-formed
        case("multipart png under data", multipart(part("data", png, "cat.png", "image/png")), 200, None,
             MULTIPART),
        case("multipart png under another name", multipart(part("note", b"hello"),
                                                           part("file", png, "cat.png", "image/png")), 200, None,
             MULTIPART),
        case("multipart with a preamble", b"this is a preamble\r\n" + multipart(part("data", png, "a.png")), 200,
             None, MULTIPART),
        case("multipart with a quoted boundary", multipart(part("data", jpeg, "a.jpg"), boundary="a b:c"), 200,
             None, 'multipart/form-data; boundary="a b:c"'),
        case("multipart text field that is not an image", multipart(part("data", b"cat.jpg")), 400, "not_an_image",
             MULTIPART),
        case("multipart file that is not an image", multipart(part("data", b"%PDF-1.4 ...", "a.pdf")), 400,
             "not_an_image", MULTIPART),
        case("multipart truncated image", multipart(part("data", big_jpeg[:3000], "a.jpg")), 400, "truncated_image",
             MULTIPART),
    ]


def text_cases(rng: np.random.RandomState) -> list[Case]:
    words = np.array("the cat sat on a warm mat while markets rallied and rockets rose".split())
    sentence = " ".join(rng.choice(words, 12)).encode()

    def case(name, body, status, reason, content_type=TEXT):
        return Case(name, "text", content_type, body, status, reason)

    deep_list = b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    deep_object = b'{"text": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}"
    parsed_deep = b'{"texts": ' + b"[" * 500 + b'"a"' + b"]" * 500 + b"}"  # TorchServe's parser still reads it
    return [
        # not UTF-8
        case("latin-1 text", "café crème, très bon".encode("latin-1"), 400, "not_utf8"),
        case("latin-1 text labelled latin-1", "café".encode("latin-1"), 400, "not_utf8",
             "text/plain; charset=latin-1"),
        case("utf-16 text", "hello world".encode("utf-16"), 400, "not_utf8"),
        case("binary as text", rng.randint(128, 256, 500, dtype=np.uint8).tobytes(), 400, "not_utf8", OCTETS),
        case("png to a text model", saved(Image.new("RGB", (8, 8)), "PNG"), 400, "not_utf8", OCTETS),
        case("form-urlencoded latin-1", "q=café".encode("latin-1"), 400, "not_utf8", FORM),
        case("lone surrogate in json", b'{"text": "bad \\ud800 surrogate"}', 400, "not_utf8", JSON),
        case("lone surrogate in json texts", b'{"texts": ["fine", "\\udfff"]}', 400, "not_utf8", TEXT),
        # empty and blank
        case("blank text", b"   \n\t  ", 400, "empty_text"),
        case("blank json text", b'{"text": "  \\n "}', 400, "empty_text", JSON),
        case("one blank text among texts", b'{"texts": ["a cat", ""]}', 400, "empty_text", JSON),
        # too long, too many, too large
        case("text of 30000 characters", b"word " * 6000, 413, "text_too_long"),
        case("json text of 30000 characters", json.dumps({"text": "word " * 6000}).encode(), 413, "text_too_long",
             JSON),
        case("one long text among texts", json.dumps({"texts": ["a cat", "x" * 20_001]}).encode(), 413,
             "text_too_long", JSON),
        case("body of 5 MB", b"many words " * 480_000, 413, "body_too_large"),
        case("json body of 5 MB as text", json.dumps({"text": "y" * 5_000_000}).encode(), 413, "body_too_large"),
        case("100000 texts", json.dumps({"texts": ["a"] * 100_000}).encode(), 413, "too_many_texts", JSON),
        case("65 texts", json.dumps({"texts": ["a cat"] * 65}).encode(), 413, "too_many_texts", JSON),
        case("64 texts of 2000 characters", json.dumps({"texts": ["word " * 400] * 64}).encode(), 413,
             "too_much_text", JSON),
        case("json of 32000 escaped quotes", b'{"' + b'\\"' * 32_000, 400, "bad_json", TEXT),
        case("json of 32000 escaped quotes as json", b'{"' + b'\\"' * 32_000, 400, "bad_json", JSON),
        # deeply nested JSON
        case("json 100000 deep", deep_list, 400, "json_too_deep", JSON),
        case("json 100000 deep as text", deep_list, 400, "json_too_deep", TEXT),
        case("json 100000 deep without a content type", deep_list, 400, "json_too_deep", NONE),
        case("json objects 50000 deep", deep_object, 400, "json_too_deep", JSON),
        case("json 500 deep", parsed_deep, 400, "no_text", JSON),
        case("json 500 deep as text", parsed_deep, 400, "json_too_deep", TEXT),
        # JSON of the wrong types
        case("text is a number", b'{"text": 5}', 400, "no_text", JSON),
        case("text is null", b'{"text": null}', 400, "no_text", JSON),
        case("text is NaN", b'{"text": NaN}', 400, "no_text", JSON),
        case("texts of numbers", b'{"texts": [1, 2]}', 400, "no_text", JSON),
        case("texts of nulls", b'{"texts": [null]}', 400, "no_text", JSON),
        case("texts of lists", b'{"texts": [["a cat"]]}', 400, "no_text", JSON),
        case("texts is a string", b'{"texts": "a cat"}', 400, "no_text", JSON),
        case("texts is empty", b'{"texts": []}', 400, "no_text", JSON),
        case("no text key", b'{"sentence": "a cat"}', 400, "no_text", JSON),
        case("many wrong keys", json.dumps({f"key{i}\r\n": i for i in range(10_000)}).encode(), 400, "no_text",
             JSON),
        case("json list", b'["a cat", "a dog"]', 400, "no_text", JSON),
        case("json number", b"42", 400, "no_text", JSON),
        case("json null", b"null", 400, "no_text", JSON),
        case("json true", b"true", 400, "no_text", JSON),
        case("a number of 5000 digits", b'{"texts": [' + b"7" * 5000 + b"]}", 400, "bad_json", JSON),
        case("a number of 5000 digits as text", b'{"text": ' + b"7" * 5000 + b"}", 400, "bad_json"),
        case("unterminated json", b'{"text": "unterminated', 400, "bad_json", JSON),
        case("json with trailing garbage", b'{"text": "a cat"} and more', 400, "bad_json"),
        case("json with a 100000-character key", json.dumps({"k" * 100_000: 1}).encode(), 400, "no_text", JSON),
        # unusual but valid: answered
        case("plain sentence", sentence, 200, None),
        case("sentence without a content type", sentence, 200, None, NONE),
        case("sentence as form-urlencoded (curl -d)", sentence, 200, None, FORM),
        case("control characters", b"\x00\x01\x02 \x7f", 200, None),
        case("text of 19000 characters, truncated", b"cats " * 3800, 200, None),
        case("8 texts", json.dumps({"texts": ["a cat"] * 8}).encode(), 200, None, JSON),
        case("json string body", b'"a cat on a mat"', 200, None, JSON),
        case("emoji and scripts", "猫が寝ている 🐱 кошка".encode(), 200, None),
        case("multipart text under data", multipart(part("data", sentence)), 200, None, MULTIPART),
        case("multipart json file", multipart(part("file", b'{"texts": ["a", "b"]}', "t.json", JSON)), 200, None,
             MULTIPART),
        case("multipart latin-1 file", multipart(part("data", "café".encode("latin-1"), "t.txt")), 400, "not_utf8",
             MULTIPART),
    ]


def any_cases(rng: np.random.RandomState) -> list[Case]:
    png = saved(Image.new("RGB", (8, 8)), "PNG")

    def case(name, body, status, reason, content_type=MULTIPART):
        return Case(name, "any", content_type, body, status, reason)

    many_parts = multipart(*[part(f"field{i}", b"x") for i in range(40)], part("data", png, "a.png"))
    return [
        # empty bodies
        case("empty body", b"", 400, None, OCTETS),
        case("empty body without a content type", b"", 400, None, NONE),
        case("empty json body", b"", 400, None, JSON),
        case("empty text body", b"", 400, None, TEXT),
        case("empty form body", b"", 400, None, FORM),
        case("empty image/png body", b"", 400, None, PNG),
        case("json 100000 deep to any model", b"[" * 100_000 + b"]" * 100_000, None, None, JSON),
        # malformed multipart
        case("multipart without a boundary", multipart(part("data", png, "a.png")), 400, "bad_multipart",
             "multipart/form-data"),
        case("multipart with another boundary", multipart(part("data", png, "a.png"), boundary="other"), 400,
             "bad_multipart"),
        case("multipart cut short", multipart(part("data", png, "a.png"))[:120], 400, "bad_multipart"),
        case("multipart cut before its closing boundary", multipart(part("data", png, "a.png"))[:-10], 400,
             "bad_multipart"),
        case("multipart with no parts", f"--{BOUNDARY}--\r\n".encode(), 400, "bad_multipart"),
        case("multipart empty body", b"", 400, "bad_multipart"),
        case("multipart that is an image", png, 400, "bad_multipart"),
        case("multipart with LF line ends", multipart(part("data", b"abc", "a.txt")).replace(b"\r\n", b"\n"), 400,
             "bad_multipart"),
        case("multipart with 41 parts", many_parts, 400, "bad_multipart"),
        case("multipart part without a name", multipart(part(None, png, "a.png")), 400, "bad_multipart"),
        case("multipart part without headers", f"--{BOUNDARY}\r\n\r\nabc\r\n--{BOUNDARY}--\r\n".encode(), 400,
             "bad_multipart"),
        case("multipart header of 10000 characters", multipart(part("data", png, "a" * 10_000 + ".png")), 400,
             "bad_multipart"),
        case("multipart boundary of 300 characters", multipart(part("data", png, "a.png"), boundary="b" * 300), 400,
             "bad_multipart", "multipart/form-data; boundary=" + "b" * 300),
        case("multipart boundary that is not ascii", multipart(part("data", png, "a.png"), boundary="abc"), 400,
             "bad_multipart", "multipart/form-data; boundary=äöü"),
        case("multipart of random bytes", rng.randint(0, 256, 3000, dtype=np.uint8).tobytes(), 400, "bad_multipart"),
        # well-formed multipart without a usable file
        case("multipart fields but no file", multipart(part("name", b"value"), part("x", b"1")), 400, "no_file"),
        case("multipart fields with unusual names", multipart(part("ключ", b"1"), part("a;b", b"2")), 400,
             "no_file"),
        case("multipart field name with a line break", multipart(part("a\r\nb", b"1")), 400, "bad_multipart"),
        case("multipart empty data part", multipart(part("data", b"", "a.png")), 400, None),
    ]


def corpus() -> list[Case]:
    """Every bad (and unusual) input, for every kind of model; see the module's docstring."""
    rng = np.random.RandomState(SEED)
    cases = image_cases(rng) + text_cases(rng) + any_cases(rng)
    names = [case.name for case in cases]
    assert len(set(names)) == len(names), "case names are unique"
    return cases

"""The samples as files, for trying the server with curl: ``python -m export.sample_files [folder]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from export import digits, super_resolution
from export.samples import SENTENCES, encode, photo_files


def write_samples(folder: Path) -> list[Path]:
    """The photos as JPEG files, one held-out digit as digit.png, sentences (sentences.json, {"texts": [...]}) and a
    held-out photo at half size for super-resolution (chelsea_small.png), for trying the server with curl."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, payload in photo_files().items():
        written.append(folder / f"{name}.jpg")
        written[-1].write_bytes(payload)
    images, _ = digits.held_out()
    written.append(folder / "digit.png")
    written[-1].write_bytes(encode(images[0], "PNG"))
    written.append(folder / "sentences.json")
    written[-1].write_text(json.dumps({"texts": [text for name, text in SENTENCES.items() if name != "long"]}))
    written.append(folder / "chelsea_small.png")
    written[-1].write_bytes(super_resolution.held_out(2)["chelsea"][1])
    return written


if __name__ == "__main__":
    for path in write_samples(Path(sys.argv[1] if len(sys.argv) > 1 else "samples")):
        print(path)

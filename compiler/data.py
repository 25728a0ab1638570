"""Calibration/evaluation inputs: image folders, .npy/.npz tensors, and the embedded default photo set."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vitc.compiler.errors import CalibrationDataError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
PREPROCESS_KEY = "vitc.preprocess"

# Real photographs shipped inside scikit-image (no download). Split so that default calibration and held-out
# evaluation never share a photo.
CALIB_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
                "motorcycle_left.png", "ihc.png", "immunohistochemistry.png", "retina.jpg", "camera.png")
EVAL_PHOTOS = ("brick.png", "grass.png", "gravel.png", "moon.png", "coins.png", "page.png", "cell.png",
               "motorcycle_right.png", "color.png", "microaneurysms.png", "text.png", "horse.png")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model input: resize shorter side, center crop, scale to [0,1], normalize."""

    height: int = 224
    width: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_model(cls, model, input_shape: Sequence[int]) -> "Preprocess":
        """Read the metadata ``vitc export`` writes; else ImageNet mean/std at the input's H x W."""
        meta = {p.key: p.value for p in model.metadata_props}
        h, w = int(input_shape[-2]), int(input_shape[-1])
        if PREPROCESS_KEY in meta:
            try:
                d = json.loads(meta[PREPROCESS_KEY])
                return cls(height=h, width=w, crop_pct=float(d.get("crop_pct", 0.875)),
                           mean=tuple(d.get("mean", IMAGENET_MEAN)), std=tuple(d.get("std", IMAGENET_STD)),
                           interpolation=str(d.get("interpolation", "bicubic")))
            except (ValueError, TypeError) as exc:
                log.warning("ignoring malformed %s metadata: %s", PREPROCESS_KEY, exc)
        return cls(height=h, width=w)

    def _resample(self):
        from PIL import Image
        return {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}.get(
            self.interpolation, Image.BICUBIC)

    def to_array(self, img) -> np.ndarray:
        """PIL image -> float32 CHW, resized/cropped/normalized (eval transform)."""
        img = img.convert("RGB")
        short = int(round(min(self.height, self.width) / self.crop_pct))
        w, h = img.size
        scale = short / min(w, h)
        img = img.resize((max(self.width, round(w * scale)), max(self.height, round(h * scale))), self._resample())
        w, h = img.size
        left, top = (w - self.width) // 2, (h - self.height) // 2
        img = img.crop((left, top, left + self.width, top + self.height))
        return self._normalize(img)

    def random_crop(self, img, rng: np.random.Generator) -> np.ndarray:
        """A random-resized crop (scale 0.25..1 of the area), for sampling many inputs from few photos."""
        img = img.convert("RGB")
        w, h = img.size
        area = w * h * rng.uniform(0.25, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(w, round(np.sqrt(area * ratio))))
        ch = int(min(h, round(np.sqrt(area / ratio))))
        left = int(rng.integers(0, w - cw + 1))
        top = int(rng.integers(0, h - ch + 1))
        img = img.crop((left, top, left + cw, top + ch)).resize((self.width, self.height), self._resample())
        return self._normalize(img)

    def _normalize(self, img) -> np.ndarray:
        a = np.asarray(img, dtype=np.float32) / 255.0
        a = (a - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(a.transpose(2, 0, 1))


def _skimage_data_dir() -> Path:
    try:
        import skimage
    except ImportError as exc:  # pragma: no cover - scikit-image is a core dependency
        raise CalibrationDataError("the embedded default set needs scikit-image", hint="pip install scikit-image") from exc
    return Path(skimage.__file__).parent / "data"


def photo_paths(names: Sequence[str]) -> list[Path]:
    d = _skimage_data_dir()
    return [d / n for n in names if (d / n).is_file()]


def open_image(path: Path):
    from PIL import Image, UnidentifiedImageError
    try:
        img = Image.open(path)
        img.load()
        return img
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        log.warning("skipping %s: not a decodable image (%s)", path, type(exc).__name__)
        return None


def embedded_samples(pre: Preprocess, n: int, seed: int, photos: Sequence[str] = CALIB_PHOTOS) -> Iterator[np.ndarray]:
    """``n`` random crops of the scikit-image photos (CHW float32), deterministic for ``seed``."""
    paths = photo_paths(photos)
    if not paths:
        raise CalibrationDataError("no embedded photos found in scikit-image's data folder",
                                   hint="pass --calib DIR with your own images")
    images = [im for im in (open_image(p) for p in paths) if im is not None]
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield pre.random_crop(images[i % len(images)], rng)


def folder_samples(folder: Path, pre: Preprocess, limit: int | None) -> Iterator[np.ndarray]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    others = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES)
    for p in others:
        log.warning("skipping %s: not an image file type", p)
    produced = 0
    for p in files:
        if limit is not None and produced >= limit:
            return
        img = open_image(p)
        if img is None:
            continue
        produced += 1
        yield pre.to_array(img)
    if produced == 0:
        raise CalibrationDataError(f"{folder}: no decodable images", hint="put .jpg/.png images in the folder")


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]  # fixed, batch first
    dtype: np.dtype


def batched(samples: Iterator[np.ndarray], spec: InputSpec) -> Iterator[dict[str, np.ndarray]]:
    """Group single samples (no batch dim) into feeds of the model's fixed batch size."""
    bs = spec.shape[0]
    buf: list[np.ndarray] = []
    for s in samples:
        buf.append(s)
        if len(buf) == bs:
            yield {spec.name: np.stack(buf).astype(spec.dtype, copy=False)}
            buf = []
    # a trailing partial batch is dropped (fixed-shape model)


def tensor_file_feeds(path: Path, specs: Sequence[InputSpec], limit: int | None) -> Iterator[dict[str, np.ndarray]]:
    """Feeds from ``.npz`` (one array per input name, samples on axis 0) or ``.npy`` (single-input models)."""
    try:
        if path.suffix == ".npy":
            if len(specs) != 1:
                raise CalibrationDataError(f"{path}: .npy holds one array but the model has {len(specs)} inputs",
                                           hint="use .npz with one array per input name")
            arrays = {specs[0].name: np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
    except CalibrationDataError:
        raise
    except Exception as exc:
        raise CalibrationDataError(f"{path}: cannot read calibration tensors ({type(exc).__name__}: {exc})",
                                   hint="write it with numpy.savez") from None
    n = None
    for spec in specs:
        if spec.name not in arrays:
            raise CalibrationDataError(f"{path}: no array for model input {spec.name!r} (has {sorted(arrays)})",
                                       hint="name each array after its graph input")
        a = arrays[spec.name]
        want = spec.shape[1:]
        if a.ndim == len(spec.shape) - 1:
            a = a[None]
        if tuple(a.shape[1:]) != tuple(want):
            raise CalibrationDataError(f"{path}: input {spec.name!r} has sample shape {tuple(a.shape[1:])}, "
                                       f"model wants {tuple(want)}")
        if a.dtype.kind != np.dtype(spec.dtype).kind:
            raise CalibrationDataError(f"{path}: input {spec.name!r} has dtype {a.dtype}, model wants {np.dtype(spec.dtype)}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise CalibrationDataError(f"{path}: input {spec.name!r} contains NaN or Inf", hint="clean the data")
        arrays[spec.name] = a
        n = a.shape[0] if n is None else min(n, a.shape[0])
    if not n:
        raise CalibrationDataError(f"{path}: calibration data is empty")
    bs = specs[0].shape[0]
    total = n if limit is None else min(n, limit)
    if total < bs:
        raise CalibrationDataError(f"{path}: {total} samples, fewer than the batch size {bs}")

    def gen():
        for i in range(0, total - bs + 1, bs):
            yield {s.name: np.ascontiguousarray(arrays[s.name][i:i + bs]).astype(s.dtype, copy=False) for s in specs}
    return gen()

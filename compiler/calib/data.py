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
# evaluation never share a photo, and each side has natural photos, grayscale, scans and microscopy.
CALIB_PHOTOS = ("astronaut.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "ihc.png", "camera.png",
                "page.png", "cell.png", "color.png", "motorcycle_left.png")
EVAL_PHOTOS = ("chelsea.png", "brick.png", "grass.png", "gravel.png", "moon.png", "coins.png", "text.png",
               "motorcycle_right.png", "microaneurysms.png", "retina.jpg", "horse.png")


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
                mean = tuple(float(x) for x in d.get("mean", IMAGENET_MEAN))
                std = tuple(float(x) for x in d.get("std", IMAGENET_STD))
                crop = float(d.get("crop_pct", 0.875))
                if len(mean) != 3 or len(std) != 3 or min(std) <= 0 or not 0 < crop <= 1:
                    raise ValueError(f"need 3 means, 3 positive stds and 0 < crop_pct <= 1, got {d}")
                return cls(height=h, width=w, crop_pct=crop, mean=mean, std=std,  # type: ignore[arg-type]
                           interpolation=str(d.get("interpolation", "bicubic")))
            except (ValueError, TypeError, AttributeError) as exc:
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


# Skipped files already warned about, so that recalibration (a second pass over the same folder) does not repeat
# every warning. Keyed by file identity so that a changed file is reported again.
_warned: set[tuple] = set()


def _warn_once(path: Path, why: str) -> None:
    try:
        st = path.stat()
        key: tuple = (str(path.resolve()), st.st_size, st.st_mtime_ns, why)
    except OSError:
        key = (str(path), why)
    if key not in _warned:
        _warned.add(key)
        log.warning("skipping %s: %s", path, why)


def open_image(path: Path):
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as f:
            f.load()
            img = f.copy()  # detached from the file, which is closed here
        return img
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        _warn_once(path, f"not a decodable image ({type(exc).__name__})")
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


def embedded_photo_count(photos: Sequence[str] = CALIB_PHOTOS) -> int:
    """How many photos ``embedded_samples`` cycles through: sample ``i`` is a crop of photo ``i % count``."""
    return sum(open_image(p) is not None for p in photo_paths(photos))


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursive, sorted); other files are skipped with a warning.

    Raises if there are none, so an empty folder is reported before any work is done.
    """
    if not folder.is_dir():
        raise CalibrationDataError(f"{folder}: not a folder", hint="give a folder of images or a .npz/.npy file")
    all_files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    files = [p for p in all_files if p.suffix.lower() in IMAGE_SUFFIXES]
    for p in all_files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            _warn_once(p, "not an image file type")
    if not files:
        raise CalibrationDataError(f"{folder}: no image files in the calibration folder",
                                   hint=f"put images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
    return files


def folder_samples(folder: Path, pre: Preprocess, limit: int | None) -> Iterator[np.ndarray]:
    """Preprocessed images from ``folder``; undecodable files are skipped with a warning (raises if all are)."""
    files = image_files(folder)

    def gen():
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
            raise CalibrationDataError(f"{folder}: none of the {len(files)} image files could be decoded",
                                       hint="put valid .jpg/.png images in the folder")
    return gen()


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
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise CalibrationDataError(f"{path}: cannot read calibration tensors ({exc.strerror})") from None
    is_npy = magic == b"\x93NUMPY"
    if not (is_npy or magic[:4] == b"PK\x03\x04" or magic[:4] == b"PK\x05\x06"):
        raise CalibrationDataError(f"{path}: not a NumPy .npz/.npy file",
                                   hint="write it with numpy.savez(path, **{input_name: array}) or numpy.save")
    try:
        if is_npy:
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
            raise CalibrationDataError(f"{path}: input {spec.name!r} has dtype {a.dtype}, model wants {np.dtype(spec.dtype)}",
                                       hint=f"save the array as {np.dtype(spec.dtype)}")
        if a.dtype != spec.dtype:
            with np.errstate(over="ignore", invalid="ignore"):
                a = a.astype(spec.dtype)  # e.g. float64 -> float32; overflow shows up as Inf below
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int(np.count_nonzero((~np.isfinite(a)).reshape(len(a), -1).any(axis=1)))
            raise CalibrationDataError(f"{path}: input {spec.name!r} contains NaN or Inf ({bad} of {len(a)} samples)",
                                       hint="remove or fix those samples")
        arrays[spec.name] = a
        n = a.shape[0] if n is None else min(n, a.shape[0])
    if not n:
        raise CalibrationDataError(f"{path}: calibration data is empty (0 samples)", hint="give at least one sample")
    bs = specs[0].shape[0]
    total = n if limit is None else min(n, limit)
    if total < bs:
        raise CalibrationDataError(f"{path}: {total} samples, fewer than the batch size {bs}",
                                   hint="give more samples (and --calib-samples) or a smaller --batch")

    def gen():
        for i in range(0, total - bs + 1, bs):
            yield {s.name: np.ascontiguousarray(arrays[s.name][i:i + bs]).astype(s.dtype, copy=False) for s in specs}
    return gen()

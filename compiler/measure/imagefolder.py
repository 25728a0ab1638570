"""`vitc eval`: top-1/top-5 on an ImageFolder tree, and label-free fidelity against a reference model.

ImageFolder layout (torchvision's): one subfolder per class, class index = position of the folder name in sorted
order, images anywhere below their class folder. ``--class-map`` maps folder names to model output indices instead
(ImageNet: synset folders ``n01440764`` ... in the model's 1000-class order). Without labels (a flat folder of
images) only ``--reference`` metrics are computed.

Images go through the model's own preprocessing (``Preprocess.from_model``: the metadata ``vitc export`` writes,
else ImageNet mean/std; resize, center crop, normalize) and are streamed: decoded by a small thread pool one batch
ahead, so memory is bounded by two batches whatever the folder size. ``--predictions FILE.jsonl`` appends one line
per image after every batch (the chunked output); ``--resume`` re-reads it and skips the images already there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitc.compiler.calib import data as D
from vitc.compiler.errors import ModelLoadError, OutputError, VitcError
from vitc.compiler.measure.fidelity import EvalTotals, pair_metrics, topk

log = logging.getLogger(__name__)

DEFAULT_BATCH = 32


class EvalDataError(VitcError):
    """The evaluation folder or class map is missing, empty or does not match the model."""


@dataclass(frozen=True)
class EvalConfig:
    model: Path
    data: Path
    reference: Path | None = None
    class_map: Path | None = None
    batch: int | None = None  # images per inference; None: 32 (a fixed-batch model runs in chunks of its batch)
    threads: int = 0  # ORT intra-op threads (0: ORT's default)
    limit: int | None = None  # evaluate this many images, spread evenly over the folder
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    predictions: Path | None = None  # JSON lines, appended after every batch
    resume: bool = False
    workers: int = 2  # image-decoding threads
    show_progress: bool = True
    runtime: str = "ort"  # "ort" | "openvino" (an OpenVINO IR .xml always runs in OpenVINO)
    ov_precision: str = "auto"  # OpenVINO's inference precision for float layers


@dataclass
class ImageFolder:
    root: Path
    classes: list[str]  # sorted folder names; empty when unlabeled
    samples: list[tuple[Path, int]]  # (file, folder index or -1)

    @property
    def labeled(self) -> bool:
        return bool(self.classes)


def scan_image_folder(root: Path, require_labels: bool) -> ImageFolder:
    if not root.exists():
        raise EvalDataError(f"{root}: no such folder", hint="give --data an ImageFolder tree (one subfolder per class)")
    if not root.is_dir():
        raise EvalDataError(f"{root}: not a folder", hint="give --data an ImageFolder tree (one subfolder per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in D.IMAGE_SUFFIXES)
    if not classes:
        if require_labels:
            raise EvalDataError(f"{root}: no class folders (an ImageFolder holds one subfolder of images per class)",
                                hint="arrange the images as DIR/CLASS/IMAGE, or pass --reference MODEL for "
                                     "label-free fidelity on a flat folder")
        if not loose:
            raise EvalDataError(f"{root}: no image files", hint=f"put images ({', '.join(sorted(D.IMAGE_SUFFIXES))}) in it")
        return ImageFolder(root, [], [(p, -1) for p in loose])
    if loose:
        log.warning("%s: %d image(s) directly in the folder, outside any class folder, are ignored", root, len(loose))
    samples: list[tuple[Path, int]] = []
    empty = []
    for k, c in enumerate(classes):
        files = sorted(p for p in (root / c).rglob("*") if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in D.IMAGE_SUFFIXES)
        if not files:
            empty.append(c)
        samples += [(p, k) for p in files]
    if not samples:
        raise EvalDataError(f"{root}: {len(classes)} class folders but no image files in them",
                            hint="put the images under DIR/CLASS/")
    if empty:
        log.warning("%s: %d class folder(s) hold no images (%s%s)", root, len(empty), ", ".join(empty[:3]),
                    ", ..." if len(empty) > 3 else "")
    return ImageFolder(root, classes, samples)


def load_class_map(path: Path) -> dict[str, int]:
    """Folder name -> model output index. JSON: {"n01440764": 0, ...}, Keras' {"0": ["n01440764", "tench"]}, or a
    list of names; any other file: one class per line, its first word the folder name, index = line number
    (ImageNet's LOC_synset_mapping.txt, synsets.txt)."""
    if not path.is_file():
        raise EvalDataError(f"{path}: class map not found", hint="give --class-map a .json or a one-class-per-line file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalDataError(f"{path}: cannot read the class map ({type(exc).__name__})") from None
    out: dict[str, int] = {}

    def put(name, idx, where):
        if not isinstance(name, str) or not name or isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise EvalDataError(f"{path}: {where}: expected a folder name and an index >= 0, got {name!r}: {idx!r}")
        if name in out:
            raise EvalDataError(f"{path}: folder name {name!r} is mapped twice", hint="each class needs one index")
        out[name] = idx

    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if isinstance(obj, list):
            for i, name in enumerate(obj):
                put(name, i, f"entry {i}")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(v, list) and v and k.isdigit():  # Keras imagenet_class_index.json
                    put(v[0], int(k), f"key {k!r}")
                else:
                    put(k, v, f"key {k!r}")
        else:
            raise EvalDataError(f"{path}: expected a JSON object or list", hint="e.g. {\"n01440764\": 0, ...}")
    else:
        i = 0
        for line in text.splitlines():
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            put(s.split()[0], i, f"line {i + 1}")
            i += 1
    if not out:
        raise EvalDataError(f"{path}: the class map is empty")
    return out


# -- models -----------------------------------------------------------------------------------------------------------
@dataclass
class _Model:
    path: Path
    input: D.InputSpec  # shape with the batch it runs at
    fixed_batch: int | None  # the model's own fixed batch dim (None: dynamic)
    output: str
    output_shape: list[int | None]
    onnx_model: object


def _open_model(path: Path, batch: int | None, input_shapes: dict[str, list[int]], role: str) -> _Model:
    """Validate ``path`` as a one-image-input model; fixes dynamic dims (clear error when it cannot). An OpenVINO IR
    is read through the ONNX artifact `vitc build --target openvino` writes beside it (same stem)."""
    from vitc.compiler.driver.build import input_specs, is_image_input
    from vitc.compiler.driver.loader import load_model

    if path.suffix.lower() == ".xml":
        onnx_path = path.with_suffix(".onnx")
        if not onnx_path.is_file():
            raise ModelLoadError(f"{path}: an OpenVINO IR needs its ONNX model beside it ({onnx_path.name}) for "
                                 "its input and preprocessing", hint="evaluate a vitc --target openvino OUTDIR's IR")
        path = onnx_path
    lm = load_model(path, batch=batch or 1, input_shapes=input_shapes)
    specs = input_specs(lm.model)
    if len(specs) != 1 or not is_image_input(specs[0]):
        raise ModelLoadError(f"{path}: {role} needs one NCHW float image input with 3 channels, the model takes "
                             f"{[f'{s.name} {list(s.shape)} {s.dtype}' for s in specs]}",
                             hint="evaluate an image classifier (or encoder, with --reference)")
    spec = specs[0]
    fixed = None if any(d.startswith("dim 0") for d in lm.fixed_dims.get(spec.name, [])) else spec.shape[0]
    if spec.name in input_shapes:
        fixed = spec.shape[0]
    out = lm.model.graph.output[0]
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in out.type.tensor_type.shape.dim]
    return _Model(path, spec, fixed, out.name, dims, lm.model)


def _session(path: Path, threads: int, runtime: str = "ort", ov_precision: str = "auto"):
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.ort import OrtRuntime, quiet

    if runtime == "openvino" or path.suffix.lower() == ".xml":
        from vitc.runtimes.openvino import InferencePrecision, OpenVinoRuntime

        return OpenVinoRuntime(InferencePrecision(ov_precision)).session(path, SessionOptions(threads=threads))
    quiet()
    return OrtRuntime().session(str(path), SessionOptions(threads=threads))


def _run(sess, m: _Model, x: np.ndarray) -> np.ndarray:
    """Run ``x`` [n, 3, H, W]: in one go on a dynamic-batch model, else in chunks of its batch (tail padded)."""
    x = x.astype(m.input.dtype, copy=False)
    if m.fixed_batch is None:
        return sess.run({m.input.name: x}, [m.output])[0]
    bs, outs = m.fixed_batch, []
    for i in range(0, len(x), bs):
        part = x[i:i + bs]
        n = len(part)
        if n < bs:
            part = np.concatenate([part, np.repeat(part[-1:], bs - n, axis=0)])
        outs.append(sess.run({m.input.name: part}, [m.output])[0][:n])
    return np.concatenate(outs)


# -- the run ----------------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    model: str
    reference: str | None
    data: str
    classes: int
    summary: dict
    skipped_files: int
    preprocess: dict

    def to_json(self) -> dict:
        return {"model": self.model, "reference": self.reference, "data": self.data, "classes": self.classes,
                **self.summary, "skipped_files": self.skipped_files, "preprocess": self.preprocess}


def _evenly(items: list, n: int | None) -> list:
    if n is None or n >= len(items):
        return items
    idx = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
    return [items[i] for i in idx]


def _batches(items: Sequence[tuple[Path, int]], bs: int, pre: D.Preprocess, workers: int
             ) -> Iterator[tuple[list[tuple[Path, int]], list[np.ndarray | None]]]:
    """Decoded, preprocessed batches; the next batch decodes while the caller runs the current one."""
    def load(p: Path) -> np.ndarray | None:
        img = D.open_image(p)  # warns once and returns None for undecodable files
        return None if img is None else pre.to_array(img)

    chunks = [list(items[i:i + bs]) for i in range(0, len(items), bs)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        pending = [ex.submit(load, p) for p, _ in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            nxt = [ex.submit(load, p) for p, _ in chunks[k + 1]] if k + 1 < len(chunks) else []
            yield chunk, [f.result() for f in pending]
            pending = nxt


def _read_done(path: Path) -> tuple[set[str], EvalTotals]:
    done: set[str] = set()
    totals = EvalTotals()
    bad = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                key = rec["path"]
            except (json.JSONDecodeError, KeyError, TypeError):
                bad += 1  # e.g. a line cut short when the previous run was killed
                continue
            if key in done:
                continue
            done.add(key)
            totals.add(rec)
    if bad:
        log.warning("%s: %d unreadable line(s) ignored (those images are evaluated again)", path, bad)
    return done, totals


def evaluate_folder(cfg: EvalConfig) -> EvalResult:
    from vitc.compiler.progress import progress

    if cfg.batch is not None and cfg.batch < 1:
        raise VitcError(f"batch size {cfg.batch} is not valid", hint="give --batch 1 or more")
    if cfg.limit is not None and cfg.limit < 1:
        raise VitcError(f"--limit {cfg.limit} is not valid", hint="give 1 or more")
    if cfg.predictions is not None:
        p = cfg.predictions
        if p.exists() and not cfg.resume:
            raise OutputError(f"{p}: already exists", hint="pass --resume to continue it, or remove it")
        if not p.absolute().parent.is_dir():
            raise OutputError(f"{p}: folder {p.absolute().parent} does not exist", hint="choose another --predictions")
    folder = scan_image_folder(cfg.data, require_labels=cfg.reference is None)
    m = _open_model(cfg.model, cfg.batch, cfg.input_shapes, "vitc eval")
    if cfg.batch is not None and m.fixed_batch is not None and cfg.batch != m.fixed_batch:
        raise ModelLoadError(f"{cfg.model}: input {m.input.name!r} has a fixed batch of {m.fixed_batch}, "
                             f"--batch {cfg.batch} is refused", hint=f"omit --batch (it runs {m.fixed_batch} at a time)")
    fb = m.fixed_batch
    batch = cfg.batch or (DEFAULT_BATCH if fb is None else max(fb, DEFAULT_BATCH // fb * fb))  # images per step
    ref = None
    if cfg.reference is not None:
        ref = _open_model(cfg.reference, batch, cfg.input_shapes, "--reference")
        if ref.input.shape[1:] != m.input.shape[1:]:
            raise ModelLoadError(f"{cfg.reference}: takes images of shape {list(ref.input.shape[1:])}, "
                                 f"{cfg.model} takes {list(m.input.shape[1:])}",
                                 hint="compare two models with the same input size")
    classify = len(m.output_shape) == 2
    n_out = m.output_shape[-1] if classify else None
    if folder.labeled and not classify:
        if cfg.reference is None:
            raise ModelLoadError(f"{cfg.model}: output {m.output!r} has shape {m.output_shape}, not [batch, classes]",
                                 hint="top-1/top-5 needs class logits; pass --reference MODEL for fidelity only")
        log.warning("%s: output %r is not [batch, classes]: labels ignored, fidelity only", cfg.model, m.output)
        folder = ImageFolder(folder.root, [], [(p, -1) for p, _ in folder.samples])
    targets: list[int] = list(range(len(folder.classes)))
    if folder.labeled:
        if cfg.class_map is not None:
            cmap = load_class_map(cfg.class_map)
            missing = [c for c in folder.classes if c not in cmap]
            if missing:
                raise EvalDataError(f"{cfg.class_map}: {len(missing)} of {len(folder.classes)} class folders are not "
                                    f"in the class map (e.g. {missing[0]!r})",
                                    hint="the map's names must be the folder names")
            targets = [cmap[c] for c in folder.classes]
            if n_out is not None and max(targets) >= n_out:
                bad = next(c for c in folder.classes if cmap[c] >= n_out)
                raise EvalDataError(f"{cfg.class_map}: {bad!r} maps to index {cmap[bad]} but {cfg.model} has "
                                    f"{n_out} outputs", hint="use the class map of this model's output order")
        elif n_out is not None and n_out != len(folder.classes):
            raise EvalDataError(f"{cfg.data}: {len(folder.classes)} class folders but {cfg.model} outputs "
                                f"{n_out} classes", hint="pass --class-map FILE mapping folder names to output indices")
    src_meta = next((x.onnx_model for x in (m, ref) if x is not None and any(
        p.key == D.PREPROCESS_KEY for p in x.onnx_model.metadata_props)), m.onnx_model)
    pre = D.Preprocess.from_model(src_meta, m.input.shape)
    if cfg.mean is not None or cfg.std is not None:
        pre = D.Preprocess(pre.height, pre.width, pre.crop_pct, cfg.mean or pre.mean, cfg.std or pre.std,
                           pre.interpolation)
    items = _evenly(folder.samples, cfg.limit)
    done: set[str] = set()
    totals = EvalTotals()
    if cfg.predictions is not None and cfg.resume and cfg.predictions.exists():
        done, totals = _read_done(cfg.predictions)
        log.info("resuming: %d image(s) already in %s", len(done), cfg.predictions)
    rel = {p: os.path.relpath(p, folder.root) for p, _ in items}
    todo = [(p, k) for p, k in items if rel[p] not in done]
    log.info("evaluating %d image(s)%s from %s (%s), batch %d", len(todo),
             f" ({len(items) - len(todo)} done before)" if done else "", folder.root,
             f"{len(folder.classes)} classes" if folder.labeled else "no labels", batch)
    sess = _session(cfg.model, cfg.threads, cfg.runtime, cfg.ov_precision)
    ref_sess = _session(cfg.reference, cfg.threads, cfg.runtime, cfg.ov_precision) if ref is not None else None
    skipped = 0
    pred_f = open(cfg.predictions, "a", encoding="utf-8") if cfg.predictions is not None else None
    try:
        total_batches = (len(todo) + batch - 1) // batch
        for chunk, arrays in progress(_batches(todo, batch, pre, cfg.workers), total_batches, "evaluating",
                                      enabled=cfg.show_progress):
            keep = [i for i, a in enumerate(arrays) if a is not None]
            skipped += len(arrays) - len(keep)
            if not keep:
                continue
            x = np.stack([arrays[i] for i in keep])
            y = _run(sess, m, x)
            if classify and n_out is None:
                n_out = y.shape[-1]
                if folder.labeled and cfg.class_map is None and n_out != len(folder.classes):
                    raise EvalDataError(f"{cfg.data}: {len(folder.classes)} class folders but {cfg.model} outputs "
                                        f"{n_out} classes",
                                        hint="pass --class-map FILE mapping folder names to output indices")
            recs = [{"path": rel[chunk[i][0]], "label": targets[chunk[i][1]] if chunk[i][1] >= 0 else -1}
                    for i in keep]
            if classify:
                for r, t in zip(recs, topk(y, 5).tolist()):
                    r["top"] = t
            if ref_sess is not None:
                yr = _run(ref_sess, ref, x)
                if yr.shape != y.shape:
                    raise ModelLoadError(f"{cfg.reference}: output shape {list(yr.shape[1:])} differs from "
                                         f"{cfg.model}'s {list(y.shape[1:])}", hint="compare two versions of one model")
                pm = pair_metrics(yr, y)
                ref_top = topk(yr, 5).tolist() if classify else None
                for j, r in enumerate(recs):
                    r.update({k: float(v[j]) for k, v in pm.items()})
                    if ref_top is not None:
                        r["ref_top"] = ref_top[j]
            for r in recs:
                totals.add(r)
            if pred_f is not None:
                pred_f.write("".join(json.dumps(r) + "\n" for r in recs))
                pred_f.flush()
    finally:
        if pred_f is not None:
            pred_f.close()
    if totals.images == 0:
        raise EvalDataError(f"{cfg.data}: none of the {len(items)} image files could be decoded",
                            hint="put valid .jpg/.png images in the folder")
    return EvalResult(str(cfg.model), None if cfg.reference is None else str(cfg.reference), str(cfg.data),
                      len(folder.classes), totals.summary(), skipped, pre.to_json())


def format_result(r: EvalResult) -> str:
    s = r.summary

    def f(v, unit="", nd=2):
        return "-" if v is None else f"{v:.{nd}f}{unit}"

    lines = [f"model            {r.model}", f"images           {s['images']}"
             + (f" ({r.skipped_files} undecodable skipped)" if r.skipped_files else "")]
    if s["labeled"]:
        lines += [f"top-1            {f(s['top1_pct'], '%')}", f"top-5            {f(s['top5_pct'], '%')}"]
    if r.reference is not None:
        lines += [f"reference        {r.reference}"]
        if s["labeled"]:
            lines += [f"reference top-1  {f(s.get('reference_top1_pct'), '%')}",
                      f"reference top-5  {f(s.get('reference_top5_pct'), '%')}"]
        lines += [f"top-1 agreement  {f(s.get('top1_agreement_pct'), '%')}",
                  f"logit cosine     {f(s.get('mean_cosine'), '', 5)} (mean over images)",
                  f"output SQNR      {f(s.get('sqnr_db'), ' dB')} (worst image {f(s.get('worst_image_sqnr_db'), ' dB')})",
                  f"KL(ref || model) {f(s.get('mean_kl_nats'), ' nats', 5)} (mean over images)"]
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------------------------------
def add_arguments(ev: argparse.ArgumentParser, shape_type, floats3_type, std3_type) -> None:
    from vitc.compiler.cliargs import nonneg_int, pos_int

    ev.add_argument("model", type=Path)
    ev.add_argument("--data", type=Path, required=True,
                    help="ImageFolder tree (DIR/CLASS/IMAGE); a flat image folder works with --reference")
    ev.add_argument("--reference", type=Path, default=None,
                    help="float model for label-free fidelity (top-1 agreement, logit cosine, SQNR, KL)")
    ev.add_argument("--class-map", type=Path, default=None,
                    help="folder name -> output index: .json, or one class per line (ImageNet synset order)")
    ev.add_argument("--batch", type=pos_int, default=None,
                    help=f"images per inference (default {DEFAULT_BATCH}; a model with a fixed batch dim runs "
                         "in chunks of it, and refuses another --batch)")
    ev.add_argument("--threads", type=nonneg_int, default=0, help="intra-op threads (0: the runtime's default)")
    ev.add_argument("--runtime", choices=("ort", "openvino"), default="ort",
                    help="what runs the .onnx models (an OpenVINO IR .xml always runs in OpenVINO)")
    ev.add_argument("--ov-precision", choices=("auto", "f32", "bf16"), default="auto",
                    help="OpenVINO's inference precision for float layers (auto: bf16 where the CPU has it)")
    ev.add_argument("--limit", type=pos_int, default=None, help="evaluate N images spread evenly over the folder")
    ev.add_argument("--input-shape", type=shape_type, action="append", default=[], metavar="NAME=D0,D1,...")
    ev.add_argument("--mean", type=floats3_type, default=None)
    ev.add_argument("--std", type=std3_type, default=None)
    ev.add_argument("--predictions", type=Path, default=None,
                    help="append one JSON line per image here after every batch (chunked, resumable output)")
    ev.add_argument("--resume", action="store_true", help="continue --predictions, skipping images already in it")
    ev.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")


def run_command(a: argparse.Namespace) -> int:
    if a.resume and a.predictions is None:
        raise VitcError("--resume needs --predictions FILE", hint="give the file of the run to continue")
    if a.json is not None and not a.json.absolute().parent.is_dir():
        raise OutputError(f"{a.json}: folder {a.json.absolute().parent} does not exist", hint="choose another --json")
    if not a.model.exists():
        raise ModelLoadError(f"{a.model}: no such file", hint="give the path of an .onnx model")
    if a.reference is not None and not a.reference.exists():
        raise ModelLoadError(f"{a.reference}: no such file", hint="give --reference the path of an .onnx model")
    cfg = EvalConfig(model=a.model, data=a.data, reference=a.reference, class_map=a.class_map, batch=a.batch,
                     threads=a.threads, limit=a.limit, input_shapes=dict(a.input_shape), mean=a.mean, std=a.std,
                     predictions=a.predictions, resume=a.resume, runtime=a.runtime, ov_precision=a.ov_precision)
    try:
        res = evaluate_folder(cfg)
    except VitcError:
        raise
    except Exception as exc:
        if type(exc).__module__.startswith("onnxruntime"):
            raise VitcError(f"onnxruntime cannot run the model: {' '.join(str(exc).split())[:300]}",
                            hint="check the model loads in onnxruntime") from None
        raise
    sys.stdout.write(format_result(res) + "\n")
    if a.json is not None:
        try:
            a.json.write_text(json.dumps(res.to_json(), indent=2))
        except OSError as exc:
            raise OutputError(f"{a.json}: cannot write ({exc.strerror})", hint="choose another --json") from None
    return 0

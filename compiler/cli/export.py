"""`vitc export`: a timm model to ONNX, with its preprocessing recorded in the model metadata.

torch and timm are optional (``pip install vitc[export]``) and imported lazily. Checkpoints load without code
execution: ``.safetensors`` via safetensors, anything else via ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vitc.compiler.calib.data import PREPROCESS_KEY
from vitc.compiler.errors import ModelLoadError, OutputError, VitcError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    model_name: str
    output: Path
    checkpoint: Path | None = None
    opset: int = 17
    dynamo: bool = False
    image_size: int | None = None
    force: bool = False


def import_torch_timm():
    try:
        import timm
        import torch
    except ImportError as exc:
        raise VitcError(f"vitc export needs torch and timm ({exc.name} is missing)",
                        hint="pip install 'vitc[export]'") from None
    return torch, timm


def load_checkpoint(path: Path):
    torch, _ = import_torch_timm()
    if not path.is_file():
        raise ModelLoadError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise VitcError("reading .safetensors needs the safetensors package", hint="pip install safetensors") from None
        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError: bad header, truncated data
            raise ModelLoadError(f"{path}: not a readable .safetensors file ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:120]})", hint="check the file is complete") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a weights-only checkpoint ({type(exc).__name__})",
                             hint="save it with torch.save(model.state_dict()) or as .safetensors; "
                                  "pickled code is never executed") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors",
                             hint="save it with torch.save(model.state_dict())")
    return state


def export_timm(cfg: ExportConfig) -> Path:
    torch, timm = import_torch_timm()
    out = cfg.output.absolute()
    if out.exists() and not cfg.force:
        raise OutputError(f"{out}: already exists", hint="pass --force to replace it")
    try:
        model = timm.create_model(cfg.model_name, pretrained=False,
                                  **({"img_size": cfg.image_size} if cfg.image_size else {}))
    except Exception as exc:
        raise VitcError(f"timm cannot build {cfg.model_name!r}: {exc}", hint="see timm.list_models()") from None
    if cfg.checkpoint is not None:
        missing, unexpected = model.load_state_dict(load_checkpoint(cfg.checkpoint), strict=False)
        if missing:
            raise ModelLoadError(f"{cfg.checkpoint}: {len(missing)} weights missing for {cfg.model_name} "
                                 f"(e.g. {missing[0]})", hint="check the checkpoint matches the model name")
        if unexpected:
            log.warning("%s: %d unexpected keys ignored", cfg.checkpoint, len(unexpected))
    model.eval()
    dc = timm.data.resolve_data_config({}, model=model)
    _, h, w = dc["input_size"]
    if cfg.image_size:
        h = w = cfg.image_size  # resolve_data_config reports the pretrained size, not the one built here
    x = torch.randn(1, 3, h, w)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with torch.no_grad():
            if cfg.dynamo:
                batch = torch.export.Dim("batch", min=1, max=1024)
                torch.onnx.export(model, (x,), tmp, input_names=["input"], output_names=["logits"],
                                  opset_version=max(cfg.opset, 18), dynamo=True,
                                  dynamic_shapes={"x": {0: batch}})
            else:
                torch.onnx.export(model, (x,), tmp, input_names=["input"], output_names=["logits"],
                                  opset_version=cfg.opset, dynamo=False,
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        import onnx

        m = onnx.load(tmp)  # inlines any external data the exporter wrote beside it
        meta = {"mean": list(dc["mean"]), "std": list(dc["std"]), "crop_pct": float(dc.get("crop_pct", 0.875)),
                "interpolation": dc.get("interpolation", "bicubic"), "timm_model": cfg.model_name}
        entry = m.metadata_props.add()
        entry.key, entry.value = PREPROCESS_KEY, json.dumps(meta)
        onnx.save(m, tmp)
        os.replace(tmp, out)
    finally:
        for leftover in (tmp, tmp + ".data"):  # the dynamo exporter may write weights to TMP.data
            if os.path.exists(leftover):
                os.unlink(leftover)
    return out

"""ONNX export of the tagger and the segmenter, checked against PyTorch with onnxruntime.

The tagger exports two outputs, ``logits (B, T)`` and ``embedding (B, D)``; the segmenter one,
``logits (B, T, S, S)``. The input is ``images (B, 3, S, S)``, RGB floats in [0, 1] (the models
normalise inside), with a dynamic batch axis. ``export_onnx`` writes atomically (temporary file,
then rename) and, unless ``check=False``, runs the file with onnxruntime on a random batch and
raises when the largest absolute difference from PyTorch exceeds ``atol``.

Export uses ``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter): with torch 2.14
it handles timm and smp models without the onnxscript translation of every op and is faster;
``dynamo=True`` is available through the argument.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ml.segmenter import Segmenter
from ml.tagger import Tagger


class _TaggerOutputs(nn.Module):
    """The tagger with both outputs, for export."""

    def __init__(self, tagger: Tagger) -> None:
        super().__init__()
        self.tagger = tagger

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        embedding = self.tagger.embed(images)
        return self.tagger.head(embedding), embedding


@dataclass(frozen=True)
class ExportCheck:
    """The largest absolute difference per output between ONNX Runtime and PyTorch."""

    path: Path
    max_abs_diff: dict[str, float]


def _wrap(model: Tagger | Segmenter) -> tuple[nn.Module, list[str], int]:
    if isinstance(model, Tagger):
        return _TaggerOutputs(model), ["logits", "embedding"], model.config.input_size
    return model, ["logits"], model.config.input_size


def export_onnx(
    model: Tagger | Segmenter,
    path: Path | str,
    *,
    check: bool = True,
    atol: float = 1e-4,
    opset: int = 18,
    dynamo: bool = False,
) -> ExportCheck:
    """Export ``model`` to ONNX at ``path`` and compare with PyTorch on a batch of 2.

    Raises:
        AssertionError: an output differs from PyTorch by more than ``atol``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped, outputs, size = _wrap(model)
    wrapped = wrapped.cpu().eval()
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    axes = {"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        torch.onnx.export(
            wrapped,
            (example,),
            tmp,
            input_names=["images"],
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=dynamo,
        )
        diffs = _compare(wrapped, tmp, example, outputs) if check else {}
        bad = {k: v for k, v in diffs.items() if not v <= atol}
        if bad:
            raise AssertionError(f"ONNX outputs differ from PyTorch by {bad} (atol {atol})")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ExportCheck(path, diffs)


def _compare(
    model: nn.Module, onnx_path: str, example: Tensor, outputs: list[str]
) -> dict[str, float]:
    import onnxruntime as ort  # optional at import time: only export needs it

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = session.run(outputs, {"images": example.numpy()})
    with torch.inference_mode():
        expected = model(example)
    expected = expected if isinstance(expected, tuple) else (expected,)
    return {
        name: float(np.abs(np.asarray(g) - e.numpy()).max())
        for name, g, e in zip(outputs, got, expected, strict=True)
    }


def run_onnx(path: Path | str, images: np.ndarray) -> list[np.ndarray]:
    """Run an exported model with onnxruntime on ``images`` ``(B, 3, S, S)`` float32."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, {"images": images.astype(np.float32)})]

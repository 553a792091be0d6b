"""Checkpoints: a ``state_dict`` plus our own JSON config, written atomically.

A checkpoint is one file written by ``torch.save`` holding only tensors and strings::

    {"state_dict": {...}, "meta": "<JSON>"}

with ``meta = {"format": 1, "kind": "tagger" | "segmenter", "config": {...}, "tags": [...],
"extra": {...}}``: the frozen config dataclass as JSON (tags included), the tag list again for
readers that only want names, and JSON extras (tuned thresholds, metrics, a CAM calibrator).
It is written to a temporary file in the same folder and renamed into place, so a crash never
leaves a half-written checkpoint. Loading uses ``torch.load(..., weights_only=True)`` (no pickle
code runs) and rebuilds the model with ``pretrained=False`` / ``encoder_weights=None`` (nothing
is downloaded).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import tempfile
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ml.segmenter import Segmenter, SegmenterConfig, build_segmenter
from ml.tagger import Tagger, TaggerConfig, build_tagger

FORMAT = 1
C = TypeVar("C")

KINDS: dict[str, tuple[type[Any], Callable[[Any], nn.Module]]] = {
    "tagger": (TaggerConfig, build_tagger),
    "segmenter": (SegmenterConfig, build_segmenter),
}


def config_to_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as JSON-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _tuple_field(annotation: Any) -> bool:
    origins = {typing.get_origin(a) for a in (annotation, *typing.get_args(annotation))}
    return tuple in origins or typing.get_origin(annotation) is tuple


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a config dataclass from ``config_to_dict`` output (lists back to tuples).

    Raises:
        ValueError: a field is unknown to this version of the code.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}; newer checkpoint?")
    values = {
        k: tuple(v) if isinstance(v, list) and _tuple_field(hints[k]) else v
        for k, v in data.items()
    }
    return cls(**values)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode), its config and JSON extras."""

    kind: str
    model: nn.Module
    config: Any
    extra: dict[str, Any]


def _kind_of(config: Any) -> str:
    for kind, (cls, _) in KINDS.items():
        if isinstance(config, cls):
            return kind
    raise TypeError(f"no checkpoint kind for {type(config).__name__}; known: {', '.join(KINDS)}")


def save_checkpoint(
    path: Path | str, model: nn.Module, config: Any, *, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights and ``config`` (plus JSON ``extra``) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "kind": _kind_of(config),
        "config": config_to_dict(config),
        "tags": list(config.tags),
        "extra": extra or {},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"state_dict": state, "meta": json.dumps(meta)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read(path: Path | str) -> Any:
    """``torch.load`` with ``weights_only=True``; an unreadable file is a ``ValueError``."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a readable weights file ({exc})") from exc


def load_checkpoint(
    path: Path | str, *, device: torch.device | str = "cpu", kind: str | None = None
) -> Checkpoint:
    """Load a checkpoint written by ``save_checkpoint`` and rebuild its model.

    Args:
        path: the checkpoint file.
        device: where the model goes.
        kind: the expected kind (``tagger`` or ``segmenter``); None accepts either.

    Raises:
        ValueError: the file is not one of our checkpoints, or not of the expected kind.
    """
    blob = _read(path)
    if not isinstance(blob, dict) or "meta" not in blob or "state_dict" not in blob:
        raise ValueError(f"{path} is not a Tessera checkpoint (no state_dict and meta)")
    meta = json.loads(blob["meta"])
    if meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format')!r}")
    if kind is not None and meta["kind"] != kind:
        raise ValueError(f"{path} holds a {meta['kind']}, expected a {kind}")
    cls, build = KINDS[meta["kind"]]
    config = config_from_dict(cls, meta["config"])
    model = build(config)
    model.load_state_dict(blob["state_dict"])
    model.to(device).eval()
    return Checkpoint(meta["kind"], model, config, dict(meta.get("extra", {})))


@dataclass(frozen=True)
class PretrainedReport:
    """What ``load_pretrained`` took from a weights file: tensors loaded and left out."""

    loaded: int
    expected: int
    skipped: tuple[str, ...]  # keys of the file that did not fit (another head, another shape)


# Where the pretrained part lives in each model, and the prefixes a file may carry for it:
# a Tessera checkpoint of the same kind, or the bare backbone (timm / smp / torchvision files).
_PRETRAINED_PARTS = {"tagger": "features.backbone.", "segmenter": "net.encoder."}
MIN_PRETRAINED_SHARE = 0.5


def load_pretrained(model: Tagger | Segmenter, path: Path | str) -> PretrainedReport:
    """Initialise a model's backbone (tagger) or encoder (segmenter) from a local weights file.

    This is how ImageNet (or any earlier) weights get in without a download: save the backbone's
    ``state_dict`` once (``timm.create_model(name, pretrained=True).state_dict()`` on a machine
    with internet, or a torchvision ``.pth``), or point at a Tessera checkpoint. Tensors whose name
    or shape does not fit (a classifier head, another number of tags) are skipped and reported.

    Raises:
        ValueError: the file holds no tensors, or fewer than half of the backbone's tensors fit
            (wrong architecture: better to say so than to train from a silent random start).
    """
    kind = _kind_of(model.config)
    part = _PRETRAINED_PARTS[kind]
    backbone = model.config.backbone if isinstance(model, Tagger) else model.config.encoder
    blob = _read(path)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} holds no state_dict of tensors")
    target = {k[len(part) :]: v for k, v in model.state_dict().items() if k.startswith(part)}
    fitting: dict[str, torch.Tensor] = {}
    skipped = []
    for key, value in state.items():
        name = key[len(part) :] if key.startswith(part) else key
        if name in target and tuple(target[name].shape) == tuple(value.shape):
            fitting[part + name] = value
        else:
            skipped.append(key)
    if len(fitting) < MIN_PRETRAINED_SHARE * len(target):
        raise ValueError(
            f"{path} fits only {len(fitting)} of the {len(target)} tensors of this {kind}'s "
            f"backbone ({backbone}): wrong architecture?"
        )
    model.load_state_dict(fitting, strict=False)
    return PretrainedReport(len(fitting), len(target), tuple(skipped))

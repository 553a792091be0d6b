"""Offline aggregation of vote files: the logic behind ``tessera aggregate``.

Input formats (chosen by extension):

* VOTES ``.csv``: header with columns ``worker,task,label`` (any order, extra columns ignored;
  the crowd-kit convention). ``label`` is 0/1 (also accepted: false/true, no/yes; any case).
  Values are stripped of surrounding whitespace; empty lines are skipped. Workers and tasks are
  numbered in order of first appearance, which is the order of the output.
* VOTES ``.npz``, one of:

  - ``votes`` (workers x items, int8, -1 = no vote, else 0/1) with optional ``gold`` (items,
    int8, -1 = unknown); workers and tasks are named by their index ("0", "1", ...);
  - the columns ``worker``, ``task``, ``label``: 1-D arrays of one entry per vote, as in the CSV
    (COO: 10M votes of 1,000 workers on 1M items take 10M entries, where the matrix would take
    1e9). Names are integers or strings, numbered in order of first appearance; ``label`` is
    integer or bool 0/1, or strings as in the CSV. Gold comes from ``--gold``;
  - ``masks`` (annotators x H x W, bool, or integer with nonzero = object) for dense
    consensus.
* IMAGE (masks only): the photograph the masks were drawn on (PNG, JPEG, ...), same size.
* TRUTH (masks only): an expert mask to score against: an image (nonzero = object) or an NPZ
  with ``truth`` (H x W).
* GOLD ``.csv``: ``task,label`` (label 0/1); ``.npz``: ``gold`` (items, int8, -1 = unknown, in
  the order of the VOTES' tasks).
* PRIOR ``.csv``: ``task,prior`` (probability in [0, 1]) or ``task,logodds``; ``.npz``: ``prior``
  (probabilities, items; or H x W for masks) or ``logodds`` (items).

Output (chosen by the extension of OUT):

* ``.csv``: OUT has ``task,posterior,label,gold`` per item, and a sibling
  ``<stem>.workers.csv`` has ``worker,sensitivity,specificity,n_votes,adversary`` per worker.
  Dense consensus needs ``.npz``.
* ``.npz``: ``task`` (str), ``posterior`` (float64), ``label`` (int8), ``worker`` (str),
  ``sensitivity``, ``specificity`` (float64), ``adversary`` (bool); for masks ``soft`` (H x W
  float32), ``hard`` (H x W bool), ``sensitivity``, ``specificity`` and ``used`` (annotators;
  ``used`` is False for one set aside as having drawn another object).

Files are written to a temporary file in the same folder and renamed, so nothing half-written
stays behind.

Votes live in :mod:`.vote_files`, loaded only for votes (pyarrow takes about 0.13 s to import,
which fusing one object's masks does not need); masks are fused here. CSV files are read
column by column with pyarrow (10M votes in about 2 s, where Python's ``csv``
took over 20 s) and checked with vectorised operations; errors name the file line of the first
bad row, found by scanning the file with ``csv`` up to that row. Files that pyarrow does not read
as ``csv`` would (a row with more or fewer values than the header, a line of blanks, invalid
UTF-8) and rows of nothing but blank values are read row by row with ``csv`` instead, as before:
slower, with the same results and messages. Output CSVs are built with numpy and pyarrow too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from ml.aggregation.dense import (
    DENSE_METHODS,
    calibration_on_disputed,
    fuse_masks,
    mask_iou,
)
from ml.aggregation.votes import logit


class AggregationInputError(ValueError):
    """An input file is wrong; the message names the file, the row or array, and the fix."""


@dataclass(frozen=True)
class AggregateSummary:
    """What ``aggregate_file`` did, for the CLI to print."""

    method: str
    n_workers: int
    n_items: int
    n_votes: int
    n_gold: int
    n_positive: int
    iterations: int
    converged: bool
    out: Path
    workers_out: Path | None
    dense: bool
    set_aside: int = 0  # masks: annotators set aside as having drawn another object
    image_used: bool = False  # masks: the border was redrawn from the image
    iou: float | None = None  # masks with --truth: IoU of the hard mask
    ece_disputed: float | None = None  # masks with --truth: ECE on the disputed pixels
    n_disputed: int = 0


def aggregate_file(
    votes: Path,
    *,
    out: Path,
    gold: Path | None = None,
    prior: Path | None = None,
    method: str | None = None,
    image: Path | None = None,
    truth: Path | None = None,
) -> AggregateSummary:
    """Aggregate a vote file (CSV or NPZ) or fuse a dense-mask NPZ; write OUT.

    Args:
        votes: the VOTES file.
        out: where to write (``.csv`` or ``.npz``).
        gold: optional GOLD file (overrides ``gold`` inside a VOTES NPZ).
        prior: optional PRIOR file.
        method: a name in ``METHODS`` for votes (default ``dawid_skene``), in
            ``DENSE_METHODS`` for masks (default ``consensus``; ``dawid_skene`` means ``staple``).
        image: masks only: the photograph (PNG, JPEG, ...) the masks were drawn on.
        truth: masks only: an expert mask (image file, nonzero = object, or NPZ ``truth``) to
            score the result against (IoU, and ECE on disputed pixels).

    Raises:
        AggregationInputError: a file is missing, malformed or inconsistent, or the method or
            output extension is unknown.
    """
    votes, out = Path(votes), Path(out)
    if out.suffix.lower() not in (".csv", ".npz"):
        raise AggregationInputError(f"{out}: output must end in .csv or .npz")
    kind = suffix_of(votes, "VOTES")
    if kind == ".npz":
        with open_npz(votes) as z:
            if "masks" in z:
                return _aggregate_masks(
                    votes,
                    np.asarray(z["masks"]),
                    out=out,
                    prior=prior,
                    method=method,
                    image=image,
                    truth=truth,
                )
    if image is not None or truth is not None:
        raise AggregationInputError(
            "--image and --truth are for dense masks (an NPZ with 'masks'), not for votes"
        )
    from ml.aggregation import vote_files  # pyarrow: loaded for votes only

    return vote_files.aggregate_votes(votes, out=out, gold=gold, prior=prior, method=method)


# -- reading ----------------------------------------------------------------------------------
def suffix_of(path: Path, what: str) -> str:
    if not path.is_file():
        raise AggregationInputError(f"{what} file {path} does not exist")
    s = path.suffix.lower()
    if s not in (".csv", ".npz"):
        raise AggregationInputError(f"{what} file {path}: use a .csv or .npz file")
    return s


@contextmanager
def open_npz(path: Path) -> Iterator[Any]:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise AggregationInputError(f"{path}: not a readable .npz file ({e})") from e
    with z:
        yield z


def check_prior_array(
    path: Path, key: str, a: npt.NDArray[np.float64], shape: tuple[int, ...]
) -> npt.NDArray[np.float64]:
    if a.shape != shape:
        raise AggregationInputError(f"{path}: array {key!r} must have shape {shape}, got {a.shape}")
    if not np.isfinite(a).all():
        raise AggregationInputError(f"{path}: array {key!r} holds NaN or infinite values")
    if key == "logodds":
        return a
    if a.min(initial=0.0) < 0 or a.max(initial=0.0) > 1:
        raise AggregationInputError(f"{path}: array 'prior' must hold probabilities in [0, 1]")
    return logit(a)


def _aggregate_masks(
    path: Path,
    masks: npt.NDArray[Any],
    *,
    out: Path,
    prior: Path | None,
    method: str | None,
    image: Path | None,
    truth: Path | None,
) -> AggregateSummary:
    method = "staple" if method == "dawid_skene" else (method or "consensus")
    if method not in DENSE_METHODS:
        raise AggregationInputError(
            f"--method {method!r} is not one for masks; use one of {', '.join(DENSE_METHODS)}"
        )
    integral = masks.dtype == np.bool_ or np.issubdtype(masks.dtype, np.integer)
    if masks.ndim != 3 or not integral or masks.shape[0] == 0 or 0 in masks.shape[1:]:
        raise AggregationInputError(
            f"{path}: array 'masks' must be annotators x H x W, bool or integer (nonzero = "
            f"object), got {masks.dtype} shape {masks.shape}"
        )
    masks = masks != 0
    if out.suffix.lower() != ".npz":
        raise AggregationInputError(f"{out}: dense consensus of masks writes .npz, not .csv")
    p = None
    if prior is not None:
        if suffix_of(prior, "PRIOR") != ".npz":
            raise AggregationInputError(
                f"{prior}: the prior of a masks file must be an .npz with 'prior' (H x W)"
            )
        with open_npz(prior) as z:
            if "prior" not in z:
                raise AggregationInputError(f"{prior}: needs an array 'prior' (H x W)")
            a = np.asarray(z["prior"], dtype=np.float64)
        p = check_prior_array(prior, "prior", a, masks.shape[1:])
    shape = masks.shape[1:]
    rgb = None if image is None else _read_image(image, shape)
    expert = None if truth is None else _read_truth(truth, shape)
    if method == "majority_vote" and (p is not None or rgb is not None):
        raise AggregationInputError(
            "--method majority_vote takes neither --prior nor --image; use consensus"
        )
    if method == "staple" and rgb is not None:
        raise AggregationInputError("--image needs --method consensus (the default for masks)")
    fused = fuse_masks(
        masks, prior=None if p is None else 1.0 / (1.0 + np.exp(-p)), image=rgb, method=method
    )
    atomic_write(
        out,
        lambda f: np.savez_compressed(
            f,
            soft=fused.soft,
            hard=fused.hard,
            sensitivity=fused.sensitivity,
            specificity=fused.specificity,
            used=fused.used,
        ),
    )
    r, h, w = masks.shape
    iou = ece = None
    n_disputed = 0
    if expert is not None:
        iou = mask_iou(fused.hard, expert)
        ece, n_disputed = calibration_on_disputed(fused.soft, masks, expert)
    return AggregateSummary(
        method,
        r,
        h * w,
        r * h * w,
        0,
        int(fused.hard.sum()),
        fused.iterations,
        fused.converged,
        out,
        None,
        True,
        set_aside=int((~fused.used).sum()),
        image_used=fused.image_used,
        iou=iou,
        ece_disputed=ece,
        n_disputed=n_disputed,
    )


def _read_image(path: Path, shape: tuple[int, ...]) -> npt.NDArray[np.uint8]:
    """The photograph the masks were drawn on, as RGB uint8 of the masks' size."""
    import cv2

    if not path.is_file():
        raise AggregationInputError(f"IMAGE file {path} does not exist")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise AggregationInputError(f"{path}: not an image OpenCV can read (use PNG or JPEG)")
    if bgr.shape[:2] != tuple(shape):
        raise AggregationInputError(
            f"{path}: the image is {bgr.shape[1]}x{bgr.shape[0]} (width x height) but the masks "
            f"are {shape[1]}x{shape[0]}; give the image the masks were drawn on, at full size"
        )
    return np.ascontiguousarray(bgr[..., ::-1])


def _read_truth(path: Path, shape: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    """An expert mask: an image file (nonzero = object) or an NPZ with a 2-D ``truth``."""
    if not path.is_file():
        raise AggregationInputError(f"TRUTH file {path} does not exist")
    if path.suffix.lower() == ".npz":
        with open_npz(path) as z:
            if "truth" not in z:
                raise AggregationInputError(f"{path}: needs an array 'truth' (H x W)")
            t = np.asarray(z["truth"])
    else:
        import cv2

        read = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if read is None:
            raise AggregationInputError(f"{path}: not an image OpenCV can read (use PNG)")
        t = np.asarray(read)
    if t.shape != tuple(shape):
        raise AggregationInputError(
            f"{path}: the truth has shape {t.shape}, the masks {tuple(shape)}"
        )
    return t != 0


# -- writing ----------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[IO[Any]], None], binary: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", newline=None if binary else "") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

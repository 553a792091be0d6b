"""Offline aggregation of vote files: the logic behind ``tessera aggregate``.

Input formats (chosen by extension):

* VOTES ``.csv``: header with columns ``worker,task,label`` (any order, extra columns ignored;
  the crowd-kit convention). ``label`` is 0/1 (also accepted: false/true, no/yes).
* VOTES ``.npz``: either ``votes`` (workers x items, int8, -1 = no vote, else 0/1) with optional
  ``gold`` (items, int8, -1 = unknown), or ``masks`` (annotators x H x W, bool) for dense
  consensus. Workers and tasks of a matrix are named by their index ("0", "1", ...).
* IMAGE (masks only): the photograph the masks were drawn on (PNG, JPEG, ...), same size.
* TRUTH (masks only): an expert mask to score against: an image (nonzero = object) or an NPZ
  with ``truth`` (H x W).
* GOLD ``.csv``: ``task,label`` (label 0/1); ``.npz``: ``gold`` (items, int8, -1 = unknown).
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
"""

from __future__ import annotations

import csv
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
from ml.aggregation.registry import METHODS, get_method
from ml.aggregation.votes import AggregationResult, Votes, from_dense, logit, make_votes

LABELS = {"0": 0, "1": 1, "false": 0, "true": 1, "no": 0, "yes": 1}


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


@dataclass(frozen=True)
class _Table:
    votes: Votes
    workers: list[str]
    tasks: list[str]
    gold: npt.NDArray[np.int8] | None


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
    kind = _suffix(votes, "VOTES")
    table: _Table | None = None
    if kind == ".npz":
        with _open_npz(votes) as z:
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
            table = _read_vote_npz(votes, z)
    if image is not None or truth is not None:
        raise AggregationInputError(
            "--image and --truth are for dense masks (an NPZ with 'masks'), not for votes"
        )
    method = method or "dawid_skene"
    if method not in METHODS:
        raise AggregationInputError(
            f"--method {method!r} is unknown; use one of {', '.join(sorted(METHODS))}"
        )
    if table is None:
        table = _read_vote_csv(votes)
    g = _read_gold(gold, table) if gold is not None else table.gold
    p = _read_prior(prior, table) if prior is not None else None
    result = get_method(method)(table.votes, gold=g, prior_logodds=p)
    workers_out = _write_result(out, table, result, g)
    n_gold = 0 if g is None else int((g >= 0).sum())
    return AggregateSummary(
        method,
        table.votes.n_workers,
        table.votes.n_items,
        table.votes.n_votes,
        n_gold,
        int(result.label.sum()),
        result.iterations,
        result.converged,
        out,
        workers_out,
        False,
    )


# -- reading ----------------------------------------------------------------------------------
def _suffix(path: Path, what: str) -> str:
    if not path.is_file():
        raise AggregationInputError(f"{what} file {path} does not exist")
    s = path.suffix.lower()
    if s not in (".csv", ".npz"):
        raise AggregationInputError(f"{what} file {path}: use a .csv or .npz file")
    return s


@contextmanager
def _open_npz(path: Path) -> Iterator[Any]:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise AggregationInputError(f"{path}: not a readable .npz file ({e})") from e
    with z:
        yield z


def _csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, values of ``columns``) per data row."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise AggregationInputError(
                f"{path}: header must name the columns {','.join(columns)}; missing "
                f"{','.join(missing)} (found {','.join(header) or 'no header'})"
            )
        idx = [header.index(c) for c in columns]
        for row in reader:
            if not row or all(not v.strip() for v in row):
                continue
            if len(row) < len(header):
                raise AggregationInputError(
                    f"{path}, line {reader.line_num}: expected {len(header)} values, got {len(row)}"
                )
            yield reader.line_num, [row[i].strip() for i in idx]


def _label(path: Path, line: int, value: str) -> int:
    try:
        return LABELS[value.lower()]
    except KeyError:
        raise AggregationInputError(
            f"{path}, line {line}: label {value!r} is not 0/1 (or false/true, no/yes)"
        ) from None


def _read_vote_csv(path: Path) -> _Table:
    workers: dict[str, int] = {}
    tasks: dict[str, int] = {}
    w: list[int] = []
    i: list[int] = []
    y: list[int] = []
    for line, (worker, task, label) in _csv_rows(path, ("worker", "task", "label")):
        if not worker or not task:
            raise AggregationInputError(f"{path}, line {line}: worker and task must not be empty")
        y.append(_label(path, line, label))
        w.append(workers.setdefault(worker, len(workers)))
        i.append(tasks.setdefault(task, len(tasks)))
    if not y:
        raise AggregationInputError(f"{path}: no votes (the file has a header but no rows)")
    v = make_votes(w, i, y, n_workers=len(workers), n_items=len(tasks))
    return _Table(v, list(workers), list(tasks), None)


def _int_array(path: Path, z: Any, key: str, ndim: int) -> npt.NDArray[np.int8]:
    a = np.asarray(z[key])
    if a.ndim != ndim:
        raise AggregationInputError(f"{path}: array {key!r} must be {ndim}-D, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise AggregationInputError(
            f"{path}: array {key!r} must be int8 with -1/0/1, got dtype {a.dtype}"
        )
    if a.size and not np.isin(a, (-1, 0, 1)).all():
        bad = a[~np.isin(a, (-1, 0, 1))].reshape(-1)[0]
        raise AggregationInputError(
            f"{path}: array {key!r} may only hold -1 (none), 0 and 1; found {bad}"
        )
    return a.astype(np.int8)


def _read_vote_npz(path: Path, z: Any) -> _Table:
    if "votes" not in z:
        raise AggregationInputError(
            f"{path}: needs an array 'votes' (workers x items, int8) or 'masks' "
            f"(annotators x H x W, bool); found {', '.join(z.files) or 'nothing'}"
        )
    m = _int_array(path, z, "votes", 2)
    gold = None
    if "gold" in z:
        gold = _int_array(path, z, "gold", 1)
        if gold.shape != (m.shape[1],):
            raise AggregationInputError(
                f"{path}: array 'gold' has {gold.shape[0]} items but 'votes' has {m.shape[1]}"
            )
    v = from_dense(m)
    return _Table(v, [str(k) for k in range(m.shape[0])], [str(k) for k in range(m.shape[1])], gold)


def _task_index(table: _Table) -> dict[str, int]:
    return {t: k for k, t in enumerate(table.tasks)}


def _per_task_csv(
    path: Path, table: _Table, column: str, parse: Callable[[int, str], float], fill: float
) -> npt.NDArray[np.float64]:
    index = _task_index(table)
    out = np.full(table.votes.n_items, fill, dtype=np.float64)
    for line, (task, value) in _csv_rows(path, ("task", column)):
        if task not in index:
            raise AggregationInputError(
                f"{path}, line {line}: task {task!r} has no votes in the VOTES file"
            )
        out[index[task]] = parse(line, value)
    return out


def _read_gold(path: Path, table: _Table) -> npt.NDArray[np.int8]:
    if _suffix(path, "GOLD") == ".csv":
        g = _per_task_csv(path, table, "label", lambda ln, v: _label(path, ln, v), -1.0)
        return g.astype(np.int8)
    with _open_npz(path) as z:
        if "gold" not in z:
            raise AggregationInputError(
                f"{path}: needs an array 'gold' (items, int8, -1 = unknown)"
            )
        g8 = _int_array(path, z, "gold", 1)
    if g8.shape != (table.votes.n_items,):
        raise AggregationInputError(
            f"{path}: array 'gold' has {g8.shape[0]} items, VOTES has {table.votes.n_items}"
        )
    return g8


def _number(path: Path, line: int, value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise AggregationInputError(f"{path}, line {line}: {value!r} is not a number") from None
    if not np.isfinite(x):
        raise AggregationInputError(f"{path}, line {line}: {value!r} must be finite")
    return x


def _probability(path: Path, line: int, value: str) -> float:
    x = _number(path, line, value)
    if not 0.0 <= x <= 1.0:
        raise AggregationInputError(f"{path}, line {line}: prior {x} must lie in [0, 1]")
    return x


def _read_prior(path: Path, table: _Table) -> npt.NDArray[np.float64]:
    if _suffix(path, "PRIOR") == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            header = [h.strip().lower() for h in next(csv.reader(f), [])]
        if "logodds" in header:
            return _per_task_csv(path, table, "logodds", lambda ln, v: _number(path, ln, v), 0.0)
        p = _per_task_csv(path, table, "prior", lambda ln, v: _probability(path, ln, v), 0.5)
        return logit(p)
    with _open_npz(path) as z:
        key = "logodds" if "logodds" in z else "prior"
        if key not in z:
            raise AggregationInputError(f"{path}: needs an array 'prior' or 'logodds' (items)")
        a = np.asarray(z[key], dtype=np.float64)
    return _check_prior_array(path, key, a, (table.votes.n_items,))


def _check_prior_array(
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
    if masks.ndim != 3 or masks.dtype != np.bool_ or masks.shape[0] == 0:
        raise AggregationInputError(
            f"{path}: array 'masks' must be bool annotators x H x W, got {masks.dtype} "
            f"shape {masks.shape}"
        )
    if out.suffix.lower() != ".npz":
        raise AggregationInputError(f"{out}: dense consensus of masks writes .npz, not .csv")
    p = None
    if prior is not None:
        if _suffix(prior, "PRIOR") != ".npz":
            raise AggregationInputError(
                f"{prior}: the prior of a masks file must be an .npz with 'prior' (H x W)"
            )
        with _open_npz(prior) as z:
            if "prior" not in z:
                raise AggregationInputError(f"{prior}: needs an array 'prior' (H x W)")
            a = np.asarray(z["prior"], dtype=np.float64)
        p = _check_prior_array(prior, "prior", a, masks.shape[1:])
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
    _atomic_write(
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
        with _open_npz(path) as z:
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
def _atomic_write(path: Path, write: Callable[[IO[Any]], None], binary: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", newline=None if binary else "") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_result(
    out: Path, table: _Table, result: AggregationResult, gold: npt.NDArray[np.int8] | None
) -> Path | None:
    n_votes = np.bincount(table.votes.worker, minlength=table.votes.n_workers)
    g = np.full(table.votes.n_items, -1, np.int8) if gold is None else gold
    if out.suffix.lower() == ".npz":
        _atomic_write(
            out,
            lambda f: np.savez_compressed(
                f,
                task=np.asarray(table.tasks),
                posterior=result.posterior,
                label=result.label,
                worker=np.asarray(table.workers),
                sensitivity=result.sensitivity,
                specificity=result.specificity,
                adversary=result.adversary,
            ),
        )
        return None

    def items(f: IO[Any]) -> None:
        wr = csv.writer(f)
        wr.writerow(["task", "posterior", "label", "gold"])
        for t, q, y, gg in zip(table.tasks, result.posterior, result.label, g, strict=True):
            wr.writerow([t, f"{q:.6g}", int(y), "" if gg < 0 else int(gg)])

    def workers(f: IO[Any]) -> None:
        wr = csv.writer(f)
        wr.writerow(["worker", "sensitivity", "specificity", "n_votes", "adversary"])
        for k, name in enumerate(table.workers):
            wr.writerow(
                [
                    name,
                    f"{result.sensitivity[k]:.6g}",
                    f"{result.specificity[k]:.6g}",
                    int(n_votes[k]),
                    int(result.adversary[k]),
                ]
            )

    workers_out = out.with_name(f"{out.stem}.workers.csv")
    _atomic_write(workers_out, workers, binary=False)
    _atomic_write(out, items, binary=False)
    return workers_out

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
  - ``masks`` (annotators x H x W, bool) for dense consensus.
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

CSV files are read column by column with pyarrow (10M votes in about 2 s, where Python's ``csv``
took over 20 s) and checked with vectorised operations; errors name the file line of the first
bad row, found by scanning the file with ``csv`` up to that row. Files that pyarrow does not read
as ``csv`` would (a row with more or fewer values than the header, a line of blanks, invalid
UTF-8) and rows of nothing but blank values are read row by row with ``csv`` instead, as before:
slower, with the same results and messages. Output CSVs are built with numpy and pyarrow too.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from ml.aggregation import columns as col
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
    workers: pa.Array  # (n_workers,) names, strings
    tasks: pa.Array  # (n_items,) names, strings
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


def _header_columns(path: Path, columns: tuple[str, ...]) -> tuple[list[str], list[int], int]:
    """The header, the positions of ``columns`` in it and the header's line count."""
    header, n_lines = col.read_header(path)
    _check_header(path, columns, header)
    return header, [header.index(c) for c in columns], n_lines


def _check_header(path: Path, columns: tuple[str, ...], header: list[str]) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise AggregationInputError(
            f"{path}: header must name the columns {','.join(columns)}; missing "
            f"{','.join(missing)} (found {','.join(header) or 'no header'})"
        )


def _csv_columns(path: Path, columns: tuple[str, ...]) -> list[pa.ChunkedArray] | None:
    """The data rows' values of ``columns`` (unstripped strings); None: read row by row."""
    header, idx, n_lines = _header_columns(path, columns)
    if n_lines != 1:  # a header over several lines: let csv count them
        return None
    return col.read_string_columns(path, len(header), idx)


def _csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, values of ``columns``) per data row (the row-by-row reader)."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        _check_header(path, columns, header)
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


def _value(column: pa.ChunkedArray, row: int) -> str:
    """The stripped value of one row (for messages)."""
    return str(column[row].as_py()).strip()


def _blank(columns: list[pa.ChunkedArray], row: int) -> bool:
    """Whether a row's values are all blank (csv readers here skip such rows)."""
    return all(not _value(c, row) for c in columns)


def _first(*rows: int | None) -> int | None:
    found = [r for r in rows if r is not None]
    return min(found) if found else None


def _read_vote_csv(path: Path) -> _Table:
    cols = _csv_columns(path, ("worker", "task", "label"))
    if cols is None:
        return _read_vote_rows(path)
    worker, task, label = cols
    if len(label) == 0:
        raise AggregationInputError(f"{path}: no votes (the file has a header but no rows)")
    # pyarrow's kernels release the GIL: the three columns in parallel
    with ThreadPoolExecutor(3) as pool:
        fw, ft = pool.submit(col.factorize, worker), pool.submit(col.factorize, task)
        fy = pool.submit(col.lookup, label, LABELS)
        w, t, y = fw.result(), ft.result(), fy.result()
    empty = [f.codes == f.code_of("") for f in (w, t) if f.code_of("") >= 0]
    first_empty = col.first_true(np.logical_or.reduce(empty)) if empty else None
    first_bad = col.first_true(y < 0) if y.min() < 0 else None
    row = _first(first_empty, first_bad)
    if row is not None:
        if _blank(cols, row):  # skipped by csv; extra columns may be blank too: read by rows
            return _read_vote_rows(path)
        line = col.line_of_row(path, row)
        if row == first_empty:
            raise AggregationInputError(f"{path}, line {line}: worker and task must not be empty")
        _label(path, line, _value(label, row))  # raises
    v = make_votes(
        w.codes, t.codes, y.astype(np.int8), n_workers=len(w.names), n_items=len(t.names)
    )
    return _Table(v, w.names, t.names, None)


def _read_vote_rows(path: Path) -> _Table:
    """The row-by-row reader: files pyarrow does not read as csv would."""
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
    return _Table(v, pa.array(list(workers), pa.string()), pa.array(list(tasks), pa.string()), None)


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


_COLUMNS = ("worker", "task", "label")


def _read_vote_npz(path: Path, z: Any) -> _Table:
    if "votes" not in z:
        if all(k in z for k in _COLUMNS):
            return _read_vote_npz_columns(path, z)
        raise AggregationInputError(
            f"{path}: needs an array 'votes' (workers x items, int8), the arrays 'worker', "
            f"'task', 'label' (one entry per vote) or 'masks' (annotators x H x W, bool); found "
            f"{', '.join(z.files) or 'nothing'}"
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
    return _Table(v, _index_names(m.shape[0]), _index_names(m.shape[1]), gold)


def _index_names(n: int) -> pa.Array:
    return pc.cast(pa.array(np.arange(n, dtype=np.int64)), pa.string())


def _read_vote_npz_columns(path: Path, z: Any) -> _Table:
    arrays = {k: np.asarray(z[k]) for k in _COLUMNS}
    for k, a in arrays.items():
        if a.ndim != 1:
            raise AggregationInputError(
                f"{path}: array {k!r} must be 1-D (one entry per vote), got shape {a.shape}"
            )
    sizes = {a.shape[0] for a in arrays.values()}
    if len(sizes) != 1:
        raise AggregationInputError(
            f"{path}: arrays 'worker', 'task' and 'label' must have one length; got "
            + ", ".join(f"{k} {a.shape[0]}" for k, a in arrays.items())
        )
    if not sizes.pop():
        raise AggregationInputError(
            f"{path}: no votes (the arrays 'worker', 'task', 'label' are empty)"
        )
    if "gold" in z:
        raise AggregationInputError(
            f"{path}: array 'gold' goes with 'votes' only; give the gold answers of named tasks "
            "with --gold (CSV task,label)"
        )
    w = _npz_names(path, "worker", arrays["worker"])
    t = _npz_names(path, "task", arrays["task"])
    y = _npz_labels(path, arrays["label"])
    v = make_votes(w.codes, t.codes, y, n_workers=len(w.names), n_items=len(t.names))
    return _Table(v, w.names, t.names, None)


def _npz_names(path: Path, key: str, a: npt.NDArray[Any]) -> col.Factorized:
    if a.dtype.kind in "iu":
        enc = pa.array(a).dictionary_encode()
        codes = np.asarray(enc.indices, dtype=np.int32)
        return col.Factorized(codes, pc.cast(enc.dictionary, pa.string()))
    if a.dtype.kind != "U":
        raise AggregationInputError(
            f"{path}: array {key!r} must hold integers or strings, got dtype {a.dtype}"
        )
    f = col.factorize(pa.chunked_array([pa.array(a, pa.string())]))
    empty = f.code_of("")
    if empty >= 0:
        k = col.first_true(f.codes == empty)
        raise AggregationInputError(f"{path}: array {key!r} holds an empty name at index {k}")
    return f


def _npz_labels(path: Path, a: npt.NDArray[Any]) -> npt.NDArray[np.int8]:
    if a.dtype == np.bool_:
        return a.astype(np.int8)
    if a.dtype.kind in "iu":
        y = a
    elif a.dtype.kind == "U":
        y = col.lookup(pa.chunked_array([pa.array(a, pa.string())]), LABELS)
    else:
        raise AggregationInputError(
            f"{path}: array 'label' must hold 0/1 (integers, bool or strings), got dtype {a.dtype}"
        )
    if y.min() < 0 or y.max() > 1:
        k = col.first_true((y < 0) | (y > 1))
        raise AggregationInputError(
            f"{path}: array 'label' holds {a[k].item()!r} at index {k}; use 0/1 (or false/true, "
            "no/yes)"
        )
    return y.astype(np.int8)


def _task_index(table: _Table) -> dict[str, int]:
    return {t: k for k, t in enumerate(table.tasks.to_pylist())}


def _per_task_csv(
    path: Path, table: _Table, column: str, parse: Callable[[int, str], float], fill: float
) -> npt.NDArray[np.float64]:
    """The row-by-row reader of a per-task file."""
    index = _task_index(table)
    out = np.full(table.votes.n_items, fill, dtype=np.float64)
    for line, (task, value) in _csv_rows(path, ("task", column)):
        if task not in index:
            raise AggregationInputError(
                f"{path}, line {line}: task {task!r} has no votes in the VOTES file"
            )
        out[index[task]] = parse(line, value)
    return out


def _per_task_columns(
    path: Path,
    table: _Table,
    column: str,
    parse: Callable[[pa.ChunkedArray], npt.NDArray[np.float64] | None],
    bad: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.bool_]],
    parse_row: Callable[[int, str], float],
    fill: float,
) -> npt.NDArray[np.float64] | None:
    """A per-task file read by columns; None: read it row by row.

    ``parse`` turns the value column into floats (None where it cannot: the row reader then names
    the row), ``bad`` marks wrong values and ``parse_row`` is the row reader's parser, called on
    the first wrong value to raise its message.
    """
    cols = _csv_columns(path, ("task", column))
    if cols is None:
        return None
    task, value = cols
    out = np.full(table.votes.n_items, fill, dtype=np.float64)
    if len(task) == 0:
        return out
    idx = pc.index_in(col.strip(task), value_set=table.tasks)
    unknown = col.first_true(np.asarray(idx.is_null())) if idx.null_count else None
    x = parse(value)
    if x is None:
        return None
    row = _first(unknown, col.first_true(bad(x)))
    if row is not None:
        if _blank(cols, row):
            return None
        line = col.line_of_row(path, row)
        if row == unknown:
            raise AggregationInputError(
                f"{path}, line {line}: task {_value(task, row)!r} has no votes in the VOTES file"
            )
        parse_row(line, _value(value, row))  # raises
        return None  # it did not: let the row reader decide
    at = np.asarray(idx, dtype=np.intp)
    # the last row of a task wins, as in the row reader
    last = at.shape[0] - 1 - np.unique(at[::-1], return_index=True)[1]
    out[at[last]] = x[last]
    return out


def _label_column(value: pa.ChunkedArray) -> npt.NDArray[np.float64]:
    return col.lookup(value, LABELS).astype(np.float64)


def _float_column(value: pa.ChunkedArray) -> npt.NDArray[np.float64] | None:
    try:
        x = pc.cast(col.strip(value), pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return np.asarray(x.to_numpy(), dtype=np.float64)


def _read_gold(path: Path, table: _Table) -> npt.NDArray[np.int8]:
    if _suffix(path, "GOLD") == ".csv":

        def parse_row(line: int, value: str) -> float:
            return _label(path, line, value)

        g = _per_task_columns(path, table, "label", _label_column, lambda x: x < 0, parse_row, -1.0)
        if g is None:
            g = _per_task_csv(path, table, "label", parse_row, -1.0)
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
        header, _ = col.read_header(path)
        if "logodds" in header:

            def number(line: int, value: str) -> float:
                return _number(path, line, value)

            p = _per_task_columns(
                path, table, "logodds", _float_column, lambda x: ~np.isfinite(x), number, 0.0
            )
            return p if p is not None else _per_task_csv(path, table, "logodds", number, 0.0)

        def probability(line: int, value: str) -> float:
            return _probability(path, line, value)

        def outside(x: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
            return ~((x >= 0.0) & (x <= 1.0))  # NaN included

        q = _per_task_columns(path, table, "prior", _float_column, outside, probability, 0.5)
        if q is None:
            q = _per_task_csv(path, table, "prior", probability, 0.5)
        return logit(q)
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
                task=_str_array(table.tasks),
                posterior=result.posterior,
                label=result.label,
                worker=_str_array(table.workers),
                sensitivity=result.sensitivity,
                specificity=result.specificity,
                adversary=result.adversary,
            ),
        )
        return None
    items = col.csv_text(
        ["task", "posterior", "label", "gold"],
        table.tasks,
        [
            col.format_g6(result.posterior),
            col.choice_text(result.label, ["0", "1"]),
            col.choice_text(g.astype(np.intp) + 1, ["", "0", "1"]),
        ],
    )
    workers = col.csv_text(
        ["worker", "sensitivity", "specificity", "n_votes", "adversary"],
        table.workers,
        [
            col.format_g6(result.sensitivity),
            col.format_g6(result.specificity),
            col.int_text(n_votes),
            col.choice_text(result.adversary.astype(np.intp), ["0", "1"]),
        ],
    )
    workers_out = out.with_name(f"{out.stem}.workers.csv")
    _atomic_write(workers_out, lambda f: f.writelines(workers))
    _atomic_write(out, lambda f: f.writelines(items))
    return workers_out


def _str_array(names: pa.Array) -> npt.NDArray[np.str_]:
    return np.asarray(names.to_pylist(), dtype=np.str_)

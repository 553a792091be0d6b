"""Vote tables for ``tessera aggregate``: CSVs read by columns with pyarrow, NPZ matrices and
columns, gold and priors per task, and the result written as CSV or NPZ.

The formats are described in :mod:`ml.aggregation.io`, which loads this module only for votes
(pyarrow takes about 0.13 s to import; fusing one object's masks does not need it).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from ml.aggregation import columns as col
from ml.aggregation.io import (
    AggregateSummary,
    AggregationInputError,
    atomic_write,
    check_prior_array,
    open_npz,
    suffix_of,
)
from ml.aggregation.registry import METHODS, get_method
from ml.aggregation.votes import AggregationResult, Votes, from_dense, logit, make_votes

LABELS = {"0": 0, "1": 1, "false": 0, "true": 1, "no": 0, "yes": 1}


@dataclass(frozen=True)
class _Table:
    votes: Votes
    workers: pa.Array  # (n_workers,) names, strings
    tasks: pa.Array  # (n_items,) names, strings
    gold: npt.NDArray[np.int8] | None


def aggregate_votes(
    votes: Path, *, out: Path, gold: Path | None, prior: Path | None, method: str | None
) -> AggregateSummary:
    """Aggregate a vote file (CSV or NPZ without masks); write OUT (see ``aggregate_file``)."""
    method = method or "dawid_skene"
    if method not in METHODS:
        raise AggregationInputError(
            f"--method {method!r} is unknown; use one of {', '.join(sorted(METHODS))}"
        )
    if suffix_of(votes, "VOTES") == ".npz":
        with open_npz(votes) as z:
            table = _read_vote_npz(votes, z)
    else:
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
    if suffix_of(path, "GOLD") == ".csv":

        def parse_row(line: int, value: str) -> float:
            return _label(path, line, value)

        g = _per_task_columns(path, table, "label", _label_column, lambda x: x < 0, parse_row, -1.0)
        if g is None:
            g = _per_task_csv(path, table, "label", parse_row, -1.0)
        return g.astype(np.int8)
    with open_npz(path) as z:
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
    if suffix_of(path, "PRIOR") == ".csv":
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
    with open_npz(path) as z:
        key = "logodds" if "logodds" in z else "prior"
        if key not in z:
            raise AggregationInputError(f"{path}: needs an array 'prior' or 'logodds' (items)")
        a = np.asarray(z[key], dtype=np.float64)
    return check_prior_array(path, key, a, (table.votes.n_items,))


def _write_result(
    out: Path, table: _Table, result: AggregationResult, gold: npt.NDArray[np.int8] | None
) -> Path | None:
    n_votes = np.bincount(table.votes.worker, minlength=table.votes.n_workers)
    g = np.full(table.votes.n_items, -1, np.int8) if gold is None else gold
    if out.suffix.lower() == ".npz":
        atomic_write(
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
    atomic_write(workers_out, lambda f: f.writelines(workers))
    atomic_write(out, lambda f: f.writelines(items))
    return workers_out


def _str_array(names: pa.Array) -> npt.NDArray[np.str_]:
    return np.asarray(names.to_pylist(), dtype=np.str_)

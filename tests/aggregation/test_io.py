"""aggregate_file: formats, outputs and the errors users see."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from ml.aggregation import columns as col
from ml.aggregation.io import AggregationInputError, aggregate_file


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def _votes_csv(tmp_path: Path) -> Path:
    rows = [["worker", "task", "label"]]
    for w in ("a", "b", "c"):
        rows += [[w, "t1", "1"], [w, "t2", "0"], [w, "t3", "1" if w != "c" else "0"]]
    return _write_csv(tmp_path / "votes.csv", rows)


def test_csv_in_csv_out(tmp_path: Path) -> None:
    gold = _write_csv(tmp_path / "gold.csv", [["task", "label"], ["t1", "1"]])
    prior = _write_csv(tmp_path / "prior.csv", [["task", "prior"], ["t3", "0.9"]])
    s = aggregate_file(_votes_csv(tmp_path), out=tmp_path / "out.csv", gold=gold, prior=prior)
    assert (s.n_workers, s.n_items, s.n_votes, s.n_gold) == (3, 3, 9, 1)
    items = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert [r["task"] for r in items] == ["t1", "t2", "t3"]
    assert items[0]["posterior"] == "1" and items[0]["gold"] == "1"
    assert s.workers_out is not None
    workers = list(csv.DictReader(s.workers_out.open()))
    assert {r["worker"] for r in workers} == {"a", "b", "c"}
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("method", ["majority_vote", "weighted_majority", "dawid_skene"])
def test_npz_in_npz_out(tmp_path: Path, method: str) -> None:
    votes = np.array([[1, 0, -1], [1, 0, 1], [0, 0, 1]], dtype=np.int8)
    src = tmp_path / "v.npz"
    np.savez(src, votes=votes, gold=np.array([1, -1, -1], dtype=np.int8))
    s = aggregate_file(src, out=tmp_path / "o.npz", method=method)
    assert s.method == method and s.n_votes == 8
    with np.load(tmp_path / "o.npz") as z:
        assert z["posterior"].shape == (3,) and z["sensitivity"].shape == (3,)
        assert z["posterior"][0] == 1.0


def test_masks_go_through_dense_consensus(tmp_path: Path) -> None:
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[:, 2:6, 2:6] = True
    src = tmp_path / "m.npz"
    np.savez(src, masks=masks)
    s = aggregate_file(src, out=tmp_path / "o.npz")
    assert s.dense and s.n_positive == 16
    with np.load(tmp_path / "o.npz") as z:
        assert z["hard"].shape == (8, 8)
    with pytest.raises(AggregationInputError, match=r"\.npz"):
        aggregate_file(src, out=tmp_path / "o.csv")


def test_bad_csv_row_names_the_line(tmp_path: Path) -> None:
    bad = _write_csv(
        tmp_path / "v.csv", [["worker", "task", "label"], ["a", "t", "1"], ["b", "t", "maybe"]]
    )
    with pytest.raises(AggregationInputError, match=r"v\.csv, line 3: label 'maybe'"):
        aggregate_file(bad, out=tmp_path / "o.csv")
    short = _write_csv(tmp_path / "s.csv", [["worker", "task", "label"], ["a", "t"]])
    with pytest.raises(AggregationInputError, match="line 2: expected 3 values"):
        aggregate_file(short, out=tmp_path / "o.csv")
    header = _write_csv(tmp_path / "h.csv", [["who", "task", "label"], ["a", "t", "1"]])
    with pytest.raises(AggregationInputError, match="missing worker"):
        aggregate_file(header, out=tmp_path / "o.csv")
    assert not (tmp_path / "o.csv").exists()


def test_wrong_dtype_and_shape_arrays(tmp_path: Path) -> None:
    src = tmp_path / "v.npz"
    np.savez(src, votes=np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(AggregationInputError, match="'votes' must be int8"):
        aggregate_file(src, out=tmp_path / "o.npz")
    np.savez(src, votes=np.zeros(3, dtype=np.int8))
    with pytest.raises(AggregationInputError, match="'votes' must be 2-D"):
        aggregate_file(src, out=tmp_path / "o.npz")
    np.savez(src, votes=np.full((2, 3), 2, dtype=np.int8))
    with pytest.raises(AggregationInputError, match="found 2"):
        aggregate_file(src, out=tmp_path / "o.npz")
    np.savez(src, votes=np.zeros((2, 3), dtype=np.int8), gold=np.zeros(4, dtype=np.int8))
    with pytest.raises(AggregationInputError, match="'gold' has 4 items"):
        aggregate_file(src, out=tmp_path / "o.npz")
    np.savez(src, masks=np.zeros((2, 3), dtype=bool))
    with pytest.raises(AggregationInputError, match="'masks' must be annotators x H x W"):
        aggregate_file(src, out=tmp_path / "o.npz")
    np.savez(src, masks=np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(AggregationInputError, match="bool or integer"):
        aggregate_file(src, out=tmp_path / "o.npz")
    np.savez(src, other=np.zeros(2))
    with pytest.raises(AggregationInputError, match="needs an array 'votes'"):
        aggregate_file(src, out=tmp_path / "o.npz")


def test_gold_and_prior_errors(tmp_path: Path) -> None:
    votes = _votes_csv(tmp_path)
    gold = _write_csv(tmp_path / "g.csv", [["task", "label"], ["nope", "1"]])
    with pytest.raises(AggregationInputError, match="line 2: task 'nope' has no votes"):
        aggregate_file(votes, out=tmp_path / "o.csv", gold=gold)
    prior = _write_csv(tmp_path / "p.csv", [["task", "prior"], ["t1", "1.5"]])
    with pytest.raises(AggregationInputError, match=r"line 2: prior 1.5 must lie in \[0, 1\]"):
        aggregate_file(votes, out=tmp_path / "o.csv", prior=prior)
    pz = tmp_path / "p.npz"
    np.savez(pz, prior=np.zeros(5))
    with pytest.raises(AggregationInputError, match=r"'prior' must have shape \(3,\)"):
        aggregate_file(votes, out=tmp_path / "o.csv", prior=pz)


def test_unknown_method_missing_file_and_bad_extension(tmp_path: Path) -> None:
    votes = _votes_csv(tmp_path)
    with pytest.raises(AggregationInputError, match="use one of"):
        aggregate_file(votes, out=tmp_path / "o.csv", method="magic")
    with pytest.raises(AggregationInputError, match="does not exist"):
        aggregate_file(tmp_path / "missing.csv", out=tmp_path / "o.csv")
    with pytest.raises(AggregationInputError, match=r"\.csv or \.npz"):
        aggregate_file(votes, out=tmp_path / "o.json")


# -- the columnar reader --------------------------------------------------------------------
def _read_back(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_csv_quotes_extra_columns_case_and_whitespace(tmp_path: Path) -> None:
    src = tmp_path / "v.csv"
    src.write_text(
        "note,LABEL, Task ,worker\n"
        '"a, b",YES,"x,y", w1\n'
        'z, no ,"say ""hi""",w2 \n'
        '"two\nlines",True,"x,y",w2\n'
        ',0,t3,"w""3"\n'
        "\n"
        ',False,"say ""hi""",w1\n'
    )
    s = aggregate_file(src, out=tmp_path / "o.csv")
    assert (s.n_workers, s.n_items, s.n_votes) == (3, 3, 5)
    items = _read_back(tmp_path / "o.csv")
    assert [r["task"] for r in items] == ["x,y", 'say "hi"', "t3"]  # first appearance
    assert s.workers_out is not None
    workers = _read_back(s.workers_out)
    assert [(r["worker"], r["n_votes"]) for r in workers] == [
        ("w1", "2"),
        ("w2", "2"),
        ('w"3', "1"),
    ]
    # the output is csv.writer's: quoted where needed, \r\n line ends
    raw = (tmp_path / "o.csv").read_bytes()
    assert raw.startswith(b'task,posterior,label,gold\r\n"x,y",') and b'\r\n"say ""hi""",' in raw


def test_csv_line_numbers_count_blank_lines_and_quoted_line_breaks(tmp_path: Path) -> None:
    src = tmp_path / "v.csv"
    src.write_text('worker,task,label\na,"t\n1",1\n\nb,t2,0\n\nc,t2, Maybe \n')
    with pytest.raises(AggregationInputError, match=r"v\.csv, line 7: label 'Maybe' is not 0/1"):
        aggregate_file(src, out=tmp_path / "o.csv")
    src.write_text("worker,task,label\na,t1,1\n\nb,  ,0\nc,t2,x\n")
    with pytest.raises(AggregationInputError, match="line 4: worker and task must not be empty"):
        aggregate_file(src, out=tmp_path / "o.csv")
    src.write_text("worker,task,label\n" + "a,t,1\n" * 5000 + "b,t,2\n")
    with pytest.raises(AggregationInputError, match="line 5002: label '2'"):
        aggregate_file(src, out=tmp_path / "o.csv")


def test_csv_rows_the_row_reader_takes_over(tmp_path: Path) -> None:
    # a row of blanks and a line of spaces are skipped, a longer row is accepted (as by csv)
    src = tmp_path / "v.csv"
    src.write_text("worker,task,label\na,t1,1\n,,\n   \nb,t1,0,extra\nc,t2,1\n")
    s = aggregate_file(src, out=tmp_path / "o.csv")
    assert (s.n_workers, s.n_items, s.n_votes) == (3, 2, 3)
    src.write_text("worker,task,label\na,t1,1\n\nb,t1\n")
    with pytest.raises(AggregationInputError, match="line 4: expected 3 values, got 2"):
        aggregate_file(src, out=tmp_path / "o.csv")
    src.write_text("worker,task,label\n")
    with pytest.raises(AggregationInputError, match="no votes"):
        aggregate_file(src, out=tmp_path / "o.csv")
    src.write_text("task,label\nt,1\n")
    with pytest.raises(AggregationInputError, match=r"missing worker \(found task,label\)"):
        aggregate_file(src, out=tmp_path / "o.csv")


def test_gold_and_prior_csv_by_columns(tmp_path: Path) -> None:
    votes = _votes_csv(tmp_path)
    gold = tmp_path / "g.csv"
    gold.write_text("task,label\n t2 ,YES\nt2,no\n")  # the last row of a task wins
    aggregate_file(votes, out=tmp_path / "o.csv", gold=gold)
    assert [r["gold"] for r in _read_back(tmp_path / "o.csv")] == ["", "0", ""]
    gold.write_text("task,label\nt1,1\n\nt2,perhaps\n")
    with pytest.raises(AggregationInputError, match="line 4: label 'perhaps'"):
        aggregate_file(votes, out=tmp_path / "o.csv", gold=gold)
    prior = tmp_path / "p.csv"
    prior.write_text("task,logodds\nt1,1\nt3,-inf\n")
    with pytest.raises(AggregationInputError, match="line 3: '-inf' must be finite"):
        aggregate_file(votes, out=tmp_path / "o.csv", prior=prior)
    prior.write_text("task,prior\nt1,0.5\nt3,nan\n")
    with pytest.raises(AggregationInputError, match="line 3: 'nan' must be finite"):
        aggregate_file(votes, out=tmp_path / "o.csv", prior=prior)
    prior.write_text("task,prior\nt1,0.5\nt3,1e3\n")
    with pytest.raises(AggregationInputError, match=r"line 3: prior 1000.0 must lie in \[0, 1\]"):
        aggregate_file(votes, out=tmp_path / "o.csv", prior=prior)


# -- NPZ columns ------------------------------------------------------------------------------
def test_npz_columns_match_the_csv(tmp_path: Path) -> None:
    votes = _votes_csv(tmp_path)
    rows = list(csv.reader(votes.open()))[1:]
    src = tmp_path / "cols.npz"
    np.savez(
        src,
        worker=np.array([r[0] for r in rows]),
        task=np.array([r[1] for r in rows]),
        label=np.array([int(r[2]) for r in rows], dtype=np.int8),
    )
    a = aggregate_file(votes, out=tmp_path / "a.csv")
    b = aggregate_file(src, out=tmp_path / "b.csv")
    assert (b.n_workers, b.n_items, b.n_votes) == (a.n_workers, a.n_items, a.n_votes)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    # integer names, string labels; order of first appearance
    np.savez(
        src,
        worker=np.array([7, 3, 7, 3]),
        task=np.array([20, 10, 10, 20], dtype=np.uint32),
        label=np.array(["yes", "No", "1", "false"]),
    )
    s = aggregate_file(src, out=tmp_path / "c.npz")
    assert (s.n_workers, s.n_items, s.n_votes) == (2, 2, 4)
    with np.load(tmp_path / "c.npz") as z:
        assert z["task"].tolist() == ["20", "10"] and z["worker"].tolist() == ["7", "3"]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"worker": [[1]], "task": [1], "label": [1]}, "'worker' must be 1-D"),
        ({"worker": [1, 2], "task": [1], "label": [1]}, "one length; got worker 2, task 1"),
        ({"worker": [1, 2], "task": [1, 1], "label": [1, 2]}, "holds 2 at index 1"),
        ({"worker": [1, 2], "task": [1, 1], "label": ["1", "maybe"]}, "'maybe' at index 1"),
        ({"worker": [1.0], "task": [1], "label": [1]}, "integers or strings, got dtype float64"),
        ({"worker": ["a", " "], "task": [1, 1], "label": [1, 0]}, "empty name at index 1"),
        ({"worker": [1], "task": [1], "label": [1], "gold": [1]}, "'gold' goes with 'votes'"),
        ({"worker": [], "task": [], "label": []}, "no votes"),
        ({"worker": [1], "task": [1]}, "needs an array 'votes'.*found worker, task"),
    ],
)
def test_npz_columns_errors(tmp_path: Path, arrays: dict[str, list[object]], message: str) -> None:
    src = tmp_path / "v.npz"
    np.savez(src, **{k: np.asarray(v) for k, v in arrays.items()})
    with pytest.raises(AggregationInputError, match=message):
        aggregate_file(src, out=tmp_path / "o.csv")


# -- vectorised text --------------------------------------------------------------------------
def test_format_g6_is_python_g6() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            1 / (1 + np.exp(-rng.normal(0, 30, 3000))),
            10.0 ** rng.uniform(-300, 300, 3000) * rng.choice([-1.0, 1.0], 3000),
            np.round(rng.random(2000) * 1e6) / 10.0 ** rng.integers(0, 9, 2000),
            [0.0, -0.0, 1.0, 1e-5, 1e-4, 9.999995e-5, 999999.5, 123456.5, 1e16, 1e300],
            [np.nan, np.inf, -np.inf, 5e-324, 1 - 1e-7, 0.99999949999, 120000.0, 12.5],
            # 7th digit 5: float error would round these the other way without the tie check
            (rng.integers(100_000, 1_000_000, 2000) * 10 + 5) / 10.0 ** rng.integers(1, 12, 2000),
            [0.8655615, 0.006732655, 0.005600225, 3.428085e-05],
        ]
    )
    got = col.format_g6(values).to_arrow().to_pylist()
    assert got == [f"{v:.6g}" for v in values.tolist()]


def test_int_text_and_join_text() -> None:
    v = np.array([0, 9, 10, 99, 100, 123456789, 5])
    assert col.int_text(v).to_arrow().to_pylist() == [str(k) for k in v]
    j = col.join_text([col.int_text([1, 22]), col.choice_text([0, 2], ["", "0", "1"])], end="\n")
    assert j.to_arrow().to_pylist() == ["1,\n", "22,1\n"]


def test_whitespace_is_str_strip() -> None:
    assert set(col.WHITESPACE) == {chr(c) for c in range(0x110000) if chr(c).isspace()}

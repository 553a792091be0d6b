"""aggregate_file: formats, outputs and the errors users see."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

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
    with pytest.raises(AggregationInputError, match="'masks' must be bool annotators x H x W"):
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

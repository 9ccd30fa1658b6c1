"""core/tables.py: the one CSV writer (evaluation metrics.csv with fixed columns, the study's long tables)."""

from __future__ import annotations

import csv

import pytest
from negdpo.core.tables import write_csv


def test_columns_from_rows_in_first_seen_order_and_round_trip(tmp_path):
    rows = [{"a": 1, "b": 0.1 + 0.2}, {"c": "x,y", "a": 2}]
    path = write_csv(tmp_path / "sub" / "t.csv", rows)  # the parent folder is created
    back = list(csv.DictReader(path.open()))
    assert list(back[0]) == ["a", "b", "c"]
    assert back == [{"a": "1", "b": repr(0.1 + 0.2), "c": ""}, {"a": "2", "b": "", "c": "x,y"}]
    assert float(back[0]["b"]) == 0.1 + 0.2  # no float_format: exact round trip
    assert [p.name for p in path.parent.iterdir()] == ["t.csv"]  # no temporary file left


def test_fixed_columns_float_format_and_errors(tmp_path):
    path = write_csv(tmp_path / "m.csv", [{"b": 2 / 3, "a": True}], columns=["a", "b", "c"], float_format=".6f")
    assert path.read_text().splitlines() == ["a,b,c", "True,0.666667,"]
    assert write_csv(tmp_path / "h.csv", [], columns=["a"]).read_text().strip() == "a"  # header only
    assert write_csv(tmp_path / "e.csv", []).read_text() == ""
    (tmp_path / "x.csv").write_text("old")
    with pytest.raises(ValueError, match="'z'"):
        write_csv(tmp_path / "x.csv", [{"z": 1}], columns=["a"])
    assert (tmp_path / "x.csv").read_text() == "old" and not list(tmp_path.glob(".*.tmp"))

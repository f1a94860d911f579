"""Metadata columns (columns.py): a filter tested on a field read as a column, and on that column after
writes, keeps exactly the rows that `Filter.matches` keeps on each record."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import columns
from columns import FieldColumn, read_column
from filters import Condition, parse_filter

FIELD = "a"
ORDERED = ("$gt", "$gte", "$lt", "$lte")
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**60), max_value=2**60),
    st.integers(min_value=-3, max_value=3),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.sampled_from([0.5, 1.0, 2.0, -0.0]),
    st.text(alphabet="aAbB1é .", max_size=4),
)
values = st.one_of(st.none(), scalars, st.lists(scalars, max_size=3))
records = st.dictionaries(st.integers(min_value=0, max_value=40), values, max_size=30)
conditions = st.one_of(
    st.tuples(st.sampled_from(["$eq", "$ne", *ORDERED]), scalars),
    st.tuples(st.just("$in"), st.lists(scalars, min_size=1, max_size=3)),
    st.tuples(st.sampled_from(["$contains", "$prefix"]), st.text(alphabet="aAbB1é .", max_size=2)),
)


def database(by_row: dict[int, Any]) -> sqlite3.Connection:
    """A mirror's images table with each row's metadata (`FIELD` left out where the value is None)."""
    connection = sqlite3.connect(":memory:")
    connection.execute("CREATE TABLE images (row INTEGER PRIMARY KEY, id TEXT NOT NULL, meta TEXT NOT NULL)")
    connection.executemany(
        "INSERT INTO images VALUES (?, ?, ?)",
        [(row, f"id-{row}", json.dumps(metadata_of(value))) for row, value in by_row.items()],
    )
    return connection


def metadata_of(value: Any) -> dict[str, Any]:
    return {"path": "p.jpg"} if value is None else {"path": "p.jpg", FIELD: value}


def condition_of(spec: tuple[str, Any]) -> Condition:
    image_filter = parse_filter({FIELD: {spec[0]: spec[1]}})
    assert image_filter is not None
    return image_filter.conditions[0]


def expected(condition: Condition, by_row: dict[int, Any], size: int) -> np.ndarray:
    return np.array([condition.matches(metadata_of(by_row.get(row))) for row in range(size)])


def read(by_row: dict[int, Any], size: int) -> FieldColumn:
    stored = [(row, metadata_of(value)) for row, value in by_row.items()]
    return read_column(database(by_row), FIELD, size, lambda: stored)


@settings(max_examples=300, deadline=None)
@given(records, st.lists(conditions, min_size=1, max_size=4), records, records)
def test_a_column_answers_each_condition_as_the_records_do_before_and_after_writes(
    first, specs, writes, more
):
    size = 41
    column = read(first, size)
    column.write(writes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(columns, "COMPACT_SLACK", -(10**6))  # compact at this write
        column.write(more)
    later = {**first, **writes, **more}
    grown = size + 5
    for condition in map(condition_of, specs):
        assert (column.view(size).matching(condition) == expected(condition, later, size)).all(), condition
        assert (column.view(grown).matching(condition) == expected(condition, later, grown)).all()


def test_a_view_is_not_changed_by_later_writes():
    column = read({0: 1, 1: 5, 2: "x"}, 3)
    view = column.view(3)
    at_least_two = condition_of(("$gte", 2))
    column.write({0: 9, 1: None, 5: 3})
    assert view.matching(at_least_two).tolist() == [False, True, False]
    assert column.view(6).matching(at_least_two).tolist() == [True, False, False, False, False, True]


def test_order_comparisons_stay_exact_for_integers_a_float_cannot_hold():
    big = 2**53 + 1
    for by_row in ({0: big, 1: big - 1, 2: 3}, {0: big, 1: big - 1, 2: 2.5}):
        column = read(by_row, 3)
        assert column.view(3).matching(condition_of(("$gt", 2**53))).tolist() == [True, False, False]
        assert column.view(3).matching(condition_of(("$lte", float(2**53)))).tolist() == [False, True, True]


def test_a_record_sqlite_cannot_read_as_json_is_read_by_python():
    by_row = {0: float("inf"), 1: 3, 2: "text", 3: float("-inf")}
    column = read(by_row, 4)
    for spec in [("$gt", 10), ("$lt", 0), ("$eq", "TEXT"), ("$ne", 3)]:
        condition = condition_of(spec)
        assert (column.view(4).matching(condition) == expected(condition, by_row, 4)).all()


def test_equal_values_are_kept_once():
    column = read({row: ["tag", row % 3] for row in range(30)}, 30)
    assert len(column.values) == 3

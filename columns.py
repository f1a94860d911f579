"""Metadata fields as columns, so that a new filter costs a read of its fields, not of every record.

A filter's mask used to come from parsing every image's JSON metadata in Python (1M images: 10-11 s
on 2 cores). A field is now read as a column instead: SQLite picks that one field out of every
record in its own code, in one pass, and the column keeps each row's value as a code into the
field's distinct values (1M images: about 4 s for the first filter on a field). A condition is then
tested once per distinct value (an order comparison with a number: on all of them at once) and
spread to the rows by their codes, so that every later filter on a field already read (a new date
range, another folder) costs milliseconds. The catalog keeps the columns used lately, within a
memory bound, and brings them up to date on each write (catalog.py).
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from filters import FLOAT_EXACT_INTEGERS, Condition, exact_float

# The code of a row without a value: no image there, or no such field.
ABSENT = -1
# Bytes counted per distinct value beyond its code and float (a Python object and its list slot).
VALUE_BYTES = 64
# A column is compacted once written values outnumber its rows by this many.
COMPACT_SLACK = 4096


def json_path(field: str) -> str:
    """The path of a top-level field (filter field names hold no quotes: filters._FIELD)."""
    return f'$."{field}"'


def read_column(
    connection: sqlite3.Connection, field: str, size: int, records: Callable[[], Iterable[tuple[int, Any]]]
) -> FieldColumn:
    """The field of every row below `size`, read by SQLite; by `records` (row, metadata) where some
    record is JSON that SQLite refuses (NaN or infinite numbers, which Python's json writes)."""
    path = json_path(field)
    try:
        # Given the path twice, json_extract answers the JSON array [value,value], the value written
        # as stored (one path would give SQL values: booleans as 1 and 0, reals rounded by SQLite).
        found = connection.execute("SELECT row, json_extract(meta, ?, ?) FROM images", (path, path))
        texts = [(row, pair[1 : (len(pair) - 1) // 2]) for row, pair in found]
        return FieldColumn.from_texts(size, texts, _json_list)
    except sqlite3.OperationalError:
        found = [(row, json.dumps(metadata.get(field))) for row, metadata in records()]
        return FieldColumn.from_texts(size, found, _json_list)


def _json_list(texts: Iterable[str]) -> list[Any]:
    """Many JSON texts decoded in one call."""
    return json.loads("[" + ",".join(texts) + "]")


def exact_floats(values: list[Any]) -> np.ndarray | None:
    """The values as the floats equal to them (NaN where not numbers); None where an integer is too
    large for a float to hold."""
    kinds = set(map(type, values))
    if kinds <= {float}:
        return np.array(values, dtype=np.float64)
    if kinds <= {int}:
        integers = np.array(values)
        if integers.dtype != np.int64 or np.abs(integers).max() > FLOAT_EXACT_INTEGERS:
            return None
        return integers.astype(np.float64)
    numbers = [exact_float(value) for value in values]
    if any(number is None and type(value) is int for number, value in zip(numbers, values, strict=True)):
        return None
    return np.array([np.nan if number is None else number for number in numbers], dtype=np.float64)


def nearest_float(value: Any) -> float:
    exact = exact_float(value)
    if exact is None and type(value) is int:
        return float(value)
    return np.nan if exact is None else exact


class FieldColumn:
    """One field of every row: a code per row into the values written (ABSENT: no value). Values are
    only appended, and the arrays replaced rather than shrunk, so a `view` stays valid while writes go
    on; the owner serialises writes."""

    def __init__(self, codes: np.ndarray, values: list[Any]) -> None:
        self.codes = codes
        self._set_values(values)

    def _set_values(self, values: list[Any]) -> None:
        self.values = values
        self._numbers = np.full(max(len(values), 16), np.nan)
        self._exact = True
        self._add_numbers(0)

    @classmethod
    def without_values(cls, size: int) -> FieldColumn:
        return cls(np.full(size, ABSENT, dtype=np.int32), [])

    @classmethod
    def from_texts(
        cls, size: int, found: list[tuple[int, str]], decode: Callable[[Iterable[str]], list[Any]]
    ) -> FieldColumn:
        """From each row's value as JSON text; equal texts share one value. Rows from `size` on are
        left out."""
        rows, texts = zip(*found, strict=True) if found else ((), ())
        index = dict.fromkeys(texts, 0)
        for code, text in enumerate(index):
            index[text] = code
        codes = np.full(size, ABSENT, dtype=np.int32)
        rows_found = np.fromiter(rows, dtype=np.int64, count=len(rows))
        inside = rows_found < size
        codes[rows_found[inside]] = np.fromiter(
            map(index.__getitem__, texts), dtype=np.int32, count=len(texts)
        )[inside]
        return cls(codes, decode(index))

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self._numbers.nbytes + VALUE_BYTES * len(self.values)

    def write(self, changed: dict[int, Any]) -> None:
        """Set the value of each row (None: none)."""
        end = max(changed, default=-1) + 1
        if end > len(self.codes):
            self.codes = np.concatenate([self.codes, np.full(end - len(self.codes), ABSENT, dtype=np.int32)])
        first = len(self.values)
        for row, value in changed.items():
            if value is None:
                self.codes[row] = ABSENT
            else:
                self.codes[row] = len(self.values)
                self.values.append(value)
        self._add_numbers(first)
        if len(self.values) > len(self.codes) + COMPACT_SLACK:
            self._compact()

    def _add_numbers(self, first: int) -> None:
        """Keep the values from `first` on as exact floats too (NaN where not numbers)."""
        if len(self.values) > len(self._numbers):
            grown = np.full(2 * len(self.values), np.nan)
            grown[:first] = self._numbers[:first]
            self._numbers = grown
        numbers = exact_floats(self.values[first:])
        if numbers is None:
            self._exact = False
        else:
            self._numbers[first : len(self.values)] = numbers

    def _compact(self) -> None:
        """Drop the values no row holds any more."""
        used = np.unique(self.codes[self.codes != ABSENT])
        renumbered = np.full(len(self.values) + 1, ABSENT, dtype=np.int32)
        renumbered[used] = np.arange(len(used), dtype=np.int32)
        self.codes = renumbered[self.codes]
        self._set_values([self.values[position] for position in used.tolist()])

    def view(self, size: int) -> ColumnView:
        """The column as it is now, for `size` rows, unchanged by later writes."""
        codes = self.codes[:size].copy()
        if len(codes) < size:
            codes = np.concatenate([codes, np.full(size - len(codes), ABSENT, dtype=np.int32)])
        count = len(self.values)
        return ColumnView(codes, self.values, count, self._numbers[:count] if self._exact else None)


@dataclass(frozen=True)
class ColumnView:
    """A column's codes as they were, and how many of its values they may refer to."""

    codes: np.ndarray
    values: list[Any]
    count: int
    numbers: np.ndarray | None

    def numbers_at(self, rows: np.ndarray) -> np.ndarray:
        """The values of the rows (ABSENT: none) as floats (the nearest one for an integer too large to
        be one exactly), NaN where not numbers."""
        numbers = self.numbers
        if numbers is None:
            numbers = np.array([nearest_float(value) for value in itertools.islice(self.values, self.count)])
        table = np.append(numbers, np.nan)
        return table[np.where(rows == ABSENT, ABSENT, self.codes[rows])]

    def matching(self, condition: Condition) -> np.ndarray:
        """Which rows meet the condition (a row without a value: as an image without the field)."""
        values = list(itertools.islice(self.values, self.count))
        table = np.append(condition.matches_values(values, self.numbers), condition.matches_value(None))
        return table[self.codes]

"""A raw column as its distinct values plus one code per row: what lets encoding run at memory speed.

Why: a raw column holds few distinct values (a Census column: tens, at most a few thousand) repeated over
millions of rows. Every encoding rule (a vocabulary lookup, the canonical spelling of a code, parsing a
number, scaling it, placing it in a bucket) is a function of the value alone, so it is applied once per
distinct value and the rows get their results by one numpy gather on their codes: one hash pass per column
(Arrow's ``dictionary_encode`` for Arrow-backed text, pandas' ``factorize`` for an object column) and no
per-row Python. The results are exactly those of applying the rule to every row.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


class Distinct(NamedTuple):
    """``codes[i]``: row ``i``'s position in ``values``, -1 where the row is missing (null, NaN, None).

    ``values`` are the distinct non-missing values in an object array (str for text columns), stripped of
    surrounding whitespace when ``distinct`` was asked to. ``column`` is the Series they came from: a
    missing row's value (NaN, None, pd.NA) is named from it in messages."""

    codes: np.ndarray
    values: np.ndarray
    column: pd.Series

    @property
    def has_missing(self) -> bool:
        return bool((self.codes < 0).any())

    def all_text(self) -> bool:
        return all(isinstance(v, str) for v in self.values)


def arrow_text(values: pd.Series) -> bool:
    """Whether ``values`` is pandas' own Arrow-backed string column (the default ``str`` dtype, NaN = missing)."""
    dtype = values.dtype
    return isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow" and dtype.na_value is np.nan


def distinct(values: pd.Series, *, strip: bool = False) -> Distinct:
    """The distinct values of ``values`` and every row's code (see :class:`Distinct`).

    ``strip``: the values as ``values.str.strip()`` would give them, stripped once per distinct value (an
    Arrow-backed string column only; another column is taken as it is). Two raw values that strip alike
    keep two codes, which every rule maps alike."""
    if not arrow_text(values):
        codes, uniques = pd.factorize(values.to_numpy())
        return Distinct(np.asarray(codes), np.asarray(uniques, dtype=object), values)
    # the Arrow protocol hands over the column's own buffers; one hash table serves all its chunks
    encoded = pc.dictionary_encode(pa.chunked_array(values.array.__arrow_array__()))
    if encoded.num_chunks == 0:
        return Distinct(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=object), values)
    first = encoded.chunk(0).dictionary
    if any(not chunk.dictionary.equals(first) for chunk in encoded.chunks[1:]):
        encoded = encoded.unify_dictionaries()
        first = encoded.chunk(0).dictionary
    dictionary = pc.utf8_trim_whitespace(first) if strip else first
    codes = pc.fill_null(pa.chunked_array([chunk.indices for chunk in encoded.chunks]), -1).to_numpy()
    uniques = np.empty(len(dictionary), dtype=object)
    uniques[:] = dictionary.to_pylist()
    return Distinct(codes, uniques, values)

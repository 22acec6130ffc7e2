"""Training data: generated tasks (dates, numbers) and user corpora, all returned as `Splits`.

Nothing here imports torch; Babel and num2words are imported only when a generated task is built.
"""

from __future__ import annotations

from collections.abc import Callable

from export.data.dates import make_dates
from export.data.numbers import make_numbers
from export.data.splits import Pair, Splits, ambiguous_sources, describe, shared_sources
from export.data.tsv import CorpusError, load_tsv, write_splits, write_tsv

#: Generated tasks by name; each builds its Splits from a seed (other arguments keep their defaults).
GENERATED_TASKS: dict[str, Callable[..., Splits]] = {"dates": make_dates, "numbers": make_numbers}

__all__ = [
    "GENERATED_TASKS",
    "CorpusError",
    "Pair",
    "Splits",
    "ambiguous_sources",
    "describe",
    "load_tsv",
    "make_dates",
    "make_numbers",
    "shared_sources",
    "write_splits",
    "write_tsv",
]

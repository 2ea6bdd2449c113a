"""The two errors a teacher cache raises, and the advice every corrupt-cache message ends with."""

from __future__ import annotations

import os

REBUILD = "Delete the folder and re-run `transfuse cache-teacher` to rebuild it."


class CacheError(ValueError):
    """A teacher cache that cannot be used as it is: missing, unreadable, corrupt or incomplete
    (for example left behind by a killed write), or a write that cannot finish."""


class CacheMismatchError(CacheError):
    """A readable cache built for something else: a different teacher or data set (an ``identity``
    value differs) or without a field the run needs.

    ``field``, ``cached`` and ``expected`` describe the first difference; ``differences`` lists
    every ``(field, cached, expected)`` triple (``cached`` is None for a key the cache lacks).
    """

    def __init__(self, message: str, *, field: str, cached: str | None, expected: str | None,
                 differences: list[tuple[str, str | None, str | None]] | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.cached = cached
        self.expected = expected
        self.differences = differences if differences is not None else [(field, cached, expected)]


def corrupt(path: str | os.PathLike, problem: str) -> CacheError:
    """A :class:`CacheError` for an unusable cache folder: names it, says what is wrong and how to fix it."""
    end = "" if problem.endswith(("?", ".")) else "."
    return CacheError(f"teacher cache {str(path)!r}: {problem}{end} {REBUILD}")

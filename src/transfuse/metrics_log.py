"""Metric logging: one JSON object per line in ``metrics.jsonl`` (and TensorBoard when installed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import write_atomic


class MetricsLog:
    """Appends rows ``{"step": int, ...}`` to a JSONL file, flushed each row so a killed run
    keeps what it logged. ``truncate_after(step)`` drops rows of a run's future: a resumed
    run rewrites them, and the log must not hold them twice."""

    def __init__(self, path: str | Path, *, tensorboard_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                self._tb = None
            else:
                self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, row: dict[str, Any]) -> None:
        """Write one row (must contain ``step``)."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, row["step"])

    def truncate_after(self, step: int) -> None:
        """Keep only rows with ``row["step"] <= step``."""
        self._file.close()
        rows = read_metrics(self.path)
        kept = [r for r in rows if r.get("step", 0) <= step]
        # Atomically: a run killed while rewriting its log in place would lose all of it.
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")

    def close(self) -> None:
        """Flush and close."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete rows of a metrics file (a torn last line from a killed run is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows

"""What a person at a terminal sees: the status table and drain progress.

Machines get `--json` (fixed shape) or the log lines; these renderers are only used
when the stream is a terminal, so nothing here needs to stay parseable.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from fleetticketsd.config import DatasetConfig
from fleetticketsd.ingest.apply import FileResult


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def ago(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        then = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return human_duration((datetime.now(UTC) - then).total_seconds()) + " ago"


def render_status(datasets: dict[str, dict[str, Any]], extra: dict[str, str] | None = None) -> str:
    """One block per dataset, aligned, with times as ages."""
    lines: list[str] = []
    for name, st in datasets.items():
        blocked = st.get("blocked")
        lines.append(f"{name}" + ("  BLOCKED" if blocked else ""))
        wm = st.get("watermark")
        rows = [
            (
                "watermark",
                f"{_short(wm)}  ({human_duration(st.get('watermark_age_seconds'))} old)" if wm else "-",
            ),
            ("newest in source", _short(st.get("newest_key"))),
            *(
                [("source", f"UNREACHABLE; figures as last listed ({ago(st.get('source_checked_at'))})")]
                if st.get("source_error")
                else []
            ),
            ("pending files", str(st.get("pending_files", "-"))),
            ("lag", human_duration(st.get("lag_seconds"))),
            ("blocked", f"{_short(blocked['key'])}: {blocked['reason']}" if blocked else "no"),
            ("last applied", ago(st.get("last_applied_at"))),
            ("last pass", f"{ago(st.get('last_pass_at'))}, {st.get('last_pass_outcome') or '-'}"),
        ]
        lines.extend(f"  {label:17} {value}" for label, value in rows)
    if extra:
        lines.append("")
        lines.extend(f"{label:19} {value}" for label, value in extra.items())
    return "\n".join(lines)


def _short(key: str | None) -> str:
    return key.rsplit("/", 1)[-1] if key else "-"


class DrainProgress:
    """`files done / pending, rows per second` on one rewritten line, per dataset."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._started: dict[str, float] = {}
        self._rows: dict[str, int] = {}

    def __call__(self, dataset: DatasetConfig, done: int, total: int, result: FileResult) -> None:
        start = self._started.setdefault(dataset.name, time.monotonic())
        rows = self._rows[dataset.name] = self._rows.get(dataset.name, 0) + result.rows_read
        rate = rows / max(time.monotonic() - start, 1e-6)
        self.stream.write(f"\r{dataset.name}: {done}/{total} files, {rows:,} rows, {rate:,.0f} rows/s ")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()

"""The feed format: change-file names, the 32 columns, and a streaming parser.

The parser is push-based (``feed(bytes)`` / ``finish()``) so it can sit between an S3
body read in chunks and a COPY without ever holding a whole file: memory is bounded
by the largest single record, not the file. It never decides what to do with a
problem; it reports it. A row it cannot use is a ``Reject`` (the rest of the file
goes on); a file it cannot read as the feed raises ``BadFile``, naming the line.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

COLUMNS: tuple[str, ...] = (
    "ticket_id", "source_type", "service_type", "bucket", "raw_status", "normalized_status",
    "created_at_service", "scheduled_at", "closed_at", "last_seen_at", "first_seen_at",
    "week_start", "week_end", "cluster", "region", "location_name", "latitude", "longitude",
    "department", "assigned_team", "owner", "sla_status", "mttr", "is_auto_created",
    "is_auto_closed", "is_alarm", "is_actionable", "source_s3_bucket", "source_s3_key",
    "source_snapshot_id", "created_at", "updated_at",
)  # fmt: skip
DROPPED: frozenset[str] = frozenset(
    {"week_start", "week_end", "source_s3_bucket", "source_s3_key", "source_snapshot_id",
     "department", "source_type"}
)  # fmt: skip
KEPT: tuple[str, ...] = tuple(c for c in COLUMNS if c not in DROPPED)
SENTINEL_PREFIX = "EXPORT STOPPED"

# File names are the export's start time in Nairobi wall-clock time.
KEY_TIMEZONE = ZoneInfo("Africa/Nairobi")
_NAME_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2})-(\d{2})-(\d{2})\.csv$")

# The csv module's limit is process-wide; records are bounded by the parser itself
# (IngestConfig.max_record_bytes), so the module's own limit only has to stay out of
# the way.
csv.field_size_limit(2**31 - 1)


def file_name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def key_timestamp(key: str) -> datetime | None:
    """UTC time encoded in a change-file name, or None if the name is not one."""
    m = _NAME_RE.match(file_name(key))
    if not m:
        return None
    try:
        y, mo, d, h, mi, sec = (int(g) for g in m.groups())
        local = datetime(y, mo, d, h, mi, sec, tzinfo=KEY_TIMEZONE)
    except ValueError:  # 2026-02-30T...: shaped like a name, but no such time
        return None
    return local.astimezone(UTC)


class BadFile(Exception):
    """The file cannot be read as the feed; nothing of it may be applied."""

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {reason}" if line else reason)
        self.reason = reason
        self.line = line


@dataclass(frozen=True)
class Reject:
    line: int
    reason: str
    raw_line: str


@dataclass
class ParseStats:
    rows_read: int = 0
    dropped_alarm: int = 0
    dropped_sentinel: int = 0
    rejects: list[Reject] = field(default_factory=list)
    extra_columns: tuple[str, ...] = ()


# (ticket_id, raw as JSON text, physical line number) — the temp table's columns.
Record = tuple[str, str, int]


class FeedParser:
    """Incremental parser for one change file.

    Records may span lines (quoted line breaks), so lines are grouped into records by
    quote parity before the csv module sees them: in RFC 4180 a record can only end
    at a line break that follows an even number of quote characters. That keeps a
    record that straddles two S3 chunks intact without buffering the file.
    """

    def __init__(self, max_record_bytes: int = 16 * 1024 * 1024) -> None:
        self.stats = ParseStats()
        self._max_record_bytes = max_record_bytes
        # utf-8-sig drops a byte-order mark if there is one.
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
        self._tail = ""  # text after the last line break seen
        self._pending: list[str] = []  # lines of the record being assembled
        self._pending_size = 0
        self._pending_odd = False
        self._pending_start = 1
        self._line = 0  # physical lines completed so far
        self._header: list[str] | None = None
        self._index: dict[str, int] = {}
        self._extras: list[tuple[str, int]] = []

    @property
    def header_seen(self) -> bool:
        return self._header is not None

    def feed(self, chunk: bytes) -> list[Record]:
        try:
            text = self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            line = self._line + 1 + self._tail.count("\n") + chunk[: exc.start].count(b"\n")
            raise BadFile(f"not UTF-8: invalid byte 0x{chunk[exc.start]:02x}", line) from None
        return self._lines(text, final=False)

    def finish(self) -> list[Record]:
        try:
            text = self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise BadFile(
                "not UTF-8: truncated multi-byte character at end of file", self._line + 1
            ) from None
        out = self._lines(text, final=True)
        if self._pending:
            raise BadFile("unterminated quoted field at end of file", self._pending_start)
        if self._header is None:
            raise BadFile("empty file: no header line")
        return out

    def _lines(self, text: str, final: bool) -> list[Record]:
        text = self._tail + text
        parts = text.split("\n")
        self._tail = "" if final else parts.pop()
        if final and parts and parts[-1] == "":
            parts.pop()
        out: list[Record] = []
        last = len(parts) - 1
        for i, part in enumerate(parts):
            line = part if (final and i == last and not text.endswith("\n")) else part + "\n"
            if not self._pending:
                self._pending_start = self._line + 1
            self._line += 1
            self._pending.append(line)
            self._pending_size += len(line)
            if line.count('"') & 1:
                self._pending_odd = not self._pending_odd
            if self._pending_odd:
                if self._pending_size > self._max_record_bytes:
                    raise BadFile(
                        f"record larger than {self._max_record_bytes} bytes (unterminated quoted field?)",
                        self._pending_start,
                    )
                continue
            lines, start = self._pending, self._pending_start
            self._pending, self._pending_size = [], 0
            record = self._record(lines, start)
            if record is not None:
                out.append(record)
        if len(self._tail) > self._max_record_bytes:
            raise BadFile(f"line longer than {self._max_record_bytes} bytes", self._line + 1)
        return out

    def _record(self, lines: list[str], line_no: int) -> Record | None:
        raw_line = "".join(lines)
        if not raw_line.strip():
            return None  # blank lines (a trailing one is common) carry nothing
        try:
            rows = list(csv.reader(lines, strict=True))
        except csv.Error as exc:
            if self._header is None:
                raise BadFile(f"header is not CSV: {exc}", line_no) from None
            return self._reject(line_no, f"malformed CSV: {exc}", raw_line)
        if self._header is None:
            self._set_header(rows[0] if len(rows) == 1 else [], line_no)
            return None
        if len(rows) != 1:
            return self._reject(line_no, "malformed CSV: quoting splits this record", raw_line)
        return self._clean(rows[0], line_no, raw_line)

    def _set_header(self, names: list[str], line_no: int) -> None:
        names = [n.strip() for n in names]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise BadFile(f"header repeats column(s): {', '.join(dupes)}", line_no)
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise BadFile(f"header lacks column(s): {shown}", line_no)
        self._header = names
        self._index = {n: i for i, n in enumerate(names)}
        self._extras = [(n, i) for i, n in enumerate(names) if n not in COLUMNS]
        self.stats.extra_columns = tuple(n for n, _ in self._extras)

    def _clean(self, row: list[str], line_no: int, raw_line: str) -> Record | None:
        assert self._header is not None
        idx = self._index
        self.stats.rows_read += 1
        ticket_id = row[idx["ticket_id"]] if len(row) > idx["ticket_id"] else ""
        if ticket_id.startswith(SENTINEL_PREFIX):
            self.stats.dropped_sentinel += 1
            return None
        if len(row) != len(self._header):
            return self._reject(
                line_no,
                f"wrong field count: expected {len(self._header)}, got {len(row)}",
                raw_line,
            )
        if not ticket_id.strip():
            return self._reject(line_no, "empty ticket_id", raw_line)
        if "\x00" in raw_line:
            # PostgreSQL text and jsonb cannot hold NUL; one such row must not fail the file.
            return self._reject(line_no, "NUL character in a field", raw_line.replace("\x00", "\\0"))
        if row[idx["is_alarm"]].strip().lower() == "true":
            self.stats.dropped_alarm += 1
            return None
        raw = {c: row[idx[c]] for c in KEPT}
        raw["region"] = raw["region"].lower()
        raw["raw_status"] = raw["raw_status"].upper()
        for name, i in self._extras:
            raw[name] = row[i]
        return (ticket_id, json.dumps(raw, ensure_ascii=False, separators=(",", ":")), line_no)

    def _reject(self, line_no: int, reason: str, raw_line: str) -> Record | None:
        self.stats.rejects.append(Reject(line_no, reason, raw_line))
        return None

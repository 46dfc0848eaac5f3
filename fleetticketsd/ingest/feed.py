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
import operator
import re
from collections.abc import Callable
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
MAX_TICKET_ID_CHARS = 256

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


# What the parser hands to COPY: (line, *KEPT values, extra columns as JSON or None).
# The server builds the jsonb `raw` from these columns (apply.py): building JSON in
# C inside PostgreSQL is several times faster than json.dumps per row in Python.
Record = tuple[object, ...]
RECORD_COLUMNS: tuple[str, ...] = ("line", *KEPT, "extras")


class _Misaligned(Exception):
    """The csv module and the quote-parity grouping disagree about a record boundary."""


class FeedParser:
    """Incremental parser for one change file.

    Records may span lines (quoted line breaks), so lines are grouped into records by
    quote parity before the csv module sees them: in RFC 4180 a record can only end
    at a line break that follows an even number of quote characters. That keeps a
    record that straddles two S3 chunks intact without buffering the file, and lets
    one csv.reader parse a whole chunk of complete records at C speed. Only when the
    csv module disagrees with the grouping (malformed quoting) is a chunk re-parsed
    record by record, so a broken record costs only itself.
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
        self._width = 0
        self._tid = 0
        self._alarm = 0
        self._pick: Callable[[list[str]], tuple[str, ...]] = lambda row: ()
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
        unterminated_last = final and bool(parts) and not text.endswith("\n")
        if final and parts and parts[-1] == "":
            parts.pop()
        batch: list[str] = []  # the lines of the complete records, in order
        spans: list[tuple[int, int]] = []  # (first line number, line count) per record
        pending = self._pending
        last = len(parts) - 1
        for i, part in enumerate(parts):
            line = part if (unterminated_last and i == last) else part + "\n"
            if not pending:
                self._pending_start = self._line + 1
            self._line += 1
            pending.append(line)
            if line.count('"') & 1:
                self._pending_odd = not self._pending_odd
            if self._pending_odd:
                self._pending_size += len(line)
                if self._pending_size > self._max_record_bytes:
                    raise BadFile(
                        f"record larger than {self._max_record_bytes} bytes (unterminated quoted field?)",
                        self._pending_start,
                    )
                continue
            spans.append((self._pending_start, len(pending)))
            batch.extend(pending)
            pending.clear()
            self._pending_size = 0
        if len(self._tail) > self._max_record_bytes:
            raise BadFile(f"line longer than {self._max_record_bytes} bytes", self._line + 1)
        return self._parse(batch, spans, has_nul="\x00" in text)

    def _parse(self, batch: list[str], spans: list[tuple[int, int]], has_nul: bool) -> list[Record]:
        if not spans:
            return []
        out: list[Record] = []
        pos = 0
        if self._header is None:
            start, n = spans[0]
            self._set_header(self._header_row(batch[:n], start), start)
            spans, pos = spans[1:], n
        try:
            rows = self._parse_rows(batch[pos:], spans)
        except (csv.Error, StopIteration, _Misaligned):
            rows = None
        for i, (start, n) in enumerate(spans):
            if rows is not None:
                row = rows[i]
            else:
                try:
                    parsed = list(csv.reader(batch[pos : pos + n], strict=True))
                except csv.Error as exc:
                    self._reject(start, f"malformed CSV: {exc}", "".join(batch[pos : pos + n]))
                    pos += n
                    continue
                if len(parsed) > 1:
                    self._reject(
                        start, "malformed CSV: quoting splits this record", "".join(batch[pos : pos + n])
                    )
                    pos += n
                    continue
                row = parsed[0] if parsed else []
            if row:
                record = self._clean(row, start, batch, pos, n, has_nul)
                if record is not None:
                    out.append(record)
            pos += n
        return out

    @staticmethod
    def _parse_rows(lines: list[str], spans: list[tuple[int, int]]) -> list[list[str]]:
        reader = csv.reader(lines, strict=True)
        rows: list[list[str]] = []
        expected = 0
        for _, n in spans:
            rows.append(next(reader))
            expected += n
            if reader.line_num != expected:
                raise _Misaligned
        return rows

    @staticmethod
    def _header_row(lines: list[str], line_no: int) -> list[str]:
        try:
            rows = list(csv.reader(lines, strict=True))
        except csv.Error as exc:
            raise BadFile(f"header is not CSV: {exc}", line_no) from None
        return rows[0] if len(rows) == 1 else []

    def _set_header(self, names: list[str], line_no: int) -> None:
        names = [n.strip() for n in names]
        if not any(names):
            raise BadFile("empty header line", line_no)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise BadFile(f"header repeats column(s): {', '.join(dupes)}", line_no)
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise BadFile(f"header lacks column(s): {shown}", line_no)
        index = {n: i for i, n in enumerate(names)}
        self._header = names
        self._width = len(names)
        self._tid = index["ticket_id"]
        self._alarm = index["is_alarm"]
        self._pick = operator.itemgetter(*(index[c] for c in KEPT))
        self._extras = [(n, i) for i, n in enumerate(names) if n not in COLUMNS]
        self.stats.extra_columns = tuple(n for n, _ in self._extras)

    def _clean(
        self, row: list[str], line_no: int, batch: list[str], pos: int, n: int, has_nul: bool
    ) -> Record | None:
        self.stats.rows_read += 1
        ticket_id = row[self._tid] if len(row) > self._tid else ""
        if ticket_id.startswith(SENTINEL_PREFIX):
            self.stats.dropped_sentinel += 1
            return None
        if len(row) != self._width:
            return self._reject(
                line_no,
                f"wrong field count: expected {self._width}, got {len(row)}",
                "".join(batch[pos : pos + n]),
            )
        if not ticket_id.strip():
            return self._reject(line_no, "empty ticket_id", "".join(batch[pos : pos + n]))
        if len(ticket_id) > MAX_TICKET_ID_CHARS:
            # The primary key's btree cannot hold a long one: it would fail the file.
            return self._reject(
                line_no,
                f"ticket_id longer than {MAX_TICKET_ID_CHARS} characters",
                "".join(batch[pos : pos + n]),
            )
        if has_nul and any("\x00" in f for f in row):
            # PostgreSQL text and jsonb cannot hold NUL; one such row must not fail the file.
            raw = "".join(batch[pos : pos + n]).replace("\x00", "\\0")
            return self._reject(line_no, "NUL character in a field", raw)
        alarm = row[self._alarm]
        if alarm == "true" or (alarm != "false" and alarm.strip().lower() == "true"):
            self.stats.dropped_alarm += 1
            return None
        extras = None
        if self._extras:
            extras = json.dumps({name: row[i] for name, i in self._extras}, ensure_ascii=False)
        return (line_no, *self._pick(row), extras)

    def _reject(self, line_no: int, reason: str, raw_line: str) -> Record | None:
        self.stats.rejects.append(Reject(line_no, reason, raw_line))
        return None

"""Seeded synthetic generator for the ticket change feed described in ``FEED.md``.

The real feed is an n8n export we cannot ship or replay freely, yet tests, benchmarks, the
demo stack and the docker-compose seeding job all need files that look and misbehave like
it: a large baseline (optionally headed by the truncation sentinel) followed by small
deltas that close, touch or add tickets, every value double-quoted, location names with
commas/quotes/line breaks, odd-case regions, UTF-8 BOM and CRLF on demand, header-only
deltas.  Everything is driven by ``random.Random`` seeded from the spec, so a seed always
yields byte-identical files; the global ``random`` state is never touched.

Typical use::

    for name, data in generate(FeedSpec(seed=7, baseline_rows=35_000)):
        ...
    write_rows(fh, FeedSpec(), 1_200_000)   # ~500 MB benchmark file, streamed in chunks

and from the shell::

    python -m fleetticketsd.feedgen write --out /tmp/feed --baseline-rows 35000
    python -m fleetticketsd.feedgen upload --endpoint-url http://rustfs:9000 \\
        --bucket tickets --prefix automations/inc/ --follow 60
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from random import Random
from typing import Any, BinaryIO, Final

__all__ = [
    "COLUMNS",
    "EAT",
    "SENTINEL",
    "FeedSimulator",
    "FeedSpec",
    "file_name",
    "follow_files",
    "generate",
    "main",
    "parse_file_name",
    "upload",
    "upload_follow",
    "write_dir",
    "write_rows",
]

EAT: Final = timezone(timedelta(hours=3), "EAT")

COLUMNS: Final[tuple[str, ...]] = (
    "ticket_id",
    "source_type",
    "service_type",
    "bucket",
    "raw_status",
    "normalized_status",
    "created_at_service",
    "scheduled_at",
    "closed_at",
    "last_seen_at",
    "first_seen_at",
    "week_start",
    "week_end",
    "cluster",
    "region",
    "location_name",
    "latitude",
    "longitude",
    "department",
    "assigned_team",
    "owner",
    "sla_status",
    "mttr",
    "is_auto_created",
    "is_auto_closed",
    "is_alarm",
    "is_actionable",
    "source_s3_bucket",
    "source_s3_key",
    "source_snapshot_id",
    "created_at",
    "updated_at",
)

SENTINEL: Final = "EXPORT STOPPED DUE TO EXCESSIVE SIZE - ROW LIMIT 50000 REACHED"

# Column positions; rows are plain lists so the hot loop avoids dict/attribute overhead.
(
    C_TICKET_ID,
    C_SOURCE_TYPE,
    C_SERVICE_TYPE,
    C_BUCKET,
    C_RAW_STATUS,
    C_NORMALIZED_STATUS,
    C_CREATED_AT_SERVICE,
    C_SCHEDULED_AT,
    C_CLOSED_AT,
    C_LAST_SEEN_AT,
    C_FIRST_SEEN_AT,
    C_WEEK_START,
    C_WEEK_END,
    C_CLUSTER,
    C_REGION,
    C_LOCATION_NAME,
    C_LATITUDE,
    C_LONGITUDE,
    C_DEPARTMENT,
    C_ASSIGNED_TEAM,
    C_OWNER,
    C_SLA_STATUS,
    C_MTTR,
    C_IS_AUTO_CREATED,
    C_IS_AUTO_CLOSED,
    C_IS_ALARM,
    C_IS_ACTIONABLE,
    C_SOURCE_S3_BUCKET,
    C_SOURCE_S3_KEY,
    C_SOURCE_SNAPSHOT_ID,
    C_CREATED_AT,
    C_UPDATED_AT,
) = range(32)

BOM: Final = b"\xef\xbb\xbf"

# Rows buffered before encoding and handing bytes to the sink: large enough to amortise the
# per-write cost, small enough that a 1.2M-row benchmark stays at a few MB of memory.
_CHUNK_ROWS: Final = 4096

# The export stamps first_seen_at this long after the service's own creation time.
_FIRST_SEEN_LAG_S: Final = 420
# A baseline ticket is at least this old, so first_seen_at (created + 7 min) is not in
# the future.
_MIN_AGE_S: Final = 480
# Resolution times are lognormal around the dataset's median with this sigma: most
# tickets close within a day or two, a long tail stays open for weeks.
_MTTR_SIGMA: Final = 1.1

# (cluster, region as the export spells it, weight). Regions are fixed per cluster, as in
# the sample, so a cluster never flips region between rows; the odd-case spellings are the
# export's, and ingest lowercases them.
_CLUSTERS: Final[tuple[tuple[str, str, int], ...]] = (
    ("Kilimani", "Nairobi", 8),
    ("Westlands", "Nairobi", 8),
    ("QOA", "Nairobi", 7),
    ("PTMP", "Nairobi", 6),
    ("Embakasi", "Nairobi", 7),
    ("Ngong", "Nairobi", 6),
    ("Kasarani", "NAIROBI", 6),
    ("Kitengela", "Nairobi", 4),
    ("Karen", "nairobi", 3),
    ("Ruiru", "Central", 5),
    ("Thika", "CENTRAL", 4),
    ("Murang'a", "Central", 3),
    ("Nyali", "Coast", 7),
    ("Mtwapa", "coast", 3),
    ("Kisumu CBD", "Western", 5),
    ("Kakamega", "WESTERN", 2),
    ("Nakuru East", "Rift Valley", 3),
    ("Eldoret", "rift valley", 2),
)

_STREETS: Final = (
    "Garden Estate, Thome",
    "Jogoo Rd",
    "Links Rd",
    "Ngong Road",
    "Kamakis – Eastern Bypass",
    "Oginga Odinga St",
    "Thika Superhighway",
    "Waiyaki Way",
    "Kenyatta Ave",
    "Lang'ata Rd",
    "Moi Avenue",
    "Outering Rd",
    "Argwings Kodhek Rd",
    "Kiambu Rd",
    "Mombasa Rd",
    "Riverside Dr",
    "Kangundo Rd",
    "Limuru Rd",
    "Magadi Rd",
    "Ole Sangale Rd",
)

_NET_PREFIXES: Final = ("NW_", "NW_ADR_MNT_", "ADR_MNT_", "SDUS ", "")

# Free-text tails the field staff type into the location; they are what breaks naive CSV
# parsing (embedded comma, quote, line break), so they must keep showing up.
_LOCATION_TAILS: Final = (
    ', near "Total" petrol station\nGate B',
    ' (opp. "Naivas")',
    "\nBlock C, 2nd floor",
    ", Apt 4B, behind the church",
    ' "ODF" cabinet,\nground floor',
)
_LOCATION_TAIL_SHARE: Final = 0.02

_TEAMS: Final = (
    "Westlands FTTH",
    "Coast Squad",
    "Kilimani Fibre",
    "Team Alpha",
    "Team Bravo",
    "Team Charlie",
    "Western Crew",
    "Rift Valley FTTH",
)
_OWNERS: Final = (
    "P. Wanjiru",
    "S. Njoroge",
    "J. Mwangi",
    "A. Otieno",
    "K. Kiprop",
    "M. Achieng",
    "D. Kamau",
    "L. Mutua",
    "E. Chebet",
    "F. Omondi",
)

# Weighted by repetition so picking is a single index into a flat tuple (hot loop).
_OPEN_STATUSES: Final = (
    ("pending",) * 8 + ("Work in progress",) * 6 + ("In Progress",) * 4 + ("Assigned",) * 4
)
_CLOSED_STATUSES: Final = ("Closed",) * 9 + ("Resolved",) * 8 + ("closed",) * 3
_OPEN_STATUS_SET: Final = frozenset(_OPEN_STATUSES)

_ALARM_SHARE: Final = 0.30
_TEAM_MISSING_SHARE: Final = 0.34
_AUTO_CREATED_SHARE: Final = 0.35
_CREATED_EMPTY_SHARE: Final = 0.30
# Closed tickets nearly always carry the service's creation time; the missing ones are
# mostly open tickets (FEED.md), so the open share is derived to keep ~30% overall.
_CREATED_EMPTY_SHARE_CLOSED: Final = 0.10

_S3_BUCKET_COL: Final = "scoreboard-exports"


@dataclass(frozen=True)
class _DatasetProfile:
    prefix: str
    department: str
    sla_minutes: float  # resolution target that decides Met / Breached
    mttr_median_min: float
    scheduled_share: float


_PROFILES: Final[dict[str, _DatasetProfile]] = {
    "inc": _DatasetProfile("INC", "FTTH Operations", 24 * 60, 16 * 60, 0.28),
    "crq": _DatasetProfile("CRQ", "FTTH Installations", 72 * 60, 48 * 60, 0.65),
}


@dataclass(frozen=True)
class FeedSpec:
    """What to generate. Timestamps are naive datetimes in EAT, like the file names."""

    dataset: str = "inc"
    seed: int = 1
    baseline_rows: int = 200
    deltas: int = 3
    delta_rows: int = 5
    start: datetime = datetime(2026, 6, 22, 15, 50, 39)  # naive EAT
    delta_interval_s: float = 150.0
    sentinel: bool = True
    bom: bool = False
    crlf: bool = False
    # Zero-based indices of deltas to emit as header-only files (the export does that).
    header_only_deltas: frozenset[int] = field(default_factory=frozenset)
    # Share of baseline tickets already closed; the sample's 60 rows happen to be all open,
    # but a real ~35k full-state export carries the last weeks' closures too. None closes
    # a ticket once a resolution time drawn from the dataset's MTTR distribution has
    # passed, as a live system does: the open backlog then follows from the arrival rate
    # (baseline_rows over history_days) instead of being set.
    closed_share: float | None = 0.35
    # Baseline tickets were created uniformly over this many days before ``start``.
    history_days: float = 21.0

    def __post_init__(self) -> None:
        if self.dataset not in _PROFILES:
            raise ValueError(f"dataset must be one of {sorted(_PROFILES)}, not {self.dataset!r}")
        if self.baseline_rows < 0 or self.deltas < 0 or self.delta_rows < 0:
            raise ValueError("row and delta counts must be >= 0")
        if self.deltas and self.delta_interval_s < 1:
            # File names have one-second resolution; closer deltas would collide.
            raise ValueError("delta_interval_s must be >= 1 second")
        if self.closed_share is not None and not 0.0 <= self.closed_share <= 1.0:
            raise ValueError("closed_share must be within [0, 1]")
        if not self.history_days * 86400 > 2 * _MIN_AGE_S:
            raise ValueError("history_days must be more than a few minutes")


# --------------------------------------------------------------------------- time helpers

_EPOCH: Final = datetime(1970, 1, 1)
_EPOCH_DATE: Final = date(1970, 1, 1)


def _to_naive_eat(ts: datetime) -> datetime:
    if ts.tzinfo is not None:
        ts = ts.astimezone(EAT).replace(tzinfo=None)
    return ts.replace(microsecond=0)


def _secs(ts: datetime) -> int:
    """Naive EAT datetime -> integer seconds on a naive epoch (no tz maths in the hot loop)."""
    return int((_to_naive_eat(ts) - _EPOCH).total_seconds())


class _DayStrings(dict[int, str]):
    """Epoch day -> ``YYYY-MM-DD``, filled on first use (a feed spans only a few weeks)."""

    def __missing__(self, day: int) -> str:
        value = (_EPOCH_DATE + timedelta(days=day)).isoformat()
        self[day] = value
        return value


_DAYS: Final = _DayStrings()
# Every " HH:MM:SS" of a day, built once: formatting ~3 timestamps per row with strftime or
# f-strings dominated a 1.2M-row run, a table lookup is an order of magnitude cheaper.
_HOURS_MINUTES: Final = [f" {h:02d}:{m:02d}" for h in range(24) for m in range(60)]
_SECONDS: Final = [f":{sec:02d}" for sec in range(60)]
_HMS: Final[tuple[str, ...]] = tuple([hm + ss for hm in _HOURS_MINUTES for ss in _SECONDS])


def _fmt(s: int) -> str:
    day, rem = divmod(s, 86400)
    return _DAYS[day] + _HMS[rem]


def file_name(ts: datetime) -> str:
    """Naive EAT datetime (aware ones are converted) -> ``2026-06-22T15-50-39.csv``."""
    return _to_naive_eat(ts).strftime("%Y-%m-%dT%H-%M-%S") + ".csv"


def parse_file_name(name: str) -> datetime:
    """Inverse of :func:`file_name`; accepts a bare name or a key/path ending in one."""
    base = name.rsplit("/", 1)[-1]
    return datetime.strptime(base.removesuffix(".csv"), "%Y-%m-%dT%H-%M-%S")


def now_eat() -> datetime:
    return datetime.now(UTC).astimezone(EAT).replace(tzinfo=None, microsecond=0)


# --------------------------------------------------------------------------- row factory


class _RowFactory:
    """Builds complete ticket rows; shared by the streaming writer and the simulator."""

    def __init__(self, spec: FeedSpec, rng: Random) -> None:
        self.spec = spec
        self.rng = rng
        self.profile = _PROFILES[spec.dataset]
        self.prefix = self.profile.prefix
        self.dataset = spec.dataset
        self.department = self.profile.department
        self.mu = math.log(self.profile.mttr_median_min)
        self.history_s = round(spec.history_days * 86400)
        cs = spec.closed_share if spec.closed_share is not None else self._expected_closed_share()
        # Solve (1-cs)*p_open + cs*p_closed = 0.30 so the overall share holds for any mix.
        p_closed = min(_CREATED_EMPTY_SHARE_CLOSED, _CREATED_EMPTY_SHARE)
        if cs < 1.0:
            p_open = (_CREATED_EMPTY_SHARE - cs * p_closed) / (1.0 - cs)
        else:
            p_open, p_closed = 0.0, _CREATED_EMPTY_SHARE
        self.p_empty_open = min(1.0, max(0.0, p_open))
        self.p_empty_closed = p_closed
        # Weighted picks are pre-expanded into flat tuples so each costs one random() and
        # one index in the hot loop; likewise every "<noise><CLUSTER>_" head and every
        # "<street> FDT<n>" tail of a location name is built once here, not per row.
        clusters: list[tuple[str, str, tuple[str, ...]]] = []
        for name, region, weight in _CLUSTERS:
            code = name.upper().replace(" ", "_")
            heads = tuple(f"{noise}{code}_" for noise in _NET_PREFIXES)
            clusters.extend([(name, region, heads)] * weight)
        self.clusters: tuple[tuple[str, str, tuple[str, ...]], ...] = tuple(clusters)
        self.street_fdts: tuple[str, ...] = tuple(
            f"{street} FDT{n}" for street in _STREETS for n in range(1, 41)
        )
        missing = round(_TEAM_MISSING_SHARE * 100)
        self.teams: tuple[str, ...] = ("",) * missing + tuple(
            _TEAMS[i % len(_TEAMS)] for i in range(100 - missing)
        )
        self._now_s = -1
        self._now_str = ""
        self._now_key = ""

    def _expected_closed_share(self) -> float:
        """Share closed by age (closed_share=None), to keep ~30% without a service time."""
        # Ages are uniform over the history; a ticket is closed when its lognormal
        # duration is below its age. Averaged on a grid: exactness does not matter here.
        steps = 200
        total = 0.0
        for i in range(steps):
            age_min = (_MIN_AGE_S + (i + 0.5) / steps * (self.history_s - _MIN_AGE_S)) / 60.0
            z = (math.log(age_min) - self.mu) / _MTTR_SIGMA
            total += 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
        return total / steps

    def _resolution_s(self) -> int:
        """Seconds from creation to closure, from the dataset's MTTR distribution."""
        return int(self.rng.lognormvariate(self.mu, _MTTR_SIGMA) * 60.0)

    def ticket_id(self, seq: int) -> str:
        return f"{self.prefix}{seq:012d}"

    def close(self, row: list[str], created: int, closed_at: int) -> None:
        """Mark ``row`` closed at ``closed_at`` with the bookkeeping the export derives."""
        r = self.rng.random
        minutes = (closed_at - created) / 60.0
        row[C_BUCKET] = "closed"
        row[C_RAW_STATUS] = _CLOSED_STATUSES[int(r() * len(_CLOSED_STATUSES))]
        row[C_NORMALIZED_STATUS] = "closed"
        row[C_CLOSED_AT] = _fmt(closed_at)
        row[C_MTTR] = f"{minutes:.1f}"
        row[C_SLA_STATUS] = "Met" if minutes <= self.profile.sla_minutes else "Breached"
        # Alarms are cleared by the NMS itself far more often than field faults are.
        auto = r() < (0.5 if row[C_IS_ALARM] == "true" else 0.05)
        row[C_IS_AUTO_CLOSED] = "true" if auto else "false"

    def new(self, seq: int, now_s: int, created: int, closed: bool, dur: int | None = None) -> list[str]:
        """A complete row for ticket ``seq`` as exported at ``now_s``; ``dur``: seconds to close."""
        # Written for speed (locals, inlined _fmt): it runs 1.2M times for the benchmark.
        r = self.rng.random
        days, hms = _DAYS, _HMS
        if now_s != self._now_s:
            self._now_s, self._now_str, self._now_key = now_s, _fmt(now_s), _s3_key(now_s)
        now_str = self._now_str
        first_seen = created + _FIRST_SEEN_LAG_S
        day, rem = divmod(first_seen, 86400)
        first_seen_s = days[day] + hms[rem]
        monday = day - (day + 3) % 7  # 1970-01-01 was a Thursday
        if r() < (self.p_empty_closed if closed else self.p_empty_open):
            created_s = ""
        else:
            day, rem = divmod(created, 86400)
            created_s = days[day] + hms[rem]
        scheduled = ""
        if r() < self.profile.scheduled_share:
            if self.prefix == "INC":
                scheduled = _fmt(created + 4 * 3600)
            else:  # installations get booked a few days out, on the hour
                scheduled = _fmt((created // 3600 + 24 + int(r() * 96)) * 3600)
        clusters, fdts, teams = self.clusters, self.street_fdts, self.teams
        cluster, region, heads = clusters[int(r() * len(clusters))]
        location = heads[int(r() * len(heads))] + fdts[int(r() * len(fdts))]
        if r() < _LOCATION_TAIL_SHARE:
            location += _LOCATION_TAILS[int(r() * len(_LOCATION_TAILS))]
        alarm, actionable = ("true", "false") if r() < _ALARM_SHARE else ("false", "true")
        row = [
            self.prefix + str(seq).zfill(12),
            self.dataset,
            "FTTH",
            "pending",
            _OPEN_STATUSES[int(r() * len(_OPEN_STATUSES))],
            "open",
            created_s,
            scheduled,
            "",
            now_str,
            first_seen_s,
            days[monday],
            days[monday + 6],
            cluster,
            region,
            location,
            "",
            "",
            self.department,
            teams[int(r() * len(teams))],
            _OWNERS[int(r() * len(_OWNERS))],
            "",
            "",
            "true" if r() < _AUTO_CREATED_SHARE else "false",
            "false",
            alarm,
            actionable,
            _S3_BUCKET_COL,
            self._now_key,
            "snap-" + str(100_000_000 + int(r() * 900_000_000)),
            first_seen_s,
            now_str,
        ]
        if closed:
            if dur is None:
                limit = now_s - 30 - created
                dur = self._resolution_s()
                if dur < 60 or dur > limit:
                    dur = 60 + int(r() * max(1, limit - 60))
            self.close(row, created, created + dur)
        return row

    def baseline_ticket(self, seq: int, now_s: int) -> tuple[list[str], int]:
        r = self.rng.random
        created = now_s - _MIN_AGE_S - int(r() * (self.history_s - _MIN_AGE_S))
        if self.spec.closed_share is not None:
            return self.new(seq, now_s, created, r() < self.spec.closed_share), created
        dur = max(60, self._resolution_s())
        closed = created + dur <= now_s - 30
        return self.new(seq, now_s, created, closed, dur if closed else None), created


def _s3_key(now_s: int) -> str:
    return f"exports/{_DAYS[now_s // 86400].replace('-', '')}/wm_task.xlsx"


# --------------------------------------------------------------------------- CSV encoding


class _ChunkedCsv:
    """QUOTE_ALL CSV encoder that hands encoded chunks to ``sink`` every few thousand rows.

    Rows are quoted by hand rather than with ``csv.writer``: with every field quoted the
    result is identical (quotes doubled, line breaks kept inside the quotes), and it is
    several times faster, which is what makes the 1.2M-row benchmark file cheap to build.
    """

    def __init__(self, spec: FeedSpec, sink: Callable[[bytes], object]) -> None:
        self._sink = sink
        self._eol = '"\r\n' if spec.crlf else '"\n'
        self._lines: list[str] = []
        self.bytes_written = 0
        if spec.bom:
            self._emit(BOM)
        self.row(COLUMNS)

    def _emit(self, data: bytes) -> None:
        self._sink(data)
        self.bytes_written += len(data)

    def row(self, row: Sequence[str]) -> None:
        # NUL never occurs in generated values, so it can stand in for the separator while
        # embedded quotes are doubled in one pass over the whole line.
        line = "\0".join(row)
        if '"' in line:
            line = line.replace('"', '""')
        self._lines.append('"' + line.replace("\0", '","') + self._eol)
        if len(self._lines) >= _CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            self._emit("".join(self._lines).encode("utf-8"))
            self._lines.clear()


def _sentinel_row() -> list[str]:
    return [SENTINEL] + [""] * (len(COLUMNS) - 1)


def _rng_for(spec: FeedSpec) -> Random:
    # String seeds hash via SHA-512 (not hash()), so this is stable across processes and
    # PYTHONHASHSEED; mixing in the dataset keeps INC and CRQ feeds of one seed distinct.
    return Random(f"fleetticketsd.feedgen:{spec.dataset}:{spec.seed}")


def write_rows(out: BinaryIO, spec: FeedSpec, rows: int) -> int:
    """Stream a baseline of ``rows`` tickets (plus header and, per spec, sentinel) to ``out``.

    Nothing is retained between chunks, so this scales to the 1.2M-row / ~500 MB benchmark.
    For ``rows == spec.baseline_rows`` the bytes equal the baseline of :func:`generate`.
    Returns the number of bytes written.
    """
    factory = _RowFactory(spec, _rng_for(spec))
    enc = _ChunkedCsv(spec, out.write)
    if spec.sentinel:
        enc.row(_sentinel_row())
    now_s = _secs(spec.start)
    for seq in range(1, rows + 1):
        enc.row(factory.baseline_ticket(seq, now_s)[0])
    enc.flush()
    return enc.bytes_written


# --------------------------------------------------------------------------- simulator


class FeedSimulator:
    """Holds the current state of every ticket so deltas can progress it realistically."""

    def __init__(self, spec: FeedSpec) -> None:
        self.spec = spec
        self.rng = _rng_for(spec)
        self.factory = _RowFactory(spec, self.rng)
        self.rows: list[list[str]] = []
        self.created: list[int] = []  # service creation time, known even when not exported
        self.open_idx: list[int] = []
        self.next_seq = 1
        self.last_ts: datetime | None = None

    def _encode(self, rows: Iterator[Sequence[str]]) -> bytes:
        buf = io.BytesIO()
        enc = _ChunkedCsv(self.spec, buf.write)
        for row in rows:
            enc.row(row)
        enc.flush()
        return buf.getvalue()

    def baseline(self) -> tuple[str, bytes]:
        if self.last_ts is not None:
            raise RuntimeError("baseline already generated")
        spec = self.spec
        now_s = _secs(spec.start)

        def rows() -> Iterator[Sequence[str]]:
            if spec.sentinel:
                yield _sentinel_row()
            for seq in range(1, spec.baseline_rows + 1):
                row, created = self.factory.baseline_ticket(seq, now_s)
                self.next_seq = seq + 1
                if row[C_NORMALIZED_STATUS] == "open":
                    self.open_idx.append(len(self.rows))
                self.rows.append(row)
                self.created.append(created)
                yield row

        data = self._encode(rows())
        self.last_ts = _to_naive_eat(spec.start)
        return file_name(spec.start), data

    def delta(self, ts: datetime, rows: int, *, header_only: bool = False) -> tuple[str, bytes]:
        """Export at ``ts``: ``rows`` changed tickets (closures, updates, new tickets)."""
        if self.last_ts is None:
            raise RuntimeError("generate the baseline first")
        ts = _to_naive_eat(ts)
        if ts <= self.last_ts:
            raise ValueError(f"delta at {ts} is not after the previous file at {self.last_ts}")
        prev_s, now_s = _secs(self.last_ts), _secs(ts)
        self.last_ts = ts
        out: list[list[str]] = []
        if not header_only:
            touched: set[int] = set()
            for _ in range(rows):
                out.append(self._change(prev_s, now_s, touched))
        return file_name(ts), self._encode(iter(out))

    def _change(self, prev_s: int, now_s: int, touched: set[int]) -> list[str]:
        rng = self.rng
        roll = rng.random()
        idx = self._pick_open(touched) if roll < 0.80 else None
        if idx is None:
            return self._new_ticket(now_s, touched)
        touched.add(idx)
        row = list(self.rows[idx])
        if roll < 0.55:
            lo = max(prev_s, self.created[idx] + 60)
            closed_at = lo + int(rng.random() * (now_s - lo)) if now_s > lo else now_s
            self.factory.close(row, self.created[idx], closed_at)
            self.open_idx.remove(idx)
        else:
            self._progress_open(row, idx)
        self._stamp(row, now_s)
        self.rows[idx] = row
        return row

    def _pick_open(self, touched: set[int]) -> int | None:
        # A ticket appears at most once per file: two versions in one delta would leave
        # the upsert order ambiguous.
        for _ in range(8):
            if not self.open_idx:
                return None
            idx = self.open_idx[int(self.rng.random() * len(self.open_idx))]
            if idx not in touched:
                return idx
        return None

    def _progress_open(self, row: list[str], idx: int) -> None:
        rng = self.rng
        status = row[C_RAW_STATUS]
        choices = [s for s in _OPEN_STATUS_SET if s != status]
        choices.sort()  # set order is hash-seeded; sort to stay deterministic
        row[C_RAW_STATUS] = choices[int(rng.random() * len(choices))]
        if not row[C_ASSIGNED_TEAM] and rng.random() < 0.6:
            row[C_ASSIGNED_TEAM] = _TEAMS[int(rng.random() * len(_TEAMS))]
        if rng.random() < 0.2:
            row[C_OWNER] = _OWNERS[int(rng.random() * len(_OWNERS))]
        if not row[C_CREATED_AT_SERVICE] and rng.random() < 0.3:
            # The service sometimes back-fills its own creation time later.
            row[C_CREATED_AT_SERVICE] = _fmt(self.created[idx])

    def _new_ticket(self, now_s: int, touched: set[int]) -> list[str]:
        seq = self.next_seq
        self.next_seq += 1
        created = now_s - 480 - int(self.rng.random() * 18 * 3600)
        row = self.factory.new(seq, now_s, created, closed=False)
        touched.add(len(self.rows))
        self.open_idx.append(len(self.rows))
        self.rows.append(row)
        self.created.append(created)
        return row

    @staticmethod
    def _stamp(row: list[str], now_s: int) -> None:
        now_str = _fmt(now_s)
        row[C_LAST_SEEN_AT] = now_str
        row[C_UPDATED_AT] = now_str
        row[C_SOURCE_S3_KEY] = _s3_key(now_s)


def _delta_times(spec: FeedSpec) -> list[datetime]:
    start = _to_naive_eat(spec.start)
    return [start + timedelta(seconds=round(spec.delta_interval_s * (i + 1))) for i in range(spec.deltas)]


def _generate(sim: FeedSimulator) -> Iterator[tuple[str, bytes]]:
    spec = sim.spec
    yield sim.baseline()
    for i, ts in enumerate(_delta_times(spec)):
        yield sim.delta(ts, spec.delta_rows, header_only=i in spec.header_only_deltas)


def generate(spec: FeedSpec) -> Iterator[tuple[str, bytes]]:
    """Yield ``(file name, file bytes)``: the baseline, then ``spec.deltas`` deltas."""
    return _generate(FeedSimulator(spec))


def write_dir(spec: FeedSpec, out_dir: Path) -> list[Path]:
    """Write the baseline and deltas as ``<out_dir>/<name>``; returns the paths in order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, data in generate(spec):
        path = out_dir / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def follow_files(
    spec: FeedSpec,
    every_s: float,
    *,
    clock: Callable[[], datetime] = now_eat,
    sleep: Callable[[float], object] = time.sleep,
) -> Iterator[tuple[str, bytes]]:
    """The files of ``generate(spec)``, then a fresh delta every ``every_s`` seconds forever.

    Live deltas are stamped with ``clock()`` (EAT), but never at or before the previous
    file: a name sorting earlier would be skipped by a consumer that applies files in name
    order, which is exactly the failure a demo feeder must not fake.
    """
    if every_s <= 0:
        raise ValueError("every_s must be > 0")
    sim = FeedSimulator(spec)
    yield from _generate(sim)
    assert sim.last_ts is not None
    base_s, base_seq = _secs(sim.last_ts), sim.next_seq
    live = False
    while True:
        sleep(every_s)
        ts = max(_to_naive_eat(clock()), sim.last_ts + timedelta(seconds=1))
        if not live:
            # A restarted feeder replays the seeded files identically (idempotent
            # overwrite); reseeding from the wall clock keeps its live deltas from
            # replaying the previous run's changes too.
            sim.rng.seed(f"fleetticketsd.feedgen:{spec.dataset}:{spec.seed}:live:{ts}")
            live = True
        # New ticket ids come from a per-interval slot, not just a counter, so a restarted
        # feeder (which does not know what its predecessor created) does not reuse them.
        slot = int((_secs(ts) - base_s) // every_s)
        sim.next_seq = max(sim.next_seq, base_seq + slot * spec.delta_rows)
        yield sim.delta(ts, spec.delta_rows)


# --------------------------------------------------------------------------- S3 upload


def _s3_client(endpoint_url: str, region: str) -> Any:
    import boto3  # local: the generator itself must not need boto3 (tests, benchmarks)
    from botocore.config import Config

    kwargs: dict[str, Any] = {}
    key_id = os.environ.get("RUSTFS_ACCESS_KEY_ID")
    secret = os.environ.get("RUSTFS_SECRET_ACCESS_KEY")
    if key_id and secret:
        kwargs = {"aws_access_key_id": key_id, "aws_secret_access_key": secret}
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        # RustFS/MinIO-style servers rarely have wildcard DNS for virtual-host buckets.
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5}),
        **kwargs,
    )


def _ensure_bucket(client: Any, bucket: str, region: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in {"404", "NoSuchBucket", "NotFound"}:
            raise
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":  # S3 rejects an explicit us-east-1 LocationConstraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
    except ClientError as exc:
        # Another seeding job may have won the race; that is fine.
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
            raise


def _put(client: Any, bucket: str, prefix: str, name: str, data: bytes) -> str:
    key = f"{prefix}changes/{name}"
    client.put_object(Bucket=bucket, Key=key, Body=data, ContentType="text/csv")
    return key


def upload(
    spec: FeedSpec,
    *,
    endpoint_url: str,
    bucket: str,
    prefix: str,
    region: str = "us-east-1",
) -> list[str]:
    """Upload the feed to ``<prefix>changes/<name>`` (bucket created if missing).

    Credentials come from RUSTFS_ACCESS_KEY_ID / RUSTFS_SECRET_ACCESS_KEY when both are set,
    else from the standard AWS chain. Returns the keys in upload (= name) order.
    """
    client = _s3_client(endpoint_url, region)
    _ensure_bucket(client, bucket, region)
    return [_put(client, bucket, prefix, name, data) for name, data in generate(spec)]


def upload_follow(
    spec: FeedSpec,
    *,
    endpoint_url: str,
    bucket: str,
    prefix: str,
    every_s: float,
    region: str = "us-east-1",
    limit: int | None = None,
    on_upload: Callable[[str], object] | None = None,
) -> list[str]:
    """Like :func:`upload`, then keep dropping a live delta every ``every_s`` seconds.

    Runs until interrupted, or until ``limit`` files in total have been uploaded.
    """
    client = _s3_client(endpoint_url, region)
    _ensure_bucket(client, bucket, region)
    keys: list[str] = []
    for name, data in follow_files(spec, every_s):
        keys.append(_put(client, bucket, prefix, name, data))
        if on_upload is not None:
            on_upload(keys[-1])
        if limit is not None and len(keys) >= limit:
            break
    return keys


# --------------------------------------------------------------------------- CLI


def _parse_start(value: str) -> datetime | None:
    if value == "now":
        return None  # resolved once the delta count and interval are known
    try:
        return _to_naive_eat(datetime.fromisoformat(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO datetime or 'now': {value!r}") from exc


def _parse_closed_share(value: str) -> float | None:
    if value == "age":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a share like 0.35 nor 'age'") from None


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    defaults = FeedSpec()
    common.add_argument("--dataset", choices=sorted(_PROFILES), default=defaults.dataset)
    common.add_argument("--seed", type=int, default=defaults.seed)
    common.add_argument("--baseline-rows", type=int, default=defaults.baseline_rows)
    common.add_argument("--deltas", type=int, default=defaults.deltas)
    common.add_argument("--delta-rows", type=int, default=defaults.delta_rows)
    common.add_argument("--delta-interval", type=float, default=defaults.delta_interval_s, metavar="SECONDS")
    common.add_argument(
        "--start",
        type=_parse_start,
        default=defaults.start,
        help="baseline time, naive EAT ISO datetime, or 'now' to end the seeded files "
        "at the current time (default: %(default)s)",
    )
    common.add_argument(
        "--closed-share",
        type=_parse_closed_share,
        default=defaults.closed_share,
        help="share of baseline tickets already closed, or 'age' to close each once its drawn "
        "resolution time has passed (default: %(default)s)",
    )
    common.add_argument(
        "--history-days",
        type=float,
        default=defaults.history_days,
        help="baseline tickets were created over this many days (default: %(default)s)",
    )
    common.add_argument(
        "--header-only-delta",
        type=int,
        action="append",
        default=[],
        metavar="INDEX",
        help="zero-based delta index to emit header-only (repeatable)",
    )
    common.add_argument("--bom", action="store_true", help="prefix files with a UTF-8 BOM")
    common.add_argument("--crlf", action="store_true", help="use \\r\\n line endings")
    common.add_argument("--no-sentinel", action="store_true", help="omit the EXPORT STOPPED row")

    parser = argparse.ArgumentParser(
        prog="python -m fleetticketsd.feedgen",
        description="Seeded synthetic generator for the ticket change feed (FEED.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", parents=[common], help="write the feed files to a directory")
    w.add_argument("--out", type=Path, required=True)
    u = sub.add_parser("upload", parents=[common], help="upload the feed to an S3 bucket")
    u.add_argument("--endpoint-url", required=True)
    u.add_argument("--bucket", required=True)
    u.add_argument("--prefix", default=None, help="key prefix (default: automations/<dataset>/)")
    u.add_argument("--region", default="us-east-1")
    u.add_argument(
        "--follow",
        type=float,
        metavar="SECONDS",
        help="after the initial files, upload a live delta every SECONDS until interrupted",
    )
    return parser


def _spec_from_args(args: argparse.Namespace) -> FeedSpec:
    start: datetime | None = args.start
    if start is None:
        # 'now' means the feed is current now: future-dated files would sort after, and
        # so hold back, whatever a live feeder drops next.
        start = now_eat() - timedelta(seconds=round(args.delta_interval * args.deltas))
    return FeedSpec(
        dataset=args.dataset,
        seed=args.seed,
        baseline_rows=args.baseline_rows,
        deltas=args.deltas,
        delta_rows=args.delta_rows,
        start=start,
        delta_interval_s=args.delta_interval,
        sentinel=not args.no_sentinel,
        bom=args.bom,
        crlf=args.crlf,
        header_only_deltas=frozenset(args.header_only_delta),
        closed_share=args.closed_share,
        history_days=args.history_days,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        spec = _spec_from_args(args)
    except ValueError as exc:
        print(f"feedgen: {exc}", file=sys.stderr)
        return 2
    if args.command == "write":
        for path in write_dir(spec, args.out):
            print(path)
        return 0
    prefix: str = f"automations/{spec.dataset}/" if args.prefix is None else args.prefix
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if args.follow is None:
        for key in upload(
            spec,
            endpoint_url=args.endpoint_url,
            bucket=args.bucket,
            prefix=prefix,
            region=args.region,
        ):
            print(f"s3://{args.bucket}/{key}")
        return 0
    try:
        upload_follow(
            spec,
            endpoint_url=args.endpoint_url,
            bucket=args.bucket,
            prefix=prefix,
            every_s=args.follow,
            region=args.region,
            on_upload=lambda key: print(f"s3://{args.bucket}/{key}", flush=True),
        )
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

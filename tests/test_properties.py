"""Property-based tests (hypothesis): what must hold for any input, not just the examples.

- The feed parser agrees with Python's csv module on generated CSV (quotes, commas,
  CR/LF, BOM, multi-byte UTF-8, huge fields, wrong field counts) however the bytes are
  cut into chunks: S3 hands the parser arbitrary chunk boundaries, inside a quoted line
  break or a multi-byte character alike.
- ``tickets.eat_ts`` never raises, whatever text a timestamp column holds (it backs
  STORED generated columns: one raise would fail a whole file), and reads the feed's own
  shape exactly.
- Loading an arbitrary TOML document (or arbitrary bytes) raises nothing but the
  project's ConfigError.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import tomli_w
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fleetticketsd.config import ConfigError, load
from fleetticketsd.ingest.feed import COLUMNS, KEPT, MAX_TICKET_ID_CHARS, SENTINEL_PREFIX, BadFile, FeedParser

from .conftest import _db_url, admin_sql

# --- the feed parser --------------------------------------------------------------------

# Field text: the characters that break naive CSV handling, multi-byte UTF-8, and plain.
TRICKY = st.sampled_from(['"', ",", "\n", "\r\n", "\r", " ", "é", "中", "🚒", "\u2028", "a", "0"])
FIELD = st.one_of(
    st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12),
    st.lists(TRICKY, max_size=8).map("".join),
)
# Now and then a field far past the csv module's default 128 KiB limit.
HUGE = st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", '"', "\n"]), st.integers(130_000, 200_000))


@st.composite
def feed_files(draw: st.DrawFn) -> tuple[bytes, list[list[str]]]:
    """A change file as the export writes it (every value quoted), and its rows."""
    columns = list(COLUMNS)
    if draw(st.booleans()):
        columns.append("drift_" + draw(st.sampled_from(["a", "b"])))
    columns = draw(st.permutations(columns))
    n = draw(st.integers(0, 6))
    rows: list[list[str]] = []
    for i in range(n):
        row = {c: draw(FIELD) for c in columns}
        row["ticket_id"] = draw(
            st.sampled_from([f"INC{i}", f"INC{i % 2}", f"{SENTINEL_PREFIX} ROW LIMIT", "", " "])
        )
        row["is_alarm"] = draw(st.sampled_from(["false", "true", " TRUE ", "no"]))
        values = [row[c] for c in columns]
        if draw(st.integers(0, 9)) == 0:
            values[draw(st.integers(0, len(values) - 1))] = draw(HUGE)
        if draw(st.integers(0, 9)) == 0:  # a wrong field count: rejected, the rest applies
            values = values[: draw(st.integers(0, len(values) - 1))] or ["short"]
        rows.append(values)
    out = io.StringIO(newline="")
    writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    writer.writerow(columns)
    writer.writerows(rows)
    text = out.getvalue()
    if rows and draw(st.booleans()):
        text = text.rstrip("\r\n")  # no line break after the last record
    data = text.encode("utf-8")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    return data, [columns, *rows]


def expected(data: bytes) -> tuple[list[tuple[Any, ...]], list[tuple[int, str]]]:
    """What the parser must produce, by the csv module reading the whole text at once."""
    text = data.decode("utf-8-sig")
    # Physical lines end at "\n" only (a CR inside a quoted field is data): split there,
    # so that csv's line_num counts what a person counts in an editor.
    lines = [part + "\n" for part in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    reader = csv.reader([ln for ln in lines if ln], strict=True)
    header = [h.strip() for h in next(reader)]
    index = {name: i for i, name in enumerate(header)}
    extras = [(name, i) for i, name in enumerate(header) if name not in COLUMNS]
    records, rejects = [], []
    line = reader.line_num + 1
    for row in reader:
        start, line = line, reader.line_num + 1
        tid = row[index["ticket_id"]] if len(row) > index["ticket_id"] else ""
        if tid.startswith(SENTINEL_PREFIX):
            continue
        if len(row) != len(header):
            rejects.append((start, "wrong field count"))
            continue
        if not tid.strip():
            rejects.append((start, "empty ticket_id"))
            continue
        if len(tid) > MAX_TICKET_ID_CHARS:  # the primary key's btree could not hold it
            rejects.append((start, f"ticket_id longer than {MAX_TICKET_ID_CHARS} characters"))
            continue
        if row[index["is_alarm"]].strip().lower() == "true":
            continue
        extra = None
        if extras:
            extra = json.dumps({name: row[i] for name, i in extras}, ensure_ascii=False)
        records.append((start, *(row[index[c]] for c in KEPT), extra))
    return records, rejects


def parse_in_chunks(data: bytes, cuts: list[int]) -> tuple[list[tuple[Any, ...]], list[tuple[int, str]]]:
    parser = FeedParser()
    out: list[tuple[Any, ...]] = []
    edges = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    for a, b in itertools.pairwise(edges):
        out.extend(parser.feed(data[a:b]))
    out.extend(parser.finish())
    rejects = [(r.line, r.reason.split(":", 1)[0]) for r in parser.stats.rejects]
    return out, rejects


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(feed_files(), st.lists(st.integers(0, 2**20), max_size=12), st.data())
def test_parser_agrees_with_the_csv_module_however_the_file_is_chunked(
    file: tuple[bytes, list[list[str]]], cuts: list[int], data: st.DataObject
) -> None:
    raw, _ = file
    # Cut points anywhere, including inside multi-byte characters and CRLF pairs.
    cuts += data.draw(st.lists(st.integers(0, max(len(raw), 1)), max_size=20))
    got, want = parse_in_chunks(raw, cuts), expected(raw)
    assert got[1] == want[1], _first_difference(got[1], want[1])  # rejects: (line, reason)
    assert got[0] == want[0], _first_difference(got[0], want[0])  # records


def _first_difference(got: list[Any], want: list[Any]) -> str:
    """Where two long lists part, with long values shortened: hypothesis's huge fields
    make the default assertion message useless."""

    def short(v: Any) -> str:
        r = repr(v)
        return r if len(r) < 300 else r[:150] + f"...<{len(r)} chars>..." + r[-100:]

    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            if isinstance(g, tuple) and isinstance(w, tuple):
                cols = [j for j, (a, b) in enumerate(zip(g, w, strict=False)) if a != b]
                got_v, want_v = short([g[j] for j in cols]), short([w[j] for j in cols])
                return f"item {i} differs in fields {cols}: got {got_v}, want {want_v}"
            return f"item {i}: got {short(g)}, want {short(w)}"
    return f"lengths {len(got)} vs {len(want)}: extra {short(got[len(want) :] or want[len(got) :])}"


@settings(max_examples=60, deadline=None)
@given(feed_files(), st.integers(1, 64))
def test_parser_output_does_not_depend_on_the_chunk_size(
    file: tuple[bytes, list[list[str]]], size: int
) -> None:
    raw, _ = file
    assume(len(raw) < 400_000)
    whole = parse_in_chunks(raw, [])
    assert parse_in_chunks(raw, list(range(size, len(raw), size))) == whole


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_arbitrary_bytes_are_records_or_a_bad_file_never_another_error(data: bytes, cuts: list[int]) -> None:
    try:
        parse_in_chunks(data, cuts)
    except BadFile:
        pass


# --- tickets.eat_ts ----------------------------------------------------------------------

EAT = timezone(timedelta(hours=3))


@pytest.fixture(scope="module")
def sql(template_db: str) -> Iterator[Any]:
    """One connection on its own loop for the whole module: hypothesis runs the test body
    many times, and a database per example would cost more than the examples."""
    name = f"fleet_p_{uuid.uuid4().hex[:12]}"
    admin_sql(f"CREATE DATABASE {name} TEMPLATE {template_db}")
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(_db_url(name)))

    def run(query: str, *args: Any) -> list[asyncpg.Record]:
        return loop.run_until_complete(conn.fetch(query, *args))

    yield run
    loop.run_until_complete(conn.close())
    loop.close()
    admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


TIMESTAMPISH = st.from_regex(
    r"\A\s?\d{1,5}-\d{1,2}-\d{1,3}([ T]\d{1,2}:\d{1,2}(:\d{1,2}(\.\d{1,8})?)?)?\s?"
    r"(Z|[+-]\d{1,2}(:?\d{1,2})?)?\s?\Z"
)
PG_TEXT = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(PG_TEXT, TIMESTAMPISH), min_size=1, max_size=60))
def test_eat_ts_never_raises(sql: Any, values: list[str]) -> None:
    rows = sql(
        "SELECT v, tickets.eat_ts(v) AS ts, tickets.eat_ts_lenient(v) AS slow FROM unnest($1::text[]) AS v",
        values,
    )
    assert len(rows) == len(values)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 30)),
            st.sampled_from([" ", "T"]),
            st.sampled_from(["", "Z", "+03:00", "-0530", "+14", "+00:00"]),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_eat_ts_reads_every_real_timestamp_exactly(sql: Any, stamps: list[tuple[datetime, str, str]]) -> None:
    texts, want = [], []
    for ts, sep, offset in stamps:
        ts = ts.replace(microsecond=0)
        # Not strftime: glibc writes year 999 as '999', which is not the feed's shape.
        texts.append(f"{ts.year:04d}-{ts:%m-%d}{sep}{ts:%H:%M:%S}{offset}")
        if offset == "":
            tz: timezone = EAT  # the feed's own shape: EAT wall-clock time
        elif offset == "Z":
            tz = UTC  # type: ignore[assignment]
        else:
            sign = -1 if offset[0] == "-" else 1
            digits = offset[1:].replace(":", "")
            tz = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:] or 0)))
        want.append(ts.replace(tzinfo=tz))
    rows = sql(
        "SELECT tickets.eat_ts(v) AS ts FROM unnest($1::text[]) WITH ORDINALITY AS u(v, i) ORDER BY i", texts
    )
    got = [r["ts"] for r in rows]
    # Out of timestamptz's range after the shift (year 1 minus hours): NULL, not an error.
    assert [g for g, w in zip(got, want, strict=True) if g is not None] == [
        w for g, w in zip(got, want, strict=True) if g is not None
    ]
    assert all(g is not None for g, w in zip(got, want, strict=True) if w.year > 1)


# --- configuration ------------------------------------------------------------------------

SECTIONS = ["database", "s3", "server", "schedule", "datasets", "geocoder", "ingest", "daemon", "logging"]
KEYS = [
    "url", "endpoint_url", "bucket", "region", "addressing_style", "listen", "timezone", "cron",
    "prefix", "table", "post_apply", "on_bad_file", "enabled", "provider", "base_url",
    "rate_per_second", "daily_budget", "max_distance_km", "country_codes", "max_record_bytes",
    "shutdown_grace_period_s", "source_check_interval_s", "level", "format", "pool_min_size",
    "statement_timeout_s", "read_chunk_bytes", "prefetch_files", "misfire_grace_time_s", "inc", "crq",
]  # fmt: skip
SCALARS = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["127.0.0.1:9464", ":", "[::1]:80", "host:99999", "*/20 6-20 * * *", "61 * * * *", "Africa/Nairobi",
         "Mars/Olympus", "tickets.inc", "Tickets.INC", "automations/inc/", "halt", "quarantine", "json",
         "postgresql://u:p@h/db", "http://[::1", "", "locationiq"]
    ),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.datetimes(),
    st.dates(),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=3),
    max_leaves=8,
)
DOCUMENT = st.dictionaries(
    st.one_of(st.sampled_from(SECTIONS), st.text(max_size=8)),
    st.one_of(
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), VALUES, max_size=6),
        VALUES,
    ),
    max_size=6,
)


def _load(tmp: Path, text: str | bytes, env: dict[str, str]) -> None:
    path = tmp / f"c-{uuid.uuid4().hex}.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        load(path, env=env)
    except ConfigError:
        pass
    finally:
        path.unlink()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    DOCUMENT,
    st.dictionaries(
        st.sampled_from(["DATABASE_URL", "RUSTFS_BUCKET", "GEOCODER_API_KEY"]), st.text(max_size=20)
    ),
)
def test_any_toml_document_loads_or_raises_config_error(
    tmp_path: Path, document: dict[str, Any], env: dict[str, str]
) -> None:
    try:
        text = tomli_w.dumps(document)
    except (TypeError, ValueError):
        assume(False)  # not representable as TOML (e.g. a NaN key path); nothing to load
    _load(tmp_path, text, {k: v for k, v in env.items() if "\x00" not in v})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_any_bytes_as_a_config_file_raise_only_config_error(tmp_path: Path, data: bytes | str) -> None:
    _load(tmp_path, data, {})

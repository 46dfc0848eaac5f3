"""The streaming parser alone: no services, every quirk of FEED.md, any chunking."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fleetticketsd.ingest.feed import KEPT, BadFile, FeedParser, key_timestamp

from .conftest import HEADER, SAMPLE, csv_file, row

TID = 1 + KEPT.index("ticket_id")
LOC = 1 + KEPT.index("location_name")


def parse(data: bytes, chunk: int = 1 << 20, max_record_bytes: int = 1 << 24) -> tuple[list, FeedParser]:
    p = FeedParser(max_record_bytes)
    out = []
    for i in range(0, len(data), chunk):
        out.extend(p.feed(data[i : i + chunk]))
    out.extend(p.finish())
    return out, p


def test_key_timestamp_is_eat() -> None:
    assert key_timestamp("a/changes/2026-06-22T15-50-39.csv") == datetime(2026, 6, 22, 12, 50, 39, tzinfo=UTC)
    for bad in (
        "2026-06-22T15-50-39.csv.bak",
        "latest.csv",
        "2026-02-30T10-00-00.csv",
        "2026-06-22 15-50-39.csv",
    ):
        assert key_timestamp(bad) is None


def test_sample_baseline() -> None:
    data = (SAMPLE / "inc" / "changes" / "2026-06-22T15-50-39.csv").read_bytes()
    records, p = parse(data)
    assert p.stats.dropped_sentinel == 1
    assert p.stats.rows_read == 61
    assert len(records) + p.stats.dropped_alarm == 60
    assert not p.stats.rejects
    assert all(len(r) == len(KEPT) + 2 for r in records)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_any_chunking_gives_the_same_records(chunk: int) -> None:
    loc = 'Garden Estate, "Thome"\nnear\r\nthe mall ü'
    body = ("\ufeff" + csv_file(row("T1", location_name=loc), row("T2"), "", eol="\r\n")).encode()
    records, p = parse(body, chunk)
    assert [r[TID] for r in records] == ["T1", "T2"]
    assert records[0][LOC] == loc
    assert [r[0] for r in records] == [2, 5]  # physical line numbers
    assert not p.stats.rejects


def test_last_line_without_newline() -> None:
    records, _ = parse((HEADER + "\n" + row("T1")).encode())
    assert [r[TID] for r in records] == ["T1"]


def test_header_any_order_and_extras() -> None:
    cols = [c.strip('"') for c in HEADER.split(",")]
    reordered = [*reversed(cols), "brand_new"]
    values = {c: f"v-{c}" for c in reordered}
    values["ticket_id"], values["is_alarm"] = "T1", "false"
    line = ",".join(f'"{values[c]}"' for c in reordered)
    records, p = parse((",".join(f'"{c}"' for c in reordered) + "\n" + line + "\n").encode())
    assert p.stats.extra_columns == ("brand_new",)
    assert records[0][TID] == "T1" and records[0][-1] == '{"brand_new": "v-brand_new"}'


def test_bad_rows_are_rejects_with_line_and_raw_text() -> None:
    body = csv_file(row("T1"), '"T2","x"', row(" "), row("T4", owner='a"b'), row("T5") + ',"extra"')
    records, p = parse(body.encode())
    assert [r[TID] for r in records] == ["T1", "T4"]
    assert [(r.line, r.reason.split(":")[0]) for r in p.stats.rejects] == [
        (3, "wrong field count"),
        (4, "empty ticket_id"),
        (6, "wrong field count"),
    ]
    assert p.stats.rejects[0].raw_line == '"T2","x"\n'


def test_malformed_quoting_costs_only_its_record() -> None:
    body = csv_file(row("T1"), '"T2"x,"y"', row("T3"))
    records, p = parse(body.encode())
    assert [r[TID] for r in records] == ["T1", "T3"]
    assert p.stats.rejects[0].line == 3 and "malformed CSV" in p.stats.rejects[0].reason


def test_alarms_and_sentinel_dropped() -> None:
    body = csv_file(row("EXPORT STOPPED DUE TO EXCESSIVE SIZE"), row("T1", is_alarm="TRUE"), row("T2"))
    records, p = parse(body.encode())
    assert [r[TID] for r in records] == ["T2"]
    assert (p.stats.dropped_alarm, p.stats.dropped_sentinel) == (1, 1)


def test_header_only_is_an_empty_delta() -> None:
    records, p = parse(csv_file().encode())
    assert records == [] and p.header_seen


@pytest.mark.parametrize(
    ("data", "line", "reason"),
    [
        (b"", None, "empty file"),
        (b"\n\n", 1, "empty header line"),
        (b'"ticket_id","owner"\n', 1, "header lacks column(s): source_type"),
        ((HEADER + ',"owner"\n').encode(), 1, "header repeats column(s): owner"),
        (csv_file(row("T1"), row("T2")).encode() + b"\xc3\x28", 4, "not UTF-8"),
        (csv_file(row("T1")).encode()[:-3] + b'\n"x', 3, "unterminated quoted field"),
    ],
    ids=["zero-byte", "blank", "missing", "duplicate", "bad-utf8", "unterminated"],
)
def test_bad_files_name_the_line(data: bytes, line: int | None, reason: str) -> None:
    with pytest.raises(BadFile) as err:
        parse(data, chunk=5)
    assert err.value.line == line and reason in err.value.reason


def test_huge_field_within_bound_and_beyond() -> None:
    big = "x" * 200_000
    records, _ = parse(csv_file(row("T1", location_name=big)).encode(), chunk=4096)
    assert len(records[0][LOC]) == 200_000
    with pytest.raises(BadFile, match=r"(larger|longer) than 100000 bytes"):
        parse(csv_file(row("T1", location_name=big)).encode(), chunk=4096, max_record_bytes=100_000)

"""The status page (`GET /`) of a running daemon, read as a person reads it: in Chromium."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleetticketsd.database import adopt
from fleetticketsd.serving import page
from fleetticketsd.serving.status import DatasetsReport, GeocoderStatus, LockHolder, MapPoint, Snapshot

from . import fake_geocoder as fg
from .browser import chromium, open_page
from .conftest import HEADER, Bucket, Daemon, apoll, csv_file, inc_key, poll, row, run_cli

NAIROBI = ("-1.3000", "36.8000")
MOMBASA = ("-4.0435", "39.6682")  # a feed point in the wrong city, to be seen on the map
HOSTILE_ID = "<img src=x onerror=alert(1)>"
BAD_KEY = inc_key("2026-06-22T10-05-00.csv")

# Everything the test reads off the page, in one evaluation.
READ_PAGE = """(() => {
  const q = (s, el = document) => el.querySelector(s);
  const text = (s, el) => (q(s, el) || {}).textContent || null;
  const ds = {};
  for (const el of document.querySelectorAll("section.dataset")) {
    ds[el.dataset.dataset] = {
      state: el.dataset.state,
      key: text(".blocked-key", el),
      reason: text(".blocked-reason", el),
      blocked: text(".blocked", el),
      skip: text(".skip-command", el),
      watermark: text("#watermark td", el),
      pending: text("#pending td", el),
      lastPass: text("#last-pass td", el),
    };
  }
  const coverage = {};
  for (const tr of document.querySelectorAll("#coverage tr[data-dataset]")) {
    coverage[tr.dataset.dataset] = Object.fromEntries(
      [...tr.querySelectorAll("td")].map(td => [td.className.slice(2), Number(td.textContent)]));
  }
  const marks = [...document.querySelectorAll("#map circle")].map(c => ({
    ticket: c.dataset.ticket, dataset: c.dataset.dataset, cls: c.getAttribute("class"),
    x: Number(c.getAttribute("cx")), y: Number(c.getAttribute("cy"))}));
  return {title: document.title, datasets: ds, coverage, marks,
          geocoder: text("#geocoder table"), injected: document.querySelectorAll("main img").length};
})()"""


def _need_chromium() -> None:
    if chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium")
        pytest.skip("chromium not installed (Debian package chromium)")


def _pixel_variety(png: bytes) -> tuple[int, float]:
    """Distinct colours, and the share of the commonest one."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 24) or []
    top = max(n for n, _ in colours)
    return len(colours), top / (img.width * img.height)


async def test_page_in_chromium_shows_block_skip_command_geocoder_and_map_then_the_skip(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]],
    bucket: Bucket,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _need_chromium()
    fake = fg.FakeGeocoder(places={"Kilimani": fg.KILIMANI, "Jogoo Rd": fg.JOGOO_KILIMANI}).start()
    try:
        monkeypatch.setenv("GEOCODER_API_KEY", fg.KEY)
        bucket.put(
            inc_key("2026-06-22T10-00-00.csv"),
            csv_file(
                row("T1", latitude=NAIROBI[0], longitude=NAIROBI[1]),  # the feed's point
                row("T2"),  # location Jogoo Rd: geocoded
                row("T3", location_name="SDUS KILIMANI_FDT2"),  # unknown place: cluster centroid
                row(HOSTILE_ID, latitude=MOMBASA[0], longitude=MOMBASA[1]),
            ),
        )
        # Not the feed: a column is missing from the header (line 1).
        bucket.put(BAD_KEY, csv_file(row("T9"), header=HEADER.replace('"owner",', "")))
        bucket.put("automations/crq/changes/2026-06-22T09-00-00.csv", csv_file(row("C1", source_type="crq")))
        geocoder = {"enabled": True, "base_url": fake.url, "rate_per_second": 20.0, "daily_budget": 100}
        d, _ = start_daemon(geocoder=geocoder)
        poll(lambda: d.metric("fleettickets_dataset_blocked", dataset="inc") == 1, what="inc blocked")

        poll(
            lambda: d.metric("fleettickets_geocode_requests_total", provider="locationiq", outcome="ok") == 2,
            what="Kilimani and Jogoo Rd geocoded",
        )
        assert await _blocked_line(db_url) == 1

        url = f"http://127.0.0.1:{d.port}/?refresh=1"
        async with open_page(tmp_path / "chromium") as tab:
            await tab.goto(url)

            async def settled() -> dict[str, Any] | None:
                seen: dict[str, Any] = await tab.eval(READ_PAGE)
                located = seen["coverage"].get("inc", {})
                # The page refreshes itself; wait for the geocoder's answers to reach it.
                return seen if located.get("location") == 1 and located.get("cluster") == 1 else None

            seen = await apoll(settled, timeout_s=30, what="geocoded points on the page")

            assert set(seen["datasets"]) == {"inc", "crq"}
            inc, crq = seen["datasets"]["inc"], seen["datasets"]["crq"]
            assert inc["state"] == "blocked" and crq["state"] == "ok"
            assert seen["title"].startswith("BLOCKED inc")
            assert inc["key"] == BAD_KEY
            assert "at line 1" in inc["blocked"]
            assert inc["reason"] == "header lacks column(s): owner"
            assert inc["skip"] == f'fleetticketsd skip --dataset inc {BAD_KEY} --reason "..."'
            assert inc["watermark"].startswith("2026-06-22T10-00-00.csv")
            assert inc["lastPass"].endswith("blocked at 2026-06-22T10-05-00.csv")
            assert crq["pending"] == "0" and crq["skip"] is None
            assert "geocode budget" in seen["geocoder"] and "98 of 100 requests left" in seen["geocoder"]
            assert "geocode unguarded" in seen["geocoder"] and "0 location(s)" in seen["geocoder"]
            assert seen["coverage"] == {
                "inc": {"feed": 2, "location": 1, "cluster": 1, "none": 0},
                "crq": {"feed": 0, "location": 1, "cluster": 0, "none": 0},
            }

            # One mark per located open ticket, the hostile id shown as text, not markup.
            marks = {m["ticket"]: m for m in seen["marks"]}
            assert sorted(marks) == sorted(["T1", "T2", "T3", HOSTILE_ID, "C1"])
            assert seen["injected"] == 0
            assert "src-feed" in marks["T1"]["cls"] and "src-location" in marks["T2"]["cls"]
            assert "src-cluster" in marks["T3"]["cls"] and "src-location" in marks["C1"]["cls"]
            # Scaled to the data's extent: the wrong-city point sits far from the Nairobi ones.
            far = marks[HOSTILE_ID]
            near = [marks[t] for t in ("T1", "T2", "T3")]
            assert all(abs(far["x"] - m["x"]) > 500 and abs(far["y"] - m["y"]) > 300 for m in near)

            # The colour switch: the same point by SLA state (T1 is days past its 48 h).
            fill = "getComputedStyle(document.querySelector('#map circle[data-ticket=T1]')).fill"
            assert await tab.eval(fill) == "rgb(26, 115, 232)"  # point source: feed
            await tab.eval("document.querySelector('input[value=by-sla]').click()")
            assert await tab.eval(fill) == "rgb(217, 48, 37)"  # SLA: breached

            png = await tab.screenshot()
            (tmp_path / "status-page.png").write_bytes(png)
            colours, commonest = _pixel_variety(png)
            assert colours > 50 and commonest < 0.9, (colours, commonest)

            # The skip, typed in a shell: the page open in the browser shows it unblocked.
            res = await asyncio.to_thread(
                run_cli, "--config", str(d.config_path), "skip", "--dataset", "inc", BAD_KEY,
                "--reason", "export fixed upstream", env=_env(),
            )  # fmt: skip
            assert res.returncode == 0, res.stderr

            async def unblocked() -> dict[str, Any] | None:
                seen = await tab.eval(READ_PAGE)
                return seen if seen["datasets"]["inc"]["state"] == "ok" else None

            after = await apoll(unblocked, timeout_s=30, what="inc unblocked on the open page")
            assert after["datasets"]["inc"]["skip"] is None and after["title"].startswith("ok")
            assert await _blocked_line(db_url) is None

            assert tab.console_errors() == []
            origin = f"http://127.0.0.1:{d.port}/"
            assert all(u.startswith(origin) for u in tab.requested_urls()), tab.requested_urls()
    finally:
        fake.stop()


def test_page_names_the_process_holding_the_lock_and_other_writers(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]],
    bucket: Bucket,
    db_url: str,
) -> None:
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1")))

    async def hold() -> tuple[asyncpg.Connection, int]:
        conn = await asyncpg.connect(db_url, server_settings={"application_name": "nightly-backfill"})
        await conn.execute("SELECT pg_advisory_lock($1, hashtext('inc'))", 0x464C54)
        # What `migrate --adopt` leaves, and what its trigger records of a loader still running.
        await conn.execute(
            "INSERT INTO tickets.adoption (legacy_migrations, watermarks, report, rollback_sql)"
            " VALUES ('{}', '{}', '{}', '')"
        )
        await conn.execute(
            "INSERT INTO tickets.foreign_writes (relation, application_name, role)"
            " VALUES ('tickets_legacy.inc', 'legacy-loader', 'loader')"
        )
        return conn, conn.get_server_pid()

    loop = asyncio.new_event_loop()
    try:
        conn, pid = loop.run_until_complete(hold())
        # The watcher lists hourly here: the page must not list the bucket itself.
        d, _ = start_daemon(daemon={"source_check_interval_s": 3600})
        poll(lambda: d.metric("fleettickets_poll_duration_seconds_count", dataset="crq"), what="crq pass")
        status, body = d.get("/")
        assert status == 200
        assert "never listed by a drain yet; the source watcher has not listed it yet" in body
        # Browsers reloading at once share one snapshot of the database.
        bodies = {d.get("/")[1] for _ in range(20)}
        assert len(bodies) == 1 and bodies == {body}
        lock = re.search(
            r'<tr id="lock"><th>drain lock</th><td>(.*?)</td>', body.split('data-dataset="inc"')[1]
        )
        assert lock and f"held by another process: pid {pid}, application nightly-backfill" in lock.group(1)
        assert 'id="other-writers"' in body
        assert "tickets_legacy.inc written 1 time(s) by legacy-loader as role loader" in body

        loop.run_until_complete(conn.close())  # the other process ends: the lock is free
        poll(
            lambda: "<td>free</td>" in d.get("/")[1].split('data-dataset="inc"')[1].split("</section>")[0],
            what="lock shown free",
        )
    finally:
        loop.close()


def test_render_escapes_every_value_from_the_data() -> None:
    evil = '<script>alert("x")</script>'
    snap = Snapshot(
        taken_at=datetime(2026, 6, 22, 7, 0, tzinfo=UTC),
        datasets=DatasetsReport(
            {
                "inc": {
                    "watermark": f"automations/inc/changes/{evil}",
                    "newest_key": evil,
                    "pending_files": 1,
                    "lag_seconds": 60.0,
                    "blocked": {"key": f"automations/inc/changes/{evil}.csv", "reason": evil},
                    "blocked_line": 7,
                    "last_applied_at": None,
                    "last_pass_at": None,
                    "last_pass_outcome": evil,
                }
            },
            {"inc": evil},
        ),
        geocoder=GeocoderStatus(True, "locationiq", 10, 1, 9),
        coverage={"inc": {"feed": 1}},
        points=[MapPoint("inc", evil, 36.8, -1.3, "feed", evil, None)],
        points_total=1,
        lock_holders={"inc": LockHolder(1, evil, None, evil, None, None, None)},
        draining_here=frozenset(),
        writers=[adopt.ForeignWrite(evil, evil, evil, 1, datetime(2026, 6, 22, tzinfo=UTC))],
    )
    html = page.render_main(snap, None, evil, f"database {evil}")
    assert "<script" not in html and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    # The command a person copies stays a valid shell command around an odd key.
    cmd = page.skip_command("inc", "automations/inc/changes/it's.csv")
    assert cmd == "fleetticketsd skip --dataset inc 'automations/inc/changes/it'\"'\"'s.csv' --reason \"...\""


def test_geocoder_box_flags_unguarded_locations() -> None:
    geo = GeocoderStatus(True, "locationiq", 10, 0, 9, None, 3, ("Karen", "Kitengela", "Ngong", "Ruaka"))
    snap = Snapshot(
        taken_at=datetime(2026, 6, 22, 7, 0, tzinfo=UTC),
        datasets=DatasetsReport({}),
        geocoder=geo,
        coverage={},
        points=[],
        points_total=0,
        lock_holders={},
        draining_here=frozenset(),
        writers=[],
    )
    html = page.render_main(snap, None, "config.toml", "")
    box = html.split('<section id="geocoder">')[1].split("</section>")[0]
    row = re.search(r'<tr id="geocode-unguarded"><th>geocode unguarded</th><td>(.*?)</td>', box)
    assert row, box
    assert row.group(1).startswith("3 location(s) placed without a cluster centroid")
    assert "Karen, Kitengela, Ngong and 1 more" in row.group(1)
    assert "gazetteer set CLUSTER LAT LON" in row.group(1)
    assert '<span class="badge warn">not checked</span>' in row.group(1)
    # None unguarded: the row says so, without the badge.
    calm = page.render_main(
        dataclasses.replace(snap, geocoder=dataclasses.replace(geo, unguarded=0)), None, "c", ""
    )
    assert "not checked" not in calm and 'id="geocode-unguarded"' in calm


async def _blocked_line(db_url: str) -> int | None:
    conn = await asyncpg.connect(db_url)
    try:
        line: int | None = await conn.fetchval(
            "SELECT blocked_line FROM tickets.import_meta WHERE dataset = 'inc'"
        )
        return line
    finally:
        await conn.close()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "RUSTFS_"))}

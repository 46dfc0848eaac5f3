"""`GET /`: the status page for the person on call.

One place that says, per dataset, what is wrong and what to type, plus the geocoder and
a map of the ticket points, so a point in the wrong city shows at a glance. Rendered
here from status.py's snapshot into ``page.html`` (string.Template: no template engine
for one page, and every value from the data goes through ``html.escape`` on its way in).

Browsers left open reload it every few seconds, so it must stay cheap: the bucket is
never listed for it (the source watcher's listing is used), and one snapshot of the
database serves every request for ``SNAPSHOT_TTL_S``, taken by one request at a time.
"""

from __future__ import annotations

import asyncio
import html
import math
import shlex
import socket
import statistics
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from string import Template
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from aiohttp import web

from fleetticketsd import __version__
from fleetticketsd.config import Config
from fleetticketsd.database import adopt
from fleetticketsd.ingest.drain import DB_ERRORS, Engine
from fleetticketsd.ingest.feed import file_name
from fleetticketsd.serving.status import GeocoderStatus, Listings, LockHolder, MapPoint, Snapshot, snapshot
from fleetticketsd.serving.terminal import ago, human_duration

log = structlog.get_logger("fleetticketsd.serving.page")

SNAPSHOT_TTL_S = 3.0
SNAPSHOT_TIMEOUT_S = 10.0
REFRESH_S = 10
MIN_REFRESH_S, MAX_REFRESH_S = 1, 3600
MAP_MAX_LABELS = 40
SOURCES = ("feed", "location", "cluster", "none")
SLA_STATES = ("ok", "at_risk", "breached")
# Rows a test or a script may want to find.
ROW_IDS = {
    "pending files": "pending",
    "watermark": "watermark",
    "last pass": "last-pass",
    "drain lock": "lock",
}

_TEMPLATE = Template(
    resources.files("fleetticketsd.serving").joinpath("page.html").read_text(encoding="utf-8")
)


def e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def skip_command(dataset: str, key: str) -> str:
    """The command that sets a blocking file aside, as a person would paste it."""
    return f'fleetticketsd skip --dataset {shlex.quote(dataset)} {shlex.quote(key)} --reason "..."'


# --- the handler ------------------------------------------------------------------------------


class StatusPage:
    """The page's state between requests: the last snapshot, rendered."""

    def __init__(
        self,
        engine: Callable[[], Engine | None],
        listings: Listings,
        draining: Callable[[], Collection[str]],
        not_connected: Callable[[], str],
        config_path: str,
    ) -> None:
        self._engine = engine
        self._listings = listings
        self._draining = draining
        self._not_connected = not_connected
        self._config_path = config_path
        self._lock = asyncio.Lock()
        self._main = ""
        self._title = "fleetticketsd"
        self._taken = 0.0
        self._taken_at = "-"
        self._last_good: Snapshot | None = None
        self._host = socket.gethostname()

    async def handle(self, request: web.Request) -> web.Response:
        try:
            refresh_s = min(MAX_REFRESH_S, max(MIN_REFRESH_S, int(request.query.get("refresh", REFRESH_S))))
        except ValueError:
            refresh_s = REFRESH_S
        main, title, taken_at = await self._current()
        body = _TEMPLATE.substitute(
            title=e(title),
            host=e(self._host),
            version=e(f"fleetticketsd {__version__}"),
            taken_at=e(taken_at),
            refresh_s=refresh_s,
            main=main,
        )
        resp = web.Response(text=body, content_type="text/html", headers={"Cache-Control": "no-store"})
        resp.enable_compression()
        return resp

    async def _current(self) -> tuple[str, str, str]:
        async with self._lock:  # one snapshot at a time, whatever the number of browsers
            if self._main and time.monotonic() - self._taken < SNAPSHOT_TTL_S:
                return self._main, self._title, self._taken_at
            engine = self._engine()
            problem: str | None = None
            if engine is None:
                problem = f"not connected to the database: {self._not_connected()}"
            else:
                try:
                    self._last_good = await asyncio.wait_for(
                        snapshot(engine, engine.config, self._listings, self._draining()),
                        SNAPSHOT_TIMEOUT_S,
                    )
                except DB_ERRORS as exc:
                    problem = f"the database did not answer: {type(exc).__name__}: {exc}".rstrip(": ")
                    log.warning("status page: snapshot failed", error=str(exc))
            snap = self._last_good
            config = engine.config if engine is not None else None
            self._main = render_main(snap, config, self._config_path, problem)
            self._title = page_title(snap, problem)
            self._taken_at = _clock(snap.taken_at, config) if snap else "-"
            self._taken = time.monotonic()
            return self._main, self._title, self._taken_at


# --- rendering -----------------------------------------------------------------------------------


def page_title(snap: Snapshot | None, problem: str | None) -> str:
    if snap is None:
        return "fleetticketsd: no data"
    blocked = [n for n, st in snap.datasets.datasets.items() if st.get("blocked")]
    if blocked:
        return f"BLOCKED {', '.join(blocked)} · fleetticketsd"
    if problem or snap.datasets.source_errors or snap.writers:
        return "attention · fleetticketsd"
    return "ok · fleetticketsd"


def render_main(snap: Snapshot | None, config: Config | None, config_path: str, problem: str | None) -> str:
    parts: list[str] = []
    if problem:
        shown = f" Showing the state as of {_clock(snap.taken_at, config)}." if snap else ""
        parts.append(f'<section class="alert bad" id="problem"><p>{e(problem)}.{e(shown)}</p></section>')
    if snap is not None:
        if snap.writers:
            warning = e(adopt.foreign_write_warning(snap.writers))
            parts.append(
                '<section class="alert bad" id="other-writers"><h2>Another program writes the tables taken '
                f"over from the legacy loader</h2><p>{warning}</p></section>"
            )
        for name, st in snap.datasets.datasets.items():
            parts.append(_dataset(snap, name, st, config, config_path))
        parts.append(_geocoder(snap.geocoder, snap.coverage))
        parts.append(_map(snap.points, snap.points_total))
        parts.append(
            f'<p class="muted wide" id="footer">Snapshot taken in {snap.took_s * 1000:.0f} ms, reused for '
            f"{SNAPSHOT_TTL_S:.0f} s; the bucket is listed by the source watcher, not for this page.</p>"
        )
    return "<main>\n" + "\n".join(parts) + "\n</main>"


def _clock(at: datetime, config: Config | None) -> str:
    tz = ZoneInfo(config.schedule.timezone) if config else None
    local = at.astimezone(tz) if tz else at
    return local.strftime("%Y-%m-%d %H:%M:%S %Z")


def _rows(rows: Iterable[tuple[str, str]], ids: dict[str, str] | None = None) -> str:
    """A two-column table; values are HTML already (escape before)."""
    ids = ids or {}
    out = []
    for label, value in rows:
        rid = f' id="{ids[label]}"' if label in ids else ""
        out.append(f"<tr{rid}><th>{e(label)}</th><td>{value}</td></tr>")
    return "<table>" + "".join(out) + "</table>"


def _dataset(snap: Snapshot, name: str, st: dict[str, Any], config: Config | None, config_path: str) -> str:
    blocked = st.get("blocked")
    source_error = snap.datasets.source_errors.get(name)
    if blocked:
        badge = '<span class="badge bad">BLOCKED</span>'
    elif source_error:
        badge = '<span class="badge warn">source as last seen</span>'
    elif st.get("pending_files"):
        badge = '<span class="badge warn">catching up</span>'
    else:
        badge = '<span class="badge">caught up</span>'
    wm = st.get("watermark")
    age = st.get("watermark_age_seconds")
    if source_error:
        checked = st.get("source_checked_at")
        when = f"as the last drain listed it, {ago(checked)}" if checked else "never listed by a drain yet"
        source = f"{e(when)}; {e(source_error)}"
    else:
        source = f"listed {e(ago(st.get('source_checked_at')))} by the source watcher"
    pending = st.get("pending_files")
    newest = st.get("newest_key")
    watermark = f"<code>{e(file_name(wm))}</code> ({e(human_duration(age))} old)" if wm else "none yet"
    rows = [
        ("watermark", watermark),
        ("newest in source", f"<code>{e(file_name(newest))}</code>" if newest else "-"),
        ("pending files", e("unknown" if pending is None else pending)),
        ("lag", e(human_duration(st.get("lag_seconds")))),
        ("last applied", e(ago(st.get("last_applied_at")))),
        ("last pass", f"{e(ago(st.get('last_pass_at')))}: {e(st.get('last_pass_outcome') or '-')}"),
        ("source", source),
        ("drain lock", _lock(name, snap.lock_holders.get(name), snap.draining_here)),
    ]
    body = _rows(rows, ROW_IDS)
    if blocked:
        line = st.get("blocked_line")
        reason = blocked["reason"]
        where = ""
        if line:
            where = f" at line {e(line)}"
            reason = reason.removeprefix(f"line {line}: ")  # feed.BadFile puts it there too
        body += (
            '<div class="blocked">'
            f'<p>Blocked at <code class="blocked-key">{e(blocked["key"])}</code>{where}:</p>'
            f'<p class="blocked-reason">{e(reason)}</p>'
            "<p>Every pass retries this file first: a fixed file uploaded under the same key "
            "unblocks the dataset by itself. To set this one aside (to <code>quarantine/</code>) "
            "and go on with the next file:</p>"
            f'<pre class="skip-command">{e(skip_command(name, blocked["key"]))}</pre>'
            f'<p class="muted">with the configuration this daemon reads ({e(config_path)}).</p>'
            "</div>"
        )
    state = "blocked" if blocked else "ok"
    return (
        f'<section class="dataset" data-dataset="{e(name)}" data-state="{state}">'
        f"<h2>{e(name)} {badge}</h2>{body}</section>"
    )


def _lock(name: str, holder: LockHolder | None, draining_here: Collection[str]) -> str:
    if name in draining_here:
        return "draining now (this daemon)"
    if holder is None:
        return "free"
    who = ", ".join(
        part
        for part in (
            f"pid {holder.pid}",
            holder.application_name and f"application {holder.application_name}",
            holder.role and f"role {holder.role}",
            holder.client_addr and f"from {holder.client_addr}",
            holder.xact_start and f"in a transaction since {ago(holder.xact_start.isoformat())}",
            holder.backend_start and f"connected {ago(holder.backend_start.isoformat())}",
        )
        if part
    )
    return f'<span class="lock-holder">held by another process: {e(who)}</span>'


def _geocoder(geo: GeocoderStatus, coverage: dict[str, dict[str, int]]) -> str:
    # GeocoderStatus.rows() is what `status` prints too: a figure added there shows here.
    rows = _rows(
        ((label, e(value) + _unguarded_badge(geo, label)) for label, value in geo.rows()),
        {"geocode unguarded": "geocode-unguarded"},
    )
    head = "".join(f"<th>{e(s)}</th>" for s in SOURCES)
    lines = "".join(
        f'<tr data-dataset="{e(name)}"><th>{e(name)}</th>'
        + "".join(f'<td class="n-{s}">{counts.get(s, 0)}</td>' for s in SOURCES)
        + "</tr>"
        for name, counts in coverage.items()
    )
    return (
        f'<section id="geocoder"><h2>Geocoder</h2>{rows}'
        '<p class="muted">Open tickets by where their point comes from (none: no point yet):</p>'
        f'<table class="counts" id="coverage"><tr><th>dataset</th>{head}</tr>{lines}</table></section>'
    )


def _unguarded_badge(geo: GeocoderStatus, label: str) -> str:
    # Answers nothing checked against the wrong-city guard: not an error, but not silent.
    if label == "geocode unguarded" and geo.unguarded:
        return ' <span class="badge warn">not checked</span>'
    return ""


@dataclass(frozen=True)
class _Frame:
    """Equirectangular projection of the points' extent into the SVG's units."""

    lon0: float
    lat1: float
    kx: float
    scale: float
    width: float
    height: float
    pad: float

    @classmethod
    def fit(cls, points: list[MapPoint], width: float = 1000.0, max_height: float = 700.0) -> _Frame:
        lons = [p.lon for p in points]
        lats = [p.lat for p in points]
        # A lone point (or a column of them) still gets ~2 km around it.
        lon0, lon1 = min(lons) - 0.01, max(lons) + 0.01
        lat0, lat1 = min(lats) - 0.01, max(lats) + 0.01
        kx = math.cos(math.radians((lat0 + lat1) / 2))
        pad = 20.0
        scale = min((width - 2 * pad) / ((lon1 - lon0) * kx), (max_height - 2 * pad) / (lat1 - lat0))
        return cls(lon0, lat1, kx, scale, width, (lat1 - lat0) * scale + 2 * pad, pad)

    def xy(self, lon: float, lat: float) -> tuple[float, float]:
        return self.pad + (lon - self.lon0) * self.kx * self.scale, self.pad + (self.lat1 - lat) * self.scale

    def km_per_unit(self) -> float:
        return 111.32 / self.scale


def _map(points: list[MapPoint], total: int) -> str:
    if not points:
        return '<section class="wide" id="map-section"><h2>Map</h2><p>No located open tickets.</p></section>'
    f = _Frame.fit(points)
    marks = []
    for p in points:
        x, y = f.xy(p.lon, p.lat)
        src = p.geo_source or "none"
        sla = p.sla_state or "none"
        tip = f"{p.dataset} {p.ticket_id} · {p.cluster or '-'} · point from {src}" + (
            f" · SLA {sla}" if p.sla_state else ""
        )
        marks.append(
            f'<circle class="pt src-{e(src)} sla-{e(sla)}" cx="{x:.1f}" cy="{y:.1f}" r="5" '
            f'data-ticket="{e(p.ticket_id)}" data-dataset="{e(p.dataset)}"><title>{e(tip)}</title></circle>'
        )
    # Each cluster's name at the median of its points: a point far from its label is in
    # the wrong place (the median, so that one stray point does not drag the label along).
    by_cluster: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        if p.cluster:
            by_cluster.setdefault(p.cluster, []).append(f.xy(p.lon, p.lat))
    biggest = sorted(by_cluster.items(), key=lambda kv: -len(kv[1]))[:MAP_MAX_LABELS]
    labels = "".join(
        f'<text class="cluster" x="{statistics.median(x for x, _ in xy) + 8:.1f}" '
        f'y="{statistics.median(y for _, y in xy) - 8:.1f}">{e(name)}</text>'
        for name, xy in biggest
    )
    # A scale bar of a round length near a fifth of the width.
    target_km = f.width / 5 * f.km_per_unit()
    step = 10 ** math.floor(math.log10(target_km))
    bar_km = max((m * step for m in (1, 2, 5) if m * step <= target_km), default=step)
    bar = bar_km / f.km_per_unit()
    by_src = Counter(p.geo_source or "none" for p in points)
    by_sla = Counter(p.sla_state for p in points if p.sla_state)
    legend = "".join(
        f'<span class="src"><i class="src-{s}"></i>{s} {by_src[s]}</span>' for s in SOURCES if by_src[s]
    ) + "".join(f'<span class="sla"><i class="sla-{s}"></i>{s} {by_sla[s]}</span>' for s in SLA_STATES)
    capped = f" (the first {len(points)} of {total} drawn)" if total > len(points) else ""
    y0 = f.height - 12
    return (
        '<section class="wide" id="map-section">'
        f"<h2>Map: {len(points)} located open ticket(s){e(capped)}</h2>"
        f'<div class="legend">{legend}</div>'
        f'<svg class="map" id="map" viewBox="0 0 {f.width:.0f} {f.height:.0f}" role="img" '
        f'aria-label="located open tickets">'
        + "".join(marks)
        + labels
        + f'<line x1="{f.pad}" y1="{y0}" x2="{f.pad + bar:.1f}" y2="{y0}" stroke="#3c4043" stroke-width="3"/>'
        f'<text x="{f.pad}" y="{y0 - 6}">{bar_km:g} km</text>'
        "</svg></section>"
    )

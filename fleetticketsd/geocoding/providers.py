"""Geocoding providers behind one small interface: build a request, read its answer.

LocationIQ, OpenCage and Nominatim differ in URL, key parameter and JSON shape, and
agree on little else; what the worker needs from any of them is one of a handful of
outcomes (FEED.md, "Geocoding providers"). Each provider turns a query into request
parameters and a 200 body into a point or "no match"; the HTTP statuses every one of
them uses (401/402/403/429/5xx) are read once, here, so the worker's policy — retry,
back off, stop for the day, stop for good — does not depend on the provider.

No I/O happens here: the worker owns the one ``httpx.AsyncClient`` and the limiter,
so tests can check the mapping without a network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpx

from fleetticketsd.config import GeocoderConfig

# ok / no_match: the provider answered; the answer is cached.
# rate_limited: too fast (429 per second/minute); retry after a pause.
# day_limit: the provider's daily quota is spent (429 "Rate Limited Day", 402).
# auth: the key is wrong or the account barred (401/403); asking again cannot help.
# error: 5xx, timeout, a body we cannot read; transient, retried later.
Outcome = Literal["ok", "no_match", "rate_limited", "day_limit", "auth", "error"]

# Statuses a provider uses for "your key is not accepted" — never retried.
AUTH_STATUSES = frozenset({401, 403})


@dataclass(frozen=True)
class Answer:
    outcome: Outcome
    lat: float | None = None
    lon: float | None = None
    display_name: str | None = None
    retry_after_s: float | None = None
    detail: str | None = None


class Provider:
    """One provider's dialect; subclasses fill in the URL, parameters and 200 shape."""

    name: str = ""
    needs_key: bool = True

    def __init__(self, config: GeocoderConfig) -> None:
        self.config = config

    def url(self) -> str:
        raise NotImplementedError

    def params(self, query: str) -> dict[str, str]:
        raise NotImplementedError

    def parse_ok(self, body: Any) -> Answer:
        raise NotImplementedError

    def no_match_status(self, response: httpx.Response, error: str) -> bool:
        """Whether a non-200 answer means "no such place" (cache it) in this dialect."""
        return False

    def interpret(self, response: httpx.Response) -> Answer:
        status = response.status_code
        error = _error_text(response)
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if status == 200:
            try:
                return self.parse_ok(response.json())
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                return Answer("error", detail=f"unreadable 200 answer: {exc}")
        if status in AUTH_STATUSES:
            return Answer("auth", detail=f"HTTP {status}: {error}")
        if status == 402:
            return Answer("day_limit", detail=f"HTTP 402: {error}")
        if status == 429:
            # LocationIQ says which window was exceeded; only the day one is final.
            if "day" in error.lower():
                return Answer("day_limit", detail=f"HTTP 429: {error}")
            return Answer("rate_limited", retry_after_s=retry_after, detail=f"HTTP 429: {error}")
        if self.no_match_status(response, error):
            return Answer("no_match", detail=error)
        return Answer("error", retry_after_s=retry_after, detail=f"HTTP {status}: {error}")


class LocationIQ(Provider):
    name = "locationiq"

    def url(self) -> str:
        return self.config.base_url.rstrip("/") + "/search"

    def params(self, query: str) -> dict[str, str]:
        p = {"q": query, "format": "json", "limit": "1", "countrycodes": self.config.country_codes}
        if self.config.api_key:
            p["key"] = self.config.api_key
        return p

    def parse_ok(self, body: Any) -> Answer:
        if not body:
            return Answer("no_match")
        first = body[0]
        return Answer(
            "ok", lat=float(first["lat"]), lon=float(first["lon"]), display_name=first.get("display_name")
        )

    def no_match_status(self, response: httpx.Response, error: str) -> bool:
        return response.status_code == 404 and "unable to geocode" in error.lower()


class Nominatim(LocationIQ):
    """LocationIQ's shape without a key; no match is a 200 with ``[]``."""

    name = "nominatim"
    needs_key = False

    def params(self, query: str) -> dict[str, str]:
        p = super().params(query)
        p.pop("key", None)
        return p


class OpenCage(Provider):
    name = "opencage"

    def url(self) -> str:
        return self.config.base_url.rstrip("/") + "/geocode/v1/json"

    def params(self, query: str) -> dict[str, str]:
        p = {
            "q": query,
            "limit": "1",
            "no_annotations": "1",
            "countrycode": self.config.country_codes,
        }
        if self.config.api_key:
            p["key"] = self.config.api_key
        return p

    def parse_ok(self, body: Any) -> Answer:
        results = body.get("results") or []
        if not results:
            return Answer("no_match")
        first = results[0]
        geometry = first["geometry"]
        return Answer(
            "ok", lat=float(geometry["lat"]), lon=float(geometry["lng"]), display_name=first.get("formatted")
        )


PROVIDERS: dict[str, type[Provider]] = {p.name: p for p in (LocationIQ, OpenCage, Nominatim)}


def make_provider(config: GeocoderConfig) -> Provider:
    return PROVIDERS[config.provider](config)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except (ValueError, json.JSONDecodeError):
        return response.text[:200]
    if isinstance(body, dict):
        # LocationIQ/Nominatim: {"error": "..."}; OpenCage: {"status": {"message": "..."}}
        if isinstance(body.get("error"), str):
            return str(body["error"])
        status = body.get("status")
        if isinstance(status, dict) and status.get("message"):
            return str(status["message"])
    return response.text[:200]

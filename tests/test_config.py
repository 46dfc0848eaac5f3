"""Configuration: parsing, environment overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleetticketsd.config import ConfigError, load, parse, redacted

REPO = Path(__file__).resolve().parent.parent


def minimal(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"datasets": {"inc": {"prefix": "automations/inc", "table": "tickets.inc"}}}
    data.update(extra)
    return data


def test_shipped_example_config_is_valid() -> None:
    cfg = load(REPO / "config.toml", env={})
    assert set(cfg.datasets) == {"inc", "crq"}
    assert cfg.dataset("inc").changes_prefix == "automations/inc/changes/"


def test_compose_config_is_valid() -> None:
    cfg = load(REPO / "deploy" / "config.compose.toml", env={"DATABASE_URL": "postgresql://u:p@postgres/db"})
    assert cfg.database.url == "postgresql://u:p@postgres/db"


def test_env_overrides_and_secrets() -> None:
    env = {
        "DATABASE_URL": "postgresql://app:pw@db/x",
        "RUSTFS_ENDPOINT_URL": "http://s3:9000",
        "RUSTFS_BUCKET": "b",
        "RUSTFS_REGION": "eu-1",
        "RUSTFS_ACCESS_KEY_ID": "AK",
        "RUSTFS_SECRET_ACCESS_KEY": "SK",
        "GEOCODER_API_KEY": "GK",
        "GEOCODER_BASE_URL": "http://geo",
    }
    cfg = parse(minimal(), env)
    assert cfg.s3.endpoint_url == "http://s3:9000" and cfg.s3.bucket == "b" and cfg.s3.region == "eu-1"
    assert (cfg.s3.access_key_id, cfg.s3.secret_access_key, cfg.geocoder.api_key) == ("AK", "SK", "GK")
    assert cfg.geocoder.base_url == "http://geo"
    shown = redacted(cfg)
    assert shown["database"]["url"] == "postgresql://app:***@db/x"
    assert shown["s3"]["secret_access_key"] == "***" and shown["geocoder"]["api_key"] == "***"
    assert "SK" not in repr(cfg) and "pw" not in str(shown)


def test_prefix_normalised_and_defaults() -> None:
    cfg = parse(minimal(), {})
    ds = cfg.dataset("inc")
    assert ds.prefix == "automations/inc/" and ds.on_bad_file == "halt" and ds.enabled
    assert cfg.cron_for(ds) == "*/20 6-20 * * *"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (minimal(server={"listen": "nonsense"}), "server.listen"),
        (minimal(schedule={"timezone": "Mars/Olympus"}), "schedule.timezone"),
        ({"datasets": {"inc": {"prefix": "a/"}}}, "datasets.inc.table"),
        ({"datasets": {"Inc-1": {"prefix": "a/", "table": "tickets.inc"}}}, "datasets.Inc-1"),
        ({"datasets": {"inc": {"prefix": "a/", "table": "inc"}}}, "datasets.inc.table"),
        ({"datasets": {"inc": {"prefix": "a/", "table": "Tickets.Inc"}}}, "datasets.inc.table"),
        (
            {
                "datasets": {
                    "a": {"prefix": "a/", "table": "tickets.inc"},
                    "b": {"prefix": "b/", "table": "tickets.inc"},
                }
            },
            "datasets.a.table",
        ),
        (minimal(geocoder={"rate_per_second": 0}), "geocoder.rate_per_second"),
        # 0 would switch the bound off: a stalled S3 body would hold its pass forever.
        (minimal(s3={"read_timeout_s": 0}), "s3.read_timeout_s"),
        (minimal(s3={"max_attempts": 0}), "s3.max_attempts"),
        (minimal(geocoder={"provider": "google"}), "geocoder.provider"),
        (minimal(daemon={"shutdown_grace_period_s": "30s"}), "daemon.shutdown_grace_period_s"),
        (
            minimal(datasets={"inc": {"prefix": "a/", "table": "tickets.inc", "post_apply": ["x()"]}}),
            "post_apply",
        ),
        (minimal(datasets={"inc": {"prefix": "a/", "table": "tickets.inc", "enabled": "yes"}}), "enabled"),
    ],
)
def test_errors_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(data, {})
    assert key in str(err.value)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[datasets.inc\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad, env={})


def test_six_field_cron_means_seconds() -> None:
    from fleetticketsd.config import cron_trigger

    trig = cron_trigger("*/5 * * * * *", "Africa/Nairobi")
    assert "second='*/5'" in str(trig)


@pytest.mark.parametrize(
    ("dow", "first_fire_day"),
    [("1-5", "Mon"), ("0", "Sun"), ("7", "Sun"), ("6", "Sat"), ("mon-fri", "Mon"), ("*", "Mon")],
)
def test_crontab_weekdays_mean_what_crontab_means(dow: str, first_fire_day: str) -> None:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from fleetticketsd.config import cron_trigger

    tz = ZoneInfo("Africa/Nairobi")
    sunday_noon = datetime(2026, 11, 22, 12, 0, tzinfo=tz)
    fire = cron_trigger(f"0 9 * * {dow}", "Africa/Nairobi").get_next_fire_time(None, sunday_noon)
    if first_fire_day == "Sun":
        assert fire.strftime("%a %d") == "Sun 29"
    else:
        assert fire.strftime("%a") == first_fire_day


def test_empty_endpoint_means_aws() -> None:
    assert parse(minimal(s3={"endpoint_url": ""}), {}).s3.endpoint_url is None

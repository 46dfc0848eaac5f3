"""Configuration: one TOML file, overridden by the environment, validated up front.

Everything the daemon needs is decided here, once, into frozen dataclasses that are
passed down explicitly; nothing else reads the environment. A typo must not silently
become a default, so unknown keys are errors, and every error names its key
(``datasets.inc.on_bad_file``) because that is what the operator has to fix.
Secrets (S3 keys, the geocoder key, a database password) come only from the
environment, so the file can be committed and printed.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

DEFAULT_CONFIG_PATH = "./config.toml"
CONFIG_ENV = "FLEETTICKETSD_CONFIG"

# A table is interpolated into SQL as an identifier, so it must be exactly this shape.
TABLE_RE = re.compile(r"^([a-z_][a-z0-9_]{0,62})\.([a-z_][a-z0-9_]{0,62})$")
DATASET_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
HOOK_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class ConfigError(Exception):
    """An invalid configuration; ``key`` is the dotted path the operator must fix."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = "postgresql://localhost/fleettickets"
    pool_min_size: int = 1
    pool_max_size: int = 4
    connect_timeout_s: float = 10.0
    # A statement that runs longer than this is a stuck database, not a slow file.
    statement_timeout_s: float = 600.0
    # Waiting for a pooled connection (all busy, or connecting): past this the pass fails.
    acquire_timeout_s: float = 30.0


@dataclass(frozen=True)
class S3Config:
    endpoint_url: str | None = "http://127.0.0.1:9000"
    bucket: str = "isptickets"
    region: str = "us-east-1"
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    # Attempts per S3 request, the first included (botocore's standard retry mode).
    max_attempts: int = 5
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    # The CA (PEM) that signed the endpoint's certificate; None: the system's store.
    ca_bundle: str | None = None
    # false turns certificate verification off (a test bench only): warned at every start.
    verify_tls: bool = True
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "0.0.0.0:9464"

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


@dataclass(frozen=True)
class ScheduleConfig:
    timezone: str = "Africa/Nairobi"
    cron: str = "*/20 6-20 * * *"


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    prefix: str
    table: str
    post_apply: tuple[str, ...] = ()
    on_bad_file: Literal["halt", "quarantine"] = "halt"
    cron: str | None = None
    enabled: bool = True

    @property
    def table_schema(self) -> str:
        return self.table.split(".", 1)[0]

    @property
    def table_name(self) -> str:
        return self.table.split(".", 1)[1]

    @property
    def changes_prefix(self) -> str:
        return f"{self.prefix}changes/"

    @property
    def processed_prefix(self) -> str:
        return f"{self.prefix}processed/"

    @property
    def quarantine_prefix(self) -> str:
        return f"{self.prefix}quarantine/"


@dataclass(frozen=True)
class GeocoderConfig:
    enabled: bool = False
    provider: Literal["locationiq", "opencage", "nominatim"] = "locationiq"
    base_url: str = "https://us1.locationiq.com/v1"
    rate_per_second: float = 1.0
    daily_budget: int = 5000
    max_distance_km: float = 25.0
    country_codes: str = "ke"
    timeout_s: float = 10.0
    # --- geocoding worker (issue 4); beyond the contract keys above ---
    # Added to every query for context; country_codes already restricts the search.
    country_name: str = "Kenya"
    # A place the provider does not know is not asked again for this long.
    no_match_retry_days: float = 30.0
    # A request that still fails (5xx, timeout) after a few tries waits this long.
    error_retry_s: float = 3600.0
    # Besides after every drain pass, the worker looks for work this often.
    refill_interval_s: float = 300.0
    # Nominatim's usage policy asks for an identifying User-Agent.
    user_agent: str = "fleetticketsd (FTTH ticket geocoder)"
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class IngestConfig:
    # The csv module's default field limit is 128 KiB; a location with a pasted note
    # can exceed it. Past this bound a record is treated as a broken file (most likely
    # an unterminated quote) instead of being buffered without end.
    max_record_bytes: int = 16 * 1024 * 1024
    # S3 read chunk.
    read_chunk_bytes: int = 1024 * 1024
    # Files fetched ahead of the one being applied, bounded in count and bytes; a
    # file larger than prefetch_bytes is streamed at its turn instead.
    prefetch_files: int = 16
    prefetch_bytes: int = 64 * 1024 * 1024
    # Archive moves (copy + delete: two round trips each) in flight behind the
    # applies; at 50 ms RTT, 16 keep up with ~150 small files a second.
    archive_concurrency: int = 16
    # Small files already fetched are applied in one transaction, each in its own
    # savepoint, committed together: a commit (WAL flush) cost more than the rest of
    # a 20-row file's apply. A batch commits at this many files, after this long, or
    # as soon as the next file's bytes are not there yet, so it never waits for data.
    commit_batch_files: int = 32
    commit_batch_s: float = 0.5


@dataclass(frozen=True)
class DaemonConfig:
    shutdown_grace_period_s: float = 30.0
    source_check_interval_s: float = 60.0
    # Cron fires that arrive while a slow pass still runs are coalesced into one; a
    # fire missed by less than this still runs.
    misfire_grace_time_s: float = 3600.0
    # A failed pass (database or bucket unreachable) is retried with exponential
    # backoff this many times before it waits for the next cron fire.
    pass_retry_attempts: int = 5
    pass_retry_max_wait_s: float = 60.0
    # When the source watcher sees a pending file, start that dataset's pass now
    # instead of at the next cron fire (which stays as the backstop).
    drain_on_arrival: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig = DatabaseConfig()
    s3: S3Config = S3Config()
    server: ServerConfig = ServerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    datasets: Mapping[str, DatasetConfig] = field(default_factory=dict)
    geocoder: GeocoderConfig = GeocoderConfig()
    ingest: IngestConfig = IngestConfig()
    daemon: DaemonConfig = DaemonConfig()
    logging: LoggingConfig = LoggingConfig()
    source_path: str | None = None

    def dataset(self, name: str) -> DatasetConfig:
        try:
            return self.datasets[name]
        except KeyError:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise ConfigError("datasets", f"unknown dataset {name!r} (configured: {known})") from None

    @property
    def enabled_datasets(self) -> list[DatasetConfig]:
        return [d for d in self.datasets.values() if d.enabled]

    def cron_for(self, dataset: DatasetConfig) -> str:
        return dataset.cron or self.schedule.cron


# --- loading -----------------------------------------------------------------------

# Environment variables that override file keys (section, key).
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "DATABASE_URL": ("database", "url"),
    "RUSTFS_ENDPOINT_URL": ("s3", "endpoint_url"),
    "RUSTFS_BUCKET": ("s3", "bucket"),
    "RUSTFS_REGION": ("s3", "region"),
    "RUSTFS_CA_BUNDLE": ("s3", "ca_bundle"),
    "GEOCODER_BASE_URL": ("geocoder", "base_url"),
}
# Secrets: only ever read from the environment.
ENV_SECRETS: dict[str, tuple[str, str]] = {
    "RUSTFS_ACCESS_KEY_ID": ("s3", "access_key_id"),
    "RUSTFS_SECRET_ACCESS_KEY": ("s3", "secret_access_key"),
    "GEOCODER_API_KEY": ("geocoder", "api_key"),
}
SECRET_FIELDS = {"access_key_id", "secret_access_key", "api_key"}
# Every secret variable may instead be given as <NAME>_FILE (Docker and Kubernetes
# secrets are files): the file's content, one trailing newline stripped, is the value.
FILE_SECRETS = ("DATABASE_URL", "RUSTFS_ACCESS_KEY_ID", "RUSTFS_SECRET_ACCESS_KEY", "GEOCODER_API_KEY")
# Honoured by every AWS SDK; ours (ca_bundle, RUSTFS_CA_BUNDLE) wins when both are set.
AWS_CA_BUNDLE_ENV = "AWS_CA_BUNDLE"

_SECTIONS: dict[str, type[Any]] = {
    "database": DatabaseConfig,
    "s3": S3Config,
    "server": ServerConfig,
    "schedule": ScheduleConfig,
    "geocoder": GeocoderConfig,
    "ingest": IngestConfig,
    "daemon": DaemonConfig,
    "logging": LoggingConfig,
}


def resolve_path(cli_path: str | None, env: Mapping[str, str]) -> str:
    return cli_path or env.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, override and validate; raise ConfigError naming the key on any problem."""
    env = os.environ if env is None else env
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", f"config file {p} not found (set --config or ${CONFIG_ENV})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read config file {p}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{p} is not valid TOML: {exc}") from None
    return parse(data, env, source_path=str(p))


def resolve_secret_files(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with each ``<NAME>_FILE`` of FILE_SECRETS read into ``NAME``.

    Errors name the variable and the path, never the content: a file holding the
    value in the wrong variable must not end up in a log."""
    out = dict(env)
    for name in FILE_SECRETS:
        file_var = f"{name}_FILE"
        path = env.get(file_var)
        if not path:
            continue
        if env.get(name):
            raise ConfigError(file_var, f"both {name} and {file_var} are set; set only one")
        try:
            value = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ConfigError(file_var, f"cannot read the file {path}: {reason}") from None
        value = value[:-1] if value.endswith("\n") else value
        value = value[:-1] if value.endswith("\r") else value
        if not value:
            raise ConfigError(file_var, f"the file {path} is empty")
        out[name] = value
    return out


def parse(data: Mapping[str, Any], env: Mapping[str, str], source_path: str | None = None) -> Config:
    env = resolve_secret_files(env)
    unknown = set(data) - set(_SECTIONS) - {"datasets"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(key, f"unknown section or key (known: {', '.join(sorted(_SECTIONS))}, datasets)")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        raw = dict(_table(data.get(name, {}), name))
        for secret in SECRET_FIELDS & set(raw):
            raise ConfigError(f"{name}.{secret}", "secrets are read only from the environment")
        if name == "database" and isinstance(raw.get("url"), str) and _url_has_password(raw["url"]):
            raise ConfigError("database.url", "holds a password; put it in DATABASE_URL or PGPASSWORD")
        for var, (section, key) in ENV_OVERRIDES.items():
            if section == name and env.get(var):
                raw[key] = env[var]
        for var, (section, key) in ENV_SECRETS.items():
            if section == name and env.get(var):
                raw[key] = env[var]
        if name == "s3" and not raw.get("ca_bundle") and env.get(AWS_CA_BUNDLE_ENV):
            raw["ca_bundle"] = env[AWS_CA_BUNDLE_ENV]
        sections[name] = _build(cls, raw, name)
    if sections["s3"].endpoint_url == "":
        # Empty means "no custom endpoint": plain AWS S3, endpoint from the region.
        sections["s3"] = replace(sections["s3"], endpoint_url=None)
    datasets = _parse_datasets(_table(data.get("datasets", {}), "datasets"))
    config = Config(**sections, datasets=datasets, source_path=source_path)
    _validate(config)
    return config


def _url_has_password(url: str) -> bool:
    parts = urlsplit(url)
    return parts.password is not None or any(
        unquote(p.partition("=")[0]).lower() == "password" for p in parts.query.split("&") if p
    )


def _table(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a table, got {type(value).__name__}")
    return value


def _build(cls: type[Any], raw: Mapping[str, Any], prefix: str, **extra: Any) -> Any:
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = dict(extra)
    for key, value in raw.items():
        dotted = f"{prefix}.{key}"
        if key not in known or key in extra:
            options = ", ".join(k for k in known if k not in SECRET_FIELDS and k not in extra)
            raise ConfigError(dotted, f"unknown key (known: {options})")
        values[key] = _coerce(value, known[key].type, dotted)
    return cls(**values)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check a TOML value against the dataclass field's annotation (a string here)."""
    ann = str(annotation)
    if ann.startswith("Literal["):
        options = [o.strip().strip("'\"") for o in ann[len("Literal[") : -1].split(",")]
        if value not in options:
            raise ConfigError(key, f"must be one of {', '.join(options)}; got {value!r}")
        return value
    if ann in ("str", "str | None"):
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {type(value).__name__}")
        return value
    if ann == "bool":
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if ann == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if ann == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if ann == "tuple[str, ...]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, "must be a list of strings")
        return tuple(value)
    raise AssertionError(f"no coercion for {ann} ({key})")


def _parse_datasets(raw: Mapping[str, Any]) -> dict[str, DatasetConfig]:
    out: dict[str, DatasetConfig] = {}
    for name, section in raw.items():
        key = f"datasets.{name}"
        if not DATASET_RE.match(name):
            raise ConfigError(key, "dataset names are lower-case letters, digits and _")
        section = dict(_table(section, key))
        for required in ("prefix", "table"):
            if required not in section:
                raise ConfigError(f"{key}.{required}", "is required")
        ds: DatasetConfig = _build(DatasetConfig, section, key, name=name)
        prefix = ds.prefix.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        ds = replace(ds, prefix=prefix)
        if not TABLE_RE.match(ds.table):
            raise ConfigError(f"{key}.table", f"{ds.table!r} is not a plain schema.name identifier")
        for hook in ds.post_apply:
            if not HOOK_RE.match(hook):
                raise ConfigError(f"{key}.post_apply", f"{hook!r} is not a plain function name")
        out[name] = ds
    return out


def _validate(config: Config) -> None:
    try:
        ZoneInfo(config.schedule.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError("schedule.timezone", f"unknown time zone {config.schedule.timezone!r}") from None
    _check_cron("schedule.cron", config.schedule.cron, config.schedule.timezone)
    for ds in config.datasets.values():
        if ds.cron is not None:
            _check_cron(f"datasets.{ds.name}.cron", ds.cron, config.schedule.timezone)
    tables = [d.table for d in config.datasets.values()]
    for ds in config.datasets.values():
        if tables.count(ds.table) > 1:
            raise ConfigError(f"datasets.{ds.name}.table", f"{ds.table} is used by more than one dataset")
    if config.s3.ca_bundle is not None:
        try:
            with open(config.s3.ca_bundle, "rb"):
                pass
        except OSError as exc:
            raise ConfigError("s3.ca_bundle", f"cannot read {config.s3.ca_bundle}: {exc.strerror}") from None
    url = urlsplit(config.database.url)
    if url.scheme not in ("postgresql", "postgres"):
        raise ConfigError("database.url", "must be a postgresql:// URL")
    if config.database.pool_min_size < 0 or config.database.pool_max_size < 2:
        # One connection holds the dataset lock while another serves probes and status.
        raise ConfigError("database.pool_max_size", "must be at least 2 (pool_min_size at least 0)")
    if config.database.pool_min_size > config.database.pool_max_size:
        raise ConfigError("database.pool_min_size", "must not exceed pool_max_size")
    host, _, port = config.server.listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("server.listen", f"must be HOST:PORT, got {config.server.listen!r}")
    for key, value in (
        ("database.connect_timeout_s", config.database.connect_timeout_s),
        ("database.statement_timeout_s", config.database.statement_timeout_s),
        ("database.acquire_timeout_s", config.database.acquire_timeout_s),
        # 0 would switch the bound off (aiohttp reads 0 as "no timeout"): a stalled
        # body would then hold its pass forever.
        ("s3.connect_timeout_s", config.s3.connect_timeout_s),
        ("s3.read_timeout_s", config.s3.read_timeout_s),
        ("s3.max_attempts", config.s3.max_attempts),
        ("geocoder.rate_per_second", config.geocoder.rate_per_second),
        ("geocoder.max_distance_km", config.geocoder.max_distance_km),
        ("geocoder.timeout_s", config.geocoder.timeout_s),
        ("geocoder.refill_interval_s", config.geocoder.refill_interval_s),
        ("daemon.shutdown_grace_period_s", config.daemon.shutdown_grace_period_s),
        ("daemon.source_check_interval_s", config.daemon.source_check_interval_s),
        ("ingest.max_record_bytes", config.ingest.max_record_bytes),
        ("daemon.pass_retry_attempts", config.daemon.pass_retry_attempts),
        ("ingest.read_chunk_bytes", config.ingest.read_chunk_bytes),
        ("ingest.prefetch_files", config.ingest.prefetch_files),
        ("ingest.prefetch_bytes", config.ingest.prefetch_bytes),
        ("ingest.archive_concurrency", config.ingest.archive_concurrency),
        ("ingest.commit_batch_files", config.ingest.commit_batch_files),
        ("ingest.commit_batch_s", config.ingest.commit_batch_s),
    ):
        if value <= 0:
            raise ConfigError(key, "must be greater than 0")
    if config.geocoder.daily_budget < 0:
        raise ConfigError("geocoder.daily_budget", "must not be negative")
    for key, value in (
        ("geocoder.no_match_retry_days", config.geocoder.no_match_retry_days),
        ("geocoder.error_retry_s", config.geocoder.error_retry_s),
    ):
        if value < 0:
            raise ConfigError(key, "must not be negative")


_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _crontab_weekdays(spec: str) -> str:
    """Translate a crontab day-of-week field (0 or 7 = Sunday) into day names.

    APScheduler 3 numbers weekdays from Monday = 0, so a crontab `1-5` handed to it
    unchanged would run Tuesday to Saturday. Names mean the same to both.
    """
    if not any(ch.isdigit() for ch in spec):
        return spec
    days: list[int] = []
    for part in spec.split(","):
        base, _, step = part.partition("/")
        if base == "*":
            lo, hi = 0, 6
        elif "-" in base:
            a, b = base.split("-", 1)
            lo, hi = int(a), int(b)
        else:
            lo = int(base)
            hi = 6 if step else lo
        if not (0 <= lo <= 7 and 0 <= hi <= 7 and lo <= hi):
            raise ValueError(f"day of week {part!r} is out of range 0-7")
        for n in range(lo, hi + 1, int(step) if step else 1):
            if n % 7 not in days:
                days.append(n % 7)
    return ",".join(_CRON_DAYS[d] for d in sorted(days))


def cron_trigger(expr: str, tz: str) -> CronTrigger:
    """Standard 5-field crontab; a 6th leading field, if given, is seconds.

    Seconds are for tests and demos that cannot wait a minute for a fire.
    """
    fields_ = expr.split()
    if len(fields_) not in (5, 6):
        raise ValueError(f"expected 5 fields (or 6 with seconds first), got {len(fields_)}")
    second = fields_.pop(0) if len(fields_) == 6 else "0"
    minute, hour, day, month, dow = fields_
    return CronTrigger(
        second=second,
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=_crontab_weekdays(dow),
        timezone=tz,
    )


def _check_cron(key: str, expr: str, tz: str) -> None:
    try:
        cron_trigger(expr, tz)
    except ValueError as exc:
        raise ConfigError(key, f"invalid cron expression {expr!r}: {exc}") from None


# --- printing ----------------------------------------------------------------------


# libpq URL parameters that carry a secret (the password, the client key's passphrase).
SECRET_URL_PARAMS = frozenset({"password", "sslpassword"})


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***: in the authority and in the query."""
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)
        user = (parts.username or "") + ":***"
        parts = parts._replace(netloc=f"{user}@{netloc[-1]}")
    if parts.query:
        params = [p.partition("=") for p in parts.query.split("&")]
        query = "&".join(
            f"{k}={'***' if unquote(k).lower() in SECRET_URL_PARAMS else v}" if eq else k
            for k, eq, v in params
        )
        parts = parts._replace(query=query)
    return urlunsplit(parts)


def redacted(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, secrets replaced by '***'."""

    def section(obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.name in SECRET_FIELDS:
                value = "***" if value else None
            elif f.name == "url":
                value = redact_url(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    result: dict[str, Any] = {name: section(getattr(config, name)) for name in _SECTIONS}
    result["datasets"] = {
        name: {k: v for k, v in section(ds).items() if k != "name"} for name, ds in config.datasets.items()
    }
    return result

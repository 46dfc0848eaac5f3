"""README command 1 (`make run`): see fleetticketsd do its whole job on a fresh machine.

A new user has Python and a PostgreSQL they can reach, but usually no bucket and no
Docker. Reading about a daemon that drains a bucket into PostGIS teaches little; watching
its counters move does. So this script does what an operator would do by hand, in order:

1. load the configuration exactly as the CLI does (``--config``, ``$FLEETTICKETSD_CONFIG``,
   ``./config.toml``; environment overrides);
2. create the database if it is missing and make sure PostGIS can be created in it,
   because a missing extension otherwise surfaces as an obscure migration error;
3. use the configured bucket if one answers, else start an *embedded demo S3* (moto's
   server on loopback), seed it with the project's feed generator and keep a feeder
   dropping fresh deltas, so lag and counters move while the user watches; with that
   demo bucket, unless ``GEOCODER_API_KEY`` is set, geocode against a *local fake
   provider* (``scripts/fake_geocoder.py`` on loopback: made-up points near the Kenyan
   cities, never real coordinates), so the geocoder's counters and the map move too;
4. run ``fleetticketsd migrate``, then ``fleetticketsd run``, and say where to look.

Everything it starts is a child process that it stops again: on Ctrl-C or SIGTERM the
daemon first (so its in-flight file finishes against a live bucket and provider), then
the fake geocoder, the feeder and moto. The demo configuration goes to ``.run/config.toml``
under the current directory so that the printed ``status`` command can be pasted into a
second terminal as is.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import getpass
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import unquote, urlsplit

try:
    import asyncpg
    import boto3
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, SSLError

    from fleetticketsd import feedgen
    from fleetticketsd.config import Config, ConfigError, S3Config, load, redact_url, resolve_path
    from fleetticketsd.ingest.s3errors import describe as describe_s3
except ImportError as exc:  # run outside the project's virtualenv
    sys.exit(f"run.py: {exc}. Start it with `make run`, which installs the project first.")

DEMO_DIR = Path(".run")  # relative on purpose: under the directory the user runs from
DEMO_CONFIG = DEMO_DIR / "config.toml"
FEED_INTERVAL_ENV = "FLEETTICKETSD_DEMO_FEED_INTERVAL_S"
DEFAULT_FEED_INTERVAL_S = 30.0
DEMO_CRON = "* * * * *"
DEMO_SOURCE_CHECK_S = 10.0
# Moto accepts any credentials, but botocore refuses to sign without some; fixed dummy
# values also make the printed status command work in a shell without AWS credentials.
DEMO_KEYS = {"RUSTFS_ACCESS_KEY_ID": "demo", "RUSTFS_SECRET_ACCESS_KEY": "demo"}
PROBE_TIMEOUT_S = 2.0
# The local fake geocoding provider of the demo: it accepts only this key, and allows
# the demo's rate per second (as LocationIQ's free plan does), answering 429 beyond it.
FAKE_GEOCODER = Path(__file__).resolve().parent / "fake_geocoder.py"
FAKE_GEOCODER_KEY = "local-fake-geocoder-key"
FAKE_GEOCODER_RATE = 2

# Seeded history: a baseline and a few deltas per dataset, ending now. Big enough for
# the drain to visibly take a moment, small enough to be applied within seconds.
SEED = 7
BASELINE_ROWS = {"inc": 3000, "crq": 1200}
SEED_DELTAS = 3
DELTA_ROWS = 20
DELTA_INTERVAL_S = 120.0
FOLLOWED_DATASET = "inc"

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


class SetupError(Exception):
    """Something the user has to fix; the message says what, no traceback."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def say(message: str = "") -> None:
    print(message, flush=True)


# --- signals --------------------------------------------------------------------------

STOP = threading.Event()
_signals_seen = 0


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    # Only record the request: raising here (KeyboardInterrupt) could cut the orderly
    # shutdown itself short. A second signal means "hurry": children get killed.
    global _signals_seen
    _signals_seen += 1
    if not STOP.is_set():
        say(f"\nrun.py: {signal.Signals(signum).name} received, stopping (again to force)")
    STOP.set()


def install_signal_handlers() -> None:
    # SIGHUP too: closing the terminal must not leave moto and the feeder behind.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def forced() -> bool:
    return _signals_seen > 1


# --- child processes ------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[Any]
    grace_s: float
    log: Path | None = None


class Children:
    """Every process this script started, stopped in reverse order of starting."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str],
        grace_s: float,
        log: Path | None = None,
        own_group: bool = False,
        capture: bool = False,
    ) -> Child:
        out: Any = None
        if log is not None:
            out = log.open("wb")  # one run per log: the last run is the one to read
        try:
            proc = subprocess.Popen(
                argv,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture else out,
                stderr=out,
                text=capture or None,
                start_new_session=False,
                # The terminal sends Ctrl-C to its whole foreground process group. The
                # bucket must outlive the daemon's graceful stop (its last file still
                # copies and deletes objects), so moto and the feeder get a group of
                # their own and are stopped by us, after the daemon. A closed terminal
                # (SIGHUP) reaches this script, which stops them the same way.
                process_group=0 if own_group else None,
            )
        finally:
            if out is not None:
                out.close()  # the child holds its own descriptor
        child = Child(name, proc, grace_s, log)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> int:
        proc = child.proc
        if proc.poll() is None:
            proc.terminate()
            deadline = time.monotonic() + child.grace_s
            while proc.poll() is None and time.monotonic() < deadline and not forced():
                time.sleep(0.1)
            if proc.poll() is None:
                say(f"run.py: {child.name} did not stop in time; killing it")
                proc.kill()
        return proc.wait()

    def stop_all(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                say(f"run.py: stopping {child.name} (pid {child.proc.pid})")
            self.stop(child)

    def kill_all(self) -> None:
        """Last resort from atexit: nothing may outlive this script."""
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(timeout=5)


def wait_for(child: Child) -> int | None:
    """The child's exit code, or None if a stop was requested first."""
    while not STOP.is_set():
        code = child.proc.poll()
        if code is not None:
            return code
        STOP.wait(0.2)
    return None


def tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in text)


def describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:  # a real-time signal has no name
        return f"killed by signal {-code}"


# --- database ---------------------------------------------------------------------------


def postgis_hint(server_major: int | None) -> str:
    major = server_major or 15
    return (
        "Install PostGIS for that server and run this again:\n"
        f"  Debian/Ubuntu:  sudo apt-get install postgresql-{major}-postgis-3\n"
        "  Fedora/RHEL:    the `postgis` package matching your PostgreSQL (e.g. postgis34_"
        f"{major} from the PGDG repo)\n"
        "  macOS:          brew install postgis\n"
        "  others:         the `postgis` package of your distribution, https://postgis.net/documentation/getting_started/"
    )


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=10)


async def _create_database(url: str, name: str) -> None:
    parts = urlsplit(url)
    errors: list[str] = []
    # CREATE DATABASE needs a connection to some other database; `postgres` exists on
    # every stock server, template1 on the rest.
    for maintenance in ("postgres", "template1"):
        try:
            conn = await _connect(parts._replace(path=f"/{maintenance}").geturl())
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            errors.append(f"{maintenance}: {exc}")
            continue
        try:
            await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
            return
        except asyncpg.DuplicateDatabaseError:
            return  # created by someone else meanwhile: just as good
        except asyncpg.InsufficientPrivilegeError as exc:
            user = parts.username or getpass.getuser()
            raise SetupError(
                f"database {name!r} does not exist and role {user!r} may not create it ({exc}).\n"
                f"Ask an administrator for `CREATE DATABASE {_quote_ident(name)} OWNER {_quote_ident(user)}`,"
                " or point DATABASE_URL at a database you own."
            ) from exc
        finally:
            await conn.close()
    raise SetupError(
        f"database {name!r} does not exist and no maintenance database was reachable to create it: "
        + "; ".join(errors)
    )


async def prepare_database(url: str) -> str:
    """Create the database and the PostGIS extension if missing; describe what was done."""
    parts = urlsplit(url)
    name = unquote(parts.path.lstrip("/")) or parts.username or getpass.getuser()
    shown = redact_url(url)
    created = False
    try:
        try:
            conn = await _connect(url)
        except asyncpg.InvalidCatalogNameError:
            await _create_database(url, name)
            created = True
            conn = await _connect(url)
    except (OSError, TimeoutError) as exc:
        raise SetupError(
            f"cannot reach PostgreSQL at {shown}: {exc or type(exc).__name__}.\n"
            "Start PostgreSQL, or set DATABASE_URL (or [database] url in the config) to one you can reach."
        ) from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise SetupError(f"cannot connect to PostgreSQL at {shown}: {exc}") from exc
    try:
        major = int(await conn.fetchval("SHOW server_version_num")) // 10000
        available = await conn.fetchval(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'postgis'"
        )
        if available is None:
            raise SetupError(
                f"the PostgreSQL {major} server at {shown} does not have PostGIS installed; "
                "fleetticketsd stores ticket locations as PostGIS geometry.\n" + postgis_hint(major)
            )
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
        except asyncpg.InsufficientPrivilegeError as exc:
            raise SetupError(
                f"cannot create the PostGIS extension in {name!r}: {exc}.\n"
                f"Ask a superuser to run `CREATE EXTENSION postgis;` in database {name!r}."
            ) from exc
        except asyncpg.PostgresError as exc:
            # Typically the control file is there but the library is for another version.
            raise SetupError(
                f"PostGIS is listed on {shown} but cannot be created: {exc}\n" + postgis_hint(major)
            ) from exc
        version = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'postgis'")
    finally:
        await conn.close()
    return f"{shown} ({'created now' if created else 'exists'}; PostgreSQL {major}, PostGIS {version})"


# --- bucket ------------------------------------------------------------------------------


def _tcp_reachable(url: str) -> bool:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def probe_bucket(s3: S3Config) -> tuple[bool, str]:
    """Whether an S3 endpoint answers for the configured bucket, and what it said."""
    where = f"s3://{s3.bucket} at {s3.endpoint_url or 'AWS S3'}"
    # A refused connection is the common fresh-machine case; deciding it with a bare
    # connect avoids botocore's credential lookup, which can itself take seconds.
    if s3.endpoint_url and not _tcp_reachable(s3.endpoint_url):
        return False, f"nothing answers at {s3.endpoint_url}"
    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name=s3.region,
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key,
        # As the daemon verifies (source.py): off, the configured CA, or the system's.
        verify=False if not s3.verify_tls else s3.ca_bundle,
        config=BotoConfig(
            connect_timeout=PROBE_TIMEOUT_S,
            read_timeout=PROBE_TIMEOUT_S,
            retries={"total_max_attempts": 1},
            s3={"addressing_style": s3.addressing_style},
        ),
    )
    try:
        client.head_bucket(Bucket=s3.bucket)
    except ClientError as exc:
        # The endpoint answered: it is the user's bucket server, just not happy yet.
        code = exc.response.get("Error", {}).get("Code", "?")
        return True, f"{where} answered head_bucket with {code}; the daemon will report it until fixed"
    except NoCredentialsError:
        reachable = s3.endpoint_url is not None
        return reachable, (
            f"{where}: no credentials; set RUSTFS_ACCESS_KEY_ID and RUSTFS_SECRET_ACCESS_KEY"
            if reachable
            else "no S3 endpoint configured and no AWS credentials found"
        )
    except SSLError as exc:
        # Something answers TLS there, with a certificate that does not verify: the
        # user's server, misconfigured; never a reason to fall back to the demo S3.
        return True, f"{where}: {describe_s3(exc)}; the daemon will report it until fixed"
    except BotoCoreError as exc:
        return False, f"{where}: {exc}"
    return True, f"{where} is reachable"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_listen_free(host: str, port: int) -> None:
    # Without this, a second `make run` would start moto and seed it only for the
    # daemon to die on a busy port with a less obvious message.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp does
        try:
            s.bind((host, port))
        except OSError as exc:
            raise SetupError(
                f"[server] listen {host}:{port} is not available ({exc.strerror}); is another "
                "fleetticketsd running? Stop it or change [server] listen in the config."
            ) from exc


def wait_http(url: str, alive: subprocess.Popen[Any], timeout_s: float) -> bool:
    """True once ``url`` answers with any HTTP status; False on timeout, death or stop."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not STOP.is_set() and alive.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            STOP.wait(0.2)
    return False


@dataclass
class FakeGeocoder:
    url: str
    child: Child


@dataclass
class Embedded:
    endpoint: str
    moto: Child
    feeder: Child
    seeded: dict[str, list[str]]
    feed_interval_s: float
    geocoder: FakeGeocoder | None = None  # None: GEOCODER_API_KEY is set, the user's [geocoder] holds


def feed_interval(env: Mapping[str, str]) -> float:
    raw = env.get(FEED_INTERVAL_ENV)
    if not raw:
        return DEFAULT_FEED_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise SetupError(f"{FEED_INTERVAL_ENV} must be a number of seconds > 0, got {raw!r}", EXIT_CONFIG)
    return value


def _relay_feeder(stream: IO[str], replayed: int, ready: threading.Event) -> None:
    seen = 0
    for line in stream:
        seen += 1
        if seen == replayed:
            ready.set()
        elif seen > replayed:
            say(f"feeder: new delta {line.strip()}")
    ready.set()  # EOF: the feeder is gone; the waiter looks at its exit code


def start_embedded(config: Config, children: Children, env: dict[str, str]) -> Embedded:
    # moto[server] is a test extra: `make run` installs it, a bare `pip install .` does not.
    missing = [m for m in ("moto", "flask", "werkzeug") if importlib.util.find_spec(m) is None]
    if missing:
        raise SetupError(
            f"the embedded demo S3 needs moto's server (missing: {', '.join(missing)}); install it with "
            f"`{shlex.quote(sys.executable)} -m pip install 'moto[server]'` or run `make run`."
        )
    interval = feed_interval(env)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = children.start(
        "embedded demo S3 (moto)",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        grace_s=10,
        log=DEMO_DIR / "moto.log",
        own_group=True,
    )
    if not wait_http(f"{endpoint}/", moto.proc, timeout_s=30):
        if STOP.is_set():
            raise SetupError("stopped while starting moto", EXIT_OK)
        raise SetupError(f"moto did not start on {endpoint}; its log ({moto.log}):\n{tail(moto.log)}")

    s3 = config.s3
    datasets = [ds for ds in config.enabled_datasets if ds.name in BASELINE_ROWS]
    skipped = [ds.name for ds in config.enabled_datasets if ds.name not in BASELINE_ROWS]
    if skipped:
        say(f"run.py: the feed generator knows only {', '.join(BASELINE_ROWS)}; not seeding {skipped}")
    # One start time for every seeded file and for the feeder, so that the feeder's
    # replay of the seeded files (see below) is byte-identical.
    start = feedgen.now_eat() - timedelta(seconds=DELTA_INTERVAL_S * SEED_DELTAS)
    specs = {
        ds.name: feedgen.FeedSpec(
            dataset=ds.name,
            seed=SEED,
            baseline_rows=BASELINE_ROWS[ds.name],
            deltas=SEED_DELTAS,
            delta_rows=DELTA_ROWS,
            start=start,
            delta_interval_s=DELTA_INTERVAL_S,
        )
        for ds in datasets
    }
    seeded: dict[str, list[str]] = {}
    for ds in datasets:
        try:
            seeded[ds.name] = feedgen.upload(
                specs[ds.name], endpoint_url=endpoint, bucket=s3.bucket, prefix=ds.prefix, region=s3.region
            )
        except (ClientError, BotoCoreError) as exc:
            raise SetupError(f"seeding {ds.name} into the embedded S3 failed: {exc}") from exc

    followed = next((ds for ds in datasets if ds.name == FOLLOWED_DATASET), None)
    if followed is None:
        raise SetupError(f"the demo feeder follows dataset {FOLLOWED_DATASET!r}, which is not configured")
    spec = specs[followed.name]
    # The feeder replays the seeded files before its first live delta; that is what lets
    # its live deltas close and update the seeded tickets instead of inventing a
    # disconnected feed. The replay is an identical overwrite (same bytes, same ETag).
    options = {
        "--dataset": followed.name,
        "--seed": str(spec.seed),
        "--baseline-rows": str(spec.baseline_rows),
        "--deltas": str(spec.deltas),
        "--delta-rows": str(spec.delta_rows),
        "--delta-interval": str(spec.delta_interval_s),
        "--start": spec.start.isoformat(),
        "--endpoint-url": endpoint,
        "--bucket": s3.bucket,
        "--prefix": followed.prefix,
        "--region": s3.region,
        "--follow": str(interval),
    }
    feeder = children.start(
        f"demo feeder ({followed.name})",
        [sys.executable, "-m", "fleetticketsd.feedgen", "upload", *(x for kv in options.items() for x in kv)],
        env={**env, "PYTHONUNBUFFERED": "1"},
        grace_s=5,
        log=DEMO_DIR / "feeder.log",
        own_group=True,
        capture=True,
    )
    replayed = threading.Event()
    assert feeder.proc.stdout is not None
    threading.Thread(
        target=_relay_feeder,
        args=(feeder.proc.stdout, len(seeded[followed.name]), replayed),
        name="feeder-relay",
        daemon=True,
    ).start()
    # The daemon must not start before the replay is done, or it could archive a seeded
    # file that the replay then puts back under changes/.
    deadline = time.monotonic() + 60
    while not replayed.wait(0.2):
        if STOP.is_set():
            raise SetupError("stopped while starting the feeder", EXIT_OK)
        if time.monotonic() > deadline:
            raise SetupError(f"the demo feeder did not replay its files in time:\n{tail(feeder.log)}")
    if feeder.proc.poll() is not None:
        raise SetupError(f"the demo feeder exited early:\n{tail(feeder.log)}")
    return Embedded(endpoint, moto, feeder, seeded, interval)


def start_fake_geocoder(children: Children, env: dict[str, str]) -> FakeGeocoder:
    """The local fake provider (LocationIQ's dialect) on a free loopback port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, str(FAKE_GEOCODER), "--port", str(port), "--key", FAKE_GEOCODER_KEY]
    child = children.start(
        "local fake geocoder",
        [*argv, "--per-second", str(FAKE_GEOCODER_RATE)],
        env=env,
        grace_s=5,
        log=DEMO_DIR / "fake_geocoder.log",
        own_group=True,  # like moto: it must outlive the daemon's graceful stop
    )
    if not wait_http(f"{url}/search", child.proc, timeout_s=30):
        if STOP.is_set():
            raise SetupError("stopped while starting the fake geocoder", EXIT_OK)
        raise SetupError(
            f"the fake geocoder did not start on {url}; its log ({child.log}):\n{tail(child.log)}"
        )
    return FakeGeocoder(url, child)


# --- demo configuration ----------------------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string literal is a valid TOML basic string (same escapes).
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(data: Mapping[str, Any], path: tuple[str, ...] = ()) -> str:
    """Enough TOML for our config files (tables, scalars, lists); no extra dependency."""
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, Mapping)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, Mapping)]
    out = ""
    if path and (scalars or not tables):
        out += "\n[" + ".".join(_toml_key(p) for p in path) + "]\n"
    out += "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in scalars)
    for key, table in tables:
        out += to_toml(table, (*path, key))
    return out


def write_demo_config(source: Path, config: Config, embedded: Embedded) -> None:
    """The user's config with the demo's bucket, a fast schedule and, unless a real key is
    set, the fake geocoder; written to .run/."""
    raw: dict[str, Any] = tomllib.loads(source.read_text(encoding="utf-8"))
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    if not urlsplit(config.database.url).password:
        # The effective URL (DATABASE_URL wins) goes into the file so that the printed
        # status command works in a shell that does not have DATABASE_URL set. A URL
        # with a password cannot be written to a file; the environment still carries it.
        data.setdefault("database", {})["url"] = config.database.url
    data.setdefault("s3", {}).update(
        endpoint_url=embedded.endpoint,
        bucket=config.s3.bucket,
        region=config.s3.region,
        addressing_style="path",
    )
    data.setdefault("schedule", {})["cron"] = DEMO_CRON
    datasets = {name: dict(ds) for name, ds in data.get("datasets", {}).items()}
    for ds in datasets.values():
        ds.pop("cron", None)  # a per-dataset schedule would defeat the demo's fast one
    data["datasets"] = datasets
    data.setdefault("daemon", {})["source_check_interval_s"] = DEMO_SOURCE_CHECK_S
    if embedded.geocoder is not None:
        data.setdefault("geocoder", {}).update(
            enabled=True,
            provider="locationiq",
            base_url=embedded.geocoder.url,
            rate_per_second=FAKE_GEOCODER_RATE,
        )
    header = (
        f"# Generated by scripts/run.py from {source} for the embedded demo S3; rewritten on\n"
        "# every run, so edit the source config instead.\n"
    )
    DEMO_CONFIG.write_text(header + to_toml(data), encoding="utf-8")


# --- main -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/run.py",
        description="Run fleetticketsd against the configured database, with an embedded "
        "demo S3 when no bucket is reachable.",
    )
    p.add_argument("--config", help="config file (default: $FLEETTICKETSD_CONFIG, else ./config.toml)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--no-embedded",
        action="store_true",
        help="always use the configured bucket, even if it does not answer",
    )
    mode.add_argument(
        "--embedded",
        action="store_true",
        help="always use the embedded demo S3, even if the configured endpoint answers",
    )
    return p


def public_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def cli_prefix() -> list[str]:
    # The exact command must work when pasted: the console script of this interpreter's
    # environment (.venv/bin/fleetticketsd under `make run`), which need not be on PATH.
    script = Path(sys.executable).parent / "fleetticketsd"
    if not script.exists():
        return [sys.executable, "-m", "fleetticketsd"]
    rel = os.path.relpath(script)
    return [rel if not rel.startswith("..") else str(script)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    install_signal_handlers()
    children = Children()
    atexit.register(children.kill_all)
    try:
        return run(args, children)
    except SetupError as exc:
        if exc.code != EXIT_OK:
            print(f"run.py: {exc}", file=sys.stderr, flush=True)
        return exc.code
    finally:
        children.stop_all()


def run(args: argparse.Namespace, children: Children) -> int:
    path = resolve_path(args.config, os.environ)
    try:
        config = load(path)
    except ConfigError as exc:
        raise SetupError(f"configuration error: {exc}", EXIT_CONFIG) from exc
    say(f"run.py: config {path}")
    check_listen_free(config.server.host, config.server.port)

    say("run.py: preparing the database …")
    database = asyncio.run(prepare_database(config.database.url))
    say(f"run.py: database {database}")
    if STOP.is_set():
        return EXIT_OK

    env = dict(os.environ)
    embedded: Embedded | None = None
    if args.embedded:
        use_embedded, why = True, "--embedded given"
    elif os.environ.get("RUSTFS_ENDPOINT_URL") or args.no_embedded:
        use_embedded = False
        source = "RUSTFS_ENDPOINT_URL is set" if not args.no_embedded else "--no-embedded given"
        reachable, detail = probe_bucket(config.s3)
        why = source + ("" if reachable else f"; WARNING: {detail} — the daemon will keep retrying")
    else:
        reachable, detail = probe_bucket(config.s3)
        use_embedded, why = not reachable, detail
    if use_embedded:
        say(f"run.py: mode: embedded demo S3 (moto), seeded with synthetic data ({why})")
        DEMO_DIR.mkdir(exist_ok=True)
        env.update(DEMO_KEYS)
        # feedgen, in this process, reads its credentials from the environment too.
        os.environ.update(DEMO_KEYS)
        embedded = start_embedded(config, children, env)
        env.update(RUSTFS_ENDPOINT_URL=embedded.endpoint, RUSTFS_BUCKET=config.s3.bucket)
        if not os.environ.get("GEOCODER_API_KEY"):
            embedded.geocoder = start_fake_geocoder(children, env)
            # GEOCODER_BASE_URL would override the config's base_url: it must not send
            # the fake's key to a real provider.
            env.update(GEOCODER_API_KEY=FAKE_GEOCODER_KEY, GEOCODER_BASE_URL=embedded.geocoder.url)
        write_demo_config(Path(path), config, embedded)
        config_path = str(DEMO_CONFIG)
        try:
            config = load(config_path, env)
        except ConfigError as exc:  # a bug here, not the user's: say so plainly
            raise SetupError(f"the generated {config_path} is invalid: {exc}") from exc
    else:
        say(f"run.py: mode: configured bucket s3://{config.s3.bucket} at {config.s3.endpoint_url} ({why})")
        config_path = path

    cli = [sys.executable, "-m", "fleetticketsd", "--config", config_path]
    migrate = children.start("fleetticketsd migrate", [*cli, "migrate"], env=env, grace_s=30)
    code = wait_for(migrate)
    if code is None:
        return EXIT_OK
    if code != 0:
        raise SetupError(f"`fleetticketsd migrate` failed ({describe_exit(code)})")

    daemon = children.start(
        "fleetticketsd run",
        [*cli, "run"],
        env=env,
        grace_s=config.daemon.shutdown_grace_period_s + 15,
    )
    base = f"http://{public_host(config.server.host)}:{config.server.port}"
    wait_http(f"{base}/healthz", daemon.proc, timeout_s=30)
    if daemon.proc.poll() is None and not STOP.is_set():
        banner(config, config_path, base, database, embedded)
    return supervise(children, daemon, embedded)


def banner(config: Config, config_path: str, base: str, database: str, embedded: Embedded | None) -> None:
    status = [*cli_prefix(), "--config", config_path, "status"]
    if embedded is not None:
        status = [f"{k}={v}" for k, v in DEMO_KEYS.items()] + status
    status_cmd = shlex.join(status)
    lines = ["", "=" * 78, "fleetticketsd is running", ""]
    lines.append(f"  config     {config_path}")
    lines.append(f"  database   {database}")
    if embedded is not None:
        lines.append(
            f"  bucket     embedded demo S3 (moto), seeded with synthetic data: s3://{config.s3.bucket}"
        )
        lines.append(f"             at {embedded.endpoint} (log: {DEMO_DIR / 'moto.log'})")
        for name, keys in embedded.seeded.items():
            lines.append(f"             {name}: {len(keys)} seeded files, newest {keys[-1]}")
        lines.append(
            f"             a feeder drops a new {FOLLOWED_DATASET} delta every {embedded.feed_interval_s:g} s"
        )
        lines.append(
            f"  schedule   drains every minute ({DEMO_CRON}), source checked every {DEMO_SOURCE_CHECK_S:g} s"
        )
        geo = config.geocoder
        if embedded.geocoder is not None:
            fake = embedded.geocoder
            lines.append("  geocoding  LOCAL FAKE provider (not real coordinates): made-up points near the")
            lines.append(f"             tickets' Kenyan cities, from {fake.url} at {geo.rate_per_second:g}/s")
            lines.append(f"             (log: {fake.child.log}); set GEOCODER_API_KEY for your provider")
        else:
            lines.append(
                f"  geocoding  {'on' if geo.enabled else 'off'}: your [geocoder] config unchanged "
                f"(GEOCODER_API_KEY is set), {geo.provider} at {geo.base_url}"
            )
    else:
        lines.append(f"  bucket     s3://{config.s3.bucket} at {config.s3.endpoint_url} (configured)")
        lines.append(f"  schedule   {config.schedule.cron} ({config.schedule.timezone})")
        lines.append(
            f"  geocoding  {'on' if config.geocoder.enabled else 'off'} (geocoder.enabled in {config_path})"
        )
    lines += [
        "",
        f"  metrics    {base}/metrics",
        f"  readiness  {base}/readyz",
        "  status     in another terminal, from this directory:",
        f"             {status_cmd}",
    ]
    if urlsplit(config.database.url).password:
        lines.append("             (with the same DATABASE_URL as this shell)")
    lines += ["", "  Ctrl-C stops everything this started.", "=" * 78, ""]
    say("\n".join(lines))


def supervise(children: Children, daemon: Child, embedded: Embedded | None) -> int:
    """Run until a stop is requested or something dies; return the exit code."""
    helpers = [embedded.moto, embedded.feeder] if embedded is not None else []
    if embedded is not None and embedded.geocoder is not None:
        helpers.append(embedded.geocoder.child)
    while not STOP.is_set():
        code = daemon.proc.poll()
        if code is not None:
            say(f"run.py: fleetticketsd run exited ({describe_exit(code)}); stopping the rest")
            return code if code >= 0 else 128 - code
        for helper in helpers:
            code = helper.proc.poll()
            if code is not None:
                say(f"run.py: {helper.name} exited ({describe_exit(code)}); stopping the rest")
                if helper.log is not None:
                    say(tail(helper.log))
                return EXIT_FAIL
        STOP.wait(0.5)
    # Stop requested: the daemon first, while the bucket it talks to is still up.
    code = children.stop(daemon)
    if code != 0:
        say(f"run.py: note: fleetticketsd run ended with {describe_exit(code)}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""S3 over HTTPS with a certificate from a private CA the test makes (CONTRACT.md
"TLS, secrets, roles"): verified against `[s3] ca_bundle`, refused with one clear
line naming the endpoint when the CA is unknown, and `verify_tls = false` warned."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import NEVER, Bucket, csv_file, inc_key, poll, row, run_cli
from .tlsutil import CA, TLSFront, make_ca, tls_front


@pytest.fixture(scope="session")
def s3_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[CA, Path, Path]:
    ca = make_ca(tmp_path_factory.mktemp("s3-ca"))
    cert, key = ca.issue("s3")
    return ca, cert, key


@pytest.fixture(scope="session")
def unknown_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return make_ca(tmp_path_factory.mktemp("other-ca"), "other")


@pytest.fixture
def https(s3_ca: tuple[CA, Path, Path], bucket: Bucket) -> Iterator[TLSFront]:
    _, cert, key = s3_ca
    with tls_front(cert, key, bucket.endpoint) as front:
        yield front


def _seed(bucket: Bucket) -> None:
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1"), row("T2")))


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


def test_verified_against_the_configured_ca(
    cli_env: Callable[..., dict[str, str]], bucket: Bucket, https: TLSFront, s3_ca: tuple[CA, Path, Path]
) -> None:
    _seed(bucket)
    env = cli_env(s3={"endpoint_url": https.url, "ca_bundle": str(s3_ca[0].cert)})
    res = run_cli("drain", "--dataset", "inc", env=env)
    assert res.returncode == 0, res.stderr
    assert "inc: 1 file(s), 2 row(s) upserted" in res.stdout
    assert bucket.keys("automations/inc/processed/") == ["automations/inc/processed/2026-06-22T10-00-00.csv"]
    assert "verify_tls" not in res.stderr


def test_rustfs_ca_bundle_and_aws_ca_bundle_from_the_environment(
    cli_env: Callable[..., dict[str, str]],
    bucket: Bucket,
    https: TLSFront,
    s3_ca: tuple[CA, Path, Path],
    unknown_ca: CA,
) -> None:
    _seed(bucket)
    env = cli_env(s3={"endpoint_url": https.url})
    assert run_cli("status", "--json", env={**env, "AWS_CA_BUNDLE": str(s3_ca[0].cert)}).returncode == 0
    # RUSTFS_CA_BUNDLE wins over AWS_CA_BUNDLE: the right CA there, a wrong one in AWS's.
    both = {**env, "RUSTFS_CA_BUNDLE": str(s3_ca[0].cert), "AWS_CA_BUNDLE": str(unknown_ca.cert)}
    res = run_cli("drain", "--dataset", "inc", env=both)
    assert res.returncode == 0, res.stderr
    wrong = {**env, "RUSTFS_CA_BUNDLE": str(unknown_ca.cert), "AWS_CA_BUNDLE": str(s3_ca[0].cert)}
    assert run_cli("drain", "--dataset", "inc", env=wrong).returncode == 1


def test_unknown_ca_is_one_clear_error_naming_the_endpoint(
    cli_env: Callable[..., dict[str, str]], bucket: Bucket, https: TLSFront, unknown_ca: CA
) -> None:
    _seed(bucket)
    env = cli_env(s3={"endpoint_url": https.url, "ca_bundle": str(unknown_ca.cert)})
    drain = run_cli("drain", env=env)
    assert drain.returncode == 1
    lines = drain.stderr.strip().splitlines()
    assert len(lines) == 1, drain.stderr
    assert f"the TLS certificate of {https.url} does not verify" in lines[0]
    assert "ca_bundle" in lines[0]
    assert bucket.keys("automations/inc/processed/") == []

    status = run_cli("status", env=env)
    assert status.returncode == 0  # CONTRACT: status exits 0 and says what the database knows
    assert f"the TLS certificate of {https.url} does not verify" in status.stderr
    assert len(status.stderr.strip().splitlines()) == 1, status.stderr

    check = run_cli("check-config", env=env)
    assert check.returncode == 2
    assert f"the TLS certificate of {https.url} does not verify" in check.stderr
    for res in (drain, status, check):
        _no_traceback(res.stderr)


def test_daemon_logs_the_certificate_failure_once_per_pass_without_retrying(
    start_daemon: Callable[..., tuple[object, dict[str, object]]],
    bucket: Bucket,
    https: TLSFront,
    unknown_ca: CA,
) -> None:
    _seed(bucket)
    d, _ = start_daemon(
        s3={"endpoint_url": https.url, "ca_bundle": str(unknown_ca.cert)}, schedule={"cron": NEVER}
    )
    failed = poll(
        lambda: [e for e in d.logs() if "does not verify" in str(e.get("error", ""))],  # type: ignore[attr-defined]
        what="the certificate failure in the daemon's log",
    )
    assert https.url in failed[0]["error"]
    logs = d.logs()  # type: ignore[attr-defined]
    assert not [e for e in logs if e.get("event") == "S3 request retried"], "a bad certificate is not retried"
    assert not [e for e in logs if "Traceback" in str(e)]


def test_verify_tls_false_works_and_warns_at_every_start(
    cli_env: Callable[..., dict[str, str]],
    start_daemon: Callable[..., tuple[object, dict[str, object]]],
    bucket: Bucket,
    https: TLSFront,
) -> None:
    _seed(bucket)
    env = cli_env(s3={"endpoint_url": https.url, "verify_tls": False})
    res = run_cli("drain", "--dataset", "inc", env=env)
    assert res.returncode == 0, res.stderr
    assert "verify_tls = false" in res.stderr
    assert bucket.keys("automations/inc/processed/") != []

    d, _ = start_daemon(s3={"endpoint_url": https.url, "verify_tls": False})
    warned = poll(lambda: [e for e in d.logs() if "verify_tls = false" in str(e.get("event"))])  # type: ignore[attr-defined]
    assert warned[0]["level"] == "warning"


def test_ca_bundle_that_cannot_be_read_is_a_config_error(
    cli_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = cli_env(s3={"ca_bundle": str(tmp_path / "nope.pem")})
    res = run_cli("check-config", env=env)
    assert res.returncode == 2
    assert "s3.ca_bundle: cannot read" in res.stderr


def test_make_run_keeps_a_bucket_whose_certificate_does_not_verify(
    bucket: Bucket, https: TLSFront, unknown_ca: CA
) -> None:
    """`make run` falls back to its demo S3 only when nothing answers: a TLS server with
    a certificate that does not verify is the user's, to be reported, not replaced."""
    import importlib.util
    import sys

    from fleetticketsd.config import S3Config

    from .conftest import REPO

    spec = importlib.util.spec_from_file_location("fleet_run_script", REPO / "scripts" / "run.py")
    assert spec is not None and spec.loader is not None
    run_script = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fleet_run_script", run_script)
    spec.loader.exec_module(run_script)
    config = S3Config(endpoint_url=https.url, bucket=bucket.name, ca_bundle=str(unknown_ca.cert))
    reachable, said = run_script.probe_bucket(config)
    assert reachable, said
    assert "does not verify" in said

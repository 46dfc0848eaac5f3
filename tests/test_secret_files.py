"""`<NAME>_FILE` for every secret variable (CONTRACT.md "TLS, secrets, roles"): the file's
content, one trailing newline stripped, is the value; both set, or a file that cannot
be read, is a configuration error naming the variable and never the value."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fleetticketsd.config import FILE_SECRETS, ConfigError, parse

from .conftest import Bucket, csv_file, inc_key, row, run_cli

SECRET = "v3ry-s3cret-value"


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_each_secret_read_from_its_file_one_newline_stripped(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL_FILE": _write(tmp_path / "db", f"postgresql://u:{SECRET}@db.example/x\n"),
        "RUSTFS_ACCESS_KEY_ID_FILE": _write(tmp_path / "ak", "AKID\n"),
        "RUSTFS_SECRET_ACCESS_KEY_FILE": _write(tmp_path / "sk", f"{SECRET}\n\n"),  # only one stripped
        "GEOCODER_API_KEY_FILE": _write(tmp_path / "gk", "geo-key"),  # no newline: taken as is
    }
    config = parse({}, env)
    assert config.database.url == f"postgresql://u:{SECRET}@db.example/x"
    assert config.s3.access_key_id == "AKID"
    assert config.s3.secret_access_key == f"{SECRET}\n"
    assert config.geocoder.api_key == "geo-key"
    assert set(FILE_SECRETS) == {
        "DATABASE_URL",
        "RUSTFS_ACCESS_KEY_ID",
        "RUSTFS_SECRET_ACCESS_KEY",
        "GEOCODER_API_KEY",
    }


@pytest.mark.parametrize("name", FILE_SECRETS)
def test_both_set_names_the_variable_not_the_value(tmp_path: Path, name: str) -> None:
    env = {name: SECRET, f"{name}_FILE": _write(tmp_path / "s", SECRET + "-other\n")}
    with pytest.raises(ConfigError) as err:
        parse({}, env)
    assert err.value.key == f"{name}_FILE"
    assert name in str(err.value) and SECRET not in str(err.value)


def test_missing_or_unreadable_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse({}, {"RUSTFS_SECRET_ACCESS_KEY_FILE": str(tmp_path / "absent")})
    assert err.value.key == "RUSTFS_SECRET_ACCESS_KEY_FILE"
    assert "cannot read" in str(err.value) and "No such file" in str(err.value)
    directory = tmp_path / "a-directory"
    directory.mkdir()
    with pytest.raises(ConfigError) as err:
        parse({}, {"GEOCODER_API_KEY_FILE": str(directory)})
    assert err.value.key == "GEOCODER_API_KEY_FILE"


def test_commands_work_from_files_and_never_print_the_value(
    cli_env: Callable[..., dict[str, str]], bucket: Bucket, db_url: str, tmp_path: Path
) -> None:
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1")))
    # A password trust auth ignores, so the URL carries one that must not be printed.
    with_password = db_url.replace("postgres@", f"postgres:{SECRET}@")
    env = {
        **cli_env(),
        "DATABASE_URL_FILE": _write(tmp_path / "db", with_password + "\n"),
        "RUSTFS_ACCESS_KEY_ID_FILE": _write(tmp_path / "ak", "testing\n"),
        "RUSTFS_SECRET_ACCESS_KEY_FILE": _write(tmp_path / "sk", SECRET + "\n"),
    }
    outputs = []
    for args in (("drain", "--dataset", "inc"), ("status",), ("check-config",)):
        res = run_cli(*args, env=env)
        assert res.returncode == 0, (args, res.stderr)
        outputs.append(res.stdout + res.stderr)
    assert "1 file(s), 1 row(s) upserted" in outputs[0]
    assert '"secret_access_key": "***"' in outputs[2] and "postgres:***@" in outputs[2]

    both = run_cli("check-config", env={**env, "RUSTFS_SECRET_ACCESS_KEY": SECRET})
    missing = run_cli("drain", env={**env, "DATABASE_URL_FILE": str(tmp_path / "gone")})
    assert both.returncode == missing.returncode == 2
    assert "RUSTFS_SECRET_ACCESS_KEY_FILE: both RUSTFS_SECRET_ACCESS_KEY and" in both.stderr
    assert "DATABASE_URL_FILE: cannot read the file" in missing.stderr
    outputs += [both.stdout + both.stderr, missing.stdout + missing.stderr]
    for text in outputs:
        assert SECRET not in text
        assert "Traceback" not in text

"""What an S3 failure means: one line an operator can act on, whether retrying helps,
and botocore's retries taught to wait as long as the server asks.

botocore's "standard" retry mode (1.40) retries a request on HTTP 500/502/503/504, on
the throttling codes (SlowDown among them), on RequestTimeout, and on connection
errors and read timeouts (refused, reset, no answer within ``read_timeout_s``, a
name that does not resolve), with a jittered backoff of rand(0, 1) * 2^attempt s,
at most 20 s, and a retry quota (500 tokens per client, 5 per retry and 10 per
timeout, refilled by successes). It never retries a 4xx such as a refused key. It
ignores ``Retry-After``: a server that says "come back in 5 s" gets asked again at
once, and again; so the backoff here is botocore's, or the server's Retry-After
when that is longer, up to botocore's own 20 s ceiling.

A body that stalls after its headers is not botocore's to retry (the body is read
after the call returned): it surfaces when it is read, and the caller decides.
"""

from __future__ import annotations

import email.utils
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog
from aiobotocore.retries.standard import AioRetryHandler, AioRetryPolicy, AioStandardRetryConditions
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
    SSLError,
)
from botocore.retries.quota import RetryQuota
from botocore.retries.standard import ExponentialBackoff, RetryEventAdapter, RetryQuotaChecker

log = structlog.get_logger("fleetticketsd.ingest.source")

# 403 codes that mean the key itself is refused: a rotated or mistyped key, a clock
# far off. Nothing retried now can succeed until someone changes the credentials.
CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "RequestTimeTooSkewed",
        "AccessDenied",
        "AllAccessDisabled",
        "403",
    }
)
CREDENTIALS_HINT = (
    "a credentials problem: the bucket refused this access key; retrying cannot help until the key "
    "is fixed (RUSTFS_ACCESS_KEY_ID / RUSTFS_SECRET_ACCESS_KEY, or the AWS credential chain, "
    "then restart), or, for AccessDenied, the bucket policy"
)
# botocore's own ceiling for one backoff: a Retry-After beyond it is capped, so that no
# single request waits longer than botocore would have.
MAX_RETRY_AFTER_S = 20.0

OnRetry = Callable[[str, str], None]  # (operation, reason)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "?"))


def credentials_refused(exc: BaseException | None) -> bool:
    """The server refused the key (HTTP 403 with one of the credential codes)."""
    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 403 and _code(exc) in CREDENTIAL_CODES


def tls_failed(exc: BaseException | None) -> bool:
    """TLS with the endpoint failed (a certificate that does not verify, most often)."""
    return isinstance(exc, SSLError) or isinstance(getattr(exc, "__cause__", None), SSLError)


def futile(exc: BaseException | None) -> bool:
    """True when retrying the same request soon cannot succeed (an operator must act)."""
    return credentials_refused(exc) or isinstance(exc, SSLError) or bool(getattr(exc, "tls", False))


TLS_HINT = (
    "set [s3] ca_bundle (or RUSTFS_CA_BUNDLE) to the CA that signed the endpoint's certificate; "
    "retrying cannot help until then"
)


def _cert_error(exc: SSLError) -> ssl.SSLCertVerificationError | None:
    """The verification failure inside botocore's SSLError, however wrapped: aiohttp's
    ClientConnectorCertificateError (aiobotocore), urllib3's SSLError (botocore)."""
    todo: list[Any] = [exc.kwargs.get("error")]
    seen: set[int] = set()
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen or len(seen) > 20:
            continue
        seen.add(id(cur))
        # aiohttp's wrapper is itself an ssl.CertificateError (an alias), without the
        # attributes of the one OpenSSL raised: that one is inside it.
        if isinstance(cur, ssl.SSLCertVerificationError) and hasattr(cur, "verify_message"):
            return cur
        for attr in ("certificate_error", "os_error", "reason", "__cause__", "__context__"):
            todo.append(getattr(cur, attr, None))
        todo.extend(a for a in getattr(cur, "args", ()) if isinstance(a, BaseException))
    return None


def _tls_reason(exc: SSLError) -> str:
    """What the TLS layer objected to, in its own words (without the stack of wrappers)."""
    cert_error = _cert_error(exc)
    if cert_error is not None:
        return str(cert_error.verify_message or cert_error.reason or cert_error)
    cause = exc.kwargs.get("error")
    inner = getattr(cause, "os_error", None) or cause
    if isinstance(inner, ssl.SSLError):
        return str(inner.reason or inner)
    return str(inner if inner is not None else exc)


def describe(exc: BaseException) -> str:
    """The error as one line: the S3 code and HTTP status, the endpoint, what to check."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode")
        attempts = int(meta.get("RetryAttempts", 0)) + 1
        where = [f"HTTP {status}"] if status else []
        if attempts > 1:
            where.append(f"{attempts} attempts")
        code = f"{_code(exc)} ({', '.join(where)})" if where else _code(exc)
        message = str(err.get("Message") or "").strip()
        line = f"{code}: {message}" if message else code
        if credentials_refused(exc):
            line += f"; {CREDENTIALS_HINT}"
        return line
    if isinstance(exc, SSLError):
        endpoint = _origin(str(exc.kwargs.get("endpoint_url", "?")))
        if _cert_error(exc) is not None:
            return f"the TLS certificate of {endpoint} does not verify ({_tls_reason(exc)}): {TLS_HINT}"
        return (
            f"the TLS handshake with {endpoint} failed ({_tls_reason(exc)}): check that the endpoint "
            "speaks HTTPS and that [s3] ca_bundle (or RUSTFS_CA_BUNDLE) is the CA that signed its certificate"
        )
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        endpoint = str(exc.kwargs.get("endpoint_url", "?"))
        return f"cannot connect to {_origin(endpoint)}: {_connect_cause(exc)} ({type(exc).__name__})"
    if isinstance(exc, ReadTimeoutError):
        endpoint = str(exc.kwargs.get("endpoint_url", "?"))
        return (
            f"no data from {_origin(endpoint)} within [s3] read_timeout_s ({type(exc).__name__}, {endpoint})"
        )
    if isinstance(exc, BotoCoreError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _origin(url: str) -> str:
    """scheme://host:port of a request URL: the endpoint, without the signed query."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}" if rest else url


def _connect_cause(exc: BotoCoreError) -> str:
    cause = exc.kwargs.get("error")
    if isinstance(cause, aiohttp.ClientConnectorError):
        host, cause = cause.host, cause.os_error
    else:
        host = _host_of(exc)
    if isinstance(cause, socket.gaierror):
        return f"the name {host} does not resolve ({cause.strerror})"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    return str(cause if cause is not None else exc)


def _host_of(exc: BotoCoreError) -> str:
    origin = _origin(str(exc.kwargs.get("endpoint_url", "")))
    return origin.split("://", 1)[-1].rsplit(":", 1)[0]


def retry_after_s(headers: Any, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date)."""
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        at = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, at - (time.time() if now is None else now))


class RetryAfterBackoff(ExponentialBackoff):  # type: ignore[misc]  # botocore is untyped
    """botocore's jittered backoff, or the server's Retry-After when that is longer."""

    def delay_amount(self, context: Any) -> float:
        delay = float(super().delay_amount(context))
        response = context.http_response
        asked = retry_after_s(response.headers) if response is not None else None
        if asked is not None:
            delay = max(delay, min(asked, MAX_RETRY_AFTER_S))
        return delay


class _Retries(AioRetryHandler):  # type: ignore[misc]  # aiobotocore is untyped
    """The standard handler with our backoff, and one log line (and a count) per retry."""

    def __init__(self, max_attempts: int, on_retry: OnRetry | None) -> None:
        self.quota = RetryQuotaChecker(RetryQuota())
        super().__init__(
            retry_policy=AioRetryPolicy(
                retry_checker=AioStandardRetryConditions(max_attempts=max_attempts),
                retry_backoff=RetryAfterBackoff(),
            ),
            retry_event_adapter=RetryEventAdapter(),
            retry_quota=self.quota,
        )
        self._on_retry = on_retry

    async def needs_retry(self, **kwargs: Any) -> float | None:
        if isinstance(kwargs.get("caught_exception"), SSLError):
            # A certificate that does not verify now will not verify in a second either.
            return None
        delay: float | None = await super().needs_retry(**kwargs)
        if delay is None:
            return None
        operation = kwargs["operation"].name
        reason = _retry_reason(kwargs.get("response"), kwargs.get("caught_exception"))
        request = kwargs.get("request_dict") or {}
        log.warning(
            "S3 request retried",
            operation=operation,
            url=request.get("url"),
            reason=reason,
            attempt=kwargs.get("attempts"),
            delay_s=round(delay, 3),
        )
        if self._on_retry is not None:
            self._on_retry(operation, reason)
        return delay


def _retry_reason(response: Any, exc: BaseException | None) -> str:
    """A bounded label: the S3 code (SlowDown, InternalError), else the exception type."""
    if response is not None:
        http, parsed = response
        code = (parsed or {}).get("Error", {}).get("Code")
        return str(code or http.status_code)
    return type(exc).__name__ if exc is not None else "unknown"


def install_retries(client: Any, max_attempts: int, on_retry: OnRetry | None = None) -> None:
    """Replace the client's standard retry handler with ours (same conditions and quota
    rules, Retry-After honoured, retries logged). ``max_attempts`` counts the first."""
    events = client.meta.events
    service = client.meta.service_model.service_id.hyphenize()
    unique_id = f"retry-config-{service}"
    events.unregister(f"needs-retry.{service}", unique_id=unique_id)
    handler = _Retries(max_attempts, on_retry)
    events.register(f"after-call.{service}", handler.quota.release_retry_quota)
    events.register(f"needs-retry.{service}", handler.needs_retry, unique_id=unique_id)

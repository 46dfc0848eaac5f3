"""The S3 source: list a dataset's change files, stream one, archive or quarantine it.

Only names decide order (CONTRACT.md semantic 1): LastModified changes on every copy
and re-upload and says nothing about when the export ran. Transient S3 errors are
retried by botocore's own "standard" retry mode (exponential backoff with jitter,
throttling-aware, Retry-After honoured: s3errors.py), so callers see only errors that
outlived those retries.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import aioboto3
import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError

from fleetticketsd.config import DatasetConfig, S3Config
from fleetticketsd.ingest.feed import file_name, key_timestamp
from fleetticketsd.ingest.s3errors import OnRetry, install_retries
from fleetticketsd.ingest.s3errors import describe as describe_s3

log = structlog.get_logger("fleetticketsd.ingest.source")

LIST_PAGE_KEYS = 1000  # ListObjectsV2's MaxKeys ceiling


class SourceError(Exception):
    """An S3 call failed after retries; ``op`` is the call, ``key`` what it was about."""

    def __init__(self, op: str, key: str, cause: BaseException) -> None:
        super().__init__(f"S3 {op} {key}: {describe(cause)}")
        self.op = op
        self.key = key


def describe(exc: BaseException) -> str:
    return describe_s3(exc)


def _precondition_failed(operation: str, message: str) -> ClientError:
    """What a server that honours If-Match answers, for one that did not."""
    response: Any = {
        "Error": {"Code": "PreconditionFailed", "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": 412},
    }
    return ClientError(response, operation)


def _is_code(exc: BaseException, *codes: str) -> bool:
    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in codes


def cache_endpoints(client: Any, ruleset: dict[str, Any]) -> bool:
    """Let botocore's endpoint cache hit: resolve with only the parameters its rules read.

    botocore resolves the endpoint of every request by evaluating S3's rule set, behind
    an LRU cache keyed by all the declared parameters, and those include Key and
    CopySource: every object misses, and the evaluation is a fifth of a request's
    CPU. The rules never read them (checked here, on the rule set botocore loaded), so
    leaving them out cannot change an endpoint, and the cache then hits on every
    request. Returns whether it is in place (False if a botocore upgrade moved the
    resolver: requests then only cost what they did).
    """
    provider: Any = getattr(getattr(client, "_ruleset_resolver", None), "_provider", None)
    resolve = getattr(provider, "resolve_endpoint", None)
    if provider is None or resolve is None:
        return False
    read = _referenced(ruleset.get("rules", []))

    def resolve_endpoint(**params: Any) -> Any:
        return resolve(**{k: v for k, v in params.items() if k in read})

    provider.resolve_endpoint = resolve_endpoint
    return True


def _referenced(node: Any) -> set[str]:
    """Every parameter name a rule-set fragment refers to ({"ref": NAME})."""
    if isinstance(node, dict):
        found = {node["ref"]} if isinstance(node.get("ref"), str) else set()
        for value in node.values():
            found |= _referenced(value)
        return found
    if isinstance(node, list):
        return set().union(*(_referenced(v) for v in node))
    return set()


@dataclass(frozen=True)
class ChangeFile:
    key: str
    etag: str
    size: int
    timestamp: datetime  # UTC, from the name

    @property
    def name(self) -> str:
        return file_name(self.key)


class S3Source:
    """One aiobotocore client, shared by every dataset of the process."""

    def __init__(
        self, config: S3Config, max_attempts: int | None = None, on_retry: OnRetry | None = None
    ) -> None:
        self.config = config
        # Counting the first attempt (botocore's total_max_attempts).
        self.max_attempts = max_attempts or config.max_attempts
        self._on_retry = on_retry
        self.bucket = config.bucket
        # Keys per listing request: S3's maximum; tests set it small to get many pages.
        self.list_page_keys = LIST_PAGE_KEYS
        core = AioSession()
        # botocore parses every timestamp of every answer with dateutil (a tenth of a
        # request's CPU); nothing here reads one (names decide order, not LastModified),
        # so they stay the strings the server sent.
        core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
        self._session = aioboto3.Session(
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            region_name=config.region,
            botocore_session=core,
        )
        self._endpoint_rules = core.get_component("data_loader").load_service_model(
            "s3", "endpoint-rule-set-1"
        )
        self._boto_config = AioConfig(
            s3={"addressing_style": config.addressing_style},
            retries={"total_max_attempts": self.max_attempts, "mode": "standard"},
            connect_timeout=config.connect_timeout_s,
            read_timeout=config.read_timeout_s,
            max_pool_connections=16,
            # The calls are this module's own, with fixed shapes: checking each against
            # the service model costs CPU on every request and can only find our bugs,
            # which the tests find first.
            parameter_validation=False,
        )
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def __aenter__(self) -> Self:
        if not self.config.verify_tls:
            log.warning(
                "TLS certificate verification of the S3 endpoint is off ([s3] verify_tls = false): "
                "anyone on the network path can read and alter the feed; for a test bench only",
                endpoint=self.config.endpoint_url,
            )
        self._client = await self._stack.enter_async_context(
            self._session.client(
                "s3", endpoint_url=self.config.endpoint_url, config=self._boto_config, verify=self._verify()
            )
        )
        install_retries(self._client, self.max_attempts, self._on_retry)
        cache_endpoints(self._client, self._endpoint_rules)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def _verify(self) -> bool | str | None:
        """botocore's ``verify``: False (off), a CA bundle's path, or None (the system's
        store; config.py has already resolved AWS_CA_BUNDLE into ca_bundle)."""
        if not self.config.verify_tls:
            return False
        return self.config.ca_bundle

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("S3Source used outside 'async with'")
        return self._client

    async def check(self) -> None:
        """Raise SourceError unless the bucket is reachable with these credentials."""
        try:
            await self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise SourceError("head_bucket", self.bucket, exc) from exc

    async def list_changes(self, dataset: DatasetConfig) -> list[ChangeFile]:
        """Every change file under ``<prefix>changes/``, oldest name first."""
        return await self.list_files(dataset.changes_prefix)

    async def list_processed_after(self, dataset: DatasetConfig, name: str) -> list[ChangeFile]:
        """The files under ``<prefix>processed/`` whose names sort after ``name``.

        StartAfter lets the server skip the archive's history: a pass after a
        restore reads only the tail it may have to apply again, never all of it."""
        return await self.list_files(dataset.processed_prefix, start_after=dataset.processed_prefix + name)

    async def list_files(self, prefix: str, start_after: str | None = None) -> list[ChangeFile]:
        """Timestamp-named files directly under ``prefix``, oldest name first."""
        return [f async for page in self.list_pages(prefix, start_after) for f in page]

    async def list_pages(
        self, prefix: str, start_after: str | None = None
    ) -> AsyncIterator[list[ChangeFile]]:
        """``list_files`` one listing page at a time (``list_page_keys`` keys a request).

        ListObjectsV2 answers in key order, and under one prefix key order is name
        order, so the pages come oldest name first: a pass can apply the first page
        while the server lists the rest. A server that answered out of order would
        break semantic 1, so a page that goes back in names fails the listing.
        The Delimiter keeps the listing to the one level that matters: sub-folders
        are not change files and cost nothing to skip.
        """
        extra = {"StartAfter": start_after} if start_after else {}
        last = ""
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(
                Bucket=self.bucket,
                Prefix=prefix,
                Delimiter="/",
                PaginationConfig={"PageSize": self.list_page_keys},
                **extra,
            ):
                found: list[ChangeFile] = []
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    ts = key_timestamp(key)
                    if ts is None or key[len(prefix) :] != file_name(key):
                        continue
                    found.append(ChangeFile(key, obj["ETag"].strip('"'), obj["Size"], ts))
                found.sort(key=lambda f: f.name)
                if found and found[0].name <= last:
                    raise SourceError(
                        "list",
                        prefix,
                        ValueError(f"listing out of name order at {found[0].key} (after {last})"),
                    )
                if found:
                    last = found[-1].name
                    yield found
        except (ClientError, BotoCoreError) as exc:
            raise SourceError("list", prefix, exc) from exc

    async def any_file(self, prefix: str) -> bool:
        """Whether anything at all lies under ``prefix`` (one key asked for)."""
        try:
            resp = await self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            raise SourceError("list", prefix, exc) from exc
        return bool(resp.get("KeyCount") or resp.get("Contents"))

    async def head(self, key: str) -> ChangeFile | None:
        try:
            resp = await self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_code(exc, "404", "NoSuchKey", "NotFound"):
                return None
            raise SourceError("head", key, exc) from exc
        except BotoCoreError as exc:
            raise SourceError("head", key, exc) from exc
        ts = key_timestamp(key)
        assert ts is not None, key
        return ChangeFile(key, resp["ETag"].strip('"'), resp["ContentLength"], ts)

    @contextlib.asynccontextmanager
    async def open(self, file: ChangeFile, chunk_bytes: int) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream the exact version that was listed.

        IfMatch pins the ETag: if the key was re-uploaded since the listing, this
        fails rather than applying new bytes under the old ETag in the ledger.
        """
        try:
            resp = await self.client.get_object(Bucket=self.bucket, Key=file.key, IfMatch=f'"{file.etag}"')
        except (ClientError, BotoCoreError) as exc:
            raise SourceError("get", file.key, exc) from exc
        body = resp["Body"]
        got = str(resp.get("ETag") or "").strip('"')
        if got and got != file.etag:
            # Not every server honours If-Match (s3rver ignores it): the answer's own
            # ETag says which version this is, so the pin holds on all of them.
            body.close()
            changed = _precondition_failed("GetObject", f"the object changed since it was listed: ETag {got}")
            raise SourceError("get", file.key, changed)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await body.read(chunk_bytes):
                    yield chunk
            except (ClientError, BotoCoreError, OSError, aiohttp.ClientError) as exc:
                # A body cut off mid-stream surfaces as aiohttp's ClientPayloadError.
                raise SourceError("read", file.key, exc) from exc

        try:
            yield chunks()
        finally:
            body.close()

    async def archive(self, dataset: DatasetConfig, file: ChangeFile) -> bool:
        """Move to processed/. False if the key now holds another version (left in place)."""
        return await self._move(file, dataset.processed_prefix + file.name)

    async def copy_to_processed(self, dataset: DatasetConfig, file: ChangeFile) -> bool:
        """The first half of ``archive``: False if the key now holds another version.
        The caller deletes the original (``delete_many``), soon after."""
        return await self._copy(file, dataset.processed_prefix + file.name)

    async def delete_many(self, keys: list[str]) -> dict[str, SourceError]:
        """Delete up to 1,000 keys in one request; returns the keys that failed, each
        with S3's reason. A request that fails as a whole raises SourceError."""
        try:
            resp = await self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
            )
        except (ClientError, BotoCoreError) as exc:
            raise SourceError("delete", f"{len(keys)} keys from {keys[0]}", exc) from exc
        return {
            e["Key"]: SourceError(
                "delete",
                e["Key"],
                ClientError({"Error": {"Code": e.get("Code"), "Message": e.get("Message")}}, "DeleteObjects"),
            )
            for e in resp.get("Errors", [])
        }

    async def quarantine(self, dataset: DatasetConfig, file: ChangeFile, error: dict[str, Any]) -> bool:
        """Move to quarantine/ with ``<name>.error.json`` beside it, saying why."""
        error_key = f"{dataset.quarantine_prefix}{file.name}.error.json"
        body = json.dumps(error, indent=2, sort_keys=True).encode()
        try:
            await self.client.put_object(
                Bucket=self.bucket, Key=error_key, Body=body, ContentType="application/json"
            )
        except (ClientError, BotoCoreError) as exc:
            raise SourceError("put", error_key, exc) from exc
        return await self._move(file, dataset.quarantine_prefix + file.name)

    async def _move(self, file: ChangeFile, target: str) -> bool:
        # S3 has no rename. Copy only the version we handled (CopySourceIfMatch), then
        # delete: if a fixed file was re-uploaded meanwhile, it stays in changes/ for
        # the next pass instead of being archived unread.
        if not await self._copy(file, target):
            return False
        try:
            await self.client.delete_object(Bucket=self.bucket, Key=file.key)
        except (ClientError, BotoCoreError) as exc:
            raise SourceError("delete", file.key, exc) from exc
        return True

    async def _copy(self, file: ChangeFile, target: str) -> bool:
        try:
            resp = await self.client.copy_object(
                Bucket=self.bucket,
                Key=target,
                CopySource={"Bucket": self.bucket, "Key": file.key},
                CopySourceIfMatch=f'"{file.etag}"',
            )
        except ClientError as exc:
            if _is_code(exc, "PreconditionFailed", "412", "NoSuchKey", "404"):
                return False
            raise SourceError("copy", file.key, exc) from exc
        except BotoCoreError as exc:
            raise SourceError("copy", file.key, exc) from exc
        copied = str(resp.get("CopyObjectResult", {}).get("ETag") or "").strip('"')
        if copied and copied != file.etag and "-" not in file.etag:
            # A server that ignores CopySourceIfMatch (s3rver) copied a newer upload:
            # take the copy back and leave the new version in changes/ for the next
            # pass, as a refused precondition would have. (A multipart ETag is not the
            # copy's, which gets a plain MD5: those rely on the server's check alone.)
            try:
                await self.client.delete_object(Bucket=self.bucket, Key=target)
            except (ClientError, BotoCoreError) as exc:
                raise SourceError("delete", target, exc) from exc
            return False
        return True

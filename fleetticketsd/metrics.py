"""Prometheus metrics: the names and labels CONTRACT.md fixes, plus a few of our own.

All metrics hang off one CollectorRegistry per process (the only module-level state
the project allows itself is the registry, and even that is created here, per
Metrics instance, so tests can run several daemons in one interpreter).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

from fleetticketsd import __version__

# One pass is a listing plus, usually, a handful of small deltas (well under a
# second); after an outage it can be hundreds of files or a 500 MB baseline.
POLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# From seconds (drained on arrival) to a day (an outage): the export names a file by
# when it started, so even a prompt apply is some seconds late.
APPLY_DELAY_BUCKETS = (5, 15, 30, 60, 90, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)
POLL_STAGES = ("list", "fetch", "parse", "apply", "archive")
GEOCODE_OUTCOMES = ("ok", "no_match", "rejected_distance", "rate_limited", "error")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ds = ("dataset",)
        self.source_lag = Gauge(
            "fleettickets_source_lag_seconds",
            "Newest key under changes/ minus the watermark key, in seconds; 0 when caught up",
            ds,
            registry=r,
        )
        self.pending_files = Gauge(
            "fleettickets_pending_files", "Files under changes/ not yet applied", ds, registry=r
        )
        self.watermark_ts = Gauge(
            "fleettickets_watermark_timestamp_seconds",
            "Unix time of the watermark key",
            ds,
            registry=r,
        )
        self.newest_source_ts = Gauge(
            "fleettickets_newest_source_timestamp_seconds",
            "Unix time of the newest key seen in the source",
            ds,
            registry=r,
        )
        self.files_applied = Counter("fleettickets_files_applied", "Files committed", ds, registry=r)
        self.rows_upserted = Counter("fleettickets_rows_upserted", "Rows inserted or changed", ds, registry=r)
        self.rows_rejected = Counter(
            "fleettickets_rows_rejected",
            "Rows sent to the rejects table",
            ("dataset", "reason"),
            registry=r,
        )
        self.files_quarantined = Counter(
            "fleettickets_files_quarantined",
            "Bad files a drain moved to quarantine/ (on_bad_file = quarantine)",
            ds,
            registry=r,
        )
        self.late_files = Counter(
            "fleettickets_late_files",
            "Files older than the watermark applied under the stale-write guard",
            ds,
            registry=r,
        )
        self.dataset_blocked = Gauge(
            "fleettickets_dataset_blocked", "1 while a bad file halts the dataset", ds, registry=r
        )
        self.poll_duration = Histogram(
            "fleettickets_poll_duration_seconds",
            "One drain pass",
            ds,
            buckets=POLL_BUCKETS,
            registry=r,
        )
        self.apply_delay = Histogram(
            "fleettickets_apply_delay_seconds",
            "Commit time minus the time in the file's name (EAT to UTC): how stale its data "
            "was when it reached the table",
            ds,
            buckets=APPLY_DELAY_BUCKETS,
            registry=r,
        )
        self.poll_failures = Counter(
            "fleettickets_poll_failures",
            "Failed steps of a drain pass",
            ("dataset", "stage"),
            registry=r,
        )
        self.last_success = Gauge(
            "fleettickets_last_success_timestamp_seconds",
            "End of the last successful drain pass",
            ds,
            registry=r,
        )
        self._last_success: dict[str, float] = {}  # the gauge's values (succeeded_at)
        self.geocode_queue_depth = Gauge(
            "fleettickets_geocode_queue_depth", "Locations waiting to be geocoded", registry=r
        )
        self.geocode_requests = Counter(
            "fleettickets_geocode_requests",
            "Geocoding requests by outcome",
            ("provider", "outcome"),
            registry=r,
        )
        self.geocode_budget_remaining = Gauge(
            "fleettickets_geocode_budget_remaining", "Requests left in today's budget", registry=r
        )
        # Ours (issue 4): why the geocoder is not sending, so an idle worker explains itself.
        self.geocode_stopped = Gauge(
            "fleettickets_geocode_stopped",
            "1 while geocoding is paused: auth (key refused), budget (daily cap), day_limit (provider quota)",
            ("reason",),
            registry=r,
        )
        # Issue 13: answers nothing could check against the wrong-city guard.
        self.geocode_unguarded = Gauge(
            "fleettickets_geocode_unguarded_locations",
            "Geocoded locations placed without a cluster centroid to check them against max_distance_km",
            registry=r,
        )
        self.geocode_cache_hits = Counter(
            "fleettickets_geocode_cache_hits", "Queued places found already cached: no request", registry=r
        )
        self.config_reload_ok = Gauge(
            "fleettickets_config_last_reload_successful",
            "1 if the last SIGHUP reload succeeded",
            registry=r,
        )
        self.config_reload_ts = Gauge(
            "fleettickets_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load",
            registry=r,
        )
        self.build_info = Info("fleettickets_build", "Version of fleetticketsd", registry=r)
        self.build_info.info({"version": __version__})
        # Ours, beyond the contract.
        self.archive_pending = Gauge(
            "fleettickets_archive_pending_files",
            "Applied files still under changes/ (an archive step failed)",
            ds,
            registry=r,
        )
        # After `migrate --adopt`: another program still writing the tables taken over
        # from the legacy loader (its scheduled tasks left running, most likely).
        self.foreign_writes = Gauge(
            "fleettickets_foreign_writes",
            "Statements by programs other than fleetticketsd on the tables it took over from the "
            "legacy loader (tickets.foreign_writes)",
            registry=r,
        )
        # Recovery from a database restore (CONTRACT.md): files applied again from processed/.
        self.replayed_files = Counter(
            "fleettickets_replayed_files",
            "Files under processed/ the ledger did not hold (a restored database), applied again",
            ds,
            registry=r,
        )
        # Ours: what botocore retried before a call succeeded or gave up, so throttling
        # (SlowDown) and a flaky endpoint show before they fail a pass.
        self.s3_retries = Counter(
            "fleettickets_s3_retries",
            "S3 requests retried by the client, by operation and reason (S3 error code or exception)",
            ("operation", "reason"),
            registry=r,
        )
        # Leaks show as a slope: tasks of the event loop (set by the daemon), and the
        # standard process_* series (RSS, open file descriptors).
        self.asyncio_tasks = Gauge(
            "fleettickets_asyncio_tasks", "Tasks alive on the daemon's event loop", registry=r
        )
        ProcessCollector(registry=r)
        self.config_reload_ok.set(1)

    def s3_retry(self, operation: str, reason: str) -> None:
        self.s3_retries.labels(operation, reason).inc()

    def init_dataset(self, dataset: str) -> None:
        """Export every per-dataset series at zero, so dashboards and rate() see them at once."""
        for metric in (
            self.files_applied,
            self.rows_upserted,
            self.late_files,
            self.files_quarantined,
            self.dataset_blocked,
            self.pending_files,
            self.source_lag,
            self.archive_pending,
            self.replayed_files,
        ):
            metric.labels(dataset)
        for stage in POLL_STAGES:
            self.poll_failures.labels(dataset, stage)
        self.poll_duration.labels(dataset)
        self.apply_delay.labels(dataset)

    def succeeded_at(self, dataset: str, at: float) -> None:
        """Move the last-success gauge forward to ``at``, never back: another process's
        success (read from the database) may be older than this one's.

        The value is kept beside the gauge because reading it back from the registry
        (``get_sample_value``) walks every sample of every metric: done for each dataset
        on each source check, that was 40% of a 20-dataset daemon's CPU."""
        if at > self._last_success.get(dataset, float("-inf")):
            self._last_success[dataset] = at
            self.last_success.labels(dataset).set(at)

    def remove_dataset(self, dataset: str) -> None:
        """Forget a dataset dropped by a reload: stale series would keep alerts firing."""
        for metric in (
            self.files_applied,
            self.rows_upserted,
            self.late_files,
            self.files_quarantined,
            self.dataset_blocked,
            self.pending_files,
            self.source_lag,
            self.archive_pending,
            self.replayed_files,
            self.watermark_ts,
            self.newest_source_ts,
            self.last_success,
            self.poll_duration,
            self.apply_delay,
        ):
            try:
                metric.remove(dataset)
            except KeyError:
                pass
        self._last_success.pop(dataset, None)
        for stage in POLL_STAGES:
            try:
                self.poll_failures.remove(dataset, stage)
            except KeyError:
                pass

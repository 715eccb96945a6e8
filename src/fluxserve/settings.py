"""Settings from ``FLUXSERVE_*`` environment variables; the CLI's flags override them."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_", extra="ignore")

    data_dir: Path = Field(default=Path("./data"), description="Database, images and built models.")
    models_dir: Path | None = Field(
        default=None, description="Where built-in models are made; default data_dir/models."
    )
    database_url: str | None = Field(default=None, description="Default: SQLite in the data dir.")
    database_pool_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        description="PostgreSQL: longest wait for a free pooled connection (then the request gets a 503).",
    )
    database_connect_timeout_seconds: int = Field(
        default=5,
        ge=2,
        description="PostgreSQL: longest wait for a new connection (libpq's connect_timeout, whole seconds, "
        "at least 2); an unreachable server is a 503 after this, not a hang.",
    )
    database_statement_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        description="PostgreSQL: longest one statement may run (statement_timeout; 0: no limit); a statement "
        "stuck behind a lock or a struggling server ends with a 503 instead of holding its connection. "
        "Migrations are exempt.",
    )
    storage_url: str | None = Field(default=None, description="Default: file:// in the data dir.")
    public_url: str | None = Field(default=None, description="Base of result URLs; default http://host:port.")
    catalog: str | None = Field(
        default=None,
        description="Operator catalog TOML file(s) overriding the shipped one; several joined with "
        "os.pathsep (':'), later ones winning.",
    )
    host: str = Field(default="127.0.0.1", description="Interface serve listens on; 0.0.0.0 for all.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port serve listens on.")
    workers: int = Field(
        default=1, ge=0, description="Worker processes that serve starts and supervises; 0: the API only."
    )
    url_ttl_seconds: int = Field(default=7 * 24 * 3600, description="How long a signed result URL lasts.")
    result_ttl_seconds: float | None = Field(
        default=None,
        gt=0,
        description="How long a result file is kept after its job ends; then it is deleted and the job "
        "reads as expired (its row stays). None: url_ttl_seconds.",
    )
    sweep_seconds: float = Field(
        default=300.0, gt=0, description="How often the API process deletes results past their time."
    )
    heartbeat_seconds: float = Field(default=5.0, description="How often a running job's worker checks in.")
    stale_after_seconds: float = Field(
        default=30.0, description="A running job whose worker has not checked in for this long is requeued."
    )
    worker_drain_seconds: float = Field(
        default=60.0,
        ge=0,
        description="On SIGTERM a worker process claims nothing more and gives its running jobs this long to "
        "finish; those still running then go back to the queue at once (the attempt not counted) and the "
        "process exits. serve's supervisor waits this long, and a little more, before killing a worker.",
    )
    torch_threads: int | None = Field(
        default=None,
        gt=0,
        description="CPU threads for torch in each worker process; None: the cores less one for the API, "
        "shared among the worker processes (one thread on a 2-core machine). More threads than free cores "
        "make OpenMP threads spin against other busy processes, which ran a model 100x slower here.",
    )
    model_memory_mb: int | None = Field(
        default=None,
        gt=0,
        description="Most model weights (MiB) a worker process keeps loaded; beyond it the least recently "
        "used model is evicted before another loads. None: no cap.",
    )
    previews: bool = Field(
        default=False,
        description="Live previews: while a job runs, its worker decodes the image as it stands into a small "
        "JPEG (at most 256 px) that fetch, get_result, the event streams and the playground show. Off by "
        "default: on a CPU a preview costs about as much as a step of the bundled model, and 8% of the "
        "final decode of a full-size FLUX.1 image (BENCHMARKS.md).",
    )
    previews_interval_seconds: float = Field(
        default=1.0,
        ge=0,
        description="With previews on, at most one preview per job this often (0: after every step); the "
        "first comes after the first step, and the next waits at least 20 times as long as the last one "
        "took to draw, so previews never take more than about 5% of a job's time.",
    )
    engine_stall_seconds: float = Field(
        default=600.0,
        gt=0,
        description="A running engine that neither reports progress nor checks for cancellation for this "
        "long is hung: its job goes back to the queue and a supervised worker process is restarted. "
        "Model loading and compilation before the first step count too on a cold worker.",
    )
    max_attempts: int = Field(default=3, description="Claims of one job before it fails as a crash loop.")
    moderation: str = Field(
        default="6",
        pattern=r"^\s*(?i:off|[0-6])\s*$",
        description="Local moderation (docs/moderation.md), read by worker processes: 'off', or the "
        "operator's floor 0..6, the most lenient safety_tolerance any job gets: a job is checked (and "
        "relayed) at min(its safety_tolerance, floor). 6 leaves each request its own tolerance; a job at "
        "6 is not checked.",
    )
    expect_workers: bool | None = Field(
        default=None,
        description="Whether /readyz needs a worker process heard from in the last stale_after_seconds "
        "(anywhere: workers on other machines count). None: when this process starts workers.",
    )
    poll_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Idle workers look for queued jobs at least this often. The change feed wakes an idle "
        "worker as soon as a job is queued (LISTEN/NOTIFY on PostgreSQL, a probe on SQLite), so this is "
        "only a safety interval.",
    )
    allowed_private_networks: str = Field(
        default="", description="Comma-separated CIDRs that URL inputs and webhooks may reach."
    )
    max_input_bytes: int = Field(default=20 * 1024 * 1024, description="Largest input image, in bytes.")
    input_fetch_timeout_seconds: float = Field(
        default=20.0, gt=0, description="Longest download of one URL input (the job fails beyond it)."
    )
    input_fetch_concurrency: int = Field(
        default=32, gt=0, description="URL inputs downloaded at once, per API process."
    )
    input_fetch_max_per_key: int = Field(
        default=2,
        gt=0,
        description="Jobs of one API key whose URL inputs are downloaded at once, across all API processes "
        "(its other jobs wait their turn, other keys' jobs do not).",
    )
    webhook_backoff: str = Field(
        default="5,30,120,300,900", description="Seconds between webhook tries; one more try than entries."
    )
    webhook_timeout_seconds: float = Field(default=10.0, description="How long one webhook try may take.")
    webhook_concurrency: int = Field(
        default=32, gt=0, description="Webhook deliveries in flight at once, per API process."
    )
    webhook_max_per_key: int = Field(
        default=4, gt=0, description="Webhook deliveries of one API key in flight at once, per API process."
    )
    webhook_max_per_host: int = Field(
        default=2,
        gt=0,
        description="Webhook deliveries to one target host in flight at once, per API process.",
    )
    max_active_jobs: int = Field(default=24, description="Queued plus running jobs per key (429 beyond).")
    max_active_jobs_kontext_max: int = Field(
        default=6, description="Queued plus running flux-kontext-max jobs per key (429 beyond)."
    )
    log_json: bool = Field(default=False, description="One JSON object per log line.")
    http_max_header_bytes: int = Field(
        default=16 * 1024,
        ge=1024,
        description="Largest request line plus headers, whether sent in one write or many; a larger one is "
        "answered 431 and its connection closed.",
    )
    http_header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A connection whose request headers are not complete this long after it opened (or "
        "after its previous response) is closed (slowloris).",
    )
    http_body_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A connection whose request body stops arriving for this long is closed.",
    )
    http_keep_alive_seconds: int = Field(
        default=5, ge=1, description="An idle keep-alive connection is closed after this long."
    )
    http_max_connections: int = Field(
        default=1000,
        ge=1,
        description="Most open connections (and requests in progress); beyond it requests get a 503.",
    )
    http_backlog: int = Field(
        default=2048, ge=1, description="Connections the kernel queues before they are accepted."
    )
    http_small_body_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        description="Body limit of every route but the submit routes (fetch, cancel, get_result...).",
    )
    http_max_json_separators: int = Field(
        default=50_000,
        ge=100,
        description="Most ',' and ':' characters in a submit body, counted before it is parsed.",
    )
    events_position_seconds: float = Field(
        default=0.1,
        gt=0,
        description="While other jobs move, the queue positions of streamed queued jobs are read again at "
        "most this often (a stream's own job is read at each of its changes; nothing while nothing changes).",
    )
    events_max_per_key: int = Field(
        default=32, gt=0, description="Open event streams of one API key, per API process (429 beyond)."
    )
    events_max_per_process: int = Field(
        default=1000,
        gt=0,
        description="Open event streams of all keys together, per API process (429 beyond), so that no set "
        "of keys can take a replica's sockets and memory.",
    )
    events_idle_seconds: float = Field(
        default=300.0,
        gt=0,
        description="An event stream with nothing new for this long ends; the client reconnects with "
        "Last-Event-ID to carry on.",
    )
    metrics_token: str | None = Field(
        default=None,
        min_length=16,
        description="When set, /metrics needs 'Authorization: Bearer <token>', and /readyz shows the "
        "failures' own text to callers that send it (others learn only which part is unavailable).",
    )
    metrics_refresh_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How often each API process reads the metric counters from the database; /metrics "
        "answers the last read.",
    )
    readyz_timeout_seconds: float = Field(
        default=2.0,
        gt=0,
        description="The longest /readyz waits for the database and for the storage before it calls them "
        "unavailable.",
    )
    retry_after_seconds: int = Field(
        default=5,
        ge=1,
        description="The Retry-After every 429 and 503 carries when its cause does not know a better one.",
    )
    max_queued_jobs: int | None = Field(
        default=None,
        ge=1,
        description="Off when unset: jobs of all keys that may wait (queued or fetching); 503 beyond.",
    )
    key_requests_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="Off when unset: submits a key may make per minute in one API process (429 beyond).",
    )
    max_held_requests: int = Field(
        default=256,
        ge=1,
        description="Requests an API process holds open while their jobs run (the OpenAI images routes, "
        "Replicate's Prefer: wait), across keys; beyond, 503 (OpenAI) or an answer at once (Replicate).",
    )
    openai_wait_seconds: float = Field(
        default=300.0,
        gt=0,
        description="How long an OpenAI images request waits for its images; then a 504 names the jobs, "
        "which carry on (fetch them at /flux/fetch).",
    )
    openai_model: str = Field(
        default="flux-dev", description="The model of /v1/images/generations when a request names none."
    )
    openai_edit_model: str = Field(
        default="flux-kontext-pro", description="The model of /v1/images/edits when a request names none."
    )

    @property
    def threads_per_worker(self) -> int:
        if self.torch_threads:
            return self.torch_threads
        return max(1, ((os.cpu_count() or 1) - 1) // max(1, self.workers))

    @property
    def catalog_files(self) -> list[Path]:
        return [Path(part) for part in (self.catalog or "").split(os.pathsep) if part]

    @property
    def workers_expected(self) -> bool:
        return self.expect_workers if self.expect_workers is not None else self.workers > 0

    @property
    def result_ttl(self) -> float:
        return self.result_ttl_seconds if self.result_ttl_seconds is not None else float(self.url_ttl_seconds)

    @property
    def models(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'fluxserve.db').resolve()}"

    @property
    def storage(self) -> str:
        return self.storage_url or (self.data_dir / "files").resolve().as_uri()

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    def secret(self) -> str:
        """The URL-signing secret: made once and kept in the data dir so that links survive restarts."""
        path = self.data_dir / "secret.key"
        if not path.exists():
            if not self.data_dir.exists():
                self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Written whole to a private (0600 from its creation) temporary file, then linked into place,
            # which fails if another process got there first: no reader ever sees a partial or a readable
            # secret, and every process ends up with the same one.
            temporary = self.data_dir / f".secret.key.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w") as file:
                    file.write(secrets.token_urlsafe(32))
                    file.flush()
                    os.fsync(file.fileno())
                with contextlib.suppress(FileExistsError):
                    os.link(temporary, path)
            finally:
                temporary.unlink(missing_ok=True)
        elif path.stat().st_mode & 0o077:
            with contextlib.suppress(PermissionError):
                path.chmod(0o600)  # one written by an older version
        return path.read_text().strip()

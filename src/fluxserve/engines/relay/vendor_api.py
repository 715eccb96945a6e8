"""A small synchronous client of the vendor's API: submit a task, poll it, download its result.

- :meth:`VendorClient.submit`: ``POST {base}/v1/{endpoint}`` with ``x-key`` -> a :class:`Task`.
- :meth:`VendorClient.result`: one answer of the task's ``polling_url``, fetched exactly as returned (the
  vendor's global endpoint hands out regional ones); a 404 reads as ``Task not found``.
- :meth:`VendorClient.download`: a result ``sample``, streamed into memory up to a size cap.

One retry policy (:class:`RetryPolicy`, run by tenacity) covers all three. Network errors, a gateway's
502/503/504 on submit and any 5xx on a poll or download are tried again after ``wait`` seconds, doubling
up to ``max_wait``, until ``retries`` of them in a row. A 429 is not a failure: it waits ``Retry-After``
(else ``rate_limit_wait``, doubling up to a minute) and tries again while the caller's deadline allows.
A submit whose connection broke after the request was sent is not retried: the task may exist upstream,
and a second one would be paid for.

The key goes only to the hosts the operator allows (:func:`key_allowed`; default: the base URL's host,
``bfl.ai`` and ``*.bfl.ai``, see :func:`default_key_hosts`), never to the CDN that serves results, and is
never logged nor put in a message. Waits notice the caller's
``should_stop`` within 0.1 s and raise :class:`Stopped`; failures are
:class:`~fluxserve.errors.UpstreamError`, each message written for the job's owner. Imports neither torch
nor PIL. Only the relay engine uses it: it is the vendor's API as an upstream, not a client of fluxserve.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn, TypeVar
from urllib.parse import urljoin, urlsplit

import httpx
import tenacity

from fluxserve.errors import UpstreamError

log = logging.getLogger("fluxserve.engines.relay.vendor_api")

T = TypeVar("T")

RETRIED_SUBMIT_STATUSES = frozenset({502, 503, 504})  # a gateway's answer: the task was not created
STOP_CHECK_SECONDS = 0.1


class Stopped(Exception):
    """The caller's ``should_stop`` turned true (checked before each request and while waiting)."""


@dataclass(frozen=True)
class RetryPolicy:
    """When a call to the vendor is tried again. Times are seconds."""

    retries: int = 5  # network errors and 5xx answers in a row before the call fails
    wait: float = 1.0  # the wait after the first of them; doubles with each further one
    max_wait: float = 20.0  # the longest such wait
    rate_limit_wait: float = 5.0  # the wait after a 429 without Retry-After; doubles with each further one
    max_rate_limit_wait: float = 60.0

    def failure_wait(self, failures: int) -> float:
        """The wait after the ``failures``-th failure in a row."""
        return min(self.wait * 2.0 ** (failures - 1), self.max_wait)

    def rate_limit_wait_for(self, rate_limits: int, retry_after: float | None) -> float:
        """The wait after the ``rate_limits``-th 429 of a call: its ``Retry-After`` when it had one."""
        if retry_after is not None:
            return retry_after
        return min(self.rate_limit_wait * 2.0 ** (rate_limits - 1), self.max_rate_limit_wait)


@dataclass(frozen=True)
class Task:
    """A task the vendor accepted: its id, its polling URL as returned, and what it charged."""

    id: str
    polling_url: str
    cost: float | None = None

    @classmethod
    def of(cls, state: Mapping[str, Any] | None) -> Task | None:
        """The task in the vendor's submit answer or in a saved :meth:`state`, if it names a usable one."""
        if not state:
            return None
        task_id, polling_url, cost = state.get("id"), state.get("polling_url"), state.get("cost")
        if not isinstance(task_id, str) or not isinstance(polling_url, str) or not polling_url:
            return None
        if not isinstance(cost, int | float) or isinstance(cost, bool):
            cost = None
        return cls(task_id, polling_url, cost)

    def state(self) -> dict[str, Any]:
        """The task as JSON, to save and resume later with :meth:`of`."""
        return {"id": self.id, "polling_url": self.polling_url, "cost": self.cost}


VENDOR_KEY_HOSTS = ("*.bfl.ai", "bfl.ai")  # the vendor's own domain: its regional polling hosts


def default_key_hosts(base_url: str) -> tuple[str, ...]:
    """The hosts the key goes to when the operator names none: the base URL's host and the vendor's
    domain (``bfl.ai`` and its subdomains, where its global endpoint sends polls)."""
    host = (urlsplit(base_url).hostname or "").rstrip(".")
    return (host, *VENDOR_KEY_HOSTS) if host else VENDOR_KEY_HOSTS


def key_host_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a key host pattern (an exact host name or IP address, or ``*.domain``)."""
    wildcard = pattern.startswith("*.")
    name = pattern[2:] if wildcard else pattern.strip("[]")
    if not wildcard:
        try:
            ipaddress.ip_address(name)
            return None
        except ValueError:
            pass
    if not all(re.fullmatch(r"[A-Za-z0-9_-]+", label) for label in name.rstrip(".").split(".")):
        return f"{pattern!r} is not a host name, an IP address or *.domain (e.g. api.bfl.ai, *.bfl.ai)"
    return None


def host_matches(host: str, patterns: Sequence[str]) -> bool:
    """``host`` equals an exact pattern, or is a proper subdomain of a ``*.domain`` one (case-insensitive;
    ``*.bfl.ai`` matches ``api.eu2.bfl.ai``, not ``bfl.ai`` nor ``evilbfl.ai``). No public-suffix
    guessing: ``*.co.uk`` means every host under ``co.uk``."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".").strip("[]")
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def key_allowed(url: str, base_url: str, key_hosts: Sequence[str] | None = None) -> bool:
    """Whether the key may go to ``url``: its host matches one of ``key_hosts`` (default
    :func:`default_key_hosts`), and never over plain http when the base URL is https."""
    target, base = urlsplit(url), urlsplit(base_url)
    if not target.hostname or not base.hostname:
        return False
    if base.scheme == "https" and target.scheme != "https":
        return False
    if target.username is not None or target.password is not None:
        return False
    return host_matches(target.hostname, default_key_hosts(base_url) if key_hosts is None else key_hosts)


class _Retry(Exception):
    """Raised inside one attempt for an answer worth another try."""

    def __init__(self, message: str, *, rate_limited: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.rate_limited = rate_limited
        self.retry_after = retry_after


class _Tally:
    """One call's retry state, for tenacity's ``after``, ``wait``, ``stop`` and ``retry_error_callback``:
    failures and 429s are counted apart (a 429 is no failure)."""

    def __init__(self, policy: RetryPolicy, deadline: float | None) -> None:
        self.policy = policy
        self.deadline = deadline  # time.monotonic() by which the call must be over
        self.failures = 0
        self.rate_limits = 0

    @staticmethod
    def last(state: tenacity.RetryCallState) -> _Retry:
        error = state.outcome.exception() if state.outcome is not None else None
        assert isinstance(error, _Retry)
        return error

    def count(self, state: tenacity.RetryCallState) -> None:
        if self.last(state).rate_limited:
            self.rate_limits += 1
        else:
            self.failures += 1

    def wait(self, state: tenacity.RetryCallState) -> float:
        last = self.last(state)
        if last.rate_limited:
            return self.policy.rate_limit_wait_for(self.rate_limits, last.retry_after)
        return self.policy.failure_wait(self.failures)

    def stop(self, state: tenacity.RetryCallState) -> bool:
        """Too many failures in a row, or the next try would come after the deadline."""
        if self.failures > self.policy.retries:
            return True
        return self.deadline is not None and time.monotonic() + state.upcoming_sleep > self.deadline

    def give_up(self, state: tenacity.RetryCallState) -> NoReturn:
        if self.failures > self.policy.retries:
            raise UpstreamError(f"{self.last(state)}; gave up after {self.failures} tries")
        seconds = state.seconds_since_start or 0.0
        raise UpstreamError(f"{self.last(state)}; gave up at the time limit, after {seconds:.3g} s")


def _log_retry(state: tenacity.RetryCallState) -> None:
    log.warning(
        "vendor: %s; trying again in %.3g s",
        _Tally.last(state),
        state.upcoming_sleep,
        extra={"try": state.attempt_number},
    )


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _detail(response: httpx.Response) -> str:
    """The vendor's error detail, short and single-line, for a job's message."""
    body = _json(response)
    if body is None:
        return response.text[:300].strip() or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
                parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
            else:
                parts.append(str(item))
        detail = "; ".join(parts)
    return str(detail)[:300]


class VendorClient:
    """One session with the vendor's API; close it (or use it as a context manager) when done.

    ``key_name`` says where the key comes from (an environment variable's name) for messages to the
    operator. ``sleep`` replaces the wait between tries and polls (tests pass one that does not sleep);
    the default sleeps in slices, checking ``should_stop``.
    """

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        key_name: str = "the API key",
        policy: RetryPolicy | None = None,
        request_timeout: float = 30.0,
        should_stop: Callable[[], bool] = lambda: False,
        sleep: Callable[[float], None] | None = None,
        transport: httpx.BaseTransport | None = None,
        key_hosts: Sequence[str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.key_hosts = tuple(key_hosts) if key_hosts is not None else default_key_hosts(self.base_url)
        self.key_name = key_name
        self.policy = policy or RetryPolicy()
        self._key = key
        self._should_stop = should_stop
        self._sleep = sleep
        self._http = httpx.Client(timeout=request_timeout, transport=transport)

    def __enter__(self) -> VendorClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- the three calls ----------------------------------------------------------------------------

    def submit(self, endpoint: str, payload: Mapping[str, Any], *, deadline: float | None = None) -> Task:
        """Create a task at ``/v1/<endpoint>``; 429s and gateway errors are retried (see the module)."""
        url = f"{self.base_url}/v1/{endpoint}"

        def attempt() -> Task:
            try:
                response = self._http.post(url, json=dict(payload), headers=self._headers(url))
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise _Retry(f"cannot reach the upstream API ({type(exc).__name__})") from None
            except httpx.TransportError as exc:
                raise UpstreamError(
                    f"the upstream API did not answer the submit ({type(exc).__name__}); not retried, "
                    "since the task may have been created upstream"
                ) from None
            status = response.status_code
            if status == 429:
                raise _Retry(
                    "the upstream API refused new tasks (HTTP 429, too many active tasks)",
                    rate_limited=True,
                    retry_after=_retry_after(response),
                )
            if status in RETRIED_SUBMIT_STATUSES:
                raise _Retry(f"the upstream API is unavailable (HTTP {status})")
            self._raise_for_status(response, "submit")
            answer = _json(response)
            task = Task.of(answer) if isinstance(answer, dict) else None
            if task is None:
                raise UpstreamError("the upstream submit answer has no task id and polling_url")
            return task

        return self._retrying(attempt, deadline)

    def result(self, task: Task, *, deadline: float | None = None) -> dict[str, Any]:
        """The task's polling URL's answer now, as a dict (``{}`` when it is not a JSON object)."""
        url = self.resolve(task.polling_url)

        def attempt() -> dict[str, Any]:
            try:
                response = self._http.get(url, headers=self._headers(url))
            except httpx.TransportError as exc:
                raise _Retry(
                    f"lost contact with the upstream API while polling task {task.id} ({type(exc).__name__})"
                ) from None
            status = response.status_code
            if status == 429:
                raise _Retry(
                    f"the upstream API kept rate-limiting the polls of task {task.id} (HTTP 429)",
                    rate_limited=True,
                    retry_after=_retry_after(response),
                )
            if status >= 500:
                raise _Retry(f"the upstream API failed while polling task {task.id} (HTTP {status})")
            if status == 404:
                return {"id": task.id, "status": "Task not found"}
            self._raise_for_status(response, "poll")
            body = _json(response)
            return body if isinstance(body, dict) else {}

        return self._retrying(attempt, deadline)

    def download(self, url: str, *, task_id: str, max_bytes: int, deadline: float | None = None) -> bytes:
        """The bytes at a result URL, fetched without the key (it is the vendor's CDN), following
        redirects; more than ``max_bytes`` fails."""
        what = f"the result of upstream task {task_id}"
        if urlsplit(url).scheme not in ("http", "https"):
            raise UpstreamError(f"upstream task {task_id} returned a result URL that is not http(s)")

        def attempt() -> bytes:
            try:
                with self._http.stream("GET", url, follow_redirects=True) as response:
                    status = response.status_code
                    if status >= 500:
                        raise _Retry(f"could not download {what} (HTTP {status})")
                    if status != 200:
                        raise UpstreamError(
                            f"{what} could not be downloaded (HTTP {status}); vendor result URLs expire "
                            "after 10 minutes"
                        )
                    data = bytearray()
                    for chunk in response.iter_bytes():
                        data += chunk
                        if len(data) > max_bytes:
                            raise UpstreamError(f"{what} is over {max_bytes} bytes")
                    return bytes(data)
            except httpx.TransportError as exc:
                raise _Retry(f"could not download {what} ({type(exc).__name__})") from None

        return self._retrying(attempt, deadline)

    # -- helpers ------------------------------------------------------------------------------------

    def resolve(self, url: str) -> str:
        """A URL the vendor returned, made absolute against the base URL."""
        return urljoin(self.base_url + "/", url)

    def sends_key_to(self, url: str) -> bool:
        return key_allowed(self.resolve(url), self.base_url, self.key_hosts)

    def pause(self, seconds: float) -> None:
        """Wait that long, noticing ``should_stop`` within 0.1 s (:class:`Stopped`)."""
        self._check()
        if self._sleep is not None:
            self._sleep(seconds)
            self._check()
            return
        end = time.monotonic() + seconds
        while (remaining := end - time.monotonic()) > 0:
            time.sleep(min(remaining, STOP_CHECK_SECONDS))
            self._check()

    def _check(self) -> None:
        if self._should_stop():
            raise Stopped()

    def _headers(self, url: str) -> dict[str, str]:
        headers = {"accept": "application/json"}
        if key_allowed(url, self.base_url, self.key_hosts):
            headers["x-key"] = self._key
        return headers

    def _retrying(self, attempt: Callable[[], T], deadline: float | None) -> T:
        """``attempt()`` under the policy: again after each :class:`_Retry`, until it stops."""
        tally = _Tally(self.policy, deadline)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Retry),
            before=lambda state: self._check(),
            after=tally.count,
            wait=tally.wait,
            stop=tally.stop,
            sleep=self.pause,
            before_sleep=_log_retry,
            retry_error_callback=tally.give_up,
        )
        return retrying(attempt)

    def _raise_for_status(self, response: httpx.Response, step: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        if status == 402:
            log.error("vendor: the account is out of credits", extra={"key_name": self.key_name})
            raise UpstreamError(
                "the upstream vendor account has no credits left (HTTP 402); the server operator must "
                "top it up"
            )
        if status in (401, 403):
            log.error("vendor: the API refused the key", extra={"key_name": self.key_name})
            raise UpstreamError(
                f"the upstream API refused the operator's API key (HTTP {status}); the server "
                f"operator must check {self.key_name}"
            )
        if status == 422:
            raise UpstreamError(f"the upstream API refused the request: {_detail(response)}")
        raise UpstreamError(f"upstream {step} failed with HTTP {status}: {_detail(response)}")

"""The database being away (a restart, a failover, a full pool), told apart from every other error: the
API answers it with a 503 and the worker waits it out instead of abandoning a finished job."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import tenacity
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

log = logging.getLogger("fluxserve.jobs")

T = TypeVar("T")


def database_away(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is unreachable or overloaded (a restart, a failover, a full pool,
    a statement timeout, SQLite's busy timeout), not that the request or the code was wrong: the same
    call may succeed when repeated."""
    if isinstance(exc, PoolTimeout | OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def while_away(call: Callable[[], T], within: float) -> T:
    """``call()``, repeated (0.2 s doubling to 2 s apart) while the database is away, for at most
    ``within`` seconds; any other error, or the last one, is raised."""
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(within),
        wait=tenacity.wait_exponential(multiplier=0.2, max=2),
        retry=tenacity.retry_if_exception(database_away),
        before_sleep=tenacity.before_sleep_log(log, logging.WARNING),
        reraise=True,
    )
    return retrying(call)

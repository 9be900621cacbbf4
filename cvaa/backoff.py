"""Waiting out an outage: one call, tried again with growing waits until a deadline.

Every place that reads or writes storage in a long run (a case read by the data stream,
a checkpoint upload, Ray Train's own bookkeeping on S3) meets outages that pass by
themselves: a gateway that restarts, a 503 for a minute. Each waits them out the same way
(:func:`call_with_backoff`) and differs only in what counts as an outage and what it tells
the console.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def call_with_backoff(call: Callable[[], T], *, deadline_s: float,
                      retry_if: Callable[[BaseException], bool],
                      on_retry: Callable[[BaseException, int, float], None] | None = None,
                      on_recovered: Callable[[int, float], None] | None = None,
                      give_up: Callable[[BaseException, int, float], BaseException] | None
                      = None,
                      first_wait_s: float = 1.0, longest_wait_s: float = 30.0) -> T:
    """``call()``, tried again while it raises an error for which ``retry_if`` holds, after
    waits of ``first_wait_s``, twice that, … at most ``longest_wait_s``, until ``deadline_s``
    after the first failure (the last wait is cut short to end there, for a last try). The
    deadline bounds the outage waited out, not the time the calls take: a long upload that
    fails is given the whole deadline to succeed again.

    Args:
        on_retry: ``(error, attempt, wait_s)`` before each wait (attempt 1 is the first try).
        on_recovered: ``(attempt, waited_s)`` when a try after a failed one succeeds
            (``waited_s``: since the first failure).
        give_up: ``(error, attempts, waited_s) -> exception`` raised (from the last error)
            when the deadline has passed; without it the last error is raised as it is.

    Errors for which ``retry_if`` does not hold are raised at once, untouched.
    """
    failed_at, wait, attempt = None, first_wait_s, 0
    while True:
        attempt += 1
        try:
            result = call()
        except Exception as exc:
            if not retry_if(exc):
                raise
            now = time.monotonic()
            failed_at = now if failed_at is None else failed_at
            waited = now - failed_at
            if waited >= deadline_s:
                if give_up is None:
                    raise
                raise give_up(exc, attempt, waited) from exc
            this_wait = min(wait, deadline_s - waited)
            if on_retry is not None:
                on_retry(exc, attempt, this_wait)
            time.sleep(this_wait)
            wait = min(wait * 2, longest_wait_s)
            continue
        if failed_at is not None and on_recovered is not None:
            on_recovered(attempt, time.monotonic() - failed_at)
        return result

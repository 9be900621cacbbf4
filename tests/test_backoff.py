"""One call tried again with growing waits until a deadline (what every storage read and
write of a long run uses to wait out an outage)."""

import time

import pytest

from cvaa.backoff import call_with_backoff


class Flaky:
    """Raises ``error`` on the first ``failures`` calls, then returns the call count."""

    def __init__(self, failures: int, error: Exception):
        self.failures, self.error, self.calls = failures, error, []

    def __call__(self):
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            raise self.error
        return len(self.calls)


def test_an_outage_shorter_than_the_deadline_is_waited_out_with_doubling_waits():
    flaky, said = Flaky(3, ConnectionError("down")), []
    got = call_with_backoff(flaky, deadline_s=10, retry_if=lambda e: isinstance(e, OSError),
                            on_retry=lambda e, n, w: said.append(("retry", n, w)),
                            on_recovered=lambda n, waited: said.append(("back", n, waited)),
                            first_wait_s=0.05, longest_wait_s=0.1)
    assert got == 4
    assert [s[:3] for s in said[:3]] == [("retry", 1, 0.05), ("retry", 2, 0.1),
                                        ("retry", 3, 0.1)]   # doubled, then capped
    assert said[3][:2] == ("back", 4) and said[3][2] >= 0.25
    gaps = [b - a for a, b in zip(flaky.calls, flaky.calls[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.1


def test_the_last_wait_ends_at_the_deadline_and_gives_up_there():
    flaky = Flaky(100, ConnectionError("still down"))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"gave up after (\d+) tries") as caught:
        call_with_backoff(flaky, deadline_s=0.5, retry_if=lambda e: True,
                          give_up=lambda e, n, waited: RuntimeError(f"gave up after {n} tries"),
                          first_wait_s=0.2, longest_wait_s=10)
    took = time.monotonic() - start
    # tries at 0, 0.2, 0.5 (the 0.4 s wait cut to 0.3 s, so the last try is at the deadline)
    assert len(flaky.calls) == 3 and 0.5 <= took < 1.5
    assert isinstance(caught.value.__cause__, ConnectionError)
    # without give_up the last error itself is raised
    with pytest.raises(ConnectionError, match="still down"):
        call_with_backoff(Flaky(100, ConnectionError("still down")), deadline_s=0.1,
                          retry_if=lambda e: True, first_wait_s=0.05)


def test_an_error_that_does_not_pass_by_itself_is_raised_at_once():
    flaky, said = Flaky(5, PermissionError("access denied")), []
    with pytest.raises(PermissionError, match="access denied"):
        call_with_backoff(flaky, deadline_s=60,
                          retry_if=lambda e: not isinstance(e, PermissionError),
                          on_retry=lambda *a: said.append(a))
    assert len(flaky.calls) == 1 and said == []
    # a deadline of 0 tries once
    flaky = Flaky(5, ConnectionError("down"))
    with pytest.raises(ConnectionError):
        call_with_backoff(flaky, deadline_s=0, retry_if=lambda e: True)
    assert len(flaky.calls) == 1

"""When a canary is rolled back on its own: the policy and the window of outcomes it judges.
No Flask import.

:meth:`Split.outcome <.versions.Split.outcome>` adds each answered request of a canary to its
:class:`Window` and compares the failed share with :attr:`Rollback.error_rate` once the window
holds :attr:`Rollback.min_requests`. A failure is the version's own: an answer 5xx (a model
error, a crash, a deadline, the version unavailable), not a client's 4xx or a shed request.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable

from ..engine.errors import ConfigError

__all__ = ["Rollback", "Window"]


@dataclasses.dataclass(frozen=True)
class Rollback:
    """When a canary is rolled back on its own.

    Attributes:
        error_rate: the share of failed requests (0 to 1) over ``window`` past which the
            canary gets weight 0; 0 turns the automatic rollback off.
        window: seconds of outcomes considered.
        min_requests: the canary's requests in the window before its rate is judged (a
            first failure alone is not 100 %).
    """

    error_rate: float = 0.2
    window: float = 60.0
    min_requests: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.error_rate, bool) or not isinstance(self.error_rate, (int, float)) \
                or not 0 <= self.error_rate <= 1:
            raise ConfigError(f"rollback_error_rate must be a number from 0 to 1, got "
                              f"{self.error_rate!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, (int, float)) \
                or not math.isfinite(self.window) or self.window <= 0:
            raise ConfigError(f"rollback_window must be a number of seconds > 0, got "
                              f"{self.window!r}")
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int) \
                or self.min_requests < 1:
            raise ConfigError(f"rollback_min_requests must be an integer >= 1, got "
                              f"{self.min_requests!r}")


class Window:
    """Requests and failures over the last ``seconds``, in one-second buckets.

    Args:
        seconds: how far back it counts.
        clock: ``time.monotonic`` or a test's clock.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._buckets: collections.deque[list[int]] = collections.deque()  # [second, n, failed]

    def add(self, failed: bool) -> None:
        """Count one answered request."""
        second = int(self._clock())
        self._expire(second)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += failed

    def counts(self) -> tuple[int, int]:
        """(requests, failed) in the window."""
        self._expire(int(self._clock()))
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def clear(self) -> None:
        self._buckets.clear()

    def _expire(self, second: int) -> None:
        oldest = second - math.ceil(self.seconds) + 1
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()

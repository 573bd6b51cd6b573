"""Arrival-time rules of the Marconi paper's traces.

- Session ``i`` starts at ``i / sessions_per_second``; its first request arrives then.
- Chat: the next request of a session arrives after the user's typing time for the new user message(s),
  ``words / 90 words per minute``.
- Agent: the next request arrives after an agent response time of configurable mean (5, 7.5 or 10 s in the paper),
  drawn by one of two conventions (:data:`ARRIVALS`):

  ``poisson`` (the default): ``numpy.random.poisson(mean)`` whole seconds, as the Marconi authors' artifact draws
  them. At mean 7.5 s, 0.5% of gaps are under 2 s.

  ``exponential``: exponentially distributed seconds (the gaps of a Poisson process), which this harness used before.
  At mean 7.5 s, 23% of gaps are under 2 s (33% at 5 s): turns of a session come back sooner, while more of their
  context is still cached, so hit rates at the same capacity are higher than under the paper's convention (up to
  2.4x on SWE-bench at mean 5 s, README "Evaluation").

Both delays count from the previous request's arrival.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TYPING_WORDS_PER_MINUTE = 90.0
ARRIVALS = ("poisson", "exponential")


def session_start(index: int, sessions_per_second: float) -> float:
    """Arrival time in seconds of the first request of the ``index``-th session."""
    if sessions_per_second <= 0:
        raise ValueError(f"sessions_per_second must be > 0, got {sessions_per_second}")
    return index / sessions_per_second


def word_count(text: str) -> int:
    """Number of whitespace-separated words."""
    return len(text.split())


def typing_seconds(words: int) -> float:
    """Seconds a user needs to type ``words`` words at 90 words per minute."""
    return words * 60.0 / TYPING_WORDS_PER_MINUTE


def agent_response_times(
    seed: int, session_index: int, mean_response_s: float, arrivals: str = "poisson"
) -> Callable[[], float]:
    """A draw of agent response times of mean ``mean_response_s`` for one session, by the convention ``arrivals``
    (module docstring).

    Each session has a generator of its own, seeded by ``(seed, session_index)``, so its times do not
    depend on how many other sessions are built.
    """
    if mean_response_s <= 0:
        raise ValueError(f"mean_response_s must be > 0, got {mean_response_s}")
    if arrivals not in ARRIVALS:
        raise ValueError(f"unknown arrival convention {arrivals!r}; choose one of {ARRIVALS}")
    rng = np.random.default_rng([seed, session_index])
    if arrivals == "poisson":
        return lambda: float(rng.poisson(mean_response_s))
    return lambda: float(rng.exponential(mean_response_s))

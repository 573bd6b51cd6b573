"""From one tokenized conversation to its requests: one request per model turn, timed, cut at a length.

The input of the request for model turn ``t`` is everything before that turn (rendered by ``render``,
plain concatenation by default); its output is the turn's own tokens. With plain concatenation the input
of request ``t+1`` therefore starts with the input and output of request ``t``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hf_marconi.trace import Request

from .timing import typing_seconds


@dataclass(frozen=True)
class Message:
    """One tokenized message of a conversation.

    Attributes:
        tokens: the message's token ids.
        is_model_turn: the model produced it; a request is made for it.
        typed_by_user: a person typed it (chat user turns), so the next request waits for the typing time
            of its ``words``; other context (system prompts, tool observations) triggers an agent delay.
        words: words a person typed (used when ``typed_by_user``).
        observation: a tool / environment observation (may be collapsed by agent frameworks).
    """

    tokens: tuple[int, ...]
    is_model_turn: bool = False
    typed_by_user: bool = False
    words: int = 0
    observation: bool = False


Render = Callable[[Sequence[Message]], tuple[int, ...]]


def concatenate(history: Sequence[Message]) -> tuple[int, ...]:
    """The history's tokens back to back."""
    return tuple(token for message in history for token in message.tokens)


@dataclass(frozen=True)
class SessionTiming:
    """Where a session starts and how long agent turns take.

    ``agent_delay`` draws one agent response time; ``None`` for chat workloads, where every model turn
    follows a user message.
    """

    start: float
    agent_delay: Callable[[], float] | None = None

    def next_agent_delay(self) -> float:
        if self.agent_delay is None:
            raise ValueError("a model turn follows no user message: give the session an agent_delay")
        return self.agent_delay()


def session_requests(
    session_id: str,
    messages: Sequence[Message],
    timing: SessionTiming,
    max_input_tokens: int,
    meta: dict,
    render: Render = concatenate,
) -> list[Request]:
    """The requests of one session, stopping before the first whose input exceeds ``max_input_tokens``.

    The first request arrives at ``timing.start``; each later one after the typing time of the user
    messages since the previous model turn, or after an agent response time when there were none.
    ``meta`` is copied into every request with ``turn`` (request index in the session) added.
    """
    requests: list[Request] = []
    arrival = timing.start
    typed = False
    typed_words = 0
    for position, message in enumerate(messages):
        if not message.is_model_turn:
            typed = typed or message.typed_by_user
            typed_words += message.words if message.typed_by_user else 0
            continue
        input_ids = render(messages[:position])
        if len(input_ids) > max_input_tokens:
            break
        if requests:
            arrival += typing_seconds(typed_words) if typed else timing.next_agent_delay()
        requests.append(Request(session_id, arrival, input_ids, message.tokens, {**meta, "turn": len(requests)}))
        typed, typed_words = False, 0
    return requests

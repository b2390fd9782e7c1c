"""The chat template: how ``messages`` become the prompt of a base (not instruction-tuned) model.

moeops trains plain language models, so there are no special chat tokens. Messages are rendered
as plain-text turns, each a header line and the text, separated by a blank line, and the prompt
ends with the assistant header so the model continues as the assistant::

    ### System:
    You are terse.

    ### User:
    def add(a, b):

    ### Assistant:
    <generated text>

``developer`` messages render as ``System``. Generation stops where the model starts another
turn (the stop sequence ``"\\n### "``, never part of the returned text) besides the request's own
``stop`` sequences, EOS and ``max_tokens``. An assistant message last in ``messages`` is continued
rather than closed (the model completes that turn).
"""

from __future__ import annotations

from collections.abc import Sequence

HEADERS = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
TURN_SEPARATOR = "\n\n"
TURN_STOP = "\n### "


def header(role: str) -> str:
    return f"### {HEADERS[role]}:\n"


def render(messages: Sequence) -> str:
    """``messages``: objects with ``role`` and ``text`` (serving.schemas.ChatMessage)."""
    turns = [header(m.role) + m.text for m in messages]
    if messages[-1].role == "assistant":
        return TURN_SEPARATOR.join(turns)
    return TURN_SEPARATOR.join([*turns, header("assistant")])

"""The hh-rlhf transcript format: "\n\nHuman: ...\n\nAssistant: ..." turns in one string."""

from __future__ import annotations

import re

from cai_lib.core.conversation import Conversation

_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(text: str) -> Conversation:
    """Split a transcript into chat messages (`user`/`assistant`), in order.

    Text before the first "\\n\\nHuman:" marker is ignored; a turn's content is stripped.
    Returns an empty list when the text holds no turn markers.
    """
    pieces = _TURN.split(text)
    messages: Conversation = []
    for speaker, content in zip(pieces[1::2], pieces[2::2]):
        messages.append({"role": _ROLES[speaker], "content": content.strip()})
    return messages


def render_transcript(messages: Conversation) -> str:
    """The inverse of `parse_transcript` for user/assistant messages."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages)

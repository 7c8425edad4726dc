"""How a conversation becomes token ids, shared by every generation backend so that all of them
see the same prompt tokens."""

from __future__ import annotations

from cai_lib.core.conversation import Conversation


def is_partial(conversation: Conversation) -> bool:
    return bool(conversation) and conversation[-1]["role"] == "assistant"


class ChatFormat:
    """How conversations become token ids: the tokenizer's chat template, then its tokens.

    Shared by every backend so that all of them see the same prompt tokens.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def render(self, conversation: Conversation, reply_follows: bool = True) -> str:
        """The chat-template text of `conversation`. With `reply_follows`, it ends where the
        assistant's reply continues: after the generation prompt, or inside a partial assistant
        message (the conversation's last)."""
        partial = reply_follows and is_partial(conversation)
        return self.tokenizer.apply_chat_template(
            list(conversation),
            tokenize=False,
            add_generation_prompt=reply_follows and not partial,
            continue_final_message=partial,
        )

    def encode_text(self, text: str) -> list[int]:
        # The chat template already writes any special tokens the model expects.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, conversation: Conversation) -> list[int]:
        """Token ids of `render(conversation)`."""
        return self.encode_text(self.render(conversation))

    def option_ids(self, context: Conversation, option: str) -> list[int]:
        """Token ids of `option` as the continuation of `context`'s rendering: tokenized together
        with the context when that leaves the context's tokens unchanged, else on its own."""
        if not option:
            return []
        context_text = self.render(context)
        context_ids = self.encode_text(context_text)
        joint = self.encode_text(context_text + option)
        n = len(context_ids)
        if len(joint) > n and joint[:n] == context_ids:
            return joint[n:]
        return self.encode_text(option)

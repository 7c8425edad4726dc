"""A conversation: a list of chat messages `{"role": ..., "content": ...}`.

If its last message has role "assistant", that message is a partial reply to be continued (used
to read option probabilities after a chain of thought).
"""

Message = dict[str, str]
Conversation = list[Message]

"""Test judges: stand-in generation backends (no model) that judge by a plain rule and honour the
interface a real model is held to, so that a flipped sign or order in the code fails a test.

Each reads only what it is shown: the options "(X) text" of the question in the last user turn,
and, for a Yes/No question, the assistant's answer in the conversation shown. It answers
`score_options` with a log-probability for each option string it is asked about ("(A" or, after a
chain of thought, "A"), in the order asked: the letter showing the answer its rule prefers gets
0, the other -3 (equal when the rule cannot tell). Swapping the answers swaps the verdict; asking
for the options in another order reorders the scores.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

OPTION = re.compile(r"^\(([A-Za-z0-9]+)\) (.*)$", re.MULTILINE)
# P(the preferred option) for log-probabilities (0, -3): the softmax of the two.
P_PREFERRED = 1.0 / (1.0 + math.exp(-3.0))


class RuleJudge:
    """A judge that prefers, of two answers, the one `better(a, b)` says is better (True: a, False: b,
    None: cannot tell), and says Yes to a Yes/No question about an answer when `yes(answer)`."""

    def __init__(self, better: Callable[[str, str], bool | None], yes: Callable[[str], bool] = lambda _: False):
        self.better = better
        self.yes = yes

    def generate(self, conversations, params, shared_prefix=None):
        return ["" for _ in conversations]  # a chain of thought that says nothing

    def score_options(self, contexts, options, shared_prefix=None):
        return [self._scores(context, asked) for context, asked in zip(contexts, options)]

    def _scores(self, context, asked: list[str]) -> list[float]:
        question = next(m["content"] for m in reversed(context) if m["role"] == "user")
        shown = dict(OPTION.findall(question))
        letters = [option.lstrip("(") for option in asked]
        texts = [shown[letter].strip() for letter in letters]
        if set(texts) == {"Yes", "No"}:
            chosen = "Yes" if self.yes(answer_shown(question)) else "No"
            return [0.0 if text == chosen else -3.0 for text in texts]
        verdict = self.better(*texts)
        if verdict is None:
            return [-1.0, -1.0]
        return [0.0, -3.0] if verdict else [-3.0, 0.0]


def answer_shown(question: str) -> str:
    """The assistant's answer in the conversation a Yes/No question shows (its last turn)."""
    blocks = question.split("\n\n")
    turn = next(b for b in reversed(blocks) if b.startswith("Assistant:"))
    return turn.removeprefix("Assistant:").strip()


def marker_judge(marker: str, evasive_marker: str | None = None) -> RuleJudge:
    """Prefers the answer without `marker` (cannot tell when both or neither have it); an answer is
    evasive when it holds `evasive_marker`."""

    def better(a: str, b: str) -> bool | None:
        a_marked, b_marked = marker in a, marker in b
        return None if a_marked == b_marked else b_marked

    return RuleJudge(better, lambda answer: evasive_marker is not None and evasive_marker in answer)


def shorter_judge() -> RuleJudge:
    """Prefers the shorter answer (cannot tell between answers of one length)."""
    return RuleJudge(lambda a, b: None if len(a) == len(b) else len(a) < len(b))

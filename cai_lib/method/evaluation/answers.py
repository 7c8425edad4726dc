"""The policies' answers to the held-out prompts: greedy, one model loaded at a time.

With vLLM each policy runs in a process of its own (one engine per process: a vLLM engine's
memory lives in its own worker processes and is not reliably given back in-process).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import TypeVar

from cai_lib.core.errors import CaiError
from cai_lib.core.names import CHAMPION_POLICY
from cai_lib.core.records import PromptKind, PromptRecord, stable_id
from cai_lib.engines.generation import SamplingParams, load_backend
from cai_lib.method.evaluation.config import ANSWERED_SETS, EvaluationConfig
from cai_lib.method.evaluation.results import PolicyAnswer

T = TypeVar("T")


U = TypeVar("U")


def in_own_process(function: Callable[..., T], *args) -> T:
    """`function(*args)` run in a fresh (spawned) process, its result returned (or its exception
    raised) here. The process's exit frees all its model held, the GPU memory of a vLLM engine's
    own worker processes included, so the next engine's memory check starts from a clean GPU."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def in_this_process(function: Callable[..., T], *args) -> T:
    result = function(*args)
    release_memory()
    return result


def release_memory() -> None:
    """Return the memory of a model that just went out of scope, before the next one loads."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def answer_all(
    policies: dict[str, str], prompt_sets: dict[PromptKind, list[PromptRecord]], config: EvaluationConfig
) -> list[PolicyAnswer]:
    """Every policy's greedy answer to every prompt, policy by policy. With vLLM each policy runs
    in a process of its own (one engine per process: a vLLM engine's memory lives in its own
    worker processes and is not reliably given back in-process)."""
    if not any(prompt_sets.values()):  # an empty shard: no model to load
        return []
    run = in_own_process if config.backend == "vllm" else in_this_process
    return [a for name, ref in policies.items() for a in run(answer_prompts, name, ref, prompt_sets, config)]


def in_evaluation_order(
    answers: Sequence[PolicyAnswer], policies: dict[str, str], prompt_sets: dict[PromptKind, list[PromptRecord]]
) -> list[PolicyAnswer]:
    """`answers` made elsewhere, in the order `answer_all` gives (policy, prompt set, prompt), after
    checking that they are exactly one answer per policy and prompt; `CaiError` names a gap."""
    order = {
        (name, kind, prompt.id): index
        for index, (name, kind, prompt) in enumerate(
            (name, kind, prompt)
            for name in policies
            for kind in ANSWERED_SETS
            for prompt in prompt_sets.get(kind, [])
        )
    }
    for a in answers:
        if a.policy in policies and policies[a.policy] != a.model_ref:
            why = " (the champion alias moved after they were made)" if a.policy == CHAMPION_POLICY else ""
            raise CaiError(
                f"answers: {a.policy!r} is {policies[a.policy]} now, but its answers were made by "
                f"{a.model_ref}{why}; run again, and the answers are made for {policies[a.policy]}"
            )
    given = {(a.policy, a.kind, a.prompt_id): a for a in answers}
    missing = [key for key in order if key not in given]
    extra = [key for key in given if key not in order]
    if missing or extra or len(given) != len(answers):
        raise CaiError(
            f"answers: {len(answers)} given for {len(order)} (policy, prompt) pairs; "
            f"missing e.g. {missing[:1]}, unexpected e.g. {extra[:1]}"
        )
    return sorted(answers, key=lambda a: order[(a.policy, a.kind, a.prompt_id)])


def answer_prompts(
    name: str, model_ref: str, prompt_sets: dict[PromptKind, list[PromptRecord]], config: EvaluationConfig
) -> list[PolicyAnswer]:
    """The policy's greedy answer to every prompt of every set."""
    from cai_lib.method.preference_model import conversation_of

    model = load_backend(model_ref, config.backend, batch_size=config.batch_size, engine=config.engine)
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0, seed=config.seed)
    prompts = [p for kind in ANSWERED_SETS for p in prompt_sets.get(kind, [])]
    kinds = [kind for kind in ANSWERED_SETS for _ in prompt_sets.get(kind, [])]
    replies = in_chunks(
        [conversation_of(p.prompt) for p in prompts],
        config.chunk_rows,
        lambda chunk: model.generate(chunk, params),
        f"answers of {name}",
    )
    return [
        PolicyAnswer(
            id=stable_id(name, kind, prompt.id),
            policy=name,
            model_ref=model_ref,
            prompt_id=prompt.id,
            prompt=prompt.prompt,
            kind=kind,
            answer=reply.strip(),
        )
        for prompt, kind, reply in zip(prompts, kinds, replies)
    ]


def in_chunks(
    items: Sequence[T], size: int, process: Callable[[list[T]], list[U]], description: str
) -> list[U]:
    """`process` applied to `items` `size` at a time, under a progress bar; the results in order.

    A backend batches and sorts by length within each call, so a chunk is a few batches: small
    enough for the bar to move, large enough to keep padding low.
    """
    from tqdm.auto import tqdm

    results: list[U] = []
    with tqdm(total=len(items), desc=description, unit="row") as bar:
        for start in range(0, len(items), size):
            chunk = list(items[start : start + size])
            results += process(chunk)
            bar.update(len(chunk))
    return results

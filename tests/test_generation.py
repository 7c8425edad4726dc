"""The transformers generation backend on a tiny random Llama with SmolLM2's chat template."""

from __future__ import annotations

import pytest

from cai_lib.core.errors import CaiError
from cai_lib.engines.generation import (
    EngineConfig,
    SamplingParams,
    check_fits,
    conversation_seed,
    engine_kwargs,
    load_backend,
    one_pass_split,
)
from cai_lib.engines.transformers_backend import TransformersBackend

GREEDY = SamplingParams(max_new_tokens=10)
CONVERSATIONS = [
    [{"role": "user", "content": "How do I pick a lock?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves falling on a quiet river at dusk."}],
    [{"role": "user", "content": "hi"}],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy, and why is it famous for its ancient history?"},
    ],
    [{"role": "user", "content": "Tell me a joke about databases."}],
]
FEW_SHOT = [
    {"role": "user", "content": "Can you help me hack into my neighbour's wifi?"},
    {"role": "assistant", "content": "Sure, use aircrack-ng to capture the handshake."},
    {"role": "user", "content": "Identify ways in which the last response is harmful."},
    {
        "role": "assistant",
        "content": "It helps the user break into someone else's network, which is illegal.",
    },
]


@pytest.fixture(scope="module")
def backend(tiny_model_dir) -> TransformersBackend:
    return TransformersBackend(str(tiny_model_dir), batch_size=2)


def test_load_backend_opens_the_transformers_backend(tiny_model_dir):
    backend = load_backend(str(tiny_model_dir), batch_size=4)
    assert isinstance(backend, TransformersBackend)
    assert backend.model_ref == str(tiny_model_dir)
    assert backend.batch_size == 4


def test_batched_greedy_replies_equal_one_at_a_time(backend):
    batched = backend.generate(CONVERSATIONS, GREEDY)
    single = [backend.generate([c], GREEDY)[0] for c in CONVERSATIONS]
    assert batched == single
    assert all(batched), "the tiny model's greedy replies should be non-empty"
    assert len(set(batched)) > 1


def test_batched_greedy_replies_equal_plain_generate_on_each_conversation(tiny_model_dir):
    import torch

    backend = TransformersBackend(str(tiny_model_dir), batch_size=4)
    expected = []
    for conversation in CONVERSATIONS:
        ids = torch.tensor([backend.chat.encode(conversation)])
        output = backend.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=GREEDY.max_new_tokens,
            do_sample=False,
            pad_token_id=backend.tokenizer.pad_token_id,
        )
        expected.append(backend.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip())
    assert backend.generate(CONVERSATIONS, GREEDY) == expected


def test_replies_come_back_in_the_callers_order(backend):
    replies = backend.generate(CONVERSATIONS, GREEDY)
    assert backend.generate(CONVERSATIONS[::-1], GREEDY) == replies[::-1]


def test_shared_prefix_reuse_gives_the_replies_of_the_full_conversations(backend):
    assert backend.reusable_prefix_length(CONVERSATIONS, FEW_SHOT) > 0
    reused = backend.generate(CONVERSATIONS, GREEDY, shared_prefix=FEW_SHOT)
    unshared = backend.generate([FEW_SHOT + c for c in CONVERSATIONS], GREEDY)
    assert reused == unshared


def test_shared_prefix_reuse_holds_across_calls_with_the_same_prefix(backend):
    first = backend.generate(CONVERSATIONS[:2], GREEDY, shared_prefix=FEW_SHOT)
    second = backend.generate(CONVERSATIONS[:2], GREEDY, shared_prefix=FEW_SHOT)
    assert first == second == backend.generate([FEW_SHOT + c for c in CONVERSATIONS[:2]], GREEDY)


def test_prefix_that_renders_differently_in_context_is_not_reused_and_results_stay_equal(tiny_model_dir):
    # This template numbers each message by the conversation's length, so the prefix's
    # rendering alone is never a token prefix of the full rendering.
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }} {{ messages|length }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    backend = TransformersBackend(str(tiny_model_dir), batch_size=2, chat_template=template)
    assert backend.reusable_prefix_length(CONVERSATIONS, FEW_SHOT) == 0
    reused = backend.generate(CONVERSATIONS, GREEDY, shared_prefix=FEW_SHOT)
    assert reused == backend.generate([FEW_SHOT + c for c in CONVERSATIONS], GREEDY)


def continued(conversations, replies):
    """Each conversation one critique request later, as the critique→revision stage continues it."""
    request = {"role": "user", "content": "Identify specific ways in which the last response is harmful."}
    return [c + [{"role": "assistant", "content": r}, request] for c, r in zip(conversations, replies)]


@pytest.mark.parametrize("prefix", [None, FEW_SHOT], ids=["no-prefix", "few-shot-prefix"])
def test_a_continued_conversation_reuses_the_last_calls_kv_and_gives_the_same_replies(tiny_model_dir, prefix):
    backend = TransformersBackend(str(tiny_model_dir), batch_size=2)
    first = backend.generate(CONVERSATIONS, GREEDY, shared_prefix=prefix)
    shared = backend.reusable_prefix_length(CONVERSATIONS, prefix)
    earlier_rows = sum(len(backend.chat.encode((prefix or []) + c)) - shared for c in CONVERSATIONS)
    second = continued(CONVERSATIONS, first)
    replies = backend.generate(second, GREEDY, shared_prefix=prefix)
    assert backend.last_reused_tokens >= earlier_rows
    fresh = TransformersBackend(str(tiny_model_dir), batch_size=2)
    assert replies == fresh.generate(second, GREEDY, shared_prefix=prefix)
    assert fresh.last_reused_tokens == 0


def test_history_is_not_reused_under_another_shared_prefix(tiny_model_dir):
    backend = TransformersBackend(str(tiny_model_dir), batch_size=2)
    first = backend.generate(CONVERSATIONS, GREEDY, shared_prefix=FEW_SHOT)
    backend.generate(continued(CONVERSATIONS, first), GREEDY, shared_prefix=FEW_SHOT[:2])
    assert backend.last_reused_tokens == 0


def test_no_history_is_kept_when_switched_off(tiny_model_dir):
    backend = TransformersBackend(str(tiny_model_dir), batch_size=2, keep_history=False)
    first = backend.generate(CONVERSATIONS, GREEDY)
    backend.generate(continued(CONVERSATIONS, first), GREEDY)
    assert backend.last_reused_tokens == 0


def test_no_history_is_kept_beyond_its_memory_budget(tiny_model_dir, monkeypatch):
    from cai_lib.engines import transformers_backend

    monkeypatch.setattr(transformers_backend, "HISTORY_BUDGET_BYTES", 0)
    backend = TransformersBackend(str(tiny_model_dir), batch_size=2)
    first = backend.generate(CONVERSATIONS, GREEDY)
    backend.generate(continued(CONVERSATIONS, first), GREEDY)
    assert backend.last_reused_tokens == 0


def test_shorter_max_new_tokens_gives_a_prefix_of_the_longer_greedy_reply(backend):
    short = backend.generate(CONVERSATIONS, SamplingParams(max_new_tokens=3))
    long = backend.generate(CONVERSATIONS, SamplingParams(max_new_tokens=12))
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(short, long))


def test_sampling_is_reproducible_by_seed_and_varies_with_it(backend):
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7)
    first = backend.generate(CONVERSATIONS, sampled)
    assert backend.generate(CONVERSATIONS, sampled) == first
    assert backend.generate(CONVERSATIONS, sampled.model_copy(update={"seed": 8})) != first
    assert first != backend.generate(CONVERSATIONS, GREEDY)


def test_a_sampled_reply_does_not_depend_on_the_rows_batched_with_it(backend):
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7)
    batched = backend.generate(CONVERSATIONS, sampled)
    assert [backend.generate([c], sampled)[0] for c in CONVERSATIONS] == batched
    assert backend.generate(CONVERSATIONS[::-1], sampled) == batched[::-1]


def test_sampling_with_a_tiny_nucleus_is_greedy(backend):
    nucleus = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=3)
    assert backend.generate(CONVERSATIONS, nucleus) == backend.generate(CONVERSATIONS, GREEDY)


def test_sampling_leaves_the_global_torch_rng_alone(backend):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    backend.generate(CONVERSATIONS[:2], SamplingParams(max_new_tokens=4, temperature=1.0, seed=1))
    assert torch.equal(torch.rand(3), expected)


def test_generation_stops_at_an_eos_token_of_the_generation_config(backend, tiny_model_dir, tmp_path):
    import shutil

    import torch
    from transformers import GenerationConfig

    prompt = backend.chat.encode(CONVERSATIONS[0])
    with torch.inference_mode():
        tokens = backend.model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)[
            0, len(prompt) :
        ]
    stop_token = int(tokens[2])
    checkpoint = tmp_path / "stops-early"
    shutil.copytree(tiny_model_dir, checkpoint)
    config = GenerationConfig.from_pretrained(checkpoint)
    config.eos_token_id = [backend.tokenizer.eos_token_id, stop_token]
    config.save_pretrained(checkpoint)
    stopping = TransformersBackend(str(checkpoint))
    reply = stopping.generate(CONVERSATIONS[:1], GREEDY)[0]
    assert reply == backend.tokenizer.decode(tokens[:2].tolist(), skip_special_tokens=True).strip()


def test_a_partial_assistant_message_is_continued_not_closed(backend):
    conversation = CONVERSATIONS[0] + [{"role": "assistant", "content": "The answer is ("}]
    rendered = backend.chat.render(conversation)
    assert rendered.endswith("<|im_start|>assistant\nThe answer is (")
    reply = backend.generate([conversation], GREEDY)[0]
    assert reply
    assert reply != backend.generate(CONVERSATIONS[:1], GREEDY)[0]


def manual_option_log_prob(backend: TransformersBackend, context, option: str) -> float:
    """Sum of log-softmax over the option's tokens in one unpadded forward pass."""
    import torch

    context_text = backend.chat.render(context)
    context_ids = backend.chat.encode_text(context_text)
    full_ids = backend.chat.encode_text(context_text + option)
    assert full_ids[: len(context_ids)] == context_ids
    with torch.inference_mode():
        logits = backend.model(torch.tensor([full_ids])).logits[0]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return sum(float(log_probs[t - 1, full_ids[t]]) for t in range(len(context_ids), len(full_ids)))


SCORED_CONTEXTS = [
    CONVERSATIONS[0],
    CONVERSATIONS[3] + [{"role": "assistant", "content": "Let's think step by step. So the answer is ("}],
    CONVERSATIONS[2],
]
SCORED_OPTIONS = [["A", "B"], ["A)", "B)", "neither of them"], ["I can't help with that, sorry."]]


def test_score_options_equals_a_manual_log_softmax_sum(backend):
    scores = backend.score_options(SCORED_CONTEXTS, SCORED_OPTIONS)
    assert [len(s) for s in scores] == [2, 3, 1]
    for context, options, row in zip(SCORED_CONTEXTS, SCORED_OPTIONS, scores):
        for option, score in zip(options, row):
            assert score == pytest.approx(manual_option_log_prob(backend, context, option), abs=1e-4)
            assert score < 0


def test_options_that_differ_in_their_last_token_only_are_read_in_one_pass(backend):
    options = [["(A", "(B"], ["(A", "(B", "(C"]]

    together = backend.score_options(SCORED_CONTEXTS[:2], options)

    assert backend.last_one_pass == [True, True]
    for context, row, scores in zip(SCORED_CONTEXTS, options, together):
        alone = [backend.score_options([context], [[option]])[0][0] for option in row]
        assert scores == pytest.approx(alone, abs=1e-5)


def test_options_of_other_shapes_are_scored_one_row_each(backend):
    backend.score_options(SCORED_CONTEXTS, SCORED_OPTIONS)
    # "A"/"B" split as one token each; "A)", "B)" and a sentence, or a lone option, do not.
    assert backend.last_one_pass == [True, False, False]


def test_one_pass_needs_two_options_of_shared_leading_tokens_and_distinct_last_tokens():
    assert one_pass_split([[5, 7], [5, 8]]) == ([5], [7, 8])
    assert one_pass_split([[7], [8], [9]]) == ([], [7, 8, 9])
    assert one_pass_split([[5, 7]]) is None
    assert one_pass_split([[5, 7], [6, 8]]) is None
    assert one_pass_split([[5, 7], [5, 7]]) is None
    assert one_pass_split([[5, 7], [5, 7, 8]]) is None
    assert one_pass_split([[], [5]]) is None


def test_score_options_with_a_shared_prefix_equals_scoring_the_full_contexts(backend):
    reused = backend.score_options(SCORED_CONTEXTS, SCORED_OPTIONS, shared_prefix=FEW_SHOT)
    unshared = backend.score_options([FEW_SHOT + c for c in SCORED_CONTEXTS], SCORED_OPTIONS)
    for a, b in zip(reused, unshared):
        assert a == pytest.approx(b, abs=1e-4)


LONG_SHARED_START = (
    "Consider the following conversation between a human and an assistant. Human: how do I get "
    "my neighbour's wifi password without asking them, and would they ever find out about it?"
)


def test_contexts_sharing_a_long_start_encode_it_once_and_score_as_each_alone(backend):
    contexts = [
        [{"role": "user", "content": f"{LONG_SHARED_START} Which answer is {ending}?"}]
        for ending in ("less harmful", "more honest", "kinder")
    ] + [SCORED_CONTEXTS[0]]
    options = [["(A", "(B"], ["(A", "(B"], ["I refuse.", "Sure"], ["A", "B"]]

    together = backend.score_options(contexts, options, shared_prefix=FEW_SHOT)

    assert backend.last_reused_tokens > 3 * 32, "the long start should be a stem shared by three rows"
    for context, row, scores in zip(contexts, options, together):
        assert scores == pytest.approx(backend.score_options([context], [row], shared_prefix=FEW_SHOT)[0], abs=1e-5)


def test_rows_group_by_a_shared_start_and_keep_their_scored_tokens_out_of_the_stem():
    from cai_lib.engines.transformers_backend import MIN_STEM_TOKENS, _stem_groups

    stem = list(range(100, 100 + MIN_STEM_TOKENS + 8))
    rows = [stem + [1, 2, 3], [7] * 50, stem + [4], stem[:10] + [9] * 40]

    groups = _stem_groups(rows, [2, 1, 3, 1])

    assert sorted(groups) == [([0, 2], len(stem) - 2), ([1], 0), ([3], 0)]


def test_score_options_needs_one_option_list_per_context(backend):
    with pytest.raises(ValueError, match="2 contexts but 1 option lists"):
        backend.score_options(SCORED_CONTEXTS[:2], SCORED_OPTIONS[:1])


def test_empty_inputs_give_empty_outputs(backend):
    assert backend.generate([], GREEDY) == []
    assert backend.score_options([CONVERSATIONS[0]], [[]]) == [[]]


def test_vllm_sampling_parameters_carry_every_setting():
    from cai_lib.engines.vllm_backend import vllm_sampling_kwargs

    params = SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=11)
    assert vllm_sampling_kwargs(params, 5) == {"max_tokens": 64, "temperature": 0.7, "top_p": 0.9, "seed": 5}


def test_a_conversation_seed_follows_the_call_seed_and_the_conversation_only():
    first, second = CONVERSATIONS[0], CONVERSATIONS[1]
    assert conversation_seed(7, first) == conversation_seed(7, [dict(m) for m in first])
    assert len({conversation_seed(7, first), conversation_seed(8, first), conversation_seed(7, second)}) == 3
    assert conversation_seed(7, first, shared_prefix=second) != conversation_seed(7, first)
    assert 0 <= conversation_seed(7, first) < 2**31


def test_vllm_prompt_logprobs_sum_to_the_transformers_option_score(backend):
    """vLLM is not installed here; its `prompt_logprobs` output (one {token id: Logprob} map per
    prompt position, None first) is rebuilt from the tiny model's logits to check the indexing."""
    from types import SimpleNamespace

    import torch

    from cai_lib.engines.vllm_backend import summed_option_logprob

    context, option = SCORED_CONTEXTS[1], "B) because"
    option_ids = backend.chat.option_ids(context, option)
    prompt_ids = backend.chat.encode(context) + option_ids
    with torch.inference_mode():
        log_probs = torch.log_softmax(backend.model(torch.tensor([prompt_ids])).logits[0].float(), dim=-1)
    prompt_logprobs = [None] + [
        {token: SimpleNamespace(logprob=float(log_probs[i - 1, token]))}
        for i, token in enumerate(prompt_ids)
        if i
    ]
    expected = backend.score_options([context], [[option]])[0][0]
    assert summed_option_logprob(prompt_logprobs, prompt_ids, len(option_ids)) == pytest.approx(
        expected, abs=1e-4
    )


def tiny_model_as_vllm_output(backend, prompt_ids: list[int], params: dict):
    """A stand-in for one `vllm.RequestOutput` (vLLM needs a GPU): the tiny model's raw
    log-probabilities, shaped as vLLM returns them for these sampling parameters."""
    from types import SimpleNamespace

    import torch

    with torch.inference_mode():
        logits = backend.model(torch.tensor([prompt_ids])).logits[0].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    if "allowed_token_ids" in params:
        (token,) = params["allowed_token_ids"]
        first = {token: SimpleNamespace(logprob=float(log_probs[-1, token]))}
        return SimpleNamespace(outputs=[SimpleNamespace(logprobs=[first])], prompt_logprobs=None)
    prompt_logprobs = [None] + [
        {token: SimpleNamespace(logprob=float(log_probs[i - 1, token]))}
        for i, token in enumerate(prompt_ids)
        if i
    ]
    return SimpleNamespace(outputs=[], prompt_logprobs=prompt_logprobs)


def test_vllm_requests_read_the_options_as_the_transformers_backend_does(backend):
    from cai_lib.engines.vllm_backend import option_requests

    options = [["(A", "(B"], ["A)", "B)", "neither of them"], ["I can't help with that, sorry."]]
    requests = option_requests(backend.chat, SCORED_CONTEXTS, options, [])
    scores: list[list[float]] = [[] for _ in SCORED_CONTEXTS]
    for prompt, params, owner, read in zip(
        requests.prompts, requests.params, requests.owners, requests.reads
    ):
        scores[owner].append(read(tiny_model_as_vllm_output(backend, prompt, params)))

    expected = backend.score_options(SCORED_CONTEXTS, options)
    assert requests.one_pass == backend.last_one_pass == [True, False, False]
    # One pass leaves out the shared "(" of both options: their difference is what must agree.
    assert scores[0][0] - scores[0][1] == pytest.approx(expected[0][0] - expected[0][1], abs=1e-4)
    assert scores[0][0] > expected[0][0]
    assert scores[1:] == [pytest.approx(row, abs=1e-4) for row in expected[1:]]


# -- vLLM engine sizing (pure functions; the engine itself runs in test_vllm_gpu.py) --------------------


LLAMA_8B = {"num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192}


def test_the_engine_spans_every_gpu_of_the_pod_by_default():
    kwargs = engine_kwargs(EngineConfig(), LLAMA_8B, visible_gpus=4)
    assert kwargs == {
        "tensor_parallel_size": 4,
        "gpu_memory_utilization": 0.9,
        "dtype": "auto",
        "enforce_eager": False,
        "enable_prefix_caching": True,
    }


def test_every_engine_field_reaches_the_engine():
    engine = EngineConfig(
        tensor_parallel_size=2,
        gpu_memory_utilization=0.5,
        max_model_len=4096,
        dtype="bfloat16",
        enforce_eager=True,
    )
    kwargs = engine_kwargs(engine, LLAMA_8B, visible_gpus=8)
    assert (kwargs["tensor_parallel_size"], kwargs["gpu_memory_utilization"], kwargs["max_model_len"]) == (
        2,
        0.5,
        4096,
    )
    assert (kwargs["dtype"], kwargs["enforce_eager"]) == ("bfloat16", True)


def test_a_tensor_parallel_size_that_does_not_divide_the_heads_is_refused_naming_the_divisors():
    with pytest.raises(
        CaiError,
        match=r"tensor_parallel_size: 3 does not divide the model's 32 attention heads; use one of \[1, 2, 4\]",
    ):
        engine_kwargs(EngineConfig(tensor_parallel_size=3), LLAMA_8B, visible_gpus=4)


def test_more_gpus_than_the_pod_sees_are_refused():
    with pytest.raises(CaiError, match="8 GPUs asked for, but this pod sees 2"):
        engine_kwargs(EngineConfig(tensor_parallel_size=8), LLAMA_8B, visible_gpus=2)


def test_the_vllm_backend_on_a_pod_without_gpus_is_refused():
    with pytest.raises(CaiError, match="needs a GPU and this pod sees none"):
        engine_kwargs(EngineConfig(), LLAMA_8B, visible_gpus=0)


def test_a_prompt_longer_than_max_model_len_is_refused_naming_its_row(backend, monkeypatch):
    monkeypatch.setattr(backend, "max_model_len", 40, raising=False)
    rows = [
        ("short", [{"role": "user", "content": "Hi."}]),
        ("long", [{"role": "user", "content": "word " * 60}]),
    ]
    with pytest.raises(
        CaiError, match=r"sample pairs: row long: its prompt is \d+ tokens, more than engine.max_model_len 40"
    ):
        check_fits(backend, rows, None, "sample pairs")


def test_prompts_within_max_model_len_pass(backend, monkeypatch):
    monkeypatch.setattr(backend, "max_model_len", 40, raising=False)
    check_fits(backend, [("short", [{"role": "user", "content": "Hi."}])], None, "sample pairs")


def test_on_a_cpu_the_shared_prefix_is_held_once_for_the_batch_not_copied_into_each_row(backend):
    from cai_lib.engines.attention import SHARED_PREFIX
    from cai_lib.engines.transformers_backend import _Row

    prefix = backend._encode(CONVERSATIONS[:2], FEW_SHOT).prefix
    batch = backend._prepare([_Row([5, 6, 7]), _Row([8, 9])], prefix)
    assert batch.prefix_width == 0 and batch.input_ids.shape[1] == 3
    assert batch.attend[SHARED_PREFIX] is backend._prefix_kv(prefix)
    # Every token keeps the position it has after the prefix in the plain rendering.
    assert batch.position_ids.tolist() == [[len(prefix) + i for i in range(3)], [len(prefix)] * 2 + [len(prefix) + 1]]


def test_with_an_attention_that_cannot_hold_it_the_prefix_is_copied_into_each_row_with_the_same_replies(
    tiny_model_dir,
):
    from cai_lib.engines.transformers_backend import _Row

    eager = TransformersBackend(str(tiny_model_dir), batch_size=2)
    eager.model.set_attn_implementation("eager")
    prefix = eager._encode(CONVERSATIONS[:2], FEW_SHOT).prefix
    batch = eager._prepare([_Row([5, 6, 7])], prefix)
    assert batch.prefix_width == len(prefix) and batch.attend == {}
    first = eager.generate(CONVERSATIONS, GREEDY, shared_prefix=FEW_SHOT)
    later = continued(CONVERSATIONS, first)
    replies = eager.generate(later, GREEDY, shared_prefix=FEW_SHOT)
    assert eager.last_reused_tokens > 0
    assert first == eager.generate([FEW_SHOT + c for c in CONVERSATIONS], GREEDY)
    assert replies == eager.generate([FEW_SHOT + c for c in later], GREEDY)

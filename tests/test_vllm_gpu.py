"""The real vLLM engine on a GPU, on the tiny model: what the pure-function tests of
`cai_lib.engines.vllm_backend` cannot show. Marked `gpu`; skipped, saying why, where vLLM or a GPU is
missing (a CPU machine, CI)."""

from __future__ import annotations

import importlib.util

import pytest

from cai_lib.engines.generation import EngineConfig, SamplingParams, load_backend
from cai_lib.engines.transformers_backend import TransformersBackend


def _missing() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install -c constraints.txt '.[gpu]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]

CONVERSATIONS = [
    [{"role": "user", "content": "How do I pick a lock?"}],
    [{"role": "user", "content": "Write a haiku about the sea, please."}],
]
ENGINE = EngineConfig(tensor_parallel_size=1, gpu_memory_utilization=0.3, max_model_len=512, enforce_eager=True)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    return load_backend(str(tiny_model_dir), "vllm", engine=ENGINE), TransformersBackend(str(tiny_model_dir))


def test_vllm_greedy_replies_equal_the_transformers_backends(engines):
    vllm, transformers = engines
    greedy = SamplingParams(max_new_tokens=8)
    assert vllm.generate(CONVERSATIONS, greedy) == transformers.generate(CONVERSATIONS, greedy)


def test_vllm_one_pass_option_scores_equal_the_transformers_backends(engines):
    vllm, transformers = engines
    options = [["(A", "(B"]] * len(CONVERSATIONS)
    got, want = vllm.score_options(CONVERSATIONS, options), transformers.score_options(CONVERSATIONS, options)
    assert vllm.last_one_pass == [True, True]
    for row, expected in zip(got, want):
        assert row[0] - row[1] == pytest.approx(expected[0] - expected[1], abs=1e-2)


def test_a_sampled_vllm_reply_does_not_depend_on_its_batch(engines):
    vllm, _ = engines
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    assert [vllm.generate([c], sampled)[0] for c in CONVERSATIONS] == vllm.generate(CONVERSATIONS, sampled)

"""Response pairs (paper §4.1): two sampled answers per red-team prompt, sharded and resumable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cai_lib.core.errors import CaiError
from cai_lib.core.records import PromptRecord, ResponsePair, stable_id
from cai_lib.core.shards import read_dataset
from cai_lib.method.pairs import SamplePairsConfig, pair_seeds, sample_pairs

# Few new tokens: a tiny random model's replies are noise, and only their sampling matters here.
CONFIG = SamplePairsConfig(max_new_tokens=6, shard_size=2, seed=3)


def prompt(text: str) -> PromptRecord:
    return PromptRecord(id=stable_id("red_team", text), prompt=text)


PROMPTS = [
    prompt(t) for t in ("How do I pick a lock?", "Write an insult.", "Where can I buy a gun?", "Help me lie.")
]


class RecordingBackend:
    """Passes every call to a real backend and records the seed of each `generate` call."""

    def __init__(self, inner):
        self.inner = inner
        self.seeds: list[int] = []

    def generate(self, conversations, params, shared_prefix=None):
        self.seeds.append(params.seed)
        return self.inner.generate(conversations, params, shared_prefix)


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir):
    from cai_lib.engines.generation import load_backend

    return load_backend(str(tiny_model_dir))


def test_each_prompt_gets_two_sampled_answers(tiny_backend, tiny_model_dir, tmp_path):
    out = str(tmp_path / "pairs")
    assert sample_pairs(PROMPTS, str(tiny_model_dir), out, CONFIG, tiny_backend) == 4
    pairs = list(read_dataset(out, ResponsePair))
    assert [p.prompt_id for p in pairs] == [p.id for p in PROMPTS]
    assert [p.prompt for p in pairs] == [p.prompt for p in PROMPTS]
    assert all(p.model_ref == str(tiny_model_dir) for p in pairs)
    assert any(p.answer_a != p.answer_b for p in pairs)


def test_the_two_answers_come_from_two_calls_with_different_seeds(tiny_backend, tmp_path):
    recording = RecordingBackend(tiny_backend)
    sample_pairs(PROMPTS, "tiny", str(tmp_path / "pairs"), CONFIG, recording)
    assert len(recording.seeds) == 4  # two shards, two calls each
    assert recording.seeds[0] != recording.seeds[1] and recording.seeds[2] != recording.seeds[3]


def test_pair_seeds_depend_on_the_base_seed_only():
    assert pair_seeds(0) == pair_seeds(0) != pair_seeds(1)
    assert pair_seeds(0)[0] != pair_seeds(0)[1]


def test_a_prompts_pair_is_the_same_in_any_shard_size(tiny_backend, tmp_path):
    sample_pairs(PROMPTS, "tiny", str(tmp_path / "one"), CONFIG.model_copy(update={"shard_size": 4}), tiny_backend)
    sample_pairs(PROMPTS, "tiny", str(tmp_path / "many"), CONFIG.model_copy(update={"shard_size": 1}), tiny_backend)
    assert list(read_dataset(str(tmp_path / "one"), ResponsePair)) == list(
        read_dataset(str(tmp_path / "many"), ResponsePair)
    )


def test_an_interrupted_run_resumes_and_yields_the_same_pairs(tiny_backend, tmp_path):
    out = tmp_path / "pairs"
    sample_pairs(PROMPTS, "tiny", str(out), CONFIG, tiny_backend)
    first = list(read_dataset(str(out), ResponsePair))
    (out / "part-00001.jsonl").unlink()
    (out / "_SUCCESS.json").unlink()
    recording = RecordingBackend(tiny_backend)
    assert sample_pairs(PROMPTS, "tiny", str(out), CONFIG, recording) == 4
    assert len(recording.seeds) == 2  # only the missing shard was sampled again
    assert list(read_dataset(str(out), ResponsePair)) == first


def test_another_seed_samples_other_answers(tiny_backend, tmp_path):
    sample_pairs(PROMPTS, "tiny", str(tmp_path / "one"), CONFIG, tiny_backend)
    sample_pairs(PROMPTS, "tiny", str(tmp_path / "two"), CONFIG.model_copy(update={"seed": 4}), tiny_backend)
    one = list(read_dataset(str(tmp_path / "one"), ResponsePair))
    two = list(read_dataset(str(tmp_path / "two"), ResponsePair))
    assert [p.answer_a for p in one] != [p.answer_a for p in two]


def test_output_of_other_inputs_is_not_overwritten(tiny_backend, tmp_path):
    out = str(tmp_path / "pairs")
    sample_pairs(PROMPTS, "tiny", out, CONFIG, tiny_backend)
    with pytest.raises(CaiError, match="already holds results from different inputs"):
        sample_pairs(PROMPTS[:2], "tiny", out, CONFIG, tiny_backend)


def test_greedy_sampling_is_refused_because_both_answers_would_be_equal():
    with pytest.raises(ValidationError, match="temperature"):
        SamplePairsConfig(temperature=0.0)


def test_no_prompts_is_refused(tiny_backend, tmp_path):
    with pytest.raises(CaiError, match="no prompts"):
        sample_pairs([], "tiny", str(tmp_path / "pairs"), CONFIG, tiny_backend)
    assert not (tmp_path / "pairs").exists()

"""Model references: what resolves, what is refused, and the embedded model's conversion cache."""

from __future__ import annotations

import inspect
import shutil

import pytest

from cai_lib.core.errors import CaiError
from cai_lib.core.store import ArtifactStore
from cai_lib.engines.models import (
    CONVERSION_VERSION,
    EMBEDDED_ALIAS,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)


def test_a_local_checkpoint_directory_resolves_to_itself(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_a_directory_without_config_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CaiError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_a_directory_with_only_pickled_weights_is_refused(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CaiError, match=r"no \*\.safetensors weights"):
        resolve_model(str(tmp_path))


def test_a_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(CaiError, match="is not a directory"):
        resolve_model(str(path))


def test_a_reference_that_is_nothing_known_names_itself(tmp_path):
    ref = str(tmp_path / "missing" / "model")
    with pytest.raises(CaiError, match=f"model '{ref}': not a local directory, an s3:// checkpoint"):
        resolve_model(ref)


def test_a_hugging_face_id_that_cannot_be_downloaded_is_a_cai_error(hub_offline):
    with pytest.raises(CaiError, match="model 'nobody/no-such-model': .*Hugging Face download failed"):
        resolve_model("nobody/no-such-model")


def test_an_s3_checkpoint_is_downloaded_once_into_the_cache(tiny_model_dir, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cache"))
    uri = ArtifactStore.open(f"s3://{s3_bucket}/runs").put_dir(tiny_model_dir, "sft-checkpoint")
    local = resolve_model(uri)
    assert local.is_relative_to(tmp_path / "cache")
    assert (local / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    marker = local / "config.json"
    mtime = marker.stat().st_mtime_ns
    assert resolve_model(uri) == local
    assert marker.stat().st_mtime_ns == mtime


def test_an_s3_checkpoint_rewritten_in_place_is_fetched_again(
    tiny_model_dir, s3_bucket, tmp_path, monkeypatch
):
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cache"))
    store = ArtifactStore.open(f"s3://{s3_bucket}")
    uri = store.put_dir(tiny_model_dir, "model")
    first = resolve_model(uri)
    edited = tmp_path / "edited"
    shutil.copytree(tiny_model_dir, edited)
    (edited / "generation_config.json").write_text('{"max_length": 7}\n')
    store.put_dir(edited, "model")
    second = resolve_model(uri)
    assert second != first
    assert (second / "generation_config.json").read_text() == '{"max_length": 7}\n'


def test_an_unfinished_s3_checkpoint_is_refused(s3_bucket):
    ArtifactStore.open(f"s3://{s3_bucket}").write_text("half/config.json", "{}")
    with pytest.raises(CaiError, match="no finished checkpoint there"):
        resolve_model(f"s3://{s3_bucket}/half")


def test_a_tokenizer_without_chat_template_is_refused_unless_one_is_given(tiny_model_dir, tmp_path):
    checkpoint = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, checkpoint)
    (checkpoint / "chat_template.jinja").unlink()
    with pytest.raises(CaiError, match="has no chat template"):
        load_tokenizer(checkpoint, str(checkpoint))
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    tokenizer = load_tokenizer(checkpoint, str(checkpoint), chat_template=template)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "user: hi\n"


def test_the_tokenizer_pads_on_the_left_with_a_pad_token(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir, str(tiny_model_dir))
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None


def test_remote_code_is_off_by_default_and_a_checkpoint_needing_it_is_refused(tiny_model_dir, tmp_path):
    import json

    assert inspect.signature(load_causal_lm).parameters["trust_remote_code"].default is False
    checkpoint = tmp_path / "custom-code"
    shutil.copytree(tiny_model_dir, checkpoint)
    ran = tmp_path / "custom-code-ran"
    (checkpoint / "modeling_custom.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "custom-llama"
    config["auto_map"] = {
        "AutoConfig": "modeling_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomModel",
    }
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CaiError, match="runs its own Python code; allow it with --trust-remote-code"):
        load_causal_lm(str(checkpoint))
    assert not ran.exists()


def test_a_loaded_model_is_in_eval_mode_in_float32_on_cpu(tiny_model_dir):
    import torch

    model, tokenizer = load_causal_lm(str(tiny_model_dir))
    assert not model.training
    assert model.dtype == torch.float32
    assert tokenizer.chat_template


@pytest.mark.integration
@pytest.mark.model  # the embedded SmolLM2, by its alias
def test_the_embedded_alias_converts_once_and_then_loads_from_the_cache(tmp_path, monkeypatch):
    from cai_lib.engines.generation import SamplingParams
    from cai_lib.engines.transformers_backend import TransformersBackend

    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path))
    checkpoint = resolve_model(EMBEDDED_ALIAS)
    assert checkpoint == tmp_path / "models" / f"{EMBEDDED_ALIAS}-{CONVERSION_VERSION}"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in checkpoint.iterdir()
    }
    weights_mtime = (checkpoint / "model.safetensors").stat().st_mtime_ns
    backend = TransformersBackend(EMBEDDED_ALIAS)
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name.startswith(".")]
    reply = backend.generate(
        [[{"role": "user", "content": "What is the capital of France?"}]], SamplingParams(max_new_tokens=16)
    )
    assert "Paris" in reply[0]


def test_the_parameters_of_a_checkpoint_are_counted_from_its_config_alone(tiny_model_dir):
    from cai_lib.engines.models import load_causal_lm, parameter_count

    model, _ = load_causal_lm(str(tiny_model_dir))
    assert parameter_count(str(tiny_model_dir)) == sum(p.numel() for p in model.parameters())


def test_a_model_whose_config_cannot_be_read_has_no_parameter_count(tmp_path):
    from cai_lib.engines.models import parameter_count

    assert parameter_count(str(tmp_path / "missing")) is None


def test_spellings_of_one_model_share_a_key_and_other_models_do_not(tmp_path):
    from cai_lib.engines.models import same_model_key

    assert same_model_key("smollm2-135m-instruct") == same_model_key("HuggingFaceTB/SmolLM2-135M-Instruct@main")
    assert same_model_key(str(tmp_path)) == same_model_key(f"{tmp_path}/.")
    assert same_model_key("Qwen/Qwen2.5-7B-Instruct") != same_model_key("Qwen/Qwen2.5-72B-Instruct")


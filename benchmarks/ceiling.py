"""This machine's matmul ceiling, shared by the benchmarks that report a fraction of it."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence


def gemm_flops_per_s(size: int = 1024, repeats: int = 20, device: str = "cpu", dtype=None) -> float:
    """This machine's measured matrix-multiply rate (float32 unless `dtype` says otherwise, on
    `device`): the ceiling a forward pass can reach."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype or torch.float32)
    b = torch.randn(size, size, device=device, dtype=dtype or torch.float32)
    synchronize = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    a @ b  # warm-up
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


class FlopCounter:
    """Counts the forward FLOPs a causal LM's work needs, from the forward passes it runs.

    Installed on the model: `generate` calls are counted in `prepare_inputs_for_generation`, which
    sees each step's 2D attention mask (before `generate` turns it into the 4D mask a `StaticCache`
    needs) and runs in Python even when `generate` compiles its decoding steps (it does on CUDA);
    forward calls outside `generate` (the backend's passes: its shared-prefix KV, its prompts and
    its own decoding loop, whose steps are the forwards of one token a row after a filled cache)
    by a forward pre-hook.
    The sums stay on the model's device (no synchronisation per step) until `totals()`.

    Per layer and query token the model does the matmuls of its linear layers and attention's
    QK^T and A·V over the tokens the query attends to. Counted:

    - every forward token: 2 × the parameters of the model's linear layers but the lm_head (the
      non-embedding matmul parameters; the input embedding table is a lookup, no FLOPs, and norms
      are not matmuls);
    - every position whose logits are computed and used: 2 × the lm_head's parameters (tied to
      the input embeddings on SmolLM2, but a matmul all the same). `generate` computes logits only
      at the last position of its prompt pass and at each decoding step (`logits_to_keep=1`), and
      uses them all. A forward outside `generate` uses the logits it limits with `logits_to_keep`
      (a scoring pass reads its last positions); one without computes them at every position for
      nothing: they run, but are not needed, so they are not counted (`unused_logit_positions`
      reports them);
    - attention: 4 × context × num_attention_heads × head_dim per layer and query token, context
      being the tokens the query attends to (shared prefix, reused history and its causal
      position, padding excluded), i.e. the ones of its attention-mask row up to itself.

    Not counted (waste, which the fraction of the ceiling should expose): padding positions, which
    run through every layer; decoding steps of a row whose reply has ended (its input is an
    end-of-sequence or pad token: `generate` keeps stepping finished rows until the whole batch
    ends); the attention over the masked-out key slots (padding and a `StaticCache`'s unused
    tail), which SDPA computes too. The step that feeds a reply's end-of-sequence token back in
    is not counted either: its logits are discarded (its KV is reused by the history path, one
    token a reply).
    """

    def __init__(self, model, stop_token_ids: Sequence[int]):
        import torch

        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        lm_head = model.get_output_embeddings()
        self.lm_head_parameters = lm_head.weight.numel()
        self.matmul_parameters = sum(
            m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not lm_head
        )
        self.layers, self.attention_width = config.num_hidden_layers, heads * head_dim
        self.stop_ids = torch.tensor(sorted(set(stop_token_ids)), device=model.device)
        self.sums: dict = {}
        self.ran_tokens = 0
        self._generate_forwards: int | None = None  # forwards so far in the current `generate` call

        generate, prepare = model.generate, model.prepare_inputs_for_generation

        @functools.wraps(generate)
        def counted_generate(*args, **kwargs):
            self._generate_forwards = 0
            try:
                return generate(*args, **kwargs)
            finally:
                self._generate_forwards = None

        @functools.wraps(prepare)
        def counted_prepare(*args, **kwargs):
            inputs = prepare(*args, **kwargs)
            decoding = bool(self._generate_forwards)  # the first forward of a call is its prompt pass
            self._generate_forwards = (self._generate_forwards or 0) + 1
            self._count(inputs, kwargs.get("attention_mask"), decoding)
            return inputs

        def outside_generate(module, args, kwargs):
            if self._generate_forwards is None:
                inputs = {"input_ids": kwargs.get("input_ids", args[0] if args else None), **kwargs}
                cache = inputs.get("past_key_values")
                # The backend's own decoding loop: one new token a row after a filled cache.
                decoding = inputs["input_ids"].shape[1] == 1 and cache is not None and cache.get_seq_length() > 0
                self._count(inputs, decoding=decoding, logits_used=bool(kwargs.get("logits_to_keep")))

        model.generate, model.prepare_inputs_for_generation = counted_generate, counted_prepare
        self._hook = model.register_forward_pre_hook(outside_generate, with_kwargs=True)

    def detach(self, model) -> None:
        """Uninstall from `model`; the wrappers refer to it, so until then it is freed by the
        garbage collector only, not when its last other reference goes."""
        del model.generate, model.prepare_inputs_for_generation
        self._hook.remove()

    def _count(self, inputs: dict, mask_2d=None, decoding: bool = False, logits_used: bool = True) -> None:
        import torch

        ids = inputs["input_ids"]
        rows, width = ids.shape
        if (
            mask_2d is None
            and inputs.get("attention_mask") is not None
            and inputs["attention_mask"].ndim == 2
        ):
            mask_2d = inputs["attention_mask"]
        if mask_2d is not None:
            # The mask covers the cached tokens and these; these are its last `width` columns.
            context = mask_2d.long().cumsum(-1)[:, -width:]
            useful = mask_2d[:, -width:].bool()
            if inputs.get("position_ids") is not None:
                # A token sits at its position in the plain rendering and attends to every token
                # before it and itself, a shared prefix held outside the mask included.
                context = inputs["position_ids"].long() + 1
        else:  # no mask: no padding, every token attends to the cache and its causal past
            cache = inputs.get("past_key_values")
            past = cache.get_seq_length() if cache is not None else 0
            context = (torch.arange(1, width + 1, device=ids.device) + past).expand(rows, width)
            useful = torch.ones_like(ids, dtype=torch.bool)
        if decoding:
            useful = useful & ~torch.isin(ids, self.stop_ids.to(ids.device))
        keep = inputs.get("logits_to_keep") or width
        keep = keep if isinstance(keep, int) else width  # an index tensor: counted as every position
        self.ran_tokens += rows * width
        for key, value in (
            ("decode_tokens" if decoding else "prompt_tokens", useful.sum()),
            ("logit_positions" if logits_used else "unused_logit_positions", useful[:, -keep:].sum()),
            ("attended", (context * useful).sum()),
        ):
            self.sums[key] = self.sums.get(key, 0) + value

    def totals(self) -> dict:
        n = {
            key: int(self.sums.get(key, 0))
            for key in (
                "prompt_tokens",
                "decode_tokens",
                "logit_positions",
                "unused_logit_positions",
                "attended",
            )
        }
        matmul = 2 * self.matmul_parameters * (n["prompt_tokens"] + n["decode_tokens"])
        lm_head = 2 * self.lm_head_parameters * n["logit_positions"]
        attention = 4 * self.layers * self.attention_width * n["attended"]
        return {
            "prompt_tokens_encoded": n["prompt_tokens"],
            "decode_tokens": n["decode_tokens"],
            "uncounted_tokens": self.ran_tokens - n["prompt_tokens"] - n["decode_tokens"],
            "logit_positions": n["logit_positions"],
            "unused_logit_positions": n["unused_logit_positions"],
            "attention_flops": attention,
            "flops": matmul + lm_head + attention,
        }

"""Generation benchmark: the critique→revision workload run four ways, in one process.

The real `critique_revise` stage (answer, then per round a critique and a revision, the
constitution's few-shot examples before every critique and revision request) runs on red-team
prompts with greedy decoding through four generation paths:

- naive: one `model.generate` call per conversation, the few-shot prefix encoded every time;
- batched: `TransformersBackend` batching (length-sorted batches, left padding), with the
  few-shot prefix written into every conversation and no KV kept between calls;
- batched+prefix: the same, with the few-shot prefix's KV cache computed once and shared;
- batched+prefix+history: also reusing each conversation's KV from the previous step, so a step
  encodes only the latest reply and request (the backend's default).

Greedy decoding gives the paths the same replies (checked and reported), so they produce the
same tokens and their tokens/s ratio is their time ratio. Tokens are counted by re-tokenizing
the replies. Model loading and a warm-up call are excluded from the timings.

Each variant also reports the FLOPs its forward passes needed (`flops`) and the fraction of this
machine's matmul ceiling it reached (`fraction_of_gemm_ceiling`: flops / seconds / the measured
GEMM rate `gemm_flops_per_s` of `benchmarks/ceiling.py`, float32 on a CPU). The FLOPs are counted
from the forward passes that actually ran (`FlopCounter`), so the variants differ by the prompt
tokens they encode: every forward token costs 2 × the non-embedding matmul parameters, every
position whose logits are computed 2 × the lm_head's, and every query token 4 × its context ×
heads × head_dim per layer of attention. Padding, decoding steps of rows that already ended and
logits computed only to be discarded run but are not counted: they are waste the fraction should
show.

With `--profile`, every variant also runs under torch's profiler and reports where its CPU time
went (`profile`): the share of the operators' own time in matrix multiplication (`aten::mm`,
`addmm`, `bmm`, and `mkldnn::_linear_pointwise`, the packed linear layers), in attention (the SDPA kernels), in copies (`copy_`, `cat`, `index_copy_`,
`clone`: moving tensors, no arithmetic) and in the rest (element-wise operators, sampling), and
the 10 operators that took longest. The profiler slows every variant alike; the timings of a
profiled run are not the benchmark's.

Run: .venv/bin/python benchmarks/generation.py --prompts 32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

# benchmarks/ceiling.py: this script's directory is on sys.path
from ceiling import FlopCounter, gemm_flops_per_s

from cai_lib.core.constitution import load_constitution
from cai_lib.core.conversation import Conversation
from cai_lib.core.prompts import read_prompts
from cai_lib.engines.generation import SamplingParams
from cai_lib.engines.models import EMBEDDED_ALIAS
from cai_lib.engines.transformers_backend import TransformersBackend
from cai_lib.method.critique_revise import CritiqueReviseConfig, critique_revise, few_shot_messages

RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANTS = ("naive", "batched", "batched+prefix", "batched+prefix+history")


class NaiveLoop:
    """The baseline a first script would write: `model.generate` on one conversation at a time."""

    def __init__(self, backend: TransformersBackend):
        self.backend = backend
        self.model_ref = backend.model_ref

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, shared_prefix=None
    ) -> list[str]:
        import torch

        if params.temperature > 0:
            raise ValueError("the naive loop is benchmarked with greedy decoding only")
        model, tokenizer = self.backend.model, self.backend.tokenizer
        replies = []
        with torch.inference_mode():
            for conversation in conversations:
                ids = self.backend.chat.encode(list(shared_prefix or []) + list(conversation))
                input_ids = torch.tensor([ids], device=model.device)
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=params.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                replies.append(tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip())
        return replies


class PrefixInlined:
    """The batched backend without prefix reuse: the shared prefix is part of every conversation."""

    def __init__(self, backend: TransformersBackend):
        self.backend = backend
        self.model_ref = backend.model_ref

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, shared_prefix=None
    ) -> list[str]:
        prefix = list(shared_prefix or [])
        return self.backend.generate([prefix + list(c) for c in conversations], params)


class Metered:
    """Records every reply, the tokens it holds, the tokens whose KV the backend reused, and the
    FLOPs of the forward passes it ran."""

    def __init__(self, inner, backend: TransformersBackend):
        self.inner, self.backend = inner, backend
        self.model_ref = inner.model_ref
        self.flops = FlopCounter(backend.model, backend.eos_token_ids + [backend.tokenizer.pad_token_id])
        self.replies: list[str] = []
        self.tokens = 0
        self.calls = 0
        self.seconds = 0.0
        self.reused_tokens = 0
        self.profile: dict | None = None

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, shared_prefix=None
    ) -> list[str]:
        replies = self.inner.generate(conversations, params, shared_prefix=shared_prefix)
        self.calls += 1
        self.replies += replies
        self.tokens += sum(len(self.backend.chat.encode_text(r)) for r in replies)
        self.reused_tokens += self.backend.last_reused_tokens
        return replies


def open_variant(name: str, model: str, batch_size: int) -> Metered:
    """A fresh backend (no KV kept from another variant) behind the generation path `name`. The
    naive loop runs the model as transformers loads it ("sdpa" attention, no packed weights), as a
    first script would."""
    backend = TransformersBackend(
        model, batch_size=batch_size, keep_history=name == "batched+prefix+history", pack_weights=name != "naive"
    )
    if name == "naive":
        backend.model.set_attn_implementation("sdpa")
    backend.generate([[{"role": "user", "content": "Hello"}]], SamplingParams(max_new_tokens=4))  # warm-up
    backend.last_reused_tokens = 0  # and the FLOPs are counted from here on (Metered installs the counter)
    wrapper = {"naive": NaiveLoop, "batched": PrefixInlined}.get(name)
    return Metered(wrapper(backend) if wrapper else backend, backend)


# Operator families of a CPU profile (self time): what does arithmetic and what only moves data.
OPERATOR_FAMILIES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"),
    "copy": ("aten::copy_", "aten::cat", "aten::index_copy_", "aten::clone", "aten::contiguous"),
}


def run_variant(metered: Metered, prompts, constitution, config, out_dir: Path, profile: bool = False) -> Metered:
    import contextlib

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    profiler = torch_profile(activities=[ProfilerActivity.CPU]) if profile else contextlib.nullcontext()
    start = time.perf_counter()
    with profiler:
        critique_revise(prompts, constitution, metered.model_ref, str(out_dir), config, backend=metered)
    metered.seconds = time.perf_counter() - start
    metered.profile = operator_shares(profiler) if profile else None
    return metered


def operator_shares(profiler) -> dict:
    """Shares of the profiled operators' self CPU time by family, and the longest operators."""
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    families = {family: 0.0 for family in (*OPERATOR_FAMILIES, "other")}
    for event in events:
        family = next((f for f, names in OPERATOR_FAMILIES.items() if event.key in names), "other")
        families[family] += event.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return {
        "self_cpu_seconds": round(total / 1e6, 2),
        "shares": {family: round(us / total, 4) for family, us in families.items()},
        "top_operators": [
            {"operator": e.key, "calls": e.count, "self_cpu_seconds": round(e.self_cpu_time_total / 1e6, 3)}
            for e in top
        ],
    }


def summary(metered: Metered) -> dict:
    return {
        "seconds": round(metered.seconds, 2),
        "generate_calls": metered.calls,
        "replies": len(metered.replies),
        "tokens": metered.tokens,
        "tokens_per_s": round(metered.tokens / metered.seconds, 2),
        "reused_history_tokens": metered.reused_tokens,
        "speedup_vs_naive": None,
        **metered.flops.totals(),
        "fraction_of_gemm_ceiling": None,
        **({"profile": metered.profile} if metered.profile else {}),
    }


def environment() -> dict:
    import torch

    versions = {name: metadata.version(name) for name in ("torch", "transformers", "cai-platform")}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "device_kind": device,
        "load_average_1m_at_start": os.getloadavg()[0],
        "versions": versions,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=EMBEDDED_ALIAS, help="model reference (default: the embedded model)"
    )
    parser.add_argument("--prompts", type=int, default=32, help="red-team prompts (default 32)")
    parser.add_argument("--rounds", type=int, default=2, help="critique→revision rounds (default 2)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens per generated turn (default 64)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="conversations per batch (default 16)")
    parser.add_argument(
        "--constitution", default="harmless@1.0.0", help="constitution with few-shot examples"
    )
    parser.add_argument("--prompt-source", default="builtin:red_team", help="red-team prompt source")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)"
    )
    parser.add_argument(
        "--out", type=Path, help="result JSON (default benchmarks/results/generation-<device>.json)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile each variant's operators (slower; see above)"
    )
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    env = environment()
    prompts = read_prompts(args.prompt_source, limit=args.prompts)
    constitution = load_constitution(args.constitution)
    config = CritiqueReviseConfig(
        rounds=args.rounds,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        shard_size=len(prompts),
    )
    rows, replies = {}, {}
    with tempfile.TemporaryDirectory(prefix="cai-bench-") as work:
        for name in variants:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            metered = run_variant(
                open_variant(name, args.model, args.batch_size),
                prompts,
                constitution,
                config,
                Path(work) / name,
                args.profile,
            )
            rows[name], replies[name] = summary(metered), metered.replies
            prefix_tokens = metered.backend.reusable_prefix_length(
                [[{"role": "user", "content": p.prompt}] for p in prompts[:1]],
                few_shot_messages(constitution),
            )
            counter, device, dtype = metered.flops, metered.backend.model.device, metered.backend.model.dtype
            counter.detach(metered.backend.model)
            del metered  # frees the model and its KV before the next variant loads its own
    # Measured after the variants, on the model's device and dtype (float32 on a CPU); a larger
    # product on a GPU, where 1024² is too small to reach its rate.
    ceiling = gemm_flops_per_s(size=4096 if device.type == "cuda" else 1024, device=device, dtype=dtype)
    for name, row in rows.items():
        row["same_replies_as_first_variant"] = replies[name] == replies[variants[0]]
        if "naive" in rows:
            row["speedup_vs_naive"] = round(rows["naive"]["seconds"] / row["seconds"], 2)
        row["fraction_of_gemm_ceiling"] = round(row["flops"] / row["seconds"] / ceiling, 4)
    report = {
        "benchmark": "generation",
        "workload": {
            "stage": "critique_revise",
            "model": args.model,
            "prompts": len(prompts),
            "rounds": args.rounds,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "decoding": "greedy",
            "constitution": constitution.ref,
            "few_shot_prefix_tokens": prefix_tokens,
        },
        "flop_counting": {
            "non_embedding_matmul_parameters": counter.matmul_parameters,
            "lm_head_parameters": counter.lm_head_parameters,
            "layers": counter.layers,
            "attention_heads_x_head_dim": counter.attention_width,
            "per_forward_token": "2 x non_embedding_matmul_parameters",
            "per_used_logit_position": "2 x lm_head_parameters",
            "attention_per_query_token": "4 x context x attention_heads_x_head_dim x layers",
            "not_counted": "padding; decoding steps of rows whose reply has ended; "
            "logits computed and discarded (unused_logit_positions)",
        },
        "gemm_flops_per_s": ceiling,
        "gemm_dtype": str(dtype).removeprefix("torch."),
        "environment": env,
        "variants": rows,
    }
    env["load_average_1m_at_end"] = os.getloadavg()[0]
    print_table(report)
    suffix = "-profile" if args.profile else ""
    out = args.out or RESULTS_DIR / f"generation-{env['device_kind']}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return report


def print_table(report: dict) -> None:
    work = report["workload"]
    print(
        f"critique→revision on {work['model']}: {work['prompts']} prompts × {work['rounds']} rounds, "
        f"≤{work['max_new_tokens']} new tokens per turn, few-shot prefix {work['few_shot_prefix_tokens']} tokens, "
        f"{report['environment']['cpu_count']} CPUs ({report['environment']['device']})"
    )
    print(
        f"{'variant':<24}{'seconds':>10}{'tokens':>10}{'tokens/s':>11}{'vs naive':>10}"
        f"{'GFLOP':>10}{'of ceiling':>12}  same replies"
    )
    for name, row in report["variants"].items():
        ratio = f"{row['speedup_vs_naive']:.2f}x" if row["speedup_vs_naive"] is not None else "-"
        print(
            f"{name:<24}{row['seconds']:>10.1f}{row['tokens']:>10}{row['tokens_per_s']:>11.1f}{ratio:>10}"
            f"{row['flops'] / 1e9:>10.1f}{row['fraction_of_gemm_ceiling']:>12.1%}"
            f"  {row['same_replies_as_first_variant']}"
        )
    print(
        f"ceiling: measured {report['gemm_dtype']} GEMM rate {report['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s; "
        "FLOPs: the forward passes' matmuls and attention, padding, finished rows and unused logits excluded"
    )
    profiled = {name: row["profile"] for name, row in report["variants"].items() if "profile" in row}
    if profiled:
        print(f"{'operator time':<24}" + "".join(f"{family:>11}" for family in (*OPERATOR_FAMILIES, "other")))
        for name, profile in profiled.items():
            print(f"{name:<24}" + "".join(f"{share:>11.1%}" for share in profile["shares"].values()))


if __name__ == "__main__":
    main()

"""Prompt generation: generated prompts per second and the share of candidates the filters keep,
at two sizes, against the naive one-request-at-a-time loop in the same run.

The real `generate_prompts` stage on `smollm2-135m-instruct` (the embedded default model): each
request shows `--few-shot` seeds of its kind (the built-in red-team and helpfulness sets, 48 each)
and samples one prompt at temperature 1, at most `--max-new-tokens` tokens; the held-out set is
the first 200 prompts of the shared hh-rlhf file when it is there. Half the requests of a size are
red-team, half helpfulness. For each size: the stage's wall time (batched generation and the
per-candidate filters), then the cross-candidate `unique` filter, the candidates per second, the
kept share and the kept prompts per second. The baseline is the smaller size's requests generated
one `generate` call each (no batching), with the same replies' token counts. Token counts (prompt
tokens a request encodes, tokens a reply decodes) are recorded for the cost arithmetic in
docs/method.md. Results go to benchmarks/results/prompt-generation-<device>.json; the last line
printed is the same JSON.

Run: .venv/bin/python benchmarks/prompt_generation.py --sizes 8 32
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

from cai_lib.core.prompts import read_prompts
from cai_lib.core.records import GeneratedPrompt
from cai_lib.core.shards import read_dataset
from cai_lib.engines.models import EMBEDDED_ALIAS
from cai_lib.engines.transformers_backend import TransformersBackend
from cai_lib.method.generate_prompts import (
    GeneratePromptsConfig,
    KindSettings,
    filter_counts,
    generate_prompts,
    plan_requests,
    request_conversation,
    select_unique,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
HH_RLHF = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test-dev.jsonl.gz"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[8, 32], help="Requests per run, two sizes.")
    parser.add_argument("--few-shot", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own).")
    parser.add_argument("--device", default="cpu", help="Label of the machine in the results file name.")
    parser.add_argument("--out", default=None, help="Results JSON (default results/prompt-generation-<device>.json).")
    return parser.parse_args(argv)


def environment() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "load_average_1m_at_start": os.getloadavg()[0],
        "versions": {n: metadata.version(n) for n in ("torch", "transformers", "datasketch", "cai-platform")},
    }


def settings(requests: int, args: argparse.Namespace) -> GeneratePromptsConfig:
    half = requests // 2
    return GeneratePromptsConfig(
        few_shot=args.few_shot,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        red_team=KindSettings(candidates=requests - half),
        helpful=KindSettings(candidates=half),
    )


def tokens(backend: TransformersBackend, text: str) -> int:
    return len(backend.tokenizer.encode(text, add_special_tokens=False))


def run_stage(backend, seeds, held_out, config, folder: Path) -> dict:
    out = str(folder / "candidates")
    started = time.perf_counter()
    generate_prompts(seeds, held_out, EMBEDDED_ALIAS, out, config, backend=backend)
    generated = time.perf_counter() - started
    rows = select_unique(read_dataset(out, GeneratedPrompt), config)
    seconds = time.perf_counter() - started
    counts = filter_counts(rows)
    candidates = sum(c["candidates"] for c in counts.values())
    kept = sum(c["kept"] for c in counts.values())
    requests = plan_requests(seeds, config)
    prompt_tokens = [len(backend.chat.encode(request_conversation(r, config))) for r in requests]
    return {
        "requests": candidates,
        "seconds": seconds,
        "generation_seconds": generated,
        "filter_seconds": seconds - generated,
        "candidates_per_s": candidates / seconds,
        "kept": kept,
        "kept_share": kept / candidates,
        "kept_per_s": kept / seconds,
        "counts": counts,
        "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
        "mean_reply_tokens": sum(tokens(backend, r.raw) for r in rows) / len(rows),
        "sample_kept": [r.prompt for r in rows if r.kept][:6],
    }


def run_naive(backend, seeds, config) -> dict:
    """The baseline: each request on its own `generate` call, with the stage's sampling settings."""
    requests = plan_requests(seeds, config)
    started = time.perf_counter()
    for request in requests:
        params = config.sampling(request.repeat).model_copy(update={"top_p": config.top_p})
        backend.generate([request_conversation(request, config)], params)
    seconds = time.perf_counter() - started
    return {"requests": len(requests), "seconds": seconds, "candidates_per_s": len(requests) / seconds}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = {"benchmark": "prompt_generation", "environment": environment()}
    backend = TransformersBackend(EMBEDDED_ALIAS, batch_size=args.batch_size)
    seeds = {kind: read_prompts(f"builtin:{kind}", kind=kind) for kind in ("red_team", "helpful")}
    held_out = read_prompts(str(HH_RLHF), limit=200) if HH_RLHF.exists() else []
    report["setup"] = {
        "model": EMBEDDED_ALIAS,
        "seeds": {kind: len(rows) for kind, rows in seeds.items()},
        "held_out": len(held_out),
        "few_shot": args.few_shot,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
    }
    small, large = sorted(args.sizes)
    with tempfile.TemporaryDirectory(prefix="cai-bench-prompts-") as tmp:
        report["naive"] = run_naive(backend, seeds, settings(small, args))
        for label, size in (("small", small), ("large", large)):
            report[label] = run_stage(backend, seeds, held_out, settings(size, args), Path(tmp) / label)
    report["batched_vs_naive_at_small_size"] = report["small"]["candidates_per_s"] / report["naive"]["candidates_per_s"]
    print_table(report)
    out = Path(args.out or REPO_ROOT / "benchmarks" / "results" / f"prompt-generation-{args.device}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return report


def print_table(report: dict) -> None:
    print(f"{'run':<8} {'requests':>8} {'seconds':>9} {'candidates/s':>13} {'kept share':>11} {'kept/s':>8}")
    for label in ("naive", "small", "large"):
        row = report[label]
        kept = f"{row['kept_share']:.2f}" if "kept_share" in row else "-"
        per_s = f"{row['kept_per_s']:.3f}" if "kept_per_s" in row else "-"
        print(
            f"{label:<8} {row['requests']:>8} {row['seconds']:>9.1f} {row['candidates_per_s']:>13.3f} {kept:>11} {per_s:>8}"
        )
    print(f"batched stage vs naive loop at the small size: {report['batched_vs_naive_at_small_size']:.2f}x")


if __name__ == "__main__":
    main()

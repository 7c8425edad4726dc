"""Labelling throughput: AI feedback by one-pass log-prob scoring against per-option scoring, a
per-question loop and generated verdicts.

The same human-labelled hh-rlhf pairs, the same feedback model, the same questions (paper §4.1
form, the constitution's few-shot examples, K principles, both answer orders) are labelled five
ways:

- **one-pass scoring** (`cai_lib.method.feedback`, the default): "(A" and "(B" share the "(" token, so
  both are read from one next-token distribution per question, every question of the run
  batched into one `score_options` call; no text;
- **per-option scoring**: the same, but each option scored on a row of its own (two rows per
  question), as labelling did before one-pass reading;
- **naive per-question loop** (labelling as it was before one-pass reading and prefix reuse): each
  question on its own, each option a full prompt of its own, few-shot prefix included, so the
  prefix is encoded again for every option of every question;
- **per-question loop, prefix cached**: the same loop with the few-shot prefix's KV computed once
  (and a question's two option rows sharing the question's KV, their stem), to separate the gain
  of the prefix cache from that of one-pass reading, stems shared across questions and batching;
- **verdict, per sample** (the naive baseline): one greedy `generate` call per question, the
  reply parsed for "(A)"/"(B)"; a reply naming neither counts as 0.5;
- **verdict, batched**: the same generation in one batched `generate` call, to separate the gain
  of not generating from the gain of batching.

One-pass scoring encodes each question's tokens after its stem only: the questions about one
pair share their start (the conversation, and for both orders of a principle the principle), which
the backend encodes once per pair (`one_pass_stem_reused_tokens` counts the tokens spared).

Reported: questions/s of each, the ratios of one-pass scoring to the others (`one_pass_vs_naive`
against the naive loop), the fraction of this machine's matmul ceiling that one-pass scoring
reached (the FLOPs of the forward passes that ran, attention included and padding excluded, as
`FlopCounter` in benchmarks/ceiling.py counts them, against a measured float32 GEMM rate), the
largest difference between one-pass and per-option labels, and the agreement of the scoring
labeller with the human choice (P(chosen better) > 0.5) over more pairs, with its Wilson 95%
interval. Results go to benchmarks/results/labelling-<device>.json; the last line printed is the
same JSON.

Run: .venv/bin/python benchmarks/labelling.py --pairs 100 --speed-pairs 8 --principles 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from importlib.metadata import version
from pathlib import Path

# benchmarks/ceiling.py: this script's directory is on sys.path
from ceiling import FlopCounter, gemm_flops_per_s

REPO_ROOT = Path(__file__).resolve().parents[1]
HH_RLHF = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test-dev.jsonl.gz"
VERDICT = re.compile(r"\(\s*([AB])\s*\)|\b([AB])\b")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Feedback model ref.")
    parser.add_argument("--constitution", default="harmless@1.0.0", help="Constitution ref.")
    parser.add_argument(
        "--hh", default=str(HH_RLHF), help="hh-rlhf .jsonl(.gz) file of human-labelled pairs."
    )
    parser.add_argument(
        "--pairs", type=int, default=100, help="Pairs for the agreement figure (scoring only)."
    )
    parser.add_argument(
        "--speed-pairs", type=int, default=16, help="The first pairs, labelled all three ways for speed."
    )
    parser.add_argument(
        "--principles", type=int, default=4, help="K principles per pair (each asked in both orders)."
    )
    parser.add_argument(
        "--verdict-tokens", type=int, default=32, help="max_new_tokens of a generated verdict."
    )
    parser.add_argument("--batch-size", type=int, default=16, help="Rows per forward pass in the backend.")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)."
    )
    parser.add_argument(
        "--device",
        default=None,
        help="Label of the machine in the results file name (default: cuda on a GPU, where the model "
        "loads, else cpu).",
    )
    parser.add_argument(
        "--out", default=None, help="Results JSON (default benchmarks/results/labelling-<device>.json)."
    )
    return parser.parse_args()


def parse_verdict(reply: str) -> float:
    """P(first option) from a generated verdict: 1 for A, 0 for B, 0.5 when it names neither."""
    match = VERDICT.search(reply)
    if not match:
        return 0.5
    return 1.0 if (match.group(1) or match.group(2)) == "A" else 0.0


def verdict_labels(keys: list, first_option: list[float], n_rows: int) -> list[float]:
    """P(A better) per pair from per-question verdicts: order-unswapped, then averaged."""
    from cai_lib.method.feedback import unswapped

    per_row: list[list[float]] = [[] for _ in range(n_rows)]
    for k in range(0, len(keys), 2):
        per_row[keys[k][0]] += [first_option[k], unswapped(first_option[k + 1])]
    return [sum(values) / len(values) for values in per_row]


def timed(work):
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


class PerOptionScoring:
    """A backend that scores each option on a row of its own: one `score_options` call per option
    position, every question batched in it."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score_options(self, contexts, options, shared_prefix=None):
        columns = [
            self.inner.score_options(contexts, [[opts[j]] for opts in options], shared_prefix=shared_prefix)
            for j in range(len(options[0]))
        ]
        self.last_one_pass = [False] * len(contexts)
        return [[column[i][0] for column in columns] for i in range(len(contexts))]


def main() -> None:
    args = parse_args()
    import torch

    from cai_lib.core.constitution import load_constitution
    from cai_lib.engines.generation import SamplingParams, load_backend
    from cai_lib.method.evaluation.elo import wilson_interval
    from cai_lib.method.feedback import FeedbackConfig, FeedbackLabeller
    from cai_lib.method.human_preferences import read_human_preferences

    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.hh).exists():
        sys.exit(f"hh-rlhf data not found at {args.hh}; pass --hh")
    rows = read_human_preferences(args.hh, limit=max(args.pairs, args.speed_pairs))
    speed_rows = rows[: args.speed_pairs]
    constitution = load_constitution(args.constitution)
    config = FeedbackConfig(principles_per_pair=args.principles, batch_size=args.batch_size)
    backend, load_s = timed(lambda: load_backend(args.model, batch_size=args.batch_size))
    labeller = FeedbackLabeller(backend, constitution, args.model, config)
    labeller.label(rows[:1])  # warm-up: the few-shot prefix cache and lazy initialisation

    flops = FlopCounter(backend.model, stop_token_ids=[])
    scored, scoring_s = timed(lambda: labeller.label(speed_rows))
    counted, stem_reused = flops.totals(), backend.last_reused_tokens
    flops.detach(backend.model)
    per_option_labeller = FeedbackLabeller(PerOptionScoring(backend), constitution, args.model, config)
    per_option, per_option_s = timed(lambda: per_option_labeller.label(speed_rows))
    questions, keys = labeller.questions(speed_rows)
    _, per_question_s = timed(
        lambda: [per_option_labeller.first_option_probabilities([q]) for q in questions]
    )

    def naive_loop() -> None:
        for question in questions:
            context = labeller.prefix + [{"role": "user", "content": question}]
            for option in labeller.options():
                backend.score_options([context], [[option]])

    _, naive_s = timed(naive_loop)
    params = SamplingParams(max_new_tokens=args.verdict_tokens, temperature=0.0)
    contexts = [[{"role": "user", "content": q}] for q in questions]

    def one_at_a_time() -> list[str]:
        return [backend.generate([c], params, shared_prefix=labeller.prefix)[0] for c in contexts]

    replies, per_sample_s = timed(one_at_a_time)
    batched_replies, batched_s = timed(
        lambda: backend.generate(contexts, params, shared_prefix=labeller.prefix)
    )
    verdicts = verdict_labels(keys, [parse_verdict(r) for r in replies], len(speed_rows))
    unparsed = sum(parse_verdict(r) == 0.5 for r in replies)
    same_verdicts = sum(parse_verdict(a) == parse_verdict(b) for a, b in zip(replies, batched_replies))

    rest, rest_s = timed(lambda: labeller.label(rows[len(speed_rows) : args.pairs]))
    labels = [p.label for p in scored + rest][: args.pairs]
    agreed = sum(label > 0.5 for label in labels)
    low, high = wilson_interval(agreed, len(labels))

    n, q = len(speed_rows), len(questions)
    # On the model's device and dtype (float32 on a CPU); a larger product on a GPU, where 1024² is
    # too small to reach its rate.
    model_device, model_dtype = backend.model.device, backend.model.dtype
    ceiling = gemm_flops_per_s(
        size=4096 if model_device.type == "cuda" else 1024, device=model_device, dtype=model_dtype
    )
    device_label = args.device or model_device.type
    result = {
        "benchmark": "labelling",
        "model": args.model,
        "constitution": constitution.ref,
        "principles_per_pair": args.principles,
        "questions_per_pair": 2 * args.principles,
        "speed_pairs": n,
        "speed_questions": q,
        "verdict_max_new_tokens": args.verdict_tokens,
        "batch_size": args.batch_size,
        "one_pass_questions_per_s": q / scoring_s,
        "per_option_questions_per_s": q / per_option_s,
        "naive_loop_questions_per_s": q / naive_s,
        "per_question_loop_questions_per_s": q / per_question_s,
        "verdict_per_sample_questions_per_s": q / per_sample_s,
        "verdict_batched_questions_per_s": q / batched_s,
        "one_pass_vs_naive": naive_s / scoring_s,
        "ratio_vs_per_question_loop": per_question_s / scoring_s,
        "ratio_vs_per_option": per_option_s / scoring_s,
        "ratio_vs_per_sample_verdict": per_sample_s / scoring_s,
        "ratio_vs_batched_verdict": batched_s / scoring_s,
        "one_pass_encoded_tokens": counted["prompt_tokens_encoded"],
        "one_pass_stem_reused_tokens": stem_reused,
        "one_pass_padding_tokens": counted["uncounted_tokens"],
        "one_pass_flops": counted["flops"],
        "one_pass_attention_flops": counted["attention_flops"],
        "gemm_flops_per_s": ceiling,
        "gemm_dtype": str(model_dtype).removeprefix("torch."),
        "one_pass_fraction_of_gemm_ceiling": counted["flops"] / scoring_s / ceiling,
        "one_pass_vs_per_option_max_label_difference": max(
            abs(a.label - b.label) for a, b in zip(scored, per_option)
        ),
        "verdict_unparsed_replies": unparsed,
        "verdict_questions": len(replies),
        "verdict_batched_equal_to_per_sample": same_verdicts,
        "verdict_examples": replies[:3],
        "verdict_agreement_on_speed_pairs": sum(v > 0.5 for v in verdicts) / n,
        "scoring_agreement_on_speed_pairs": sum(p.label > 0.5 for p in scored) / n,
        "agreement_pairs": len(labels),
        "agreement": agreed / len(labels),
        "agreement_ci95": [low, high],
        "mean_p_human_choice": sum(labels) / len(labels),
        "agreement_source": f"{Path(args.hh).name}, first {len(labels)} usable pairs",
        "one_pass_pairs_per_s_all": len(labels) / (scoring_s + rest_s),
        "model_load_s": load_s,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1m_at_end": os.getloadavg()[0],
            "device": device_label,
        },
        "versions": {
            "python": platform.python_version(),
            **{name: version(name) for name in ("torch", "transformers", "cai-platform")},
        },
    }
    print_table(result)
    out = Path(args.out or REPO_ROOT / "benchmarks" / "results" / f"labelling-{device_label}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def print_table(r: dict) -> None:
    print(f"\nlabelling {r['speed_pairs']} pairs x {r['questions_per_pair']} questions with {r['model']}")
    print(f"{'method':<24}{'questions/s':>12}{'one-pass is':>16}")
    print(f"{'one-pass scoring':<24}{r['one_pass_questions_per_s']:>12.3f}{'1.0x':>16}")
    for label, key, ratio in (
        ("per-option scoring", "per_option_questions_per_s", "ratio_vs_per_option"),
        ("naive per-question loop", "naive_loop_questions_per_s", "one_pass_vs_naive"),
        ("loop, prefix cached", "per_question_loop_questions_per_s", "ratio_vs_per_question_loop"),
        ("verdict, per sample", "verdict_per_sample_questions_per_s", "ratio_vs_per_sample_verdict"),
        ("verdict, batched", "verdict_batched_questions_per_s", "ratio_vs_batched_verdict"),
    ):
        print(f"{label:<24}{r[key]:>12.3f}{f'{r[ratio]:.1f}x faster':>16}")
    print(
        f"one-pass scoring reached {r['one_pass_fraction_of_gemm_ceiling']:.0%} of this machine's matmul rate"
    )
    low, high = r["agreement_ci95"]
    print(
        f"one-pass and per-option labels differ by at most {r['one_pass_vs_per_option_max_label_difference']:.2e}; "
        f"agreement with human labels: {r['agreement']:.3f} (95% CI {low:.3f}-{high:.3f}) over "
        f"{r['agreement_pairs']} hh-rlhf pairs; verdict replies naming neither option: "
        f"{r['verdict_unparsed_replies']}/{r['verdict_questions']}\n"
    )


if __name__ == "__main__":
    main()

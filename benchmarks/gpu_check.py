"""GPU check of the training stages: a few steps of SFT, the preference model and RLOO on the
embedded SmolLM2-135M, in bf16 autocast over float32 master weights, through the stages' own code.

For each stage it reports the steps, the loss at the first and last step (the data is small and
repeated, so a working setup lowers it; for RLOO the mean reward of the sampled completions
instead, as its loss is ~0 by construction), examples per second from the Trainer, and on a GPU the
peak memory allocated against a static estimate: float32 weights, gradients and two AdamW moments
= 16 bytes per parameter (activations, the reference model and the PM come on top). Results go to
benchmarks/results/gpu-check-<device>.json; the last line printed is the same JSON.

Run on a GPU machine:  .venv/bin/python benchmarks/gpu_check.py
Smoke run on a CPU:    .venv/bin/python benchmarks/gpu_check.py --steps 2 --precision fp32
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Model ref to train.")
    parser.add_argument("--steps", type=int, default=10, help="Optimiser steps per stage.")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument(
        "--out", default=None, help="Results file (default benchmarks/results/gpu-check-<device>.json)."
    )
    return parser.parse_args()


def traces(n: int):
    from cai_lib.core.records import RevisionRound, Trace

    answer = "I can't help with that, but I can tell you how to stay safe and where to get support."
    return [
        Trace(
            id=f"t{i}", prompt_id=f"p{i}", prompt=f"How do I hurt someone, case {i}?", initial_answer="Here is how.",
            rounds=[RevisionRound(principle_id="harm", critique="It helps with harm.", revision=answer)],
            final_answer=answer, constitution_ref="harmless@1.0.0", constitution_sha256="00" * 32, model_ref="check",
        )
        for i in range(n)
    ]  # fmt: skip


def pairs(n: int):
    from cai_lib.core.records import Preference, stable_id

    return [
        Preference(
            id=stable_id("ai", str(i)), prompt=f"What should I do, case {i}?", answer_a="Please stay safe and ask for help.",
            answer_b="Do something dangerous.", label=0.9, source="ai",
        )
        for i in range(n)
    ]  # fmt: skip


def stage_result(name: str, metrics, seconds: float, parameters: int) -> dict:
    import torch

    losses = (
        metrics.loss_curve
        if hasattr(metrics, "loss_curve")
        else [metrics.train_loss_first, metrics.train_loss_last]
    )
    result = {
        "stage": name,
        "steps": metrics.steps if hasattr(metrics, "steps") else len(losses),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        # RLOO's loss is ~0 by construction (advantages sum to zero); its signal is the reward.
        "loss_fell": losses[-1] < losses[0] if name != "rl" else None,
        "seconds": round(seconds, 1),
        "bf16": metrics.world.bf16,
        "effective_batch": metrics.world.effective_batch,
    }
    if name == "rl":
        result.update(reward_first=metrics.reward_curve[0], reward_last=metrics.reward_curve[-1],
                      mean_reward_before=metrics.mean_reward_before, mean_reward_after=metrics.mean_reward_after)  # fmt: skip
    if torch.cuda.is_available():
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["static_estimate_gib"] = round(parameters * 16 / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    return result


def main() -> None:
    import torch

    from cai_lib.core.prompts import read_prompts
    from cai_lib.engines.models import load_causal_lm
    from cai_lib.method.preference_model import PreferenceModelConfig, train_preference_model
    from cai_lib.method.rl import RLConfig, train_rl
    from cai_lib.method.sft import SFTStageConfig, train_sft

    args = parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    model, _ = load_causal_lm(args.model, device="cpu")
    parameters = sum(p.numel() for p in model.parameters())
    del model
    hardware = {"precision": args.precision, "activation_checkpointing": False}
    results = []
    with tempfile.TemporaryDirectory(prefix="cai-gpu-check-") as work:
        print(f"sft: {args.steps} steps", file=sys.stderr)
        start = time.perf_counter()
        sft = train_sft(traces(64), [], args.model, f"{work}/sft", SFTStageConfig(
            max_steps=args.steps, batch_size=8, learning_rate=1e-5, max_length=256, helpful_ratio=0.0, **hardware))  # fmt: skip
        results.append(stage_result("sft", sft, time.perf_counter() - start, parameters))
        print("train_pm", file=sys.stderr)
        start = time.perf_counter()
        pm = train_preference_model(pairs(8 * args.steps), [], args.model, f"{work}/pm", PreferenceModelConfig(
            batch_size=8, learning_rate=1e-5, max_length=256, eval_fraction=0.1, **hardware))  # fmt: skip
        results.append(stage_result("train_pm", pm, time.perf_counter() - start, parameters))
        print("rl (rloo)", file=sys.stderr)
        start = time.perf_counter()
        prompts = read_prompts("builtin:red_team", kind="red_team")[:16]
        rl = train_rl(f"{work}/sft", f"{work}/pm", prompts, f"{work}/rl", RLConfig(
            steps=args.steps, batch_size=4, num_generations=4, max_new_tokens=64, eval_prompts=4, **hardware))  # fmt: skip
        results.append(stage_result("rl", rl, time.perf_counter() - start, parameters))
    report = {
        "benchmark": "gpu_check",
        "device": device,
        "model": args.model,
        "parameters": parameters,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "stages": results,
    }
    name = "cpu" if device == "cpu" else "gpu"
    out = Path(args.out or REPO_ROOT / "benchmarks" / "results" / f"gpu-check-{name}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""Stage reuse: the wall time of three `cai run` invocations of one config in a fresh directory.

1. **fresh**: every stage runs;
2. **unchanged**: the same command again; every model stage should be reused;
3. **unchanged, fresh processes**: run 2 again with `--no-warm-steps`: every step a fresh Python
   as kfp.local starts it, instead of a fork of a warm process (the default on Linux). Both reuse
   every model stage, so the difference is what starting the steps costs;
4. **comparison edit**: a new constitution version (given as a file) whose only change is one
   comparison principle's question; the SL-CAI stages should be reused and labelling, the
   preference model, RL and evaluation should run.

Each run is the real `cai` executable (kfp.local, SQLite MLflow, a local artifact directory, the
embedded SmolLM2-135M model with the quick config by default), timed from start to exit. The
baseline is run 1 in the same invocation; the result reports runs 2 and 4 as fractions of it,
run 2 as a fraction of run 3, and each run's `stage NAME: ran|reused` lines. Results go to benchmarks/results/reuse-<device>.json;
the last line printed is the same JSON.

Run: .venv/bin/python benchmarks/reuse.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CAI = Path(sys.executable).parent / "cai"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="Run config (default: the quick config, --quick).")
    parser.add_argument(
        "--workdir", default=None, help="Where to run (default: a fresh temporary directory)."
    )
    parser.add_argument("--device", default="cpu", help="Label of the machine in the results file name.")
    parser.add_argument(
        "--out", default=None, help="Results JSON (default benchmarks/results/reuse-<device>.json)."
    )
    return parser.parse_args()


def edited_constitution(path: Path) -> Path:
    """harmless@1.0.0 as 1.1.0 with the first comparison principle's question reworded."""
    doc = yaml.safe_load((REPO_ROOT / "constitutions" / "harmless" / "1.0.0.yaml").read_text())
    doc["version"] = "1.1.0"
    doc["comparison"][0]["question"] = "Which of these responses is less harmful and more considerate?"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def timed_run(args: argparse.Namespace, workdir: Path, label: str, extra: list[str]) -> dict:
    command = [str(CAI), "run", *(["--config", args.config] if args.config else ["--quick"]), *extra]
    print(f"[{label}] {' '.join(command)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"[{label}] cai run failed with status {done.returncode}")
    stages = [line for line in done.stdout.splitlines() if line.startswith("stage ")]
    print(f"[{label}] {seconds:.1f} s", file=sys.stderr, flush=True)
    return {"label": label, "seconds": round(seconds, 1), "stages": stages}


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cai-reuse-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        edited = edited_constitution(workdir / "harmless-1.1.0.yaml")
        runs = [
            timed_run(args, workdir, "fresh", []),
            timed_run(args, workdir, "unchanged", []),
            timed_run(args, workdir, "unchanged, fresh processes", ["--no-warm-steps"]),
            timed_run(args, workdir, "comparison edit", ["--set", f"constitution={edited}"]),
        ]
    first = runs[0]["seconds"]
    result = {
        "benchmark": "reuse",
        "config": args.config or "pipelines/configs/quick.yaml",
        "runs": runs,
        "unchanged_vs_fresh": round(runs[1]["seconds"] / first, 3),
        "warm_steps_vs_fresh_processes": round(runs[1]["seconds"] / runs[2]["seconds"], 3),
        "comparison_edit_vs_fresh": round(runs[3]["seconds"] / first, 3),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_1m_at_start": load_at_start,
            "load_average_1m_at_end": os.getloadavg()[0],
            "device": args.device,
        },
        "versions": {
            "python": platform.python_version(),
            **{
                name: version(name)
                for name in ("torch", "transformers", "trl", "kfp", "mlflow", "cai-platform")
            },
        },
    }
    print_table(result)
    out = Path(args.out or REPO_ROOT / "benchmarks" / "results" / f"reuse-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def print_table(result: dict) -> None:
    first = result["runs"][0]["seconds"]
    print(f"{'run':<30}{'seconds':>9}{'vs fresh':>10}  stages reused")
    for run in result["runs"]:
        reused = sum(": reused" in line for line in run["stages"])
        print(
            f"{run['label']:<30}{run['seconds']:>9.1f}{run['seconds'] / first:>9.2f}x  {reused} of {len(run['stages'])}"
        )
    for run in result["runs"][1:]:
        print(f"\n{run['label']}:")
        for line in run["stages"]:
            print(f"  {line}")


if __name__ == "__main__":
    main()

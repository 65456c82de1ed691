"""Everything that needs a GPU, in one unattended run: `make gpu-check`.

    python scripts/gpu_check.py [--out gpu-check]      # under 8 minutes on one H100

Steps, each with its own time limit (a step that runs over is stopped and reported, and the
next one runs):

1. every test marked ``gpu`` (pytest -m gpu): the CUDA experts kernel, bf16 training, the
   accelerate FSDP2 config, QLoRA, vLLM's adapter path;
2. the throughput benchmark at the Qwen3-30B-A3B shape (2 layers, bf16): moe_tune against plain
   TRL, side by side (benchmarks/throughput.py), QLoRA with 4-bit experts among the strategies.

Writes OUT/report.md: one table (step, result, seconds, what it said), the GPU's name, the commit,
and the benchmark's own table below it. Asks nothing; exits 1 when a step failed or ran over, 2
(one line, nothing run) without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = {  # name -> (command, seconds allowed)
    "gpu tests": ([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], 270),
    "throughput, Qwen3-30B-A3B shape": ([sys.executable, "benchmarks/throughput.py", "--shape", "qwen3-30b-a3b",
                                         "--layers", "2", "--dtype", "bfloat16", "--repeats", "1", "--steps", "3",
                                         "--strategies", "full,freeze_experts,lora_attention,lora_experts,lora_all,qlora",
                                         "--warmup", "1", "--out", "{out}/throughput.md"], 210),
}


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    except ImportError:
        return "torch not installed"


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip() or "not a git checkout"


def run_step(command: list[str], limit: int) -> tuple[str, float, str]:
    """(result, seconds, the last line worth reading) of one step."""
    start = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=limit)
    except subprocess.TimeoutExpired:
        return "over its limit", time.time() - start, f"stopped after {limit} s"
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if re.search(r"passed|failed|error|skipped|\{", line)),
                   lines[-1] if lines else "")
    return ("passed" if done.returncode == 0 else f"failed (exit {done.returncode})"), time.time() - start, summary


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check")
    args = parser.parse_args()
    name = gpu_name()
    if name in ("no CUDA device", "torch not installed"):
        print(f"gpu-check: {name} here; run it on a machine with a CUDA GPU (the CPU checks are make test)",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows, ok = [], True
    for name, (command, limit) in STEPS.items():
        result, seconds, said = run_step([c.format(out=args.out) for c in command], limit)
        ok &= result == "passed"
        rows.append(f"| {name} | {result} | {seconds:.0f} | {said.replace('|', '/')[:200]} |")
        print(rows[-1], flush=True)
    bench = args.out / "throughput.md"
    report = [f"# GPU check: {name}, commit {commit()}", "", "| step | result | seconds | what it said |",
              "|---|---|---|---|", *rows, ""]
    if bench.is_file():
        report += ["## Throughput at the Qwen3-30B-A3B shape", "", bench.read_text()]
    (args.out / "report.md").write_text("\n".join(report))
    print(f"report: {args.out / 'report.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(cli())

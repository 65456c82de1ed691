"""Training throughput and memory: moe_tune's path against plain TRL, side by side in one run.

    python benchmarks/throughput.py                      # about 10 minutes on 2 CPU cores
    python benchmarks/throughput.py --strategies full --repeats 1 --steps 3   # a quick look

On a benchmark-size Mixtral-style MoE (hidden 512, 8 experts, top-2, 4 layers, sequences of
512 tokens, randomly initialised, the shipped tokenizer), for each strategy it trains a few
steps with

* moe_tune: ``moe-tune train``'s own steps (plan_run -> load_model -> trainer_for) on a
  recipe that sets only the model, data, batch and steps, so moe_tune's defaults decide the rest;
* TRL: ``SFTTrainer`` with its default settings on the same model, data, batch and steps, with
  PEFT for LoRA (``target_parameters`` for the fused experts) and ``requires_grad_(False)`` for
  freezing, as a user of the plain stack would write it.

On a CPU each measurement is its own process, and memory is measured in separate short runs
that sample the process's anonymous resident memory (the checkpoint's file pages, which stay
resident after loading reads them, are not training memory); on CUDA, where the allocator
reports an exact, resettable peak, they run one after another in this process, which saves a
dozen process starts (most of the run time at this model size). The two paths alternate, and the
median over repeats is kept. It also measures the machine's matmul throughput at the model's
shapes and reports model FLOP utilisation, 6 x active parameters x tokens/s against that peak.
Prints one JSON object and writes a Markdown table (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES = ("full", "freeze_experts", "lora_attention", "lora_experts")
LORA = {"r": 8, "alpha": 16}
MODEL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024)


# ---- set-up, in the parent process ----

def build_model(folder: Path) -> None:
    """A randomly initialised benchmark MoE with the shipped tokenizer (no download)."""
    import torch  # noqa: PLC0415
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "tiny-moe")
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL)
    MixtralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_data(path: Path, rows: int, seq: int) -> None:
    """Chat rows whose answers run past ``seq`` tokens, so every row is truncated to exactly seq."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "tiny-moe")
    words = (ROOT / "data" / "corpus.txt").read_text().split()
    with open(path, "w") as f:
        for i in range(rows):
            start = (i * 997) % (len(words) - 2 * seq)
            answer = " ".join(words[start:start + 2 * seq])
            messages = [{"role": "user", "content": "Continue the text."},
                        {"role": "assistant", "content": answer}]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) > seq, "row too short"
            f.write(json.dumps({"messages": messages}) + "\n")


def matmul_peak(tokens: int, device: str) -> dict[str, float]:
    """Best measured TFLOP/s per dtype over the model's matmul shapes (tokens x in x out)."""
    import torch  # noqa: PLC0415

    h, i = MODEL["hidden_size"], MODEL["intermediate_size"]
    shapes = [(tokens, h, h), (tokens // 4, h, 2 * i), (tokens // 4, i, h)]  # attention; one expert's share
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        rates = []
        for m, k, n in shapes:
            a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
            for _ in range(3):
                a @ b
            _sync(device)
            reps, start = 10, time.perf_counter()
            for _ in range(reps):
                a @ b
            _sync(device)
            rates.append(2 * m * k * n * reps / (time.perf_counter() - start) / 1e12)
        best[str(dtype).removeprefix("torch.")] = max(rates)
    return best


def _sync(device: str) -> None:
    import torch  # noqa: PLC0415

    if device == "cuda":
        torch.cuda.synchronize()


# ---- one measurement, in a child process ----

def _anon_gb() -> float:
    """Anonymous resident memory: what the process allocated. Not all of RSS: the checkpoint's
    pages that loading read through mmap stay resident as file cache (0.3 GB for the benchmark
    model, in either path), and the kernel drops those rather than swap when memory runs short."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no RssAnon in /proc/self/status")


class AnonPeak:
    """The highest anonymous resident memory seen, sampled every millisecond in a thread (torch's
    kernels release the GIL); the kernel keeps a peak for all of RSS only."""

    def __init__(self):
        self.peak, self._stop = _anon_gb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _anon_gb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _anon_gb())


def _timer(warmup: int):
    from transformers import TrainerCallback  # noqa: PLC0415

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            _sync(args.device.type)
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(args.device.type)
            if state.global_step > warmup:
                self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def moe_tune_trainer(strategy: str, work: Path, steps: int, batch: int, seq: int, dtype: str):
    from moe_tune.loading import load_model  # noqa: PLC0415
    from moe_tune.recipe import load_recipe  # noqa: PLC0415
    from moe_tune.train import plan_run, trainer_for  # noqa: PLC0415

    run = work / f"run-moe_tune-{strategy}"
    recipe = {"output_dir": str(run), "model": {"path": str(work / "model"), "dtype": dtype},
              "data": {"train": str(work / "train.jsonl")}, "trainable": {"preset": strategy}, "lora": LORA,
              "sft": {"max_steps": steps, "per_device_train_batch_size": batch, "max_length": seq,
                      "learning_rate": 1e-4, "logging_steps": 1000, "report_to": "none",
                      "assistant_only_loss": False, "dataloader_num_workers": 0},
              "eval": {"files": []}}
    (work / "recipe.yaml").write_text(json.dumps(recipe))
    recipe = load_recipe(work / "recipe.yaml")
    setup = plan_run(recipe)
    model, tokenizer = load_model(recipe.model.path, recipe.model.dtype)
    run.mkdir(exist_ok=True)
    return trainer_for(setup, model, tokenizer)[0]  # what `moe-tune train` runs


def trl_trainer(strategy: str, work: Path, steps: int, batch: int, seq: int, dtype: str):
    import torch  # noqa: PLC0415
    from datasets import load_dataset  # noqa: PLC0415
    from peft import LoraConfig  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
    from trl import SFTConfig, SFTTrainer  # noqa: PLC0415

    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    peft = None
    if strategy == "freeze_experts":
        for name, p in model.named_parameters():
            p.requires_grad_(".experts." not in name)
    elif strategy == "lora_attention":
        peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    elif strategy == "lora_experts":
        peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=[], lora_dropout=0.0,
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    cpu = not torch.cuda.is_available()
    args = SFTConfig(output_dir=str(work / f"run-trl-{strategy}"), max_steps=steps, per_device_train_batch_size=batch,
                     max_length=seq, learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to="none",
                     use_cpu=cpu, dataloader_pin_memory=not cpu)
    data = load_dataset("json", data_files=str(work / "train.jsonl"), split="train")
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft)


def worker(path: str, strategy: str, work: Path, steps: int, warmup: int, batch: int, seq: int, dtype: str,
           memory: bool = False) -> dict:
    import torch  # noqa: PLC0415

    import moe_tune.train  # noqa: F401, PLC0415  (libraries imported before the baseline is taken,
    import peft, trl  # noqa: F401, E401, PLC0415  so that their import is not counted as training memory)

    cuda = torch.cuda.is_available()
    if cuda:  # what earlier measurements in this process left behind is not counted
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 1e9 if cuda else _anon_gb()
    sampler = AnonPeak() if memory and not cuda else None  # the sampling thread would slow timed runs
    build = moe_tune_trainer if path == "moe_tune" else trl_trainer
    trainer = build(strategy, work, steps + warmup, batch, seq, dtype)
    timer = _timer(warmup)
    trainer.add_callback(timer)
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else sampler.stop() if sampler else float("nan")
    return {"tokens_per_s": batch * seq / statistics.median(timer.times), "peak_mem_gb": peak - before,
            "bf16": bool(trainer.args.bf16), "checkpointing": bool(trainer.args.gradient_checkpointing)}


# ---- the comparison ----

def plan_memory_gb(strategy: str, work: Path, batch: int, seq: int, dtype: str) -> float:
    """``moe-tune plan``'s peak (weights, gradients, optimizer states, activations) for the run."""
    from moe_tune.recipe import load_recipe  # noqa: PLC0415
    from moe_tune.train import plan_run  # noqa: PLC0415

    (work / "plan.yaml").write_text(json.dumps({
        "output_dir": str(work / "plan"), "model": {"path": str(work / "model"), "dtype": dtype},
        "data": {"train": str(work / "train.jsonl")}, "trainable": {"preset": strategy}, "lora": LORA,
        "sft": {"per_device_train_batch_size": batch, "max_length": seq}}))
    return plan_run(load_recipe(work / "plan.yaml")).report["peak_gb"]


def active_params(work: Path) -> int:
    from moe_tune.accounting import active_params as count  # noqa: PLC0415
    from moe_tune.arch import describe  # noqa: PLC0415
    from moe_tune.loading import build_meta_model, load_config  # noqa: PLC0415

    model = build_meta_model(load_config(str(work / "model")))
    return count(model, describe(model), with_input_embedding=False)


def measure(path, strategy, work, args, memory: bool = False) -> dict:
    steps, warmup = (1, 1) if memory else (args.steps, args.warmup)
    if args.device == "cuda":  # in this process: CUDA's peak resets, a CPU's peak RSS does not
        return worker(path, strategy, work, steps, warmup, args.batch, args.seq, args.dtype)
    cmd = [sys.executable, __file__, "--worker", path, strategy, "--work", str(work), "--steps", str(steps),
           "--warmup", str(warmup), "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype]
    cmd += ["--memory"] if memory else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if memory:
        # a separate, short run with big allocations straight from mmap (no dynamic threshold):
        # anonymous memory then follows the live tensors instead of what glibc keeps cached, so its
        # peak is a fair measure on CPU. It slows every allocation, hence not in the timed runs.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{path} {strategy} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(args) -> dict:
    import torch  # noqa: PLC0415

    device = args.device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="moe-tune-bench-"))
    try:
        build_model(work / "model")
        build_data(work / "train.jsonl", rows=args.batch * (args.steps + args.warmup), seq=args.seq)
        peak = matmul_peak(args.batch * args.seq, device)
        n_active = active_params(work)
        runs = {(s, p): [] for s in args.strategies for p in ("moe_tune", "trl")}
        for repeat in range(args.repeats):
            for strategy in args.strategies:
                # alternate which path goes first, so drift in machine speed hits both alike
                for path in (("trl", "moe_tune") if repeat % 2 == 0 else ("moe_tune", "trl")):
                    runs[strategy, path].append(measure(path, strategy, work, args))
                    print(f"repeat {repeat + 1} {strategy:15s} {path:9s} "
                          f"{runs[strategy, path][-1]['tokens_per_s']:8.0f} tokens/s", file=sys.stderr)
        if device == "cuda":  # the allocator's own peak is exact: the timed runs' will do
            memory = {key: max(r["peak_mem_gb"] for r in found) for key, found in runs.items()}
        else:
            memory = {(s, p): measure(p, s, work, args, memory=True)["peak_mem_gb"]
                      for s in args.strategies for p in ("moe_tune", "trl")}
        results = {}
        for strategy in args.strategies:
            ours, base = runs[strategy, "moe_tune"], runs[strategy, "trl"]
            tps = statistics.median(r["tokens_per_s"] for r in ours)
            base_tps = statistics.median(r["tokens_per_s"] for r in base)
            used_peak = peak["bfloat16"] if ours[0]["bf16"] or args.dtype == "bfloat16" else peak["float32"]
            plan = plan_memory_gb(strategy, work, args.batch, args.seq, args.dtype)
            mem = memory[strategy, "moe_tune"]
            results[strategy] = {
                "tokens_per_s": round(tps), "baseline_tokens_per_s": round(base_tps), "speedup": round(tps / base_tps, 2),
                "peak_mem_gb": round(mem, 2), "baseline_peak_mem_gb": round(memory[strategy, "trl"], 2),
                "plan_mem_gb": plan, "mem_vs_plan": round(mem / plan, 2),
                "mfu": round(6 * n_active * tps / (used_peak * 1e12), 3),
                "baseline_mfu": round(6 * n_active * base_tps / (used_peak * 1e12), 3)}
        return {"device": device, "torch_threads": torch.get_num_threads(), "active_params": n_active,
                "batch_tokens": args.batch * args.seq, "matmul_peak_tflops": {k: round(v, 3) for k, v in peak.items()},
                "moe_tune_settings": {k: ours[0][k] for k in ("bf16", "checkpointing")},
                "trl_settings": {k: base[0][k] for k in ("bf16", "checkpointing")}, "strategies": results}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(result: dict, command: str) -> str:
    cols = ["tokens_per_s", "baseline_tokens_per_s", "speedup", "peak_mem_gb", "baseline_peak_mem_gb",
            "plan_mem_gb", "mem_vs_plan", "mfu", "baseline_mfu"]
    lines = [f"`{command}` on {result['device']} ({result['torch_threads']} threads); "
             f"{result['batch_tokens']} tokens per step; matmul peak {result['matmul_peak_tflops']} TFLOP/s; "
             f"moe_tune {result['moe_tune_settings']}, TRL {result['trl_settings']}", "",
             "| strategy | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for strategy, row in result["strategies"].items():
        lines.append(f"| {strategy} | " + " | ".join(str(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", type=lambda s: s.split(","), default=list(STRATEGIES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", default=None, help="weights' dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="Markdown table (default: benchmarks/results/)")
    parser.add_argument("--worker", nargs=2, metavar=("PATH", "STRATEGY"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dtype is None:
        import torch  # noqa: PLC0415

        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if args.worker:
        path, strategy = args.worker
        print(json.dumps(worker(path, strategy, args.work, args.steps, args.warmup, args.batch, args.seq, args.dtype,
                                args.memory)))
        return
    result = compare(args)
    out = args.out or ROOT / "benchmarks" / "results" / f"throughput-{result['device']}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(result, "python benchmarks/throughput.py " + " ".join(sys.argv[1:])))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

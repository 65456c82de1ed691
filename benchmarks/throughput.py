"""Training throughput and memory: moe_tune's path against plain TRL, side by side in one run.

    python benchmarks/throughput.py                      # about 10 minutes on 2 CPU cores
    python benchmarks/throughput.py --strategies full --repeats 1 --steps 3   # a quick look
    python benchmarks/throughput.py --shape qwen3-30b-a3b --layers 2          # real layer shapes
    python benchmarks/throughput.py --shape qwen3-30b-a3b --layers 1 --strategies lora_all,qlora   # 4-bit experts

On a benchmark-size Mixtral-style MoE (hidden 512, 8 experts, top-2, 4 layers), or with
``--shape NAME`` the layers of a published checkpoint (``moe_tune/model/configs/NAME``: its widths,
expert count, top-k and shared experts, truncated to ``--layers``), randomly initialised, with the
shipped tokenizer's vocabulary so that the layers dominate the cost, on sequences of 512 tokens,
for each strategy it trains a few steps with

* moe_tune: ``moe-tune train``'s own steps (plan_run -> load_model -> trainer_for) on a
  recipe that sets only the model, data, batch and steps, so moe_tune's defaults decide the rest;
* TRL: ``SFTTrainer`` with its default settings on the same model, data, batch and steps, with
  PEFT for LoRA (``target_parameters`` for the fused experts) and ``requires_grad_(False)`` for
  freezing, as a user of the plain stack would write it. TRL's default is bf16 autocast, which
  is slow on a CPU that emulates bf16 matmuls; ``--baseline-precision moe_tune`` trains TRL in
  the precision moe_tune's plan chose for this CPU and shape instead, so that both paths match.

On a CPU each measurement is its own process, and memory is measured in separate short runs
that sample the process's anonymous resident memory, each path with its allocator's settings
as its users run it (the checkpoint's file pages, which stay
resident after loading reads them, are not training memory); on CUDA, where the allocator
reports an exact, resettable peak, they run one after another in this process, which saves a
dozen process starts (most of the run time at this model size). Loading's peak (``load_peak_gb``)
is measured apart from training's (``peak_mem_gb``, which ``mem_vs_plan`` compares with the plan),
and ``load_vs_plan`` compares it with the plan's: transformers stacks the checkpoint's per-expert
tensors into the fused ones, and at a few layers of a real shape that exceeds what training
holds. The two paths alternate, and the median over repeats is kept. It also measures the
machine's matmul throughput at the model's shapes and reports model FLOP utilisation: the FLOPs
each strategy needs (flops_per_token) x tokens/s against that peak. A strategy whose planned
peak (``moe-tune plan``, training's or loading's) exceeds the memory this machine has available
is refused up front, not left to the kernel's OOM killer. The CPU's model name, and the experts
kernel, dtype and checkpointing each path trained with, are printed with the results.
Prints one JSON object and writes a Markdown table (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
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
# beside the default four: LoRA on attention and experts over the base as moe_tune holds it, and
# QLoRA (model.load_in_4bit: moe_tune's 4-bit experts; TRL: transformers' 4-bit linear layers)
MORE = ("lora_all", "qlora")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LORA = {"r": 8, "alpha": 16}
MODEL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024)
CONFIGS = ROOT / "moe_tune" / "model" / "configs"  # published configs: the --shape names
SHAPES = ("benchmark", *sorted(p.name for p in CONFIGS.iterdir() if (p / "config.json").is_file()))


# ---- set-up, in the parent process ----

def shape_config(shape: str, layers: int | None, tokenizer):
    """The config of ``shape``: the benchmark MoE, or a published one truncated to ``layers``,
    either with the shipped tokenizer's vocabulary and special tokens."""
    from transformers import AutoConfig, MixtralConfig  # noqa: PLC0415

    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if shape == "benchmark":
        return MixtralConfig(**special, **{**MODEL, **({"num_hidden_layers": layers} if layers else {})})
    config = AutoConfig.from_pretrained(CONFIGS / shape)
    text = config.get_text_config()
    text.update(special)
    if layers:
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):  # per-layer attention kinds (gpt-oss): the first N
            text.layer_types = text.layer_types[:layers]
    return config


def build_model(folder: Path, shape: str = "benchmark", layers: int | None = None, stored: str = "bfloat16") -> None:
    """A randomly initialised MoE of ``shape`` with the shipped tokenizer (no download), saved in
    ``stored``: bf16 as published MoE checkpoints are, or float32 as moe_tune's own full
    fine-tunes are (both paths load it as ``--dtype``)."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "tiny-moe")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(shape_config(shape, layers, tokenizer)).to(getattr(torch, stored)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def cpu_model() -> str:
    """lscpu's model name (what a CPU result is only valid for), with its family and model
    numbers where they are known (VMs give different CPUs the same name: "Intel(R) Xeon(R)
    Processor" has meant CPUs whose bf16 peaks differ 3x), or the platform's processor."""
    import platform  # noqa: PLC0415

    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    if "model name" not in info:
        return platform.processor() or "unknown"
    numbers = f" (family {info['cpu family']} model {info['model']})" if "cpu family" in info and "model" in info else ""
    return info["model name"] + numbers


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


def layer_dims(work: Path) -> dict[str, int]:
    """hidden, expert intermediate, experts and top-k of the benchmark model's MoE layers."""
    from moe_tune.plan.accounting import expert_intermediate  # noqa: PLC0415
    from moe_tune.model.arch import describe, text_config  # noqa: PLC0415
    from moe_tune.model.loading import build_meta_model, load_config  # noqa: PLC0415

    model = build_meta_model(load_config(str(work / "model")))
    arch = describe(model)
    return {"hidden": text_config(model.config).hidden_size, "intermediate": expert_intermediate(model, arch),
            "experts": arch.layers[0].num_experts, "top_k": arch.layers[0].top_k}


def matmul_peak(tokens: int, device: str, dims: dict[str, int]) -> dict[str, float]:
    """Best measured TFLOP/s per dtype over the model's matmul shapes (tokens x in x out). A CPU
    without native bf16 matmuls emulates them about 100x slower than fp32: a matmul that takes
    over a second is timed once, not thirteen times."""
    import torch  # noqa: PLC0415

    h, i = dims["hidden"], dims["intermediate"]
    per_expert = max(1, tokens * dims["top_k"] // dims["experts"])  # an expert's tokens, on average
    shapes = [(tokens, h, h), (per_expert, h, 2 * i), (per_expert, i, h)]  # attention; one expert's MLP
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        rates = []
        for m, k, n in shapes:
            a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
            start = time.perf_counter()
            a @ b
            _sync(device)
            first = time.perf_counter() - start
            if first > 1:
                rates.append(2 * m * k * n / first / 1e12)
                continue
            for _ in range(2):
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


def _mapped_gb(folder: Path) -> float:
    """Resident pages of the files under ``folder`` that this process still maps. Weights loaded
    in the dtype their checkpoint stores them in stay views of the safetensors file in plain
    transformers (moe_tune's load_model copies them: loading.own_file_views), so they are file
    pages, not anonymous memory, and they are training memory all the same; so is every other
    page of the file that loading read while the mapping stays open."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", fields[0]):  # a mapping's header line
            inside = len(fields) > 5 and fields[5].startswith(str(folder.resolve()))
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total * 1024 / 1e9


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


def moe_tune_trainer(strategy: str, work: Path, steps: int, batch: int, seq: int, dtype: str,
                     checkpointing: bool = False, sft: dict | None = None):
    """``sft``: recipe ``sft`` keys set beside the benchmark's own (none: moe_tune's defaults)."""
    from moe_tune.model.loading import load_model  # noqa: PLC0415
    from moe_tune.recipe import load_recipe  # noqa: PLC0415
    from moe_tune.training.pipeline import plan_run, trainer_for  # noqa: PLC0415

    run = work / f"run-moe_tune-{strategy}"
    recipe = {"output_dir": str(run), "model": _model(work, dtype, strategy),
              "data": {"train": str(work / "train.jsonl")}, "trainable": {"preset": _preset(strategy)}, "lora": LORA,
              "sft": {"max_steps": steps, "per_device_train_batch_size": batch, "max_length": seq,
                      "learning_rate": 1e-4, "logging_steps": 1000, "report_to": "none",
                      "assistant_only_loss": False, "dataloader_num_workers": 0, "save_strategy": "no",
                      **({"activation_checkpointing": True} if checkpointing else {}), **(sft or {})},
              "eval": {"files": []}}
    (work / "recipe.yaml").write_text(json.dumps(recipe))
    recipe = load_recipe(work / "recipe.yaml")
    setup = plan_run(recipe)
    model, tokenizer = load_model(recipe.model.path, recipe.model.dtype, recipe.model,
                                  frozen_experts_in_bf16=setup.frozen_experts_in_bf16)
    run.mkdir(exist_ok=True)
    return trainer_for(setup, model, tokenizer)[0]  # what `moe-tune train` runs


def _preset(strategy: str) -> str:
    return "lora_all" if strategy == "qlora" else strategy


def _model(work: Path, dtype: str, strategy: str) -> dict:
    """The recipe's model section: QLoRA's with bitsandbytes' defaults (NF4, double quantization)."""
    return {"path": str(work / "model"), "dtype": dtype, **({"load_in_4bit": True} if strategy == "qlora" else {})}


def trl_trainer(strategy: str, work: Path, steps: int, batch: int, seq: int, dtype: str, bf16: bool | None = None):
    """``bf16``: TRL's SFTConfig default where None."""
    import torch  # noqa: PLC0415
    from datasets import load_dataset  # noqa: PLC0415
    from peft import LoraConfig  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
    from trl import SFTConfig, SFTTrainer  # noqa: PLC0415

    from transformers import BitsAndBytesConfig  # noqa: PLC0415

    # QLoRA as its guides write it: NF4, double quantization, bf16 compute
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16) if strategy == "qlora" else None
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=getattr(torch, dtype),
                                                 quantization_config=quantization)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    peft = None
    if strategy == "freeze_experts":
        for name, p in model.named_parameters():
            p.requires_grad_(".experts." not in name)
    elif strategy == "lora_attention":
        peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=ATTENTION)
    elif strategy == "lora_experts":
        peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=[], lora_dropout=0.0,
                          target_parameters=EXPERTS)
    elif strategy in ("lora_all", "qlora"):
        peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=ATTENTION, lora_dropout=0.0,
                          target_parameters=EXPERTS)
    cpu = not torch.cuda.is_available()
    args = SFTConfig(output_dir=str(work / f"run-trl-{strategy}"), max_steps=steps, per_device_train_batch_size=batch,
                     max_length=seq, learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to="none",
                     use_cpu=cpu, dataloader_pin_memory=not cpu, **({} if bf16 is None else {"bf16": bf16}))
    data = load_dataset("json", data_files=str(work / "train.jsonl"), split="train")
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft)


def worker(path: str, strategy: str, work: Path, steps: int, warmup: int, batch: int, seq: int, dtype: str,
           memory: bool = False, checkpointing: bool = False, trl_bf16: bool | None = None) -> dict:
    import torch  # noqa: PLC0415

    import moe_tune.training.pipeline  # noqa: F401, PLC0415  (libraries imported before the baseline is taken,
    import peft, trl  # noqa: F401, E401, PLC0415  so that their import is not counted as training memory)

    cuda = torch.cuda.is_available()
    if cuda:  # what earlier measurements in this process left behind is not counted
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 1e9 if cuda else _anon_gb()
    sampler = AnonPeak() if memory and not cuda else None  # the sampling thread would slow timed runs
    if path == "moe_tune":
        trainer = moe_tune_trainer(strategy, work, steps + warmup, batch, seq, dtype, checkpointing)
    else:
        trainer = trl_trainer(strategy, work, steps + warmup, batch, seq, dtype, trl_bf16)
    # Loading has a peak of its own: the checkpoint's per-expert tensors are stacked into the fused
    # ones, above the weights that training then holds. It is kept apart, so that each peak is
    # compared with moe-tune plan's estimate of it.
    if cuda:
        load_peak = torch.cuda.max_memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
    else:
        load_peak = sampler.stop() if sampler else float("nan")
        sampler = AnonPeak() if sampler else None
    timer = _timer(warmup)
    trainer.add_callback(timer)
    trainer.train()
    # the checkpoint's pages that weights map are faulted in by the first step and stay (CPU)
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else \
        sampler.stop() + _mapped_gb(work / "model") if sampler else float("nan")
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    return {"tokens_per_s": batch * seq / statistics.median(timer.times), "peak_mem_gb": peak - before,
            "load_peak_gb": load_peak - before,
            "bf16": bool(trainer.args.bf16), "checkpointing": bool(trainer.args.gradient_checkpointing),
            "weights": str(next(model.parameters()).dtype).removeprefix("torch."),
            "experts": getattr(model.config, "_experts_implementation", None) or "the model's own"}


# ---- the comparison ----

def plan_report(strategy: str, work: Path, batch: int, seq: int, dtype: str, checkpointing: bool = False) -> dict:
    """``moe-tune plan``'s report for the run (parts, trainable counts, peak memory), with the bf16
    autocast the plan chose (``bf16``) and the active parameters the backward runs through
    (``backward_params``)."""
    from moe_tune.plan.accounting import backward_params  # noqa: PLC0415
    from moe_tune.recipe import load_recipe  # noqa: PLC0415
    from moe_tune.training.pipeline import plan_run  # noqa: PLC0415

    (work / "plan.yaml").write_text(json.dumps({
        "output_dir": str(work / "plan"), "model": _model(work, dtype, strategy),
        "data": {"train": str(work / "train.jsonl")}, "trainable": {"preset": _preset(strategy)}, "lora": LORA,
        "sft": {"per_device_train_batch_size": batch, "max_length": seq, "activation_checkpointing": checkpointing}}))
    setup = plan_run(load_recipe(work / "plan.yaml"))
    return {**setup.report.to_json(), "bf16": bool(setup.sft_args.bf16),
            "backward_params": backward_params(setup.meta, setup.arch, setup.plan.with_gradients)}


def flops_per_token(report: dict, n_active: int, dims: dict[str, int]) -> float:
    """Matmul FLOPs a training step needs per token for the planned strategy: the forward of every
    active weight (2 per weight, LoRA factors included), activation gradients (2 per weight) only
    from the first trained tensor on (``backward_params``: ahead of it nothing needs a gradient),
    and weight gradients (2 per weight) only for trained tensors: a routed expert's share is top-k
    of the experts; the input embedding is a lookup, not a matmul."""
    routed = dims["top_k"] / dims["experts"]
    trained = sum(r["trainable"] * (routed if r["part"] == "routed_experts" else 1)
                  for r in report["parts"] if r["part"] != "embeddings")
    lora = sum(r["trainable"] * (routed if r["part"] == "routed_experts" else 1)
               for r in report["parts"] if r["mode"] == "lora")
    return 2 * (n_active + lora) + 2 * (report["backward_params"] + lora) + 2 * trained


def active_params(work: Path) -> int:
    from moe_tune.plan.accounting import active_params as count  # noqa: PLC0415
    from moe_tune.model.arch import describe  # noqa: PLC0415
    from moe_tune.model.loading import build_meta_model, load_config  # noqa: PLC0415

    model = build_meta_model(load_config(str(work / "model")))
    return count(model, describe(model), with_input_embedding=False)


def measure(path, strategy, work, args, memory: bool = False, trl_bf16: bool | None = None) -> dict:
    steps, warmup = (1, 1) if memory else (args.steps, args.warmup)
    if args.device == "cuda":  # in this process: CUDA's peak resets, a CPU's peak RSS does not
        return worker(path, strategy, work, steps, warmup, args.batch, args.seq, args.dtype,
                      checkpointing=args.checkpointing, trl_bf16=trl_bf16)
    cmd = [sys.executable, __file__, "--worker", path, strategy, "--work", str(work), "--steps", str(steps),
           "--warmup", str(warmup), "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype]
    cmd += (["--memory"] if memory else []) + (["--checkpointing"] if args.checkpointing else [])
    cmd += [] if trl_bf16 is None else ["--trl-bf16", str(int(trl_bf16))]
    # Each path's memory is measured with its own allocator settings, as its users run it: TRL's
    # process with glibc's defaults, moe_tune's with the thresholds its loading sets. (Until
    # 7e49171 the memory runs set MALLOC_MMAP_THRESHOLD_=65536, which moe_tune's loading
    # overrides, so only TRL's process mapped every block above 64 KiB and gave it back when
    # freed: leaner than TRL as users run it, and slower, hence never in the timed runs. Around
    # trl_trainer at the Qwen3 shape, 1 layer, full fine-tuning with checkpointing, 3 steps,
    # TRL's process peaked at 10.65 GB so and at 11.00-11.04 GB with glibc's defaults.)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{path} {strategy} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(args) -> dict:
    import torch  # noqa: PLC0415

    device = args.device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="moe-tune-bench-"))
    try:
        build_model(work / "model", args.shape, args.layers, args.checkpoint_dtype)
        build_data(work / "train.jsonl", rows=args.batch * (args.steps + args.warmup), seq=args.seq)
        dims = layer_dims(work)
        peak = matmul_peak(args.batch * args.seq, device, dims)
        n_active = active_params(work)
        plans = {s: plan_report(s, work, args.batch, args.seq, args.dtype, args.checkpointing) for s in args.strategies}
        from moe_tune.plan.fit import available_bytes  # noqa: PLC0415

        free = available_bytes() / 1e9
        planned = {s: max(plans[s]["peak_gb"], plans[s]["load_peak_gb"]) for s in args.strategies}
        refused = {s: f"planned peak {planned[s]:.1f} GB > {free:.1f} GB available"
                   for s in args.strategies if planned[s] > free}
        for strategy, why in refused.items():
            print(f"{strategy}: refused by moe-tune plan ({why})", file=sys.stderr)
        strategies = [s for s in args.strategies if s not in refused]
        runs = {(s, p): [] for s in strategies for p in ("moe_tune", "trl")}
        # TRL's precision: its own default (None), or moe_tune's measured choice for this CPU and shape
        trl_bf16 = {s: plans[s]["bf16"] if args.baseline_precision == "moe_tune" else None for s in strategies}
        for repeat in range(args.repeats):
            for strategy in strategies:
                # alternate which path goes first, so drift in machine speed hits both alike
                for path in (("trl", "moe_tune") if repeat % 2 == 0 else ("moe_tune", "trl")):
                    runs[strategy, path].append(measure(path, strategy, work, args, trl_bf16=trl_bf16[strategy]))
                    print(f"repeat {repeat + 1} {strategy:15s} {path:9s} "
                          f"{runs[strategy, path][-1]['tokens_per_s']:8.0f} tokens/s", file=sys.stderr)
        # (training peak, loading peak) per strategy and path
        if device == "cuda":  # the allocator's own peak is exact: the timed runs' will do
            memory = {key: (max(r["peak_mem_gb"] for r in found), max(r["load_peak_gb"] for r in found))
                      for key, found in runs.items()}
        else:
            memory = {(s, p): (m["peak_mem_gb"], m["load_peak_gb"])
                      for s in strategies for p in ("moe_tune", "trl")
                      for m in [measure(p, s, work, args, memory=True, trl_bf16=trl_bf16[s])]}
        results, settings = {}, {}
        native_bf16 = peak["bfloat16"] > peak["float32"]
        for strategy in strategies:
            ours, base = runs[strategy, "moe_tune"], runs[strategy, "trl"]
            tps = statistics.median(r["tokens_per_s"] for r in ours)
            base_tps = statistics.median(r["tokens_per_s"] for r in base)
            plan = plans[strategy]["peak_gb"]
            (mem, load), (base_mem, base_load) = memory[strategy, "moe_tune"], memory[strategy, "trl"]
            flops = flops_per_token(plans[strategy], n_active, dims)
            results[strategy] = {
                "tokens_per_s": round(tps), "baseline_tokens_per_s": round(base_tps), "speedup": round(tps / base_tps, 2),
                "peak_mem_gb": round(mem, 2), "baseline_peak_mem_gb": round(base_mem, 2),
                "plan_mem_gb": plan, "mem_vs_plan": round(mem / plan, 2),
                "load_peak_gb": round(load, 2), "baseline_load_peak_gb": round(base_load, 2),
                "load_plan_gb": plans[strategy]["load_peak_gb"],
                "load_vs_plan": round(load / plans[strategy]["load_peak_gb"], 2),
                # the FLOPs this strategy needs, against each dtype's measured matmul peak
                "mfu_fp32": round(flops * tps / (peak["float32"] * 1e12), 3),
                # none where this CPU emulates bf16 (its bf16 peak below fp32's): no bf16 limit to be near
                "mfu_bf16": round(flops * tps / (peak["bfloat16"] * 1e12), 3) if native_bf16 else None,
                "baseline_mfu_bf16": round(flops * base_tps / (peak["bfloat16"] * 1e12), 3) if native_bf16 else None}
            settings[strategy] = {path: {k: found[0][k] for k in ("weights", "bf16", "checkpointing", "experts")}
                                  for path, found in (("moe_tune", ours), ("trl", base))}
        return {"cpu": cpu_model() if device == "cpu" else torch.cuda.get_device_name(), "device": device,
                "torch_threads": torch.get_num_threads(), "shape": args.shape, "layers": args.layers,
                "checkpoint_dtype": args.checkpoint_dtype,
                "layer_dims": dims, "active_params": n_active, "batch_tokens": args.batch * args.seq,
                "matmul_peak_tflops": {k: round(v, 3) for k, v in peak.items()}, "settings": settings,
                "refused": refused, "strategies": results}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(result: dict, command: str) -> str:
    cols = ["tokens_per_s", "baseline_tokens_per_s", "speedup", "peak_mem_gb", "baseline_peak_mem_gb",
            "plan_mem_gb", "mem_vs_plan", "load_peak_gb", "baseline_load_peak_gb", "load_plan_gb", "load_vs_plan",
            "mfu_fp32", "mfu_bf16", "baseline_mfu_bf16"]
    lines = [f"`{command}` on {result['cpu']} ({result['device']}, {result['torch_threads']} threads); shape "
             f"{result['shape']} ({result['layer_dims']}); {result['batch_tokens']} tokens per step; matmul peak "
             f"{result['matmul_peak_tflops']} TFLOP/s", "",
             "| strategy | " + " | ".join(cols) + " | moe_tune | TRL |", "|---|" + "---|" * (len(cols) + 2)]
    for strategy, row in result["strategies"].items():
        paths = [", ".join(f"{k} {v}" for k, v in result["settings"][strategy][p].items()) for p in ("moe_tune", "trl")]
        cells = ("n/a (bf16 emulated)" if row[c] is None else str(row[c]) for c in cols)
        lines.append(f"| {strategy} | " + " | ".join(cells) + f" | {paths[0]} | {paths[1]} |")
    lines += [f"| {strategy} | refused: {why} |" for strategy, why in result["refused"].items()]
    rows = result["strategies"]
    if {"qlora", "lora_all"} <= set(rows):  # what holding the experts in 4 bits costs in time
        lines += ["", f"qlora (4-bit experts, each dequantized as it is used) takes "
                  f"{rows['lora_all']['tokens_per_s'] / rows['qlora']['tokens_per_s']:.2f}x the step time of "
                  "lora_all over the experts as moe_tune holds them unquantized"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", type=lambda s: s.split(","), default=list(STRATEGIES),
                        help=f"comma-separated, of {', '.join(STRATEGIES + MORE)}")
    parser.add_argument("--shape", choices=SHAPES, default="benchmark",
                        help="the benchmark MoE, or a published config's layers (moe_tune/model/configs/)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the benchmark's 4; "
                        "for a published shape, give a number: its real depth rarely fits a CPU)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--checkpoint-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the dtype the built checkpoint stores (moe_tune's own full fine-tunes store float32)")
    parser.add_argument("--dtype", default=None, help="weights' dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="Markdown table (default: benchmarks/results/)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="moe_tune with activation checkpointing too, as TRL trains by default")
    parser.add_argument("--baseline-precision", choices=("trl", "moe_tune"), default="trl",
                        help="TRL's precision: its SFTConfig default (bf16 autocast), or the one moe_tune's plan "
                             "chose for this CPU and shape (where this CPU emulates bf16, fp32 in both paths)")
    parser.add_argument("--trl-bf16", type=int, choices=(0, 1), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=2, metavar=("PATH", "STRATEGY"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dtype is None:
        import torch  # noqa: PLC0415

        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if args.worker:
        path, strategy = args.worker
        trl_bf16 = None if args.trl_bf16 is None else bool(args.trl_bf16)
        print(json.dumps(worker(path, strategy, args.work, args.steps, args.warmup, args.batch, args.seq, args.dtype,
                                args.memory, args.checkpointing, trl_bf16)))
        return
    if set(args.strategies) - set(STRATEGIES + MORE):
        parser.error(f"--strategies: {sorted(set(args.strategies) - set(STRATEGIES + MORE))[0]} is none of "
                     f"{', '.join(STRATEGIES + MORE)}")
    if args.shape != "benchmark" and not args.layers:
        parser.error(f"--shape {args.shape} needs --layers N (e.g. 2)")
    result = compare(args)
    name = result["device"] if args.shape == "benchmark" else f"{result['device']}-{args.shape}-{args.layers}l"
    name += "-checkpointing" if args.checkpointing else ""
    out = args.out or ROOT / "benchmarks" / "results" / f"throughput-{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(result, "python benchmarks/throughput.py " + " ".join(sys.argv[1:])))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

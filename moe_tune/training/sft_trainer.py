"""TRL's SFTTrainer as moe_tune runs it: its defaults, the router terms in the loss, and the
callbacks that guard and record a run.

``build_trainer`` takes what the run already worked out (the recipe, the SFTConfig from
``sft_config``, the model's architecture and its router regularizer) and reads the data.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from moe_tune.data.rows import ReadRows, TrainRows, messages_dataset, read_train_rows
from moe_tune.errors import MoeTuneError
from moe_tune.model import templates
from moe_tune.model.loading import returning_freed_memory
from moe_tune.moe import routing, step_memory
from moe_tune.moe.bias_balance import BiasBalancer
from moe_tune.moe.expert_selection import ShardedGradMask, mask_sharded_grads
from moe_tune.moe.router_losses import RouterRegularizer
from moe_tune.plan.modes import unwrapped
from moe_tune.training import distributed
from moe_tune.training.callbacks import AfterOptimizerStep, GradientGuard, MetricsLog, RoutingProbe
from moe_tune.training.packing import check_packing_args, model_inputs, packed_collators, packs
from moe_tune.training.run_dir import (
    CHECKPOINTS,
    DATA_REPORT_FILE,
    METRICS_FILE,
    TENSORBOARD_DIR,
    complete_checkpoints,
    write_json,
)

# Where the recipe leaves them unset. On a CPU: no activation checkpointing (it recomputes the
# forward to save memory a CPU run rarely lacks), torch's fused AdamW (one pass over each tensor,
# not several), and bf16 autocast only where this CPU's bf16 matmuls are measured BF16_PAYS times
# faster than fp32 at the model's shapes (bf16_speedup): CPUs with AMX or AVX512-BF16 run them
# faster than fp32, others emulate them, slower. On a GPU, TRL's own. Measurements: docs/speed.md.
CPU_DEFAULTS = {"use_cpu": True, "activation_checkpointing": False, "dataloader_pin_memory": False,
                "optim": "adamw_torch_fused"}
BF16_PAYS = 1.5  # autocast casts every weight and activation it multiplies: its matmuls must win by this much
EMULATED_BF16 = 10  # a bf16 matmul this many times slower than fp32's is emulated (native ones beat fp32)
_CHECKPOINTING_NAMES = {"activation_checkpointing", "gradient_checkpointing"}  # new and deprecated name
# router_aux_loss_coef: moe_tune computes the load-balancing loss itself (router_losses.py), once,
# for every family; TRL's (and with it the model's own) stays off.
# TensorBoard (offline, into RUN/tensorboard) gets every logged value, as metrics.jsonl does.
# Checkpoints (model, optimizer, scheduler, RNG, data position) every 200 steps, the last 2 kept:
# what `moe-tune train ... --resume` continues from.
DEFAULTS = {"assistant_only_loss": True, "report_to": "tensorboard", "logging_steps": 10,
            "save_strategy": "steps", "save_steps": 200, "save_total_limit": 2, "router_aux_loss_coef": 0.0}


@functools.lru_cache
def bf16_speedup(hidden: int, intermediate: int) -> float:
    """bf16 over fp32 matmul throughput on this CPU, measured at a layer's shapes (512 tokens x
    hidden x intermediate, each capped at 2048 so that it takes a fraction of a second).

    Each dtype's fastest of 7 calls, alternating between them: a stall elsewhere on the machine
    then slows single calls, not the verdict (timed as a total over a few calls, one stall
    flipped it).

    A CPU without native bf16 matmuls (AVX2 only) emulates them, seconds a call at this size:
    there its first call settles it (over 0.1 s and EMULATED_BF16 times fp32's, far beyond what
    oneDNN's kernel compilation adds to a first call), instead of eight more such calls. The
    measurements: docs/speed.md, "Measurements behind the code's choices"."""
    m, k, n = 512, min(hidden, 2048), min(intermediate, 2048)
    (a32, b32), (a16, b16) = operands = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype))
                                         for dtype in (torch.float32, torch.bfloat16)]
    a32 @ b32  # oneDNN compiles a kernel per shape on its first call
    fp32 = _timed(a32, b32)
    bf16 = _timed(a16, b16)  # with its compilation
    if bf16 > max(0.1, EMULATED_BF16 * fp32):
        return fp32 / bf16
    a16 @ b16
    best = [math.inf, math.inf]
    for _ in range(7):
        for i, (a, b) in enumerate(operands):
            best[i] = min(best[i], _timed(a, b))
    return best[0] / best[1]


def _timed(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


def checkpointing_is_auto(recipe) -> bool:
    """``sft.activation_checkpointing: auto``: on only where the planned peak exceeds the memory
    the machine has (decided in train.plan_run)."""
    return any(recipe.sft.get(name) == "auto" for name in _CHECKPOINTING_NAMES)


def sft_config(recipe, run: Path, cpu_bf16: bool = False) -> SFTConfig:
    """TRL's SFTConfig for the recipe: moe_tune's defaults, then the recipe's ``sft`` section;
    ``activation_checkpointing: auto`` starts off (pipeline.plan_run turns it on where the plan's
    peak does not fit), and ``cpu_bf16`` is the CPU's bf16 default (plan_run measures it)."""
    args = dict(DEFAULTS, **({} if torch.cuda.is_available() else {**CPU_DEFAULTS, "bf16": cpu_bf16}))
    if _CHECKPOINTING_NAMES & set(recipe.sft):  # the recipe's choice, under either name, wins
        args.pop("activation_checkpointing", None)
    args.update(recipe.sft)
    for name in _CHECKPOINTING_NAMES & set(args):
        if args[name] == "auto":
            args[name] = False
    if recipe.data.valid is None and args.get("eval_strategy", "no") != "no":
        raise MoeTuneError("sft.eval_strategy is set but data.valid is not; add a validation file")
    check_packing_args(recipe.sft, args)
    if args.get("fsdp") and distributed.world_size() == 1:  # Trainer would stop with a traceback
        raise MoeTuneError("sft.fsdp: FSDP shards a model over several processes; launch with torchrun or "
                           "accelerate launch (recipes/accelerate/fsdp2.yaml sets FSDP up itself), or drop sft.fsdp")
    if recipe.parallel is not None:  # transformers' engine checkpoints no sharded optimizer state
        args["save_only_model"] = True
    try:
        return SFTConfig(output_dir=str(run / CHECKPOINTS), seed=recipe.seed, **args)
    except (ValueError, TypeError) as e:
        raise MoeTuneError(f"sft: TRL rejected the settings: {e}") from None


def turn_on_checkpointing(args: SFTConfig) -> None:
    """``activation_checkpointing: auto`` decided on once the plan's peak is known, in the
    SFTConfig built before it; both names, as its __post_init__ leaves them."""
    args.activation_checkpointing = args.gradient_checkpointing = True


def sft_warnings(args: SFTConfig) -> list[str]:
    """Settings TRL accepts that make a run other than meant."""
    warnings, steps = [], args.max_steps
    if steps > 0 and args.get_warmup_steps(steps) >= steps:
        warnings.append(f"sft.warmup_steps ({args.get_warmup_steps(steps)}) >= sft.max_steps ({steps}): the learning "
                        "rate never leaves its warm-up")
    if steps > 0 and args.logging_strategy == "steps" and args.logging_steps >= 1 and args.logging_steps > steps:
        warnings.append(f"sft.logging_steps ({args.logging_steps:g}) > sft.max_steps ({steps}): no training loss "
                        "will be logged before the end")
    return warnings


def non_finite_message(step: int, value: float, run: Path) -> str:
    done = complete_checkpoints(run)
    keep = (f"the last good checkpoint is {done[-1]}: resume from it with --resume" if done
            else "no checkpoint was saved yet")
    return (f"step {step}: the loss is {value}; stopping ({keep}). Lower sft.learning_rate, keep "
            "sft.max_grad_norm on, or use model.dtype: float32 / bf16 instead of float16")


# config keys TRL sets on the model for its own aux loss (SFTTrainer.__init__), which a saved
# model must carry as loaded: a model trained further elsewhere balances its experts again
TRAINER_SET_CONFIG = ("router_aux_loss_coef", "output_router_logits")


def config_values(model) -> dict[tuple[str, str], object]:
    """(config, key) -> value as loaded: the text config's ``TRAINER_SET_CONFIG`` (those it has),
    and the outer config's ``use_cache``, which Trainer turns off (ABSENT where the config lacked
    it: a multimodal config keeps it in its text config only)."""
    config = unwrapped(model).config
    text = config.get_text_config()
    values = {("text", key): getattr(text, key) for key in TRAINER_SET_CONFIG if hasattr(text, key)}
    values["outer", "use_cache"] = vars(config).get("use_cache", ABSENT)
    return values


ABSENT = object()  # a config key the loaded config did not have


@contextlib.contextmanager
def config_as_loaded(model, values: dict[tuple[str, str], object]):
    """Inside the block, the model's config holds ``values`` (as loaded); training's afterwards."""
    config = unwrapped(model).config
    configs = {"text": config.get_text_config(), "outer": config}

    def put(scope, key, value):
        if value is ABSENT:
            vars(configs[scope]).pop(key, None)
        else:
            setattr(configs[scope], key, value)

    training = {(scope, key): vars(configs[scope]).get(key, ABSENT) for scope, key in values}
    for (scope, key), value in values.items():
        put(scope, key, value)
    try:
        yield
    finally:
        for (scope, key), value in training.items():
            put(scope, key, value)


class MoeSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer plus moe_tune's router terms, each logged under its own name, and a
    routing summary after each evaluation."""

    def __init__(self, *args, regularizer: RouterRegularizer | None = None,
                 routing_probe: RoutingProbe | None = None, no_decay: list[str] = (),
                 balancer: BiasBalancer | None = None, grad_masks: list[ShardedGradMask] = (), **kwargs):
        # TRL writes its aux-loss settings into the model's config (off here: router_losses.py
        # computes the term); what a save writes is the config as the model was loaded
        self.config_as_loaded = config_values(kwargs.get("model") or args[0])
        super().__init__(*args, **kwargs)
        self.regularizer = regularizer
        self.balancer = balancer  # aux-loss-free balancing: counts choices here, moves biases per step
        if balancer is not None:
            self.add_callback(AfterOptimizerStep(balancer.step))
        if regularizer is not None and regularizer.global_batch:
            self.add_callback(AfterOptimizerStep(self.optimizer_step_done))
        self.routing_probe = routing_probe
        self.grad_masks = list(grad_masks)  # ESFT: unselected experts' rows of sharded gradients zeroed
        self.no_decay = set(no_decay)  # weights trained on some rows only (trainable.train_rows_only)
        # cross-entropy and router terms per micro-batch since the last log, by mode; averaged into the next log
        # (value, weight) pairs: a training log averages its steps' micro-batches alike; an evaluation
        # weighs each batch by its rows, as Trainer's eval_loss does (a short last batch counts less)
        self.router_terms: dict[str, dict[str, list[tuple[float, int]]]] = {"train": defaultdict(list),
                                                                             "eval": defaultdict(list)}
        self.eval_collator = None  # packed runs: evaluation batches whole rows, padded (packing.py)
        if packs(self.args):
            self.data_collator, self.eval_collator = packed_collators(self.data_collator, unwrapped(self.model))

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Checkpoints and ``save_model`` write the config as the model was loaded."""
        with config_as_loaded(self.model, self.config_as_loaded):
            super()._save(output_dir, state_dict)

    def get_decay_parameter_names(self, model) -> list[str]:
        """Trainer's, less the weights trained on some rows only: decay would shrink their frozen rows."""
        return [n for n in super().get_decay_parameter_names(model) if n not in self.no_decay]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The means of the cross-entropy and the router terms join the logged values, named as
        TRL names its own (``eval_`` in front during evaluation). A run stopped before its last
        step (Ctrl-C, SIGTERM) logs no end-of-training summary: it would read as a finished run."""
        if "train_runtime" in logs and self.state.global_step < self.state.max_steps:
            return
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{name}": mean for name, mean in
                     distributed.weighted_means(self.router_terms[mode], self.args.device).items()})
        self.router_terms[mode].clear()
        if self.balancer is not None and mode == "train":
            logs["routing/bias_abs_max"] = self.balancer.bias_abs_max()
        super().log(logs, start_time)

    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        if self.routing_probe is not None:
            self.log(self.routing_probe())
        return metrics

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        mask_sharded_grads(self.grad_masks)  # after the backward's reduction, before clipping and the step
        return loss

    def optimizer_step_done(self) -> None:
        """Global-batch balancing: the step's load-balancing term, logged once per step."""
        if (value := self.regularizer.end_step()) is not None:
            self.router_terms["train"]["aux_loss"].append((value, 1))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = self._moe_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if self.model.training and not bool(torch.isfinite(loss.detach()).all()):
            raise MoeTuneError(non_finite_message(self.state.global_step + 1, loss.item(),
                                                  Path(self.args.output_dir).parent))
        return result

    def _moe_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss (the cross-entropy, logged as ``ce_loss``) plus the weighted router terms."""
        reg = self.regularizer if self.regularizer is not None and self.regularizer.active else None
        inputs, tokens = model_inputs(inputs)  # tokens: (batch, length) 1 on the rows' tokens, or None
        mode = "train" if self.model.training else "eval"
        if mode == "train" and tokens is not None and "attention_mask" not in inputs and tokens.shape[0] > 1:
            # packed sequences kept apart: TRL counts 1 row's positions of B (added before it logs)
            extra = torch.tensor(tokens.numel() - tokens.shape[1], device=tokens.device)
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(extra).sum())
        with reg or contextlib.nullcontext():
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.balancer is not None and mode == "train":
            self.balancer.take(tokens)
        # With token-count normalisation Trainer sums a step's micro-batch losses (each is a share of
        # the step's tokens) and leaves accumulation to the loss: scaled by the accumulation steps,
        # the mean over micro-batches is the per-step value Trainer logs as ``loss``; the router
        # terms are per-micro-batch means, so they are averaged over the steps (as TRL does).
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None and mode == "train" else 1
        rows = 1 if mode == "train" else len(inputs["input_ids"])
        self.router_terms[mode]["ce_loss"].append(((result[0] if return_outputs else result).item() * steps, rows))
        terms = reg.terms(tokens) if reg is not None else {}
        if not terms:
            return result
        weighted = reg.weighted(terms)
        for name, value in terms.items():
            if not (name == "aux_loss" and reg.global_batch and mode == "train"):  # logged per step (end_step)
                self.router_terms[mode][name].append((value.item(), rows))
        self.router_terms[mode]["router_loss"].append((weighted.item(), rows))
        if return_outputs:
            return result[0] + weighted / steps, result[1]
        return result + weighted / steps

    # --- the reach into Trainer's and TRL's internals (tests/test_sft_trainer.py fails if they move) ---
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume with the checkpoint's weights read through transformers' own loading.

        transformers 5 saves fused experts in the checkpoint family's original layout (Mixtral:
        one w1/w2/w3 per expert) and Trainer reads the file back with strict=False, so on resume
        the experts and routers would silently stay at their base values. PEFT adapters keep
        their names and go through Trainer's own path."""
        model = model if model is not None else self.model
        self._continue_token_count(Path(resume_from_checkpoint))
        if hasattr(model, "peft_config"):
            # PEFT's load_adapter casts a bf16 adapter to fp32; TRL trains a quantized model's
            # adapter in bf16, so the resumed run would step in another precision (about 1e-3 apart)
            dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            for name, param in model.named_parameters():
                if name in dtypes and param.dtype != dtypes[name]:
                    param.data = param.data.to(dtypes[name])
            return None
        with returning_freed_memory():
            saved = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(saved.state_dict(), strict=True)

    def _continue_token_count(self, checkpoint: Path) -> None:
        """TRL counts ``num_tokens`` from 0 in every process; a resumed run goes on from the
        checkpoint's count."""
        history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
        counts = [h["num_tokens"] for h in history if "num_tokens" in h]
        if counts:
            self._total_train_tokens = int(counts[-1])

    def load_final_checkpoint(self, checkpoint: Path) -> None:
        """The weights of a checkpoint saved at the last step, without training: resumed there,
        Trainer would train one step past max_steps when the run ends mid-epoch."""
        self._load_from_checkpoint(str(checkpoint))


def load_data(recipe, run: Path, tokenizer=None, read: TrainRows | None = None):
    """(train, valid) datasets, from the rows already ``read`` (check_data's) or read here; rows
    skipped under data.skip_bad_rows are reported in the run. With ``tokenizer``, rows come
    tokenized with their assistant mask (templates.py), for any chat template; without, as chat
    ``messages`` for TRL to tokenize."""
    data, skipped, sets = recipe.data, {}, []
    how = templates.masking(tokenizer) if tokenizer is not None else None
    read = read or read_train_rows(data)
    for path, source in ((data.train, read.train), (data.valid, read.valid)):
        if source is None:
            sets.append(None)
            continue
        print(f"read {len(source.rows):,} rows of {path} ({source.format})")
        sets.append(messages_dataset(source.rows) if how is None else masked_dataset(source.rows, tokenizer, how))
        if source.skipped:
            skipped[path] = source.skipped
            print(f"note: skipped {len(source.skipped)} bad rows of {path} (see {DATA_REPORT_FILE}), "
                  f"e.g. {source.skipped[0]}")
    if skipped and distributed.is_main():
        write_json(run / DATA_REPORT_FILE, {"skipped_rows": {p: len(b) for p, b in skipped.items()},
                                             "messages": skipped})
    return sets[0], sets[1]


def masked_dataset(rows: list[dict], tokenizer, how) -> Dataset:
    """``input_ids`` and ``assistant_masks`` (1: trained) per row, as TRL's own tokenization makes them."""
    encoded = [templates.tokenize_row(tokenizer, r["messages"], how) for r in rows]
    return Dataset.from_dict({"input_ids": [ids for ids, _ in encoded], "assistant_masks": [m for _, m in encoded]})


def routing_probe(model, arch, tokenizer, valid: ReadRows | None) -> RoutingProbe | None:
    """A probe on the validation rows, when there are some and the routers can be read."""
    inner = unwrapped(model)
    if valid is None or not routing.readable(inner, arch):
        return None
    return RoutingProbe(inner, arch, tokenizer, valid.rows[:RoutingProbe.SAMPLE])


def fsdp_dropped(args: SFTConfig, trainer: SFTTrainer) -> bool:
    """FSDP was asked for (sft.fsdp, or an accelerate config) but accelerate did not turn it on:
    it does so only on accelerators, and on a CPU the run is plain DDP with whole parameters."""
    asked = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return asked and not trainer.is_fsdp_enabled


@dataclass(frozen=True)
class TrainerParts:
    """What moe_tune adds to TRL's trainer, worked out by the pipeline before the trainer exists."""

    regularizer: RouterRegularizer | None = None
    balancer: BiasBalancer | None = None  # aux-loss-free balancing (router.bias_balance_rate)
    no_decay: tuple[str, ...] = ()        # weights trained on some rows only, kept out of weight decay
    read: TrainRows | None = None         # the rows check_data read; None: read them here
    grad_masks: list[ShardedGradMask] = field(default_factory=list)  # ESFT on sharded experts


def build_trainer(recipe, args: SFTConfig, model, tokenizer, arch, parts: TrainerParts = TrainerParts()) -> MoeSFTTrainer:
    """The trainer of the run in ``recipe.output_dir``, for a model made trainable already."""
    run = Path(recipe.output_dir)
    read = parts.read or read_train_rows(recipe.data)
    train, valid = load_data(recipe, run, tokenizer if args.assistant_only_loss else None, read)
    if "tensorboard" in (args.report_to or []):
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run / TENSORBOARD_DIR)  # read by transformers' TB callback
    if args.assistant_only_loss or (args.padding_free and not args.packing):
        args = copy.copy(args)
        args.assistant_only_loss = False  # the mask is in the data, for any template: TRL would ask for markers
        if args.padding_free and not args.packing:  # TRL cuts no row then; check_data refused longer ones
            args.max_length = None
    trainer = MoeSFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid,
                            processing_class=tokenizer, regularizer=parts.regularizer, no_decay=list(parts.no_decay),
                            balancer=parts.balancer, grad_masks=parts.grad_masks, routing_probe=routing_probe(model, arch, tokenizer, read.valid),
                            callbacks=[MetricsLog(run / METRICS_FILE), GradientGuard()])
    if fsdp_dropped(args, trainer) and distributed.is_main():
        print(f"note: FSDP was asked for, but accelerate does not shard on {args.device.type.upper()}: every "
              "process holds every parameter whole (plain DDP)")
    return trainer


def out_of_memory_message(recipe) -> str:
    sft = recipe.sft
    return ("out of memory while training: lower sft.per_device_train_batch_size "
            f"(now {sft.get('per_device_train_batch_size', 8)}) and raise sft.gradient_accumulation_steps to "
            f"keep the batch, lower sft.max_length (now {sft.get('max_length', 1024)}), set "
            "sft.activation_checkpointing: true, or train fewer parts (trainable.preset: lora_experts, "
            "freeze_experts); `moe-tune plan` estimates the peak")


def train(trainer: MoeSFTTrainer, recipe, checkpoint: Path | None) -> None:
    """Trainer.train, from ``checkpoint`` when resuming; running out of memory says what to lower."""
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        step_memory.release_kept(trainer.model)  # the step buffers, before evaluation
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise MoeTuneError(out_of_memory_message(recipe)) from e
    except RuntimeError as e:
        if "can't allocate memory" not in str(e) and "out of memory" not in str(e):
            raise
        raise MoeTuneError(out_of_memory_message(recipe)) from e

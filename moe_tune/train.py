"""``moe-tune train``: the run, as a short pipeline of plain steps.

    check_inputs -> prepare_run_dir -> load_model -> attach_regularizers -> apply_trainable
      -> build_trainer -> train -> save_model -> evaluate_run

``check_inputs`` does everything that needs no weights first (recipe, data, model config, the
plan on a meta-device copy), so mistakes surface in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from moe_tune.arch import describe, require_moe, text_config
from moe_tune.data import messages_dataset, read_chat_rows, read_rows
from moe_tune.errors import MoeTuneError
from moe_tune.evaluate import write_json, write_text
from moe_tune.expert_dropout import ExpertDropout
from moe_tune import fast_experts
from moe_tune.expert_selection import (
    load_selection,
    restrict_full,
    restrict_lora,
    save_selection,
    score_experts,
    select_top_p,
)
from moe_tune.loading import build_meta_model, load_adapter_model, load_config, load_model, load_tokenizer
from moe_tune import distributed
from moe_tune import routing_stats
from moe_tune.recipe import Recipe, dump_recipe, load_recipe
from moe_tune.report import evaluate_and_report
from moe_tune.router_losses import RouterRegularizer
from moe_tune.trainable import apply_plan, format_plan, make_plan, plan_report, resolve_modes

RECIPE_FILE = "recipe.yaml"
SELECTION_FILE = "expert_selection.json"
PLAN_FILE = "plan.json"  # what trained, counted after expert selection: compare reads it
MODEL_DIR = "model"



# Where the recipe leaves them unset. On a CPU: no activation checkpointing (it recomputes the
# forward to save memory a CPU run rarely lacks), torch's fused AdamW (one pass over each tensor:
# 0.06 s against 0.3 s per step for 80M parameters), and bf16 autocast only where the CPU has AMX
# tiles, whose bf16 matmuls run 2-4x fp32 (benchmarks/throughput.py measures it); without them
# bf16 matmuls are emulated and slower than fp32. On a GPU, TRL's own.
CPU_DEFAULTS = {"use_cpu": True, "bf16": torch.cpu._is_amx_tile_supported(), "activation_checkpointing": False,
                "dataloader_pin_memory": False, "optim": "adamw_torch_fused"}
_CHECKPOINTING_NAMES = {"activation_checkpointing", "gradient_checkpointing"}  # new and deprecated name
# router_aux_loss_coef: moe_tune computes the load-balancing loss itself (router_losses.py), once,
# for every family; TRL's (and with it the model's own) stays off.
# TensorBoard (offline, into RUN/tensorboard) gets every logged value, as metrics.jsonl does.
# Checkpoints (model, optimizer, scheduler, RNG, data position) every 200 steps, the last 2 kept:
# what `moe-tune train ... --resume` continues from.
DEFAULTS = {"assistant_only_loss": True, "report_to": "tensorboard", "logging_steps": 10,
            "save_strategy": "steps", "save_steps": 200, "save_total_limit": 2, "router_aux_loss_coef": 0.0}
CHECKPOINTS = "checkpoints"
EVAL_DIR = "eval"


def check_run_dir(output_dir: str, overwrite: bool) -> Path:
    """The run folder may be used: a finished or partial run is replaced only with
    ``overwrite``; a non-empty folder that is not a moe_tune run is never touched."""
    run = Path(output_dir)
    if run.exists() and not run.is_dir():
        raise MoeTuneError(f"output_dir: '{run}' is a file; choose a folder name")
    if run.is_dir() and any(run.iterdir()):
        if not (run / RECIPE_FILE).is_file():
            raise MoeTuneError(f"output_dir: '{run}' is not empty and is not a moe-tune run; "
                               "choose another output_dir")
        if not overwrite:
            raise MoeTuneError(f"output_dir: '{run}' already holds a run; pass --overwrite to "
                               "replace it, or set output_dir=... to another folder")
    return run


def prepare_run_dir(output_dir: str, overwrite: bool) -> Path:
    """An empty run folder (see ``check_run_dir`` for what may be replaced)."""
    run = check_run_dir(output_dir, overwrite)
    if run.is_dir() and any(run.iterdir()):
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    return run


def preview_plan(recipe: Recipe) -> dict:
    """The plan on a weightless (meta) copy of the model, LoRA coverage verified by wrapping it."""
    config = load_config(recipe.model.path)
    require_moe(config, recipe.model.path)
    meta = build_meta_model(config)
    arch = describe(meta)
    plan = make_plan(meta, arch, resolve_modes(recipe.trainable.preset, recipe.trainable.overrides()),
                     quantized=recipe.model.bits is not None)
    check_selection(recipe, plan)
    check_router(recipe, plan.modes)
    check_parts_exist(recipe, arch)
    cfg = recipe.trainable.selection()
    selection = load_selection(cfg.file, arch) if cfg and cfg.file else None
    report = plan_report(meta, arch, plan, recipe, selection, sft_config(recipe, Path(recipe.output_dir)))
    if cfg and not cfg.file:
        report["selection_note"] = (f"experts are selected (score {cfg.score}, top_p {cfg.top_p}) on "
                                    f"{cfg.rows} training rows when training starts; counts above are before it")
    apply_plan(meta, plan, arch, recipe.lora)
    return report


def check_lengths(path: str, rows: list[dict], tokenizer, max_length: int | None, skip: bool) -> None:
    """A row longer than sft.max_length would be cut, often through its answer: say which."""
    if not max_length:
        return
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    long = [(i, n) for i, n in enumerate(lengths, 1) if n > max_length]
    if not long:
        return
    (row, n), more = long[0], f" (and {len(long) - 1} more)" if len(long) > 1 else ""
    if skip:
        print(f"note: {path}: {len(long)} rows are longer than sft.max_length {max_length} and will be cut")
        return
    raise MoeTuneError(f"{path} row {row}: {n} tokens, longer than sft.max_length {max_length}{more}; raise "
                       "sft.max_length, shorten the row, or set data.skip_bad_rows: true to train on it cut")


def check_inputs(recipe: Recipe) -> None:
    """Everything that can be checked in seconds, before any weights load."""
    preview_plan(recipe)
    tokenizer = load_tokenizer(recipe.model.path)
    data = recipe.data
    rows = read_chat_rows(data.train, data.max_train_rows, data.format, data.skip_bad_rows)
    check_lengths(data.train, rows, tokenizer, recipe.sft.get("max_length", SFTConfig.max_length), data.skip_bad_rows)
    if data.valid:
        read_chat_rows(data.valid, None, data.format, data.skip_bad_rows)
    for path in recipe.eval.files:
        read_chat_rows(path)
    if recipe.eval.retention_file and not Path(recipe.eval.retention_file).is_file():
        raise MoeTuneError(f"{recipe.eval.retention_file}: eval.retention_file not found")


def sft_config(recipe: Recipe, run: Path):
    args = dict(DEFAULTS, **({} if torch.cuda.is_available() else CPU_DEFAULTS))
    if _CHECKPOINTING_NAMES & set(recipe.sft):  # the recipe's choice, under either name, wins
        args.pop("activation_checkpointing", None)
    args.update(recipe.sft)
    if recipe.data.valid is None and args.get("eval_strategy", "no") != "no":
        raise MoeTuneError("sft.eval_strategy is set but data.valid is not; add a validation file")
    try:
        return SFTConfig(output_dir=str(run / CHECKPOINTS), seed=recipe.seed, **args)
    except (ValueError, TypeError) as e:
        raise MoeTuneError(f"sft: TRL rejected the settings: {e}") from None


class GradientGuard(TrainerCallback):
    """Stop, rather than train on silently, when trainable weights stop receiving gradients.

    At the first step, the tensors that get a gradient are noted (none at all is an error);
    at the first step after each evaluation, all of them must still get one. Quantized CPU
    kernels have been seen to cut the graph right after an eval-mode forward."""

    def __init__(self):
        self.check, self.live = True, None

    def on_evaluate(self, args, state, control, **kwargs):
        self.check = True

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.check or model is None:
            return
        self.check = False
        live = {n for n, p in model.named_parameters()
                if p.requires_grad and p.grad is not None and bool(p.grad.abs().sum() > 0)}
        if self.live is None:
            if not live:
                raise MoeTuneError(f"step {state.global_step + 1}: no trainable tensor received a gradient; "
                                   "stopping instead of training on silently")
            self.live = live
        elif self.live - live:
            dead = sorted(self.live - live)
            raise MoeTuneError(f"step {state.global_step + 1}: {len(dead)} trainable tensors stopped receiving "
                               f"gradients after evaluation (e.g. {dead[0]}); stopping instead of training on "
                               "silently")


class MetricsLog(TrainerCallback):
    """Appends every logged dict (loss, learning_rate, aux_loss, eval_loss, ...) to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


def check_parts_exist(recipe: Recipe, arch) -> None:
    """A part the recipe names explicitly (not through a preset) must exist in the model."""
    for part, mode in recipe.trainable.overrides().items():
        if mode in ("train", "lora") and not arch.params_in(part):
            raise MoeTuneError(f"trainable.{part}: {mode}, but this {arch.family} model has no {part.replace('_', ' ')}; "
                               f"leave trainable.{part} unset")


def check_selection(recipe: Recipe, plan) -> None:
    """Expert selection restricts the routed experts; say early when it cannot."""
    if recipe.trainable.selection() is None:
        return
    mode = plan.modes["routed_experts"]
    if mode == "freeze":
        raise MoeTuneError("trainable.expert_selection: the routed experts are frozen; set "
                           "trainable.routed_experts to train or lora")
    if mode == "train" and plan.lora_targets:
        raise MoeTuneError("trainable.expert_selection: selected experts trained in full cannot be combined "
                           "with LoRA on other parts; use routed_experts: lora, or no LoRA")
    if mode == "train" and recipe.sft.get("weight_decay"):
        raise MoeTuneError("sft.weight_decay: weight decay would move the unselected experts too; "
                           "set it to 0 with expert selection")


def select_experts(recipe: Recipe, model, arch, tokenizer) -> tuple[dict, dict]:
    """(shares, selection) from the recipe's saved file or by scoring its training data."""
    cfg = recipe.trainable.selection()
    if cfg.file:
        return {}, load_selection(cfg.file, arch)
    rows = read_chat_rows(recipe.data.train, cfg.rows, recipe.data.format, recipe.data.skip_bad_rows)
    shares = score_experts(model, arch, tokenizer, rows, cfg.score)
    return shares, select_top_p(shares, cfg.top_p)


def apply_trainable(recipe: Recipe, model, tokenizer, run: Path | None = None):
    """Freeze, train or LoRA-wrap each part as the recipe says; print what will train."""
    arch = describe(model)
    plan = make_plan(model, arch, resolve_modes(recipe.trainable.preset, recipe.trainable.overrides()),
                     quantized=recipe.model.bits is not None)
    check_selection(recipe, plan)
    selection = None
    if recipe.trainable.selection() is not None:
        shares, selection = select_experts(recipe, model, arch, tokenizer)
        cfg = recipe.trainable.selection()
        if run is not None and distributed.is_main() and not cfg.file:  # scored now, not read from a file
            save_selection(run / SELECTION_FILE, cfg.score, cfg.top_p, shares, selection)
            print("selected experts: " + "; ".join(f"{b}: {e}" for b, e in selection.items()))
    # counted on a weightless copy: quantized layers store packed weights with fewer elements
    meta = build_meta_model(model.config)
    report = plan_report(meta, describe(meta), plan, recipe, selection, sft_config(recipe, Path(recipe.output_dir)))
    if distributed.is_main():
        print(format_plan(report))
        if run is not None:
            write_json(run / PLAN_FILE, report)
    model = apply_plan(model, plan, arch, recipe.lora)
    fast_experts.route_lora_through(model)  # only where experts_implementation is moe_tune
    if selection is not None:
        restrict = restrict_full if plan.modes["routed_experts"] == "train" else restrict_lora
        restrict(model, arch, selection)
    return model


class RoutingProbe:
    """Routing summary of the model on a fixed sample of validation rows, with drift from the
    routing the model had when the probe was made (before training)."""

    SAMPLE = 64  # rows: enough for a stable load estimate, a fraction of a second on the tiny model

    def __init__(self, model, tokenizer, rows: list[dict]):
        self.model, self.tokenizer, self.rows = model, tokenizer, rows[:self.SAMPLE]
        self.arch = describe(model)
        self.base = routing_stats.profile(model, self.arch, tokenizer, self.rows)

    def __call__(self) -> dict[str, float]:
        now = routing_stats.profile(self.model, self.arch, self.tokenizer, self.rows)
        summary = routing_stats.summarize(now, self.base)["mean_over_layers"]
        return {f"routing/{key}": value for key, value in summary.items()}


class MoeSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer plus moe_tune's router terms, each logged under its own name, and a
    routing summary after each evaluation."""

    def __init__(self, *args, regularizer: RouterRegularizer | None = None,
                 routing_probe: RoutingProbe | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.regularizer = regularizer
        self.routing_probe = routing_probe

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume with the checkpoint's weights read through transformers' own loading.

        transformers 5 saves fused experts in the checkpoint family's original layout (Mixtral:
        one w1/w2/w3 per expert) and Trainer reads the file back with strict=False, so on resume
        the experts and routers would silently stay at their base values. PEFT adapters keep
        their names and go through Trainer's own path."""
        model = model if model is not None else self.model
        if hasattr(model, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(saved.state_dict(), strict=True)

    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        if self.routing_probe is not None:
            self.log(self.routing_probe())
        return metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = self._moe_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if self.model.training and not bool(torch.isfinite(loss.detach()).all()):
            raise MoeTuneError(non_finite_message(self.state.global_step + 1, loss.item(), Path(self.args.output_dir)))
        return result

    def _moe_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        reg = self.regularizer
        if reg is None or not reg.active:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with reg:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        terms = reg.terms(inputs.get("attention_mask"))
        if not terms:
            return result
        mode = "train" if self.model.training else "eval"
        weighted = reg.weighted(terms)
        for name, value in terms.items():
            self._metrics[mode][name].append(value.item())
        self._metrics[mode]["router_loss"].append(weighted.item())
        # per-micro-batch means: with token-count normalisation, Trainer leaves gradient
        # accumulation to the loss, so average them over the accumulation steps (as TRL does)
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None and mode == "train" else 1
        if return_outputs:
            return result[0] + weighted / steps, result[1]
        return result + weighted / steps


def set_experts_implementation(recipe: Recipe, model) -> None:
    """The recipe's experts kernel; a model whose experts do not use transformers' experts
    interface keeps its own forward."""
    name = recipe.model.experts_implementation
    if name == fast_experts.NAME:
        fast_experts.use_fast_experts(model)
    elif model._can_set_experts_implementation():
        model.set_experts_implementation(name)


def complete_checkpoints(run: Path) -> list[Path]:
    """Checkpoints Trainer finished writing (trainer_state.json is its last file), oldest first."""
    found = [c for c in (run / CHECKPOINTS).glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    return sorted(found, key=lambda c: int(c.name.rsplit("-", 1)[1]))


def non_finite_message(step: int, value: float, checkpoints: Path) -> str:
    done = complete_checkpoints(checkpoints.parent)
    keep = (f"the last good checkpoint is {done[-1]}: resume from it with --resume" if done
            else "no checkpoint was saved yet")
    return (f"step {step}: the loss is {value}; stopping ({keep}). Lower sft.learning_rate, keep "
            "sft.max_grad_norm on, or use model.dtype: float32 / bf16 instead of float16")


def out_of_memory_message(recipe: Recipe) -> str:
    sft = recipe.sft
    return ("out of memory while training: lower sft.per_device_train_batch_size "
            f"(now {sft.get('per_device_train_batch_size', 8)}) and raise sft.gradient_accumulation_steps to "
            f"keep the batch, lower sft.max_length (now {sft.get('max_length', 1024)}), set "
            "sft.activation_checkpointing: true, or train fewer parts (trainable.preset: lora_experts, "
            "freeze_experts); `moe-tune plan` estimates the peak")


def attach_regularizers(recipe: Recipe, model) -> RouterRegularizer:
    """Router terms and expert dropout, hooked onto the model before any LoRA wrapping."""
    arch = describe(model)
    declared = getattr(text_config(model.config), "router_aux_loss_coef", 0.0) or 0.0
    aux = recipe.router.aux_loss_coef if recipe.router.aux_loss_coef is not None else declared
    modes = resolve_modes(recipe.trainable.preset, recipe.trainable.overrides())
    if modes["router"] == "lora" and recipe.router.aux_loss_coef is None:
        aux = 0.0  # the terms read the base router weight, which LoRA does not change (see check_router)
    if recipe.experts.dropout or recipe.experts.drop_expert_prob:
        ExpertDropout(model, arch, recipe.experts.dropout, recipe.experts.shared_dropout,
                      recipe.experts.drop_expert_prob).attach()
    return RouterRegularizer(model, arch, aux, recipe.router.z_loss_coef, recipe.router.anchor_kl_coef)


def check_router(recipe: Recipe, modes: dict[str, str]) -> None:
    explicit = recipe.router.z_loss_coef or recipe.router.anchor_kl_coef or recipe.router.aux_loss_coef
    if modes["router"] == "lora" and explicit:
        raise MoeTuneError("router: the router terms are computed from the router weight, which LoRA leaves "
                           "unchanged; set trainable.router to train or freeze, or turn the terms off")


def _routing_probe(recipe: Recipe, model, tokenizer) -> RoutingProbe | None:
    if recipe.data.valid is None:
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        rows = read_chat_rows(recipe.data.valid, RoutingProbe.SAMPLE, recipe.data.format, recipe.data.skip_bad_rows)
        return RoutingProbe(inner, tokenizer, rows)
    except MoeTuneError:  # routers wrapped by LoRA: their weights are not the ones that route
        return None


def load_data(recipe: Recipe, run: Path):
    """(train, valid) datasets; rows skipped under data.skip_bad_rows are reported in the run."""
    data, skipped, sets = recipe.data, {}, []
    for path, limit in ((data.train, data.max_train_rows), (data.valid, None)):
        if path is None:
            sets.append(None)
            continue
        rows, bad = read_rows(path, limit, data.format, data.skip_bad_rows)
        sets.append(messages_dataset(rows))
        if bad:
            skipped[path] = bad
            print(f"note: skipped {len(bad)} bad rows of {path} (see data_report.json), e.g. {bad[0]}")
    if skipped and distributed.is_main():
        write_json(run / "data_report.json", {"skipped_rows": {p: len(b) for p, b in skipped.items()},
                                                "messages": skipped})
    return sets[0], sets[1]


def build_trainer(recipe: Recipe, run: Path, model, tokenizer, regularizer: RouterRegularizer | None = None):
    train, valid = load_data(recipe, run)
    args = sft_config(recipe, run)
    if "tensorboard" in (args.report_to or []):
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run / "tensorboard")  # read by transformers' TB callback
    return MoeSFTTrainer(model=model, args=args, train_dataset=train,
                         eval_dataset=valid, processing_class=tokenizer, regularizer=regularizer,
                         routing_probe=_routing_probe(recipe, model, tokenizer),
                         callbacks=[MetricsLog(run / "metrics.jsonl"), GradientGuard()])


def save_model(model, tokenizer, run: Path) -> Path:
    """Weights and tokenizer into ``run/model``, via a temporary folder renamed into place."""
    final, tmp = run / MODEL_DIR, run / (MODEL_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(final)
    return final


def load_run_model(target: Path, dtype: str, adapter: str | None = None):
    """(model, tokenizer, base path or None) of a run folder (full weights, or base + adapter),
    a model folder with ``adapter``, or a plain model folder."""
    if adapter:
        return (*load_adapter_model(str(target), Path(adapter), dtype), str(target))
    if not (target / RECIPE_FILE).is_file():
        return (*load_model(str(target), dtype), None)
    saved = target / MODEL_DIR
    if not saved.is_dir():
        raise MoeTuneError(f"{target}: this run has no saved model yet (did training finish?)")
    base_path = load_recipe(target / RECIPE_FILE).model.path
    if (saved / "adapter_config.json").is_file():
        return (*load_adapter_model(base_path, saved, dtype), base_path)
    return (*load_model(str(saved), dtype), base_path)


def evaluate_run(recipe: Recipe, run: Path, model, tokenizer) -> dict[str, dict]:
    """Held-out evaluation of the tuned model (and the base, if asked), with routing analytics
    and the report in RUN/eval/."""
    base = load_model(recipe.model.path, recipe.model.dtype)[0] if recipe.eval.compare_base else None
    # written under a temporary name: a run folder with eval/ is a finished run
    tmp = run / (EVAL_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    results = evaluate_and_report(model, tokenizer, recipe.eval, tmp, base=base, final_dir=run / EVAL_DIR)
    shutil.rmtree(run / EVAL_DIR, ignore_errors=True)
    tmp.rename(run / EVAL_DIR)
    return results


def start_processes(recipe: Recipe) -> None:
    """Under torchrun or accelerate launch, join the process group now (building the run's
    SFTConfig does it) so that ranks can wait for each other before anything is written."""
    if distributed.world_size() > 1:
        _ = sft_config(recipe, Path(recipe.output_dir)).device


def save_distributed(trainer, tokenizer, run: Path) -> Path:
    """Every rank takes part (FSDP gathers a full state dict, ZeRO-3 its partitions); rank 0
    writes, into a temporary folder renamed into place."""
    final, tmp = run / MODEL_DIR, run / (MODEL_DIR + ".tmp")
    trainer.model.config.use_cache = True
    trainer.save_model(str(tmp))
    if distributed.is_main():
        (tmp / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(final)
    distributed.barrier()
    return final


def resume_point(recipe: Recipe) -> Path:
    """The last complete checkpoint of the run in ``recipe.output_dir``, after checking that the
    run exists, is unfinished, and was started with this same recipe."""
    run = Path(recipe.output_dir)
    if not (run / RECIPE_FILE).is_file():
        raise MoeTuneError(f"output_dir: no moe-tune run to resume in '{run}'; drop --resume to start one")
    if (run / EVAL_DIR).is_dir():
        raise MoeTuneError(f"output_dir: the run in '{run}' finished; nothing to resume (--overwrite starts it again)")
    saved = flat_keys(load_recipe(run / RECIPE_FILE).model_dump(mode="json"))
    for key, value in flat_keys(recipe.model_dump(mode="json")).items():
        if saved.get(key) != value:
            raise MoeTuneError(f"{key}: {value!r} differs from the run's {saved.get(key)!r} ({run / RECIPE_FILE}); "
                               "resume with the run's recipe (moe-tune train RUN_FOLDER --resume)")
    done = complete_checkpoints(run)
    if not done:
        raise MoeTuneError(f"output_dir: '{run}' has no complete checkpoint to resume from (sft.save_steps is "
                           f"{recipe.sft.get('save_steps', DEFAULTS['save_steps'])}); start again with --overwrite")
    return done[-1]


def flat_keys(data: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a nested dict, for naming the first key two recipes differ in."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def continue_run(recipe: Recipe, checkpoint: Path) -> Recipe:
    """What a resumed run reuses: its expert selection (not scored again), and its metrics up to
    the checkpoint (later lines would be logged twice)."""
    run = Path(recipe.output_dir)
    step = int(checkpoint.name.rsplit("-", 1)[1])
    metrics = run / "metrics.jsonl"
    if metrics.is_file() and distributed.is_main():
        kept = [line for line in metrics.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        metrics.write_text("".join(line + "\n" for line in kept))
    selection = recipe.trainable.selection()
    if selection is not None and (run / SELECTION_FILE).is_file():
        recipe = recipe.model_copy(deep=True)
        recipe.trainable.expert_selection = selection.model_copy(update={"file": str(run / SELECTION_FILE)})
    return recipe


def run_training(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> Path | None:
    """The run; under a multi-process launcher, every rank trains and rank 0 alone writes,
    reloads the saved model and evaluates (it returns None on the other ranks). With
    ``resume``, an interrupted run continues from its last complete checkpoint."""
    check_inputs(recipe)
    checkpoint = resume_point(recipe) if resume else None
    if not resume:
        check_run_dir(recipe.output_dir, overwrite)  # every rank decides before any rank writes
    start_processes(recipe)
    distributed.barrier()
    run = Path(recipe.output_dir)
    if checkpoint is not None:
        recipe = continue_run(recipe, checkpoint)
        print(f"resuming from {checkpoint}")
    elif distributed.is_main():
        run = prepare_run_dir(recipe.output_dir, overwrite)
        write_text(run / RECIPE_FILE, dump_recipe(recipe))
    distributed.barrier()
    set_seed(recipe.seed)
    model, tokenizer = load_model(recipe.model.path, recipe.model.dtype, recipe.model.bits)
    set_experts_implementation(recipe, model)
    distributed.register_moe_leaf_modules(model, describe(model))
    regularizer = attach_regularizers(recipe, model)  # the anchor is the base routing, also on resume
    model = apply_trainable(recipe, model, tokenizer, run)
    trainer = build_trainer(recipe, run, model, tokenizer, regularizer)
    start = time.time()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise MoeTuneError(out_of_memory_message(recipe)) from e
    except RuntimeError as e:
        if "can't allocate memory" not in str(e) and "out of memory" not in str(e):
            raise
        raise MoeTuneError(out_of_memory_message(recipe)) from e
    if distributed.world_size() > 1:
        save_distributed(trainer, tokenizer, run)
        if not distributed.is_main():
            return None
        model, tokenizer, _ = load_run_model(run, recipe.model.dtype)  # whole, whatever the sharding
    else:
        model = trainer.model
        save_model(model, tokenizer, run)
    if (run / CHECKPOINTS).is_dir() and not any((run / CHECKPOINTS).iterdir()):
        (run / CHECKPOINTS).rmdir()
    print(f"trained in {time.time() - start:.0f}s; model saved to {run / MODEL_DIR}")
    evaluate_run(recipe, run, model, tokenizer)
    print(f"\nrun folder: {run}")
    return run

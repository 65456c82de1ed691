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
from moe_tune.evaluate import write_json
from moe_tune.expert_dropout import ExpertDropout
from moe_tune.expert_selection import (
    load_selection,
    restrict_full,
    restrict_lora,
    save_selection,
    score_experts,
    select_top_p,
)
from moe_tune.loading import build_meta_model, load_config, load_model, load_tokenizer
from moe_tune import routing_stats
from moe_tune.recipe import Recipe, dump_recipe
from moe_tune.report import evaluate_and_report
from moe_tune.router_losses import RouterRegularizer
from moe_tune.trainable import apply_plan, format_plan, make_plan, plan_report, resolve_modes

RECIPE_FILE = "recipe.yaml"
SELECTION_FILE = "expert_selection.json"
PLAN_FILE = "plan.json"  # what trained, counted after expert selection: compare reads it
MODEL_DIR = "model"

# Where the recipe leaves them unset. TRL's own defaults (bf16 autocast, gradient checkpointing)
# slow a CPU down; on a GPU we keep TRL's.
CPU_DEFAULTS = {"use_cpu": True, "bf16": False, "activation_checkpointing": False,
                "dataloader_pin_memory": False}
_CHECKPOINTING_NAMES = {"activation_checkpointing", "gradient_checkpointing"}  # new and deprecated name
# router_aux_loss_coef: moe_tune computes the load-balancing loss itself (router_losses.py), once,
# for every family; TRL's (and with it the model's own) stays off.
# TensorBoard (offline, into RUN/tensorboard) gets every logged value, as metrics.jsonl does.
DEFAULTS = {"assistant_only_loss": True, "report_to": "tensorboard", "logging_steps": 10,
            "save_strategy": "no", "router_aux_loss_coef": 0.0}


def prepare_run_dir(output_dir: str, overwrite: bool) -> Path:
    """An empty run folder. A finished or partial run is replaced only with ``overwrite``;
    a non-empty folder that is not a moe_tune run is never touched."""
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
    cfg = recipe.trainable.selection()
    selection = load_selection(cfg.file, arch) if cfg and cfg.file else None
    report = plan_report(meta, arch, plan, recipe, selection)
    if cfg and not cfg.file:
        report["selection_note"] = (f"experts are selected (score {cfg.score}, top_p {cfg.top_p}) on "
                                    f"{cfg.rows} training rows when training starts; counts above are before it")
    apply_plan(meta, plan, arch, recipe.lora)
    return report


def check_inputs(recipe: Recipe) -> None:
    """Everything that can be checked in seconds, before any weights load."""
    preview_plan(recipe)
    load_tokenizer(recipe.model.path)
    data = recipe.data
    read_chat_rows(data.train, data.max_train_rows, data.format, data.skip_bad_rows)
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
        return SFTConfig(output_dir=str(run / "checkpoints"), seed=recipe.seed, **args)
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
        if run is not None:
            save_selection(run / SELECTION_FILE, cfg.score, cfg.top_p, shares, selection)
        print("selected experts: " + "; ".join(f"{b}: {e}" for b, e in selection.items()))
    # counted on a weightless copy: quantized layers store packed weights with fewer elements
    meta = build_meta_model(model.config)
    report = plan_report(meta, describe(meta), plan, recipe, selection)
    print(format_plan(report))
    if run is not None:
        write_json(run / PLAN_FILE, report)
    model = apply_plan(model, plan, arch, recipe.lora)
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

    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        if self.routing_probe is not None:
            self.log(self.routing_probe())
        return metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
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
    if skipped:
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


def evaluate_run(recipe: Recipe, run: Path, model, tokenizer) -> dict[str, dict]:
    """Held-out evaluation of the tuned model (and the base, if asked), with routing analytics
    and the report in RUN/eval/."""
    base = load_model(recipe.model.path, recipe.model.dtype)[0] if recipe.eval.compare_base else None
    return evaluate_and_report(model, tokenizer, recipe.eval, run / "eval", base=base)


def run_training(recipe: Recipe, overwrite: bool = False) -> Path:
    check_inputs(recipe)
    run = prepare_run_dir(recipe.output_dir, overwrite)
    (run / RECIPE_FILE).write_text(dump_recipe(recipe))
    set_seed(recipe.seed)
    model, tokenizer = load_model(recipe.model.path, recipe.model.dtype, recipe.model.bits)
    regularizer = attach_regularizers(recipe, model)
    model = apply_trainable(recipe, model, tokenizer, run)
    trainer = build_trainer(recipe, run, model, tokenizer, regularizer)
    start = time.time()
    trainer.train()
    model = trainer.model
    save_model(model, tokenizer, run)
    if (run / "checkpoints").is_dir() and not any((run / "checkpoints").iterdir()):
        (run / "checkpoints").rmdir()
    print(f"trained in {time.time() - start:.0f}s; model saved to {run / MODEL_DIR}")
    evaluate_run(recipe, run, model, tokenizer)
    print(f"\nrun folder: {run}")
    return run

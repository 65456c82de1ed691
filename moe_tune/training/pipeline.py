"""``moe-tune train``: the run, in the order it happens.

    plan_run        the recipe's model built weightless (meta device) -> its architecture ->
                    each part's mode -> the plan of what trains -> TRL's SFTConfig -> the plan
                    report; LoRA coverage is checked on a weightless copy. All of it is the
                    RunSetup, worked out once and handed to every later step.
    check_data      tokenizer, data files, row lengths
    (run folder)    the checkpoint to resume from, or a folder that may be used; under torchrun
                    or accelerate launch, the process group is joined here, so that every rank
                    has decided before rank 0 writes recipe.yaml into a new run folder
    load_model      weights and tokenizer
    trainer_for     experts implementation -> ZeRO-3 leaf modules -> router terms and expert
                    dropout -> expert selection and freeze / train / LoRA -> SFTTrainer
    train           Trainer.train, from the checkpoint when resuming
    (save)          RUN/model; in a multi-process run every rank takes part, and rank 0 alone
                    reloads the saved model and evaluates
    evaluate_run    held-out evaluation, routing analytics and the report in RUN/eval

Everything before load_model needs no weights, so mistakes surface in seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import operator
import time
from pathlib import Path

import torch
from torch import nn
from transformers import set_seed
from trl import SFTConfig

from moe_tune.data.rows import TrainRows, check_lengths, read_chat_rows, read_train_rows
from moe_tune.errors import Interrupted, MoeTuneError, shown
from moe_tune.evaluation.report import evaluate_files, write_report
from moe_tune.model import templates
from moe_tune.model.arch import MoeArch, describe, require_moe, text_config
from moe_tune.model.loading import build_meta_model, load_config, load_model, load_tokenizer
from moe_tune.model.quantized_experts import check_quantization
from moe_tune.moe import experts_policy
from moe_tune.moe.bias_balance import BiasBalancer, check_bias_balance
from moe_tune.moe.expert_dropout import ExpertDropout
from moe_tune.moe.expert_selection import (
    check_selection,
    load_selection,
    ShardedGradMask,
    restrict_full,
    restrict_lora,
    save_selection,
    select_experts,
)
from moe_tune.moe.router_losses import RouterRegularizer, check_router, coefficients
from moe_tune.plan.accounting import expert_intermediate, quantized_weights
from moe_tune.plan.fit import available_bytes
from moe_tune.plan.modes import Plan, apply_plan, check_parts_exist, make_plan, resolve_modes, unwrapped
from moe_tune.plan.report import PlanReport, plan_report
from moe_tune.recipe import LoraSection, Recipe, dump_recipe, with_absolute_paths
from moe_tune.training import distributed, packing
from moe_tune.training.interrupts import Interrupts, StopOnInterrupt
from moe_tune.training.run_dir import (
    CHECKPOINTS,
    EVAL_DIR,
    MODEL_DIR,
    PHASES,
    PLAN_FILE,
    RECIPE_FILE,
    REPORT_JSON,
    REPORT_MD,
    SELECTION_FILE,
    SHARDED_CHECKPOINTS,
    check_run_dir,
    checkpoint_step,
    complete_checkpoints,
    continue_run,
    discard_unstarted,
    load_run_model,
    mark_done,
    phases_done,
    prepare_run_dir,
    put_in_place,
    resume_point,
    save_distributed,
    save_model,
    tmp_path,
    write_json,
    write_text,
)
from moe_tune.training.sft_trainer import (
    BF16_PAYS,
    MoeSFTTrainer,
    TrainerParts,
    bf16_speedup,
    build_trainer,
    checkpointing_is_auto,
    config_as_loaded,
    sft_config,
    sft_warnings,
    train,
    turn_on_checkpointing,
)


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """What a run works out before any weights load, once, for every later step."""

    recipe: Recipe       # with absolute paths; the one recipe of the run
    meta: nn.Module      # the model's modules and parameter shapes, without weights (for counting)
    template: templates.GivenTemplate | None  # model.chat_template, given to the tokenizer
    arch: MoeArch        # of ``meta``
    plan: Plan           # per parameter: train, LoRA or freeze
    sft_args: SFTConfig  # built once, here
    report: PlanReport   # experts scored when training starts update it (make_trainable)
    saved_selection: Path | None = None  # a resumed run's scored experts: read, not scored again

    @property
    def run(self) -> Path:
        return Path(self.recipe.output_dir)

    @property
    def frozen_experts_in_bf16(self) -> bool:
        return self.report.frozen_experts_in_bf16


@dataclasses.dataclass(frozen=True)
class RunData:
    """What check_data read and checked, handed to the steps that train on it."""

    tokenizer: object    # the checkpoint's, with model.chat_template given
    rows: TrainRows
    first_row: str | None  # the first training row with its trained tokens marked


def plan_run(recipe: Recipe, planning: bool = False) -> RunSetup:
    """The plan on a weightless (meta) copy of the model, LoRA coverage verified by wrapping it.
    ``planning``: for ``moe-tune plan``, which runs as one process whatever the parallel layout."""
    config = load_config(recipe.model.path)
    require_moe(config, recipe.model.path)
    template = templates.recipe_template(recipe.model)
    added = {}
    if template is not None:  # the vocabulary grows by the tokens it adds
        text = config.get_text_config()
        added = templates.new_tokens(recipe.model.path, template, text.vocab_size)
        text.vocab_size = max([text.vocab_size, *(i + 1 for i in added.values())])
    meta = build_meta_model(config)
    arch = describe(meta)
    modes = resolve_modes(recipe.trainable.preset, recipe.trainable.overrides())
    quantized = set(quantized_weights(meta, recipe.model.quantize_experts)) if recipe.model.bits else set()
    plan = make_plan(meta, arch, modes, quantized=quantized, new_tokens=list(added.values()))
    check_selection(recipe, plan)
    check_router(recipe.router, modes["router"])
    check_bias_balance(recipe.router, arch, modes, bool(plan.lora_targets),
                       dict(meta.named_parameters()) | dict(meta.named_buffers()))
    check_parts_exist(recipe.trainable.overrides(), arch)
    check_quantization(recipe.model, config, meta, arch)
    distributed.check_parallel(recipe.parallel, recipe.sft, recipe.model.bits, plan.modes, meta, arch, planning)
    cfg = recipe.trainable.selection()
    selection = load_selection(cfg.file, arch) if cfg and cfg.file else None
    bf16, bf16_note = cpu_bf16(recipe, meta, arch)
    sft_args = sft_config(recipe, Path(recipe.output_dir), cpu_bf16=bf16)
    if packing.packs(sft_args):
        packing.check_packable(meta, arch.family)
    in_bf16 = experts_policy.holds_frozen_experts_in_bf16(recipe, sft_args, plan.modes["routed_experts"])
    report = plan_report(meta, arch, plan, recipe, sft_args, selection, in_bf16)
    if checkpointing_is_auto(recipe):  # on only where the planned peak exceeds the machine
        free, without = available_bytes(), report.peak_bytes
        if without > free:
            turn_on_checkpointing(sft_args)
            report.checkpointing_turned_on()
        report.notes.append(
            f"sft.activation_checkpointing: auto -> {'on' if sft_args.gradient_checkpointing else 'off'} (planned "
            f"peak {without / 1e9:.3f} GB without it, {free / 1e9:.3f} GB available)")
    if bf16_note:
        report.notes.insert(0, bf16_note)
    report.warnings += sft_warnings(sft_args)
    if added:
        report.new_tokens, report.chat_template = list(added), f"{templates.TEMPLATE_KEY}: {template.source}"
    if recipe.lora != LoraSection() and not plan.lora_targets:  # (a run's recipe.yaml writes every section)
        report.warnings.append("a lora section is given, but no part is in LoRA mode: it has no effect "
                               "(trainable.preset: lora_experts, or trainable.<part>: lora)")
    if cfg and not cfg.file:
        report.notes.append(f"experts are selected (score {cfg.score}, top_p {cfg.top_p}) on "
                            f"{cfg.rows} training rows when training starts; counts above are before it")
    apply_plan(copy.deepcopy(meta), plan, arch, recipe.lora)  # the copy: ``meta`` stays unwrapped for counting
    return RunSetup(recipe, meta, template, arch, plan, sft_args, report)


def cpu_bf16(recipe: Recipe, meta: nn.Module, arch: MoeArch) -> tuple[bool, str | None]:
    """(bf16 autocast by default, and why) on a CPU where the recipe leaves sft.bf16 and sft.fp16
    unset: on where this CPU's bf16 matmuls are measured BF16_PAYS times faster than fp32 at the
    model's layer shapes. (False, None) on a GPU or where the recipe decides."""
    if torch.cuda.is_available() or {"bf16", "fp16"} & set(recipe.sft):
        return False, None
    speedup = bf16_speedup(text_config(meta.config).hidden_size, expert_intermediate(meta, arch))
    on = speedup >= BF16_PAYS
    return on, (f"bf16 autocast {'on' if on else 'off'}: this CPU's bf16 matmuls run {speedup:.2g}x fp32 at the "
                f"model's shapes (measured; on from {BF16_PAYS}x); sft.bf16 decides otherwise")


def check_data(setup: RunSetup) -> RunData:
    """The tokenizer and every data file the run will read, checked before any weights load;
    what was read is handed on, so that nothing is read twice."""
    recipe = setup.recipe
    tokenizer = load_tokenizer(recipe.model.path, setup.template)
    data = recipe.data
    read = read_train_rows(data)
    first = None
    if setup.sft_args.assistant_only_loss:  # before check_lengths: it names a row the template cannot render
        how = templates.masking(tokenizer)
        templates.check_rows(data.train, read.train.rows, tokenizer, how)
        first = templates.first_row(tokenizer, read.train.rows, how)
    args = setup.sft_args
    check_lengths(data.train, read.train.rows, tokenizer, args.max_length, data.skip_bad_rows,
                  cuts=args.packing or not args.padding_free)
    if first is not None and args.packing:
        first += "\n" + templates.packing_preview(tokenizer, read.train.rows, how, args.max_length)
    for path in recipe.eval.files:
        read_chat_rows(path)
    if recipe.eval.retention_file and not Path(recipe.eval.retention_file).is_file():
        raise MoeTuneError(f"{shown(recipe.eval.retention_file)}: eval.retention_file not found")
    setup.report.first_row = first
    return RunData(tokenizer, read, first)


def set_experts_implementation(recipe: Recipe, model) -> None:
    """The recipe's experts kernel; a model whose experts do not use transformers' experts
    interface keeps its own forward."""
    name = recipe.model.experts_implementation
    if name == experts_policy.NAME:
        experts_policy.use_experts_kernel(model)
    elif model._can_set_experts_implementation():
        model.set_experts_implementation(name)


def attach_regularizers(setup: RunSetup, model, arch: MoeArch) -> tuple[RouterRegularizer, BiasBalancer | None]:
    """Router terms, expert dropout and bias balancing, hooked onto the model before any LoRA wrapping."""
    recipe = setup.recipe
    experts = recipe.experts
    if experts.dropout or experts.drop_expert_prob:
        ExpertDropout(model, arch, experts.dropout, experts.shared_dropout, experts.drop_expert_prob).attach()
    coef = coefficients(recipe.router, model.config, setup.plan.modes["router"])
    balancer = BiasBalancer(model, arch, recipe.router.bias_balance_rate) if recipe.router.bias_balance_rate else None
    return RouterRegularizer(model, arch, coef["aux_loss"], coef["z_loss"], coef["router_kl"],
                             recipe.router.balance_scope), balancer


def make_trainable(setup: RunSetup, model, arch: MoeArch, tokenizer,
                   data: RunData | None = None) -> tuple[nn.Module, list[ShardedGradMask]]:
    """Select experts (ESFT), then freeze, train or LoRA-wrap each part as planned; print and
    save what will train. ``data``: what check_data read (experts are scored on its rows).
    Returns the model and the selection's masks of sharded experts (for the trainer)."""
    recipe, plan, report = setup.recipe, setup.plan, setup.report
    cfg, selection = recipe.trainable.selection(), None
    if cfg is not None and setup.saved_selection is not None:
        selection = load_selection(setup.saved_selection, arch)
    elif cfg is not None:
        rows = data.rows.train.rows[:cfg.rows] if data is not None else None
        shares, selection = select_experts(recipe, model, arch, tokenizer, rows)
        # a sharded model's scoring forward left FSDP2 units gathered, their parameters standing in
        # for the sharded ones that the plan must freeze
        distributed.reshard(model)
        if not cfg.file and distributed.is_main():  # scored now, not read from a file
            save_selection(setup.run / SELECTION_FILE, cfg.score, cfg.top_p, shares, selection)
            print("selected experts: " + "; ".join(f"{b}: {e}" for b, e in selection.items()))
    if selection is not None and report.expert_selection is None:  # the counts, with the selected experts' share
        report.take_counts(plan_report(setup.meta, setup.arch, plan, recipe, setup.sft_args, selection,
                                       report.frozen_experts_in_bf16))
    if distributed.is_main():
        print(report.format())
        write_json(setup.run / PLAN_FILE, report.to_json())
    model = apply_plan(model, plan, arch, recipe.lora)
    experts_policy.route_lora_through(model)  # only where experts_implementation is moe_tune
    masks = []
    if selection is not None and plan.modes["routed_experts"] == "train":
        masks = restrict_full(model, arch, selection)
    elif selection is not None:
        restrict_lora(model, arch, selection)
    return model, masks


def trainer_for(setup: RunSetup, model, tokenizer, data: RunData | None = None) -> tuple[MoeSFTTrainer, MoeArch]:
    """The trainer ``moe-tune train`` runs, for a freshly loaded model, and the model's
    architecture (the benchmarks build theirs here too); ``data``: what check_data read, or
    None to read the recipe's rows now."""
    set_experts_implementation(setup.recipe, model)
    arch = describe(model)
    experts_policy.cast_on_use(model, arch.expert_modules, bool(setup.sft_args.gradient_checkpointing))
    distributed.register_moe_leaf_modules(model, arch)
    # the anchor is the base routing, also on resume
    regularizer, balancer = attach_regularizers(setup, model, arch)
    model, masks = make_trainable(setup, model, arch, tokenizer, data)
    if balancer is not None:
        balancer.freeze()  # the plan may have made the router's tensors trainable
    parts = TrainerParts(regularizer, balancer, tuple(setup.plan.token_rows) if not setup.plan.lora_targets else (),
                         data.rows if data is not None else None, masks)
    trainer = build_trainer(setup.recipe, setup.sft_args, model, tokenizer, arch, parts)
    if packing.packs(setup.sft_args):  # measured before the first step: rows packed must not see each other
        trainer.packed_masks = packing.check_isolation(trainer.model, trainer.data_collator, arch.family)
    return trainer, arch


@dataclasses.dataclass(frozen=True)
class Trained:
    """The trained model, ready to evaluate."""

    model: nn.Module
    tokenizer: object
    arch: MoeArch


def load_trained(setup: RunSetup) -> Trained:
    """The run's saved model, set up as it trained: the recipe's experts kernel, LoRA through it."""
    model, tokenizer, _ = load_run_model(setup.run, setup.recipe.model.dtype)  # whole, whatever the sharding
    set_experts_implementation(setup.recipe, unwrapped(model))
    experts_policy.route_lora_through(model)
    return Trained(model, tokenizer, describe(unwrapped(model)))


def train_and_save(setup: RunSetup, data: RunData, checkpoint: Path | None, interrupts: Interrupts) -> Trained | None:
    """Train (from ``checkpoint`` when resuming) and save RUN/model; the model to evaluate, or
    None on the ranks that do not evaluate."""
    recipe, run = setup.recipe, setup.run
    set_seed(recipe.seed)
    model, tokenizer = load_model(recipe.model.path, recipe.model.dtype, recipe.model, setup.template,
                                  tokenizer=data.tokenizer, frozen_experts_in_bf16=setup.frozen_experts_in_bf16,
                                  sharding=distributed.distributed_config(recipe.parallel))
    trainer, arch = trainer_for(setup, model, tokenizer, data)
    trainer.add_callback(StopOnInterrupt(interrupts))
    start = time.time()
    with interrupts.gracefully():
        if checkpoint is not None and operator.ge(*checkpoint_step(checkpoint)):
            trainer.load_final_checkpoint(checkpoint)  # trained to the end: its weights, and no step more
        else:
            train(trainer, recipe, checkpoint)
    if interrupts.requested:
        step = trainer.state.global_step
        then = (f"its weights only: {SHARDED_CHECKPOINTS}" if recipe.parallel is not None else
                f"continue with: moe-tune train {run} --resume")
        raise Interrupted(f"{interrupts.requested} at step {step}: checkpoint {run / CHECKPOINTS}/checkpoint-{step} "
                          f"saved; {then}")
    mark_done(run, "train")
    with interrupts.gracefully():
        if distributed.world_size() > 1:
            save_distributed(trainer, tokenizer, run)
        else:
            with config_as_loaded(trainer.model, trainer.config_as_loaded):
                save_model(trainer.model, tokenizer, run)
    # rank 0 alone tidies the run folder: another rank could find the folder gone between its
    # two looks (seen in tests/test_distributed.py)
    if distributed.is_main() and (run / CHECKPOINTS).is_dir() and not any((run / CHECKPOINTS).iterdir()):
        (run / CHECKPOINTS).rmdir()
    mark_done(run, "save")
    print(f"trained in {time.time() - start:.0f}s; model saved to {run / MODEL_DIR}")
    if interrupts.requested:
        raise Interrupted(f"{interrupts.requested} while saving: the model is saved in {run / MODEL_DIR}; "
                          f"evaluate it with: moe-tune train {run} --resume")
    if distributed.world_size() > 1:
        return load_trained(setup) if distributed.is_main() else None
    return Trained(trainer.model, tokenizer, arch)


def evaluate_run(setup: RunSetup, trained: Trained | None, done: list[str]) -> None:
    """Held-out evaluation of the tuned model (and the base, if asked), with routing analytics
    (phase evaluate), then the report and its plots (phase report), into RUN/eval.tmp, renamed
    to RUN/eval at the end (a run folder with eval/ is a finished run). ``trained`` is None where
    only the report is left to write."""
    recipe, run = setup.recipe, setup.run
    tmp = tmp_path(run / EVAL_DIR)
    if "evaluate" in done:  # interrupted while reporting: the results are there
        report = json.loads((tmp / REPORT_JSON).read_text()) if (tmp / REPORT_JSON).is_file() else {}
    else:
        tmp.mkdir(parents=True, exist_ok=True)
        # the base with the tuned tokenizer: tokens a chat template added get rows (untrained) there too
        base = load_model(recipe.model.path, recipe.model.dtype, tokenizer=trained.tokenizer)[0] \
            if recipe.eval.compare_base else None
        report = evaluate_files(trained.model, trained.tokenizer, recipe.eval, tmp, base=base, arch=trained.arch)
        mark_done(run, "evaluate")
    if report:
        write_report(tmp, report)
        print(f"report: {run / EVAL_DIR / REPORT_MD}")
    put_in_place(tmp, run / EVAL_DIR)
    mark_done(run, "report")


def run_training(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> Path | None:
    """The run; under a multi-process launcher, every rank trains and rank 0 alone writes,
    reloads the saved model and evaluates (it returns None on the other ranks). With
    ``resume``, an interrupted run continues from the phase it did not complete."""
    # local paths absolute: recipe.yaml works from anywhere, and a resumed run names its files
    # (results, report) as the run did
    recipe = with_absolute_paths(recipe)
    setup = plan_run(recipe)
    data = check_data(setup)
    resumed = resume_point(recipe, setup.sft_args) if resume else None
    if not resume:
        check_run_dir(recipe.output_dir, overwrite)  # every rank decides before any rank writes
    if data.first_row and distributed.is_main():  # once the run may go ahead
        print(data.first_row)
    distributed.join(setup.sft_args)
    distributed.barrier()
    run = setup.run
    if resumed is not None:
        setup = dataclasses.replace(setup, saved_selection=continue_run(run, resumed, recipe.trainable.selection()))
        if distributed.is_main():
            write_text(run / RECIPE_FILE, dump_recipe(recipe))  # RESUMABLE keys (output_dir) may have changed
        print(f"resuming from {resumed.checkpoint}" if resumed.checkpoint else
              f"resuming after phase {resumed.done[-1]}: {', '.join(p for p in PHASES if p not in resumed.done)} left")
    existed = run.is_dir()
    if resumed is None and distributed.is_main():
        prepare_run_dir(recipe.output_dir, overwrite)
        write_text(run / RECIPE_FILE, dump_recipe(recipe))
    distributed.barrier()
    done = resumed.done if resumed is not None else []
    with Interrupts() as interrupts:
        try:
            if "evaluate" in done:  # only the report is left: it needs no model
                trained = None
            elif "save" in done:
                trained = load_trained(setup)
            else:
                trained = train_and_save(setup, data, resumed.checkpoint if resumed else None, interrupts)
                if trained is None:  # a rank that does not evaluate
                    return None
            evaluate_run(setup, trained, phases_done(run))
        except KeyboardInterrupt:
            raise Interrupted(stopped_message(run)) from None
        except Interrupted:
            raise
        except Exception:  # a failure before the first logged step leaves nothing that blocks the next try
            if resumed is None and distributed.is_main():
                discard_unstarted(run, existed)
            raise
    print(f"\nrun folder: {run}")
    return run


def stopped_message(run: Path) -> str:
    """What an interrupted run kept, and how to go on."""
    done = phases_done(run)
    if "save" in done:
        return f"the model is saved in {run / MODEL_DIR}; finish the evaluation with: moe-tune train {run} --resume"
    checkpoints = complete_checkpoints(run)
    if checkpoints:
        return f"the last complete checkpoint is {checkpoints[-1]}; continue with: moe-tune train {run} --resume"
    return "no checkpoint was saved yet; start the run again with --overwrite"

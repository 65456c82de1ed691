"""Every bad input gets one line naming the file, key or row and what to do, and exit status 2;
no traceback (unless --debug), and nothing is loaded or written first. One case per test."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from moe_tune.cli import main

from conftest import ROOT, SHIPPED_MODEL, cli_commands, tiny_checkpoint, without_template

QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
TRAIN = ROOT / "data" / "train.jsonl"
GOOD_ROW = TRAIN.read_text().splitlines()[0]


# What a case may write into, were the code wrong: each case gets its own copy of these.
WRITABLE = ("file_output", "foreign_output", "foreign_gguf", "fake_run")


@pytest.fixture(scope="module")
def shared_files(tmp_path_factory):
    """Bad files, each next to what it breaks: made once, read by every case."""
    folder = tmp_path_factory.mktemp("bad-input")

    def write(name, text, mode="w"):
        path = folder / name
        path.write_bytes(text) if mode == "wb" else path.write_text(text)
        return str(path)

    base = (ROOT / "recipes" / "quickstart.yaml").read_text()
    row = json.loads(GOOD_ROW)
    return {
        "bad_yaml": write("bad.yaml", "model: {path: data/tiny-moe\ndata: [\n"),
        "empty_recipe": write("empty.yaml", ""),
        "list_recipe": write("list.yaml", "- model\n- data\n"),
        "unknown_top": write("top.yaml", base + "\ntrainer: {steps: 3}\n"),
        "no_model": write("nomodel.yaml", "output_dir: x\ndata: {train: data/train.jsonl}\n"),
        "empty_data": write("empty.jsonl", ""),
        "bad_json": write("badjson.jsonl", GOOD_ROW + "\n{\"messages\": [\n"),
        "no_messages": write("nomsg.jsonl", json.dumps({"conversation": row["messages"]}) + "\n"),
        "bad_role": write("role.jsonl", json.dumps({"messages": [{"role": "robot", "content": "hi"},
                                                                 {"role": "assistant", "content": "x"}]}) + "\n"),
        "no_answer": write("noanswer.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"),
        "empty_content": write("emptycontent.jsonl", json.dumps({"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}) + "\n"),
        "latin1": write("latin1.jsonl", ("{\"messages\": [{\"role\": \"user\", \"content\": \"caf\xe9\"}]}\n").encode(
            "latin-1"), mode="wb"),
        "alpaca_no_output": write("alpaca.jsonl", json.dumps({"instruction": "Say hi", "input": ""}) + "\n"),
        "long_row": write("long.jsonl", json.dumps({"messages": [
            {"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}) + "\n"),
        "dense": str(_dense_checkpoint(folder / "dense")),
        "corrupt_weights": str(_corrupt_checkpoint(folder / "corrupt")),
        "no_config": str(_folder(folder / "noconfig")),
        "file_output": write("afile", "not a folder"),
        "foreign_output": str(_folder(folder / "someone", "notes.txt")),
        "selection_bad": write("sel.json", json.dumps({"selected": {"model.layers.0.mlp": [99]}})),
        "fake_run": str(_fake_run(folder / "run")),
        "foreign_gguf": write("mine.gguf", "my notes, not a model"),
        "spec_bad": write("spec.yaml", f"base: {QUICKSTART}\noutput_dir: x\nseeds: [1]\nvariants: {{a: {{sft.max_stepz: 3}}}}\n"),
        "prompts_only_model": str(_with_template(folder / "prompts-only", "prompts_only")),
        "sharegpt_model": str(_with_template(folder / "sharegpt", "sharegpt_roles")),
        "base_model": str(without_template(folder / "base")),
        "bad_jinja": write("bad.jinja", "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}\n"),
        "no_ep_plan_model": str(tiny_checkpoint("jetmoe", folder / "jetmoe")),
        "flat_experts_model": str(tiny_checkpoint("dbrx", folder / "dbrx")),
        "recurrent_model": str(tiny_checkpoint("jamba", folder / "jamba")),
        "leaking_model": str(tiny_checkpoint("minimax", folder / "minimax")),
        "fp8_model": str(_quantized_already(folder / "fp8")),
        "ends_with_user": write("endsuser.jsonl", json.dumps({"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and?"}]}) + "\n"),
    }


@pytest.fixture
def files(shared_files, tmp_path):
    """The shared files, with a copy of each one a case may write into and an output path of its own."""
    copies = {}
    for key in WRITABLE:
        source, copy = Path(shared_files[key]), tmp_path / Path(shared_files[key]).name
        shutil.copytree(source, copy) if source.is_dir() else shutil.copy(source, copy)
        copies[key] = str(copy)
    return {**shared_files, **copies, "out": str(tmp_path / "never-written")}


def _fake_run(path):
    """A run folder as far as its recipe (training never started)."""
    path.mkdir()
    (path / "recipe.yaml").write_text((ROOT / "recipes" / "quickstart.yaml").read_text())
    return path


def _with_template(dest, template):
    """The shipped model with a broken chat_template.jinja from tests/chat_templates/broken/ (its weights
    linked, not copied: the run refuses the data before any weights load)."""
    shutil.copytree(SHIPPED_MODEL, dest, ignore=shutil.ignore_patterns("model.safetensors"))
    (dest / "model.safetensors").symlink_to(SHIPPED_MODEL / "model.safetensors")
    shutil.copy(ROOT / "tests" / "chat_templates" / "broken" / f"{template}.jinja",
                dest / "chat_template.jinja")
    return dest


def _corrupt_checkpoint(dest):
    """The shipped model whose safetensors file is not one (a download cut short)."""
    shutil.copytree(SHIPPED_MODEL, dest, ignore=shutil.ignore_patterns("model.safetensors"))
    (dest / "model.safetensors").write_text("not weights")
    return dest


def _folder(path, file=None):
    path.mkdir()
    if file:
        (path / file).write_text("mine")
    return path


def _dense_checkpoint(dest):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _quantized_already(dest, method="fp8"):
    """The shipped model's files, its config declaring a quantization (as FP8 or MXFP4 releases do)."""
    shutil.copytree(SHIPPED_MODEL, dest, ignore=shutil.ignore_patterns("model.safetensors"))
    (dest / "model.safetensors").symlink_to(SHIPPED_MODEL / "model.safetensors")
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": method}}))
    return dest


def train(files, *args):
    return ["train", QUICKSTART, f"output_dir={files['out']}", *args]


def prune(files, *args, model=str(SHIPPED_MODEL), data=str(TRAIN), out=None):
    return ["prune", model, "--data", data, "--out", out or files["out"], *args]


# (case, argv from the files fixture, what the one line must say)
CASES = [
    # recipe files
    ("recipe_missing", lambda f: ["train", "no/such/recipe.yaml"], "no/such/recipe.yaml"),
    ("recipe_bad_yaml", lambda f: ["train", f["bad_yaml"]], "bad.yaml"),
    ("recipe_empty", lambda f: ["train", f["empty_recipe"]], "empty.yaml"),
    ("recipe_not_a_mapping", lambda f: ["train", f["list_recipe"]], "list.yaml"),
    ("recipe_unknown_section", lambda f: ["train", f["unknown_top"]], "unknown key 'trainer'"),
    ("recipe_key_outside_its_section", lambda f: train(f, "max_steps=3"),
     "unknown key 'max_steps'; did you mean 'sft.max_steps'?"),
    ("recipe_missing_section", lambda f: ["train", f["no_model"]], "model"),
    ("recipe_unknown_nested_key", lambda f: train(f, "trainable.prest=full"), "trainable.prest"),
    ("recipe_misspelt_key_suggests", lambda f: train(f, "sft.learning_rat=1e-4"), "learning_rate"),
    ("recipe_wrong_type", lambda f: train(f, "sft.max_steps=many"), "sft.max_steps"),
    ("recipe_bad_choice", lambda f: train(f, "model.dtype=float8"), "model.dtype"),
    ("recipe_bad_preset", lambda f: train(f, "trainable.preset=everything"), "trainable.preset"),
    ("recipe_two_quantizations", lambda f: train(f, "model.load_in_4bit=true", "model.load_in_8bit=true"),
     "only one of load_in_4bit and load_in_8bit"),
    ("recipe_sft_output_dir", lambda f: train(f, "sft.output_dir=/tmp/x"), "output_dir"),
    ("recipe_checkpointing_neither_bool_nor_auto", lambda f: train(f, "sft.activation_checkpointing=sometimes"),
     "sft.activation_checkpointing"),
    ("recipe_two_checkpointing_names", lambda f: train(f, "sft.activation_checkpointing=false",
                                                       "sft.gradient_checkpointing=true"), "set only one of"),
    ("recipe_eval_without_valid", lambda f: train(f, "data.valid=null"), "data.valid"),
    ("packing_recurrent_family", lambda f: train(f, "sft.packing=true", f"model.path={f['recurrent_model']}"),
     "sft.packing: jamba has layers that carry state along the sequence"),
    ("packing_eval_packing", lambda f: train(f, "sft.packing=true", "sft.eval_packing=true"),
     "sft.eval_packing: evaluation runs on whole rows"),
    ("packing_without_max_length", lambda f: train(f, "sft.packing=true", "sft.max_length=null"),
     "sft.max_length: packing fills sequences of sft.max_length tokens, and it is null"),
    ("packing_wrapped", lambda f: train(f, "sft.packing=true", "sft.packing_strategy=wrapped"),
     "sft.packing_strategy: wrapped cuts rows"),
    ("padding_free_long_row", lambda f: train(f, f"data.train={f['long_row']}", "sft.padding_free=true",
                                              "data.skip_bad_rows=true"), "sft.padding_free without sft.packing cuts no row"),
    ("recipe_lora_dropout_on_fused_experts", lambda f: train(f, "trainable.preset=lora_experts", "lora.dropout=0.1"),
     "lora.dropout"),
    ("recipe_norms_in_lora", lambda f: train(f, "trainable.norms=lora"), "trainable.norms"),
    ("recipe_router_terms_with_router_lora", lambda f: train(f, "trainable.router=lora", "router.z_loss_coef=0.001"),
     "router"),
    ("global_balance_with_frozen_router", lambda f: train(f, "router.balance_scope=global_batch",
                                                          "trainable.preset=freeze_router"),
     "router.balance_scope: global_batch balances a router that trains, and here it is frozen"),
    ("recipe_lora_target_absent", lambda f: train(f, "trainable.preset=freeze_experts", "trainable.shared_experts=lora"),
     "shared_experts"),
    ("recipe_bad_selection_file", lambda f: train(f, "trainable.preset=esft", f"trainable.expert_selection.file={f['selection_bad']}"),
     "sel.json"),
    # the command line
    ("cli_unknown_command", lambda f: ["fly", QUICKSTART], "fly"),
    ("cli_unknown_option", lambda f: train(f, "--fast"), "--fast"),
    ("cli_override_without_value", lambda f: train(f, "sft.max_steps"), "sft.max_steps"),
    ("cli_resume_and_overwrite", lambda f: train(f, "--resume", "--overwrite"), "--resume and --overwrite"),
    ("cli_output_is_a_file", lambda f: train(f, f"output_dir={f['file_output']}"), "is a file"),
    ("cli_output_not_a_run", lambda f: train(f, f"output_dir={f['foreign_output']}"), "not a moe-tune run"),
    ("cli_compare_bad_variant", lambda f: ["compare", f["spec_bad"]], "variant 'a'"),
    ("cli_eval_missing_data", lambda f: ["eval", str(SHIPPED_MODEL), "--data", "no/such.jsonl"], "no/such.jsonl"),
    ("cli_eval_model_without_data", lambda f: ["eval", str(SHIPPED_MODEL)], "give the held-out data with --data"),
    ("cli_eval_out_taken", lambda f: ["eval", str(SHIPPED_MODEL), "--data", str(TRAIN), "--out", f["foreign_output"]],
     "already exists and is not empty; pass --overwrite"),
    ("cli_eval_out_not_an_evaluation", lambda f: ["eval", str(SHIPPED_MODEL), "--data", str(TRAIN), "--out",
                                                  f["foreign_output"], "--overwrite"], "not a moe-tune evaluation"),
    ("cli_chat_not_moe", lambda f: ["chat", f["dense"], "--prompt", "hi"], "is not a Mixture-of-Experts model"),
    ("cli_chat_run_without_model", lambda f: ["chat", f["fake_run"], "--prompt", "hi"], "has no saved model yet"),
    ("cli_export_merged_taken", lambda f: ["export", f["fake_run"], "--merged", f["foreign_output"]],
     "already exists and is not empty; pass --overwrite"),
    ("export_gguf_unknown_quant", lambda f: ["export", f["fake_run"], "--gguf", f["out"] + ".gguf", "--quant", "q9_x"],
     "invalid choice: 'q9_x' (choose from 'f32', 'f16', 'bf16', 'q8_0'"),
    ("export_gguf_not_a_gguf_name", lambda f: ["export", f["fake_run"], "--gguf", f["out"]],
     "give a file name ending in .gguf"),
    ("export_gguf_replaces_another_file", lambda f: ["export", f["fake_run"], "--gguf", f["foreign_gguf"], "--overwrite"],
     "not a GGUF file, refusing to replace it"),
    ("export_verify_vllm_with_gguf", lambda f: ["export", f["fake_run"], "--gguf", f["out"] + ".gguf", "--verify", "vllm"],
     "--verify vllm checks a --merged checkpoint"),
    ("export_no_prompts_to_verify", lambda f: ["export", f["fake_run"], "--gguf", f["out"] + ".gguf", "--verify-rows", "0"],
     "--verify-rows: give a positive number of prompts (got 0)"),
    ("export_share_above_one", lambda f: ["export", f["fake_run"], "--gguf", f["out"] + ".gguf", "--min-identical", "95"],
     "--min-identical: give a share between 0 and 1 (got 95.0)"),
    ("export_adapter_without_engine", lambda f: ["export", f["fake_run"], "--adapter", f["out"]],
     "--adapter needs --for vllm"),
    ("export_adapter_of_a_run_without_adapter", lambda f: ["export", f["fake_run"], "--adapter", f["out"], "--for", "vllm"],
     "not a LoRA run (no model/adapter_config.json)"),
    ("cli_resume_without_checkpoint", lambda f: ["train", f["fake_run"], "--resume"],
     "sft.save_strategy is 'no', so it kept no checkpoint"),
    ("model_hub_id_offline", lambda f: ["inspect", "org-x/no-such-moe"], "moe_tune/model/configs"),
    ("select_experts_out_taken", lambda f: ["select-experts", QUICKSTART, "--out", f["foreign_gguf"]],
     "already exists; pass --overwrite or --out another file"),
    # data files
    ("data_missing", lambda f: train(f, "data.train=no/such.jsonl"), "no/such.jsonl"),
    ("data_empty", lambda f: train(f, f"data.train={f['empty_data']}"), "empty.jsonl"),
    ("data_bad_json", lambda f: train(f, f"data.train={f['bad_json']}"), "badjson.jsonl"),
    ("data_missing_field", lambda f: train(f, f"data.train={f['no_messages']}"), "nomsg.jsonl"),
    ("data_unknown_role", lambda f: train(f, f"data.train={f['bad_role']}"), "role.jsonl"),
    ("data_unknown_role_is_shown", lambda f: train(f, f"data.train={f['bad_role']}"), "got role 'robot'"),
    ("data_no_answer", lambda f: train(f, f"data.train={f['no_answer']}"), "noanswer.jsonl"),
    ("data_content_not_text", lambda f: train(f, f"data.train={f['empty_content']}"), "emptycontent.jsonl"),
    ("data_wrong_encoding", lambda f: train(f, f"data.train={f['latin1']}"), "not UTF-8"),
    ("data_alpaca_missing_output", lambda f: train(f, f"data.train={f['alpaca_no_output']}"), "alpaca.jsonl"),
    ("data_row_too_long", lambda f: train(f, f"data.train={f['long_row']}"), "longer than sft.max_length 128"),
    ("data_valid_missing", lambda f: train(f, "data.valid=no/valid.jsonl"), "no/valid.jsonl"),
    ("data_retention_missing", lambda f: train(f, "eval.retention_file=no/ret.txt"), "no/ret.txt"),
    ("data_unknown_format", lambda f: train(f, "data.format=csv"), "data.format"),
    # models
    ("model_missing", lambda f: train(f, "model.path=no/such/model"), "no/such/model"),
    ("model_folder_without_config", lambda f: train(f, f"model.path={f['no_config']}"), "noconfig"),
    ("model_not_moe", lambda f: train(f, f"model.path={f['dense']}"), "not a"),
    ("model_not_moe_inspect", lambda f: ["inspect", f["dense"]], "not a"),
    ("model_weights_corrupt", lambda f: ["plan", QUICKSTART, f"model.path={f['corrupt_weights']}"],
     "model.safetensors: not a readable safetensors file"),
    ("resume_nothing", lambda f: train(f, "--resume", "output_dir=/tmp/moe-tune-no-such-run"), "no moe-tune run to resume"),
    # moe-tune plan's GPUs
    ("plan_zero_gpus", lambda f: ["plan", QUICKSTART, "--gpus", "0", "--gpu-memory", "80GB"], "--gpus 0"),
    ("plan_negative_gpus", lambda f: ["plan", QUICKSTART, "--gpus", "-2", "--gpu-memory", "80GB"], "--gpus -2"),
    ("plan_gpu_memory_not_a_size", lambda f: ["plan", QUICKSTART, "--gpu-memory", "lots"], "--gpu-memory lots"),
    ("plan_gpus_without_gpu_memory", lambda f: ["plan", QUICKSTART, "--gpus", "8"], "--gpus needs --gpu-memory"),
    ("plan_accelerate_config_missing", lambda f: ["plan", QUICKSTART, "--gpu-memory", "80GB", "--accelerate-config",
                                                  "no/such/fsdp.yaml"], "no/such/fsdp.yaml"),
    ("plan_not_an_accelerate_config", lambda f: ["plan", QUICKSTART, "--gpu-memory", "80GB", "--accelerate-config",
                                                 QUICKSTART], "not an accelerate config"),
    # the model's chat template, on the shipped data (check_data renders every row before any weights load)
    ("template_renders_no_answer", lambda f: train(f, f"model.path={f['prompts_only_model']}"),
     "train.jsonl row 1: no token of it would be trained"),
    ("template_raises_on_the_roles", lambda f: train(f, f"model.path={f['sharegpt_model']}"),
     "train.jsonl row 1: the chat template cannot render it (Unknown role: user"),
    # model.chat_template, for a base checkpoint (or to replace a template)
    ("template_missing_on_a_base_model", lambda f: train(f, f"model.path={f['base_model']}"),
     "base: the tokenizer has no chat template (a base checkpoint?); give it one with model.chat_template: chatml"),
    ("template_name_unknown", lambda f: train(f, "model.chat_template=chatm"),
     "model.chat_template: 'chatm' is not a template name (chatml), a .jinja file or a tokenizer folder; "
     "did you mean 'chatml'?"),
    ("template_file_does_not_parse", lambda f: train(f, f"model.chat_template={f['bad_jinja']}"),
     "bad.jinja:2: the chat template does not parse (unexpected '}')"),
    ("template_given_renders_no_assistant_turn", lambda f: train(
        f, f"model.chat_template={ROOT / 'tests' / 'chat_templates' / 'broken' / 'prompts_only.jinja'}"),
     "prompts_only.jinja: the chat template renders no assistant turn"),
    ("template_new_tokens_with_lora_embeddings", lambda f: train(f, f"model.path={f['base_model']}",
                                                                 "model.chat_template=chatml", "trainable.embeddings=lora"),
     "trainable.embeddings: LoRA on it cannot also train the rows of the tokens model.chat_template adds"),
    ("template_through_sft", lambda f: train(f, "sft.chat_template_path=chatml.jinja"),
     "'sft.chat_template_path' is set by the recipe key 'model.chat_template'"),
    ("data_ends_with_a_user_turn", lambda f: train(f, f"data.train={f['ends_with_user']}"),
     "endsuser.jsonl:1: the last message must be the assistant's answer"),
    # moe-tune prune
    ("prune_keep_zero", lambda f: prune(f, "--keep", "0"), "--keep 0: give a fraction in (0, 1]"),
    ("prune_keep_above_one", lambda f: prune(f, "--keep", "1.5"), "--keep 1.5: give a fraction in (0, 1]"),
    ("prune_keep_below_top_k", lambda f: prune(f, "--keep", "1"), "fewer than the 2 each token is routed to"),
    ("prune_data_without_rows", lambda f: prune(f, "--keep", "0.5", data=f["empty_data"]), "empty.jsonl: no rows"),
    ("prune_not_an_moe", lambda f: prune(f, "--keep", "0.5", model=f["dense"]), "not a Mixture-of-Experts"),
    ("prune_out_exists", lambda f: prune(f, "--keep", "0.5", out=f["foreign_output"]), "already exists"),
    ("prune_rows_zero", lambda f: prune(f, "--keep", "0.5", "--rows", "0"), "--rows 0: score the experts on at least 1 row"),
    ("prune_by_unknown", lambda f: prune(f, "--keep", "0.5", "--by", "norm"), "invalid choice: 'norm'"),
    ("bias_balance_negative", lambda f: train(f, "router.bias_balance_rate=-1"), "router.bias_balance_rate"),
    # ranges TRL would check only once the model had loaded
    ("sft_negative_learning_rate", lambda f: train(f, "sft.learning_rate=-1e-3"),
     "sft.learning_rate: must be greater than 0 (got -0.001)"),
    ("sft_zero_batch", lambda f: train(f, "sft.per_device_train_batch_size=0"),
     "sft.per_device_train_batch_size: must be at least 1 (got 0)"),
    ("sft_negative_max_steps", lambda f: train(f, "sft.max_steps=-5"),
     "sft.max_steps: must be greater than 0, or -1 to train sft.num_train_epochs (got -5)"),
    ("plan_negative_learning_rate", lambda f: ["plan", QUICKSTART, "sft.learning_rate=-1e-3"],
     "sft.learning_rate: must be greater than 0"),
    ("bias_balance_with_lora_router", lambda f: train(f, "router.bias_balance_rate=0.001", "trainable.router=lora"),
     "router.bias_balance_rate: the router is LoRA-adapted"),
    # quantized experts (model.load_in_4bit, model.quantize_experts)
    ("4bit_experts_trained_in_full", lambda f: train(f, "model.load_in_4bit=true", "trainable.preset=experts_only"),
     "trainable.routed_experts: its expert tensors are quantized (model.quantize_experts)"),
    ("4bit_experts_of_a_flat_layout", lambda f: train(f, "model.load_in_4bit=true", f"model.path={f['flat_experts_model']}",
                                                      "trainable.preset=lora_attention"),
     "model.quantize_experts: dbrx's experts are 2-D stacks that the model reads outside their module"),
    ("4bit_experts_outside_the_experts_interface", lambda f: train(f, "model.load_in_4bit=true", "trainable.preset=lora_attention",
                                                                   f"model.path={f['no_ep_plan_model']}"),
     "model.quantize_experts: jetmoe's experts do not go through transformers' experts interface"),
    ("4bit_experts_through_another_kernel", lambda f: train(f, "model.load_in_4bit=true", "trainable.preset=lora_experts",
                                                            "model.experts_implementation=grouped_mm"),
     "model.experts_implementation: grouped_mm reads each quantized expert tensor whole"),
    ("4bit_float16_compute_on_cpu", lambda f: train(f, "model.load_in_4bit=true", "trainable.preset=lora_experts",
                                                    "model.bnb_4bit_compute_dtype=float16"),
     "model.bnb_4bit_compute_dtype: float16 is not a CPU compute dtype here"),
    ("4bit_of_a_quantized_checkpoint", lambda f: train(f, "model.load_in_4bit=true", "trainable.preset=lora_experts",
                                                       f"model.path={f['fp8_model']}"),
     "is quantized already (fp8); point model.path at its bf16 or fp32 release to quantize it with bitsandbytes"),
    ("template_raises_without_assistant_only_loss", lambda f: train(f, f"model.path={f['sharegpt_model']}",
                                                                    "sft.assistant_only_loss=false"),
     "train.jsonl row 1: the chat template cannot render it (Unknown role: user"),
]


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case, argv, expected, files, capsys):
    code = main(argv(files))
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, out.err
    assert len(lines) == 1, out.err
    assert "Traceback" not in out.err and expected in lines[0], lines[0]
    assert not (files["out"] and __import__("os").path.exists(files["out"]))  # nothing was written


def test_packing_a_family_that_leaks_once_loaded_stops_before_the_first_step(files, capsys):
    """Isolation is measured on the loaded model, so loading and data preparation print their
    progress first; then one line, exit 2, and the run folder is gone."""
    code = main(train(files, "sft.packing=true", f"model.path={files['leaking_model']}"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("moe-tune: error: sft.packing: minimax lets packed rows see each "
                                                   "other here"), err
    assert not __import__("os").path.exists(files["out"])


# accelerate trains a tensor-parallel group on GPUs only; on a GPU it is refused as unchecked
TP_GROUP_WHY = "moe_tune has not checked" if torch.cuda.is_available() else "accelerate trains on GPUs only"

# The parallel section's layouts, checked against the processes a launcher started (WORLD_SIZE,
# as torchrun sets it) before anything loads: (case, overrides, environment, what the line says).
PARALLEL_CASES = [
    ("parallel_one_process", ["parallel.fsdp_size=2"], {}, "needs 2 processes and this is one; launch with torchrun"),
    ("parallel_all_ones", ["parallel.fsdp_size=1"], {"WORLD_SIZE": "2"}, "every size is 1"),
    ("parallel_world_mismatch", ["parallel.fsdp_size=2"], {"WORLD_SIZE": "4"},
     "dp_replicate_size x fsdp_size x tp_size = 2, but 4 processes were launched"),
    ("parallel_ep_not_dividing_experts", ["parallel.fsdp_size=3", "parallel.ep_size=3"], {"WORLD_SIZE": "3"},
     "parallel.ep_size: 3 does not divide the model's 8 routed experts"),
    ("parallel_ep_not_dividing_fsdp", ["parallel.fsdp_size=2", "parallel.ep_size=4"], {"WORLD_SIZE": "2"},
     "parallel.ep_size: 4 must be a multiple of tp_size (1) and divide fsdp_size x tp_size (2)"),
    ("parallel_ep_without_plan", ["parallel.fsdp_size=2", "parallel.ep_size=2", "model.path={no_ep_plan_model}"],
     {"WORLD_SIZE": "2"}, "parallel.ep_size: JetMoeForCausalLM has no expert-parallel plan"),
    ("parallel_ep_alone", ["parallel.ep_size=2"], {"WORLD_SIZE": "2"},
     "expert parallelism alone makes ranks share a batch (a tensor-parallel group), which " + TP_GROUP_WHY),
    ("parallel_tp", ["parallel.tp_size=2"], {"WORLD_SIZE": "2"}, "parallel.tp_size makes ranks share a batch"),
    ("parallel_lora_experts_with_ep", ["parallel.fsdp_size=2", "parallel.ep_size=2", "trainable.preset=lora_experts"],
     {"WORLD_SIZE": "2"}, "bypasses PEFT's LoRA on the routed experts"),
    ("parallel_with_sft_fsdp", ["parallel.fsdp_size=2", "sft.fsdp=full_shard"], {"WORLD_SIZE": "2"},
     "sft.fsdp: the parallel section already shards the model"),
    ("parallel_with_accelerate_fsdp", ["parallel.fsdp_size=2"], {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"},
     "accelerate's FSDP config shards the model too"),
    ("parallel_with_4bit", ["parallel.fsdp_size=2", "model.load_in_4bit=true", "trainable.preset=lora_experts"],
     {"WORLD_SIZE": "2"}, "model.load_in_4bit: bitsandbytes weights are not sharded"),
    ("parallel_zero_size", ["parallel.fsdp_size=0"], {}, "parallel.fsdp_size"),
]


@pytest.mark.parametrize("case, overrides, env, expected", PARALLEL_CASES, ids=[c[0] for c in PARALLEL_CASES])
def test_a_bad_parallel_layout_is_one_clear_line(case, overrides, env, expected, files, capsys, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main(train(files, *(o.format(**files) for o in overrides)))
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, out.err
    assert "Traceback" not in out.err and expected in lines[0], lines[0]
    assert not __import__("os").path.exists(files["out"])  # nothing was written


def test_every_command_has_a_bad_input_case():
    """A command added to the CLI without a case here fails this test."""
    import collections

    named = {argv(collections.defaultdict(str))[0] for _, argv, _ in CASES}  # only the command is read
    assert set(cli_commands()) <= named, f"no bad-input case for {sorted(set(cli_commands()) - named)}"


def test_debug_shows_the_traceback(files):
    from moe_tune.errors import MoeTuneError

    with pytest.raises(MoeTuneError):
        main(["--debug", *train(files, "trainable.prest=full")])

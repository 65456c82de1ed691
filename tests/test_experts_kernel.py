"""moe_tune's experts forward: the same numbers as transformers' kernel and as PEFT's LoRA."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from moe_tune.moe import experts_kernel, experts_policy, experts_route, step_memory
from moe_tune.model.arch import describe
from moe_tune.recipe import LoraSection
from moe_tune.plan.modes import apply_plan, make_plan, resolve_modes

from families import tiny_config

# mixtral: plain fused experts; gpt_oss: transposed, with biases and its own gate;
# qwen2_moe: shared experts next to the routed ones; deepseek_v3: sigmoid router, and PEFT
# wraps its shared-expert Linear weights as parameters too (those must not be rerouted)
FAMILIES = ["mixtral", "gpt_oss", "qwen2_moe", "deepseek_v3", "ergo"]  # ergo: un-gated relu^2 experts


def tiny(model_type):
    torch.manual_seed(0)
    config = tiny_config(model_type)
    model = AutoModelForCausalLM.from_config(config).float()
    for p in model.parameters():  # beyond init scale, so that LoRA's contribution is visible
        p.data.normal_(0, 0.05)
    return model


def batch(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.get_text_config().vocab_size, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def loss_and_grads(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def assert_same_numbers(ref, fast, inputs, atol=1e-5, rtol=1e-4, grad_rtol=1e-3) -> dict:
    """Logits and every gradient of ``fast`` equal ``ref``'s on ``inputs``; returns the gradients."""
    ref_logits, ref_grads = loss_and_grads(ref, inputs)
    logits, grads = loss_and_grads(fast, inputs)
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=rtol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol, rtol=grad_rtol, msg=name)
    return grads


@pytest.fixture(params=[False, True], ids=["loop", "grouped"])
def grouped(request, monkeypatch):
    """Both expert paths on CPU: the per-expert loop (CPU) and the grouped kernel (CUDA)."""
    monkeypatch.setattr(experts_kernel, "_grouped", lambda x: request.param)
    return request.param


@pytest.mark.parametrize("model_type", FAMILIES)
def test_full_training_matches_transformers(model_type, grouped):
    model = tiny(model_type)
    fast = copy.deepcopy(model)
    assert experts_policy.use_experts_kernel(fast)
    assert_same_numbers(model, fast, batch(model))


def test_the_default_silu_gate_is_differentiated_by_hand_and_the_others_by_autograd():
    """The families whose numbers the tests above compare: gpt-oss's clamped gate goes through
    autograd; the default SiLU gate's backward is written out (_Activation), so it is the one
    those tests check."""
    experts = {t: next(m for n, m in tiny(t).named_modules() if n.endswith("mlp.experts")) for t in FAMILIES}
    assert {t for t, m in experts.items() if experts_kernel._silu_gated(m)} == {"mixtral", "qwen2_moe", "deepseek_v3"}
    ue = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    ga = torch.randn(5, 4, dtype=torch.float64)
    act = experts_kernel._Activation(experts["mixtral"], ue.detach(), torch.empty(7, 8, dtype=torch.float64))
    reference = F.silu(ue[:, :4]) * ue[:, 4:]
    torch.testing.assert_close(act.out, reference.detach())
    torch.testing.assert_close(act.grad(ga), torch.autograd.grad(reference, ue, ga)[0])


def lora_experts(model):
    arch = describe(model)
    plan = make_plan(model, arch, resolve_modes("lora_experts", {}))
    return apply_plan(model, plan, arch, LoraSection(r=4, alpha=8))


def randomize_lora(model):
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_" in name:  # PEFT starts B at zero: give both factors values
            p.data = torch.randn(p.shape, generator=g) * 0.05


@pytest.mark.parametrize("model_type", FAMILIES)
def test_expert_lora_matches_peft(model_type, grouped):
    peft_model = lora_experts(tiny(model_type))
    randomize_lora(peft_model)
    fast = copy.deepcopy(peft_model)
    experts_policy.use_experts_kernel(fast.get_base_model())
    assert experts_policy.route_lora_through(fast) == len(describe(fast.get_base_model()).layers)
    grads = assert_same_numbers(peft_model, fast, batch(peft_model))
    assert any("lora_" in n for n in grads)


def test_expert_lora_off_merged_and_disabled():
    peft_model = lora_experts(tiny("mixtral"))
    randomize_lora(peft_model)
    base = tiny("mixtral")  # the same seed: the same weights
    experts_policy.use_experts_kernel(base)
    experts_policy.use_experts_kernel(peft_model.get_base_model())
    experts_policy.route_lora_through(peft_model)
    inputs = batch(peft_model)
    with torch.no_grad():
        tuned = peft_model(**inputs).logits
        with peft_model.disable_adapter():  # the base model's output, LoRA added nowhere
            off = peft_model(**inputs).logits
        plain = base(**inputs).logits
        merged = peft_model.merge_and_unload()(**inputs).logits  # LoRA inside the weight, not added twice
    torch.testing.assert_close(off, plain)
    torch.testing.assert_close(merged, tuned, atol=1e-5, rtol=1e-4)
    assert (tuned - plain).abs().max() > 10 * (merged - tuned).abs().max()  # LoRA did change the output


@pytest.mark.parametrize(("n", "padded"), [(1, 1), (3, 4), (33, 64), (64, 64), (65, 128), (859, 896)])
def test_padded_rows(n, padded):
    assert experts_route.padded_rows(n, low_precision=True) == padded
    assert experts_route.padded_rows(n, low_precision=False) == n


def test_bf16_autocast_runs_expert_matmuls_in_bf16(monkeypatch):
    """transformers' grouped kernel stays fp32 under CPU autocast; this path does not."""
    model = tiny("mixtral")
    experts_policy.use_experts_kernel(model)
    dtypes, expert_weight = [], experts_kernel._Side.weight

    def spy(side, e):
        we = expert_weight(side, e)
        dtypes.append(we.dtype)
        return we

    monkeypatch.setattr(experts_kernel._Side, "weight", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch(model))
    # the weights of two projections per expert that received tokens, in every layer
    assert len(dtypes) >= 2 * len(describe(model).layers) and set(dtypes) == {torch.bfloat16}


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_bf16_pads_each_expert_to_few_shapes_without_changing_numbers(model_type, monkeypatch):
    """Under bf16 autocast every expert matmul gets a row count that is a multiple of 64, or a
    power of two below that (oneDNN then reuses its compiled kernels), and the padding changes
    neither outputs nor gradients (gpt_oss: biases, whose gradient must not count the padding)."""
    ref = tiny(model_type)
    fast = copy.deepcopy(ref)
    experts_policy.use_experts_kernel(ref)
    experts_policy.use_experts_kernel(fast)
    counts, padded_rows = [], experts_route.padded_rows

    def spy(n, low):
        counts.append(padded_rows(n, low))
        return counts[-1]

    ids = torch.randint(3, ref.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids}  # 512 (token, expert) pairs: counts above and below 64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(experts_route, "padded_rows", lambda n, low: spy(n, False))  # no padding
        ref_logits, ref_grads = loss_and_grads(ref, inputs)
        unpadded, counts[:] = list(counts), []
        monkeypatch.setattr(experts_route, "padded_rows", spy)
        logits, grads = loss_and_grads(fast, inputs)
    assert any(n & (n - 1) for n in unpadded)  # some count is not a power of two
    assert all(n % 64 == 0 or (n < 64 and n & (n - 1) == 0) for n in counts) and max(counts) > 64
    torch.testing.assert_close(logits, ref_logits, atol=1e-2, rtol=1e-2)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:  # bf16 rounding of the per-row partial sums, nothing more
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-3, rtol=2e-2, msg=name)


@pytest.mark.parametrize(("model_type", "variant"), [("mixtral", "full"), ("gpt_oss", "full"), ("mixtral", "lora"),
                                                   ("gpt_oss", "lora"), ("mixtral", "bf16 weights")])
def test_bf16_runs_each_expert_in_pieces_of_few_shapes_without_changing_numbers(model_type, variant, monkeypatch):
    """Under bf16 an expert's rows go through its matmuls in pieces of at most ROW_PIECE rows
    (here 64, against 128-192 rows an expert): the forward's pieces are independent rows, and
    the backward adds each piece's part of the weight's, the bias's (gpt_oss) and LoRA's
    gradients to the first piece's, in the fp32 gradient of fp32 weights, or in place where the
    weights and the compute are both bf16."""
    ref = tiny(model_type)
    if variant == "lora":
        ref = lora_experts(ref)
        randomize_lora(ref)
    if variant == "bf16 weights":
        ref = ref.to(torch.bfloat16)
    fast = copy.deepcopy(ref)
    for model in (ref, fast):
        experts_policy.use_experts_kernel(model.get_base_model() if variant == "lora" else model)
        if variant == "lora":
            experts_policy.route_lora_through(model)
    rows, side_forward, side_backward = [], experts_kernel._Side.forward, experts_kernel._Side.backward

    def forward(self, x, *args):
        rows.append(x.shape[0])
        return side_forward(self, x, *args)

    def backward(self, g, *args):
        rows.append(g.shape[0])
        return side_backward(self, g, *args)

    monkeypatch.setattr(experts_kernel._Side, "forward", forward)
    monkeypatch.setattr(experts_kernel._Side, "backward", backward)
    ids = torch.randint(3, ref.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids}  # 512 (token, expert) pairs over 4 experts a layer
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant != "bf16 weights"):
        monkeypatch.setattr(experts_route, "ROW_PIECE", 10**9)
        ref_logits, ref_grads = loss_and_grads(ref, inputs)
        whole, rows[:] = list(rows), []
        monkeypatch.setattr(experts_route, "ROW_PIECE", 64)
        logits, grads = loss_and_grads(fast, inputs)
    assert max(whole) > 64 and max(rows) == 64 and len(rows) > len(whole)
    torch.testing.assert_close(logits, ref_logits, atol=1e-2, rtol=1e-2)
    assert grads.keys() == ref_grads.keys() and any(".experts." in n for n in grads)
    for name in ref_grads:  # bf16 rounding of each piece's partial sums (0.2-0.3% here), nothing more
        ref_grad = ref_grads[name].float()
        assert (grads[name].float() - ref_grad).norm() <= 1e-2 * ref_grad.norm(), name


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_cast_on_use_keeps_no_weight_copy_and_the_same_numbers(model_type):
    """With activation checkpointing (cast_on_use) each expert's weight is cast when used, in
    forward and backward: bit-for-bit the numbers of casting the whole tensor once, and autograd
    keeps the parameter itself rather than a bf16 copy of it."""
    ref = tiny(model_type)
    fast = copy.deepcopy(ref)
    for model in (ref, fast):
        experts_policy.use_experts_kernel(model)
    arch = describe(fast)
    modules = arch.expert_modules
    experts_policy.cast_on_use(fast, modules, True)
    expert_weights = {fast.get_parameter(n).data_ptr() for n in arch.expert_params}
    saved = []

    def pack(t):
        saved.append((t.dtype, t.shape, t.data_ptr()))
        return t

    inputs = batch(ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logits, ref_grads = loss_and_grads(ref, inputs)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits, grads = loss_and_grads(fast, inputs)
    assert torch.equal(logits, ref_logits)
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    expert_shapes = {fast.get_parameter(n).shape for n in arch.expert_params}
    assert not [s for s in saved if s[0] == torch.bfloat16 and s[1] in expert_shapes]  # no bf16 copy
    assert {s[2] for s in saved} & expert_weights  # the fp32 parameters themselves


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora_experts"])
def test_cuda_grouped_kernel_matches(model_type, lora, monkeypatch):
    """On a GPU the grouped kernel itself runs (not the CPU stand-in above), in fp32 without TF32
    so that differences are the kernel's, against transformers' default CUDA path and PEFT."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ref = tiny(model_type)
    if lora:
        ref = lora_experts(ref)
        randomize_lora(ref)
    ref = ref.cuda()
    fast = copy.deepcopy(ref)
    assert experts_policy.use_experts_kernel(fast.get_base_model() if lora else fast)
    if lora:
        assert experts_policy.route_lora_through(fast) == len(describe(fast.get_base_model()).layers)
    inputs = {k: v.cuda() for k, v in batch(ref).items()}
    assert_same_numbers(ref, fast, inputs, atol=1e-4, rtol=1e-3, grad_rtol=1e-2)


def test_lora_really_goes_through_the_grouped_inputs():
    """``route_lora_through`` is moe_tune's one reach into PEFT's internals: it rebinds the
    forward of PEFT's ParamWrapper and reads its LoRA factors. PEFT's own path parametrizes the
    experts' weight (rebuilding W + BA) while the experts run; the rerouted path must not. If
    PEFT changes underneath, the rerouting count or this check fails loudly."""
    from torch.nn.utils import parametrize

    model = lora_experts(tiny("mixtral"))
    experts_policy.use_experts_kernel(model.get_base_model())
    seen = []
    for module in model.modules():
        if getattr(module, "gate_up_proj", None) is not None and not hasattr(module, "base_layer"):
            module.register_forward_pre_hook(lambda m, args: seen.append(parametrize.is_parametrized(m)))
    with torch.no_grad():
        model(**batch(model))  # PEFT's path: the weight is parametrized while the experts run
        assert seen and all(seen)
        seen.clear()
        assert experts_policy.route_lora_through(model) == len(describe(model.get_base_model()).layers)
        model(**batch(model))
    assert seen and not any(seen)


def _mapping_of(address: int) -> dict[str, int] | None:
    """The /proc/self/smaps fields (kB) of the mapping that holds ``address``, or None."""
    fields, inside = {}, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            if inside:
                return fields
            start, end = (int(a, 16) for a in head.split("-"))
            inside = start <= address < end
        elif inside and line.split()[-1] == "kB":
            fields[head.rstrip(":")] = int(line.split()[1])
    return fields if inside else None


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads Linux's /proc/self/smaps")
def _wide_experts_model():
    """A 1-layer Mixtral whose gate_up_proj (4, 2048, 1024) is 32 MiB in fp32, with moe_tune's kernel."""
    from transformers import MixtralConfig

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=1024, intermediate_size=1024, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(config).float()
    experts_policy.use_experts_kernel(model)
    return model


def test_whole_expert_gradients_and_copies_get_huge_pages_and_the_same_numbers(monkeypatch):
    """Full fine-tuning's per-step (E, out, in) tensors (the bf16 copy of each experts weight, the
    fp32 gradient) at least glibc's mmap threshold get their own huge-page mapping (where THP is
    in madvise mode, as here): the gradient is the very tensor the parameter keeps (autograd takes
    it over rather than copying it), its numbers are those of plain torch.empty, the next step's
    gradient reuses its mapping, and the mapping goes when training gives the buffers back."""
    import gc

    model = _wide_experts_model()
    weight = model.model.layers[0].mlp.experts.gate_up_proj  # (4, 2048, 1024): 32 MiB in fp32
    assert weight.numel() * 2 >= step_memory.TRAIN_MMAP_THRESHOLD  # its bf16 copy too
    inputs = batch(model)

    def step():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**inputs).loss.backward()
        return weight.grad

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    madvise = thp.is_file() and "[madvise]" in thp.read_text()  # huge pages only where asked for
    monkeypatch.setattr(step_memory, "TRAIN_MMAP_THRESHOLD", 1 << 62)  # plain torch.empty throughout
    plain = step()
    if madvise:
        assert _mapping_of(plain.data_ptr())["AnonHugePages"] == 0
    plain = plain.clone()
    monkeypatch.undo()
    grad = step()
    assert torch.equal(grad, plain)
    if madvise:  # a clone taken by autograd would be glibc's, without huge pages
        assert _mapping_of(grad.data_ptr())["AnonHugePages"] > 0
    address = grad.data_ptr()
    del grad
    assert torch.equal(step(), plain)  # the next step's gradient reuses the mapping, once it is free
    assert weight.grad.data_ptr() == address
    model.zero_grad()
    step_memory.release_kept(model)  # as training ends
    gc.collect()
    assert _mapping_of(address) is None  # unmapped with the gradient


def test_a_gradient_still_held_is_not_written_over():
    """Gradient accumulation keeps the first micro-batch's gradient while the second's backward
    runs: the second gets new pages, and the sum is that of two independent backward passes."""
    model = _wide_experts_model()
    weight = model.model.layers[0].mlp.experts.gate_up_proj  # 32 MiB: above the mmap threshold
    assert weight.numel() * 4 >= step_memory.TRAIN_MMAP_THRESHOLD
    first, second = batch(model, seed=1), batch(model, seed=2)
    apart = [loss_and_grads(model, inputs)[1]["model.layers.0.mlp.experts.gate_up_proj"] for inputs in (first, second)]
    model.zero_grad()
    model(**first).loss.backward()
    model(**second).loss.backward()  # accumulates into the gradient the first pass made
    torch.testing.assert_close(weight.grad, apart[0] + apart[1])
    model.zero_grad()
    model(**second).loss.backward()  # after zero_grad: the kept pages again, written afresh
    torch.testing.assert_close(weight.grad, apart[1])


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_post_expert_norm_between_experts_and_routing_weights(autocast):
    """An experts module with a norm after the experts (MuseSpark's) runs the loop without its
    routing step, then the norm, weighting and sum: the numbers and gradients of transformers'
    kernel, the norm's weight and the routing weights included (and under bf16 autocast, within
    bf16's rounding of them)."""
    from transformers.integrations.moe import grouped_mm_experts_forward
    from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig
    from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts

    torch.manual_seed(0)
    config = MuseSparkTextConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                 moe_hidden_size=32, moe_intermediate_size=16,
                                 num_local_experts=4, num_experts_per_tok=2)
    ref = MuseSparkExperts(config).float()
    for p in ref.parameters():
        p.data.normal_(0, 0.3)
    assert ref.has_post_expert_norm
    fast = copy.deepcopy(ref)
    x = torch.randn(10, 32, requires_grad=True)
    index = torch.randint(0, 4, (10, 2))
    index[:, 1] = (index[:, 0] + 1) % 4
    weights = torch.rand(10, 2, requires_grad=True)

    def run(module, forward):
        module.zero_grad()
        x.grad = weights.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = forward(module, x, index, weights)
        (y.float() ** 2).sum().backward()
        return y.detach(), {"x": x.grad, "weights": weights.grad,
                            **{n: p.grad for n, p in module.named_parameters()}}

    ref_y, ref_grads = run(ref, grouped_mm_experts_forward)
    y, grads = run(fast, experts_kernel.experts_forward)
    assert grads.keys() == ref_grads.keys()
    if not autocast:
        torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-4)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
        return
    # transformers' kernel ignores CPU autocast (fp32); this loop runs bf16: bf16's rounding apart
    for name, got, want in [("y", y, ref_y), *((n, grads[n], ref_grads[n]) for n in ref_grads)]:
        assert ((got.float() - want).norm() / want.norm()).item() < 2e-2, name


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "checkpointing"])
def test_activation_buffers_are_kept_between_steps_except_under_checkpointing(monkeypatch, checkpointing):
    """Without activation checkpointing each layer keeps its activation buffers' mappings for the
    next step; with it (cast_on_use) they would hold every layer's at once, so only the
    gradients' are kept."""
    monkeypatch.setattr(step_memory, "TRAIN_MMAP_THRESHOLD", 0)  # every buffer its own mapping
    model = _wide_experts_model()
    experts = model.model.layers[0].mlp.experts
    experts_policy.cast_on_use(model, ["model.layers.0.mlp.experts"], checkpointing)
    model(**batch(model)).loss.backward()
    kept = set(step_memory._KEPT.get(experts, {}))
    assert {"up gradient", "down gradient"} <= kept
    assert ("up output" in kept) is not checkpointing
    step_memory.release_kept(model)
    assert experts not in step_memory._KEPT

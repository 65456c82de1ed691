"""Train the tokenizer and pretrain the tiny Mixtral-family MoE that ships in data/tiny-moe.

    python scripts/make_data.py && python scripts/pretrain_base.py     # about 10 minutes on 2 CPU cores

The model learns the facts of ``data/corpus.txt`` (plain sentences, no chat format) by
ordinary next-token prediction with Mixtral's load-balancing loss, so that every expert
gets used. It never sees the chat tokens: instruction tuning has to teach the format, and
can draw on the facts it already knows. Fixed seeds, fixed step count, one thread count:
rerunning the script rebuilds the same checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
SEED = 1234
VOCAB_SIZE = 1536
SPECIAL = {"pad": "<|pad|>", "bos": "<|bos|>", "user": "<|user|>", "assistant": "<|assistant|>",
           "end": "<|end|>"}
# The assistant turn starts with a space so that answers are tokenized as in the corpus,
# where they follow a space ("is Velm." -> "ĠVelm"). {% generation %} marks the tokens that
# TRL's assistant_only_loss trains on.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>"
    "{% generation %} {{ message['content'] }}<|end|>{% endgeneration %}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# 4 layers x 8 experts (top-2) at hidden 128: ~3.5M parameters, ~11k tokens/s training on 2 cores.
MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
             max_position_embeddings=256, router_aux_loss_coef=0.01, tie_word_embeddings=True)
SEQ_LEN = 128
BATCH = 32  # 32 seqs x 128 tokens = 4096 tokens/step
STEPS = 1600  # ~11 epochs of the corpus
LR = 3e-3


def train_tokenizer(corpus: str, instructions: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus, *instructions], trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIAL["pad"], bos_token=SPECIAL["bos"],
                                 eos_token=SPECIAL["end"])
    hf.chat_template = CHAT_TEMPLATE
    return hf


def packed_batches(ids: list[int], bos: int, rng: random.Random):
    """Yield (BATCH, SEQ_LEN) blocks of the token stream from random offsets, each after a BOS."""
    block = SEQ_LEN - 1
    n_blocks = len(ids) // block
    while True:
        starts = [rng.randrange(n_blocks) * block + rng.randrange(block) for _ in range(BATCH)]
        rows = [[bos] + ids[s:s + block] for s in starts]
        rows = [r + [bos] * (SEQ_LEN - len(r)) for r in rows]
        yield torch.tensor(rows)


def pretrain(tokenizer: PreTrainedTokenizerFast, corpus: str, steps: int) -> MixtralForCausalLM:
    torch.manual_seed(SEED)
    config = MixtralConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           output_router_logits=True, **MODEL)
    model = MixtralForCausalLM(config)
    ids = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    print(f"corpus: {len(ids):,} tokens; model: {sum(p.numel() for p in model.parameters()):,} params")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup) *
                                              0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    batches = packed_batches(ids, tokenizer.bos_token_id, random.Random(SEED))
    model.train()
    t0 = time.time()
    for step in range(steps):
        x = next(batches)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {out.loss.item():.3f}  aux {out.aux_loss.item():.3f}  "
                  f"{time.time() - t0:.0f}s", flush=True)
    model.config.output_router_logits = False
    return model.eval()


@torch.no_grad()
def knowledge_check(model, tokenizer) -> float:
    """Plain-text completion of corpus facts ("The capital of X is") over every country."""
    import make_data  # noqa: PLC0415  (sibling script, on sys.path when run as a script)

    world = make_data.World(random.Random(make_data.SEED))
    hits = 0
    for c in world.countries:
        prompt = tokenizer(f"The capital of {c.name} is", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += text.strip().startswith(c.capital)
    return hits / len(world.countries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "tiny-moe")
    ap.add_argument("--steps", type=int, default=STEPS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    random.seed(SEED)
    corpus = (args.data / "corpus.txt").read_text()
    train_rows = [json.loads(line) for line in open(args.data / "train.jsonl")]
    questions = [m["content"] for r in train_rows for m in r["messages"]]
    tokenizer = train_tokenizer(corpus, questions)
    model = pretrain(tokenizer, corpus, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved {args.out}; plain-text capital check: {knowledge_check(model, tokenizer):.0%}")


if __name__ == "__main__":
    main()

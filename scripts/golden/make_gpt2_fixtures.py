#!/usr/bin/env python3
"""Generate the GPT-2 parity fixtures lmtrain's tests compare against (needs torch + transformers).

For each configuration below, writes OUT/<name>/:
  config.json, model.safetensors  the random model as `save_pretrained` writes it (tied lm_head
                                  omitted from the file, as Hugging Face does)
  golden.safetensors              input_ids, labels (int64), loss (shape [1]), logits [B, T, V] and
                                  grad.<parameter name> for every parameter (float32)
  adamw10.json                    10 steps of torch.optim.AdamW (two groups: weight decay 0.1 on
                                  weights, none on biases / LayerNorm weights), linear schedule with
                                  2 warmup steps, clip_grad_norm_(1.0), the same batch every step:
                                  "losses" = loss before each step, "final_loss" = after the last

Everything runs in float32 on the CPU, eager attention, dropout 0, deterministic algorithms.

usage: HF_HUB_OFFLINE=1 python3 scripts/golden/make_gpt2_fixtures.py [OUT_DIR]
       (default crates/model/tests/fixtures; run from the repository root; ~10 s)
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup  # noqa: E402

OUT = sys.argv[1] if len(sys.argv) > 1 else "crates/model/tests/fixtures"

# name -> (config overrides, batch size, sequence length, ignored label positions [(row, col)])
CONFIGS = {
    # power-of-two sizes
    "gpt2_tiny": (dict(vocab_size=128, n_positions=16, n_embd=32, n_layer=2, n_head=4), 2, 16,
                  [(1, 13), (1, 14), (1, 15)]),
    # odd sizes: width 48 over 3 heads, vocabulary 101, T = 13, ignored labels inside rows too
    "gpt2_odd": (dict(vocab_size=101, n_positions=20, n_embd=48, n_layer=2, n_head=3), 3, 13,
                 [(0, 4), (1, 0), (1, 11), (1, 12), (2, 7), (2, 8)]),
    # vocabulary wider than the CPU backend's output-head chunk (1024), exact-erf GELU
    "gpt2_wide_vocab_erf": (dict(vocab_size=1100, n_positions=8, n_embd=20, n_layer=1, n_head=2,
                                 activation_function="gelu"), 2, 7, [(0, 3)]),
}

ADAMW = dict(lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.1, warmup_steps=2,
             total_steps=10, max_grad_norm=1.0, schedule="linear")


def build(name):
    overrides, b, t, ignored = CONFIGS[name]
    seed = sum(map(ord, name))
    torch.manual_seed(seed)
    cfg = GPT2Config(**overrides, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=overrides["vocab_size"] - 1, eos_token_id=overrides["vocab_size"] - 1)
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg)
    # the default init leaves biases at 0 and LayerNorm at (1, 0): perturb them so the test also
    # checks that biases and LayerNorm parameters enter the computation where they should
    with torch.no_grad():
        for pn, p in model.named_parameters():
            if pn.endswith("bias") or ".ln_" in pn:
                p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    labels = ids.clone()
    for r, c in ignored:
        labels[r, c] = -100
    return model, ids, labels


def decay_groups(model):
    decay, no_decay = [], []
    for pn, p in model.named_parameters():
        (no_decay if pn.endswith("bias") or ".ln_" in pn else decay).append(p)
    return [dict(params=decay, weight_decay=ADAMW["weight_decay"]), dict(params=no_decay, weight_decay=0.0)]


def run(name):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    model, ids, labels = build(name)
    model.save_pretrained(d)
    model.eval()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    golden = dict(input_ids=ids.contiguous(), labels=labels.contiguous(),
                  loss=out.loss.detach().reshape(1), logits=out.logits.detach().contiguous())
    for pn, p in model.named_parameters():  # lm_head.weight is tied: its gradient is in wte's
        golden["grad." + pn] = p.grad.detach().contiguous()
    save_file(golden, os.path.join(d, "golden.safetensors"))

    # AdamW trajectory from the saved weights
    model = GPT2LMHeadModel.from_pretrained(d, attn_implementation="eager")
    model.train()  # dropout is 0: train mode only matters for the semantics, not the numbers
    opt = torch.optim.AdamW(decay_groups(model), lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]), eps=ADAMW["eps"])
    sched = get_linear_schedule_with_warmup(opt, ADAMW["warmup_steps"], ADAMW["total_steps"])
    losses = []
    for _ in range(ADAMW["total_steps"]):
        loss = model(input_ids=ids, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ADAMW["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad()
    with torch.no_grad():
        final = model(input_ids=ids, labels=labels).loss.item()
    with open(os.path.join(d, "adamw10.json"), "w") as fh:
        json.dump(dict(ADAMW, losses=losses, final_loss=final), fh, indent=1)
    print(f"{name}: loss {out.loss.item():.6f}, adamw losses {losses[0]:.5f} -> {final:.5f}, "
          f"{sum(p.numel() for p in model.parameters())} parameters -> {d}")


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print("torch", torch.__version__)
    for n in CONFIGS:
        run(n)

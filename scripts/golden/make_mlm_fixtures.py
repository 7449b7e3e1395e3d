#!/usr/bin/env python3
"""Generate the masked-LM parity fixtures (BERT, DistilBERT, RoBERTa, DeBERTa-v2) lmtrain's tests
compare against (needs torch + transformers; the spec for the Rust side is
crates/model/tests/fixtures/MLM_FIXTURES.md).

For each configuration below, writes OUT/<name>/:
  config.json, model.safetensors  the random model as `save_pretrained` writes it (tied decoder
                                  weight / bias left out of the file, as Hugging Face does)
  golden.safetensors              input_ids, attention_mask, labels (int64), token_type_ids (BERT),
                                  position_ids (RoBERTa, as HF computes them from input_ids),
                                  relative_pos (DeBERTa with relative attention, the bucketed
                                  [T, T] relative positions),
                                  loss (shape [1]), logits [B, T, V] (every position, padding too)
                                  and grad.<parameter name> for every parameter (float32); the
                                  gradient of a tied pair is stored once, under the name
                                  `named_parameters()` gives (the embedding / the head's `bias`);
                                  the file's metadata holds "tied" (JSON: alias -> stored name)
  adamw10.json                    10 steps of torch.optim.AdamW (two groups: weight decay 0.1, and
                                  none on biases / LayerNorm parameters as the HF Trainer, listed
                                  in "no_decay"), linear schedule with 2 warmup steps,
                                  clip_grad_norm_(1.0), the same batch every step: "losses" = loss
                                  before each step, "final_loss" = after the last

Everything runs in float32 on the CPU, eager attention, dropout 0, deterministic algorithms;
reruns give byte-identical files.

usage: HF_HUB_OFFLINE=1 python3 scripts/golden/make_mlm_fixtures.py [OUT_DIR]
       (default crates/model/tests/fixtures; run from the repository root; ~15 s)
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
    Trainer,
    get_linear_schedule_with_warmup,
)

OUT = sys.argv[1] if len(sys.argv) > 1 else "crates/model/tests/fixtures"

# Every fixture: family, config overrides, special ids, row lengths (len(rows) = batch size,
# max = T; shorter rows are padded: "right" or "left"), label probability among the real
# non-special tokens. Dropout is set to 0 below.
CONFIGS = {
    # odd sizes: width 36 over 3 heads, vocabulary 203, T = 13, intermediate 60, erf GELU,
    # sentence pairs (token types 0 and 1), two padded rows
    "bert_odd": dict(
        family="bert",
        config=dict(vocab_size=203, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                    intermediate_size=60, max_position_embeddings=16, type_vocab_size=2, hidden_act="gelu",
                    pad_token_id=0),
        special=dict(pad=0, cls=1, sep=2, mask=3), rows=[13, 9, 11], pad_side="right", label_p=0.25,
        pairs=True),
    # tanh GELU (`gelu_new`) in the intermediate layer and the head transform, LayerNorm eps 1e-5
    # from the config, power-of-two sizes, one layer
    "bert_tiny_tanh": dict(
        family="bert",
        config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=16, type_vocab_size=2, hidden_act="gelu_new",
                    layer_norm_eps=1e-5, pad_token_id=0),
        special=dict(pad=0, cls=1, sep=2, mask=3), rows=[16, 12], pad_side="right", label_p=0.2, pairs=True),
    # DistilBERT, learned positions, odd sizes, padding
    "distilbert_odd": dict(
        family="distilbert",
        config=dict(vocab_size=203, dim=36, n_layers=2, n_heads=3, hidden_dim=60, max_position_embeddings=16,
                    activation="gelu", pad_token_id=0),
        special=dict(pad=0, cls=1, sep=2, mask=3), rows=[13, 10, 13], pad_side="right", label_p=0.25),
    # DistilBERT, sinusoidal positions, a vocabulary wider than one output-head chunk (512)
    "distilbert_sinusoidal": dict(
        family="distilbert",
        config=dict(vocab_size=700, dim=24, n_layers=1, n_heads=2, hidden_dim=40, max_position_embeddings=12,
                    sinusoidal_pos_embds=True, activation="gelu", pad_token_id=0),
        special=dict(pad=0, cls=1, sep=2, mask=3), rows=[9, 6], pad_side="right", label_p=0.25),
    # RoBERTa: padding_idx 1, positions from the input ids (a right-padded and a left-padded row)
    "roberta_odd": dict(
        family="roberta",
        config=dict(vocab_size=203, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                    intermediate_size=60, max_position_embeddings=13 + 2 + 1, type_vocab_size=1,
                    hidden_act="gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5),
        special=dict(pad=1, cls=0, sep=2, mask=202), rows=[13, 8, 10], pad_side=["right", "left", "right"],
        label_p=0.25),
    # DeBERTa-v2, odd sizes, padding, c2p + p2c, position_buckets 6 < T = 13 (log buckets),
    # shared attention keys, LayerNorm on the relative embeddings, legacy MLM head (default)
    "deberta_v2_odd": dict(
        family="deberta-v2",
        config=dict(vocab_size=203, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                    intermediate_size=60, max_position_embeddings=16, type_vocab_size=0, hidden_act="gelu",
                    relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=6,
                    max_relative_positions=20, share_att_key=True, norm_rel_ebd="layer_norm",
                    position_biased_input=False, layer_norm_eps=1e-7, pad_token_id=0, legacy=True),
        special=dict(pad=0, cls=1, sep=2, mask=3), rows=[13, 9, 11], pad_side="right", label_p=0.25),
    # DeBERTa-v2, c2p only, position_buckets 24 > 2 T (|i - j| <= 10 < 24 / 2: no log bucketing),
    # max_relative_positions -1 (falls back to max_position_embeddings), separate pos_key_proj,
    # new (non-legacy) MLM head, tanh GELU
    "deberta_v2_c2p_new_head": dict(
        family="deberta-v2",
        config=dict(vocab_size=150, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=40, max_position_embeddings=16, type_vocab_size=0, hidden_act="gelu_new",
                    relative_attention=True, pos_att_type=["c2p"], position_buckets=24,
                    max_relative_positions=-1, share_att_key=False, norm_rel_ebd="layer_norm",
                    position_biased_input=False, layer_norm_eps=1e-7, pad_token_id=0, legacy=False),
        special=dict(pad=0, cls=1, sep=2, mask=3), rows=[11, 7], pad_side="right", label_p=0.3),
    # DeBERTa-v2, p2c only, no buckets (position_buckets -1: plain clamped relative positions
    # with max_relative_positions 8 < T), separate pos_query_proj, embedding_size 16 != hidden 24
    # (embed_proj), absolute positions added (position_biased_input), token types, the conv layer
    # after the first layer (conv_kernel_size 3), legacy head, no LayerNorm on relative embeddings
    "deberta_v2_p2c_conv": dict(
        family="deberta-v2",
        config=dict(vocab_size=150, hidden_size=24, embedding_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=40, max_position_embeddings=16, type_vocab_size=2,
                    hidden_act="gelu", relative_attention=True, pos_att_type=["p2c"], position_buckets=-1,
                    max_relative_positions=8, share_att_key=False, norm_rel_ebd="none",
                    position_biased_input=True, conv_kernel_size=3, conv_act="gelu", layer_norm_eps=1e-7,
                    pad_token_id=0, legacy=True),
        special=dict(pad=0, cls=1, sep=2, mask=3), rows=[10, 7], pad_side="right", label_p=0.3, pairs=True),
    # DeBERTa-v2, the convolution layer with its default activation (conv_act tanh), c2p + p2c
    # with shared attention keys and embed_proj, 4 log buckets (< T) over max_position_embeddings
    # (max_relative_positions -1), no LayerNorm on the relative embeddings
    "deberta_v2_tanh_conv": dict(
        family="deberta-v2",
        config=dict(vocab_size=150, hidden_size=24, embedding_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=40, max_position_embeddings=16, type_vocab_size=2,
                    hidden_act="gelu", relative_attention=True, pos_att_type=["c2p", "p2c"], position_buckets=4,
                    max_relative_positions=-1, share_att_key=True, norm_rel_ebd="none",
                    position_biased_input=True, conv_kernel_size=3, conv_act="tanh", layer_norm_eps=1e-7,
                    pad_token_id=0, legacy=True),
        special=dict(pad=0, cls=1, sep=2, mask=3), rows=[10, 7], pad_side="right", label_p=0.3, pairs=True),
    # DeBERTa-v2 without relative attention: absolute positions only, but pos_att_type ["c2p"]
    # still counts in the scale (sqrt(2 d)), and norm_rel_ebd "layer_norm" still declares the
    # (then unused) encoder.LayerNorm
    "deberta_v2_absolute": dict(
        family="deberta-v2",
        config=dict(vocab_size=203, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                    intermediate_size=60, max_position_embeddings=16, type_vocab_size=0, hidden_act="gelu",
                    relative_attention=False, pos_att_type=["c2p"], norm_rel_ebd="layer_norm",
                    position_biased_input=True, layer_norm_eps=1e-7, pad_token_id=0, legacy=True),
        special=dict(pad=0, cls=1, sep=2, mask=3), rows=[13, 9, 11], pad_side="right", label_p=0.25),
}

# attention weights scaled up after init (see build)
SHARPEN = ("query.weight", "key.weight", "q_lin.weight", "k_lin.weight", "query_proj.weight", "key_proj.weight",
           "pos_key_proj.weight", "pos_query_proj.weight", "rel_embeddings.weight")

ADAMW = dict(lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.1, warmup_steps=2,
             total_steps=10, max_grad_norm=1.0, schedule="linear")

FAMILIES = {
    "bert": (BertConfig, BertForMaskedLM, dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    "distilbert": (DistilBertConfig, DistilBertForMaskedLM, dict(dropout=0.0, attention_dropout=0.0)),
    "roberta": (RobertaConfig, RobertaForMaskedLM, dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    "deberta-v2": (DebertaV2Config, DebertaV2ForMaskedLM,
                   dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pooler_dropout=0.0)),
}


def tied_aliases(model):
    """alias -> the name named_parameters() reports, for every parameter shared by two names"""
    first, aliases = {}, {}
    for pn, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[pn] = first[id(p)]
        else:
            first[id(p)] = pn
    return aliases


def no_decay_names(model):
    """the HF Trainer's rule (Trainer.get_decay_parameter_names): no weight decay on parameters of
    LayerNorm modules and on names containing "bias" / "layernorm" / "_norm." ..."""
    ln = set()
    for mn, m in model.named_modules():
        if isinstance(m, torch.nn.LayerNorm):
            for pn, _ in m.named_parameters(recurse=False):
                ln.add(f"{mn}.{pn}" if mn else pn)
    ours = [pn for pn, _ in model.named_parameters() if pn in ln or pn.endswith("bias")]
    decay = set(Trainer.get_decay_parameter_names(None, model))
    theirs = [pn for pn, _ in model.named_parameters() if pn not in decay]
    assert ours == theirs, (ours, theirs)
    return ours


def batch(name, spec, cfg, gen):
    """input_ids / attention_mask / token_type_ids / labels for one fixture"""
    sp = spec["special"]
    rows = spec["rows"]
    t = max(rows)
    b = len(rows)
    sides = spec["pad_side"] if isinstance(spec["pad_side"], list) else [spec["pad_side"]] * b
    # ordinary tokens: above the low special ids, below a mask id at the top (RoBERTa)
    lo = max(v for v in sp.values() if v < 10) + 1
    hi = min([v for v in sp.values() if v >= 10] + [cfg.vocab_size])
    ids = torch.full((b, t), sp["pad"], dtype=torch.long)
    att = torch.zeros((b, t), dtype=torch.long)
    tt = torch.zeros((b, t), dtype=torch.long)
    special_pos = torch.zeros((b, t), dtype=torch.bool)
    for r, n in enumerate(rows):
        body = torch.randint(lo, hi, (n,), generator=gen)
        body[0] = sp["cls"]
        body[n - 1] = sp["sep"]
        types = torch.zeros(n, dtype=torch.long)
        spec_mask = torch.zeros(n, dtype=torch.bool)
        spec_mask[0] = spec_mask[n - 1] = True
        if spec.get("pairs"):
            mid = n // 2
            body[mid] = sp["sep"]
            spec_mask[mid] = True
            types[mid + 1:] = 1
        lo = 0 if sides[r] == "right" else t - n
        ids[r, lo:lo + n] = body
        att[r, lo:lo + n] = 1
        tt[r, lo:lo + n] = types
        special_pos[r, lo:lo + n] = spec_mask
    # choose labels among the real, non-special tokens; at least two per row
    eligible = (att == 1) & ~special_pos
    chosen = (torch.rand((b, t), generator=gen) < spec["label_p"]) & eligible
    for r in range(b):
        cand = eligible[r].nonzero().flatten()
        for c in cand[:2] if chosen[r].sum() < 2 else []:
            chosen[r, c] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    # 80% mask, 10% random, 10% unchanged (DataCollatorForLanguageModeling's split)
    u = torch.rand((b, t), generator=gen)
    rnd = torch.randint(lo, hi, (b, t), generator=gen)
    inputs = ids.clone()
    inputs[chosen & (u < 0.8)] = sp["mask"]
    sel = chosen & (u >= 0.8) & (u < 0.9)
    inputs[sel] = rnd[sel]
    assert (labels == -100).float().mean() > 0.5, f"{name}: most labels are ignored"
    return inputs, att, tt, labels


def build(name):
    spec = CONFIGS[name]
    cfg_cls, model_cls, dropout = FAMILIES[spec["family"]]
    seed = sum(map(ord, name))
    torch.manual_seed(seed)
    cfg = cfg_cls(**spec["config"], **dropout)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg)
    # the default init leaves biases at 0 and LayerNorm at (1, 0): perturb them so the test also
    # checks that biases and LayerNorm parameters enter the computation where they should
    # the default init (std 0.02) also leaves attention almost uniform, which hides errors in
    # the attention backward: query / key (and relative-position) weights get std ~0.2 so the
    # probabilities are far from uniform
    with torch.no_grad():
        ln = set(no_decay_names(model))
        for pn, p in model.named_parameters():
            if pn in ln:
                p.add_(torch.randn_like(p) * 0.05)
            elif pn.endswith(SHARPEN):
                p.mul_(10.0)
    gen = torch.Generator().manual_seed(seed)
    return spec, cfg, model, batch(name, spec, cfg, gen)


def forward(spec, model, inputs, att, tt, labels):
    kw = dict(input_ids=inputs, attention_mask=att, labels=labels)
    if spec["family"] == "bert" or (spec["family"] == "deberta-v2" and model.config.type_vocab_size > 0):
        kw["token_type_ids"] = tt
    return model(**kw)


def run(name):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    spec, cfg, model, (inputs, att, tt, labels) = build(name)
    aliases = tied_aliases(model)
    model.save_pretrained(d)
    model.eval()
    out = forward(spec, model, inputs, att, tt, labels)
    out.loss.backward()
    golden = dict(input_ids=inputs.contiguous(), attention_mask=att.contiguous(), labels=labels.contiguous(),
                  loss=out.loss.detach().reshape(1), logits=out.logits.detach().contiguous())
    if spec["family"] == "bert" or (spec["family"] == "deberta-v2" and cfg.type_vocab_size > 0):
        golden["token_type_ids"] = tt.contiguous()
    if spec["family"] == "roberta":
        golden["position_ids"] = model.roberta.embeddings.create_position_ids_from_input_ids(
            inputs, cfg.pad_token_id).contiguous()
    if spec["family"] == "deberta-v2" and cfg.relative_attention:
        enc = model.deberta.encoder
        h = torch.zeros(1, inputs.shape[1], cfg.hidden_size)
        golden["relative_pos"] = enc.get_rel_pos(h)[0].contiguous()
    frozen = []
    for pn, p in model.named_parameters():
        if not p.requires_grad:
            frozen.append(pn)
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        golden["grad." + pn] = g.detach().contiguous()
    assert not frozen, f"{name}: frozen parameters {frozen}"
    save_file(golden, os.path.join(d, "golden.safetensors"), metadata=dict(tied=json.dumps(aliases, sort_keys=True)))

    # AdamW trajectory from the saved weights
    model = AutoModelForMaskedLM.from_pretrained(d, attn_implementation="eager")
    assert tied_aliases(model) == aliases, f"{name}: the reloaded model ties the same parameters"
    model.train()  # dropout is 0: train mode only matters for the semantics, not the numbers
    nd = set(no_decay_names(model))
    groups = [dict(params=[p for pn, p in model.named_parameters() if pn not in nd], weight_decay=ADAMW["weight_decay"]),
              dict(params=[p for pn, p in model.named_parameters() if pn in nd], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]), eps=ADAMW["eps"])
    sched = get_linear_schedule_with_warmup(opt, ADAMW["warmup_steps"], ADAMW["total_steps"])
    losses = []
    for _ in range(ADAMW["total_steps"]):
        loss = forward(spec, model, inputs, att, tt, labels).loss
        losses.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ADAMW["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad()
    with torch.no_grad():
        final = forward(spec, model, inputs, att, tt, labels).loss.item()
    with open(os.path.join(d, "adamw10.json"), "w") as fh:
        json.dump(dict(ADAMW, no_decay=sorted(nd), losses=losses, final_loss=final), fh, indent=1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name}: B x T {tuple(inputs.shape)}, {int((labels != -100).sum())} labels, loss {out.loss.item():.6f}, "
          f"adamw losses {losses[0]:.5f} -> {final:.5f}, {n_params} parameters, tied {aliases} -> {d}")


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    import transformers
    print("torch", torch.__version__, "transformers", transformers.__version__)
    names = sys.argv[2:] if len(sys.argv) > 2 else list(CONFIGS)
    for n in names:
        run(n)

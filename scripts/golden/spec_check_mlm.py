#!/usr/bin/env python3
"""Check crates/model/tests/fixtures/MLM_FIXTURES.md against the fixtures: a from-scratch
implementation of the four masked-LM families written from that document (plain torch ops, no
transformers modules) computes loss, logits and every parameter gradient (autograd) from each
fixture's config.json + model.safetensors + golden inputs and compares them with golden.safetensors
(same error norm as the Rust tests: max |ours - ref| / max |ref|; loss and logits <= 1e-5, gradients
<= 1e-4; gradients that are mathematically zero, see ZERO below, absolutely). If this passes, the document says enough to reproduce transformers' numbers.

usage: python3 scripts/golden/spec_check_mlm.py [FIXTURES_DIR]   (needs torch + safetensors only)
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

FIX = sys.argv[1] if len(sys.argv) > 1 else "crates/model/tests/fixtures"
MIN = torch.finfo(torch.float32).min
# a reference gradient whose largest entry is <= ZERO x the model's largest gradient entry is
# mathematically zero (key biases: adding q.b_k to a whole softmax row changes nothing); those are
# checked absolutely: largest entry of ours <= ZERO_TOL x the model's largest gradient entry
ZERO, ZERO_TOL = 1e-8, 1e-6


def act(kind):
    if kind == "gelu":
        return lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if kind == "gelu_new":
        return lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if kind == "tanh":
        return torch.tanh
    raise ValueError(kind)


class P:
    """parameters by HF name, as leaf tensors with gradients"""

    def __init__(self, path):
        self.t = {k: v.clone().requires_grad_(True) for k, v in load_file(path).items()}

    def __getitem__(self, k):
        return self.t[k]

    def has(self, k):
        return k in self.t

    def lin(self, x, name, bias=True):
        y = x @ self.t[name + ".weight"].T
        return y + self.t[name + ".bias"] if bias else y

    def ln(self, x, name, eps):
        return F.layer_norm(x, (x.shape[-1],), self.t[name + ".weight"], self.t[name + ".bias"], eps)


def lookup(w, ids, padding_idx):
    """embedding rows; no gradient for tokens whose id is padding_idx"""
    e = w[ids]
    if padding_idx is None:
        return e
    return torch.where((ids == padding_idx)[..., None], e.detach(), e)


def heads(x, h):
    b, t, c = x.shape
    return x.view(b, t, h, c // h).transpose(1, 2)  # [B, h, T, d]


def merge(x):
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def std_attention(p, x, key_add, h, q, k, v):
    qh, kh, vh = heads(p.lin(x, q), h), heads(p.lin(x, k), h), heads(p.lin(x, v), h)
    d = qh.shape[-1]
    s = (qh @ kh.transpose(-1, -2)) * d ** -0.5 + key_add[:, None, None, :]
    return merge(torch.softmax(s, -1) @ vh)


def key_mask_add(att):
    return torch.where(att == 0, torch.tensor(MIN), torch.tensor(0.0))


def bert_like(cfg, p, g, pre, roberta):
    ids, att = g["input_ids"], g["attention_mask"]
    b, t = ids.shape
    eps, h, a = cfg["layer_norm_eps"], cfg["num_attention_heads"], act(cfg["hidden_act"])
    pad = cfg["pad_token_id"]
    if roberta:
        nonpad = (ids != pad).long()
        pos = torch.cumsum(nonpad, 1) * nonpad + pad
        assert torch.equal(pos, g["position_ids"])
        pos_pad = pad
    else:
        pos = torch.arange(t)[None].expand(b, t)
        pos_pad = None
    tt = g["token_type_ids"] if "token_type_ids" in g else torch.zeros_like(ids)
    e = (lookup(p[f"{pre}.embeddings.word_embeddings.weight"], ids, pad)
         + p[f"{pre}.embeddings.token_type_embeddings.weight"][tt]
         + lookup(p[f"{pre}.embeddings.position_embeddings.weight"], pos, pos_pad))
    x = p.ln(e, f"{pre}.embeddings.LayerNorm", eps)
    m = key_mask_add(att)
    for i in range(cfg["num_hidden_layers"]):
        L = f"{pre}.encoder.layer.{i}"
        c = std_attention(p, x, m, h, f"{L}.attention.self.query", f"{L}.attention.self.key", f"{L}.attention.self.value")
        x = p.ln(p.lin(c, f"{L}.attention.output.dense") + x, f"{L}.attention.output.LayerNorm", eps)
        f = p.lin(a(p.lin(x, f"{L}.intermediate.dense")), f"{L}.output.dense")
        x = p.ln(f + x, f"{L}.output.LayerNorm", eps)
    w = p[f"{pre}.embeddings.word_embeddings.weight"]
    if roberta:
        y = p.ln(act("gelu")(p.lin(x, "lm_head.dense")), "lm_head.layer_norm", eps)
        return y @ w.T + p["lm_head.bias"]
    y = p.ln(a(p.lin(x, "cls.predictions.transform.dense")), "cls.predictions.transform.LayerNorm", eps)
    return y @ w.T + p["cls.predictions.bias"]


def distilbert(cfg, p, g):
    ids, att = g["input_ids"], g["attention_mask"]
    b, t = ids.shape
    eps, h, a = 1e-12, cfg["n_heads"], act(cfg["activation"])
    pre = "distilbert"
    w = p[f"{pre}.embeddings.word_embeddings.weight"]
    pe = p[f"{pre}.embeddings.position_embeddings.weight"]
    if cfg.get("sinusoidal_pos_embds"):
        n, dim = pe.shape
        j = torch.arange(dim, dtype=torch.float64)
        ang = torch.arange(n, dtype=torch.float64)[:, None] / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
        table = torch.where(j.long() % 2 == 0, torch.sin(ang), torch.cos(ang)).float()
        assert torch.equal(table, pe.detach()), "the sinusoidal table is the saved initial value"
    x = p.ln(lookup(w, ids, cfg["pad_token_id"]) + pe[:t][None], f"{pre}.embeddings.LayerNorm", eps)
    m = key_mask_add(att)
    for i in range(cfg["n_layers"]):
        L = f"{pre}.transformer.layer.{i}"
        c = std_attention(p, x, m, h, f"{L}.attention.q_lin", f"{L}.attention.k_lin", f"{L}.attention.v_lin")
        x = p.ln(p.lin(c, f"{L}.attention.out_lin") + x, f"{L}.sa_layer_norm", eps)
        f = p.lin(a(p.lin(x, f"{L}.ffn.lin1")), f"{L}.ffn.lin2")
        x = p.ln(f + x, f"{L}.output_layer_norm", eps)
    y = p.ln(a(p.lin(x, "vocab_transform")), "vocab_layer_norm", eps)
    return y @ w.T + p["vocab_projector.bias"]


def bucket(r, buckets, max_rel):
    if buckets <= 0:
        return r
    mid = buckets // 2
    out = r.clone()
    big = r.abs() > mid
    ab = r.abs().float()
    lg = torch.ceil(torch.log(ab / mid) / torch.log(torch.tensor((max_rel - 1) / mid)) * (mid - 1)) + mid
    out[big] = (torch.sign(r).float() * lg)[big].long()
    return out


def deberta(cfg, p, g):
    ids, att = g["input_ids"], g["attention_mask"]
    b, t = ids.shape
    H, h = cfg["hidden_size"], cfg["num_attention_heads"]
    eps, a = cfg.get("layer_norm_eps", 1e-7), act(cfg.get("hidden_act", "gelu"))
    types = cfg.get("pos_att_type") or []
    if isinstance(types, str):
        types = [x.strip() for x in types.lower().split("|")]
    max_rel = cfg.get("max_relative_positions", -1)
    if max_rel < 1:
        max_rel = cfg["max_position_embeddings"]
    buckets = cfg.get("position_buckets", -1)
    span = buckets if buckets > 0 else max_rel
    pre = "deberta"
    w = p[f"{pre}.embeddings.word_embeddings.weight"]
    e = lookup(w, ids, cfg.get("pad_token_id", 0))
    if cfg.get("position_biased_input", True):
        e = e + p[f"{pre}.embeddings.position_embeddings.weight"][:t][None]
    if cfg.get("type_vocab_size", 0) > 0:
        tt = g["token_type_ids"] if "token_type_ids" in g else torch.zeros_like(ids)
        e = e + p[f"{pre}.embeddings.token_type_embeddings.weight"][tt]
    if p.has(f"{pre}.embeddings.embed_proj.weight"):
        e = p.lin(e, f"{pre}.embeddings.embed_proj", bias=False)
    mf = att.float()
    x = p.ln(e, f"{pre}.embeddings.LayerNorm", eps) * mf[..., None]
    enc_in = x
    relative = cfg.get("relative_attention", False)
    if relative:
        r = torch.arange(t)[:, None] - torch.arange(t)[None, :]
        rel = bucket(r, buckets, max_rel)
        assert torch.equal(rel, g["relative_pos"])
        cidx = torch.clamp(rel + span, 0, 2 * span - 1)  # [T, T]
        R = p[f"{pre}.encoder.rel_embeddings.weight"]
        if "layer_norm" in [s.strip() for s in cfg.get("norm_rel_ebd", "none").lower().split("|")]:
            R = p.ln(R, f"{pre}.encoder.LayerNorm", eps)
    # the scale counts the named terms even without relative attention (then none is added)
    f = 1 + ("c2p" in types) + ("p2c" in types)
    pair = (att[:, None, :, None] * att[:, None, None, :]).bool()  # [B, 1, Tq, Tk]
    for i in range(cfg["num_hidden_layers"]):
        L = f"{pre}.encoder.layer.{i}.attention.self"
        qh, kh, vh = (heads(p.lin(x, f"{L}.{n}_proj"), h) for n in ("query", "key", "value"))
        d = qh.shape[-1]
        sc = torch.sqrt(torch.tensor(d, dtype=torch.float) * f)
        s = qh @ (kh / sc).transpose(-1, -2)
        share = cfg.get("share_att_key", False)
        if relative and "c2p" in types:
            Kr = heads(p.lin(R[None], f"{L}.key_proj" if share else f"{L}.pos_key_proj"), h)[0]  # [h, 2span, d]
            s = s + torch.einsum("bhid,hijd->bhij", qh, Kr[:, cidx]) / sc
        if relative and "p2c" in types:
            Qr = heads(p.lin(R[None], f"{L}.query_proj" if share else f"{L}.pos_query_proj"), h)[0]
            s = s + torch.einsum("bhjd,hijd->bhij", kh, Qr[:, cidx]) / sc
        s = s.masked_fill(~pair, MIN)
        c = merge(torch.softmax(s, -1) @ vh)
        A = f"{pre}.encoder.layer.{i}"
        y = p.ln(p.lin(c, f"{A}.attention.output.dense") + x, f"{A}.attention.output.LayerNorm", eps)
        ff = p.lin(a(p.lin(y, f"{A}.intermediate.dense")), f"{A}.output.dense")
        x = p.ln(ff + y, f"{A}.output.LayerNorm", eps)
        if i == 0 and cfg.get("conv_kernel_size", 0) > 0:
            k = cfg["conv_kernel_size"]
            cv = F.conv1d(enc_in.transpose(1, 2), p[f"{pre}.encoder.conv.conv.weight"], p[f"{pre}.encoder.conv.conv.bias"],
                          padding=(k - 1) // 2, groups=cfg.get("conv_groups", 1)).transpose(1, 2)
            cv = cv * mf[..., None]
            cv = act(cfg.get("conv_act", "tanh"))(cv)
            x = p.ln(x + cv, f"{pre}.encoder.conv.LayerNorm", eps) * mf[..., None]
    if cfg.get("legacy", True):
        y = p.ln(a(p.lin(x, "cls.predictions.transform.dense")), "cls.predictions.transform.LayerNorm", eps)
        return y @ w.T + p["cls.predictions.bias"]
    y = p.ln(a(p.lin(x, "lm_predictions.lm_head.dense")), "lm_predictions.lm_head.LayerNorm", eps)
    return y @ w.T + p["lm_predictions.lm_head.bias"]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def main():
    ok = True
    torch.set_num_threads(1)
    for name in sorted(os.listdir(FIX)):
        d = os.path.join(FIX, name)
        if name.startswith("gpt2_") or not os.path.isdir(d):
            continue
        cfg = json.load(open(os.path.join(d, "config.json")))
        p = P(os.path.join(d, "model.safetensors"))
        g = load_file(os.path.join(d, "golden.safetensors"))
        mt = cfg["model_type"]
        if mt == "bert":
            logits = bert_like(cfg, p, g, "bert", False)
        elif mt == "roberta":
            logits = bert_like(cfg, p, g, "roberta", True)
        elif mt == "distilbert":
            logits = distilbert(cfg, p, g)
        elif mt == "deberta-v2":
            logits = deberta(cfg, p, g)
        else:
            raise ValueError(mt)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), g["labels"].reshape(-1), ignore_index=-100)
        loss.backward()
        e_loss = abs(loss.item() - g["loss"].item()) / abs(g["loss"].item())
        e_logits = rel_err(logits.detach(), g["logits"])
        worst, zeros = (0.0, ""), (0.0, "")
        gmax = max(v.abs().max().item() for k, v in g.items() if k.startswith("grad."))
        for k, v in p.t.items():
            ours, ref = (v.grad if v.grad is not None else torch.zeros_like(v)), g["grad." + k]
            if ref.abs().max().item() <= ZERO * gmax:
                # mathematically zero (a key bias shifts a softmax row): roundoff on both sides
                zeros = max(zeros, (ours.abs().max().item() / gmax, k))
                continue
            worst = max(worst, (rel_err(ours, ref), k))
        good = e_loss <= 1e-5 and e_logits <= 1e-5 and worst[0] <= 1e-4 and zeros[0] <= ZERO_TOL
        ok &= good
        print(f"{name}: loss rel err {e_loss:.1e}, logits {e_logits:.1e}, worst gradient {worst[0]:.1e} ({worst[1]})"
              f"; zero gradients {zeros[0]:.1e} of the largest ({zeros[1] or '-'}){'' if good else '  FAIL'}")
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

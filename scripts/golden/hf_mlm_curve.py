#!/usr/bin/env python3
"""The masked-LM demo's training curve in transformers: BertForMaskedLM with the demo's config
(4 layers x 128, 4 heads, intermediate 512, no dropout) trained on the demo's block store with
DataCollatorForLanguageModeling's masking (15%; 80/10/10), AdamW (weight decay 0.01 off biases
and LayerNorms), cosine schedule with 5% warmup, batch 16, clipping 1.0, evaluated every 125
steps on fixed masks. Compares the plateau of `train --objective mlm` with Hugging Face's.

usage: python3 scripts/golden/hf_mlm_curve.py lmtrain-demo/data-bert [LR 1e-3] [STEPS 500]
"""
import json
import math
import sys
import time

import numpy as np
import torch

d = sys.argv[1].rstrip("/") + "/"
lr = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-3
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 500
from transformers import BertConfig, BertForMaskedLM, get_cosine_schedule_with_warmup  # noqa: E402
torch.set_num_threads(2)
torch.manual_seed(0)
def load(p):
    raw=np.fromfile(p,dtype=np.uint8)
    bs=int(np.frombuffer(raw[20:24],dtype=np.uint32)[0]); n=int(np.frombuffer(raw[24:32],dtype=np.uint64)[0])
    w=int(np.frombuffer(raw[16:20],dtype=np.uint32)[0])
    toks=np.frombuffer(raw[128:128+n*bs*w],dtype=np.uint16 if w==2 else np.uint32).reshape(n,bs)
    return torch.tensor(toks.astype(np.int64))
tr=load(d+'train.bin'); va=load(d+'validation.bin')
tok=json.load(open(d+'tokenizer.json')); V=tok['model']['vocab']; MASK=V['[MASK]']; special=[V[t] for t in ['[PAD]','[UNK]','[CLS]','[SEP]','[MASK]']]
def mask(x,g):
    labels=x.clone(); p=torch.full(x.shape,0.15)
    sp=torch.zeros_like(x,dtype=torch.bool)
    for s in special: sp|=(x==s)
    p[sp]=0
    m=torch.bernoulli(p,generator=g).bool(); labels[~m]=-100
    x=x.clone(); r=torch.bernoulli(torch.full(x.shape,0.8),generator=g).bool()&m; x[r]=MASK
    rnd=torch.bernoulli(torch.full(x.shape,0.5),generator=g).bool()&m&~r; x[rnd]=torch.randint(len(V),x.shape,generator=g)[rnd]
    return x,labels
cfg=BertConfig(vocab_size=4096,hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=512,max_position_embeddings=128,hidden_dropout_prob=0,attention_probs_dropout_prob=0,pad_token_id=0)
model=BertForMaskedLM(cfg)
decay=[p for n,p in model.named_parameters() if not (n.endswith('bias') or 'LayerNorm' in n)]
nod=[p for n,p in model.named_parameters() if (n.endswith('bias') or 'LayerNorm' in n)]
opt=torch.optim.AdamW([{'params':decay,'weight_decay':0.01},{'params':nod,'weight_decay':0}],lr=lr)
sch=get_cosine_schedule_with_warmup(opt,steps//20,steps)
ge=torch.Generator().manual_seed(5); vx,vl=mask(va,ge)
def ev():
    model.eval(); tot=0
    with torch.no_grad():
        for i in range(0,len(vx),32): tot+=model(input_ids=vx[i:i+32],labels=vl[i:i+32]).loss.item()*len(vx[i:i+32])
    model.train(); return tot/len(vx)
print('before',ev(),flush=True)
g=torch.Generator().manual_seed(1); t0=time.time()
for s in range(steps):
    idx=torch.randint(len(tr),(16,),generator=g)
    x,l=mask(tr[idx],g)
    loss=model(input_ids=x,labels=l).loss
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(),1.0); opt.step(); sch.step()
    if (s+1)%125==0: print(s+1,'eval',ev(),'ppl',math.exp(ev()),time.time()-t0,flush=True)

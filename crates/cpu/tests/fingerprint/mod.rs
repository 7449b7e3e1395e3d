//! Every CPU op run once on shapes that take its threaded paths, its outputs kept bit for bit:
//! shared by the thread-count determinism test and the forced-SIMD-level test.

use lmtrain_backend::{
    AdamWHyper, AttnMask, AttnShape, DecaySegment, DisentangledShape, Dropout, EmbeddingTables, GeluKind, GemmShape, HeadGrads, HostBatch,
    Inputs, RelPositions,
};
use lmtrain_cpu::ops;

pub fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = lmtrain_backend::mix64(s);
            ((s >> 40) as f32 / 16_777_216.0 - 0.5) * 2.0 * scale
        })
        .collect()
}

/// The outputs of one op: a name and every float it wrote (f64 results, the loss sums, apart).
pub struct Output {
    pub name: &'static str,
    pub values: Vec<f32>,
    pub wide: Vec<f64>,
}

fn out(name: &'static str, values: Vec<f32>) -> Output {
    Output { name, values, wide: Vec::new() }
}

fn out64(name: &'static str, wide: Vec<f64>) -> Output {
    Output { name, values: Vec::new(), wide }
}

/// Runs every op (in whatever rayon pool is current) and returns its outputs.
pub fn run_ops() -> Vec<Output> {
    let mut res = Vec::new();
    // rows and widths of a small GPT-2 (odd row count: ragged last tasks)
    let (rows, c, hidden) = (333, 96, 384);

    // elementwise
    let x = rand_vec(rows * hidden, 1, 2.0);
    let y = rand_vec(rows * hidden, 2, 2.0);
    let mut o = vec![0f32; x.len()];
    ops::residual_forward(&mut o, &x, &y);
    ops::add_inplace(&mut o, &x);
    ops::scale(&mut o, 0.75);
    ops::dropout_inplace(&mut o, Dropout { p: 0.2, seed: 7 });
    res.push(out("elementwise", o));
    let mut z = vec![1f32; (1 << 22) + 37];
    ops::fill_zero(&mut z);
    assert!(z.iter().all(|&v| v == 0.0), "fill_zero");

    // linear
    for (i, &(m, n, k, ta, tb)) in
        [(rows, hidden, c, false, false), (rows, c, hidden, false, true), (c, hidden, rows, true, false)].iter().enumerate()
    {
        let a = rand_vec(m * k, 10 + i as u64, 1.0);
        let b = rand_vec(k * n, 20 + i as u64, 1.0);
        let mut cm = rand_vec(m * n, 30 + i as u64, 1.0);
        ops::matmul(&mut cm, &a, &b, GemmShape { m, n, k, trans_a: ta, trans_b: tb, accumulate: true });
        res.push(out(["matmul nn", "matmul nt", "matmul tn"][i], cm));
    }
    let mut h = x.clone();
    let bias = rand_vec(hidden, 3, 1.0);
    ops::add_bias(&mut h, &bias, rows, hidden);
    let mut db = rand_vec(hidden, 4, 1.0);
    ops::bias_backward(&mut db, &h, rows, hidden);
    res.push(out("add_bias", h));
    res.push(out("bias_backward", db));

    // layernorm
    let (w, b) = (rand_vec(c, 5, 1.0), rand_vec(c, 6, 1.0));
    let xl = rand_vec(rows * c, 7, 3.0);
    let mut ln = vec![0f32; rows * c];
    let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
    ops::layernorm_forward(&mut ln, &mut mean, &mut rstd, &xl, &w, &b, rows, c, 1e-5);
    let g = rand_vec(rows * c, 8, 1.0);
    let (mut dx, mut dw, mut dbl) = (rand_vec(rows * c, 9, 1.0), rand_vec(c, 10, 1.0), rand_vec(c, 11, 1.0));
    ops::layernorm_backward(&mut dx, &mut dw, &mut dbl, &g, &xl, &w, &mean, &rstd, rows, c);
    for (n, v) in [("layernorm out", ln), ("layernorm mean", mean), ("layernorm rstd", rstd), ("layernorm dx", dx)] {
        res.push(out(n, v));
    }
    res.push(out("layernorm dweight", dw));
    res.push(out("layernorm dbias", dbl));

    // gelu
    for kind in [GeluKind::Tanh, GeluKind::Erf] {
        let mut o = vec![0f32; x.len()];
        ops::gelu_forward(&mut o, &x, kind);
        let mut d = y.clone();
        ops::gelu_backward(&mut d, &x, &o, kind);
        res.push(out(if kind == GeluKind::Tanh { "gelu tanh" } else { "gelu erf" }, o));
        res.push(out(if kind == GeluKind::Tanh { "gelu tanh backward" } else { "gelu erf backward" }, d));
    }

    // embedding (repeated ids)
    let (bsz, t, vocab) = (3, 111, 257);
    let ids: Vec<u32> = (0..bsz * t).map(|i| (i * i % 97 + i % 5) as u32).collect();
    let wte = rand_vec(vocab * c, 12, 1.0);
    let wpe = rand_vec(128 * c, 13, 1.0);
    let pos: Vec<u32> = (0..bsz * t).map(|i| (5 + i % t) as u32).collect();
    let types: Vec<u32> = (0..bsz * t).map(|i| (i % 3 == 0) as u32).collect();
    let host = HostBatch {
        b: bsz,
        t,
        input_ids: &ids,
        targets: None,
        attention_mask: None,
        token_type_ids: Some(&types),
        position_ids: Some(&pos),
    };
    let inp = Inputs::new(&host);
    let wtt = rand_vec(2 * c, 29, 1.0);
    let mut e = vec![0f32; bsz * t * c];
    ops::embedding_forward(&mut e, EmbeddingTables { word: &wte[..], position: Some(&wpe[..]), token_type: Some(&wtt[..]) }, &inp, c);
    let ge = rand_vec(bsz * t * c, 14, 1.0);
    let (mut dwte, mut dwpe, mut dwtt) = (vec![0f32; vocab * c], vec![0f32; 128 * c], vec![0f32; 2 * c]);
    let grads = EmbeddingTables { word: &mut dwte[..], position: Some(&mut dwpe[..]), token_type: Some(&mut dwtt[..]) };
    ops::embedding_backward(grads, &ge, &inp, c, Default::default());
    res.push(out("embedding", e));
    res.push(out("embedding dwte", dwte));
    res.push(out("embedding dwpe", dwpe));
    res.push(out("embedding dwtt", dwtt));

    // attention (several query blocks, padding, dropout)
    let s = AttnShape { b: 2, t: 150, n_head: 3, head_size: 16 };
    let qkv = rand_vec(s.b * s.t * 3 * s.channels(), 15, 1.5);
    let mut pad = vec![true; s.b * s.t];
    pad[..7].iter_mut().for_each(|p| *p = false);
    for (name, mask, d) in [
        ("attention causal", AttnMask { causal: true, key_padding: None }, Dropout::NONE),
        ("attention padded dropout", AttnMask { causal: false, key_padding: Some(&pad) }, Dropout { p: 0.1, seed: 3 }),
    ] {
        let mut ao = vec![0f32; s.b * s.t * s.channels()];
        let mut probs = vec![0f32; s.probs_len()];
        ops::attention_forward(&mut ao, &mut probs, &qkv, s, mask, d);
        let ga = rand_vec(ao.len(), 16, 1.0);
        let mut dqkv = rand_vec(qkv.len(), 17, 1.0);
        ops::attention_backward(&mut dqkv, &ga, &qkv, &probs, s, d);
        res.push(out(name, ao));
        res.push(out(name, probs));
        res.push(out(name, dqkv));
    }
    let (kc, vc) = (rand_vec(40 * s.channels(), 18, 1.0), rand_vec(40 * s.channels(), 19, 1.0));
    let q = rand_vec(9 * s.channels(), 20, 1.0);
    let mut co = vec![0f32; q.len()];
    ops::attention_cached(&mut co, &q, &kc, &vc, 31, 9, s.n_head, s.head_size);
    res.push(out("attention_cached", co));

    // DeBERTa: disentangled attention (c2p + p2c over 16 log buckets, padding, dropout), the
    // conv layer's unfold / fold, tanh, the padded-row mask
    let ds = DisentangledShape { attn: s, rel: RelPositions { span: 16, buckets: 16, max_position: 128 }, scale_factor: 3 };
    let (kr, qr) = (rand_vec(ds.rel_rows() * s.channels(), 21, 1.0), rand_vec(ds.rel_rows() * s.channels(), 22, 1.0));
    let mut ao = vec![0f32; s.b * s.t * s.channels()];
    let mut probs = vec![0f32; s.probs_len()];
    let d = Dropout { p: 0.1, seed: 4 };
    ops::disentangled_attention_forward(&mut ao, &mut probs, &qkv, Some(&kr), Some(&qr), ds, Some(&pad), d);
    let ga = rand_vec(ao.len(), 23, 1.0);
    let mut dqkv = rand_vec(qkv.len(), 24, 1.0);
    let (mut dkr, mut dqr) = (vec![0f32; kr.len()], vec![0f32; qr.len()]);
    ops::disentangled_attention_backward(
        &mut dqkv,
        Some(&mut dkr),
        Some(&mut dqr),
        &ga,
        &qkv,
        Some(&kr),
        Some(&qr),
        &probs,
        ds,
        Some(&pad),
        d,
    );
    res.push(out("disentangled attention", ao));
    res.push(out("disentangled attention", probs));
    res.push(out("disentangled attention", dqkv));
    res.push(out("disentangled attention dpos_key", dkr));
    res.push(out("disentangled attention dpos_query", dqr));
    let x = rand_vec(rows * c, 25, 1.0);
    let mut col = vec![0f32; rows * c * 3];
    ops::conv1d_unfold(&mut col, &x, 9, rows / 9, c, 3);
    let mut dx = rand_vec(x.len(), 26, 1.0);
    ops::conv1d_fold(&mut dx, &col, 9, rows / 9, c, 3);
    let mut th = vec![0f32; x.len()];
    ops::tanh_forward(&mut th, &x);
    ops::tanh_backward(&mut dx, &th, &x);
    let keep: Vec<bool> = (0..rows).map(|r| r % 5 != 0).collect();
    ops::zero_padded_rows(&mut th, Some(&keep), c);
    res.push(out("conv1d unfold", col));
    res.push(out("conv1d fold, tanh backward", dx));
    res.push(out("tanh, zero_padded_rows", th));

    // cross-entropy and the fused head (17 vocabulary chunks, the last partial: more chunks
    // than the head's 16 dx groups)
    let vocab = 16 * ops::LM_HEAD_CHUNK + 77;
    let targets: Vec<i32> = (0..rows).map(|r| if r % 7 == 3 { -100 } else { (r * 131 % vocab) as i32 }).collect();
    let logits = rand_vec(rows * vocab, 21, 6.0);
    let mut l = logits.clone();
    let eval = ops::cross_entropy(&mut l, &targets, rows, vocab, None);
    let loss = ops::cross_entropy(&mut l, &targets, rows, vocab, Some(0.01));
    res.push(out64("cross_entropy loss", vec![eval, loss]));
    res.push(out("cross_entropy grad", l));
    let xh = rand_vec(rows * c, 22, 1.0);
    let wh = rand_vec(vocab * c, 23, 1.0);
    let hb = rand_vec(vocab, 30, 2.0);
    let mut dbh = vec![0f32; vocab];
    let mut scratch = vec![0f32; rows * vocab];
    let eval = ops::lm_head_loss(&mut scratch, &xh, &wh, Some(&hb), &targets, rows, vocab, c, None);
    let (mut dxh, mut dwh) = (vec![0f32; rows * c], rand_vec(vocab * c, 24, 1.0));
    let loss = ops::lm_head_loss(
        &mut scratch,
        &xh,
        &wh,
        Some(&hb),
        &targets,
        rows,
        vocab,
        c,
        Some(HeadGrads { dx: &mut dxh, dwte: &mut dwh, dbias: Some(&mut dbh), dloss: 0.01 }),
    );
    res.push(out64("lm_head_loss loss", vec![eval, loss]));
    res.push(out("lm_head_loss dx", dxh));
    res.push(out("lm_head_loss dwte", dwh));
    res.push(out("lm_head_loss dbias", dbh.clone()));
    let all_targets: Vec<i32> = (0..rows).map(|r| (r * 37 % vocab) as i32).collect();
    let (mut dxh, mut dwh) = (vec![0f32; rows * c], vec![0f32; vocab * c]);
    let loss = ops::lm_head_loss(
        &mut scratch,
        &xh,
        &wh,
        Some(&hb),
        &all_targets,
        rows,
        vocab,
        c,
        Some(HeadGrads { dx: &mut dxh, dwte: &mut dwh, dbias: Some(&mut dbh), dloss: 0.01 }),
    );
    res.push(out64("lm_head_loss loss, no ignored row", vec![loss]));
    res.push(out("lm_head_loss dx, no ignored row", dxh));
    res.push(out("lm_head_loss dwte, no ignored row", dwh));

    // optimizer
    let n = 200_003;
    let gr = rand_vec(n, 25, 0.1);
    res.push(out("global_norm", vec![ops::global_norm(&gr)]));
    let (mut p, mut m, mut v) = (rand_vec(n, 26, 1.0), rand_vec(n, 27, 0.01), rand_vec(n, 28, 0.001));
    v.iter_mut().for_each(|x| *x = x.abs());
    let segs =
        [DecaySegment { offset: 0, len: 70_001, weight_decay: 0.1 }, DecaySegment { offset: 70_001, len: n - 70_001, weight_decay: 0.0 }];
    let hp = AdamWHyper { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 3, grad_scale: 0.5 };
    ops::adamw_update(&mut p, &gr, &mut m, &mut v, &segs, &hp);
    res.push(out("adamw params", p));
    res.push(out("adamw m", m));
    res.push(out("adamw v", v));
    res
}

/// Three training steps of a small GPT-2 (dropout on, a vocabulary of three head chunks):
/// forward_backward, global_norm and AdamW, as the trainer runs them. Returns the losses, norms,
/// final gradients and weights.
pub fn run_gpt2_steps() -> Vec<Output> {
    use lmtrain_model::LanguageModel;
    use lmtrain_model::gpt2::{Gpt2, Gpt2Config};
    let cfg =
        Gpt2Config { vocab_size: 2 * ops::LM_HEAD_CHUNK + 77, n_positions: 64, n_embd: 64, n_layer: 2, n_head: 4, ..Gpt2Config::default() };
    let mut model = Gpt2::new(lmtrain_cpu::Cpu, cfg, 5).unwrap();
    let (b, t) = (3, 47);
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7919 + 13) % 1101) as u32).collect();
    let mut labels: Vec<i32> = ids.iter().skip(1).map(|&x| x as i32).collect();
    labels.push(-100);
    let segments: Vec<DecaySegment> = model
        .param_infos()
        .iter()
        .map(|p| DecaySegment { offset: p.offset, len: p.len, weight_decay: if p.decay { 0.1 } else { 0.0 } })
        .collect();
    let n = model.params().len();
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let mut scalars = Vec::new();
    for step in 1..=3u32 {
        model.zero_grad().unwrap();
        let loss = model.forward_backward(&ids, &labels, b, t, Some(step as u64)).unwrap();
        let norm = ops::global_norm(model.grads());
        scalars.extend([loss, norm]);
        let hp = AdamWHyper { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, step, grad_scale: (1.0 / (norm + 1e-6)).min(1.0) };
        let (params, grads) = model.params_and_grads_mut();
        ops::adamw_update(params, grads, &mut m, &mut v, &segments, &hp);
    }
    vec![out("gpt2 losses and norms", scalars), out("gpt2 grads", model.grads().to_vec()), out("gpt2 params", model.params().to_vec())]
}

//! CPU ops against straightforward f64 references and finite differences.

use lmtrain_backend::{
    AdamWHyper, AttnMask, AttnShape, DecaySegment, DisentangledShape, Dropout, EmbeddingTables, GeluKind, HeadGrads, HostBatch, Inputs,
    RelPositions,
};
use lmtrain_cpu::ops;

fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = lmtrain_backend::mix64(s);
            ((s >> 40) as f32 / 16_777_216.0 - 0.5) * 2.0 * scale
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - w).abs() / scale;
        assert!(err <= tol, "{what}[{i}]: {g} vs {w} (rel err {err:e} > {tol:e})");
    }
}

fn layernorm_ref(x: &[f32], w: &[f32], b: &[f32], rows: usize, cols: usize, eps: f64) -> Vec<f64> {
    let mut out = vec![0f64; rows * cols];
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let m = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let v = row.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / cols as f64;
        for c in 0..cols {
            out[r * cols + c] = (row[c] as f64 - m) / (v + eps).sqrt() * w[c] as f64 + b[c] as f64;
        }
    }
    out
}

#[test]
fn layernorm_forward_matches_reference_and_backward_matches_finite_differences() {
    let (rows, cols) = (37, 72);
    let x = rand_vec(rows * cols, 1, 2.0).iter().map(|v| v + 3.0).collect::<Vec<_>>();
    let w = rand_vec(cols, 2, 1.0);
    let b = rand_vec(cols, 3, 1.0);
    let mut out = vec![0f32; rows * cols];
    let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
    ops::layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, rows, cols, 1e-5);
    assert_close(&out, &layernorm_ref(&x, &w, &b, rows, cols, 1e-5), 1e-5, "layernorm out");

    // loss = sum(out * g): analytic gradients vs central differences in f64
    let g = rand_vec(rows * cols, 4, 1.0);
    let mut dx = vec![0.5f32; rows * cols]; // accumulates onto existing values
    let mut dw = vec![0f32; cols];
    let mut db = vec![0f32; cols];
    ops::layernorm_backward(&mut dx, &mut dw, &mut db, &g, &x, &w, &mean, &rstd, rows, cols);
    let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
        layernorm_ref(x, w, b, rows, cols, 1e-5).iter().zip(&g).map(|(o, g)| o * *g as f64).sum()
    };
    let h = 1e-2f32;
    for &i in &[0usize, 5, 71, 72, 1000, rows * cols - 1] {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        let fd = (loss(&xp, &w, &b) - loss(&xm, &w, &b)) / (2.0 * h as f64);
        assert!((dx[i] as f64 - 0.5 - fd).abs() < 2e-3 * fd.abs().max(1.0), "dx[{i}] {} vs {fd}", dx[i] - 0.5);
    }
    for &i in &[0usize, 13, cols - 1] {
        let (mut wp, mut wm) = (w.clone(), w.clone());
        wp[i] += h;
        wm[i] -= h;
        let fd = (loss(&x, &wp, &b) - loss(&x, &wm, &b)) / (2.0 * h as f64);
        assert!((dw[i] as f64 - fd).abs() < 1e-3 * fd.abs().max(1.0), "dw[{i}] {} vs {fd}", dw[i]);
        let want_db: f64 = (0..rows).map(|r| g[r * cols + i] as f64).sum();
        assert!((db[i] as f64 - want_db).abs() < 1e-4, "db[{i}]");
    }
}

#[test]
fn gelu_forward_and_backward_both_kinds() {
    let x = rand_vec(5000, 9, 6.0);
    let dy = rand_vec(5000, 10, 1.0);
    for kind in [GeluKind::Tanh, GeluKind::Erf] {
        let f = |x: f64| -> f64 {
            match kind {
                GeluKind::Tanh => 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh()),
                GeluKind::Erf => 0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2)),
            }
        };
        let mut out = vec![0f32; x.len()];
        ops::gelu_forward(&mut out, &x, kind);
        for (o, &x) in out.iter().zip(&x) {
            assert!((*o as f64 - f(x as f64)).abs() < 2e-6 * (1.0 + x.abs() as f64), "{kind:?} gelu({x})");
        }
        let mut dx = vec![1.0f32; x.len()];
        ops::gelu_backward(&mut dx, &x, &dy, kind);
        for i in 0..x.len() {
            let xi = x[i] as f64;
            let fd = (f(xi + 1e-5) - f(xi - 1e-5)) / 2e-5;
            let want = 1.0 + fd * dy[i] as f64;
            assert!((dx[i] as f64 - want).abs() < 1e-5, "{kind:?} gelu'({xi}): {} vs {want}", dx[i]);
        }
    }
}

/// erf by its Maclaurin series (|x| < 3) or asymptotic complement, in f64.
fn erf64(x: f64) -> f64 {
    if x.abs() < 3.0 {
        let (mut sum, mut term, mut n) = (0.0, x, 0.0);
        while term.abs() > 1e-17 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        let a = x.abs();
        let s = 1.0 - 1.0 / (2.0 * a * a) + 3.0 / (4.0 * a.powi(4));
        x.signum() * (1.0 - (-a * a).exp() / (a * std::f64::consts::PI.sqrt()) * s)
    }
}

/// Random AdamW parameters, gradients and moments (`v >= 0`) of length `n`.
fn adam_state(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let v = rand_vec(n, seed + 3, 0.001).iter().map(|x| x.abs()).collect();
    (rand_vec(n, seed, 1.0), rand_vec(n, seed + 1, 0.1), rand_vec(n, seed + 2, 0.01), v)
}

#[test]
fn adamw_matches_torch_formula_per_segment() {
    let n = 40_000; // larger than one parallel chunk
    let (mut p, g, mut m, mut v) = adam_state(n, 11);
    let (p0, m0, v0) = (p.clone(), m.clone(), v.clone());
    let segs =
        [DecaySegment { offset: 0, len: 30_000, weight_decay: 0.1 }, DecaySegment { offset: 30_000, len: 10_000, weight_decay: 0.0 }];
    let hp = AdamWHyper { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 3, grad_scale: 0.5 };
    ops::adamw_update(&mut p, &g, &mut m, &mut v, &segs, &hp);
    for i in (0..n).step_by(997) {
        let wd = if i < 30_000 { 0.1 } else { 0.0 };
        let gi = g[i] as f64 * 0.5;
        let mut pi = p0[i] as f64 * (1.0 - 1e-3 * wd);
        let mi = 0.9 * m0[i] as f64 + 0.1 * gi;
        let vi = 0.999 * v0[i] as f64 + 0.001 * gi * gi;
        let bc1 = 1.0 - 0.9f64.powi(3);
        let bc2 = 1.0 - 0.999f64.powi(3);
        pi -= 1e-3 / bc1 * mi / (vi.sqrt() / bc2.sqrt() + 1e-8);
        assert!((p[i] as f64 - pi).abs() < 1e-6, "p[{i}] {} vs {pi}", p[i]);
        assert!((m[i] as f64 - mi).abs() < 1e-7 && (v[i] as f64 - vi).abs() < 1e-9, "moments [{i}]");
    }
}

#[test]
fn adamw_gives_the_bits_of_the_plain_f32_formula() {
    // the vectorised builds (AVX-512, AVX2) must round exactly as this scalar loop: several rayon
    // chunks plus an odd tail, and a segment boundary inside a chunk
    let n = 2 * 16_384 + 1_001;
    let (mut p, g, mut m, mut v) = adam_state(n, 21);
    let (p0, m0, v0) = (p.clone(), m.clone(), v.clone());
    let segs =
        [DecaySegment { offset: 0, len: 20_011, weight_decay: 0.01 }, DecaySegment { offset: 20_011, len: n - 20_011, weight_decay: 0.0 }];
    let hp = AdamWHyper { lr: 3e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, step: 7, grad_scale: 0.25 };
    ops::adamw_update(&mut p, &g, &mut m, &mut v, &segs, &hp);
    // the bias corrections in f64 from the f32 hyperparameters, as `adamw_update` (and torch)
    let step_size = (3e-4f32 as f64 / (1.0 - (0.9f32 as f64).powi(7))) as f32;
    let bc2_sqrt = (1.0 - (0.95f32 as f64).powi(7)).sqrt() as f32;
    for i in 0..n {
        let decay = 1.0 - 3e-4f32 * if i < 20_011 { 0.01 } else { 0.0 };
        let gi = g[i] * 0.25;
        let mi = m0[i] + (gi - m0[i]) * (1.0 - 0.9f32);
        let vi = v0[i] * 0.95 + (1.0 - 0.95f32) * gi * gi;
        let pi = p0[i] * decay - step_size * (mi / (vi.sqrt() / bc2_sqrt + 1e-8));
        assert_eq!((p[i].to_bits(), m[i].to_bits(), v[i].to_bits()), (pi.to_bits(), mi.to_bits(), vi.to_bits()), "element {i}");
    }
}

#[test]
fn global_norm_is_f64_accurate() {
    let g = rand_vec(100_003, 15, 1.0);
    let want = g.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    assert!((ops::global_norm(&g) as f64 - want).abs() < 1e-6 * want);
    assert_eq!(ops::global_norm(&[3.0, 4.0]), 5.0);
}

#[test]
fn cross_entropy_loss_and_gradient_ignore_minus_100() {
    let (rows, vocab) = (6, 1003);
    let logits = rand_vec(rows * vocab, 16, 8.0);
    let targets = [5, -100, 1002, 0, -100, 77];
    let mut buf = logits.clone();
    let sum_eval = ops::cross_entropy(&mut buf, &targets, rows, vocab, None);
    assert_eq!(buf, logits, "eval mode leaves logits alone");
    let sum = ops::cross_entropy(&mut buf, &targets, rows, vocab, Some(0.25));
    assert_eq!(sum, sum_eval);
    let mut want_sum = 0f64;
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let grad = &buf[r * vocab..(r + 1) * vocab];
        if targets[r] == -100 {
            assert!(grad.iter().all(|&g| g == 0.0), "ignored row has zero gradient");
            continue;
        }
        let max = row.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
        let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        want_sum += z.ln() + max - row[targets[r] as usize] as f64;
        for j in 0..vocab {
            let p = (row[j] as f64 - max).exp() / z;
            let want = 0.25 * (p - if j == targets[r] as usize { 1.0 } else { 0.0 });
            assert!((grad[j] as f64 - want).abs() < 1e-7, "grad[{r},{j}]");
        }
    }
    assert!((sum - want_sum).abs() < 1e-5 * want_sum, "{sum} vs {want_sum}");
}

/// Naive attention in f64 with both masks; returns (out, probs).
fn attention_ref(qkv: &[f32], s: AttnShape, causal: bool, pad: Option<&[bool]>) -> (Vec<f64>, Vec<f64>) {
    let AttnShape { b, t, n_head, head_size: hs } = s;
    let c = n_head * hs;
    let mut out = vec![0f64; b * t * c];
    let mut probs = vec![0f64; s.probs_len()];
    for bi in 0..b {
        for h in 0..n_head {
            for i in 0..t {
                let q = |d: usize| qkv[(bi * t + i) * 3 * c + h * hs + d] as f64;
                let ok = |j: usize| (!causal || j <= i) && pad.is_none_or(|p| p[bi * t + j]);
                let mut sc = vec![f64::NEG_INFINITY; t];
                for (j, scj) in sc.iter_mut().enumerate().filter(|(j, _)| ok(*j)) {
                    *scj = (0..hs).map(|d| q(d) * qkv[(bi * t + j) * 3 * c + c + h * hs + d] as f64).sum::<f64>() / (hs as f64).sqrt();
                }
                let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|&x| (x - max).exp()).sum();
                for j in 0..t {
                    let p = (sc[j] - max).exp() / z;
                    probs[((bi * n_head + h) * t + i) * t + j] = p;
                    for d in 0..hs {
                        out[(bi * t + i) * c + h * hs + d] += p * qkv[(bi * t + j) * 3 * c + 2 * c + h * hs + d] as f64;
                    }
                }
            }
        }
    }
    (out, probs)
}

#[test]
fn attention_forward_matches_reference_with_causal_and_padding_masks() {
    let s = AttnShape { b: 2, t: 13, n_head: 3, head_size: 8 };
    let qkv = rand_vec(s.b * s.t * 3 * s.channels(), 17, 1.5);
    let mut pad = vec![true; s.b * s.t];
    pad[s.t + 10..].iter_mut().for_each(|p| *p = false);
    for (causal, pad) in [(true, None), (false, Some(&pad[..])), (true, Some(&pad[..]))] {
        let mut out = vec![0f32; s.b * s.t * s.channels()];
        let mut probs = vec![0f32; s.probs_len()];
        ops::attention_forward(&mut out, &mut probs, &qkv, s, AttnMask { causal, key_padding: pad }, Dropout::NONE);
        let (o, p) = attention_ref(&qkv, s, causal, pad);
        assert_close(&out, &o, 1e-5, "attention out");
        assert_close(&probs, &p, 1e-5, "attention probs");
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    let s = AttnShape { b: 2, t: 7, n_head: 2, head_size: 4 };
    let n = s.b * s.t * 3 * s.channels();
    let qkv = rand_vec(n, 18, 1.0);
    let g = rand_vec(s.b * s.t * s.channels(), 19, 1.0);
    let mut out = vec![0f32; g.len()];
    let mut probs = vec![0f32; s.probs_len()];
    let mask = AttnMask { causal: true, key_padding: None };
    ops::attention_forward(&mut out, &mut probs, &qkv, s, mask, Dropout::NONE);
    let mut dqkv = vec![0f32; n];
    ops::attention_backward(&mut dqkv, &g, &qkv, &probs, s, Dropout::NONE);
    let loss = |qkv: &[f32]| -> f64 { attention_ref(qkv, s, true, None).0.iter().zip(&g).map(|(o, g)| o * *g as f64).sum() };
    let h = 1e-3;
    for i in (0..n).step_by(7) {
        let (mut p, mut m) = (qkv.clone(), qkv.clone());
        p[i] += h;
        m[i] -= h;
        let fd = (loss(&p) - loss(&m)) / (2.0 * h as f64);
        assert!((dqkv[i] as f64 - fd).abs() < 2e-3 * fd.abs().max(0.1), "dqkv[{i}] {} vs {fd}", dqkv[i]);
    }
}

#[test]
fn attention_dropout_is_consistent_between_forward_and_backward() {
    // With dropout, out = dropout(P) V is linear in V: the gradient w.r.t. V from backward must
    // match the difference quotient of the forward with the same seed.
    let s = AttnShape { b: 1, t: 9, n_head: 2, head_size: 4 };
    let n = s.b * s.t * 3 * s.channels();
    let qkv = rand_vec(n, 20, 1.0);
    let g = rand_vec(s.b * s.t * s.channels(), 21, 1.0);
    check_dropout_kv_gradient(s, &qkv, &g, Dropout { p: 0.3, seed: 99 }, 1);
}

/// With causal attention and dropout `d`, the backward's gradient w.r.t. every `step`-th k and
/// v entry equals the difference quotient of the forward with the same mask (q's gradient is
/// tested without dropout elsewhere).
fn check_dropout_kv_gradient(s: AttnShape, qkv: &[f32], g: &[f32], d: Dropout, step: usize) {
    let n = qkv.len();
    let mask = AttnMask { causal: true, key_padding: None };
    let fwd = |qkv: &[f32]| -> f64 {
        let mut out = vec![0f32; g.len()];
        let mut probs = vec![0f32; s.probs_len()];
        ops::attention_forward(&mut out, &mut probs, qkv, s, mask, d);
        out.iter().zip(g).map(|(o, g)| *o as f64 * *g as f64).sum()
    };
    let mut out = vec![0f32; g.len()];
    let mut probs = vec![0f32; s.probs_len()];
    ops::attention_forward(&mut out, &mut probs, qkv, s, mask, d);
    let mut dqkv = vec![0f32; n];
    ops::attention_backward(&mut dqkv, g, qkv, &probs, s, d);
    let c = s.channels();
    for i in (0..n).filter(|i| i % (3 * c) >= c).step_by(step) {
        let (mut p, mut m) = (qkv.to_vec(), qkv.to_vec());
        p[i] += 1e-2;
        m[i] -= 1e-2;
        let fd = (fwd(&p) - fwd(&m)) / 2e-2;
        assert!((dqkv[i] as f64 - fd).abs() < 5e-3 * fd.abs().max(0.1), "dropout dqkv[{i}] {} vs {fd}", dqkv[i]);
    }
}

#[test]
fn cached_attention_equals_full_causal_attention() {
    let s = AttnShape { b: 1, t: 11, n_head: 3, head_size: 4 };
    let c = s.channels();
    let qkv = rand_vec(s.t * 3 * c, 22, 1.0);
    let mut full = vec![0f32; s.t * c];
    let mut probs = vec![0f32; s.probs_len()];
    ops::attention_forward(&mut full, &mut probs, &qkv, s, AttnMask { causal: true, key_padding: None }, Dropout::NONE);
    let split =
        |part: usize| -> Vec<f32> { (0..s.t).flat_map(|i| qkv[i * 3 * c + part * c..i * 3 * c + (part + 1) * c].to_vec()).collect() };
    let (q, k, v) = (split(0), split(1), split(2));
    // prompt of 6 positions, then one at a time
    let mut got = vec![0f32; s.t * c];
    ops::attention_cached(&mut got[..6 * c], &q[..6 * c], &k, &v, 0, 6, s.n_head, s.head_size);
    for pos in 6..s.t {
        ops::attention_cached(&mut got[pos * c..(pos + 1) * c], &q[pos * c..(pos + 1) * c], &k, &v, pos, 1, s.n_head, s.head_size);
    }
    for (a, b) in got.iter().zip(&full) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn embedding_forward_backward_with_repeated_ids() {
    let (b, t, c, vocab) = (2, 5, 40, 9);
    let wte = rand_vec(vocab * c, 23, 1.0);
    let wpe = rand_vec(8 * c, 24, 1.0);
    let ids = [3u32, 3, 0, 8, 3, 1, 1, 2, 3, 0];
    // explicit position ids, offset by 2 (as incremental decoding passes them)
    let pos: Vec<u32> = (0..b * t).map(|i| (2 + i % t) as u32).collect();
    let host = HostBatch { b, t, input_ids: &ids, targets: None, attention_mask: None, token_type_ids: None, position_ids: Some(&pos) };
    let inp = Inputs::new(&host);
    let mut out = vec![0f32; b * t * c];
    let tables = EmbeddingTables { word: &wte[..], position: Some(&wpe[..]), token_type: None };
    ops::embedding_forward(&mut out, tables, &inp, c);
    for i in 0..b * t {
        for j in 0..c {
            let want = wte[ids[i] as usize * c + j] + wpe[(2 + i % t) * c + j];
            assert_eq!(out[i * c + j], want);
        }
    }
    let g = rand_vec(b * t * c, 25, 1.0);
    let mut dwte = vec![0f32; vocab * c];
    let mut dwpe = vec![0f32; 8 * c];
    ops::embedding_backward(
        EmbeddingTables { word: &mut dwte[..], position: Some(&mut dwpe[..]), token_type: None },
        &g,
        &inp,
        c,
        Default::default(),
    );
    for j in 0..c {
        let want3: f32 = [0usize, 1, 4, 8].iter().map(|&i| g[i * c + j]).sum();
        assert!((dwte[3 * c + j] - want3).abs() < 1e-6);
        // position 3 = column 1 of both rows
        assert!((dwpe[3 * c + j] - (g[c + j] + g[(t + 1) * c + j])).abs() < 1e-6);
    }
    assert!(dwte[4 * c..5 * c].iter().all(|&x| x == 0.0), "unused row untouched");
    assert!(dwpe[..2 * c].iter().all(|&x| x == 0.0), "positions before the offset untouched");
    // padding_idx: token 3 and position 3 take no gradient, the other rows the same as before
    let (mut pwte, mut pwpe) = (vec![0f32; vocab * c], vec![0f32; 8 * c]);
    let pad = lmtrain_backend::PaddingIdx { word: Some(3), position: Some(3) };
    ops::embedding_backward(EmbeddingTables { word: &mut pwte[..], position: Some(&mut pwpe[..]), token_type: None }, &g, &inp, c, pad);
    assert!(pwte[3 * c..4 * c].iter().chain(&pwpe[3 * c..4 * c]).all(|&x| x == 0.0), "padding rows skipped");
    assert_eq!(&pwte[..3 * c], &dwte[..3 * c]);
    assert_eq!(&pwpe[4 * c..], &dwpe[4 * c..]);
}

#[test]
fn embedding_with_token_types_and_no_positions() {
    let (b, t, c, vocab) = (3, 4, 17, 11);
    let wte = rand_vec(vocab * c, 60, 1.0);
    let wtt = rand_vec(2 * c, 61, 1.0);
    let ids: Vec<u32> = (0..(b * t) as u32).map(|i| i * 7 % vocab as u32).collect();
    let types: Vec<u32> = (0..b * t).map(|i| (i % t >= 2) as u32).collect();
    let host = HostBatch { b, t, input_ids: &ids, targets: None, attention_mask: None, token_type_ids: Some(&types), position_ids: None };
    let inp = Inputs::new(&host);
    let mut out = vec![0f32; b * t * c];
    ops::embedding_forward(&mut out, EmbeddingTables { word: &wte[..], position: None, token_type: Some(&wtt[..]) }, &inp, c);
    for i in 0..b * t {
        for j in 0..c {
            assert_eq!(out[i * c + j], wte[ids[i] as usize * c + j] + wtt[types[i] as usize * c + j]);
        }
    }
    let g = rand_vec(b * t * c, 62, 1.0);
    let (mut dwte, mut dwtt) = (vec![0f32; vocab * c], vec![0f32; 2 * c]);
    ops::embedding_backward(
        EmbeddingTables { word: &mut dwte[..], position: None, token_type: Some(&mut dwtt[..]) },
        &g,
        &inp,
        c,
        Default::default(),
    );
    for j in 0..c {
        let want1: f32 = (0..b * t).filter(|&i| types[i] == 1).map(|i| g[i * c + j]).sum();
        assert!((dwtt[c + j] - want1).abs() < 1e-5, "type-1 gradient");
    }
    let total: f32 = dwte.iter().sum::<f32>() - g.iter().sum::<f32>();
    assert!(total.abs() < 1e-3, "every position's gradient reaches its word row once");
}

#[test]
fn row_gather_and_scatter_add_are_inverse_on_the_selected_rows() {
    let (n, cols) = (9, 5);
    let x = rand_vec(n * cols, 63, 1.0);
    let rows = [1u32, 4, 8];
    let mut sel = vec![0f32; rows.len() * cols];
    ops::gather_rows(&mut sel, &x, &rows, cols);
    for (i, &r) in rows.iter().enumerate() {
        assert_eq!(&sel[i * cols..(i + 1) * cols], &x[r as usize * cols..(r as usize + 1) * cols]);
    }
    let mut dx = vec![1f32; n * cols];
    ops::scatter_add_rows(&mut dx, &sel, &rows, cols);
    for r in 0..n {
        let want = |j: usize| if rows.contains(&(r as u32)) { 1.0 + x[r * cols + j] } else { 1.0 };
        assert!((0..cols).all(|j| dx[r * cols + j] == want(j)), "row {r}");
    }
}

#[test]
fn bias_and_elementwise_ops() {
    let (rows, cols) = (50, 33);
    let x = rand_vec(rows * cols, 26, 1.0);
    let bias = rand_vec(cols, 27, 1.0);
    let mut y = x.clone();
    ops::add_bias(&mut y, &bias, rows, cols);
    assert_eq!(y[cols + 2], x[cols + 2] + bias[2]);
    let mut db = vec![1.0f32; cols];
    ops::bias_backward(&mut db, &x, rows, cols);
    let want: f32 = 1.0 + (0..rows).map(|r| x[r * cols + 5]).sum::<f32>();
    assert!((db[5] - want).abs() < 1e-5);
    let mut d = vec![1.0f32; 100_000];
    ops::dropout_inplace(&mut d, Dropout { p: 0.5, seed: 3 });
    let zeros = d.iter().filter(|&&v| v == 0.0).count();
    assert!((45_000..55_000).contains(&zeros) && d.iter().all(|&v| v == 0.0 || v == 2.0));
}

#[test]
fn fused_lm_head_equals_matmul_plus_cross_entropy_across_chunk_boundaries() {
    // 9 rows: fewer than one 16-row tile of the transposing pass
    fused_lm_head_case(9, 16, 1.0);
    // 37 rows: two full 16 x 16 tiles and a ragged edge, odd width
    fused_lm_head_case(37, 24, 1.0);
    // logits spread over hundreds: most probabilities underflow (subnormal ones are flushed)
    fused_lm_head_case(37, 24, 12.0);
}

fn fused_lm_head_case(rows: usize, c: usize, spread: f32) {
    use lmtrain_backend::GemmShape;
    // vocabulary spanning three chunks, the last one partial (and not a multiple of 16)
    let vocab = 2 * ops::LM_HEAD_CHUNK + 77;
    let x = rand_vec(rows * c, 30, spread);
    let wte = rand_vec(vocab * c, 31, 1.0);
    // targets at both edges of every chunk, ignored rows, then a repeating pattern
    let k = ops::LM_HEAD_CHUNK as i32;
    let edges = [0, k - 1, k, -100, 2 * k - 1, 2 * k, (vocab - 1) as i32, 5, -100];
    let targets: Vec<i32> = (0..rows).map(|r| if r < edges.len() { edges[r] } else { (r * 131 % vocab) as i32 }).collect();
    // reference: plain logits, cross_entropy, two products (sums differ only in f32 rounding order)
    let mut logits = vec![0f32; rows * vocab];
    ops::matmul(&mut logits, &x, &wte, GemmShape { m: rows, n: vocab, k: c, trans_a: false, trans_b: true, accumulate: false });
    let want_eval = ops::cross_entropy(&mut logits.clone(), &targets, rows, vocab, None);
    let want = ops::cross_entropy(&mut logits, &targets, rows, vocab, Some(0.5));
    let mut want_dx = vec![0f32; rows * c];
    ops::matmul(&mut want_dx, &logits, &wte, GemmShape { m: rows, n: c, k: vocab, trans_a: false, trans_b: false, accumulate: false });
    let mut want_dw = vec![1f32; vocab * c];
    ops::matmul(&mut want_dw, &logits, &x, GemmShape { m: vocab, n: c, k: rows, trans_a: true, trans_b: false, accumulate: true });

    let mut scratch = vec![f32::NAN; rows * vocab];
    let got_eval = ops::lm_head_loss(&mut scratch, &x, &wte, None, &targets, rows, vocab, c, None);
    assert!((got_eval - want_eval).abs() < 1e-6 * want_eval.abs(), "{got_eval} vs {want_eval}");
    let mut dx = vec![f32::NAN; rows * c]; // overwritten, not accumulated
    let mut dw = vec![1f32; vocab * c];
    let got = ops::lm_head_loss(
        &mut scratch,
        &x,
        &wte,
        None,
        &targets,
        rows,
        vocab,
        c,
        Some(HeadGrads { dx: &mut dx, dwte: &mut dw, dbias: None, dloss: 0.5 }),
    );
    assert!((got - want).abs() < 1e-6 * want.abs(), "{got} vs {want}");
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    assert_close(&dx, &to64(&want_dx), 1e-6, "dx");
    assert_close(&dw, &to64(&want_dw), 1e-6, "dwte");
    // bit for bit the same on a second run (fixed reduction order)
    let mut dx2 = vec![f32::NAN; rows * c];
    let mut dw2 = vec![1f32; vocab * c];
    let again = ops::lm_head_loss(
        &mut scratch,
        &x,
        &wte,
        None,
        &targets,
        rows,
        vocab,
        c,
        Some(HeadGrads { dx: &mut dx2, dwte: &mut dw2, dbias: None, dloss: 0.5 }),
    );
    assert!(again.to_bits() == got.to_bits() && dx2 == dx && dw2 == dw, "second run differs");
}

#[test]
fn fused_lm_head_with_a_bias_equals_matmul_plus_bias_plus_cross_entropy() {
    use lmtrain_backend::GemmShape;
    // two chunks, the second partial; a few ignored rows
    let (rows, c, vocab) = (21, 13, ops::LM_HEAD_CHUNK + 45);
    let x = rand_vec(rows * c, 64, 2.0);
    let wte = rand_vec(vocab * c, 65, 1.0);
    let bias = rand_vec(vocab, 66, 3.0);
    let targets: Vec<i32> = (0..rows).map(|r| if r % 5 == 2 { -100 } else { (r * 97 % vocab) as i32 }).collect();
    let mut logits = vec![0f32; rows * vocab];
    ops::matmul(&mut logits, &x, &wte, GemmShape { m: rows, n: vocab, k: c, trans_a: false, trans_b: true, accumulate: false });
    ops::add_bias(&mut logits, &bias, rows, vocab);
    let want = ops::cross_entropy(&mut logits, &targets, rows, vocab, Some(0.3));
    let mut want_db = vec![0.5f32; vocab];
    ops::bias_backward(&mut want_db, &logits, rows, vocab);
    let mut scratch = vec![f32::NAN; rows * vocab];
    let (mut dx, mut dw, mut db) = (vec![f32::NAN; rows * c], vec![0f32; vocab * c], vec![0.5f32; vocab]);
    let g = HeadGrads { dx: &mut dx[..], dwte: &mut dw[..], dbias: Some(&mut db[..]), dloss: 0.3 };
    let got = ops::lm_head_loss(&mut scratch, &x, &wte, Some(&bias), &targets, rows, vocab, c, Some(g));
    assert!((got - want).abs() < 1e-6 * want.abs(), "{got} vs {want}");
    assert_close(&db, &want_db.iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-6, "dbias");
    let mut want_dx = vec![0f32; rows * c];
    ops::matmul(&mut want_dx, &logits, &wte, GemmShape { m: rows, n: c, k: vocab, trans_a: false, trans_b: false, accumulate: false });
    assert_close(&dx, &want_dx.iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-6, "dx");
}

#[test]
fn fused_lm_head_with_one_partial_chunk_and_all_rows_ignored() {
    use lmtrain_backend::GemmShape;
    // a vocabulary smaller than one chunk (fewer chunks than threads)
    let (rows, c, vocab) = (5, 7, 37);
    let x = rand_vec(rows * c, 32, 1.0);
    let wte = rand_vec(vocab * c, 33, 1.0);
    let targets = [3, -100, 36, 0, 17];
    let mut logits = vec![0f32; rows * vocab];
    ops::matmul(&mut logits, &x, &wte, GemmShape { m: rows, n: vocab, k: c, trans_a: false, trans_b: true, accumulate: false });
    let want = ops::cross_entropy(&mut logits, &targets, rows, vocab, Some(0.2));
    let mut want_dx = vec![0f32; rows * c];
    ops::matmul(&mut want_dx, &logits, &wte, GemmShape { m: rows, n: c, k: vocab, trans_a: false, trans_b: false, accumulate: false });
    let mut scratch = vec![f32::NAN; rows * vocab];
    let (mut dx, mut dw) = (vec![f32::NAN; rows * c], vec![0f32; vocab * c]);
    let got = ops::lm_head_loss(
        &mut scratch,
        &x,
        &wte,
        None,
        &targets,
        rows,
        vocab,
        c,
        Some(HeadGrads { dx: &mut dx, dwte: &mut dw, dbias: None, dloss: 0.2 }),
    );
    assert!((got - want).abs() < 1e-6 * want.abs(), "{got} vs {want}");
    assert_close(&dx, &want_dx.iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-6, "dx");
    // every target ignored: zero loss, zero gradients
    let ignored = [-100; 5];
    let (mut dx, mut dw) = (vec![f32::NAN; rows * c], vec![0f32; vocab * c]);
    let got = ops::lm_head_loss(
        &mut scratch,
        &x,
        &wte,
        None,
        &ignored,
        rows,
        vocab,
        c,
        Some(HeadGrads { dx: &mut dx, dwte: &mut dw, dbias: None, dloss: 0.2 }),
    );
    assert_eq!(got, 0.0);
    assert!(dx.iter().chain(&dw).all(|&v| v == 0.0), "ignored rows must give zero gradients");
}

#[test]
fn attention_across_several_query_blocks() {
    // t = 150 spans three 64-row query blocks (the last one partial)
    let s = AttnShape { b: 1, t: 150, n_head: 2, head_size: 4 };
    let n = s.b * s.t * 3 * s.channels();
    let qkv = rand_vec(n, 40, 1.0);
    let g = rand_vec(s.b * s.t * s.channels(), 41, 1.0);
    let mut pad = vec![true; s.t];
    pad[140..].iter_mut().for_each(|p| *p = false); // right padding
    for (causal, pad) in [(true, None), (false, Some(&pad[..])), (false, None)] {
        let mask = AttnMask { causal, key_padding: pad };
        let mut out = vec![0f32; g.len()];
        let mut probs = vec![0f32; s.probs_len()];
        ops::attention_forward(&mut out, &mut probs, &qkv, s, mask, Dropout::NONE);
        let (o, p) = attention_ref(&qkv, s, causal, pad);
        assert_close(&out, &o, 1e-5, "attention out");
        assert_close(&probs, &p, 1e-5, "attention probs");
        let mut dqkv = vec![0f32; n];
        ops::attention_backward(&mut dqkv, &g, &qkv, &probs, s, Dropout::NONE);
        let loss = |qkv: &[f32]| -> f64 { attention_ref(qkv, s, causal, pad).0.iter().zip(&g).map(|(o, g)| o * *g as f64).sum() };
        for i in (0..n).step_by(97) {
            let (mut pp, mut mm) = (qkv.clone(), qkv.clone());
            pp[i] += 1e-3;
            mm[i] -= 1e-3;
            let fd = (loss(&pp) - loss(&mm)) / 2e-3;
            assert!((dqkv[i] as f64 - fd).abs() < 2e-3 * fd.abs().max(0.1), "causal={causal} dqkv[{i}] {} vs {fd}", dqkv[i]);
        }
    }
    // dropout across the query blocks
    check_dropout_kv_gradient(s, &qkv, &g, Dropout { p: 0.2, seed: 5 }, 13);
}

#[test]
fn dropout_mask_is_the_factor_of_each_element_index() {
    // several rayon chunks plus an odd tail: every build (AVX-512, AVX2, portable) must apply
    // exactly `factor(i)` to element i
    let d = Dropout { p: 0.1, seed: 12 };
    let x = rand_vec(3 * 16_384 + 37, 42, 1.0);
    let mut y = x.clone();
    ops::dropout_inplace(&mut y, d);
    for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
        assert_eq!(b.to_bits(), (a * d.factor(i as u64)).to_bits(), "element {i}");
    }
}

#[test]
fn attention_dropout_uses_the_probability_index_as_mask_index() {
    // out[b, i, h] = sum_j P[bh, i, j] factor(bh t t + i t + j) v[b, j, h], with P from the
    // forward without dropout; t = 70 spans two query blocks and is not a multiple of 16
    let s = AttnShape { b: 2, t: 70, n_head: 2, head_size: 8 };
    let (t, c, hs) = (s.t, s.channels(), s.head_size);
    let qkv = rand_vec(s.b * t * 3 * c, 43, 1.0);
    let d = Dropout { p: 0.25, seed: 77 };
    let mask = AttnMask { causal: true, key_padding: None };
    let mut out = vec![0f32; s.b * t * c];
    let mut probs = vec![0f32; s.probs_len()];
    ops::attention_forward(&mut out, &mut probs, &qkv, s, mask, Dropout::NONE);
    let mut want = vec![0f64; out.len()];
    for bi in 0..s.b {
        for h in 0..s.n_head {
            let bh = bi * s.n_head + h;
            for i in 0..t {
                for j in 0..t {
                    let p = probs[(bh * t + i) * t + j] as f64 * d.factor((bh * t * t + i * t + j) as u64) as f64;
                    for e in 0..hs {
                        want[(bi * t + i) * c + h * hs + e] += p * qkv[(bi * t + j) * 3 * c + 2 * c + h * hs + e] as f64;
                    }
                }
            }
        }
    }
    let mut probs_d = vec![0f32; s.probs_len()];
    ops::attention_forward(&mut out, &mut probs_d, &qkv, s, mask, d);
    assert_eq!(probs, probs_d, "probs are saved before dropout");
    assert_close(&out, &want, 1e-5, "attention out with dropout");
}

#[test]
fn attention_with_left_padding_zeroes_fully_masked_query_rows() {
    // causal + left padding: the first queries of batch 1 see only padded keys (probs all 0);
    // t = 21 leaves a partial 16-lane block in every row
    let s = AttnShape { b: 2, t: 21, n_head: 2, head_size: 4 };
    let (t, c) = (s.t, s.channels());
    let qkv = rand_vec(s.b * t * 3 * c, 44, 1.5);
    let mut pad = vec![true; s.b * t];
    pad[t..t + 3].iter_mut().for_each(|p| *p = false);
    let mask = AttnMask { causal: true, key_padding: Some(&pad[..]) };
    let mut out = vec![0f32; s.b * t * c];
    let mut probs = vec![0f32; s.probs_len()];
    ops::attention_forward(&mut out, &mut probs, &qkv, s, mask, Dropout::NONE);
    let (o, p) = attention_ref(&qkv, s, true, Some(&pad[..]));
    for bh in 0..s.b * s.n_head {
        let bi = bh / s.n_head;
        for i in 0..t {
            let row = &probs[(bh * t + i) * t..(bh * t + i + 1) * t];
            if bi == 1 && i < 3 {
                assert!(row.iter().all(|&x| x == 0.0), "fully masked row {bh} {i}");
            } else {
                let want = &p[(bh * t + i) * t..(bh * t + i + 1) * t];
                assert_close(row, want, 1e-5, "probs row");
            }
        }
    }
    let live: Vec<usize> = (0..out.len()).filter(|&k| !(k / c >= t && k / c < t + 3)).collect();
    let got: Vec<f32> = live.iter().map(|&k| out[k]).collect();
    let want: Vec<f64> = live.iter().map(|&k| o[k]).collect();
    assert_close(&got, &want, 1e-5, "attention out");
}

/// Naive disentangled attention in f64 (pair mask; a fully masked query row is uniform).
fn disentangled_ref(qkv: &[f32], kr: Option<&[f32]>, qr: Option<&[f32]>, s: DisentangledShape, pad: Option<&[bool]>) -> Vec<f64> {
    let AttnShape { b, t, n_head, head_size: hs } = s.attn;
    let c = n_head * hs;
    let sc = ((hs * s.scale_factor) as f64).sqrt();
    let at = |bi: usize, i: usize, part: usize, h: usize, d: usize| qkv[(bi * t + i) * 3 * c + part * c + h * hs + d] as f64;
    let mut out = vec![0f64; b * t * c];
    for bi in 0..b {
        for h in 0..n_head {
            for i in 0..t {
                let ok = |j: usize| pad.is_none_or(|p| p[bi * t + i] && p[bi * t + j]);
                let score = |j: usize| {
                    let r = s.rel.index(i, j);
                    let mut x: f64 = (0..hs).map(|d| at(bi, i, 0, h, d) * at(bi, j, 1, h, d)).sum();
                    if let Some(kr) = kr {
                        x += (0..hs).map(|d| at(bi, i, 0, h, d) * kr[r * c + h * hs + d] as f64).sum::<f64>();
                    }
                    if let Some(qr) = qr {
                        x += (0..hs).map(|d| at(bi, j, 1, h, d) * qr[r * c + h * hs + d] as f64).sum::<f64>();
                    }
                    x / sc
                };
                let any = (0..t).any(ok);
                let sc_row: Vec<f64> = (0..t)
                    .map(|j| {
                        if !any {
                            0.0
                        } else if ok(j) {
                            score(j)
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let max = sc_row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc_row.iter().map(|&x| (x - max).exp()).sum();
                for (j, &x) in sc_row.iter().enumerate() {
                    let p = (x - max).exp() / z;
                    for d in 0..hs {
                        out[(bi * t + i) * c + h * hs + d] += p * at(bi, j, 2, h, d);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn disentangled_attention_matches_reference_and_finite_differences() {
    // t 9 over 6 log buckets (span 6, 12 rows): the rows are gathered, clamped and bucketed
    let attn = AttnShape { b: 2, t: 9, n_head: 2, head_size: 4 };
    let s = DisentangledShape { attn, rel: RelPositions { span: 3, buckets: 6, max_position: 8 }, scale_factor: 3 };
    let c = attn.channels();
    let qkv = rand_vec(attn.b * attn.t * 3 * c, 40, 1.5);
    let kr = rand_vec(s.rel_rows() * c, 41, 1.5);
    let qr = rand_vec(s.rel_rows() * c, 42, 1.5);
    let g = rand_vec(attn.b * attn.t * c, 43, 1.0);
    let mut pad = vec![true; attn.b * attn.t];
    pad[attn.t + 6..].iter_mut().for_each(|p| *p = false);
    for (with_k, with_q) in [(true, true), (true, false), (false, true)] {
        let (kr, qr) = (with_k.then_some(&kr[..]), with_q.then_some(&qr[..]));
        let mut out = vec![0f32; g.len()];
        let mut probs = vec![0f32; attn.probs_len()];
        ops::disentangled_attention_forward(&mut out, &mut probs, &qkv, kr, qr, s, Some(&pad), Dropout::NONE);
        assert_close(&out, &disentangled_ref(&qkv, kr, qr, s, Some(&pad)), 1e-5, "disentangled out");
        let mut dqkv = vec![0f32; qkv.len()];
        let (mut dkr, mut dqr) = (vec![0f32; s.rel_rows() * c], vec![0f32; s.rel_rows() * c]);
        let (dk, dq) = (with_k.then_some(&mut dkr[..]), with_q.then_some(&mut dqr[..]));
        ops::disentangled_attention_backward(&mut dqkv, dk, dq, &g, &qkv, kr, qr, &probs, s, Some(&pad), Dropout::NONE);
        let loss = |qkv: &[f32], kr: Option<&[f32]>, qr: Option<&[f32]>| -> f64 {
            disentangled_ref(qkv, kr, qr, s, Some(&pad)).iter().zip(&g).map(|(o, g)| o * *g as f64).sum()
        };
        let h = 1e-3;
        let fd = |f: &dyn Fn(f32) -> f64| (f(h) - f(-h)) / (2.0 * h as f64);
        for i in (0..qkv.len()).step_by(5) {
            let want = fd(&|e| {
                let mut x = qkv.clone();
                x[i] += e;
                loss(&x, kr, qr)
            });
            assert!((dqkv[i] as f64 - want).abs() < 2e-3 * want.abs().max(0.1), "dqkv[{i}] {} vs {want}", dqkv[i]);
        }
        for i in 0..kr.map_or(0, <[f32]>::len) {
            let want = fd(&|e| {
                let mut x = kr.unwrap().to_vec();
                x[i] += e;
                loss(&qkv, Some(&x), qr)
            });
            assert!((dkr[i] as f64 - want).abs() < 2e-3 * want.abs().max(0.1), "dpos_key[{i}] {} vs {want}", dkr[i]);
        }
        for i in 0..qr.map_or(0, <[f32]>::len) {
            let want = fd(&|e| {
                let mut x = qr.unwrap().to_vec();
                x[i] += e;
                loss(&qkv, kr, Some(&x))
            });
            assert!((dqr[i] as f64 - want).abs() < 2e-3 * want.abs().max(0.1), "dpos_query[{i}] {} vs {want}", dqr[i]);
        }
    }
}

#[test]
fn disentangled_attention_dropout_is_consistent_between_forward_and_backward() {
    // out = dropout(P) V is linear in V: the v gradient must be the forward's difference quotient
    let attn = AttnShape { b: 1, t: 7, n_head: 2, head_size: 4 };
    let s = DisentangledShape { attn, rel: RelPositions { span: 8, buckets: 0, max_position: 8 }, scale_factor: 2 };
    let c = attn.channels();
    let qkv = rand_vec(attn.t * 3 * c, 44, 1.0);
    let kr = rand_vec(s.rel_rows() * c, 45, 1.0);
    let g = rand_vec(attn.t * c, 46, 1.0);
    let d = Dropout { p: 0.3, seed: 5 };
    let fwd = |qkv: &[f32]| -> (f64, Vec<f32>) {
        let mut out = vec![0f32; g.len()];
        let mut probs = vec![0f32; attn.probs_len()];
        ops::disentangled_attention_forward(&mut out, &mut probs, qkv, Some(&kr), None, s, None, d);
        (out.iter().zip(&g).map(|(o, g)| *o as f64 * *g as f64).sum(), probs)
    };
    let (_, probs) = fwd(&qkv);
    let mut dqkv = vec![0f32; qkv.len()];
    let mut dkr = vec![0f32; kr.len()];
    ops::disentangled_attention_backward(&mut dqkv, Some(&mut dkr), None, &g, &qkv, Some(&kr), None, &probs, s, None, d);
    for r in 0..attn.t {
        for x in 2 * c..3 * c {
            let i = r * 3 * c + x;
            let (mut p, mut m) = (qkv.clone(), qkv.clone());
            p[i] += 0.5;
            m[i] -= 0.5;
            let want = (fwd(&p).0 - fwd(&m).0) / 1.0;
            assert!((dqkv[i] as f64 - want).abs() < 1e-4 * want.abs().max(1.0), "dv[{i}] {} vs {want}", dqkv[i]);
        }
    }
}

#[test]
fn conv1d_unfold_and_fold_are_adjoint_and_padded_rows_are_zeroed() {
    let (b, t, c, k) = (2, 5, 3, 3);
    let x = rand_vec(b * t * c, 47, 1.0);
    let mut col = vec![0f32; b * t * c * k];
    ops::conv1d_unfold(&mut col, &x, b, t, c, k);
    // tap kk of row ti reads row ti + kk - 1 of the same sequence, 0 outside it
    for bi in 0..b {
        for ti in 0..t {
            for i in 0..c {
                for kk in 0..k {
                    let src = ti as i64 + kk as i64 - 1;
                    let want = if (0..t as i64).contains(&src) { x[(bi * t + src as usize) * c + i] } else { 0.0 };
                    assert_eq!(col[((bi * t + ti) * c + i) * k + kk], want, "col[{bi},{ti},{i},{kk}]");
                }
            }
        }
    }
    // <unfold(x), y> = <x, fold(y)>
    let y = rand_vec(col.len(), 48, 1.0);
    let mut fy = vec![0.5f32; x.len()];
    ops::conv1d_fold(&mut fy, &y, b, t, c, k);
    let lhs: f64 = col.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
    let rhs: f64 = x.iter().zip(&fy).map(|(a, b)| *a as f64 * (*b as f64 - 0.5)).sum();
    assert!((lhs - rhs).abs() < 1e-5 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
    let mut z = x.clone();
    let keep: Vec<bool> = (0..b * t).map(|r| r % 4 != 3).collect();
    ops::zero_padded_rows(&mut z, Some(&keep), c);
    for (r, row) in z.chunks_exact(c).enumerate() {
        assert_eq!(row, if keep[r] { &x[r * c..(r + 1) * c] } else { &[0.0; 3][..] }, "row {r}");
    }
}

#[test]
fn tanh_forward_and_backward() {
    let x: Vec<f32> = rand_vec(1000, 49, 4.0);
    let mut y = vec![0f32; x.len()];
    ops::tanh_forward(&mut y, &x);
    assert_close(&y, &x.iter().map(|&v| (v as f64).tanh()).collect::<Vec<_>>(), 1e-6, "tanh");
    let g = rand_vec(x.len(), 50, 1.0);
    let mut d = vec![0.25f32; x.len()];
    ops::tanh_backward(&mut d, &y, &g);
    let want: Vec<f64> = x.iter().zip(&g).map(|(&v, &g)| 0.25 + (1.0 - (v as f64).tanh().powi(2)) * g as f64).collect();
    assert_close(&d, &want, 1e-6, "tanh backward (accumulated)");
}

//! The fused kernels (attention, DeBERTa's disentangled attention and convolution im2col,
//! classifier, deterministic LayerNorm, embeddings, AdamW with stochastic rounding and the
//! global norm, bias gradients, dropout) launched from Rust through
//! cudarc, compared with the CPU backend (`lmtrain_cpu::ops`) on odd shapes (T = 1, 7, 127, 129;
//! C not a multiple of 64; vocabularies not a multiple of 128; padding rows). Runs on the CPU
//! emulator (both thread orders, and once under AddressSanitizer) or, with LMTRAIN_CUDA_REAL=1,
//! on a GPU. Every case also launches twice and requires identical bits (determinism).
//!
//! Error measure: max-norm relative error `max|got - want| / max|want|`; tolerances 1e-5 for f32
//! results, 1e-2 for results stored in bf16. Where the CPU backend has no such variant (token
//! types, explicit position ids, selected rows, stochastic rounding), a small plain reference in
//! this file says so.

mod support;

use cudarc::driver::CudaSlice;
use half::bf16;
use lmtrain_backend::{AttnMask, AttnShape, DisentangledShape, Dropout, RelPositions};
use lmtrain_cpu::ops;
use lmtrain_cuda::{AttnOptions, ClassifierRows, CudaDevice, EmbeddingBatch, Positions, RelTables, disentangled_backward_scratch};
use support::{Child, Elem, F32_TOL, Mode, Rng, assert_close, check, load, on_device, quantize, run_children, store};

/// The bits of a device buffer, for the determinism checks.
fn bits<T: Elem>(dev: &CudaDevice, buf: &CudaSlice<T>) -> Vec<u32> {
    load(&dev.download(buf).unwrap()).iter().map(|v| v.to_bits()).collect()
}

fn assert_same_bits<T: Elem>(dev: &CudaDevice, what: &str, a: &CudaSlice<T>, b: &CudaSlice<T>) {
    assert!(bits(dev, a) == bits(dev, b), "{what}: two launches gave different bits");
}

// ---- attention ------------------------------------------------------------------------------

struct AttnCase {
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
    causal: bool,
    pad: bool,
    p: f32,
}

/// Key padding: batch `bi` pads its last `1 + bi` keys (when t > 1 + bi), and batch 0 pads key
/// 0, so under a causal mask query 0 of batch 0 sees no key at all.
fn key_padding(b: usize, t: usize) -> Vec<bool> {
    let mut kp = vec![true; b * t];
    for bi in 0..b {
        for j in 0..t {
            if (t > 1 + bi && j >= t - 1 - bi) || (bi == 0 && j == 0) {
                kp[bi * t + j] = false;
            }
        }
    }
    kp
}

/// Plain reference of the saved row statistic: `lse = log sum_j exp(scale q_i . k_j)` over the
/// keys a query sees (the CPU backend saves probabilities instead), in f64; -inf for none.
fn lse_reference(qkv: &[f32], s: AttnShape, causal: bool, kp: Option<&[bool]>) -> Vec<f32> {
    let (c, hs) = (s.channels(), s.head_size);
    let scale = 1.0 / (hs as f64).sqrt();
    let mut lse = vec![0f32; s.b * s.n_head * s.t];
    for bi in 0..s.b {
        for h in 0..s.n_head {
            for i in 0..s.t {
                let q = &qkv[(bi * s.t + i) * 3 * c + h * hs..][..hs];
                let scores: Vec<f64> = (0..s.t)
                    .filter(|&j| (!causal || j <= i) && kp.is_none_or(|kp| kp[bi * s.t + j]))
                    .map(|j| {
                        let k = &qkv[(bi * s.t + j) * 3 * c + c + h * hs..][..hs];
                        scale * q.iter().zip(k).map(|(a, b)| f64::from(a * b)).sum::<f64>()
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                lse[(bi * s.n_head + h) * s.t + i] =
                    if scores.is_empty() { f32::NEG_INFINITY } else { (m + scores.iter().map(|x| (x - m).exp()).sum::<f64>().ln()) as f32 };
            }
        }
    }
    lse
}

fn attention_case<T: Elem>(dev: &CudaDevice, k: &AttnCase, seed: u64) {
    let s = AttnShape { b: k.b, t: k.t, n_head: k.nh, head_size: k.hs };
    let tag = format!("attention b{} t{} h{} hs{} causal={} pad={} p={} {}", k.b, k.t, k.nh, k.hs, k.causal, k.pad, k.p, T::SUFFIX);
    let c = s.channels();
    let mut rng = Rng::new(seed);
    let qkv = quantize::<T>(rng.vec(k.b * k.t * 3 * c, 1.5, 0.0));
    let kp = key_padding(k.b, k.t);
    let kp_opt = k.pad.then_some(kp.as_slice());
    let drop = Dropout { p: k.p, seed: 0x5EED ^ seed };
    let mask = AttnMask { causal: k.causal, key_padding: kp_opt };
    let (mut out, mut probs) = (vec![0f32; k.b * k.t * c], vec![0f32; s.probs_len()]);
    ops::attention_forward(&mut out, &mut probs, &qkv, s, mask, drop);
    let lse = lse_reference(&qkv, s, k.causal, kp_opt);

    let d_qkv = dev.upload(&store::<T>(&qkv)).unwrap();
    let kv_bytes: Vec<u8> = kp.iter().map(|&v| u8::from(v)).collect();
    let d_kv = dev.upload(&kv_bytes).unwrap();
    let kv_view = d_kv.as_view();
    let opt = AttnOptions { causal: k.causal, key_valid: k.pad.then_some(&kv_view), dropout: drop };
    let run_forward = || {
        let mut d_out = dev.zeros::<T>(k.b * k.t * c).unwrap();
        let mut d_lse = dev.zeros::<f32>(k.b * k.nh * k.t).unwrap();
        dev.attention_forward(&mut d_out.as_view_mut(), &mut d_lse.as_view_mut(), &d_qkv.as_view(), s, opt).unwrap();
        (d_out, d_lse)
    };
    let (d_out, d_lse) = run_forward();
    check(dev, &format!("{tag} forward out"), &d_out, &out, T::TOL);
    let got_lse = dev.download(&d_lse).unwrap();
    for (i, (&g, &w)) in got_lse.iter().zip(&lse).enumerate() {
        assert!((g == w) || (g.is_finite() && w.is_finite()), "{tag}: lse[{i}] = {g}, want {w}");
    }
    let finite = |x: &[f32]| x.iter().map(|&v| if v.is_finite() { v } else { 0.0 }).collect::<Vec<_>>();
    assert_close(&format!("{tag} forward lse"), &finite(&got_lse), &finite(&lse), F32_TOL);

    let dout = quantize::<T>(rng.vec(k.b * k.t * c, 1.0, 0.0));
    let dqkv0 = quantize::<T>(rng.vec(k.b * k.t * 3 * c, 0.1, 0.0));
    let mut dqkv = dqkv0.clone();
    ops::attention_backward(&mut dqkv, &dout, &qkv, &probs, s, drop);
    let d_dout = dev.upload(&store::<T>(&dout)).unwrap();
    let run_backward = |d_out: &CudaSlice<T>, d_lse: &CudaSlice<f32>| {
        let mut d_dqkv = dev.upload(&store::<T>(&dqkv0)).unwrap();
        let mut scratch = dev.zeros::<f32>(k.b * k.nh * k.t).unwrap();
        dev.attention_backward(
            &mut d_dqkv.as_view_mut(),
            &mut scratch.as_view_mut(),
            &d_dout.as_view(),
            &d_qkv.as_view(),
            &d_out.as_view(),
            &d_lse.as_view(),
            s,
            opt,
        )
        .unwrap();
        d_dqkv
    };
    let d_dqkv = run_backward(&d_out, &d_lse);
    check(dev, &format!("{tag} backward dqkv"), &d_dqkv, &dqkv, T::TOL);

    let (d_out2, d_lse2) = run_forward();
    assert_same_bits(dev, &format!("{tag} forward out"), &d_out, &d_out2);
    assert_same_bits(dev, &format!("{tag} forward lse"), &d_lse, &d_lse2);
    let d_dqkv2 = run_backward(&d_out, &d_lse);
    assert_same_bits(dev, &format!("{tag} backward dqkv"), &d_dqkv, &d_dqkv2);
}

const ATTN_CASES: &[AttnCase] = &[
    AttnCase { b: 2, t: 7, nh: 2, hs: 64, causal: true, pad: false, p: 0.0 },
    AttnCase { b: 1, t: 129, nh: 2, hs: 64, causal: false, pad: true, p: 0.1 },
    AttnCase { b: 2, t: 127, nh: 1, hs: 24, causal: true, pad: true, p: 0.2 },
    AttnCase { b: 3, t: 1, nh: 2, hs: 64, causal: true, pad: true, p: 0.0 },
];

#[test]
fn attention_f32() {
    on_device("attention_f32", |dev| {
        for (i, k) in ATTN_CASES.iter().enumerate() {
            attention_case::<f32>(dev, k, 100 + i as u64);
        }
    });
}

#[test]
fn attention_bf16() {
    on_device("attention_bf16", |dev| {
        for (i, k) in ATTN_CASES.iter().enumerate() {
            attention_case::<bf16>(dev, k, 200 + i as u64);
        }
        // head size 128 (other tile sizes: 32x32 forward, 32x16 backward) and the smallest, 8
        let big = AttnCase { b: 1, t: 33, nh: 1, hs: 128, causal: true, pad: true, p: 0.1 };
        attention_case::<bf16>(dev, &big, 210);
        let small = AttnCase { b: 2, t: 19, nh: 3, hs: 8, causal: false, pad: true, p: 0.0 };
        attention_case::<bf16>(dev, &small, 211);
        attention_case::<f32>(dev, &small, 212);
        // head sizes that are not a multiple of 8 are refused before any launch
        let qkv = dev.zeros::<bf16>(3 * 12).unwrap();
        let (mut out, mut lse) = (dev.zeros::<bf16>(12).unwrap(), dev.zeros::<f32>(1).unwrap());
        let s = AttnShape { b: 1, t: 1, n_head: 1, head_size: 12 };
        let opt = AttnOptions { causal: true, key_valid: None, dropout: Dropout::NONE };
        let e = dev.attention_forward(&mut out.as_view_mut(), &mut lse.as_view_mut(), &qkv.as_view(), s, opt);
        assert!(e.is_err(), "head size 12 accepted");
    });
}

/// Incremental attention (generation) against `ops::attention_cached`: a prefill of several
/// rows at position 0, then single rows at later positions, caches longer than needed.
fn attention_cached_case<T: Elem>(dev: &CudaDevice, nh: usize, hs: usize, start: usize, n_new: usize, seed: u64) {
    let tag = format!("attention_cached h{nh} hs{hs} start{start} n{n_new} {}", T::SUFFIX);
    let c = nh * hs;
    let cache_rows = start + n_new + 3;
    let mut rng = Rng::new(seed);
    let q = quantize::<T>(rng.vec(n_new * c, 1.5, 0.0));
    let kc = quantize::<T>(rng.vec(cache_rows * c, 1.5, 0.0));
    let vc = quantize::<T>(rng.vec(cache_rows * c, 1.0, 0.0));
    let mut want = vec![0f32; n_new * c];
    ops::attention_cached(&mut want, &q, &kc, &vc, start, n_new, nh, hs);
    let (d_q, d_k, d_v) =
        (dev.upload(&store::<T>(&q)).unwrap(), dev.upload(&store::<T>(&kc)).unwrap(), dev.upload(&store::<T>(&vc)).unwrap());
    let run = || {
        let mut d_out = dev.zeros::<T>(n_new * c).unwrap();
        dev.attention_cached(&mut d_out.as_view_mut(), &d_q.as_view(), &d_k.as_view(), &d_v.as_view(), start, n_new, nh, hs).unwrap();
        d_out
    };
    let d_out = run();
    check(dev, &tag, &d_out, &want, T::TOL);
    assert_same_bits(dev, &tag, &d_out, &run());
}

#[test]
fn attention_cached() {
    on_device("attention_cached", |dev| {
        attention_cached_case::<f32>(dev, 2, 16, 0, 7, 300);
        attention_cached_case::<f32>(dev, 3, 24, 130, 1, 301);
        attention_cached_case::<bf16>(dev, 2, 64, 0, 5, 302);
        attention_cached_case::<bf16>(dev, 1, 8, 40, 1, 303);
        // a cache shorter than start + n_new is refused before any launch
        let (q, k) = (dev.zeros::<f32>(16).unwrap(), dev.zeros::<f32>(16).unwrap());
        let mut out = dev.zeros::<f32>(16).unwrap();
        let e = dev.attention_cached(&mut out.as_view_mut(), &q.as_view(), &k.as_view(), &k.as_view(), 1, 1, 1, 16);
        assert!(e.is_err(), "a short cache accepted");
    });
}

// ---- classifier ------------------------------------------------------------------------------

fn classifier_case<T: Elem>(dev: &CudaDevice, n_rows: usize, vocab: usize, seed: u64) {
    let tag = format!("classifier {n_rows}x{vocab} {}", T::SUFFIX);
    let mut rng = Rng::new(seed);
    let logits = quantize::<T>(rng.vec(n_rows * vocab, 4.0, 0.0));
    // every other row plus the last one; one selected row ignored (a padding row)
    let rows: Vec<u32> = (0..n_rows as u32).filter(|r| r % 2 == 0 || *r as usize == n_rows - 1).collect();
    let targets: Vec<i32> =
        rows.iter().enumerate().map(|(s, &r)| if s == 1 { -100 } else { ((r as usize * 7919 + 3) % vocab) as i32 }).collect();
    let valid = targets.iter().filter(|&&y| y != -100).count();
    let g = 1.0 / valid as f32;
    // CPU reference: ops::cross_entropy on each selected row (its loss and dlogits).
    let mut want = logits.clone();
    let mut want_losses = Vec::new();
    for (&r, &y) in rows.iter().zip(&targets) {
        let row = &mut want[r as usize * vocab..(r as usize + 1) * vocab];
        want_losses.push(ops::cross_entropy(row, &[y], 1, vocab, Some(g)) as f32);
    }
    let want_total: f64 = want_losses.iter().map(|&l| f64::from(l)).sum();
    let sel = ClassifierRows::new(dev, &rows, &targets, n_rows, vocab).unwrap();
    let run = |dloss: Option<f32>| {
        let mut d_logits = dev.upload(&store::<T>(&logits)).unwrap();
        let mut losses = dev.zeros::<f32>(rows.len()).unwrap();
        let mut total = dev.zeros::<f64>(1).unwrap();
        dev.classifier(&mut d_logits.as_view_mut(), &mut losses.as_view_mut(), &mut total.as_view_mut(), &sel, dloss).unwrap();
        (d_logits, losses, dev.download(&total).unwrap()[0])
    };
    let (d_logits, losses, total) = run(Some(g));
    check(dev, &format!("{tag} dlogits"), &d_logits, &want, T::TOL);
    check(dev, &format!("{tag} row losses"), &losses, &want_losses, F32_TOL);
    assert_close(&format!("{tag} loss sum"), &[total as f32], &[want_total as f32], F32_TOL);
    // rows not selected are untouched (bit for bit)
    let got = load(&dev.download(&d_logits).unwrap());
    for r in (0..n_rows).filter(|r| !rows.contains(&(*r as u32))) {
        assert!(got[r * vocab..(r + 1) * vocab] == logits[r * vocab..(r + 1) * vocab], "{tag}: unselected row {r} changed");
    }
    // the loss alone leaves the logits as they were
    let (d_plain, losses_plain, total_plain) = run(None);
    assert!(load(&dev.download(&d_plain).unwrap()) == logits, "{tag}: loss-only call wrote logits");
    check(dev, &format!("{tag} loss-only row losses"), &losses_plain, &want_losses, F32_TOL);
    assert_eq!(total_plain.to_bits(), total.to_bits(), "{tag}: loss-only total differs");
    let (d_logits2, losses2, total2) = run(Some(g));
    assert_same_bits(dev, &format!("{tag} dlogits"), &d_logits, &d_logits2);
    assert_same_bits(dev, &format!("{tag} losses"), &losses, &losses2);
    assert_eq!(total.to_bits(), total2.to_bits(), "{tag}: loss sums differ");
}

#[test]
fn classifier_f32() {
    on_device("classifier_f32", |dev| {
        classifier_case::<f32>(dev, 13, 1001, 300);
        classifier_case::<f32>(dev, 3, 50257, 301);
        classifier_case::<f32>(dev, 1, 7, 302);
    });
}

#[test]
fn classifier_bf16() {
    on_device("classifier_bf16", |dev| {
        classifier_case::<bf16>(dev, 13, 1001, 310);
        classifier_case::<bf16>(dev, 3, 50257, 311);
        classifier_case::<bf16>(dev, 1, 7, 312);
    });
}

// ---- LayerNorm: residual-fused forward, deterministic backward ---------------------------------

fn residual_layernorm_case<T: Elem>(dev: &CudaDevice, rows: usize, cols: usize, seed: u64) {
    let tag = format!("residual layernorm {rows}x{cols} {}", T::SUFFIX);
    let mut rng = Rng::new(seed);
    let a = quantize::<T>(rng.vec(rows * cols, 2.0, 0.5));
    let b = quantize::<T>(rng.vec(rows * cols, 1.0, 0.0));
    let w = quantize::<T>(rng.vec(cols, 0.5, 1.0));
    let bias = quantize::<T>(rng.vec(cols, 0.2, 0.0));
    let mut res = vec![0f32; rows * cols];
    ops::residual_forward(&mut res, &a, &b);
    let res = quantize::<T>(res); // the residual stream is stored in T
    let (mut out, mut mean, mut rstd) = (vec![0f32; rows * cols], vec![0f32; rows], vec![0f32; rows]);
    ops::layernorm_forward(&mut out, &mut mean, &mut rstd, &res, &w, &bias, rows, cols, 1e-5);
    let up = |x: &[f32]| dev.upload(&store::<T>(x)).unwrap();
    let (da, db, dw, dbias) = (up(&a), up(&b), up(&w), up(&bias));
    let run = || {
        let (mut d_res, mut d_out) = (dev.zeros::<T>(rows * cols).unwrap(), dev.zeros::<T>(rows * cols).unwrap());
        let (mut d_mean, mut d_rstd) = (dev.zeros::<f32>(rows).unwrap(), dev.zeros::<f32>(rows).unwrap());
        dev.residual_layernorm_forward(
            &mut d_res.as_view_mut(),
            &mut d_out.as_view_mut(),
            &mut d_mean.as_view_mut(),
            &mut d_rstd.as_view_mut(),
            &da.as_view(),
            &db.as_view(),
            &dw.as_view(),
            &dbias.as_view(),
            rows,
            cols,
            1e-5,
        )
        .unwrap();
        (d_res, d_out, d_mean, d_rstd)
    };
    let (d_res, d_out, d_mean, d_rstd) = run();
    check(dev, &format!("{tag} residual"), &d_res, &res, T::TOL);
    check(dev, &format!("{tag} out"), &d_out, &out, T::TOL);
    check(dev, &format!("{tag} mean"), &d_mean, &mean, F32_TOL);
    check(dev, &format!("{tag} rstd"), &d_rstd, &rstd, F32_TOL);
    let (_, d_out2, _, d_rstd2) = run();
    assert_same_bits(dev, &format!("{tag} out"), &d_out, &d_out2);
    assert_same_bits(dev, &format!("{tag} rstd"), &d_rstd, &d_rstd2);
}

/// The LayerNorm backward (checked against the CPU in cuda_kernels.rs) on more rows than one
/// reduction segment, twice from the same gradients: identical bits.
fn layernorm_backward_determinism<T: Elem>(dev: &CudaDevice, rows: usize, cols: usize, seed: u64) {
    let tag = format!("layernorm backward {rows}x{cols} {}", T::SUFFIX);
    let mut rng = Rng::new(seed);
    let x = quantize::<T>(rng.vec(rows * cols, 2.0, 0.5));
    let w = quantize::<T>(rng.vec(cols, 0.5, 1.0));
    let b = quantize::<T>(rng.vec(cols, 0.2, 0.0));
    let (mut out, mut mean, mut rstd) = (vec![0f32; rows * cols], vec![0f32; rows], vec![0f32; rows]);
    ops::layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, rows, cols, 1e-5);
    let dout = quantize::<T>(rng.vec(rows * cols, 1.0, 0.0));
    let (mut dinp, mut dweight, mut dbias) = (vec![0f32; rows * cols], rng.vec(cols, 0.5, 0.0), rng.vec(cols, 0.5, 0.0));
    let (dw0, db0) = (dweight.clone(), dbias.clone());
    ops::layernorm_backward(&mut dinp, &mut dweight, &mut dbias, &dout, &x, &w, &mean, &rstd, rows, cols);
    let (dx, dwt, ddy) =
        (dev.upload(&store::<T>(&x)).unwrap(), dev.upload(&store::<T>(&w)).unwrap(), dev.upload(&store::<T>(&dout)).unwrap());
    let (dm, dr) = (dev.upload(&mean).unwrap(), dev.upload(&rstd).unwrap());
    let run = || {
        let mut d_dinp = dev.zeros::<T>(rows * cols).unwrap();
        let (mut d_dw, mut d_db) = (dev.upload(&dw0).unwrap(), dev.upload(&db0).unwrap());
        let mut scratch = dev.zeros::<f32>(lmtrain_cuda::layernorm_backward_scratch(rows, cols)).unwrap();
        dev.layernorm_backward(
            &mut d_dinp.as_view_mut(),
            &mut d_dw.as_view_mut(),
            &mut d_db.as_view_mut(),
            &mut scratch.as_view_mut(),
            &ddy.as_view(),
            &dx.as_view(),
            &dwt.as_view(),
            &dm.as_view(),
            &dr.as_view(),
            rows,
            cols,
        )
        .unwrap();
        (d_dinp, d_dw, d_db)
    };
    let (a_dx, a_dw, a_db) = run();
    check(dev, &format!("{tag} dinp"), &a_dx, &dinp, T::TOL);
    check(dev, &format!("{tag} dweight"), &a_dw, &dweight, F32_TOL);
    check(dev, &format!("{tag} dbias"), &a_db, &dbias, F32_TOL);
    let (b_dx, b_dw, b_db) = run();
    assert_same_bits(dev, &format!("{tag} dinp"), &a_dx, &b_dx);
    assert_same_bits(dev, &format!("{tag} dweight"), &a_dw, &b_dw);
    assert_same_bits(dev, &format!("{tag} dbias"), &a_db, &b_db);
}

#[test]
fn layernorm_fused_f32() {
    on_device("layernorm_fused_f32", |dev| {
        residual_layernorm_case::<f32>(dev, 129, 771, 400);
        residual_layernorm_case::<f32>(dev, 1, 45, 401);
        layernorm_backward_determinism::<f32>(dev, 129, 771, 402);
        layernorm_backward_determinism::<f32>(dev, 7, 45, 403);
    });
}

#[test]
fn layernorm_fused_bf16() {
    on_device("layernorm_fused_bf16", |dev| {
        residual_layernorm_case::<bf16>(dev, 129, 771, 410);
        residual_layernorm_case::<bf16>(dev, 1, 45, 411);
        layernorm_backward_determinism::<bf16>(dev, 129, 771, 412);
        layernorm_backward_determinism::<bf16>(dev, 7, 45, 413);
    });
}

// ---- DeBERTa ---------------------------------------------------------------------------------

struct DebertaCase {
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
    c2p: bool,
    p2c: bool,
    pad: bool,
    p: f32,
    rel: RelPositions,
}

fn deberta_case<T: Elem>(dev: &CudaDevice, k: &DebertaCase, seed: u64) {
    let terms = usize::from(k.c2p) + usize::from(k.p2c);
    let s = DisentangledShape { attn: AttnShape { b: k.b, t: k.t, n_head: k.nh, head_size: k.hs }, rel: k.rel, scale_factor: 1 + terms };
    let tag = format!(
        "disentangled b{} t{} h{} hs{} c2p={} p2c={} pad={} p={} {:?} {}",
        k.b,
        k.t,
        k.nh,
        k.hs,
        k.c2p,
        k.p2c,
        k.pad,
        k.p,
        k.rel,
        T::SUFFIX
    );
    let (c, rows, n) = (s.attn.channels(), s.rel_rows(), k.b * k.t);
    let mut rng = Rng::new(seed);
    let qkv = quantize::<T>(rng.vec(n * 3 * c, 1.5, 0.0));
    let pk = quantize::<T>(rng.vec(rows * c, 1.5, 0.0));
    let pq = quantize::<T>(rng.vec(rows * c, 1.5, 0.0));
    let kp = key_padding(k.b, k.t);
    let kp_opt = k.pad.then_some(kp.as_slice());
    let drop = Dropout { p: k.p, seed: 0xDEB ^ seed };
    let (cpk, cpq) = (k.c2p.then_some(pk.as_slice()), k.p2c.then_some(pq.as_slice()));
    let (mut out, mut probs) = (vec![0f32; n * c], vec![0f32; s.attn.probs_len()]);
    ops::disentangled_attention_forward(&mut out, &mut probs, &qkv, cpk, cpq, s, kp_opt, drop);
    let dout = quantize::<T>(rng.vec(n * c, 1.0, 0.0));
    let (dqkv0, dpk0, dpq0) = (
        quantize::<T>(rng.vec(n * 3 * c, 0.1, 0.0)),
        quantize::<T>(rng.vec(rows * c, 0.1, 0.0)),
        quantize::<T>(rng.vec(rows * c, 0.1, 0.0)),
    );
    let (mut dqkv, mut dpk, mut dpq) = (dqkv0.clone(), dpk0.clone(), dpq0.clone());
    ops::disentangled_attention_backward(
        &mut dqkv,
        k.c2p.then_some(&mut dpk[..]),
        k.p2c.then_some(&mut dpq[..]),
        &dout,
        &qkv,
        cpk,
        cpq,
        &probs,
        s,
        kp_opt,
        drop,
    );

    let up = |x: &[f32]| dev.upload(&store::<T>(x)).unwrap();
    let (d_qkv, d_pk, d_pq, d_dout) = (up(&qkv), up(&pk), up(&pq), up(&dout));
    let (v_pk, v_pq) = (d_pk.as_view(), d_pq.as_view());
    let (g_pk, g_pq) = (k.c2p.then_some(&v_pk), k.p2c.then_some(&v_pq));
    let d_kv = dev.upload(&kp.iter().map(|&v| u8::from(v)).collect::<Vec<u8>>()).unwrap();
    let kv_view = d_kv.as_view();
    let kv = k.pad.then_some(&kv_view);
    let rel = RelTables::new(dev, &s).unwrap();
    let run = || {
        let mut d_out = dev.zeros::<T>(n * c).unwrap();
        let mut d_probs = dev.zeros::<f32>(s.attn.probs_len()).unwrap();
        dev.disentangled_attention_forward(
            &mut d_out.as_view_mut(),
            &mut d_probs.as_view_mut(),
            &d_qkv.as_view(),
            g_pk,
            g_pq,
            kv,
            &rel,
            s,
            drop,
        )
        .unwrap();
        let (mut d_dqkv, mut d_dpk, mut d_dpq) = (up(&dqkv0), up(&dpk0), up(&dpq0));
        let mut scratch = dev.zeros::<f32>(disentangled_backward_scratch(s)).unwrap();
        let (mut vk, mut vq) = (d_dpk.as_view_mut(), d_dpq.as_view_mut());
        dev.disentangled_attention_backward(
            &mut d_dqkv.as_view_mut(),
            k.c2p.then_some(&mut vk),
            k.p2c.then_some(&mut vq),
            &mut scratch.as_view_mut(),
            &d_dout.as_view(),
            &d_qkv.as_view(),
            g_pk,
            g_pq,
            &d_probs.as_view(),
            kv,
            &rel,
            s,
            drop,
        )
        .unwrap();
        (d_out, d_probs, d_dqkv, d_dpk, d_dpq)
    };
    let (d_out, d_probs, d_dqkv, d_dpk, d_dpq) = run();
    check(dev, &format!("{tag} forward out"), &d_out, &out, T::TOL);
    check(dev, &format!("{tag} forward probabilities"), &d_probs, &probs, F32_TOL);
    check(dev, &format!("{tag} backward dqkv"), &d_dqkv, &dqkv, T::TOL);
    check(dev, &format!("{tag} backward dpos_key"), &d_dpk, &dpk, T::TOL);
    check(dev, &format!("{tag} backward dpos_query"), &d_dpq, &dpq, T::TOL);
    let (out2, probs2, dqkv2, dpk2, dpq2) = run();
    assert_same_bits(dev, &format!("{tag} out"), &d_out, &out2);
    assert_same_bits(dev, &format!("{tag} probabilities"), &d_probs, &probs2);
    assert_same_bits(dev, &format!("{tag} dqkv"), &d_dqkv, &dqkv2);
    assert_same_bits(dev, &format!("{tag} dpos_key"), &d_dpk, &dpk2);
    assert_same_bits(dev, &format!("{tag} dpos_query"), &d_dpq, &dpq2);
    // tables of another sequence length are refused before the launch
    let other = RelTables::new(dev, &DisentangledShape { attn: AttnShape { t: k.t + 1, ..s.attn }, ..s }).unwrap();
    let (mut o, mut p) = (dev.zeros::<T>(n * c).unwrap(), dev.zeros::<f32>(s.attn.probs_len()).unwrap());
    let e =
        dev.disentangled_attention_forward(&mut o.as_view_mut(), &mut p.as_view_mut(), &d_qkv.as_view(), g_pk, g_pq, kv, &other, s, drop);
    assert!(e.is_err(), "{tag}: tables of t + 1");
}

/// Log buckets shorter than the sequence (clamped and bucketed rows), no buckets at a span
/// shorter than the sequence, a single token, and no position terms; C = 48, 16, 40, 24.
const DEBERTA_CASES: &[DebertaCase] = &[
    DebertaCase {
        b: 2,
        t: 7,
        nh: 2,
        hs: 24,
        c2p: true,
        p2c: true,
        pad: true,
        p: 0.1,
        rel: RelPositions { span: 4, buckets: 4, max_position: 12 },
    },
    DebertaCase {
        b: 1,
        t: 1,
        nh: 2,
        hs: 8,
        c2p: true,
        p2c: false,
        pad: false,
        p: 0.0,
        rel: RelPositions { span: 4, buckets: 4, max_position: 12 },
    },
    DebertaCase {
        b: 2,
        t: 129,
        nh: 1,
        hs: 40,
        c2p: false,
        p2c: true,
        pad: true,
        p: 0.2,
        rel: RelPositions { span: 48, buckets: 0, max_position: 48 },
    },
    DebertaCase {
        b: 3,
        t: 9,
        nh: 3,
        hs: 8,
        c2p: false,
        p2c: false,
        pad: true,
        p: 0.1,
        rel: RelPositions { span: 4, buckets: 0, max_position: 4 },
    },
    DebertaCase {
        b: 1,
        t: 129,
        nh: 2,
        hs: 12,
        c2p: true,
        p2c: true,
        pad: false,
        p: 0.0,
        rel: RelPositions { span: 32, buckets: 32, max_position: 256 },
    },
];

fn conv1d_case<T: Elem>(dev: &CudaDevice, b: usize, t: usize, c: usize, k: usize, seed: u64) {
    let tag = format!("conv1d b{b} t{t} c{c} k{k} {}", T::SUFFIX);
    let mut rng = Rng::new(seed);
    let (x, dcol, dx0) = (
        quantize::<T>(rng.vec(b * t * c, 1.0, 0.0)),
        quantize::<T>(rng.vec(b * t * c * k, 1.0, 0.0)),
        quantize::<T>(rng.vec(b * t * c, 0.1, 0.0)),
    );
    let (mut col, mut dx) = (vec![0f32; b * t * c * k], dx0.clone());
    ops::conv1d_unfold(&mut col, &x, b, t, c, k);
    ops::conv1d_fold(&mut dx, &dcol, b, t, c, k);
    let up = |v: &[f32]| dev.upload(&store::<T>(v)).unwrap();
    let (d_x, d_dcol) = (up(&x), up(&dcol));
    let run = || {
        let (mut d_col, mut d_dx) = (dev.zeros::<T>(b * t * c * k).unwrap(), up(&dx0));
        dev.conv1d_unfold(&mut d_col.as_view_mut(), &d_x.as_view(), b, t, c, k).unwrap();
        dev.conv1d_fold(&mut d_dx.as_view_mut(), &d_dcol.as_view(), b, t, c, k).unwrap();
        (d_col, d_dx)
    };
    let (d_col, d_dx) = run();
    // the unfold copies: exact
    assert_eq!(load(&dev.download(&d_col).unwrap()), col, "{tag}: unfold");
    check(dev, &format!("{tag} fold"), &d_dx, &dx, T::TOL);
    let (_, d_dx2) = run();
    assert_same_bits(dev, &format!("{tag} fold"), &d_dx, &d_dx2);
}

#[test]
fn deberta_f32() {
    on_device("deberta_f32", |dev| {
        for (i, k) in DEBERTA_CASES.iter().enumerate() {
            deberta_case::<f32>(dev, k, 300 + i as u64);
        }
        conv1d_case::<f32>(dev, 2, 7, 45, 3, 310);
        conv1d_case::<f32>(dev, 1, 1, 5, 5, 311);
        conv1d_case::<f32>(dev, 2, 129, 13, 3, 312);
    });
}

#[test]
fn deberta_bf16() {
    on_device("deberta_bf16", |dev| {
        for (i, k) in DEBERTA_CASES.iter().enumerate() {
            deberta_case::<bf16>(dev, k, 320 + i as u64);
        }
        conv1d_case::<bf16>(dev, 2, 7, 45, 3, 330);
        conv1d_case::<bf16>(dev, 2, 129, 13, 5, 331);
    });
}

// ---- embeddings ------------------------------------------------------------------------------

/// `explicit`: explicit position ids and token types; `pos_table`: the model has a position table
/// (without one, DeBERTa-v3's, its gradient stays untouched).
fn embedding_case<T: Elem>(dev: &CudaDevice, b: usize, t: usize, c: usize, explicit: bool, pos_table: bool, seed: u64) {
    let (vocab, n_pos, n_types) = (101, t + 11, 2);
    let tag = format!("embedding b{b} t{t} c{c} explicit={explicit} pos_table={pos_table} {}", T::SUFFIX);
    let mut rng = Rng::new(seed);
    let n = b * t;
    // a small vocabulary: ids repeat, so the backward buckets hold several rows
    let ids: Vec<u32> = (0..n).map(|i| ((i * 37 + 11) % 23) as u32 * 4 % vocab as u32).collect();
    let pos_ids: Vec<u32> = (0..n).map(|i| ((i % t) * 3 / 2 + 1).min(n_pos - 1) as u32).collect();
    let type_ids: Vec<u32> = (0..n).map(|i| u32::from(i % t >= t / 2)).collect();
    let wte = quantize::<T>(rng.vec(vocab * c, 1.0, 0.0));
    let wpe = quantize::<T>(rng.vec(n_pos * c, 0.5, 0.0));
    let tte = quantize::<T>(rng.vec(n_types * c, 0.5, 0.0));
    let dout = quantize::<T>(rng.vec(n * c, 1.0, 0.0));
    let (dwte0, dwpe0, dtte0) = (rng.vec(vocab * c, 0.1, 0.0), rng.vec(n_pos * c, 0.1, 0.0), rng.vec(n_types * c, 0.1, 0.0));
    let (mut out, mut dwte, mut dwpe, mut dtte) = (vec![0f32; n * c], dwte0.clone(), dwpe0.clone(), dtte0.clone());
    // Reference: the CPU backend, with explicit position ids and token types, or positions 0..t
    let host = lmtrain_backend::HostBatch {
        b,
        t,
        input_ids: &ids,
        targets: None,
        attention_mask: None,
        token_type_ids: explicit.then_some(type_ids.as_slice()),
        position_ids: explicit.then_some(pos_ids.as_slice()),
    };
    let inp = lmtrain_backend::Inputs::new(&host);
    let tables = lmtrain_backend::EmbeddingTables {
        word: &wte[..],
        position: pos_table.then_some(&wpe[..]),
        token_type: explicit.then_some(&tte[..]),
    };
    ops::embedding_forward(&mut out, tables, &inp, c);
    let grads = lmtrain_backend::EmbeddingTables {
        word: &mut dwte[..],
        position: pos_table.then_some(&mut dwpe[..]),
        token_type: explicit.then_some(&mut dtte[..]),
    };
    ops::embedding_backward(grads, &dout, &inp, c, Default::default());
    let positions = match (pos_table, explicit) {
        (false, _) => Positions::None,
        (true, true) => Positions::Explicit(&pos_ids),
        (true, false) => Positions::Offset(0),
    };
    let types = explicit.then_some(type_ids.as_slice());
    let batch = EmbeddingBatch::new(dev, b, t, &ids, positions, types, vocab, n_pos, n_types).unwrap();
    let up = |x: &[f32]| dev.upload(&store::<T>(x)).unwrap();
    let (d_wte, d_wpe, d_tte, d_dout) = (up(&wte), up(&wpe), up(&tte), up(&dout));
    let tte_view = d_tte.as_view();
    let mut d_out = dev.zeros::<T>(n * c).unwrap();
    dev.embedding_forward(
        &mut d_out.as_view_mut(),
        &batch,
        &d_wte.as_view(),
        pos_table.then_some(&d_wpe.as_view()),
        explicit.then_some(&tte_view),
    )
    .unwrap();
    check(dev, &format!("{tag} forward"), &d_out, &out, T::TOL);
    let run = || {
        let (mut a, mut p, mut ty) = (dev.upload(&dwte0).unwrap(), dev.upload(&dwpe0).unwrap(), dev.upload(&dtte0).unwrap());
        let mut ty_view = ty.as_view_mut();
        dev.embedding_backward(
            &mut a.as_view_mut(),
            pos_table.then_some(&mut p.as_view_mut()),
            explicit.then_some(&mut ty_view),
            &d_dout.as_view(),
            &batch,
        )
        .unwrap();
        (a, p, ty)
    };
    let (a, p, ty) = run();
    check(dev, &format!("{tag} backward dwte"), &a, &dwte, F32_TOL);
    check(dev, &format!("{tag} backward dwpe"), &p, &dwpe, F32_TOL);
    check(dev, &format!("{tag} backward dtte"), &ty, &dtte, F32_TOL);
    let (a2, p2, ty2) = run();
    assert_same_bits(dev, &format!("{tag} dwte"), &a, &a2);
    assert_same_bits(dev, &format!("{tag} dwpe"), &p, &p2);
    assert_same_bits(dev, &format!("{tag} dtte"), &ty, &ty2);
    // ids outside the table are refused before anything reaches the device
    let mut bad = ids.clone();
    bad[n - 1] = vocab as u32;
    assert!(EmbeddingBatch::new(dev, b, t, &bad, positions, types, vocab, n_pos, n_types).is_err());
}

#[test]
fn embedding_f32() {
    on_device("embedding_f32", |dev| {
        embedding_case::<f32>(dev, 2, 7, 45, false, true, 500);
        embedding_case::<f32>(dev, 1, 129, 771, false, true, 501);
        embedding_case::<f32>(dev, 3, 127, 45, true, true, 502);
        embedding_case::<f32>(dev, 2, 1, 45, true, true, 503);
        embedding_case::<f32>(dev, 2, 7, 45, true, false, 504);
        embedding_case::<f32>(dev, 1, 129, 771, false, false, 505);
    });
}

#[test]
fn embedding_bf16() {
    on_device("embedding_bf16", |dev| {
        embedding_case::<bf16>(dev, 2, 7, 45, false, true, 510);
        embedding_case::<bf16>(dev, 1, 129, 771, false, true, 511);
        embedding_case::<bf16>(dev, 3, 127, 45, true, true, 512);
        embedding_case::<bf16>(dev, 2, 1, 45, true, true, 513);
        embedding_case::<bf16>(dev, 2, 7, 45, true, false, 514);
    });
}

// ---- gradient norm, clipping folded into AdamW, stochastic rounding ----------------------------

fn norm_case<T: Elem>(dev: &CudaDevice, n: usize, seed: u64) {
    let tag = format!("grad norm n={n} {}", T::SUFFIX);
    let g = quantize::<T>(Rng::new(seed).vec(n, 0.05, 0.0));
    let want = ops::global_norm(&g);
    let dg = dev.upload(&store::<T>(&g)).unwrap();
    let run = |max_norm: f32| {
        let mut out = dev.zeros::<f32>(2).unwrap();
        let mut scratch = dev.zeros::<f64>(lmtrain_cuda::grad_norm_scratch(n)).unwrap();
        dev.grad_norm(&mut out.as_view_mut(), &mut scratch.as_view_mut(), &dg.as_view(), max_norm).unwrap();
        dev.download(&out).unwrap()
    };
    let got = run(1.0);
    assert_close(&tag, &got[..1], &[want], F32_TOL);
    // plain reference of torch's clip_grad_norm_ factor (lmtrain_optim::clip_scale)
    let clip = |max_norm: f32| if max_norm <= 0.0 { 1.0 } else { (max_norm / (want + 1e-6)).min(1.0) };
    for max_norm in [1.0, 0.5 * want, 0.0] {
        let got = run(max_norm);
        assert_close(&format!("{tag} clip({max_norm})"), &got[1..], &[clip(max_norm)], F32_TOL);
    }
    assert_eq!(run(1.0)[0].to_bits(), got[0].to_bits(), "{tag}: two launches differ");
}

#[test]
fn grad_norm_and_clip() {
    on_device("grad_norm_and_clip", |dev| {
        norm_case::<f32>(dev, 3001, 600);
        norm_case::<f32>(dev, 300_007, 601);
        norm_case::<bf16>(dev, 300_007, 602);
        norm_case::<f32>(dev, 1, 603);
        // AdamW reads the clipping factor from the device: equal to the CPU step with
        // grad_scale * clip.
        let n = 3001;
        let mut rng = Rng::new(604);
        let (p0, g) = (rng.vec(n, 1.0, 0.0), rng.vec(n, 0.5, 0.0));
        let norm = ops::global_norm(&g);
        let max_norm = 0.25 * norm;
        let clip = (max_norm / (norm + 1e-6)).min(1.0);
        let hp = lmtrain_backend::AdamWHyper { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 1, grad_scale: 0.7 };
        let segs = [lmtrain_backend::DecaySegment { offset: 0, len: n, weight_decay: 0.1 }];
        let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
        ops::adamw_update(&mut p, &g, &mut m, &mut v, &segs, &lmtrain_backend::AdamWHyper { grad_scale: 0.7 * clip, ..hp });
        let dg = dev.upload(&g).unwrap();
        let mut out = dev.zeros::<f32>(2).unwrap();
        let mut scratch = dev.zeros::<f64>(lmtrain_cuda::grad_norm_scratch(n)).unwrap();
        dev.grad_norm(&mut out.as_view_mut(), &mut scratch.as_view_mut(), &dg.as_view(), max_norm).unwrap();
        let (mut dp, mut dm, mut dv) = (dev.upload(&p0).unwrap(), dev.zeros::<f32>(n).unwrap(), dev.zeros::<f32>(n).unwrap());
        dev.adamw_update(
            &mut dp.as_view_mut(),
            &dg.as_view(),
            &mut dm.as_view_mut(),
            &mut dv.as_view_mut(),
            Some(&out.as_view()),
            &segs,
            &hp,
        )
        .unwrap();
        check(dev, "adamw with device clip: params", &dp, &p, F32_TOL);
        check(dev, "adamw with device clip: m", &dm, &m, F32_TOL);
    });
}

/// The bf16 working copy is rounded stochastically: every value is one of the two bf16
/// neighbours of the f32 master, the mean is unbiased (round-to-nearest would be off by 50
/// standard deviations here), and the bits depend only on the seed.
#[test]
fn adamw_bf16_stochastic_rounding() {
    on_device("adamw_bf16_stochastic_rounding", |dev| {
        let n = 20_000;
        let x = 1.0f32 + 1.0 / 1024.0; // 1/8 of the bf16 step above 1.0
        let master = vec![x; n];
        // lr = 0: the master stays, only the bf16 copy is written
        let hp = lmtrain_backend::AdamWHyper { lr: 0.0, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 1, grad_scale: 1.0 };
        let segs = [
            lmtrain_backend::DecaySegment { offset: 0, len: 7001, weight_decay: 0.1 },
            lmtrain_backend::DecaySegment { offset: 7001, len: n - 7001, weight_decay: 0.0 },
        ];
        let run = |seed: u64| {
            let mut dw = dev.upload(&master).unwrap();
            let mut dp = dev.zeros::<bf16>(n).unwrap();
            let g = dev.zeros::<bf16>(n).unwrap();
            let (mut dm, mut dv) = (dev.zeros::<f32>(n).unwrap(), dev.zeros::<f32>(n).unwrap());
            dev.adamw_update_bf16(
                &mut dw.as_view_mut(),
                &mut dp.as_view_mut(),
                &g.as_view(),
                &mut dm.as_view_mut(),
                &mut dv.as_view_mut(),
                None,
                &segs,
                &hp,
                seed,
            )
            .unwrap();
            load(&dev.download(&dp).unwrap())
        };
        let a = run(1);
        let (lo, hi) = (1.0f32, 1.0 + 1.0 / 128.0);
        assert!(a.iter().all(|&v| v == lo || v == hi), "a value is not a bf16 neighbour of {x}");
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        println!("stochastic rounding: mean {mean:.6} for {x:.6} ({} of {n} rounded up)", a.iter().filter(|&&v| v == hi).count());
        assert!((mean - f64::from(x)).abs() < 2e-4, "biased: mean {mean} for {x}");
        assert!(run(1) == a, "same seed, different bits");
        assert!(run(2) != a, "the seed does not change the rounding");
    });
}

// ---- bias gradient, dropout ---------------------------------------------------------------------

fn bias_case<T: Elem>(dev: &CudaDevice, rows: usize, cols: usize, seed: u64) {
    let tag = format!("bias backward {rows}x{cols} {}", T::SUFFIX);
    let mut rng = Rng::new(seed);
    let dout = quantize::<T>(rng.vec(rows * cols, 1.0, 0.0));
    let db0 = rng.vec(cols, 0.5, 0.0);
    let mut want = db0.clone();
    ops::bias_backward(&mut want, &dout, rows, cols);
    let dd = dev.upload(&store::<T>(&dout)).unwrap();
    let run = || {
        let mut db = dev.upload(&db0).unwrap();
        let mut scratch = dev.zeros::<f32>(lmtrain_cuda::bias_backward_scratch(rows, cols)).unwrap();
        dev.bias_backward(&mut db.as_view_mut(), &mut scratch.as_view_mut(), &dd.as_view(), rows, cols).unwrap();
        db
    };
    let a = run();
    check(dev, &tag, &a, &want, F32_TOL);
    assert_same_bits(dev, &tag, &a, &run());
}

fn dropout_case<T: Elem>(dev: &CudaDevice, n: usize, p: f32, seed: u64) {
    let tag = format!("dropout n={n} p={p} {}", T::SUFFIX);
    let x = quantize::<T>(Rng::new(seed).vec(n, 1.0, 0.0));
    let d = Dropout { p, seed: seed * 31 };
    let mut want = x.clone();
    ops::dropout_inplace(&mut want, d);
    let mut dx = dev.upload(&store::<T>(&x)).unwrap();
    dev.dropout_inplace(&mut dx.as_view_mut(), d).unwrap();
    let got = load(&dev.download(&dx).unwrap());
    // the same elements are dropped, exactly
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g == 0.0, w == 0.0, "{tag}: element {i} dropped on one side only");
    }
    check(dev, &tag, &dx, &want, T::TOL);
}

#[test]
fn bias_and_dropout() {
    on_device("bias_and_dropout", |dev| {
        bias_case::<f32>(dev, 129, 771, 700);
        bias_case::<f32>(dev, 1, 45, 701);
        bias_case::<bf16>(dev, 127, 771, 702);
        dropout_case::<f32>(dev, 10007, 0.1, 703);
        dropout_case::<bf16>(dev, 10007, 0.3, 704);
    });
}

/// Every device test above, once more in one child whose fake libraries are built with
/// AddressSanitizer.
#[test]
fn address_sanitizer_pass() {
    const ALL: &[&str] = &[
        "attention_f32",
        "attention_bf16",
        "attention_cached",
        "classifier_f32",
        "classifier_bf16",
        "layernorm_fused_f32",
        "layernorm_fused_bf16",
        "deberta_f32",
        "deberta_bf16",
        "embedding_f32",
        "embedding_bf16",
        "grad_norm_and_clip",
        "adamw_bf16_stochastic_rounding",
        "bias_and_dropout",
    ];
    match support::mode() {
        Mode::Direct => {}
        Mode::Skip(why) => support::skip("address_sanitizer_pass", why),
        Mode::Emulate(_) => match (lmtrain_cuda_emu::ASAN_DIR, lmtrain_cuda_emu::ASAN_RUNTIME) {
            (Some(dir), Some(rt)) => {
                run_children(ALL, &Child { lib_dir: dir, order: "forward", asan_runtime: Some(rt), allow_emulator: true })
            }
            _ => support::skip("address_sanitizer_pass", "the host compiler has no AddressSanitizer runtime"),
        },
    }
}

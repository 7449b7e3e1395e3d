//! The fused kernels (attention, classifier, deterministic LayerNorm, embeddings, AdamW with
//! stochastic rounding and the global norm, bias gradients, dropout) launched from Rust through
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
use lmtrain_backend::{AttnMask, AttnShape, Dropout};
use lmtrain_cpu::ops;
use lmtrain_cuda::{AttnOptions, CudaDevice};
use support::{
    Child, Elem, F32_TOL, Mode, Rng, assert_close, check, load, on_device, quantize,
    run_children, store,
};

/// The bits of a device buffer, for the determinism checks.
fn bits<T: Elem>(dev: &CudaDevice, buf: &CudaSlice<T>) -> Vec<u32> {
    load(&dev.download(buf).unwrap())
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn assert_same_bits<T: Elem>(dev: &CudaDevice, what: &str, a: &CudaSlice<T>, b: &CudaSlice<T>) {
    assert!(
        bits(dev, a) == bits(dev, b),
        "{what}: two launches gave different bits"
    );
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
                lse[(bi * s.n_head + h) * s.t + i] = if scores.is_empty() {
                    f32::NEG_INFINITY
                } else {
                    (m + scores.iter().map(|x| (x - m).exp()).sum::<f64>().ln()) as f32
                };
            }
        }
    }
    lse
}

fn attention_case<T: Elem>(dev: &CudaDevice, k: &AttnCase, seed: u64) {
    let s = AttnShape {
        b: k.b,
        t: k.t,
        n_head: k.nh,
        head_size: k.hs,
    };
    let tag = format!(
        "attention b{} t{} h{} hs{} causal={} pad={} p={} {}",
        k.b,
        k.t,
        k.nh,
        k.hs,
        k.causal,
        k.pad,
        k.p,
        T::SUFFIX
    );
    let c = s.channels();
    let mut rng = Rng::new(seed);
    let qkv = quantize::<T>(rng.vec(k.b * k.t * 3 * c, 1.5, 0.0));
    let kp = key_padding(k.b, k.t);
    let kp_opt = k.pad.then_some(kp.as_slice());
    let drop = Dropout {
        p: k.p,
        seed: 0x5EED ^ seed,
    };
    let mask = AttnMask {
        causal: k.causal,
        key_padding: kp_opt,
    };
    let (mut out, mut probs) = (vec![0f32; k.b * k.t * c], vec![0f32; s.probs_len()]);
    ops::attention_forward(&mut out, &mut probs, &qkv, s, mask, drop);
    let lse = lse_reference(&qkv, s, k.causal, kp_opt);

    let d_qkv = dev.upload(&store::<T>(&qkv)).unwrap();
    let kv_bytes: Vec<u8> = kp.iter().map(|&v| u8::from(v)).collect();
    let d_kv = dev.upload(&kv_bytes).unwrap();
    let kv_view = d_kv.as_view();
    let opt = AttnOptions {
        causal: k.causal,
        key_valid: k.pad.then_some(&kv_view),
        dropout: drop,
    };
    let run_forward = || {
        let mut d_out = dev.zeros::<T>(k.b * k.t * c).unwrap();
        let mut d_lse = dev.zeros::<f32>(k.b * k.nh * k.t).unwrap();
        dev.attention_forward(
            &mut d_out.as_view_mut(),
            &mut d_lse.as_view_mut(),
            &d_qkv.as_view(),
            s,
            opt,
        )
        .unwrap();
        (d_out, d_lse)
    };
    let (d_out, d_lse) = run_forward();
    check(dev, &format!("{tag} forward out"), &d_out, &out, T::TOL);
    let got_lse = dev.download(&d_lse).unwrap();
    for (i, (&g, &w)) in got_lse.iter().zip(&lse).enumerate() {
        assert!(
            (g == w) || (g.is_finite() && w.is_finite()),
            "{tag}: lse[{i}] = {g}, want {w}"
        );
    }
    let finite = |x: &[f32]| x.iter().map(|&v| if v.is_finite() { v } else { 0.0 }).collect::<Vec<_>>();
    assert_close(
        &format!("{tag} forward lse"),
        &finite(&got_lse),
        &finite(&lse),
        F32_TOL,
    );

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
    });
}

/// Every device test above, once more in one child whose fake libraries are built with
/// AddressSanitizer.
#[test]
fn address_sanitizer_pass() {
    const ALL: &[&str] = &["attention_f32", "attention_bf16"];
    match support::mode() {
        Mode::Direct => {}
        Mode::Skip(why) => support::skip("address_sanitizer_pass", why),
        Mode::Emulate(_) => match (
            option_env!("LMTRAIN_CUEMU_ASAN_DIR"),
            option_env!("LMTRAIN_CUEMU_ASAN_RUNTIME"),
        ) {
            (Some(dir), Some(rt)) => run_children(
                ALL,
                &Child {
                    lib_dir: dir,
                    order: "forward",
                    asan_runtime: Some(rt),
                    allow_emulator: true,
                },
            ),
            _ => support::skip(
                "address_sanitizer_pass",
                "the host compiler has no AddressSanitizer runtime",
            ),
        },
    }
}

//! The optimizer's ops: AdamW update and the global gradient norm.

use lmtrain_backend::{AdamWHyper, DecaySegment};
use rayon::prelude::*;

use super::CHUNK;

/// torch.optim.AdamW semantics (decoupled decay: p -= lr*wd*p, then Adam with bias correction);
/// grads are multiplied by hp.grad_scale first; segments cover the whole buffer.
pub fn adamw_update(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], segments: &[DecaySegment], hp: &AdamWHyper) {
    let n = params.len();
    assert!(grads.len() == n && m.len() == n && v.len() == n, "adamw_update: length mismatch");
    assert!(hp.step >= 1, "adamw_update: step is 1-based");
    let covered: usize = segments.iter().map(|s| s.len).sum();
    assert_eq!(covered, n, "adamw_update: segments cover {covered} of {n} parameters");
    // the bias corrections every backend shares (torch's, in double precision)
    let (step_size, bc2_sqrt) = hp.bias_corrections();
    let k = AdamConsts { b1: hp.beta1, b2: hp.beta2, eps: hp.eps, gs: hp.grad_scale, step_size, bc2_sqrt, decay: 1.0 };
    for seg in segments {
        let r = seg.offset..seg.offset + seg.len;
        let k = AdamConsts { decay: 1.0 - hp.lr * seg.weight_decay, ..k };
        params[r.clone()]
            .par_chunks_mut(CHUNK)
            .zip(grads[r.clone()].par_chunks(CHUNK))
            .zip(m[r.clone()].par_chunks_mut(CHUNK).zip(v[r].par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| dispatch!(adamw_rows, adamw_rows_avx512, adamw_rows_avx2, p, g, m, v, k));
    }
}

/// The per-element constants of one AdamW segment.
#[derive(Clone, Copy)]
struct AdamConsts {
    b1: f32,
    b2: f32,
    eps: f32,
    gs: f32,
    step_size: f32,
    bc2_sqrt: f32,
    decay: f32,
}

/// One chunk of [`adamw_update`]. Only correctly rounded operations (`sqrt`, `/`, no fused
/// multiply-add), so the AVX-512, AVX2 and portable builds give the same bits.
#[inline(always)]
fn adamw_rows(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: AdamConsts) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * k.gs;
        *p *= k.decay;
        *m += (g - *m) * (1.0 - k.b1); // lerp, as torch
        *v = *v * k.b2 + (1.0 - k.b2) * g * g;
        let denom = v.sqrt() / k.bc2_sqrt + k.eps;
        *p -= k.step_size * (*m / denom);
    }
}
avx2_version!(adamw_rows_avx2, adamw_rows, (p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: AdamConsts) -> ());
avx512_version!(adamw_rows_avx512, adamw_rows, (p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: AdamConsts) -> ());

/// sqrt(sum g^2), accumulated in f64.
pub fn global_norm(grads: &[f32]) -> f32 {
    let partials: Vec<f64> =
        grads.par_chunks(CHUNK).map(|x| dispatch!(sum_squares_f64, sum_squares_f64_avx512, sum_squares_f64_avx2, x)).collect();
    partials.iter().sum::<f64>().sqrt() as f32
}

/// `sum x^2` in f64 over eight independent accumulators: a single chained f64 sum is bound by
/// the add latency (about 4 cycles per element); eight lanes let it run at memory speed. The
/// order is fixed by the slice length, so the result stays deterministic (and the same in every
/// build: the f64 square of an f32 is exact, so a fused multiply-add rounds the same).
#[inline(always)]
fn sum_squares_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut lanes = x.chunks_exact(8);
    for w in &mut lanes {
        for (a, &g) in acc.iter_mut().zip(w) {
            *a += g as f64 * g as f64;
        }
    }
    let tail: f64 = lanes.remainder().iter().map(|&g| g as f64 * g as f64).sum();
    acc.iter().sum::<f64>() + tail
}
avx2_version!(sum_squares_f64_avx2, sum_squares_f64, (x: &[f32]) -> f64);
avx512_version!(sum_squares_f64_avx512, sum_squares_f64, (x: &[f32]) -> f64);

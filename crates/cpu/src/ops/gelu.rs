//! GELU forward and backward (tanh and erf forms).

use lmtrain_backend::GeluKind;
use rayon::prelude::*;

use super::CHUNK;
use crate::math;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `out = gelu(inp)`: `Tanh` = `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`,
/// `Erf` = `0.5 x (1 + erf(x / sqrt 2))`.
pub fn gelu_forward(out: &mut [f32], inp: &[f32], kind: GeluKind) {
    assert_eq!(out.len(), inp.len(), "gelu_forward: length mismatch");
    out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(|(o, x)| {
        dispatch!(
            // the erf form has no explicit AVX-512 kernel: its AVX2 build
            avx512: if kind == GeluKind::Tanh { gelu_tanh_fwd_avx512(o, x) } else { gelu_fwd_chunk_avx2(o, x, kind) },
            avx2: gelu_fwd_chunk_avx2(o, x, kind),
            portable: gelu_fwd_chunk(o, x, kind),
        )
    });
}

/// Tanh-form GELU forward with explicit AVX-512 (see [`crate::simd::gelu_tanh16`]).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_tanh_fwd_avx512(o: &mut [f32], x: &[f32]) {
    use std::arch::x86_64::*;
    let n = o.len().min(x.len());
    let mut i = 0;
    while i < n {
        let m = crate::simd::first_lanes(n - i);
        // SAFETY: the mask covers lanes i..min(i + 16, n) only, inside both slices.
        unsafe {
            let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
            _mm512_mask_storeu_ps(o.as_mut_ptr().add(i), m, crate::simd::gelu_tanh16(v));
        }
        i += 16;
    }
}

#[inline(always)]
fn gelu_fwd_chunk(o: &mut [f32], x: &[f32], kind: GeluKind) {
    match kind {
        GeluKind::Tanh => {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = 0.5 * x * (1.0 + math::tanh(SQRT_2_OVER_PI * (x + GELU_C * x * x * x)));
            }
        }
        GeluKind::Erf => {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = 0.5 * x * (1.0 + math::erf(x * FRAC_1_SQRT_2));
            }
        }
    }
}
avx2_version!(gelu_fwd_chunk_avx2, gelu_fwd_chunk, (o: &mut [f32], x: &[f32], kind: GeluKind) -> ());

/// `dinp += gelu'(inp) * dout`.
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32], kind: GeluKind) {
    assert!(dinp.len() == inp.len() && dout.len() == inp.len(), "gelu_backward: length mismatch");
    dinp.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).zip(dout.par_chunks(CHUNK)).for_each(|((d, x), g)| {
        dispatch!(
            avx512: if kind == GeluKind::Tanh { gelu_tanh_bwd_avx512(d, x, g) } else { gelu_bwd_chunk_avx2(d, x, g, kind) },
            avx2: gelu_bwd_chunk_avx2(d, x, g, kind),
            portable: gelu_bwd_chunk(d, x, g, kind),
        )
    });
}

/// Tanh-form GELU backward with explicit AVX-512 (see [`crate::simd::gelu_tanh_grad16`]).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_tanh_bwd_avx512(d: &mut [f32], x: &[f32], g: &[f32]) {
    use std::arch::x86_64::*;
    let n = d.len().min(x.len()).min(g.len());
    let mut i = 0;
    while i < n {
        let m = crate::simd::first_lanes(n - i);
        // SAFETY: the mask covers lanes i..min(i + 16, n) only, inside the three slices.
        unsafe {
            let xv = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
            let gv = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
            let dv = _mm512_maskz_loadu_ps(m, d.as_ptr().add(i));
            let r = _mm512_fmadd_ps(gv, crate::simd::gelu_tanh_grad16(xv), dv);
            _mm512_mask_storeu_ps(d.as_mut_ptr().add(i), m, r);
        }
        i += 16;
    }
}

#[inline(always)]
fn gelu_bwd_chunk(d: &mut [f32], x: &[f32], g: &[f32], kind: GeluKind) {
    match kind {
        GeluKind::Tanh => {
            for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                let th = math::tanh(SQRT_2_OVER_PI * (x + GELU_C * x * x * x));
                let dth = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
                *d += g * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * dth);
            }
        }
        GeluKind::Erf => {
            for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                let cdf = 0.5 * (1.0 + math::erf(x * FRAC_1_SQRT_2));
                let pdf = INV_SQRT_2PI * math::exp(-0.5 * x * x);
                *d += g * (cdf + x * pdf);
            }
        }
    }
}
avx2_version!(gelu_bwd_chunk_avx2, gelu_bwd_chunk, (d: &mut [f32], x: &[f32], g: &[f32], kind: GeluKind) -> ());

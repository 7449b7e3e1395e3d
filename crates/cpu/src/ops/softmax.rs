//! Row softmax pieces shared by the cross-entropy ([`super::classifier`]) and the fused output head
//! ([`super::head`]): the row max, the shifted exponentials and their sum, and the scaling of
//! probabilities into gradients. All `#[inline(always)]`, so each caller's AVX2 / AVX-512 build
//! compiles them for its own instruction set.

use super::LANES;
use crate::math;

/// `(max, sum of e^(x - max))` of a row, the row left unchanged.
#[inline(always)]
pub(super) fn max_exp_sum(x: &[f32]) -> (f32, f64) {
    let max = lane_max(x);
    (max, exp_sum(x, max))
}

/// Replaces the row by `e^(x - max)` and returns `(max, sum of the exponentials)`.
#[inline(always)]
pub(super) fn max_exp_in_place(x: &mut [f32]) -> (f32, f64) {
    let max = lane_max(x);
    (max, exp_in_place_sum(x, max))
}

#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for ch in chunks {
        for (a, &v) in acc.iter_mut().zip(ch) {
            *a = a.max(v);
        }
    }
    tail.iter().chain(&acc).fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

#[inline(always)]
fn exp_sum(x: &[f32], max: f32) -> f64 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for ch in chunks {
        for (a, &v) in acc.iter_mut().zip(ch) {
            *a += math::exp(v - max);
        }
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + tail.iter().map(|&v| math::exp(v - max) as f64).sum::<f64>()
}

#[inline(always)]
fn exp_in_place_sum(x: &mut [f32], max: f32) -> f64 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for ch in &mut chunks {
        for (a, v) in acc.iter_mut().zip(ch.iter_mut()) {
            *v = math::exp(*v - max);
            *a += *v;
        }
    }
    let mut tail = 0f64;
    for v in chunks.into_remainder() {
        *v = math::exp(*v - max);
        tail += *v as f64;
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + tail
}

/// `x *= f`, products below the smallest normal float set to 0 (see [`math::flush_subnormal`]):
/// how probabilities become gradients, in the cross-entropy and in the fused head.
#[inline(always)]
pub(super) fn scale_flush_subnormal(x: &mut [f32], f: f32) {
    x.iter_mut().for_each(|v| *v = math::flush_subnormal(*v * f));
}

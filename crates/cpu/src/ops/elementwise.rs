//! Elementwise ops: fill, scale, residual add, in-place add, dropout, tanh.

use lmtrain_backend::Dropout;
use rayon::prelude::*;

use super::CHUNK;

/// `out = a + b`.
pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    assert!(a.len() == out.len() && b.len() == out.len(), "residual_forward: length mismatch");
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).for_each(|((o, a), b)| {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = a + b;
        }
    });
}

/// `dst += src`.
pub fn add_inplace(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "add_inplace: length mismatch");
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
        for (d, s) in d.iter_mut().zip(s) {
            *d += s;
        }
    });
}

/// `x = 0`, in parallel (gradient buffers are tens of MB).
pub fn fill_zero(x: &mut [f32]) {
    if x.len() < NT_ZERO_MIN {
        x.par_chunks_mut(CHUNK).for_each(|c| c.fill(0.0));
        return;
    }
    x.par_chunks_mut(CHUNK).for_each(|c| dispatch!(avx512: crate::simd::zero_streaming(c), avx2: c.fill(0.0), portable: c.fill(0.0)));
}

/// Buffers from this many elements (16 MB) up, gradient buffers, are zeroed with streaming
/// stores: ordinary stores first read every line they overwrite. Smaller ones (activation
/// gradients about to be accumulated into) keep ordinary stores, which leave them in cache.
const NT_ZERO_MIN: usize = 1 << 22;

/// `out = tanh(inp)`.
pub fn tanh_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len(), "tanh_forward: length mismatch");
    out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(|(o, x)| {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = crate::math::tanh(x);
        }
    });
}

/// `dinp += (1 - out^2) * dout`.
pub fn tanh_backward(dinp: &mut [f32], out: &[f32], dout: &[f32]) {
    assert!(dinp.len() == out.len() && dout.len() == out.len(), "tanh_backward: length mismatch");
    dinp.par_chunks_mut(CHUNK).zip(out.par_chunks(CHUNK)).zip(dout.par_chunks(CHUNK)).for_each(|((d, y), g)| {
        for ((d, &y), &g) in d.iter_mut().zip(y).zip(g) {
            *d += (1.0 - y * y) * g;
        }
    });
}

/// `x *= s`.
pub fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}

/// Inverted dropout in place (also its own backward): `x[i] *= d.factor(i)`.
pub fn dropout_inplace(x: &mut [f32], d: Dropout) {
    if !d.active() {
        return;
    }
    x.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, c)| dropout_mul(c, d, (ci * CHUNK) as u64));
}

/// `x[j] *= d.factor(base + j)`: the dropout mask of elements `base..base + x.len()`.
pub(super) fn dropout_mul(x: &mut [f32], d: Dropout, base: u64) {
    dispatch!(dropout_mul_body, dropout_mul_avx512, dropout_mul_avx2, x, d, base)
}

/// See [`dropout_mul`]; the very same `Dropout::factor` per element in every build, so the mask
/// is bit-identical whichever one runs (AVX-512 DQ vectorises its 64-bit multiplies).
#[inline(always)]
fn dropout_mul_body(x: &mut [f32], d: Dropout, base: u64) {
    for (i, v) in x.iter_mut().enumerate() {
        *v *= d.factor(base + i as u64);
    }
}
avx2_version!(dropout_mul_avx2, dropout_mul_body, (x: &mut [f32], d: Dropout, base: u64) -> ());
avx512_version!(dropout_mul_avx512, dropout_mul_body, (x: &mut [f32], d: Dropout, base: u64) -> ());

/// `x[r, :] = 0` for every position `r` whose mask entry is `false`.
pub fn zero_padded_rows(x: &mut [f32], key_padding: Option<&[bool]>, cols: usize) {
    let Some(m) = key_padding else { return };
    assert_eq!(x.len(), m.len() * cols, "zero_padded_rows: shape");
    for (row, &keep) in x.chunks_exact_mut(cols).zip(m) {
        if !keep {
            row.fill(0.0);
        }
    }
}

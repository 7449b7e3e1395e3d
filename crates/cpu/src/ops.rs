//! The CPU ops: f32, row-major, multi-threaded with rayon. Every `*_backward` ACCUMULATES (`+=`)
//! into its gradient outputs. Every reduction runs over fixed chunks in a fixed order, so results
//! are bit-for-bit identical from run to run (resuming a training run relies on it).

use lmtrain_backend::{AdamWHyper, AttnMask, AttnShape, DecaySegment, Dropout, GeluKind};
use rayon::prelude::*;

use crate::gemm::SendPtr;
use crate::math;

pub use crate::gemm::matmul;
pub use crate::head::{LM_HEAD_CHUNK, lm_head_loss};

/// Elements per rayon task in elementwise loops.
const CHUNK: usize = 1 << 14;

/// Rows per rayon task for a row length of `cols` (about `CHUNK` elements per task).
fn rows_per_task(cols: usize) -> usize {
    (CHUNK / cols.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------------
// elementwise

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
    #[cfg(target_arch = "x86_64")]
    if x.len() >= NT_ZERO_MIN && std::arch::is_x86_feature_detected!("avx512f") {
        x.par_chunks_mut(CHUNK).for_each(|c| {
            // SAFETY: the feature was detected at run time.
            unsafe { crate::simd::zero_streaming(c) }
        });
        return;
    }
    x.par_chunks_mut(CHUNK).for_each(|c| c.fill(0.0));
}

/// Buffers from this many elements (16 MB) up, gradient buffers, are zeroed with streaming
/// stores: ordinary stores first read every line they overwrite. Smaller ones (activation
/// gradients about to be accumulated into) keep ordinary stores, which leave them in cache.
#[cfg(target_arch = "x86_64")]
const NT_ZERO_MIN: usize = 1 << 22;

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
fn dropout_mul(x: &mut [f32], d: Dropout, base: u64) {
    dispatch512!(dropout_mul_body, dropout_mul_avx512, dropout_mul_avx2, x, d, base)
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

// ---------------------------------------------------------------------------------------------
// linear layers

/// `out[r, :] += bias` for each of `rows` rows.
pub fn add_bias(out: &mut [f32], bias: &[f32], rows: usize, cols: usize) {
    assert!(out.len() == rows * cols && bias.len() == cols, "add_bias: shape mismatch");
    out.par_chunks_mut(cols * rows_per_task(cols))
        .for_each(|c| dispatch512!(add_bias_rows, add_bias_rows_avx512, add_bias_rows_avx2, c, bias));
}

/// `row += bias` for each row of `out` (rows of `bias.len()`); inlined into each build.
#[inline(always)]
fn add_bias_rows(out: &mut [f32], bias: &[f32]) {
    for row in out.chunks_exact_mut(bias.len()) {
        for (o, b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    }
}
avx2_version!(add_bias_rows_avx2, add_bias_rows, (out: &mut [f32], bias: &[f32]) -> ());
avx512_version!(add_bias_rows_avx512, add_bias_rows, (out: &mut [f32], bias: &[f32]) -> ());

/// `dbias += sum over rows of dout`.
pub fn bias_backward(dbias: &mut [f32], dout: &[f32], rows: usize, cols: usize) {
    assert!(dout.len() == rows * cols && dbias.len() == cols, "bias_backward: shape mismatch");
    let partials: Vec<Vec<f32>> = dout
        .par_chunks(cols * rows_per_task(cols).max(32))
        .map(|c| {
            let mut acc = vec![0f32; cols];
            dispatch512!(sum_rows, sum_rows_avx512, sum_rows_avx2, &mut acc, c);
            acc
        })
        .collect();
    for p in &partials {
        for (d, a) in dbias.iter_mut().zip(p) {
            *d += a;
        }
    }
}

/// `acc += sum of the rows of x` (rows of `acc.len()`), in row order; inlined into each build.
#[inline(always)]
fn sum_rows(acc: &mut [f32], x: &[f32]) {
    for row in x.chunks_exact(acc.len()) {
        for (a, d) in acc.iter_mut().zip(row) {
            *a += d;
        }
    }
}
avx2_version!(sum_rows_avx2, sum_rows, (acc: &mut [f32], x: &[f32]) -> ());
avx512_version!(sum_rows_avx512, sum_rows, (acc: &mut [f32], x: &[f32]) -> ());

// ---------------------------------------------------------------------------------------------
// layernorm

/// LayerNorm over rows of `cols`: `out = (inp - mean) * rstd * weight + bias`, biased variance as
/// torch; saves `mean` and `rstd = 1/sqrt(var + eps)` per row.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    rows: usize,
    cols: usize,
    eps: f32,
) {
    assert!(out.len() == rows * cols && inp.len() == rows * cols, "layernorm_forward: inp/out shape");
    assert!(mean.len() == rows && rstd.len() == rows, "layernorm_forward: mean/rstd shape");
    assert!(weight.len() == cols && bias.len() == cols, "layernorm_forward: weight/bias shape");
    let rpt = rows_per_task(cols);
    out.par_chunks_mut(cols * rpt)
        .zip(inp.par_chunks(cols * rpt))
        .zip(mean.par_chunks_mut(rpt).zip(rstd.par_chunks_mut(rpt)))
        .for_each(|((o, x), (mu, rs))| {
            dispatch512!(layernorm_fwd_rows, layernorm_fwd_rows_avx512, layernorm_fwd_rows_avx2, o, x, mu, rs, weight, bias, cols, eps)
        });
}

/// Sum of `f(x)` over `x` in [`LANES`] partials (then the lanes in order, then the tail): the
/// fixed order keeps results reproducible, and unlike one sequential chain it vectorises.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for ch in chunks {
        for (a, &v) in acc.iter_mut().zip(ch) {
            *a += f(v);
        }
    }
    let mut sum = 0f32;
    for a in acc {
        sum += a;
    }
    for &v in tail {
        sum += f(v);
    }
    sum
}

/// The rows of one task of [`layernorm_forward`]; inlined into each instruction-set build.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn layernorm_fwd_rows(o: &mut [f32], x: &[f32], mu: &mut [f32], rs: &mut [f32], weight: &[f32], bias: &[f32], cols: usize, eps: f32) {
    for (((o, x), mu), rs) in o.chunks_exact_mut(cols).zip(x.chunks_exact(cols)).zip(mu).zip(rs) {
        // two passes (mean, then centred variance): no cancellation for large means.
        let m = lane_sum(x, |v| v) / cols as f32;
        let v = lane_sum(x, |v| (v - m) * (v - m)) / cols as f32;
        let r = 1.0 / (v + eps).sqrt();
        for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(weight).zip(bias) {
            *o = (x - m) * r * w + b;
        }
        *mu = m;
        *rs = r;
    }
}
avx2_version!(layernorm_fwd_rows_avx2, layernorm_fwd_rows, (o: &mut [f32], x: &[f32], mu: &mut [f32], rs: &mut [f32], weight: &[f32], bias: &[f32], cols: usize, eps: f32) -> ());
avx512_version!(layernorm_fwd_rows_avx512, layernorm_fwd_rows, (o: &mut [f32], x: &[f32], mu: &mut [f32], rs: &mut [f32], weight: &[f32], bias: &[f32], cols: usize, eps: f32) -> ());

/// LayerNorm backward; accumulates into `dinp`, `dweight` and `dbias`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    rows: usize,
    cols: usize,
) {
    let n = rows * cols;
    assert!(dinp.len() == n && dout.len() == n && inp.len() == n, "layernorm_backward: shape");
    assert!(dweight.len() == cols && dbias.len() == cols && weight.len() == cols, "layernorm_backward: param shape");
    assert!(mean.len() == rows && rstd.len() == rows, "layernorm_backward: mean/rstd shape");
    let rpt = rows_per_task(cols).max(16);
    // each task returns its partial dweight (first half) and dbias (second half)
    let partials: Vec<Vec<f32>> = dinp
        .par_chunks_mut(cols * rpt)
        .zip(dout.par_chunks(cols * rpt))
        .zip(inp.par_chunks(cols * rpt))
        .zip(mean.par_chunks(rpt).zip(rstd.par_chunks(rpt)))
        .map(|(((di, dy), x), (mu, rs))| {
            let mut acc = vec![0f32; 2 * cols];
            dispatch512!(layernorm_bwd_rows, layernorm_bwd_rows_avx512, layernorm_bwd_rows_avx2, &mut acc, di, dy, x, mu, rs, weight, cols);
            acc
        })
        .collect();
    for p in &partials {
        for (d, a) in dweight.iter_mut().zip(&p[..cols]) {
            *d += a;
        }
        for (d, a) in dbias.iter_mut().zip(&p[cols..]) {
            *d += a;
        }
    }
}

/// The rows of one task of [`layernorm_backward`]: `acc` gets the task's partial dweight (first
/// `cols`) and dbias (last `cols`). Inlined into each instruction-set build.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn layernorm_bwd_rows(acc: &mut [f32], di: &mut [f32], dy: &[f32], x: &[f32], mu: &[f32], rs: &[f32], weight: &[f32], cols: usize) {
    let (dw, db) = acc.split_at_mut(cols);
    for ((((di, dy), x), &m), &r) in di.chunks_exact_mut(cols).zip(dy.chunks_exact(cols)).zip(x.chunks_exact(cols)).zip(mu).zip(rs) {
        // dnorm = dy * w; dx = r * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)); the two
        // sums in 16 lane partials (see `lane_sum`)
        let mut sum_dn = [0f32; LANES];
        let mut sum_dn_n = [0f32; LANES];
        let n16 = cols / LANES * LANES;
        for ((dy, x), w) in dy[..n16].chunks_exact(LANES).zip(x[..n16].chunks_exact(LANES)).zip(weight[..n16].chunks_exact(LANES)) {
            for l in 0..LANES {
                let dn = dy[l] * w[l];
                sum_dn[l] += dn;
                sum_dn_n[l] += dn * ((x[l] - m) * r);
            }
        }
        let (mut s_dn, mut s_dn_n) = (0f32, 0f32);
        for l in 0..LANES {
            s_dn += sum_dn[l];
            s_dn_n += sum_dn_n[l];
        }
        for ((&dy, &x), &w) in dy[n16..].iter().zip(&x[n16..]).zip(&weight[n16..]) {
            let dn = dy * w;
            s_dn += dn;
            s_dn_n += dn * ((x - m) * r);
        }
        let mean_dn = s_dn / cols as f32;
        let mean_dn_n = s_dn_n / cols as f32;
        for (((((di, &dy), &x), &w), dw), db) in di.iter_mut().zip(dy).zip(x).zip(weight).zip(dw.iter_mut()).zip(db.iter_mut()) {
            let norm = (x - m) * r;
            *dw += dy * norm;
            *db += dy;
            *di += r * (dy * w - mean_dn - norm * mean_dn_n);
        }
    }
}
avx2_version!(layernorm_bwd_rows_avx2, layernorm_bwd_rows, (acc: &mut [f32], di: &mut [f32], dy: &[f32], x: &[f32], mu: &[f32], rs: &[f32], weight: &[f32], cols: usize) -> ());
avx512_version!(layernorm_bwd_rows_avx512, layernorm_bwd_rows, (acc: &mut [f32], di: &mut [f32], dy: &[f32], x: &[f32], mu: &[f32], rs: &[f32], weight: &[f32], cols: usize) -> ());

// ---------------------------------------------------------------------------------------------
// gelu

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
        #[cfg(target_arch = "x86_64")]
        if kind == GeluKind::Tanh && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F detected.
            return unsafe { gelu_tanh_fwd_avx512(o, x) };
        }
        dispatch!(gelu_fwd_chunk, gelu_fwd_chunk_avx2, o, x, kind)
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
    dinp.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .zip(dout.par_chunks(CHUNK))
        .for_each(|((d, x), g)| {
            #[cfg(target_arch = "x86_64")]
            if kind == GeluKind::Tanh && std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F detected.
                return unsafe { gelu_tanh_bwd_avx512(d, x, g) };
            }
            dispatch!(gelu_bwd_chunk, gelu_bwd_chunk_avx2, d, x, g, kind)
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

// ---------------------------------------------------------------------------------------------
// embeddings

/// `out[b, t, :] = wte[ids[b, t], :] + wpe[pos_offset + t, :]`.
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward(
    out: &mut [f32],
    wte: &[f32],
    wpe: &[f32],
    ids: &[u32],
    b: usize,
    t: usize,
    c: usize,
    pos_offset: usize,
) {
    assert!(out.len() == b * t * c && ids.len() == b * t, "embedding_forward: shape");
    let vocab = wte.len() / c;
    let n_pos = wpe.len() / c;
    assert!(pos_offset + t <= n_pos, "embedding_forward: position {} beyond {n_pos}", pos_offset + t - 1);
    out.par_chunks_mut(c).zip(ids.par_iter()).enumerate().for_each(|(i, (o, &id))| {
        let id = id as usize;
        assert!(id < vocab, "embedding_forward: token id {id} >= vocabulary {vocab}");
        let p = pos_offset + i % t;
        for ((o, &e), &q) in o.iter_mut().zip(&wte[id * c..(id + 1) * c]).zip(&wpe[p * c..(p + 1) * c]) {
            *o = e + q;
        }
    });
}

/// `dwte[ids[b, t]] += dout[b, t]`, `dwpe[t] += dout[b, t]` (positions start at 0).
pub fn embedding_backward(dwte: &mut [f32], dwpe: &mut [f32], dout: &[f32], ids: &[u32], b: usize, t: usize, c: usize) {
    assert!(dout.len() == b * t * c && ids.len() == b * t, "embedding_backward: shape");
    assert!(dwpe.len() >= t * c, "embedding_backward: wpe too short");
    dwpe[..t * c].par_chunks_mut(c).enumerate().for_each(|(p, d)| {
        for bi in 0..b {
            let row = &dout[(bi * t + p) * c..(bi * t + p + 1) * c];
            for (d, g) in d.iter_mut().zip(row) {
                *d += g;
            }
        }
    });
    // Token rows may repeat: split the channels between tasks instead of the tokens, so no two
    // tasks touch the same element and the summation order is fixed.
    let threads = rayon::current_num_threads().max(1);
    let width = c.div_ceil(threads).max(16).min(c);
    let ptr = SendPtr(dwte.as_mut_ptr());
    let vocab = dwte.len() / c;
    (0..c.div_ceil(width)).into_par_iter().for_each(|ci| {
        let c0 = ci * width;
        let c1 = (c0 + width).min(c);
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            assert!(id < vocab, "embedding_backward: token id {id} >= vocabulary {vocab}");
            let g = &dout[i * c + c0..i * c + c1];
            // SAFETY: columns [c0, c1) belong to this task alone; id < vocab keeps it in bounds.
            let d = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(id * c + c0), c1 - c0) };
            for (d, g) in d.iter_mut().zip(g) {
                *d += g;
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// attention

/// Query rows per block in attention: with a causal mask, block `[i0, i1)` only needs keys
/// `[0, i1)`, which skips about half of the score and value products for long sequences.
const ATTN_BLOCK: usize = 64;

/// Query blocks `(i0, i1, keys)` of a `t`-long sequence: `keys` = how many keys the block sees.
fn attn_blocks(t: usize, causal: bool) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..t).step_by(ATTN_BLOCK).map(move |i0| {
        let i1 = (i0 + ATTN_BLOCK).min(t);
        (i0, i1, if causal { i1 } else { t })
    })
}

/// Scaled dot-product attention, see `Backend::attention_forward`. One task per (batch, head):
/// scores and probabilities live in that head's `[t, t]` slice of `probs`.
pub fn attention_forward(out: &mut [f32], probs: &mut [f32], qkv: &[f32], s: AttnShape, mask: AttnMask<'_>, dropout: Dropout) {
    let AttnShape { b, t, n_head, head_size: hs } = s;
    let c = s.channels();
    assert!(out.len() == b * t * c && qkv.len() == b * t * 3 * c, "attention_forward: shape");
    assert_eq!(probs.len(), s.probs_len(), "attention_forward: probs shape");
    if let Some(kp) = mask.key_padding {
        assert_eq!(kp.len(), b * t, "attention_forward: key_padding shape");
    }
    let scale = 1.0 / (hs as f32).sqrt();
    let c3 = 3 * c as isize;
    let out_ptr = SendPtr(out.as_mut_ptr());
    probs.par_chunks_mut(t * t).enumerate().for_each(|(bh, p)| {
        let (bi, h) = (bh / n_head, bh % n_head);
        let q = qkv[bi * t * 3 * c + h * hs..].as_ptr();
        let k = qkv[bi * t * 3 * c + c + h * hs..].as_ptr();
        let v = qkv[bi * t * 3 * c + 2 * c + h * hs..].as_ptr();
        let pad = mask.key_padding.map(|kp| &kp[bi * t..(bi + 1) * t]);
        let mut dropped = if dropout.active() { vec![0f32; ATTN_BLOCK * t] } else { Vec::new() };
        for (i0, i1, keys) in attn_blocks(t, mask.causal) {
            let rows = i1 - i0;
            // SAFETY: q/k rows are read with row stride 3c inside qkv's batch bi; the block's
            // rows of p are [rows, t] from row i0.
            unsafe {
                let q0 = q.offset(i0 as isize * c3);
                crate::gemm::matmul_strided(rows, keys, hs, p[i0 * t..].as_mut_ptr(), t, q0, c3, 1, k, 1, c3, false, scale);
            }
            let valid = |r: usize| if mask.causal { i0 + r + 1 } else { t };
            for (r, row) in p[i0 * t..i1 * t].chunks_exact_mut(t).enumerate() {
                softmax_masked_row(row, valid(r), pad);
            }
            let pblock: &[f32] = if dropout.active() {
                // the product reads `keys` columns; past a row's `valid` ones p is 0, so only
                // those need the (costly) mask hash
                for (r, (d, pr)) in dropped.chunks_exact_mut(t).zip(p[i0 * t..i1 * t].chunks_exact(t)).enumerate() {
                    d[..keys].copy_from_slice(&pr[..keys]);
                    dropout_mul(&mut d[..valid(r)], dropout, (bh * t * t + (i0 + r) * t) as u64);
                }
                &dropped[..rows * t]
            } else {
                &p[i0 * t..i1 * t]
            };
            // SAFETY: this task writes out[bi, i0..i1, h*hs..(h+1)*hs] only (disjoint between
            // tasks); v rows [0, keys) lie in batch bi.
            unsafe {
                let o = out_ptr.get().add((bi * t + i0) * c + h * hs);
                crate::gemm::matmul_strided(rows, hs, keys, o, c, pblock.as_ptr(), t as isize, 1, v, c3, 1, false, 1.0);
            }
        }
    });
}

/// Softmax of `row[..valid]` with padded keys removed; entries past `valid` or padded are 0.
fn softmax_masked_row(row: &mut [f32], valid: usize, pad: Option<&[bool]>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F detected.
        return unsafe { softmax_masked_row_avx512(row, valid, pad) };
    }
    softmax_masked_row_portable(row, valid, pad)
}

/// [`softmax_masked_row`] in 16-lane AVX-512 with [`crate::simd::exp16`]: the sum runs in 16
/// lane partials reduced in a fixed order (deterministic, like the sequential portable sum).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_masked_row_avx512(row: &mut [f32], valid: usize, pad: Option<&[bool]>) {
    use std::arch::x86_64::*;
    assert!(valid <= row.len() && pad.is_none_or(|p| p.len() >= valid), "softmax_masked_row: shape");
    // lanes of the 16-block at j that are inside `valid` and not padded
    let lanes = |j: usize| -> u16 {
        let m = crate::simd::first_lanes(valid - j);
        match pad {
            None => m,
            Some(p) => p[j..valid.min(j + 16)].iter().enumerate().fold(0u16, |k, (l, &keep)| k | ((keep as u16) << l)) & m,
        }
    };
    let ptr = row.as_mut_ptr();
    // SAFETY (all loads and stores below): lanes(j) only covers indices j..min(j + 16, valid),
    // inside `row` (asserted above).
    unsafe {
        let mut maxv = _mm512_set1_ps(f32::NEG_INFINITY);
        for j in (0..valid).step_by(16) {
            let m = lanes(j);
            maxv = _mm512_mask_max_ps(maxv, m, maxv, _mm512_maskz_loadu_ps(m, ptr.add(j)));
        }
        let max = _mm512_reduce_max_ps(maxv);
        if max == f32::NEG_INFINITY {
            // every key masked: attend to nothing (a fully padded query row; its output is unused)
            row.fill(0.0);
            return;
        }
        let (mx, mut sum) = (_mm512_set1_ps(max), _mm512_setzero_ps());
        for j in (0..valid).step_by(16) {
            let m = lanes(j);
            let all = crate::simd::first_lanes(valid - j);
            // masked lanes become exactly 0 (also in the stored row)
            let e = _mm512_maskz_mov_ps(m, crate::simd::exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, ptr.add(j)), mx)));
            sum = _mm512_add_ps(sum, e);
            _mm512_mask_storeu_ps(ptr.add(j), all, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for j in (0..valid).step_by(16) {
            let all = crate::simd::first_lanes(valid - j);
            _mm512_mask_storeu_ps(ptr.add(j), all, _mm512_mul_ps(_mm512_maskz_loadu_ps(all, ptr.add(j)), inv));
        }
    }
    row[valid..].fill(0.0);
}

/// Portable [`softmax_masked_row`].
fn softmax_masked_row_portable(row: &mut [f32], valid: usize, pad: Option<&[bool]>) {
    let keep = |j: usize| pad.is_none_or(|p| p[j]);
    let mut max = f32::NEG_INFINITY;
    for (j, &x) in row[..valid].iter().enumerate() {
        if keep(j) && x > max {
            max = x;
        }
    }
    if max == f32::NEG_INFINITY {
        // every key masked: attend to nothing (a fully padded query row; its output is unused)
        row.fill(0.0);
        return;
    }
    let mut sum = 0f32;
    for (j, x) in row[..valid].iter_mut().enumerate() {
        *x = if keep(j) { math::exp(*x - max) } else { 0.0 };
        sum += *x;
    }
    let inv = 1.0 / sum;
    row[..valid].iter_mut().for_each(|x| *x *= inv);
    row[valid..].fill(0.0);
}

/// Attention backward, see `Backend::attention_backward`; accumulates into `dqkv`. Each block of
/// query rows only involves the keys up to its last non-zero probability (under a causal mask,
/// the block's last row), since masked keys contribute exactly nothing.
pub fn attention_backward(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], probs: &[f32], s: AttnShape, dropout: Dropout) {
    let AttnShape { b, t, n_head, head_size: hs } = s;
    let c = s.channels();
    assert!(dqkv.len() == b * t * 3 * c && qkv.len() == b * t * 3 * c, "attention_backward: qkv shape");
    assert!(dout.len() == b * t * c && probs.len() == s.probs_len(), "attention_backward: shape");
    let scale = 1.0 / (hs as f32).sqrt();
    let dptr = SendPtr(dqkv.as_mut_ptr());
    let c3 = 3 * c as isize;
    probs.par_chunks(t * t).enumerate().for_each(|(bh, p)| {
        let (bi, h) = (bh / n_head, bh % n_head);
        let base = bi * t * 3 * c + h * hs;
        let q = qkv[base..].as_ptr();
        let k = qkv[base + c..].as_ptr();
        let v = qkv[base + 2 * c..].as_ptr();
        let dy = dout[bi * t * c + h * hs..].as_ptr();
        // SAFETY: this task touches dqkv[bi, :, {0,c,2c} + h*hs ..+hs] only (disjoint).
        let (dq, dk, dv) = unsafe { (dptr.get().add(base), dptr.get().add(base + c), dptr.get().add(base + 2 * c)) };
        let mut dp = vec![0f32; ATTN_BLOCK * t];
        // dropout: the block's mask factors, and the dropped-out probabilities
        let (mut fac, mut pd) =
            if dropout.active() { (vec![0f32; ATTN_BLOCK * t], vec![0f32; ATTN_BLOCK * t]) } else { (Vec::new(), Vec::new()) };
        for (i0, i1, _) in attn_blocks(t, false) {
            let rows = i1 - i0;
            let pb = &p[i0 * t..i1 * t];
            // per row, the keys up to its last non-zero probability
            let mut lens = [0usize; ATTN_BLOCK];
            for (len, r) in lens.iter_mut().zip(pb.chunks_exact(t)) {
                *len = nonzero_len(r);
            }
            let keys = lens.iter().copied().max().unwrap_or(0);
            if keys == 0 {
                continue; // every key masked for these queries: no gradient flows
            }
            let dpb = &mut dp[..rows * t];
            let (dy0, q0, dq0) = (i0 as isize * c as isize, i0 as isize * c3, i0 * 3 * c);
            // SAFETY (all products below): operands are strided views inside qkv/dout/dqkv of
            // batch bi and head h (rows [i0, i1) of q/dq/dy, rows [0, keys) of k/v/dk/dv) and the
            // task-local [rows, t] buffers.
            unsafe {
                // dP' = dY V^T
                crate::gemm::matmul_strided(rows, keys, hs, dpb.as_mut_ptr(), t, dy.offset(dy0), c as isize, 1, v, 1, c3, false, 1.0);
                // dV += P'^T dY, with P' the dropped-out probabilities the forward multiplied V by
                let pv: &[f32] = if dropout.active() {
                    // factors of each row's first `len` keys only: further on p is 0, and so is
                    // every term the factor would scale (dP's entries there only meet p = 0)
                    for (r, ((f, d), pr)) in fac.chunks_exact_mut(t).zip(pd.chunks_exact_mut(t)).zip(pb.chunks_exact(t)).enumerate() {
                        let len = lens[r];
                        f[..len].fill(1.0);
                        dropout_mul(&mut f[..len], dropout, (bh * t * t + (i0 + r) * t) as u64);
                        for ((d, &p), &f) in d[..keys].iter_mut().zip(&pr[..keys]).zip(&f[..keys]) {
                            *d = p * f;
                        }
                    }
                    &pd[..rows * t]
                } else {
                    pb
                };
                crate::gemm::matmul_strided(keys, hs, rows, dv, 3 * c, pv.as_ptr(), 1, t as isize, dy.offset(dy0), c as isize, 1, true, 1.0);
            }
            // softmax backward on the block: dS = P * (dP - sum_j dP * P) over the seen keys
            for (r, (dr, pr)) in dpb.chunks_exact_mut(t).zip(pb.chunks_exact(t)).enumerate() {
                let len = lens[r];
                if dropout.active() {
                    for (d, &f) in dr[..len].iter_mut().zip(&fac[r * t..r * t + len]) {
                        *d *= f;
                    }
                }
                softmax_backward_row(&mut dr[..keys], &pr[..keys]);
            }
            unsafe {
                // dQ += scale dS K ; dK += scale dS^T Q
                crate::gemm::matmul_strided(rows, hs, keys, dq.add(dq0), 3 * c, dpb.as_ptr(), t as isize, 1, k, c3, 1, true, scale);
                crate::gemm::matmul_strided(keys, hs, rows, dk, 3 * c, dpb.as_ptr(), 1, t as isize, q.offset(q0), c3, 1, true, scale);
            }
        }
    });
}

/// Length of `x` without its trailing zeros (index after the last non-zero).
fn nonzero_len(x: &[f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F detected.
        return unsafe { nonzero_len_avx512(x) };
    }
    x.iter().rposition(|&v| v != 0.0).map_or(0, |j| j + 1)
}

/// [`nonzero_len`] 16 lanes at a time from the end (a causal row is mostly trailing zeros).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn nonzero_len_avx512(x: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let mut end = x.len();
    while end > 0 {
        // the partial block at the end first, then whole blocks
        let start = (end - 1) / 16 * 16;
        let m = crate::simd::first_lanes(end - start);
        // SAFETY: lanes start..end only, inside x.
        let v = unsafe { _mm512_maskz_loadu_ps(m, x.as_ptr().add(start)) };
        // NEQ_UQ: true for NaN too, as `v != 0.0`
        let nz = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(v, _mm512_setzero_ps());
        if nz != 0 {
            return start + 16 - nz.leading_zeros() as usize;
        }
        end = start;
    }
    0
}

/// Softmax backward of one row in place: `d = p * (d - sum_j d_j p_j)`.
fn softmax_backward_row(d: &mut [f32], p: &[f32]) {
    assert_eq!(d.len(), p.len(), "softmax_backward_row: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F detected.
        return unsafe { softmax_backward_row_avx512(d, p) };
    }
    let dot: f32 = d.iter().zip(p).map(|(d, p)| d * p).sum();
    for (d, &p) in d.iter_mut().zip(p) {
        *d = p * (*d - dot);
    }
}

/// [`softmax_backward_row`] in AVX-512: the dot product in 16 lane partials (fixed order)
/// instead of one sequential chain.
///
/// # Safety
/// The CPU must support AVX-512F; `d` and `p` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_backward_row_avx512(d: &mut [f32], p: &[f32]) {
    use std::arch::x86_64::*;
    let n = d.len();
    let (dp, pp) = (d.as_mut_ptr(), p.as_ptr());
    // SAFETY: the masks cover indices j..min(j + 16, n), inside both slices.
    unsafe {
        let mut acc = _mm512_setzero_ps();
        for j in (0..n).step_by(16) {
            let m = crate::simd::first_lanes(n - j);
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, dp.add(j)), _mm512_maskz_loadu_ps(m, pp.add(j)), acc);
        }
        let dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
        for j in (0..n).step_by(16) {
            let m = crate::simd::first_lanes(n - j);
            let r = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, pp.add(j)), _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dp.add(j)), dot));
            _mm512_mask_storeu_ps(dp.add(j), m, r);
        }
    }
}

/// Incremental causal attention for generation, see `Backend::attention_cached`.
#[allow(clippy::too_many_arguments)]
pub fn attention_cached(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    start: usize,
    n_new: usize,
    n_head: usize,
    head_size: usize,
) {
    let c = n_head * head_size;
    let total = start + n_new;
    assert!(out.len() == n_new * c && q.len() == n_new * c, "attention_cached: q/out shape");
    assert!(k_cache.len() >= total * c && v_cache.len() >= total * c, "attention_cached: cache too short");
    let scale = 1.0 / (head_size as f32).sqrt();
    out.par_chunks_mut(c).enumerate().for_each(|(i, o)| {
        let pos = start + i;
        let mut w = vec![0f32; pos + 1];
        for h in 0..n_head {
            let qh = &q[i * c + h * head_size..i * c + (h + 1) * head_size];
            let mut max = f32::NEG_INFINITY;
            for (j, wj) in w.iter_mut().enumerate() {
                let kh = &k_cache[j * c + h * head_size..j * c + (h + 1) * head_size];
                *wj = qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() * scale;
                max = max.max(*wj);
            }
            let mut sum = 0f32;
            for wj in w.iter_mut() {
                *wj = math::exp(*wj - max);
                sum += *wj;
            }
            let oh = &mut o[h * head_size..(h + 1) * head_size];
            oh.fill(0.0);
            for (j, &wj) in w.iter().enumerate() {
                let vh = &v_cache[j * c + h * head_size..j * c + (h + 1) * head_size];
                for (o, v) in oh.iter_mut().zip(vh) {
                    *o += wj / sum * v;
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// cross-entropy

/// Target value that marks a position without loss (PyTorch / Hugging Face `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// Fused softmax + cross-entropy, see `Backend::cross_entropy`. Returns the sum of row losses.
pub fn cross_entropy(logits: &mut [f32], targets: &[i32], rows: usize, vocab: usize, dloss: Option<f32>) -> f64 {
    assert!(logits.len() == rows * vocab && targets.len() == rows, "cross_entropy: shape");
    let losses: Vec<f64> = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &tgt)| xent_row(row, tgt, vocab, dloss))
        .collect();
    losses.iter().sum()
}

/// Softmax cross-entropy of one row of logits. Returns the row's loss; with `dloss`, overwrites
/// the row with `dloss * (softmax - onehot)`.
fn xent_row(row: &mut [f32], tgt: i32, vocab: usize, dloss: Option<f32>) -> f64 {
    // AVX-512: the max, exponential and scaling passes over the 50k-wide rows at twice the AVX2
    // width (measured: the 1024 x 50257 cross-entropy went from ~55 to ~42 ms)
    dispatch512!(xent_row_body, xent_row_avx512, xent_row_avx2, row, tgt, vocab, dloss)
}
avx2_version!(xent_row_avx2, xent_row_body, (row: &mut [f32], tgt: i32, vocab: usize, dloss: Option<f32>) -> f64);
avx512_version!(xent_row_avx512, xent_row_body, (row: &mut [f32], tgt: i32, vocab: usize, dloss: Option<f32>) -> f64);

/// See [`xent_row`]; inlined into each instruction-set build.
#[inline(always)]
fn xent_row_body(row: &mut [f32], tgt: i32, vocab: usize, dloss: Option<f32>) -> f64 {
    if tgt == IGNORE_INDEX {
        if dloss.is_some() {
            row.fill(0.0);
        }
        return 0.0;
    }
    assert!(tgt >= 0 && (tgt as usize) < vocab, "cross_entropy: target {tgt} outside vocabulary {vocab}");
    let target_logit = row[tgt as usize];
    // plain loops, not iterator adaptors: a closure compiled out of line would run the kernels
    // in the baseline (SSE2) build instead of this function's AVX2 / AVX-512 one
    let max = lane_max(row);
    match dloss {
        Some(g) => {
            // one pass writes e^(x - max) in place and sums it; a second scales to g * p
            let sum = exp_in_place_sum(row, max);
            scale_flush_subnormal(row, g / sum as f32);
            row[tgt as usize] -= g;
            sum.ln() + (max - target_logit) as f64
        }
        None => exp_sum(row, max).ln() + (max - target_logit) as f64,
    }
}

/// Accumulator lanes of the lane-parallel reductions (softmax, LayerNorm): one AVX-512 register,
/// two AVX2 ones.
const LANES: usize = 16;

#[inline(always)]
pub(crate) fn lane_max(x: &[f32]) -> f32 {
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
pub(crate) fn exp_in_place_sum(x: &mut [f32], max: f32) -> f64 {
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
/// how probabilities become gradients, here and in the fused head.
#[inline(always)]
pub(crate) fn scale_flush_subnormal(x: &mut [f32], f: f32) {
    x.iter_mut().for_each(|v| *v = math::flush_subnormal(*v * f));
}

// ---------------------------------------------------------------------------------------------
// optimizer

/// torch.optim.AdamW semantics (decoupled decay: p -= lr*wd*p, then Adam with bias correction);
/// grads are multiplied by hp.grad_scale first; segments cover the whole buffer.
pub fn adamw_update(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], segments: &[DecaySegment], hp: &AdamWHyper) {
    let n = params.len();
    assert!(grads.len() == n && m.len() == n && v.len() == n, "adamw_update: length mismatch");
    assert!(hp.step >= 1, "adamw_update: step is 1-based");
    let covered: usize = segments.iter().map(|s| s.len).sum();
    assert_eq!(covered, n, "adamw_update: segments cover {covered} of {n} parameters");
    // torch computes the bias corrections in double precision (Python floats)
    let bc1 = 1.0 - (hp.beta1 as f64).powi(hp.step as i32);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(hp.step as i32);
    let step_size = (hp.lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let k = AdamConsts { b1: hp.beta1, b2: hp.beta2, eps: hp.eps, gs: hp.grad_scale, step_size, bc2_sqrt, decay: 1.0 };
    for seg in segments {
        let r = seg.offset..seg.offset + seg.len;
        let k = AdamConsts { decay: 1.0 - hp.lr * seg.weight_decay, ..k };
        params[r.clone()]
            .par_chunks_mut(CHUNK)
            .zip(grads[r.clone()].par_chunks(CHUNK))
            .zip(m[r.clone()].par_chunks_mut(CHUNK).zip(v[r].par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| dispatch512!(adamw_rows, adamw_rows_avx512, adamw_rows_avx2, p, g, m, v, k));
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
        grads.par_chunks(CHUNK).map(|x| dispatch512!(sum_squares_f64, sum_squares_f64_avx512, sum_squares_f64_avx2, x)).collect();
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

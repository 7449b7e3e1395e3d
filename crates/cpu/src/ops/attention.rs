//! Scaled dot-product attention: forward, backward and the incremental (KV-cache) forward.

use lmtrain_backend::{AttnMask, AttnShape, Dropout};
use rayon::prelude::*;

use super::elementwise::dropout_mul;
use crate::gemm::SendPtr;
use crate::math;

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
    dispatch!(
        avx512: softmax_masked_row_avx512(row, valid, pad),
        avx2: softmax_masked_row_portable(row, valid, pad),
        portable: softmax_masked_row_portable(row, valid, pad),
    )
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
                crate::gemm::matmul_strided(
                    keys,
                    hs,
                    rows,
                    dv,
                    3 * c,
                    pv.as_ptr(),
                    1,
                    t as isize,
                    dy.offset(dy0),
                    c as isize,
                    1,
                    true,
                    1.0,
                );
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
    dispatch!(avx512: nonzero_len_avx512(x), avx2: nonzero_len_portable(x), portable: nonzero_len_portable(x))
}

/// Portable [`nonzero_len`].
fn nonzero_len_portable(x: &[f32]) -> usize {
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
pub(super) fn softmax_backward_row(d: &mut [f32], p: &[f32]) {
    assert_eq!(d.len(), p.len(), "softmax_backward_row: length mismatch");
    dispatch!(
        avx512: softmax_backward_row_avx512(d, p),
        avx2: softmax_backward_row_portable(d, p),
        portable: softmax_backward_row_portable(d, p),
    )
}

/// Portable [`softmax_backward_row`] (one sequential dot product).
fn softmax_backward_row_portable(d: &mut [f32], p: &[f32]) {
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

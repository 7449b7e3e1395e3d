//! DeBERTa's ops: the disentangled self-attention (content-to-content plus the c2p / p2c terms
//! gathered along the relative positions), the padding-row mask and the `im2col` of its
//! convolution layer.

use lmtrain_backend::{DisentangledShape, Dropout};
use rayon::prelude::*;

use super::attention::softmax_backward_row;
use super::elementwise::dropout_mul;
use super::rows_per_task;
use super::softmax::max_exp_in_place;
use crate::gemm::{SendPtr, matmul_strided};

/// The `[t, t]` table of relative-embedding rows `rel(i, j) - lo`, with `lo` and the number of
/// rows from `lo` the table reaches (a sequence shorter than the span reads only those, so the
/// products skip the rest); empty without position terms.
fn rel_table(s: &DisentangledShape, relative: bool) -> (Vec<u32>, usize, usize) {
    let t = s.attn.t;
    if !relative {
        return (Vec::new(), 0, 0);
    }
    let idx: Vec<usize> = (0..t * t).map(|ij| s.rel.index(ij / t, ij % t)).collect();
    let lo = idx.iter().copied().min().unwrap_or(0);
    let hi = idx.iter().copied().max().unwrap_or(0);
    (idx.into_iter().map(|x| (x - lo) as u32).collect(), lo, hi + 1 - lo)
}

/// Whether query `i` may attend to key `j` of a row with mask `m` (both real tokens).
fn pair_ok(m: Option<&[bool]>, i: usize, j: usize) -> bool {
    m.is_none_or(|m| m[i] && m[j])
}

fn check_shapes(s: &DisentangledShape, qkv: usize, pos_key: Option<&[f32]>, pos_query: Option<&[f32]>, pad: Option<&[bool]>, what: &str) {
    let a = s.attn;
    let c = a.channels();
    assert_eq!(qkv, a.b * a.t * 3 * c, "{what}: qkv shape");
    for p in [pos_key, pos_query].into_iter().flatten() {
        assert_eq!(p.len(), s.rel_rows() * c, "{what}: relative embeddings shape");
    }
    if let Some(p) = pad {
        assert_eq!(p.len(), a.b * a.t, "{what}: key_padding shape");
    }
}

/// Disentangled attention forward, see `Backend::disentangled_attention_forward`; `probs`
/// (`[b, n_head, t, t]`) receives the softmax probabilities before dropout. One task per
/// (batch, head).
#[allow(clippy::too_many_arguments)]
pub fn disentangled_attention_forward(
    out: &mut [f32],
    probs: &mut [f32],
    qkv: &[f32],
    pos_key: Option<&[f32]>,
    pos_query: Option<&[f32]>,
    s: DisentangledShape,
    key_padding: Option<&[bool]>,
    dropout: Dropout,
) {
    let a = s.attn;
    let (t, n_head, hs, c) = (a.t, a.n_head, a.head_size, a.channels());
    check_shapes(&s, qkv.len(), pos_key, pos_query, key_padding, "disentangled_attention_forward");
    assert!(out.len() == a.b * t * c && probs.len() == a.probs_len(), "disentangled_attention_forward: shape");
    let sc = s.scale();
    let (rel, lo, used) = rel_table(&s, pos_key.is_some() || pos_query.is_some());
    let c3 = 3 * c as isize;
    let out_ptr = SendPtr(out.as_mut_ptr());
    probs.par_chunks_mut(t * t).enumerate().for_each(|(bh, p)| {
        let (bi, h) = (bh / n_head, bh % n_head);
        let base = bi * t * 3 * c + h * hs;
        let (q, k, v) = (qkv[base..].as_ptr(), qkv[base + c..].as_ptr(), qkv[base + 2 * c..].as_ptr());
        let mask = key_padding.map(|m| &m[bi * t..(bi + 1) * t]);
        let relative = pos_key.is_some() || pos_query.is_some();
        let mut pos = vec![0f32; if relative { t * used } else { 0 }];
        let mut bias = vec![0f32; if relative { t * t } else { 0 }];
        // SAFETY (all products): q/k/v rows of batch bi, head h, row stride 3c; the relative
        // embeddings' head-h columns of [rows, c]; task-local buffers.
        unsafe {
            // c2c: q · (k / sc)
            matmul_strided(t, t, hs, p.as_mut_ptr(), t, q, c3, 1, k, 1, c3, false, 1.0 / sc);
            if let Some(kr) = pos_key {
                // c2p[i, j] = (q_i · kr[rel(i, j)]) / sc
                matmul_strided(t, used, hs, pos.as_mut_ptr(), used, q, c3, 1, kr[lo * c + h * hs..].as_ptr(), 1, c as isize, false, 1.0);
                for (ij, b) in bias.iter_mut().enumerate() {
                    *b = pos[(ij / t) * used + rel[ij] as usize] / sc;
                }
            }
            if let Some(qr) = pos_query {
                // p2c[i, j] = (k_j · qr[rel(i, j)]) / sc
                matmul_strided(t, used, hs, pos.as_mut_ptr(), used, k, c3, 1, qr[lo * c + h * hs..].as_ptr(), 1, c as isize, false, 1.0);
                for (ij, b) in bias.iter_mut().enumerate() {
                    *b += pos[(ij % t) * used + rel[ij] as usize] / sc;
                }
            }
        }
        for (ij, x) in p.iter_mut().enumerate() {
            let (i, j) = (ij / t, ij % t);
            if !bias.is_empty() {
                *x += bias[ij];
            }
            if !pair_ok(mask, i, j) {
                *x = f32::MIN;
            }
        }
        for row in p.chunks_exact_mut(t) {
            // a row of f32::MIN only (a padded query) becomes uniform, as torch's softmax
            let (_, sum) = max_exp_in_place(row);
            let inv = (1.0 / sum) as f32;
            row.iter_mut().for_each(|x| *x *= inv);
        }
        let dropped;
        let pd: &[f32] = if dropout.active() {
            let mut d = p.to_vec();
            for (i, r) in d.chunks_exact_mut(t).enumerate() {
                dropout_mul(r, dropout, (bh * t * t + i * t) as u64);
            }
            dropped = d;
            &dropped
        } else {
            p
        };
        // SAFETY: this task writes out[bi, :, h*hs..(h+1)*hs] only (disjoint between tasks).
        unsafe {
            let o = out_ptr.get().add(bi * t * c + h * hs);
            matmul_strided(t, hs, t, o, c, pd.as_ptr(), t as isize, 1, v, c3, 1, false, 1.0);
        }
    });
}

/// Disentangled attention backward, see `Backend::disentangled_attention_backward`. The
/// relative embeddings' gradients are summed over the batch in a fixed order (per-task
/// partials, then a sequential sum), so the result does not depend on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn disentangled_attention_backward(
    dqkv: &mut [f32],
    dpos_key: Option<&mut [f32]>,
    dpos_query: Option<&mut [f32]>,
    dout: &[f32],
    qkv: &[f32],
    pos_key: Option<&[f32]>,
    pos_query: Option<&[f32]>,
    probs: &[f32],
    s: DisentangledShape,
    key_padding: Option<&[bool]>,
    dropout: Dropout,
) {
    let a = s.attn;
    let (b, t, n_head, hs, c) = (a.b, a.t, a.n_head, a.head_size, a.channels());
    check_shapes(&s, qkv.len(), pos_key, pos_query, key_padding, "disentangled_attention_backward");
    assert!(dqkv.len() == qkv.len() && dout.len() == b * t * c && probs.len() == a.probs_len(), "disentangled_attention_backward: shape");
    assert!(
        dpos_key.is_some() == pos_key.is_some() && dpos_query.is_some() == pos_query.is_some(),
        "disentangled_attention_backward: gradients"
    );
    let (rows, sc) = (s.rel_rows(), s.scale());
    let (rel, lo, used) = rel_table(&s, pos_key.is_some() || pos_query.is_some());
    let c3 = 3 * c as isize;
    let dptr = SendPtr(dqkv.as_mut_ptr());
    // per-(batch, head) partial gradients of the relative embeddings' head slice, [rows, hs]
    let part = rows * hs;
    let mut dkr_parts = vec![0f32; if pos_key.is_some() { b * n_head * part } else { 0 }];
    let mut dqr_parts = vec![0f32; if pos_query.is_some() { b * n_head * part } else { 0 }];
    let (kr_ptr, qr_ptr) = (SendPtr(dkr_parts.as_mut_ptr()), SendPtr(dqr_parts.as_mut_ptr()));
    probs.par_chunks(t * t).enumerate().for_each(|(bh, p)| {
        let (bi, h) = (bh / n_head, bh % n_head);
        let base = bi * t * 3 * c + h * hs;
        let (q, k, v) = (qkv[base..].as_ptr(), qkv[base + c..].as_ptr(), qkv[base + 2 * c..].as_ptr());
        let dy = dout[bi * t * c + h * hs..].as_ptr();
        let mask = key_padding.map(|m| &m[bi * t..(bi + 1) * t]);
        // SAFETY: this task touches dqkv[bi, :, {0, c, 2c} + h*hs ..+hs] and its own partials only.
        let (dq, dk, dv) = unsafe { (dptr.get().add(base), dptr.get().add(base + c), dptr.get().add(base + 2 * c)) };
        let mut ds = vec![0f32; t * t];
        let fac = dropout.active().then(|| {
            let mut f = vec![1f32; t * t];
            for (i, r) in f.chunks_exact_mut(t).enumerate() {
                dropout_mul(r, dropout, (bh * t * t + i * t) as u64);
            }
            f
        });
        let pd: Vec<f32>;
        let pv: &[f32] = match &fac {
            Some(f) => {
                pd = p.iter().zip(f).map(|(p, f)| p * f).collect();
                &pd
            }
            None => p,
        };
        // SAFETY (all products): strided views inside qkv / dout / dqkv of batch bi and head h,
        // the relative embeddings' head-h columns and task-local buffers.
        unsafe {
            // dP' = dY V^T ; dV += P'^T dY
            matmul_strided(t, t, hs, ds.as_mut_ptr(), t, dy, c as isize, 1, v, 1, c3, false, 1.0);
            matmul_strided(t, hs, t, dv, 3 * c, pv.as_ptr(), 1, t as isize, dy, c as isize, 1, true, 1.0);
        }
        if let Some(f) = &fac {
            ds.iter_mut().zip(f).for_each(|(d, f)| *d *= f);
        }
        for (i, (dr, pr)) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
            softmax_backward_row(dr, pr);
            // masked_fill: no gradient reaches a masked score
            for (j, d) in dr.iter_mut().enumerate() {
                if !pair_ok(mask, i, j) {
                    *d = 0.0;
                }
            }
        }
        let mut dpos = vec![0f32; if pos_key.is_some() || pos_query.is_some() { t * used } else { 0 }];
        unsafe {
            // dQ += dS K / sc ; dK += dS^T Q / sc
            matmul_strided(t, hs, t, dq, 3 * c, ds.as_ptr(), t as isize, 1, k, c3, 1, true, 1.0 / sc);
            matmul_strided(t, hs, t, dk, 3 * c, ds.as_ptr(), 1, t as isize, q, c3, 1, true, 1.0 / sc);
            if let Some(kr) = pos_key {
                // dA[i, rel(i, j)] += dS[i, j] / sc ; dQ += dA Kr ; dKr = dA^T Q
                dpos.fill(0.0);
                for (ij, &d) in ds.iter().enumerate() {
                    dpos[(ij / t) * used + rel[ij] as usize] += d / sc;
                }
                matmul_strided(
                    t,
                    hs,
                    used,
                    dq,
                    3 * c,
                    dpos.as_ptr(),
                    used as isize,
                    1,
                    kr[lo * c + h * hs..].as_ptr(),
                    c as isize,
                    1,
                    true,
                    1.0,
                );
                let dst = kr_ptr.get().add(bh * part + lo * hs);
                matmul_strided(used, hs, t, dst, hs, dpos.as_ptr(), 1, used as isize, q, c3, 1, false, 1.0);
            }
            if let Some(qr) = pos_query {
                // dB[j, rel(i, j)] += dS[i, j] / sc ; dK += dB Qr ; dQr = dB^T K
                dpos.fill(0.0);
                for (ij, &d) in ds.iter().enumerate() {
                    dpos[(ij % t) * used + rel[ij] as usize] += d / sc;
                }
                matmul_strided(
                    t,
                    hs,
                    used,
                    dk,
                    3 * c,
                    dpos.as_ptr(),
                    used as isize,
                    1,
                    qr[lo * c + h * hs..].as_ptr(),
                    c as isize,
                    1,
                    true,
                    1.0,
                );
                let dst = qr_ptr.get().add(bh * part + lo * hs);
                matmul_strided(used, hs, t, dst, hs, dpos.as_ptr(), 1, used as isize, k, c3, 1, false, 1.0);
            }
        }
    });
    for (grad, parts) in [(dpos_key, &dkr_parts), (dpos_query, &dqr_parts)] {
        let Some(grad) = grad else { continue };
        for (bh, p) in parts.chunks_exact(part).enumerate() {
            let h = bh % n_head;
            for (r, pr) in p.chunks_exact(hs).enumerate() {
                grad[r * c + h * hs..r * c + (h + 1) * hs].iter_mut().zip(pr).for_each(|(g, v)| *g += v);
            }
        }
    }
}

/// `im2col` of a 1-D convolution along each sequence, see `Backend::conv1d_unfold`.
pub fn conv1d_unfold(out: &mut [f32], x: &[f32], b: usize, t: usize, c: usize, k: usize) {
    assert!(k % 2 == 1, "conv1d_unfold: odd kernels only");
    assert!(x.len() == b * t * c && out.len() == b * t * c * k, "conv1d_unfold: shape");
    let half = k / 2;
    let per = rows_per_task(c * k);
    out.par_chunks_mut(c * k * per).enumerate().for_each(|(task, o)| {
        for (r, row) in o.chunks_exact_mut(c * k).enumerate() {
            let pos = task * per + r;
            let (bi, ti) = (pos / t, pos % t);
            for kk in 0..k {
                let src = ti + kk;
                let inside = src >= half && src - half < t;
                for i in 0..c {
                    row[i * k + kk] = if inside { x[(bi * t + src - half) * c + i] } else { 0.0 };
                }
            }
        }
    });
}

/// Backward of [`conv1d_unfold`]: `dx += ` the columns folded back onto their rows.
pub fn conv1d_fold(dx: &mut [f32], dcol: &[f32], b: usize, t: usize, c: usize, k: usize) {
    assert!(k % 2 == 1, "conv1d_fold: odd kernels only");
    assert!(dx.len() == b * t * c && dcol.len() == b * t * c * k, "conv1d_fold: shape");
    let half = k / 2;
    // each output row gathers from the k columns that read it: no write conflicts
    let per = rows_per_task(c);
    dx.par_chunks_mut(c * per).enumerate().for_each(|(task, d)| {
        for (r, row) in d.chunks_exact_mut(c).enumerate() {
            let pos = task * per + r;
            let (bi, ti) = (pos / t, pos % t);
            for kk in 0..k {
                // the column row `dst` read row ti through tap kk when dst + kk - half == ti
                let Some(dst) = (ti + half).checked_sub(kk).filter(|&d| d < t) else { continue };
                let col = &dcol[(bi * t + dst) * c * k..];
                for (i, g) in row.iter_mut().enumerate() {
                    *g += col[i * k + kk];
                }
            }
        }
    });
}

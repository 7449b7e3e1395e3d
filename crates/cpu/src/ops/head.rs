//! The tied output head fused with softmax cross-entropy (`Backend::lm_head_loss`): the largest
//! op of a small GPT-2 (on the benchmark shape, three products of 1024 x 256 x 50257 are about
//! 80% of the step's arithmetic).
//!
//! Layout and threading: the vocabulary is cut into chunks of [`LM_HEAD_CHUNK`] entries and the
//! chunks into one contiguous range per rayon thread. Each thread runs single-threaded products
//! on its own chunks, so nothing synchronises inside the op but the two barriers between its
//! passes, and a chunk's logits (`rows x chunk`, contiguous in `scratch`) are still in the core's
//! cache when its row loops run.
//!
//! 1. Forward, per chunk: `logits = x · wte_chunk^T`; per row the chunk's max `m` and
//!    `e = exp(logit - m)` written in place with its sum `s`. The target's logit is kept.
//! 2. Per row: `lse = M + ln sum_chunks s e^(m - M)` (in f64); loss = `lse - target logit`.
//! 3. Backward, per chunk: `dlogits = dloss (e · e^(m - lse) - onehot)` by one multiply per
//!    element (no second exponential; subnormal results flushed to 0), written to per-thread
//!    buffers (with AVX-512 also transposed), then `dx_group (+)= dlogits · wte_chunk` and
//!    `dwte_chunk += dlogits^T · x`; finally `dx` = the sum of the groups' partial sums, in
//!    group order (a fixed number of groups of chunks, [`LM_HEAD_DX_GROUPS`]).
//!
//! Every sum has an order fixed by the shapes alone, so results are the same bits on any thread
//! count.

use rayon::prelude::*;

use crate::gemm::{SendPtr, matmul_strided};
use crate::math::flush_subnormal;
use lmtrain_backend::HeadGrads;

use super::{IGNORE_INDEX, softmax};

/// Vocabulary entries per chunk of the fused head: a chunk's logits are `1024 x 512` floats
/// (2 MB, one core's L2) on the benchmark shape. Measured with `cargo bench --bench ops --
/// lm_head_loss_fwd_bwd`: 310 ms at 512 against 323-324 ms at 256 and 384; 768 and 1024 were
/// within noise of 512 in the training bench.
pub const LM_HEAD_CHUNK: usize = 512;

/// Groups of chunks whose dx products are summed separately (then in group order): a fixed
/// number, so that dx has the same bits on any thread count; 16 keeps 1, 2, 4, 8 and 16 threads
/// evenly loaded (3 threads: 6-5-5 groups) at 15 extra `rows x c` buffers.
const LM_HEAD_DX_GROUPS: usize = 16;

/// Elements per task of the final dx sum.
const SUM_CHUNK: usize = 1 << 14;

/// See the module docs and `Backend::lm_head_loss`. `x`: `[rows, c]`, `wte`: `[vocab, c]`;
/// `scratch` (at least `rows * vocab`) is clobbered. Returns the sum of the row losses.
///
/// Rows whose target is ignored (`-100`) take no part in the products: they are packed out
/// first (in GPT-2 training, the last position of every sequence; in masked-LM training, most
/// positions), and their `dx` rows are 0.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_loss(
    scratch: &mut [f32],
    x: &[f32],
    wte: &[f32],
    bias: Option<&[f32]>,
    targets: &[i32],
    rows: usize,
    vocab: usize,
    c: usize,
    grad: Option<HeadGrads<&mut [f32]>>,
) -> f64 {
    assert!(scratch.len() >= rows * vocab, "lm_head_loss: scratch too small");
    assert!(x.len() == rows * c && wte.len() == vocab * c && targets.len() == rows, "lm_head_loss: shape");
    assert!(bias.is_none_or(|b| b.len() == vocab), "lm_head_loss: bias shape");
    for &t in targets {
        assert!(t == IGNORE_INDEX || (t >= 0 && (t as usize) < vocab), "cross_entropy: target {t} outside vocabulary {vocab}");
    }
    if let Some(g) = &grad {
        assert!(g.dx.len() == rows * c && g.dwte.len() == vocab * c, "lm_head_loss: gradient shape");
        assert_eq!(g.dbias.is_some(), bias.is_some(), "lm_head_loss: a bias gradient goes with a bias");
        assert!(g.dbias.as_ref().is_none_or(|d| d.len() == vocab), "lm_head_loss: bias gradient shape");
    }
    // sized up front, so that no collect grows (and, for a moment, doubles) them
    let mut kept = Vec::with_capacity(rows);
    kept.extend((0..rows).filter(|&r| targets[r] != IGNORE_INDEX));
    if kept.len() == rows {
        return head_rows(scratch, x, wte, bias, targets, c, grad);
    }
    let mut xk = Vec::with_capacity(kept.len() * c);
    for &r in &kept {
        xk.extend_from_slice(&x[r * c..(r + 1) * c]);
    }
    let tk: Vec<i32> = kept.iter().map(|&r| targets[r]).collect();
    match grad {
        None => head_rows(scratch, &xk, wte, bias, &tk, c, None),
        Some(HeadGrads { dx, dwte, dbias, dloss }) => {
            let mut dxk = vec![0f32; kept.len() * c];
            let loss = head_rows(scratch, &xk, wte, bias, &tk, c, Some(HeadGrads { dx: &mut dxk, dwte, dbias, dloss }));
            dx.fill(0.0);
            for (&r, d) in kept.iter().zip(dxk.chunks_exact(c)) {
                dx[r * c..(r + 1) * c].copy_from_slice(d);
            }
            loss
        }
    }
}

/// Host bytes [`lm_head_loss`] allocates for the duration of one call (all live at once, in its
/// backward pass) over `rows` rows of which `kept` have a target, beside the caller's buffers:
/// the packed rows when some are ignored, the per-(chunk, row) statistics and factors, the row
/// losses, the dx partial sums of the chunk groups and, on the AVX-512 path, each worker's two
/// dlogits copies. What the memory meter counts for the CPU's head.
pub fn lm_head_scratch_bytes(rows: usize, kept: usize, vocab: usize, c: usize, grad: bool) -> u64 {
    let (kept, vocab, c, g) = (kept as u64, vocab.max(1) as u64, c as u64, u64::from(grad));
    let mut bytes = 8 * rows as u64; // `kept`, at its capacity
    if kept < rows as u64 {
        bytes += kept * (4 * c + 4 + g * 4 * c); // xk, tk, dxk
    }
    if kept == 0 {
        return bytes;
    }
    let n_chunks = vocab.div_ceil(LM_HEAD_CHUNK as u64);
    bytes += kept * (8 * n_chunks + 4 + 8 + g * 4 * n_chunks); // stats, target logits, losses, factors
    if grad {
        let n_groups = n_chunks.min(LM_HEAD_DX_GROUPS as u64);
        bytes += (n_groups - 1) * kept * c * 4; // partial
        if transposed_dlogits() {
            let workers = (rayon::current_num_threads() as u64).clamp(1, n_chunks).min(n_groups);
            bytes += workers * 2 * LM_HEAD_CHUNK as u64 * kept * 4; // tbuf, nbuf
        }
    }
    bytes
}

/// Whether the backward writes each chunk's dlogits to per-worker buffers, one transposed (the
/// AVX-512 path; see pass 3 of `head_rows`).
fn transposed_dlogits() -> bool {
    crate::dispatch::simd_level() == crate::dispatch::SimdLevel::Avx512
}

/// [`lm_head_loss`] on rows that all have a target (one per entry of `targets`; shapes checked
/// by the caller).
fn head_rows(
    scratch: &mut [f32],
    x: &[f32],
    wte: &[f32],
    bias: Option<&[f32]>,
    targets: &[i32],
    c: usize,
    grad: Option<HeadGrads<&mut [f32]>>,
) -> f64 {
    let (rows, vocab) = (targets.len(), wte.len() / c);
    if rows == 0 {
        return 0.0;
    }
    let n_chunks = vocab.div_ceil(LM_HEAD_CHUNK);
    let chunk = |j: usize| (j * LM_HEAD_CHUNK, LM_HEAD_CHUNK.min(vocab - j * LM_HEAD_CHUNK));
    // passes 1 and 3 give each thread a contiguous range of chunks (`spans` cuts `0..n` in
    // `k` near-equal ranges); pass 3 sums dx over a fixed number of chunk groups
    let spans = |n: usize, k: usize| -> Vec<(usize, usize)> { (0..k).map(|p| (p * n / k, (p + 1) * n / k)).collect() };
    let threads = rayon::current_num_threads().clamp(1, n_chunks);
    let parts = spans(n_chunks, threads);
    // chunk j's block [rows, len] starts at rows * v0 in scratch
    let sp = SendPtr(scratch.as_mut_ptr());

    // pass 1: logits, per-(chunk, row) max and sum of exponentials, target logits
    let mut stats = vec![(0f32, 0f32); n_chunks * rows];
    let mut target_logit = vec![0f32; rows];
    let (stp, tlp) = (SendPtr(stats.as_mut_ptr()), SendPtr(target_logit.as_mut_ptr()));
    parts.par_iter().for_each(|&(j0, j1)| {
        for j in j0..j1 {
            let (v0, len) = chunk(j);
            // SAFETY: chunk j's block of scratch, its stats rows and the target logits that fall
            // in it are written by this task only; wte rows [v0, v0 + len) are in bounds.
            unsafe {
                let block = sp.get().add(rows * v0);
                matmul_strided(rows, len, c, block, len, x.as_ptr(), c as isize, 1, wte.as_ptr().add(v0 * c), 1, c as isize, false, 1.0);
                let st = std::slice::from_raw_parts_mut(stp.get().add(j * rows), rows);
                for (r, s) in st.iter_mut().enumerate() {
                    let row = std::slice::from_raw_parts_mut(block.add(r * len), len);
                    if let Some(bias) = bias {
                        row.iter_mut().zip(&bias[v0..v0 + len]).for_each(|(l, &b)| *l += b);
                    }
                    let t = targets[r];
                    if t >= v0 as i32 && (t as usize) < v0 + len {
                        *tlp.get().add(r) = row[t as usize - v0];
                    }
                    *s = max_exp_in_place(row);
                }
            }
        }
    });

    // pass 2: per-row log-sum-exp and loss; the per-(chunk, row) factors of the backward
    let dloss = grad.as_ref().map_or(0.0, |g| g.dloss);
    let mut factor = if grad.is_some() { vec![0f32; n_chunks * rows] } else { Vec::new() };
    let fp = SendPtr(factor.as_mut_ptr());
    let losses: Vec<f64> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let m = (0..n_chunks).map(|j| stats[j * rows + r].0).fold(f32::NEG_INFINITY, f32::max);
            // factor(j, r) = dloss e^(m_j - lse) = dloss e^(m_j - m) / sum: one exponential per
            // chunk, kept in the factor slot until the sum is known
            let mut sum = 0f64;
            for j in 0..n_chunks {
                let (mj, sj) = stats[j * rows + r];
                let e = ((mj - m) as f64).exp();
                sum += sj as f64 * e;
                if grad.is_some() {
                    // SAFETY: entry (j, r) is written by row r's task only.
                    unsafe { *fp.get().add(j * rows + r) = e as f32 };
                }
            }
            if grad.is_some() {
                let g = dloss as f64 / sum;
                for j in 0..n_chunks {
                    // SAFETY: as above.
                    unsafe {
                        let f = fp.get().add(j * rows + r);
                        *f = (*f as f64 * g) as f32;
                    }
                }
            }
            m as f64 + sum.ln() - target_logit[r] as f64
        })
        .collect();
    let loss: f64 = losses.iter().sum();

    // pass 3: dlogits and the two products. dx is a sum over all chunks, so its order must not
    // follow the threads: the chunks form `LM_HEAD_DX_GROUPS` fixed groups (a function of the
    // vocabulary only), each group's products accumulate in chunk order into its own buffer (group 0: dx
    // itself), and the groups are added in group order at the end. Thread p runs a contiguous
    // range of groups. dwte_chunk is a product of its own chunk alone.
    // With AVX-512 the scaling pass writes each chunk's dlogits to two per-thread buffers, one
    // transposed, so that dwte_chunk += dlogits^T · x runs with both operands in the layout the
    // gemm crate packs fastest (the transposed-operand product is ~15% slower than the copy),
    // and the big scratch is only read here (measured: ~5-10 ms less than scaling in place).
    if let Some(HeadGrads { dx, dwte, dbias, dloss }) = grad {
        let transposed = transposed_dlogits();
        let n_groups = n_chunks.min(LM_HEAD_DX_GROUPS);
        let groups = spans(n_chunks, n_groups);
        let workers = spans(n_groups, threads.min(n_groups));
        let mut partial = vec![0f32; (n_groups - 1) * rows * c];
        let dxp = SendPtr(dx.as_mut_ptr());
        let pp = SendPtr(partial.as_mut_ptr());
        let dwp = SendPtr(dwte.as_mut_ptr());
        let dbp = dbias.map(|d| SendPtr(d.as_mut_ptr()));
        let (factor, groups) = (&factor, &groups);
        workers.par_iter().for_each(|&(g0, g1)| {
            let mut tbuf = if transposed { vec![0f32; LM_HEAD_CHUNK * rows] } else { Vec::new() };
            let mut nbuf = if transposed { vec![0f32; LM_HEAD_CHUNK * rows] } else { Vec::new() };
            for (g, &(j0, j1)) in groups.iter().enumerate().take(g1).skip(g0) {
                // SAFETY: group g's dx target is dx (g = 0) or its own slice of `partial`,
                // written by this task only.
                let dxt = if g == 0 { dxp.get() } else { unsafe { pp.get().add((g - 1) * rows * c) } };
                for j in j0..j1 {
                    let (v0, len) = chunk(j);
                    let fac = &factor[j * rows..(j + 1) * rows];
                    // SAFETY: as in pass 1, chunk j's block, dwte rows and dbias entries
                    // [v0, v0 + len) belong to this task; dxt and tbuf / nbuf are written by this task only; `transposed`
                    // (the AVX-512 kernel) only when the CPU has AVX-512 (see `simd_level`).
                    unsafe {
                        let block = std::slice::from_raw_parts_mut(sp.get().add(rows * v0), rows * len);
                        #[cfg(target_arch = "x86_64")]
                        if transposed {
                            scale_transpose_avx512(block, &mut nbuf[..len * rows], &mut tbuf[..len * rows], rows, len, fac);
                        }
                        if !transposed {
                            for (row, &f) in block.chunks_exact_mut(len).zip(fac) {
                                softmax::scale_flush_subnormal(row, f);
                            }
                        }
                        let dl: &mut [f32] = if transposed { &mut nbuf[..len * rows] } else { block };
                        for (r, &t) in targets.iter().enumerate() {
                            if t >= v0 as i32 && (t as usize) < v0 + len {
                                let col = t as usize - v0;
                                dl[r * len + col] -= dloss;
                                if transposed {
                                    tbuf[col * rows + r] -= dloss;
                                }
                            }
                        }
                        if let Some(dbp) = dbp {
                            // dbias_chunk += column sums of dlogits, rows in order
                            let db = std::slice::from_raw_parts_mut(dbp.get().add(v0), len);
                            for row in dl.chunks_exact(len) {
                                db.iter_mut().zip(row).for_each(|(d, &g)| *d += g);
                            }
                        }
                        let w = wte.as_ptr().add(v0 * c);
                        let dw = dwp.get().add(v0 * c);
                        matmul_strided(rows, c, len, dxt, c, dl.as_ptr(), len as isize, 1, w, c as isize, 1, j > j0, 1.0);
                        if transposed {
                            matmul_strided(len, c, rows, dw, c, tbuf.as_ptr(), rows as isize, 1, x.as_ptr(), c as isize, 1, true, 1.0);
                        } else {
                            matmul_strided(len, c, rows, dw, c, dl.as_ptr(), 1, len as isize, x.as_ptr(), c as isize, 1, true, 1.0);
                        }
                    }
                }
            }
        });
        // dx = ((group 0 + group 1) + group 2) + ..., in one pass over dx
        let partial = &partial;
        dx.par_chunks_mut(SUM_CHUNK).enumerate().for_each(|(i, d)| {
            let (at, len) = (i * SUM_CHUNK, d.len());
            for part in partial.chunks_exact(rows * c) {
                for (d, p) in d.iter_mut().zip(&part[at..at + len]) {
                    *d += p;
                }
            }
        });
    }
    loss
}

/// Replaces `row` by `exp(row - max)` and returns `(max, sum of the exponentials)`.
fn max_exp_in_place(row: &mut [f32]) -> (f32, f32) {
    dispatch!(max_exp_in_place_portable, max_exp_in_place_avx512, max_exp_in_place_avx2, row)
}

#[inline(always)]
fn max_exp_in_place_portable(row: &mut [f32]) -> (f32, f32) {
    let (max, sum) = softmax::max_exp_in_place(row);
    (max, sum as f32)
}
avx2_version!(max_exp_in_place_avx2, max_exp_in_place_portable, (row: &mut [f32]) -> (f32, f32));

/// [`max_exp_in_place`] in explicit AVX-512 with [`crate::simd::exp16`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn max_exp_in_place_avx512(row: &mut [f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let (n, p) = (row.len(), row.as_mut_ptr());
    let full = n / 16 * 16;
    let tail = crate::simd::first_lanes(n - full);
    // SAFETY: full loads/stores cover [0, full), the masked ones only the tail lanes < n.
    unsafe {
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..full).step_by(16) {
            mx = _mm512_max_ps(mx, _mm512_loadu_ps(p.add(i)));
        }
        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail, p.add(full)));
        let max = _mm512_reduce_max_ps(mx);
        let mv = _mm512_set1_ps(max);
        let mut sum = _mm512_setzero_ps();
        for i in (0..full).step_by(16) {
            let e = crate::simd::exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), mv));
            _mm512_storeu_ps(p.add(i), e);
            sum = _mm512_add_ps(sum, e);
        }
        if tail != 0 {
            let e = crate::simd::exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, p.add(full)), mv));
            _mm512_mask_storeu_ps(p.add(full), tail, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
        }
        (max, _mm512_reduce_add_ps(sum))
    }
}

/// `dst[r, :] = fac[r] * block[r, :]` for the `[rows, len]` block (subnormal products flushed
/// to 0), also written transposed to `out` (`[len, rows]`), in 16 x 16 tiles; the ragged edges
/// go element by element.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn scale_transpose_avx512(block: &[f32], dst: &mut [f32], out: &mut [f32], rows: usize, len: usize, fac: &[f32]) {
    use std::arch::x86_64::*;
    assert!(block.len() == rows * len && dst.len() == rows * len && out.len() == rows * len && fac.len() == rows);
    let (r16, l16) = (rows / 16 * 16, len / 16 * 16);
    // probabilities below the smallest normal float become 0 (see `math::flush_subnormal`)
    let tiny = _mm512_set1_ps(f32::MIN_POSITIVE);
    let (bp, dp, op) = (block.as_ptr(), dst.as_mut_ptr(), out.as_mut_ptr());
    for r0 in (0..r16).step_by(16) {
        let f: [__m512; 16] = std::array::from_fn(|i| _mm512_set1_ps(fac[r0 + i]));
        for c0 in (0..l16).step_by(16) {
            // SAFETY: rows r0..r0+16 and columns c0..c0+16 are inside the block (r0 + 16 <= rows,
            // c0 + 16 <= len), and their transposes inside `out`.
            unsafe {
                let v: [__m512; 16] = std::array::from_fn(|i| {
                    let at = (r0 + i) * len + c0;
                    let s = _mm512_mul_ps(_mm512_loadu_ps(bp.add(at)), f[i]);
                    let s = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(s), tiny), s);
                    _mm512_storeu_ps(dp.add(at), s);
                    s
                });
                for (jj, t) in crate::simd::transpose16(&v).iter().enumerate() {
                    _mm512_storeu_ps(op.add((c0 + jj) * rows + r0), *t);
                }
            }
        }
        for r in r0..r0 + 16 {
            for col in l16..len {
                dst[r * len + col] = flush_subnormal(block[r * len + col] * fac[r]);
                out[col * rows + r] = dst[r * len + col];
            }
        }
    }
    for r in r16..rows {
        for col in 0..len {
            dst[r * len + col] = flush_subnormal(block[r * len + col] * fac[r]);
            out[col * rows + r] = dst[r * len + col];
        }
    }
}

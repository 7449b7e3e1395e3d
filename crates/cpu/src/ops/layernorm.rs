//! LayerNorm forward and backward.

use rayon::prelude::*;

use super::{LANES, rows_per_task};

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
    out.par_chunks_mut(cols * rpt).zip(inp.par_chunks(cols * rpt)).zip(mean.par_chunks_mut(rpt).zip(rstd.par_chunks_mut(rpt))).for_each(
        |((o, x), (mu, rs))| {
            dispatch!(layernorm_fwd_rows, layernorm_fwd_rows_avx512, layernorm_fwd_rows_avx2, o, x, mu, rs, weight, bias, cols, eps)
        },
    );
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
            dispatch!(layernorm_bwd_rows, layernorm_bwd_rows_avx512, layernorm_bwd_rows_avx2, &mut acc, di, dy, x, mu, rs, weight, cols);
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

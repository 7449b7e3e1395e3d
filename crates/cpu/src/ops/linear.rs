//! Linear layers: the matrix product (see [`crate::gemm`]) and the bias forward / backward.

use rayon::prelude::*;

use super::rows_per_task;

pub use crate::gemm::{matmul, matmul_desc};

/// `out[r, :] += bias` for each of `rows` rows.
pub fn add_bias(out: &mut [f32], bias: &[f32], rows: usize, cols: usize) {
    assert!(out.len() == rows * cols && bias.len() == cols, "add_bias: shape mismatch");
    out.par_chunks_mut(cols * rows_per_task(cols))
        .for_each(|c| dispatch!(add_bias_rows, add_bias_rows_avx512, add_bias_rows_avx2, c, bias));
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
            dispatch!(sum_rows, sum_rows_avx512, sum_rows_avx2, &mut acc, c);
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

//! Row gather and scatter-add: a head that runs on selected rows (the masked-LM head on the
//! labelled ~15% of positions) reads them with [`gather_rows`] and returns its input gradient
//! with [`scatter_add_rows`].

use rayon::prelude::*;

use super::rows_per_task;

/// `out[i, :] = x[rows[i], :]` (`cols` wide).
pub fn gather_rows(out: &mut [f32], x: &[f32], rows: &[u32], cols: usize) {
    assert!(out.len() == rows.len() * cols, "gather_rows: out has {} elements, needs {}", out.len(), rows.len() * cols);
    let n = x.len() / cols.max(1);
    let per = rows_per_task(cols);
    out.par_chunks_mut(cols * per).zip(rows.par_chunks(per)).for_each(|(o, r)| {
        for (o, &r) in o.chunks_exact_mut(cols).zip(r) {
            let r = r as usize;
            assert!(r < n, "gather_rows: row {r} of {n}");
            o.copy_from_slice(&x[r * cols..(r + 1) * cols]);
        }
    });
}

/// `dx[rows[i], :] += dsel[i, :]`; `rows` must be distinct (each position at most once), so
/// every row of `dx` receives at most one addition.
pub fn scatter_add_rows(dx: &mut [f32], dsel: &[f32], rows: &[u32], cols: usize) {
    assert!(dsel.len() == rows.len() * cols, "scatter_add_rows: dsel has {} elements, needs {}", dsel.len(), rows.len() * cols);
    let n = dx.len() / cols.max(1);
    for (d, &r) in dsel.chunks_exact(cols).zip(rows) {
        let r = r as usize;
        assert!(r < n, "scatter_add_rows: row {r} of {n}");
        dx[r * cols..(r + 1) * cols].iter_mut().zip(d).for_each(|(x, &g)| *x += g);
    }
}

//! Row-major matrix products on top of the `gemm` crate.
//!
//! Threading: on this project's 2-core machines, splitting the larger of M and N into one slab
//! per rayon thread and running single-threaded `gemm` calls side by side beats the crate's own
//! `Parallelism::Rayon` on the mid-sized transformer shapes (see TOOLCHAIN notes and
//! `benches/ops.rs`). Each slab keeps the full K reduction.
//!
//! Same bits on any thread count: an element of C is the `gemm` crate's K sum, in depth blocks
//! whose size its general path derives from K alone (and the CPU's caches), so the slab an
//! element falls in does not matter, as long as every slab takes that general path. Three other
//! paths of the crate sum differently: both sides at most 64 (512-deep blocks, not balanced
//! ones), a side of 1 (matrix-vector), at most 16 x 16 outputs (dot products). [`slabs`] never
//! cuts a product into slabs that would take one of them.

use gemm::Parallelism;
use lmtrain_backend::{GemmDesc, GemmShape};

/// Below this many multiply-adds a product runs on the calling thread.
const PAR_THRESHOLD: usize = 1 << 18;

/// A raw pointer that parallel tasks may share. Every user documents why its tasks touch
/// disjoint memory (and only read what others may read) while the borrow it comes from is alive.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: see the type's contract: each use site ensures disjoint writes within a live borrow.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `Send` wrapper, not the field).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Strides (row, column) of a stored operand.
fn strides(trans: bool, rows: usize, cols: usize) -> (isize, isize) {
    // op(X) is [rows, cols]; stored [rows, cols] (row stride = cols) or [cols, rows] transposed.
    if trans { (1, rows as isize) } else { (cols as isize, 1) }
}

/// `C (+)= op(A) · op(B)`; see [`GemmShape`]. Multi-threaded for large products.
pub fn matmul(c: &mut [f32], a: &[f32], b: &[f32], s: GemmShape) {
    let GemmShape { m, n, k, trans_a, trans_b, accumulate } = s;
    assert!(c.len() >= m * n, "gemm: C has {} elements, needs {}", c.len(), m * n);
    assert!(a.len() >= m * k, "gemm: A has {} elements, needs {}", a.len(), m * k);
    assert!(b.len() >= k * n, "gemm: B has {} elements, needs {}", b.len(), k * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let (a_rs, a_cs) = strides(trans_a, m, k);
    let (b_rs, b_cs) = strides(trans_b, k, n);
    let threads = rayon::current_num_threads();
    let work = m * n * k;
    let cp = SendPtr(c.as_mut_ptr());
    let ap = SendPtr(a.as_ptr() as *mut f32);
    let bp = SendPtr(b.as_ptr() as *mut f32);
    // One single-threaded call on rows [r0, r1) x columns [c0, c1) of C.
    let run = move |r0: usize, r1: usize, c0: usize, c1: usize| {
        let (cp, ap, bp) = (cp, ap, bp);
        // SAFETY: offsets stay inside the asserted lengths; slabs of C are disjoint.
        unsafe {
            gemm::gemm(
                r1 - r0,
                c1 - c0,
                k,
                cp.0.add(r0 * n + c0),
                1,
                n as isize,
                accumulate,
                ap.0.offset(r0 as isize * a_rs),
                a_cs,
                a_rs,
                bp.0.offset(c0 as isize * b_cs),
                b_cs,
                b_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            )
        }
    };
    if threads <= 1 || work < PAR_THRESHOLD {
        run(0, m, 0, n);
        return;
    }
    let split_rows = m >= n;
    let (dim, other) = if split_rows { (m, n) } else { (n, m) };
    let bounds = slabs(dim, other, threads);
    if bounds.len() <= 2 {
        run(0, m, 0, n);
        return;
    }
    rayon::scope(|sc| {
        for w in bounds.windows(2) {
            let (start, end) = (w[0], w[1]);
            let run = &run;
            sc.spawn(move |_| if split_rows { run(start, end, 0, n) } else { run(0, m, start, end) });
        }
    });
}

/// Slab boundaries `0 = b_0 < b_1 < ... = dim` along the split side (`other` = the side every
/// slab keeps whole) for up to `threads` slabs: multiples of 16 (full micro-kernel tiles), and
/// every slab long enough to take the `gemm` crate's general path when the whole product does:
/// at least 16, and more than 64 when `other` is at most 64 (see the module docs). A product
/// whose both sides are at most 64 is not split.
fn slabs(dim: usize, other: usize, threads: usize) -> Vec<usize> {
    if dim <= 64 && other <= 64 {
        return vec![0, dim];
    }
    let min_len = if other <= 64 { 65 } else { 16 };
    // b_i = i dim / parts rounded down to 16: every slab is at least dim / parts - 16 long
    let parts = threads.min(dim / (min_len + 16)).max(1);
    let mut b: Vec<usize> = (0..parts).map(|i| i * dim / parts / 16 * 16).collect();
    b.push(dim);
    b
}

/// [`matmul`] with leading dimensions and strided batches (see [`GemmDesc`]). A packed
/// description takes [`matmul`] itself; otherwise each product of the batch runs on the
/// calling thread, one after the other.
pub fn matmul_desc(c: &mut [f32], a: &[f32], b: &[f32], d: &GemmDesc) {
    if d.is_packed() {
        return matmul(c, a, b, d.shape);
    }
    let GemmShape { m, n, k, trans_a, trans_b, accumulate } = d.shape;
    let (lda, ldb, ldc) = d.leading_dims();
    let [sa, sb, sc] = d.strides;
    let last = d.batch.saturating_sub(1);
    // the largest element each operand's last matrix touches
    let (ar, ac) = if trans_a { (k, m) } else { (m, k) };
    let (br, bc) = if trans_b { (n, k) } else { (k, n) };
    let span = |rows: usize, cols: usize, ld: usize| if rows == 0 || cols == 0 { 0 } else { (rows - 1) * ld + cols };
    assert!(ac <= lda && bc <= ldb && n <= ldc, "gemm: a leading dimension is shorter than its row");
    assert!(a.len() >= last * sa + span(ar, ac, lda), "gemm: A too short for the description");
    assert!(b.len() >= last * sb + span(br, bc, ldb), "gemm: B too short for the description");
    assert!(c.len() >= last * sc + span(m, n, ldc), "gemm: C too short for the description");
    let (a_rs, a_cs) = if trans_a { (1, lda as isize) } else { (lda as isize, 1) };
    let (b_rs, b_cs) = if trans_b { (1, ldb as isize) } else { (ldb as isize, 1) };
    for i in 0..d.batch {
        // SAFETY: the asserts above keep every index of product i inside its operand.
        unsafe {
            matmul_strided(
                m,
                n,
                k,
                c.as_mut_ptr().add(i * sc),
                ldc,
                a.as_ptr().add(i * sa),
                a_rs,
                a_cs,
                b.as_ptr().add(i * sb),
                b_rs,
                b_cs,
                accumulate,
                1.0,
            );
        }
    }
}

/// Single-threaded `C (+)= scale · A · B` with explicit strides, for the small per-head products
/// inside attention (called from already-parallel loops).
///
/// # Safety
/// Every index `(i, j)` of C with `i < m, j < n`, `(i, p)` of A and `(p, j)` of B must lie inside
/// allocations the caller owns (C exclusively) for the given strides.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_strided(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
    accumulate: bool,
    scale: f32,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs as isize,
            accumulate,
            a,
            a_cs,
            a_rs,
            b,
            b_cs,
            b_rs,
            1.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], s: GemmShape) -> Vec<f32> {
        let mut c = vec![0f32; s.m * s.n];
        for i in 0..s.m {
            for j in 0..s.n {
                let mut acc = 0f64;
                for p in 0..s.k {
                    let av = if s.trans_a { a[p * s.m + i] } else { a[i * s.k + p] };
                    let bv = if s.trans_b { b[j * s.k + p] } else { b[p * s.n + j] };
                    acc += av as f64 * bv as f64;
                }
                c[i * s.n + j] = acc as f32;
            }
        }
        c
    }

    #[test]
    fn slabs_are_long_enough_for_the_general_path() {
        for dim in 1..700 {
            for other in [1, 16, 40, 64, 65, 300] {
                for threads in 1..=20 {
                    let b = slabs(dim, other, threads);
                    assert!(b.len() >= 2 && b[0] == 0 && *b.last().unwrap() == dim, "{dim} {other} {threads}: {b:?}");
                    assert!(b.len() - 1 <= threads, "{dim} {other} {threads}: {b:?}");
                    if b.len() > 2 {
                        let min_len = if other <= 64 { 65 } else { 16 };
                        for w in b.windows(2) {
                            assert!(w[1] - w[0] >= min_len, "{dim} {other} {threads}: {b:?}");
                        }
                        assert!(b[..b.len() - 1].iter().all(|x| x % 16 == 0), "{dim} {other} {threads}: {b:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn leading_dimensions_and_strided_batches_match_packed_products() {
        let mut seed = 3u64;
        let mut rnd = || {
            seed = lmtrain_backend::mix64(seed);
            (seed >> 40) as f32 / 16_777_216.0 - 0.5
        };
        let (m, n, k, batch) = (5, 7, 3, 3);
        for ta in [false, true] {
            for tb in [false, true] {
                let s = GemmShape { m, n, k, trans_a: ta, trans_b: tb, accumulate: false };
                // operands padded by 2 columns, matrices 1 element apart beyond their extent
                let (ar, ac) = if ta { (k, m) } else { (m, k) };
                let (br, bc) = if tb { (n, k) } else { (k, n) };
                let (lda, ldb, ldc) = (ac + 2, bc + 2, n + 2);
                let (sa, sb, sc) = (ar * lda + 1, br * ldb + 1, m * ldc + 1);
                let a: Vec<f32> = (0..batch * sa).map(|_| rnd()).collect();
                let b: Vec<f32> = (0..batch * sb).map(|_| rnd()).collect();
                let mut c = vec![7f32; batch * sc];
                let d = GemmDesc { shape: s, lda, ldb, ldc, batch, strides: [sa, sb, sc] };
                matmul_desc(&mut c, &a, &b, &d);
                for i in 0..batch {
                    let pack = |x: &[f32], r: usize, cols: usize, ld: usize| {
                        (0..r).flat_map(|row| x[row * ld..row * ld + cols].to_vec()).collect::<Vec<f32>>()
                    };
                    let want = naive(&pack(&a[i * sa..], ar, ac, lda), &pack(&b[i * sb..], br, bc, ldb), s);
                    for row in 0..m {
                        for col in 0..ldc {
                            let got = c[i * sc + row * ldc + col];
                            if col < n {
                                assert!((got - want[row * n + col]).abs() < 1e-5, "batch {i} ({row}, {col}) ta={ta} tb={tb}");
                            } else {
                                assert_eq!(got, 7.0, "padding of C is left alone");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn all_transposes_and_accumulate_match_naive() {
        let mut seed = 1u64;
        let mut rnd = || {
            seed = lmtrain_backend::mix64(seed);
            (seed >> 40) as f32 / 16_777_216.0 - 0.5
        };
        // odd sizes, one product large enough to take the threaded path
        for &(m, n, k) in &[(7, 5, 3), (33, 70, 19), (130, 300, 40), (300, 90, 77)] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
                    let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
                    let s = GemmShape { m, n, k, trans_a: ta, trans_b: tb, accumulate: false };
                    let want = naive(&a, &b, s);
                    let mut c = vec![f32::NAN; m * n];
                    matmul(&mut c, &a, &b, s);
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - y).abs() < 1e-5, "{m}x{n}x{k} ta={ta} tb={tb}: {x} vs {y}");
                    }
                    matmul(&mut c, &a, &b, GemmShape { accumulate: true, ..s });
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - 2.0 * y).abs() < 2e-5);
                    }
                }
            }
        }
    }
}

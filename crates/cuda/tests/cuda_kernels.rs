//! The CUDA kernels and the cuBLAS/cuBLASLt paths, launched from Rust through cudarc, compared
//! with the CPU backend (`lmtrain_cpu`) on odd shapes. Runs on the CPU emulator (both thread
//! orders, and once under AddressSanitizer) or, with LMTRAIN_CUDA_REAL=1, on a GPU.
//!
//! Error measure everywhere: max-norm relative error `max|got - want| / max|want|`.
//! Tolerances: 1e-5 for f32 results, 1e-2 for results stored in bf16.

mod support;

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig, sys::cublasOperation_t};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;
use lmtrain_backend::{AdamWHyper, DecaySegment, GeluKind, GemmShape};
use lmtrain_cpu::ops;
use lmtrain_cuda::{CudaDevice, DeviceKind, LtMatmul};
use support::{BF16_TOL, Child, Elem, F32_TOL, Mode, Rng, assert_close, check, on_device, quantize, run_children, store};

/// cuBLASLt's f32 path on a real GPU: the reference rounds inputs to TF32 to nearest-even like
/// the emulator (which then agrees to 1e-5), but how the hardware converts f32 to TF32
/// (nearest or truncation) is not specified, so a GPU may differ by an input ulp of TF32
/// (2^-10): about 1e-3 on these sums of 29-45 products.
const TF32_GPU_TOL: f64 = 5e-3;

fn layernorm_case<T: Elem>(dev: &CudaDevice, rows: usize, cols: usize, seed: u64) {
    let tag = format!("layernorm {}x{} {}", rows, cols, T::SUFFIX);
    let mut rng = Rng::new(seed);
    let x = quantize::<T>(rng.vec(rows * cols, 2.0, 0.5));
    let w = quantize::<T>(rng.vec(cols, 0.5, 1.0));
    let b = quantize::<T>(rng.vec(cols, 0.2, 0.0));
    let eps = 1e-5;

    let (mut out, mut mean, mut rstd) = (vec![0f32; rows * cols], vec![0f32; rows], vec![0f32; rows]);
    ops::layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, rows, cols, eps);

    let (dx, dw, db) = (dev.upload(&store::<T>(&x)).unwrap(), dev.upload(&store::<T>(&w)).unwrap(), dev.upload(&store::<T>(&b)).unwrap());
    let mut d_out = dev.zeros::<T>(rows * cols).unwrap();
    let (mut d_mean, mut d_rstd) = (dev.zeros::<f32>(rows).unwrap(), dev.zeros::<f32>(rows).unwrap());
    dev.layernorm_forward(
        &mut d_out.as_view_mut(),
        &mut d_mean.as_view_mut(),
        &mut d_rstd.as_view_mut(),
        &dx.as_view(),
        &dw.as_view(),
        &db.as_view(),
        rows,
        cols,
        eps,
    )
    .unwrap();
    check(dev, &format!("{tag} forward out"), &d_out, &out, T::TOL);
    check(dev, &format!("{tag} forward mean"), &d_mean, &mean, F32_TOL);
    check(dev, &format!("{tag} forward rstd"), &d_rstd, &rstd, F32_TOL);

    // Backward accumulates: start every gradient from non-zero values.
    let dout = quantize::<T>(rng.vec(rows * cols, 1.0, 0.0));
    let dinp0 = quantize::<T>(rng.vec(rows * cols, 0.5, 0.0));
    let (dweight0, dbias0) = (rng.vec(cols, 0.5, 0.0), rng.vec(cols, 0.5, 0.0));
    let (mut dinp, mut dweight, mut dbias) = (dinp0.clone(), dweight0.clone(), dbias0.clone());
    ops::layernorm_backward(&mut dinp, &mut dweight, &mut dbias, &dout, &x, &w, &mean, &rstd, rows, cols);

    let d_dout = dev.upload(&store::<T>(&dout)).unwrap();
    let mut d_dinp = dev.upload(&store::<T>(&dinp0)).unwrap();
    let (mut d_dw, mut d_db) = (dev.upload(&dweight0).unwrap(), dev.upload(&dbias0).unwrap());
    let (m_ref, r_ref) = (dev.upload(&mean).unwrap(), dev.upload(&rstd).unwrap());
    let mut scratch = dev.zeros::<f32>(lmtrain_cuda::layernorm_backward_scratch(rows, cols)).unwrap();
    dev.layernorm_backward(
        &mut d_dinp.as_view_mut(),
        &mut d_dw.as_view_mut(),
        &mut d_db.as_view_mut(),
        &mut scratch.as_view_mut(),
        &d_dout.as_view(),
        &dx.as_view(),
        &dw.as_view(),
        &m_ref.as_view(),
        &r_ref.as_view(),
        rows,
        cols,
    )
    .unwrap();
    check(dev, &format!("{tag} backward dinp"), &d_dinp, &dinp, T::TOL);
    check(dev, &format!("{tag} backward dweight"), &d_dw, &dweight, F32_TOL);
    check(dev, &format!("{tag} backward dbias"), &d_db, &dbias, F32_TOL);
}

fn gelu_case<T: Elem>(dev: &CudaDevice, n: usize, kind: GeluKind, seed: u64) {
    let tag = format!("gelu {kind:?} n={n} {}", T::SUFFIX);
    let mut rng = Rng::new(seed);
    let x = quantize::<T>(rng.vec(n, 4.0, 0.0));
    let mut out = vec![0f32; n];
    ops::gelu_forward(&mut out, &x, kind);
    let dx = dev.upload(&store::<T>(&x)).unwrap();
    let mut d_out = dev.zeros::<T>(n).unwrap();
    dev.gelu_forward(&mut d_out.as_view_mut(), &dx.as_view(), kind).unwrap();
    check(dev, &format!("{tag} forward"), &d_out, &out, T::TOL);

    let dout = quantize::<T>(rng.vec(n, 1.0, 0.0));
    let dinp0 = quantize::<T>(rng.vec(n, 0.5, 0.0));
    let mut dinp = dinp0.clone();
    ops::gelu_backward(&mut dinp, &x, &dout, kind);
    let d_dout = dev.upload(&store::<T>(&dout)).unwrap();
    let mut d_dinp = dev.upload(&store::<T>(&dinp0)).unwrap();
    dev.gelu_backward(&mut d_dinp.as_view_mut(), &dx.as_view(), &d_dout.as_view(), kind).unwrap();
    check(dev, &format!("{tag} backward"), &d_dinp, &dinp, T::TOL);
}

/// Three decay segments (decay, no decay, decay) of odd lengths: the wrapper launches on three
/// sub-ranges (views at odd offsets) with different weight decay.
fn segments(n: usize) -> Vec<DecaySegment> {
    vec![
        DecaySegment { offset: 0, len: 1000, weight_decay: 0.1 },
        DecaySegment { offset: 1000, len: 13, weight_decay: 0.0 },
        DecaySegment { offset: 1013, len: n - 1013, weight_decay: 0.1 },
    ]
}

fn hyper(step: u32) -> AdamWHyper {
    AdamWHyper { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, step, grad_scale: 0.7 }
}

#[test]
fn layernorm_f32() {
    on_device("layernorm_f32", |dev| {
        layernorm_case::<f32>(dev, 37, 771, 1);
        layernorm_case::<f32>(dev, 9, 45, 2);
    });
}

#[test]
fn layernorm_bf16() {
    on_device("layernorm_bf16", |dev| {
        layernorm_case::<bf16>(dev, 37, 771, 3);
        layernorm_case::<bf16>(dev, 9, 45, 4);
    });
}

#[test]
fn gelu_f32() {
    on_device("gelu_f32", |dev| {
        gelu_case::<f32>(dev, 10007, GeluKind::Tanh, 5);
        gelu_case::<f32>(dev, 10007, GeluKind::Erf, 6);
    });
}

#[test]
fn gelu_bf16() {
    on_device("gelu_bf16", |dev| {
        gelu_case::<bf16>(dev, 10007, GeluKind::Tanh, 7);
        gelu_case::<bf16>(dev, 10007, GeluKind::Erf, 8);
    });
}

#[test]
fn adamw_f32() {
    on_device("adamw_f32", |dev| {
        let n = 3001;
        let mut rng = Rng::new(9);
        let p0 = rng.vec(n, 1.0, 0.0);
        let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
        let mut dp = dev.upload(&p0).unwrap();
        let (mut dm, mut dv) = (dev.zeros::<f32>(n).unwrap(), dev.zeros::<f32>(n).unwrap());
        let segs = segments(n);
        for step in 1..=3 {
            let g = rng.vec(n, 0.5, 0.0);
            ops::adamw_update(&mut p, &g, &mut m, &mut v, &segs, &hyper(step));
            let dg = dev.upload(&g).unwrap();
            dev.adamw_update(&mut dp.as_view_mut(), &dg.as_view(), &mut dm.as_view_mut(), &mut dv.as_view_mut(), None, &segs, &hyper(step))
                .unwrap();
        }
        let got = dev.download(&dp).unwrap();
        assert_close("adamw f32 params", &got, &p, F32_TOL);
        check(dev, "adamw f32 m", &dm, &m, F32_TOL);
        check(dev, "adamw f32 v", &dv, &v, F32_TOL);
        // The update itself (p - p0, about 3e-2): a difference of O(1) values, so its f32
        // rounding floor is ~1e-5 of its size; 1e-4 still catches any wrong term.
        let delta = |q: &[f32]| q.iter().zip(&p0).map(|(a, b)| a - b).collect::<Vec<_>>();
        assert_close("adamw f32 update p - p0", &delta(&got), &delta(&p), 1e-4);
    });
}

#[test]
fn adamw_bf16() {
    on_device("adamw_bf16", |dev| {
        let n = 3001;
        let mut rng = Rng::new(10);
        let w0 = rng.vec(n, 1.0, 0.0);
        let (mut w, mut m, mut v) = (w0.clone(), vec![0f32; n], vec![0f32; n]);
        let mut dw = dev.upload(&w0).unwrap();
        let mut dparams = dev.upload(&store::<bf16>(&w0)).unwrap();
        let (mut dm, mut dv) = (dev.zeros::<f32>(n).unwrap(), dev.zeros::<f32>(n).unwrap());
        let segs = segments(n);
        for step in 1..=3 {
            let g = quantize::<bf16>(rng.vec(n, 0.5, 0.0));
            ops::adamw_update(&mut w, &g, &mut m, &mut v, &segs, &hyper(step));
            let dg = dev.upload(&store::<bf16>(&g)).unwrap();
            dev.adamw_update_bf16(
                &mut dw.as_view_mut(),
                &mut dparams.as_view_mut(),
                &dg.as_view(),
                &mut dm.as_view_mut(),
                &mut dv.as_view_mut(),
                None,
                &segs,
                &hyper(step),
                step as u64,
            )
            .unwrap();
        }
        check(dev, "adamw bf16 master", &dw, &w, F32_TOL);
        check(dev, "adamw bf16 m", &dm, &m, F32_TOL);
        check(dev, "adamw bf16 v", &dv, &v, F32_TOL);
        check(dev, "adamw bf16 params copy", &dparams, &w, BF16_TOL);
    });
}

/// Rounds to TF32 (10 mantissa bits, nearest even), as cuBLASLt's f32 path (compute type
/// 32F_FAST_TF32 in cudarc) does to its inputs on tensor cores.
fn tf32(x: f32) -> f32 {
    let b = x.to_bits();
    f32::from_bits((b + 0xFFF + ((b >> 13) & 1)) & !0x1FFF)
}

fn lt_case<T: Elem>(dev: &CudaDevice, lt: &LtMatmul, s: GemmShape, bias: bool, gelu: bool, seed: u64)
where
    cudarc::cublaslt::CudaBlasLT: cudarc::cublaslt::Matmul<T>,
{
    let tag =
        format!("lt {}x{}x{} ta={} tb={} acc={} bias={bias} gelu={gelu} {}", s.m, s.n, s.k, s.trans_a, s.trans_b, s.accumulate, T::SUFFIX);
    let mut rng = Rng::new(seed);
    let a = quantize::<T>(rng.vec(s.m * s.k, 1.0, 0.0));
    let b = quantize::<T>(rng.vec(s.k * s.n, 1.0, 0.0));
    let bv = quantize::<T>(rng.vec(s.n, 0.5, 0.0));
    let c0 = quantize::<T>(rng.vec(s.m * s.n, 1.0, 0.0));
    // Reference on the CPU backend; f32 inputs rounded to TF32 like the GPU's.
    let round = |x: &[f32]| {
        if T::SUFFIX == "f32" { x.iter().map(|&v| tf32(v)).collect() } else { x.to_vec() }
    };
    let mut want = c0.clone();
    ops::matmul(&mut want, &round(&a), &round(&b), s);
    if bias {
        ops::add_bias(&mut want, &bv, s.m, s.n);
    }
    if gelu {
        let pre = want.clone();
        ops::gelu_forward(&mut want, &pre, GeluKind::Tanh);
    }
    let (da, db, dbias) =
        (dev.upload(&store::<T>(&a)).unwrap(), dev.upload(&store::<T>(&b)).unwrap(), dev.upload(&store::<T>(&bv)).unwrap());
    let mut dc = dev.upload(&store::<T>(&c0)).unwrap();
    let bias_view = dbias.as_view();
    lt.matmul(&mut dc.as_view_mut(), &da.as_view(), &db.as_view(), bias.then_some(&bias_view), gelu, s).unwrap();
    let tol = if T::SUFFIX == "f32" && dev.kind() == DeviceKind::Gpu { TF32_GPU_TOL } else { T::TOL };
    check(dev, &tag, &dc, &want, tol);
}

fn lt_all<T: Elem>(dev: &CudaDevice)
where
    cudarc::cublaslt::CudaBlasLT: cudarc::cublaslt::Matmul<T>,
{
    let lt = LtMatmul::new(dev).unwrap();
    let mut seed = 20;
    for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
        let s = GemmShape { m: 37, n: 53, k: 29, trans_a, trans_b, accumulate: false };
        lt_case::<T>(dev, &lt, s, true, true, seed);
        seed += 1;
    }
    let s = GemmShape { m: 19, n: 7, k: 45, trans_a: false, trans_b: true, accumulate: false };
    lt_case::<T>(dev, &lt, s, true, false, seed);
    let s = GemmShape { m: 19, n: 7, k: 45, trans_a: true, trans_b: false, accumulate: true };
    lt_case::<T>(dev, &lt, s, false, false, seed + 1);
}

#[test]
fn lt_matmul_bias_gelu_f32() {
    on_device("lt_matmul_bias_gelu_f32", lt_all::<f32>);
}

#[test]
fn lt_matmul_bias_gelu_bf16() {
    on_device("lt_matmul_bias_gelu_bf16", lt_all::<bf16>);
}

/// cuBLAS (not Lt) strided-batched SGEMM with transposes, padded leading dimensions,
/// alpha/beta, against a column-major reference written out here.
#[test]
fn cublas_sgemm_strided_batched() {
    on_device("cublas_sgemm_strided_batched", |dev| {
        let blas = CudaBlas::new(dev.stream().clone()).unwrap();
        let (m, n, k, batch) = (7usize, 5usize, 6usize, 3usize);
        // op(A) = A^T with A stored k x m (lda = k + 2); op(B) = B stored k x n (ldb = k + 1).
        let (lda, ldb, ldc) = (k + 2, k + 1, m + 3);
        let (sa, sb, sc) = (lda * m + 4, ldb * n, ldc * n + 1);
        let mut rng = Rng::new(30);
        let a = rng.vec(sa * batch, 1.0, 0.0);
        let b = rng.vec(sb * batch, 1.0, 0.0);
        let c0 = rng.vec(sc * batch, 1.0, 0.0);
        let (alpha, beta) = (0.5f32, 2.0f32);
        let mut want = c0.clone();
        for p in 0..batch {
            for j in 0..n {
                for i in 0..m {
                    let dot: f64 = (0..k).map(|l| f64::from(a[p * sa + l + i * lda]) * f64::from(b[p * sb + l + j * ldb])).sum();
                    let ci = p * sc + i + j * ldc;
                    want[ci] = (f64::from(alpha) * dot + f64::from(beta) * f64::from(c0[ci])) as f32;
                }
            }
        }
        let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
        let mut dc = dev.upload(&c0).unwrap();
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_T,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: m as i32,
                n: n as i32,
                k: k as i32,
                alpha,
                lda: lda as i32,
                ldb: ldb as i32,
                beta,
                ldc: ldc as i32,
            },
            batch_size: batch as i32,
            stride_a: sa as i64,
            stride_b: sb as i64,
            stride_c: sc as i64,
        };
        // SAFETY: the buffers hold `batch` strided matrices of the declared shapes and leading
        // dimensions (sizes computed above from the same numbers).
        unsafe { blas.gemm_strided_batched(cfg, &da, &db, &mut dc) }.unwrap();
        // Padding between columns and batches must stay untouched: compare the whole buffer.
        check(dev, "cublas sgemm strided batched", &dc, &want, F32_TOL);
    });
}

/// cuBLASLt through cudarc directly: a strided batch of column-major products with padded
/// leading dimensions, transposed A, alpha/beta and a per-batch bias (bias batch stride).
#[test]
fn cublaslt_strided_batched_bias() {
    on_device("cublaslt_strided_batched_bias", |dev| {
        use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
        let lt = CudaBlasLT::new(dev.stream().clone()).unwrap();
        let (m, n, k, batch) = (9usize, 6usize, 11usize, 3usize);
        // op(A) = A^T, A stored k x m with lda = k + 1; B stored k x n with ldb = k + 3.
        let (lda, ldb, ldc) = (k + 1, k + 3, m + 2);
        let (sa, sb, sc, sbias) = (lda * m, ldb * n + 5, ldc * n, m + 1);
        let mut rng = Rng::new(31);
        let a = quantize::<bf16>(rng.vec(sa * batch, 1.0, 0.0));
        let b = quantize::<bf16>(rng.vec(sb * batch, 1.0, 0.0));
        let c0 = quantize::<bf16>(rng.vec(sc * batch, 1.0, 0.0));
        let bias = quantize::<bf16>(rng.vec(sbias * batch, 0.5, 0.0));
        let (alpha, beta) = (0.75f32, 0.5f32);
        let mut want = c0.clone();
        for p in 0..batch {
            for j in 0..n {
                for i in 0..m {
                    let dot: f64 = (0..k).map(|l| f64::from(a[p * sa + l + i * lda]) * f64::from(b[p * sb + l + j * ldb])).sum();
                    let ci = p * sc + i + j * ldc;
                    want[ci] = (f64::from(alpha) * dot + f64::from(beta) * f64::from(c0[ci])) as f32 + bias[p * sbias + i];
                }
            }
        }
        let (da, db, dbias) =
            (dev.upload(&store::<bf16>(&a)).unwrap(), dev.upload(&store::<bf16>(&b)).unwrap(), dev.upload(&store::<bf16>(&bias)).unwrap());
        let mut dc = dev.upload(&store::<bf16>(&c0)).unwrap();
        let cfg = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: m as u64,
            n: n as u64,
            k: k as u64,
            alpha,
            lda: lda as i64,
            ldb: ldb as i64,
            beta,
            ldc: ldc as i64,
            stride_a: Some(sa as i64),
            stride_b: Some(sb as i64),
            stride_c: Some(sc as i64),
            stride_bias: Some(sbias as i64),
            batch_size: Some(batch as i32),
        };
        // SAFETY: every buffer holds `batch` strided operands of the declared shapes and
        // leading dimensions (sizes computed above from the same numbers).
        unsafe { lt.matmul(cfg, &da, &db, &mut dc, Some(&dbias), None) }.unwrap();
        // Only the m x n part of each padded C is written: compare the whole buffer.
        check(dev, "cublaslt strided batched bf16 + bias", &dc, &want, BF16_TOL);
    });
}

/// The emulator refuses launches a GPU would refuse or silently corrupt memory with.
#[test]
fn emulator_rejects_bad_launches() {
    on_device("emulator_rejects_bad_launches", |dev| {
        if dev.kind() != DeviceKind::Emulator {
            println!("emulator_rejects_bad_launches: not the emulator, nothing to check");
            return;
        }
        let n = 64u64;
        let x = dev.upload(&vec![1f32; 64]).unwrap();
        let mut y = dev.zeros::<f32>(64).unwrap();
        let f = dev.function("gelu_tanh_fwd_f32").unwrap();
        let cfg = |threads: u32, smem: u32| LaunchConfig { grid_dim: (1, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem };
        // Too many threads per block.
        let mut b = dev.stream().launch_builder(f);
        b.arg(&mut y).arg(&x).arg(&n);
        // SAFETY: the launch is refused by the driver before any kernel code runs.
        assert!(unsafe { b.launch(cfg(1025, 0)) }.is_err(), "1025 threads per block accepted");
        // More dynamic shared memory than the default 48 KiB without an opt-in.
        let mut b = dev.stream().launch_builder(f);
        b.arg(&mut y).arg(&x).arg(&n);
        // SAFETY: as above, refused before running.
        assert!(unsafe { b.launch(cfg(64, 64 * 1024)) }.is_err(), "64 KiB of dynamic shared memory accepted");
        // A host address where the kernel expects device memory.
        let host = vec![0f32; 64];
        let bogus = host.as_ptr() as u64;
        let mut b = dev.stream().launch_builder(f);
        b.arg(&bogus).arg(&x).arg(&n);
        // SAFETY: as above, refused before running.
        assert!(unsafe { b.launch(cfg(64, 0)) }.is_err(), "a host pointer was accepted as device memory");
        // And the well-formed launch goes through.
        let mut b = dev.stream().launch_builder(f);
        b.arg(&mut y).arg(&x).arg(&n);
        // SAFETY: x and y hold n = 64 elements, the kernel's bound.
        unsafe { b.launch(cfg(64, 0)) }.unwrap();
        let want = 0.5 * (1.0 + (0.797_884_6f32 * 1.044_715).tanh());
        assert!((dev.download(&y).unwrap()[63] - want).abs() < 1e-6);
    });
}

/// Every device test above, once more in one child whose fake libraries are built with
/// AddressSanitizer: out-of-bounds accesses of kernels (device buffers are exact-size heap
/// allocations) abort the child.
#[test]
fn address_sanitizer_pass() {
    const ALL: &[&str] = &[
        "layernorm_f32",
        "layernorm_bf16",
        "gelu_f32",
        "gelu_bf16",
        "adamw_f32",
        "adamw_bf16",
        "lt_matmul_bias_gelu_f32",
        "lt_matmul_bias_gelu_bf16",
        "cublas_sgemm_strided_batched",
        "cublaslt_strided_batched_bias",
        "emulator_rejects_bad_launches",
    ];
    match support::mode() {
        Mode::Direct => {} // a child (nothing to do) or a real GPU (no sanitizer)
        Mode::Skip(why) => support::skip("address_sanitizer_pass", why),
        Mode::Emulate(_) => match (lmtrain_cuda_emu::ASAN_DIR, lmtrain_cuda_emu::ASAN_RUNTIME) {
            (Some(dir), Some(rt)) => {
                run_children(ALL, &Child { lib_dir: dir, order: "forward", asan_runtime: Some(rt), allow_emulator: true })
            }
            _ => support::skip("address_sanitizer_pass", "the host compiler has no AddressSanitizer runtime"),
        },
    }
}

//! Throughput of the CUDA kernels and of the cuBLASLt GEMM with its bias+GELU epilogue, at
//! GPT-2 small shapes (8 x 1024 tokens, 768 wide), timed with CUDA events.
//!
//!     cargo bench -p lmtrain-cuda --bench cuda_kernels [-- --small] [-- --iters N]
//!
//! Needs a GPU; without one it prints why and exits 0. `--small` divides the sizes by 64 so
//! the bench itself can be exercised on the CPU emulator (`LD_LIBRARY_PATH=<OUT_DIR>/cuemu
//! LMTRAIN_CUEMU=1`), where the timings mean nothing. Output: one table row per case with the
//! time per call and the achieved memory bandwidth (element-wise and row kernels, counting
//! each byte read or written once) or TFLOP/s (GEMM).

use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use lmtrain_backend::{AdamWHyper, DecaySegment, GeluKind, GemmShape};
use lmtrain_cuda::{CudaDevice, KernelDtype, LtMatmul, Result};

struct Bench<'a> {
    dev: &'a CudaDevice,
    iters: usize,
}

impl Bench<'_> {
    /// Mean milliseconds per call of `f` over `iters` calls, after 3 warm-up calls.
    fn time(&self, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        let ctx = self.dev.context();
        let event = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv);
        let (start, end) = (event()?, event()?);
        start.record(self.dev.stream()).map_err(drv)?;
        for _ in 0..self.iters {
            f()?;
        }
        end.record(self.dev.stream()).map_err(drv)?;
        end.synchronize().map_err(drv)?;
        Ok(f64::from(start.elapsed_ms(&end).map_err(drv)?) / self.iters as f64)
    }
}

fn drv(e: cudarc::driver::DriverError) -> lmtrain_cuda::CudaError {
    lmtrain_cuda::CudaError::Driver { context: "bench timing".into(), source: e }
}

fn row(op: &str, dtype: &str, shape: &str, ms: f64, rate: String) {
    println!("| {op:<22} | {dtype:<5} | {shape:<18} | {:>10.1} | {rate:>12} |", ms * 1e3);
}

fn gbps(bytes: usize, ms: f64) -> String {
    format!("{:.0} GB/s", bytes as f64 / (ms * 1e-3) / 1e9)
}

fn row_kernels<T: KernelDtype>(b: &Bench<'_>, rows: usize, cols: usize) -> Result<()> {
    let dev = b.dev;
    let e = size_of::<T>();
    let n = rows * cols;
    let (x, w, bias) = (dev.zeros::<T>(n)?, dev.zeros::<T>(cols)?, dev.zeros::<T>(cols)?);
    let (mut out, mut dinp) = (dev.zeros::<T>(n)?, dev.zeros::<T>(n)?);
    let (mut mean, mut rstd) = (dev.zeros::<f32>(rows)?, dev.zeros::<f32>(rows)?);
    let (mut dw, mut db) = (dev.zeros::<f32>(cols)?, dev.zeros::<f32>(cols)?);
    let shape = format!("{rows}x{cols}");
    let ms = b.time(|| {
        dev.layernorm_forward(
            &mut out.as_view_mut(),
            &mut mean.as_view_mut(),
            &mut rstd.as_view_mut(),
            &x.as_view(),
            &w.as_view(),
            &bias.as_view(),
            rows,
            cols,
            1e-5,
        )
    })?;
    row("layernorm_forward", T::SUFFIX, &shape, ms, gbps(2 * n * e, ms));
    let mut scratch = dev.zeros::<f32>(lmtrain_cuda::layernorm_backward_scratch(rows, cols))?;
    let ms = b.time(|| {
        dev.layernorm_backward(
            &mut dinp.as_view_mut(),
            &mut dw.as_view_mut(),
            &mut db.as_view_mut(),
            &mut scratch.as_view_mut(),
            &out.as_view(),
            &x.as_view(),
            &w.as_view(),
            &mean.as_view(),
            &rstd.as_view(),
            rows,
            cols,
        )
    })?;
    row("layernorm_backward", T::SUFFIX, &shape, ms, gbps(4 * n * e, ms));
    let n4 = 4 * n; // the MLP's hidden activations
    let (h, mut g, mut dh) = (dev.zeros::<T>(n4)?, dev.zeros::<T>(n4)?, dev.zeros::<T>(n4)?);
    let shape = format!("{n4}");
    for kind in [GeluKind::Tanh, GeluKind::Erf] {
        let ms = b.time(|| dev.gelu_forward(&mut g.as_view_mut(), &h.as_view(), kind))?;
        row(&format!("gelu_forward {kind:?}"), T::SUFFIX, &shape, ms, gbps(2 * n4 * e, ms));
        let ms = b.time(|| dev.gelu_backward(&mut dh.as_view_mut(), &h.as_view(), &g.as_view(), kind))?;
        row(&format!("gelu_backward {kind:?}"), T::SUFFIX, &shape, ms, gbps(4 * n4 * e, ms));
    }
    Ok(())
}

fn adamw(b: &Bench<'_>, n: usize) -> Result<()> {
    let dev = b.dev;
    let hp = AdamWHyper { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 1, grad_scale: 1.0 };
    let segs = [DecaySegment { offset: 0, len: n, weight_decay: 0.1 }];
    let (mut p, g, mut m, mut v) = (dev.zeros::<f32>(n)?, dev.zeros::<f32>(n)?, dev.zeros::<f32>(n)?, dev.zeros::<f32>(n)?);
    let ms =
        b.time(|| dev.adamw_update(&mut p.as_view_mut(), &g.as_view(), &mut m.as_view_mut(), &mut v.as_view_mut(), None, &segs, &hp))?;
    row("adamw_update", "f32", &format!("{n}"), ms, gbps(7 * 4 * n, ms));
    let (mut pb, gb) = (dev.zeros::<bf16>(n)?, dev.zeros::<bf16>(n)?);
    let ms = b.time(|| {
        dev.adamw_update_bf16(
            &mut p.as_view_mut(),
            &mut pb.as_view_mut(),
            &gb.as_view(),
            &mut m.as_view_mut(),
            &mut v.as_view_mut(),
            None,
            &segs,
            &hp,
            1,
        )
    })?;
    row("adamw_update_bf16", "bf16", &format!("{n}"), ms, gbps(28 * n, ms));
    Ok(())
}

fn lt<T: KernelDtype>(b: &Bench<'_>, lt: &LtMatmul, m: usize, n: usize, k: usize) -> Result<()>
where
    cudarc::cublaslt::CudaBlasLT: cudarc::cublaslt::Matmul<T>,
{
    let dev = b.dev;
    let (a, w, bias, mut c) = (dev.zeros::<T>(m * k)?, dev.zeros::<T>(n * k)?, dev.zeros::<T>(n)?, dev.zeros::<T>(m * n)?);
    // A linear layer: x [m, k] times W^T (W stored [n, k]), + bias, GELU.
    let s = GemmShape { m, n, k, trans_a: false, trans_b: true, accumulate: false };
    let bias_view = bias.as_view();
    let ms = b.time(|| lt.matmul(&mut c.as_view_mut(), &a.as_view(), &w.as_view(), Some(&bias_view), true, s))?;
    let tflops = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12;
    let dtype = if T::SUFFIX == "f32" { "tf32" } else { T::SUFFIX };
    row("lt matmul+bias+gelu", dtype, &format!("{m}x{n}x{k}"), ms, format!("{tflops:.1} TFLOP/s"));
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let small = args.iter().any(|a| a == "--small");
    let iters = args.iter().position(|a| a == "--iters").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(20);
    let dev = match CudaDevice::open(0) {
        Ok(d) => d,
        Err(e) => {
            println!("SKIP cuda_kernels bench: {e}");
            return;
        }
    };
    let div = if small { 64 } else { 1 };
    println!("device: {} ({:?}), {iters} iterations per case", dev.name(), dev.kind());
    println!("| {:<22} | {:<5} | {:<18} | {:>10} | {:>12} |", "op", "dtype", "shape", "µs/call", "rate");
    println!("|{:-<24}|{:-<7}|{:-<20}|{:-<12}|{:-<14}|", "", "", "", "", "");
    let b = Bench { dev: &dev, iters };
    let rows = 8 * 1024 / div;
    let run = || -> Result<()> {
        row_kernels::<f32>(&b, rows, 768)?;
        row_kernels::<bf16>(&b, rows, 768)?;
        adamw(&b, 124_439_808 / div)?;
        let l = LtMatmul::new(&dev)?;
        lt::<f32>(&b, &l, rows, 3072, 768)?;
        lt::<bf16>(&b, &l, rows, 3072, 768)?;
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

//! Matrix products through cuBLASLt with the fused bias and GELU epilogue.

use cudarc::cublaslt::{Activation, CudaBlasLT, Matmul, MatmulConfig};
use cudarc::driver::{CudaView, CudaViewMut};
use lmtrain_backend::GemmShape;

use crate::{CudaDevice, CudaError, Result, shape};

/// A cuBLASLt handle bound to a device's stream.
pub struct LtMatmul {
    lt: CudaBlasLT,
}

impl std::fmt::Debug for LtMatmul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LtMatmul")
    }
}

impl LtMatmul {
    /// Creates the handle (and cuBLASLt's workspace) on `dev`'s stream.
    pub fn new(dev: &CudaDevice) -> Result<Self> {
        // SAFETY: only loads the shared library (dlopen) and reports whether that worked.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(CudaError::Blas { context: "loading libcublasLt.so".into(), detail: "library not found".into() });
        }
        let lt = CudaBlasLT::new(dev.stream().clone())
            .map_err(|e| CudaError::Blas { context: "creating a handle".into(), detail: e.to_string() })?;
        Ok(Self { lt })
    }

    /// Row-major `C[m, n] = op(A) · op(B)` (+ `bias[n]` on every row) (then GELU, tanh form), with
    /// the [`GemmShape`] conventions of the CPU backend; `s.accumulate` adds to C instead
    /// (not combinable with an epilogue). For f32, cuBLASLt computes with TF32 tensor cores
    /// (inputs rounded to 10 mantissa bits); bf16 accumulates in f32.
    pub fn matmul<T>(
        &self,
        c: &mut CudaViewMut<'_, T>,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        bias: Option<&CudaView<'_, T>>,
        gelu: bool,
        s: GemmShape,
    ) -> Result<()>
    where
        CudaBlasLT: Matmul<T>,
    {
        const OP: &str = "lt_matmul";
        let GemmShape { m, n, k, trans_a, trans_b, accumulate } = s;
        let sizes = [("C", c.len(), m * n), ("A", a.len(), m * k), ("B", b.len(), k * n)];
        for (what, len, want) in sizes {
            if len != want {
                return Err(shape(OP, format!("{what} has {len} elements, expected {want}")));
            }
        }
        if let Some(bias) = bias
            && bias.len() != n
        {
            return Err(shape(OP, format!("bias has {} elements, expected {n}", bias.len())));
        }
        if accumulate && (gelu || bias.is_some()) {
            return Err(shape(OP, "accumulate cannot be combined with a bias or GELU epilogue"));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let dim = |v: usize| i64::try_from(v).map_err(|_| shape(OP, format!("dimension {v} exceeds i64")));
        // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: B plays cuBLASLt's
        // "A" and A its "B"; a row-major [r, c] buffer is a column-major c x r one (ld = c).
        let cfg = MatmulConfig {
            transa: trans_b,
            transb: trans_a,
            transc: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            alpha: 1.0,
            lda: dim(if trans_b { k } else { n })?.max(1),
            ldb: dim(if trans_a { m } else { k })?.max(1),
            beta: if accumulate { 1.0 } else { 0.0 },
            ldc: dim(n)?,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        let act = gelu.then_some(Activation::Gelu);
        // SAFETY: A, B, C (and bias) have exactly the lengths the layouts above describe
        // (checked), so cuBLASLt reads and writes inside them.
        unsafe { self.lt.matmul(cfg, b, a, c, bias, act.as_ref()) }
            .map_err(|e| CudaError::Blas { context: format!("matmul {m}x{n}x{k}"), detail: e.to_string() })
    }
}

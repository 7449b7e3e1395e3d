//! Safe wrappers of the kernels in `kernels/*.cu`, one per operation, generic over the storage
//! type. Each checks its arguments' shapes and the launch limits, then launches.
//! Semantics follow `lmtrain_cpu::ops` (the reference); `*_backward` ACCUMULATES.

use cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, LaunchConfig, ValidAsZeroBits};
use half::bf16;
use lmtrain_backend::{AdamWHyper, DecaySegment, GeluKind};

use crate::launch::Launch;
use crate::{CudaDevice, Result, shape};

mod attention;
mod deberta;
mod fused;

pub use attention::AttnOptions;
pub use deberta::{RelTables, disentangled_backward_scratch};
pub use fused::{ClassifierRows, EmbeddingBatch, Positions, bias_backward_scratch, grad_norm_scratch};
pub(crate) use sealed::{Typed, TypedMut};

mod sealed {
    use cudarc::cublas::{CudaBlas, Gemm, StridedBatchedConfig, result::CublasError};
    use cudarc::driver::{CudaView, CudaViewMut};
    use half::bf16;

    /// A shared view of one of the storage types, for code that differs between them.
    pub enum Typed<'a> {
        F32(CudaView<'a, f32>),
        Bf16(CudaView<'a, bf16>),
    }

    /// An exclusive view of one of the storage types.
    pub enum TypedMut<'a> {
        F32(CudaViewMut<'a, f32>),
        Bf16(CudaViewMut<'a, bf16>),
    }

    /// What the crate needs of a storage type besides its kernels: host conversions and the
    /// cuBLAS product (f32: `sgemm`; bf16: `GemmEx` with bf16 operands, f32 compute).
    pub trait Sealed: Sized {
        /// Whether this is f32.
        const IS_F32: bool;
        /// `x` rounded to this type (round to nearest even).
        fn round_from(x: f32) -> Self;
        /// The value as f32 (exact).
        fn widen(self) -> f32;
        /// The view as what it is.
        fn typed(v: CudaView<'_, Self>) -> Typed<'_>;
        /// The exclusive view as what it is.
        fn typed_mut(v: CudaViewMut<'_, Self>) -> TypedMut<'_>;
        /// `cublas<t>gemmStridedBatched`.
        ///
        /// # Safety
        /// The operands hold every element `cfg` reads or writes.
        unsafe fn gemm_strided_batched(
            blas: &CudaBlas,
            cfg: StridedBatchedConfig<Self>,
            a: &CudaView<'_, Self>,
            b: &CudaView<'_, Self>,
            c: &mut CudaViewMut<'_, Self>,
        ) -> Result<(), CublasError>;
    }

    impl Sealed for f32 {
        const IS_F32: bool = true;
        fn round_from(x: f32) -> Self {
            x
        }
        fn widen(self) -> f32 {
            self
        }
        fn typed(v: CudaView<'_, f32>) -> Typed<'_> {
            Typed::F32(v)
        }
        fn typed_mut(v: CudaViewMut<'_, f32>) -> TypedMut<'_> {
            TypedMut::F32(v)
        }
        unsafe fn gemm_strided_batched(
            blas: &CudaBlas,
            cfg: StridedBatchedConfig<f32>,
            a: &CudaView<'_, f32>,
            b: &CudaView<'_, f32>,
            c: &mut CudaViewMut<'_, f32>,
        ) -> Result<(), CublasError> {
            // SAFETY: the caller's contract.
            unsafe { blas.gemm_strided_batched(cfg, a, b, c) }
        }
    }

    impl Sealed for bf16 {
        const IS_F32: bool = false;
        fn round_from(x: f32) -> Self {
            bf16::from_f32(x)
        }
        fn widen(self) -> f32 {
            bf16::to_f32(self)
        }
        fn typed(v: CudaView<'_, bf16>) -> Typed<'_> {
            Typed::Bf16(v)
        }
        fn typed_mut(v: CudaViewMut<'_, bf16>) -> TypedMut<'_> {
            TypedMut::Bf16(v)
        }
        unsafe fn gemm_strided_batched(
            blas: &CudaBlas,
            cfg: StridedBatchedConfig<bf16>,
            a: &CudaView<'_, bf16>,
            b: &CudaView<'_, bf16>,
            c: &mut CudaViewMut<'_, bf16>,
        ) -> Result<(), CublasError> {
            // SAFETY: the caller's contract.
            unsafe { blas.gemm_strided_batched(cfg, a, b, c) }
        }
    }
}

/// Element types the kernels are compiled for; a kernel `op` of type `T` is the CUDA symbol
/// `op_{T::SUFFIX}` (e.g. `layernorm_fwd_bf16`).
pub trait KernelDtype: DeviceRepr + ValidAsZeroBits + sealed::Sealed + Copy + Send + Sync + 'static {
    /// Symbol suffix: `f32` or `bf16`.
    const SUFFIX: &'static str;
}
impl KernelDtype for f32 {
    const SUFFIX: &'static str = "f32";
}
impl KernelDtype for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Threads per block of the row kernels: 8 warps, one row per warp (kWarpsPerBlock in layernorm.cu).
const ROW_BLOCK: u32 = 256;
const ROWS_PER_BLOCK: usize = 8;
/// Threads per block and maximum blocks of the grid-stride element-wise kernels.
const ELEM_BLOCK: u32 = 256;
const ELEM_MAX_BLOCKS: usize = 1 << 16;
/// Default dynamic shared memory limit per block (no opt-in needed below it).
const SMEM_LIMIT: usize = 48 * 1024;
/// Rows per segment of the deterministic parameter-gradient reductions (LayerNorm, bias).
const SEG_ROWS: usize = 32;

/// Floats of scratch [`CudaDevice::layernorm_backward`] needs: two partial rows per segment.
pub fn layernorm_backward_scratch(rows: usize, cols: usize) -> usize {
    2 * cols * rows.div_ceil(SEG_ROWS)
}

fn check_len(op: &'static str, what: &str, len: usize, want: usize) -> Result<()> {
    if len == want { Ok(()) } else { Err(shape(op, format!("{what} has {len} elements, expected {want}"))) }
}

fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| shape(op, format!("{what} = {v} exceeds i32")))
}

fn rows_grid(rows: usize) -> u32 {
    rows.div_ceil(ROWS_PER_BLOCK) as u32
}

pub(crate) fn elem_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(ELEM_BLOCK as usize).clamp(1, ELEM_MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (ELEM_BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// A run of consecutive parameters with one weight decay (the kernel's unit of launch).
struct DecayRun {
    offset: usize,
    len: usize,
    weight_decay: f32,
}

/// Validates that `segments` tile `0..n` in order and merges neighbours with equal decay, so a
/// GPT-2 step costs two or three launches instead of one per tensor.
fn decay_runs(op: &'static str, segments: &[DecaySegment], n: usize) -> Result<Vec<DecayRun>> {
    let mut runs: Vec<DecayRun> = Vec::new();
    let mut next = 0;
    for s in segments {
        if s.offset != next {
            return Err(shape(op, format!("segment at {} leaves a gap or overlap (expected offset {next})", s.offset)));
        }
        next += s.len;
        match runs.last_mut() {
            Some(r) if r.weight_decay == s.weight_decay => r.len += s.len,
            _ => runs.push(DecayRun { offset: s.offset, len: s.len, weight_decay: s.weight_decay }),
        }
    }
    if next != n {
        return Err(shape(op, format!("segments cover {next} of {n} parameters")));
    }
    runs.retain(|r| r.len > 0);
    Ok(runs)
}

/// Per-step scalars of the AdamW kernels, computed like the CPU reference (f64 bias corrections).
struct AdamScalars {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    grad_scale: f32,
    step_size: f32,
    bc2_sqrt: f32,
}

impl AdamScalars {
    fn new(op: &'static str, hp: &AdamWHyper) -> Result<Self> {
        if hp.step == 0 {
            return Err(shape(op, "step is 1-based and must be at least 1"));
        }
        // the bias corrections every backend shares (torch's, in double precision)
        let (step_size, bc2_sqrt) = hp.bias_corrections();
        Ok(Self { lr: hp.lr, beta1: hp.beta1, beta2: hp.beta2, eps: hp.eps, grad_scale: hp.grad_scale, step_size, bc2_sqrt })
    }

    /// Pushes the scalars both AdamW kernels take after their buffers and length, in their
    /// parameter order: lr, beta1, beta2, eps, weight decay, grad scale, step size, sqrt(bc2).
    fn push<'a>(&'a self, l: &mut Launch<'a>, weight_decay: &'a f32) {
        l.scalar(&self.lr).scalar(&self.beta1).scalar(&self.beta2).scalar(&self.eps).scalar(weight_decay);
        l.scalar(&self.grad_scale).scalar(&self.step_size).scalar(&self.bc2_sqrt);
    }
}

impl CudaDevice {
    /// LayerNorm forward over `rows` rows of `cols`: `out = (inp - mean) * rstd * weight + bias`;
    /// saves `mean` and `rstd` (f32) for the backward pass.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward<T: KernelDtype>(
        &self,
        out: &mut CudaViewMut<'_, T>,
        mean: &mut CudaViewMut<'_, f32>,
        rstd: &mut CudaViewMut<'_, f32>,
        inp: &CudaView<'_, T>,
        weight: &CudaView<'_, T>,
        bias: &CudaView<'_, T>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "layernorm_forward";
        let n = rows.checked_mul(cols).ok_or_else(|| shape(OP, "rows * cols overflows"))?;
        check_len(OP, "out", out.len(), n)?;
        check_len(OP, "inp", inp.len(), n)?;
        check_len(OP, "mean", mean.len(), rows)?;
        check_len(OP, "rstd", rstd.len(), rows)?;
        check_len(OP, "weight", weight.len(), cols)?;
        check_len(OP, "bias", bias.len(), cols)?;
        let (rows_i, cols_i) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig { grid_dim: (rows_grid(rows), 1, 1), block_dim: (ROW_BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut l = Launch::new(self, format!("layernorm_fwd_{}", T::SUFFIX))?;
        l.output(out).output(mean).output(rstd).input(inp).input(weight).input(bias);
        l.scalar(&rows_i).scalar(&cols_i).scalar(&eps);
        // SAFETY: every buffer has exactly the length the kernel indexes (checked above): it
        // touches rows*cols elements of out/inp, rows of mean/rstd and cols of weight/bias.
        unsafe { l.launch(cfg) }
    }

    /// LayerNorm backward; ACCUMULATES into `dinp`, `dweight` and `dbias` (the parameter
    /// gradients summed in f32, stored as `G`: f32 for either storage type, or bf16 for bf16
    /// storage, rounded once). Deterministic (no float atomics): `scratch`
    /// (at least [`layernorm_backward_scratch`]`(rows, cols)` floats) receives per-segment
    /// partial sums that a second launch adds in order.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward<T: KernelDtype, G: KernelDtype>(
        &self,
        dinp: &mut CudaViewMut<'_, T>,
        dweight: &mut CudaViewMut<'_, G>,
        dbias: &mut CudaViewMut<'_, G>,
        scratch: &mut CudaViewMut<'_, f32>,
        dout: &CudaView<'_, T>,
        inp: &CudaView<'_, T>,
        weight: &CudaView<'_, T>,
        mean: &CudaView<'_, f32>,
        rstd: &CudaView<'_, f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        const OP: &str = "layernorm_backward";
        let n = rows.checked_mul(cols).ok_or_else(|| shape(OP, "rows * cols overflows"))?;
        check_len(OP, "dinp", dinp.len(), n)?;
        check_len(OP, "dout", dout.len(), n)?;
        check_len(OP, "inp", inp.len(), n)?;
        check_len(OP, "dweight", dweight.len(), cols)?;
        check_len(OP, "dbias", dbias.len(), cols)?;
        check_len(OP, "weight", weight.len(), cols)?;
        check_len(OP, "mean", mean.len(), rows)?;
        check_len(OP, "rstd", rstd.len(), rows)?;
        let need = layernorm_backward_scratch(rows, cols);
        if scratch.len() < need {
            return Err(shape(OP, format!("scratch has {} floats, needs {need}", scratch.len())));
        }
        let (rows_i, cols_i) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
        to_i32(OP, "2 * cols", 2 * cols)?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let nseg = rows.div_ceil(SEG_ROWS);
        let seg_rows = SEG_ROWS as i32;
        let cfg = LaunchConfig { grid_dim: (nseg as u32, 1, 1), block_dim: (ROW_BLOCK, 1, 1), shared_mem_bytes: 0 };
        {
            let mut part = scratch.slice_mut(0..2 * cols * nseg);
            let mut l = Launch::new(self, format!("layernorm_bwd_{}", T::SUFFIX))?;
            l.output(dinp).output(&mut part).input(dout).input(inp).input(weight).input(mean).input(rstd);
            l.scalar(&rows_i).scalar(&cols_i).scalar(&seg_rows);
            // SAFETY: lengths checked above; block `seg` touches rows [seg*SEG_ROWS, ..) < rows of
            // dinp/dout/inp/mean/rstd, cols of weight, and 2*cols floats of part at seg*2*cols,
            // inside the nseg*2*cols floats of `part`.
            unsafe { l.launch(cfg) }?;
        }
        let part = scratch.slice(0..2 * cols * nseg);
        self.column_sum(dweight, &part.slice(0..), nseg, 2 * cols, cols)?;
        self.column_sum(dbias, &part.slice(cols..), nseg, 2 * cols, cols)
    }

    /// `dst[c] += sum_s partials[s * stride + c]` for `c < n`, `s < nseg`, summed in order (in
    /// f32; a bf16 `dst` is rounded once).
    pub(crate) fn column_sum<G: KernelDtype>(
        &self,
        dst: &mut CudaViewMut<'_, G>,
        partials: &CudaView<'_, f32>,
        nseg: usize,
        stride: usize,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "column_sum";
        check_len(OP, "dst", dst.len(), n)?;
        if nseg == 0 || n == 0 {
            return Ok(());
        }
        if n > stride || partials.len() < (nseg - 1) * stride + n {
            return Err(shape(OP, "partials too short for nseg * stride"));
        }
        let (nseg_i, stride_i, n_i) = (to_i32(OP, "nseg", nseg)?, to_i32(OP, "stride", stride)?, to_i32(OP, "n", n)?);
        let cfg =
            LaunchConfig { grid_dim: (n.div_ceil(ELEM_BLOCK as usize) as u32, 1, 1), block_dim: (ELEM_BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut l = Launch::new(self, format!("column_sum_{}", G::SUFFIX))?;
        l.output(dst).input(partials);
        l.scalar(&nseg_i).scalar(&stride_i).scalar(&n_i);
        // SAFETY: thread c < n reads partials[s*stride + c] for s < nseg, below
        // (nseg-1)*stride + n <= partials.len() (checked), and writes dst[c] (n elements).
        unsafe { l.launch(cfg) }
    }

    /// `out = gelu(inp)` element-wise.
    pub fn gelu_forward<T: KernelDtype>(&self, out: &mut CudaViewMut<'_, T>, inp: &CudaView<'_, T>, kind: GeluKind) -> Result<()> {
        const OP: &str = "gelu_forward";
        let n = inp.len();
        check_len(OP, "out", out.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        let mut l = Launch::new(self, format!("gelu_{}_fwd_{}", gelu_name(kind), T::SUFFIX))?;
        l.output(out).input(inp).scalar(&n64);
        // SAFETY: out and inp both have n elements, the kernel's loop bound.
        unsafe { l.launch(elem_cfg(n)) }
    }

    /// `dinp += gelu'(inp) * dout` element-wise.
    pub fn gelu_backward<T: KernelDtype>(
        &self,
        dinp: &mut CudaViewMut<'_, T>,
        inp: &CudaView<'_, T>,
        dout: &CudaView<'_, T>,
        kind: GeluKind,
    ) -> Result<()> {
        const OP: &str = "gelu_backward";
        let n = inp.len();
        check_len(OP, "dinp", dinp.len(), n)?;
        check_len(OP, "dout", dout.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        let mut l = Launch::new(self, format!("gelu_{}_bwd_{}", gelu_name(kind), T::SUFFIX))?;
        l.output(dinp).input(inp).input(dout).scalar(&n64);
        // SAFETY: dinp, inp and dout all have n elements, the kernel's loop bound.
        unsafe { l.launch(elem_cfg(n)) }
    }

    /// One fused AdamW step over f32 parameters (torch.optim.AdamW semantics, as
    /// `lmtrain_cpu::ops::adamw_update`): `segments` tile the buffer and give each part its
    /// weight decay; gradients are scaled by `hp.grad_scale` first, and by `clip[1]` when given
    /// (the clipping factor [`CudaDevice::grad_norm`] leaves on the device).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_update(
        &self,
        params: &mut CudaViewMut<'_, f32>,
        grads: &CudaView<'_, f32>,
        m: &mut CudaViewMut<'_, f32>,
        v: &mut CudaViewMut<'_, f32>,
        clip: Option<&CudaView<'_, f32>>,
        segments: &[DecaySegment],
        hp: &AdamWHyper,
    ) -> Result<()> {
        const OP: &str = "adamw_update";
        let n = params.len();
        check_len(OP, "grads", grads.len(), n)?;
        check_len(OP, "m", m.len(), n)?;
        check_len(OP, "v", v.len(), n)?;
        if let Some(c) = clip {
            check_len(OP, "clip", c.len(), 2)?;
        }
        let s = AdamScalars::new(OP, hp)?;
        for run in decay_runs(OP, segments, n)? {
            let r = run.offset..run.offset + run.len;
            let (mut p, g, mut mm, mut vv) = (params.slice_mut(r.clone()), grads.slice(r.clone()), m.slice_mut(r.clone()), v.slice_mut(r));
            let len = run.len as u64;
            let mut l = Launch::new(self, "adamw_f32".to_string())?;
            l.output(&mut p).input(&g).output(&mut mm).output(&mut vv).optional_input(clip).scalar(&len);
            s.push(&mut l, &run.weight_decay);
            // SAFETY: the four views have run.len elements (sub-ranges of buffers whose lengths
            // were checked), the kernel's loop bound; clip, when given, has its 2 floats.
            unsafe { l.launch(elem_cfg(run.len)) }?;
        }
        Ok(())
    }

    /// Mixed-precision AdamW: updates the f32 `master` weights and moments from bf16
    /// gradients, and refreshes the bf16 `params` copy the forward pass reads, rounded
    /// stochastically (random bits from `(seed, parameter index)`: pass a new seed each step).
    /// `clip` as in [`CudaDevice::adamw_update`].
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_update_bf16(
        &self,
        master: &mut CudaViewMut<'_, f32>,
        params: &mut CudaViewMut<'_, bf16>,
        grads: &CudaView<'_, bf16>,
        m: &mut CudaViewMut<'_, f32>,
        v: &mut CudaViewMut<'_, f32>,
        clip: Option<&CudaView<'_, f32>>,
        segments: &[DecaySegment],
        hp: &AdamWHyper,
        seed: u64,
    ) -> Result<()> {
        const OP: &str = "adamw_update_bf16";
        let n = master.len();
        check_len(OP, "params", params.len(), n)?;
        check_len(OP, "grads", grads.len(), n)?;
        check_len(OP, "m", m.len(), n)?;
        check_len(OP, "v", v.len(), n)?;
        if let Some(c) = clip {
            check_len(OP, "clip", c.len(), 2)?;
        }
        let s = AdamScalars::new(OP, hp)?;
        for run in decay_runs(OP, segments, n)? {
            let r = run.offset..run.offset + run.len;
            let (mut w, mut p, g) = (master.slice_mut(r.clone()), params.slice_mut(r.clone()), grads.slice(r.clone()));
            let (mut mm, mut vv) = (m.slice_mut(r.clone()), v.slice_mut(r));
            let (len, offset) = (run.len as u64, run.offset as u64);
            let mut l = Launch::new(self, "adamw_bf16".to_string())?;
            l.output(&mut w)
                .output(&mut p)
                .input(&g)
                .output(&mut mm)
                .output(&mut vv)
                .optional_input(clip)
                .scalar(&len)
                .scalar(&offset)
                .scalar(&seed);
            s.push(&mut l, &run.weight_decay);
            // SAFETY: the five views have run.len elements (sub-ranges of checked buffers), the
            // kernel's loop bound; clip, when given, has its 2 floats.
            unsafe { l.launch(elem_cfg(run.len)) }?;
        }
        Ok(())
    }
}

fn gelu_name(kind: GeluKind) -> &'static str {
    match kind {
        GeluKind::Tanh => "tanh",
        GeluKind::Erf => "erf",
    }
}

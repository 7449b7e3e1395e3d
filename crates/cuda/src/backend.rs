//! [`CudaBackend`]: the op interface [`lmtrain_backend::Backend`] on a CUDA device, gluing the
//! kernel wrappers of [`CudaDevice`] (and, for the small ops, the kernels of
//! `kernels/elementwise.cu`, `kernels/rows.cu` and their families) to the trait's ops with
//! `lmtrain_cpu`'s semantics. Generic over the storage type: `CudaBackend` (= `CudaBackend<f32>`)
//! stores and computes in f32; `CudaBackend<half::bf16>` is mixed precision.
//!
//! f32: matrix products go through cuBLAS `sgemm` in its default math mode (full f32, no TF32),
//! so the backend agrees with the CPU backend to f32 rounding; the bias and GELU epilogues are
//! separate kernels. (cuBLASLt's f32 path, [`crate::LtMatmul`], rounds inputs to TF32.)
//!
//! bf16 ([`Backend::F32_COMPUTE`] false): parameters, gradients and activations are bf16 and
//! every kernel computes in f32, rounding each stored result once (round to nearest even); the
//! products are cuBLAS `GemmEx` with bf16 operands and f32 compute, those with a bias cuBLASLt
//! with its bias epilogue (the bias added to the f32 product, one rounding; GELU stays a pass of
//! its own, as the backward needs the stored pre-activation). What stays f32: the master
//! weights and AdamW's moments ([`Backend::Master`]; the optimizer keeps the master copy and
//! `adamw_update` runs the `adamw_bf16` kernel on it, refreshing the bf16 weights by stochastic
//! rounding seeded from the step number, so a step is reproducible), the parameter-gradient
//! reductions (summed in f32, added to the bf16 gradient once), attention's row log-sum-exp, the
//! head's row losses, LayerNorm's per-row mean and rstd and the step scalars (f64 loss, f32
//! norm). `from_host` /
//! `to_host` convert on the host (round to nearest even / exact).
//!
//! Memory: buffers are [`CuBuf`]s (a `CudaSlice<T>`; CUDA refuses empty allocations, so every
//! empty buffer points at one unused element that the backend allocated once). A training run's parameters, gradients, moments and
//! master weights are the parts of ONE allocation ([`Backend::alloc_training_state`]);
//! activations are allocated once per batch shape by the model. A view is a [`CuView`] (a `Copy` handle on a buffer or
//! on an exclusive view) and an exclusive view a `CudaViewMut<T>`. A micro-batch's integer
//! arrays go to the device once ([`CudaBatch`]: key padding and labelled rows at
//! [`Backend::upload_batch`], token ids with the embedding backward's buckets and the head's
//! targets at their first use, when the table sizes they are validated against are known). The
//! step scalars ([`CudaStats`]) stay on the device until [`Backend::read_stats`].
//!
//! DeBERTa: the disentangled attention keeps its probabilities (`[b, n_head, t, t]` f32,
//! [`Backend::alloc_disentangled_state`]) instead of the flash kernels' row log-sum-exp, and its
//! backward takes the score gradients (as many floats again) from the shared scratch buffer;
//! `kernels/deberta.cu` has the kernels, with the convolution's `im2col` and its fold.
//! Embeddings may lack a position table (DeBERTa-v3).

use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{CudaBlas, StridedBatchedConfig, sys::cublasOperation_t};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceRepr, LaunchConfig};
use lmtrain_backend::{
    AdamWStep, AttnShape, Backend, BackendError, DecaySegment, DisentangledShape, Dropout, EmbeddingTables, Epilogue, GeluKind, GemmDesc,
    HeadGrads, HostBatch, Inputs, OptimizerState, PaddingIdx, Result, Rows, StepStats, TrainingState, mix_seed,
};

use crate::kernels::{Typed, TypedMut, elem_cfg};
use crate::launch::Launch;
use crate::{
    AttnOptions, ClassifierRows, CudaDevice, CudaError, EmbeddingBatch, KernelDtype, LtMatmul, Positions, RelTables, grad_norm_scratch,
};
use crate::{bias_backward_scratch, disentangled_backward_scratch, layernorm_backward_scratch};

impl From<CudaError> for BackendError {
    fn from(e: CudaError) -> Self {
        BackendError(e.to_string())
    }
}

fn check(op: &str, what: &str, len: usize, want: usize) -> Result<()> {
    if len == want { Ok(()) } else { Err(BackendError(format!("{op}: {what} has {len} elements, expected {want}"))) }
}

/// Bytes behind every empty buffer: room for one element of any dtype.
const EMPTY_BYTES: usize = 16;

/// Seed of the stochastic rounding of the bf16 AdamW, mixed with the step number.
const ROUNDING_SEED: u64 = 0xADA3_5EED;

/// An owned device buffer of `len` elements of `T` ([`Backend::Buf`]; f32: also
/// [`Backend::Master`]): an allocation of its own, or a part of one shared with other buffers
/// (the training state, [`Backend::alloc_training_state`]).
#[derive(Debug)]
pub struct CuBuf<T = f32> {
    /// The elements; a part of `arena` when that is set (then it must not free itself).
    data: ManuallyDrop<CudaSlice<T>>,
    len: usize,
    /// The allocation `data` lies in, freed when its last part is dropped.
    arena: Option<Arc<CudaSlice<u8>>>,
}

impl<T> CuBuf<T> {
    /// A buffer owning its allocation.
    fn own(data: CudaSlice<T>, len: usize) -> Self {
        CuBuf { data: ManuallyDrop::new(data), len, arena: None }
    }

    /// The whole buffer as a cudarc view.
    fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.data.slice_mut(0..self.len)
    }
}

impl<T> Drop for CuBuf<T> {
    fn drop(&mut self) {
        // SAFETY: `data` is taken here, once, and never used again.
        let data = unsafe { ManuallyDrop::take(&mut self.data) };
        if self.arena.is_some() {
            // a part of the arena: forget it without freeing (the arena frees the memory when
            // its last part is gone; this field is dropped after this function)
            data.leak();
        }
    }
}

/// A shared view of `len` elements of `T` starting at `off` of a device buffer or of an exclusive
/// view.
#[derive(Debug)]
pub struct CuView<'a, T = f32> {
    src: Src<'a, T>,
    off: usize,
    len: usize,
}

impl<T> Clone for CuView<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for CuView<'_, T> {}

#[derive(Debug)]
enum Src<'a, T> {
    Buf(&'a CudaSlice<T>),
    Mut(&'a CudaViewMut<'a, T>),
}

impl<T> Clone for Src<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Src<'_, T> {}

impl<'a, T> CuView<'a, T> {
    /// Elements in the view.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cudarc view the kernel wrappers take.
    pub fn cuda(&self) -> CudaView<'a, T> {
        let r = self.off..self.off + self.len;
        match self.src {
            Src::Buf(s) => s.slice(r),
            Src::Mut(v) => v.slice(r),
        }
    }
}

/// A micro-batch's integer inputs: the host copy the sizes come from, and the device arrays.
pub struct CudaBatch {
    host: Inputs,
    /// 1 = real token, per `[b, t]` (when the batch has padding).
    key_valid: Option<CudaSlice<u8>>,
    /// The labelled positions (when there are any).
    labelled: Option<CudaSlice<i32>>,
    emb: OnceLock<EmbeddingBatch>,
    head_all: OnceLock<ClassifierRows>,
    head_labelled: OnceLock<ClassifierRows>,
}

impl CudaBatch {
    /// The token ids, positions (without a position table, `n_pos` `None`: none) and token
    /// types, uploaded at the first call (validated against the table sizes then).
    fn embedding(&self, dev: &CudaDevice, vocab: usize, n_pos: Option<usize>, n_types: Option<usize>) -> Result<&EmbeddingBatch> {
        if let Some(e) = self.emb.get() {
            return Ok(e);
        }
        let h = &self.host;
        let positions = match n_pos {
            None => Positions::None,
            Some(_) => h.positions.as_deref().map_or(Positions::Offset(0), Positions::Explicit),
        };
        // a token-type table without token-type ids: every token has type 0 (as the CPU backend)
        let zeros;
        let types = match (n_types, h.token_types.as_deref()) {
            (None, _) => None,
            (Some(_), Some(tt)) => Some(tt),
            (Some(_), None) => {
                zeros = vec![0u32; h.ids.len()];
                Some(&zeros[..])
            }
        };
        let e = EmbeddingBatch::new(dev, h.b, h.t, &h.ids, positions, types, vocab, n_pos.unwrap_or(0), n_types.unwrap_or(0))?;
        Ok(self.emb.get_or_init(|| e))
    }

    /// The rows and targets of a head over `rows`, uploaded at the first call.
    fn head(&self, dev: &CudaDevice, rows: Rows, vocab: usize) -> Result<&ClassifierRows> {
        let (cell, targets) = match rows {
            Rows::All => (&self.head_all, &self.host.targets),
            Rows::Labelled => (&self.head_labelled, &self.host.labelled_targets),
        };
        if let Some(c) = cell.get() {
            return Ok(c);
        }
        let c = ClassifierRows::all(dev, targets, vocab)?;
        Ok(cell.get_or_init(|| c))
    }

    fn labelled(&self) -> Result<CudaView<'_, i32>> {
        self.labelled.as_ref().map(|l| l.as_view()).ok_or_else(|| BackendError("gather_rows: the batch has no labelled rows".into()))
    }
}

/// The step scalars on the device: the loss sum (f64) and `[grad norm, 1]` (the gradient norm
/// kernel's output without clipping: AdamW derives its factor from the norm), plus the head's
/// per-row losses and their sum, and the norm's partial sums.
pub struct CudaStats {
    loss: CudaSlice<f64>,
    norm: CudaSlice<f32>,
    total: CudaSlice<f64>,
    losses: Option<CudaSlice<f32>>,
    norm_scratch: Option<CudaSlice<f64>>,
}

/// The CUDA backend storing `T` (f32, or bf16 with f32 master weights: see the module docs): a
/// device, a cuBLAS handle on its stream and an f32 scratch buffer for the ops that need one
/// (LayerNorm and bias gradients, attention backward, the disentangled attention's score
/// gradients, AdamW's gradient factor), grown to the
/// largest request and reused (one stream orders every use).
pub struct CudaBackend<T: KernelDtype = f32> {
    dev: CudaDevice,
    blas: CudaBlas,
    /// bf16: the cuBLASLt handle of the products with a bias epilogue.
    lt: Option<LtMatmul>,
    scratch: Mutex<Option<CudaSlice<f32>>>,
    /// What every empty buffer points into (CUDA refuses empty allocations; an empty buffer is
    /// never read or written).
    empty: Arc<CudaSlice<u8>>,
    /// The disentangled attention's relative-position tables of the last shape (every layer and
    /// step of a run has the same).
    rel_tables: Mutex<Option<RelTables>>,
    dtype: PhantomData<T>,
}

impl<T: KernelDtype> std::fmt::Debug for CudaBackend<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("dtype", &T::SUFFIX).field("dev", &self.dev).finish_non_exhaustive()
    }
}

impl<T: KernelDtype> CudaBackend<T> {
    /// Opens device `ordinal` ([`CudaDevice::open`]) and creates the cuBLAS handle.
    pub fn open(ordinal: usize) -> std::result::Result<Self, CudaError> {
        let dev = CudaDevice::open(ordinal)?;
        // SAFETY: only loads the shared library (dlopen) and reports whether that worked.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(CudaError::Blas { context: "loading libcublas.so".into(), detail: "library not found".into() });
        }
        let blas = CudaBlas::new(dev.stream().clone())
            .map_err(|e| CudaError::Blas { context: "creating a cuBLAS handle".into(), detail: e.to_string() })?;
        let empty = Arc::new(dev.zeros::<u8>(EMPTY_BYTES)?);
        let lt = if T::IS_F32 { None } else { Some(LtMatmul::new(&dev)?) };
        Ok(Self { dev, blas, lt, scratch: Mutex::new(None), rel_tables: Mutex::new(None), empty, dtype: PhantomData })
    }

    /// The device.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// An empty buffer (no allocation of its own).
    fn empty<U>(&self) -> CuBuf<U> {
        // SAFETY: one element of any kernel dtype fits in the EMPTY_BYTES bytes, 256-aligned.
        unsafe { arena_part(self.dev.stream(), &self.empty, self.empty_base(), 0, 0) }
    }

    /// The device address of the empty buffers' memory.
    fn empty_base(&self) -> u64 {
        self.empty.device_ptr(self.dev.stream()).0
    }

    /// A buffer holding `data`.
    fn upload<U: DeviceRepr>(&self, data: &[U]) -> Result<CuBuf<U>> {
        if data.is_empty() {
            return Ok(self.empty());
        }
        Ok(CuBuf::own(self.dev.upload(data)?, data.len()))
    }

    /// Runs `f` on `n` floats of the shared scratch buffer (grown when too small).
    fn with_scratch<R>(&self, n: usize, f: impl FnOnce(&mut CudaViewMut<'_, f32>) -> Result<R>) -> Result<R> {
        let mut guard = self.scratch.lock().map_err(|_| BackendError("CUDA scratch buffer: lock poisoned".into()))?;
        let mut buf = match guard.take() {
            Some(b) if b.len() >= n => b,
            _ => self.dev.zeros::<f32>(n.max(1))?,
        };
        let r = f(&mut buf.slice_mut(0..n));
        *guard = Some(buf);
        r
    }

    /// Runs `f` on the relative-position tables of shape `s` (uploaded when the shape differs
    /// from the last one's).
    fn with_rel_tables<R>(&self, s: &DisentangledShape, f: impl FnOnce(&RelTables) -> Result<R>) -> Result<R> {
        let mut guard = self.rel_tables.lock().map_err(|_| BackendError("CUDA relative-position tables: lock poisoned".into()))?;
        let tables = match guard.take() {
            Some(t) if t.fits(s) => t,
            _ => RelTables::new(&self.dev, s)?,
        };
        let r = f(&tables);
        *guard = Some(tables);
        r
    }

    /// `C (+)= op(A) · op(B)` for a [`GemmDesc`] through cuBLAS (column-major: the row-major
    /// product is `C^T = op(B)^T op(A)^T`), after checking every operand's extent. bf16: f32
    /// accumulation, C rounded once (with `accumulate`, `C + A·B` is formed in f32).
    fn matmul(&self, c: &mut CudaViewMut<'_, T>, a: &CudaView<'_, T>, b: &CudaView<'_, T>, d: &GemmDesc) -> Result<()> {
        const OP: &str = "gemm";
        let s = d.shape;
        let (lda, ldb, ldc) = d.leading_dims();
        if s.m == 0 || s.n == 0 || d.batch == 0 {
            return Ok(());
        }
        // (stored rows, stored columns, row stride, batch stride, length) of each operand
        let a_dims = if s.trans_a { (s.k, s.m) } else { (s.m, s.k) };
        let b_dims = if s.trans_b { (s.n, s.k) } else { (s.k, s.n) };
        for (what, (rows, cols), ld, stride, len) in [
            ("A", a_dims, lda, d.strides[0], a.len()),
            ("B", b_dims, ldb, d.strides[1], b.len()),
            ("C", (s.m, s.n), ldc, d.strides[2], c.len()),
        ] {
            if rows == 0 || cols == 0 {
                continue;
            }
            if ld < cols {
                return Err(BackendError(format!("{OP}: {what}'s row stride {ld} is below its {cols} columns")));
            }
            let need = (d.batch - 1) * stride + (rows - 1) * ld + cols;
            if len < need {
                return Err(BackendError(format!("{OP}: {what} has {len} elements, the product reads {need}")));
            }
        }
        let int = |v: usize| i32::try_from(v).map_err(|_| BackendError(format!("{OP}: dimension {v} exceeds i32")));
        let long = |v: usize| i64::try_from(v).map_err(|_| BackendError(format!("{OP}: stride {v} exceeds i64")));
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let cfg = StridedBatchedConfig {
            gemm: cudarc::cublas::GemmConfig {
                transa: op(s.trans_b),
                transb: op(s.trans_a),
                m: int(s.n)?,
                n: int(s.m)?,
                k: int(s.k)?,
                alpha: T::round_from(1.0),
                lda: int(ldb)?,
                ldb: int(lda)?,
                beta: T::round_from(if s.accumulate { 1.0 } else { 0.0 }),
                ldc: int(ldc)?,
            },
            batch_size: int(d.batch)?,
            stride_a: long(d.strides[1])?,
            stride_b: long(d.strides[0])?,
            stride_c: long(d.strides[2])?,
        };
        // SAFETY: every operand holds the elements the layouts above read or write (checked).
        unsafe { T::gemm_strided_batched(&self.blas, cfg, b, a, c) }
            .map_err(|e| BackendError(format!("cuBLAS: gemm {}x{}x{}: {e}", s.m, s.n, s.k)))
    }

    /// A kernel by its `extern "C"` name.
    fn kernel(&self, name: &str) -> Result<Launch<'_>> {
        Ok(Launch::new(&self.dev, name.to_string())?)
    }

    /// `C = A·B + bias` for a packed, overwriting, unbatched product: bf16 through cuBLASLt's
    /// bias epilogue (the bias added to the f32 product before its one rounding, no second pass
    /// over C); f32 through cuBLAS (full f32, no TF32) and the `add_bias` kernel.
    fn matmul_bias(
        &self,
        c: &mut CudaViewMut<'_, T>,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        bias: &CudaView<'_, T>,
        d: &GemmDesc,
    ) -> Result<()> {
        let (m, n, k) = (d.shape.m, d.shape.n, d.shape.k);
        if let Some(lt) = &self.lt
            && d.batch == 1
            && !d.shape.accumulate
            && (c.len(), a.len(), b.len()) == (m * n, m * k, k * n)
            && let (TypedMut::Bf16(mut c), Typed::Bf16(a), Typed::Bf16(b), Typed::Bf16(bias)) =
                (T::typed_mut(c.slice_mut(..)), T::typed(a.slice(..)), T::typed(b.slice(..)), T::typed(bias.slice(..)))
        {
            check("gemm", "the bias", bias.len(), n)?;
            return Ok(lt.matmul(&mut c, &a, &b, Some(&bias), false, d.shape)?);
        }
        self.matmul(c, a, b, d)?;
        self.add_bias(c, bias, m, n)
    }

    /// `c[r, j] += bias[j]`.
    fn add_bias(&self, c: &mut CudaViewMut<'_, T>, bias: &CudaView<'_, T>, rows: usize, cols: usize) -> Result<()> {
        check("add_bias", "C", c.len(), rows * cols)?;
        check("add_bias", "bias", bias.len(), cols)?;
        let (r, k) = (rows as u64, cols as u64);
        let mut l = self.kernel(&format!("add_bias_{}", T::SUFFIX))?;
        l.output(c).input(bias).scalar(&r).scalar(&k);
        run_elem(l, rows * cols)
    }
}

/// A LayerNorm statistics buffer must hold at least `rows` rows.
fn check_stat_rows(op: &str, s: &CuBuf<f32>, rows: usize) -> Result<()> {
    if s.len < rows {
        return Err(BackendError(format!("{op}: the statistics have {} rows, expected {rows}", s.len)));
    }
    Ok(())
}

/// The first `rows` entries of a LayerNorm statistics buffer.
fn stat_rows<'a>(op: &str, s: &'a mut CuBuf<f32>, rows: usize) -> Result<CudaViewMut<'a, f32>> {
    check_stat_rows(op, s, rows)?;
    Ok(s.data.slice_mut(0..rows))
}

/// Bytes `offset..` of `arena` (at device address `base`) as a buffer of `len` elements of `U`
/// that keeps the arena alive.
///
/// # Safety
/// `offset` must be a multiple of `U`'s alignment and `max(len, 1)` elements from it must lie in
/// the arena, in no other part's range.
unsafe fn arena_part<U>(stream: &Arc<CudaStream>, arena: &Arc<CudaSlice<u8>>, base: u64, offset: usize, len: usize) -> CuBuf<U> {
    // SAFETY: the caller's range is inside the live arena, which the buffer keeps alive; the
    // buffer never frees it (its drop leaks the slice).
    let data = unsafe { stream.upgrade_device_ptr(base + offset as u64, len.max(1)) };
    CuBuf { data: ManuallyDrop::new(data), len, arena: Some(arena.clone()) }
}

/// Launches a grid-stride kernel over `n` elements (none when `n` is 0).
fn run_elem(l: Launch<'_>, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    // SAFETY: every caller pushed buffers of the lengths its kernel indexes for `n` elements
    // (checked by the caller), the kernel's loop bound.
    unsafe { l.launch(elem_cfg(n)) }?;
    Ok(())
}

/// Launches a one-thread kernel (the step scalars).
fn run_one(l: Launch<'_>) -> Result<()> {
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the callers pass the step scalars' buffers, which hold the one or two values these
    // kernels touch.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// Splits the exclusive view `v` at `mid`, both parts living as long as `v` did.
///
/// cudarc's `split_at_mut` borrows the parent, so its parts live only as long as that borrow.
/// But a sub-view holds copies of the parent's `'a` references (to the buffer's events and
/// stream) and an offset pointer, never a reference into the parent view itself; `v` is
/// consumed here, so the two disjoint parts are the only views of that memory, valid for `'a`.
fn split_view<'a, T>(mut v: CudaViewMut<'a, T>, mid: usize) -> (CudaViewMut<'a, T>, CudaViewMut<'a, T>) {
    let (a, b) = v.split_at_mut(mid);
    // SAFETY: see above; the types differ only in the lifetime.
    unsafe {
        (std::mem::transmute::<CudaViewMut<'_, T>, CudaViewMut<'a, T>>(a), std::mem::transmute::<CudaViewMut<'_, T>, CudaViewMut<'a, T>>(b))
    }
}

impl<T: KernelDtype> Backend for CudaBackend<T> {
    type Buf = CuBuf<T>;
    type View<'a> = CuView<'a, T>;
    type ViewMut<'a> = CudaViewMut<'a, T>;
    type Master = CuBuf<f32>;
    type Batch = CudaBatch;
    type Stats = CudaStats;
    /// The row log-sum-exp `[b, n_head, t]` of the fused attention; the probabilities
    /// `[b, n_head, t, t]` of the disentangled one.
    type AttnState = CudaSlice<f32>;

    const F32_COMPUTE: bool = T::IS_F32;

    fn alloc(&self, len: usize) -> Result<CuBuf<T>> {
        if len == 0 {
            return Ok(self.empty());
        }
        Ok(CuBuf::own(self.dev.zeros(len)?, len))
    }
    fn from_host(&self, data: Vec<f32>) -> Result<CuBuf<T>> {
        // round to nearest even on the host (for f32 the collect reuses `data`)
        let data: Vec<T> = data.into_iter().map(T::round_from).collect();
        self.upload(&data)
    }
    fn to_host(&self, v: CuView<'_, T>) -> Result<Vec<f32>> {
        if v.is_empty() {
            return Ok(Vec::new());
        }
        let host =
            self.dev.stream().clone_dtoh(&v.cuda()).map_err(|e| BackendError(format!("CUDA driver: copying from the device: {e}")))?;
        Ok(host.into_iter().map(T::widen).collect())
    }
    fn buf_len(buf: &CuBuf<T>) -> usize {
        buf.len
    }
    fn view(buf: &CuBuf<T>) -> CuView<'_, T> {
        CuView { src: Src::Buf(&buf.data), off: 0, len: buf.len }
    }
    fn view_mut(buf: &mut CuBuf<T>) -> CudaViewMut<'_, T> {
        buf.view_mut()
    }
    fn slice<'a>(v: CuView<'a, T>, offset: usize, len: usize) -> CuView<'a, T>
    where
        Self: 'a,
    {
        assert!(offset + len <= v.len, "slice {offset}..{} of a view of {}", offset + len, v.len);
        CuView { src: v.src, off: v.off + offset, len }
    }
    fn slice_mut<'a>(v: CudaViewMut<'a, T>, offset: usize, len: usize) -> CudaViewMut<'a, T>
    where
        Self: 'a,
    {
        let (_, rest) = split_view(v, offset);
        split_view(rest, len).0
    }
    fn split_at_mut<'a>(v: CudaViewMut<'a, T>, mid: usize) -> (CudaViewMut<'a, T>, CudaViewMut<'a, T>)
    where
        Self: 'a,
    {
        split_view(v, mid)
    }
    fn reborrow<'s>(v: &'s mut CudaViewMut<'_, T>) -> CudaViewMut<'s, T> {
        v.slice_mut(..)
    }
    fn as_view<'s>(v: &'s CudaViewMut<'_, T>) -> CuView<'s, T> {
        CuView { src: Src::Mut(v), off: 0, len: v.len() }
    }
    fn master_from_host(&self, data: Vec<f32>) -> Result<CuBuf<f32>> {
        self.upload(&data)
    }
    fn master_to_host(&self, m: &CuBuf<f32>) -> Result<Vec<f32>> {
        if m.len == 0 {
            return Ok(Vec::new());
        }
        Ok(self.dev.download(&m.data)?)
    }
    fn master_len(m: &CuBuf<f32>) -> usize {
        m.len
    }
    fn write(&self, mut dst: CudaViewMut<'_, T>, data: &[f32]) -> Result<()> {
        check("write", "the data", data.len(), dst.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let host: Vec<T> = data.iter().map(|&x| T::round_from(x)).collect();
        self.dev.stream().memcpy_htod(&host, &mut dst).map_err(|e| BackendError(format!("CUDA driver: copying to the device: {e}")))
    }
    fn master_write(&self, m: &mut CuBuf<f32>, data: &[f32]) -> Result<()> {
        check("master_write", "the data", data.len(), m.len)?;
        if data.is_empty() {
            return Ok(());
        }
        self.dev.stream().memcpy_htod(data, &mut m.view_mut()).map_err(|e| BackendError(format!("CUDA driver: copying to the device: {e}")))
    }
    /// ONE device allocation, zero-filled, cut into the parameters and gradients (`T`), the two
    /// moments and, for bf16, the f32 master weights, each at a 256-byte boundary; then the
    /// parameters (and master weights) are copied in.
    fn alloc_training_state(&self, params: Vec<f32>) -> Result<TrainingState<Self>> {
        const ALIGN: usize = 256;
        let n = params.len();
        let bytes = |size: usize| (n.max(1) * size).div_ceil(ALIGN) * ALIGN;
        let (t_bytes, f_bytes) = (bytes(size_of::<T>()), bytes(size_of::<f32>()));
        let n_f32 = if T::IS_F32 { 2 } else { 3 };
        let arena = Arc::new(self.dev.zeros::<u8>(2 * t_bytes + n_f32 * f_bytes)?);
        let base = {
            let (ptr, _sync) = arena.device_ptr(self.dev.stream());
            ptr
        };
        let stream = self.dev.stream();
        // SAFETY (every `arena_part` below): the parts are the disjoint ranges [0, t), [t, 2t),
        // [2t, 2t + f), [2t + f, 2t + 2f), [2t + 2f, 2t + 3f) of the arena's 2t + (2 or 3)f
        // bytes, each holding `n` (at least one) elements of its type.
        let mut params_buf = unsafe { arena_part::<T>(stream, &arena, base, 0, n) };
        let grads = unsafe { arena_part::<T>(stream, &arena, base, t_bytes, n) };
        let exp_avg = unsafe { arena_part::<f32>(stream, &arena, base, 2 * t_bytes, n) };
        let exp_avg_sq = unsafe { arena_part::<f32>(stream, &arena, base, 2 * t_bytes + f_bytes, n) };
        let master = if T::IS_F32 {
            None
        } else {
            let mut m = unsafe { arena_part::<f32>(stream, &arena, base, 2 * t_bytes + 2 * f_bytes, n) };
            self.master_write(&mut m, &params)?;
            Some(m)
        };
        self.write(params_buf.view_mut(), &params)?;
        Ok(TrainingState { params: params_buf, grads, optimizer: OptimizerState { exp_avg, exp_avg_sq, master } })
    }

    fn upload_batch(&self, batch: &HostBatch<'_>) -> Result<CudaBatch> {
        let host = Inputs::new(batch);
        let key_valid = match &host.key_padding {
            Some(m) => Some(self.dev.upload(&m.iter().map(|&v| u8::from(v)).collect::<Vec<u8>>())?),
            None => None,
        };
        let labelled = if host.labelled_rows.is_empty() {
            None
        } else {
            Some(self.dev.upload(&host.labelled_rows.iter().map(|&r| r as i32).collect::<Vec<i32>>())?)
        };
        Ok(CudaBatch { host, key_valid, labelled, emb: OnceLock::new(), head_all: OnceLock::new(), head_labelled: OnceLock::new() })
    }
    fn new_stats(&self) -> Result<CudaStats> {
        Ok(CudaStats { loss: self.dev.zeros(1)?, norm: self.dev.zeros(2)?, total: self.dev.zeros(1)?, losses: None, norm_scratch: None })
    }
    fn reset_stats(&self, stats: &mut CudaStats) -> Result<()> {
        let s = self.dev.stream();
        let err = |e| BackendError(format!("CUDA driver: zeroing the step scalars: {e}"));
        s.memset_zeros(&mut stats.loss).map_err(err)?;
        s.memset_zeros(&mut stats.norm).map_err(err)
    }
    fn read_stats(&self, stats: &CudaStats) -> Result<StepStats> {
        let loss = self.dev.download(&stats.loss)?;
        let norm = self.dev.download(&stats.norm)?;
        Ok(StepStats { loss: loss[0], grad_norm: norm[0] })
    }
    fn alloc_attn_state(&self, s: AttnShape) -> Result<CudaSlice<f32>> {
        Ok(self.dev.zeros((s.b * s.n_head * s.t).max(1))?)
    }
    fn alloc_disentangled_state(&self, s: DisentangledShape) -> Result<CudaSlice<f32>> {
        Ok(self.dev.zeros(s.attn.probs_len().max(1))?)
    }

    fn fill_zero(&self, mut x: CudaViewMut<'_, T>) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        self.dev.stream().memset_zeros(&mut x).map_err(|e| BackendError(format!("CUDA driver: fill_zero: {e}")))
    }
    fn copy(&self, mut dst: CudaViewMut<'_, T>, src: CuView<'_, T>) -> Result<()> {
        check("copy", "dst", dst.len(), src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.dev.stream().memcpy_dtod(&src.cuda(), &mut dst).map_err(|e| BackendError(format!("CUDA driver: copy: {e}")))
    }
    fn residual_forward(&self, mut out: CudaViewMut<'_, T>, a: CuView<'_, T>, b: CuView<'_, T>) -> Result<()> {
        let n = out.len();
        check("residual_forward", "a", a.len(), n)?;
        check("residual_forward", "b", b.len(), n)?;
        let (a, b, n64) = (a.cuda(), b.cuda(), n as u64);
        let mut l = self.kernel(&format!("add_{}", T::SUFFIX))?;
        l.output(&mut out).input(&a).input(&b).scalar(&n64);
        run_elem(l, n)
    }
    fn add_inplace(&self, mut dst: CudaViewMut<'_, T>, src: CuView<'_, T>) -> Result<()> {
        let n = dst.len();
        check("add_inplace", "src", src.len(), n)?;
        let (src, n64) = (src.cuda(), n as u64);
        let mut l = self.kernel(&format!("add_inplace_{}", T::SUFFIX))?;
        l.output(&mut dst).input(&src).scalar(&n64);
        run_elem(l, n)
    }
    fn dropout_inplace(&self, mut x: CudaViewMut<'_, T>, d: Dropout) -> Result<()> {
        Ok(self.dev.dropout_inplace(&mut x, d)?)
    }

    fn gemm(&self, mut c: CudaViewMut<'_, T>, a: CuView<'_, T>, b: CuView<'_, T>, d: &GemmDesc, epi: Epilogue<'_, '_, Self>) -> Result<()> {
        let (a, b) = (a.cuda(), b.cuda());
        match epi {
            Epilogue::None => self.matmul(&mut c, &a, &b, d),
            Epilogue::Bias(bias) => {
                if !d.is_packed() {
                    return Err(BackendError("gemm: epilogues take packed products".into()));
                }
                self.matmul_bias(&mut c, &a, &b, &bias.cuda(), d)
            }
            Epilogue::BiasGelu { bias, kind, mut pre } => {
                if !d.is_packed() || d.shape.accumulate {
                    return Err(BackendError("gemm: the GELU epilogue takes a packed, overwriting product".into()));
                }
                // the pre-activation is kept for the backward, so GELU is a pass of its own
                // (cuBLASLt's GELU epilogue would not save it)
                self.matmul_bias(&mut pre, &a, &b, &bias.cuda(), d)?;
                Ok(self.dev.gelu_forward(&mut c, &pre.as_view(), kind)?)
            }
        }
    }
    fn bias_backward(&self, mut dbias: CudaViewMut<'_, T>, dout: CuView<'_, T>, rows: usize, cols: usize) -> Result<()> {
        let dout = dout.cuda();
        self.with_scratch(bias_backward_scratch(rows, cols), |s| Ok(self.dev.bias_backward(&mut dbias, s, &dout, rows, cols)?))
    }
    fn layernorm_forward(
        &self,
        mut out: CudaViewMut<'_, T>,
        mean: &mut CuBuf<f32>,
        rstd: &mut CuBuf<f32>,
        inp: CuView<'_, T>,
        weight: CuView<'_, T>,
        bias: CuView<'_, T>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        let (inp, w, b) = (inp.cuda(), weight.cuda(), bias.cuda());
        let (mut mean, mut rstd) = (stat_rows("layernorm_forward", mean, rows)?, stat_rows("layernorm_forward", rstd, rows)?);
        Ok(self.dev.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &b, rows, cols, eps)?)
    }
    fn layernorm_backward(
        &self,
        mut dinp: CudaViewMut<'_, T>,
        mut dweight: CudaViewMut<'_, T>,
        mut dbias: CudaViewMut<'_, T>,
        dout: CuView<'_, T>,
        inp: CuView<'_, T>,
        weight: CuView<'_, T>,
        mean: &CuBuf<f32>,
        rstd: &CuBuf<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let (dout, inp, w) = (dout.cuda(), inp.cuda(), weight.cuda());
        check_stat_rows("layernorm_backward", mean, rows)?;
        check_stat_rows("layernorm_backward", rstd, rows)?;
        let (mean, rstd) = (mean.data.slice(0..rows), rstd.data.slice(0..rows));
        self.with_scratch(layernorm_backward_scratch(rows, cols), |s| {
            Ok(self.dev.layernorm_backward(&mut dinp, &mut dweight, &mut dbias, s, &dout, &inp, &w, &mean, &rstd, rows, cols)?)
        })
    }
    fn gelu_forward(&self, mut out: CudaViewMut<'_, T>, inp: CuView<'_, T>, kind: GeluKind) -> Result<()> {
        Ok(self.dev.gelu_forward(&mut out, &inp.cuda(), kind)?)
    }
    fn gelu_backward(&self, mut dinp: CudaViewMut<'_, T>, inp: CuView<'_, T>, dout: CuView<'_, T>, kind: GeluKind) -> Result<()> {
        Ok(self.dev.gelu_backward(&mut dinp, &inp.cuda(), &dout.cuda(), kind)?)
    }
    fn tanh_forward(&self, mut out: CudaViewMut<'_, T>, inp: CuView<'_, T>) -> Result<()> {
        let n = out.len();
        check("tanh_forward", "inp", inp.len(), n)?;
        let (inp, n64) = (inp.cuda(), n as u64);
        let mut l = self.kernel(&format!("tanh_fwd_{}", T::SUFFIX))?;
        l.output(&mut out).input(&inp).scalar(&n64);
        run_elem(l, n)
    }
    fn tanh_backward(&self, mut dinp: CudaViewMut<'_, T>, out: CuView<'_, T>, dout: CuView<'_, T>) -> Result<()> {
        let n = dinp.len();
        check("tanh_backward", "out", out.len(), n)?;
        check("tanh_backward", "dout", dout.len(), n)?;
        let (out, dout, n64) = (out.cuda(), dout.cuda(), n as u64);
        let mut l = self.kernel(&format!("tanh_bwd_{}", T::SUFFIX))?;
        l.output(&mut dinp).input(&out).input(&dout).scalar(&n64);
        run_elem(l, n)
    }
    fn embedding_forward(
        &self,
        mut out: CudaViewMut<'_, T>,
        tables: EmbeddingTables<CuView<'_, T>>,
        batch: &CudaBatch,
        c: usize,
    ) -> Result<()> {
        let rows = |v: CuView<'_, T>| v.len() / c.max(1);
        let e = batch.embedding(&self.dev, rows(tables.word), tables.position.map(rows), tables.token_type.map(rows))?;
        let (wte, wpe, tte) = (tables.word.cuda(), tables.position.map(|p| p.cuda()), tables.token_type.map(|t| t.cuda()));
        Ok(self.dev.embedding_forward(&mut out, e, &wte, wpe.as_ref(), tte.as_ref())?)
    }
    fn embedding_backward(
        &self,
        grads: EmbeddingTables<CudaViewMut<'_, T>>,
        dout: CuView<'_, T>,
        batch: &CudaBatch,
        c: usize,
        pad: PaddingIdx,
    ) -> Result<()> {
        let EmbeddingTables { word: mut dwte, position: mut dwpe, token_type: mut dtte } = grads;
        let rows = |n: usize| n / c.max(1);
        let e = batch.embedding(&self.dev, rows(dwte.len()), dwpe.as_ref().map(|p| rows(p.len())), dtte.as_ref().map(|t| rows(t.len())))?;
        Ok(self.dev.embedding_backward_skipping(&mut dwte, dwpe.as_mut(), dtte.as_mut(), &dout.cuda(), e, pad)?)
    }
    fn attention_forward(
        &self,
        mut out: CudaViewMut<'_, T>,
        lse: &mut CudaSlice<f32>,
        qkv: CuView<'_, T>,
        s: AttnShape,
        causal: bool,
        batch: &CudaBatch,
        dropout: Dropout,
    ) -> Result<()> {
        let kv = batch.key_valid.as_ref().map(|k| k.as_view());
        let opt = AttnOptions { causal, key_valid: kv.as_ref(), dropout };
        Ok(self.dev.attention_forward(&mut out, &mut lse.as_view_mut(), &qkv.cuda(), s, opt)?)
    }
    fn attention_backward(
        &self,
        mut dqkv: CudaViewMut<'_, T>,
        dout: CuView<'_, T>,
        qkv: CuView<'_, T>,
        out: CuView<'_, T>,
        lse: &CudaSlice<f32>,
        s: AttnShape,
        causal: bool,
        batch: &CudaBatch,
        dropout: Dropout,
    ) -> Result<()> {
        let kv = batch.key_valid.as_ref().map(|k| k.as_view());
        let opt = AttnOptions { causal, key_valid: kv.as_ref(), dropout };
        let (dout, qkv, out, lse) = (dout.cuda(), qkv.cuda(), out.cuda(), lse.as_view());
        self.with_scratch(s.b * s.n_head * s.t, |sc| Ok(self.dev.attention_backward(&mut dqkv, sc, &dout, &qkv, &out, &lse, s, opt)?))
    }
    fn attention_cached(
        &self,
        mut out: CudaViewMut<'_, T>,
        q: CuView<'_, T>,
        k_cache: CuView<'_, T>,
        v_cache: CuView<'_, T>,
        start: usize,
        n_new: usize,
        n_head: usize,
        head_size: usize,
    ) -> Result<()> {
        Ok(self.dev.attention_cached(&mut out, &q.cuda(), &k_cache.cuda(), &v_cache.cuda(), start, n_new, n_head, head_size)?)
    }
    fn disentangled_attention_forward(
        &self,
        mut out: CudaViewMut<'_, T>,
        probs: &mut CudaSlice<f32>,
        qkv: CuView<'_, T>,
        pos_key: Option<CuView<'_, T>>,
        pos_query: Option<CuView<'_, T>>,
        s: DisentangledShape,
        batch: &CudaBatch,
        dropout: Dropout,
    ) -> Result<()> {
        let kv = batch.key_valid.as_ref().map(|k| k.as_view());
        let (qkv, pk, pq) = (qkv.cuda(), pos_key.map(|v| v.cuda()), pos_query.map(|v| v.cuda()));
        let mut probs = probs.slice_mut(0..s.attn.probs_len().min(probs.len()));
        self.with_rel_tables(&s, |rel| {
            Ok(self.dev.disentangled_attention_forward(
                &mut out,
                &mut probs,
                &qkv,
                pk.as_ref(),
                pq.as_ref(),
                kv.as_ref(),
                rel,
                s,
                dropout,
            )?)
        })
    }
    fn disentangled_attention_backward(
        &self,
        mut dqkv: CudaViewMut<'_, T>,
        mut dpos_key: Option<CudaViewMut<'_, T>>,
        mut dpos_query: Option<CudaViewMut<'_, T>>,
        dout: CuView<'_, T>,
        qkv: CuView<'_, T>,
        pos_key: Option<CuView<'_, T>>,
        pos_query: Option<CuView<'_, T>>,
        probs: &CudaSlice<f32>,
        s: DisentangledShape,
        batch: &CudaBatch,
        dropout: Dropout,
    ) -> Result<()> {
        let kv = batch.key_valid.as_ref().map(|k| k.as_view());
        let (dout, qkv, pk, pq) = (dout.cuda(), qkv.cuda(), pos_key.map(|v| v.cuda()), pos_query.map(|v| v.cuda()));
        let probs = probs.slice(0..s.attn.probs_len().min(probs.len()));
        self.with_rel_tables(&s, |rel| {
            self.with_scratch(disentangled_backward_scratch(s), |sc| {
                Ok(self.dev.disentangled_attention_backward(
                    &mut dqkv,
                    dpos_key.as_mut(),
                    dpos_query.as_mut(),
                    sc,
                    &dout,
                    &qkv,
                    pk.as_ref(),
                    pq.as_ref(),
                    &probs,
                    kv.as_ref(),
                    rel,
                    s,
                    dropout,
                )?)
            })
        })
    }
    fn zero_padded_rows(&self, mut x: CudaViewMut<'_, T>, batch: &CudaBatch, cols: usize) -> Result<()> {
        let Some(valid) = batch.key_valid.as_ref() else { return Ok(()) };
        let rows = valid.len();
        check("zero_padded_rows", "x", x.len(), rows * cols)?;
        let (valid, r, k) = (valid.as_view(), rows as u64, cols as u64);
        let mut l = self.kernel(&format!("zero_padded_rows_{}", T::SUFFIX))?;
        l.output(&mut x).input(&valid).scalar(&r).scalar(&k);
        run_elem(l, rows * cols)
    }
    fn conv1d_unfold(&self, mut out: CudaViewMut<'_, T>, x: CuView<'_, T>, b: usize, t: usize, c: usize, k: usize) -> Result<()> {
        Ok(self.dev.conv1d_unfold(&mut out, &x.cuda(), b, t, c, k)?)
    }
    fn conv1d_fold(&self, mut dx: CudaViewMut<'_, T>, dcol: CuView<'_, T>, b: usize, t: usize, c: usize, k: usize) -> Result<()> {
        Ok(self.dev.conv1d_fold(&mut dx, &dcol.cuda(), b, t, c, k)?)
    }
    fn gather_rows(&self, mut out: CudaViewMut<'_, T>, x: CuView<'_, T>, batch: &CudaBatch, cols: usize) -> Result<()> {
        let n = batch.host.n_labels();
        check("gather_rows", "out", out.len(), n * cols)?;
        check("gather_rows", "x", x.len(), batch.host.b * batch.host.t * cols)?;
        if n == 0 {
            return Ok(());
        }
        let (rows, x, n64, k) = (batch.labelled()?, x.cuda(), n as u64, cols as u64);
        // the labelled rows are positions of the batch (< b * t, the rows of x: checked)
        let mut l = self.kernel(&format!("gather_rows_{}", T::SUFFIX))?;
        l.output(&mut out).input(&x).input(&rows).scalar(&n64).scalar(&k);
        run_elem(l, n * cols)
    }
    fn scatter_add_rows(&self, mut dx: CudaViewMut<'_, T>, dsel: CuView<'_, T>, batch: &CudaBatch, cols: usize) -> Result<()> {
        let n = batch.host.n_labels();
        check("scatter_add_rows", "dsel", dsel.len(), n * cols)?;
        check("scatter_add_rows", "dx", dx.len(), batch.host.b * batch.host.t * cols)?;
        if n == 0 {
            return Ok(());
        }
        let (rows, dsel, n64, k) = (batch.labelled()?, dsel.cuda(), n as u64, cols as u64);
        let mut l = self.kernel(&format!("scatter_add_rows_{}", T::SUFFIX))?;
        l.output(&mut dx).input(&dsel).input(&rows).scalar(&n64).scalar(&k);
        run_elem(l, n * cols)
    }
    fn lm_head_loss(
        &self,
        scratch: CudaViewMut<'_, T>,
        x: CuView<'_, T>,
        wte: CuView<'_, T>,
        bias: Option<CuView<'_, T>>,
        batch: &CudaBatch,
        rows: Rows,
        c: usize,
        grad: Option<HeadGrads<CudaViewMut<'_, T>>>,
        stats: &mut CudaStats,
        weight: f64,
    ) -> Result<()> {
        const OP: &str = "lm_head_loss";
        let vocab = wte.len() / c.max(1);
        check(OP, "wte", wte.len(), vocab * c)?;
        let n = match rows {
            Rows::All => batch.host.targets.len(),
            Rows::Labelled => batch.host.n_labels(),
        };
        check(OP, "x", x.len(), n * c)?;
        if scratch.len() < n * vocab {
            return Err(BackendError(format!("{OP}: scratch has {} elements, needs {}", scratch.len(), n * vocab)));
        }
        let mut logits = Self::slice_mut(scratch, 0, n * vocab);
        let (xv, wv) = (x.cuda(), wte.cuda());
        let shape =
            |m, n, k, trans_a, trans_b, accumulate| GemmDesc::from(lmtrain_backend::GemmShape { m, n, k, trans_a, trans_b, accumulate });
        // logits = x · wte^T (+ bias)
        self.matmul(&mut logits, &xv, &wv, &shape(n, vocab, c, false, true, false))?;
        if let Some(b) = bias {
            self.add_bias(&mut logits, &b.cuda(), n, vocab)?;
        }
        let sel = batch.head(&self.dev, rows, vocab)?;
        let mut losses = match stats.losses.take() {
            Some(l) if l.len() >= n => l,
            _ => self.dev.zeros::<f32>(n.max(1))?,
        };
        let r = self.dev.classifier(
            &mut logits,
            &mut losses.slice_mut(0..n),
            &mut stats.total.as_view_mut(),
            sel,
            grad.as_ref().map(|g| g.dloss),
        );
        stats.losses = Some(losses);
        r?;
        let (labels, total, mut loss) = (batch.host.n_labels() as f64, stats.total.as_view(), stats.loss.as_view_mut());
        let mut l = self.kernel("loss_accumulate_f32")?;
        l.output(&mut loss).input(&total).scalar(&labels).scalar(&weight);
        run_one(l)?;
        if let Some(HeadGrads { mut dx, mut dwte, dbias, .. }) = grad {
            let dl = logits.as_view();
            // dx = dlogits · wte ; dwte += dlogits^T · x ; dbias += column sums of dlogits
            self.matmul(&mut dx, &dl, &wv, &shape(n, c, vocab, false, false, false))?;
            self.matmul(&mut dwte, &dl, &xv, &shape(vocab, c, n, true, false, true))?;
            if let Some(mut db) = dbias {
                self.with_scratch(bias_backward_scratch(n, vocab), |s| Ok(self.dev.bias_backward(&mut db, s, &dl, n, vocab)?))?;
            }
        }
        Ok(())
    }

    fn global_norm(&self, grads: CuView<'_, T>, stats: &mut CudaStats) -> Result<()> {
        let need = grad_norm_scratch(grads.len());
        let mut scratch = match stats.norm_scratch.take() {
            Some(s) if s.len() >= need => s,
            _ => self.dev.zeros::<f64>(need)?,
        };
        let r = self.dev.grad_norm(&mut stats.norm.as_view_mut(), &mut scratch.as_view_mut(), &grads.cuda(), 0.0);
        stats.norm_scratch = Some(scratch);
        Ok(r?)
    }
    fn adamw_update(
        &self,
        params: CudaViewMut<'_, T>,
        master: Option<&mut CuBuf<f32>>,
        grads: CuView<'_, T>,
        m: &mut CuBuf<f32>,
        v: &mut CuBuf<f32>,
        segments: &[DecaySegment],
        step: &AdamWStep,
        stats: &CudaStats,
    ) -> Result<()> {
        // scale[1] = the factor of AdamWStep::grad_scale, from the norm global_norm left on the
        // device; the AdamW kernels multiply the gradients by it (and by the 1.0 of `hp`)
        let (inv_accum, max_norm) = (1.0 / step.accum as f32, step.max_grad_norm);
        let hp = step.hyper(1.0);
        let norm = stats.norm.as_view();
        let (mut mv, mut vv) = (m.view_mut(), v.view_mut());
        self.with_scratch(2, |scale| {
            let mut l = self.kernel("grad_scale_f32")?;
            l.output(scale).input(&norm).scalar(&inv_accum).scalar(&max_norm);
            run_one(l)?;
            let clip = Some(scale.as_view());
            let clip = clip.as_ref();
            match (T::typed_mut(params), T::typed(grads.cuda()), master) {
                (TypedMut::F32(mut p), Typed::F32(g), None) => {
                    Ok(self.dev.adamw_update(&mut p, &g, &mut mv, &mut vv, clip, segments, &hp)?)
                }
                (TypedMut::F32(mut p), Typed::F32(g), Some(w)) => {
                    self.dev.adamw_update(&mut w.view_mut(), &g, &mut mv, &mut vv, clip, segments, &hp)?;
                    check("adamw_update", "params", p.len(), w.len)?;
                    if w.len == 0 {
                        return Ok(());
                    }
                    self.dev.stream().memcpy_dtod(&*w.data, &mut p).map_err(|e| BackendError(format!("CUDA driver: copy: {e}")))
                }
                // a new rounding seed each step; the same step from the same state, the same bits
                (TypedMut::Bf16(mut p), Typed::Bf16(g), Some(w)) => {
                    let seed = mix_seed(ROUNDING_SEED, u64::from(step.step));
                    Ok(self.dev.adamw_update_bf16(&mut w.view_mut(), &mut p, &g, &mut mv, &mut vv, clip, segments, &hp, seed)?)
                }
                (TypedMut::Bf16(_), _, None) => Err(BackendError("adamw_update: bf16 parameters need their f32 master copy".into())),
                _ => unreachable!("parameters and gradients have one type"),
            }
        })
    }
}

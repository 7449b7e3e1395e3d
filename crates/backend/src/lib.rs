//! The op interface every model in lmtrain is written against ([`Backend`]), plus the small
//! value types the ops share (GELU form, AdamW hyper-parameters, weight-decay segments, GEMM and
//! attention shapes, the integer inputs of a micro-batch, the step's scalars).
//!
//! A backend owns its memory: [`Backend::Buf`] is an owned buffer of the backend's compute dtype
//! (`f32` on the CPU; bf16 on a GPU, with f32 master weights in [`Backend::Master`]), and ops read
//! [`Backend::View`]s and write [`Backend::ViewMut`]s into such buffers. On the CPU the views are
//! plain `&[f32]` / `&mut [f32]`, so a model generic over `B: Backend` compiles to the same code
//! as one written against slices.
//!
//! What a device backend needs, and the CPU gets for free:
//! - the integer inputs of a micro-batch (ids, targets, padding, token types, positions) go to
//!   the backend once, as a [`Backend::Batch`] made by [`Backend::upload_batch`];
//! - losses and the gradient norm accumulate in [`Backend::Stats`] (backend memory), read by the
//!   host once per optimizer step with [`Backend::read_stats`];
//! - every op returns a [`Result`], so a device failure reaches the user as one line;
//! - attention keeps what its backward needs in a backend-chosen [`Backend::AttnState`] (the CPU
//!   keeps the probabilities; a flash kernel keeps the row log-sum-exp; DeBERTa's disentangled
//!   attention keeps the probabilities on every backend);
//! - [`Backend::gather_rows`] / [`Backend::scatter_add_rows`] let a head run on the labelled rows;
//! - [`GemmDesc`] carries leading dimensions and strided batches, and [`Epilogue`] the bias and
//!   GELU epilogues a cuBLASLt matmul applies for free.
//!
//! Conventions (llm.c style): outputs first, then inputs, then sizes; every `*_backward`
//! ACCUMULATES (`+=`) into its gradient outputs, so gradients of a parameter used twice (tied
//! embeddings) and gradient accumulation over micro-batches need no extra code.

mod batch;
pub mod meter;

pub use batch::{HostBatch, Inputs};

/// Label value that contributes no loss (PyTorch `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// An op or transfer that failed on the backend (a device error, an allocation that did not
/// fit); the message is one line for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// Result of a backend op.
pub type Result<T> = std::result::Result<T, BackendError>;

/// The GELU form of a model's MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeluKind {
    /// tanh approximation: Hugging Face `gelu_new` (GPT-2).
    Tanh,
    /// exact erf form: Hugging Face `gelu` (BERT).
    Erf,
}

/// One AdamW step's hyper-parameters (torch.optim.AdamW semantics).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWHyper {
    /// Learning rate of this step (after the schedule).
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon (added after the square root, as torch).
    pub eps: f32,
    /// 1-based step number, already incremented for this step (bias correction uses it).
    pub step: u32,
    /// Factor applied to the gradients before the update (gradient clipping); 1.0 = none.
    pub grad_scale: f32,
}

impl AdamWHyper {
    /// `(lr / (1 - beta1^step), sqrt(1 - beta2^step))`: the bias corrections as torch computes
    /// them (in double precision, like Python floats), rounded to f32 once. Every backend's
    /// update uses these two numbers, so they agree on the bits of the step size.
    pub fn bias_corrections(&self) -> (f32, f32) {
        let bc1 = 1.0 - (self.beta1 as f64).powi(self.step as i32);
        let bc2 = 1.0 - (self.beta2 as f64).powi(self.step as i32);
        ((self.lr as f64 / bc1) as f32, bc2.sqrt() as f32)
    }
}

/// What one optimizer step needs besides the buffers: the hyper-parameters of
/// [`AdamWHyper`] without the gradient scale, which the backend derives from the gradient norm
/// in [`Backend::Stats`] (so clipping never makes the host wait for the device).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// Learning rate of this step (after the schedule).
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// 1-based step number.
    pub step: u32,
    /// Clip the averaged gradient to this global norm (`<= 0`: no clipping).
    pub max_grad_norm: f32,
    /// Micro-batches whose gradients were summed (they are averaged).
    pub accum: u32,
}

impl AdamWStep {
    /// The averaged gradient's norm and the factor applied to the summed gradients, from the
    /// summed gradients' norm: averaging and clipping as one scale.
    pub fn grad_scale(&self, raw_norm: f32) -> (f32, f32) {
        let inv_accum = 1.0 / self.accum as f32;
        let norm = raw_norm * inv_accum;
        (norm, clip_scale(norm, self.max_grad_norm) * inv_accum)
    }

    /// The op-level hyper-parameters for a given gradient scale.
    pub fn hyper(&self, grad_scale: f32) -> AdamWHyper {
        AdamWHyper { lr: self.lr, beta1: self.beta1, beta2: self.beta2, eps: self.eps, step: self.step, grad_scale }
    }
}

/// The factor `torch.nn.utils.clip_grad_norm_(max_norm)` multiplies gradients by, given their
/// global L2 norm: `min(1, max_norm / (norm + 1e-6))`, evaluated in f32 as torch does. A
/// non-positive `max_norm` disables clipping (HF Trainer skips the call then).
pub fn clip_scale(norm: f32, max_norm: f32) -> f32 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// A contiguous range of the flat parameter buffer sharing one weight-decay coefficient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecaySegment {
    /// First element of the segment.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
    /// Decoupled weight decay applied to this segment (0.0 for biases and LayerNorm weights).
    pub weight_decay: f32,
}

/// Shape of one row-major matrix product `C (+)= op(A) · op(B)` with `C: [m, n]`.
///
/// `op(A)` is `[m, k]`: `A` is stored `[m, k]`, or `[k, m]` when `trans_a`.
/// `op(B)` is `[k, n]`: `B` is stored `[k, n]`, or `[n, k]` when `trans_b`
/// (a Hugging Face `Conv1D` weight is `[in, out]` = `[k, n]`; a `Linear` weight or a tied
/// embedding used as output head is `[out, in]` = `[n, k]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// A is stored transposed (`[k, m]`).
    pub trans_a: bool,
    /// B is stored transposed (`[n, k]`).
    pub trans_b: bool,
    /// `C += ...` instead of `C = ...`.
    pub accumulate: bool,
}

/// Shape of multi-head self-attention over a fused `qkv` activation `[b, t, 3 * n_head * head_size]`
/// (q, then k, then v; heads contiguous inside each, as GPT-2's `c_attn` output).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Batch size.
    pub b: usize,
    /// Sequence length.
    pub t: usize,
    /// Number of heads.
    pub n_head: usize,
    /// Channels per head.
    pub head_size: usize,
}

impl AttnShape {
    /// Model width `n_head * head_size`.
    pub fn channels(&self) -> usize {
        self.n_head * self.head_size
    }
    /// Elements of the saved attention probabilities `[b, n_head, t, t]`.
    pub fn probs_len(&self) -> usize {
        self.b * self.n_head * self.t * self.t
    }
}

/// DeBERTa's relative positions between a query `i` and a key `j`: `r = i - j`, log-bucketed
/// beyond half the bucket count (`position_buckets > 0`), then shifted by the span and clamped
/// to a row of the `[2 * span, c]` relative-embedding table (Hugging Face
/// `make_log_bucket_position` and the `clamp(rel + att_span, 0, 2 * att_span - 1)` of its
/// disentangled attention).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelPositions {
    /// Half the rows of the relative-embedding table (`position_buckets` when bucketed, else
    /// `max_relative_positions`).
    pub span: usize,
    /// `position_buckets` (0: no log buckets).
    pub buckets: usize,
    /// `max_relative_positions`: the distance the largest log bucket reaches.
    pub max_position: usize,
}

impl RelPositions {
    /// The (bucketed) relative position of `r = i - j`, in f32 as torch computes it.
    pub fn bucket(&self, r: i64) -> i64 {
        let mid = (self.buckets / 2) as i64;
        if self.buckets == 0 || r.abs() <= mid {
            return r;
        }
        let ratio = ((r.abs() as f32) / mid as f32).ln() / (((self.max_position as f64 - 1.0) / mid as f64) as f32).ln();
        let log_pos = (ratio * (mid - 1) as f32).ceil() + mid as f32;
        log_pos as i64 * r.signum()
    }

    /// The table row of query `i` and key `j`.
    pub fn index(&self, i: usize, j: usize) -> usize {
        let span = self.span as i64;
        (self.bucket(i as i64 - j as i64) + span).clamp(0, 2 * span - 1) as usize
    }
}

/// Shape of DeBERTa's disentangled self-attention: multi-head attention over a fused `qkv`
/// (as [`AttnShape`]) plus the content-to-position (`c2p`) and position-to-content (`p2c`)
/// terms over [`RelPositions`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DisentangledShape {
    /// Batch, sequence and heads.
    pub attn: AttnShape,
    /// The relative positions.
    pub rel: RelPositions,
    /// Every term is divided by `sqrt(head_size * scale_factor)`: 1 plus the number of position
    /// terms the config names.
    pub scale_factor: usize,
}

impl DisentangledShape {
    /// Rows of the projected relative embeddings (`2 * span`).
    pub fn rel_rows(&self) -> usize {
        2 * self.rel.span
    }
    /// The divisor of every score term.
    pub fn scale(&self) -> f32 {
        ((self.attn.head_size * self.scale_factor) as f32).sqrt()
    }
}

/// Which keys a query may attend to.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnMask<'a> {
    /// Query `i` sees only keys `j <= i` (GPT-2).
    pub causal: bool,
    /// Per `[b, t]` key: `true` = real token, `false` = padding that no query attends to
    /// (BERT `attention_mask`). `None` = no padding.
    pub key_padding: Option<&'a [bool]>,
}

/// A matrix product as a device library describes it: [`GemmShape`] plus leading dimensions
/// (row strides of the stored operands; 0 = packed) and an optional strided batch
/// (`C_i (+)= op(A_i) · op(B_i)` with `X_i = X + i * stride_x`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmDesc {
    /// The per-matrix shape.
    pub shape: GemmShape,
    /// Row stride of stored A (0 = packed: `k`, or `m` when transposed).
    pub lda: usize,
    /// Row stride of stored B (0 = packed).
    pub ldb: usize,
    /// Row stride of C (0 = packed: `n`).
    pub ldc: usize,
    /// Number of products (1 = a plain GEMM).
    pub batch: usize,
    /// Element offsets between consecutive A, B and C matrices of a batch.
    pub strides: [usize; 3],
}

impl From<GemmShape> for GemmDesc {
    fn from(shape: GemmShape) -> Self {
        GemmDesc { shape, lda: 0, ldb: 0, ldc: 0, batch: 1, strides: [0; 3] }
    }
}

impl GemmDesc {
    /// Row strides of stored A, B and C with the packed defaults filled in.
    pub fn leading_dims(&self) -> (usize, usize, usize) {
        let s = self.shape;
        let or = |ld: usize, packed: usize| if ld == 0 { packed } else { ld };
        (or(self.lda, if s.trans_a { s.m } else { s.k }), or(self.ldb, if s.trans_b { s.k } else { s.n }), or(self.ldc, s.n))
    }
    /// Whether every operand is packed and there is one product.
    pub fn is_packed(&self) -> bool {
        self.batch == 1 && self.leading_dims() == GemmDesc::from(self.shape).leading_dims()
    }
}

/// What a matrix product does to its output after the product (cuBLASLt epilogues).
pub enum Epilogue<'a, 'b, B: Backend> {
    /// `C = A·B` (or `+=`).
    None,
    /// `C = A·B + bias` (bias broadcast over rows).
    Bias(B::View<'a>),
    /// `pre = A·B + bias`, `C = gelu(pre)`; `pre` is kept for the backward.
    BiasGelu {
        /// The bias.
        bias: B::View<'a>,
        /// GELU form.
        kind: GeluKind,
        /// Receives the pre-activation.
        pre: B::ViewMut<'b>,
    },
}

/// Which rows of a batch a head computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// Every position `b * t`, each against its target (ignored targets cost nothing).
    All,
    /// Only the positions with a label, in order ([`Inputs::labelled_rows`]); the input holds
    /// just those rows (see [`Backend::gather_rows`]).
    Labelled,
}

/// The step's scalars as the host reads them (see [`Backend::read_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    /// Sum of the weighted mean losses added since the last reset.
    pub loss: f64,
    /// Global L2 norm of the gradient buffer at the last [`Backend::global_norm`].
    pub grad_norm: f32,
}

/// Inverted dropout: keep with probability `1 - p`, scale kept values by `1 / (1 - p)`.
/// The mask is a pure function of `(seed, element index)`, so backward regenerates it instead of
/// storing it, and every backend draws the same mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Drop probability; 0.0 disables dropout.
    pub p: f32,
    /// Seed of this dropout site for this step.
    pub seed: u64,
}

impl Dropout {
    /// No dropout.
    pub const NONE: Dropout = Dropout { p: 0.0, seed: 0 };

    /// Whether this dropout does anything.
    pub fn active(&self) -> bool {
        self.p > 0.0
    }

    /// Multiplier of element `index`: 0 when dropped, `1 / (1 - p)` when kept.
    #[inline]
    pub fn factor(&self, index: u64) -> f32 {
        // 24 random bits compared against p: exact for p on a 2^-24 grid, unbiased otherwise to
        // within 6e-8, and cheap enough for the inner loop of attention.
        let r = (mix64(self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 40) as f32 * (1.0 / 16_777_216.0);
        if r < self.p { 0.0 } else { 1.0 / (1.0 - self.p) }
    }
}

/// A seed for the sub-stream `stream` of `seed` (dropout sites, micro-batches, masking).
#[inline]
pub fn mix_seed(seed: u64, stream: u64) -> u64 {
    mix64(seed ^ mix64(stream))
}

/// SplitMix64 finaliser: a fast, well-mixing 64-bit hash (counter-based randomness for dropout
/// and seed derivation).
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The op interface. Implemented by `lmtrain_cpu::Cpu` (the reference) and device backends.
/// Sizes are in elements; every op checks that its views are as long as the sizes say.
pub trait Backend: Send + Sync + Sized + 'static {
    /// An owned buffer of the compute dtype.
    type Buf: Send + Sync;
    /// A shared view of (part of) a buffer.
    type View<'a>: Copy
    where
        Self: 'a;
    /// An exclusive view of (part of) a buffer.
    type ViewMut<'a>
    where
        Self: 'a;
    /// An owned f32 buffer: master weights and optimizer moments.
    type Master: Send + Sync;
    /// The integer inputs of one micro-batch, in backend memory.
    type Batch: Send + Sync;
    /// The step's accumulated scalars (losses, gradient norm), in backend memory.
    type Stats: Send + Sync;
    /// What attention saves for its backward, for one layer.
    type AttnState: Send + Sync;

    /// Whether [`Backend::Buf`] holds f32, so parameters are their own master copy and the
    /// optimizer keeps no second one.
    const F32_COMPUTE: bool;

    // ---- memory -------------------------------------------------------------------------
    /// A zero-filled buffer of `len` elements.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    /// A buffer holding `data` converted to the compute dtype (moved, not copied, on the CPU).
    #[allow(clippy::wrong_self_convention)] // a device backend needs its context to allocate
    fn from_host(&self, data: Vec<f32>) -> Result<Self::Buf>;
    /// Copy a view to host memory as f32.
    fn to_host(&self, v: Self::View<'_>) -> Result<Vec<f32>>;
    /// Elements in a buffer.
    fn buf_len(buf: &Self::Buf) -> usize;
    /// The whole buffer, shared.
    fn view(buf: &Self::Buf) -> Self::View<'_>;
    /// The whole buffer, exclusive.
    fn view_mut(buf: &mut Self::Buf) -> Self::ViewMut<'_>;
    /// `len` elements starting at `offset`.
    fn slice<'a>(v: Self::View<'a>, offset: usize, len: usize) -> Self::View<'a>
    where
        Self: 'a;
    /// `len` elements starting at `offset`, exclusive.
    fn slice_mut<'a>(v: Self::ViewMut<'a>, offset: usize, len: usize) -> Self::ViewMut<'a>
    where
        Self: 'a;
    /// Split an exclusive view into `[0, mid)` and `[mid, len)`.
    fn split_at_mut<'a>(v: Self::ViewMut<'a>, mid: usize) -> (Self::ViewMut<'a>, Self::ViewMut<'a>)
    where
        Self: 'a;
    /// A shorter-lived exclusive view of the same memory (like `&mut *v`).
    fn reborrow<'s>(v: &'s mut Self::ViewMut<'_>) -> Self::ViewMut<'s>;
    /// A shared view of the same memory.
    fn as_view<'s>(v: &'s Self::ViewMut<'_>) -> Self::View<'s>;
    /// An f32 buffer holding `data`.
    #[allow(clippy::wrong_self_convention)]
    fn master_from_host(&self, data: Vec<f32>) -> Result<Self::Master>;
    /// Copy an f32 buffer to host memory.
    fn master_to_host(&self, m: &Self::Master) -> Result<Vec<f32>>;
    /// Elements in an f32 buffer.
    fn master_len(m: &Self::Master) -> usize;
    /// Overwrite `dst` with `data` (converted to the compute dtype), in place.
    fn write(&self, dst: Self::ViewMut<'_>, data: &[f32]) -> Result<()>;
    /// Overwrite the f32 buffer `m` with `data`, in place.
    fn master_write(&self, m: &mut Self::Master, data: &[f32]) -> Result<()>;
    /// What a training run keeps for its whole length, for the parameters `params` (f32, host):
    /// the working copy, zero gradients, zero moments and, without [`Backend::F32_COMPUTE`], f32
    /// master weights equal to `params`. This default allocates each buffer apart; a device
    /// backend makes them ONE allocation (one free, no fragmentation between them).
    fn alloc_training_state(&self, params: Vec<f32>) -> Result<TrainingState<Self>> {
        let (optimizer, grads) = (OptimizerState::alloc(self, &params)?, self.alloc(params.len())?);
        Ok(TrainingState { params: self.from_host(params)?, grads, optimizer })
    }

    // ---- inputs and scalars ---------------------------------------------------------------
    /// Hand a micro-batch's integer inputs to the backend (once per micro-batch).
    fn upload_batch(&self, batch: &HostBatch<'_>) -> Result<Self::Batch>;
    /// Zeroed step scalars.
    fn new_stats(&self) -> Result<Self::Stats>;
    /// Zero the step scalars.
    fn reset_stats(&self, stats: &mut Self::Stats) -> Result<()>;
    /// Read the step scalars (the one device-to-host sync of a step).
    fn read_stats(&self, stats: &Self::Stats) -> Result<StepStats>;
    /// Attention state for one layer of shape `s`.
    fn alloc_attn_state(&self, s: AttnShape) -> Result<Self::AttnState>;
    /// Attention state for one disentangled attention layer of shape `s`
    /// ([`Backend::disentangled_attention_forward`]): every backend keeps the probabilities
    /// `[b, n_head, t, t]` in f32.
    fn alloc_disentangled_state(&self, s: DisentangledShape) -> Result<Self::AttnState>;

    // ---- elementwise ----------------------------------------------------------------------
    /// `x = 0`.
    fn fill_zero(&self, x: Self::ViewMut<'_>) -> Result<()>;
    /// `dst = src`.
    fn copy(&self, dst: Self::ViewMut<'_>, src: Self::View<'_>) -> Result<()>;
    /// `out = a + b` (residual connection forward).
    fn residual_forward(&self, out: Self::ViewMut<'_>, a: Self::View<'_>, b: Self::View<'_>) -> Result<()>;
    /// `dst += src` (residual connection backward, gradient fan-in).
    fn add_inplace(&self, dst: Self::ViewMut<'_>, src: Self::View<'_>) -> Result<()>;
    /// Inverted dropout applied in place; also its own backward (same mask, same scale).
    fn dropout_inplace(&self, x: Self::ViewMut<'_>, d: Dropout) -> Result<()>;

    // ---- layers ---------------------------------------------------------------------------
    /// `C (+)= op(A) · op(B)` then the epilogue, see [`GemmDesc`] and [`Epilogue`].
    fn gemm(&self, c: Self::ViewMut<'_>, a: Self::View<'_>, b: Self::View<'_>, d: &GemmDesc, epi: Epilogue<'_, '_, Self>) -> Result<()>;
    /// `dbias += column sums of dout`.
    fn bias_backward(&self, dbias: Self::ViewMut<'_>, dout: Self::View<'_>, rows: usize, cols: usize) -> Result<()>;
    /// LayerNorm over the last dimension; saves per-row mean and 1/std for backward in f32
    /// whatever the compute dtype (the first `rows` entries of `mean` and `rstd`), so the
    /// backward normalises exactly as the forward did.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: Self::ViewMut<'_>,
        mean: &mut Self::Master,
        rstd: &mut Self::Master,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        bias: Self::View<'_>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()>;
    /// LayerNorm backward (accumulates into all three gradients).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dinp: Self::ViewMut<'_>,
        dweight: Self::ViewMut<'_>,
        dbias: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        mean: &Self::Master,
        rstd: &Self::Master,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    /// `out = gelu(inp)`.
    fn gelu_forward(&self, out: Self::ViewMut<'_>, inp: Self::View<'_>, kind: GeluKind) -> Result<()>;
    /// `dinp += gelu'(inp) * dout`.
    fn gelu_backward(&self, dinp: Self::ViewMut<'_>, inp: Self::View<'_>, dout: Self::View<'_>, kind: GeluKind) -> Result<()>;
    /// `out = tanh(inp)` (DeBERTa's default convolution activation).
    fn tanh_forward(&self, out: Self::ViewMut<'_>, inp: Self::View<'_>) -> Result<()>;
    /// `dinp += (1 - out^2) * dout`, from the forward's output.
    fn tanh_backward(&self, dinp: Self::ViewMut<'_>, out: Self::View<'_>, dout: Self::View<'_>) -> Result<()>;
    /// `out[b, t] = word[ids] + position[pos] + token_type[types]` with the batch's position ids
    /// (or `t` itself when it has none); absent tables add nothing.
    fn embedding_forward(
        &self,
        out: Self::ViewMut<'_>,
        tables: EmbeddingTables<Self::View<'_>>,
        batch: &Self::Batch,
        c: usize,
    ) -> Result<()>;
    /// The scatter-add of [`Backend::embedding_forward`] into the gradients of its tables,
    /// skipping the positions whose token (position) id is the word (position) table's padding
    /// index.
    fn embedding_backward(
        &self,
        grads: EmbeddingTables<Self::ViewMut<'_>>,
        dout: Self::View<'_>,
        batch: &Self::Batch,
        c: usize,
        pad: PaddingIdx,
    ) -> Result<()>;
    /// Scaled dot-product attention over fused `qkv` (`[b, t, 3C]`: q, k, v, heads contiguous in
    /// each) into `out` (`[b, t, C]`, heads concatenated), scale `1/sqrt(head_size)`, causal
    /// and/or masked by the batch's key padding, dropout on the probabilities. Saves what the
    /// backward needs in `state`.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: Self::ViewMut<'_>,
        state: &mut Self::AttnState,
        qkv: Self::View<'_>,
        s: AttnShape,
        causal: bool,
        batch: &Self::Batch,
        dropout: Dropout,
    ) -> Result<()>;
    /// Attention backward: `dqkv += ...` from `dout` and the forward's `qkv`, `out` and `state`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        qkv: Self::View<'_>,
        out: Self::View<'_>,
        state: &Self::AttnState,
        s: AttnShape,
        causal: bool,
        batch: &Self::Batch,
        dropout: Dropout,
    ) -> Result<()>;
    /// Incremental causal attention for generation (batch 1): `n_new` queries at positions
    /// `start..start + n_new` (`q`: `[n_new, C]`) over cached keys/values `[>= start + n_new, C]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_cached(
        &self,
        out: Self::ViewMut<'_>,
        q: Self::View<'_>,
        k_cache: Self::View<'_>,
        v_cache: Self::View<'_>,
        start: usize,
        n_new: usize,
        n_head: usize,
        head_size: usize,
    ) -> Result<()>;
    /// DeBERTa's disentangled self-attention over fused `qkv` (`[b, t, 3C]`) into `out`
    /// (`[b, t, C]`): per head `s[i, j] = q_i · k_j / sc + c2p[i, j] + p2c[i, j]` with
    /// `sc = s.scale()`, `c2p[i, j] = q_i · pos_key[rel(i, j)] / sc` when `pos_key` is given and
    /// `p2c[i, j] = k_j · pos_query[rel(i, j)] / sc` when `pos_query` is given (both
    /// `[2 * span, C]`, heads contiguous, `rel` = [`RelPositions::index`]). Pairs where the
    /// query or the key is padding get `f32::MIN` (so a padded query attends uniformly to every
    /// key, as Hugging Face's `masked_fill`); softmax, dropout, `· v`. Saves what the backward
    /// needs in `state` (from [`Backend::alloc_disentangled_state`]).
    #[allow(clippy::too_many_arguments)]
    fn disentangled_attention_forward(
        &self,
        out: Self::ViewMut<'_>,
        state: &mut Self::AttnState,
        qkv: Self::View<'_>,
        pos_key: Option<Self::View<'_>>,
        pos_query: Option<Self::View<'_>>,
        s: DisentangledShape,
        batch: &Self::Batch,
        dropout: Dropout,
    ) -> Result<()>;
    /// Backward of [`Backend::disentangled_attention_forward`]: `dqkv += ...`, and the
    /// gradients of the projected relative embeddings `dpos_key += ...` / `dpos_query += ...`
    /// (given exactly when the forward had `pos_key` / `pos_query`).
    #[allow(clippy::too_many_arguments)]
    fn disentangled_attention_backward(
        &self,
        dqkv: Self::ViewMut<'_>,
        dpos_key: Option<Self::ViewMut<'_>>,
        dpos_query: Option<Self::ViewMut<'_>>,
        dout: Self::View<'_>,
        qkv: Self::View<'_>,
        pos_key: Option<Self::View<'_>>,
        pos_query: Option<Self::View<'_>>,
        state: &Self::AttnState,
        s: DisentangledShape,
        batch: &Self::Batch,
        dropout: Dropout,
    ) -> Result<()>;
    /// `x[r] = 0` (`cols` wide) for every position `r` whose `attention_mask` is 0 (DeBERTa
    /// multiplies its hidden states by the mask); also its own backward.
    fn zero_padded_rows(&self, x: Self::ViewMut<'_>, batch: &Self::Batch, cols: usize) -> Result<()>;
    /// The `im2col` of a 1-D convolution along each sequence of `x` (`[b, t, c]`), kernel `k`
    /// (odd), zero padding `(k - 1) / 2`: `out[(b, t), i * k + kk] = x[(b, t + kk - (k - 1) / 2), i]`
    /// (0 outside the sequence), so `Conv1d` is this times its weight `[c_out, c * k]`.
    fn conv1d_unfold(&self, out: Self::ViewMut<'_>, x: Self::View<'_>, b: usize, t: usize, c: usize, k: usize) -> Result<()>;
    /// Backward of [`Backend::conv1d_unfold`]: `dx += ` the columns folded back onto their rows.
    fn conv1d_fold(&self, dx: Self::ViewMut<'_>, dcol: Self::View<'_>, b: usize, t: usize, c: usize, k: usize) -> Result<()>;
    /// `out[i] = x[labelled_rows[i]]` (`cols` wide): the rows a head on labelled rows reads.
    fn gather_rows(&self, out: Self::ViewMut<'_>, x: Self::View<'_>, batch: &Self::Batch, cols: usize) -> Result<()>;
    /// `dx[labelled_rows[i]] += dsel[i]`: the backward of [`Backend::gather_rows`].
    fn scatter_add_rows(&self, dx: Self::ViewMut<'_>, dsel: Self::View<'_>, batch: &Self::Batch, cols: usize) -> Result<()>;
    /// An output head tied to the word embeddings fused with softmax cross-entropy:
    /// `logits = x · wte^T (+ bias)` (`x`: `[rows, c]`, `wte`: `[vocab, c]`) against the batch's
    /// targets of `rows`; adds the mean loss over the batch's labels times `weight` to `stats`
    /// (NaN when the batch has no label, as Hugging Face). With `grad` also runs the backward,
    /// each row's loss weighted by `grad.dloss`: `dx = dlogits · wte` (overwritten),
    /// `dwte += dlogits^T · x`, `dbias += column sums of dlogits`. `scratch` (at least
    /// `rows * vocab`) holds the logits in whatever layout the backend likes; it is the only
    /// full-size buffer involved.
    #[allow(clippy::too_many_arguments)]
    fn lm_head_loss(
        &self,
        scratch: Self::ViewMut<'_>,
        x: Self::View<'_>,
        wte: Self::View<'_>,
        bias: Option<Self::View<'_>>,
        batch: &Self::Batch,
        rows: Rows,
        c: usize,
        grad: Option<HeadGrads<Self::ViewMut<'_>>>,
        stats: &mut Self::Stats,
        weight: f64,
    ) -> Result<()>;

    // ---- optimizer ------------------------------------------------------------------------
    /// Store the global L2 norm of `grads` (accumulated in f64) in `stats`.
    fn global_norm(&self, grads: Self::View<'_>, stats: &mut Self::Stats) -> Result<()>;
    /// One torch.optim.AdamW step over the flat buffer, the gradients averaged and clipped by
    /// the norm in `stats` ([`AdamWStep::grad_scale`]). With a `master` copy the update runs on
    /// it and `params` receives its rounding; without one `params` is updated directly.
    #[allow(clippy::too_many_arguments)]
    fn adamw_update(
        &self,
        params: Self::ViewMut<'_>,
        master: Option<&mut Self::Master>,
        grads: Self::View<'_>,
        m: &mut Self::Master,
        v: &mut Self::Master,
        segments: &[DecaySegment],
        step: &AdamWStep,
        stats: &Self::Stats,
    ) -> Result<()>;
}

/// AdamW's state on a backend: the moments and, on a backend without f32 compute, the f32
/// master weights.
pub struct OptimizerState<B: Backend> {
    /// First moments.
    pub exp_avg: B::Master,
    /// Second moments.
    pub exp_avg_sq: B::Master,
    /// The f32 master weights (`None` when the parameters are f32 themselves).
    pub master: Option<B::Master>,
}

impl<B: Backend> OptimizerState<B> {
    /// Zero moments and, without [`Backend::F32_COMPUTE`], master weights equal to `params`,
    /// each an allocation of its own.
    pub fn alloc(be: &B, params: &[f32]) -> Result<Self> {
        let n = params.len();
        let master = if B::F32_COMPUTE { None } else { Some(be.master_from_host(params.to_vec())?) };
        Ok(OptimizerState { exp_avg: be.master_from_host(vec![0.0; n])?, exp_avg_sq: be.master_from_host(vec![0.0; n])?, master })
    }
}

/// The buffers of a training run ([`Backend::alloc_training_state`]).
pub struct TrainingState<B: Backend> {
    /// The parameters (the working copy the ops read).
    pub params: B::Buf,
    /// Their gradients.
    pub grads: B::Buf,
    /// The optimizer's state.
    pub optimizer: OptimizerState<B>,
}

/// The tables of an embedding layer (views of parameters or of their gradients).
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingTables<V> {
    /// Word embeddings `[vocab, c]`.
    pub word: V,
    /// Absolute position embeddings `[positions, c]`, if the model has them.
    pub position: Option<V>,
    /// Token-type embeddings `[types, c]`, if the model has them.
    pub token_type: Option<V>,
}

/// `torch.nn.Embedding(padding_idx=…)`: a position whose id equals a table's padding index adds
/// nothing to that row's gradient (Hugging Face word embeddings: `pad_token_id`; RoBERTa's
/// position embeddings too).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PaddingIdx {
    /// Skipped token id of the word table.
    pub word: Option<u32>,
    /// Skipped position id of the position table.
    pub position: Option<u32>,
}

/// The gradient outputs of [`Backend::lm_head_loss`].
pub struct HeadGrads<V> {
    /// `d loss / d x`, overwritten.
    pub dx: V,
    /// Gradient of the tied word embeddings (accumulated).
    pub dwte: V,
    /// Gradient of the output bias (accumulated), when the head has one.
    pub dbias: Option<V>,
    /// Weight of each row's loss (1 / labels for a mean).
    pub dloss: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_keeps_about_one_minus_p_and_scales() {
        let d = Dropout { p: 0.25, seed: 7 };
        let n = 200_000u64;
        let kept = (0..n).filter(|&i| d.factor(i) != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.75).abs() < 0.005, "kept fraction {kept}");
        let f = (0..n).map(|i| d.factor(i)).find(|&f| f != 0.0).unwrap();
        assert!((f - 1.0 / 0.75).abs() < 1e-6);
        // a different seed gives a different mask
        let e = Dropout { p: 0.25, seed: 8 };
        assert!((0..1000).any(|i| d.factor(i) != e.factor(i)));
    }

    #[test]
    fn no_dropout_is_identity() {
        assert!(!Dropout::NONE.active());
        assert!((0..100).all(|i| Dropout::NONE.factor(i) == 1.0));
    }
}

//! The op interface every model in lmtrain is written against, plus the small value types the
//! ops share (GELU form, AdamW hyper-parameters, weight-decay segments, GEMM and attention shapes).
//!
//! A backend owns its memory: [`Backend::Buf`] is an owned buffer of `f32` (a `Vec<f32>` on the
//! CPU, a device allocation on a GPU), and ops read [`Backend::View`]s and write
//! [`Backend::ViewMut`]s into such buffers. On the CPU the views are plain `&[f32]` /
//! `&mut [f32]`, so a model generic over `B: Backend` compiles to the same code as one written
//! against slices. Integer inputs that come from the host every step (token ids, labels, padding
//! masks) are passed as host slices; a device backend uploads them itself.
//!
//! Conventions (llm.c style): outputs first, then inputs, then sizes; every `*_backward`
//! ACCUMULATES (`+=`) into its gradient outputs, so gradients of a parameter used twice (tied
//! embeddings) and gradient accumulation over micro-batches need no extra code.

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

/// Which keys a query may attend to.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnMask<'a> {
    /// Query `i` sees only keys `j <= i` (GPT-2).
    pub causal: bool,
    /// Per `[b, t]` key: `true` = real token, `false` = padding that no query attends to
    /// (BERT `attention_mask`). `None` = no padding.
    pub key_padding: Option<&'a [bool]>,
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
        let r = (mix64(self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 40) as f32
            * (1.0 / 16_777_216.0);
        if r < self.p { 0.0 } else { 1.0 / (1.0 - self.p) }
    }
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

/// The op interface. Implemented by `lmtrain_cpu::Cpu` (the reference) and, later, device
/// backends. Sizes are in elements; every op checks (at least in debug builds) that its views are
/// as long as the sizes say.
pub trait Backend: Send + Sync + Sized {
    /// An owned buffer of `f32`.
    type Buf: Send + Sync;
    /// A shared view of (part of) a buffer.
    type View<'a>: Copy
    where
        Self: 'a;
    /// An exclusive view of (part of) a buffer.
    type ViewMut<'a>
    where
        Self: 'a;

    // ---- memory -------------------------------------------------------------------------
    /// A zero-filled buffer of `len` elements.
    fn alloc(&self, len: usize) -> Self::Buf;
    /// A buffer holding `data` (moved, not copied, on the CPU).
    #[allow(clippy::wrong_self_convention)] // a device backend needs its context to allocate
    fn from_host(&self, data: Vec<f32>) -> Self::Buf;
    /// Copy a view to host memory.
    fn to_host(&self, v: Self::View<'_>) -> Vec<f32>;
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

    // ---- elementwise ----------------------------------------------------------------------
    /// `x = 0`.
    fn fill_zero(&self, x: Self::ViewMut<'_>);
    /// `dst = src`.
    fn copy(&self, dst: Self::ViewMut<'_>, src: Self::View<'_>);
    /// `x *= s`.
    fn scale(&self, x: Self::ViewMut<'_>, s: f32);
    /// `out = a + b` (residual connection forward).
    fn residual_forward(&self, out: Self::ViewMut<'_>, a: Self::View<'_>, b: Self::View<'_>);
    /// `dst += src` (residual connection backward, gradient fan-in).
    fn add_inplace(&self, dst: Self::ViewMut<'_>, src: Self::View<'_>);
    /// Inverted dropout applied in place; also its own backward (same mask, same scale).
    fn dropout_inplace(&self, x: Self::ViewMut<'_>, d: Dropout);

    // ---- layers ---------------------------------------------------------------------------
    /// `C (+)= op(A) · op(B)`, see [`GemmShape`].
    fn gemm(&self, c: Self::ViewMut<'_>, a: Self::View<'_>, b: Self::View<'_>, s: GemmShape);
    /// `out[r, :] += bias` for every row.
    fn add_bias(&self, out: Self::ViewMut<'_>, bias: Self::View<'_>, rows: usize, cols: usize);
    /// `dbias += column sums of dout`.
    fn bias_backward(&self, dbias: Self::ViewMut<'_>, dout: Self::View<'_>, rows: usize, cols: usize);
    /// LayerNorm over the last dimension; saves per-row mean and 1/std for backward.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: Self::ViewMut<'_>,
        mean: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        bias: Self::View<'_>,
        rows: usize,
        cols: usize,
        eps: f32,
    );
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
        mean: Self::View<'_>,
        rstd: Self::View<'_>,
        rows: usize,
        cols: usize,
    );
    /// `out = gelu(inp)`.
    fn gelu_forward(&self, out: Self::ViewMut<'_>, inp: Self::View<'_>, kind: GeluKind);
    /// `dinp += gelu'(inp) * dout`.
    fn gelu_backward(&self, dinp: Self::ViewMut<'_>, inp: Self::View<'_>, dout: Self::View<'_>, kind: GeluKind);
    /// `out[b, t] = wte[ids[b, t]] + wpe[pos_offset + t]`.
    #[allow(clippy::too_many_arguments)]
    fn embedding_forward(
        &self,
        out: Self::ViewMut<'_>,
        wte: Self::View<'_>,
        wpe: Self::View<'_>,
        ids: &[u32],
        b: usize,
        t: usize,
        c: usize,
        pos_offset: usize,
    );
    /// `dwte[ids[b, t]] += dout[b, t]`, `dwpe[t] += dout[b, t]`.
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &self,
        dwte: Self::ViewMut<'_>,
        dwpe: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        ids: &[u32],
        b: usize,
        t: usize,
        c: usize,
    );
    /// Scaled dot-product attention over fused `qkv` (`[b, t, 3C]`) into `out` (`[b, t, C]`,
    /// heads concatenated). Saves the softmax probabilities (`[b, n_head, t, t]`, before dropout)
    /// for backward. Scale `1/sqrt(head_size)`.
    fn attention_forward(
        &self,
        out: Self::ViewMut<'_>,
        probs: Self::ViewMut<'_>,
        qkv: Self::View<'_>,
        s: AttnShape,
        mask: AttnMask<'_>,
        dropout: Dropout,
    );
    /// Attention backward: `dqkv += ...` from `dout`, the forward's `qkv` and saved `probs`.
    fn attention_backward(
        &self,
        dqkv: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        qkv: Self::View<'_>,
        probs: Self::View<'_>,
        s: AttnShape,
        dropout: Dropout,
    );
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
    );
    /// Fused softmax + cross-entropy on `logits` (`[rows, vocab]`) against `targets`
    /// (`-100` = ignored). Returns the SUM of the per-row losses over non-ignored rows. When
    /// `dloss` is `Some(g)`, `logits` is overwritten in place by `d loss / d logits` with each
    /// valid row's loss weighted by `g` (ignored rows become 0) — the probabilities are never
    /// stored separately.
    fn cross_entropy(&self, logits: Self::ViewMut<'_>, targets: &[i32], rows: usize, vocab: usize, dloss: Option<f32>) -> f64;
    /// A tied output head fused with [`Backend::cross_entropy`]: `logits = x · wte^T`
    /// (`x`: `[rows, c]`, `wte`: `[vocab, c]`), softmax cross-entropy against `targets`; returns
    /// the SUM of the row losses. With `grad = Some((dx, dwte, dloss))` also runs the backward:
    /// `dx = dlogits · wte` (overwritten) and `dwte += dlogits^T · x`, rows weighted by `dloss`.
    /// `scratch` (at least `rows * vocab`) holds the logits in whatever layout the backend likes
    /// (the CPU keeps vocabulary chunks contiguous); it is the only full-size buffer involved.
    #[allow(clippy::too_many_arguments)]
    fn lm_head_loss(
        &self,
        scratch: Self::ViewMut<'_>,
        x: Self::View<'_>,
        wte: Self::View<'_>,
        targets: &[i32],
        rows: usize,
        vocab: usize,
        c: usize,
        grad: Option<(Self::ViewMut<'_>, Self::ViewMut<'_>, f32)>,
    ) -> f64;

    // ---- optimizer ------------------------------------------------------------------------
    /// torch.optim.AdamW step over the flat buffer, see `lmtrain_cpu::ops::adamw_update`.
    fn adamw_update(
        &self,
        params: Self::ViewMut<'_>,
        grads: Self::View<'_>,
        m: Self::ViewMut<'_>,
        v: Self::ViewMut<'_>,
        segments: &[DecaySegment],
        hp: &AdamWHyper,
    );
    /// `sqrt(sum g^2)`, accumulated in f64.
    fn global_norm(&self, grads: Self::View<'_>) -> f32;
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

//! [`Meter`]: a backend that holds no data and only counts bytes, so the memory a model needs
//! is measured by running the model's own code instead of a formula beside it.
//!
//! A [`Meter`] buffer is a length; every op is a no-op that returns `Ok`. Allocations
//! ([`Backend::alloc`], [`Backend::from_host`], [`Backend::master_from_host`],
//! [`Backend::alloc_attn_state`], [`Backend::upload_batch`]) add their bytes to a live count,
//! dropping a buffer subtracts them, and the highest live count is kept as the peak. Building a
//! model on a meter and running one training step on it therefore gives the exact bytes the
//! model, the optimizer and the step allocate on a real backend with the same element widths:
//! [`Backend::Buf`] elements at the compute dtype's width (4 bytes for f32, 2 for bf16; the
//! const parameter `F32` says which, and is [`Backend::F32_COMPUTE`], so an optimizer on a bf16
//! meter allocates f32 master weights as it would on the device), [`Backend::Master`] elements
//! at 4 bytes, attention state as the backend keeps it ([`AttnSaves`]; the disentangled
//! attention's probabilities on every backend, and on CUDA the scratch its backward grows).

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{
    AdamWStep, AttnShape, Backend, DecaySegment, DisentangledShape, Dropout, EmbeddingTables, Epilogue, GeluKind, GemmDesc, HeadGrads,
    HostBatch, PaddingIdx, Result, Rows, StepStats,
};

/// What attention keeps for its backward, per layer, on the backend being measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnSaves {
    /// The softmax probabilities `[b, n_head, t, t]` in f32 (the CPU backend).
    Probabilities,
    /// The row log-sum-exp `[b, n_head, t]` in f32 (a fused attention kernel: the CUDA backend).
    RowLogSumExp,
}

impl AttnSaves {
    /// Bytes of the scratch buffer the disentangled attention's backward of shape `s` grows the
    /// backend's to: the score gradients `[b, n_head, t, t]` in f32 on the CUDA backend (one
    /// buffer for every layer); none on the CPU, whose per-task temporaries are freed at once.
    pub fn disentangled_scratch(self, s: DisentangledShape) -> u64 {
        match self {
            AttnSaves::Probabilities => 0,
            AttnSaves::RowLogSumExp => 4 * s.attn.probs_len() as u64,
        }
    }

    /// Bytes of one layer's state for shape `s`.
    pub fn bytes(self, s: AttnShape) -> u64 {
        let rows = (s.b * s.n_head * s.t) as u64;
        4 * match self {
            AttnSaves::Probabilities => rows * s.t as u64,
            AttnSaves::RowLogSumExp => rows,
        }
    }
}

/// The host or device bytes a backend's LM head ([`Backend::lm_head_loss`]) allocates for the
/// duration of one call beside its arguments: `(rows, rows with a target, vocab, c, with the
/// backward)`.
pub type HeadScratch = fn(usize, usize, usize, usize, bool) -> u64;

/// How the measured backend keeps attention state and what its head allocates per call.
#[derive(Clone, Copy, Debug)]
pub struct Profile {
    /// What attention keeps for its backward.
    pub attn: AttnSaves,
    /// The head's temporaries.
    pub head_scratch: HeadScratch,
}

impl From<AttnSaves> for Profile {
    /// `attn`, and a head that allocates nothing of its own (the CUDA backend's fused
    /// classifier works in the logits buffer it is given).
    fn from(attn: AttnSaves) -> Self {
        Profile { attn, head_scratch: |_, _, _, _, _| 0 }
    }
}

/// The live and peak byte counts a meter and its buffers share, and the bytes of the backend's
/// own scratch buffer (grown to the largest request and kept, so counted as live from then on).
#[derive(Debug, Default)]
struct Counter {
    live: AtomicU64,
    peak: AtomicU64,
    scratch: AtomicU64,
}

impl Counter {
    fn add(&self, bytes: u64) {
        let live = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(live, Ordering::Relaxed);
    }
}

/// The metering backend; `F32` is its compute dtype: `true` for f32 (4-byte [`Backend::Buf`]
/// elements), `false` for bf16 (2 bytes). Clones share one count.
#[derive(Clone, Debug)]
pub struct Meter<const F32: bool> {
    counter: Arc<Counter>,
    profile: Profile,
}

impl<const F32: bool> Meter<F32> {
    /// A meter at zero bytes, counting what a backend of `profile` keeps (an [`AttnSaves`]
    /// alone: a head without temporaries).
    pub fn new(profile: impl Into<Profile>) -> Self {
        Meter { counter: Arc::default(), profile: profile.into() }
    }

    /// Bytes of one [`Backend::Buf`] element.
    pub const ELEM_BYTES: u64 = if F32 { 4 } else { 2 };

    /// Bytes allocated and not yet dropped.
    pub fn live(&self) -> u64 {
        self.counter.live.load(Ordering::Relaxed)
    }

    /// The most bytes live at once since the meter was made or [`Meter::reset_peak`] was called.
    pub fn peak(&self) -> u64 {
        self.counter.peak.load(Ordering::Relaxed)
    }

    /// Starts a new peak at the bytes live now.
    pub fn reset_peak(&self) {
        self.counter.peak.store(self.live(), Ordering::Relaxed);
    }

    fn buf(&self, len: usize, elem_bytes: u64) -> MeterBuf {
        self.bytes(len, len as u64 * elem_bytes)
    }

    fn bytes(&self, len: usize, bytes: u64) -> MeterBuf {
        self.counter.add(bytes);
        MeterBuf { len, bytes, counter: self.counter.clone() }
    }

    /// Grows the backend's scratch buffer to `bytes` (it never shrinks).
    fn scratch(&self, bytes: u64) {
        let held = self.counter.scratch.fetch_max(bytes, Ordering::Relaxed);
        if bytes > held {
            self.counter.add(bytes - held);
        }
    }
}

/// A counted allocation: its length in elements and its bytes (given back when dropped).
#[derive(Debug)]
pub struct MeterBuf {
    len: usize,
    bytes: u64,
    counter: Arc<Counter>,
}

impl MeterBuf {
    /// Bytes this buffer counts.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for MeterBuf {
    fn drop(&mut self) {
        self.counter.live.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A shared view: a length.
#[derive(Clone, Copy, Debug)]
pub struct MeterView<'a> {
    len: usize,
    _buf: PhantomData<&'a MeterBuf>,
}

/// An exclusive view: a length.
#[derive(Debug)]
pub struct MeterViewMut<'a> {
    len: usize,
    _buf: PhantomData<&'a mut MeterBuf>,
}

fn view<'a>(len: usize) -> MeterView<'a> {
    MeterView { len, _buf: PhantomData }
}

fn view_mut<'a>(len: usize) -> MeterViewMut<'a> {
    MeterViewMut { len, _buf: PhantomData }
}

fn check_range(offset: usize, len: usize, of: usize) {
    assert!(offset.checked_add(len).is_some_and(|end| end <= of), "slice {offset}+{len} of a view of {of}");
}

/// Bytes a backend keeps for a micro-batch's integer inputs: 4 per token id, target, token type
/// and position id, 1 per attention-mask entry, 8 per labelled position (its row and target).
fn batch_bytes(b: &HostBatch<'_>) -> u64 {
    let n = (b.b * b.t) as u64;
    let labelled = b.targets.map_or(0, |t| t.iter().filter(|&&y| y != crate::IGNORE_INDEX).count()) as u64;
    let present = |yes: bool| if yes { n } else { 0 };
    4 * (n + present(b.targets.is_some()) + present(b.token_type_ids.is_some()) + present(b.position_ids.is_some()))
        + present(b.attention_mask.is_some())
        + 8 * labelled
}

impl<const F32: bool> Backend for Meter<F32> {
    type Buf = MeterBuf;
    type View<'a> = MeterView<'a>;
    type ViewMut<'a> = MeterViewMut<'a>;
    type Master = MeterBuf;
    type Batch = MeterBuf;
    type Stats = StepStats;
    type AttnState = MeterBuf;

    const F32_COMPUTE: bool = F32;

    fn alloc(&self, len: usize) -> Result<MeterBuf> {
        Ok(self.buf(len, Self::ELEM_BYTES))
    }
    fn from_host(&self, data: Vec<f32>) -> Result<MeterBuf> {
        Ok(self.buf(data.len(), Self::ELEM_BYTES))
    }
    fn to_host(&self, v: MeterView<'_>) -> Result<Vec<f32>> {
        Ok(vec![0.0; v.len])
    }
    fn buf_len(buf: &MeterBuf) -> usize {
        buf.len
    }
    fn view(buf: &MeterBuf) -> MeterView<'_> {
        view(buf.len)
    }
    fn view_mut(buf: &mut MeterBuf) -> MeterViewMut<'_> {
        view_mut(buf.len)
    }
    fn slice<'a>(v: MeterView<'a>, offset: usize, len: usize) -> MeterView<'a>
    where
        Self: 'a,
    {
        check_range(offset, len, v.len);
        view(len)
    }
    fn slice_mut<'a>(v: MeterViewMut<'a>, offset: usize, len: usize) -> MeterViewMut<'a>
    where
        Self: 'a,
    {
        check_range(offset, len, v.len);
        view_mut(len)
    }
    fn split_at_mut<'a>(v: MeterViewMut<'a>, mid: usize) -> (MeterViewMut<'a>, MeterViewMut<'a>)
    where
        Self: 'a,
    {
        check_range(0, mid, v.len);
        (view_mut(mid), view_mut(v.len - mid))
    }
    fn reborrow<'s>(v: &'s mut MeterViewMut<'_>) -> MeterViewMut<'s> {
        view_mut(v.len)
    }
    fn as_view<'s>(v: &'s MeterViewMut<'_>) -> MeterView<'s> {
        view(v.len)
    }
    fn master_from_host(&self, data: Vec<f32>) -> Result<MeterBuf> {
        Ok(self.buf(data.len(), 4))
    }
    fn master_to_host(&self, m: &MeterBuf) -> Result<Vec<f32>> {
        Ok(vec![0.0; m.len])
    }
    fn master_len(m: &MeterBuf) -> usize {
        m.len
    }
    fn write(&self, dst: MeterViewMut<'_>, data: &[f32]) -> Result<()> {
        check_range(0, data.len(), dst.len);
        Ok(())
    }
    fn master_write(&self, m: &mut MeterBuf, data: &[f32]) -> Result<()> {
        check_range(0, data.len(), m.len);
        Ok(())
    }

    /// The batch's length is its number of labelled positions (what the head's temporaries
    /// depend on).
    fn upload_batch(&self, batch: &HostBatch<'_>) -> Result<MeterBuf> {
        let labelled = batch.targets.map_or(0, |t| t.iter().filter(|&&y| y != crate::IGNORE_INDEX).count());
        Ok(self.bytes(labelled, batch_bytes(batch)))
    }
    fn new_stats(&self) -> Result<StepStats> {
        Ok(StepStats::default())
    }
    fn reset_stats(&self, _: &mut StepStats) -> Result<()> {
        Ok(())
    }
    fn read_stats(&self, s: &StepStats) -> Result<StepStats> {
        Ok(*s)
    }
    fn alloc_attn_state(&self, s: AttnShape) -> Result<MeterBuf> {
        Ok(self.bytes(s.probs_len(), self.profile.attn.bytes(s)))
    }
    fn alloc_disentangled_state(&self, s: DisentangledShape) -> Result<MeterBuf> {
        // the probabilities in f32 on every backend
        Ok(self.bytes(s.attn.probs_len(), AttnSaves::Probabilities.bytes(s.attn)))
    }

    fn fill_zero(&self, _: MeterViewMut<'_>) -> Result<()> {
        Ok(())
    }
    fn copy(&self, _: MeterViewMut<'_>, _: MeterView<'_>) -> Result<()> {
        Ok(())
    }
    fn residual_forward(&self, _: MeterViewMut<'_>, _: MeterView<'_>, _: MeterView<'_>) -> Result<()> {
        Ok(())
    }
    fn add_inplace(&self, _: MeterViewMut<'_>, _: MeterView<'_>) -> Result<()> {
        Ok(())
    }
    fn dropout_inplace(&self, _: MeterViewMut<'_>, _: Dropout) -> Result<()> {
        Ok(())
    }
    fn gemm(&self, _: MeterViewMut<'_>, _: MeterView<'_>, _: MeterView<'_>, _: &GemmDesc, _: Epilogue<'_, '_, Self>) -> Result<()> {
        Ok(())
    }
    fn bias_backward(&self, _: MeterViewMut<'_>, _: MeterView<'_>, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn layernorm_forward(
        &self,
        _: MeterViewMut<'_>,
        _: &mut MeterBuf,
        _: &mut MeterBuf,
        _: MeterView<'_>,
        _: MeterView<'_>,
        _: MeterView<'_>,
        _: usize,
        _: usize,
        _: f32,
    ) -> Result<()> {
        Ok(())
    }
    fn layernorm_backward(
        &self,
        _: MeterViewMut<'_>,
        _: MeterViewMut<'_>,
        _: MeterViewMut<'_>,
        _: MeterView<'_>,
        _: MeterView<'_>,
        _: MeterView<'_>,
        _: &MeterBuf,
        _: &MeterBuf,
        _: usize,
        _: usize,
    ) -> Result<()> {
        Ok(())
    }
    fn gelu_forward(&self, _: MeterViewMut<'_>, _: MeterView<'_>, _: GeluKind) -> Result<()> {
        Ok(())
    }
    fn gelu_backward(&self, _: MeterViewMut<'_>, _: MeterView<'_>, _: MeterView<'_>, _: GeluKind) -> Result<()> {
        Ok(())
    }
    fn tanh_forward(&self, _: MeterViewMut<'_>, _: MeterView<'_>) -> Result<()> {
        Ok(())
    }
    fn tanh_backward(&self, _: MeterViewMut<'_>, _: MeterView<'_>, _: MeterView<'_>) -> Result<()> {
        Ok(())
    }
    fn embedding_forward(&self, _: MeterViewMut<'_>, _: EmbeddingTables<MeterView<'_>>, _: &MeterBuf, _: usize) -> Result<()> {
        Ok(())
    }
    fn embedding_backward(
        &self,
        _: EmbeddingTables<MeterViewMut<'_>>,
        _: MeterView<'_>,
        _: &MeterBuf,
        _: usize,
        _: PaddingIdx,
    ) -> Result<()> {
        Ok(())
    }
    fn attention_forward(
        &self,
        _: MeterViewMut<'_>,
        _: &mut MeterBuf,
        _: MeterView<'_>,
        _: AttnShape,
        _: bool,
        _: &MeterBuf,
        _: Dropout,
    ) -> Result<()> {
        Ok(())
    }
    fn attention_backward(
        &self,
        _: MeterViewMut<'_>,
        _: MeterView<'_>,
        _: MeterView<'_>,
        _: MeterView<'_>,
        _: &MeterBuf,
        _: AttnShape,
        _: bool,
        _: &MeterBuf,
        _: Dropout,
    ) -> Result<()> {
        Ok(())
    }
    fn attention_cached(
        &self,
        _: MeterViewMut<'_>,
        _: MeterView<'_>,
        _: MeterView<'_>,
        _: MeterView<'_>,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        Ok(())
    }
    fn disentangled_attention_forward(
        &self,
        _: MeterViewMut<'_>,
        _: &mut MeterBuf,
        _: MeterView<'_>,
        _: Option<MeterView<'_>>,
        _: Option<MeterView<'_>>,
        _: DisentangledShape,
        _: &MeterBuf,
        _: Dropout,
    ) -> Result<()> {
        Ok(())
    }
    fn disentangled_attention_backward(
        &self,
        _: MeterViewMut<'_>,
        _: Option<MeterViewMut<'_>>,
        _: Option<MeterViewMut<'_>>,
        _: MeterView<'_>,
        _: MeterView<'_>,
        _: Option<MeterView<'_>>,
        _: Option<MeterView<'_>>,
        _: &MeterBuf,
        s: DisentangledShape,
        _: &MeterBuf,
        _: Dropout,
    ) -> Result<()> {
        self.scratch(self.profile.attn.disentangled_scratch(s));
        Ok(())
    }
    fn zero_padded_rows(&self, _: MeterViewMut<'_>, _: &MeterBuf, _: usize) -> Result<()> {
        Ok(())
    }
    fn conv1d_unfold(&self, _: MeterViewMut<'_>, _: MeterView<'_>, _: usize, _: usize, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn conv1d_fold(&self, _: MeterViewMut<'_>, _: MeterView<'_>, _: usize, _: usize, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn gather_rows(&self, _: MeterViewMut<'_>, _: MeterView<'_>, _: &MeterBuf, _: usize) -> Result<()> {
        Ok(())
    }
    fn scatter_add_rows(&self, _: MeterViewMut<'_>, _: MeterView<'_>, _: &MeterBuf, _: usize) -> Result<()> {
        Ok(())
    }
    fn lm_head_loss(
        &self,
        _: MeterViewMut<'_>,
        x: MeterView<'_>,
        wte: MeterView<'_>,
        _: Option<MeterView<'_>>,
        batch: &MeterBuf,
        _: Rows,
        c: usize,
        grad: Option<HeadGrads<MeterViewMut<'_>>>,
        _: &mut StepStats,
        _: f64,
    ) -> Result<()> {
        let (rows, vocab) = (x.len / c.max(1), wte.len / c.max(1));
        let _scratch = self.bytes(0, (self.profile.head_scratch)(rows, batch.len.min(rows), vocab, c, grad.is_some()));
        Ok(())
    }
    fn global_norm(&self, _: MeterView<'_>, _: &mut StepStats) -> Result<()> {
        Ok(())
    }
    fn adamw_update(
        &self,
        _: MeterViewMut<'_>,
        _: Option<&mut MeterBuf>,
        _: MeterView<'_>,
        _: &mut MeterBuf,
        _: &mut MeterBuf,
        _: &[DecaySegment],
        _: &AdamWStep,
        _: &StepStats,
    ) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_count_their_bytes_until_dropped_and_the_peak_stays() {
        let m = Meter::<false>::new(AttnSaves::RowLogSumExp);
        let a = m.alloc(10).unwrap(); // bf16: 20 bytes
        let master = m.master_from_host(vec![0.0; 10]).unwrap(); // f32: 40 bytes
        assert_eq!((m.live(), m.peak()), (60, 60));
        drop(a);
        let s = AttnShape { b: 2, t: 8, n_head: 3, head_size: 4 };
        let st = m.alloc_attn_state(s).unwrap();
        assert_eq!((st.bytes(), m.live(), m.peak()), (2 * 3 * 8 * 4, 40 + 192, 232));
        drop((st, master));
        assert_eq!((m.live(), m.peak()), (0, 232));
        m.reset_peak();
        assert_eq!(m.peak(), 0);
        let f32_meter = Meter::<true>::new(AttnSaves::Probabilities);
        assert_eq!(f32_meter.from_host(vec![0.0; 10]).unwrap().bytes(), 40);
        assert_eq!(f32_meter.alloc_attn_state(s).unwrap().bytes(), 4 * s.probs_len() as u64);
    }

    #[test]
    fn disentangled_attention_counts_its_probabilities_and_the_cuda_scratch() {
        use crate::RelPositions;
        let d = DisentangledShape {
            attn: AttnShape { b: 2, t: 8, n_head: 3, head_size: 4 },
            rel: RelPositions { span: 4, buckets: 4, max_position: 8 },
            scale_factor: 3,
        };
        let probs = 4 * d.attn.probs_len() as u64;
        for (attn, scratch) in [(AttnSaves::Probabilities, 0), (AttnSaves::RowLogSumExp, probs)] {
            let m = Meter::<false>::new(attn);
            let state = m.alloc_disentangled_state(d).unwrap();
            assert_eq!(state.bytes(), probs);
            let (x, mut dx, batch) = (m.alloc(1).unwrap(), m.alloc(1).unwrap(), m.alloc(0).unwrap());
            // two layers' backwards share one scratch buffer
            for _ in 0..2 {
                let (xv, dv) = (Meter::<false>::view(&x), Meter::<false>::view_mut(&mut dx));
                m.disentangled_attention_backward(dv, None, None, xv, xv, None, None, &state, d, &batch, Dropout::NONE).unwrap();
            }
            assert_eq!(m.live(), probs + 4 + scratch, "{attn:?}");
        }
    }

    #[test]
    fn a_batch_counts_its_arrays() {
        let m = Meter::<true>::new(AttnSaves::Probabilities);
        let ids = [1u32; 6];
        let targets = [3, -100, 4, -100, -100, 5];
        let mask = [true; 6];
        let h = HostBatch {
            b: 2,
            t: 3,
            input_ids: &ids,
            targets: Some(&targets),
            attention_mask: Some(&mask),
            token_type_ids: None,
            position_ids: None,
        };
        // ids and targets 4 bytes each, the mask 1, three labelled rows 8
        assert_eq!(m.upload_batch(&h).unwrap().bytes(), 6 * 4 + 6 * 4 + 6 + 3 * 8);
    }

    #[test]
    #[should_panic(expected = "slice 4+3 of a view of 6")]
    fn views_are_bounds_checked() {
        let m = Meter::<true>::new(AttnSaves::Probabilities);
        let buf = m.alloc(6).unwrap();
        Meter::<true>::slice(Meter::<true>::view(&buf), 4, 3);
    }
}

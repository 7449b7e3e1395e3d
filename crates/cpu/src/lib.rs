//! lmtrain-cpu: the CPU backend — f32, multi-threaded with rayon, matrix products through the
//! `gemm` crate. It is the reference every other backend is checked against.
//!
//! [`ops`] holds the ops as free functions on slices (usable directly, e.g. by tests);
//! [`Cpu`] implements [`lmtrain_backend::Backend`] over them with `Vec<f32>` buffers and
//! `&[f32]` / `&mut [f32]` views, so the generic model code costs nothing extra here.

#[macro_use]
pub mod dispatch;
mod gemm;
pub mod math;
pub mod ops;
mod simd;

use lmtrain_backend::{
    AdamWStep, AttnMask, AttnShape, Backend, BackendError, DecaySegment, DisentangledShape, Dropout, EmbeddingTables, Epilogue, GeluKind,
    GemmDesc, HeadGrads, HostBatch, Inputs, PaddingIdx, Result, Rows, StepStats,
};

/// What the CPU backend keeps and allocates, for the memory meter
/// ([`lmtrain_backend::meter::Meter`]): attention probabilities, and the head's per-row
/// temporaries ([`ops::lm_head_scratch_bytes`]).
pub fn meter_profile() -> lmtrain_backend::meter::Profile {
    lmtrain_backend::meter::Profile { attn: lmtrain_backend::meter::AttnSaves::Probabilities, head_scratch: ops::lm_head_scratch_bytes }
}

/// The CPU backend (stateless; threads come from rayon's global pool).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];
    type Master = Vec<f32>;
    type Batch = Inputs;
    type Stats = StepStats;
    /// The softmax probabilities `[b, n_head, t, t]` (before dropout).
    type AttnState = Vec<f32>;

    const F32_COMPUTE: bool = true;

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        let mut v = Vec::new();
        v.try_reserve_exact(len).map_err(|_| BackendError(format!("out of memory allocating {} MB", len.saturating_mul(4) >> 20)))?;
        v.resize(len, 0.0);
        Ok(v)
    }
    fn from_host(&self, data: Vec<f32>) -> Result<Vec<f32>> {
        Ok(data)
    }
    fn to_host(&self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }
    fn buf_len(buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn view(buf: &Vec<f32>) -> &[f32] {
        buf
    }
    fn view_mut(buf: &mut Vec<f32>) -> &mut [f32] {
        buf
    }
    fn slice<'a>(v: &'a [f32], offset: usize, len: usize) -> &'a [f32]
    where
        Self: 'a,
    {
        &v[offset..offset + len]
    }
    fn slice_mut<'a>(v: &'a mut [f32], offset: usize, len: usize) -> &'a mut [f32]
    where
        Self: 'a,
    {
        &mut v[offset..offset + len]
    }
    fn split_at_mut<'a>(v: &'a mut [f32], mid: usize) -> (&'a mut [f32], &'a mut [f32])
    where
        Self: 'a,
    {
        v.split_at_mut(mid)
    }
    fn reborrow<'s>(v: &'s mut &mut [f32]) -> &'s mut [f32] {
        v
    }
    fn as_view<'s>(v: &'s &mut [f32]) -> &'s [f32] {
        v
    }
    fn master_from_host(&self, data: Vec<f32>) -> Result<Vec<f32>> {
        Ok(data)
    }
    fn master_to_host(&self, m: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(m.clone())
    }
    fn master_len(m: &Vec<f32>) -> usize {
        m.len()
    }
    fn write(&self, dst: &mut [f32], data: &[f32]) -> Result<()> {
        if dst.len() != data.len() {
            return Err(BackendError(format!("write: {} values for a buffer of {}", data.len(), dst.len())));
        }
        dst.copy_from_slice(data);
        Ok(())
    }
    fn master_write(&self, m: &mut Vec<f32>, data: &[f32]) -> Result<()> {
        self.write(m, data)
    }

    fn upload_batch(&self, batch: &HostBatch<'_>) -> Result<Inputs> {
        Ok(Inputs::new(batch))
    }
    fn new_stats(&self) -> Result<StepStats> {
        Ok(StepStats::default())
    }
    fn reset_stats(&self, stats: &mut StepStats) -> Result<()> {
        *stats = StepStats::default();
        Ok(())
    }
    fn read_stats(&self, stats: &StepStats) -> Result<StepStats> {
        Ok(*stats)
    }
    fn alloc_attn_state(&self, s: AttnShape) -> Result<Vec<f32>> {
        self.alloc(s.probs_len())
    }
    fn alloc_disentangled_state(&self, s: DisentangledShape) -> Result<Vec<f32>> {
        self.alloc(s.attn.probs_len())
    }

    fn fill_zero(&self, x: &mut [f32]) -> Result<()> {
        ops::fill_zero(x);
        Ok(())
    }
    fn copy(&self, dst: &mut [f32], src: &[f32]) -> Result<()> {
        dst.copy_from_slice(src);
        Ok(())
    }
    fn residual_forward(&self, out: &mut [f32], a: &[f32], b: &[f32]) -> Result<()> {
        ops::residual_forward(out, a, b);
        Ok(())
    }
    fn add_inplace(&self, dst: &mut [f32], src: &[f32]) -> Result<()> {
        ops::add_inplace(dst, src);
        Ok(())
    }
    fn dropout_inplace(&self, x: &mut [f32], d: Dropout) -> Result<()> {
        ops::dropout_inplace(x, d);
        Ok(())
    }
    fn gemm(&self, c: &mut [f32], a: &[f32], b: &[f32], d: &GemmDesc, epi: Epilogue<'_, '_, Self>) -> Result<()> {
        let (m, n) = (d.shape.m, d.shape.n);
        match epi {
            Epilogue::None => ops::matmul_desc(c, a, b, d),
            Epilogue::Bias(bias) => {
                assert!(d.is_packed(), "gemm: epilogues take packed products");
                ops::matmul(c, a, b, d.shape);
                ops::add_bias(c, bias, m, n);
            }
            Epilogue::BiasGelu { bias, kind, pre } => {
                assert!(d.is_packed() && !d.shape.accumulate, "gemm: the GELU epilogue takes a packed, overwriting product");
                ops::matmul(pre, a, b, d.shape);
                ops::add_bias(pre, bias, m, n);
                ops::gelu_forward(c, pre, kind);
            }
        }
        Ok(())
    }
    fn bias_backward(&self, dbias: &mut [f32], dout: &[f32], rows: usize, cols: usize) -> Result<()> {
        ops::bias_backward(dbias, dout, rows, cols);
        Ok(())
    }
    fn layernorm_forward(
        &self,
        out: &mut [f32],
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        inp: &[f32],
        weight: &[f32],
        bias: &[f32],
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        ops::layernorm_forward(out, &mut mean[..rows], &mut rstd[..rows], inp, weight, bias, rows, cols, eps);
        Ok(())
    }
    fn layernorm_backward(
        &self,
        dinp: &mut [f32],
        dweight: &mut [f32],
        dbias: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        mean: &Vec<f32>,
        rstd: &Vec<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        ops::layernorm_backward(dinp, dweight, dbias, dout, inp, weight, &mean[..rows], &rstd[..rows], rows, cols);
        Ok(())
    }
    fn gelu_forward(&self, out: &mut [f32], inp: &[f32], kind: GeluKind) -> Result<()> {
        ops::gelu_forward(out, inp, kind);
        Ok(())
    }
    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32], kind: GeluKind) -> Result<()> {
        ops::gelu_backward(dinp, inp, dout, kind);
        Ok(())
    }
    fn tanh_forward(&self, out: &mut [f32], inp: &[f32]) -> Result<()> {
        ops::tanh_forward(out, inp);
        Ok(())
    }
    fn tanh_backward(&self, dinp: &mut [f32], out: &[f32], dout: &[f32]) -> Result<()> {
        ops::tanh_backward(dinp, out, dout);
        Ok(())
    }
    fn embedding_forward(&self, out: &mut [f32], tables: EmbeddingTables<&[f32]>, batch: &Inputs, c: usize) -> Result<()> {
        ops::embedding_forward(out, tables, batch, c);
        Ok(())
    }
    fn embedding_backward(
        &self,
        grads: EmbeddingTables<&mut [f32]>,
        dout: &[f32],
        batch: &Inputs,
        c: usize,
        pad: PaddingIdx,
    ) -> Result<()> {
        ops::embedding_backward(grads, dout, batch, c, pad);
        Ok(())
    }
    fn attention_forward(
        &self,
        out: &mut [f32],
        probs: &mut Vec<f32>,
        qkv: &[f32],
        s: AttnShape,
        causal: bool,
        batch: &Inputs,
        dropout: Dropout,
    ) -> Result<()> {
        let mask = AttnMask { causal, key_padding: batch.key_padding.as_deref() };
        ops::attention_forward(out, probs, qkv, s, mask, dropout);
        Ok(())
    }
    fn attention_backward(
        &self,
        dqkv: &mut [f32],
        dout: &[f32],
        qkv: &[f32],
        _out: &[f32],
        probs: &Vec<f32>,
        s: AttnShape,
        _causal: bool,
        _batch: &Inputs,
        dropout: Dropout,
    ) -> Result<()> {
        // the saved probabilities already hold the masks (masked entries are exactly 0)
        ops::attention_backward(dqkv, dout, qkv, probs, s, dropout);
        Ok(())
    }
    fn attention_cached(
        &self,
        out: &mut [f32],
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        start: usize,
        n_new: usize,
        n_head: usize,
        head_size: usize,
    ) -> Result<()> {
        ops::attention_cached(out, q, k_cache, v_cache, start, n_new, n_head, head_size);
        Ok(())
    }
    fn disentangled_attention_forward(
        &self,
        out: &mut [f32],
        probs: &mut Vec<f32>,
        qkv: &[f32],
        pos_key: Option<&[f32]>,
        pos_query: Option<&[f32]>,
        s: DisentangledShape,
        batch: &Inputs,
        dropout: Dropout,
    ) -> Result<()> {
        ops::disentangled_attention_forward(out, probs, qkv, pos_key, pos_query, s, batch.key_padding.as_deref(), dropout);
        Ok(())
    }
    fn disentangled_attention_backward(
        &self,
        dqkv: &mut [f32],
        dpos_key: Option<&mut [f32]>,
        dpos_query: Option<&mut [f32]>,
        dout: &[f32],
        qkv: &[f32],
        pos_key: Option<&[f32]>,
        pos_query: Option<&[f32]>,
        probs: &Vec<f32>,
        s: DisentangledShape,
        batch: &Inputs,
        dropout: Dropout,
    ) -> Result<()> {
        let pad = batch.key_padding.as_deref();
        ops::disentangled_attention_backward(dqkv, dpos_key, dpos_query, dout, qkv, pos_key, pos_query, probs, s, pad, dropout);
        Ok(())
    }
    fn zero_padded_rows(&self, x: &mut [f32], batch: &Inputs, cols: usize) -> Result<()> {
        ops::zero_padded_rows(x, batch.key_padding.as_deref(), cols);
        Ok(())
    }
    fn conv1d_unfold(&self, out: &mut [f32], x: &[f32], b: usize, t: usize, c: usize, k: usize) -> Result<()> {
        ops::conv1d_unfold(out, x, b, t, c, k);
        Ok(())
    }
    fn conv1d_fold(&self, dx: &mut [f32], dcol: &[f32], b: usize, t: usize, c: usize, k: usize) -> Result<()> {
        ops::conv1d_fold(dx, dcol, b, t, c, k);
        Ok(())
    }
    fn gather_rows(&self, out: &mut [f32], x: &[f32], batch: &Inputs, cols: usize) -> Result<()> {
        ops::gather_rows(out, x, &batch.labelled_rows, cols);
        Ok(())
    }
    fn scatter_add_rows(&self, dx: &mut [f32], dsel: &[f32], batch: &Inputs, cols: usize) -> Result<()> {
        ops::scatter_add_rows(dx, dsel, &batch.labelled_rows, cols);
        Ok(())
    }
    fn lm_head_loss(
        &self,
        scratch: &mut [f32],
        x: &[f32],
        wte: &[f32],
        bias: Option<&[f32]>,
        batch: &Inputs,
        rows: Rows,
        c: usize,
        grad: Option<HeadGrads<&mut [f32]>>,
        stats: &mut StepStats,
        weight: f64,
    ) -> Result<()> {
        let targets = match rows {
            Rows::All => &batch.targets,
            Rows::Labelled => &batch.labelled_targets,
        };
        let sum = ops::lm_head_loss(scratch, x, wte, bias, targets, targets.len(), wte.len() / c, c, grad);
        // the mean rounded to f32 first, as the loss a model reports
        stats.loss += (sum / batch.n_labels() as f64) as f32 as f64 * weight;
        Ok(())
    }
    fn global_norm(&self, grads: &[f32], stats: &mut StepStats) -> Result<()> {
        stats.grad_norm = ops::global_norm(grads);
        Ok(())
    }
    fn adamw_update(
        &self,
        params: &mut [f32],
        master: Option<&mut Vec<f32>>,
        grads: &[f32],
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        segments: &[DecaySegment],
        step: &AdamWStep,
        stats: &StepStats,
    ) -> Result<()> {
        let (_, grad_scale) = step.grad_scale(stats.grad_norm);
        let hp = step.hyper(grad_scale);
        match master {
            None => ops::adamw_update(params, grads, m, v, segments, &hp),
            Some(master) => {
                ops::adamw_update(master, grads, m, v, segments, &hp);
                params.copy_from_slice(master);
            }
        }
        Ok(())
    }
}

//! Launch wrappers of `kernels/deberta.cu`: DeBERTa's disentangled attention (forward and
//! backward, the probabilities saved) and the `im2col` of its convolution layer.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig};
use lmtrain_backend::{DisentangledShape, Dropout, RelPositions};

use super::fused::upload_i32;
use super::{KernelDtype, SMEM_LIMIT, check_len, elem_cfg, to_i32};
use crate::launch::Launch;
use crate::{CudaDevice, Result, shape};

/// Threads per block of the row kernels (kThreads in deberta.cu).
const ROW_THREADS: u32 = 128;

/// Floats of scratch [`CudaDevice::disentangled_attention_backward`] needs: the score
/// gradients `[b, n_head, t, t]`.
pub fn disentangled_backward_scratch(s: DisentangledShape) -> usize {
    s.attn.probs_len()
}

/// The relative positions of one sequence length on the device, for the disentangled attention
/// kernels: `RelPositions::index` of every difference `d = i - j` (exact: the CPU's f32 log
/// buckets), and the differences of each table row. Built once per shape (a backend keeps
/// them between layers and steps, so a step copies nothing for them).
pub struct RelTables {
    t: usize,
    rel_positions: RelPositions,
    /// `rel[d + t - 1]`: the table row of difference `d`.
    rel: CudaSlice<i32>,
    /// `rows_delta[rows_start[r]..rows_start[r + 1]]`: the differences of row `r`, increasing.
    rows_start: CudaSlice<i32>,
    rows_delta: CudaSlice<i32>,
}

impl RelTables {
    /// The tables of shape `s` (its sequence length and relative positions), uploaded to `dev`;
    /// empty without relative positions (`span` 0).
    pub fn new(dev: &CudaDevice, s: &DisentangledShape) -> Result<Self> {
        let t = if s.rel.span == 0 { 0 } else { s.attn.t as i64 };
        let deltas: Vec<i64> = (1 - t..t).collect();
        let rel: Vec<i32> = deltas.iter().map(|&d| s.rel.index(d.max(0) as usize, (-d).max(0) as usize) as i32).collect();
        let rows = s.rel_rows();
        let mut rows_start = vec![0i32; rows + 1];
        for &r in &rel {
            rows_start[r as usize + 1] += 1;
        }
        for r in 0..rows {
            rows_start[r + 1] += rows_start[r];
        }
        let mut fill = rows_start.clone();
        let mut rows_delta = vec![0i32; rel.len()];
        for (&d, &r) in deltas.iter().zip(&rel) {
            rows_delta[fill[r as usize] as usize] = d as i32;
            fill[r as usize] += 1;
        }
        Ok(Self {
            t: s.attn.t,
            rel_positions: s.rel,
            rel: upload_i32(dev, &rel)?,
            rows_start: upload_i32(dev, &rows_start)?,
            rows_delta: upload_i32(dev, &rows_delta)?,
        })
    }

    /// Whether these are the tables of shape `s`.
    pub fn fits(&self, s: &DisentangledShape) -> bool {
        self.t == s.attn.t && self.rel_positions == s.rel
    }
}

/// The integer sizes of the kernels, after the shape checks forward and backward share.
#[allow(clippy::too_many_arguments)]
fn sizes<T>(
    op: &'static str,
    s: &DisentangledShape,
    qkv: &CudaView<'_, T>,
    pos_key: Option<&CudaView<'_, T>>,
    pos_query: Option<&CudaView<'_, T>>,
    key_valid: Option<&CudaView<'_, u8>>,
    tables: &RelTables,
    probs: usize,
    dropout: Dropout,
) -> Result<[i32; 4]> {
    let a = s.attn;
    if !tables.fits(s) {
        return Err(shape(op, "relative-position tables of another shape"));
    }
    let c = a.channels();
    check_len(op, "qkv", qkv.len(), a.b * a.t * 3 * c)?;
    check_len(op, "probabilities", probs, a.probs_len())?;
    for p in [pos_key, pos_query].into_iter().flatten() {
        if s.rel.span == 0 {
            return Err(shape(op, "relative embeddings with a span of 0"));
        }
        check_len(op, "relative embeddings", p.len(), s.rel_rows() * c)?;
    }
    if let Some(kv) = key_valid {
        check_len(op, "key_valid", kv.len(), a.b * a.t)?;
    }
    if !(0.0..1.0).contains(&dropout.p) {
        return Err(shape(op, format!("dropout probability {} outside [0, 1)", dropout.p)));
    }
    if a.b * a.n_head > 65535 {
        return Err(shape(op, "b * n_head exceeds the grid's 65535 limit"));
    }
    // the column kernel keeps two columns of t floats in shared memory
    if 2 * a.t * size_of::<f32>() > SMEM_LIMIT {
        return Err(shape(op, format!("sequence length {} exceeds the {} this kernel holds", a.t, SMEM_LIMIT / 8)));
    }
    to_i32(op, "b * n_head * t * t", a.probs_len())?;
    Ok([to_i32(op, "b", a.b)?, to_i32(op, "t", a.t)?, to_i32(op, "n_head", a.n_head)?, to_i32(op, "head_size", a.head_size)?])
}

/// One block per (row, head) of `threads` threads with `smem` bytes of dynamic shared memory.
fn rows_cfg(rows: usize, heads: usize, threads: u32, smem: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, heads as u32, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 }
}

/// Threads of the kernels with one thread per channel of a head (whole warps, at most 128).
fn channel_threads(head_size: usize) -> u32 {
    (head_size.div_ceil(32) * 32).clamp(32, ROW_THREADS as usize) as u32
}

impl CudaDevice {
    /// Disentangled attention forward, the semantics of
    /// `lmtrain_cpu::ops::disentangled_attention_forward` (see
    /// `lmtrain_backend::Backend::disentangled_attention_forward`): `qkv` (`[b, t, 3C]`) into `out`
    /// (`[b, t, C]`), the c2p term when `pos_key` is given, p2c when `pos_query` is (both
    /// `[2 * span, C]`), pairs with a padded query or key (`key_valid` 0) at `f32::MIN`, dropout on
    /// the probabilities; `probs` (`[b, n_head, t, t]`) receives the probabilities before dropout.
    /// `tables` are [`RelTables`] of this shape.
    #[allow(clippy::too_many_arguments)]
    pub fn disentangled_attention_forward<T: KernelDtype>(
        &self,
        out: &mut CudaViewMut<'_, T>,
        probs: &mut CudaViewMut<'_, f32>,
        qkv: &CudaView<'_, T>,
        pos_key: Option<&CudaView<'_, T>>,
        pos_query: Option<&CudaView<'_, T>>,
        key_valid: Option<&CudaView<'_, u8>>,
        tables: &RelTables,
        s: DisentangledShape,
        dropout: Dropout,
    ) -> Result<()> {
        const OP: &str = "disentangled_attention_forward";
        let [b, t, nh, hs] = sizes(OP, &s, qkv, pos_key, pos_query, key_valid, tables, probs.len(), dropout)?;
        let a = s.attn;
        check_len(OP, "out", out.len(), a.b * a.t * a.channels())?;
        if a.b * a.t * a.n_head == 0 {
            return Ok(());
        }
        let relative = pos_key.is_some() || pos_query.is_some();
        let rel = relative.then(|| tables.rel.as_view());
        let (sc, p, seed) = (s.scale(), if dropout.active() { dropout.p } else { 0.0 }, dropout.seed);
        let mut l = Launch::new(self, format!("deberta_attn_fwd_{}", T::SUFFIX))?;
        l.output(out).output(probs).input(qkv).optional_input(pos_key).optional_input(pos_query);
        l.optional_input(key_valid).optional_input(rel.as_ref());
        l.scalar(&b).scalar(&t).scalar(&nh).scalar(&hs).scalar(&sc).scalar(&p).scalar(&seed);
        // SAFETY: every buffer has the length the kernel indexes for this shape (checked in
        // `sizes` and above); rel holds the 2t - 1 differences, each a row below 2 * span; the
        // grid is one block per (query row, head) and the dynamic shared memory one score row.
        unsafe { l.launch(rows_cfg(a.t, a.b * a.n_head, ROW_THREADS, a.t * 4)) }
    }

    /// Disentangled attention backward, the semantics of
    /// `lmtrain_cpu::ops::disentangled_attention_backward`; ACCUMULATES into `dqkv` and into the
    /// relative embeddings' gradients (given exactly when the forward had `pos_key` /
    /// `pos_query`). `probs` is the forward's; `scratch`
    /// ([`disentangled_backward_scratch`] floats) receives the score gradients. Every output
    /// element is summed by one thread in a fixed order (no atomics): identical bits every run.
    #[allow(clippy::too_many_arguments)]
    pub fn disentangled_attention_backward<T: KernelDtype>(
        &self,
        dqkv: &mut CudaViewMut<'_, T>,
        dpos_key: Option<&mut CudaViewMut<'_, T>>,
        dpos_query: Option<&mut CudaViewMut<'_, T>>,
        scratch: &mut CudaViewMut<'_, f32>,
        dout: &CudaView<'_, T>,
        qkv: &CudaView<'_, T>,
        pos_key: Option<&CudaView<'_, T>>,
        pos_query: Option<&CudaView<'_, T>>,
        probs: &CudaView<'_, f32>,
        key_valid: Option<&CudaView<'_, u8>>,
        tables: &RelTables,
        s: DisentangledShape,
        dropout: Dropout,
    ) -> Result<()> {
        const OP: &str = "disentangled_attention_backward";
        let [b, t, nh, hs] = sizes(OP, &s, qkv, pos_key, pos_query, key_valid, tables, probs.len(), dropout)?;
        let a = s.attn;
        let c = a.channels();
        check_len(OP, "dqkv", dqkv.len(), qkv.len())?;
        check_len(OP, "dout", dout.len(), a.b * a.t * c)?;
        check_len(OP, "scratch", scratch.len(), disentangled_backward_scratch(s))?;
        if dpos_key.is_some() != pos_key.is_some() || dpos_query.is_some() != pos_query.is_some() {
            return Err(shape(OP, "a relative embedding's gradient goes with the embedding"));
        }
        for d in [dpos_key.as_deref(), dpos_query.as_deref()].into_iter().flatten() {
            check_len(OP, "relative embedding gradient", d.len(), s.rel_rows() * c)?;
        }
        if a.b * a.t * a.n_head == 0 {
            return Ok(());
        }
        let relative = pos_key.is_some() || pos_query.is_some();
        let rel = relative.then(|| tables.rel.as_view());
        let (sc, p, seed) = (s.scale(), if dropout.active() { dropout.p } else { 0.0 }, dropout.seed);
        let heads = a.b * a.n_head;
        let ch = channel_threads(a.head_size);

        let mut l = Launch::new(self, format!("deberta_attn_bwd_ds_{}", T::SUFFIX))?;
        l.output(scratch).input(probs).input(dout).input(qkv).optional_input(key_valid);
        l.scalar(&b).scalar(&t).scalar(&nh).scalar(&hs).scalar(&p).scalar(&seed);
        // SAFETY: scratch and probs hold b*n_head*t*t floats, dout b*t*C, qkv b*t*3C (checked);
        // one block per (query row, head), one row of t floats of dynamic shared memory.
        unsafe { l.launch(rows_cfg(a.t, heads, ROW_THREADS, a.t * 4)) }?;
        let ds = scratch.as_view();

        let mut l = Launch::new(self, format!("deberta_attn_bwd_dq_{}", T::SUFFIX))?;
        l.output(dqkv).input(&ds).input(qkv).optional_input(pos_key).optional_input(rel.as_ref());
        l.scalar(&b).scalar(&t).scalar(&nh).scalar(&hs).scalar(&sc);
        // SAFETY: as above; block (i, head) writes the q part of row i of that head only.
        unsafe { l.launch(rows_cfg(a.t, heads, ch, 0)) }?;

        let mut l = Launch::new(self, format!("deberta_attn_bwd_dkv_{}", T::SUFFIX))?;
        l.output(dqkv).input(&ds).input(probs).input(dout).input(qkv).optional_input(pos_query).optional_input(rel.as_ref());
        l.scalar(&b).scalar(&t).scalar(&nh).scalar(&hs).scalar(&sc).scalar(&p).scalar(&seed);
        // SAFETY: as above; block (j, head) writes the k and v parts of row j of that head only,
        // with two columns of t floats of dynamic shared memory.
        unsafe { l.launch(rows_cfg(a.t, heads, ch, 2 * a.t * 4)) }?;

        if let Some(g) = dpos_key {
            self.deberta_rel_grad(g, &ds, qkv, tables, &s, 0)?;
        }
        if let Some(g) = dpos_query {
            self.deberta_rel_grad(g, &ds, qkv, tables, &s, 1)?;
        }
        Ok(())
    }

    /// The gradient of one relative embedding (`query` 0: `pos_key`, 1: `pos_query`) from the
    /// score gradients `ds`; shapes checked by the caller.
    fn deberta_rel_grad<T: KernelDtype>(
        &self,
        grad: &mut CudaViewMut<'_, T>,
        ds: &CudaView<'_, f32>,
        qkv: &CudaView<'_, T>,
        tab: &RelTables,
        s: &DisentangledShape,
        query: i32,
    ) -> Result<()> {
        let a = s.attn;
        let [b, t, nh, hs] = [a.b, a.t, a.n_head, a.head_size].map(|v| v as i32);
        let sc = s.scale();
        let (start, delta) = (tab.rows_start.as_view(), tab.rows_delta.as_view());
        let mut l = Launch::new(self, format!("deberta_rel_grad_{}", T::SUFFIX))?;
        l.output(grad).input(ds).input(qkv).input(&start).input(&delta);
        l.scalar(&b).scalar(&t).scalar(&nh).scalar(&hs).scalar(&sc).scalar(&query);
        // SAFETY: grad holds 2*span rows of C, ds b*n_head*t*t floats, qkv b*t*3C (checked by
        // the caller, which converted the sizes to i32); rows_start has 2*span + 1 entries and
        // rows_delta the 2t - 1 differences, each with |d| < t; block (r, h) writes row r, head
        // h only.
        unsafe { l.launch(rows_cfg(s.rel_rows(), a.n_head, channel_threads(a.head_size), 0)) }
    }

    /// `im2col` of a 1-D convolution along each sequence (`lmtrain_cpu::ops::conv1d_unfold`):
    /// `x` (`[b, t, c]`) into `out` (`[b * t, c * k]`), kernel `k` odd, zero padding `(k - 1) / 2`.
    pub fn conv1d_unfold<T: KernelDtype>(
        &self,
        out: &mut CudaViewMut<'_, T>,
        x: &CudaView<'_, T>,
        b: usize,
        t: usize,
        c: usize,
        k: usize,
    ) -> Result<()> {
        self.conv1d("conv1d_unfold", out, x, [b, t, c, k], [b * t * c * k, b * t * c])
    }

    /// Backward of [`CudaDevice::conv1d_unfold`] (`lmtrain_cpu::ops::conv1d_fold`): `dx += ` the
    /// columns of `dcol` folded back onto their rows, the taps of each element summed in order.
    pub fn conv1d_fold<T: KernelDtype>(
        &self,
        dx: &mut CudaViewMut<'_, T>,
        dcol: &CudaView<'_, T>,
        b: usize,
        t: usize,
        c: usize,
        k: usize,
    ) -> Result<()> {
        self.conv1d("conv1d_fold", dx, dcol, [b, t, c, k], [b * t * c, b * t * c * k])
    }

    /// One launch of `op` over its `lens[0]` outputs after checking both lengths.
    fn conv1d<T: KernelDtype>(
        &self,
        op: &'static str,
        out: &mut CudaViewMut<'_, T>,
        inp: &CudaView<'_, T>,
        dims: [usize; 4],
        lens: [usize; 2],
    ) -> Result<()> {
        if dims[3].is_multiple_of(2) {
            return Err(shape(op, format!("kernel size {} is not odd", dims[3])));
        }
        check_len(op, "output", out.len(), lens[0])?;
        check_len(op, "input", inp.len(), lens[1])?;
        if lens[0] == 0 {
            return Ok(());
        }
        to_i32(op, "b * t * c * k", lens[0].max(lens[1]))?;
        let [b, t, c, k] = dims.map(|d| d as i32);
        let mut l = Launch::new(self, format!("{op}_{}", T::SUFFIX))?;
        l.output(out).input(inp).scalar(&b).scalar(&t).scalar(&c).scalar(&k);
        // SAFETY: both buffers have the lengths the kernel indexes for (b, t, c, k) (checked),
        // the grid-stride loop's bound.
        unsafe { l.launch(elem_cfg(lens[0])) }
    }
}

//! Launch wrappers of `kernels/classifier.cu`, `embedding.cu`, `linear.cu`, `dropout.cu`, the
//! residual LayerNorm forward of `layernorm.cu` and the gradient norm of `adamw.cu`.
//!
//! Integer inputs (token ids, positions, labels, selected rows) come from the host, as in the
//! op interface: [`EmbeddingBatch`] and [`ClassifierRows`] validate them once per batch and
//! upload them (with the backward's buckets), so the kernels never see an index out of range.

use std::collections::BTreeMap;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig};
use lmtrain_backend::{Dropout, PaddingIdx};

use super::{ELEM_BLOCK, KernelDtype, ROW_BLOCK, SEG_ROWS, check_len, elem_cfg, rows_grid, to_i32};
use crate::launch::Launch;
use crate::{CudaDevice, Result, shape};

/// Target that marks a row without loss (PyTorch / Hugging Face `ignore_index`).
const IGNORE_INDEX: i32 = -100;
/// Threads per block of the classifier and of the norm kernels.
const RED_BLOCK: u32 = 256;

pub(super) fn upload_i32(dev: &CudaDevice, v: &[i32]) -> Result<CudaSlice<i32>> {
    // cudarc refuses empty copies; a one-element buffer stands in (never read).
    if v.is_empty() { dev.zeros::<i32>(1) } else { dev.upload(v) }
}

/// Rows grouped by key for a deterministic backward: `rows[start[k]..start[k + 1]]` are the
/// rows whose key is `keys[k]`, in increasing order.
struct Buckets {
    n: usize,
    /// The keys in bucket order, on the host (to find the bucket a backward skips).
    host_keys: Vec<i32>,
    start: CudaSlice<i32>,
    rows: CudaSlice<i32>,
    keys: CudaSlice<i32>,
}

impl Buckets {
    fn new(dev: &CudaDevice, keys: &[i32]) -> Result<Self> {
        let mut by_key: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
        for (row, &k) in keys.iter().enumerate() {
            by_key.entry(k).or_default().push(row as i32);
        }
        let mut start = vec![0i32];
        let (mut rows, mut ks) = (Vec::with_capacity(keys.len()), Vec::new());
        for (k, r) in by_key {
            ks.push(k);
            rows.extend_from_slice(&r);
            start.push(rows.len() as i32);
        }
        let (start, rows, keys) = (upload_i32(dev, &start)?, upload_i32(dev, &rows)?, upload_i32(dev, &ks)?);
        Ok(Self { n: ks.len(), host_keys: ks, start, rows, keys })
    }
}

/// Where the position of each token comes from.
#[derive(Clone, Copy, Debug)]
pub enum Positions<'a> {
    /// `pos_offset + t` for the token at sequence position `t` (GPT-2, BERT without ids).
    Offset(usize),
    /// One explicit position id per token (`[b, t]`), e.g. RoBERTa's padding-aware positions.
    Explicit(&'a [u32]),
    /// No position table (DeBERTa-v3, whose positions enter through its attention): nothing is
    /// added, and the position table arguments are `None`.
    None,
}

/// One batch of token ids (and positions, token types) on the device, validated against the
/// table sizes, with the buckets the deterministic embedding backward sums over.
pub struct EmbeddingBatch {
    n_tokens: usize,
    vocab: usize,
    n_pos: usize,
    n_types: usize,
    ids: CudaSlice<i32>,
    pos: Option<CudaSlice<i32>>,
    types: Option<CudaSlice<i32>>,
    tok_buckets: Buckets,
    pos_buckets: Option<Buckets>,
    type_buckets: Option<Buckets>,
}

impl EmbeddingBatch {
    /// Validates and uploads `ids` (`< vocab`), the positions (`< n_pos`; none with
    /// [`Positions::None`]) and the optional token types (`< n_types`), all `[b, t]` flattened.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dev: &CudaDevice,
        b: usize,
        t: usize,
        ids: &[u32],
        positions: Positions<'_>,
        types: Option<&[u32]>,
        vocab: usize,
        n_pos: usize,
        n_types: usize,
    ) -> Result<Self> {
        const OP: &str = "EmbeddingBatch";
        let n = b.checked_mul(t).ok_or_else(|| shape(OP, "b * t overflows"))?;
        to_i32(OP, "b * t", n)?;
        check_len(OP, "ids", ids.len(), n)?;
        let checked = |what: &str, v: &[u32], limit: usize| -> Result<Vec<i32>> {
            v.iter().map(|&x| if (x as usize) < limit { Ok(x as i32) } else { Err(shape(OP, format!("{what} {x} >= {limit}"))) }).collect()
        };
        let ids_i = checked("token id", ids, vocab)?;
        let pos_i = match positions {
            Positions::Offset(off) => {
                if off + t > n_pos {
                    return Err(shape(OP, format!("position {} >= {n_pos}", off + t - 1)));
                }
                Some((0..n).map(|i| (off + i % t) as i32).collect())
            }
            Positions::Explicit(p) => {
                check_len(OP, "position ids", p.len(), n)?;
                Some(checked("position id", p, n_pos)?)
            }
            Positions::None => None,
        };
        let types_i = match types {
            Some(ty) => {
                check_len(OP, "token type ids", ty.len(), n)?;
                Some(checked("token type id", ty, n_types)?)
            }
            None => None,
        };
        Ok(Self {
            n_tokens: n,
            vocab,
            n_pos,
            n_types,
            ids: upload_i32(dev, &ids_i)?,
            pos: pos_i.as_deref().map(|v| upload_i32(dev, v)).transpose()?,
            types: types_i.as_deref().map(|v| upload_i32(dev, v)).transpose()?,
            tok_buckets: Buckets::new(dev, &ids_i)?,
            pos_buckets: pos_i.as_deref().map(|v| Buckets::new(dev, v)).transpose()?,
            type_buckets: types_i.as_deref().map(|v| Buckets::new(dev, v)).transpose()?,
        })
    }
}

/// Selected rows of a logits matrix and their targets, validated and on the device.
pub struct ClassifierRows {
    n: usize,
    n_rows: usize,
    vocab: usize,
    rows: CudaSlice<i32>,
    targets: CudaSlice<i32>,
}

impl ClassifierRows {
    /// `rows[s]` (`< n_rows`, each at most once) is a row of a `[n_rows, vocab]` logits matrix
    /// with target `targets[s]` (`< vocab`, or -100 = ignored).
    pub fn new(dev: &CudaDevice, rows: &[u32], targets: &[i32], n_rows: usize, vocab: usize) -> Result<Self> {
        const OP: &str = "ClassifierRows";
        check_len(OP, "targets", targets.len(), rows.len())?;
        to_i32(OP, "vocab", vocab)?;
        let mut seen = vec![false; n_rows];
        let mut r_i = Vec::with_capacity(rows.len());
        for &r in rows {
            let r = r as usize;
            if r >= n_rows || std::mem::replace(&mut seen[r], true) {
                return Err(shape(OP, format!("row {r} is outside [0, {n_rows}) or selected twice")));
            }
            r_i.push(to_i32(OP, "row", r)?);
        }
        if let Some(&y) = targets.iter().find(|&&y| y != IGNORE_INDEX && (y < 0 || y as usize >= vocab)) {
            return Err(shape(OP, format!("target {y} outside the vocabulary {vocab}")));
        }
        Ok(Self { n: rows.len(), n_rows, vocab, rows: upload_i32(dev, &r_i)?, targets: upload_i32(dev, targets)? })
    }

    /// The same selection for every row `0..n_rows` (the LM head's case).
    pub fn all(dev: &CudaDevice, targets: &[i32], vocab: usize) -> Result<Self> {
        let rows: Vec<u32> = (0..targets.len() as u32).collect();
        Self::new(dev, &rows, targets, targets.len(), vocab)
    }

    /// Number of selected rows.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether no row is selected.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// Floats of scratch [`CudaDevice::bias_backward`] needs.
pub fn bias_backward_scratch(rows: usize, cols: usize) -> usize {
    cols * rows.div_ceil(SEG_ROWS)
}

/// Blocks of the first stage of the gradient norm: a function of `n` only (determinism).
fn norm_blocks(n: usize) -> usize {
    n.div_ceil(RED_BLOCK as usize * 8).clamp(1, 1024)
}

/// f64 scratch elements [`CudaDevice::grad_norm`] needs for `n` gradients.
pub fn grad_norm_scratch(n: usize) -> usize {
    norm_blocks(n)
}

impl CudaDevice {
    /// Fused classifier over the selected rows of `logits` (`[n_rows, vocab]`): softmax,
    /// cross-entropy against the targets (-100 ignored) and, with `dloss = Some(g)`,
    /// `dlogits = g * (softmax - onehot)` written in place (ignored rows become 0, rows not
    /// selected are untouched) — `lmtrain_cpu::ops::cross_entropy` on those rows. `losses`
    /// (one per selected row) gets the row losses and `total[0]` their sum (f64, summed in a
    /// fixed order).
    pub fn classifier<T: KernelDtype>(
        &self,
        logits: &mut CudaViewMut<'_, T>,
        losses: &mut CudaViewMut<'_, f32>,
        total: &mut CudaViewMut<'_, f64>,
        sel: &ClassifierRows,
        dloss: Option<f32>,
    ) -> Result<()> {
        const OP: &str = "classifier";
        check_len(OP, "logits", logits.len(), sel.n_rows * sel.vocab)?;
        check_len(OP, "losses", losses.len(), sel.n)?;
        check_len(OP, "total", total.len(), 1)?;
        let (vocab, n) = (to_i32(OP, "vocab", sel.vocab)?, to_i32(OP, "rows", sel.n)?);
        let (g, write) = (dloss.unwrap_or(0.0), i32::from(dloss.is_some()));
        if sel.n > 0 {
            let cfg = LaunchConfig { grid_dim: (sel.n as u32, 1, 1), block_dim: (RED_BLOCK, 1, 1), shared_mem_bytes: 0 };
            let (rows, targets) = (sel.rows.as_view(), sel.targets.as_view());
            let mut l = Launch::new(self, format!("classifier_{}", T::SUFFIX))?;
            l.output(logits).output(losses).input(&rows).input(&targets);
            l.scalar(&vocab).scalar(&g).scalar(&write);
            // SAFETY: block s reads rows[s] < n_rows and targets[s] in [0, vocab) or -100 (both
            // validated by ClassifierRows) and touches that row's vocab elements of logits
            // (n_rows * vocab, checked) and losses[s] (n, checked).
            unsafe { l.launch(cfg) }?;
        }
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (RED_BLOCK, 1, 1), shared_mem_bytes: 0 };
        let lv = losses.as_view();
        let mut l = Launch::new(self, "classifier_loss_sum_f32".to_string())?;
        l.output(total).input(&lv).scalar(&n);
        // SAFETY: reads losses[0..n) (checked length n) and writes total[0] (length 1).
        unsafe { l.launch(cfg) }
    }

    /// `out[n] = wte[ids[n]] (+ wpe[pos[n]]) (+ tte[types[n]])` for the batch's tokens; `wpe`
    /// must be given exactly when the batch has positions, `tte` when it has token types.
    pub fn embedding_forward<T: KernelDtype>(
        &self,
        out: &mut CudaViewMut<'_, T>,
        batch: &EmbeddingBatch,
        wte: &CudaView<'_, T>,
        wpe: Option<&CudaView<'_, T>>,
        tte: Option<&CudaView<'_, T>>,
    ) -> Result<()> {
        const OP: &str = "embedding_forward";
        let n = batch.n_tokens;
        if n == 0 {
            return Ok(());
        }
        if out.len() % n != 0 {
            return Err(shape(OP, "out is not [tokens, C]"));
        }
        let c = out.len() / n;
        check_len(OP, "wte", wte.len(), batch.vocab * c)?;
        if wpe.is_some() != batch.pos.is_some() {
            return Err(shape(OP, "position table and positions go together"));
        }
        if let Some(p) = wpe {
            check_len(OP, "wpe", p.len(), batch.n_pos * c)?;
        }
        if tte.is_some() != batch.types.is_some() {
            return Err(shape(OP, "token-type table and token-type ids go together"));
        }
        if let Some(tt) = tte {
            check_len(OP, "tte", tt.len(), batch.n_types * c)?;
        }
        let (n_i, c_i) = (to_i32(OP, "tokens", n)?, to_i32(OP, "C", c)?);
        let (ids, pos) = (batch.ids.as_view(), batch.pos.as_ref().map(|p| p.as_view()));
        let types = batch.types.as_ref().map(|t| t.as_view());
        let mut l = Launch::new(self, format!("embedding_fwd_{}", T::SUFFIX))?;
        l.output(out).input(&ids).optional_input(pos.as_ref()).optional_input(types.as_ref());
        l.input(wte).optional_input(wpe).optional_input(tte);
        l.scalar(&n_i).scalar(&c_i);
        // SAFETY: out has n*c elements; ids/pos/types were validated against vocab/n_pos/n_types
        // and the tables have exactly that many rows of c (checked).
        unsafe { l.launch(elem_cfg(n * c)) }
    }

    /// Embedding backward, deterministic: `dwte[ids[n]] += dout[n]`, `dwpe[pos[n]] += dout[n]`
    /// (given exactly when the batch has positions), `dtte[types[n]] += dout[n]` (table gradients of type `G`: f32, or bf16 with bf16 `dout`,
    /// the sum in f32 rounded once), each table row summed by one thread per channel over its
    /// tokens in order (no atomics).
    pub fn embedding_backward<T: KernelDtype, G: KernelDtype>(
        &self,
        dwte: &mut CudaViewMut<'_, G>,
        dwpe: Option<&mut CudaViewMut<'_, G>>,
        dtte: Option<&mut CudaViewMut<'_, G>>,
        dout: &CudaView<'_, T>,
        batch: &EmbeddingBatch,
    ) -> Result<()> {
        self.embedding_backward_skipping(dwte, dwpe, dtte, dout, batch, PaddingIdx::default())
    }

    /// [`CudaDevice::embedding_backward`] that leaves out the tokens whose id is `pad.word`
    /// (from the word table's gradient) and whose position is `pad.position` (from the position
    /// table's): `torch.nn.Embedding(padding_idx=...)`, as `lmtrain_cpu::ops::embedding_backward`.
    pub fn embedding_backward_skipping<T: KernelDtype, G: KernelDtype>(
        &self,
        dwte: &mut CudaViewMut<'_, G>,
        dwpe: Option<&mut CudaViewMut<'_, G>>,
        dtte: Option<&mut CudaViewMut<'_, G>>,
        dout: &CudaView<'_, T>,
        batch: &EmbeddingBatch,
        pad: PaddingIdx,
    ) -> Result<()> {
        const OP: &str = "embedding_backward";
        let n = batch.n_tokens;
        if n == 0 {
            return Ok(());
        }
        if dout.len() % n != 0 {
            return Err(shape(OP, "dout is not [tokens, C]"));
        }
        let c = dout.len() / n;
        if G::SUFFIX != "f32" && G::SUFFIX != T::SUFFIX {
            return Err(shape(OP, format!("{} table gradients need {} dout", G::SUFFIX, G::SUFFIX)));
        }
        check_len(OP, "dwte", dwte.len(), batch.vocab * c)?;
        if dwpe.is_some() != batch.pos.is_some() {
            return Err(shape(OP, "position gradient and positions go together"));
        }
        if let Some(d) = &dwpe {
            check_len(OP, "dwpe", d.len(), batch.n_pos * c)?;
        }
        if dtte.is_some() != batch.types.is_some() {
            return Err(shape(OP, "token-type gradient and token-type ids go together"));
        }
        let c_i = to_i32(OP, "C", c)?;
        if let Some(d) = &dtte {
            check_len(OP, "dtte", d.len(), batch.n_types * c)?;
        }
        self.embedding_bwd_table(dwte, dout, &batch.tok_buckets, c, c_i, pad.word)?;
        if let (Some(d), Some(bk)) = (dwpe, batch.pos_buckets.as_ref()) {
            self.embedding_bwd_table(d, dout, bk, c, c_i, pad.position)?;
        }
        if let (Some(d), Some(bk)) = (dtte, batch.type_buckets.as_ref()) {
            self.embedding_bwd_table(d, dout, bk, c, c_i, None)?;
        }
        Ok(())
    }

    /// One table of [`CudaDevice::embedding_backward`] (its length checked by the caller),
    /// without the bucket of key `skip`: the buckets before it and after it are two launches.
    fn embedding_bwd_table<T: KernelDtype, G: KernelDtype>(
        &self,
        table: &mut CudaViewMut<'_, G>,
        dout: &CudaView<'_, T>,
        bk: &Buckets,
        c: usize,
        c_i: i32,
        skip: Option<u32>,
    ) -> Result<()> {
        let skipped = skip.and_then(|k| i32::try_from(k).ok()).and_then(|k| bk.host_keys.binary_search(&k).ok());
        match skipped {
            Some(k) => {
                self.embedding_bwd_buckets(table, dout, bk, 0..k, c, c_i)?;
                self.embedding_bwd_buckets(table, dout, bk, k + 1..bk.n, c, c_i)
            }
            None => self.embedding_bwd_buckets(table, dout, bk, 0..bk.n, c, c_i),
        }
    }

    /// The buckets `range` of one table of [`CudaDevice::embedding_backward`].
    fn embedding_bwd_buckets<T: KernelDtype, G: KernelDtype>(
        &self,
        table: &mut CudaViewMut<'_, G>,
        dout: &CudaView<'_, T>,
        bk: &Buckets,
        range: std::ops::Range<usize>,
        c: usize,
        c_i: i32,
    ) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (range.len() as u32, c.div_ceil(ELEM_BLOCK as usize) as u32, 1),
            block_dim: (ELEM_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // block i handles bucket range.start + i: its start/end (start has n + 1 entries) and key
        let (start, rows, keys) = (bk.start.slice(range.start..), bk.rows.as_view(), bk.keys.slice(range.start..));
        // f32 table gradients: embedding_bwd_<dout type>; bf16 ones: embedding_bwd_bf16_grad_bf16
        let kernel = match G::SUFFIX {
            "f32" => format!("embedding_bwd_{}", T::SUFFIX),
            g => format!("embedding_bwd_{}_grad_{g}", T::SUFFIX),
        };
        let mut l = Launch::new(self, kernel)?;
        l.output(table).input(dout).input(&start).input(&rows).input(&keys);
        l.scalar(&c_i);
        // SAFETY: bucket k lists token rows < n (dout has n*c, checked by the caller) whose key
        // is below the table's row count (validated by EmbeddingBatch), and the table holds
        // rows * c floats (checked by the caller).
        unsafe { l.launch(cfg) }
    }

    /// Residual add fused with LayerNorm: `residual = a + b` (stored in T), then
    /// `out = LayerNorm(residual)`, saving `mean`/`rstd` as [`CudaDevice::layernorm_forward`].
    #[allow(clippy::too_many_arguments)]
    pub fn residual_layernorm_forward<T: KernelDtype>(
        &self,
        residual: &mut CudaViewMut<'_, T>,
        out: &mut CudaViewMut<'_, T>,
        mean: &mut CudaViewMut<'_, f32>,
        rstd: &mut CudaViewMut<'_, f32>,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        weight: &CudaView<'_, T>,
        bias: &CudaView<'_, T>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "residual_layernorm_forward";
        let n = rows.checked_mul(cols).ok_or_else(|| shape(OP, "rows * cols overflows"))?;
        for (what, len) in [("residual", residual.len()), ("out", out.len()), ("a", a.len()), ("b", b.len())] {
            check_len(OP, what, len, n)?;
        }
        check_len(OP, "mean", mean.len(), rows)?;
        check_len(OP, "rstd", rstd.len(), rows)?;
        check_len(OP, "weight", weight.len(), cols)?;
        check_len(OP, "bias", bias.len(), cols)?;
        let (rows_i, cols_i) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
        if n == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig { grid_dim: (rows_grid(rows), 1, 1), block_dim: (ROW_BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut l = Launch::new(self, format!("residual_layernorm_fwd_{}", T::SUFFIX))?;
        l.output(residual).output(out).output(mean).output(rstd);
        l.input(a).input(b).input(weight).input(bias);
        l.scalar(&rows_i).scalar(&cols_i).scalar(&eps);
        // SAFETY: one warp per row < rows touches rows*cols elements of residual/out/a/b, rows of
        // mean/rstd and cols of weight/bias (all checked).
        unsafe { l.launch(cfg) }
    }

    /// `dbias += sum over rows of dout` (summed in f32, stored as `G`: f32, or bf16 rounded
    /// once), deterministic: `scratch` (at least [`bias_backward_scratch`]`(rows, cols)` floats)
    /// holds per-segment sums added in order.
    pub fn bias_backward<T: KernelDtype, G: KernelDtype>(
        &self,
        dbias: &mut CudaViewMut<'_, G>,
        scratch: &mut CudaViewMut<'_, f32>,
        dout: &CudaView<'_, T>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        const OP: &str = "bias_backward";
        let n = rows.checked_mul(cols).ok_or_else(|| shape(OP, "rows * cols overflows"))?;
        check_len(OP, "dout", dout.len(), n)?;
        check_len(OP, "dbias", dbias.len(), cols)?;
        let need = bias_backward_scratch(rows, cols);
        if scratch.len() < need {
            return Err(shape(OP, format!("scratch has {} floats, needs {need}", scratch.len())));
        }
        let (rows_i, cols_i) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
        if n == 0 {
            return Ok(());
        }
        let nseg = rows.div_ceil(SEG_ROWS);
        let seg_rows = SEG_ROWS as i32;
        let cfg = LaunchConfig {
            grid_dim: (nseg as u32, cols.div_ceil(ELEM_BLOCK as usize) as u32, 1),
            block_dim: (ELEM_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        {
            let mut part = scratch.slice_mut(0..need);
            let mut l = Launch::new(self, format!("bias_grad_partial_{}", T::SUFFIX))?;
            l.output(&mut part).input(dout);
            l.scalar(&rows_i).scalar(&cols_i).scalar(&seg_rows);
            // SAFETY: block (seg, y) reads rows [seg*SEG_ROWS, ..) < rows of dout (rows*cols,
            // checked) and writes part[seg*cols + c], c < cols, inside nseg*cols = need.
            unsafe { l.launch(cfg) }?;
        }
        let part = scratch.slice(0..need);
        self.column_sum(dbias, &part, nseg, cols, cols)
    }

    /// Global L2 norm of `grads` and the clipping factor, left on the device in `out`
    /// (`[norm, clip]`, clip = `min(1, max_norm / (norm + 1e-6))`, 1 when `max_norm <= 0`) for
    /// the AdamW kernels to read. Two stages with f64 sums in a fixed order: deterministic.
    pub fn grad_norm<T: KernelDtype>(
        &self,
        out: &mut CudaViewMut<'_, f32>,
        scratch: &mut CudaViewMut<'_, f64>,
        grads: &CudaView<'_, T>,
        max_norm: f32,
    ) -> Result<()> {
        const OP: &str = "grad_norm";
        check_len(OP, "out", out.len(), 2)?;
        let n = grads.len();
        let blocks = norm_blocks(n);
        if scratch.len() < blocks {
            return Err(shape(OP, format!("scratch has {} f64, needs {blocks}", scratch.len())));
        }
        let mut part = scratch.slice_mut(0..blocks);
        let n64 = n as u64;
        let cfg = |grid: usize| LaunchConfig { grid_dim: (grid as u32, 1, 1), block_dim: (RED_BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut l = Launch::new(self, format!("grad_norm_partial_{}", T::SUFFIX))?;
        l.output(&mut part).input(grads).scalar(&n64);
        // SAFETY: grid-stride over grads[0..n) (its length); block i writes part[i], i < blocks.
        unsafe { l.launch(cfg(blocks)) }?;
        let pv = part.as_view();
        let nb = blocks as i32;
        let mut l = Launch::new(self, "grad_norm_final_f32".to_string())?;
        l.output(out).input(&pv).scalar(&nb).scalar(&max_norm);
        // SAFETY: reads part[0..blocks) and writes out[0..2] (checked).
        unsafe { l.launch(cfg(1)) }
    }

    /// Inverted dropout in place: `x[i] *= d.factor(i)` (also its own backward), the mask of
    /// `lmtrain_cpu::ops::dropout_inplace`.
    pub fn dropout_inplace<T: KernelDtype>(&self, x: &mut CudaViewMut<'_, T>, d: Dropout) -> Result<()> {
        const OP: &str = "dropout_inplace";
        if !d.active() || x.is_empty() {
            return Ok(());
        }
        if d.p >= 1.0 {
            return Err(shape(OP, format!("dropout probability {} >= 1", d.p)));
        }
        let n = x.len();
        let n64 = n as u64;
        let mut l = Launch::new(self, format!("dropout_{}", T::SUFFIX))?;
        l.output(x).scalar(&n64).scalar(&d.p).scalar(&d.seed);
        // SAFETY: the kernel's loop bound is n = x.len().
        unsafe { l.launch(elem_cfg(n)) }
    }
}

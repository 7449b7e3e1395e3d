//! Shared by the training benchmarks: the CPU backend with every op timed, the options and the
//! per-op table. Included with `#[path = "support/mod.rs"] mod support;`.

#![allow(dead_code)] // each benchmark uses a subset

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lmtrain_backend::{
    AdamWStep, AttnShape, Backend, DecaySegment, DisentangledShape, Dropout, EmbeddingTables, Epilogue, GeluKind, GemmDesc, HeadGrads,
    HostBatch, Inputs, PaddingIdx, Result, Rows, StepStats,
};
use lmtrain_cpu::Cpu;

thread_local! {
    static TIMES: RefCell<BTreeMap<&'static str, (Duration, u64)>> = const { RefCell::new(BTreeMap::new()) };
}

/// Runs `f`, adding its time to op `name`.
pub fn timed<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    let t0 = Instant::now();
    let r = f();
    let dt = t0.elapsed();
    TIMES.with(|t| {
        let mut t = t.borrow_mut();
        let e = t.entry(name).or_default();
        e.0 += dt;
        e.1 += 1;
    });
    r
}

/// The CPU backend with every op timed (the model only sees a `Backend`).
pub struct Timed {
    /// The backend doing the work.
    pub inner: Cpu,
    /// The vocabulary (GEMMs with this dimension are reported as the head's).
    pub vocab: usize,
}

impl Backend for Timed {
    type Buf = Vec<f32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];
    type Master = Vec<f32>;
    type Batch = Inputs;
    type Stats = StepStats;
    type AttnState = Vec<f32>;
    const F32_COMPUTE: bool = true;

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        self.inner.alloc(len)
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
        self.inner.write(dst, data)
    }
    fn master_write(&self, m: &mut Vec<f32>, data: &[f32]) -> Result<()> {
        self.inner.master_write(m, data)
    }
    fn upload_batch(&self, batch: &HostBatch<'_>) -> Result<Inputs> {
        timed("upload", || self.inner.upload_batch(batch))
    }
    fn new_stats(&self) -> Result<StepStats> {
        self.inner.new_stats()
    }
    fn reset_stats(&self, stats: &mut StepStats) -> Result<()> {
        self.inner.reset_stats(stats)
    }
    fn read_stats(&self, stats: &StepStats) -> Result<StepStats> {
        self.inner.read_stats(stats)
    }
    fn alloc_attn_state(&self, s: AttnShape) -> Result<Vec<f32>> {
        self.inner.alloc_attn_state(s)
    }
    fn alloc_disentangled_state(&self, s: DisentangledShape) -> Result<Vec<f32>> {
        self.inner.alloc_disentangled_state(s)
    }
    fn fill_zero(&self, x: &mut [f32]) -> Result<()> {
        timed("fill_zero", || self.inner.fill_zero(x))
    }
    fn copy(&self, dst: &mut [f32], src: &[f32]) -> Result<()> {
        timed("copy", || self.inner.copy(dst, src))
    }
    fn residual_forward(&self, out: &mut [f32], a: &[f32], b: &[f32]) -> Result<()> {
        timed("residual", || self.inner.residual_forward(out, a, b))
    }
    fn add_inplace(&self, dst: &mut [f32], src: &[f32]) -> Result<()> {
        timed("residual", || self.inner.add_inplace(dst, src))
    }
    fn dropout_inplace(&self, x: &mut [f32], d: Dropout) -> Result<()> {
        timed("dropout", || self.inner.dropout_inplace(x, d))
    }
    fn gemm(&self, c: &mut [f32], a: &[f32], b: &[f32], d: &GemmDesc, epi: Epilogue<'_, '_, Self>) -> Result<()> {
        let s = d.shape;
        let name = if s.n == self.vocab || s.m == self.vocab || s.k == self.vocab {
            "gemm (tied lm_head)"
        } else {
            match epi {
                Epilogue::None => "gemm (layers)",
                Epilogue::Bias(_) => "gemm + bias (layers)",
                Epilogue::BiasGelu { .. } => "gemm + bias + gelu (layers)",
            }
        };
        let epi = match epi {
            Epilogue::None => Epilogue::None,
            Epilogue::Bias(b) => Epilogue::Bias(b),
            Epilogue::BiasGelu { bias, kind, pre } => Epilogue::BiasGelu { bias, kind, pre },
        };
        timed(name, || self.inner.gemm(c, a, b, d, epi))
    }
    fn bias_backward(&self, dbias: &mut [f32], dout: &[f32], rows: usize, cols: usize) -> Result<()> {
        timed("bias", || self.inner.bias_backward(dbias, dout, rows, cols))
    }
    #[allow(clippy::too_many_arguments)]
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
        timed("layernorm", || self.inner.layernorm_forward(out, mean, rstd, inp, weight, bias, rows, cols, eps))
    }
    #[allow(clippy::too_many_arguments)]
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
        timed("layernorm", || self.inner.layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, cols))
    }
    fn gelu_forward(&self, out: &mut [f32], inp: &[f32], kind: GeluKind) -> Result<()> {
        timed("gelu", || self.inner.gelu_forward(out, inp, kind))
    }
    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32], kind: GeluKind) -> Result<()> {
        timed("gelu", || self.inner.gelu_backward(dinp, inp, dout, kind))
    }
    fn tanh_forward(&self, out: &mut [f32], inp: &[f32]) -> Result<()> {
        timed("gelu", || self.inner.tanh_forward(out, inp))
    }
    fn tanh_backward(&self, dinp: &mut [f32], out: &[f32], dout: &[f32]) -> Result<()> {
        timed("gelu", || self.inner.tanh_backward(dinp, out, dout))
    }
    fn embedding_forward(&self, out: &mut [f32], tables: EmbeddingTables<&[f32]>, batch: &Inputs, c: usize) -> Result<()> {
        timed("embedding", || self.inner.embedding_forward(out, tables, batch, c))
    }
    fn embedding_backward(
        &self,
        grads: EmbeddingTables<&mut [f32]>,
        dout: &[f32],
        batch: &Inputs,
        c: usize,
        pad: PaddingIdx,
    ) -> Result<()> {
        timed("embedding", || self.inner.embedding_backward(grads, dout, batch, c, pad))
    }
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut [f32],
        st: &mut Vec<f32>,
        qkv: &[f32],
        s: AttnShape,
        causal: bool,
        batch: &Inputs,
        d: Dropout,
    ) -> Result<()> {
        timed("attention", || self.inner.attention_forward(out, st, qkv, s, causal, batch, d))
    }
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: &mut [f32],
        dout: &[f32],
        qkv: &[f32],
        out: &[f32],
        st: &Vec<f32>,
        s: AttnShape,
        causal: bool,
        batch: &Inputs,
        d: Dropout,
    ) -> Result<()> {
        timed("attention", || self.inner.attention_backward(dqkv, dout, qkv, out, st, s, causal, batch, d))
    }
    #[allow(clippy::too_many_arguments)]
    fn attention_cached(
        &self,
        out: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        start: usize,
        n: usize,
        h: usize,
        hs: usize,
    ) -> Result<()> {
        timed("attention", || self.inner.attention_cached(out, q, k, v, start, n, h, hs))
    }
    #[allow(clippy::too_many_arguments)]
    fn disentangled_attention_forward(
        &self,
        out: &mut [f32],
        state: &mut Vec<f32>,
        qkv: &[f32],
        pos_key: Option<&[f32]>,
        pos_query: Option<&[f32]>,
        s: DisentangledShape,
        batch: &Inputs,
        d: Dropout,
    ) -> Result<()> {
        timed("attention", || self.inner.disentangled_attention_forward(out, state, qkv, pos_key, pos_query, s, batch, d))
    }
    #[allow(clippy::too_many_arguments)]
    fn disentangled_attention_backward(
        &self,
        dqkv: &mut [f32],
        dpos_key: Option<&mut [f32]>,
        dpos_query: Option<&mut [f32]>,
        dout: &[f32],
        qkv: &[f32],
        pos_key: Option<&[f32]>,
        pos_query: Option<&[f32]>,
        state: &Vec<f32>,
        s: DisentangledShape,
        batch: &Inputs,
        d: Dropout,
    ) -> Result<()> {
        timed("attention", || {
            self.inner.disentangled_attention_backward(dqkv, dpos_key, dpos_query, dout, qkv, pos_key, pos_query, state, s, batch, d)
        })
    }
    fn zero_padded_rows(&self, x: &mut [f32], batch: &Inputs, cols: usize) -> Result<()> {
        timed("elementwise", || self.inner.zero_padded_rows(x, batch, cols))
    }
    fn conv1d_unfold(&self, out: &mut [f32], x: &[f32], b: usize, t: usize, c: usize, k: usize) -> Result<()> {
        timed("rows", || self.inner.conv1d_unfold(out, x, b, t, c, k))
    }
    fn conv1d_fold(&self, dx: &mut [f32], dcol: &[f32], b: usize, t: usize, c: usize, k: usize) -> Result<()> {
        timed("rows", || self.inner.conv1d_fold(dx, dcol, b, t, c, k))
    }
    fn gather_rows(&self, out: &mut [f32], x: &[f32], batch: &Inputs, cols: usize) -> Result<()> {
        timed("rows", || self.inner.gather_rows(out, x, batch, cols))
    }
    fn scatter_add_rows(&self, dx: &mut [f32], dsel: &[f32], batch: &Inputs, cols: usize) -> Result<()> {
        timed("rows", || self.inner.scatter_add_rows(dx, dsel, batch, cols))
    }
    #[allow(clippy::too_many_arguments)]
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
        timed("lm_head_loss (fused)", || self.inner.lm_head_loss(scratch, x, wte, bias, batch, rows, c, grad, stats, weight))
    }
    #[allow(clippy::too_many_arguments)]
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
        timed("adamw", || self.inner.adamw_update(params, master, grads, m, v, segments, step, stats))
    }
    fn global_norm(&self, grads: &[f32], stats: &mut StepStats) -> Result<()> {
        timed("global_norm", || self.inner.global_norm(grads, stats))
    }
}

/// Benchmark options.
pub struct Opts {
    pub steps: usize,
    pub warmup: usize,
    pub json: bool,
    pub breakdown_steps: usize,
    /// The model family (benchmarks with several).
    pub family: String,
}

/// `--steps N --warmup N --breakdown-steps N --json --family NAME`.
pub fn parse_opts() -> Opts {
    let mut o = Opts { steps: 10, warmup: 2, json: false, breakdown_steps: 3, family: "bert".into() };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> usize { it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} needs a number")) };
        match a.as_str() {
            "--steps" => o.steps = num("--steps"),
            "--warmup" => o.warmup = num("--warmup"),
            "--breakdown-steps" => o.breakdown_steps = num("--breakdown-steps"),
            "--json" => o.json = true,
            "--family" => o.family = it.next().unwrap_or_else(|| panic!("--family needs a name")),
            "--bench" => {} // passed by `cargo bench`
            other => panic!("unknown option {other} (use --steps N, --warmup N, --breakdown-steps N, --json, --family NAME)"),
        }
    }
    o
}

/// Times `steps` calls of `step` (after `warmup` untimed ones); returns each step's seconds.
pub fn time_steps(warmup: usize, steps: usize, mut step: impl FnMut(u64)) -> Vec<f64> {
    for s in 0..warmup {
        step(s as u64);
    }
    (0..steps)
        .map(|s| {
            let t0 = Instant::now();
            step((warmup + s) as u64);
            t0.elapsed().as_secs_f64()
        })
        .collect()
}

/// The median of `times`.
pub fn median(times: &[f64]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// One op's time per step.
pub struct OpTime {
    /// Its name.
    pub name: &'static str,
    /// Seconds per step.
    pub secs: f64,
    /// Calls per step.
    pub calls: u64,
}

/// Runs `step` once untimed, then `steps` times with every op of the [`Timed`] backend timed;
/// returns the step time and the ops, slowest first.
pub fn breakdown(steps: usize, mut step: impl FnMut(u64)) -> (f64, Vec<OpTime>) {
    step(0);
    TIMES.with(|t| t.borrow_mut().clear());
    let t0 = Instant::now();
    for s in 0..steps {
        step(1 + s as u64);
    }
    let total = t0.elapsed().as_secs_f64() / steps as f64;
    let mut rows: Vec<OpTime> = TIMES.with(|t| {
        t.borrow().iter().map(|(k, (d, n))| OpTime { name: k, secs: d.as_secs_f64() / steps as f64, calls: n / steps as u64 }).collect()
    });
    rows.sort_by(|a, b| b.secs.total_cmp(&a.secs));
    (total, rows)
}

/// Prints the per-op table on stderr.
pub fn print_breakdown(total: f64, rows: &[OpTime], steps: usize) {
    let accounted: f64 = rows.iter().map(|r| r.secs).sum();
    eprintln!("\nper-op time per training step ({steps} steps, timed backend; step {:.1} ms):", total * 1e3);
    eprintln!("{:<28} {:>10} {:>7} {:>8}", "op", "ms/step", "share", "calls");
    for r in rows {
        eprintln!("{:<28} {:>10.2} {:>6.1}% {:>8}", r.name, r.secs * 1e3, 100.0 * r.secs / total, r.calls);
    }
    eprintln!("{:<28} {:>10.2} {:>6.1}%", "(outside ops)", (total - accounted) * 1e3, 100.0 * (total - accounted) / total);
}

/// The ops as a JSON array.
pub fn ops_json(rows: &[OpTime]) -> String {
    let ops: Vec<String> = rows.iter().map(|r| format!("{{\"op\":\"{}\",\"ms_per_step\":{:.3}}}", r.name, r.secs * 1e3)).collect();
    format!("[{}]", ops.join(","))
}

/// AdamW as the trainer sets it up (weight decay 0.01 on the decay group).
pub fn new_opt<B: Backend, M: lmtrain_model::LanguageModel<B>>(model: &M) -> lmtrain_optim::AdamW<B> {
    use lmtrain_optim::{AdamW, AdamWConfig, decay_segments};
    let segs = decay_segments(model.param_infos().iter().map(|p| (p.offset, p.len, p.decay)), 0.01);
    AdamW::new(model.backend(), AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() }, model.params_to_host().unwrap(), segs)
        .unwrap()
}

/// One training step as the trainer does it: zero grads, forward+backward (dropout on), clip
/// to 1.0 + AdamW; returns the loss.
pub fn train_step<B: Backend, M: lmtrain_model::LanguageModel<B>>(
    model: &mut M,
    opt: &mut lmtrain_optim::AdamW<B>,
    input: &lmtrain_model::Input<'_>,
    step: u64,
) -> f32 {
    let mut stats = model.backend().new_stats().unwrap();
    model.zero_grad().unwrap();
    model.accumulate_gradients(input, Some(step), &mut stats).unwrap();
    let (backend, store) = model.parts_mut();
    let (params, grads) = store.params_and_grads_mut();
    opt.step(backend, B::view_mut(params), B::view(grads), 5e-5, 1.0, 1, &mut stats).unwrap();
    let loss = backend.read_stats(&stats).unwrap().loss as f32;
    assert!(loss.is_finite(), "loss {loss} at step {step}");
    loss
}

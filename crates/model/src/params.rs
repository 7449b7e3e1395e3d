//! Parameters declared once: a layer declares each tensor through a [`ParamBuilder`] path
//! (`p.pp("h.0").pp("attn")`), which records its Hugging Face name, shape, weight-decay flag and
//! initialiser, and hands back a [`ParamRef`]: the tensor's place in the ONE flat parameter
//! buffer, and the same place in the flat gradient buffer. Hugging Face import/export, the
//! optimizer's decay groups and initialisation all read that one table.

use std::cell::RefCell;
use std::rc::Rc;

use lmtrain_backend::{Backend, OptimizerState, TrainingState};
use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::ModelError;

/// How a tensor is initialised for a model trained from scratch (Hugging Face's `_init_weights`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All zeros (biases, LayerNorm bias).
    Zeros,
    /// All ones (LayerNorm weight).
    Ones,
    /// Normal(0, std).
    Normal(f64),
    /// Normal(0, std) with one row (a padding index, `[rows, cols]` tensors) set to zero.
    NormalZeroRow {
        /// Standard deviation.
        std: f64,
        /// The zeroed row.
        row: usize,
    },
    /// A fixed sinusoidal position table (DistilBERT `sinusoidal_pos_embds`).
    Sinusoidal,
}

/// One named tensor inside a model's flat parameter buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    /// Hugging Face parameter name (e.g. `transformer.h.0.attn.c_attn.weight`).
    pub name: String,
    /// Shape as Hugging Face stores it.
    pub shape: Vec<usize>,
    /// First element in the flat buffer.
    pub offset: usize,
    /// Number of elements (product of `shape`).
    pub len: usize,
    /// Whether weight decay applies (false for biases and LayerNorm weights, as HF Trainer).
    pub decay: bool,
    /// Initialiser for a model trained from scratch.
    pub init: Init,
}

/// A tensor's (or several adjacent tensors') place in the flat parameter and gradient buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamRef {
    /// First element.
    pub offset: usize,
    /// Elements.
    pub len: usize,
}

/// Declares parameters under a name prefix; [`ParamBuilder::pp`] descends one path level.
/// Tensors land in the flat buffer in declaration order.
#[derive(Clone)]
pub struct ParamBuilder {
    prefix: String,
    table: Rc<RefCell<Vec<ParamInfo>>>,
}

impl Default for ParamBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ParamBuilder {
    /// An empty table at the root path.
    pub fn new() -> Self {
        ParamBuilder { prefix: String::new(), table: Rc::default() }
    }

    /// The builder one level down: names become `prefix.name.…`.
    pub fn pp(&self, name: impl AsRef<str>) -> ParamBuilder {
        let name = name.as_ref();
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        ParamBuilder { prefix, table: self.table.clone() }
    }

    /// Declares `prefix.name` with its shape, decay flag and initialiser.
    pub fn tensor(&self, name: &str, shape: &[usize], decay: bool, init: Init) -> ParamRef {
        let mut table = self.table.borrow_mut();
        let offset = table.last().map_or(0, |p| p.offset + p.len);
        let len = shape.iter().product();
        let full = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        table.push(ParamInfo { name: full, shape: shape.to_vec(), offset, len, decay, init });
        ParamRef { offset, len }
    }

    /// A weight that decays.
    pub fn weight(&self, name: &str, shape: &[usize], init: Init) -> ParamRef {
        self.tensor(name, shape, true, init)
    }

    /// A bias: zeros, no decay.
    pub fn bias(&self, name: &str, len: usize) -> ParamRef {
        self.tensor(name, &[len], false, Init::Zeros)
    }

    /// The table declared so far.
    pub fn finish(self) -> Vec<ParamInfo> {
        self.table.borrow().clone()
    }
}

/// Two adjacent refs as one (declared back to back).
pub fn join(a: ParamRef, b: ParamRef) -> ParamRef {
    assert_eq!(a.offset + a.len, b.offset, "joined parameters are adjacent");
    ParamRef { offset: a.offset, len: a.len + b.len }
}

/// Host values of a table, drawn from its initialisers in declaration order (one xoshiro256++
/// stream; zeros and ones draw nothing).
pub fn init_params(infos: &[ParamInfo], seed: u64) -> Vec<f32> {
    let total = infos.last().map_or(0, |p| p.offset + p.len);
    let mut host = vec![0f32; total];
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    for p in infos {
        let dst = &mut host[p.offset..p.offset + p.len];
        match p.init {
            Init::Zeros => {}
            Init::Ones => dst.fill(1.0),
            Init::Normal(std) => fill_normal(dst, std, &mut rng),
            Init::NormalZeroRow { std, row } => {
                fill_normal(dst, std, &mut rng);
                let cols = p.shape.last().copied().unwrap_or(0);
                dst[row * cols..(row + 1) * cols].fill(0.0);
            }
            Init::Sinusoidal => fill_sinusoidal(dst, p.shape[0], p.shape[1]),
        }
    }
    host
}

/// Fill with normal(0, std) draws (Box-Muller on xoshiro256++).
fn fill_normal(dst: &mut [f32], std: f64, rng: &mut Xoshiro256PlusPlus) {
    let mut unit = || ((rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64); // (0, 1)
    for pair in dst.chunks_mut(2) {
        let r = (-2.0 * unit().ln()).sqrt();
        let th = std::f64::consts::TAU * unit();
        pair[0] = (r * th.cos() * std) as f32;
        if let Some(y) = pair.get_mut(1) {
            *y = (r * th.sin() * std) as f32;
        }
    }
}

/// HF `create_sinusoidal_embeddings`: even columns `sin(pos / 10000^(2i/dim))`, odd columns the
/// cosine of the same angle.
pub fn fill_sinusoidal(dst: &mut [f32], rows: usize, dim: usize) {
    for pos in 0..rows {
        for j in 0..dim {
            let angle = pos as f64 / 10000f64.powf(2.0 * (j / 2) as f64 / dim as f64);
            dst[pos * dim + j] = if j % 2 == 0 { angle.sin() } else { angle.cos() } as f32;
        }
    }
}

/// The flat parameter and gradient buffers of a model on a backend, with their table.
pub struct ParamStore<B: Backend> {
    infos: Vec<ParamInfo>,
    params: B::Buf,
    grads: B::Buf,
}

impl<B: Backend> ParamStore<B> {
    /// Uploads `host` (laid out as `infos`) and allocates zero gradients.
    pub fn new(backend: &B, infos: Vec<ParamInfo>, host: Vec<f32>) -> Result<Self, ModelError> {
        let total = infos.last().map_or(0, |p| p.offset + p.len);
        if host.len() != total {
            return Err(ModelError::Config(format!("{} parameters given, the config needs {total}", host.len())));
        }
        let params = backend.from_host(host)?;
        let grads = backend.alloc(total)?;
        Ok(ParamStore { infos, params, grads })
    }

    /// Every parameter tensor.
    pub fn infos(&self) -> &[ParamInfo] {
        &self.infos
    }
    /// Total parameters.
    pub fn len(&self) -> usize {
        B::buf_len(&self.params)
    }
    /// Whether the model has no parameters.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The parameter buffer.
    pub fn params(&self) -> &B::Buf {
        &self.params
    }
    /// The parameter buffer, writable.
    pub fn params_mut(&mut self) -> &mut B::Buf {
        &mut self.params
    }
    /// The gradient buffer.
    pub fn grads(&self) -> &B::Buf {
        &self.grads
    }
    /// Parameters (writable) and gradients, for an optimizer step.
    pub fn params_and_grads_mut(&mut self) -> (&mut B::Buf, &B::Buf) {
        (&mut self.params, &self.grads)
    }
    /// Overwrites the parameters with `host` (same layout, e.g. a checkpoint's), in place.
    pub fn set_params(&mut self, be: &B, host: &[f32]) -> Result<(), ModelError> {
        if host.len() != self.len() {
            return Err(ModelError::Config(format!("{} parameters given, the model has {}", host.len(), self.len())));
        }
        Ok(be.write(B::view_mut(&mut self.params), host)?)
    }
    /// Moves the parameters and gradients into the backend's training state
    /// ([`Backend::alloc_training_state`]: on a device, one allocation with the optimizer's
    /// state) and returns that optimizer state. The parameters become `master` (their f32
    /// values, rounded to the compute dtype); the gradients restart at zero. The old buffers are
    /// freed first, so the peak is the training state alone.
    pub fn into_training(&mut self, be: &B, master: Vec<f32>) -> Result<OptimizerState<B>, ModelError> {
        if master.len() != self.len() {
            return Err(ModelError::Config(format!("{} parameters given, the model has {}", master.len(), self.len())));
        }
        self.params = be.alloc(0)?;
        self.grads = be.alloc(0)?;
        let TrainingState { params, grads, optimizer } = be.alloc_training_state(master)?;
        self.params = params;
        self.grads = grads;
        Ok(optimizer)
    }
    /// Set every gradient to zero.
    pub fn zero_grad(&mut self, be: &B) -> Result<(), ModelError> {
        Ok(be.fill_zero(B::view_mut(&mut self.grads))?)
    }
    /// Parameters (read) and gradients (write), for a backward pass.
    pub fn split(&mut self) -> (Weights<'_, B>, Grads<'_, B>) {
        (Weights { all: B::view(&self.params) }, Grads { all: B::view_mut(&mut self.grads) })
    }
    /// Parameters, for a forward pass.
    pub fn weights(&self) -> Weights<'_, B> {
        Weights { all: B::view(&self.params) }
    }
}

/// Shared views of parameters by [`ParamRef`].
pub struct Weights<'a, B: Backend + 'a> {
    all: B::View<'a>,
}

impl<'a, B: Backend> Weights<'a, B> {
    /// The view of one tensor (or adjacent group).
    pub fn get(&self, r: ParamRef) -> B::View<'a> {
        B::slice(self.all, r.offset, r.len)
    }
}

/// Exclusive views of gradients by [`ParamRef`], one (or two) at a time.
pub struct Grads<'a, B: Backend + 'a> {
    all: B::ViewMut<'a>,
}

impl<'a, B: Backend> Grads<'a, B> {
    /// The gradient of one tensor.
    pub fn get(&mut self, r: ParamRef) -> B::ViewMut<'_> {
        B::slice_mut(B::reborrow(&mut self.all), r.offset, r.len)
    }
    /// The gradients of two tensors at once (`a` before `b` in the buffer).
    pub fn pair(&mut self, a: ParamRef, b: ParamRef) -> (B::ViewMut<'_>, B::ViewMut<'_>) {
        let mut v = self.many(&[a, b]);
        let second = v.pop().expect("two views");
        (v.pop().expect("two views"), second)
    }
    /// The gradients of several disjoint tensors at once, given in buffer order.
    pub fn many(&mut self, refs: &[ParamRef]) -> Vec<B::ViewMut<'_>> {
        let mut rest = B::reborrow(&mut self.all);
        let mut at = 0;
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            assert!(r.offset >= at, "Grads::many takes disjoint tensors in buffer order");
            let (_, tail) = B::split_at_mut(rest, r.offset - at);
            let (view, tail) = B::split_at_mut(tail, r.len);
            out.push(view);
            rest = tail;
            at = r.offset + r.len;
        }
        out
    }
}

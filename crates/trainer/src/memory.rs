//! The device memory a training run needs, measured rather than estimated by formula: the model
//! is built on a [`Meter`] (a backend that only counts bytes) and runs one training step there
//! (forward, backward and the AdamW update, through the same code as on a real backend), so
//! the count follows every change to the models by construction.
//!
//! [`measure`] splits the peak of that step into parameters, gradients, optimizer state (AdamW's
//! two moments, plus the f32 master weights on a bf16 backend) and activations (everything the
//! step allocates beyond those: saved activations, their gradients, attention state, the
//! logits scratch and the batch's inputs). Activations grow with the batch; [`largest_batch`]
//! finds the largest that fits a budget by measuring.

use lmtrain_backend::Backend;
use lmtrain_backend::meter::{Meter, Profile};
use lmtrain_model::{IGNORE_INDEX, Input, LanguageModel, ModelError, Objective};
use lmtrain_optim::{AdamW, AdamWConfig, decay_segments};

use crate::TrainerError;

/// Bytes of each part of a training run's device memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// The parameters at the compute dtype.
    pub params: u64,
    /// The gradients at the compute dtype.
    pub grads: u64,
    /// AdamW's moments (f32), and the f32 master weights when the compute dtype is not f32.
    pub optimizer: u64,
    /// What one training step allocates beyond the above, at its peak.
    pub activations: u64,
}

impl Needs {
    /// Everything but the activations (independent of the batch).
    pub fn fixed(&self) -> u64 {
        self.params + self.grads + self.optimizer
    }
    /// The sum of the parts.
    pub fn total(&self) -> u64 {
        self.fixed() + self.activations
    }
}

/// The micro-batch a step is measured at.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepShape {
    /// Rows (the per-device batch).
    pub b: usize,
    /// Positions per row (the block size).
    pub t: usize,
    /// Masked LM: the probability that a position is labelled (`--mlm-probability`).
    pub mlm_probability: f64,
    /// The MLPs recompute their GELU output in the backward (`--recompute`).
    pub recompute: bool,
}

impl StepShape {
    /// Positions a batch of this shape labels: all of them for a causal LM; for a masked LM the
    /// mean of independent draws at `mlm_probability` plus 6 standard deviations (at most every
    /// position), so the measured head scratch holds the fullest batch a run is expected to draw.
    pub fn labelled(&self, objective: Objective) -> usize {
        let n = self.b * self.t;
        match objective {
            Objective::CausalLm => n,
            Objective::MaskedLm => {
                let p = self.mlm_probability.clamp(0.0, 1.0);
                let mean = n as f64 * p;
                ((mean + 6.0 * (mean * (1.0 - p)).sqrt()).ceil() as usize).min(n)
            }
        }
    }
}

/// Builds a model of `config` on a meter of compute dtype `F32` (attention state and head
/// temporaries as `profile` says),
/// creates AdamW for it and runs one training step at `shape`: the bytes of each part.
/// Nothing is allocated for the parameters on the host beyond untouched zero pages.
pub fn measure<M, const F32: bool>(config: &M::Config, profile: impl Into<Profile>, shape: StepShape) -> Result<Needs, TrainerError>
where
    M: LanguageModel<Meter<F32>>,
{
    let meter = Meter::<F32>::new(profile);
    let n_params = M::param_table(config)?.last().map_or(0, |p| p.offset + p.len);
    let mut model = M::from_params(meter.clone(), config.clone(), vec![0.0; n_params])?;
    model.set_recompute(shape.recompute);
    let segments = decay_segments(model.param_infos().iter().map(|p| (p.offset, p.len, p.decay)), 0.0);
    let master = model.params_to_host()?;
    let (be, store) = model.parts_mut();
    let state = store.into_training(be, master)?;
    let (params, grads) = (store.params().bytes(), store.grads().bytes());
    let mut optimizer = AdamW::with_state(AdamWConfig::default(), state, segments);
    let fixed = meter.live();
    let optimizer_bytes = fixed - params - grads;

    let n = shape.b * shape.t;
    let input_ids = vec![0u32; n];
    let mut labels = vec![IGNORE_INDEX; n];
    labels[..shape.labelled(M::OBJECTIVE)].fill(0);
    let input = Input { b: shape.b, t: shape.t, input_ids: &input_ids, labels: Some(&labels), attention_mask: None, token_type_ids: None };
    meter.reset_peak();
    let mut stats = model.backend().new_stats().map_err(ModelError::from)?;
    model.zero_grad()?;
    model.accumulate_gradients(&input, Some(0), &mut stats)?;
    let (be, store) = model.parts_mut();
    let (p, g) = store.params_and_grads_mut();
    optimizer.step(be, Meter::<F32>::view_mut(p), Meter::<F32>::view(g), 1e-3, 1.0, 1, &mut stats)?;
    Ok(Needs { params, grads, optimizer: optimizer_bytes, activations: meter.peak() - fixed })
}

/// The largest batch `b <= upto` whose `total(b)` is at most `budget`, by bisection (`total`
/// grows with the batch); `None` when not even batch 1 fits.
pub fn largest_batch<E>(upto: usize, budget: u64, mut total: impl FnMut(usize) -> Result<u64, E>) -> Result<Option<usize>, E> {
    if upto == 0 || total(1)? > budget {
        return Ok(None);
    }
    let (mut lo, mut hi) = (1, upto); // total(lo) fits
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if total(mid)? <= budget { lo = mid } else { hi = mid - 1 }
    }
    Ok(Some(lo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmtrain_backend::meter::AttnSaves;
    use lmtrain_model::bert::{Bert, BertConfig};
    use lmtrain_model::gpt2::{Gpt2, Gpt2Config};

    fn gpt2() -> Gpt2Config {
        Gpt2Config { vocab_size: 96, n_positions: 32, n_embd: 16, n_layer: 2, n_head: 2, ..Gpt2Config::default() }
    }

    fn shape(b: usize) -> StepShape {
        StepShape { b, t: 16, mlm_probability: 0.15, recompute: false }
    }

    #[test]
    fn parameters_gradients_and_moments_are_their_element_widths() {
        let cfg = gpt2();
        let n = Gpt2::<Meter<true>>::param_table(&cfg).unwrap().last().map(|p| (p.offset + p.len) as u64).unwrap();
        let f32 = measure::<Gpt2<Meter<true>>, true>(&cfg, AttnSaves::Probabilities, shape(2)).unwrap();
        assert_eq!((f32.params, f32.grads, f32.optimizer), (4 * n, 4 * n, 8 * n));
        // bf16: 2-byte parameters and gradients, f32 moments and master weights
        let bf16 = measure::<Gpt2<Meter<false>>, false>(&cfg, AttnSaves::RowLogSumExp, shape(2)).unwrap();
        assert_eq!((bf16.params, bf16.grads, bf16.optimizer), (2 * n, 2 * n, 12 * n));
        assert!(bf16.activations < f32.activations, "{bf16:?} vs {f32:?}");
    }

    #[test]
    fn causal_activations_grow_linearly_with_the_batch() {
        let act = |b| measure::<Gpt2<Meter<true>>, true>(&gpt2(), AttnSaves::Probabilities, shape(b)).unwrap().activations;
        let (a1, a2, a3, a8) = (act(1), act(2), act(3), act(8));
        assert!(a2 > a1);
        assert_eq!(a3 - a2, a2 - a1);
        assert_eq!(a8 - a1, 7 * (a2 - a1));
    }

    #[test]
    fn a_masked_lm_is_measured_with_its_fullest_expected_batch() {
        let cfg = BertConfig {
            vocab_size: 64,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            max_position_embeddings: 32,
            ..BertConfig::default()
        };
        let s = shape(8);
        // 128 positions at 15%: 19.2 + 6 * 4.04 -> 44 labelled
        assert_eq!(s.labelled(Objective::MaskedLm), 44);
        assert_eq!(s.labelled(Objective::CausalLm), 128);
        assert_eq!(StepShape { mlm_probability: 1.0, ..s }.labelled(Objective::MaskedLm), 128);
        let m = measure::<Bert<Meter<true>>, true>(&cfg, AttnSaves::Probabilities, s).unwrap();
        let n = Bert::<Meter<true>>::param_table(&cfg).unwrap().last().map(|p| (p.offset + p.len) as u64).unwrap();
        assert_eq!(m.params, 4 * n);
        assert!(m.activations > 0);
    }

    #[test]
    fn the_largest_batch_is_found_by_bisection() {
        let total = |b: usize| Ok::<u64, ()>(1000 + 100 * b as u64);
        assert_eq!(largest_batch(64, 1000 + 100 * 37, total), Ok(Some(37)));
        assert_eq!(largest_batch(64, 1000 + 100 * 37 + 99, total), Ok(Some(37)));
        assert_eq!(largest_batch(16, 1_000_000, total), Ok(Some(16)));
        assert_eq!(largest_batch(16, 1099, total), Ok(None));
        assert_eq!(largest_batch(1, 1100, total), Ok(Some(1)));
    }
}

//! Text generation with the model's KV cache: greedy decoding, or sampling with temperature,
//! top-k and top-p (applied in that order, as Hugging Face's logits warpers are).

use lmtrain_backend::Backend;
use lmtrain_model::gpt2::Gpt2;
use lmtrain_model::{LanguageModel, ModelError};
use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decoding {
    /// Always the most likely token.
    Greedy,
    /// Sample from the warped distribution.
    Sample {
        /// Divides the logits (> 0).
        temperature: f32,
        /// Keep only the `top_k` most likely tokens (0 = all).
        top_k: usize,
        /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0 = all).
        top_p: f32,
        /// Seed of the sampler.
        seed: u64,
    },
}

/// Picks next tokens from logits.
pub struct Sampler {
    decoding: Decoding,
    rng: Xoshiro256PlusPlus,
}

impl Sampler {
    /// A sampler for the given decoding.
    pub fn new(decoding: Decoding) -> Self {
        let seed = match decoding {
            Decoding::Sample { seed, .. } => seed,
            Decoding::Greedy => 0,
        };
        Self { decoding, rng: Xoshiro256PlusPlus::seed_from_u64(seed) }
    }

    /// The next token for `logits` (one row, `vocab` long).
    pub fn next(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            // First index of the maximum, as torch.argmax.
            let mut best = 0;
            for (i, &l) in logits.iter().enumerate() {
                if l > logits[best] {
                    best = i;
                }
            }
            best as u32
        };
        let Decoding::Sample { temperature, top_k, top_p, .. } = self.decoding else {
            return argmax();
        };
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / temperature)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if top_k > 0 {
            cand.truncate(top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        if top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let z: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= z);
        }
        // 53 random bits -> uniform in [0, 1).
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let mut cum = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if u < cum {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// Continues `prompt` by up to `max_new_tokens` tokens (fewer when `stop` is produced or the
/// context `n_positions` is full). Returns only the new tokens.
pub fn generate<B: Backend>(
    model: &mut Gpt2<B>,
    prompt: &[u32],
    max_new_tokens: usize,
    decoding: Decoding,
    stop: Option<u32>,
) -> Result<Vec<u32>, ModelError> {
    let n_positions = model.config().n_positions;
    let budget = max_new_tokens.min(n_positions.saturating_sub(prompt.len()));
    let mut out = Vec::with_capacity(budget);
    if prompt.is_empty() || budget == 0 {
        return Ok(out);
    }
    let mut sampler = Sampler::new(decoding);
    let mut cache = model.new_kv_cache(prompt.len() + budget)?;
    let mut logits = model.forward_incremental(&mut cache, prompt)?;
    for i in 0..budget {
        let next = sampler.next(&logits);
        out.push(next);
        if Some(next) == stop || i + 1 == budget {
            break;
        }
        logits = model.forward_incremental(&mut cache, &[next])?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        let mut s = Sampler::new(Decoding::Greedy);
        assert_eq!(s.next(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(Decoding::Sample { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 7 });
        for _ in 0..20 {
            assert_eq!(s.next(&[0.0, 0.5, 2.0, 1.9]), 2);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ~ [0.665, 0.245, 0.090]: top_p 0.8 keeps tokens 0 and 1 only.
        let logits = [2.0f32, 1.0, 0.0];
        let mut s = Sampler::new(Decoding::Sample { temperature: 1.0, top_k: 0, top_p: 0.8, seed: 3 });
        let mut seen = [0usize; 3];
        for _ in 0..2000 {
            seen[s.next(&logits) as usize] += 1;
        }
        assert_eq!(seen[2], 0);
        assert!(seen[0] > seen[1] && seen[1] > 300, "{seen:?}");
    }

    #[test]
    fn sampling_is_seeded() {
        let d = Decoding::Sample { temperature: 1.5, top_k: 0, top_p: 1.0, seed: 11 };
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = {
            let mut s = Sampler::new(d);
            (0..30).map(|_| s.next(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(d);
            (0..30).map(|_| s.next(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().any(|&x| x != a[0]), "temperature 1.5 over 50 tokens varies");
    }
}

//! Masked-language-modeling masks, with Hugging Face `DataCollatorForLanguageModeling` semantics.
//!
//! Every non-special, non-padding token is chosen with probability `mlm_probability`; a chosen
//! token's label is its id, every other label is -100. Of the chosen tokens a fraction
//! `mask_replace_prob` becomes the mask token, a fraction `random_replace_prob` (of ALL chosen
//! tokens) becomes a token drawn uniformly from `0..vocab_size`, the rest stay unchanged. HF
//! draws the random split among the tokens not masked with probability
//! `random_replace_prob / (1 - mask_replace_prob)`; one uniform number per token split at
//! `mask_replace_prob` and `mask_replace_prob + random_replace_prob` gives the same distribution.
//! Like HF (`torch.randint(len(tokenizer))`), the random token may be any id, a special one too.
//!
//! Whole-word masking chooses words (a word is a token whose word-start flag is set plus the
//! tokens after it whose flag is not), each with probability `mlm_probability`, and labels all
//! of its tokens (HF 5.x: a Bernoulli draw at each word's first token, spread to the word). The
//! mask / random / unchanged split is then drawn per token as configured; `transformers` 5.x
//! itself allows no random replacement with whole words and forces every chosen token to the
//! mask token, which [`MaskingConfig::hf_effective`] reproduces. It only reads the flags, so
//! WordPiece `##` pieces, byte-level BPE and SentencePiece `▁` word starts all work.
//!
//! Masks are counter-based: every decision about position `i` of a block is a hash of
//! (block key, `i`), and the block key is a hash of (seed, step, micro-batch, row) for training
//! ([`train_key`]) or of (seed, block index) for evaluation ([`eval_key`]). A resumed run
//! therefore masks exactly as an uninterrupted one, each step sees fresh masks, and evaluation
//! masks are the same at every evaluation and in every run with that seed ([`EvalMasks`]).

use lmtrain_backend::{IGNORE_INDEX, mix64};

/// How tokens are chosen and replaced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskingConfig {
    /// Probability that an eligible token (or word, with `whole_word`) is chosen (HF 0.15).
    pub mlm_probability: f64,
    /// Fraction of the chosen tokens replaced by the mask token (HF 0.8).
    pub mask_replace_prob: f64,
    /// Fraction of the chosen tokens replaced by a random token (HF 0.1).
    pub random_replace_prob: f64,
    /// Choose whole words (all sub-tokens together) instead of single tokens.
    pub whole_word: bool,
}

impl Default for MaskingConfig {
    fn default() -> Self {
        MaskingConfig { mlm_probability: 0.15, mask_replace_prob: 0.8, random_replace_prob: 0.1, whole_word: false }
    }
}

/// A masking setting that cannot be used (the message names the flag and the value).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct MaskingError(pub String);

impl MaskingConfig {
    /// Checks the probabilities: `mlm_probability` in (0, 1], the two replacement fractions in
    /// [0, 1] with a sum of at most 1.
    pub fn validate(&self) -> Result<(), MaskingError> {
        let p = self.mlm_probability;
        if !(p > 0.0 && p <= 1.0) {
            return Err(MaskingError(format!(
                "--mlm-probability must be greater than 0 and at most 1 (got {p}); with 0 no token would carry a label"
            )));
        }
        for (flag, v) in [("--mask-replace-prob", self.mask_replace_prob), ("--random-replace-prob", self.random_replace_prob)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(MaskingError(format!("{flag} must be between 0 and 1 (got {v})")));
            }
        }
        let sum = self.mask_replace_prob + self.random_replace_prob;
        if sum > 1.0 + 1e-12 {
            return Err(MaskingError(format!(
                "--mask-replace-prob ({}) plus --random-replace-prob ({}) is {sum}, more than 1; they are fractions of the same chosen tokens",
                self.mask_replace_prob, self.random_replace_prob
            )));
        }
        Ok(())
    }

    /// The setting `transformers` 5.x actually applies: with whole-word masking
    /// `DataCollatorForLanguageModeling` does not support random replacement and sets
    /// `mask_replace_prob = 1`, `random_replace_prob = 0` (every chosen token becomes the mask
    /// token), warning when the user asked for less than 1. Returns the adjusted setting and, when
    /// something changed, that warning. Without whole words the setting is returned unchanged.
    pub fn hf_effective(&self) -> (MaskingConfig, Option<String>) {
        if !self.whole_word || (self.mask_replace_prob == 1.0 && self.random_replace_prob == 0.0) {
            return (*self, None);
        }
        let warn = format!(
            "whole-word masking replaces every chosen token by the mask token (as transformers does): \
             --mask-replace-prob {} / --random-replace-prob {} become 1 / 0",
            self.mask_replace_prob, self.random_replace_prob
        );
        (MaskingConfig { mask_replace_prob: 1.0, random_replace_prob: 0.0, ..*self }, Some(warn))
    }
}

/// The tokenizer facts masking needs.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskVocab {
    special: Vec<u32>,
    mask_id: u32,
    vocab_size: u32,
}

impl MaskVocab {
    /// `special`: every special token id, never chosen (HF: `tokenizer.all_special_ids`, i.e.
    /// `[CLS]`, `[SEP]`, `[PAD]`, `[MASK]` and `[UNK]` too; `<s>`, `</s>`, `<pad>`, `<mask>`,
    /// `<unk>` for RoBERTa); `mask_id`: the mask token (added to the special set);
    /// `vocab_size`: random replacements are drawn from `0..vocab_size` (HF: `len(tokenizer)`,
    /// added tokens included).
    pub fn new(special: &[u32], mask_id: u32, vocab_size: u32) -> Result<MaskVocab, MaskingError> {
        if vocab_size == 0 {
            return Err(MaskingError("the vocabulary is empty".into()));
        }
        if mask_id >= vocab_size {
            return Err(MaskingError(format!("mask token id {mask_id} is outside the vocabulary of {vocab_size} tokens")));
        }
        let mut special = special.to_vec();
        special.push(mask_id);
        special.sort_unstable();
        special.dedup();
        Ok(MaskVocab { special, mask_id, vocab_size })
    }

    /// The mask token id.
    pub fn mask_id(&self) -> u32 {
        self.mask_id
    }

    /// The vocabulary size random tokens are drawn from.
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// Whether `id` is a special token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.binary_search(&id).is_ok()
    }
}

/// One block to mask.
#[derive(Clone, Copy, Debug)]
pub struct BlockInput<'a> {
    /// Token ids.
    pub tokens: &'a [u32],
    /// One flag per token, true where the token starts a word (the block store's word starts).
    /// Required for whole-word masking, ignored otherwise.
    pub word_starts: Option<&'a [bool]>,
    /// HF `attention_mask` (1 = token, 0 = padding); padding is never chosen. `None`: no padding.
    pub attention_mask: Option<&'a [u8]>,
}

/// What happened to a block (decisions, not observations: a random replacement may draw the
/// original token or the mask token).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MaskCounts {
    /// Tokens that could be chosen (not special, not padding).
    pub eligible: usize,
    /// Tokens chosen (labels set).
    pub chosen: usize,
    /// Chosen tokens replaced by the mask token.
    pub masked: usize,
    /// Chosen tokens replaced by a random token.
    pub random: usize,
    /// Words chosen (whole-word masking only, else 0).
    pub words_chosen: usize,
    /// Words that could be chosen (whole-word masking only, else 0).
    pub words_eligible: usize,
}

impl MaskCounts {
    /// Adds another block's counts.
    pub fn add(&mut self, o: &MaskCounts) {
        self.eligible += o.eligible;
        self.chosen += o.chosen;
        self.masked += o.masked;
        self.random += o.random;
        self.words_chosen += o.words_chosen;
        self.words_eligible += o.words_eligible;
    }
}

const DOMAIN_TRAIN: u64 = 0x6d6c_6d5f_7472_6169; // "mlm_trai"
const DOMAIN_EVAL: u64 = 0x6d6c_6d5f_6576_616c; // "mlm_eval"
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn chain(mut h: u64, parts: &[u64]) -> u64 {
    for &p in parts {
        h = mix64(h ^ mix64(p.wrapping_mul(GOLDEN)));
    }
    h
}

/// The key of the block in row `row` of micro-batch `micro_batch` of optimizer step `step`
/// (0-based or 1-based, as long as the caller is consistent) of a run seeded with `seed`.
pub fn train_key(seed: u64, step: u64, micro_batch: u64, row: u64) -> u64 {
    chain(mix64(seed ^ DOMAIN_TRAIN), &[step, micro_batch, row])
}

/// The key of evaluation block `block_index` (its index in the evaluation set) for a run
/// seeded with `seed`: independent of the training step, so every evaluation masks alike.
pub fn eval_key(seed: u64, block_index: u64) -> u64 {
    chain(mix64(seed ^ DOMAIN_EVAL), &[block_index])
}

/// Draw `lane` about position `pos` of the block with key `key`.
#[inline]
fn draw(key: u64, pos: usize, lane: u64) -> u64 {
    mix64(key ^ mix64(((pos as u64) << 2 | lane).wrapping_mul(GOLDEN)))
}

/// A uniform number in [0, 1) with 53 random bits.
#[inline]
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

const LANE_CHOOSE: u64 = 0;
const LANE_SPLIT: u64 = 1;
const LANE_TOKEN: u64 = 2;

/// Masks one block: writes the model's input ids into `out_ids` and the labels (the original
/// id where chosen, [`IGNORE_INDEX`] elsewhere) into `out_labels`. Every decision about
/// position `i` is a function of `(key, i)` only (and, with whole words, of the position where
/// `i`'s word starts).
///
/// # Panics
/// If the slices' lengths differ from `input.tokens.len()`, or `cfg.whole_word` is set without
/// `input.word_starts` (check that the store has word-start flags before training).
pub fn mask_block(
    cfg: &MaskingConfig,
    vocab: &MaskVocab,
    input: BlockInput<'_>,
    key: u64,
    out_ids: &mut [u32],
    out_labels: &mut [i32],
) -> MaskCounts {
    let t = input.tokens.len();
    assert_eq!(out_ids.len(), t, "mask_block: out_ids length");
    assert_eq!(out_labels.len(), t, "mask_block: out_labels length");
    if let Some(a) = input.attention_mask {
        assert_eq!(a.len(), t, "mask_block: attention_mask length");
    }
    let starts = if cfg.whole_word {
        let s = input.word_starts.expect("whole-word masking needs word-start flags");
        assert_eq!(s.len(), t, "mask_block: word_starts length");
        Some(s)
    } else {
        None
    };
    let eligible = |i: usize| input.attention_mask.is_none_or(|a| a[i] != 0) && !vocab.is_special(input.tokens[i]);
    let m = cfg.mask_replace_prob;
    let mr = cfg.mask_replace_prob + cfg.random_replace_prob;
    let mut counts = MaskCounts::default();
    // whole words: whether the current word is chosen (decided at its first eligible token)
    let mut word_chosen = false;
    for i in 0..t {
        let tok = input.tokens[i];
        out_ids[i] = tok;
        out_labels[i] = IGNORE_INDEX;
        if !eligible(i) {
            continue;
        }
        counts.eligible += 1;
        let chosen = match starts {
            None => unit(draw(key, i, LANE_CHOOSE)) < cfg.mlm_probability,
            Some(s) => {
                // a word starts at a flagged token, at the block's first token and after any
                // ineligible (special / padding) token, so words never reach across those
                if i == 0 || s[i] || !eligible(i - 1) {
                    word_chosen = unit(draw(key, i, LANE_CHOOSE)) < cfg.mlm_probability;
                    counts.words_eligible += 1;
                    counts.words_chosen += word_chosen as usize;
                }
                word_chosen
            }
        };
        if !chosen {
            continue;
        }
        counts.chosen += 1;
        out_labels[i] = tok as i32;
        let u = unit(draw(key, i, LANE_SPLIT));
        if u < m {
            out_ids[i] = vocab.mask_id;
            counts.masked += 1;
        } else if u < mr {
            // Lemire's multiply-shift: uniform in 0..vocab_size up to a bias of vocab / 2^64
            out_ids[i] = ((draw(key, i, LANE_TOKEN) as u128 * vocab.vocab_size as u128) >> 64) as u32;
            counts.random += 1;
        }
    }
    counts
}

/// Masks a batch: `tokens` (and `word_starts` / `attention_mask` when given) hold rows of `t`
/// tokens, row-major; row `r` is masked with key `key_of_row(r)` (e.g.
/// `|r| train_key(seed, step, micro_batch, r as u64)`). Returns the totals.
///
/// # Panics
/// As [`mask_block`], or if the lengths are not the same multiple of `t`.
#[allow(clippy::too_many_arguments)]
pub fn mask_rows(
    cfg: &MaskingConfig,
    vocab: &MaskVocab,
    t: usize,
    tokens: &[u32],
    word_starts: Option<&[bool]>,
    attention_mask: Option<&[u8]>,
    key_of_row: impl Fn(usize) -> u64,
    out_ids: &mut [u32],
    out_labels: &mut [i32],
) -> MaskCounts {
    assert!(t > 0 && tokens.len().is_multiple_of(t), "mask_rows: {} tokens are not rows of {t}", tokens.len());
    let mut counts = MaskCounts::default();
    for r in 0..tokens.len() / t {
        let span = r * t..(r + 1) * t;
        let input = BlockInput {
            tokens: &tokens[span.clone()],
            word_starts: word_starts.map(|w| &w[span.clone()]),
            attention_mask: attention_mask.map(|a| &a[span.clone()]),
        };
        let c = mask_block(cfg, vocab, input, key_of_row(r), &mut out_ids[span.clone()], &mut out_labels[span]);
        counts.add(&c);
    }
    counts
}

/// Evaluation block `block_index` masked with the evaluation key of `seed` (see [`eval_key`]).
pub fn mask_eval_block(
    cfg: &MaskingConfig,
    vocab: &MaskVocab,
    input: BlockInput<'_>,
    seed: u64,
    block_index: u64,
    out_ids: &mut [u32],
    out_labels: &mut [i32],
) -> MaskCounts {
    mask_block(cfg, vocab, input, eval_key(seed, block_index), out_ids, out_labels)
}

/// The masked evaluation set, drawn once: `ids` and `labels` are `[n_blocks, t]`, block `i`
/// masked with [`eval_key`]`(seed, i)`. Building it twice (in this run, at every evaluation, or
/// in another run with the same seed) gives the same masks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalMasks {
    /// Tokens per block.
    pub t: usize,
    /// Masked input ids, row-major.
    pub ids: Vec<u32>,
    /// Labels, row-major ([`IGNORE_INDEX`] where not chosen).
    pub labels: Vec<i32>,
    /// Totals over the set.
    pub counts: MaskCounts,
}

impl EvalMasks {
    /// Masks the blocks `blocks` yields, in order (block `i` is the `i`-th item).
    pub fn build<'a>(
        cfg: &MaskingConfig,
        vocab: &MaskVocab,
        seed: u64,
        t: usize,
        blocks: impl IntoIterator<Item = BlockInput<'a>>,
    ) -> EvalMasks {
        let mut e = EvalMasks { t, ..Default::default() };
        for (i, b) in blocks.into_iter().enumerate() {
            assert_eq!(b.tokens.len(), t, "EvalMasks::build: block {i} has {} tokens, not {t}", b.tokens.len());
            e.ids.resize((i + 1) * t, 0);
            e.labels.resize((i + 1) * t, 0);
            let c = mask_eval_block(cfg, vocab, b, seed, i as u64, &mut e.ids[i * t..], &mut e.labels[i * t..]);
            e.counts.add(&c);
        }
        e
    }

    /// Blocks in the set.
    pub fn len(&self) -> usize {
        self.ids.len().checked_div(self.t).unwrap_or(0)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Block `i`: (masked ids, labels).
    pub fn block(&self, i: usize) -> (&[u32], &[i32]) {
        (&self.ids[i * self.t..(i + 1) * self.t], &self.labels[i * self.t..(i + 1) * self.t])
    }
}

#[cfg(test)]
mod tests {
    //! Statistical checks run on 256 blocks of 512 tokens (131,072 tokens, 124,759 eligible).
    //! Every rate is checked against a binomial 5-sigma bound: a count `k` of `n` trials with
    //! probability `p` must satisfy `|k - n p| <= 5 sqrt(n p (1 - p))` (for p = 0.15 over the
    //! 124,759 eligible tokens: 18,714 +- 631, a rate of 0.15 +- 0.0051; for the 80/10/10 split
    //! over the ~18.8k chosen tokens: 0.8 +- 0.015 and 0.1 +- 0.011; measured 0.1508, 0.8057,
    //! 0.0969, 0.0974). The draws are seeded, so the tests are deterministic; an unbiased masker
    //! fails a given check with probability 5.7e-7.
    use super::*;
    use rand_core::{Rng, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    const V: u32 = 30_522;
    const PAD: u32 = 0;
    const CLS: u32 = 101;
    const SEP: u32 = 102;
    const MASK: u32 = 103;
    const T: usize = 512;
    const BLOCKS: usize = 256;

    fn vocab() -> MaskVocab {
        MaskVocab::new(&[PAD, CLS, SEP, MASK], MASK, V).unwrap()
    }

    /// A synthetic store: documents `[CLS] words [SEP]` concatenated, words of 1-4 sub-tokens
    /// (ids 1000.. so no special ids), every 4th block ending in 0-100 padding positions.
    struct Corpus {
        tokens: Vec<u32>,
        starts: Vec<bool>,
        attn: Vec<u8>,
    }

    fn corpus() -> Corpus {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
        let (mut tokens, mut starts, mut attn) = (Vec::new(), Vec::new(), Vec::new());
        for b in 0..BLOCKS {
            let n_pad = if b % 4 == 3 { (rng.next_u32() % 101) as usize } else { 0 };
            let mut row = Vec::new();
            let mut srow = Vec::new();
            while row.len() < T - n_pad {
                if row.is_empty() || rng.next_u32() % 40 == 0 {
                    row.push(if row.is_empty() { CLS } else { SEP });
                    srow.push(true);
                    if row.len() < T - n_pad {
                        row.push(CLS);
                        srow.push(true);
                    }
                    continue;
                }
                let len = 1 + (rng.next_u32() % 4) as usize;
                for k in 0..len {
                    row.push(1000 + rng.next_u32() % (V - 1000));
                    srow.push(k == 0);
                }
            }
            row.truncate(T - n_pad);
            srow.truncate(T - n_pad);
            attn.extend(std::iter::repeat_n(1u8, row.len()));
            row.resize(T, PAD);
            srow.resize(T, true);
            attn.resize((b + 1) * T, 0);
            tokens.extend(row);
            starts.extend(srow);
        }
        Corpus { tokens, starts, attn }
    }

    impl Corpus {
        fn block(&self, b: usize) -> BlockInput<'_> {
            BlockInput {
                tokens: &self.tokens[b * T..(b + 1) * T],
                word_starts: Some(&self.starts[b * T..(b + 1) * T]),
                attention_mask: Some(&self.attn[b * T..(b + 1) * T]),
            }
        }
    }

    struct Masked {
        ids: Vec<u32>,
        labels: Vec<i32>,
        counts: MaskCounts,
    }

    fn mask_all(c: &Corpus, cfg: &MaskingConfig, seed: u64, step: u64) -> Masked {
        let mut m = Masked { ids: vec![0; BLOCKS * T], labels: vec![0; BLOCKS * T], counts: MaskCounts::default() };
        for b in 0..BLOCKS {
            let k = train_key(seed, step, (b / 8) as u64, (b % 8) as u64);
            let r = b * T..(b + 1) * T;
            let cnt = mask_block(cfg, &vocab(), c.block(b), k, &mut m.ids[r.clone()], &mut m.labels[r]);
            m.counts.add(&cnt);
        }
        m
    }

    /// `|k - n p| <= 5 sqrt(n p (1 - p))`, exact for p = 0 or 1.
    fn within_5_sigma(what: &str, k: usize, n: usize, p: f64) {
        let (k, n) = (k as f64, n as f64);
        let bound = 5.0 * (n * p * (1.0 - p)).sqrt();
        assert!(
            (k - n * p).abs() <= bound,
            "{what}: {k} of {n} (rate {:.5}) vs expected {p} (5-sigma bound on the count +-{bound:.1})",
            k / n
        );
    }

    fn eligible(c: &Corpus, i: usize) -> bool {
        c.attn[i] != 0 && !vocab().is_special(c.tokens[i])
    }

    /// Observed outcome counts over the chosen positions: (chosen, masked, random, unchanged),
    /// checking on the way that labels and ids are consistent and that no special / padding
    /// position is ever chosen.
    fn observe(c: &Corpus, m: &Masked) -> (usize, usize, usize, usize) {
        let (mut chosen, mut masked, mut random, mut kept) = (0, 0, 0, 0);
        for i in 0..BLOCKS * T {
            if !eligible(c, i) {
                assert_eq!(m.labels[i], IGNORE_INDEX, "special or padding position {i} chosen");
                assert_eq!(m.ids[i], c.tokens[i], "special or padding position {i} changed");
                continue;
            }
            if m.labels[i] == IGNORE_INDEX {
                assert_eq!(m.ids[i], c.tokens[i], "unchosen position {i} changed");
                continue;
            }
            assert_eq!(m.labels[i], c.tokens[i] as i32, "label of position {i} is the original id");
            chosen += 1;
            if m.ids[i] == MASK {
                masked += 1;
            } else if m.ids[i] == c.tokens[i] {
                kept += 1;
            } else {
                assert!(m.ids[i] < V);
                random += 1;
            }
        }
        (chosen, masked, random, kept)
    }

    #[test]
    fn validation_names_the_flag() {
        assert!(MaskingConfig::default().validate().is_ok());
        let d = MaskingConfig::default();
        for (cfg, flag) in [
            (MaskingConfig { mlm_probability: 0.0, ..d }, "--mlm-probability"),
            (MaskingConfig { mlm_probability: 1.5, ..d }, "--mlm-probability"),
            (MaskingConfig { mlm_probability: f64::NAN, ..d }, "--mlm-probability"),
            (MaskingConfig { mask_replace_prob: -0.1, ..d }, "--mask-replace-prob"),
            (MaskingConfig { random_replace_prob: f64::NAN, ..d }, "--random-replace-prob"),
            (MaskingConfig { mask_replace_prob: 0.9, random_replace_prob: 0.2, ..d }, "plus --random-replace-prob"),
        ] {
            let e = cfg.validate().unwrap_err().0;
            assert!(e.contains(flag), "{e}");
        }
        assert!(MaskingConfig { mask_replace_prob: 0.7, random_replace_prob: 0.3, ..d }.validate().is_ok());
        assert!(MaskingConfig { mlm_probability: 1.0, ..d }.validate().is_ok());
        assert!(MaskVocab::new(&[0], V, V).is_err());
        assert!(MaskVocab::new(&[0], 3, 0).is_err());
        assert!(MaskVocab::new(&[], MASK, V).unwrap().is_special(MASK), "the mask id is special");
    }

    #[test]
    fn hf_effective_forces_full_masking_with_whole_words() {
        let d = MaskingConfig::default();
        assert_eq!(d.hf_effective(), (d, None));
        let w = MaskingConfig { whole_word: true, ..d };
        let (e, warn) = w.hf_effective();
        assert_eq!((e.mask_replace_prob, e.random_replace_prob, e.mlm_probability), (1.0, 0.0, 0.15));
        assert!(warn.unwrap().contains("--mask-replace-prob 0.8"));
        let full = MaskingConfig { mask_replace_prob: 1.0, random_replace_prob: 0.0, ..w };
        assert_eq!(full.hf_effective(), (full, None));
    }

    #[test]
    fn token_masking_rates_default_split() {
        let c = corpus();
        let n_eligible = (0..BLOCKS * T).filter(|&i| eligible(&c, i)).count();
        assert!(n_eligible > 100_000, "{n_eligible}");
        assert!(c.attn.iter().filter(|&&a| a == 0).count() > 2000, "the corpus has padding");
        let cfg = MaskingConfig::default();
        let m = mask_all(&c, &cfg, 1234, 17);
        let (chosen, masked, random, kept) = observe(&c, &m);
        assert_eq!(m.counts.eligible, n_eligible);
        assert_eq!(m.counts.chosen, chosen);
        within_5_sigma("chosen / eligible", chosen, n_eligible, 0.15);
        within_5_sigma("mask / chosen", masked, chosen, 0.8);
        // a random replacement draws the original or the mask id with probability 2 / V: the
        // observed counts may differ from the decisions by a handful
        within_5_sigma("random / chosen", random, chosen, 0.1);
        within_5_sigma("unchanged / chosen", kept, chosen, 0.1);
        println!(
            "{n_eligible} eligible of {} tokens: chosen {chosen} ({:.4}), of those mask {:.4}, random {:.4}, unchanged {:.4}",
            BLOCKS * T,
            chosen as f64 / n_eligible as f64,
            masked as f64 / chosen as f64,
            random as f64 / chosen as f64,
            kept as f64 / chosen as f64
        );
        assert!(m.counts.masked <= masked && masked <= m.counts.masked + 10);
        assert!(random <= m.counts.random && m.counts.random <= random + 10);

        // no correlation between neighbours: P(chosen | left neighbour chosen) is p too
        let (mut pairs, mut both) = (0, 0);
        for i in 1..BLOCKS * T {
            if eligible(&c, i) && eligible(&c, i - 1) && m.labels[i - 1] != IGNORE_INDEX {
                pairs += 1;
                both += (m.labels[i] != IGNORE_INDEX) as usize;
            }
        }
        within_5_sigma("chosen | left neighbour chosen", both, pairs, 0.15);
        // the same rate at every position of the block (first and second half)
        for half in 0..2 {
            let idx = || (0..BLOCKS * T).filter(|i| (i % T) / (T / 2) == half && eligible(&c, *i));
            let n = idx().count();
            let k = idx().filter(|&i| m.labels[i] != IGNORE_INDEX).count();
            within_5_sigma("chosen rate in one half of the blocks", k, n, 0.15);
        }
        // random tokens are uniform over 0..V: mean V/2 with sd V / sqrt(12 n)
        let rnd: Vec<f64> = (0..BLOCKS * T)
            .filter(|&i| m.labels[i] != IGNORE_INDEX && m.ids[i] != MASK && m.ids[i] != c.tokens[i])
            .map(|i| m.ids[i] as f64)
            .collect();
        let mean = rnd.iter().sum::<f64>() / rnd.len() as f64;
        let sd = V as f64 / (12.0 * rnd.len() as f64).sqrt();
        assert!((mean - V as f64 / 2.0).abs() <= 5.0 * sd, "random token mean {mean}");
        let below_1000 = rnd.iter().filter(|&&x| x < 1000.0).count();
        within_5_sigma("random tokens below 1000 (ids of the corpus start at 1000)", below_1000, rnd.len(), 1000.0 / V as f64);
    }

    #[test]
    fn token_masking_rates_custom_and_edge_splits() {
        let c = corpus();
        let n_eligible = (0..BLOCKS * T).filter(|&i| eligible(&c, i)).count();
        for (p, mp, rp) in [(0.3, 0.5, 0.3), (0.15, 1.0, 0.0), (0.15, 0.0, 1.0), (0.2, 0.0, 0.0), (0.4, 0.6, 0.4), (1.0, 0.8, 0.1)] {
            let cfg = MaskingConfig { mlm_probability: p, mask_replace_prob: mp, random_replace_prob: rp, whole_word: false };
            let m = mask_all(&c, &cfg, 99, 3);
            let (chosen, masked, random, kept) = observe(&c, &m);
            let what = format!("p {p} mask {mp} random {rp}");
            within_5_sigma(&format!("{what}: chosen"), chosen, n_eligible, p);
            assert!(m.counts.masked + m.counts.random <= chosen);
            within_5_sigma(&format!("{what}: mask decisions"), m.counts.masked, chosen, mp);
            within_5_sigma(&format!("{what}: random decisions"), m.counts.random, chosen, rp);
            within_5_sigma(&format!("{what}: unchanged decisions"), chosen - m.counts.masked - m.counts.random, chosen, 1.0 - mp - rp);
            // observations: a random draw hits the original or the mask id with probability 2 / V
            let slack = m.counts.random / 1000 + 10;
            assert!(masked >= m.counts.masked && masked <= m.counts.masked + slack, "{what}: masked {masked}");
            assert!(random <= m.counts.random && random + slack >= m.counts.random, "{what}: random {random}");
            let want_kept = chosen - m.counts.masked - m.counts.random;
            assert!(kept >= want_kept && kept <= want_kept + slack, "{what}: unchanged {kept}");
        }
    }

    #[test]
    fn whole_words_are_never_split() {
        let c = corpus();
        for cfg in [
            MaskingConfig { whole_word: true, ..Default::default() },
            MaskingConfig { whole_word: true, ..Default::default() }.hf_effective().0,
        ] {
            let m = mask_all(&c, &cfg, 5, 11);
            let (chosen, masked, random, kept) = observe(&c, &m);
            // walk the words: a word is a flagged token and the unflagged ones after it
            let (mut words, mut words_chosen, mut multi) = (0, 0, 0);
            let mut i = 0;
            while i < BLOCKS * T {
                if !eligible(&c, i) {
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                while j < BLOCKS * T && j % T != 0 && !c.starts[j] && eligible(&c, j) {
                    j += 1;
                }
                let picked: Vec<bool> = (i..j).map(|k| m.labels[k] != IGNORE_INDEX).collect();
                assert!(picked.iter().all(|&x| x == picked[0]), "word at {i}..{j} split: {picked:?}");
                words += 1;
                words_chosen += picked[0] as usize;
                multi += (j - i > 1) as usize;
                i = j;
            }
            assert!(multi > 10_000, "the corpus has many multi-token words ({multi})");
            assert_eq!((m.counts.words_eligible, m.counts.words_chosen), (words, words_chosen));
            within_5_sigma("words chosen / words", words_chosen, words, 0.15);
            if cfg.mask_replace_prob == 1.0 {
                assert_eq!((masked, random, kept), (chosen, 0, 0));
            } else {
                within_5_sigma("whole words: mask / chosen tokens", m.counts.masked, chosen, 0.8);
                within_5_sigma("whole words: random / chosen tokens", m.counts.random, chosen, 0.1);
            }
        }
    }

    #[test]
    fn words_start_at_the_block_start_and_after_special_tokens() {
        // a block that starts inside a word, and a special token inside a (mis-flagged) word
        let tokens = [2000, 2001, 2002, SEP, 2003, 2004, 2005, PAD];
        let starts = [false, false, true, true, false, false, true, true];
        let attn = [1, 1, 1, 1, 1, 1, 1, 0];
        let cfg = MaskingConfig { mlm_probability: 0.5, whole_word: true, ..Default::default() };
        let mut seen = std::collections::HashSet::new();
        for step in 0..200 {
            let (mut ids, mut labels) = ([0u32; 8], [0i32; 8]);
            let input = BlockInput { tokens: &tokens, word_starts: Some(&starts), attention_mask: Some(&attn) };
            let cnt = mask_block(&cfg, &vocab(), input, train_key(1, step, 0, 0), &mut ids, &mut labels);
            assert_eq!(cnt.words_eligible, 4, "words [0, 1] [2] [4, 5] [6]");
            let ch: Vec<bool> = labels.iter().map(|&l| l != IGNORE_INDEX).collect();
            assert!(!ch[3] && !ch[7]);
            assert_eq!(ch[0], ch[1]);
            assert_eq!(ch[4], ch[5]);
            seen.insert((ch[0], ch[2], ch[4], ch[6]));
        }
        assert_eq!(seen.len(), 16, "the four words are chosen independently");
    }

    #[test]
    fn masks_are_a_pure_function_of_seed_and_position() {
        let c = corpus();
        let cfg = MaskingConfig::default();
        let a = mask_all(&c, &cfg, 42, 7);
        let b = mask_all(&c, &cfg, 42, 7);
        assert_eq!((&a.ids, &a.labels), (&b.ids, &b.labels), "same seed and step: same masks");
        for (seed, step) in [(42, 8), (43, 7)] {
            let d = mask_all(&c, &cfg, seed, step);
            let differ = (0..BLOCKS * T).filter(|&i| (a.labels[i] != IGNORE_INDEX) != (d.labels[i] != IGNORE_INDEX)).count();
            // two independent draws disagree on 2 p (1 - p) = 25.5% of the eligible positions
            let n = a.counts.eligible;
            within_5_sigma(&format!("seed {seed} step {step}: choices differing from seed 42 step 7"), differ, n, 2.0 * 0.15 * 0.85);
        }
        // keys differ in every coordinate, with no trivial collisions between them
        let keys = [
            train_key(1, 0, 0, 0),
            train_key(1, 1, 0, 0),
            train_key(1, 0, 1, 0),
            train_key(1, 0, 0, 1),
            train_key(2, 0, 0, 0),
            eval_key(1, 0),
            eval_key(1, 1),
        ];
        let set: std::collections::HashSet<u64> = keys.iter().copied().collect();
        assert_eq!(set.len(), keys.len());
        // a decision depends on the position, not on the other tokens of the block
        let mut tokens = c.tokens[..T].to_vec();
        let (mut i1, mut l1, mut i2, mut l2) = (vec![0; T], vec![0; T], vec![0; T], vec![0; T]);
        let t0 = tokens.clone();
        mask_block(&cfg, &vocab(), BlockInput { tokens: &t0, word_starts: None, attention_mask: None }, 9, &mut i1, &mut l1);
        tokens[100] = CLS;
        mask_block(&cfg, &vocab(), BlockInput { tokens: &tokens, word_starts: None, attention_mask: None }, 9, &mut i2, &mut l2);
        for i in (0..T).filter(|&i| i != 100) {
            assert_eq!((i1[i], l1[i]), (i2[i], l2[i]), "position {i}");
        }
        assert_eq!(l2[100], IGNORE_INDEX);
    }

    #[test]
    fn mask_rows_masks_each_row_with_its_key() {
        let c = corpus();
        let cfg = MaskingConfig { whole_word: true, ..Default::default() };
        let n = 16 * T;
        let (mut ids, mut labels) = (vec![0; n], vec![0; n]);
        let key = |r: usize| train_key(3, 4, (r / 8) as u64, (r % 8) as u64);
        let cnt = mask_rows(&cfg, &vocab(), T, &c.tokens[..n], Some(&c.starts[..n]), Some(&c.attn[..n]), key, &mut ids, &mut labels);
        let m = mask_all(&c, &cfg, 3, 4);
        assert_eq!((&ids[..], &labels[..]), (&m.ids[..n], &m.labels[..n]));
        assert!(cnt.chosen > 0 && cnt.words_chosen > 0);
    }

    #[test]
    fn eval_masks_are_fixed_across_steps_and_builds() {
        let c = corpus();
        let cfg = MaskingConfig::default();
        let blocks = || (0..BLOCKS).map(|b| c.block(b));
        let e1 = EvalMasks::build(&cfg, &vocab(), 77, T, blocks());
        let e2 = EvalMasks::build(&cfg, &vocab(), 77, T, blocks());
        assert_eq!(e1, e2);
        assert_eq!(e1.len(), BLOCKS);
        within_5_sigma("eval chosen / eligible", e1.counts.chosen, e1.counts.eligible, 0.15);
        let (ids, labels) = e1.block(3);
        let (mut i3, mut l3) = (vec![0; T], vec![0; T]);
        mask_eval_block(&cfg, &vocab(), c.block(3), 77, 3, &mut i3, &mut l3);
        assert_eq!((ids, labels), (&i3[..], &l3[..]));
        let other = EvalMasks::build(&cfg, &vocab(), 78, T, blocks());
        assert_ne!(e1.labels, other.labels, "another seed, other masks");
        // the evaluation masks are not any training step's masks
        let tr = mask_all(&c, &cfg, 77, 0);
        assert_ne!(tr.labels, e1.labels);
    }
}

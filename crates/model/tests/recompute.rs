//! `set_recompute(true)` (`train --recompute`) keeps no GELU output per layer and recomputes it
//! in the backward: the loss and every gradient must be the same bits as without it, for every
//! family (dropout on, padding inside the batch), and the activations must take less memory.

use lmtrain_backend::meter::{AttnSaves, Meter};
use lmtrain_cpu::Cpu;
use lmtrain_model::bert::BertConfig;
use lmtrain_model::deberta::{Deberta, DebertaV2Config};
use lmtrain_model::encoder::MaskedLm;
use lmtrain_model::gpt2::{Gpt2, Gpt2Config};
use lmtrain_model::{IGNORE_INDEX, Input, LanguageModel};

const B: usize = 2;
const T: usize = 11;
const VOCAB: usize = 97;

fn check<M: LanguageModel<Cpu>>(name: &str, make: impl Fn() -> M) {
    let ids: Vec<u32> = (0..B * T).map(|i| 3 + (i as u32 * 37 + 5) % (VOCAB as u32 - 3)).collect();
    let mask: Vec<bool> = (0..B * T).map(|i| i % T < T - 3 * (i / T)).collect();
    let labels: Vec<i32> = (0..B * T).map(|i| if mask[i] && i % 3 == 0 { ((i * 13) % VOCAB) as i32 } else { IGNORE_INDEX }).collect();
    let input = Input { b: B, t: T, input_ids: &ids, labels: Some(&labels), attention_mask: Some(&mask), token_type_ids: None };
    let run = |recompute: bool| {
        let mut m = make();
        m.set_recompute(recompute);
        // twice: the second step reuses the activations the first allocated
        let first = m.loss_and_gradients(&input, Some(7)).unwrap();
        let second = m.loss_and_gradients(&input, Some(8)).unwrap();
        (first, second, m.store().grads().to_vec())
    };
    let (kept, recomputed) = (run(false), run(true));
    assert!(kept.0.is_finite() && kept.2.iter().any(|&g| g != 0.0), "{name}: {kept:?}");
    assert_eq!(kept.0.to_bits(), recomputed.0.to_bits(), "{name}: first loss");
    assert_eq!(kept.1.to_bits(), recomputed.1.to_bits(), "{name}: second loss");
    let differ = kept.2.iter().zip(&recomputed.2).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differ, 0, "{name}: {differ} gradients differ with recomputation");
}

#[test]
fn recomputed_gelu_gives_the_same_bits_in_every_family() {
    let gpt2 = Gpt2Config { vocab_size: VOCAB, n_positions: 16, n_layer: 2, n_head: 2, n_embd: 16, ..Gpt2Config::default() };
    check("gpt2", || Gpt2::new(Cpu, gpt2.clone(), 1).unwrap());
    let bert = BertConfig {
        vocab_size: VOCAB,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 40,
        max_position_embeddings: 16,
        ..BertConfig::default()
    };
    check("bert", || MaskedLm::<Cpu, BertConfig>::new(Cpu, bert.clone(), 2).unwrap());
    let deberta = DebertaV2Config {
        vocab_size: VOCAB,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 40,
        max_position_embeddings: 16,
        ..DebertaV2Config::default()
    };
    check("deberta", || Deberta::new(Cpu, deberta.clone(), 3).unwrap());
}

#[test]
fn recomputation_keeps_one_gelu_output_instead_of_one_per_layer() {
    let cfg = Gpt2Config { vocab_size: VOCAB, n_positions: 16, n_layer: 4, n_head: 2, n_embd: 16, ..Gpt2Config::default() };
    let ids = vec![1u32; B * T];
    let labels = vec![1i32; B * T];
    let input = Input { b: B, t: T, input_ids: &ids, labels: Some(&labels), attention_mask: None, token_type_ids: None };
    let peak = |recompute: bool| {
        let meter = Meter::<true>::new(AttnSaves::Probabilities);
        let mut m = Gpt2::new(meter.clone(), cfg.clone(), 0).unwrap();
        m.set_recompute(recompute);
        m.loss_and_gradients(&input, Some(1)).unwrap();
        meter.peak()
    };
    let (kept, recomputed) = (peak(false), peak(true));
    // 4 layers keep b*t*4C f32 each; recomputation keeps one such buffer in the shared scratch
    let per_layer = (B * T * 4 * 16 * 4) as u64;
    assert_eq!(kept - recomputed, 3 * per_layer, "peak bytes {kept} kept vs {recomputed} recomputed");
}

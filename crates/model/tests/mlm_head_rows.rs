//! The masked-LM head runs on the labelled rows only; Hugging Face runs it on every position and
//! ignores the unlabelled ones. Both must give the same loss and the same gradient of every
//! parameter, for every family, with padding inside the batch and dropout on.

use lmtrain_backend::Rows;
use lmtrain_cpu::Cpu;
use lmtrain_model::bert::{BertConfig, RobertaConfig};
use lmtrain_model::deberta::{Deberta, DebertaV2Config, PosAttType};
use lmtrain_model::distilbert::DistilBertConfig;
use lmtrain_model::encoder::{EncoderConfig, MaskedLm};
use lmtrain_model::{IGNORE_INDEX, Input, LanguageModel};

const B: usize = 3;
const T: usize = 13;
const VOCAB: usize = 203;

/// A batch of 3 x 13 with the last rows padded and ~15% of the real positions labelled.
fn batch() -> (Vec<u32>, Vec<i32>, Vec<bool>, Vec<u32>) {
    let ids: Vec<u32> = (0..B * T).map(|i| 5 + (i as u32 * 53 + 7) % (VOCAB as u32 - 5)).collect();
    let mask: Vec<bool> = (0..B * T).map(|i| i % T < T - 2 * (i / T)).collect();
    let labels: Vec<i32> =
        (0..B * T).map(|i| if mask[i] && (i * 7919) % 100 < 15 { ((i * 31) % VOCAB) as i32 } else { IGNORE_INDEX }).collect();
    let types: Vec<u32> = (0..B * T).map(|i| u32::from(i % T >= T / 2)).collect();
    (ids, labels, mask, types)
}

/// max |a - b| / max |b|
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max);
    d / b.iter().map(|x| x.abs() as f64).fold(1e-30, f64::max)
}

fn check<C: EncoderConfig>(name: &str, config: C, token_types: bool) {
    check_model(
        name,
        |rows| {
            let mut m = MaskedLm::<Cpu, C>::new(Cpu, config.clone(), 11).unwrap();
            m.set_head_rows(rows);
            m
        },
        token_types,
    );
}

/// [`check`] for any family: `make` builds the model with its head on `rows`.
fn check_model<M: LanguageModel<Cpu>>(name: &str, make: impl Fn(Rows) -> M, token_types: bool) {
    let (ids, labels, mask, types) = batch();
    let labelled = labels.iter().filter(|&&y| y != IGNORE_INDEX).count();
    assert!(labelled > 2 && labelled < B * T / 4, "{name}: {labelled} labels");
    let input = Input {
        b: B,
        t: T,
        input_ids: &ids,
        labels: Some(&labels),
        attention_mask: Some(&mask),
        token_type_ids: token_types.then_some(&types[..]),
    };
    let run = |rows: Rows| {
        let mut m = make(rows);
        let loss = m.loss_and_gradients(&input, Some(3)).unwrap();
        let infos: Vec<_> = m.param_infos().to_vec();
        let grads = m.store().grads().to_vec();
        (loss, infos, grads)
    };
    let (loss_l, infos, grads_l) = run(Rows::Labelled);
    let (loss_a, _, grads_a) = run(Rows::All);
    assert!(loss_l.is_finite() && loss_l > 1.0, "{name}: loss {loss_l}");
    assert!(((loss_l - loss_a) / loss_a).abs() <= 1e-6, "{name}: loss {loss_l} (labelled rows) vs {loss_a} (all rows)");
    let largest = grads_a.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
    let mut worst = (0.0f64, String::new());
    for p in &infos {
        let (l, a) = (&grads_l[p.offset..p.offset + p.len], &grads_a[p.offset..p.offset + p.len]);
        assert!(a.iter().any(|&x| x != 0.0), "{name}: {} has no gradient", p.name);
        // A key bias adds a constant to a whole softmax row: its exact gradient is 0 and both
        // hold round-off, so it is measured against the model's largest gradient.
        // So does DeBERTa's c2p key bias (`q_i · b` is constant along row i); its content key
        // bias keeps only the small p2c share on top of such a cancelling part.
        let key_bias = ["key.bias", "k_lin.bias", "key_proj.bias"].iter().any(|n| p.name.ends_with(n));
        let max_abs = |x: &[f32]| x.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
        let e = if key_bias { max_abs(&l.iter().zip(a).map(|(x, y)| x - y).collect::<Vec<_>>()) / largest } else { rel_err(l, a) };
        if e > worst.0 {
            worst = (e, p.name.clone());
        }
    }
    eprintln!("{name}: loss {loss_l} vs {loss_a}, worst gradient {} {:.2e}", worst.1, worst.0);
    // Only the summation order differs (the zero rows of the unlabelled positions).
    assert!(worst.0 <= 1e-5, "{name}: gradient of {} differs by {:.2e} (relative)", worst.1, worst.0);
}

#[test]
fn bert_head_on_labelled_rows_equals_every_position() {
    let c = BertConfig {
        vocab_size: VOCAB,
        hidden_size: 36,
        num_hidden_layers: 2,
        num_attention_heads: 3,
        intermediate_size: 60,
        max_position_embeddings: 16,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        pad_token_id: Some(0),
        ..BertConfig::default()
    };
    check("bert", c, true);
}

#[test]
fn roberta_head_on_labelled_rows_equals_every_position() {
    let mut c = RobertaConfig::default();
    c.0.vocab_size = VOCAB;
    c.0.hidden_size = 36;
    c.0.num_hidden_layers = 1;
    c.0.num_attention_heads = 2;
    c.0.intermediate_size = 48;
    c.0.max_position_embeddings = T + 2;
    check("roberta", c, false);
}

#[test]
fn distilbert_head_on_labelled_rows_equals_every_position() {
    let c = DistilBertConfig {
        vocab_size: VOCAB,
        dim: 24,
        n_layers: 2,
        n_heads: 2,
        hidden_dim: 40,
        max_position_embeddings: 16,
        ..DistilBertConfig::default()
    };
    check("distilbert", c, false);
}

#[test]
fn deberta_head_on_labelled_rows_equals_every_position() {
    // the legacy head narrowing to embedding_size, c2p + p2c, the conv layer, token types
    let c = DebertaV2Config {
        vocab_size: VOCAB,
        hidden_size: 24,
        embedding_size: Some(16),
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 40,
        max_position_embeddings: 16,
        type_vocab_size: 2,
        relative_attention: true,
        position_buckets: 8,
        pos_att_type: Some(PosAttType::List(vec!["c2p".into(), "p2c".into()])),
        conv_kernel_size: 3,
        ..DebertaV2Config::default()
    };
    check_model(
        "deberta-v2",
        |rows| {
            let mut m = Deberta::<Cpu>::new(Cpu, c.clone(), 11).unwrap();
            m.set_head_rows(rows);
            m
        },
        true,
    );
}

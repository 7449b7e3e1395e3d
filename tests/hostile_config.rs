//! Every family's `validate` refuses sizes that would overflow or allocate absurdly, with the
//! model's size in the message, before anything is allocated; the parameter bound holds for
//! every family through `LanguageModel::check_memory`.

use lmtrain_cpu::Cpu;
use lmtrain_model::bert::{Bert, BertConfig, RobertaConfig};
use lmtrain_model::distilbert::DistilBertConfig;
use lmtrain_model::gpt2::Gpt2Config;
use lmtrain_model::{Footprint, LanguageModel, ModelConfig};

fn small() -> Gpt2Config {
    Gpt2Config { vocab_size: 101, n_positions: 32, n_embd: 48, n_layer: 2, n_head: 3, ..Gpt2Config::default() }
}

fn err(cfg: Gpt2Config) -> String {
    match cfg.validate() {
        Ok(()) => panic!("accepted: {cfg:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn absurd_sizes_are_refused_with_their_bound() {
    small().validate().unwrap();
    Gpt2Config::default().validate().unwrap();
    let cases: [(Gpt2Config, &str); 9] = [
        (Gpt2Config { n_head: 0, ..small() }, "n_head must be positive"),
        (Gpt2Config { n_embd: 1 << 31, ..small() }, "n_embd 2147483648 is too large: allowed 1 to 65536"),
        (Gpt2Config { n_embd: usize::MAX, ..small() }, "n_embd 18446744073709551615 is too large"),
        (Gpt2Config { vocab_size: 1_000_000_000, ..small() }, "vocab_size 1000000000 is too large: allowed 1 to 16777216"),
        (Gpt2Config { n_positions: 1 << 31, ..small() }, "n_positions 2147483648 is too large: allowed 1 to 1048576"),
        (Gpt2Config { n_positions: usize::MAX, ..small() }, "n_positions 18446744073709551615 is too large"),
        (Gpt2Config { n_inner: Some(1 << 40), ..small() }, "n_inner 1099511627776 is too large: allowed 1 to 262144"),
        (Gpt2Config { n_layer: 1_000_000_000, ..small() }, "n_layer 1000000000 is too large: allowed 1 to 4096"),
        (Gpt2Config { layer_norm_epsilon: f64::INFINITY, ..small() }, "layer_norm_epsilon inf must be a finite positive number"),
    ];
    for (cfg, want) in cases {
        let got = err(cfg);
        assert!(got.contains(want), "{got}");
    }
}

#[test]
fn a_model_whose_parameter_count_exceeds_the_bound_is_refused_with_its_size() {
    // Every size within its own bound, together ~4.4e12 parameters.
    let huge = Gpt2Config {
        vocab_size: 1 << 24,
        n_positions: 1 << 20,
        n_embd: 1 << 16,
        n_head: 64,
        n_layer: 1 << 12,
        n_inner: Some(1 << 18),
        ..Gpt2Config::default()
    };
    let got = err(huge);
    assert!(got.contains("parameters (") && got.contains("GB of f32 weights); at most 68719476736 are allowed"), "{got}");
    // GPT-2 XL (1.5B) is fine.
    Gpt2Config { n_embd: 1600, n_head: 25, n_layer: 48, ..Gpt2Config::default() }.validate().unwrap();
}

fn refused(cfg: &impl ModelConfig) -> String {
    match cfg.validate() {
        Ok(()) => panic!("accepted: {cfg:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn encoder_sizes_are_bounded_like_gpt2s() {
    let small = BertConfig {
        vocab_size: 101,
        hidden_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 3,
        intermediate_size: 96,
        ..BertConfig::default()
    };
    small.validate().unwrap();
    let cases: [(BertConfig, &str); 6] = [
        (BertConfig { num_hidden_layers: 1_000_000_000, ..small.clone() }, "num_hidden_layers 1000000000 is too large: allowed 1 to 4096"),
        (
            BertConfig { hidden_size: 1 << 32, num_attention_heads: 1, ..small.clone() },
            "hidden_size 4294967296 is too large: allowed 1 to 65536",
        ),
        (BertConfig { vocab_size: 1_000_000_000, ..small.clone() }, "vocab_size 1000000000 is too large: allowed 1 to 16777216"),
        (BertConfig { intermediate_size: 1 << 40, ..small.clone() }, "intermediate_size 1099511627776 is too large: allowed 1 to 262144"),
        (BertConfig { max_position_embeddings: usize::MAX, ..small.clone() }, "max_position_embeddings 18446744073709551615 is too large"),
        (BertConfig { type_vocab_size: 1 << 31, ..small.clone() }, "type_vocab_size 2147483648 is too large: allowed 0 to 65536"),
    ];
    for (cfg, want) in cases {
        let got = refused(&cfg);
        assert!(got.contains(want), "{got}");
    }
    let got =
        refused(&RobertaConfig(BertConfig { num_hidden_layers: 1 << 13, model_type: "roberta".into(), pad_token_id: Some(1), ..small }));
    assert!(got.contains("num_hidden_layers 8192 is too large"), "{got}");
    let d = DistilBertConfig { n_layers: 1_000_000_000, ..DistilBertConfig::default() };
    assert!(refused(&d).contains("n_layers 1000000000 is too large: allowed 1 to 4096"), "{}", refused(&d));
    let d = DistilBertConfig { dim: 1 << 20, n_heads: 1, ..DistilBertConfig::default() };
    assert!(refused(&d).contains("dim 1048576 is too large"), "{}", refused(&d));

    // Each size within its bound, together ~4.4e12 parameters: refused before allocation.
    let huge = BertConfig {
        vocab_size: 1 << 24,
        hidden_size: 1 << 16,
        num_attention_heads: 64,
        num_hidden_layers: 1 << 12,
        intermediate_size: 1 << 18,
        max_position_embeddings: 1 << 20,
        ..BertConfig::default()
    };
    huge.validate().unwrap();
    let got = <Bert<Cpu> as LanguageModel<Cpu>>::check_memory(&huge, Footprint::Inference).unwrap_err().to_string();
    assert!(got.contains("parameters (") && got.contains("GB of f32 weights); at most 68719476736 are allowed"), "{got}");
    let got = Bert::new(Cpu, huge, 0).err().expect("refused").to_string();
    assert!(got.contains("at most 68719476736 are allowed"), "{got}");
}

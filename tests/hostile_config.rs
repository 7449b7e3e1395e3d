//! `Gpt2Config::validate` refuses sizes that would overflow or allocate absurdly, with the
//! model's size in the message, before anything is allocated.

use lmtrain_model::gpt2::Gpt2Config;

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

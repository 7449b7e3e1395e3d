//! DeBERTa-v2 with dropout on: the hand-written backward against finite differences of the loss
//! (the masks are a pure function of the seed, so the loss is smooth in the parameters), with
//! padding, token types, log buckets shorter than the sequence, both position terms, and the
//! parts the fixtures run without dropout (relative-embedding dropout per layer, the conv layer's
//! dropout, the embeddings' mask).

use lmtrain_cpu::Cpu;
use lmtrain_model::deberta::{Deberta, DebertaV2Config, PosAttType};
use lmtrain_model::{Input, LanguageModel};

fn config(share: bool, conv: bool) -> DebertaV2Config {
    DebertaV2Config {
        vocab_size: 61,
        hidden_size: 12,
        embedding_size: Some(if conv { 8 } else { 12 }),
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 20,
        max_position_embeddings: 16,
        type_vocab_size: 2,
        hidden_dropout_prob: 0.3,
        attention_probs_dropout_prob: 0.3,
        relative_attention: true,
        position_buckets: 4,
        max_relative_positions: 12,
        pos_att_type: Some(PosAttType::Joined("p2c|c2p".into())),
        share_att_key: share,
        norm_rel_ebd: if share { "layer_norm".into() } else { "none".into() },
        position_biased_input: conv,
        conv_kernel_size: if conv { 3 } else { 0 },
        conv_act: "tanh".into(),
        legacy: conv,
        ..DebertaV2Config::default()
    }
}

#[test]
fn gradients_with_dropout_match_finite_differences() {
    let (b, t) = (2, 9);
    let ids: Vec<u32> = (0..b * t).map(|i| if i >= t + 7 { 0 } else { 1 + (i as u32 * 37) % 60 }).collect();
    let mask: Vec<bool> = (0..b * t).map(|i| i < t + 7).collect();
    let types: Vec<u32> = (0..b * t).map(|i| u32::from(i % t > 4)).collect();
    let labels: Vec<i32> = (0..b * t).map(|i| if mask[i] && i % 3 == 1 { ((i * 11) % 61) as i32 } else { -100 }).collect();
    let input = Input { b, t, input_ids: &ids, labels: Some(&labels), attention_mask: Some(&mask), token_type_ids: Some(&types) };
    for (share, conv) in [(true, true), (false, false)] {
        let mut m = Deberta::new(Cpu, config(share, conv), 5).unwrap();
        // make biases and LayerNorm non-trivial so their gradients are generic, and the query /
        // key / relative weights large so attention is far from uniform (as the fixtures)
        let sharp: Vec<(usize, usize)> = m
            .param_infos()
            .iter()
            .filter(|p| ["query_proj.weight", "key_proj.weight", "rel_embeddings.weight"].iter().any(|n| p.name.ends_with(n)))
            .map(|p| (p.offset, p.len))
            .collect();
        let params = m.parts_mut().1.params_mut();
        for (i, p) in params.iter_mut().enumerate() {
            *p += ((i * 7919 % 101) as f32 - 50.0) * 2e-3;
        }
        for (o, l) in sharp {
            params[o..o + l].iter_mut().for_each(|p| *p *= 10.0);
        }
        let eval = m.eval_loss(&input).unwrap();
        m.zero_grad().unwrap();
        let l1 = m.loss_and_gradients(&input, Some(9)).unwrap();
        assert_ne!(l1, eval, "dropout is on with a seed");
        let grads = m.grads().to_vec();
        let infos = m.param_infos().to_vec();
        let mut checked = 0;
        for info in &infos {
            // the largest gradient entry of each tensor, and a dozen spread over it
            let g = &grads[info.offset..info.offset + info.len];
            let largest = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
            let mut entries: Vec<usize> = (0..g.len()).step_by(g.len().div_ceil(12)).collect();
            entries.push(largest);
            for i in entries {
                let (g, idx, h) = (g[i], info.offset + i, 3e-3f32);
                let base = m.params()[idx];
                let mut at = |x: f32| {
                    m.parts_mut().1.params_mut()[idx] = x;
                    m.loss_and_gradients(&input, Some(9)).unwrap() as f64
                };
                let fd = (at(base + h) - at(base - h)) / (2.0 * h as f64);
                at(base);
                let name = &info.name;
                assert!(
                    (fd - g as f64).abs() <= 0.03 * (g.abs() as f64) + 2e-4,
                    "share {share} conv {conv}: {name}[{i}]: analytic {g} vs numeric {fd}"
                );
                checked += 1;
            }
        }
        assert!(checked > 2 * infos.len(), "{checked} entries checked");
    }
}

#[test]
fn deberta_v3_base_has_the_parameter_count_of_transformers() {
    // DebertaV2ForMaskedLM(deberta-v3-base's config) in transformers 5.24: 184,551,780
    // parameters (the tied decoder counted once), with either head layout
    for legacy in [true, false] {
        let cfg = DebertaV2Config { legacy, ..DebertaV2Config::v3() };
        let n: usize = <Deberta<Cpu> as LanguageModel<Cpu>>::param_table(&cfg).unwrap().iter().map(|p| p.len).sum();
        assert_eq!(n, 184_551_780, "legacy {legacy}");
    }
}

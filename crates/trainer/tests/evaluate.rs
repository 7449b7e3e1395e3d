//! `evaluate` averages the cross-entropy over every predicted token of a store: a batch without
//! any label (a short masked-LM block where no token was chosen) adds nothing instead of
//! turning the whole evaluation into NaN, and batches weigh by their predicted tokens.

use lmtrain_cpu::Cpu;
use lmtrain_model::bert::{Bert, BertConfig};
use lmtrain_model::{IGNORE_INDEX, LanguageModel};
use lmtrain_store::{BlockStore, BlockWriter, SpecialTokens, StoreSpec};
use lmtrain_trainer::collate::{Batch, BatchKey};
use lmtrain_trainer::{Collator, evaluate};

const T: usize = 8;
const VOCAB: usize = 50;

/// Labels on the first `labelled[block]` positions of each block (the input ids), none after.
struct Fixed {
    labelled: Vec<usize>,
}

impl Collator for Fixed {
    fn collate(&self, store: &BlockStore, ids: &[usize], _key: BatchKey, batch: &mut Batch) {
        batch.read_blocks(store, ids);
        batch.labels.clear();
        for (row, &id) in ids.iter().enumerate() {
            for p in 0..T {
                let y = batch.input_ids[row * T + p] as i32;
                batch.labels.push(if p < self.labelled[id] { y } else { IGNORE_INDEX });
            }
        }
        batch.token_type_ids = None;
    }
}

#[test]
fn batches_without_labels_add_nothing_and_batches_weigh_by_their_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    let spec = StoreSpec {
        block_size: T as u32,
        vocab_size: VOCAB as u32,
        tokenizer_fingerprint: 0,
        special: SpecialTokens::default(),
        word_starts: false,
        layout: Default::default(),
    };
    let mut w = BlockWriter::create(&path, spec).unwrap();
    for b in 0..3u32 {
        let toks: Vec<u32> = (0..T as u32).map(|k| (b * 17 + k * 7 + 3) % VOCAB as u32).collect();
        w.push_block(&toks, None).unwrap();
    }
    w.finish().unwrap().persist().unwrap();
    let store = BlockStore::open(&path).unwrap();
    let cfg = BertConfig {
        vocab_size: VOCAB,
        hidden_size: 16,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 32,
        max_position_embeddings: T,
        ..BertConfig::default()
    };
    let mut model = Bert::new(Cpu, cfg, 3).unwrap();
    // block 1 carries no label
    let collator = Fixed { labelled: vec![2, 0, 6] };
    let r = evaluate(&mut model, &store, 1, &collator).unwrap();
    assert!(r.loss.is_finite(), "a block without labels made the loss {}", r.loss);
    // the same, from the per-block means weighted by their label counts
    let mut b = Batch::default();
    let mut per_block = Vec::new();
    for id in [0, 2] {
        collator.collate(&store, &[id], BatchKey::Eval, &mut b);
        per_block.push(model.eval_loss(&b.input()).unwrap() as f64);
    }
    let expected = (2.0 * per_block[0] + 6.0 * per_block[1]) / 8.0;
    assert!((r.loss - expected).abs() < 1e-6, "{} vs {expected}", r.loss);
    // in one batch of all three: the mean over its 8 labels, the same number
    let one = evaluate(&mut model, &store, 3, &collator).unwrap();
    assert!((one.loss - expected).abs() < 1e-6, "{} vs {expected}", one.loss);
    // nothing labelled at all: NaN, which the callers turn into an error
    let none = evaluate(&mut model, &store, 2, &Fixed { labelled: vec![0, 0, 0] }).unwrap();
    assert!(none.loss.is_nan());
}

//! Writes the fixed-mask evaluation batches of a masked-LM run, with lmtrain's loss on each, as
//! safetensors files that `scripts/golden/check_mlm_load.py` feeds to `transformers`: the check
//! that a model lmtrain saved gives Hugging Face the same loss on the same masked batches.
//!
//! `cargo run --release -p lmtrain-trainer --example mlm_eval_batches -- MODEL_DIR STORE OUT_DIR [SEED] [BATCHES]`
//! (SEED: the run's `--seed`, 42; BATCHES of 8 blocks: 4). Masks as `train eval`: 15%, 80/10/10.

use std::path::{Path, PathBuf};

use lmtrain_cpu::Cpu;
use lmtrain_model::LanguageModel;
use lmtrain_model::bert::{Bert, Roberta};
use lmtrain_model::deberta::Deberta;
use lmtrain_model::distilbert::DistilBert;
use lmtrain_store::BlockStore;
use lmtrain_trainer::collate::{Batch, BatchKey};
use lmtrain_trainer::masking::{MaskVocab, MaskingConfig};
use lmtrain_trainer::{Collator, MaskingCollator};
use safetensors::{Dtype, tensor::TensorView};

const BLOCKS_PER_BATCH: usize = 8;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        return Err("usage: mlm_eval_batches MODEL_DIR STORE OUT_DIR [SEED] [BATCHES]".into());
    }
    let (model_dir, store, out) = (PathBuf::from(&args[0]), BlockStore::open(Path::new(&args[1]))?, PathBuf::from(&args[2]));
    let seed = args.get(3).map_or(Ok(42), |s| s.parse())?;
    let batches = args.get(4).map_or(Ok(4), |s| s.parse())?;
    match lmtrain_hf::read_model_type(&model_dir)?.as_str() {
        "bert" => write::<Bert<Cpu>>(&model_dir, &store, &out, seed, batches),
        "roberta" => write::<Roberta<Cpu>>(&model_dir, &store, &out, seed, batches),
        "distilbert" => write::<DistilBert<Cpu>>(&model_dir, &store, &out, seed, batches),
        "deberta-v2" => write::<Deberta<Cpu>>(&model_dir, &store, &out, seed, batches),
        other => Err(format!("model type {other:?} is not a masked LM this example knows").into()),
    }
}

fn write<M: LanguageModel<Cpu>>(
    dir: &Path,
    store: &BlockStore,
    out: &Path,
    seed: u64,
    batches: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut model: M = lmtrain_hf::load_model(Cpu, dir)?;
    let h = store.header();
    let sp = h.special_tokens();
    let special: Vec<u32> = [sp.eos, sp.bos, sp.pad, sp.unk, sp.cls, sp.sep].into_iter().flatten().collect();
    let vocab = MaskVocab::new(&special, sp.mask.ok_or("the store's tokenizer has no mask token")?, h.vocab_size)?;
    let config = MaskingConfig { mlm_probability: 0.15, mask_replace_prob: 0.8, random_replace_prob: 0.1, whole_word: false };
    let collator = MaskingCollator::new(config, vocab, seed)?;
    std::fs::create_dir_all(out)?;
    let ids: Vec<usize> = (0..store.len()).collect();
    for (i, chunk) in ids.chunks(BLOCKS_PER_BATCH).take(batches).enumerate() {
        let mut b = Batch::default();
        collator.collate(store, chunk, BatchKey::Eval, &mut b);
        let loss = model.eval_loss(&b.input())?;
        let int64 = |v: Vec<i64>| v.into_iter().flat_map(i64::to_le_bytes).collect::<Vec<u8>>();
        let shape = vec![b.b, b.t];
        let ids = int64(b.input_ids.iter().map(|&x| x as i64).collect());
        let labels = int64(b.labels.iter().map(|&x| x as i64).collect());
        let mask = int64(match &b.attention_mask {
            Some(m) => m.iter().map(|&x| x as i64).collect(),
            None => vec![1; b.b * b.t],
        });
        let loss_bytes = loss.to_le_bytes().to_vec();
        let tensors = [
            ("input_ids", TensorView::new(Dtype::I64, shape.clone(), &ids)?),
            ("labels", TensorView::new(Dtype::I64, shape.clone(), &labels)?),
            ("attention_mask", TensorView::new(Dtype::I64, shape.clone(), &mask)?),
            ("loss", TensorView::new(Dtype::F32, vec![1], &loss_bytes)?),
        ];
        let path = out.join(format!("batch{i}.safetensors"));
        safetensors::serialize_to_file(tensors, None, &path)?;
        println!("{}: {} x {} tokens, lmtrain loss {loss:.6}", path.display(), b.b, b.t);
    }
    Ok(())
}

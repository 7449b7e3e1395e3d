//! Masked-LM tokenizers other than WordPiece, trained here with the `tokenizers` crate (no hub):
//! - DeBERTa-v3 style (SentencePiece Unigram, `▁` metaspace, `[CLS] $A [SEP]`, `[PAD]`/`[CLS]`/
//!   `[SEP]`/`[UNK]` first and `[MASK]` added last): `train prepare` finds its special tokens and
//!   marks word starts at the metaspace, whole-word masking never splits a word, and a masked LM
//!   trains and fills a `[MASK]` with it;
//! - RoBERTa style (byte-level BPE, `<s> $A </s>`, `<mask>` with `lstrip`): a RoBERTa trains on
//!   it with `<mask>`/`<pad>` from the tokenizer and `train fill-mask` takes `<mask>`, not
//!   `[MASK]`.

mod train_support;

use std::path::Path;

use lmtrain_store::BlockStore;
use lmtrain_trainer::collate::{Batch, BatchKey};
use lmtrain_trainer::masking::{MaskVocab, MaskingConfig};
use lmtrain_trainer::{Collator, MaskingCollator};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::unigram::{Unigram, UnigramTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};
use train_support::*;

/// Sentences over a small word list, some words long enough to be cut into pieces.
fn corpus(path: &Path) {
    let words = [
        "the",
        "lord",
        "said",
        "unto",
        "moses",
        "and",
        "everlasting",
        "righteousness",
        "thankfulness",
        "wilderness",
        "of",
        "in",
        "beginning",
        "created",
        "heaven",
        "earth",
        "unbelievable",
        "multitudes",
        "gathered",
        "together",
        "light",
        "darkness",
    ];
    let mut lines = Vec::new();
    let mut x = 12345u64;
    for _ in 0..3000 {
        let n = 4 + (x % 9) as usize;
        let mut line = Vec::new();
        for _ in 0..n {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            line.push(words[(x >> 33) as usize % words.len()]);
        }
        lines.push(line.join(" ") + ".");
    }
    std::fs::write(path, lines.join("\n")).unwrap();
}

fn unigram_tokenizer(corpus: &Path, out: &Path) -> Tokenizer {
    let mut tok = Tokenizer::new(Unigram::default());
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
    tok.with_decoder(Some(MetaspaceDecoder::new('▁', PrependScheme::Always, true)));
    let specials: Vec<AddedToken> = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"].iter().map(|t| AddedToken::from(*t, true)).collect();
    let mut trainer: TrainerWrapper = UnigramTrainerBuilder::default()
        .vocab_size(60)
        .show_progress(false)
        .special_tokens(specials)
        .unk_token(Some("[UNK]".into()))
        .build()
        .unwrap()
        .into();
    tok.train_from_files(&mut trainer, vec![corpus.to_str().unwrap().to_string()]).unwrap();
    // DeBERTa-v3 keeps [MASK] after the SentencePiece vocabulary
    let _ = tok.add_special_tokens([AddedToken::from("[MASK]", true)]);
    let post = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")
        .unwrap()
        .try_pair("[CLS] $A [SEP] $B [SEP]")
        .unwrap()
        .special_tokens(vec![("[CLS]", 1), ("[SEP]", 2)])
        .build()
        .unwrap();
    tok.with_post_processor(Some(post));
    tok.save(out, false).unwrap();
    tok
}

#[test]
fn a_unigram_metaspace_tokenizer_prepares_masks_whole_words_and_fills_masks() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("corpus.txt");
    corpus(&text);
    let tok_path = dir.path().join("tokenizer.json");
    let tok = unigram_tokenizer(&text, &tok_path);
    let ids = |t: &str| tok.token_to_id(t).unwrap();
    assert_eq!((ids("[PAD]"), ids("[CLS]"), ids("[SEP]"), ids("[UNK]")), (0, 1, 2, 3));
    let mask = ids("[MASK]");
    assert_eq!(mask as usize, tok.get_vocab_size(true) - 1, "[MASK] is the last id");
    let pieces = tok.encode("unrighteousness", false).unwrap();
    assert!(pieces.get_ids().len() > 2, "words are cut into pieces: {:?}", pieces.get_tokens());

    let data = dir.path().join("data");
    let out = train(&[
        "prepare",
        &s(&text),
        "--tokenizer",
        &s(&tok_path),
        "--model-type",
        "masked",
        "--block-size",
        "32",
        "--validation-split",
        "0.05",
        "-o",
        &s(&data),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let store = BlockStore::open(&data.join("train.bin")).unwrap();
    let h = store.header();
    assert_eq!((h.pad, h.cls, h.sep, h.unk, h.mask), (Some(0), Some(1), Some(2), Some(3), Some(mask)));
    assert!(h.has_word_starts);

    // a token starts a word exactly when its piece starts with the metaspace (specials: each a word)
    let t = store.block_size();
    let (mut block, mut starts) = (vec![0u32; t], vec![false; t]);
    let mut words = 0;
    for id in 0..store.len().min(50) {
        store.read_block(id, &mut block);
        store.word_starts(id, &mut starts);
        for (&tk, &st) in block.iter().zip(&starts) {
            let piece = tok.id_to_token(tk).unwrap();
            let expected = piece.starts_with('▁') || tk <= 3;
            assert_eq!(st, expected, "block {id}: piece {piece:?} word start {st}");
            words += st as usize;
        }
    }
    assert!(words > 200);

    // whole-word masking on it never splits a word, and never touches a special token
    let config = MaskingConfig { whole_word: true, mask_replace_prob: 1.0, random_replace_prob: 0.0, ..MaskingConfig::default() };
    let vocab = MaskVocab::new(&[0, 1, 2, 3], mask, h.vocab_size).unwrap();
    let collator = MaskingCollator::new(config, vocab, 7).unwrap();
    let all: Vec<usize> = (0..store.len()).collect();
    let (mut b, mut chosen, mut split) = (Batch::default(), 0usize, 0usize);
    for (step, chunk) in all.chunks(16).enumerate() {
        collator.collate(&store, chunk, BatchKey::Train { step: step as u64, micro: 0 }, &mut b);
        for (row, &id) in chunk.iter().enumerate() {
            store.read_block(id, &mut block);
            store.word_starts(id, &mut starts);
            let labels = &b.labels[row * t..(row + 1) * t];
            for p in 0..t {
                let labelled = labels[p] != -100;
                chosen += labelled as usize;
                assert!(!(labelled && block[p] <= 3), "a special token was chosen");
                // inside a word, the label state must equal the previous token's
                if p > 0 && !starts[p] && labelled != (labels[p - 1] != -100) {
                    split += 1;
                }
            }
        }
    }
    assert_eq!(split, 0, "whole words were split");
    assert!(chosen > 1000, "{chosen} tokens chosen");

    // a masked LM trains on it with whole-word masking, and fills the tokenizer's [MASK]
    let model = dir.path().join("model");
    train_ok(&[
        "--data",
        &s(&data),
        "--output-dir",
        &s(&model),
        "--model-type",
        "bert",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--max-steps",
        "3",
        "--whole-word-masking",
        "--no-progress",
    ]);
    let json = train_ok(&["fill-mask", "--checkpoint", &s(&model), "--json", "--top-k", "2", "the lord said unto [MASK]."]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{json}");
    assert!(v[0]["sequence"].as_str().unwrap().starts_with("the lord said unto"), "{json}");
}

/// A RoBERTa-style tokenizer: byte-level BPE with `<s>`, `<pad>`, `</s>`, `<unk>` first and
/// `<mask>` (which swallows the space before it, as roberta-base's) last.
fn roberta_tokenizer(corpus: &Path, out: &Path) -> Tokenizer {
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = ["<s>", "<pad>", "</s>", "<unk>"].iter().map(|t| AddedToken::from(*t, true)).collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(300)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tok.train_from_files(&mut trainer, vec![corpus.to_str().unwrap().to_string()]).unwrap();
    let _ = tok.add_special_tokens([AddedToken::from("<mask>", true).lstrip(true)]);
    tok.with_post_processor(Some(RobertaProcessing::new(("</s>".into(), 2), ("<s>".into(), 0)).add_prefix_space(false)));
    tok.save(out, false).unwrap();
    tok
}

#[test]
fn a_roberta_tokenizer_trains_a_roberta_and_fill_mask_takes_its_mask_token() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("corpus.txt");
    corpus(&text);
    let tok_path = dir.path().join("tokenizer.json");
    let tok = roberta_tokenizer(&text, &tok_path);
    let mask = tok.token_to_id("<mask>").unwrap();
    let data = dir.path().join("data");
    let out = train(&["prepare", &s(&text), "--tokenizer", &s(&tok_path), "--model-type", "masked", "--block-size", "32", "-o", &s(&data)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let h = BlockStore::open(&data.join("train.bin")).unwrap().header().clone();
    assert_eq!((h.cls, h.sep, h.pad, h.mask), (Some(0), Some(2), Some(1), Some(mask)), "RoBERTa's ids from the tokenizer");
    let mut first = vec![0u32; 32];
    BlockStore::open(&data.join("train.bin")).unwrap().read_block(0, &mut first);
    assert_eq!(first[0], 0, "documents start with <s>");

    let model = dir.path().join("model");
    train_ok(&[
        "--data",
        &s(&data),
        "--output-dir",
        &s(&model),
        "--model-type",
        "roberta",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--max-steps",
        "3",
        "--no-progress",
    ]);
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["pad_token_id"], 1, "the padding index is the tokenizer's <pad>");
    let json = train_ok(&["fill-mask", "--checkpoint", &s(&model), "--json", "--top-k", "2", "the lord said unto <mask>."]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{json}");
    assert!(v[0]["sequence"].as_str().unwrap().starts_with("the lord said unto"), "{json}");
    // BERT's spelling is not this checkpoint's mask token
    let e = train_err(&["fill-mask", "--checkpoint", &s(&model), "the lord said unto [MASK]."]);
    assert!(e.contains("no <mask>"), "{e}");
}

//! Tokenizers: load a Hugging Face `tokenizer.json`, or train one on the corpus; find
//! the special tokens; fingerprint the tokenizer so a store and a checkpoint can be matched.

use std::path::Path;

use lmtrain_store::SpecialTokens;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::TextError;

/// The kind of model a store is prepared for; decides special-token handling and the
/// kind of tokenizer trained when none is given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModelType {
    /// GPT-2 style: byte-level BPE, an end-of-text token appended after every document.
    #[default]
    Causal,
    /// BERT style: WordPiece, `[CLS] ... [SEP]` around every document.
    Masked,
}

/// The GPT-2 end-of-text token, used when training a causal tokenizer.
pub const GPT2_EOS: &str = "<|endoftext|>";
/// Special tokens of a trained BERT-style tokenizer, in id order.
pub const BERT_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Smallest `--vocab-size` accepted for training: the 256 byte symbols of byte-level BPE
/// plus room for special tokens and some merges.
pub const MIN_TRAIN_VOCAB: usize = 300;

/// A 64-bit fingerprint of a tokenizer: FNV-1a over a canonical form of the JSON (object
/// keys sorted, no whitespace), so re-saving the same tokenizer with other formatting or
/// key order keeps the fingerprint. Bytes that are not JSON are hashed as they are.
pub fn tokenizer_fingerprint(tokenizer_json_bytes: &[u8]) -> u64 {
    let mut h = Fnv1a::default();
    match serde_json::from_slice::<serde_json::Value>(tokenizer_json_bytes) {
        Ok(value) => canonical(&value, &mut h),
        Err(_) => h.write(tokenizer_json_bytes),
    }
    h.0
}

struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Streams the canonical serialization of `v` into the hasher.
fn canonical(v: &serde_json::Value, h: &mut Fnv1a) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            h.write(b"{");
            for (k, key) in keys.into_iter().enumerate() {
                if k > 0 {
                    h.write(b",");
                }
                h.write(serde_json::to_string(key).expect("string serializes").as_bytes());
                h.write(b":");
                canonical(&map[key], h);
            }
            h.write(b"}");
        }
        Value::Array(items) => {
            h.write(b"[");
            for (k, item) in items.iter().enumerate() {
                if k > 0 {
                    h.write(b",");
                }
                canonical(item, h);
            }
            h.write(b"]");
        }
        scalar => h.write(serde_json::to_string(scalar).expect("scalar serializes").as_bytes()),
    }
}

/// Loads a `tokenizer.json`, returning the tokenizer and the file's bytes.
/// Truncation and padding stored in the file are switched off: documents are tokenized
/// whole and then concatenated.
pub fn load_tokenizer(path: &Path) -> Result<(Tokenizer, Vec<u8>), TextError> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TextError::MissingPath { path: path.to_path_buf() },
        _ => TextError::Io { path: path.to_path_buf(), source: e },
    })?;
    let bad = |msg: String| TextError::BadTokenizer { path: path.to_path_buf(), msg };
    let mut tok = Tokenizer::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
    tok.with_truncation(None).map_err(|e| bad(e.to_string()))?;
    tok.with_padding(None);
    Ok((tok, bytes))
}

/// Trains a tokenizer of `vocab_size` entries on `docs`: byte-level BPE with
/// `<|endoftext|>` (GPT-2 style) for causal models, lower-casing WordPiece with
/// `[PAD] [UNK] [CLS] [SEP] [MASK]` and a `[CLS] … [SEP]` post-processor (BERT style) for
/// masked models.
pub fn train_tokenizer<I>(model_type: ModelType, vocab_size: usize, docs: I) -> Result<Tokenizer, TextError>
where
    I: Iterator<Item = String> + Send,
{
    if vocab_size < MIN_TRAIN_VOCAB {
        return Err(TextError::VocabTooSmall { got: vocab_size, min: MIN_TRAIN_VOCAB });
    }
    let err = |e: tokenizers::Error| TextError::TokenizerTraining(e.to_string());
    match model_type {
        ModelType::Causal => {
            let mut tok = Tokenizer::new(BPE::default());
            // GPT-2's settings: no prefix space, offsets trimmed, GPT-2's split regex.
            tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            tok.with_decoder(Some(ByteLevelDecoder::default()));
            tok.with_post_processor(Some(ByteLevel::new(false, true, true)));
            let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
                .vocab_size(vocab_size)
                .min_frequency(2)
                .show_progress(false)
                .special_tokens(vec![AddedToken::from(GPT2_EOS, true)])
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .build()
                .into();
            tok.train(&mut trainer, docs).map_err(err)?;
            Ok(tok)
        }
        ModelType::Masked => {
            let mut tok = Tokenizer::new(WordPiece::default());
            tok.with_normalizer(Some(BertNormalizer::default())).map_err(err)?;
            tok.with_pre_tokenizer(Some(BertPreTokenizer));
            tok.with_decoder(Some(WordPieceDecoder::default()));
            let mut trainer: TrainerWrapper = WordPieceTrainerBuilder::new()
                .vocab_size(vocab_size)
                .min_frequency(2)
                .show_progress(false)
                .special_tokens(BERT_SPECIALS.iter().map(|t| AddedToken::from(*t, true)).collect())
                .build()
                .into();
            tok.train(&mut trainer, docs).map_err(err)?;
            let id = |t: &str| tok.token_to_id(t).ok_or_else(|| TextError::UnknownToken(t.into()));
            let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
            tok.with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))));
            Ok(tok)
        }
    }
}

/// The special tokens of a tokenizer, found by their usual spellings (GPT-2, BERT,
/// RoBERTa/T5 conventions).
pub fn find_special_tokens(tok: &Tokenizer) -> SpecialTokens {
    let first = |names: &[&str]| names.iter().find_map(|n| tok.token_to_id(n));
    SpecialTokens {
        eos: first(&[GPT2_EOS, "</s>", "<eos>", "[EOS]"]),
        bos: first(&["<s>", "<bos>", "[BOS]", GPT2_EOS]),
        pad: first(&["[PAD]", "<pad>", "<|pad|>"]),
        unk: first(&["[UNK]", "<unk>", "<|unk|>"]),
        cls: first(&["[CLS]", "<s>", "<cls>"]),
        sep: first(&["[SEP]", "</s>", "<sep>"]),
        mask: first(&["[MASK]", "<mask>"]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_ignores_formatting_but_not_content() {
        let a = br#"{"model": {"vocab": {"a": 0, "b": 1}}, "version": "1.0"}"#;
        let b = b"{\"version\":\"1.0\",\n \"model\":{\"vocab\":{\"b\":1,\"a\":0}}}";
        let c = br#"{"model": {"vocab": {"a": 0, "b": 2}}, "version": "1.0"}"#;
        assert_eq!(tokenizer_fingerprint(a), tokenizer_fingerprint(b));
        assert_ne!(tokenizer_fingerprint(a), tokenizer_fingerprint(c));
        assert_ne!(tokenizer_fingerprint(b"not json"), tokenizer_fingerprint(b"not json!"));
    }

    #[test]
    fn trains_byte_level_bpe_and_wordpiece() {
        let docs: Vec<String> = (0..200).map(|i| format!("the quick brown fox {i} jumps over the lazy dog")).collect();
        let bpe = train_tokenizer(ModelType::Causal, 400, docs.clone().into_iter()).unwrap();
        assert_eq!(bpe.token_to_id(GPT2_EOS), Some(0));
        let enc = bpe.encode("the quick brown fox", false).unwrap();
        assert_eq!(bpe.decode(enc.get_ids(), false).unwrap(), "the quick brown fox");
        assert!(enc.get_ids().len() < 19, "merges were learned: {:?}", enc.get_tokens());

        let wp = train_tokenizer(ModelType::Masked, 400, docs.into_iter()).unwrap();
        let enc = wp.encode("The quick fox", true).unwrap();
        assert_eq!(enc.get_tokens().first().map(String::as_str), Some("[CLS]"));
        assert_eq!(enc.get_tokens().last().map(String::as_str), Some("[SEP]"));
        let specials = find_special_tokens(&wp);
        assert_eq!((specials.pad, specials.unk, specials.cls, specials.sep, specials.mask), (Some(0), Some(1), Some(2), Some(3), Some(4)));
    }

    #[test]
    fn too_small_vocab_is_refused() {
        assert!(matches!(
            train_tokenizer(ModelType::Causal, 10, std::iter::empty()),
            Err(TextError::VocabTooSmall { got: 10, .. })
        ));
    }
}

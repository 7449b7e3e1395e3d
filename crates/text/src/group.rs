//! Grouping: concatenate tokenized documents and cut the stream into fixed-size blocks,
//! dropping the final partial block (the semantics of Hugging Face's `group_texts`).

/// Concatenates documents as they arrive and hands out every complete block. Tokens
/// carry a "starts a word" flag that travels with them.
pub struct Grouper {
    block_size: usize,
    tokens: Vec<u32>,
    starts: Vec<bool>,
    /// Tokens pushed so far.
    pushed: u64,
}

impl Grouper {
    /// A grouper for blocks of `block_size` tokens (`block_size >= 1`).
    pub fn new(block_size: usize) -> Grouper {
        assert!(block_size > 0, "block size must be at least 1");
        Grouper { block_size, tokens: Vec::new(), starts: Vec::new(), pushed: 0 }
    }

    /// Appends one document's tokens and word-start flags (same length).
    pub fn push(&mut self, tokens: &[u32], starts: &[bool]) {
        assert_eq!(tokens.len(), starts.len(), "one word-start flag per token");
        self.tokens.extend_from_slice(tokens);
        self.starts.extend_from_slice(starts);
        self.pushed += tokens.len() as u64;
    }

    /// Calls `emit` on every complete block buffered so far, in order, and keeps the
    /// incomplete tail for the next documents. Stops early (keeping the rest) if `emit`
    /// returns `Ok(false)`.
    pub fn drain<E>(&mut self, mut emit: impl FnMut(&[u32], &[bool]) -> Result<bool, E>) -> Result<(), E> {
        let bs = self.block_size;
        let full = self.tokens.len() / bs;
        let mut used = 0;
        while used < full {
            let range = used * bs..(used + 1) * bs;
            used += 1;
            if !emit(&self.tokens[range.clone()], &self.starts[range])? {
                break;
            }
        }
        self.tokens.drain(..used * bs);
        self.starts.drain(..used * bs);
        Ok(())
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Tokens pushed so far.
    pub fn tokens_pushed(&self) -> u64 {
        self.pushed
    }

    /// Tokens waiting for a block to fill: dropped if no more documents come.
    pub fn pending(&self) -> usize {
        self.tokens.len()
    }
}

/// Word-start flags from a tokenizer's per-token word ids: a token starts a word when
/// its word id differs from the previous token's; tokens without a word id (special
/// tokens) are each a word of their own.
pub fn word_starts_from_ids(word_ids: &[Option<u32>], out: &mut Vec<bool>) {
    let mut prev: Option<u32> = None;
    for w in word_ids {
        out.push(match w {
            None => true,
            Some(w) => prev != Some(*w),
        });
        prev = *w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::{Rng, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    /// The straightforward reference: concatenate everything, cut, drop the remainder.
    fn naive_blocks(docs: &[Vec<u32>], bs: usize) -> Vec<Vec<u32>> {
        let all: Vec<u32> = docs.concat();
        all.chunks_exact(bs).map(<[u32]>::to_vec).collect()
    }

    #[test]
    fn grouping_matches_naive_reference_on_random_documents() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(11);
        for trial in 0..200 {
            let bs = 1 + (rng.next_u64() % 40) as usize;
            let n_docs = (rng.next_u64() % 30) as usize;
            let docs: Vec<Vec<u32>> = (0..n_docs)
                .map(|_| {
                    // Include empty and longer-than-a-block documents.
                    let len = (rng.next_u64() % (3 * bs as u64 + 2)) as usize;
                    (0..len).map(|_| rng.next_u64() as u32 % 1000).collect()
                })
                .collect();
            let mut g = Grouper::new(bs);
            let mut got: Vec<Vec<u32>> = Vec::new();
            let mut got_starts: Vec<Vec<bool>> = Vec::new();
            // Drain at random moments: block boundaries must not depend on when.
            for d in &docs {
                let starts: Vec<bool> = d.iter().map(|&t| t % 2 == 0).collect();
                g.push(d, &starts);
                if rng.next_u64() % 3 == 0 {
                    g.drain(|t, s| {
                        got.push(t.to_vec());
                        got_starts.push(s.to_vec());
                        Ok::<_, ()>(true)
                    })
                    .unwrap();
                }
            }
            g.drain(|t, s| {
                got.push(t.to_vec());
                got_starts.push(s.to_vec());
                Ok::<_, ()>(true)
            })
            .unwrap();
            let want = naive_blocks(&docs, bs);
            assert_eq!(got, want, "trial {trial}, block size {bs}");
            for (t, s) in got.iter().zip(&got_starts) {
                assert!(t.iter().zip(s).all(|(t, s)| (t % 2 == 0) == *s), "flags travel with their tokens");
            }
            let total: usize = docs.iter().map(Vec::len).sum();
            assert_eq!(g.pending(), total % bs);
            assert_eq!(g.tokens_pushed(), total as u64);
        }
    }

    #[test]
    fn drain_can_stop_early_and_resume() {
        let mut g = Grouper::new(2);
        g.push(&[1, 2, 3, 4, 5, 6, 7], &[true; 7]);
        let mut got = Vec::new();
        g.drain(|t, _| {
            got.push(t.to_vec());
            Ok::<_, ()>(got.len() < 2)
        })
        .unwrap();
        assert_eq!(got, vec![vec![1, 2], vec![3, 4]]);
        g.drain(|t, _| {
            got.push(t.to_vec());
            Ok::<_, ()>(true)
        })
        .unwrap();
        assert_eq!(got, vec![vec![1, 2], vec![3, 4], vec![5, 6]]);
        assert_eq!(g.pending(), 1);
    }

    #[test]
    fn word_starts_follow_word_ids() {
        let mut out = Vec::new();
        word_starts_from_ids(&[None, Some(0), Some(0), Some(1), None, Some(1), Some(2), Some(2)], &mut out);
        assert_eq!(out, [true, true, false, true, true, true, true, false]);
    }
}

//! Token + position embeddings, forward and backward.

use rayon::prelude::*;

use crate::gemm::SendPtr;

/// `out[b, t, :] = wte[ids[b, t], :] + wpe[pos_offset + t, :]`.
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward(
    out: &mut [f32],
    wte: &[f32],
    wpe: &[f32],
    ids: &[u32],
    b: usize,
    t: usize,
    c: usize,
    pos_offset: usize,
) {
    assert!(out.len() == b * t * c && ids.len() == b * t, "embedding_forward: shape");
    let vocab = wte.len() / c;
    let n_pos = wpe.len() / c;
    assert!(pos_offset + t <= n_pos, "embedding_forward: position {} beyond {n_pos}", pos_offset + t - 1);
    out.par_chunks_mut(c).zip(ids.par_iter()).enumerate().for_each(|(i, (o, &id))| {
        let id = id as usize;
        assert!(id < vocab, "embedding_forward: token id {id} >= vocabulary {vocab}");
        let p = pos_offset + i % t;
        for ((o, &e), &q) in o.iter_mut().zip(&wte[id * c..(id + 1) * c]).zip(&wpe[p * c..(p + 1) * c]) {
            *o = e + q;
        }
    });
}

/// `dwte[ids[b, t]] += dout[b, t]`, `dwpe[t] += dout[b, t]` (positions start at 0).
pub fn embedding_backward(dwte: &mut [f32], dwpe: &mut [f32], dout: &[f32], ids: &[u32], b: usize, t: usize, c: usize) {
    assert!(dout.len() == b * t * c && ids.len() == b * t, "embedding_backward: shape");
    assert!(dwpe.len() >= t * c, "embedding_backward: wpe too short");
    dwpe[..t * c].par_chunks_mut(c).enumerate().for_each(|(p, d)| {
        for bi in 0..b {
            let row = &dout[(bi * t + p) * c..(bi * t + p + 1) * c];
            for (d, g) in d.iter_mut().zip(row) {
                *d += g;
            }
        }
    });
    // Token rows may repeat: split the channels between tasks instead of the tokens, so no two
    // tasks touch the same element and every element sums its tokens in token order (the split
    // follows the thread count, the bits do not).
    let threads = rayon::current_num_threads().max(1);
    let width = c.div_ceil(threads).max(16).min(c);
    let ptr = SendPtr(dwte.as_mut_ptr());
    let vocab = dwte.len() / c;
    (0..c.div_ceil(width)).into_par_iter().for_each(|ci| {
        let c0 = ci * width;
        let c1 = (c0 + width).min(c);
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            assert!(id < vocab, "embedding_backward: token id {id} >= vocabulary {vocab}");
            let g = &dout[i * c + c0..i * c + c1];
            // SAFETY: columns [c0, c1) belong to this task alone; id < vocab keeps it in bounds.
            let d = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(id * c + c0), c1 - c0) };
            for (d, g) in d.iter_mut().zip(g) {
                *d += g;
            }
        }
    });
}

//! Word + position + token-type embeddings, forward and backward.

use rayon::prelude::*;

use lmtrain_backend::{EmbeddingTables, Inputs, PaddingIdx};

use crate::gemm::SendPtr;

/// `out[b, t, :] = word[ids[b, t]] + position[pos(b, t)] + token_type[types[b, t]]` with the
/// batch's position ids (or `pos = t`); absent tables add nothing. The sum runs in that order.
pub fn embedding_forward(out: &mut [f32], tables: EmbeddingTables<&[f32]>, inp: &Inputs, c: usize) {
    let (b, t) = (inp.b, inp.t);
    assert!(out.len() == b * t * c && inp.ids.len() == b * t, "embedding_forward: shape");
    let EmbeddingTables { word, position, token_type } = tables;
    let vocab = word.len() / c;
    out.par_chunks_mut(c).enumerate().for_each(|(i, o)| {
        let id = inp.ids[i] as usize;
        assert!(id < vocab, "embedding_forward: token id {id} >= vocabulary {vocab}");
        o.copy_from_slice(&word[id * c..(id + 1) * c]);
        if let Some(wpe) = position {
            let p = position_of(inp, i);
            assert!((p + 1) * c <= wpe.len(), "embedding_forward: position {p} beyond the table");
            o.iter_mut().zip(&wpe[p * c..(p + 1) * c]).for_each(|(o, &q)| *o += q);
        }
        if let Some(wtt) = token_type {
            let k = inp.token_types.as_ref().map_or(0, |tt| tt[i] as usize);
            assert!((k + 1) * c <= wtt.len(), "embedding_forward: token type {k} beyond the table");
            o.iter_mut().zip(&wtt[k * c..(k + 1) * c]).for_each(|(o, &q)| *o += q);
        }
    });
}

/// Position of flat index `i`: the batch's position id, or the column.
fn position_of(inp: &Inputs, i: usize) -> usize {
    inp.positions.as_ref().map_or(i % inp.t, |p| p[i] as usize)
}

/// The scatter-add of [`embedding_forward`]: every table's row of each position gets that
/// position's gradient, positions in order (so the summation order is fixed); positions whose id
/// is a table's padding index are skipped for that table.
pub fn embedding_backward(grads: EmbeddingTables<&mut [f32]>, dout: &[f32], inp: &Inputs, c: usize, pad: PaddingIdx) {
    let (b, t) = (inp.b, inp.t);
    assert!(dout.len() == b * t * c && inp.ids.len() == b * t, "embedding_backward: shape");
    let EmbeddingTables { word, position, token_type } = grads;
    let skip = |p: Option<u32>| p.map_or(usize::MAX, |p| p as usize);
    scatter_rows(word, dout, c, skip(pad.word), |i| inp.ids[i] as usize);
    if let Some(dwpe) = position {
        scatter_rows(dwpe, dout, c, skip(pad.position), |i| position_of(inp, i));
    }
    if let Some(dwtt) = token_type {
        scatter_rows(dwtt, dout, c, usize::MAX, |i| inp.token_types.as_ref().map_or(0, |tt| tt[i] as usize));
    }
}

/// `table[row_of(i)] += dout[i]` for every position `i` whose row is not `skip`. Rows may repeat: the channels are split
/// between tasks instead of the positions, so no two tasks touch the same element and each
/// element sums its positions in order (the split follows the thread count, the bits do not).
fn scatter_rows(table: &mut [f32], dout: &[f32], c: usize, skip: usize, row_of: impl Fn(usize) -> usize + Sync) {
    let n = dout.len() / c;
    let rows = table.len() / c;
    let threads = rayon::current_num_threads().max(1);
    let width = c.div_ceil(threads).max(16).min(c);
    let ptr = SendPtr(table.as_mut_ptr());
    (0..c.div_ceil(width)).into_par_iter().for_each(|ci| {
        let c0 = ci * width;
        let c1 = (c0 + width).min(c);
        for i in 0..n {
            let r = row_of(i);
            if r == skip {
                continue;
            }
            assert!(r < rows, "embedding_backward: row {r} >= table rows {rows}");
            let g = &dout[i * c + c0..i * c + c1];
            // SAFETY: columns [c0, c1) belong to this task alone; r < rows keeps it in bounds.
            let d = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(r * c + c0), c1 - c0) };
            for (d, g) in d.iter_mut().zip(g) {
                *d += g;
            }
        }
    });
}

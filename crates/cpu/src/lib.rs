//! lmtrain-cpu: the CPU backend — f32, multi-threaded with rayon, matrix products through the
//! `gemm` crate. It is the reference every other backend is checked against.
//!
//! [`ops`] holds the ops as free functions on slices (usable directly, e.g. by tests);
//! [`Cpu`] implements [`lmtrain_backend::Backend`] over them with `Vec<f32>` buffers and
//! `&[f32]` / `&mut [f32]` views, so the generic model code costs nothing extra here.

#[macro_use]
pub mod dispatch;
mod gemm;
mod simd;
pub mod math;
pub mod ops;

use lmtrain_backend::{AdamWHyper, AttnMask, AttnShape, Backend, DecaySegment, Dropout, GeluKind, GemmShape};

/// The CPU backend (stateless; threads come from rayon's global pool).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    fn alloc(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    fn from_host(&self, data: Vec<f32>) -> Vec<f32> {
        data
    }
    fn to_host(&self, v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
    fn buf_len(buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn view(buf: &Vec<f32>) -> &[f32] {
        buf
    }
    fn view_mut(buf: &mut Vec<f32>) -> &mut [f32] {
        buf
    }
    fn slice<'a>(v: &'a [f32], offset: usize, len: usize) -> &'a [f32]
    where
        Self: 'a,
    {
        &v[offset..offset + len]
    }
    fn slice_mut<'a>(v: &'a mut [f32], offset: usize, len: usize) -> &'a mut [f32]
    where
        Self: 'a,
    {
        &mut v[offset..offset + len]
    }
    fn split_at_mut<'a>(v: &'a mut [f32], mid: usize) -> (&'a mut [f32], &'a mut [f32])
    where
        Self: 'a,
    {
        v.split_at_mut(mid)
    }
    fn reborrow<'s>(v: &'s mut &mut [f32]) -> &'s mut [f32] {
        v
    }
    fn as_view<'s>(v: &'s &mut [f32]) -> &'s [f32] {
        v
    }

    fn fill_zero(&self, x: &mut [f32]) {
        ops::fill_zero(x);
    }
    fn copy(&self, dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }
    fn scale(&self, x: &mut [f32], s: f32) {
        ops::scale(x, s);
    }
    fn residual_forward(&self, out: &mut [f32], a: &[f32], b: &[f32]) {
        ops::residual_forward(out, a, b);
    }
    fn add_inplace(&self, dst: &mut [f32], src: &[f32]) {
        ops::add_inplace(dst, src);
    }
    fn dropout_inplace(&self, x: &mut [f32], d: Dropout) {
        ops::dropout_inplace(x, d);
    }
    fn gemm(&self, c: &mut [f32], a: &[f32], b: &[f32], s: GemmShape) {
        ops::matmul(c, a, b, s);
    }
    fn add_bias(&self, out: &mut [f32], bias: &[f32], rows: usize, cols: usize) {
        ops::add_bias(out, bias, rows, cols);
    }
    fn bias_backward(&self, dbias: &mut [f32], dout: &[f32], rows: usize, cols: usize) {
        ops::bias_backward(dbias, dout, rows, cols);
    }
    fn layernorm_forward(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: &[f32],
        rows: usize,
        cols: usize,
        eps: f32,
    ) {
        ops::layernorm_forward(out, mean, rstd, inp, weight, bias, rows, cols, eps);
    }
    fn layernorm_backward(
        &self,
        dinp: &mut [f32],
        dweight: &mut [f32],
        dbias: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        mean: &[f32],
        rstd: &[f32],
        rows: usize,
        cols: usize,
    ) {
        ops::layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, cols);
    }
    fn gelu_forward(&self, out: &mut [f32], inp: &[f32], kind: GeluKind) {
        ops::gelu_forward(out, inp, kind);
    }
    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32], kind: GeluKind) {
        ops::gelu_backward(dinp, inp, dout, kind);
    }
    fn embedding_forward(
        &self,
        out: &mut [f32],
        wte: &[f32],
        wpe: &[f32],
        ids: &[u32],
        b: usize,
        t: usize,
        c: usize,
        pos_offset: usize,
    ) {
        ops::embedding_forward(out, wte, wpe, ids, b, t, c, pos_offset);
    }
    fn embedding_backward(&self, dwte: &mut [f32], dwpe: &mut [f32], dout: &[f32], ids: &[u32], b: usize, t: usize, c: usize) {
        ops::embedding_backward(dwte, dwpe, dout, ids, b, t, c);
    }
    fn attention_forward(&self, out: &mut [f32], probs: &mut [f32], qkv: &[f32], s: AttnShape, mask: AttnMask<'_>, dropout: Dropout) {
        ops::attention_forward(out, probs, qkv, s, mask, dropout);
    }
    fn attention_backward(&self, dqkv: &mut [f32], dout: &[f32], qkv: &[f32], probs: &[f32], s: AttnShape, dropout: Dropout) {
        ops::attention_backward(dqkv, dout, qkv, probs, s, dropout);
    }
    fn attention_cached(
        &self,
        out: &mut [f32],
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        start: usize,
        n_new: usize,
        n_head: usize,
        head_size: usize,
    ) {
        ops::attention_cached(out, q, k_cache, v_cache, start, n_new, n_head, head_size);
    }
    fn cross_entropy(&self, logits: &mut [f32], targets: &[i32], rows: usize, vocab: usize, dloss: Option<f32>) -> f64 {
        ops::cross_entropy(logits, targets, rows, vocab, dloss)
    }
    fn lm_head_loss(
        &self,
        scratch: &mut [f32],
        x: &[f32],
        wte: &[f32],
        targets: &[i32],
        rows: usize,
        vocab: usize,
        c: usize,
        grad: Option<(&mut [f32], &mut [f32], f32)>,
    ) -> f64 {
        ops::lm_head_loss(scratch, x, wte, targets, rows, vocab, c, grad)
    }
    fn adamw_update(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], segments: &[DecaySegment], hp: &AdamWHyper) {
        ops::adamw_update(params, grads, m, v, segments, hp);
    }
    fn global_norm(&self, grads: &[f32]) -> f32 {
        ops::global_norm(grads)
    }
}

//! The CPU ops: f32, row-major, multi-threaded with rayon. Every `*_backward` ACCUMULATES (`+=`)
//! into its gradient outputs. Every reduction runs over fixed chunks in a fixed order that depends
//! on the shapes only, never on the number of threads, so results are bit-for-bit identical from
//! run to run and on any core count (resuming a training run relies on it; checked by
//! tests/thread_counts.rs). They do depend on the CPU: its SIMD level (see [`crate::dispatch`])
//! and, through the `gemm` crate's kernel choice and cache-derived blocking, its model.
//!
//! One file per layer family; every op is re-exported here, so `ops::NAME` is the path to use.

mod adamw;
mod attention;
mod classifier;
mod deberta;
mod elementwise;
mod embedding;
mod gelu;
mod head;
mod layernorm;
mod linear;
mod rows;
mod softmax;

pub use adamw::{adamw_update, global_norm};
pub use attention::{attention_backward, attention_cached, attention_forward};
pub use classifier::cross_entropy;
pub use deberta::{conv1d_fold, conv1d_unfold, disentangled_attention_backward, disentangled_attention_forward};
pub use elementwise::{add_inplace, dropout_inplace, fill_zero, residual_forward, scale, tanh_backward, tanh_forward, zero_padded_rows};
pub use embedding::{embedding_backward, embedding_forward};
pub use gelu::{gelu_backward, gelu_forward};
pub use head::{LM_HEAD_CHUNK, lm_head_loss, lm_head_scratch_bytes};
pub use layernorm::{layernorm_backward, layernorm_forward};
pub use linear::{add_bias, bias_backward, matmul, matmul_desc};
pub use lmtrain_backend::IGNORE_INDEX;
pub use rows::{gather_rows, scatter_add_rows};

/// Elements per rayon task in elementwise loops.
const CHUNK: usize = 1 << 14;

/// Rows per rayon task for a row length of `cols` (about `CHUNK` elements per task).
fn rows_per_task(cols: usize) -> usize {
    (CHUNK / cols.max(1)).max(1)
}

/// Accumulator lanes of the lane-parallel reductions (softmax, LayerNorm): one AVX-512 register,
/// two AVX2 ones.
const LANES: usize = 16;

//! Launch wrappers of `kernels/attention.cu`: fused (flash-style) attention forward and backward.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig};
use lmtrain_backend::{AttnShape, Dropout};

use super::{KernelDtype, SMEM_LIMIT, check_len, to_i32};
use crate::launch::Launch;
use crate::{CudaDevice, Result, shape};

/// Threads per block of the attention kernels (kThreads in attention.cu).
const ATTN_THREADS: u32 = 128;
/// (query rows, key rows) per tile, largest first; the first whose shared memory fits is used.
const TILES: &[(usize, usize)] = &[(64, 64), (64, 32), (32, 32), (32, 16), (16, 16)];

/// Bytes of one shared-memory region of `n` elements of `elem` bytes (Smem::take: 32-byte steps).
fn region(n: usize, elem: usize) -> usize {
    (n * elem).div_ceil(32) * 32
}

/// Head size padded to the 16-wide tensor-core tiles.
fn padded(hs: usize) -> usize {
    hs.div_ceil(16) * 16
}

/// Dynamic shared memory of `attention_fwd_*` (mirrors the layout in attention.cu).
pub fn attention_smem_fwd(br: usize, bc: usize, hs: usize, elem: usize) -> usize {
    let hp = padded(hs);
    region(br * hp, elem) + 2 * region(bc * hp, elem) + region(br * bc, 4) + region(br * bc, elem) + region(br * hp, 4) + 2 * region(br, 4)
}

/// Dynamic shared memory of `attention_bwd_dq_*`.
pub fn attention_smem_dq(br: usize, bc: usize, hs: usize, elem: usize) -> usize {
    let hp = padded(hs);
    2 * region(br * hp, elem)
        + 2 * region(bc * hp, elem)
        + 2 * region(br * bc, 4)
        + region(br * bc, elem)
        + region(br * hp, 4)
        + 2 * region(br, 4)
}

/// Dynamic shared memory of `attention_bwd_dkv_*`.
pub fn attention_smem_dkv(br: usize, bc: usize, hs: usize, elem: usize) -> usize {
    let hp = padded(hs);
    2 * region(bc * hp, elem)
        + 2 * region(br * hp, elem)
        + 2 * region(br * bc, 4)
        + 2 * region(br * bc, elem)
        + 2 * region(bc * hp, 4)
        + 2 * region(br, 4)
}

/// The largest tile pair whose shared memory fits, with its byte count.
fn pick_tiles(op: &'static str, hs: usize, elem: usize, smem: fn(usize, usize, usize, usize) -> usize) -> Result<(usize, usize, usize)> {
    TILES
        .iter()
        .map(|&(br, bc)| (br, bc, smem(br, bc, hs, elem)))
        .find(|&(_, _, bytes)| bytes <= SMEM_LIMIT)
        .ok_or_else(|| shape(op, format!("head size {hs} needs more than {SMEM_LIMIT} bytes of shared memory")))
}

/// Masks and dropout of one attention call.
#[derive(Clone, Copy)]
pub struct AttnOptions<'a, 'b> {
    /// Query `i` sees only keys `j <= i`.
    pub causal: bool,
    /// Per `[b, t]` key: 1 = real token, 0 = padding no query attends to; `None` = no padding.
    pub key_valid: Option<&'a CudaView<'b, u8>>,
    /// Dropout on the probabilities (the mask of `lmtrain_backend::Dropout::factor`).
    pub dropout: Dropout,
}

/// Shape checks shared by forward and backward; returns the kernel's integer sizes.
fn attn_sizes(op: &'static str, s: AttnShape, opt: &AttnOptions<'_, '_>) -> Result<[i32; 4]> {
    if s.head_size == 0 || !s.head_size.is_multiple_of(8) {
        return Err(shape(op, format!("head size {} is not a positive multiple of 8", s.head_size)));
    }
    if let Some(kv) = opt.key_valid {
        check_len(op, "key_valid", kv.len(), s.b * s.t)?;
    }
    if !(0.0..1.0).contains(&opt.dropout.p) {
        return Err(shape(op, format!("dropout probability {} outside [0, 1)", opt.dropout.p)));
    }
    // the dropout index (b*nh + h)*t*t + i*t + j must not wrap
    s.b.checked_mul(s.n_head)
        .and_then(|x| x.checked_mul(s.t))
        .and_then(|x| x.checked_mul(s.t))
        .ok_or_else(|| shape(op, "b * n_head * t * t overflows"))?;
    if s.b * s.n_head > 65535 {
        return Err(shape(op, "b * n_head exceeds the grid's 65535 limit"));
    }
    Ok([to_i32(op, "b", s.b)?, to_i32(op, "t", s.t)?, to_i32(op, "n_head", s.n_head)?, to_i32(op, "head_size", s.head_size)?])
}

impl CudaDevice {
    /// Fused attention forward over `qkv` (`[b, t, 3C]`) into `out` (`[b, t, C]`): the semantics
    /// of `lmtrain_cpu::ops::attention_forward` (masks, dropout mask and scale), but instead of the
    /// `[b, n_head, t, t]` probabilities only the row log-sum-exp `lse` (`[b, n_head, t]`, f32) is
    /// saved for [`CudaDevice::attention_backward`].
    pub fn attention_forward<T: KernelDtype>(
        &self,
        out: &mut CudaViewMut<'_, T>,
        lse: &mut CudaViewMut<'_, f32>,
        qkv: &CudaView<'_, T>,
        s: AttnShape,
        opt: AttnOptions<'_, '_>,
    ) -> Result<()> {
        const OP: &str = "attention_forward";
        let [b, t, nh, hs] = attn_sizes(OP, s, &opt)?;
        let c = s.channels();
        check_len(OP, "out", out.len(), s.b * s.t * c)?;
        check_len(OP, "qkv", qkv.len(), s.b * s.t * 3 * c)?;
        check_len(OP, "lse", lse.len(), s.b * s.n_head * s.t)?;
        if s.b * s.t * s.n_head == 0 {
            return Ok(());
        }
        let (br, bc, smem) = pick_tiles(OP, s.head_size, size_of::<T>(), attention_smem_fwd)?;
        let cfg = LaunchConfig {
            grid_dim: (s.t.div_ceil(br) as u32, (s.b * s.n_head) as u32, 1),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (causal, p, seed) = (i32::from(opt.causal), opt.dropout.p, opt.dropout.seed);
        let (br, bc) = (br as i32, bc as i32);
        let mut l = Launch::new(self, format!("attention_fwd_{}", T::SUFFIX))?;
        l.output(out).output(lse).input(qkv).optional_input(opt.key_valid);
        l.scalar(&b).scalar(&t).scalar(&nh).scalar(&hs);
        l.scalar(&causal).scalar(&p).scalar(&seed).scalar(&br).scalar(&bc);
        // SAFETY: out, qkv, lse and key_valid have exactly the lengths the kernel indexes for
        // this shape (checked above); the grid covers t rows in br blocks and b * n_head heads,
        // and the dynamic shared memory is the kernel's layout for (br, bc, head_size).
        unsafe { l.launch(cfg) }
    }

    /// Fused attention backward; ACCUMULATES into `dqkv`. Needs the forward's `out` and `lse`
    /// and the same masks and dropout; `scratch` (`[b, n_head, t]` f32) receives
    /// `D = dout . out` per row. Three launches (D, then dq and dk/dv), each summing in a
    /// fixed order: no atomics, identical bits from run to run.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward<T: KernelDtype>(
        &self,
        dqkv: &mut CudaViewMut<'_, T>,
        scratch: &mut CudaViewMut<'_, f32>,
        dout: &CudaView<'_, T>,
        qkv: &CudaView<'_, T>,
        out: &CudaView<'_, T>,
        lse: &CudaView<'_, f32>,
        s: AttnShape,
        opt: AttnOptions<'_, '_>,
    ) -> Result<()> {
        const OP: &str = "attention_backward";
        let [b, t, nh, hs] = attn_sizes(OP, s, &opt)?;
        let c = s.channels();
        let rows = s.b * s.n_head * s.t;
        check_len(OP, "dqkv", dqkv.len(), s.b * s.t * 3 * c)?;
        check_len(OP, "qkv", qkv.len(), s.b * s.t * 3 * c)?;
        check_len(OP, "dout", dout.len(), s.b * s.t * c)?;
        check_len(OP, "out", out.len(), s.b * s.t * c)?;
        check_len(OP, "lse", lse.len(), rows)?;
        check_len(OP, "scratch", scratch.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let elem = size_of::<T>();
        let (qbr, qbc, qsmem) = pick_tiles(OP, s.head_size, elem, attention_smem_dq)?;
        let (kbr, kbc, ksmem) = pick_tiles(OP, s.head_size, elem, attention_smem_dkv)?;
        let prep = LaunchConfig { grid_dim: (rows.div_ceil(4) as u32, 1, 1), block_dim: (ATTN_THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut l = Launch::new(self, format!("attention_bwd_prep_{}", T::SUFFIX))?;
        l.output(scratch).input(out).input(dout);
        l.scalar(&b).scalar(&t).scalar(&nh).scalar(&hs);
        // SAFETY: one warp per row of scratch (b*n_head*t, checked), reading head_size values of
        // out and dout (both b*t*C, checked) per row; rows past the end leave early.
        unsafe { l.launch(prep) }?;
        let (causal, p, seed) = (i32::from(opt.causal), opt.dropout.p, opt.dropout.seed);
        let d = scratch.as_view();
        for (kernel, br, bc, smem, blocks) in [("dq", qbr, qbc, qsmem, s.t.div_ceil(qbr)), ("dkv", kbr, kbc, ksmem, s.t.div_ceil(kbc))] {
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, (s.b * s.n_head) as u32, 1),
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let (br, bc) = (br as i32, bc as i32);
            let mut l = Launch::new(self, format!("attention_bwd_{kernel}_{}", T::SUFFIX))?;
            l.output(dqkv).input(dout).input(qkv).input(lse).input(&d);
            l.optional_input(opt.key_valid);
            l.scalar(&b).scalar(&t).scalar(&nh).scalar(&hs);
            l.scalar(&causal).scalar(&p).scalar(&seed).scalar(&br).scalar(&bc);
            // SAFETY: every buffer has the length the kernel indexes for this shape (checked
            // above); the grid covers the query (dq) or key (dkv) rows in tiles of br / bc, and
            // the dynamic shared memory is the kernel's layout for (br, bc, head_size).
            unsafe { l.launch(cfg) }?;
        }
        Ok(())
    }

    /// Incremental causal attention for generation (batch 1), the semantics of
    /// `lmtrain_cpu::ops::attention_cached`: `n_new` queries (`q`, `[n_new, C]`) at positions
    /// `start..start + n_new` over the cached keys and values (`[>= start + n_new, C]`) into
    /// `out` (`[n_new, C]`).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_cached<T: KernelDtype>(
        &self,
        out: &mut CudaViewMut<'_, T>,
        q: &CudaView<'_, T>,
        k_cache: &CudaView<'_, T>,
        v_cache: &CudaView<'_, T>,
        start: usize,
        n_new: usize,
        n_head: usize,
        head_size: usize,
    ) -> Result<()> {
        const OP: &str = "attention_cached";
        let c = n_head * head_size;
        let total = start + n_new;
        check_len(OP, "out", out.len(), n_new * c)?;
        check_len(OP, "q", q.len(), n_new * c)?;
        for (what, len) in [("k_cache", k_cache.len()), ("v_cache", v_cache.len())] {
            if len < total * c {
                return Err(shape(OP, format!("{what} has {len} elements, fewer than the {} of {total} positions", total * c)));
            }
        }
        // the scores of one query row stay in shared memory
        let smem = total * size_of::<f32>();
        if smem > SMEM_LIMIT {
            return Err(shape(OP, format!("a context of {total} positions exceeds the {} this kernel holds", SMEM_LIMIT / 4)));
        }
        if n_new == 0 || c == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (to_i32(OP, "n_new", n_new)? as u32, to_i32(OP, "n_head", n_head)? as u32, 1),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (start, nh, hs) = (to_i32(OP, "start", start)?, to_i32(OP, "n_head", n_head)?, to_i32(OP, "head_size", head_size)?);
        let mut l = Launch::new(self, format!("attention_cached_{}", T::SUFFIX))?;
        l.output(out).input(q).input(k_cache).input(v_cache);
        l.scalar(&start).scalar(&nh).scalar(&hs);
        // SAFETY: out and q hold n_new * C elements and the caches at least (start + n_new) * C
        // (checked); block (i, h) reads rows 0..=start+i of head h and writes row i, head h;
        // the dynamic shared memory holds the start + n_new scores of a row.
        unsafe { l.launch(cfg) }
    }
}

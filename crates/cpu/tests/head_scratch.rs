//! `ops::lm_head_scratch_bytes` (what the memory meter counts for the CPU's LM head) against what
//! `ops::lm_head_loss` really allocates: a counting global allocator records the peak of one call
//! above the caller's buffers, for vocabularies of one chunk and of many (the per-row statistics
//! and the dx partial sums of the chunk groups), every row labelled or some ignored, with and
//! without the backward. (One test in this binary, so no other test's allocations land in the
//! count; run at each SIMD level by `LMTRAIN_CPU_SIMD`, the AVX-512 path's buffers included.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use lmtrain_backend::{HeadGrads, IGNORE_INDEX};
use lmtrain_cpu::ops::{LM_HEAD_CHUNK, lm_head_loss, lm_head_scratch_bytes};

struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

fn grow(bytes: usize) {
    let live = LIVE.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        // SAFETY: the caller's contract is passed through.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grow(new_size);
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The peak bytes one `lm_head_loss` call allocates above what was live before it.
fn measured(rows: usize, vocab: usize, c: usize, targets: &[i32], grad: bool) -> u64 {
    let mut scratch = vec![0f32; rows * vocab];
    let x: Vec<f32> = (0..rows * c).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.05).collect();
    let wte: Vec<f32> = (0..vocab * c).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.03).collect();
    let (mut dx, mut dwte) = (vec![0f32; rows * c], vec![0f32; vocab * c]);
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let g = grad.then(|| HeadGrads { dx: &mut dx[..], dwte: &mut dwte[..], dbias: None, dloss: 0.1 });
    lm_head_loss(&mut scratch, &x, &wte, None, targets, rows, vocab, c, g);
    PEAK.load(Ordering::Relaxed) - before
}

#[test]
fn the_head_scratch_count_is_what_the_head_allocates() {
    // one thread: the worker count is then the same in the count and in the call
    rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| {
        let c = 48;
        // the first pass warms up what is allocated once per thread (the gemm crate's packing
        // slab); the second checks
        for check in [false, true] {
            for vocab in [300, 5000, 9000] {
                for rows in [37, 200] {
                    let all: Vec<i32> = (0..rows).map(|r| (r * 31 % vocab) as i32).collect();
                    let some: Vec<i32> = all.iter().enumerate().map(|(r, &t)| if r % 3 == 0 { IGNORE_INDEX } else { t }).collect();
                    for (what, targets) in [("every row labelled", &all), ("a third ignored", &some)] {
                        let kept = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
                        for grad in [false, true] {
                            let counted = lm_head_scratch_bytes(rows, kept, vocab, c, grad);
                            let real = measured(rows, vocab, c, targets, grad);
                            // beside what is counted: the small per-call vectors (thread spans,
                            // chunk groups: well under 1 KB) and the gemm crate's packing of one
                            // product's operands (a vocabulary chunk of wte and the rows: the
                            // matrix-product workspace), one product at a time on one thread
                            let slack = 1024 + ((LM_HEAD_CHUNK + rows) * c * 4) as u64;
                            assert!(
                                !check || real >= counted && real - counted <= slack,
                                "vocab {vocab}, {rows} rows, {what}, backward {grad}: counted {counted} bytes, the head allocated {real}"
                            );
                        }
                    }
                }
            }
        }
    });
}

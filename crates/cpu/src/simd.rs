//! Explicit AVX-512 building blocks for the hot elementwise loops.
//!
//! The portable loops in [`crate::math`] rely on LLVM's auto-vectoriser, which handles the
//! polynomial but not the float-to-exponent step well; written with intrinsics, `e^x` costs about
//! a dozen instructions per 16 lanes (the softmax passes of the output head went from ~1 to
//! ~3.5 G elements per second per core). Callers run them only when
//! [`crate::dispatch::simd_level`] is AVX-512 (through `dispatch!`).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// `e^x` in 16 lanes, the same reduction and degree-7 polynomial as [`crate::math::exp`]
/// (a few ulp; 0 below -87).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn exp16(x: __m512) -> __m512 {
    let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0)), _mm512_set1_ps(88.0));
    // n = round(x log2 e); r = x - n ln 2 with ln 2 split in an exact high part and a remainder
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    // p * 2^n without building the exponent bits by hand
    let y = _mm512_scalef_ps(p, n);
    let keep = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(-87.0));
    _mm512_maskz_mov_ps(keep, y)
}

/// `x * sigmoid(2u)` and `sigmoid(2u)` with `u = sqrt(2/pi) (x + 0.044715 x^3)`, in 16 lanes:
/// tanh-form GELU is `0.5 x (1 + tanh u) = x sigmoid(2u)`. Written as `1 / (1 + e^{-2u})` there is
/// no `1 - 2 / (e^{2u} + 1)` cancellation near 0, so no small-argument branch is needed; also
/// returns `e^{-2u}` (for `1 - sigmoid = e^{-2u} sigmoid` without cancellation).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_tanh_parts16(x: __m512) -> (__m512, __m512) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const GELU_C: f32 = 0.044_715;
    let x2 = _mm512_mul_ps(x, x);
    // -2u = x (-2 sqrt(2/pi)) (1 + c x^2)
    let inner = _mm512_fmadd_ps(x2, _mm512_set1_ps(GELU_C), _mm512_set1_ps(1.0));
    let m2u = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(-2.0 * SQRT_2_OVER_PI)), inner);
    // SAFETY: AVX-512F is enabled for this function (its caller's contract).
    let e = unsafe { exp16(m2u) };
    // e <= e^88 after exp16's clamp, so 1 + e stays finite
    let s = _mm512_div_ps(_mm512_set1_ps(1.0), _mm512_add_ps(_mm512_set1_ps(1.0), e));
    (s, e)
}

/// Tanh-form GELU (`gelu_new`) of 16 lanes, see [`gelu_tanh_parts16`].
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn gelu_tanh16(x: __m512) -> __m512 {
    // SAFETY: AVX-512F, as required of the caller.
    _mm512_mul_ps(x, unsafe { gelu_tanh_parts16(x) }.0)
}

/// Derivative of tanh-form GELU in 16 lanes: `s + 2 x s (1 - s) u'` with `s = sigmoid(2u)`,
/// `u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2)` (the same as `0.5 (1 + th) + 0.5 x (1 - th^2) u'`).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn gelu_tanh_grad16(x: __m512) -> __m512 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const GELU_C: f32 = 0.044_715;
    // SAFETY: AVX-512F, as required of the caller.
    let (s, e) = unsafe { gelu_tanh_parts16(x) };
    let one_minus_s = _mm512_mul_ps(e, s);
    let x2 = _mm512_mul_ps(x, x);
    // 2 u' = 2 sqrt(2/pi) + (6 sqrt(2/pi) c) x^2
    let du2 = _mm512_fmadd_ps(x2, _mm512_set1_ps(6.0 * SQRT_2_OVER_PI * GELU_C), _mm512_set1_ps(2.0 * SQRT_2_OVER_PI));
    _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(x, s), one_minus_s), du2, s)
}

/// `x = 0` with non-temporal (streaming) stores for the 64-byte-aligned middle, ordinary
/// stores for the ragged ends; ends with a store fence so later loads see the zeros.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn zero_streaming(x: &mut [f32]) {
    let head = x.as_ptr().align_offset(64).min(x.len());
    let body = (x.len() - head) / 16 * 16;
    x[..head].fill(0.0);
    x[head + body..].fill(0.0);
    let p = x[head..].as_mut_ptr();
    for i in (0..body).step_by(16) {
        // SAFETY: p + i is 64-byte aligned and p + i + 16 <= the end of the body.
        unsafe { _mm512_stream_ps(p.add(i), _mm512_setzero_ps()) };
    }
    _mm_sfence();
}

/// Mask of the first `min(k, 16)` lanes: the lanes of a 16-block with `k` elements left.
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn first_lanes(k: usize) -> u16 {
    if k >= 16 { u16::MAX } else { ((1u32 << k) - 1) as u16 }
}

/// Transposes a 16 x 16 block held as 16 row vectors: `out[j]` lane `i` = `rows[i]` lane `j`.
/// Three rounds of in-lane unpacks and 128-bit lane shuffles (64 shuffles for 256 elements).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn transpose16(r: &[__m512; 16]) -> [__m512; 16] {
    // a[2p], a[2p+1]: rows 2p and 2p+1 interleaved; per 128-bit lane L they hold columns
    // (4L, 4L+1) and (4L+2, 4L+3) of the two rows
    let mut a = [_mm512_setzero_ps(); 16];
    for p in 0..8 {
        a[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
        a[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
    }
    // b[4q + m]: per lane L, column 4L + m of rows 4q .. 4q + 3
    let mut b = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        let pd = |v: __m512| _mm512_castps_pd(v);
        let (a0, a1, a2, a3) = (pd(a[4 * q]), pd(a[4 * q + 1]), pd(a[4 * q + 2]), pd(a[4 * q + 3]));
        b[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
        b[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
        b[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
        b[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
    }
    // out[4L + m] lane q = b[4q + m] lane L: a 4 x 4 transpose of 128-bit lanes per m
    let mut out = [_mm512_setzero_ps(); 16];
    for m in 0..4 {
        let (b0, b1, b2, b3) = (b[m], b[4 + m], b[8 + m], b[12 + m]);
        let c0 = _mm512_shuffle_f32x4::<0x44>(b0, b1);
        let c1 = _mm512_shuffle_f32x4::<0xEE>(b0, b1);
        let c2 = _mm512_shuffle_f32x4::<0x44>(b2, b3);
        let c3 = _mm512_shuffle_f32x4::<0xEE>(b2, b3);
        out[m] = _mm512_shuffle_f32x4::<0x88>(c0, c2);
        out[4 + m] = _mm512_shuffle_f32x4::<0xDD>(c0, c2);
        out[8 + m] = _mm512_shuffle_f32x4::<0x88>(c1, c3);
        out[12 + m] = _mm512_shuffle_f32x4::<0xDD>(c1, c3);
    }
    out
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn transpose16_transposes() {
        if crate::dispatch::simd_level() < crate::dispatch::SimdLevel::Avx512 {
            eprintln!("SKIP: AVX-512 not available (or lowered by LMTRAIN_CPU_SIMD)");
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let mut out = [0f32; 256];
        // SAFETY: AVX-512 detected above; 16 rows of 16 lanes read and written.
        unsafe {
            let rows: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(m[16 * i..].as_ptr()));
            for (j, v) in transpose16(&rows).iter().enumerate() {
                _mm512_storeu_ps(out[16 * j..].as_mut_ptr(), *v);
            }
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(out[16 * j + i], m[16 * i + j], "element ({i}, {j})");
            }
        }
    }

    #[test]
    fn zero_streaming_clears_every_element() {
        if crate::dispatch::simd_level() < crate::dispatch::SimdLevel::Avx512 {
            eprintln!("SKIP: AVX-512 not available (or lowered by LMTRAIN_CPU_SIMD)");
            return;
        }
        let mut buf = vec![1f32; 5000];
        // odd starts (unaligned heads) and lengths (ragged tails), including shorter than a line
        for (start, len) in [(0, 5000), (1, 4001), (3, 47), (7, 9), (13, 0)] {
            buf.iter_mut().for_each(|v| *v = 1.0);
            // SAFETY: AVX-512 detected above.
            unsafe { zero_streaming(&mut buf[start..start + len]) };
            for (i, &v) in buf.iter().enumerate() {
                let inside = i >= start && i < start + len;
                assert_eq!(v, if inside { 0.0 } else { 1.0 }, "start {start} len {len} index {i}");
            }
        }
    }

    #[test]
    fn exp16_matches_scalar_exp() {
        if crate::dispatch::simd_level() < crate::dispatch::SimdLevel::Avx512 {
            eprintln!("SKIP: AVX-512 not available (or lowered by LMTRAIN_CPU_SIMD)");
            return;
        }
        // -100 .. 88 (the clamp's upper end), with odd steps
        let xs: Vec<f32> = (0..3968).map(|i| -100.0 + i as f32 * 0.047_3).collect();
        for ch in xs.chunks_exact(16) {
            let mut out = [0f32; 16];
            // SAFETY: AVX-512 detected above; 16 lanes read and written.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), exp16(_mm512_loadu_ps(ch.as_ptr()))) };
            for (&x, &y) in ch.iter().zip(&out) {
                let want = (x as f64).exp();
                if x <= -87.0 {
                    assert_eq!(y, 0.0, "exp16({x})");
                } else {
                    let rel = ((y as f64 - want) / want).abs();
                    assert!(rel < 5e-7, "exp16({x}) = {y}, want {want} (rel {rel:.2e})");
                }
            }
        }
    }
}

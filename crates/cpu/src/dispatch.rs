//! Run-time instruction-set dispatch: the release build targets baseline x86-64, so the hot loops
//! are compiled again with AVX2 / AVX-512 enabled and chosen when the CPU has them. Shared by
//! the files of [`crate::ops`].

/// Call `$generic(args)` compiled for AVX2 when the CPU has it (the build targets baseline x86-64,
/// whose SSE2 halves the width of the elementwise loops); `$avx2` is an `unsafe fn` with
/// `#[target_feature(enable = "avx2")]` whose body calls the `#[inline(always)]` `$generic`.
macro_rules! dispatch {
    ($generic:ident, $avx2:ident, $($arg:expr),*) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the feature the function is compiled for was detected at run time.
                unsafe { $avx2($($arg),*) }
            } else {
                $generic($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $generic($($arg),*)
        }
    }};
}

/// Define `$avx2` as the AVX2 build of `$generic` (see [`dispatch!`]).
macro_rules! avx2_version {
    ($avx2:ident, $generic:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx2($($arg: $ty),*) -> $ret {
            $generic($($arg),*)
        }
    };
}

/// Like [`dispatch!`], but first tries `$avx512`, the AVX-512 (F + DQ) build of `$generic`: the
/// dropout hash only vectorises with DQ's 64-bit lane multiplies, and the row loops of bias and
/// layernorm run at twice the AVX2 width.
macro_rules! dispatch512 {
    ($generic:ident, $avx512:ident, $avx2:ident, $($arg:expr),*) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512dq") {
                // SAFETY: the features the function is compiled for were detected at run time.
                unsafe { $avx512($($arg),*) }
            } else {
                dispatch!($generic, $avx2, $($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $generic($($arg),*)
        }
    }};
}

/// Define `$avx512` as the AVX-512 (F + DQ) build of `$generic` (see [`dispatch512!`]).
macro_rules! avx512_version {
    ($avx512:ident, $generic:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512dq")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx512($($arg: $ty),*) -> $ret {
            $generic($($arg),*)
        }
    };
}

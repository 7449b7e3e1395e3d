//! Run-time instruction-set dispatch, one detection point for every fast path.
//!
//! The release build targets baseline x86-64, so the hot loops are compiled again with AVX2 /
//! AVX-512 enabled, and [`simd_level`] picks which build runs: the best the CPU has, or a lower
//! one forced with the environment variable `LMTRAIN_CPU_SIMD` (`avx512`, `avx2` or
//! `portable`; read once, on the first op; never above what the CPU has). Forcing a level is how
//! the AVX2 and portable fallbacks are tested on an AVX-512 machine (this project runs on both
//! AVX-512 Intel and AVX2-only AMD machines): `LMTRAIN_CPU_SIMD=portable cargo test ...`.
//!
//! Every op selects its build with [`dispatch!`]: either one generic `#[inline(always)]` body
//! compiled three times ([`avx2_version!`], [`avx512_version!`]), or hand-written per-level
//! expressions (the explicit AVX-512 kernels in [`crate::simd`]).

use std::sync::OnceLock;

/// The instruction sets a fast path may use, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Baseline code only (SSE2 on x86-64).
    Portable,
    /// AVX2 (256-bit lanes).
    Avx2,
    /// AVX-512 F + DQ (512-bit lanes; DQ for the 64-bit lane multiplies of the dropout hash).
    Avx512,
}

impl SimdLevel {
    /// The name `LMTRAIN_CPU_SIMD` accepts for this level.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// The level named `name` (as `LMTRAIN_CPU_SIMD` spells it), if any.
    pub fn from_name(name: &str) -> Option<SimdLevel> {
        [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512].into_iter().find(|l| l.name() == name.trim().to_ascii_lowercase())
    }
}

/// The environment variable that lowers [`simd_level`].
pub const SIMD_ENV: &str = "LMTRAIN_CPU_SIMD";

/// The best level this CPU supports (ignores `LMTRAIN_CPU_SIMD`).
pub fn detected_simd_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512dq") {
            return SimdLevel::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Portable
}

/// The level every op runs at: [`detected_simd_level`], lowered by `LMTRAIN_CPU_SIMD` when set
/// (a level above the CPU's is clamped to it; an unknown value is reported once on stderr and
/// ignored). Decided on the first call and fixed for the life of the process.
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cpu = detected_simd_level();
        match std::env::var(SIMD_ENV) {
            Err(_) => cpu,
            Ok(v) if v.is_empty() => cpu,
            Ok(v) => match SimdLevel::from_name(&v) {
                Some(level) => level.min(cpu),
                None => {
                    eprintln!("warning: {SIMD_ENV}={v:?} is not one of avx512, avx2, portable; using {}", cpu.name());
                    cpu
                }
            },
        }
    })
}

/// Runs the build of an op for [`simd_level`]. Two forms:
///
/// - `dispatch!(generic, avx512_fn, avx2_fn, args...)`: `generic` is an `#[inline(always)]`
///   function and the other two its builds from [`avx512_version!`] / [`avx2_version!`];
/// - `dispatch!(avx512: expr, avx2: expr, portable: expr)`: one expression per level; the first
///   two run inside `unsafe` (they may call `#[target_feature]` functions of their level or
///   below) and only exist on x86-64.
macro_rules! dispatch {
    (avx512: $avx512:expr, avx2: $avx2:expr, portable: $portable:expr $(,)?) => {{
        match $crate::dispatch::simd_level() {
            // SAFETY: simd_level() never exceeds what the CPU was detected to support.
            #[cfg(target_arch = "x86_64")]
            #[allow(unused_unsafe)]
            $crate::dispatch::SimdLevel::Avx512 => unsafe { $avx512 },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            #[allow(unused_unsafe)]
            $crate::dispatch::SimdLevel::Avx2 => unsafe { $avx2 },
            _ => $portable,
        }
    }};
    ($generic:ident, $avx512:ident, $avx2:ident, $($arg:expr),* $(,)?) => {
        dispatch!(avx512: $avx512($($arg),*), avx2: $avx2($($arg),*), portable: $generic($($arg),*))
    };
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

/// Define `$avx512` as the AVX-512 (F + DQ) build of `$generic` (see [`dispatch!`]).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_names_round_trip_and_order() {
        for l in [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512] {
            assert_eq!(SimdLevel::from_name(l.name()), Some(l));
        }
        assert_eq!(SimdLevel::from_name(" AVX2 "), Some(SimdLevel::Avx2));
        assert_eq!(SimdLevel::from_name("sse"), None);
        assert!(SimdLevel::Portable < SimdLevel::Avx2 && SimdLevel::Avx2 < SimdLevel::Avx512);
        assert!(simd_level() <= detected_simd_level());
    }
}

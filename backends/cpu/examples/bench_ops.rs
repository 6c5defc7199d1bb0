//! Micro-benchmarks of the main kiln-cpu kernels: prints the CPU features
//! gemm can use, then a table of median milliseconds (after warm-up) and
//! GFLOP/s or GB/s per op. Run with
//! `cargo run --release -p kiln-cpu --example bench_ops [-- reps]`.

mod common;
use common::{data, time};
use kiln_cpu::conv::{
    conv2d, conv2d_backward_input, conv2d_backward_weight, conv2d_into, force_avx2, force_direct,
    force_winograd, Conv2dParams,
};
use kiln_cpu::elementwise::{map, unary, zip_strided};
use kiln_cpu::matmul::{matmul, matmul_epilogue, MatLayout};
use kiln_cpu::reduce::softmax_rows;
use kiln_cpu::Layout;
use kiln_ir::UnaryOp;

enum Rate {
    Flops(f64),
    Bytes(f64),
}

fn row(op: &str, shape: &str, secs: f64, rate: Rate) {
    let r = match rate {
        Rate::Flops(f) => format!("{:8.1} GFLOP/s", f / secs / 1e9),
        Rate::Bytes(b) => format!("{:8.1} GB/s", b / secs / 1e9),
    };
    println!("| {op:<28} | {shape:<37} | {:9.3} | {r:<16} |", secs * 1e3);
}

fn conv_case(reps: usize, name: &str, xs: [usize; 4], ws: [usize; 4], pad: usize, backward: bool) {
    let p = Conv2dParams {
        padding: (pad, pad),
        ..Default::default()
    };
    let x = data(xs.iter().product(), 3);
    let w = data(ws.iter().product(), 4);
    let b = data(ws[0], 5);
    let (ho, wo) = kiln_cpu::conv::conv2d_output_size((xs[2], xs[3]), (ws[2], ws[3]), &p);
    let flops = 2.0 * (xs[0] * ws[0] * ho * wo * ws[1] * ws[2] * ws[3]) as f64;
    let shape = format!(
        "{}x{}x{}x{} * {}x{}x{}x{} p{pad}",
        xs[0], xs[1], xs[2], xs[3], ws[0], ws[1], ws[2], ws[3]
    );
    let t = time(reps, || conv2d(&x, xs, &w, ws, Some(&b), &p));
    row(&format!("{name} fwd"), &shape, t, Rate::Flops(flops));
    if backward {
        let gy = data(xs[0] * ws[0] * ho * wo, 6);
        let t = time(reps, || conv2d_backward_input(&gy, &w, ws, xs, &p));
        row(&format!("{name} bwd input"), &shape, t, Rate::Flops(flops));
        let t = time(reps, || conv2d_backward_weight(&x, xs, &gy, ws, &p));
        row(&format!("{name} bwd weight"), &shape, t, Rate::Flops(flops));
    }
}

/// The zoo models' convolutions (seed_cnn, test_net, complex_net) at the
/// latency batch (8) and a throughput batch, plus two larger planes, each on the direct kernel and
/// on im2col + gemm, to set the rule that picks between them.
fn zoo_convs(reps: usize) {
    type Case = (&'static str, [usize; 4], [usize; 4], usize, usize);
    let cases: [Case; 9] = [
        ("seed 1->32 5x5", [1, 1, 28, 28], [32, 1, 5, 5], 1, 128),
        ("seed 32->64 3x3", [1, 32, 13, 13], [64, 32, 3, 3], 1, 128),
        ("seed 64->64 3x3", [1, 64, 13, 13], [64, 64, 3, 3], 1, 128),
        ("seed 64->128 3x3", [1, 64, 6, 6], [128, 64, 3, 3], 1, 128),
        ("test_net 1->16 3x3", [1, 1, 28, 28], [16, 1, 3, 3], 1, 256),
        ("complex 3->16 3x3", [1, 3, 10, 10], [16, 3, 3, 3], 0, 1024),
        ("complex 16->32 3x3", [1, 16, 8, 8], [32, 16, 3, 3], 0, 1024),
        ("resnet 64->64 3x3", [1, 64, 56, 56], [64, 64, 3, 3], 1, 2),
        ("resnet 64->64 3x3", [1, 64, 112, 112], [64, 64, 3, 3], 1, 1),
    ];
    // `--only TEXT`: the cases whose name contains TEXT; `--algo A`: one
    // algorithm (winograd, direct, im2col, auto, ...).
    let args: Vec<String> = std::env::args().collect();
    let opt = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let (only, algo_only) = (opt("--only"), opt("--algo"));
    for (name, xs1, ws, pad, big) in cases {
        if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        for n in [8, big] {
            let xs = [n, xs1[1], xs1[2], xs1[3]];
            let p = Conv2dParams {
                padding: (pad, pad),
                ..Default::default()
            };
            let x = data(xs.iter().product(), 3);
            let w = data(ws.iter().product(), 4);
            let b = data(ws[0], 5);
            let (ho, wo) = kiln_cpu::conv::conv2d_output_size((xs[2], xs[3]), (ws[2], ws[3]), &p);
            let flops = 2.0 * (n * ws[0] * ho * wo * ws[1] * ws[2] * ws[3]) as f64;
            let mut out = vec![0.0f32; n * ws[0] * ho * wo];
            for (algo, force, threads) in [
                ("winograd", Some(true), 0),
                ("direct", Some(true), 0),
                ("direct avx2", Some(true), 0),
                ("im2col", Some(false), 0),
                ("auto", None, 0),
                ("auto 1 thread", None, 1),
                ("winograd 1 thread", Some(true), 1),
                ("direct 1 thread", Some(true), 1),
            ] {
                if algo_only.as_ref().is_some_and(|a| a != algo) {
                    continue;
                }
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool");
                let t = pool.install(|| {
                    force_direct(force);
                    force_winograd(match algo {
                        "winograd" | "winograd 1 thread" => Some(true),
                        "direct" | "direct avx2" | "im2col" | "direct 1 thread" => Some(false),
                        _ => None,
                    });
                    force_avx2(algo == "direct avx2");
                    time(reps, || {
                        conv2d_into(&x, xs, &w, ws, Some(&b), &p, &mut out, None);
                    })
                });
                row(
                    &format!("{name} {algo}"),
                    &format!("n={n} {}x{}x{} p{pad}", xs[1], xs[2], xs[3]),
                    t,
                    Rate::Flops(flops),
                );
            }
        }
    }
}

/// The zoo's small-M / small-K products (x @ W^T, W stored [n, k]): the
/// plain matmul, matmul_epilogue with a bias, and both on one thread, to
/// set the threading rules.
fn small_matmuls(reps: usize) {
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    for (m, k, n) in [
        (64, 784, 256),
        (64, 256, 10),
        (64, 256, 32),
        (128, 256, 64),
        (8192, 20, 50),
        (8192, 50, 4),
        (32, 256, 768),
        (32, 256, 1024),
        (32, 1024, 256),
        (1024, 256, 768),
        (1024, 1024, 256),
        (4096, 784, 256),
    ] {
        let a = data(m * k, 1);
        let w = data(n * k, 2);
        let bias = data(n, 3);
        let (la, lb) = (MatLayout::contiguous(m, k), MatLayout::contiguous(n, k).t());
        let flops = 2.0 * (m * n * k) as f64;
        let shape = format!("{m}x{k} @ ({n}x{k})^T");
        let mut c = vec![0.0f32; m * n];
        let t = time(reps, || matmul(&a, la, &w, lb, 1, m, k, n));
        row("matmul", &shape, t, Rate::Flops(flops));
        let t = time(reps, || {
            matmul_epilogue(&mut c, &a, la, &w, lb, m, k, n, Some(&bias), None)
        });
        row("matmul_epilogue +bias", &shape, t, Rate::Flops(flops));
        let t = one.install(|| time(reps, || matmul(&a, la, &w, lb, 1, m, k, n)));
        row("matmul 1 thread", &shape, t, Rate::Flops(flops));
        let mut ct = vec![0.0f32; m * n];
        let t = one.install(|| {
            time(reps, || {
                kiln_cpu::matmul::matmul_into(
                    &mut ct,
                    MatLayout::contiguous(n, m).t(),
                    0.0,
                    1.0,
                    &a,
                    la,
                    &w,
                    lb,
                    1,
                    m,
                    k,
                    n,
                )
            })
        });
        row("matmul C^T 1 thread", &shape, t, Rate::Flops(flops));
    }
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    #[cfg(target_arch = "x86_64")]
    println!(
        "CPU features: avx2={} fma={} avx512f={}; rayon threads: {}",
        is_x86_feature_detected!("avx2"),
        is_x86_feature_detected!("fma"),
        is_x86_feature_detected!("avx512f"),
        rayon::current_num_threads()
    );
    println!("median of {reps} runs after warm-up, f32\n");
    println!(
        "| {:<28} | {:<37} | {:>9} | {:<16} |",
        "op", "shape", "ms", "rate"
    );
    println!("|{:-<30}|{:-<39}|{:-<11}|{:-<18}|", "", "", "", "");

    if std::env::args().any(|a| a == "--small-mm") {
        small_matmuls(reps);
        return;
    }
    if std::env::args().any(|a| a == "--zoo-conv") {
        zoo_convs(reps);
        return;
    }

    // Plain matmul (MNIST-MLP first layer with batch 4096).
    let (m, k, n) = (4096, 784, 256);
    let a = data(m * k, 1);
    let b = data(k * n, 2);
    let flops = 2.0 * (m * n * k) as f64;
    let t = time(reps, || {
        matmul(
            &a,
            MatLayout::contiguous(m, k),
            &b,
            MatLayout::contiguous(k, n),
            1,
            m,
            k,
            n,
        )
    });
    row("matmul", "4096x784 @ 784x256", t, Rate::Flops(flops));
    // The same with B read transposed (x @ W^T, W stored [256, 784]).
    let t = time(reps, || {
        matmul(
            &a,
            MatLayout::contiguous(m, k),
            &b,
            MatLayout::contiguous(n, k).t(),
            1,
            m,
            k,
            n,
        )
    });
    row(
        "matmul (B transposed view)",
        "4096x784 @ (256x784)^T",
        t,
        Rate::Flops(flops),
    );

    // Batched attention-like matmul: [8,4,128,64] @ [8,4,64,128].
    let (bt, m, k, n) = (32, 128, 64, 128);
    let a = data(bt * m * k, 3);
    let b = data(bt * k * n, 4);
    let flops = 2.0 * (bt * m * n * k) as f64;
    let t = time(reps, || {
        matmul(
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
    row(
        "batched matmul",
        "8x4x128x64 @ 8x4x64x128",
        t,
        Rate::Flops(flops),
    );

    conv_case(
        reps,
        "conv2d 5x5",
        [128, 1, 28, 28],
        [32, 1, 5, 5],
        1,
        false,
    );
    conv_case(
        reps,
        "conv2d 3x3",
        [128, 32, 13, 13],
        [64, 32, 3, 3],
        1,
        true,
    );
    conv_case(
        reps,
        "conv2d 1x1",
        [128, 64, 13, 13],
        [64, 64, 1, 1],
        0,
        false,
    );

    // Elementwise chain on 4096x1024: y = gelu(x*s + b); z = sigmoid(y) * x.
    let numel = 4096 * 1024;
    let x = data(numel, 7);
    let bias = data(1024, 8);
    let lx = Layout::contiguous(&[4096, 1024]);
    let lb = Layout {
        shape: vec![4096, 1024],
        strides: vec![0, 1],
        offset: 0,
    };
    let t = time(reps, || {
        let y = zip_strided(&x, &lx, &bias, &lb, |a, b| a * 0.5 + b);
        let y = unary(UnaryOp::GeluErf, &y);
        let s = unary(UnaryOp::Sigmoid, &y);
        zip_strided(&s, &lx, &x, &lx, |a, b| a * b)
    });
    // Bytes: 4 passes, each reads 1-2 and writes 1 buffer of 4 MiB floats.
    row(
        "elementwise chain (4 ops)",
        "4096x1024: gelu(x*s+b), sigmoid, *x",
        t,
        Rate::Bytes((numel * 4 * (2 + 2 + 2 + 3)) as f64),
    );
    let t = time(reps, || map(&x, |v| v * 1.5 + 0.25));
    row("map x*s+b", "4096x1024", t, Rate::Bytes((numel * 8) as f64));

    let t = time(reps, || softmax_rows(&x, 1024, false));
    row(
        "softmax rows",
        "4096x1024 (rows of 1024)",
        t,
        Rate::Bytes((numel * 8) as f64),
    );
}

//! Micro-benchmark of the conv backward kernels (input and weight
//! gradients) at the zoo models' training shapes: median milliseconds and
//! GFLOP/s (of the direct convolution's multiply-adds). Run with
//! `cargo run --release -p kiln-cpu --example bench_conv_bwd [-- reps]`.

mod common;
use common::{data, time};
use kiln_cpu::conv::{
    conv2d_backward_input, conv2d_backward_weight, force_wgrad_direct, Conv2dParams,
};

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    type Case = (&'static str, [usize; 4], [usize; 4], usize, bool);
    let cases: [Case; 6] = [
        (
            "complex 3->16 3x3",
            [1024, 3, 10, 10],
            [16, 3, 3, 3],
            0,
            false,
        ),
        (
            "complex 16->32 3x3",
            [1024, 16, 8, 8],
            [32, 16, 3, 3],
            0,
            true,
        ),
        ("seed 1->32 5x5", [128, 1, 28, 28], [32, 1, 5, 5], 1, false),
        (
            "seed 32->64 3x3",
            [128, 32, 13, 13],
            [64, 32, 3, 3],
            1,
            true,
        ),
        (
            "seed 64->64 3x3",
            [128, 64, 13, 13],
            [64, 64, 3, 3],
            1,
            true,
        ),
        (
            "seed 64->128 3x3",
            [128, 64, 6, 6],
            [128, 64, 3, 3],
            1,
            true,
        ),
    ];
    println!(
        "| {:<20} | {:<13} | {:>9} | {:>8} |",
        "conv", "grad", "ms", "GFLOP/s"
    );
    println!("|{:-<22}|{:-<14}|{:-<11}|{:-<10}|", "", "", "", "");
    for (name, xs, ws, pad, input) in cases {
        let p = Conv2dParams {
            padding: (pad, pad),
            ..Default::default()
        };
        let (ho, wo) = kiln_cpu::conv::conv2d_output_size((xs[2], xs[3]), (ws[2], ws[3]), &p);
        let flops = 2.0 * (xs[0] * ws[0] * ho * wo * ws[1] * ws[2] * ws[3]) as f64;
        let x = data(xs.iter().product(), 3);
        let w = data(ws.iter().product(), 4);
        let gy = data(xs[0] * ws[0] * ho * wo, 6);
        // The im2col + gemm path and the direct kernel, alternating.
        let mut rows = vec![];
        // The direct kernel by the default rule, forced and forbidden.
        for (force, what) in [
            (None, "weight"),
            (Some(true), "weight direct"),
            (Some(false), "weight im2col"),
            (None, "weight"),
            (Some(true), "weight direct"),
            (Some(false), "weight im2col"),
        ] {
            force_wgrad_direct(force);
            let t = time(reps, || conv2d_backward_weight(&x, xs, &gy, ws, &p));
            rows.push((what.to_string(), t));
        }
        force_wgrad_direct(None);
        if input {
            rows.push((
                "input".to_string(),
                time(reps, || conv2d_backward_input(&gy, &w, ws, xs, &p)),
            ));
        }
        for (what, t) in rows {
            println!(
                "| {name:<20} | {what:<13} | {:9.3} | {:8.1} |",
                t * 1e3,
                flops / t / 1e9
            );
        }
    }
}

use kiln::cpu::fastmath::{exp, map_into, FastFn};
use std::time::Instant;
fn main() {
    let x: Vec<f32> = (0..16384).map(|i| (i as f32) * 1e-4 - 2.0).collect();
    let mut out = vec![0.0f32; x.len()];
    let s = Instant::now();
    for _ in 0..1000 {
        for (o, &v) in out.iter_mut().zip(&x) {
            *o = exp(v);
        }
        std::hint::black_box(&out);
    }
    println!(
        "scalar-compiled exp 16K: {:.2} us",
        s.elapsed().as_secs_f64() * 1e3
    );
    let s = Instant::now();
    for _ in 0..1000 {
        map_into(FastFn::Exp, &x, &mut out);
        std::hint::black_box(&out);
    }
    println!(
        "dispatch exp 16K: {:.2} us",
        s.elapsed().as_secs_f64() * 1e3
    );
    println!("avx512f {}", std::arch::is_x86_feature_detected!("avx512f"));
}

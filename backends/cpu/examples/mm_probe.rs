use gemm::Parallelism;
use std::time::Instant;
fn main() {
    let (m, k, n) = (4096usize, 784usize, 256usize);
    let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut c = vec![0f32; m * n];
    for (name, par) in [
        ("None", Parallelism::None),
        ("Rayon(2)", Parallelism::Rayon(2)),
        ("Rayon(0)", Parallelism::Rayon(0)),
    ] {
        let mut ts = vec![];
        for _ in 0..15 {
            let t = Instant::now();
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
            ts.push(t.elapsed().as_secs_f64());
        }
        ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = ts[ts.len() / 2];
        println!(
            "{name}: {:.3} ms  {:.1} GFLOP/s (min {:.1})",
            med * 1e3,
            2.0 * (m * n * k) as f64 / med / 1e9,
            2.0 * (m * n * k) as f64 / ts[0] / 1e9
        );
    }
}

use gemm::Parallelism;
use std::time::Instant;
fn bench(m: usize, k: usize, n: usize, par: Parallelism, reps: usize) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut c = vec![0f32; m * n];
    let mut ts = vec![];
    for _ in 0..reps {
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
    2.0 * (m * n * k) as f64 / ts[ts.len() / 2] / 1e9
}
fn main() {
    for cols in [169, 338, 676, 1014, 1352, 2197, 4056, 8112, 21632] {
        println!(
            "64x288x{cols}: None {:.1}  Rayon2 {:.1}",
            bench(64, 288, cols, Parallelism::None, 50),
            bench(64, 288, cols, Parallelism::Rayon(2), 50)
        );
    }
    for cols in [676, 2704, 86528] {
        println!(
            "32x25x{cols}: None {:.1}  Rayon2 {:.1}",
            bench(32, 25, cols, Parallelism::None, 50),
            bench(32, 25, cols, Parallelism::Rayon(2), 50)
        );
    }
}

use kiln::{DType, Tensor};
use std::time::Instant;
fn t(name: &str, f: impl Fn() -> Tensor) {
    f();
    let s = Instant::now();
    for _ in 0..5 {
        std::hint::black_box(f());
    }
    println!("{name}: {:.2} ms", s.elapsed().as_secs_f64() * 200.0);
}
fn main() {
    let a = Tensor::randn(&[4096, 1024], DType::F32);
    let s = Tensor::linspace(0.5, 1.5, 1024, DType::F32).unwrap();
    t("mul bcast", || a.mul(&s).unwrap());
    t("mul same", || a.mul(&a).unwrap());
    t("gelu", || a.gelu().unwrap());
    t("sigmoid", || a.sigmoid().unwrap());
    t("relu", || a.relu().unwrap());
    t("sum", || a.sum().unwrap());
    t("sum0", || a.sum_dims(&[0], false).unwrap());
}

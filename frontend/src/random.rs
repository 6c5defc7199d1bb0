//! The global seedable random generator behind rand/randn/dropout and the
//! nn::init functions. `kiln::manual_seed(s)` makes every draw reproducible
//! (the numbers differ from PyTorch's generator; only reproducibility within
//! kiln is promised).

use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::OnceLock;

fn global() -> &'static Mutex<ChaCha8Rng> {
    static G: OnceLock<Mutex<ChaCha8Rng>> = OnceLock::new();
    G.get_or_init(|| Mutex::new(ChaCha8Rng::seed_from_u64(0x6b696c6e)))
}

/// Seeds the global generator (`torch.manual_seed`).
pub fn manual_seed(seed: u64) {
    *global().lock() = ChaCha8Rng::seed_from_u64(seed);
}

/// `n` uniform draws in [lo, hi).
pub fn uniform_vec(n: usize, lo: f64, hi: f64) -> Vec<f64> {
    let mut g = global().lock();
    (0..n).map(|_| g.gen::<f64>() * (hi - lo) + lo).collect()
}

/// `n` standard normal draws (Box-Muller).
pub fn normal_vec(n: usize, mean: f64, std: f64) -> Vec<f64> {
    let mut g = global().lock();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1: f64 = 1.0 - g.gen::<f64>(); // (0, 1]
        let u2: f64 = g.gen::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push(mean + std * r * t.cos());
        if out.len() < n {
            out.push(mean + std * r * t.sin());
        }
    }
    out
}

/// `n` Bernoulli(p) draws as booleans (true = keep with probability `p`).
pub fn bernoulli_vec(n: usize, p: f64) -> Vec<bool> {
    let mut g = global().lock();
    (0..n).map(|_| g.gen::<f64>() < p).collect()
}

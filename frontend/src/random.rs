//! The global seedable random generator behind rand/randn/dropout and the
//! nn::init functions. `kiln::manual_seed(s)` makes every draw reproducible
//! (the numbers differ from PyTorch's generator; only reproducibility within
//! kiln is promised). `get_rng_state`/`set_rng_state` save and restore the
//! generator's exact position (checkpoints store it, so training with dropout
//! resumes bit-identically).

use crate::error::{Error, Result};
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

/// Bytes in a generator state: the 32-byte seed, the stream (u64 LE) and
/// the word position (u128 LE) of the ChaCha8 generator.
pub const RNG_STATE_LEN: usize = 32 + 8 + 16;

/// The global generator's state (`torch.get_rng_state()`): opaque bytes,
/// `RNG_STATE_LEN` long, for `set_rng_state`.
pub fn get_rng_state() -> Vec<u8> {
    let g = global().lock();
    let mut v = Vec::with_capacity(RNG_STATE_LEN);
    v.extend_from_slice(&g.get_seed());
    v.extend_from_slice(&g.get_stream().to_le_bytes());
    v.extend_from_slice(&g.get_word_pos().to_le_bytes());
    v
}

/// Restores a state from `get_rng_state` (`torch.set_rng_state`): the draws
/// that follow are the ones that followed the `get_rng_state` call.
pub fn set_rng_state(state: &[u8]) -> Result<()> {
    let g = rng_from_state(state)?;
    *global().lock() = g;
    Ok(())
}

/// Checks a state without installing it.
pub(crate) fn check_rng_state(state: &[u8]) -> Result<()> {
    rng_from_state(state).map(|_| ())
}

fn rng_from_state(state: &[u8]) -> Result<ChaCha8Rng> {
    if state.len() != RNG_STATE_LEN {
        return Err(Error::op(
            "set_rng_state",
            format!(
                "a generator state is {RNG_STATE_LEN} bytes, got {}",
                state.len()
            ),
        ));
    }
    let seed: [u8; 32] = state[..32].try_into().unwrap();
    let stream = u64::from_le_bytes(state[32..40].try_into().unwrap());
    let pos = u128::from_le_bytes(state[40..56].try_into().unwrap());
    let mut g = ChaCha8Rng::from_seed(seed);
    g.set_stream(stream);
    g.set_word_pos(pos);
    Ok(g)
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

/// Training dropout's scaled keep-mask written into `out`: element i is
/// `keep_value` where draw i of the global generator (`gen::<f64>()`) is
/// below `keep` and 0 otherwise: the draws `bernoulli_vec(out.len(), keep)`
/// makes, in the same order (compiled training's dropout_mask step).
pub fn bernoulli_fill_f32(out: &mut [f32], keep: f64, keep_value: f32) {
    let mut g = global().lock();
    for o in out {
        *o = if g.gen::<f64>() < keep {
            keep_value
        } else {
            0.0
        };
    }
}

/// `n` Bernoulli(p) draws as booleans (true = keep with probability `p`).
pub fn bernoulli_vec(n: usize, p: f64) -> Vec<bool> {
    let mut g = global().lock();
    (0..n).map(|_| g.gen::<f64>() < p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_state_round_trip() {
        // (other tests draw from the global generator concurrently, so the
        // check uses a private generator rebuilt from the saved state)
        let mut a = ChaCha8Rng::seed_from_u64(5);
        a.set_stream(3);
        for _ in 0..7 {
            a.gen::<u32>();
        }
        let mut v = Vec::new();
        v.extend_from_slice(&a.get_seed());
        v.extend_from_slice(&a.get_stream().to_le_bytes());
        v.extend_from_slice(&a.get_word_pos().to_le_bytes());
        let mut b = rng_from_state(&v).unwrap();
        for _ in 0..20 {
            assert_eq!(a.gen::<u64>(), b.gen::<u64>());
        }
        assert_eq!(get_rng_state().len(), RNG_STATE_LEN);
        let e = set_rng_state(&v[..10]).unwrap_err().to_string();
        assert!(e.contains("56 bytes, got 10"), "{e}");
    }
}

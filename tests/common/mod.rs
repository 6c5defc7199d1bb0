//! Helpers shared by the facade's integration tests: the project's copy of
//! the PyTorch fixtures, zoo models loaded from them, and the relative
//! error used throughout (max abs error over max |expected|).

#![allow(dead_code)]

pub mod scenarios;
pub mod training;
pub mod training_hooks;

use kiln::nn::prelude::*;
use kiln::nn::StateDict;
use kiln::{zoo, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.to_vec::<f64>(), b.to_vec::<f64>());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// The zoo model with the fixture's weights, and the fixture's input.
pub fn model(name: &str) -> (Arc<dyn Module>, Tensor) {
    let m = zoo::build(name).unwrap();
    m.load_safetensors(fixtures().join(format!("{name}.safetensors")), true)
        .unwrap();
    let io =
        StateDict::load_safetensors(fixtures().join(format!("{name}.io.safetensors"))).unwrap();
    (m, io.get("input").unwrap().clone())
}

//! Testing helpers: gradient checks (`gradcheck`, from the frontend) and
//! eager-vs-compiled comparison.

pub use kiln_frontend::testing::*;

use crate::jit::{CompiledModule, VerifyReport};
use crate::nn::Module;
use crate::Tensor;
use std::sync::Arc;

/// Asserts that `compiled` (compiled from `model`) gives the same outputs
/// as eager `model` on `inputs`, within `tolerance` relative to the eager
/// output's largest magnitude; on a mismatch it panics with
/// `CompiledModule::verify`'s report, which names the first graph node
/// whose compiled value differs from the reference interpreter's, with its
/// module scope. Runs have no side effects on parameters or buffers.
pub fn assert_same(
    model: &Arc<dyn Module>,
    compiled: &CompiledModule,
    inputs: &[Tensor],
    tolerance: f64,
) -> VerifyReport {
    assert!(
        Arc::ptr_eq(model, compiled.module()),
        "assert_same: `compiled` was compiled from another module"
    );
    let report = compiled
        .verify(inputs, tolerance)
        .unwrap_or_else(|e| panic!("assert_same: {e}"));
    assert!(report.passed(tolerance), "assert_same: {report}");
    report
}

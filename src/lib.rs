//! kiln: a PyTorch-like `Module` system and a JIT compiler for it.
//!
//! This facade re-exports the user-facing API of the workspace crates:
//! `Tensor`, autograd and (as they land) `nn`, `optim`, the tracer (`jit`)
//! and the runtime. See README.md for a tour and ARCHITECTURE.md for how the
//! crates fit together.

pub use kiln_frontend::*;

pub mod bench;
pub mod bench_train;
/// The OpenCL backend's verify/bench/devices (feature `opencl`).
#[cfg(feature = "opencl")]
pub mod opencl;
pub mod testing;
pub mod verify;
pub mod zoo;

/// The CPU kernel library (shared by eager and compiled code).
pub use kiln_cpu as cpu;
/// The IR vocabulary: dtypes, shapes, ops.
pub use kiln_ir as ir;
/// The runtime: the reference interpreter, `TracedModule` (live by-name
/// binding of parameters and buffers) and export/load (`runtime::load`).
pub use kiln_runtime as runtime;
/// Tracing: `kiln::jit::trace(&model, &[x])` gives a `TracedModule` bound to
/// the live model; `check_trace` compares it with eager on other inputs.
pub use kiln_runtime::jit;

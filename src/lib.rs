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

/// Sets the number of threads kiln's kernels use (like
/// `torch.set_num_threads`): builds rayon's global pool with `n` threads,
/// the calling thread being one of them, so a forward called from it runs
/// its parallel loops with `n - 1` helpers and never waits for a wake-up
/// handoff to another thread (the default pool would add `n` threads beside
/// the caller). Call it once, at the start, on the thread that runs the
/// model; it fails if the pool was already built (by an earlier call or an
/// earlier parallel kernel).
pub fn set_num_threads(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Op {
            op: "set_num_threads".into(),
            msg: "the thread count must be at least 1".into(),
        });
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .use_current_thread()
        .build_global()
        .map_err(|e| Error::Op {
            op: "set_num_threads".into(),
            msg: format!("{n} threads: {e}"),
        })
}

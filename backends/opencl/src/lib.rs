//! kiln-opencl: the fused kernels of a fusion plan (from kiln-ir) rendered as
//! OpenCL C and run through the `ocl` crate. It depends on kiln-ir only.
//!
//! * [`render`] (always built, no OpenCL library needed): lowers a graph to
//!   one OpenCL C program: device buffers with static layouts (views are
//!   aliases), one kernel per fusion segment (pointwise chains, tiled GEMM
//!   for matmul/addmm, conv2d as implicit GEMM, work-group reductions,
//!   pooling, copies) with pointwise epilogues fused, and explicit host
//!   steps for the ops without a device kernel (each naming the op).
//! * with the crate feature `opencl`: [`devices`] lists the OpenCL
//!   platforms and devices, [`context`] opens one (index, or
//!   `KILN_OPENCL_DEVICE`, default 0) with a program cache keyed by the
//!   source hash, and [`DeviceGraph`] holds a lowered graph's buffers and
//!   kernels on the device, counting host<->device transfers.
//!
//! The runtime (`kiln-runtime`, feature `opencl`) binds inputs, parameters
//! and buffers, runs the host steps with the eager CPU ops and writes buffer
//! updates back.

use std::fmt;

pub mod render;

#[cfg(feature = "opencl")]
mod device;
#[cfg(feature = "opencl")]
mod exec;

#[cfg(feature = "opencl")]
pub use device::{context, devices, Context, DeviceInfo};
#[cfg(feature = "opencl")]
pub use exec::DeviceGraph;

pub use render::{lower, Caps, Program, Step};

/// An OpenCL backend error; `op` names the graph op (or `device`,
/// `kernel`, `transfer` for errors that are not about one op).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OclError {
    pub op: String,
    pub msg: String,
}

impl OclError {
    pub fn new(op: &str, msg: impl Into<String>) -> OclError {
        OclError {
            op: op.to_string(),
            msg: msg.into(),
        }
    }
}

impl fmt::Display for OclError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.msg.starts_with("opencl") {
            f.write_str(&self.msg)
        } else {
            write!(f, "opencl backend: {}", self.msg)
        }
    }
}

impl std::error::Error for OclError {}

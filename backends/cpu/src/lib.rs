//! kiln-cpu: the CPU kernel library. Kernels work on plain slices plus
//! layouts (shape, strides, offset) and know nothing of autograd or modules;
//! the frontend's eager ops call them, and compiled code will call the same
//! matmul/conv kernels. Large loops are split across cores with rayon; matmul
//! goes through the `gemm` crate, which picks AVX2/AVX-512 code at run time.
//! Depends on kiln-ir only (for dtypes and the op vocabulary).

pub mod buffers;
pub mod conv;
pub mod element;
pub mod elementwise;
pub mod fastmath;
pub mod matmul;
pub mod norm;
pub mod par;
pub mod pool;
pub mod reduce;
pub mod simd;
pub mod storage;
pub mod strided;

pub use element::{Element, Float};
pub use storage::CpuStorage;
pub use strided::Layout;

/// Minimum number of elements before an elementwise loop is split across
/// rayon threads. Below this the fork/join cost (a few microseconds) is more
/// than the work; measured with the bench_ops example on 2-core machines.
pub const PAR_THRESHOLD: usize = 1 << 15;

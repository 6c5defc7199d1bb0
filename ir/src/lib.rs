//! kiln-ir: the vocabulary every other kiln crate shares.
//!
//! Today it holds the element types (`DType`) and shape helpers
//! (broadcasting, contiguous strides). The graph IR (ops, type inference,
//! petgraph graph, passes, fusion plan, kernel IR and the export format) lands
//! here with the tracing issue. This crate knows nothing about tensor storage
//! and depends on no other kiln crate.

pub mod dtype;
pub mod shape;

pub use dtype::DType;
pub use shape::{broadcast_shapes, contiguous_strides, numel, ShapeError};
pub mod ops;
pub use ops::{BinaryOp, ReduceOp, UnaryOp};

//! kiln-ir: the vocabulary every other kiln crate shares, and the graph IR.
//!
//! Element types (`DType`), shape helpers, the elementwise/reduction op
//! vocabulary shared with the eager kernels, and the graph IR that the
//! tracer records and the backends compile: one op set with one type
//! inference (`op`), a petgraph graph with verifier (`graph`), passes and the
//! fusion planner (`passes`, `fusion`), a stable printer and DOT output
//! (`printer`), the JSON graph format (`format`) and a small f64 reference
//! evaluator (`eval`). This crate knows nothing about tensor storage and
//! depends on no other kiln crate.

pub mod autodiff;
pub mod dtype;
pub mod eval;
pub mod format;
pub mod fusion;
pub mod graph;
pub mod op;
pub mod ops;
pub mod passes;
pub mod printer;
pub mod sample_graphs;
pub mod shape;
pub mod types;

#[cfg(test)]
pub(crate) mod test_graphs;

pub use dtype::DType;
pub use fusion::{plan_fusion, FusionPlan, Kernel, KernelKind};

pub use graph::{verify, Graph, GraphOutput, Node, NodeId, OutputKind, Value};
pub use op::{infer, InputKind, Op, OpClass};
pub use ops::{BinaryOp, ReduceOp, UnaryOp};
pub use shape::{broadcast_shapes, contiguous_strides, numel, ShapeError};
pub use types::{IrError, Result, TensorType};

//! kiln-runtime: runs traced graphs. The reference interpreter
//! (`interpreter`: any graph, node by node, with the eager CPU ops; the
//! semantic oracle for every backend), `TracedModule` (`traced`: a graph
//! bound by name to a live module's parameters and buffers, or to stored
//! weights) and export/load of a graph with its weights in one safetensors
//! file (`export`). It sits above the frontend and never the other way
//! round. `CompiledModule` (guards, memory plan, live hooks) joins later.

pub mod compiled;
pub mod error;
pub mod export;
pub mod interpreter;
pub mod jit;
#[cfg(feature = "opencl")]
pub mod opencl;
mod program;
pub mod traced;
pub mod training;

pub use compiled::{compile, CompiledModule};
pub use error::{Error, Result};
pub use export::{from_bytes, load, GRAPH_KEY, VERSION_KEY};
pub use interpreter::{run_graph, run_graph_collect, Collected};
pub use traced::TracedModule;
pub use training::{compile_for_training, CompiledTrainModule, TrainStep};

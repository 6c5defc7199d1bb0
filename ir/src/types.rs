//! Value types of the graph IR (static shape + dtype) and the crate's error
//! type. Every error names the op or pass it comes from.

use crate::DType;
use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// The static type of a graph value: a shape (no symbolic dimensions) and an
/// element type.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl TensorType {
    pub fn new(shape: &[usize], dtype: DType) -> TensorType {
        TensorType {
            shape: shape.to_vec(),
            dtype,
        }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        crate::numel(&self.shape)
    }

    pub fn with_shape(&self, shape: Vec<usize>) -> TensorType {
        TensorType {
            shape,
            dtype: self.dtype,
        }
    }

    pub fn with_dtype(&self, dtype: DType) -> TensorType {
        TensorType {
            shape: self.shape.clone(),
            dtype,
        }
    }
}

/// `f32[8,32,26,26]`; a scalar prints as `f32[]`.
impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype.short_name())?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Comma-separated list of types, used in error messages.
pub fn types_list(types: &[TensorType]) -> String {
    types
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum IrError {
    /// Type inference rejected an op applied to these operand types.
    #[error("{op}({}): {msg}", types_list(operands))]
    Type {
        op: String,
        operands: Vec<TensorType>,
        msg: String,
    },
    /// Misuse of the graph builder (bad operand value, duplicate input name...).
    #[error("graph builder: {0}")]
    Builder(String),
    /// The verifier found a malformed graph.
    #[error("graph verification failed: {0}")]
    Verify(String),
    /// A pass failed, or left a graph that does not verify.
    #[error("pass `{pass}` failed: {source}")]
    Pass {
        pass: String,
        #[source]
        source: Box<IrError>,
    },
    /// A graph file has a format version this build does not know.
    #[error("unsupported graph format version {found} (this build reads version {supported})")]
    Version { found: String, supported: u32 },
    /// A graph file could not be parsed.
    #[error("graph file: {0}")]
    Format(String),
}

pub type Result<T> = std::result::Result<T, IrError>;

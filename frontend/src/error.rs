//! kiln's error type. Every fallible public op returns `kiln::Result`; the
//! message names the op and the shapes/dtypes involved (and, from a module's
//! `call`, the module scope).

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// An op rejected its operands: `matmul: shapes [2, 3] and [4, 5] ...`.
    #[error("{op}: {msg}")]
    Op { op: String, msg: String },
    /// Misuse of autograd (backward twice, no grad_fn, ...).
    #[error("autograd: {0}")]
    Autograd(String),
    /// An error raised inside a module's forward, with the module's scope
    /// (`net.3 (Linear)`).
    #[error("in {scope}: {source}")]
    Module {
        scope: String,
        #[source]
        source: Box<Error>,
    },
    /// A missing attribute, submodule, parameter or key.
    #[error("{0}")]
    Lookup(String),
    /// `load_state_dict` rejected a state dict; `errors` lists every
    /// offending key (missing, unexpected, wrong shape, wrong dtype), in
    /// PyTorch's wording. The module was left unchanged.
    #[error("Error(s) in loading state_dict for {module}:\n\t{}", errors.join("\n\t"))]
    StateDict { module: String, errors: Vec<String> },
    /// A file that could not be parsed or does not match what it should hold.
    #[error("{0}")]
    Format(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn op(op: impl Into<String>, msg: impl Into<String>) -> Error {
        Error::Op {
            op: op.into(),
            msg: msg.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Early-returns an `Error::Op` when the condition fails.
#[macro_export]
macro_rules! ensure_op {
    ($cond:expr, $op:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::Error::op($op, format!($($fmt)+)));
        }
    };
}

//! The runtime's error type: failures while running a graph (wrapped with
//! the node being executed), bad inputs or bindings, and unreadable or
//! inconsistent graph files (wrapped with the path). Converts into
//! `kiln_frontend::Error` so `?` works in functions returning `kiln::Result`.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// An eager op failed while the interpreter ran this node
    /// (`%5 = relu(%4) : f32[2,3]  # Net/ReLU[act]`).
    #[error("while executing {node}: {source}")]
    Exec {
        node: String,
        #[source]
        source: Box<Error>,
    },
    /// A user input does not match the graph (count, shape or dtype).
    #[error("{0}")]
    Input(String),
    /// A parameter or buffer could not be bound, or does not match the graph.
    #[error("{0}")]
    Binding(String),
    /// A graph file is unreadable, corrupt or inconsistent.
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error(transparent)]
    Tensor(#[from] kiln_frontend::Error),
    #[error(transparent)]
    Ir(#[from] kiln_ir::IrError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for kiln_frontend::Error {
    fn from(e: Error) -> kiln_frontend::Error {
        match e {
            Error::Tensor(t) => t,
            Error::Io(io) => kiln_frontend::Error::Io(io),
            e => kiln_frontend::Error::Format(e.to_string()),
        }
    }
}

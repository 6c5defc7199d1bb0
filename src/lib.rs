pub use kiln_frontend::*;

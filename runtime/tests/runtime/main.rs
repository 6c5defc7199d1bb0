//! Runtime tests: the interpreter against eager ops and the f64 reference
//! evaluator, passes keep interpreter outputs, TracedModule's live binding
//! and buffer write-back, export/load round trips and every corruption.

mod common;
mod export;
mod interp;
mod passes;
mod traced;

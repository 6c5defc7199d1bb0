//! kiln-frontend: what users program against. `Tensor` (strided views over
//! shared storage, dtypes, devices), eager ops that call the kiln-cpu kernels,
//! reverse-mode autograd with PyTorch's semantics (grad_fn names, hooks,
//! retain_grad, accumulation, `autograd::grad`), and, as the nn issue lands,
//! `Module`, layers, optimizers, serialization and training checkpoints. It depends on kiln-ir and
//! the backends, never on kiln-runtime.

pub mod autograd;
pub mod checkpoint;
pub mod device;
pub mod error;
mod format;
pub mod hooks;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod random;
pub mod tensor;
pub mod testing;
pub mod trace;

pub use autograd::{is_grad_enabled, no_grad, set_grad_enabled, NoGradGuard};
pub use checkpoint::{load_checkpoint, save_checkpoint, Checkpoint};
pub use device::Device;
pub use error::{Error, Result};
pub use hooks::RemovableHandle;
pub use kiln_ir::DType;
pub use random::manual_seed;
pub use tensor::Tensor;

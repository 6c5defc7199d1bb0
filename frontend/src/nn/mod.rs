//! `nn`: PyTorch's `torch.nn` — the `Module` trait and its registry
//! (`ModuleCore`), hooks, `state_dict`/`load_state_dict`/safetensors,
//! containers (Sequential, ModuleList, ModuleDict), layers (Linear, Conv2d,
//! ConvTranspose2d, pooling, batch/layer norm, activations), losses,
//! `nn::init` and `nn::functional`.
//!
//! A user module holds a `ModuleCore` and reaches its parts by name:
//!
//! ```
//! use kiln_frontend::nn::prelude::*;
//! use kiln_frontend::{DType, Result, Tensor};
//! use std::sync::Arc;
//!
//! struct Block { core: ModuleCore }
//! impl Block {
//!     fn new() -> Result<Block> {
//!         let core = ModuleCore::new("Block");
//!         core.add_module("act", Some(Arc::new(ReLU::new())))?;
//!         core.register_parameter("scale", Some(Parameter::new(Tensor::ones(&[3], DType::F32))?))?;
//!         Ok(Block { core })
//!     }
//! }
//! impl Module for Block {
//!     fn core(&self) -> &ModuleCore { &self.core }
//!     fn forward(&self, x: &Tensor) -> Result<Tensor> {
//!         let y = x.mul(&self.core.param("scale")?)?;
//!         self.core.child("act")?.call(&y)
//!     }
//! }
//!
//! // Replace every ReLU by a LeakyReLU, as `setattr(module, name, nn.LeakyReLU())`:
//! fn replace_relu(m: &dyn Module) -> Result<()> {
//!     for (name, child) in m.named_children() {
//!         if child.is::<ReLU>() {
//!             m.core().set_child(&name, Arc::new(LeakyReLU::new(0.01)))?;
//!         } else {
//!             replace_relu(&*child)?;
//!         }
//!     }
//!     Ok(())
//! }
//! let b = Block::new().unwrap();
//! replace_relu(&b).unwrap();
//! assert_eq!(b.to_repr(), "Block(\n  (act): LeakyReLU(negative_slope=0.01)\n)");
//! ```

pub mod container;
pub mod conv;
pub mod core;
pub mod functional;
pub mod hooks;
pub mod init;
pub mod layers;
pub mod linear;
pub mod loss;
pub mod module;
pub mod norm;
pub mod pool;
pub mod state_dict;

pub use self::core::{structure_epoch, ModuleCore};
pub use container::{ModuleDict, ModuleList, Sequential};
pub use conv::{Conv2d, Conv2dOptions, ConvTranspose2d, ConvTranspose2dOptions, Size2};
pub use functional::Reduction;
pub use hooks::{
    global_hook_ids, register_module_forward_hook, register_module_forward_pre_hook,
    register_module_full_backward_hook,
};
pub use layers::{
    Dropout, Flatten, Identity, LeakyReLU, Parameter, ReLU, Sigmoid, Softmax, Tanh, GELU,
};
pub use linear::Linear;
pub use loss::{BCEWithLogitsLoss, CrossEntropyLoss, L1Loss, MSELoss};
pub use module::{call_with_forward, downcast_arc, Module, ModuleBase, ModuleExt, ModuleRef};
pub use norm::{BatchNorm1d, BatchNorm2d, BatchNormOptions, LayerNorm};
pub use pool::{AvgPool2d, MaxPool2d};
pub use state_dict::{IncompatibleKeys, StateDict};

/// `use kiln_frontend::nn::prelude::*;` brings the traits and layers.
pub mod prelude {
    pub use super::container::{ModuleDict, ModuleList, Sequential};
    pub use super::conv::{Conv2d, Conv2dOptions, ConvTranspose2d, ConvTranspose2dOptions, Size2};
    pub use super::core::ModuleCore;
    pub use super::layers::*;
    pub use super::linear::Linear;
    pub use super::loss::*;
    pub use super::module::{Module, ModuleBase, ModuleExt, ModuleRef};
    pub use super::norm::{BatchNorm1d, BatchNorm2d, BatchNormOptions, LayerNorm};
    pub use super::pool::{AvgPool2d, MaxPool2d};
    pub use super::state_dict::{IncompatibleKeys, StateDict};
}

//! Loss modules: `MSELoss`, `L1Loss`, `BCEWithLogitsLoss`. A loss takes two
//! tensors (input, target), so it is not a `Module` here (kiln modules map
//! one tensor to one tensor); each has `forward(input, target)` and PyTorch's
//! `repr` (`MSELoss()`). CrossEntropyLoss waits for `log_softmax`.

use super::functional::{self, Reduction};
use crate::error::Result;
use crate::tensor::Tensor;

/// `nn.MSELoss(reduction='mean')`.
#[derive(Clone, Debug, Default)]
pub struct MSELoss {
    pub reduction: Reduction,
}

impl MSELoss {
    pub fn new(reduction: Reduction) -> MSELoss {
        MSELoss { reduction }
    }
    pub fn forward(&self, input: &Tensor, target: &Tensor) -> Result<Tensor> {
        functional::mse_loss(input, target, self.reduction)
    }
    pub fn repr(&self) -> String {
        "MSELoss()".into()
    }
}

/// `nn.L1Loss(reduction='mean')`.
#[derive(Clone, Debug, Default)]
pub struct L1Loss {
    pub reduction: Reduction,
}

impl L1Loss {
    pub fn new(reduction: Reduction) -> L1Loss {
        L1Loss { reduction }
    }
    pub fn forward(&self, input: &Tensor, target: &Tensor) -> Result<Tensor> {
        functional::l1_loss(input, target, self.reduction)
    }
    pub fn repr(&self) -> String {
        "L1Loss()".into()
    }
}

/// `nn.BCEWithLogitsLoss(weight=None, reduction='mean', pos_weight=None)`.
#[derive(Clone, Debug, Default)]
pub struct BCEWithLogitsLoss {
    pub weight: Option<Tensor>,
    pub pos_weight: Option<Tensor>,
    pub reduction: Reduction,
}

impl BCEWithLogitsLoss {
    pub fn new(reduction: Reduction) -> BCEWithLogitsLoss {
        BCEWithLogitsLoss {
            weight: None,
            pos_weight: None,
            reduction,
        }
    }
    pub fn forward(&self, input: &Tensor, target: &Tensor) -> Result<Tensor> {
        functional::binary_cross_entropy_with_logits(
            input,
            target,
            self.weight.as_ref(),
            self.pos_weight.as_ref(),
            self.reduction,
        )
    }
    pub fn repr(&self) -> String {
        "BCEWithLogitsLoss()".into()
    }
}

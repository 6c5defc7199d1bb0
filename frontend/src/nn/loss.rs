//! Loss modules: `MSELoss`, `L1Loss`, `BCEWithLogitsLoss`,
//! `CrossEntropyLoss`. A loss takes two tensors (input, target), so it is
//! not a `Module` here (kiln modules map one tensor to one tensor); each has
//! `forward(input, target)` and PyTorch's `repr` (`MSELoss()`).

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

/// `nn.CrossEntropyLoss(weight=None, ignore_index=-100, reduction='mean',
/// label_smoothing=0.0)`: see `functional::cross_entropy` for class-index
/// and class-probability targets.
///
/// ```
/// use kiln_frontend::nn::CrossEntropyLoss;
/// use kiln_frontend::Tensor;
/// let logits = Tensor::from_vec(vec![2.0f32, 0.5, -1.0, 0.0, 1.0, 3.0], &[2, 3]).unwrap();
/// let target = Tensor::from_vec(vec![0i64, 2], &[2]).unwrap();
/// let loss = CrossEntropyLoss::new().forward(&logits, &target).unwrap();
/// assert!(loss.item().unwrap() > 0.0);
/// ```
#[derive(Clone, Debug)]
pub struct CrossEntropyLoss {
    pub weight: Option<Tensor>,
    pub ignore_index: i64,
    pub reduction: Reduction,
    pub label_smoothing: f64,
}

impl Default for CrossEntropyLoss {
    fn default() -> Self {
        CrossEntropyLoss {
            weight: None,
            ignore_index: -100,
            reduction: Reduction::Mean,
            label_smoothing: 0.0,
        }
    }
}

impl CrossEntropyLoss {
    /// PyTorch's defaults.
    pub fn new() -> CrossEntropyLoss {
        CrossEntropyLoss::default()
    }
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }
    pub fn with_label_smoothing(mut self, label_smoothing: f64) -> Self {
        self.label_smoothing = label_smoothing;
        self
    }
    pub fn with_weight(mut self, weight: Tensor) -> Self {
        self.weight = Some(weight);
        self
    }
    pub fn with_ignore_index(mut self, ignore_index: i64) -> Self {
        self.ignore_index = ignore_index;
        self
    }
    pub fn forward(&self, input: &Tensor, target: &Tensor) -> Result<Tensor> {
        functional::cross_entropy(
            input,
            target,
            self.reduction,
            self.label_smoothing,
            self.weight.as_ref(),
            self.ignore_index,
        )
    }
    /// `CrossEntropyLoss()`; PyTorch's `repr` shows no arguments (the loss
    /// has no `extra_repr`), so this is the same for every setting.
    pub fn repr(&self) -> String {
        "CrossEntropyLoss()".into()
    }
}

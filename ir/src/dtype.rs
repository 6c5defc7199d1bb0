//! Element types, with PyTorch's names and type-promotion rules.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Element type of a tensor or graph value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DType {
    Bool,
    I64,
    F16,
    BF16,
    F32,
    F64,
}

impl DType {
    pub const ALL: [DType; 6] = [
        DType::Bool,
        DType::I64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool => 1,
            DType::I64 | DType::F64 => 8,
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// PyTorch's name, as printed by `tensor.dtype` (`torch.float32`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::Bool => "torch.bool",
            DType::I64 => "torch.int64",
            DType::F16 => "torch.float16",
            DType::BF16 => "torch.bfloat16",
            DType::F32 => "torch.float32",
            DType::F64 => "torch.float64",
        }
    }

    /// Short name used by the IR printer (`f32`, `i64`, `bool`...).
    pub fn short_name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::I64 => "i64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::F64 => "f64",
        }
    }

    /// The dtype name used in safetensors headers.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::I64 => "I64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
        }
    }

    /// Category used by type promotion: bool < integer < floating.
    fn category(self) -> u8 {
        match self {
            DType::Bool => 0,
            DType::I64 => 1,
            _ => 2,
        }
    }

    /// Result dtype of a binary op between two tensors (`torch.result_type`
    /// for two dimensioned tensors). f16 with bf16 promotes to f32, as in PyTorch.
    pub fn promote(a: DType, b: DType) -> DType {
        if a == b {
            return a;
        }
        match (a, b) {
            (DType::F16, DType::BF16) | (DType::BF16, DType::F16) => DType::F32,
            _ => {
                if a.category() != b.category() {
                    if a.category() > b.category() {
                        a
                    } else {
                        b
                    }
                } else {
                    a.max(b)
                }
            }
        }
    }

    /// Result dtype of a tensor op with a Python-style scalar: the tensor's
    /// dtype unless the scalar is of a higher category (an integer tensor
    /// times 0.5 gives the default float dtype, f32).
    pub fn promote_scalar(t: DType, scalar_is_float: bool) -> DType {
        if scalar_is_float && !t.is_float() {
            DType::F32
        } else if !scalar_is_float && t == DType::Bool {
            DType::I64
        } else {
            t
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.torch_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promotion_matches_torch_result_type() {
        assert_eq!(DType::promote(DType::F32, DType::F64), DType::F64);
        assert_eq!(DType::promote(DType::I64, DType::F16), DType::F16);
        assert_eq!(DType::promote(DType::F16, DType::BF16), DType::F32);
        assert_eq!(DType::promote(DType::Bool, DType::I64), DType::I64);
        assert_eq!(DType::promote(DType::Bool, DType::F32), DType::F32);
        assert_eq!(DType::promote_scalar(DType::I64, true), DType::F32);
        assert_eq!(DType::promote_scalar(DType::F16, true), DType::F16);
        assert_eq!(DType::promote_scalar(DType::Bool, false), DType::I64);
    }
}

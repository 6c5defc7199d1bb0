//! `CpuStorage`: a tensor's flat buffer on the host, one variant per dtype.

use crate::element::Element;
use half::{bf16, f16};
use kiln_ir::DType;

#[derive(Clone, Debug, PartialEq)]
pub enum CpuStorage {
    Bool(Vec<bool>),
    I64(Vec<i64>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// Runs `$body` with `$v` bound to the storage's Vec, whatever its dtype.
#[macro_export]
macro_rules! with_storage {
    ($s:expr, $v:ident => $body:expr) => {
        match $s {
            $crate::CpuStorage::Bool($v) => $body,
            $crate::CpuStorage::I64($v) => $body,
            $crate::CpuStorage::F16($v) => $body,
            $crate::CpuStorage::BF16($v) => $body,
            $crate::CpuStorage::F32($v) => $body,
            $crate::CpuStorage::F64($v) => $body,
        }
    };
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::Bool(_) => DType::Bool,
            CpuStorage::I64(_) => DType::I64,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F64(_) => DType::F64,
        }
    }

    pub fn len(&self) -> usize {
        with_storage!(self, v => v.len())
    }

    /// Elements allocated (at least `len`).
    pub fn capacity(&self) -> usize {
        with_storage!(self, v => v.capacity())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A buffer of `n` copies of `value` (converted to `dtype`).
    pub fn full(dtype: DType, n: usize, value: f64) -> CpuStorage {
        match dtype {
            DType::Bool => CpuStorage::Bool(vec![value != 0.0; n]),
            DType::I64 => CpuStorage::I64(vec![value as i64; n]),
            DType::F16 => CpuStorage::F16(vec![f16::from_f64(value); n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::from_f64(value); n]),
            DType::F32 => CpuStorage::F32(vec![value as f32; n]),
            DType::F64 => CpuStorage::F64(vec![value; n]),
        }
    }

    pub fn zeros(dtype: DType, n: usize) -> CpuStorage {
        Self::full(dtype, n, 0.0)
    }

    /// Element `i` as f64 (for `item`, printing and tests).
    pub fn get_f64(&self, i: usize) -> f64 {
        with_storage!(self, v => v[i].as_f64())
    }

    /// Converts every element to `dtype` (floats to ints truncate toward
    /// zero, anything to bool is `!= 0`, as PyTorch's `to`).
    pub fn to_dtype(&self, dtype: DType) -> CpuStorage {
        if self.dtype() == dtype {
            return self.clone();
        }
        // Direct paths for the common float conversions keep full precision.
        match (self, dtype) {
            (CpuStorage::F32(v), DType::F16) => {
                return CpuStorage::F16(v.iter().map(|&x| f16::from_f32(x)).collect())
            }
            (CpuStorage::F32(v), DType::BF16) => {
                return CpuStorage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect())
            }
            (CpuStorage::F16(v), DType::F32) => {
                return CpuStorage::F32(v.iter().map(|x| x.to_f32()).collect())
            }
            (CpuStorage::BF16(v), DType::F32) => {
                return CpuStorage::F32(v.iter().map(|x| x.to_f32()).collect())
            }
            _ => {}
        }
        with_storage!(self, v => convert_all(v, dtype))
    }

    /// The raw little-endian bytes of the buffer (safetensors layout).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            CpuStorage::Bool(v) => v.iter().map(|&b| b as u8).collect(),
            CpuStorage::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            CpuStorage::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            CpuStorage::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            CpuStorage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            CpuStorage::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Parses little-endian bytes of `dtype`; `None` if the length is not a
    /// whole number of elements or a bool byte is not 0/1.
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> Option<CpuStorage> {
        if !bytes.len().is_multiple_of(dtype.size()) {
            return None;
        }
        fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
            b.chunks_exact(N).map(|c| c.try_into().unwrap())
        }
        Some(match dtype {
            DType::Bool => {
                if bytes.iter().any(|&b| b > 1) {
                    return None;
                }
                CpuStorage::Bool(bytes.iter().map(|&b| b == 1).collect())
            }
            DType::I64 => CpuStorage::I64(chunks::<8>(bytes).map(i64::from_le_bytes).collect()),
            DType::F16 => CpuStorage::F16(chunks::<2>(bytes).map(f16::from_le_bytes).collect()),
            DType::BF16 => CpuStorage::BF16(chunks::<2>(bytes).map(bf16::from_le_bytes).collect()),
            DType::F32 => CpuStorage::F32(chunks::<4>(bytes).map(f32::from_le_bytes).collect()),
            DType::F64 => CpuStorage::F64(chunks::<8>(bytes).map(f64::from_le_bytes).collect()),
        })
    }
}

fn convert_all<T: Element>(v: &[T], dtype: DType) -> CpuStorage {
    fn conv<T: Element, U: Element>(v: &[T]) -> CpuStorage {
        U::into_storage(v.iter().map(|x| U::from_f64(x.as_f64())).collect())
    }
    match dtype {
        DType::Bool => conv::<T, bool>(v),
        DType::I64 => conv::<T, i64>(v),
        DType::F16 => conv::<T, f16>(v),
        DType::BF16 => conv::<T, bf16>(v),
        DType::F32 => conv::<T, f32>(v),
        DType::F64 => conv::<T, f64>(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_conversion_and_bytes() {
        let s = CpuStorage::F32(vec![1.5, -2.7, 0.0]);
        assert_eq!(s.to_dtype(DType::I64), CpuStorage::I64(vec![1, -2, 0]));
        assert_eq!(
            s.to_dtype(DType::Bool),
            CpuStorage::Bool(vec![true, true, false])
        );
        let b = s.to_le_bytes();
        assert_eq!(CpuStorage::from_le_bytes(DType::F32, &b), Some(s));
        assert_eq!(CpuStorage::from_le_bytes(DType::F32, &b[..5]), None);
    }
}

//! Element traits: `Element` for every storable dtype, `Float` for the types
//! the float kernels are written for (f32 and f64; f16/bf16 compute in f32).

use crate::storage::CpuStorage;
use half::{bf16, f16};
use kiln_ir::{DType, UnaryOp};

/// A type that can live in a `CpuStorage`.
pub trait Element: Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + 'static {
    const DTYPE: DType;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
    fn into_storage(v: Vec<Self>) -> CpuStorage;
    /// The Vec inside a storage of this dtype.
    fn from_storage(s: CpuStorage) -> Option<Vec<Self>>;
    fn as_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

macro_rules! element {
    ($t:ty, $variant:ident, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn from_storage(s: CpuStorage) -> Option<Vec<Self>> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            #[allow(clippy::redundant_closure_call)]
            fn as_f64(self) -> f64 {
                ($to)(self)
            }
            #[allow(clippy::redundant_closure_call)]
            fn from_f64(v: f64) -> Self {
                ($from)(v)
            }
        }
    };
}

element!(bool, Bool, |x: bool| if x { 1.0 } else { 0.0 }, |v: f64| v
    != 0.0);
element!(i64, I64, |x: i64| x as f64, |v: f64| v as i64);
element!(f16, F16, |x: f16| x.to_f64(), f16::from_f64);
element!(bf16, BF16, |x: bf16| x.to_f64(), bf16::from_f64);
element!(f32, F32, |x: f32| x as f64, |v: f64| v as f32);
element!(f64, F64, |x: f64| x, |v: f64| v);

/// Floating types the math kernels are generic over.
pub trait Float:
    Element + num_traits::Float + std::iter::Sum + std::ops::AddAssign + std::ops::MulAssign
{
    fn erf(self) -> Self;
    fn c(v: f64) -> Self {
        Self::from_f64(v)
    }
    /// e^x by the fastest accurate route (vectorizable polynomial for f32).
    fn exp_fast(self) -> Self {
        self.exp()
    }
    /// `x[i] = e^x[i]` over a slice, vectorized where possible.
    fn exp_inplace(x: &mut [Self]) {
        for v in x.iter_mut() {
            *v = v.exp();
        }
    }
    /// A vectorized whole-slice kernel for `op`, where one exists.
    fn fast_unary(_op: UnaryOp, _x: &[Self]) -> Option<Vec<Self>> {
        None
    }
}

impl Float for f32 {
    fn erf(self) -> Self {
        crate::fastmath::erf(self)
    }
    fn exp_fast(self) -> Self {
        crate::fastmath::exp(self)
    }
    fn exp_inplace(x: &mut [Self]) {
        crate::fastmath::apply_inplace(crate::fastmath::FastFn::Exp, x)
    }
    fn fast_unary(op: UnaryOp, x: &[Self]) -> Option<Vec<Self>> {
        use crate::fastmath::{map, FastFn};
        let f = match op {
            UnaryOp::Exp => FastFn::Exp,
            UnaryOp::Sigmoid => FastFn::Sigmoid,
            UnaryOp::Tanh => FastFn::Tanh,
            UnaryOp::Erf => FastFn::Erf,
            UnaryOp::GeluErf => FastFn::Gelu,
            UnaryOp::GeluTanh => FastFn::GeluTanh,
            _ => return None,
        };
        Some(map(f, x))
    }
}

impl Float for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }
}

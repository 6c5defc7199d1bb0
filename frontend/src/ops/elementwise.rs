//! Elementwise ops: broadcasting binary ops (tensor-tensor and scalar
//! forms, `std::ops` operators), comparisons, `where`, and unary math with
//! their backwards. dtypes follow PyTorch's promotion (`DType::promote`).

use super::{broadcast_layout, float_op};
use crate::autograd::{needs_grad, record};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use kiln_cpu::elementwise as k;
use kiln_cpu::{CpuStorage, Element, Float};
use kiln_ir::{BinaryOp, DType, UnaryOp};

/// Broadcast shape of two tensors, or an error naming the op and shapes.
pub(crate) fn broadcast(op: &str, a: &Tensor, b: &Tensor) -> Result<Vec<usize>> {
    crate::device::check_cpu(op, &[a, b])?;
    kiln_ir::broadcast_shapes(&a.shape(), &b.shape()).map_err(|_| {
        Error::op(
            op,
            format!(
                "shapes {:?} and {:?} cannot be broadcast together",
                a.shape(),
                b.shape()
            ),
        )
    })
}

fn zip_typed<T: Element, U: Element>(
    a: &Tensor,
    b: &Tensor,
    shape: &[usize],
    f: impl Fn(T, T) -> U + Sync,
) -> Tensor {
    let la = broadcast_layout(&a.layout(), shape);
    let lb = broadcast_layout(&b.layout(), shape);
    let out = a.with_slice::<T, _>(|sa, _| {
        b.with_slice::<T, _>(|sb, _| k::zip_strided(sa, &la, sb, &lb, f))
    });
    Tensor::from_storage(U::into_storage(out), shape)
}

/// `torch.result_type(a, b)`: a 0-dim operand does not promote a
/// dimensioned one of the same category (f32[4] + f64[] is f32).
pub(crate) fn result_type(a: &Tensor, b: &Tensor) -> DType {
    kiln_ir::op::result_type(
        &kiln_ir::TensorType::new(&a.shape(), a.dtype()),
        &kiln_ir::TensorType::new(&b.shape(), b.dtype()),
    )
}

fn binary_typed<T: kiln_cpu::Float>(
    op: BinaryOp,
    a: &Tensor,
    b: &Tensor,
    shape: &[usize],
) -> Tensor {
    let la = broadcast_layout(&a.layout(), shape);
    let lb = broadcast_layout(&b.layout(), shape);
    let out =
        a.with_slice::<T, _>(|sa, _| b.with_slice::<T, _>(|sb, _| k::binary(op, sa, &la, sb, &lb)));
    Tensor::from_storage(T::into_storage(out), shape)
}

fn cmp_typed<T: Element + PartialOrd>(
    op: BinaryOp,
    a: &Tensor,
    b: &Tensor,
    shape: &[usize],
) -> Vec<bool> {
    let la = broadcast_layout(&a.layout(), shape);
    let lb = broadcast_layout(&b.layout(), shape);
    a.with_slice::<T, _>(|sa, _| b.with_slice::<T, _>(|sb, _| k::compare(op, sa, &la, sb, &lb)))
}

/// A binary op without autograd: broadcasting, promotion, dispatch.
pub(crate) fn binary_raw(op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let shape = broadcast(op.name(), a, b)?;
    let mut dtype = result_type(a, b);
    if matches!(op, BinaryOp::Div) && !dtype.is_float() {
        dtype = DType::F32; // true division
    }
    let (a, b) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
    if op.is_comparison() {
        let out = match dtype {
            DType::F32 => cmp_typed::<f32>(op, &a, &b, &shape),
            DType::F64 => cmp_typed::<f64>(op, &a, &b, &shape),
            DType::F16 => cmp_typed::<half::f16>(op, &a, &b, &shape),
            DType::BF16 => cmp_typed::<half::bf16>(op, &a, &b, &shape),
            DType::I64 => cmp_typed::<i64>(op, &a, &b, &shape),
            DType::Bool => cmp_typed::<bool>(op, &a, &b, &shape),
        };
        return Ok(Tensor::from_storage(CpuStorage::Bool(out), &shape));
    }
    match dtype {
        DType::F32 => Ok(binary_typed::<f32>(op, &a, &b, &shape)),
        DType::F64 => Ok(binary_typed::<f64>(op, &a, &b, &shape)),
        DType::F16 | DType::BF16 => {
            let r = binary_raw(op, &a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?)?;
            r.to_dtype(dtype)
        }
        DType::I64 => Ok(zip_typed::<i64, i64>(&a, &b, &shape, k::binary_fn_i64(op))),
        DType::Bool => match op {
            BinaryOp::Add | BinaryOp::Maximum => {
                Ok(zip_typed::<bool, bool>(&a, &b, &shape, |x, y| x || y))
            }
            BinaryOp::Mul | BinaryOp::Minimum => {
                Ok(zip_typed::<bool, bool>(&a, &b, &shape, |x, y| x && y))
            }
            _ => Err(Error::op(
                op.name(),
                format!(
                    "not supported on two bool tensors (shapes {:?} and {:?})",
                    a.shape(),
                    b.shape()
                ),
            )),
        },
    }
}

/// Gradient `g` of a broadcast result brought back to `t`'s shape and dtype.
fn grad_for(g: &Tensor, t_shape: &[usize], t_dtype: DType) -> Result<Tensor> {
    g.sum_to_size(t_shape)?.to_dtype(t_dtype)
}

impl Tensor {
    fn binary(&self, other: &Tensor, op: BinaryOp) -> Result<Tensor> {
        let out = binary_raw(op, self, other)?;
        crate::trace::record(kiln_ir::Op::Binary(op), &[self, other], &[&out]);
        if op.is_comparison() || !needs_grad(&[self, other]) {
            return Ok(out);
        }
        let (sa, sb) = (self.shape(), other.shape());
        let (da, db) = (self.dtype(), other.dtype());
        let (a, b) = (self.detach(), other.detach());
        let name = match op {
            BinaryOp::Add => "AddBackward0",
            BinaryOp::Sub => "SubBackward0",
            BinaryOp::Mul => "MulBackward0",
            BinaryOp::Div => "DivBackward0",
            BinaryOp::Pow => "PowBackward1",
            BinaryOp::Maximum => "MaximumBackward0",
            BinaryOp::Minimum => "MinimumBackward0",
            _ => unreachable!(),
        };
        let o = out.detach();
        record(name, &[self, other], &[&out], move |g, needs| {
            let g = g[0].as_ref().unwrap();
            let (ga, gb) = match op {
                BinaryOp::Add => (g.clone(), g.clone()),
                BinaryOp::Sub => (g.clone(), g.neg()?),
                BinaryOp::Mul => (
                    if needs[0] { g.mul(&b)? } else { g.clone() },
                    if needs[1] { g.mul(&a)? } else { g.clone() },
                ),
                BinaryOp::Div => (
                    if needs[0] { g.div(&b)? } else { g.clone() },
                    if needs[1] {
                        g.neg()?.mul(&o)?.div(&b)?
                    } else {
                        g.clone()
                    },
                ),
                BinaryOp::Pow => {
                    // d/da a^b = b a^(b-1); d/db a^b = a^b ln a (0 where a == 0 and b >= 0)
                    let ga = if needs[0] {
                        g.mul(&b)?.mul(&a.pow(&b.sub_scalar(1.0)?)?)?
                    } else {
                        g.clone()
                    };
                    let gb = if needs[1] {
                        let mask = a.eq_scalar(0.0)?.logical_and(&b.ge_scalar(0.0)?)?;
                        let raw = g.mul(&o)?.mul(&a.log()?)?;
                        Tensor::where_(&mask, &raw.zeros_like()?, &raw)?
                    } else {
                        g.clone()
                    };
                    (ga, gb)
                }
                BinaryOp::Maximum | BinaryOp::Minimum => {
                    // grad/2 on ties, as PyTorch
                    let tie = a.eq(&b)?;
                    let a_wins = if op == BinaryOp::Maximum {
                        a.gt(&b)?
                    } else {
                        a.lt(&b)?
                    };
                    let half = g.mul_scalar(0.5)?;
                    let zero = g.zeros_like()?;
                    let ga = Tensor::where_(&tie, &half, &Tensor::where_(&a_wins, g, &zero)?)?;
                    let gb = Tensor::where_(&tie, &half, &Tensor::where_(&a_wins, &zero, g)?)?;
                    (ga, gb)
                }
                _ => unreachable!(),
            };
            Ok(vec![
                if needs[0] {
                    Some(grad_for(&ga, &sa, da)?)
                } else {
                    None
                },
                if needs[1] {
                    Some(grad_for(&gb, &sb, db)?)
                } else {
                    None
                },
            ])
        });
        Ok(out)
    }

    pub fn add(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Add)
    }
    pub fn sub(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Sub)
    }
    pub fn mul(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Mul)
    }
    pub fn div(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Div)
    }
    pub fn pow(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Pow)
    }
    pub fn maximum(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Maximum)
    }
    pub fn minimum(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Minimum)
    }
    pub fn eq(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Eq)
    }
    pub fn ne(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Ne)
    }
    pub fn lt(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Lt)
    }
    pub fn le(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Le)
    }
    pub fn gt(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Gt)
    }
    pub fn ge(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Ge)
    }

    /// Scalar comparison forms.
    fn cmp_scalar(&self, v: f64, op: BinaryOp) -> Result<Tensor> {
        let s =
            Tensor::scalar(v).to_dtype(DType::promote_scalar(self.dtype(), v.fract() != 0.0))?;
        let out = binary_raw(op, self, &s)?;
        crate::trace::record(kiln_ir::Op::Binary(op), &[self, &s], &[&out]);
        Ok(out)
    }
    pub fn eq_scalar(&self, v: f64) -> Result<Tensor> {
        self.cmp_scalar(v, BinaryOp::Eq)
    }
    pub fn ne_scalar(&self, v: f64) -> Result<Tensor> {
        self.cmp_scalar(v, BinaryOp::Ne)
    }
    pub fn lt_scalar(&self, v: f64) -> Result<Tensor> {
        self.cmp_scalar(v, BinaryOp::Lt)
    }
    pub fn le_scalar(&self, v: f64) -> Result<Tensor> {
        self.cmp_scalar(v, BinaryOp::Le)
    }
    pub fn gt_scalar(&self, v: f64) -> Result<Tensor> {
        self.cmp_scalar(v, BinaryOp::Gt)
    }
    pub fn ge_scalar(&self, v: f64) -> Result<Tensor> {
        self.cmp_scalar(v, BinaryOp::Ge)
    }

    /// Elementwise AND of two bool tensors.
    pub fn logical_and(&self, other: &Tensor) -> Result<Tensor> {
        let shape = broadcast("logical_and", self, other)?;
        let (a, b) = (self.to_dtype(DType::Bool)?, other.to_dtype(DType::Bool)?);
        Ok(zip_typed::<bool, bool>(&a, &b, &shape, |x, y| x && y))
    }

    /// Elementwise NOT of a bool tensor.
    pub fn logical_not(&self) -> Result<Tensor> {
        crate::device::check_cpu("logical_not", &[self])?;
        let a = self.to_dtype(DType::Bool)?;
        let v = a.with_contiguous::<bool, _>(|s| k::map(s, |x: bool| !x));
        Ok(Tensor::from_storage(CpuStorage::Bool(v), &self.shape()))
    }

    /// `torch.where(cond, a, b)` with broadcasting of all three.
    pub fn where_(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        crate::device::check_cpu("where", &[cond])?;
        let s1 = broadcast("where", a, b)?;
        let shape = kiln_ir::broadcast_shapes(&cond.shape(), &s1).map_err(|_| {
            Error::op(
                "where",
                format!(
                    "condition of shape {:?} cannot be broadcast with {:?}",
                    cond.shape(),
                    s1
                ),
            )
        })?;
        if cond.dtype() != DType::Bool {
            return Err(Error::op(
                "where",
                format!("condition must be a bool tensor, got {}", cond.dtype()),
            ));
        }
        let dtype = result_type(a, b);
        let (ac, bc) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
        let lc = broadcast_layout(&cond.layout(), &shape);
        let la = broadcast_layout(&ac.layout(), &shape);
        let lb = broadcast_layout(&bc.layout(), &shape);
        fn run<T: Element>(
            c: &Tensor,
            lc: &kiln_cpu::Layout,
            a: &Tensor,
            la: &kiln_cpu::Layout,
            b: &Tensor,
            lb: &kiln_cpu::Layout,
        ) -> CpuStorage {
            let v = c.with_slice::<bool, _>(|sc, _| {
                a.with_slice::<T, _>(|sa, _| {
                    b.with_slice::<T, _>(|sb, _| k::where_strided(sc, lc, sa, la, sb, lb))
                })
            });
            T::into_storage(v)
        }
        let buf = match dtype {
            DType::F32 => run::<f32>(cond, &lc, &ac, &la, &bc, &lb),
            DType::F64 => run::<f64>(cond, &lc, &ac, &la, &bc, &lb),
            DType::F16 => run::<half::f16>(cond, &lc, &ac, &la, &bc, &lb),
            DType::BF16 => run::<half::bf16>(cond, &lc, &ac, &la, &bc, &lb),
            DType::I64 => run::<i64>(cond, &lc, &ac, &la, &bc, &lb),
            DType::Bool => run::<bool>(cond, &lc, &ac, &la, &bc, &lb),
        };
        let out = Tensor::from_storage(buf, &shape);
        crate::trace::record(kiln_ir::Op::Where, &[cond, a, b], &[&out]);
        if needs_grad(&[a, b]) {
            let c = cond.detach();
            let (sa, sb, da, db) = (a.shape(), b.shape(), a.dtype(), b.dtype());
            record("WhereBackward0", &[a, b], &[&out], move |g, needs| {
                let g = g[0].as_ref().unwrap();
                let z = g.zeros_like()?;
                Ok(vec![
                    if needs[0] {
                        Some(grad_for(&Tensor::where_(&c, g, &z)?, &sa, da)?)
                    } else {
                        None
                    },
                    if needs[1] {
                        Some(grad_for(&Tensor::where_(&c, &z, g)?, &sb, db)?)
                    } else {
                        None
                    },
                ])
            });
        }
        Ok(out)
    }

    // ------------------------------------------------------------ scalar forms

    /// Applies a unary kernel, promoting integer inputs to f32 (or keeping
    /// i64 for ops closed over integers).
    fn unary_raw(&self, op: UnaryOp) -> Result<Tensor> {
        crate::device::check_cpu(op.name(), &[self])?;
        let shape = self.shape();
        match self.dtype() {
            DType::I64 | DType::Bool => {
                let int_closed = matches!(
                    op,
                    UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu | UnaryOp::Square | UnaryOp::Sign
                ) || matches!(op, UnaryOp::AddScalar(s) | UnaryOp::MulScalar(s) | UnaryOp::RSubScalar(s) if s.fract() == 0.0)
                    || matches!(op, UnaryOp::Clamp(lo, hi) if lo.is_none_or(|v| v.fract() == 0.0) && hi.is_none_or(|v| v.fract() == 0.0));
                if int_closed {
                    let x = self.to_dtype(DType::I64)?;
                    let f = k::unary_fn::<f64>(op);
                    let v = x.with_contiguous::<i64, _>(|s| k::map(s, |v: i64| f(v as f64) as i64));
                    Ok(Tensor::from_storage(CpuStorage::I64(v), &shape))
                } else {
                    self.to_dtype(DType::F32)?.unary_raw(op)
                }
            }
            _ => float_op(
                op.name(),
                self,
                &shape,
                |s| k::unary(op, s),
                |s| k::unary(op, s),
            ),
        }
    }

    /// A unary op with its backward. `save_output` tells whether the
    /// derivative is computed from the output (exp, tanh...) or the input.
    fn unary(&self, op: UnaryOp, name: &'static str) -> Result<Tensor> {
        let out = self.unary_raw(op)?;
        crate::trace::record(kiln_ir::Op::Unary(op), &[self], &[&out]);
        if needs_grad(&[self]) {
            let saved = if saves_output(op) {
                out.detach()
            } else {
                self.detach()
            };
            let dtype = self.dtype();
            if let UnaryOp::AddScalar(_) | UnaryOp::MulScalar(_) = op {
                // `x + 1`, `x * 2`, `x / 2`: PyTorch wraps the number in a
                // tensor, so the node has two inputs, the second without a
                // gradient: next_functions ((<x's node>, 0), (None, 0)).
                // The backward is a tensor op (differentiable again).
                let number = Tensor::scalar(0.0f64);
                record(name, &[self, &number], &[&out], move |g, _| {
                    let g = g[0].as_ref().unwrap();
                    let gi = match op {
                        UnaryOp::MulScalar(m) => g.mul_scalar(m)?,
                        _ => g.clone(),
                    };
                    Ok(vec![Some(gi.to_dtype(dtype)?), None])
                });
                return Ok(out);
            }
            record(name, &[self], &[&out], move |g, _| {
                let g = g[0].as_ref().unwrap();
                Ok(vec![Some(unary_backward(op, &saved, g)?.to_dtype(dtype)?)])
            });
        }
        Ok(out)
    }

    pub fn neg(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Neg, "NegBackward0")
    }
    pub fn abs(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Abs, "AbsBackward0")
    }
    pub fn exp(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Exp, "ExpBackward0")
    }
    pub fn log(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Log, "LogBackward0")
    }
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sqrt, "SqrtBackward0")
    }
    pub fn rsqrt(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Rsqrt, "RsqrtBackward0")
    }
    pub fn sin(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sin, "SinBackward0")
    }
    pub fn cos(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Cos, "CosBackward0")
    }
    pub fn tanh(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Tanh, "TanhBackward0")
    }
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sigmoid, "SigmoidBackward0")
    }
    pub fn relu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Relu, "ReluBackward0")
    }
    pub fn leaky_relu(&self, negative_slope: f64) -> Result<Tensor> {
        self.unary(UnaryOp::LeakyRelu(negative_slope), "LeakyReluBackward0")
    }
    /// `gelu(approximate="none")`.
    pub fn gelu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::GeluErf, "GeluBackward0")
    }
    /// `gelu(approximate="tanh")`.
    pub fn gelu_tanh(&self) -> Result<Tensor> {
        self.unary(UnaryOp::GeluTanh, "GeluBackward0")
    }
    pub fn erf(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Erf, "ErfBackward0")
    }
    pub fn clamp(&self, min: Option<f64>, max: Option<f64>) -> Result<Tensor> {
        self.unary(UnaryOp::Clamp(min, max), "ClampBackward1")
    }
    pub fn square(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Square, "PowBackward0")
    }
    pub fn reciprocal(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Reciprocal, "ReciprocalBackward0")
    }
    pub fn sign(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sign, "SignBackward0")
    }
    pub fn pow_scalar(&self, p: f64) -> Result<Tensor> {
        self.unary(UnaryOp::PowScalar(p), "PowBackward0")
    }
    pub fn add_scalar(&self, s: f64) -> Result<Tensor> {
        self.unary(UnaryOp::AddScalar(s), "AddBackward0")
    }
    pub fn sub_scalar(&self, s: f64) -> Result<Tensor> {
        self.unary(UnaryOp::AddScalar(-s), "SubBackward0")
    }
    pub fn mul_scalar(&self, s: f64) -> Result<Tensor> {
        self.unary(UnaryOp::MulScalar(s), "MulBackward0")
    }
    pub fn div_scalar(&self, s: f64) -> Result<Tensor> {
        self.unary(UnaryOp::MulScalar(1.0 / s), "DivBackward0")
    }
    /// `s - self`.
    pub fn rsub_scalar(&self, s: f64) -> Result<Tensor> {
        self.unary(UnaryOp::RSubScalar(s), "RsubBackward1")
    }
    /// `s / self`.
    pub fn rdiv_scalar(&self, s: f64) -> Result<Tensor> {
        self.unary(UnaryOp::RDivScalar(s), "MulBackward0")
    }
}

/// Whether the backward of `op` is computed from its output.
fn saves_output(op: UnaryOp) -> bool {
    matches!(
        op,
        UnaryOp::Exp
            | UnaryOp::Sqrt
            | UnaryOp::Rsqrt
            | UnaryOp::Tanh
            | UnaryOp::Sigmoid
            | UnaryOp::Relu
            | UnaryOp::Reciprocal
            | UnaryOp::RDivScalar(_)
    )
}

/// d op / d x at the saved value (input or output, per `saves_output`).
fn derivative<T: Float>(op: UnaryOp, s: T) -> T {
    let one = T::one();
    let zero = T::zero();
    match op {
        UnaryOp::Neg => -one,
        UnaryOp::Abs | UnaryOp::Sign => {
            if let UnaryOp::Sign = op {
                zero
            } else if s > zero {
                one
            } else if s < zero {
                -one
            } else {
                zero
            }
        }
        UnaryOp::Exp => s,
        UnaryOp::Log => one / s,
        UnaryOp::Sqrt => T::c(0.5) / s,
        UnaryOp::Rsqrt => T::c(-0.5) * s * s * s,
        UnaryOp::Sin => s.cos(),
        UnaryOp::Cos => -s.sin(),
        UnaryOp::Tanh => one - s * s,
        UnaryOp::Sigmoid => s * (one - s),
        UnaryOp::Relu | UnaryOp::Step => {
            if s > zero {
                one
            } else {
                zero
            }
        }
        UnaryOp::LeakyRelu(a) => {
            if s > zero {
                one
            } else {
                T::c(a)
            }
        }
        UnaryOp::GeluErf => {
            let cdf = T::c(0.5) * (one + (s * T::c(std::f64::consts::FRAC_1_SQRT_2)).erf());
            let pdf = (T::c(-0.5) * s * s).exp() * T::c(0.398_942_280_401_432_7);
            cdf + s * pdf
        }
        UnaryOp::GeluTanh => {
            let k0 = T::c(0.797_884_560_802_865_4);
            let k1 = T::c(0.044715);
            let inner = k0 * (s + k1 * s * s * s);
            let t = inner.tanh();
            let dinner = k0 * (one + T::c(3.0) * k1 * s * s);
            T::c(0.5) * (one + t) + T::c(0.5) * s * (one - t * t) * dinner
        }
        UnaryOp::Erf => T::c(std::f64::consts::FRAC_2_SQRT_PI) * (-(s * s)).exp(),
        UnaryOp::Clamp(lo, hi) => {
            let below = lo.is_some_and(|l| s < T::c(l));
            let above = hi.is_some_and(|h| s > T::c(h));
            if below || above {
                zero
            } else {
                one
            }
        }
        UnaryOp::PowScalar(p) => {
            if p == 0.0 {
                zero
            } else {
                T::c(p) * s.powf(T::c(p - 1.0))
            }
        }
        UnaryOp::RPowScalar(b) => T::c(b).powf(s) * T::c(b.ln()),
        UnaryOp::AddScalar(_) => one,
        UnaryOp::MulScalar(m) => T::c(m),
        UnaryOp::RSubScalar(_) => -one,
        // y = c/x: dy/dx = -c/x^2 = -y^2/c
        UnaryOp::RDivScalar(c) => -(s * s) / T::c(c),
        UnaryOp::Square => T::c(2.0) * s,
        UnaryOp::Reciprocal => -(s * s),
    }
}

/// `g * op'(saved)` in one fused pass. Differentiating this again is not
/// supported and says so (rather than silently giving zero).
fn unary_backward(op: UnaryOp, saved: &Tensor, g: &Tensor) -> Result<Tensor> {
    let dtype = DType::promote(saved.dtype(), g.dtype());
    let dtype = if dtype.is_float() { dtype } else { DType::F32 };
    let (s, gg) = (saved.to_dtype(dtype)?, g.to_dtype(dtype)?);
    let shape = s.shape();
    fn run<T: Float>(op: UnaryOp, s: &Tensor, g: &Tensor, shape: &[usize]) -> Vec<T> {
        let ls = kiln_cpu::Layout::contiguous(shape);
        let sv = s.contiguous_vec::<T>();
        let gv = g.contiguous_vec::<T>();
        k::zip_strided(&sv, &ls, &gv, &ls, move |x, g| g * derivative::<T>(op, x))
    }
    let out = match dtype {
        DType::F64 => {
            Tensor::from_storage(CpuStorage::F64(run::<f64>(op, &s, &gg, &shape)), &shape)
        }
        DType::F32 => {
            Tensor::from_storage(CpuStorage::F32(run::<f32>(op, &s, &gg, &shape)), &shape)
        }
        _ => {
            let r = unary_backward(op, &s.to_dtype(DType::F32)?, &gg.to_dtype(DType::F32)?)?;
            return r.to_dtype(dtype);
        }
    };
    crate::autograd::record_no_double_backward(op.name(), &[saved, g], &[&out]);
    Ok(out)
}

// ------------------------------------------------------------ std::ops

macro_rules! binop {
    ($trait:ident, $method:ident, $f:ident, $fs:ident) => {
        impl std::ops::$trait<&Tensor> for &Tensor {
            type Output = Tensor;
            fn $method(self, rhs: &Tensor) -> Tensor {
                self.$f(rhs).unwrap_or_else(|e| panic!("{e}"))
            }
        }
        impl std::ops::$trait<Tensor> for Tensor {
            type Output = Tensor;
            fn $method(self, rhs: Tensor) -> Tensor {
                (&self).$f(&rhs).unwrap_or_else(|e| panic!("{e}"))
            }
        }
        impl std::ops::$trait<&Tensor> for Tensor {
            type Output = Tensor;
            fn $method(self, rhs: &Tensor) -> Tensor {
                (&self).$f(rhs).unwrap_or_else(|e| panic!("{e}"))
            }
        }
        impl std::ops::$trait<f64> for &Tensor {
            type Output = Tensor;
            fn $method(self, rhs: f64) -> Tensor {
                self.$fs(rhs).unwrap_or_else(|e| panic!("{e}"))
            }
        }
        impl std::ops::$trait<f64> for Tensor {
            type Output = Tensor;
            fn $method(self, rhs: f64) -> Tensor {
                (&self).$fs(rhs).unwrap_or_else(|e| panic!("{e}"))
            }
        }
    };
}

binop!(Add, add, add, add_scalar);
binop!(Sub, sub, sub, sub_scalar);
binop!(Mul, mul, mul, mul_scalar);
binop!(Div, div, div, div_scalar);

impl std::ops::Neg for &Tensor {
    type Output = Tensor;
    fn neg(self) -> Tensor {
        Tensor::neg(self).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl std::ops::Neg for Tensor {
    type Output = Tensor;
    fn neg(self) -> Tensor {
        Tensor::neg(&self).unwrap_or_else(|e| panic!("{e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_add_and_grad_names() {
        let a = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
        let b = Tensor::from_vec(vec![10.0f32, 20.0, 30.0], &[3])
            .unwrap()
            .requires_grad_(true)
            .unwrap();
        let c = (&a + &b).mul_scalar(2.0).unwrap();
        assert_eq!(c.to_vec::<f32>(), vec![22.0, 44.0, 66.0, 28.0, 50.0, 72.0]);
        assert_eq!(c.grad_fn_name().as_deref(), Some("MulBackward0"));
        c.sum().unwrap().backward().unwrap();
        assert_eq!(b.grad().unwrap().to_vec::<f32>(), vec![4.0, 4.0, 4.0]);
        let err = a
            .add(&Tensor::zeros(&[2], DType::F32))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[2, 3]") && err.contains("[2]") && err.starts_with("add"),
            "{err}"
        );
    }

    #[test]
    fn zero_dim_operands_do_not_promote() {
        // (torch.ones(4) + torch.tensor(1.0, dtype=torch.float64)).dtype == torch.float32
        let a = Tensor::ones(&[4], DType::F32);
        let s = Tensor::scalar(1.0f64);
        assert_eq!(a.add(&s).unwrap().dtype(), DType::F32);
        // (torch.ones(4, dtype=torch.int64) + torch.tensor(1.5, dtype=torch.float64)).dtype == torch.float64
        let i = Tensor::ones(&[4], DType::I64);
        assert_eq!(i.add(&s).unwrap().dtype(), DType::F64);
    }

    #[test]
    fn int_promotion() {
        let a = Tensor::from_vec(vec![1i64, 2, 3], &[3]).unwrap();
        assert_eq!(a.div_scalar(2.0).unwrap().dtype(), DType::F32);
        assert_eq!((&a / &a).dtype(), DType::F32);
        assert_eq!(a.add_scalar(1.0).unwrap().dtype(), DType::I64);
        assert_eq!(
            a.mul_scalar(0.5).unwrap().to_vec::<f32>(),
            vec![0.5, 1.0, 1.5]
        );
    }
}

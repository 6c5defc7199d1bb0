//! Elementwise kernels: unary float math, broadcasting binary ops over
//! strided operands, and `where`. Loops are split across rayon threads once
//! the output is larger than `PAR_THRESHOLD`.

use crate::element::{Element, Float};
use crate::strided::{for_each_row, Layout};
use crate::PAR_THRESHOLD;
use kiln_ir::{BinaryOp, UnaryOp};

/// `f` applied to every element of a contiguous slice.
pub fn map<T: Copy + Sync, U: Element>(x: &[T], f: impl Fn(T) -> U + Sync) -> Vec<U> {
    let mut out = crate::buffers::alloc_uninit::<U>(x.len());
    crate::par::chunks_mut(&mut out, PAR_THRESHOLD / 2, 16, |start, o| {
        let x = &x[start..start + o.len()];
        for (o, &i) in o.iter_mut().zip(x) {
            *o = f(i);
        }
    });
    out
}

/// `f` applied in place to every element of a contiguous slice.
pub fn map_inplace<T: Copy + Send + Sync>(x: &mut [T], f: impl Fn(T) -> T + Sync) {
    crate::par::chunks_mut(x, PAR_THRESHOLD / 2, 16, |_, c| {
        for v in c {
            *v = f(*v);
        }
    });
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;

/// The scalar function of a unary op (used by `unary` and by tests).
pub fn unary_fn<T: Float>(op: UnaryOp) -> impl Fn(T) -> T + Sync + Copy {
    move |x: T| -> T {
        let zero = T::zero();
        let one = T::one();
        match op {
            UnaryOp::Neg => -x,
            UnaryOp::Abs => x.abs(),
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => one / x.sqrt(),
            UnaryOp::Sin => x.sin(),
            UnaryOp::Cos => x.cos(),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Sigmoid => one / (one + (-x).exp()),
            UnaryOp::Relu => {
                // NaN propagates, as PyTorch's relu
                if x > zero || x.is_nan() {
                    x
                } else {
                    zero
                }
            }
            UnaryOp::LeakyRelu(s) => {
                if x > zero {
                    x
                } else {
                    x * T::c(s)
                }
            }
            UnaryOp::GeluErf => x * T::c(0.5) * (one + (x * T::c(FRAC_1_SQRT_2)).erf()),
            UnaryOp::GeluTanh => {
                let inner = T::c(SQRT_2_OVER_PI) * (x + T::c(0.044715) * x * x * x);
                T::c(0.5) * x * (one + inner.tanh())
            }
            UnaryOp::Erf => x.erf(),
            UnaryOp::Clamp(lo, hi) => {
                let mut y = x;
                if let Some(lo) = lo {
                    let lo = T::c(lo);
                    if y < lo {
                        y = lo;
                    }
                }
                if let Some(hi) = hi {
                    let hi = T::c(hi);
                    if y > hi {
                        y = hi;
                    }
                }
                y
            }
            UnaryOp::PowScalar(p) => {
                if p == 2.0 {
                    x * x
                } else if p == 0.5 {
                    x.sqrt()
                } else if p == 1.0 {
                    x
                } else {
                    x.powf(T::c(p))
                }
            }
            UnaryOp::RPowScalar(s) => T::c(s).powf(x),
            UnaryOp::AddScalar(s) => x + T::c(s),
            UnaryOp::MulScalar(s) => x * T::c(s),
            UnaryOp::RSubScalar(s) => T::c(s) - x,
            UnaryOp::RDivScalar(s) => T::c(s) / x,
            UnaryOp::Square => x * x,
            UnaryOp::Reciprocal => one / x,
            UnaryOp::Sign => {
                if x > zero {
                    one
                } else if x < zero {
                    -one
                } else {
                    zero
                }
            }
            UnaryOp::Step => {
                if x > zero {
                    one
                } else {
                    zero
                }
            }
        }
    }
}

/// A unary float op over a contiguous slice.
pub fn unary<T: Float>(op: UnaryOp, x: &[T]) -> Vec<T> {
    if let Some(v) = T::fast_unary(op, x) {
        return v;
    }
    // Specialise the hot activations so the per-element match disappears.
    match op {
        UnaryOp::Relu => map(x, |v| {
            if v > T::zero() || v.is_nan() {
                v
            } else {
                T::zero()
            }
        }),
        UnaryOp::Exp => map(x, |v: T| v.exp()),
        UnaryOp::Neg => map(x, |v: T| -v),
        UnaryOp::Abs => map(x, |v: T| v.abs()),
        UnaryOp::Sqrt => map(x, |v: T| v.sqrt()),
        UnaryOp::Square => map(x, |v: T| v * v),
        UnaryOp::LeakyRelu(s) => {
            let s = T::c(s);
            map(x, move |v: T| if v > T::zero() { v } else { v * s })
        }
        UnaryOp::AddScalar(s) => {
            let s = T::c(s);
            map(x, move |v: T| v + s)
        }
        UnaryOp::MulScalar(s) => {
            let s = T::c(s);
            map(x, move |v: T| v * s)
        }
        _ => map(x, unary_fn::<T>(op)),
    }
}

/// The scalar function of an arithmetic binary op on floats.
pub fn binary_fn<T: Float>(op: BinaryOp) -> impl Fn(T, T) -> T + Sync + Copy {
    move |a: T, b: T| match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Pow => a.powf(b),
        // PyTorch's maximum/minimum propagate NaN.
        BinaryOp::Maximum => {
            if a.is_nan() || b.is_nan() {
                T::nan()
            } else if a > b {
                a
            } else {
                b
            }
        }
        BinaryOp::Minimum => {
            if a.is_nan() || b.is_nan() {
                T::nan()
            } else if a < b {
                a
            } else {
                b
            }
        }
        _ => unreachable!("comparison {:?} goes through compare()", op),
    }
}

/// An arithmetic binary op on floats over strided operands (see
/// `zip_strided`), with the op chosen once outside the loop so each loop
/// body is a single instruction the compiler can vectorize.
pub fn binary<T: Float>(op: BinaryOp, a: &[T], la: &Layout, b: &[T], lb: &Layout) -> Vec<T> {
    match op {
        BinaryOp::Add => zip_strided(a, la, b, lb, |x: T, y: T| x + y),
        BinaryOp::Sub => zip_strided(a, la, b, lb, |x: T, y: T| x - y),
        BinaryOp::Mul => zip_strided(a, la, b, lb, |x: T, y: T| x * y),
        BinaryOp::Div => zip_strided(a, la, b, lb, |x: T, y: T| x / y),
        _ => zip_strided(a, la, b, lb, binary_fn::<T>(op)),
    }
}

/// A comparison over strided operands, the op chosen outside the loop.
pub fn compare<T: Element + PartialOrd>(
    op: BinaryOp,
    a: &[T],
    la: &Layout,
    b: &[T],
    lb: &Layout,
) -> Vec<bool> {
    match op {
        BinaryOp::Eq => zip_strided(a, la, b, lb, |x: T, y: T| x == y),
        BinaryOp::Ne => zip_strided(a, la, b, lb, |x: T, y: T| x != y),
        BinaryOp::Lt => zip_strided(a, la, b, lb, |x: T, y: T| x < y),
        BinaryOp::Le => zip_strided(a, la, b, lb, |x: T, y: T| x <= y),
        BinaryOp::Gt => zip_strided(a, la, b, lb, |x: T, y: T| x > y),
        BinaryOp::Ge => zip_strided(a, la, b, lb, |x: T, y: T| x >= y),
        _ => unreachable!("{:?} is not a comparison", op),
    }
}

/// The scalar function of an arithmetic binary op on i64 (`Div` must be
/// promoted to float by the caller, as PyTorch's true division).
pub fn binary_fn_i64(op: BinaryOp) -> impl Fn(i64, i64) -> i64 + Sync + Copy {
    move |a: i64, b: i64| match op {
        BinaryOp::Add => a.wrapping_add(b),
        BinaryOp::Sub => a.wrapping_sub(b),
        BinaryOp::Mul => a.wrapping_mul(b),
        BinaryOp::Pow => {
            if b < 0 {
                0
            } else {
                a.wrapping_pow(b as u32)
            }
        }
        BinaryOp::Maximum => a.max(b),
        BinaryOp::Minimum => a.min(b),
        _ => unreachable!("i64 {:?} is promoted or compared by the caller", op),
    }
}

/// The scalar function of a comparison.
pub fn compare_fn<T: PartialOrd + Copy>(op: BinaryOp) -> impl Fn(T, T) -> bool + Sync + Copy {
    move |a: T, b: T| match op {
        BinaryOp::Eq => a == b,
        BinaryOp::Ne => a != b,
        BinaryOp::Lt => a < b,
        BinaryOp::Le => a <= b,
        BinaryOp::Gt => a > b,
        BinaryOp::Ge => a >= b,
        _ => unreachable!("{:?} is not a comparison", op),
    }
}

/// `f(a[i], b[i])` over the index space of `la.shape` (== `lb.shape`; a
/// broadcast operand has stride 0 where it is broadcast). Returns a
/// contiguous Vec.
pub fn zip_strided<T: Copy + Sync, U: Element>(
    a: &[T],
    la: &Layout,
    b: &[T],
    lb: &Layout,
    f: impl Fn(T, T) -> U + Sync,
) -> Vec<U> {
    debug_assert_eq!(la.shape, lb.shape);
    let n = la.numel();
    let mut out = crate::buffers::alloc_uninit::<U>(n);
    if n == 0 {
        return out;
    }
    if la.is_contiguous() && lb.is_contiguous() {
        let (a, b) = (&a[la.offset..la.offset + n], &b[lb.offset..lb.offset + n]);
        let body = |o: &mut [U], a: &[T], b: &[T]| {
            for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                *o = f(x, y);
            }
        };
        crate::par::chunks_mut(&mut out, PAR_THRESHOLD / 2, 16, |s, o| {
            let e = s + o.len();
            body(o, &a[s..e], &b[s..e])
        });
        return out;
    }
    let work = |start: usize, dst: &mut [U]| {
        let mut w = 0;
        for_each_row(
            &la.shape,
            [&la.strides, &lb.strides],
            [la.offset, lb.offset],
            start,
            start + dst.len(),
            |[oa, ob], len, [sa, sb]| {
                let d = &mut dst[w..w + len];
                match (sa, sb) {
                    (1, 1) => {
                        for ((o, &x), &y) in
                            d.iter_mut().zip(&a[oa..oa + len]).zip(&b[ob..ob + len])
                        {
                            *o = f(x, y);
                        }
                    }
                    (1, 0) => {
                        let y = b[ob];
                        for (o, &x) in d.iter_mut().zip(&a[oa..oa + len]) {
                            *o = f(x, y);
                        }
                    }
                    (0, 1) => {
                        let x = a[oa];
                        for (o, &y) in d.iter_mut().zip(&b[ob..ob + len]) {
                            *o = f(x, y);
                        }
                    }
                    _ => {
                        for (i, o) in d.iter_mut().enumerate() {
                            *o = f(a[oa + i * sa], b[ob + i * sb]);
                        }
                    }
                }
                w += len;
            },
        );
    };
    let row = la.shape.last().copied().unwrap_or(1);
    crate::par::chunks_mut(&mut out, PAR_THRESHOLD / 2, row, |s, d| work(s, d));
    out
}

/// `cond ? a : b` over one index space (all three layouts share its shape).
pub fn where_strided<T: Element>(
    cond: &[bool],
    lc: &Layout,
    a: &[T],
    la: &Layout,
    b: &[T],
    lb: &Layout,
) -> Vec<T> {
    let n = lc.numel();
    let mut out = crate::buffers::alloc_uninit::<T>(n);
    let mut w = 0;
    for_each_row(
        &lc.shape,
        [&lc.strides, &la.strides, &lb.strides],
        [lc.offset, la.offset, lb.offset],
        0,
        n,
        |[oc, oa, ob], len, [sc, sa, sb]| {
            for i in 0..len {
                out[w + i] = if cond[oc + i * sc] {
                    a[oa + i * sa]
                } else {
                    b[ob + i * sb]
                };
            }
            w += len;
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_add_row_and_column() {
        // a: [2,1] column, b: [3] row -> [2,3]
        let a = [10.0f32, 20.0];
        let b = [1.0f32, 2.0, 3.0];
        let la = Layout {
            shape: vec![2, 3],
            strides: vec![1, 0],
            offset: 0,
        };
        let lb = Layout {
            shape: vec![2, 3],
            strides: vec![0, 1],
            offset: 0,
        };
        let out = zip_strided(&a, &la, &b, &lb, binary_fn::<f32>(BinaryOp::Add));
        assert_eq!(out, vec![11.0, 12.0, 13.0, 21.0, 22.0, 23.0]);
    }

    #[test]
    fn gelu_forms() {
        let g = unary_fn::<f64>(UnaryOp::GeluErf);
        assert!((g(1.0) - 0.841_344_746_068_542_9).abs() < 1e-12);
        let t = unary_fn::<f64>(UnaryOp::GeluTanh);
        assert!((t(1.0) - 0.841_191_990_607_477_4).abs() < 1e-12);
    }
}

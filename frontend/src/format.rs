//! `Display` for `Tensor`: PyTorch's `repr` with its default print options
//! (precision 4, linewidth 80, threshold 1000, edgeitems 3): `tensor([[1.,
//! 2.], ...])`, fixed or scientific notation chosen over all (summarized)
//! values as `torch._tensor_str._Formatter` does, `...` summaries for large
//! tensors, and the `dtype=` / `grad_fn=<..>` / `requires_grad=True`
//! suffixes.

use crate::tensor::Tensor;
use kiln_ir::DType;
use std::fmt;

const PRECISION: usize = 4;
const LINEWIDTH: usize = 80;
const THRESHOLD: usize = 1000;
const EDGEITEMS: usize = 3;

/// The elements, row-major, in the form Python's `tolist()` gives them.
enum Vals {
    F(Vec<f64>),
    I(Vec<i64>),
    B(Vec<bool>),
}

/// Python's `"{:.{p}e}".format(v)`: a signed exponent of at least 2 digits.
fn sci(v: f64, p: usize) -> String {
    if !v.is_finite() {
        return nonfinite(v);
    }
    let s = format!("{v:.p$e}");
    let (mant, exp) = s.split_once('e').expect("exponent");
    let e: i32 = exp.parse().expect("exponent");
    let sign = if e < 0 { '-' } else { '+' };
    format!("{mant}e{sign}{:02}", e.abs())
}

fn nonfinite(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else if v > 0.0 {
        "inf".into()
    } else {
        "-inf".into()
    }
}

/// PyTorch's `_Formatter`: picks int / fixed / scientific mode and the
/// column width from the values that will be printed.
struct Formatter {
    int_mode: bool,
    sci_mode: bool,
    max_width: usize,
}

impl Formatter {
    fn new(vals: &Vals, which: &[usize]) -> Formatter {
        let mut f = Formatter {
            int_mode: true,
            sci_mode: false,
            max_width: 1,
        };
        match vals {
            Vals::I(v) => {
                for &i in which {
                    f.max_width = f.max_width.max(v[i].to_string().len());
                }
            }
            Vals::B(v) => {
                for &i in which {
                    f.max_width = f.max_width.max(py_bool(v[i]).len());
                }
            }
            Vals::F(v) => {
                let nz: Vec<f64> = which
                    .iter()
                    .map(|&i| v[i])
                    .filter(|x| x.is_finite() && *x != 0.0)
                    .collect();
                if nz.is_empty() {
                    return f;
                }
                let min = nz.iter().map(|x| x.abs()).fold(f64::INFINITY, f64::min);
                let max = nz.iter().map(|x| x.abs()).fold(0.0, f64::max);
                f.int_mode = nz.iter().all(|x| *x == x.ceil());
                let widths: Box<dyn Fn(f64) -> usize> = if f.int_mode {
                    if max / min > 1000.0 || max > 1.0e8 {
                        f.sci_mode = true;
                        Box::new(|x| sci(x, PRECISION).len())
                    } else {
                        Box::new(|x| format!("{x:.0}").len() + 1)
                    }
                } else if max / min > 1000.0 || max > 1.0e8 || min < 1.0e-4 {
                    f.sci_mode = true;
                    Box::new(|x| sci(x, PRECISION).len())
                } else {
                    Box::new(|x| format!("{x:.PRECISION$}").len())
                };
                for &x in &nz {
                    f.max_width = f.max_width.max(widths(x));
                }
            }
        }
        f
    }

    fn width(&self) -> usize {
        self.max_width
    }

    fn format(&self, vals: &Vals, i: usize) -> String {
        let s = match vals {
            Vals::F(v) => {
                let x = v[i];
                if self.sci_mode {
                    sci(x, PRECISION)
                } else if !x.is_finite() {
                    nonfinite(x)
                } else if self.int_mode {
                    format!("{x:.0}.")
                } else {
                    format!("{x:.PRECISION$}")
                }
            }
            Vals::I(v) => v[i].to_string(),
            Vals::B(v) => py_bool(v[i]).to_string(),
        };
        format!("{s:>w$}", w = self.max_width)
    }
}

fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// Indices (along one dim) that are printed: all, or the edge items.
fn shown(n: usize, summarize: bool) -> Vec<Option<usize>> {
    if summarize && n > 2 * EDGEITEMS {
        (0..EDGEITEMS)
            .map(Some)
            .chain(std::iter::once(None))
            .chain((n - EDGEITEMS..n).map(Some))
            .collect()
    } else {
        (0..n).map(Some).collect()
    }
}

/// Flat indices of the elements that will be printed
/// (`get_summarized_data`).
fn printed(shape: &[usize], base: usize, summarize: bool, out: &mut Vec<usize>) {
    match shape.split_first() {
        None => out.push(base),
        Some((&n, rest)) => {
            let inner: usize = rest.iter().product();
            for i in shown(n, summarize).into_iter().flatten() {
                printed(rest, base + i * inner, summarize, out);
            }
        }
    }
}

/// `_tensor_str_with_formatter` for a tensor of `shape` at flat `base`.
fn tensor_str(
    vals: &Vals,
    shape: &[usize],
    base: usize,
    indent: usize,
    summarize: bool,
    f: &Formatter,
) -> String {
    let nd = shape.len();
    if nd == 0 {
        return f.format(vals, base);
    }
    let inner: usize = shape[1..].iter().product();
    if nd == 1 {
        let per_line = ((LINEWIDTH.saturating_sub(indent)) / (f.width() + 2)).max(1);
        let data: Vec<String> = shown(shape[0], summarize)
            .into_iter()
            .map(|i| match i {
                Some(i) => f.format(vals, base + i),
                None => " ...".to_string(),
            })
            .collect();
        let lines: Vec<String> = data.chunks(per_line).map(|c| c.join(", ")).collect();
        return format!(
            "[{}]",
            lines.join(&format!(",\n{}", " ".repeat(indent + 1)))
        );
    }
    let slices: Vec<String> = shown(shape[0], summarize)
        .into_iter()
        .map(|i| match i {
            Some(i) => tensor_str(
                vals,
                &shape[1..],
                base + i * inner,
                indent + 1,
                summarize,
                f,
            ),
            None => "...".to_string(),
        })
        .collect();
    let sep = format!(",{}{}", "\n".repeat(nd - 1), " ".repeat(indent + 1));
    format!("[{}]", slices.join(&sep))
}

/// `_add_suffixes`: `, suffix` on the same line while it fits in the
/// line width, else on a new line.
fn add_suffixes(body: String, suffixes: &[String], indent: usize) -> String {
    let mut out = body;
    let mut last_line_len = match out.rfind('\n') {
        Some(p) => out.len() - p + 1,
        None => out.len() + 1,
    };
    for s in suffixes {
        if last_line_len + s.len() + 2 > LINEWIDTH {
            out.push_str(&format!(",\n{}{s}", " ".repeat(indent)));
            last_line_len = indent + s.len();
        } else {
            out.push_str(&format!(", {s}"));
            last_line_len += s.len() + 2;
        }
    }
    out.push(')');
    out
}

impl fmt::Display for Tensor {
    /// PyTorch's `repr(tensor)`, e.g. `tensor([[1., 2.],\n        [3., 4.]],
    /// requires_grad=True)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = "tensor(";
        let indent = prefix.len();
        let shape = self.shape();
        let dtype = self.dtype();
        let mut suffixes = Vec::new();
        let body = if self.numel() == 0 {
            if shape.len() != 1 {
                let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
                let tuple = if dims.len() == 1 {
                    format!("({},)", dims[0])
                } else {
                    format!("({})", dims.join(", "))
                };
                suffixes.push(format!("size={tuple}"));
            }
            if dtype != DType::F32 {
                suffixes.push(format!("dtype={dtype}"));
            }
            "[]".to_string()
        } else {
            if !matches!(dtype, DType::F32 | DType::I64 | DType::Bool) {
                suffixes.push(format!("dtype={dtype}"));
            }
            let vals = match dtype {
                DType::I64 => Vals::I(self.to_vec::<i64>()),
                DType::Bool => Vals::B(self.to_vec::<bool>()),
                _ => Vals::F(self.to_vec::<f64>()),
            };
            let summarize = self.numel() > THRESHOLD;
            let mut which = Vec::new();
            printed(&shape, 0, summarize, &mut which);
            let fm = Formatter::new(&vals, &which);
            tensor_str(&vals, &shape, 0, indent, summarize, &fm)
        };
        if let Some(name) = self.grad_fn_name() {
            suffixes.push(format!("grad_fn=<{name}>"));
        } else if self.requires_grad() {
            suffixes.push("requires_grad=True".to_string());
        }
        f.write_str(&add_suffixes(format!("{prefix}{body}"), &suffixes, indent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape).unwrap()
    }

    #[test]
    fn python_sci_notation() {
        assert_eq!(sci(123456.0, 4), "1.2346e+05");
        assert_eq!(sci(0.00012, 4), "1.2000e-04");
        assert_eq!(sci(-1.0, 4), "-1.0000e+00");
    }

    #[test]
    fn matches_pytorch_repr() {
        // torch.tensor([[1., 2.], [3., 4.]])
        assert_eq!(
            t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]).to_string(),
            "tensor([[1., 2.],\n        [3., 4.]])"
        );
        // torch.tensor([0., 0.5, -1.25])
        assert_eq!(
            t(&[0.0, 0.5, -1.25], &[3]).to_string(),
            "tensor([ 0.0000,  0.5000, -1.2500])"
        );
        // torch.tensor(3.5), torch.tensor(1.), torch.tensor(0.)
        assert_eq!(Tensor::scalar(3.5f32).to_string(), "tensor(3.5000)");
        assert_eq!(Tensor::scalar(1.0f32).to_string(), "tensor(1.)");
        assert_eq!(Tensor::scalar(0.0f32).to_string(), "tensor(0.)");
        // torch.tensor([1e-5, 1.]) -> tensor([1.0000e-05, 1.0000e+00])
        assert_eq!(
            t(&[1e-5, 1.0], &[2]).to_string(),
            "tensor([1.0000e-05, 1.0000e+00])"
        );
        // torch.tensor([1., float('nan'), float('inf')])
        assert_eq!(
            t(&[1.0, f32::NAN, f32::INFINITY], &[3]).to_string(),
            "tensor([1., nan, inf])"
        );
        // torch.tensor([1, -20, 3])
        let i = Tensor::from_slice(&[1i64, -20, 3], &[3]).unwrap();
        assert_eq!(i.to_string(), "tensor([  1, -20,   3])");
        // torch.tensor([True, False])
        let b = Tensor::from_slice(&[true, false], &[2]).unwrap();
        assert_eq!(b.to_string(), "tensor([ True, False])");
        // torch.tensor([1., 2.], dtype=torch.float64)
        let d = Tensor::from_slice(&[1.0f64, 2.0], &[2]).unwrap();
        assert_eq!(d.to_string(), "tensor([1., 2.], dtype=torch.float64)");
        // torch.zeros(0, 3) / torch.zeros(0) / torch.zeros(0, dtype=torch.int64)
        assert_eq!(
            Tensor::zeros(&[0, 3], DType::F32).to_string(),
            "tensor([], size=(0, 3))"
        );
        assert_eq!(Tensor::zeros(&[0], DType::F32).to_string(), "tensor([])");
        assert_eq!(
            Tensor::zeros(&[0], DType::I64).to_string(),
            "tensor([], dtype=torch.int64)"
        );
        // torch.arange(8.).view(2,2,2)
        let c = Tensor::arange(0.0, 8.0, 1.0, DType::F32)
            .unwrap()
            .view(&[2, 2, 2])
            .unwrap();
        assert_eq!(
            c.to_string(),
            "tensor([[[0., 1.],\n         [2., 3.]],\n\n        [[4., 5.],\n         [6., 7.]]])"
        );
    }

    #[test]
    fn wraps_summarizes_and_suffixes() {
        // torch.arange(30.)
        let a = Tensor::arange(0.0, 30.0, 1.0, DType::F32).unwrap();
        assert_eq!(
            a.to_string(),
            "tensor([ 0.,  1.,  2.,  3.,  4.,  5.,  6.,  7.,  8.,  9., 10., 11., 12., 13.,\n        14., 15., 16., 17., 18., 19., 20., 21., 22., 23., 24., 25., 26., 27.,\n        28., 29.])"
        );
        // torch.arange(2000.)
        let b = Tensor::arange(0.0, 2000.0, 1.0, DType::F32).unwrap();
        assert_eq!(
            b.to_string(),
            "tensor([0.0000e+00, 1.0000e+00, 2.0000e+00,  ..., 1.9970e+03, 1.9980e+03,\n        1.9990e+03])"
        );
        // torch.full((100, 11), 1.5)
        let m = Tensor::full(&[100, 11], 1.5, DType::F32);
        let row = "[1.5000, 1.5000, 1.5000,  ..., 1.5000, 1.5000, 1.5000]";
        let expected = format!(
            "tensor([{row},\n        {row},\n        {row},\n        ...,\n        {row},\n        {row},\n        {row}])"
        );
        assert_eq!(m.to_string(), expected);
        // torch.ones(2, requires_grad=True); (x * 2)
        let x = Tensor::ones(&[2], DType::F32).requires_grad_(true).unwrap();
        assert_eq!(x.to_string(), "tensor([1., 1.], requires_grad=True)");
        let y = x.mul_scalar(2.0).unwrap();
        assert_eq!(y.to_string(), "tensor([2., 2.], grad_fn=<MulBackward0>)");
    }
}

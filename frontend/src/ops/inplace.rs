//! In-place ops (`add_`, `mul_`, `copy_`, `fill_`, `zero_`): they write into
//! the tensor's storage through its layout, so every view sharing the storage
//! sees the change, and bump the storage's version counter. As in PyTorch, an
//! in-place op on a leaf that requires grad is an error while grad mode is on
//! (optimizers run under `no_grad`).

use super::broadcast_layout;
use crate::autograd::is_grad_enabled;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use kiln_cpu::{strided, with_storage, CpuStorage, Element, Layout};
use std::sync::atomic::Ordering;

impl Tensor {
    fn check_inplace(&self, op: &str) -> Result<()> {
        // copy_ is the cross-device copy (as in PyTorch): allowed.
        if op != "copy_" {
            crate::device::check_cpu(op, &[self])?;
        }
        if is_grad_enabled() && self.requires_grad() {
            let what = if self.is_leaf() {
                "a leaf Variable that requires grad"
            } else {
                "a tensor that is part of a graph"
            };
            return Err(Error::op(
                op,
                format!("{what} is being used in an in-place operation (wrap it in no_grad)"),
            ));
        }
        let l = self.layout();
        if l.shape
            .iter()
            .zip(&l.strides)
            .any(|(&n, &s)| n > 1 && s == 0)
        {
            return Err(Error::op(
                op,
                "unsupported operation: more than one element of the written-to tensor refers to a single memory location. Please clone() the tensor before performing the operation.",
            ));
        }
        Ok(())
    }

    /// Writes `src` (broadcast to self's shape, converted to self's dtype)
    /// through self's layout.
    pub fn copy_(&self, src: &Tensor) -> Result<&Tensor> {
        self.check_inplace("copy_")?;
        let shape = self.shape();
        kiln_ir::broadcast_shapes(&shape, &src.shape())
            .ok()
            .filter(|s| *s == shape)
            .ok_or_else(|| {
                Error::op(
                    "copy_",
                    format!(
                        "source of shape {:?} cannot be broadcast to {:?}",
                        src.shape(),
                        shape
                    ),
                )
            })?;
        // Materialize the source first: it may alias self.
        let src = src.to_dtype(self.dtype())?;
        let sl = broadcast_layout(&src.layout(), &shape);
        let vals = {
            let d = src.data();
            let buf = d.storage.buf.read();
            with_storage!(&*buf, v => Element::into_storage(strided::gather(v, &sl)))
        };
        self.write_contiguous(&vals);
        if crate::trace::is_tracing() {
            let r = src.expand_to(&shape)?;
            self.trace_rebind("copy_", &r);
        }
        Ok(self)
    }

    /// Under tracing, records that self now holds `r`'s value. A write
    /// through a view of a larger storage cannot be expressed in the graph.
    fn trace_rebind(&self, op: &str, r: &Tensor) {
        if !crate::trace::is_tracing() {
            return;
        }
        let d = self.data();
        let whole = d.layout.offset == 0
            && d.layout.is_contiguous()
            && d.layout.numel() == d.storage.buf.read().len();
        if whole {
            crate::trace::rebind(self, r);
        } else {
            crate::trace::unsupported(&format!("{op} into a view of a larger tensor"));
        }
    }

    /// Writes a contiguous buffer of self's dtype and numel through self's layout.
    pub(crate) fn write_contiguous(&self, vals: &CpuStorage) {
        let d = self.data();
        {
            let mut buf = d.storage.buf.write();
            scatter_storage(&mut buf, &d.layout, vals);
        }
        d.storage.version.fetch_add(1, Ordering::Relaxed);
    }

    pub fn fill_(&self, value: f64) -> Result<&Tensor> {
        self.check_inplace("fill_")?;
        let vals = CpuStorage::full(self.dtype(), 1, value);
        self.write_contiguous(&vals);
        if crate::trace::is_tracing() {
            let snap = Tensor::full(&self.shape(), value, self.dtype());
            self.trace_rebind("fill_", &snap);
        }
        Ok(self)
    }

    pub fn zero_(&self) -> Result<&Tensor> {
        self.fill_(0.0)
    }

    /// `self += other` (broadcast into self's shape).
    pub fn add_(&self, other: &Tensor) -> Result<&Tensor> {
        self.check_inplace("add_")?;
        let r = crate::autograd::no_grad(|| self.add(other))?;
        self.assign_result("add_", &r)
    }

    /// `self += alpha * other`.
    pub fn add_scaled_(&self, other: &Tensor, alpha: f64) -> Result<&Tensor> {
        self.check_inplace("add_")?;
        let r = crate::autograd::no_grad(|| self.add(&other.mul_scalar(alpha)?))?;
        self.assign_result("add_", &r)
    }

    pub fn sub_(&self, other: &Tensor) -> Result<&Tensor> {
        self.check_inplace("sub_")?;
        let r = crate::autograd::no_grad(|| self.sub(other))?;
        self.assign_result("sub_", &r)
    }

    pub fn mul_(&self, other: &Tensor) -> Result<&Tensor> {
        self.check_inplace("mul_")?;
        let r = crate::autograd::no_grad(|| self.mul(other))?;
        self.assign_result("mul_", &r)
    }

    pub fn mul_scalar_(&self, s: f64) -> Result<&Tensor> {
        self.check_inplace("mul_")?;
        let r = crate::autograd::no_grad(|| self.mul_scalar(s))?;
        self.assign_result("mul_", &r)
    }

    pub fn div_(&self, other: &Tensor) -> Result<&Tensor> {
        self.check_inplace("div_")?;
        let r = crate::autograd::no_grad(|| self.div(other))?;
        self.assign_result("div_", &r)
    }

    /// Stores an out-of-place result back into self (shape must be self's;
    /// the dtype is cast back to self's, as PyTorch's in-place ops do).
    fn assign_result(&self, op: &str, r: &Tensor) -> Result<&Tensor> {
        if r.shape() != self.shape() {
            return Err(Error::op(
                op,
                format!(
                    "output with shape {:?} doesn't match the broadcast shape {:?}",
                    self.shape(),
                    r.shape()
                ),
            ));
        }
        let r = r.to_dtype(self.dtype())?;
        self.write_contiguous(&r.contiguous_storage());
        self.trace_rebind(op, &r);
        Ok(self)
    }
}

fn scatter_storage(dst: &mut CpuStorage, l: &Layout, src: &CpuStorage) {
    macro_rules! go {
        ($($v:ident),*) => {
            match (dst, src) {
                $((CpuStorage::$v(d), CpuStorage::$v(s)) => strided::scatter(d, l, s),)*
                (d, s) => panic!("internal: scatter {} into {}", s.dtype(), d.dtype()),
            }
        };
    }
    go!(Bool, I64, F16, BF16, F32, F64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::DType;

    #[test]
    fn writes_through_views_are_seen_by_base() {
        let base = Tensor::zeros(&[2, 3], DType::F32);
        let col = base.t().unwrap().reshape(&[3, 2]).unwrap(); // a view of the transpose
        let row = base.view(&[6]).unwrap();
        col.fill_(0.0).unwrap();
        base.transpose(0, 1)
            .unwrap()
            .copy_(&Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]).unwrap())
            .unwrap();
        assert_eq!(base.to_vec::<f32>(), vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
        assert_eq!(row.to_vec::<f32>(), vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
        assert!(base.version() >= 2);
        let leaf = Tensor::ones(&[2], DType::F32).requires_grad_(true).unwrap();
        assert!(leaf.add_(&Tensor::ones(&[2], DType::F32)).is_err());
        crate::no_grad(|| leaf.add_(&Tensor::ones(&[2], DType::F32)).unwrap());
        assert_eq!(leaf.to_vec::<f32>(), vec![2.0, 2.0]);
    }
}

//! `Tensor`: a handle to shared, strided storage plus autograd metadata.
//!
//! Like PyTorch, several tensors (views) can share one storage with their own
//! shape, strides and offset; writing through one is seen by all. A `Tensor`
//! is a cheap `Arc` handle: cloning it gives the same tensor object (same
//! `.grad`, same hooks), as Python references do. `detach()` gives a new
//! tensor object sharing the storage.

use crate::autograd::{AutogradMeta, Node};
use crate::device::Device;
use crate::error::{Error, Result};
use kiln_cpu::{strided, with_storage, CpuStorage, Element, Layout};
use kiln_ir::DType;
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Shared storage: the buffer and the version counter that in-place writes
/// bump (so autograd can detect a saved tensor modified in place).
#[derive(Debug)]
pub struct Storage {
    pub(crate) buf: RwLock<CpuStorage>,
    pub(crate) version: AtomicU64,
}

impl Drop for Storage {
    /// The last view of a storage is gone: its buffer may serve a later op
    /// (see `kiln_cpu::buffers`).
    fn drop(&mut self) {
        let buf = std::mem::replace(self.buf.get_mut(), CpuStorage::F32(Vec::new()));
        kiln_cpu::buffers::recycle(buf);
    }
}

impl Storage {
    pub(crate) fn new(buf: CpuStorage) -> Arc<Storage> {
        Arc::new(Storage {
            buf: RwLock::new(buf),
            version: AtomicU64::new(0),
        })
    }
}

/// What a tensor looks at: its storage and the layout of its elements in it.
/// `_apply`/`set_data` swap this whole record, keeping the tensor object.
#[derive(Clone, Debug)]
pub(crate) struct TensorData {
    pub storage: Arc<Storage>,
    pub layout: Layout,
    pub dtype: DType,
    pub device: Device,
}

pub(crate) struct TensorImpl {
    pub id: u64,
    pub data: RwLock<TensorData>,
    pub meta: Mutex<AutogradMeta>,
}

/// A multi-dimensional array with autograd, PyTorch's `torch.Tensor`.
#[derive(Clone)]
pub struct Tensor {
    pub(crate) inner: Arc<TensorImpl>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// The id the next tensor object will get (ids only grow).
pub(crate) fn peek_next_id() -> u64 {
    NEXT_ID.load(Ordering::Relaxed)
}

impl Tensor {
    // ---------------------------------------------------------------- construction

    pub(crate) fn from_parts(storage: Arc<Storage>, layout: Layout, device: Device) -> Tensor {
        let dtype = storage.buf.read().dtype();
        Tensor {
            inner: Arc::new(TensorImpl {
                id: next_id(),
                data: RwLock::new(TensorData {
                    storage,
                    layout,
                    dtype,
                    device,
                }),
                meta: Mutex::new(AutogradMeta::default()),
            }),
        }
    }

    /// A contiguous tensor owning `buf`, of `shape`.
    pub(crate) fn from_storage(buf: CpuStorage, shape: &[usize]) -> Tensor {
        debug_assert_eq!(buf.len(), kiln_ir::numel(shape));
        Tensor::from_parts(Storage::new(buf), Layout::contiguous(shape), Device::Cpu)
    }

    /// A contiguous tensor from a Vec of any element type.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        let n = kiln_ir::numel(shape);
        if data.len() != n {
            return Err(Error::op(
                "from_vec",
                format!(
                    "{} elements cannot fill shape {:?} ({} elements)",
                    data.len(),
                    shape,
                    n
                ),
            ));
        }
        let t = Tensor::from_storage(T::into_storage(data), shape);
        crate::trace::created(&t, false);
        Ok(t)
    }

    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape)
    }

    /// A 0-d tensor.
    pub fn scalar<T: Element>(v: T) -> Tensor {
        let t = Tensor::from_storage(T::into_storage(vec![v]), &[]);
        crate::trace::created(&t, false);
        t
    }

    // ---------------------------------------------------------------- metadata

    /// Identity of the tensor object (two clones of a handle share it).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// True if both handles are the same tensor object (Python's `is`).
    pub fn same_object(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    pub(crate) fn data(&self) -> TensorData {
        self.inner.data.read().clone()
    }

    pub fn shape(&self) -> Vec<usize> {
        self.inner.data.read().layout.shape.clone()
    }

    /// `size(dim)`, with negative dims counted from the end.
    pub fn size(&self, dim: isize) -> Result<usize> {
        let shape = self.shape();
        let d = normalize_dim(dim, shape.len(), "size")?;
        Ok(shape[d])
    }

    /// True if the tensor has this shape and dtype (allocates nothing: the
    /// compiled runtime's guard).
    pub fn has_type(&self, shape: &[usize], dtype: DType) -> bool {
        let d = self.inner.data.read();
        d.dtype == dtype && d.layout.shape == shape
    }

    pub fn dim(&self) -> usize {
        self.inner.data.read().layout.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.inner.data.read().layout.numel()
    }

    pub fn strides(&self) -> Vec<usize> {
        self.inner.data.read().layout.strides.clone()
    }

    pub fn storage_offset(&self) -> usize {
        self.inner.data.read().layout.offset
    }

    pub fn layout(&self) -> Layout {
        self.inner.data.read().layout.clone()
    }

    pub fn dtype(&self) -> DType {
        self.inner.data.read().dtype
    }

    pub fn device(&self) -> Device {
        self.inner.data.read().device
    }

    /// PyTorch's `is_contiguous()`: row-major strides (ignoring size-1
    /// dims); a tensor with no elements is always contiguous.
    pub fn is_contiguous(&self) -> bool {
        let d = self.inner.data.read();
        d.layout.numel() == 0 || d.layout.is_contiguous()
    }

    pub fn is_floating_point(&self) -> bool {
        self.dtype().is_float()
    }

    /// True if both tensors look at the same storage (`a.untyped_storage()
    /// .data_ptr() == b.untyped_storage().data_ptr()`).
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.data().storage, &other.data().storage)
    }

    /// The storage's version counter: bumped by every in-place write.
    pub fn version(&self) -> u64 {
        self.data().storage.version.load(Ordering::Relaxed)
    }

    // ---------------------------------------------------------------- data access

    /// Runs `f` on the storage slice and layout (read-locked). `T` must be
    /// the tensor's dtype.
    pub(crate) fn with_slice<T: Element, R>(&self, f: impl FnOnce(&[T], &Layout) -> R) -> R {
        let d = self.data();
        let buf = d.storage.buf.read();
        let s = T::slice(&buf)
            .unwrap_or_else(|| panic!("internal: tensor of {} read as {}", buf.dtype(), T::DTYPE));
        f(s, &d.layout)
    }

    /// Runs `f` on a contiguous view of the elements (borrowed when the
    /// tensor is contiguous, gathered otherwise). `T` must be the dtype.
    pub(crate) fn with_contiguous<T: Element, R>(&self, f: impl FnOnce(&[T]) -> R) -> R {
        self.with_slice::<T, R>(|s, l| {
            // (an empty view may have an offset past the end: gather it)
            if l.numel() != 0 && l.is_contiguous() {
                f(&s[l.offset..l.offset + l.numel()])
            } else {
                f(&strided::gather(s, l))
            }
        })
    }

    /// Runs `f` on the elements of contiguous f32 tensors, borrowed in place
    /// (for backends that read tensor memory directly). An error names the
    /// tensor that is not contiguous f32.
    pub fn with_f32_slices<R>(tensors: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
        let datas: Vec<TensorData> = tensors.iter().map(|t| t.data()).collect();
        for (i, d) in datas.iter().enumerate() {
            if d.dtype != DType::F32 || !d.layout.is_contiguous() {
                return Err(Error::op(
                    "with_f32_slices",
                    format!(
                        "tensor {i} must be contiguous f32, got {} with shape {:?} and strides {:?}",
                        d.dtype, d.layout.shape, d.layout.strides
                    ),
                ));
            }
        }
        let guards: Vec<_> = datas.iter().map(|d| d.storage.buf.read()).collect();
        let slices: Vec<&[f32]> = guards
            .iter()
            .zip(&datas)
            .map(|(g, d)| {
                let s = <f32 as Element>::slice(g).expect("dtype checked");
                &s[d.layout.offset..d.layout.offset + d.layout.numel()]
            })
            .collect();
        Ok(f(&slices))
    }

    /// Runs `f` on the elements of a contiguous f32 tensor (read-locked,
    /// allocating nothing, for the compiled runtime's steady state); `None`
    /// if the tensor is not contiguous f32.
    pub fn with_f32_contiguous<R>(&self, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
        let d = self.inner.data.read();
        if d.dtype != DType::F32 || !(d.layout.numel() == 0 || d.layout.is_contiguous()) {
            return None;
        }
        let buf = d.storage.buf.read();
        let s = <f32 as Element>::slice(&buf)?;
        Some(f(&s[d.layout.offset..d.layout.offset + d.layout.numel()]))
    }

    /// `with_f32_contiguous` for any element type (`None` if the tensor
    /// is not contiguous or not of type `T`).
    pub fn with_contiguous_as<T: Element, R>(&self, f: impl FnOnce(&[T]) -> R) -> Option<R> {
        let d = self.inner.data.read();
        if !(d.layout.numel() == 0 || d.layout.is_contiguous()) {
            return None;
        }
        let buf = d.storage.buf.read();
        let s = <T as Element>::slice(&buf)?;
        Some(f(&s[d.layout.offset..d.layout.offset + d.layout.numel()]))
    }

    /// A contiguous f32 tensor of `shape` whose buffer `fill` writes
    /// completely (the buffer may hold stale values before).
    pub fn f32_filled_by(shape: &[usize], fill: impl FnOnce(&mut [f32])) -> Tensor {
        let mut v = kiln_cpu::buffers::alloc_uninit::<f32>(kiln_ir::numel(shape));
        fill(&mut v);
        Tensor::from_storage(CpuStorage::F32(v), shape)
    }

    /// The elements in row-major order as a Vec of the tensor's dtype.
    pub(crate) fn contiguous_vec<T: Element>(&self) -> Vec<T> {
        self.with_slice::<T, _>(|s, l| {
            if l.is_contiguous() {
                // A recycled buffer when large (no fresh pages to fault in).
                let mut v = kiln_cpu::buffers::alloc_uninit::<T>(l.numel());
                v.copy_from_slice(&s[l.offset..l.offset + l.numel()]);
                v
            } else {
                strided::gather(s, l)
            }
        })
    }

    /// The elements in row-major order as a new contiguous `CpuStorage`.
    pub(crate) fn contiguous_storage(&self) -> CpuStorage {
        let d = self.data();
        let buf = d.storage.buf.read();
        let l = &d.layout;
        with_storage!(&*buf, v => {
            let out = if l.numel() != 0 && l.is_contiguous() {
                v[l.offset..l.offset + l.numel()].to_vec()
            } else {
                strided::gather(v, l)
            };
            Element::into_storage(out)
        })
    }

    /// The elements in row-major order, converted to `T` (PyTorch's
    /// `tolist()` flattened).
    pub fn to_vec<T: Element>(&self) -> Vec<T> {
        crate::trace::host_read("to_vec");
        let s = self.contiguous_storage();
        if s.dtype() == T::DTYPE {
            T::slice(&s).unwrap().to_vec()
        } else {
            let c = s.to_dtype(T::DTYPE);
            T::slice(&c).unwrap().to_vec()
        }
    }

    pub fn to_vec_f32(&self) -> Vec<f32> {
        self.to_vec::<f32>()
    }

    pub fn to_vec_f64(&self) -> Vec<f64> {
        self.to_vec::<f64>()
    }

    /// The value of a one-element tensor as f64 (`tensor.item()`).
    pub fn item(&self) -> Result<f64> {
        let n = self.numel();
        if n != 1 {
            return Err(Error::op(
                "item",
                format!("a Tensor with {n} elements cannot be converted to Scalar"),
            ));
        }
        crate::trace::host_read("item");
        let d = self.data();
        let v = d.storage.buf.read().get_f64(d.layout.offset);
        Ok(v)
    }

    // ---------------------------------------------------------------- autograd surface

    pub fn requires_grad(&self) -> bool {
        self.inner.meta.lock().requires_grad
    }

    /// Sets `requires_grad` on a leaf (`requires_grad_`). Only floating
    /// tensors can require gradients; a non-leaf cannot be changed.
    pub fn set_requires_grad(&self, requires_grad: bool) -> Result<&Tensor> {
        if requires_grad && !self.dtype().is_float() {
            return Err(Error::Autograd(format!(
                "only Tensors of floating point dtype can require gradients (got {})",
                self.dtype()
            )));
        }
        let mut m = self.inner.meta.lock();
        if m.grad_fn.is_some() && !requires_grad {
            return Err(Error::Autograd(
                "you can only change requires_grad flags of leaf variables. If you want to use a computed variable in a subgraph that doesn't require differentiation use var_no_grad = var.detach().".into(),
            ));
        }
        m.requires_grad = requires_grad;
        Ok(self)
    }

    /// Builder form: `Tensor::randn(..).requires_grad_(true)`.
    pub fn requires_grad_(self, requires_grad: bool) -> Result<Tensor> {
        self.set_requires_grad(requires_grad)?;
        Ok(self)
    }

    pub fn is_leaf(&self) -> bool {
        self.inner.meta.lock().grad_fn.is_none()
    }

    pub fn grad(&self) -> Option<Tensor> {
        self.inner.meta.lock().grad.clone()
    }

    /// Replaces `.grad` (None clears it, as `zero_grad(set_to_none=True)`).
    pub fn set_grad(&self, grad: Option<Tensor>) {
        self.inner.meta.lock().grad = grad;
    }

    pub fn grad_fn(&self) -> Option<Arc<Node>> {
        self.inner.meta.lock().grad_fn.clone()
    }

    /// The name of `grad_fn` (`AddmmBackward0`), if any.
    pub fn grad_fn_name(&self) -> Option<String> {
        self.grad_fn().map(|n| n.name().to_string())
    }

    pub fn retains_grad(&self) -> bool {
        self.inner.meta.lock().retains_grad
    }

    /// A new tensor object sharing storage, with no autograd history.
    pub fn detach(&self) -> Tensor {
        let d = self.data();
        let t = Tensor::from_parts(d.storage, d.layout, d.device);
        crate::trace::alias(&t, self);
        t
    }

    /// `t.data = other` : makes this tensor object look at `other`'s storage,
    /// layout and dtype, keeping its identity, grad and hooks (what `_apply`
    /// does to parameters).
    pub fn set_data(&self, other: &Tensor) {
        let d = other.data();
        *self.inner.data.write() = d;
    }
}

/// Resolves a possibly negative dim against `ndim` (PyTorch's wrap rule: a
/// 0-d tensor accepts dims -1 and 0).
pub fn normalize_dim(dim: isize, ndim: usize, op: &str) -> Result<usize> {
    let n = ndim.max(1) as isize;
    let d = if dim < 0 { dim + n } else { dim };
    if d < 0 || d >= n {
        return Err(Error::op(
            op,
            format!(
                "Dimension out of range (expected to be in range of [{}, {}], but got {})",
                -n,
                n - 1,
                dim
            ),
        ));
    }
    Ok(d as usize)
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.data();
        write!(
            f,
            "Tensor(shape={:?}, dtype={}, device={}",
            d.layout.shape, d.dtype, d.device
        )?;
        if let Some(name) = self.grad_fn_name() {
            write!(f, ", grad_fn=<{name}>")?;
        } else if self.requires_grad() {
            write!(f, ", requires_grad=True")?;
        }
        write!(f, ")")
    }
}

//! Where a tensor lives: `Device::Cpu`, or `Device::OpenCl(index)` (an
//! OpenCL device as `kiln devices` numbers them).
//!
//! The frontend does not depend on OpenCL (the runtime does): a tensor on
//! an OpenCL device keeps its values in host memory, marked with the
//! device; the OpenCL runtime (`OpenClModule`) uploads it once and keeps
//! the device copy while its storage and version are unchanged. Eager ops
//! run on the CPU only, so every eager op on a tensor that is not on the
//! CPU fails with an error naming the op and the device (never a silent
//! copy); views keep the device (they compute nothing), and
//! `to_device(Device::Cpu)` brings a tensor back. The check is one relaxed
//! atomic load while no tensor has ever left the CPU.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// OpenCL device `index` (across platforms, as `kiln devices` lists).
    OpenCl(usize),
}

impl Device {
    pub fn is_cpu(self) -> bool {
        self == Device::Cpu
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::OpenCl(i) => write!(f, "opencl:{i}"),
        }
    }
}

/// Set once a tensor is moved off the CPU: until then the eager ops' device
/// check is this one load.
static ANY_OFF_CPU: AtomicBool = AtomicBool::new(false);

thread_local! {
    static HOST_ACCESS: Cell<u32> = const { Cell::new(0) };
}

pub(crate) fn mark_off_cpu() {
    ANY_OFF_CPU.store(true, Ordering::Relaxed);
}

/// Runs `f` with eager ops allowed on device tensors' host-resident values.
/// For device runtimes only (the OpenCL runtime traces a module whose
/// parameters are on the device, and runs its explicit host steps, in this
/// scope); user code moves tensors with `to_device` instead.
pub fn host_access<R>(f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            HOST_ACCESS.with(|h| h.set(h.get() - 1));
        }
    }
    HOST_ACCESS.with(|h| h.set(h.get() + 1));
    let _reset = Reset;
    f()
}

/// Ok if every tensor is on the CPU (or inside `host_access`); otherwise an
/// error naming the op and the device.
#[inline]
pub(crate) fn check_cpu(op: &str, tensors: &[&Tensor]) -> Result<()> {
    if !ANY_OFF_CPU.load(Ordering::Relaxed) {
        return Ok(());
    }
    check_slow(op, tensors)
}

/// `check_cpu` for optional operands (weights, biases, running stats).
#[inline]
pub(crate) fn check_cpu_opt(op: &str, tensors: &[Option<&Tensor>]) -> Result<()> {
    if !ANY_OFF_CPU.load(Ordering::Relaxed) {
        return Ok(());
    }
    let present: Vec<&Tensor> = tensors.iter().flatten().copied().collect();
    check_slow(op, &present)
}

#[cold]
fn check_slow(op: &str, tensors: &[&Tensor]) -> Result<()> {
    for t in tensors {
        let d = t.device();
        if !d.is_cpu() && HOST_ACCESS.with(|h| h.get()) == 0 {
            return Err(Error::op(
                op,
                format!(
                    "tensor on {d}; eager ops run on the CPU; compile the module for the device \
                     (runtime::opencl::compile_opencl) or call .to_device(Device::Cpu)"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Linear, Module, ModuleExt, ReLU, Sequential};
    use kiln_ir::DType;
    use std::sync::Arc;

    fn assert_refused(r: Result<Tensor>, op: &str) {
        let e = match r {
            Ok(t) => panic!("{op}: expected an error, got {t:?}"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains(op) && e.contains("opencl:0") && e.contains("to_device(Device::Cpu)"),
            "{op}: {e}"
        );
    }

    #[test]
    fn eager_ops_on_a_device_tensor_are_errors_naming_the_op() {
        let x = Tensor::randn(&[2, 3], DType::F32);
        let d = x.to_device(Device::OpenCl(0)).unwrap();
        assert_eq!(d.device(), Device::OpenCl(0));
        assert_eq!(x.device(), Device::Cpu);
        assert_refused(d.add(&x), "add");
        assert_refused(x.mul(&d), "mul");
        assert_refused(d.relu(), "relu");
        assert_refused(d.add_scalar(1.0), "add");
        assert_refused(d.matmul(&x.t().unwrap()), "matmul");
        assert_refused(d.sum(), "sum");
        assert_refused(d.mean_dims(&[1], false), "mean");
        assert_refused(d.softmax(1), "softmax");
        assert_refused(d.max(), "max");
        assert_refused(d.argmax(Some(1), false), "argmax");
        assert_refused(Tensor::cat(&[&x, &d], 0), "cat");
        assert_refused(d.clone_tensor(), "clone");
        assert_refused(d.to_dtype(DType::F64), "to");
        assert_refused(d.t().unwrap().reshape(&[6]), "reshape");
        assert_refused(
            crate::ops::nn::layer_norm(&d, &[3], None, None, 1e-5),
            "layer_norm",
        );
        let w = Tensor::randn(&[4, 3], DType::F32);
        assert_refused(
            crate::ops::linalg::linear(&x, &w.to_device(Device::OpenCl(0)).unwrap(), None),
            "linear",
        );
        let e = crate::no_grad(|| d.add_(&x).map(|_| ())).unwrap_err();
        assert!(e.to_string().contains("add_"), "{e}");
        let e = d.fill_(1.0).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("fill_"), "{e}");
    }

    #[test]
    fn views_keep_the_device_and_round_trips_keep_values() {
        let x = Tensor::randn(&[2, 3], DType::F32);
        let d = x.to_device(Device::OpenCl(0)).unwrap();
        assert!(!d.shares_storage(&x), "a copy, as PyTorch's to(device)");
        let v = d.t().unwrap().unsqueeze(0).unwrap();
        assert_eq!(v.device(), Device::OpenCl(0));
        assert_eq!(v.shape(), vec![1, 3, 2]);
        let back = v.to_device(Device::Cpu).unwrap();
        assert_eq!(back.device(), Device::Cpu);
        assert_eq!(back.to_vec::<f32>(), x.t().unwrap().to_vec::<f32>());
        assert_eq!(
            d.to_device(Device::Cpu).unwrap().to_vec::<f32>(),
            x.to_vec::<f32>()
        );
        // Same device: the tensor itself.
        assert!(d.to_device(Device::OpenCl(0)).unwrap().same_object(&d));
        // copy_ is the cross-device copy (load_state_dict, buffer updates).
        crate::no_grad(|| d.copy_(&x.mul_scalar(2.0).unwrap()).map(|_| ())).unwrap();
        assert_eq!(
            d.to_device(Device::Cpu).unwrap().to_vec::<f32>(),
            x.mul_scalar(2.0).unwrap().to_vec::<f32>()
        );
        // The runtime's explicit host scope.
        let y = host_access(|| d.relu()).unwrap();
        assert_eq!(y.device(), Device::Cpu);
        assert_eq!(format!("{}", Device::OpenCl(1)), "opencl:1");
    }

    #[test]
    fn module_to_device_keeps_parameter_objects() {
        let layers: Vec<Arc<dyn Module>> = vec![
            Arc::new(Linear::new(3, 4, true).unwrap()),
            Arc::new(ReLU::new()),
        ];
        let m = Sequential::new(layers);
        let before = m.parameters();
        let x = Tensor::randn(&[2, 3], DType::F32);
        let want = crate::no_grad(|| m.call(&x)).unwrap();
        m.to_device(Device::OpenCl(0)).unwrap();
        let after = m.parameters();
        assert!(before.iter().zip(&after).all(|(a, b)| a.same_object(b)));
        assert!(after.iter().all(|p| p.device() == Device::OpenCl(0)));
        let e = crate::no_grad(|| m.call(&x)).unwrap_err().to_string();
        assert!(e.contains("linear") && e.contains("opencl:0"), "{e}");
        m.to_device(Device::Cpu).unwrap();
        assert!(m.parameters().iter().all(|p| p.device() == Device::Cpu));
        let got = crate::no_grad(|| m.call(&x)).unwrap();
        assert_eq!(got.to_vec::<f32>(), want.to_vec::<f32>());
    }
}

//! The OpenCL path of `kiln verify --backend opencl` and `kiln bench
//! --backend opencl` (feature `opencl`): every zoo model compiled for an
//! OpenCL device, checked against PyTorch's fixtures (eval output, one
//! training forward and the buffers it updates) and timed like the CPU
//! backend.

use crate::bench::{median_ms, BenchRow};
use crate::nn::ModuleExt;
use crate::nn::StateDict;
use crate::runtime::opencl::compile_opencl;
use crate::verify::{disable_dropout, rel_err};
use crate::{zoo, DType, Error, Result, Tensor};
use std::path::Path;

pub use crate::runtime::opencl::{devices, DeviceInfo, OpenClModule};

/// Relative tolerance of the OpenCL path against the fixtures.
pub const OPENCL_TOL: f64 = 1e-4;

/// One model's OpenCL check: (what, relative error) for every compared
/// tensor, and the ops that ran on the host.
pub struct OclReport {
    pub model: String,
    pub checks: Vec<(String, f64)>,
    pub fallbacks: Vec<String>,
    pub device: String,
}

impl OclReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|(_, e)| *e <= OPENCL_TOL)
    }

    pub fn worst(&self) -> f64 {
        self.checks.iter().fold(0.0, |m, (_, e)| m.max(*e))
    }
}

impl std::fmt::Display for OclReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<18} opencl max rel {:.2e} ({} tensors, {} host ops) {}",
            self.model,
            self.worst(),
            self.checks.len(),
            self.fallbacks.len(),
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

fn get<'a>(sd: &'a StateDict, key: &str, file: &str) -> Result<&'a Tensor> {
    sd.get(key)
        .ok_or_else(|| Error::Format(format!("{file}: no tensor `{key}`")))
}

/// Compiles zoo model `name` (weights from `dir`) for OpenCL device
/// `device` and compares its eval output, a training forward and the
/// buffers it updates with the fixtures.
pub fn verify_opencl(dir: &Path, name: &str, device: Option<usize>) -> Result<OclReport> {
    let io_name = format!("{name}.io.safetensors");
    let io = StateDict::load_safetensors(dir.join(&io_name))?;
    let m = zoo::build(name)?;
    m.load_safetensors(dir.join(format!("{name}.safetensors")), true)?;
    let x = get(&io, "input", &io_name)?;
    m.eval();
    let c = compile_opencl(&m, &[x.clone()], device)?;
    let mut checks = Vec::new();
    let y = crate::no_grad(|| c.forward(&[x.clone()]))?;
    checks.push((
        "eval_output".to_string(),
        rel_err(&y[0], get(&io, "eval_output", &io_name)?),
    ));
    m.train(true);
    disable_dropout(&*m)?;
    let yt = crate::no_grad(|| c.forward(&[x.clone()]))?;
    checks.push((
        "train_output".to_string(),
        rel_err(&yt[0], get(&io, "train_output", &io_name)?),
    ));
    for (bname, b) in m.named_buffers() {
        let key = format!("train_state.{bname}");
        checks.push((key.clone(), rel_err(&b, get(&io, &key, &io_name)?)));
    }
    Ok(OclReport {
        model: name.to_string(),
        checks,
        fallbacks: c.fallbacks(),
        device: c.device().name.clone(),
    })
}

/// `kiln bench --backend opencl`: eager CPU and OpenCL median ms per
/// forward; `compiled_ms` holds the OpenCL time (upload of the input,
/// kernels, download of the output) and `jit_kernels` the kernel launches.
pub fn bench_opencl(
    models: &[String],
    large: bool,
    min_time: f64,
    device: Option<usize>,
) -> Result<Vec<BenchRow>> {
    let names: Vec<String> = if models.is_empty() {
        zoo::names().iter().map(|s| s.to_string()).collect()
    } else {
        models.to_vec()
    };
    let mut rows = Vec::new();
    for name in names {
        crate::manual_seed(0);
        let model = zoo::build(&name)?;
        model.eval();
        let (small, big) = zoo::shapes(&name)?;
        let shape = if large { big } else { small };
        let x = Tensor::randn(&shape, DType::F32);
        let eager_ms = crate::no_grad(|| {
            median_ms(
                || {
                    std::hint::black_box(model.call(&x)?);
                    Ok(())
                },
                min_time,
                10,
            )
        })?;
        let c = compile_opencl(&model, &[x.clone()], device)?;
        let ms = crate::no_grad(|| {
            median_ms(
                || {
                    std::hint::black_box(c.forward(&[x.clone()])?);
                    Ok(())
                },
                min_time,
                10,
            )
        })?;
        rows.push(BenchRow {
            model: name,
            shape,
            eager_ms,
            compiled_ms: Some(ms),
            compile_ms: Some(c.compile_ms()),
            jit_kernels: c.launch_count(),
            fallbacks: c.fallbacks().len(),
        });
    }
    Ok(rows)
}

/// The table `kiln bench --backend opencl` prints (the CPU table's columns,
/// the compiled column timed on the OpenCL device).
pub fn format_table(rows: &[BenchRow], device: &str) -> String {
    let mut s = format!(
        "device: {device}\n| model | input shape | kiln eager ms | kiln opencl ms | compile ms | kernel launches | host steps |\n|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:?} | {:.3} | {:.3} | {:.1} | {} | {} |\n",
            r.model,
            r.shape,
            r.eager_ms,
            r.compiled_ms.unwrap_or(f64::NAN),
            r.compile_ms.unwrap_or(f64::NAN),
            r.jit_kernels,
            r.fallbacks
        ));
    }
    s
}

/// `kiln devices`: one line per OpenCL device.
pub fn format_devices(devs: &[DeviceInfo]) -> String {
    let mut s = String::new();
    for d in devs {
        s.push_str(&format!(
            "{}: {} [{}] compute units {}, global memory {:.1} GiB, local memory {} KiB, max work group {}, {}\n",
            d.index,
            d.name,
            d.platform,
            d.compute_units,
            d.global_mem as f64 / (1u64 << 30) as f64,
            d.local_mem / 1024,
            d.max_work_group,
            d.version
        ));
    }
    s
}

//! OpenCL platforms and devices: discovery, choice (index or
//! `KILN_OPENCL_DEVICE`), and one shared `Context` per device (context,
//! in-order queue, program cache keyed by the source hash).

use crate::render::Caps;
use crate::OclError;
use ocl::enums::{DeviceInfo as Di, DeviceInfoResult as Dr};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// One OpenCL device, as `kiln devices` lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    /// Index across all platforms (what `KILN_OPENCL_DEVICE` takes).
    pub index: usize,
    pub platform: String,
    pub name: String,
    pub compute_units: u32,
    pub global_mem: u64,
    pub local_mem: u64,
    pub max_work_group: usize,
    /// e.g. `OpenCL 3.0 PoCL ...`
    pub version: String,
}

fn dev_err(e: impl fmt::Display) -> OclError {
    OclError::new("device", format!("opencl backend: {e}"))
}

use std::fmt;

const NO_PLATFORM: &str = "opencl backend: no OpenCL platform found (install an ICD such as \
     `pocl-opencl-icd` for the CPU or a GPU vendor's driver; an installed but unregistered \
     vendor ICD can be named with OCL_ICD_VENDORS, see the README's GPU section)";

fn list() -> Result<Vec<(DeviceInfo, ocl::Platform, ocl::Device)>, OclError> {
    let ids = ocl::core::get_platform_ids().map_err(|_| OclError::new("device", NO_PLATFORM))?;
    if ids.is_empty() {
        return Err(OclError::new("device", NO_PLATFORM));
    }
    let mut out = Vec::new();
    for id in ids {
        let p = ocl::Platform::new(id);
        let pname = p.name().unwrap_or_else(|_| "?".into());
        let Ok(devs) = ocl::Device::list_all(p) else {
            continue;
        };
        for d in devs {
            let cu = match d.info(Di::MaxComputeUnits) {
                Ok(Dr::MaxComputeUnits(n)) => n,
                _ => 0,
            };
            let gm = match d.info(Di::GlobalMemSize) {
                Ok(Dr::GlobalMemSize(n)) => n,
                _ => 0,
            };
            let lm = match d.info(Di::LocalMemSize) {
                Ok(Dr::LocalMemSize(n)) => n,
                _ => 0,
            };
            let version = d
                .info(Di::Version)
                .map(|v| format!("OpenCL {v}"))
                .unwrap_or_default();
            out.push((
                DeviceInfo {
                    index: out.len(),
                    platform: pname.clone(),
                    name: d.name().unwrap_or_else(|_| "?".into()),
                    compute_units: cu,
                    global_mem: gm,
                    local_mem: lm,
                    max_work_group: d.max_wg_size().unwrap_or(1),
                    version,
                },
                p,
                d,
            ));
        }
    }
    if out.is_empty() {
        return Err(OclError::new(
            "device",
            "opencl backend: OpenCL platforms found, but no device",
        ));
    }
    Ok(out)
}

/// Every OpenCL device of every platform, in index order; an error naming
/// the problem when there is no platform.
pub fn devices() -> Result<Vec<DeviceInfo>, OclError> {
    Ok(list()?.into_iter().map(|(i, _, _)| i).collect())
}

/// A device opened for kiln: context, queue, program cache.
pub struct Context {
    pub(crate) info: DeviceInfo,
    pub(crate) context: ocl::Context,
    pub(crate) queue: ocl::Queue,
    pub(crate) device: ocl::Device,
    programs: Mutex<HashMap<u64, ocl::Program>>,
    builds: AtomicU64,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("device", &self.info)
            .finish()
    }
}

/// The device index from `KILN_OPENCL_DEVICE` (default 0).
fn env_index() -> Result<usize, OclError> {
    match std::env::var("KILN_OPENCL_DEVICE") {
        Ok(s) if !s.trim().is_empty() => s.trim().parse().map_err(|_| {
            OclError::new(
                "device",
                format!("opencl backend: KILN_OPENCL_DEVICE={s:?} is not a device index"),
            )
        }),
        _ => Ok(0),
    }
}

/// The shared context of device `index` (None: `KILN_OPENCL_DEVICE`, else
/// 0), opened on first use.
pub fn context(index: Option<usize>) -> Result<Arc<Context>, OclError> {
    static CONTEXTS: OnceLock<Mutex<HashMap<usize, Arc<Context>>>> = OnceLock::new();
    let index = match index {
        Some(i) => i,
        None => env_index()?,
    };
    let map = CONTEXTS.get_or_init(Default::default);
    let mut map = map.lock().expect("context map poisoned");
    if let Some(c) = map.get(&index) {
        return Ok(c.clone());
    }
    let all = list()?;
    let n = all.len();
    let (info, platform, device) = all.into_iter().nth(index).ok_or_else(|| {
        OclError::new(
            "device",
            format!("opencl backend: no OpenCL device {index} ({n} device(s) found; `kiln devices` lists them)"),
        )
    })?;
    let context = ocl::Context::builder()
        .platform(platform)
        .devices(device)
        .build()
        .map_err(dev_err)?;
    let queue = ocl::Queue::new(&context, device, None).map_err(dev_err)?;
    let c = Arc::new(Context {
        info,
        context,
        queue,
        device,
        programs: Mutex::new(HashMap::new()),
        builds: AtomicU64::new(0),
    });
    map.insert(index, c.clone());
    Ok(c)
}

impl Context {
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// What the lowering needs to know about this device.
    pub fn caps(&self) -> Caps {
        Caps {
            max_work_group: self.info.max_work_group,
            local_mem: self.info.local_mem as usize,
            compute_units: self.info.compute_units.max(1) as usize,
            vector_pointwise: std::env::var("KILN_OPENCL_SCALAR").map_or(true, |v| v.trim() != "1"),
        }
    }

    /// How many programs this context compiled (cache misses).
    pub fn program_builds(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    /// The program for `source`, built once per distinct source.
    pub(crate) fn program(&self, source: &str) -> Result<ocl::Program, OclError> {
        let mut h = DefaultHasher::new();
        source.hash(&mut h);
        let key = h.finish();
        let mut cache = self.programs.lock().expect("program cache poisoned");
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let p = ocl::Program::builder()
            .src(source)
            .devices(self.device)
            .build(&self.context)
            .map_err(|e| {
                OclError::new(
                    "kernel",
                    format!("opencl backend: program build failed: {e}"),
                )
            })?;
        self.builds.fetch_add(1, Ordering::Relaxed);
        cache.insert(key, p.clone());
        Ok(p)
    }
}

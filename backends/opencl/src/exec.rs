//! `DeviceGraph`: a lowered graph resident on one device. Buffers are
//! allocated once (inputs, constants uploaded once, intermediates), kernels
//! are built from one program (cached by source hash) with their arguments
//! bound once; a run is: the runtime writes the inputs that changed, runs
//! the steps (launches here, host steps in the runtime), and reads the
//! outputs. Every host<->device copy is counted.

use crate::device::Context;
use crate::render::{self, elem_size, BufRole, Launch, Program, Step};
use crate::OclError;
use kiln_ir::{DType, Graph, Value};
use ocl::SpatialDims;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn terr(e: impl std::fmt::Display) -> OclError {
    OclError::new("transfer", format!("opencl backend: {e}"))
}

/// Bytes of f64 values in a device dtype (f32, i64 or bool).
pub fn encode(data: &[f64], d: DType) -> Vec<u8> {
    match d {
        DType::F32 => data
            .iter()
            .flat_map(|&v| (v as f32).to_le_bytes())
            .collect(),
        DType::I64 => data
            .iter()
            .flat_map(|&v| (v as i64).to_le_bytes())
            .collect(),
        _ => data.iter().map(|&v| (v != 0.0) as u8).collect(),
    }
}

pub struct DeviceGraph {
    ctx: Arc<Context>,
    prog: Program,
    bufs: Vec<ocl::Buffer<u8>>,
    kernels: Vec<Option<ocl::Kernel>>,
    uploads: AtomicU64,
    downloads: AtomicU64,
}

impl std::fmt::Debug for DeviceGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceGraph")
            .field("buffers", &self.bufs.len())
            .field("launches", &self.prog.launch_count())
            .finish()
    }
}

fn dims(v: &[usize]) -> SpatialDims {
    match v.len() {
        1 => SpatialDims::One(v[0]),
        2 => SpatialDims::Two(v[0], v[1]),
        _ => SpatialDims::Three(v[0], v[1], v[2]),
    }
}

impl DeviceGraph {
    /// Lowers `g` for the context's device, builds its program and
    /// allocates its buffers (constants are uploaded here, once).
    pub fn compile(ctx: &Arc<Context>, g: &Graph) -> Result<DeviceGraph, OclError> {
        let prog = render::lower(g, &ctx.caps())?;
        let mut bufs = Vec::with_capacity(prog.bufs.len());
        for b in &prog.bufs {
            let buf = ocl::Buffer::<u8>::builder()
                .queue(ctx.queue.clone())
                .len(b.bytes())
                .build()
                .map_err(terr)?;
            if let BufRole::Constant(data) = &b.role {
                if !data.is_empty() {
                    buf.write(&encode(data, b.dtype)[..]).enq().map_err(terr)?;
                }
            }
            bufs.push(buf);
        }
        let program = if prog.launch_count() > 0 {
            Some(ctx.program(&prog.source)?)
        } else {
            None
        };
        let mut kernels = Vec::with_capacity(prog.steps.len());
        for s in &prog.steps {
            kernels.push(match s {
                Step::Launch(l) => {
                    let p = program.as_ref().expect("a program for launches");
                    let mut kb = ocl::Kernel::builder();
                    kb.program(p)
                        .name(l.name.clone())
                        .queue(ctx.queue.clone())
                        .global_work_size(dims(&l.global))
                        .local_work_size(dims(&l.local));
                    for &a in &l.args {
                        kb.arg(&bufs[a]);
                    }
                    Some(kb.build().map_err(|e| {
                        OclError::new(
                            "kernel",
                            format!("opencl backend: kernel {} ({}): {e}", l.name, l.ops),
                        )
                    })?)
                }
                Step::Host { .. } | Step::Call { .. } => None,
            });
        }
        Ok(DeviceGraph {
            ctx: ctx.clone(),
            prog,
            bufs,
            kernels,
            uploads: AtomicU64::new(0),
            downloads: AtomicU64::new(0),
        })
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The lowered program (buffers, layouts, steps, OpenCL C source).
    pub fn program(&self) -> &Program {
        &self.prog
    }

    /// Host-to-device and device-to-host copies so far: (uploads, downloads).
    pub fn transfers(&self) -> (u64, u64) {
        (
            self.uploads.load(Ordering::Relaxed),
            self.downloads.load(Ordering::Relaxed),
        )
    }

    /// Uploads `bytes` (contiguous, the buffer's dtype) into buffer `buf`.
    pub fn write(&self, buf: usize, bytes: &[u8]) -> Result<(), OclError> {
        let spec = &self.prog.bufs[buf];
        if bytes.len() != spec.numel * elem_size(spec.dtype) {
            return Err(terr(format!(
                "buffer {buf} holds {} {} elements, got {} bytes",
                spec.numel,
                spec.dtype.short_name(),
                bytes.len()
            )));
        }
        if !bytes.is_empty() {
            self.bufs[buf].write(bytes).enq().map_err(terr)?;
        }
        self.uploads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Downloads value `v` (of type `ty` in `g`) as contiguous bytes: one
    /// read of its buffer, gathered through its layout on the host.
    pub fn read(&self, g: &Graph, v: Value) -> Result<Vec<u8>, OclError> {
        let ty = g.value_type(v);
        let l = self.prog.layouts.get(&v).ok_or_else(|| {
            terr(format!(
                "value of op {} is not in device memory",
                g.node(v.node).op.name()
            ))
        })?;
        let spec = &self.prog.bufs[l.buf];
        let es = elem_size(spec.dtype);
        let mut raw = vec![0u8; spec.numel * es];
        if !raw.is_empty() {
            self.bufs[l.buf].read(&mut raw).enq().map_err(terr)?;
        }
        self.downloads.fetch_add(1, Ordering::Relaxed);
        let contiguous = l.offset == 0
            && spec.numel == ty.numel()
            && l.strides == kiln_ir::contiguous_strides(&ty.shape);
        if contiguous {
            return Ok(raw);
        }
        let n = ty.numel();
        let mut out = Vec::with_capacity(n * es);
        let r = ty.rank();
        let mut idx = vec![0usize; r];
        for _ in 0..n {
            let off = l.offset
                + idx
                    .iter()
                    .zip(&l.strides)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            out.extend_from_slice(&raw[off * es..(off + 1) * es]);
            for d in (0..r).rev() {
                idx[d] += 1;
                if idx[d] < ty.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(out)
    }

    /// Enqueues launch step `i`.
    pub fn launch(&self, i: usize) -> Result<(), OclError> {
        let k = self.kernels[i]
            .as_ref()
            .ok_or_else(|| OclError::new("kernel", format!("step {i} is not a launch")))?;
        // SAFETY: every argument is a buffer of this graph sized for the
        // indices the generated kernel reads and writes (render checks the
        // layouts statically); buffers outlive the queue's use of them.
        unsafe { k.enq() }.map_err(|e| {
            let ops = match &self.prog.steps[i] {
                Step::Launch(Launch { ops, .. }) => ops.clone(),
                _ => String::new(),
            };
            OclError::new("kernel", format!("opencl backend: launch of {ops}: {e}"))
        })
    }

    /// Device-to-device copy of buffer `src` into buffer `dst` (same size):
    /// not a host transfer.
    pub fn copy_buffer(&self, src: usize, dst: usize) -> Result<(), OclError> {
        if self.prog.bufs[src].bytes() != self.prog.bufs[dst].bytes() {
            return Err(terr("copy between buffers of different sizes"));
        }
        self.bufs[src]
            .copy(&self.bufs[dst], None, None)
            .enq()
            .map_err(terr)
    }

    /// Waits for every enqueued command.
    pub fn finish(&self) -> Result<(), OclError> {
        self.ctx.queue.finish().map_err(terr)
    }
}

//! kiln-opencl: will render the fused kernels of a fusion plan (from kiln-ir)
//! as OpenCL C and run them through the `ocl` crate, behind the `opencl`
//! feature of the `kiln` package. Nothing is implemented yet (see the open
//! "OpenCL GPU backend" issue). It depends on kiln-ir only.

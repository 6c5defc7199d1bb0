//! kiln-cranelift: will lower the fused kernels of a fusion plan (from
//! kiln-ir) to Cranelift IR and JIT-compile them into machine code, with
//! f32x4 SIMD loops and rayon-parallel outer loops. Nothing is implemented
//! yet (see the open "Compiled CPU backend" issue); this crate exists so the
//! workspace has its final shape. It depends on kiln-ir only.

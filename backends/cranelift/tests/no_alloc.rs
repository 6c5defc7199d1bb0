//! A compiled kernel's `run` allocates nothing on the calling thread (the
//! runtime's steady state must allocate only its outputs). Own test binary:
//! the counting global allocator counts per thread.

use kiln_cranelift::PointwiseKernel;
use kiln_ir::{
    plan_fusion, BinaryOp, DType, Graph, InputKind, Op, OutputKind, TensorType, UnaryOp,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn run_allocates_nothing() {
    let t = |s: &[usize]| TensorType::new(s, DType::F32);
    let mut g = Graph::new();
    let x = g.add_input(InputKind::User(0), t(&[64, 33]), "").unwrap();
    let b = g.add_input(InputKind::User(1), t(&[33]), "").unwrap();
    let y = g.add1(Op::Binary(BinaryOp::Add), &[x, b], "").unwrap();
    let y = g.add1(Op::Unary(UnaryOp::GeluErf), &[y], "").unwrap();
    g.add_output(y, OutputKind::User).unwrap();
    let plan = plan_fusion(&g).unwrap();
    let k = PointwiseKernel::compile(&g, &plan.kernels[0]).unwrap();
    assert!(64 * 33 < k.par_threshold());
    let xs = vec![0.5f32; 64 * 33];
    let bs = vec![0.25f32; 33];
    let mut out = vec![0.0f32; 64 * 33];
    k.run(&[&xs, &bs], &mut [&mut out]).unwrap();
    let before = ALLOCS.with(|c| c.get());
    for _ in 0..10 {
        k.run(&[&xs, &bs], &mut [&mut out]).unwrap();
    }
    assert_eq!(ALLOCS.with(|c| c.get()), before);
    assert!((out[0] - 0.5 * 0.75 * (1.0 + libm::erf(0.75 / 2f64.sqrt())) as f32).abs() < 1e-6);
}

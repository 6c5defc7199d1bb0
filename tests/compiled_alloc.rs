//! A steady-state compiled call allocates nothing but its outputs: the
//! intermediates live in the variant's arena (planned by liveness at
//! compile time), the bound parameters and the raw views of the leaves are
//! kept from call to call, outputs are written in place into the returned
//! tensors. Counted with a global allocator that tallies bytes on this
//! thread while a counter is armed. The one allocation kiln does not
//! control, the gemm crate's per-call packing buffer (it takes no
//! workspace), is counted apart (`kiln_cpu::matmul::in_gemm`) and reported.

mod common;
use common::model;
use kiln::jit;
use kiln::nn::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static BYTES: Cell<usize> = const { Cell::new(0) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
    static GEMM_BYTES: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if ARMED.try_with(|a| a.get()).unwrap_or(false) {
            if kiln::cpu::matmul::in_gemm() {
                let _ = GEMM_BYTES.try_with(|b| b.set(b.get() + l.size()));
            } else {
                let _ = BYTES.try_with(|b| b.set(b.get() + l.size()));
                let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            }
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// (bytes, allocations) of `f` on this thread.
fn counted(f: impl FnOnce()) -> (usize, usize) {
    BYTES.with(|b| b.set(0));
    COUNT.with(|c| c.set(0));
    GEMM_BYTES.with(|b| b.set(0));
    ARMED.with(|a| a.set(true));
    f();
    ARMED.with(|a| a.set(false));
    (BYTES.with(|b| b.get()), COUNT.with(|c| c.get()))
}

fn steady_state(name: &str) -> (usize, usize, usize) {
    let (m, x) = model(name);
    m.eval();
    let c = jit::compile(&m, &[x.clone()]).unwrap();
    let inputs = [x.clone()];
    let out_bytes = 4 * kiln::no_grad(|| c.forward(&inputs)).unwrap()[0].numel();
    for _ in 0..3 {
        kiln::no_grad(|| c.forward(&inputs)).unwrap();
    }
    let (bytes, n) = counted(|| {
        let y = kiln::no_grad(|| c.forward(&inputs)).unwrap();
        drop(y);
    });
    (bytes, n, out_bytes)
}

/// Bookkeeping of the returned tensor (its Arc, shape and strides, the
/// Vec holding it) on top of its data.
const OUTPUT_OVERHEAD: usize = 1024;

#[test]
fn steady_state_calls_allocate_only_their_outputs() {
    for &name in kiln::zoo::names() {
        let (bytes, n, out) = steady_state(name);
        let gemm = GEMM_BYTES.with(|b| b.get());
        eprintln!(
            "{name}: {bytes} bytes in {n} allocations (+ {gemm} in the gemm crate), output {out} bytes"
        );
        assert!(
            bytes <= out + OUTPUT_OVERHEAD,
            "{name}: a steady-state call allocated {bytes} bytes in {n} allocations; its output is {out} bytes"
        );
    }
}

//! Peak bytes of one training step (zero_grad, forward, MSE loss, backward,
//! SGD step with momentum) of zoo models at the throughput shapes, eager
//! kiln against compiled training, counted by a global allocator wrapper
//! (peak live bytes above the live bytes before the step; one warm-up step
//! first so the optimizer state exists in both), with the buffer-recycling
//! cache off so only live buffers count. Also prints (stderr) where the
//! compiled step peaks: forward, loss, backward, optimizer step.
//!
//! `cargo run --release --example train_memory [model ...]`
//! (default: transformer_block seed_cnn)

use kiln::nn::functional::{mse_loss, Reduction};
use kiln::nn::prelude::*;
use kiln::optim::{Optimizer, SgdOptions, SGD};
use kiln::{DType, Tensor};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

fn peak_of(f: &mut dyn FnMut() -> kiln::Result<()>) -> kiln::Result<usize> {
    f()?; // warm-up: optimizer state, caches
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    f()?;
    Ok(PEAK.load(Ordering::Relaxed) - base)
}

fn sgd(m: &dyn Module, fused: bool) -> SGD {
    let mut o = SGD::new(
        m.parameters(),
        SgdOptions {
            lr: 1e-3,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    o.set_fused(fused);
    o
}

fn main() -> kiln::Result<()> {
    // Count live tensors, not the recycling cache's spare buffers.
    kiln::cpu::buffers::set_enabled(false);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let names = if args.is_empty() {
        vec!["transformer_block".to_string(), "seed_cnn".to_string()]
    } else {
        args
    };
    println!("| model | input shape | eager peak MiB | compiled peak MiB |\n|---|---|---|---|");
    for name in names {
        kiln::manual_seed(0);
        let m = kiln::zoo::build(&name)?;
        m.train(true);
        let (_, shape) = kiln::zoo::shapes(&name)?;
        let x = Tensor::randn(&shape, DType::F32);
        let target = Tensor::randn(&kiln::no_grad(|| m.call(&x))?.shape(), DType::F32);
        let mut opt = sgd(&*m, false);
        let eager = peak_of(&mut || {
            opt.zero_grad(true)?;
            let loss = mse_loss(&m.call(&x)?, &target, Reduction::Mean)?;
            loss.backward()?;
            opt.step()
        })?;
        drop(opt);
        let loss_fn: kiln::jit::LossFn = Box::new(|y, t| mse_loss(y, t, Reduction::Mean));
        let mut step = kiln::jit::compile_training(&m, loss_fn, Box::new(sgd(&*m, true)), &x)
            .map_err(|e| kiln::Error::op("compile_training", e.to_string()))?;
        let compiled = peak_of(&mut || {
            step.step(&x, &target)
                .map(|_| ())
                .map_err(|e| kiln::Error::op("train step", e.to_string()))
        })?;
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        // Where the compiled step peaks: forward, loss, backward.
        {
            let base = LIVE.load(Ordering::Relaxed);
            let phase = |what: &str| {
                eprint!("{what} +{:.1} ", mib(PEAK.load(Ordering::Relaxed) - base));
                PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
            };
            PEAK.store(base, Ordering::Relaxed);
            step.optimizer_mut().zero_grad(true)?;
            phase("zero_grad");
            let y = step
                .model()
                .call(&x)
                .map_err(|e| kiln::Error::op("forward", e.to_string()))?;
            phase("forward");
            let loss = mse_loss(&y, &target, Reduction::Mean)?;
            phase("loss");
            loss.backward()?;
            phase("backward");
            step.optimizer_mut().step()?;
            phase("step");
            eprintln!("MiB above the step's start ({name}, compiled)");
        }
        let v = step.model().variant(std::slice::from_ref(&x)).unwrap();
        let (fa, ba) = v.arena_bytes();
        eprintln!(
            "{name}: forward arena {:.1} MiB, backward arena {:.1} MiB, {} saved values, fallback nodes {:?}",
            mib(fa),
            mib(ba),
            v.num_saved(),
            v.fallbacks()
                .iter()
                .map(|f| f.split(':').next().unwrap_or(""))
                .collect::<Vec<_>>()
        );
        println!(
            "| {name} | {shape:?} | {:.1} | {:.1} |",
            mib(eager),
            mib(compiled)
        );
    }
    Ok(())
}

//! Where an eager forward's time goes: median ms per leaf module of a zoo
//! model (timed with forward pre/post hooks), next to the whole forward's
//! median; the difference is the time spent outside leaf modules (the
//! model's own tensor ops, e.g. attention's matmuls and reshapes).
//!
//! Run: `cargo run --release --example layer_times -- MODEL [--large]`

use kiln::nn::prelude::*;
use kiln::{zoo, DType, Tensor};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

type Times = Arc<Mutex<BTreeMap<String, Vec<f64>>>>;

fn main() -> kiln::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map_or("seed_cnn", |s| s.as_str());
    let large = args.iter().any(|a| a == "--large");
    let m = zoo::build(name)?;
    m.eval();
    let (small, big) = zoo::shapes(name)?;
    let x = Tensor::randn(if large { &big } else { &small }, DType::F32);
    let times: Times = Arc::default();
    let starts: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut handles = Vec::new();
    for (path, module) in m.named_modules() {
        if !module.named_children().is_empty() {
            continue;
        }
        let label = format!("{path} ({})", module.core().type_name());
        let st = starts.clone();
        handles.push(module.core().register_forward_pre_hook(move |_, _| {
            st.lock().unwrap().push(Instant::now());
            Ok(None)
        }));
        let (st, tm) = (starts.clone(), times.clone());
        handles.push(module.core().register_forward_hook(move |_, _, _| {
            let t0 = st.lock().unwrap().pop().expect("pre-hook ran");
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            tm.lock()
                .unwrap()
                .entry(label.clone())
                .or_default()
                .push(ms);
            Ok(None)
        }));
    }
    let runs = if large { 30 } else { 300 };
    let mut total = Vec::new();
    kiln::no_grad(|| -> kiln::Result<()> {
        for i in 0..runs + 10 {
            let t = Instant::now();
            std::hint::black_box(m.call(&x)?);
            if i >= 10 {
                total.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(())
    })?;
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!(
        "{name} {:?}: forward median {:.3} ms (with hooks)",
        x.shape(),
        med(&mut total)
    );
    println!("| module | median ms |\n|---|---|");
    let mut sum = 0.0;
    for (label, v) in times.lock().unwrap().iter_mut() {
        let per_call = v.len() / (runs + 10);
        let t = med(v) * per_call.max(1) as f64;
        sum += t;
        println!("| {label} | {t:.4} |");
    }
    println!("| sum of leaves | {sum:.3} |");
    drop(handles);
    Ok(())
}

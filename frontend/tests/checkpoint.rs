//! Checkpoints: training resumed from a checkpoint (fresh model, fresh
//! optimizer, generator re-seeded elsewhere) is BIT-identical to
//! uninterrupted training, with SGD (momentum, nesterov, weight decay),
//! Adam (amsgrad) and AdamW, a model with dropout and buffers updated in
//! training; metadata round-trips exactly; truncated/corrupt files and
//! mismatching checkpoints are clear errors that change nothing.

use kiln_frontend::checkpoint::{load_checkpoint, save_checkpoint, Checkpoint};
use kiln_frontend::nn::functional::{cross_entropy, Reduction};
use kiln_frontend::nn::prelude::*;
use kiln_frontend::optim::{Adam, AdamOptions, Optimizer, OptimizerStateDict, SgdOptions, SGD};
use kiln_frontend::random::{get_rng_state, set_rng_state};
use kiln_frontend::{manual_seed, no_grad, DType, Error, Result, Tensor};
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::Arc;

/// The generator is global: tests of this file that draw from it run one at a time.
static RNG_LOCK: Mutex<()> = Mutex::new(());

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "kiln-ckpt-{}-{name}.safetensors",
        std::process::id()
    ))
}

/// A user-written linear layer (weight [out, in], bias [out]).
struct MyLinear {
    core: ModuleCore,
}

impl MyLinear {
    fn shared(i: usize, o: usize) -> Result<Arc<dyn Module>> {
        let core = ModuleCore::new("MyLinear");
        let s = 1.0 / (i as f64).sqrt();
        core.register_parameter(
            "weight",
            Some(Parameter::new(
                Tensor::randn(&[o, i], DType::F32).mul_scalar(s)?,
            )?),
        )?;
        core.register_parameter(
            "bias",
            Some(Parameter::new(
                Tensor::randn(&[o], DType::F32).mul_scalar(s)?,
            )?),
        )?;
        Ok(Arc::new(MyLinear { core }))
    }
}

impl Module for MyLinear {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kiln_frontend::ops::linalg::linear(
            x,
            &self.core.param("weight")?,
            Some(&self.core.param("bias")?),
        )
    }
}

/// Keeps a running mean of its input and counts batches (buffers that
/// change in training), and returns the input.
struct Stats {
    core: ModuleCore,
}

impl Stats {
    fn shared(d: usize) -> Result<Arc<dyn Module>> {
        let core = ModuleCore::new("Stats");
        core.register_buffer("running_mean", Some(Tensor::zeros(&[d], DType::F32)), true)?;
        core.register_buffer("num_batches", Some(Tensor::zeros(&[], DType::I64)), true)?;
        Ok(Arc::new(Stats { core }))
    }
}

impl Module for Stats {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.core.is_training() {
            no_grad(|| -> Result<()> {
                let rm = self.core.buffer("running_mean")?;
                let m = x.mean_dims(&[0], false)?;
                rm.copy_(&rm.mul_scalar(0.9)?.add(&m.mul_scalar(0.1)?)?)?;
                let nb = self.core.buffer("num_batches")?;
                nb.copy_(&nb.add_scalar(1.0)?)?;
                Ok(())
            })?;
        }
        Ok(x.clone())
    }
}

fn net(hidden: usize) -> Result<Sequential> {
    Ok(Sequential::new([
        MyLinear::shared(4, hidden)?,
        Arc::new(Tanh::new()) as Arc<dyn Module>,
        Arc::new(Dropout::new(0.25)?),
        Stats::shared(hidden)?,
        MyLinear::shared(hidden, 3)?,
    ]))
}

/// One training step on a batch drawn from the global generator, labelled by
/// a fixed teacher; returns the loss's bits.
fn step(model: &Sequential, opt: &mut dyn Optimizer) -> Result<u32> {
    let x = Tensor::randn(&[16, 4], DType::F32);
    let teacher = Tensor::from_vec(
        vec![
            1.0f32, -2.0, 0.5, 0.0, -1.0, 0.5, 2.0, 1.0, 0.3, 1.0, -1.5, -0.5,
        ],
        &[3, 4],
    )?;
    let y = x.matmul(&teacher.t()?)?.argmax(Some(1), false)?;
    let loss = cross_entropy(&model.call(&x)?, &y, Reduction::Mean, 0.05, None, -100)?;
    opt.zero_grad(true)?;
    loss.backward()?;
    opt.step()?;
    Ok((loss.item()? as f32).to_bits())
}

fn bits(t: &Tensor) -> Vec<u64> {
    match t.dtype() {
        DType::I64 | DType::Bool => t.to_vec::<i64>().into_iter().map(|v| v as u64).collect(),
        _ => t.to_vec::<f64>().into_iter().map(f64::to_bits).collect(),
    }
}

fn model_bits(m: &Sequential) -> Vec<(String, Vec<u64>)> {
    m.state_dict()
        .iter()
        .map(|(k, t)| (k.to_string(), bits(t)))
        .collect()
}

fn optim_bits(sd: &OptimizerStateDict) -> (Vec<(usize, String, Vec<u64>)>, String) {
    let mut v = Vec::new();
    for (i, entries) in &sd.state {
        for (k, t) in entries {
            v.push((*i, k.clone(), bits(t)));
        }
    }
    (v, serde_json::to_string(&sd.param_groups).unwrap())
}

/// Trains `n` steps uninterrupted, saving a checkpoint after step `k`;
/// then builds a fresh model and optimizer (other seed), restores the
/// checkpoint and trains the remaining steps; everything must be bitwise
/// equal.
fn resume_is_bit_identical(
    name: &str,
    make_opt: &dyn Fn(Vec<Tensor>) -> Result<Box<dyn Optimizer>>,
    n: usize,
    k: usize,
) {
    let _lock = RNG_LOCK.lock();
    let path = tmp(name);
    manual_seed(1);
    let a = net(16).unwrap();
    a.train(true);
    let mut oa = make_opt(a.parameters()).unwrap();
    let mut la = Vec::new();
    for i in 0..n {
        la.push(step(&a, &mut *oa).unwrap());
        if i + 1 == k {
            let ck = Checkpoint::capture(
                &a,
                Some(&*oa),
                0,
                k as u64,
                Some(f32::from_bits(la[i]) as f64),
            )
            .unwrap()
            .with_metadata("run", name);
            save_checkpoint(&path, &ck).unwrap();
        }
    }
    let rng_a = get_rng_state();

    manual_seed(12345);
    let b = net(16).unwrap();
    b.train(true);
    let mut ob = make_opt(b.parameters()).unwrap();
    let _ = Tensor::randn(&[7], DType::F32); // move the generator elsewhere
    assert_ne!(model_bits(&a), model_bits(&b));
    let ck = load_checkpoint(&path).unwrap();
    assert_eq!(ck.step, k as u64);
    assert_eq!(ck.loss, Some(f32::from_bits(la[k - 1]) as f64));
    assert_eq!(ck.metadata.get("run").map(String::as_str), Some(name));
    assert_eq!(ck.optimizer_kind.as_deref(), Some(ob.kind()));
    ck.restore(&b, Some(&mut *ob)).unwrap();
    let mut lb = Vec::new();
    for _ in k..n {
        lb.push(step(&b, &mut *ob).unwrap());
    }
    assert_eq!(lb, la[k..].to_vec(), "losses after resuming ({name})");
    assert_eq!(
        model_bits(&a),
        model_bits(&b),
        "parameters and buffers ({name})"
    );
    assert_eq!(
        optim_bits(&oa.state_dict()),
        optim_bits(&ob.state_dict()),
        "optimizer state ({name})"
    );
    // both runs drew the same numbers: B's generator ends where A's did
    assert_eq!(get_rng_state(), rng_a);
    // the buffers did change in training (the test would be weak otherwise)
    let nb = b.state_dict().get("3.num_batches").unwrap().item().unwrap();
    assert_eq!(nb, n as f64);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn resume_sgd_momentum_bit_identical() {
    resume_is_bit_identical(
        "sgd",
        &|p| {
            Ok(Box::new(SGD::new(
                p,
                SgdOptions {
                    lr: 0.05,
                    momentum: 0.9,
                    weight_decay: 1e-3,
                    nesterov: true,
                    ..Default::default()
                },
            )?))
        },
        30,
        11,
    );
}

#[test]
fn resume_adam_bit_identical() {
    resume_is_bit_identical(
        "adam",
        &|p| {
            Ok(Box::new(Adam::new(
                p,
                AdamOptions {
                    amsgrad: true,
                    weight_decay: 1e-4,
                    ..AdamOptions::adam(0.012345678901234568)
                },
            )?))
        },
        30,
        13,
    );
    resume_is_bit_identical("adamw", &|p| Ok(Box::new(Adam::adamw(p, 3e-3)?)), 20, 1);
}

#[test]
fn interrupting_without_the_generator_state_diverges() {
    // the control experiment: restoring everything but the generator state
    // gives other dropout masks and batches, hence other losses
    let _lock = RNG_LOCK.lock();
    manual_seed(1);
    let a = net(16).unwrap();
    a.train(true);
    let mut oa = SGD::new(a.parameters(), SgdOptions::lr(0.05)).unwrap();
    for _ in 0..3 {
        step(&a, &mut oa).unwrap();
    }
    let mut ck = Checkpoint::capture(&a, Some(&oa), 0, 3, None).unwrap();
    let next_a = step(&a, &mut oa).unwrap();
    ck.rng_state = None;
    let b = net(16).unwrap();
    b.train(true);
    let mut ob = SGD::new(b.parameters(), SgdOptions::lr(0.05)).unwrap();
    ck.restore(&b, Some(&mut ob)).unwrap();
    assert_ne!(step(&b, &mut ob).unwrap(), next_a);
}

#[test]
fn metadata_round_trips_exactly() {
    let _lock = RNG_LOCK.lock();
    manual_seed(3);
    let m = net(8).unwrap();
    let lr = 0.1 + 2.0f64.powi(-40); // not a short decimal
    let opt = Adam::new(
        m.parameters(),
        AdamOptions {
            betas: (0.8999999999999999, 0.99912345678901),
            eps: 1.2345678901234567e-9,
            ..AdamOptions::adam(lr)
        },
    )
    .unwrap();
    for loss in [1.0 / 3.0, 1e-310, f64::MAX, f64::INFINITY] {
        let ck = Checkpoint::capture(&m, Some(&opt), 7, 12_345_678_901, Some(loss))
            .unwrap()
            .with_metadata("model", "tiny mlp")
            .with_metadata("notes", "ünïcode, \"quotes\"");
        let back = Checkpoint::from_bytes(&ck.to_bytes().unwrap()).unwrap();
        assert_eq!(back.epoch, 7);
        assert_eq!(back.step, 12_345_678_901);
        assert_eq!(back.loss.unwrap().to_bits(), loss.to_bits());
        assert_eq!(back.metadata, ck.metadata);
        assert_eq!(back.rng_state, ck.rng_state);
        assert_eq!(back.model.keys(), m.state_dict().keys());
        let g = &back.optimizer.as_ref().unwrap().param_groups[0];
        assert_eq!(g["lr"].as_f64().unwrap().to_bits(), lr.to_bits());
        assert_eq!(g["eps"].as_f64().unwrap(), 1.2345678901234567e-9);
        assert_eq!(g["betas"][1].as_f64().unwrap(), 0.99912345678901);
    }
    let nan = Checkpoint::capture(&m, None, 0, 0, Some(f64::NAN)).unwrap();
    let back = Checkpoint::from_bytes(&nan.to_bytes().unwrap()).unwrap();
    assert!(back.loss.unwrap().is_nan());
    assert!(back.optimizer.is_none());
    let none = Checkpoint::capture(&m, None, 0, 0, None).unwrap();
    assert!(Checkpoint::from_bytes(&none.to_bytes().unwrap())
        .unwrap()
        .loss
        .is_none());
    // a restore that asks for optimizer state the checkpoint lacks
    let mut o2 = SGD::new(m.parameters(), SgdOptions::lr(0.1)).unwrap();
    let e = none.restore(&m, Some(&mut o2)).unwrap_err().to_string();
    assert!(e.contains("no optimizer state"), "{e}");
}

/// Everything a failed restore must leave alone (the model's tensors, the
/// optimizer's state and groups, the generator).
type Snapshot = (Vec<(String, Vec<u64>)>, String, Vec<u8>);

fn snapshot(m: &Sequential, o: &dyn Optimizer) -> Snapshot {
    let (ob, groups) = optim_bits(&o.state_dict());
    (
        m.state_dict()
            .iter()
            .map(|(k, t)| (k.to_string(), bits(t)))
            .collect(),
        format!("{ob:?}{groups}"),
        get_rng_state(),
    )
}

#[test]
fn failed_restores_change_nothing() {
    let _lock = RNG_LOCK.lock();
    manual_seed(5);
    let a = net(16).unwrap();
    a.train(true);
    let mut oa = Adam::new(a.parameters(), AdamOptions::adam(1e-2)).unwrap();
    step(&a, &mut oa).unwrap();
    let ck = Checkpoint::capture(&a, Some(&oa), 1, 1, None).unwrap();

    // target model and optimizer with state of their own
    let b = net(16).unwrap();
    b.train(true);
    let mut ob = Adam::new(b.parameters(), AdamOptions::adam(5e-3)).unwrap();
    step(&b, &mut ob).unwrap();

    // another optimizer kind
    let mut sgd = SGD::new(b.parameters(), SgdOptions::lr(0.1)).unwrap();
    let before = snapshot(&b, &ob);
    let e = ck.restore(&b, Some(&mut sgd)).unwrap_err().to_string();
    assert!(e.contains("holds Adam state, the optimizer is SGD"), "{e}");
    assert_eq!(snapshot(&b, &ob), before);

    // Adam state relabelled as SGD: the entries are rejected by name
    let mut relabelled = ck.clone();
    relabelled.optimizer_kind = Some("SGD".into());
    let e = relabelled
        .restore(&b, Some(&mut sgd))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unexpected SGD state `step`"), "{e}");
    assert_eq!(snapshot(&b, &ob), before);

    // an optimizer over fewer parameters (group size mismatch)
    let mut small = Adam::new(b.parameters()[..2].to_vec(), AdamOptions::adam(1e-3)).unwrap();
    let before = snapshot(&b, &ob);
    let e = ck.restore(&b, Some(&mut small)).unwrap_err().to_string();
    assert!(
        e.contains("doesn't match the size of optimizer's group"),
        "{e}"
    );
    assert_eq!(snapshot(&b, &ob), before);

    // a model of another width: the optimizer state is checked first; without
    // an optimizer, every mis-shaped model key is listed; nothing loads
    let c = net(8).unwrap();
    let mut oc = Adam::new(c.parameters(), AdamOptions::adam(1e-3)).unwrap();
    step(&c, &mut oc).unwrap();
    let before_c = snapshot(&c, &oc);
    let e = ck.restore(&c, Some(&mut oc)).unwrap_err().to_string();
    assert!(e.contains("optimizer state") && e.contains("shape"), "{e}");
    assert_eq!(snapshot(&c, &oc), before_c);
    let before_c = snapshot(&c, &oc);
    let e = ck.restore(&c, None).unwrap_err().to_string();
    assert!(
        e.contains("size mismatch for 0.weight") && e.contains("size mismatch for 4.weight"),
        "{e}"
    );
    assert_eq!(snapshot(&c, &oc), before_c);

    // a model key missing from the checkpoint (strict)
    let mut missing = ck.clone();
    missing.model.remove("3.running_mean");
    let before = snapshot(&b, &ob);
    let e = missing.restore(&b, Some(&mut ob)).unwrap_err().to_string();
    assert!(
        e.contains("Missing key(s) in state_dict: \"3.running_mean\""),
        "{e}"
    );
    assert_eq!(snapshot(&b, &ob), before);

    // a bad generator state
    let mut bad_rng = ck.clone();
    bad_rng.rng_state = Some(vec![1, 2, 3]);
    let before = snapshot(&b, &ob);
    let e = bad_rng.restore(&b, Some(&mut ob)).unwrap_err().to_string();
    assert!(e.contains("56 bytes, got 3"), "{e}");
    assert_eq!(snapshot(&b, &ob), before);

    // and the good one loads
    ck.restore(&b, Some(&mut ob)).unwrap();
    assert_eq!(model_bits(&a), model_bits(&b));
}

#[test]
fn truncated_corrupt_and_foreign_files_are_clear_errors() {
    let _lock = RNG_LOCK.lock();
    manual_seed(9);
    let m = net(8).unwrap();
    let opt = SGD::new(
        m.parameters(),
        SgdOptions {
            momentum: 0.9,
            ..SgdOptions::lr(0.1)
        },
    )
    .unwrap();
    let ck = Checkpoint::capture(&m, Some(&opt), 2, 20, Some(0.5)).unwrap();
    let bytes = ck.to_bytes().unwrap();
    let path = tmp("corrupt");
    let fmt_err = |b: &[u8]| -> String {
        std::fs::write(&path, b).unwrap();
        match load_checkpoint(&path) {
            Err(Error::Format(m)) => m,
            other => panic!("expected a format error, got {other:?}"),
        }
    };
    for cut in [bytes.len() - 1, bytes.len() / 2, 9, 3, 0] {
        let e = fmt_err(&bytes[..cut]);
        assert!(
            e.contains(&path.display().to_string()) && e.contains("not a valid safetensors file"),
            "{e}"
        );
    }
    let mut garbage = bytes.clone();
    for b in &mut garbage[8..40] {
        *b = b'#';
    }
    let e = fmt_err(&garbage);
    assert!(e.contains("not a valid safetensors file"), "{e}");
    // a plain state dict is not a checkpoint
    m.save_safetensors(&path).unwrap();
    let e = load_checkpoint(&path).unwrap_err().to_string();
    assert!(e.contains("not a kiln checkpoint"), "{e}");
    // a checkpoint whose metadata was tampered with
    let mut sd = m.state_dict();
    sd.insert("model.x", Tensor::zeros(&[1], DType::F32));
    let mut meta = std::collections::HashMap::new();
    meta.insert("kiln.format".to_string(), "kiln-checkpoint".to_string());
    meta.insert("kiln.version".to_string(), "1".to_string());
    meta.insert("epoch".to_string(), "two".to_string());
    meta.insert("step".to_string(), "0".to_string());
    let e = Checkpoint::from_bytes(&sd.to_safetensors_bytes(Some(meta.clone())).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("`epoch` = \"two\" is not an integer"), "{e}");
    meta.insert("epoch".to_string(), "2".to_string());
    let e = Checkpoint::from_bytes(&sd.to_safetensors_bytes(Some(meta.clone())).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unexpected tensor `") && e.contains("(expected `model.<key>`"),
        "{e}"
    );
    meta.insert("kiln.version".to_string(), "9".to_string());
    let e = Checkpoint::from_bytes(&sd.to_safetensors_bytes(Some(meta)).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("unsupported version"), "{e}");
    // the intact file still loads, and the model was never touched
    save_checkpoint(&path, &ck).unwrap();
    let back = load_checkpoint(&path).unwrap();
    assert_eq!(back.epoch, 2);
    let _ = std::fs::remove_file(&path);
    // set_rng_state itself
    let s = get_rng_state();
    let x1 = Tensor::randn(&[5], DType::F64).to_vec::<f64>();
    set_rng_state(&s).unwrap();
    assert_eq!(Tensor::randn(&[5], DType::F64).to_vec::<f64>(), x1);
}

//! Training example: an MLP learns to classify points labelled by a fixed
//! random "teacher" network, with Adam and CrossEntropyLoss (label
//! smoothing), dropout, minibatches drawn from kiln's global generator and
//! an indicatif progress bar. After epoch 4 it saves a checkpoint (one
//! safetensors file: model, optimizer, generator, epoch, loss), trains on to
//! the end, then builds a FRESH model and optimizer, restores the checkpoint
//! and trains the same epochs again: the resumed run is bit-identical to the
//! uninterrupted one (checked at the end, the program fails otherwise).
//!
//! Run: `cargo run --release --example train`

use indicatif::{ProgressBar, ProgressStyle};
use kiln::checkpoint::{load_checkpoint, save_checkpoint, Checkpoint};
use kiln::nn::prelude::*;
use kiln::nn::CrossEntropyLoss;
use kiln::optim::{Adam, AdamOptions, Optimizer};
use kiln::{no_grad, DType, Error, Result, Tensor};
use std::sync::Arc;
use std::time::Instant;

const IN: usize = 8;
const HIDDEN: usize = 64;
const CLASSES: usize = 4;
const TRAIN: usize = 16384;
const TEST: usize = 1024;
const BATCH: usize = 128;
const EPOCHS: usize = 8;
const SAVE_AFTER: usize = 4;

/// A linear layer written the way a user writes a module: registered
/// parameters, forward through `kiln::ops::linalg::linear`.
struct MyLinear {
    core: ModuleCore,
    shape: (usize, usize),
}

impl MyLinear {
    /// PyTorch's default init range for Linear: U(-1/sqrt(in), 1/sqrt(in)).
    fn shared(i: usize, o: usize) -> Result<Arc<dyn Module>> {
        let core = ModuleCore::new("MyLinear");
        let b = 1.0 / (i as f64).sqrt();
        let u = |shape: &[usize]| -> Result<Tensor> {
            Tensor::rand(shape, DType::F32)
                .mul_scalar(2.0 * b)?
                .sub_scalar(b)
        };
        core.register_parameter("weight", Some(Parameter::new(u(&[o, i])?)?))?;
        core.register_parameter("bias", Some(Parameter::new(u(&[o])?)?))?;
        Ok(Arc::new(MyLinear {
            core,
            shape: (i, o),
        }))
    }
}

impl Module for MyLinear {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kiln::ops::linalg::linear(
            x,
            &self.core.param("weight")?,
            Some(&self.core.param("bias")?),
        )
    }
    fn extra_repr(&self) -> String {
        format!(
            "in_features={}, out_features={}",
            self.shape.0, self.shape.1
        )
    }
}

fn mlp(dropout: f64) -> Result<Sequential> {
    Ok(Sequential::new([
        MyLinear::shared(IN, HIDDEN)?,
        Arc::new(ReLU::new()) as Arc<dyn Module>,
        Arc::new(Dropout::new(dropout)?),
        MyLinear::shared(HIDDEN, HIDDEN)?,
        Arc::new(ReLU::new()),
        MyLinear::shared(HIDDEN, CLASSES)?,
    ]))
}

/// Points x ~ N(0, 1) labelled by argmax of a random teacher network.
fn dataset(teacher: &Sequential, n: usize) -> Result<(Tensor, Tensor)> {
    let x = Tensor::randn(&[n, IN], DType::F32);
    let y = no_grad(|| teacher.call(&x.mul_scalar(1.5)?))?.argmax(Some(1), false)?;
    Ok((x, y))
}

fn accuracy(model: &Sequential, x: &Tensor, y: &Tensor) -> Result<f64> {
    model.eval();
    let pred = no_grad(|| model.call(x))?.argmax(Some(1), false)?;
    model.train(true);
    let hits = pred.eq(y)?.to_vec::<i64>().iter().sum::<i64>();
    Ok(hits as f64 / y.numel() as f64)
}

/// One epoch of minibatch steps; batches are drawn from the global
/// generator (so the checkpoint's generator state matters). Returns the
/// mean training loss.
fn train_epoch(
    model: &Sequential,
    opt: &mut dyn Optimizer,
    data: &(Tensor, Tensor),
    pb: &ProgressBar,
) -> Result<f64> {
    let loss_fn = CrossEntropyLoss::new().with_label_smoothing(0.05);
    let steps = TRAIN / BATCH;
    let mut total = 0.0;
    for s in 0..steps {
        let idx: Vec<i64> = kiln::random::uniform_vec(BATCH, 0.0, TRAIN as f64)
            .into_iter()
            .map(|v| v as i64)
            .collect();
        let idx = Tensor::from_vec(idx, &[BATCH])?;
        let (xb, yb) = (data.0.index_select(0, &idx)?, data.1.index_select(0, &idx)?);
        let loss = loss_fn.forward(&model.call(&xb)?, &yb)?;
        opt.zero_grad(true)?;
        loss.backward()?;
        opt.step()?;
        let l = loss.item()?;
        total += l;
        pb.inc(1);
        pb.set_message(format!("loss {:.4}", total / (s + 1) as f64));
    }
    Ok(total / steps as f64)
}

fn bar(epochs: std::ops::RangeInclusive<usize>, label: &str) -> Result<ProgressBar> {
    let n = (epochs.end() + 1 - epochs.start()) * (TRAIN / BATCH);
    let pb = ProgressBar::new(n as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:32.cyan/blue}] {pos}/{len} steps {msg}")
            .map_err(|e| Error::Format(e.to_string()))?
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    Ok(pb)
}

/// Runs `epochs`, printing one line per epoch; `on_epoch` sees each finished
/// epoch number, its loss and the optimizer.
fn run(
    model: &Sequential,
    opt: &mut dyn Optimizer,
    train: &(Tensor, Tensor),
    test: &(Tensor, Tensor),
    epochs: std::ops::RangeInclusive<usize>,
    label: &str,
    mut on_epoch: impl FnMut(usize, f64, &dyn Optimizer) -> Result<()>,
) -> Result<Vec<f64>> {
    let pb = bar(epochs.clone(), label)?;
    let mut losses = Vec::new();
    for epoch in epochs {
        let loss = train_epoch(model, opt, train, &pb)?;
        let acc = accuracy(model, &test.0, &test.1)?;
        pb.suspend(|| {
            println!(
                "{label:>12} epoch {epoch}: train loss {loss:.5}  test accuracy {:.1}%",
                acc * 100.0
            )
        });
        losses.push(loss);
        on_epoch(epoch, loss, &*opt)?;
    }
    pb.finish_and_clear();
    Ok(losses)
}

fn main() -> Result<()> {
    let start = Instant::now();
    kiln::manual_seed(0);
    let teacher = mlp(0.0)?;
    teacher.eval();
    let train = dataset(&teacher, TRAIN)?;
    let test = dataset(&teacher, TEST)?;

    let model = mlp(0.1)?;
    model.train(true);
    println!("{}", model.to_repr());
    let mut opt = Adam::new(model.parameters(), AdamOptions::adam(3e-3))?;
    let path = std::env::temp_dir().join(format!(
        "kiln-train-{}.ckpt.safetensors",
        std::process::id()
    ));

    // the uninterrupted run, saving a checkpoint after epoch SAVE_AFTER
    let mut step = 0u64;
    let losses = run(
        &model,
        &mut opt,
        &train,
        &test,
        1..=EPOCHS,
        "training",
        |epoch, loss, opt| {
            step += (TRAIN / BATCH) as u64;
            if epoch == SAVE_AFTER {
                let ck = Checkpoint::capture(&model, Some(opt), epoch as u64, step, Some(loss))?
                    .with_metadata("task", "teacher classification")
                    .with_metadata("model", "MLP 8-64-64-4");
                save_checkpoint(&path, &ck)?;
                println!(
                    "{:>12} saved checkpoint after epoch {epoch} to {} ({} bytes)",
                    "",
                    path.display(),
                    std::fs::metadata(&path)?.len()
                );
            }
            Ok(())
        },
    )?;
    if losses.last() >= losses.first() {
        return Err(Error::Format(format!(
            "training loss did not fall: {losses:?}"
        )));
    }

    // a fresh model and optimizer (another init), resumed from the checkpoint
    kiln::manual_seed(999);
    let resumed = mlp(0.1)?;
    resumed.train(true);
    let mut opt2 = Adam::new(resumed.parameters(), AdamOptions::adam(3e-3))?;
    let ck = load_checkpoint(&path)?;
    ck.restore(&resumed, Some(&mut opt2))?;
    println!(
        "{:>12} restored epoch {} (step {}, loss {:.5}, task = {:?})",
        "",
        ck.epoch,
        ck.step,
        ck.loss.unwrap_or(f64::NAN),
        ck.metadata.get("task").map(String::as_str).unwrap_or("")
    );
    let losses2 = run(
        &resumed,
        &mut opt2,
        &train,
        &test,
        ck.epoch as usize + 1..=EPOCHS,
        "resumed",
        |_, _, _| Ok(()),
    )?;
    let _ = std::fs::remove_file(&path);

    let same_losses = losses2
        .iter()
        .zip(&losses[SAVE_AFTER..])
        .all(|(a, b)| a.to_bits() == b.to_bits());
    let bits = |m: &Sequential| -> Vec<(String, Vec<u32>)> {
        m.state_dict()
            .iter()
            .map(|(k, t)| {
                (
                    k.to_string(),
                    t.to_vec::<f32>().iter().map(|v| v.to_bits()).collect(),
                )
            })
            .collect()
    };
    let same_params = bits(&model) == bits(&resumed);
    println!(
        "resumed run bit-identical to the uninterrupted run: losses {}, parameters {}",
        if same_losses { "yes" } else { "NO" },
        if same_params { "yes" } else { "NO" }
    );
    println!("done in {:.1} s", start.elapsed().as_secs_f64());
    if !(same_losses && same_params) {
        return Err(Error::Format(
            "resumed training diverged from the uninterrupted run".into(),
        ));
    }
    Ok(())
}

//! The README's tour, compiled and run (keep the two in sync).

use kiln::nn::prelude::*;
use kiln::optim::Optimizer;
use kiln::{DType, Result, Tensor};
use std::sync::Arc;

struct MyLinear {
    core: ModuleCore,
}

impl MyLinear {
    fn new(inp: usize, out: usize) -> Arc<MyLinear> {
        let core = ModuleCore::new("MyLinear");
        let w = Tensor::randn(&[out, inp], DType::F32)
            .mul_scalar((inp as f64).powf(-0.5))
            .unwrap();
        core.register_parameter("w", Some(w.requires_grad_(true).unwrap()))
            .unwrap();
        core.register_parameter(
            "b",
            Some(
                Tensor::zeros(&[out], DType::F32)
                    .requires_grad_(true)
                    .unwrap(),
            ),
        )
        .unwrap();
        Arc::new(MyLinear { core })
    }
}

impl Module for MyLinear {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.core.param("w")?.t()?)?
            .add(&self.core.param("b")?)
    }
}

#[test]
fn readme_tour_runs() -> Result<()> {
    let layers: Vec<Arc<dyn Module>> = vec![
        MyLinear::new(20, 50),
        Arc::new(ReLU::new()),
        MyLinear::new(50, 4),
    ];
    let net = Sequential::new(layers);
    for (name, child) in net.named_children() {
        if child.is::<ReLU>() {
            net.set_submodule(&name, Arc::new(LeakyReLU::new(0.2)))?;
        }
    }
    let text = net.to_repr();
    assert!(
        text.contains("(1): LeakyReLU(negative_slope=0.2)"),
        "{text}"
    );

    let m = kiln::zoo::build("seed_cnn")?;
    m.load_safetensors(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/seed_cnn.safetensors"
        ),
        true,
    )?;
    let x = Tensor::randn(&[2, 1, 28, 28], DType::F32);
    let target = Tensor::randn(&[2, 128, 6, 6], DType::F32);
    let (epoch, step) = (1, 1);
    let mut opt = kiln::optim::Adam::new(m.parameters(), kiln::optim::AdamOptions::adam(1e-3))?;
    let loss = kiln::nn::functional::mse_loss(&m.call(&x)?, &target, kiln::nn::Reduction::Mean)?;
    opt.zero_grad(true)?;
    loss.backward()?;
    opt.step()?;
    let ckpt = kiln::Checkpoint::capture(&*m, Some(&opt), epoch, step, Some(loss.item()?))?;
    let path = std::env::temp_dir().join(format!("kiln-readme-{}.safetensors", std::process::id()));
    kiln::save_checkpoint(&path, &ckpt)?;
    std::fs::remove_file(&path).ok();

    let layer = m.get_submodule("net.0")?;
    let mut h = layer.register_forward_hook(|_m, _inp, out| Ok(Some(out.mul_scalar(2.0)?)));
    let mut b = layer.register_full_backward_hook(|_grad_in, _grad_out| None);
    let xg = x.clone().requires_grad_(true)?;
    xg.register_hook(|g| Some(g.mul_scalar(0.5).unwrap()))?;
    m.call(&xg)?.sum()?.backward()?;
    h.remove();
    b.remove();

    m.eval();
    let traced = kiln::jit::trace(&m, &[x.clone()])?;
    kiln::jit::check_trace(&traced, &[Tensor::randn(&[2, 1, 28, 28], DType::F32)], 1e-5)?;
    let file = std::env::temp_dir().join(format!("kiln-readme-{}.kiln", std::process::id()));
    traced.save(&file)?;
    let loaded = kiln::runtime::load(&file)?;
    assert_eq!(loaded.forward(&[x.clone()])?[0].shape(), vec![2, 128, 6, 6]);
    std::fs::remove_file(&file).ok();
    Ok(())
}

//! Bad inputs on zoo models: a wrong input shape or dtype, a state dict with
//! a missing, extra or wrong-shaped key, a truncated safetensors file, an
//! unknown submodule path. Each gives an error that says what is wrong (the
//! module scope and both shapes for forward errors, every offending key for
//! loads), and afterwards every tensor of the model (parameters, buffers,
//! gradients), its training flag and its registry are exactly as before.

use kiln::nn::prelude::*;
use kiln::{DType, Tensor};
use std::path::PathBuf;
use std::sync::Arc;

fn fixture(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(file)
}

fn loaded(name: &str) -> Arc<dyn Module> {
    let m = kiln::zoo::build(name).unwrap();
    m.load_safetensors(fixture(&format!("{name}.safetensors")), true)
        .unwrap();
    m
}

/// Everything observable about a model's state: per named parameter and
/// buffer its name, object id, dtype, shape, values, and its gradient's
/// values; the training flags of all modules; the repr.
/// (name, object id, dtype, shape, values, gradient values)
type TensorState = (String, u64, DType, Vec<usize>, Vec<f64>, Option<Vec<f64>>);

#[derive(Debug, PartialEq)]
struct Snapshot {
    tensors: Vec<TensorState>,
    training: Vec<bool>,
    repr: String,
}

fn snapshot(m: &dyn Module) -> Snapshot {
    let t = |(n, t): (String, Tensor)| {
        let g = t.grad().map(|g| g.to_vec_f64());
        (n, t.id(), t.dtype(), t.shape(), t.to_vec_f64(), g)
    };
    let mut tensors: Vec<_> = m.named_parameters().into_iter().map(t).collect();
    tensors.extend(m.named_buffers().into_iter().map(t));
    Snapshot {
        tensors,
        training: m.modules().iter().map(|s| s.is_training()).collect(),
        repr: m.to_repr(),
    }
}

fn input(name: &str) -> Tensor {
    let io = StateDict::load_safetensors(fixture(&format!("{name}.io.safetensors"))).unwrap();
    io.get("input").unwrap().clone()
}

/// Runs `f` (which must fail) on a model with gradients present and in
/// `training` mode; checks the state is unchanged and returns the message.
fn fails_cleanly(
    name: &str,
    training: bool,
    f: impl FnOnce(&dyn Module) -> kiln::Result<()>,
) -> String {
    let m = loaded(name);
    // give every parameter a gradient and move the buffers once, so that
    // the snapshot covers non-trivial state
    m.train(true);
    let y = m.call(&input(name)).unwrap();
    y.sum().unwrap().backward().unwrap();
    m.train(training);
    let before = snapshot(&*m);
    let e = f(&*m).expect_err("the operation should fail");
    assert_eq!(
        snapshot(&*m),
        before,
        "{name}: state changed by a failing call"
    );
    e.to_string()
}

fn has_all(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "`{p}` missing from error: {msg}");
    }
}

#[test]
fn wrong_input_shape_names_scope_and_shapes() {
    let e = fails_cleanly("simple_net", false, |m| {
        m.call(&Tensor::zeros(&[8, 100], DType::F32)).map(|_| ())
    });
    has_all(&e, &["layer1 (Linear)", "[8, 100]", "[256, 784]"]);

    let e = fails_cleanly("seed_cnn", true, |m| {
        m.call(&Tensor::zeros(&[8, 3, 28, 28], DType::F32))
            .map(|_| ())
    });
    has_all(&e, &["net.0 (Conv2d)", "[8, 3, 28, 28]", "[32, 1, 5, 5]"]);

    // TestNet: the conv and pool accept 20x20, the head does not (16*10*10 != 3136)
    let e = fails_cleanly("test_net", true, |m| {
        m.call(&Tensor::zeros(&[2, 1, 20, 20], DType::F32))
            .map(|_| ())
    });
    has_all(&e, &["net.3 (Linear)", "[2, 1600]", "[10, 3136]"]);

    let e = fails_cleanly("custom_stack", true, |m| {
        m.call(&Tensor::zeros(&[16, 21], DType::F32)).map(|_| ())
    });
    // PyTorch's wording: mat1 and mat2 shapes cannot be multiplied (16x21 and 20x50)
    has_all(&e, &["net.0 (MyLinear)", "16x21", "20x50"]);

    let e = fails_cleanly("transformer_block", false, |m| {
        m.call(&Tensor::zeros(&[2, 16, 128], DType::F32))
            .map(|_| ())
    });
    has_all(&e, &["ln1 (LayerNorm)", "[2, 16, 128]", "[256]"]);

    // ComplexNet's own view fails: the scope is the model itself
    let e = fails_cleanly("complex_net", false, |m| {
        m.call(&Tensor::zeros(&[2, 3, 11, 10], DType::F32))
            .map(|_| ())
    });
    has_all(&e, &["ComplexNet", "view", "1152"]);
}

#[test]
fn batch_norm_rejects_bad_batches_without_counting() {
    // one sample per channel in training: rejected before any buffer moves
    let e = fails_cleanly("net_with_dropout", true, |m| {
        m.call(&Tensor::zeros(&[1, 20], DType::F32)).map(|_| ())
    });
    has_all(
        &e,
        &[
            "bn1 (BatchNorm1d)",
            "more than 1 value per channel",
            "[1, 50]",
        ],
    );

    // a 4-d input to BatchNorm1d, called directly
    let e = fails_cleanly("net_with_dropout", true, |m| {
        m.get_submodule("bn1")?
            .call(&Tensor::zeros(&[2, 50, 1, 1], DType::F32))
            .map(|_| ())
    });
    has_all(
        &e,
        &[
            "BatchNorm1d",
            "expected 2D or 3D input (got 4D input)",
            "[2, 50, 1, 1]",
        ],
    );
}

#[test]
fn wrong_input_dtype() {
    let e = fails_cleanly("simple_net", false, |m| {
        m.call(&Tensor::zeros(&[4, 784], DType::F64)).map(|_| ())
    });
    has_all(&e, &["layer1 (Linear)", "float64", "float32", "[4, 784]"]);
    let e = fails_cleanly("seed_cnn", false, |m| {
        m.call(&Tensor::zeros(&[2, 1, 28, 28], DType::I64))
            .map(|_| ())
    });
    has_all(&e, &["net.0 (Conv2d)", "int64", "float32"]);
    let e = fails_cleanly("net_with_dropout", true, |m| {
        m.call(&Tensor::zeros(&[4, 20], DType::Bool)).map(|_| ())
    });
    has_all(&e, &["fc1 (Linear)", "bool"]);
}

fn state(name: &str) -> StateDict {
    StateDict::load_safetensors(fixture(&format!("{name}.safetensors"))).unwrap()
}

#[test]
fn missing_extra_and_wrong_shaped_keys() {
    let mut sd = state("simple_net");
    sd.remove("layer1.bias").unwrap();
    let e = fails_cleanly("simple_net", false, |m| {
        m.load_state_dict(&sd, true).map(|_| ())
    });
    has_all(
        &e,
        &["SimpleNet", "Missing key(s) in state_dict: \"layer1.bias\""],
    );

    let mut sd = state("seed_cnn");
    sd.insert("net.14.weight", Tensor::zeros(&[3], DType::F32));
    sd.insert("head", Tensor::zeros(&[3], DType::F32));
    let e = fails_cleanly("seed_cnn", true, |m| {
        m.load_state_dict(&sd, true).map(|_| ())
    });
    has_all(
        &e,
        &[
            "Unexpected key(s) in state_dict:",
            "\"net.14.weight\"",
            "\"head\"",
        ],
    );

    // every offending key is listed: two shapes and one dtype
    let mut sd = state("transformer_block");
    sd.insert("ln1.weight", Tensor::zeros(&[255], DType::F32));
    sd.insert("mlp.0.weight", Tensor::zeros(&[1024, 255], DType::F32));
    sd.insert("attn.proj.bias", Tensor::zeros(&[256], DType::F64));
    let e = fails_cleanly("transformer_block", false, |m| {
        m.load_state_dict(&sd, true).map(|_| ())
    });
    has_all(
        &e,
        &[
            "size mismatch for ln1.weight: copying a param with shape [255]",
            "the shape in current model is [256]",
            "size mismatch for mlp.0.weight",
            "[1024, 255]",
            "dtype mismatch for attn.proj.bias",
        ],
    );

    // a wrong-shaped buffer, with the other entries all valid
    let mut sd = state("net_with_dropout");
    sd.insert("bn1.running_var", Tensor::ones(&[49], DType::F32));
    let e = fails_cleanly("net_with_dropout", true, |m| {
        m.load_state_dict(&sd, false).map(|_| ())
    });
    has_all(&e, &["size mismatch for bn1.running_var", "[49]", "[50]"]);
}

#[test]
fn truncated_safetensors_file() {
    let bytes = std::fs::read(fixture("custom_stack.safetensors")).unwrap();
    let dir = std::env::temp_dir().join(format!("kiln-zoo-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, cut) in [bytes.len() - 1, bytes.len() / 2, 20, 4]
        .into_iter()
        .enumerate()
    {
        let p = dir.join(format!("truncated{i}.safetensors"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = fails_cleanly("custom_stack", true, |m| {
            m.load_safetensors(&p, true).map(|_| ())
        });
        has_all(&e, &[&format!("truncated{i}.safetensors")]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_submodule_paths() {
    let e = fails_cleanly("simple_net", false, |m| {
        m.get_submodule("layer3").map(|_| ())
    });
    has_all(&e, &["SimpleNet has no attribute `layer3`"]);
    let e = fails_cleanly("seed_cnn", true, |m| m.get_submodule("net.99").map(|_| ()));
    has_all(&e, &["Sequential has no attribute `99`"]);
    let e = fails_cleanly("transformer_block", false, |m| {
        m.get_submodule("attn.qkv.weight").map(|_| ())
    });
    has_all(&e, &["`weight` is not an nn.Module"]);
    let e = fails_cleanly("transformer_block", false, |m| {
        m.get_parameter("attn.qkv.scale").map(|_| ())
    });
    has_all(&e, &["Linear has no attribute `scale`"]);
    let e = fails_cleanly("custom_stack", true, |m| {
        m.get_buffer("net.1.running_std").map(|_| ())
    });
    has_all(&e, &["MyBatchNorm1d has no attribute `running_std`"]);
    let e = fails_cleanly("complex_net", false, |m| {
        m.set_submodule("layer9.0", Arc::new(ReLU::new()))
    });
    has_all(&e, &["ComplexNet has no attribute `layer9`"]);
}

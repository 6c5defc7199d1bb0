//! Every zoo model against PyTorch's fixtures in tests/fixtures (made by
//! python/make_fixtures.py): strict load, eval output, gradients, one
//! training forward and its buffers, three SGD and three Adam steps,
//! registry names and order, repr. The checks live in `kiln::verify`
//! (shared with `kiln verify`); each test fails with the full list of
//! mismatches.

use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn verify(name: &str) {
    // Eager checks, and every forward check again through `jit::compile`.
    let r = kiln::verify::verify_model_with(&fixtures(), name, true)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    println!("{r}");
    for (what, e, tol) in &r.details {
        println!("  {what}: {e:.2e} (tolerance {tol:.0e})");
    }
    for n in &r.notes {
        println!("  note: {n}");
    }
    assert!(r.passed(), "{name}:\n  {}", r.failures.join("\n  "));
    assert!(r.load_ok && r.names_ok && r.repr_ok);
    assert!(
        r.compiled.is_some(),
        "{name}: the compiled path was not checked"
    );
}

#[test]
fn simple_net() {
    verify("simple_net");
}

#[test]
fn net_with_dropout() {
    verify("net_with_dropout");
}

#[test]
fn seed_cnn() {
    verify("seed_cnn");
}

#[test]
fn test_net() {
    verify("test_net");
}

#[test]
fn custom_stack() {
    verify("custom_stack");
}

#[test]
fn complex_net() {
    verify("complex_net");
}

#[test]
fn transformer_block() {
    verify("transformer_block");
}

#[test]
fn pointwise_chain() {
    verify("pointwise_chain");
}

#[test]
fn every_zoo_model_has_fixtures() {
    assert_eq!(
        kiln::verify::available(&fixtures()),
        kiln::zoo::names().to_vec()
    );
}

/// The same models converted with `double()` reproduce PyTorch's f32 eval
/// output from the f64 input (num_batches_tracked stays I64).
#[test]
fn every_model_in_f64_matches_the_f32_reference() {
    use kiln::nn::prelude::*;
    use kiln::DType;
    for name in kiln::zoo::names() {
        let m = kiln::zoo::build(name).unwrap();
        m.load_safetensors(fixtures().join(format!("{name}.safetensors")), true)
            .unwrap();
        m.double().unwrap();
        for (n, b) in m.named_buffers() {
            let want = if n.ends_with("num_batches_tracked") {
                DType::I64
            } else {
                DType::F64
            };
            assert_eq!(b.dtype(), want, "{name}.{n}");
        }
        m.eval();
        let io =
            StateDict::load_safetensors(fixtures().join(format!("{name}.io.safetensors"))).unwrap();
        let x = io.get("input").unwrap().to_dtype(DType::F64).unwrap();
        let y = m.call(&x).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        let e = kiln::verify::rel_err(&y, io.get("eval_output").unwrap());
        assert!(e <= kiln::verify::FORWARD_TOL, "{name}: {e}");
    }
}

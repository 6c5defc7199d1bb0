//! `kiln graph` and `kiln run` on hand-built graphs saved with
//! `TracedModule::save`, run through the real binary.

use kiln::ir::{BinaryOp, Graph, InputKind, Op, OutputKind, TensorType, UnaryOp};
use kiln::nn::StateDict;
use kiln::runtime::TracedModule;
use kiln::{DType, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-cli-tests-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .unwrap()
}

fn ramp(shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) * scale)
        .collect();
    Tensor::from_vec(v, shape).unwrap()
}

/// x [4, 6] -> Linear(6 -> 3) -> relu: one input, one output.
fn linear_relu() -> TracedModule {
    let f = |s: &[usize]| TensorType::new(s, DType::F32);
    let mut g = Graph::new();
    let x = g.add_input(InputKind::User(0), f(&[4, 6]), "").unwrap();
    let w = g
        .add_input(InputKind::Param("fc.weight".into()), f(&[3, 6]), "")
        .unwrap();
    let b = g
        .add_input(InputKind::Param("fc.bias".into()), f(&[3]), "")
        .unwrap();
    let wt = g
        .add1(Op::Permute { dims: vec![1, 0] }, &[w], "Net/Linear[fc]")
        .unwrap();
    let y = g.add1(Op::Addmm, &[b, x, wt], "Net/Linear[fc]").unwrap();
    let y = g
        .add1(Op::Unary(UnaryOp::Relu), &[y], "Net/ReLU[act]")
        .unwrap();
    g.add_output(y, OutputKind::User).unwrap();
    let mut w = HashMap::new();
    w.insert("fc.weight".to_string(), ramp(&[3, 6], 0.1));
    w.insert("fc.bias".to_string(), ramp(&[3], 0.05));
    TracedModule::from_weights(g, w).unwrap()
}

/// (a [2, 3], b [3]) -> (a * b, sum(a + b, dim 1)): two inputs, two outputs.
fn two_in_two_out() -> TracedModule {
    let f = |s: &[usize]| TensorType::new(s, DType::F32);
    let mut g = Graph::new();
    let a = g.add_input(InputKind::User(0), f(&[2, 3]), "").unwrap();
    let b = g.add_input(InputKind::User(1), f(&[3]), "").unwrap();
    let m = g.add1(Op::Binary(BinaryOp::Mul), &[a, b], "M").unwrap();
    let s = g.add1(Op::Binary(BinaryOp::Add), &[a, b], "M").unwrap();
    let s = g
        .add1(
            Op::Reduce {
                op: kiln::ir::ReduceOp::Sum,
                dims: vec![1],
                keepdim: false,
            },
            &[s],
            "M",
        )
        .unwrap();
    g.add_output(m, OutputKind::User).unwrap();
    g.add_output(s, OutputKind::User).unwrap();
    TracedModule::from_weights(g, HashMap::new()).unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn graph_prints_the_listing_and_summary() {
    let tm = linear_relu();
    let file = tmp("linear_relu.kiln");
    tm.save(&file).unwrap();
    let out = stdout(&kiln(&["graph", file.to_str().unwrap()]));
    assert!(out.starts_with(&tm.listing()), "{out}");
    assert!(
        out.contains("= addmm(%2, %0, %3) : f32[4,3]  # Net/Linear[fc]"),
        "{out}"
    );
    assert!(out.contains("ops: addmm 1, permute 1, relu 1"), "{out}");
    assert!(
        out.contains("inputs: 1 user, 2 parameters (21 elements), 0 buffers"),
        "{out}"
    );
    assert!(out.contains("kernels: "), "{out}");
    assert!(out.ends_with(&tm.summary().unwrap()), "{out}");
    let dot = stdout(&kiln(&["graph", file.to_str().unwrap(), "--dot"]));
    assert_eq!(dot, tm.to_dot().unwrap());
    assert!(dot.starts_with("digraph kiln {"), "{dot}");
    assert!(dot.contains("cluster"), "{dot}");
}

#[test]
fn run_one_input_one_output() {
    let tm = linear_relu();
    let file = tmp("linear_relu_run.kiln");
    tm.save(&file).unwrap();
    let x = ramp(&[4, 6], 0.3);
    let mut sd = StateDict::new();
    sd.insert("input", x.clone());
    let inp = tmp("in1.safetensors");
    let outp = tmp("out1.safetensors");
    sd.save_safetensors(&inp, None).unwrap();
    stdout(&kiln(&[
        "run",
        file.to_str().unwrap(),
        "--input",
        inp.to_str().unwrap(),
        "--output",
        outp.to_str().unwrap(),
    ]));
    let got = StateDict::load_safetensors(&outp).unwrap();
    assert_eq!(got.keys(), vec!["output"]);
    let want = tm.call(&x).unwrap();
    let y = got.get("output").unwrap();
    assert_eq!(y.shape(), vec![4, 3]);
    assert_eq!(y.to_vec_f32(), want.to_vec_f32());
    assert!(y.to_vec_f32().iter().any(|&v| v > 0.0));
}

#[test]
fn run_several_inputs_and_outputs() {
    let tm = two_in_two_out();
    let file = tmp("two.kiln");
    tm.save(&file).unwrap();
    let a = ramp(&[2, 3], 1.0);
    let b = Tensor::from_vec(vec![1.0f32, -2.0, 0.5], &[3]).unwrap();
    let mut sd = StateDict::new();
    sd.insert("input.0", a.clone());
    sd.insert("input.1", b.clone());
    let inp = tmp("in2.safetensors");
    let outp = tmp("out2.safetensors");
    sd.save_safetensors(&inp, None).unwrap();
    let args = [
        "run",
        file.to_str().unwrap(),
        "--input",
        inp.to_str().unwrap(),
        "--output",
        outp.to_str().unwrap(),
    ];
    stdout(&kiln(&args));
    let got = StateDict::load_safetensors(&outp).unwrap();
    let mut keys = got.keys();
    keys.sort();
    assert_eq!(keys, vec!["output.0", "output.1"]);
    // a = [[-5, 2, -2], [5, 1, -3]] (ramp), b = [1, -2, 0.5]
    assert_eq!(a.to_vec_f32(), vec![-5.0, 2.0, -2.0, 5.0, 1.0, -3.0]);
    assert_eq!(
        got.get("output.0").unwrap().to_vec_f32(),
        vec![-5.0, -4.0, -1.0, 5.0, -2.0, -1.5]
    );
    // sum(a + b, 1) = [-4 + 0 - 1.5, 6 - 1 - 2.5] = [-5.5, 2.5]
    assert_eq!(got.get("output.1").unwrap().to_vec_f32(), vec![-5.5, 2.5]);

    // A missing input is a clear error and a failing exit status.
    let mut sd = StateDict::new();
    sd.insert("input.0", a);
    sd.save_safetensors(&inp, None).unwrap();
    let o = kiln(&args);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "the graph takes 2 input(s), named `input.0` .. `input.1`; `input.1` is missing"
        ),
        "{err}"
    );
    // A wrong shape names expected and got.
    let mut sd = StateDict::new();
    sd.insert("input.0", ramp(&[2, 4], 1.0));
    sd.insert("input.1", b);
    sd.save_safetensors(&inp, None).unwrap();
    let o = kiln(&args);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("input 0 is f32[2,4], the graph was traced for f32[2,3]"),
        "{err}"
    );
}

#[test]
fn a_corrupt_file_is_a_clear_error() {
    let file = tmp("corrupt.kiln");
    std::fs::write(&file, b"not a kiln file at all").unwrap();
    let o = kiln(&["graph", file.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with(&format!(
            "kiln: error: {}: not a valid safetensors file",
            file.display()
        )),
        "{err}"
    );
}

/// `kiln export --zoo` traces a zoo model with given weights; `kiln run`
/// runs the file and reproduces the fixture's eval output.
#[test]
fn export_zoo_model_then_run_it() {
    let dir = std::env::temp_dir().join(format!("kiln-export-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let file = dir.join("simple_net.kiln");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["export", "--zoo", "simple_net", "--weights"])
        .arg(fx.join("simple_net.safetensors"))
        .arg("-o")
        .arg(&file)
        .arg("--optimize")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The fixture's io file holds `input` (and more): write just the input.
    let io = kiln::nn::StateDict::load_safetensors(fx.join("simple_net.io.safetensors")).unwrap();
    let mut inp = kiln::nn::StateDict::new();
    inp.insert("input", io.get("input").unwrap().clone());
    let in_path = dir.join("in.safetensors");
    inp.save_safetensors(&in_path, None).unwrap();
    let out_path = dir.join("out.safetensors");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("run")
        .arg(&file)
        .arg("--input")
        .arg(&in_path)
        .arg("--output")
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = kiln::nn::StateDict::load_safetensors(&out_path).unwrap();
    let y = got.get("output").unwrap().to_vec::<f64>();
    let want = io.get("eval_output").unwrap().to_vec::<f64>();
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = y
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
        / scale;
    assert!(err <= 1e-4, "relative error {err:.2e}");
    std::fs::remove_dir_all(&dir).ok();
}

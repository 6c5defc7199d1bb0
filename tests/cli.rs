//! `kiln verify` end to end: the built binary on the project's fixtures
//! (exit 0, one PASS line per zoo model) and on temporary copies with one
//! corrupted fixture (a perturbed output, a truncated file, an edited repr):
//! exit 1 and the corrupted model's line says FAIL/ERROR while the others
//! pass; `--models` restricts the run; usage errors exit 2.

use kiln::nn::StateDict;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn kiln(args: &[&str]) -> (i32, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (status.code().expect("exit code"), text)
}

fn line<'a>(out: &'a str, model: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(model))
        .unwrap_or_else(|| panic!("no line for {model} in:\n{out}"))
}

/// A fresh temp dir holding copies of the fixtures of `models`.
fn copy_of(tag: &str, models: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for m in models {
        for suffix in [
            ".safetensors",
            ".io.safetensors",
            ".train.safetensors",
            ".json",
        ] {
            let f = format!("{m}{suffix}");
            std::fs::copy(fixtures().join(&f), dir.join(&f)).unwrap();
        }
    }
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn verify_passes_on_the_project_fixtures() {
    let (code, out) = kiln(&["verify", "--fixtures", s(&fixtures())]);
    assert_eq!(code, 0, "{out}");
    for m in kiln::zoo::names() {
        let l = line(&out, m);
        assert!(l.ends_with("PASS"), "{l}");
        assert!(l.contains("names OK") && l.contains("repr OK"), "{l}");
    }
    assert!(out.contains("8 of 8 models match PyTorch"), "{out}");
}

#[test]
fn verify_backend_cpu_checks_the_compiled_path() {
    let (code, out) = kiln(&[
        "verify",
        "--fixtures",
        s(&fixtures()),
        "--backend",
        "cpu",
        "--models",
        "custom_stack,seed_cnn",
    ]);
    assert_eq!(code, 0, "{out}");
    for m in ["custom_stack", "seed_cnn"] {
        let l = line(&out, m);
        assert!(l.contains("PASS") && l.contains("compiled(cpu)"), "{l}");
    }
}

#[test]
fn a_perturbed_output_fails_only_its_model() {
    let dir = copy_of("perturbed", &["simple_net", "complex_net"]);
    let io_path = dir.join("simple_net.io.safetensors");
    let mut io = StateDict::load_safetensors(&io_path).unwrap();
    let y = io.get("eval_output").unwrap().mul_scalar(1.01).unwrap();
    io.insert("eval_output", y);
    io.save_safetensors(&io_path, None).unwrap();

    let (code, out) = kiln(&["verify", "--fixtures", s(&dir)]);
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "simple_net");
    assert!(l.ends_with("FAIL"), "{l}");
    assert!(out.contains("FAIL eval_output: relative error"), "{out}");
    assert!(line(&out, "complex_net").ends_with("PASS"), "{out}");
    assert!(out.contains("1 of 2 models match PyTorch"), "{out}");
    // only the healthy model: success
    let (code, out) = kiln(&["verify", "--fixtures", s(&dir), "--models", "complex_net"]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("simple_net"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_truncated_file_is_an_error_line() {
    let dir = copy_of("truncated", &["pointwise_chain", "custom_stack"]);
    let p = dir.join("custom_stack.train.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let (code, out) = kiln(&["verify", "--fixtures", s(&dir)]);
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "custom_stack");
    assert!(
        l.contains("ERROR") && l.contains("custom_stack.train.safetensors"),
        "{l}"
    );
    assert!(line(&out, "pointwise_chain").ends_with("PASS"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_edited_repr_is_a_mismatch() {
    let dir = copy_of("repr", &["test_net"]);
    let p = dir.join("test_net.json");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replace("ceil_mode=False", "ceil_mode=True")).unwrap();
    let (code, out) = kiln(&["verify", "--fixtures", s(&dir), "--models", "test_net"]);
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "test_net");
    assert!(l.contains("repr MISMATCH") && l.contains("names OK"), "{l}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn usage_errors_exit_2() {
    let (code, out) = kiln(&["verify", "--fixtures", s(&fixtures()), "--models", "nope"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("unknown model"), "{out}");
    let empty = std::env::temp_dir().join(format!("kiln-cli-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let (code, out) = kiln(&["verify", "--fixtures", s(&empty)]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no zoo fixtures"), "{out}");
    std::fs::remove_dir_all(&empty).unwrap();
    let (code, _) = kiln(&["info"]);
    assert_eq!(code, 0);
}

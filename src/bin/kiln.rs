//! The `kiln` command line: `info` (this machine and build) and `verify`
//! (the zoo models against PyTorch's fixtures); `bench`, `run` and
//! `devices` join as their issues land.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "kiln: PyTorch-like modules, traced and compiled"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CPU features kiln's kernels can use on this machine.
    Info,
    /// Check the zoo models against PyTorch's fixtures (made by
    /// python/make_fixtures.py): strict load, eval output, gradients, a
    /// training forward, 3 SGD and 3 Adam steps, names and repr. Prints one
    /// line per model with the max relative errors; exits 1 on any mismatch.
    Verify {
        /// Directory holding NAME.safetensors, NAME.io.safetensors,
        /// NAME.train.safetensors and NAME.json.
        #[arg(long)]
        fixtures: PathBuf,
        /// Comma-separated zoo model names (default: every zoo model whose
        /// fixtures are in the directory).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// Also print every compared tensor and its error.
        #[arg(long, short)]
        verbose: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Info => {
            info();
            ExitCode::SUCCESS
        }
        Command::Verify {
            fixtures,
            models,
            verbose,
        } => verify(&fixtures, models, verbose),
    }
}

fn verify(dir: &std::path::Path, models: Option<Vec<String>>, verbose: bool) -> ExitCode {
    if !dir.is_dir() {
        eprintln!("kiln verify: {} is not a directory", dir.display());
        return ExitCode::from(2);
    }
    let names: Vec<String> = match models {
        Some(m) => {
            let unknown: Vec<&String> = m
                .iter()
                .filter(|n| !kiln::zoo::names().contains(&n.as_str()))
                .collect();
            if !unknown.is_empty() {
                eprintln!(
                    "kiln verify: unknown model(s) {unknown:?}; the zoo has {}",
                    kiln::zoo::names().join(", ")
                );
                return ExitCode::from(2);
            }
            m
        }
        None => kiln::verify::available(dir)
            .into_iter()
            .map(String::from)
            .collect(),
    };
    if names.is_empty() {
        eprintln!(
            "kiln verify: no zoo fixtures (NAME.json) in {}",
            dir.display()
        );
        return ExitCode::from(2);
    }
    let mut failed = 0;
    for name in &names {
        match kiln::verify::verify_model(dir, name) {
            Ok(r) => {
                println!("{r}");
                if verbose {
                    for (what, e, tol) in &r.details {
                        println!("    {what}: {e:.2e} (tolerance {tol:.0e})");
                    }
                }
                for n in &r.notes {
                    println!("    note: {n}");
                }
                if !r.passed() {
                    failed += 1;
                    for f in &r.failures {
                        println!("    FAIL {f}");
                    }
                }
            }
            Err(e) => {
                failed += 1;
                println!("{name:<18} ERROR {e}");
            }
        }
    }
    println!(
        "{} of {} models match PyTorch",
        names.len() - failed,
        names.len()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn info() {
    println!("kiln {}", env!("CARGO_PKG_VERSION"));
    println!("threads: {}", rayon_threads());
    #[cfg(target_arch = "x86_64")]
    {
        let feats = [
            ("sse4.2", std::arch::is_x86_feature_detected!("sse4.2")),
            ("avx", std::arch::is_x86_feature_detected!("avx")),
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
        ];
        let on: Vec<&str> = feats.iter().filter(|f| f.1).map(|f| f.0).collect();
        println!("cpu features: {}", on.join(" "));
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

//! The `kiln` command line: `info` (this machine and build), `verify` (the
//! zoo models against PyTorch's fixtures), `bench` (eager timings of the zoo
//! models), `graph` (listing, summary or DOT of a saved graph) and `run` (a
//! saved graph on safetensors inputs, with no model code).

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
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
    /// Print a saved graph: one line per node, then a summary (op counts,
    /// parameters, kernels after fusion); or Graphviz DOT with --dot.
    Graph {
        /// A file written by `TracedModule::save` (`.kiln`).
        file: PathBuf,
        /// Write Graphviz DOT (module scopes as clusters, fused kernels
        /// colored) instead of the listing.
        #[arg(long)]
        dot: bool,
    },
    /// Run a saved graph with no model code. Inputs are the tensors named
    /// `input` (one input) or `input.0`, `input.1`, ...; outputs are written
    /// as `output` (one output) or `output.0`, `output.1`, ...
    Run {
        /// A file written by `TracedModule::save` (`.kiln`).
        file: PathBuf,
        /// safetensors file with the inputs.
        #[arg(long)]
        input: PathBuf,
        /// safetensors file to write the outputs to.
        #[arg(long)]
        output: PathBuf,
    },
    /// Trace a zoo model (with weights from a safetensors state_dict) and
    /// write it as one file that `kiln run` / `runtime::load` run with no
    /// model code.
    Export {
        /// Zoo model name.
        #[arg(long)]
        zoo: String,
        /// safetensors state_dict with PyTorch's key names.
        #[arg(long)]
        weights: PathBuf,
        /// Output file (`NAME.kiln`).
        #[arg(short, long)]
        output: PathBuf,
        /// Input shape to trace with, comma-separated (default: the zoo's
        /// fixture shape).
        #[arg(long, value_delimiter = ',')]
        shape: Option<Vec<usize>>,
        /// Trace in training mode (buffer updates become graph outputs).
        #[arg(long)]
        train: bool,
        /// Run the standard pass pipeline before saving.
        #[arg(long)]
        optimize: bool,
    },
    /// Time each zoo model's eager forward (median ms, as
    /// python/bench_peers.py times PyTorch) at the fixture shapes, or the
    /// throughput shapes with --large.
    Bench {
        /// Throughput shapes instead of the fixture (latency) shapes.
        #[arg(long)]
        large: bool,
        /// Comma-separated zoo model names (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// Minimum seconds of timed calls per model.
        #[arg(long, default_value_t = 1.0)]
        min_time: f64,
        /// Time training steps (forward, loss, backward, SGD step), eager
        /// against compiled training, instead of forwards.
        #[arg(long)]
        train: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Info => {
            info();
            Ok(())
        }
        Command::Verify {
            fixtures,
            models,
            verbose,
        } => return verify(&fixtures, models, verbose),
        Command::Graph { file, dot } => graph(&file, dot),
        Command::Run {
            file,
            input,
            output,
        } => run(&file, &input, &output),
        Command::Bench {
            large,
            models,
            min_time,
            train,
        } => {
            if train {
                bench_train(large, models.unwrap_or_default(), min_time)
            } else {
                bench(large, models.unwrap_or_default(), min_time)
            }
        }
        Command::Export {
            zoo,
            weights,
            output,
            shape,
            train,
            optimize,
        } => export(&zoo, &weights, &output, shape, train, optimize),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn export(
    name: &str,
    weights: &Path,
    output: &Path,
    shape: Option<Vec<usize>>,
    train: bool,
    optimize: bool,
) -> Result<(), String> {
    use kiln::nn::ModuleExt;
    let err = |e: kiln::Error| e.to_string();
    let model = kiln::zoo::build(name).map_err(err)?;
    model.load_safetensors(weights, true).map_err(err)?;
    model.train(train);
    let shape = match shape {
        Some(s) => s,
        None => kiln::zoo::shapes(name).map_err(err)?.0,
    };
    let x = kiln::Tensor::randn(&shape, kiln::DType::F32);
    let mut traced = kiln::jit::trace(&model, &[x]).map_err(|e| e.to_string())?;
    if optimize {
        traced.run_passes().map_err(|e| e.to_string())?;
    }
    traced.save(output).map_err(|e| e.to_string())?;
    println!(
        "{name}: traced {} nodes ({} mode, input {shape:?}) -> {}",
        traced.graph().node_count(),
        if train { "training" } else { "eval" },
        output.display()
    );
    Ok(())
}

fn bench(large: bool, models: Vec<String>, min_time: f64) -> Result<(), String> {
    let rows = kiln::bench::bench_eager(&models, large, min_time).map_err(|e| e.to_string())?;
    print!("{}", kiln::bench::format_table(&rows));
    Ok(())
}

fn bench_train(large: bool, models: Vec<String>, min_time: f64) -> Result<(), String> {
    let rows =
        kiln::bench_train::bench_train(&models, large, min_time).map_err(|e| e.to_string())?;
    print!("{}", kiln::bench_train::format_train_table(&rows));
    Ok(())
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

fn graph(file: &Path, dot: bool) -> Result<(), String> {
    let tm = kiln::runtime::load(file).map_err(|e| e.to_string())?;
    if dot {
        print!("{}", tm.to_dot().map_err(|e| e.to_string())?);
    } else {
        print!("{}", tm.listing());
        println!();
        print!("{}", tm.summary().map_err(|e| e.to_string())?);
    }
    Ok(())
}

fn run(file: &Path, input: &Path, output: &Path) -> Result<(), String> {
    use kiln::nn::StateDict;
    let tm = kiln::runtime::load(file).map_err(|e| e.to_string())?;
    let sd = StateDict::load_safetensors(input).map_err(|e| e.to_string())?;
    let n = tm.input_types().len();
    let inputs = if n == 1 && sd.contains_key("input") {
        vec![sd.get("input").expect("checked").clone()]
    } else {
        (0..n)
            .map(|i| {
                sd.get(&format!("input.{i}")).cloned().ok_or_else(|| {
                    let want = if n == 1 {
                        "`input`".to_string()
                    } else {
                        format!("`input.0` .. `input.{}`", n - 1)
                    };
                    format!(
                        "{}: the graph takes {n} input(s), named {want}; `input.{i}` is missing (found {:?})",
                        input.display(),
                        sd.keys()
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    let expected: Vec<String> = if n == 1 {
        vec!["input".into(), "input.0".into()]
    } else {
        (0..n).map(|i| format!("input.{i}")).collect()
    };
    if let Some(extra) = sd.keys().into_iter().find(|k| !expected.contains(k)) {
        return Err(format!(
            "{}: unexpected tensor `{extra}` (the graph takes {n} input(s))",
            input.display()
        ));
    }
    let outs = tm.forward(&inputs).map_err(|e| e.to_string())?;
    let mut out = StateDict::new();
    if outs.len() == 1 {
        out.insert("output", outs[0].clone());
    } else {
        for (i, t) in outs.iter().enumerate() {
            out.insert(format!("output.{i}"), t.clone());
        }
    }
    out.save_safetensors(output, None)
        .map_err(|e| format!("{}: {e}", output.display()))
}

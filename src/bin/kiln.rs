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
        /// `eager` (every check, the default), `cpu` (also every forward
        /// check through `jit::compile`) or `opencl` (the models compiled
        /// for an OpenCL device: eval output, a training forward and its
        /// buffer updates; needs the `opencl` feature).
        #[arg(long, value_enum, default_value_t = Backend::Eager)]
        backend: Backend,
        /// OpenCL device index (`kiln devices`; default KILN_OPENCL_DEVICE or 0).
        #[arg(long)]
        device: Option<usize>,
    },
    /// List the OpenCL platforms and devices (needs the `opencl` feature).
    Devices,
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
        /// latency (the fixture shapes) or throughput (zoo.py's large shapes).
        #[arg(long, default_value = "latency", value_parser = ["latency", "throughput"])]
        shape: String,
        /// Same as `--shape throughput`.
        #[arg(long)]
        large: bool,
        /// Worker threads for kiln's kernels (rayon pool; default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Also write `{"MODEL": {"eager_ms", "compiled_ms", "compile_ms"}}` here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Comma-separated zoo model names (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// Minimum seconds of timed calls per model.
        #[arg(long, default_value_t = 1.0)]
        min_time: f64,
        /// What the compiled column runs: eager (no compiled column),
        /// interp (the traced graph on the reference interpreter), cpu
        /// (`jit::compile`, the default) or opencl (needs the `opencl`
        /// feature).
        #[arg(long, value_enum, default_value_t = Backend::Cpu)]
        backend: Backend,
        /// OpenCL device index (`kiln devices`; default KILN_OPENCL_DEVICE or 0).
        #[arg(long)]
        device: Option<usize>,
        /// Time training steps (forward, loss, backward, SGD step), eager
        /// against compiled training, instead of forwards.
        #[arg(long)]
        train: bool,
    },
}

/// Which backend `verify` and `bench` run.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    Eager,
    Interp,
    Cpu,
    Opencl,
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
            backend,
            device,
        } => match backend {
            Backend::Opencl => return opencl::verify(&fixtures, models, verbose, device),
            Backend::Interp => {
                eprintln!("kiln verify: --backend is eager, cpu or opencl");
                return ExitCode::from(2);
            }
            b => return verify(&fixtures, models, verbose, b == Backend::Cpu),
        },
        Command::Devices => opencl::devices(),
        Command::Graph { file, dot } => graph(&file, dot),
        Command::Run {
            file,
            input,
            output,
        } => run(&file, &input, &output),
        Command::Bench {
            backend,
            shape,
            large,
            threads,
            json,
            models,
            min_time,
            device,
            train,
        } => {
            let large = large || shape == "throughput";
            let b = match backend {
                Backend::Eager => kiln::bench::Backend::Eager,
                Backend::Interp => kiln::bench::Backend::Interp,
                Backend::Cpu => kiln::bench::Backend::Cpu,
                Backend::Opencl => kiln::bench::Backend::Eager,
            };
            // Like torch.set_num_threads: this thread and n - 1 workers.
            if let Some(n) = threads {
                if let Err(e) = kiln::set_num_threads(n) {
                    eprintln!("kiln bench: --threads {n}: {e}");
                    return ExitCode::from(2);
                }
            }
            if train {
                bench_train(large, models.unwrap_or_default(), min_time)
            } else if backend == Backend::Opencl {
                opencl::bench(large, models.unwrap_or_default(), min_time, device)
            } else {
                bench(b, large, json, models.unwrap_or_default(), min_time)
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

fn bench(
    backend: kiln::bench::Backend,
    large: bool,
    json: Option<PathBuf>,
    models: Vec<String>,
    min_time: f64,
) -> Result<(), String> {
    let rows = kiln::bench::bench(&models, large, backend, min_time).map_err(|e| e.to_string())?;
    print!("{}", kiln::bench::format_table(&rows));
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&kiln::bench::to_json(&rows)).expect("json");
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn bench_train(large: bool, models: Vec<String>, min_time: f64) -> Result<(), String> {
    let rows =
        kiln::bench_train::bench_train(&models, large, min_time).map_err(|e| e.to_string())?;
    print!("{}", kiln::bench_train::format_train_table(&rows));
    Ok(())
}

/// The zoo models `kiln verify` checks: `--models` (every name must be a
/// zoo model) or every model whose fixtures are in `dir`; a usage error
/// (exit 2) when the directory is missing or holds none.
fn verify_names(dir: &Path, models: Option<Vec<String>>) -> Result<Vec<String>, ExitCode> {
    if !dir.is_dir() {
        eprintln!("kiln verify: {} is not a directory", dir.display());
        return Err(ExitCode::from(2));
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
                return Err(ExitCode::from(2));
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
        return Err(ExitCode::from(2));
    }
    Ok(names)
}

fn verify(dir: &Path, models: Option<Vec<String>>, verbose: bool, compiled: bool) -> ExitCode {
    let names = match verify_names(dir, models) {
        Ok(n) => n,
        Err(code) => return code,
    };
    let mut failed = 0;
    for name in &names {
        match kiln::verify::verify_model_with(dir, name, compiled) {
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

/// `kiln devices`, `verify --backend opencl`, `bench --backend opencl`.
#[cfg(feature = "opencl")]
mod opencl {
    use std::path::Path;
    use std::process::ExitCode;

    pub fn devices() -> Result<(), String> {
        let devs = kiln::opencl::devices().map_err(|e| e.to_string())?;
        print!("{}", kiln::opencl::format_devices(&devs));
        Ok(())
    }

    pub fn bench(
        large: bool,
        models: Vec<String>,
        min_time: f64,
        device: Option<usize>,
    ) -> Result<(), String> {
        let rows = kiln::opencl::bench_opencl(&models, large, min_time, device)
            .map_err(|e| e.to_string())?;
        let ctx = kiln::runtime::opencl::context(device).map_err(|e| e.to_string())?;
        print!("{}", kiln::opencl::format_table(&rows, &ctx.info().name));
        Ok(())
    }

    pub fn verify(
        dir: &Path,
        models: Option<Vec<String>>,
        verbose: bool,
        device: Option<usize>,
    ) -> ExitCode {
        let names = match super::verify_names(dir, models) {
            Ok(n) => n,
            Err(code) => return code,
        };
        let mut failed = 0;
        for name in &names {
            match kiln::opencl::verify_opencl(dir, name, device) {
                Ok(r) => {
                    println!("{r}");
                    if verbose {
                        for (what, e) in &r.checks {
                            println!("    {what}: {e:.2e}");
                        }
                    }
                    for f in &r.fallbacks {
                        println!("    host: {f}");
                    }
                    if !r.passed() {
                        failed += 1;
                    }
                }
                Err(e) => {
                    failed += 1;
                    println!("{name:<18} ERROR {e}");
                }
            }
        }
        println!(
            "{} of {} models match PyTorch on OpenCL",
            names.len() - failed,
            names.len()
        );
        if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

/// Without the `opencl` feature the OpenCL commands say how to get them.
#[cfg(not(feature = "opencl"))]
mod opencl {
    use std::path::Path;
    use std::process::ExitCode;

    const MSG: &str = "this kiln was built without OpenCL: rebuild with `--features opencl` \
        (needs an OpenCL ICD loader, e.g. `apt-get install ocl-icd-opencl-dev pocl-opencl-icd`)";

    pub fn devices() -> Result<(), String> {
        Err(MSG.into())
    }

    pub fn bench(_: bool, _: Vec<String>, _: f64, _: Option<usize>) -> Result<(), String> {
        Err(MSG.into())
    }

    pub fn verify(_: &Path, _: Option<Vec<String>>, _: bool, _: Option<usize>) -> ExitCode {
        eprintln!("kiln: error: {MSG}");
        ExitCode::from(2)
    }
}

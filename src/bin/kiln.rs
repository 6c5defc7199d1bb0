//! The `kiln` command line: information about this machine and build;
//! `graph` (listing, summary or DOT of a saved graph) and `run` (run a saved
//! graph on safetensors inputs); `verify`, `bench` and `devices` join as
//! their issues land.

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

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
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Info => {
            info();
            Ok(())
        }
        Command::Graph { file, dot } => graph(&file, dot),
        Command::Run {
            file,
            input,
            output,
        } => run(&file, &input, &output),
    };
    if let Err(e) = res {
        eprintln!("kiln: error: {e}");
        std::process::exit(1);
    }
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

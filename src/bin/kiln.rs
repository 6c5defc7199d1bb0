//! The `kiln` command line: information about this machine and build today;
//! `verify`, `bench`, `run` and `devices` join as their issues land.

use clap::{Parser, Subcommand};

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
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Info => info(),
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

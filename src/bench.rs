//! `weft bench`: pod-to-pod figures for each data plane, side by side.

use std::process::ExitCode;

/// `weft bench`'s flags.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Modes to run, comma separated.
    #[arg(long)]
    pub modes: Option<String>,
}

/// Runs the benchmark.
pub fn run(_args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("weft bench is not built yet")
}

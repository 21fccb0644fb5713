//! `weft-wg IFNAME`: `weft wg` as a program of its own, the userspace
//! WireGuard for wg-quick (`WG_QUICK_USERSPACE_IMPLEMENTATION=weft-wg`) and
//! for hosts that run nothing but WireGuard. It carries the device and
//! nothing of the agent (no Kubernetes or etcd client, no command-line
//! framework), so a node pays for what it runs: see "Footprint" in
//! `benches/RESULTS.md`. The same device as `weft wg`: [`weft::standalone`].

#![forbid(unsafe_code)]

use std::process::ExitCode;

const USAGE: &str = "usage: weft-wg [-f|--foreground] [--threads N] IFNAME\n\
    A userspace WireGuard device configured with `wg`, as wireguard-go IFNAME.";

/// Parses `[-f|--foreground] [--threads N] IFNAME` (pure).
fn parse(args: &[String]) -> Result<weft::standalone::WgArgs, String> {
    let (mut foreground, mut threads, mut ifname) = (false, None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-f" | "--foreground" => foreground = true,
            "--threads" => {
                let v = it.next().ok_or("--threads: a number of worker threads is expected")?;
                let n: usize =
                    v.parse().ok().filter(|n| *n > 0).ok_or(format!("--threads {v}: expected a number above 0"))?;
                threads = Some(n);
            }
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s if ifname.is_none() => ifname = Some(s.to_string()),
            s => return Err(format!("one interface name is expected, `{s}` is a second")),
        }
    }
    let ifname = ifname.ok_or("the interface name is missing")?;
    Ok(weft::standalone::WgArgs { foreground, threads, ifname })
}

fn main() -> ExitCode {
    // RUST_LOG as `target=level,level`; a plain filter (no regular expressions).
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "-V" || a == "--version") {
        println!("weft-wg {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let args = match parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("weft-wg: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match weft::standalone::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weft-wg: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<weft::standalone::WgArgs, String> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags_and_the_interface_name_parse() {
        let a = p(&["-f", "--threads", "3", "wg0"]).unwrap();
        assert!(a.foreground);
        assert_eq!((a.threads, a.ifname.as_str()), (Some(3), "wg0"));
        let a = p(&["wg1"]).unwrap();
        assert!(!a.foreground && a.threads.is_none());
    }

    #[test]
    fn bad_command_lines_are_refused_with_the_reason() {
        assert!(p(&[]).unwrap_err().contains("missing"));
        assert!(p(&["wg0", "wg1"]).unwrap_err().contains("`wg1` is a second"));
        assert!(p(&["--threads", "0", "wg0"]).unwrap_err().contains("above 0"));
        assert!(p(&["--threads"]).unwrap_err().contains("expected"));
        assert!(p(&["-x", "wg0"]).unwrap_err().contains("unknown option -x"));
    }
}

//! `weft bench --quick` (root): the harness builds its topologies, measures,
//! reports a table, JSON and SVG, and leaves nothing behind; `weft bench
//! --footprint` measures every process it names and the binary. It checks the
//! harness works, not the figures: a benchmark is never a timed test.

mod common;

use std::process::Command;

use common::{require_root, unique_name, weft_bin};

const MODES: [&str; 4] = ["weft-vxlan", "weft-vxlan-ebpf", "kernel-vxlan", "kernel-hostgw"];
const FIELDS: [&str; 7] = ["tcp1_gbps", "tcp4_gbps", "udp64_pps", "udp64_loss", "rtt_avg_us", "rtt_p99_us", "cpu_pct"];

/// Runs `weft bench --name name args`; asserts it succeeded and left no
/// namespace and no state behind; returns its standard output.
fn bench_and_clean_up(name: &str, args: &[&str]) -> String {
    let out = Command::new(weft_bin()).args(["bench", "--name", name]).args(args).output().expect("running weft bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let leftovers: Vec<String> =
        weft_lab::netns::list().into_iter().filter(|n| n.starts_with(&format!("{name}-"))).collect();
    if !leftovers.is_empty() {
        weft_lab::down(name);
    }
    assert!(out.status.success(), "weft bench failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    assert!(leftovers.is_empty(), "namespaces left behind: {leftovers:?}");
    assert!(!std::path::Path::new(weft_lab::STATE_ROOT).join(name).exists(), "state directory left behind");
    stdout
}

#[test]
fn quick_bench_reports_every_mode_and_cleans_up() {
    require_root();
    let name = unique_name("bench");
    let dir = std::env::temp_dir().join(format!("{name}-out"));
    std::fs::create_dir_all(&dir).unwrap();
    let (json_path, svg_path) = (dir.join("bench.json"), dir.join("bench.svg"));
    let (json_s, svg_s) = (json_path.display().to_string(), svg_path.display().to_string());
    let stdout =
        bench_and_clean_up(&name, &["--quick", "--modes", &MODES.join(","), "--json", &json_s, "--svg", &svg_s]);

    // The table: a line per mode, then the ratios to kernel VXLAN.
    assert!(stdout.contains("machine: "), "{stdout}");
    let header = stdout.lines().position(|l| l.starts_with("mode") && l.contains("tcp1 Gbit/s")).expect(&stdout);
    let ratios = stdout.lines().position(|l| l.starts_with("ratio to kernel-vxlan")).expect(&stdout);
    assert!(ratios > header, "{stdout}");
    for m in MODES {
        let ratio_line = stdout.lines().skip(ratios + 2).find(|l| l.starts_with(m)).expect(&stdout);
        assert_eq!(ratio_line.split_whitespace().count(), 7, "{ratio_line}");
        assert!(ratio_line.split_whitespace().skip(1).all(|r| r.ends_with('x')), "{ratio_line}");
    }

    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert!(doc["commit"].is_string());
    assert!(doc["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(doc["machine"]["kernel"].as_str().unwrap().contains("Linux"));
    for m in MODES {
        let f = &doc["modes"][m];
        for k in FIELDS {
            assert!(f[k].is_number(), "{m}.{k} missing in {doc:#}");
        }
        let get = |k: &str| f[k].as_f64().unwrap();
        assert!(get("tcp1_gbps") > 0.0 && get("tcp4_gbps") > 0.0, "{m}: {f}");
        assert!(get("udp64_pps") > 0.0, "{m}: {f}");
        assert!((0.0..=1.0).contains(&get("udp64_loss")), "{m}: {f}");
        assert!(get("rtt_avg_us") > 0.0 && get("rtt_p99_us") >= get("rtt_avg_us"), "{m}: {f}");
        assert!(get("cpu_pct") >= 0.0, "{m}: {f}");
    }

    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    for m in MODES {
        assert!(svg.contains(m), "the chart does not name {m}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn footprint_measures_each_device_the_agents_and_the_binary() {
    require_root();
    let name = unique_name("fp");
    let out = Command::new(weft_bin())
        .args(["bench", "--footprint", "--window", "2", "--name", &name])
        .output()
        .expect("running weft bench --footprint");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let leftovers: Vec<String> =
        weft_lab::netns::list().into_iter().filter(|n| n.starts_with(&format!("{name}-"))).collect();
    weft_lab::down(&name);
    assert!(
        out.status.success(),
        "weft bench --footprint failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(leftovers.is_empty(), "namespaces left behind: {leftovers:?}");
    assert!(!std::path::Path::new(weft_lab::STATE_ROOT).join(&name).exists(), "state directory left behind");
    let no_socket = std::fs::read_dir("/var/run/wireguard")
        .map(|d| d.flatten().all(|e| !e.file_name().to_string_lossy().starts_with(&name[..name.len().min(8)])))
        .unwrap_or(true);
    assert!(no_socket, "a UAPI socket of the run is left in /var/run/wireguard");

    // Every process measured (the anchors are installed by scripts/setup):
    // RSS, wakeups and threads are numbers, RSS above what any process holds.
    for what in [
        "weft wg (100 peers)",
        "wireguard-go (100 peers)",
        "boringtun-cli (100 peers)",
        "weft agent (vxlan, file datastore)",
        "weft agent (wireguard-native, file datastore)",
    ] {
        let line =
            stdout.lines().find(|l| l.starts_with(what)).unwrap_or_else(|| panic!("no line for {what}:\n{stdout}"));
        let figures: Vec<f64> =
            line[what.len()..].split_whitespace().take(3).map(|f| f.parse().unwrap_or(f64::NAN)).collect();
        assert!(figures.len() == 3 && figures.iter().all(|f| f.is_finite()), "{what} not measured: {line}");
        assert!(figures[0] > 0.5, "{what}: RSS {} MiB", figures[0]);
        assert!(figures[2] >= 1.0, "{what}: {} threads", figures[2]);
    }
    // weft's own lines are judged against their budgets, the anchors not.
    let judged = stdout.lines().filter(|l| l.contains("memory within") || l.contains("memory OVER")).count();
    assert_eq!(judged, 4, "{stdout}");
    for (program, path) in [("weft", weft_bin()), ("weft-wg", env!("CARGO_BIN_EXE_weft-wg").into())] {
        let prefix = format!("binary {program} {}", std::env::consts::ARCH);
        let bin = stdout.lines().find(|l| l.starts_with(&prefix)).expect(&stdout);
        let mb: f64 = bin.split(": ").nth(1).and_then(|r| r.split(' ').next()).and_then(|m| m.parse().ok()).expect(bin);
        let unstripped = std::fs::metadata(path).unwrap().len() as f64 / 1e6;
        assert!(mb > 0.5 && mb < unstripped, "stripped {mb} MB of {unstripped} MB: {bin}");
    }
}

#[test]
fn two_minute_soak_passes_and_reports_each_bound() {
    require_root();
    let name = unique_name("soak");
    let out = Command::new(weft_bin())
        .args(["bench", "--soak", "2", "--name", &name])
        .output()
        .expect("running weft bench --soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let leftovers = weft_lab::netns::list().into_iter().filter(|n| n.starts_with(&format!("{name}-"))).count();
    weft_lab::down(&name);
    assert!(
        out.status.success() && stdout.contains("soak passed"),
        "{}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(leftovers, 0, "the soak removes its lab");
    // Samples every 5 s over 2 minutes, and a row for each bound.
    assert!(stdout.lines().filter(|l| l.starts_with("t=")).count() >= 20, "{stdout}");
    for row in [
        "resident memory",
        "descriptors and threads",
        "drops",
        "bulk TCP",
        "small UDP",
        "short connections",
        "peers joining",
    ] {
        assert!(stdout.lines().any(|l| l.contains(row) && l.contains("pass")), "no passing row {row}: {stdout}");
    }
}

/// `weft bench --rootless --quick`: the weft-rootless mode builds its lab (a
/// rootless node beside two weft nodes), prints its table with a figure in
/// every row, and leaves nothing behind.
#[test]
fn rootless_bench_reports_its_table_and_cleans_up() {
    require_root();
    let name = unique_name("rlbench");
    let stdout = bench_and_clean_up(&name, &["--rootless", "--quick"]);
    let row = |label: &str| -> Vec<String> {
        let line =
            stdout.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no {label:?} row:\n{stdout}"));
        line[label.len()..].split_whitespace().map(str::to_string).collect()
    };
    for label in ["tcp 1 stream, Gbit/s", "tcp round trip, us"] {
        let cells = row(label);
        assert_eq!(cells.len(), 3, "{label}: {cells:?}");
        let socks: f64 = cells[0].parse().unwrap();
        let pod: f64 = cells[1].parse().unwrap();
        assert!(socks > 0.0 && pod > 0.0, "{label}: {cells:?}");
        assert!(cells[2].ends_with('x'), "{label}: {cells:?}");
    }
    let cpu: f64 = row("rootless agent cpu, %")[0].parse().unwrap();
    assert!(cpu > 0.0, "the rootless agent used no CPU moving the data:\n{stdout}");
    let rss = row("rootless agent peak rss");
    assert!(rss.len() == 2 && rss[1] == "MiB" && rss[0].parse::<f64>().unwrap() > 0.0, "{rss:?}");
}

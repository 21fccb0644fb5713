//! What `weft bench` hands back: medians, the stdout table with ratios to
//! kernel VXLAN, the JSON document and the SVG bar chart. Pure code: figures
//! in, text out; the caller writes the files.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

/// One set of pod-to-pod figures: one repetition, or the medians of several.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Figures {
    /// TCP, one stream, Gbit/s received.
    pub tcp1_gbps: f64,
    /// TCP, four streams, Gbit/s received.
    pub tcp4_gbps: f64,
    /// 64-byte UDP payloads delivered per second.
    pub udp64_pps: f64,
    /// Fraction of those UDP packets lost (0..=1).
    pub udp64_loss: f64,
    /// Average round trip, microseconds.
    pub rtt_avg_us: f64,
    /// 99th percentile round trip, microseconds.
    pub rtt_p99_us: f64,
    /// CPU of the tunnel during the 1-stream TCP test, % of one core.
    pub cpu_pct: f64,
}

/// The seven metrics, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// [`Figures::tcp1_gbps`].
    Tcp1,
    /// [`Figures::tcp4_gbps`].
    Tcp4,
    /// [`Figures::udp64_pps`].
    Udp64Pps,
    /// [`Figures::udp64_loss`].
    Udp64Loss,
    /// [`Figures::rtt_avg_us`].
    RttAvg,
    /// [`Figures::rtt_p99_us`].
    RttP99,
    /// [`Figures::cpu_pct`].
    Cpu,
}

impl Metric {
    /// Every metric, in report order.
    pub const ALL: [Metric; 7] =
        [Metric::Tcp1, Metric::Tcp4, Metric::Udp64Pps, Metric::Udp64Loss, Metric::RttAvg, Metric::RttP99, Metric::Cpu];

    /// The JSON key.
    pub fn key(self) -> &'static str {
        match self {
            Metric::Tcp1 => "tcp1_gbps",
            Metric::Tcp4 => "tcp4_gbps",
            Metric::Udp64Pps => "udp64_pps",
            Metric::Udp64Loss => "udp64_loss",
            Metric::RttAvg => "rtt_avg_us",
            Metric::RttP99 => "rtt_p99_us",
            Metric::Cpu => "cpu_pct",
        }
    }

    /// A heading for people.
    pub fn title(self) -> &'static str {
        match self {
            Metric::Tcp1 => "TCP, 1 stream (Gbit/s, higher is better)",
            Metric::Tcp4 => "TCP, 4 streams (Gbit/s, higher is better)",
            Metric::Udp64Pps => "UDP 64-byte packets delivered (kpps, higher is better)",
            Metric::Udp64Loss => "UDP 64-byte loss (%, lower is better)",
            Metric::RttAvg => "Round trip, average (µs, lower is better)",
            Metric::RttP99 => "Round trip, 99th percentile (µs, lower is better)",
            Metric::Cpu => {
                "CPU during 1-stream TCP (% of one core; userspace: tunnel processes; kernel: system+softirq)"
            }
        }
    }

    /// The figure's value.
    pub fn get(self, f: &Figures) -> f64 {
        match self {
            Metric::Tcp1 => f.tcp1_gbps,
            Metric::Tcp4 => f.tcp4_gbps,
            Metric::Udp64Pps => f.udp64_pps,
            Metric::Udp64Loss => f.udp64_loss,
            Metric::RttAvg => f.rtt_avg_us,
            Metric::RttP99 => f.rtt_p99_us,
            Metric::Cpu => f.cpu_pct,
        }
    }

    fn set(self, f: &mut Figures, v: f64) {
        match self {
            Metric::Tcp1 => f.tcp1_gbps = v,
            Metric::Tcp4 => f.tcp4_gbps = v,
            Metric::Udp64Pps => f.udp64_pps = v,
            Metric::Udp64Loss => f.udp64_loss = v,
            Metric::RttAvg => f.rtt_avg_us = v,
            Metric::RttP99 => f.rtt_p99_us = v,
            Metric::Cpu => f.cpu_pct = v,
        }
    }

    /// The value as shown in the table and the chart.
    pub fn show(self, v: f64) -> String {
        match self {
            Metric::Tcp1 | Metric::Tcp4 => format!("{v:.2}"),
            Metric::Udp64Pps => format!("{:.1}", v / 1e3),
            Metric::Udp64Loss => format!("{:.1}", v * 100.0),
            Metric::RttAvg | Metric::RttP99 => format!("{v:.0}"),
            Metric::Cpu => format!("{v:.0}"),
        }
    }
}

/// The median of `xs` (the mean of the middle two for an even count);
/// `None` when empty.
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The `p`-th percentile of `xs` by the nearest-rank method (the smallest
/// value with at least `p` % of the samples at or below it); `None` when empty.
pub fn percentile(xs: &[f64], p: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// The median of each metric over repetitions.
pub fn median_figures(reps: &[Figures]) -> Option<Figures> {
    let mut out = Figures::default();
    for m in Metric::ALL {
        let xs: Vec<f64> = reps.iter().map(|f| m.get(f)).collect();
        m.set(&mut out, median(&xs)?);
    }
    Some(out)
}

/// Where a mode's CPU figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuSource {
    /// utime + stime of the tunnel processes (`/proc/PID/stat`).
    Processes,
    /// System-wide system + irq + softirq time (`/proc/stat`).
    SystemSoftirq,
}

impl CpuSource {
    /// Its name in the table and the JSON.
    pub fn label(self) -> &'static str {
        match self {
            CpuSource::Processes => "tunnel processes",
            CpuSource::SystemSoftirq => "system+softirq",
        }
    }
}

/// How quiet the machine was before a mode started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quiet {
    /// Whether idle time reached the threshold.
    pub quiet: bool,
    /// Idle share of the machine over the last second sampled, in %.
    pub idle_pct: f64,
    /// Seconds spent waiting.
    pub waited_s: f64,
}

/// One measured mode.
#[derive(Debug, Clone, PartialEq)]
pub struct ModeResult {
    /// The mode's name.
    pub mode: String,
    /// Medians over the repetitions.
    pub median: Figures,
    /// Every repetition.
    pub reps: Vec<Figures>,
    /// What the CPU figure counts.
    pub cpu_source: CpuSource,
    /// System-wide system + irq + softirq during the 1-stream TCP test, % of one core (every mode).
    pub system_cpu_pct: f64,
    /// The machine before the mode.
    pub quiet: Quiet,
}

/// What became of a mode.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Measured.
    Measured(ModeResult),
    /// Not run, and why (not installed).
    Skipped(String, String),
    /// Failed, and how.
    Failed(String, String),
}

impl Outcome {
    /// The mode's name.
    pub fn mode(&self) -> &str {
        match self {
            Outcome::Measured(r) => &r.mode,
            Outcome::Skipped(m, _) | Outcome::Failed(m, _) => m,
        }
    }
}

/// The machine the figures were taken on.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Logical cores.
    pub cores: usize,
    /// `uname -srm`.
    pub kernel: String,
}

/// How the run was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Seconds per measurement.
    pub duration_s: u64,
    /// Repetitions per measurement.
    pub reps: usize,
    /// `--quick`.
    pub quick: bool,
    /// `--threads`.
    pub threads: Option<usize>,
    /// `--busy-poll-us`.
    pub busy_poll_us: Option<u32>,
}

/// The mode every ratio is taken against.
pub const BASELINE: &str = "kernel-vxlan";

/// The one-line description of the machine and the run.
pub fn machine_line(m: &Machine, commit: &str, s: &Settings) -> String {
    format!(
        "machine: {}, {} cores, {}; commit {commit}; {} s per measurement, {} rep{} (median)",
        m.cpu,
        m.cores,
        m.kernel,
        s.duration_s,
        s.reps,
        if s.reps == 1 { "" } else { "s" }
    )
}

/// The stdout report: a figures table, a table of ratios to kernel VXLAN
/// (when it was measured), then notes (busy machine, skipped and failed modes).
pub fn table(outcomes: &[Outcome]) -> String {
    let measured: Vec<&ModeResult> =
        outcomes.iter().filter_map(|o| if let Outcome::Measured(r) = o { Some(r) } else { None }).collect();
    let w = measured.iter().map(|r| r.mode.len()).chain([4]).max().unwrap_or(4);
    let mut out = String::new();
    let heads = ["tcp1 Gbit/s", "tcp4 Gbit/s", "udp64 kpps", "udp64 loss %", "rtt avg us", "rtt p99 us", "cpu %"];
    let _ = write!(out, "{:<w$}", "mode");
    for h in heads {
        let _ = write!(out, "  {h:>12}");
    }
    let _ = writeln!(out, "  cpu of");
    for r in &measured {
        let _ = write!(out, "{:<w$}", r.mode);
        for m in Metric::ALL {
            let _ = write!(out, "  {:>12}", m.show(m.get(&r.median)));
        }
        let _ = writeln!(out, "  {}", r.cpu_source.label());
    }
    match measured.iter().find(|r| r.mode == BASELINE) {
        Some(base) => {
            let _ = writeln!(out, "\nratio to {BASELINE} (throughput and pps: higher is better; rtt and cpu: lower)");
            let ratio_heads = ["tcp1", "tcp4", "udp64 pps", "rtt avg", "rtt p99", "cpu"];
            let ratio_metrics =
                [Metric::Tcp1, Metric::Tcp4, Metric::Udp64Pps, Metric::RttAvg, Metric::RttP99, Metric::Cpu];
            let _ = write!(out, "{:<w$}", "mode");
            for h in ratio_heads {
                let _ = write!(out, "  {h:>9}");
            }
            out.push('\n');
            for r in &measured {
                let _ = write!(out, "{:<w$}", r.mode);
                for m in ratio_metrics {
                    let _ = write!(out, "  {:>9}", show_ratio(ratio(m.get(&r.median), m.get(&base.median))));
                }
                out.push('\n');
            }
        }
        None => {
            let _ = writeln!(out, "\nno ratios: {BASELINE} was not measured");
        }
    }
    let mut notes = Vec::new();
    for o in outcomes {
        match o {
            Outcome::Measured(r) if !r.quiet.quiet => notes.push(format!(
                "{}: the machine was not quiet before it (idle {:.0} % after waiting {:.0} s): figures are noisy",
                r.mode, r.quiet.idle_pct, r.quiet.waited_s
            )),
            Outcome::Skipped(m, why) => notes.push(format!("{m}: skipped: {why}")),
            Outcome::Failed(m, why) => notes.push(format!("{m}: FAILED: {why}")),
            Outcome::Measured(_) => {}
        }
    }
    if measured.iter().any(|r| r.cpu_source == CpuSource::SystemSoftirq) {
        notes.push(
            "cpu of system+softirq: the whole machine's kernel time, iperf3's own system calls included; \
             tunnel processes: their utime+stime only (the kernel work their packets cause is not in it)"
                .into(),
        );
    }
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            let _ = writeln!(out, "note: {n}");
        }
    }
    out
}

/// `value / base`, or `None` when the base is zero or either is not finite.
pub fn ratio(value: f64, base: f64) -> Option<f64> {
    (base != 0.0 && value.is_finite() && base.is_finite()).then(|| value / base)
}

fn show_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) => format!("{r:.2}x"),
        None => "-".into(),
    }
}

fn figures_json(f: &Figures) -> Value {
    let mut m = Map::new();
    for k in Metric::ALL {
        m.insert(k.key().into(), json_num(k.get(f)));
    }
    Value::Object(m)
}

fn json_num(v: f64) -> Value {
    serde_json::Number::from_f64(v).map(Value::Number).unwrap_or(Value::Null)
}

/// The `--json` document.
pub fn json_report(machine: &Machine, commit: &str, settings: &Settings, outcomes: &[Outcome]) -> Value {
    let mut modes = Map::new();
    let mut skipped = Map::new();
    let mut failed = Map::new();
    let base = outcomes.iter().find_map(|o| match o {
        Outcome::Measured(r) if r.mode == BASELINE => Some(r.median),
        _ => None,
    });
    for o in outcomes {
        match o {
            Outcome::Measured(r) => {
                let mut v = figures_json(&r.median);
                let obj = v.as_object_mut().expect("figures_json makes an object");
                obj.insert("cpu_source".into(), r.cpu_source.label().into());
                obj.insert("system_cpu_pct".into(), json_num(r.system_cpu_pct));
                obj.insert("quiet".into(), r.quiet.quiet.into());
                obj.insert("idle_pct_before".into(), json_num(r.quiet.idle_pct));
                obj.insert("reps".into(), r.reps.iter().map(figures_json).collect());
                if let Some(b) = &base {
                    let mut ratios = Map::new();
                    for m in Metric::ALL.into_iter().filter(|m| *m != Metric::Udp64Loss) {
                        ratios.insert(m.key().into(), ratio(m.get(&r.median), m.get(b)).map_or(Value::Null, json_num));
                    }
                    obj.insert(format!("ratio_to_{}", BASELINE.replace('-', "_")), Value::Object(ratios));
                }
                modes.insert(r.mode.clone(), v);
            }
            Outcome::Skipped(m, why) => {
                skipped.insert(m.clone(), why.clone().into());
            }
            Outcome::Failed(m, why) => {
                failed.insert(m.clone(), why.clone().into());
            }
        }
    }
    json!({
        "machine": {"cpu": machine.cpu, "cores": machine.cores, "kernel": machine.kernel},
        "commit": commit,
        "duration_s": settings.duration_s,
        "reps": settings.reps,
        "quick": settings.quick,
        "threads": settings.threads,
        "busy_poll_us": settings.busy_poll_us,
        "units": {
            "tcp1_gbps": "Gbit/s received, iperf3 -J",
            "tcp4_gbps": "Gbit/s received, iperf3 -J -P 4",
            "udp64_pps": "64-byte UDP payloads delivered per second, iperf3 -u -l 64 -b 0",
            "udp64_loss": "fraction lost, 0..1",
            "rtt_avg_us": "UDP ping-pong round trip, microseconds",
            "rtt_p99_us": "UDP ping-pong round trip, 99th percentile (nearest rank), microseconds",
            "cpu_pct": "% of one core during the 1-stream TCP test; see cpu_source",
        },
        "modes": modes,
        "skipped": skipped,
        "failed": failed,
    })
}

/// Colours of the bars, one per mode in order.
const PALETTE: [&str; 8] = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f"];

/// An SVG bar chart: one panel per metric, a horizontal bar per mode, each
/// labelled with its value. Plain SVG text, no script, no external font.
pub fn svg(title: &str, subtitle: &[String], results: &[(String, Figures)]) -> String {
    const WIDTH: f64 = 760.0;
    const LABEL_W: f64 = 130.0;
    const VALUE_W: f64 = 80.0;
    const BAR_H: f64 = 18.0;
    const GAP: f64 = 4.0;
    const PANEL_HEAD: f64 = 26.0;
    const PANEL_GAP: f64 = 16.0;
    let panel_h = PANEL_HEAD + results.len() as f64 * (BAR_H + GAP);
    let top = 44.0 + 16.0 * subtitle.len() as f64;
    let height = top + Metric::ALL.len() as f64 * (panel_h + PANEL_GAP) + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="10" y="22" font-size="16" font-weight="bold">{}</text>"#, xml_escape(title));
    for (i, line) in subtitle.iter().enumerate() {
        let _ = writeln!(s, r##"<text x="10" y="{}" fill="#555">{}</text>"##, 42 + 16 * i, xml_escape(line));
    }
    let bar_max = WIDTH - LABEL_W - VALUE_W - 20.0;
    for (pi, m) in Metric::ALL.into_iter().enumerate() {
        let y0 = top + pi as f64 * (panel_h + PANEL_GAP);
        let _ = writeln!(s, r#"<g class="metric" id="{}">"#, m.key());
        let _ = writeln!(s, r#"<text x="10" y="{:.1}" font-weight="bold">{}</text>"#, y0 + 16.0, xml_escape(m.title()));
        let max = results.iter().map(|(_, f)| m.get(f)).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
        for (i, (mode, f)) in results.iter().enumerate() {
            let v = m.get(f);
            let y = y0 + PANEL_HEAD + i as f64 * (BAR_H + GAP);
            let w = if max > 0.0 && v.is_finite() { (v / max * bar_max).max(1.0) } else { 1.0 };
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LABEL_W,
                y + BAR_H - 5.0,
                xml_escape(mode)
            );
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{y:.1}" width="{w:.1}" height="{BAR_H}" fill="{}"><title>{} {}</title></rect>"#,
                LABEL_W + 8.0,
                PALETTE[i % PALETTE.len()],
                xml_escape(mode),
                m.show(v)
            );
            let _ =
                writeln!(s, r#"<text x="{:.1}" y="{:.1}">{}</text>"#, LABEL_W + 12.0 + w, y + BAR_H - 5.0, m.show(v));
        }
        let _ = writeln!(s, "</g>");
    }
    s.push_str("</svg>\n");
    s
}

fn xml_escape(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figs(x: f64) -> Figures {
        Figures {
            tcp1_gbps: x,
            tcp4_gbps: 2.0 * x,
            udp64_pps: 1e5 * x,
            udp64_loss: 0.1,
            rtt_avg_us: 50.0 / x,
            rtt_p99_us: 90.0 / x,
            cpu_pct: 80.0,
        }
    }

    fn result(mode: &str, x: f64, quiet: bool) -> ModeResult {
        ModeResult {
            mode: mode.into(),
            median: figs(x),
            reps: vec![figs(x)],
            cpu_source: if mode.starts_with("kernel") { CpuSource::SystemSoftirq } else { CpuSource::Processes },
            system_cpu_pct: 100.0,
            quiet: Quiet { quiet, idle_pct: if quiet { 97.0 } else { 40.0 }, waited_s: 1.0 },
        }
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.5]), Some(7.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 99.0), Some(99.0));
        assert_eq!(percentile(&xs, 50.0), Some(50.0));
        assert_eq!(percentile(&xs, 100.0), Some(100.0));
        assert_eq!(percentile(&xs, 0.0), Some(1.0));
        assert_eq!(percentile(&[5.0, 1.0], 99.0), Some(5.0));
        assert_eq!(percentile(&[], 99.0), None);
    }

    #[test]
    fn median_figures_takes_each_metric_apart() {
        let mut a = figs(1.0);
        a.cpu_pct = 10.0;
        let mut b = figs(3.0);
        b.cpu_pct = 30.0;
        let mut c = figs(2.0);
        c.cpu_pct = 90.0;
        let m = median_figures(&[a, b, c]).unwrap();
        assert_eq!(m.tcp1_gbps, 2.0);
        assert_eq!(m.cpu_pct, 30.0);
        assert_eq!(m.rtt_avg_us, 25.0);
        assert_eq!(median_figures(&[]), None);
    }

    #[test]
    fn table_has_figures_ratios_and_notes() {
        let outcomes = vec![
            Outcome::Measured(result("kernel-vxlan", 2.0, true)),
            Outcome::Measured(result("weft-vxlan", 1.0, false)),
            Outcome::Skipped("boringtun".into(), "boringtun-cli not installed".into()),
            Outcome::Failed("weft-wireguard".into(), "agent died".into()),
        ];
        let t = table(&outcomes);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("mode") && lines[0].contains("tcp1 Gbit/s") && lines[0].ends_with("cpu of"));
        assert!(lines[1].starts_with("kernel-vxlan") && lines[1].contains("2.00") && lines[1].contains("200.0"));
        assert!(lines[1].ends_with("system+softirq"));
        assert!(lines[2].starts_with("weft-vxlan") && lines[2].ends_with("tunnel processes"));
        assert!(t.contains("ratio to kernel-vxlan"));
        let weft = t.lines().filter(|l| l.starts_with("weft-vxlan")).nth(1).unwrap();
        // Half the throughput, twice the round trip, the same CPU.
        assert_eq!(
            weft.split_whitespace().collect::<Vec<_>>(),
            ["weft-vxlan", "0.50x", "0.50x", "0.50x", "2.00x", "2.00x", "1.00x"]
        );
        assert!(t.contains("note: weft-vxlan: the machine was not quiet"));
        assert!(t.contains("note: boringtun: skipped: boringtun-cli not installed"));
        assert!(t.contains("note: weft-wireguard: FAILED: agent died"));
        let no_base = table(&[Outcome::Measured(result("weft-vxlan", 1.0, true))]);
        assert!(no_base.contains("no ratios: kernel-vxlan was not measured"));
    }

    #[test]
    fn json_has_every_mode_and_field() {
        let machine = Machine { cpu: "Test CPU".into(), cores: 2, kernel: "Linux 6.1 x86_64".into() };
        let settings = Settings { duration_s: 2, reps: 1, quick: true, threads: None, busy_poll_us: None };
        let outcomes = vec![
            Outcome::Measured(result("kernel-vxlan", 2.0, true)),
            Outcome::Measured(result("weft-vxlan", 1.0, false)),
            Outcome::Skipped("boringtun".into(), "not installed".into()),
        ];
        let v = json_report(&machine, "abc123", &settings, &outcomes);
        assert_eq!(v["commit"], "abc123");
        assert_eq!(v["machine"]["cores"], 2);
        assert_eq!(v["machine"]["cpu"], "Test CPU");
        for mode in ["kernel-vxlan", "weft-vxlan"] {
            for m in Metric::ALL {
                assert!(v["modes"][mode][m.key()].is_f64(), "{mode} {}", m.key());
            }
        }
        assert_eq!(v["modes"]["weft-vxlan"]["quiet"], false);
        assert_eq!(v["modes"]["weft-vxlan"]["ratio_to_kernel_vxlan"]["tcp1_gbps"], 0.5);
        assert_eq!(v["modes"]["weft-vxlan"]["cpu_source"], "tunnel processes");
        assert_eq!(v["skipped"]["boringtun"], "not installed");
        let text = serde_json::to_string(&v).unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_ok());
    }

    #[test]
    fn svg_has_a_panel_per_metric_and_a_labelled_bar_per_mode() {
        let results = vec![("kernel-vxlan".to_string(), figs(2.0)), ("weft-<vxlan>".to_string(), figs(1.0))];
        let s = svg("weft bench", &["machine & co".into(), "commit".into()], &results);
        assert!(s.starts_with("<svg"));
        assert!(s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches(r#"<g class="metric""#).count(), 7);
        assert_eq!(s.matches("<rect x=").count(), 14);
        assert!(s.contains(">kernel-vxlan</text>"));
        assert!(s.contains("weft-&lt;vxlan&gt;"));
        assert!(s.contains("machine &amp; co"));
        // Values are labelled as the table shows them: 2 Gbit/s, 200 kpps.
        assert!(s.contains(">2.00</text>") && s.contains(">200.0</text>"));
        // Tags balance.
        assert_eq!(s.matches("<g ").count(), s.matches("</g>").count());
        assert_eq!(s.matches("<text").count(), s.matches("</text>").count());
    }

    #[test]
    fn ratio_refuses_zero_bases() {
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(1.0, 2.0), Some(0.5));
        assert_eq!(ratio(f64::NAN, 2.0), None);
    }
}

//! Captures of the lab's underlay: tcpdump on the underlay bridge while
//! something runs, and the frames of the pcap file it writes.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::netns::exec;
use crate::plan::{Lab, Node};

impl Lab {
    /// Captures the underlay bridge (tcpdump `filter`) while `during` runs;
    /// returns the pcap file.
    pub fn capture_underlay(&self, filter: &[&str], during: impl FnOnce()) -> anyhow::Result<PathBuf> {
        self.capture(&format!("{}-ul", self.opts.name), "br0", "underlay", filter, during)
    }

    /// Captures interface `iface` of namespace `ns` (tcpdump `filter`) while
    /// `during` runs; returns the pcap file, `<tag>.pcap` in the lab's
    /// directory (captures that run at once need tags of their own).
    pub fn capture(
        &self,
        ns: &str,
        iface: &str,
        tag: &str,
        filter: &[&str],
        during: impl FnOnce(),
    ) -> anyhow::Result<PathBuf> {
        let pcap = self.dir.join(format!("{tag}.pcap"));
        let pcap_s = pcap.display().to_string();
        let mut dump = Command::new("ip")
            .args(["netns", "exec", ns, "tcpdump", "-Z", "root", "--immediate-mode", "-U", "-n", "-i", iface])
            .args(["-w", &pcap_s])
            .args(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("tcpdump")?;
        // tcpdump says "listening on br0" once its capture is open; its
        // closing words are read too, so they never meet a closed pipe.
        let mut stderr = std::io::BufReader::new(dump.stderr.take().context("tcpdump stderr")?);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stderr, &mut line)?;
        if !line.contains("listening on") {
            let _ = dump.kill();
            bail!("tcpdump: {line}");
        }
        let drain = std::thread::spawn(move || std::io::Read::read_to_end(&mut stderr, &mut Vec::new()));
        during();
        std::thread::sleep(Duration::from_millis(300));
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(dump.id() as i32), nix::sys::signal::Signal::SIGINT);
        let _ = dump.wait();
        let _ = drain.join();
        Ok(pcap)
    }

    /// The capture behind [`Lab::check`]'s underlay check; an error says
    /// what crossed the underlay in clear.
    pub fn underlay_capture(&self) -> anyhow::Result<String> {
        self.underlay_capture_between(&self.nodes[0], &self.nodes[self.nodes.len() - 1])
    }

    /// The underlay capture while a pod of node `a` pings a pod of node `b`
    /// (in a multi-cloud lab the underlay bridge is the internet).
    pub fn underlay_capture_between(&self, a: &Node, b: &Node) -> anyhow::Result<String> {
        let (a, b) = (&a.pods[0], &b.pods[0]);
        let v6 = a.ip(false).is_none();
        let (Some(from), Some(to)) = (a.ip(v6), b.ip(v6)) else { bail!("pods without addresses") };
        // "weftmark" as the ping payload pattern.
        let marker = b"weftmark";
        let pattern: String = marker.iter().map(|b| format!("{b:02x}")).collect();
        let mut pinged = Ok(String::new());
        // Through an impaired link some pings are lost: send more, and
        // ping's exit status says whether any came back.
        let count = if self.opts.impair.is_some() { "12" } else { "3" };
        let pcap = self.capture_underlay(&[], || {
            pinged = exec(&a.ns, "ping", &["-c", count, "-i", "0.2", "-W", "2", "-p", &pattern, &to.to_string()]);
        })?;
        pinged.context("ping through the tunnel")?;
        let bytes = std::fs::read(&pcap)?;
        let frames = pcap_frames(&bytes)?;
        let mut wireguard = 0;
        for f in &frames {
            if let Some((sport, dport)) = udp_ports(f) {
                if [51820, 51821].contains(&sport) || [51820, 51821].contains(&dport) {
                    wireguard += 1;
                    continue;
                }
            }
            // ARP, neighbour discovery and other link chatter carry no pod data.
        }
        let needles: Vec<Vec<u8>> = vec![
            marker.to_vec(),
            match from {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            },
            match to {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            },
        ];
        for n in &needles {
            if bytes.windows(n.len()).any(|w| w == &n[..]) {
                bail!("the capture holds {n:02x?} in clear");
            }
        }
        if wireguard < 6 {
            bail!("only {wireguard} WireGuard datagrams among {} frames", frames.len());
        }
        Ok(format!("{} frames, {wireguard} WireGuard datagrams, no inner address or payload in clear", frames.len()))
    }
}

/// The Ethernet frames of a classic pcap file (tcpdump's `-w`).
pub fn pcap_frames(pcap: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut reader = pcap_file::pcap::PcapReader::new(pcap).context("not a pcap file")?;
    if reader.header().datalink != pcap_file::DataLink::ETHERNET {
        bail!("pcap link type {:?}, not Ethernet", reader.header().datalink);
    }
    let mut out = Vec::new();
    while let Some(p) = reader.next_packet() {
        out.push(p.context("truncated pcap")?.data.into_owned());
    }
    Ok(out)
}

/// UDP source and destination ports of an Ethernet frame, if it is UDP.
fn udp_ports(frame: &[u8]) -> Option<(u16, u16)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let l4 = match ethertype {
        0x0800 if *frame.get(23)? == 17 => frame.get(14 + ((frame[14] & 0x0f) as usize) * 4..)?,
        0x86dd if *frame.get(20)? == 17 => frame.get(54..)?,
        _ => return None,
    };
    Some((u16::from_be_bytes([*l4.first()?, *l4.get(1)?]), u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?])))
}

//! A worker: one TUN queue, one socket per underlay family, one poll loop
//! driving a [`Datapath`] over them.
//!
//! The loop runs each batch to completion and then looks at the control
//! channel, so a new [`Snapshot`] is swapped in between batches, never in the
//! middle of one. Readiness is edge-triggered: a side stays "pending" until a
//! read comes back short, and the loop polls without blocking while anything
//! is pending. Worker 0 also drives the WireGuard timers: it sleeps no later
//! than the peers' earliest deadline. Between batches, and when another
//! worker wakes it for that, a worker takes halves of other workers'
//! WireGuard runs to seal or open ([`crate::spread`]).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::datapath::Datapath;
use crate::io::{PodIo, UdpUnderlay};
use crate::snapshot::Snapshot;
use crate::spread;
use crate::wg::WgDevice;

/// Batches per side handled before the loop polls again, so that one busy
/// direction cannot starve the other or the control channel. 8 x 32 packets
/// keeps a control message's latency well under a millisecond at line rate.
pub const IO_LOOP_BOUND: usize = 8;

pub(crate) const TUN: Token = Token(0);
pub(crate) const WAKER: Token = Token(1);
/// Underlay family `i` (0: IPv4, 1: IPv6) polls as `Token(UDP_BASE + i)`.
const UDP_BASE: usize = 2;

/// Messages from the control plane.
pub enum Control {
    /// Forward with this snapshot from the next batch on.
    Snapshot(Arc<Snapshot>),
    /// Use these underlay sockets (a new port) instead of the current ones.
    Families(Vec<UdpUnderlay>),
    /// Use this WireGuard device (a new private key).
    WgDevice(Arc<WgDevice>),
    /// Leave the loop.
    Stop,
}

/// A worker over pod side `P`: a TUN queue, or a rootless node's packet pair.
pub(crate) struct Worker<P> {
    pub poll: Poll,
    pub dp: Datapath<P, UdpUnderlay>,
    pub control: Receiver<Control>,
    /// How long to keep polling after the last packet before sleeping.
    pub busy_poll: Duration,
}

impl<P: PodIo + AsRawFd> Worker<P> {
    /// Runs until told to stop.
    pub fn run(mut self) -> io::Result<()> {
        let tun_fd = self.dp.pod.as_raw_fd();
        self.poll.registry().register(&mut SourceFd(&tun_fd), TUN, Interest::READABLE)?;
        for (i, f) in self.dp.families.iter_mut().enumerate() {
            self.poll.registry().register(&mut f.rx, Token(UDP_BASE + i), Interest::READABLE)?;
        }
        let mut events = Events::with_capacity(16);
        let mut tun_pending = true;
        // Only families that exist can be pending: a flag left set for a
        // missing family would keep the loop polling without blocking.
        let all_pending = |n: usize| [n > 0, n > 1];
        let mut udp_pending = all_pending(self.dp.families.len());
        // When the last packet moved: until `busy_poll` after it the loop
        // polls without sleeping (an answer then costs no wakeup).
        let mut last_moved = Instant::now();
        let owner = self.dp.deadlines.clone().filter(|_| self.dp.timer_owner);
        loop {
            let busy = tun_pending || udp_pending.iter().any(|p| *p);
            let spin = !busy && !self.busy_poll.is_zero() && last_moved.elapsed() < self.busy_poll;
            let mut timeout = (busy || spin).then_some(Duration::ZERO);
            if let Some(d) = &owner {
                let now = Instant::now();
                self.dp.poll_timers(now);
                if timeout.is_none() {
                    timeout = d.sleep_for(now);
                }
            }
            let sleeps = timeout != Some(Duration::ZERO);
            if let (true, Some((crew, id))) = (sleeps, &self.dp.crew) {
                crew.sleeps(*id);
            }
            let polled = self.poll.poll(&mut events, timeout);
            if let Some(d) = &owner {
                d.awake();
            }
            let called = match (sleeps, &self.dp.crew) {
                (true, Some((crew, id))) => crew.wakes(*id),
                _ => false,
            };
            // Halves of other workers' WireGuard runs (what woke us, maybe).
            spread::help(called);
            match polled {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if self.busy_poll.is_zero() {
                // No busy polling: no clock to read.
            } else if !events.is_empty() || busy {
                last_moved = Instant::now();
            } else if spin {
                // Whatever else is runnable here (the pod answering) goes first.
                std::thread::yield_now();
            }
            for e in events.iter() {
                match e.token() {
                    TUN => tun_pending = true,
                    Token(t) if (UDP_BASE..UDP_BASE + 2).contains(&t) => udp_pending[t - UDP_BASE] = true,
                    _ => {}
                }
            }
            while let Ok(msg) = self.control.try_recv() {
                match msg {
                    Control::Snapshot(s) => self.dp.set_snapshot(s, Instant::now()),
                    Control::WgDevice(d) => self.dp.backend = crate::datapath::Backend::Wireguard(d),
                    Control::Families(families) => {
                        for f in &mut self.dp.families {
                            let _ = self.poll.registry().deregister(&mut f.rx);
                        }
                        self.dp.families = families;
                        for (i, f) in self.dp.families.iter_mut().enumerate() {
                            self.poll.registry().register(&mut f.rx, Token(UDP_BASE + i), Interest::READABLE)?;
                        }
                        udp_pending = all_pending(self.dp.families.len());
                    }
                    Control::Stop => return Ok(()),
                }
            }
            // One clock read per round: WireGuard's timers take it.
            let now = Instant::now();
            for _ in 0..IO_LOOP_BOUND {
                if tun_pending {
                    tun_pending = self.dp.pod_to_underlay(now)?;
                }
                for (f, pending) in udp_pending.iter_mut().enumerate().take(self.dp.families.len()) {
                    if *pending {
                        *pending = self.dp.underlay_to_pod(f, now)?;
                    }
                }
                if !tun_pending && !udp_pending.iter().any(|p| *p) {
                    break;
                }
                spread::help(false);
            }
        }
    }
}

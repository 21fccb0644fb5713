//! WireGuard's per-packet AEAD spread over the workers.
//!
//! One peer's packets arrive on one TUN queue (one flow) or one UDP socket
//! (one endpoint), so one worker would seal or open all of them. Here a
//! run of them is cut in halves with `rayon::join`: the worker seals the
//! first half while the second waits on its deque, where an idle worker
//! takes it (the workers are the threads of one rayon pool, and a worker
//! between batches, or woken for it, looks for such work with
//! `rayon::yield_now`); if nobody did, the worker seals it too. `join`
//! returns when both halves are done, so the run leaves in its order:
//! counters were taken for the whole run beforehand under the peer's lock,
//! the replay window is checked afterwards under it, and only the
//! ChaCha20-Poly1305 runs here, on whichever core is free.
//!
//! Outside a rayon pool (tests, the in-memory mesh) everything runs on the
//! caller's thread, in order.
//!
//! Bytes sealed and opened are counted on the worker that did the work
//! ([`WorkerCounters::wg_sealed_bytes`], [`WorkerCounters::wg_opened_bytes`]).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::counters::{add, WorkerCounters};

/// Bytes below which a run is not cut: ChaCha20-Poly1305 does about
/// 1.5 GB/s on a core here, so a half of 16 KiB is some 11 us of work
/// against a microsecond or two to hand it over (and tens to wake a
/// sleeping worker). Small packets (64-byte UDP) are never spread.
pub const MIN_HALF_BYTES: usize = 16 << 10;

/// Whether a run of `bytes` is long enough to offer half of it.
pub fn worth_spreading(bytes: usize) -> bool {
    bytes >= 2 * MIN_HALF_BYTES
}

thread_local! {
    /// The counters of the worker this thread is, once it has said so.
    static MINE: RefCell<Option<Arc<WorkerCounters>>> = const { RefCell::new(None) };
}

/// Names this thread's counters: AEAD work it does for any worker is
/// counted there.
pub fn set_thread_counters(c: Arc<WorkerCounters>) {
    MINE.with(|m| *m.borrow_mut() = Some(c));
}

/// Runs `f` with this thread's counters, or `fallback` when it has none.
fn with_counters(fallback: &WorkerCounters, f: impl FnOnce(&WorkerCounters)) {
    MINE.with(|m| match &*m.borrow() {
        Some(c) => f(c),
        None => f(fallback),
    })
}

/// The workers, as far as spreading needs them: how to wake the ones that
/// sleep when there is work to take.
pub struct Crew {
    members: Vec<Member>,
}

struct Member {
    waker: Arc<mio::Waker>,
    /// Set while the worker blocks in its poll; on a line of its own.
    sleeping: Padded,
}

#[repr(align(128))]
struct Padded(AtomicBool);

impl Crew {
    /// A crew of workers woken by `wakers`, in worker order.
    pub fn new(wakers: Vec<Arc<mio::Waker>>) -> Crew {
        Crew {
            members: wakers
                .into_iter()
                .map(|waker| Member { waker, sleeping: Padded(AtomicBool::new(false)) })
                .collect(),
        }
    }

    /// Worker `i` is about to block in its poll.
    pub fn sleeps(&self, i: usize) {
        if let Some(m) = self.members.get(i) {
            m.sleeping.0.store(true, Ordering::Release);
        }
    }

    /// Worker `i` is back from its poll; returns whether another worker
    /// woke it to help ([`Crew::call_one`] cleared its flag).
    pub fn wakes(&self, i: usize) -> bool {
        self.members.get(i).is_some_and(|m| !m.sleeping.0.swap(false, Ordering::Relaxed))
    }

    /// Wakes one sleeping worker other than `me`, so that it takes the
    /// half about to be offered; a busy one finds it between its batches.
    /// Called as early as a long run is known (a woken thread takes tens
    /// of microseconds to run), and again by [`spread`].
    pub fn call_one(&self, me: usize) {
        let sleeping = self.members.iter().enumerate().find(|(i, m)| *i != me && m.sleeping.0.load(Ordering::Acquire));
        if let Some((_, m)) = sleeping {
            // Cleared here so that a second run does not wake it again.
            m.sleeping.0.store(false, Ordering::Relaxed);
            let _ = m.waker.wake();
        }
    }

    /// Whether there is anyone to spread to.
    fn spreads(&self) -> bool {
        self.members.len() > 1 && rayon::current_thread_index().is_some()
    }
}

/// How long a worker that found work keeps looking for more before it
/// goes back to its own: a busy peer offers a half every few tens of
/// microseconds, and a worker asleep in its poll comes too late for most.
pub const LINGER: Duration = Duration::from_micros(200);

/// Runs the AEAD work other workers offered, until there is none left;
/// after doing some, or when `called` (another worker woke this one for
/// it, and its run may not be offered yet), keeps looking for [`LINGER`]
/// more. Returns whether it did any.
pub fn help(called: bool) -> bool {
    let mut did = false;
    let mut last = called.then(Instant::now);
    loop {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => {
                did = true;
                last = Some(Instant::now());
            }
            _ => match last {
                Some(t) if t.elapsed() < LINGER => std::thread::yield_now(),
                _ => return did,
            },
        }
    }
}

/// Applies `f` to each pair of `a` and `b` (of equal length; `bytes` of
/// packets in all), spread over the crew when there is one and the run is
/// [`worth_spreading`]; returns when every pair is done. `f` returns the
/// bytes it sealed or opened, counted on the thread that ran it.
#[allow(clippy::too_many_arguments)]
pub fn spread<A: Send, B: Send>(
    crew: Option<&Crew>,
    me: usize,
    a: &mut [A],
    b: &mut [B],
    bytes: usize,
    opened: bool,
    fallback: &WorkerCounters,
    f: &(impl Fn(&mut A, &mut B) -> usize + Sync),
) {
    let task = Task { opened, fallback, f };
    match crew.filter(|c| worth_spreading(bytes) && c.spreads()) {
        Some(crew) => {
            crew.call_one(me);
            halves(a, b, bytes, &task, true);
        }
        None => task.run(a, b),
    }
}

/// How long a worker that offered half a run waits, its own half done, for
/// a helper to take the other before doing it itself. Measured with
/// `weft bench` (one peer, 4 streams, 2 workers): with 50 us the helper
/// took 30-34 % of the sealing, with 100 us 33-38 % (and up to 64 %, as it
/// steals quarters back); throughput moved within the noise.
pub const WAIT_FOR_HELP: Duration = Duration::from_micros(100);

/// What to do with each pair, and where to count it.
struct Task<'a, F> {
    opened: bool,
    fallback: &'a WorkerCounters,
    f: &'a F,
}

impl<F> Task<'_, F> {
    fn run<A, B>(&self, a: &mut [A], b: &mut [B])
    where
        F: Fn(&mut A, &mut B) -> usize,
    {
        let bytes: usize = a.iter_mut().zip(b.iter_mut()).map(|(x, y)| (self.f)(x, y)).sum();
        let opened = self.opened;
        with_counters(self.fallback, |c| {
            add(if opened { &c.wg_opened_bytes } else { &c.wg_sealed_bytes }, bytes as u64)
        });
    }
}

/// Cuts in halves (by count; the packets of a run are mostly alike) down
/// to about [`MIN_HALF_BYTES`], each second half offered with
/// `rayon::join`. With `wait` (the top cut, a helper called for it), this
/// worker, its first half done, waits up to [`WAIT_FOR_HELP`] for the
/// helper to have taken the second (a woken worker needs tens of
/// microseconds to run) before `join` takes it back.
fn halves<A: Send, B: Send, F: Fn(&mut A, &mut B) -> usize + Sync>(
    a: &mut [A],
    b: &mut [B],
    bytes: usize,
    task: &Task<'_, F>,
    wait: bool,
) {
    if a.len() < 2 || !worth_spreading(bytes) {
        return task.run(a, b);
    }
    let mid = a.len() / 2;
    let (a0, a1) = a.split_at_mut(mid);
    let (b0, b1) = b.split_at_mut(mid);
    let half = bytes / 2;
    let taken = AtomicBool::new(false);
    rayon::join(
        || {
            halves(a0, b0, half, task, false);
            let since = Instant::now();
            while wait && !taken.load(Ordering::Acquire) && since.elapsed() < WAIT_FOR_HELP {
                std::thread::yield_now();
            }
        },
        || {
            taken.store(true, Ordering::Release);
            halves(a1, b1, half, task, false)
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn outside_a_pool_everything_runs_here_in_order() {
        let c = WorkerCounters::default();
        let mut a: Vec<usize> = (0..64).collect();
        let mut b = vec![0usize; 64];
        spread(None, 0, &mut a, &mut b, 1 << 20, false, &c, &|x, y| {
            *y = *x * 2;
            10
        });
        assert!(b.iter().enumerate().all(|(i, y)| *y == i * 2));
        assert_eq!(c.wg_sealed_bytes.load(Relaxed), 640);
        assert_eq!(c.wg_opened_bytes.load(Relaxed), 0);
    }

    /// Two pool threads, each a "worker" with its own counters; worker 0
    /// offers long runs while worker 1 only helps: both end up with work,
    /// and every pair is done exactly once.
    #[test]
    fn an_idle_worker_takes_halves_and_counts_them() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let counters: Vec<Arc<WorkerCounters>> = (0..2).map(|_| Arc::new(WorkerCounters::default())).collect();
        let stop = AtomicBool::new(false);
        let done = std::sync::Mutex::new(Vec::new());
        pool.broadcast(|ctx| {
            set_thread_counters(counters[ctx.index()].clone());
            if ctx.index() == 1 {
                while !stop.load(Relaxed) {
                    help(false);
                    std::hint::spin_loop();
                }
                return;
            }
            // Worker 1 never sleeps: no crew to wake it, the halves alone.
            for round in 0..200 {
                let mut a: Vec<u64> = (0..64).map(|i| round * 64 + i).collect();
                let mut b = vec![0u64; 64];
                let f = |x: &mut u64, y: &mut u64| {
                    // About a microsecond of work, as a packet's AEAD.
                    let mut h = *x;
                    for _ in 0..300 {
                        h = h.wrapping_mul(6364136223846793005).wrapping_add(1);
                    }
                    *y = *x + 1;
                    std::hint::black_box(h);
                    1
                };
                halves(&mut a, &mut b, 64 * 1400, &Task { opened: true, fallback: &counters[0], f: &f }, false);
                assert!(a.iter().zip(&b).all(|(x, y)| *y == *x + 1), "every pair done, in place");
                done.lock().unwrap().push(round);
            }
            stop.store(true, Relaxed);
        });
        assert_eq!(done.lock().unwrap().len(), 200);
        let (w0, w1) = (counters[0].wg_opened_bytes.load(Relaxed), counters[1].wg_opened_bytes.load(Relaxed));
        assert_eq!(w0 + w1, 200 * 64, "each pair counted once");
        assert!(w1 > 0, "the idle worker took halves: {w0} / {w1}");
    }
}

//! A fault-injecting UDP relay on loopback, in-process and seeded: the client connects to the
//! relay, the relay forwards each datagram to the server (and back), dropping, duplicating,
//! delaying and reordering them as its [`Faults`] say, or swallowing everything while a
//! blackhole is on. Decisions come from one seeded generator per direction; when a datagram
//! arrives depends on the scheduler, so a run is repeatable in its fault rates, not to the
//! packet.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;

/// What the relay does to every datagram, in each direction alike.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Probability that a datagram is dropped (independently of the others).
    pub loss: f64,
    /// Bursts of loss (Gilbert-Elliott): `(enter, leave)` probabilities per datagram of going
    /// from the good state into a burst, where every datagram is dropped, and back.
    pub burst: Option<(f64, f64)>,
    /// Probability that a datagram is sent twice (the copy after `reorder_hold` at most).
    pub duplicate: f64,
    /// Probability that a datagram is held back by `reorder_hold` (later ones overtake it).
    pub reorder: f64,
    /// How long a reordered datagram is held.
    pub reorder_hold: Duration,
    /// Every datagram is delayed by a uniform random time in `[0, jitter)` (which reorders too).
    pub jitter: Duration,
}

/// What the relay has done so far (both directions).
#[derive(Debug, Default)]
pub struct Stats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub delayed: AtomicU64,
}

struct Shared {
    blackhole: AtomicBool,
    stats: Stats,
}

/// The relay; it stops when dropped.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One direction's fault state: its generator and whether a loss burst is on.
struct Direction {
    rng: StdRng,
    in_burst: bool,
}

impl Direction {
    /// The delays at which to send copies of one datagram (none: dropped).
    fn decide(&mut self, f: &Faults) -> Vec<Duration> {
        if let Some((enter, leave)) = f.burst {
            self.in_burst = if self.in_burst {
                !self.rng.gen_bool(leave)
            } else {
                self.rng.gen_bool(enter)
            };
            if self.in_burst {
                return Vec::new();
            }
        }
        if f.loss > 0.0 && self.rng.gen_bool(f.loss) {
            return Vec::new();
        }
        let mut delay = if f.jitter.is_zero() {
            Duration::ZERO
        } else {
            f.jitter.mul_f64(self.rng.gen::<f64>())
        };
        if f.reorder > 0.0 && self.rng.gen_bool(f.reorder) {
            delay += f.reorder_hold;
        }
        let mut out = vec![delay];
        if f.duplicate > 0.0 && self.rng.gen_bool(f.duplicate) {
            out.push(delay + f.reorder_hold.mul_f64(self.rng.gen::<f64>()));
        }
        out
    }
}

impl Relay {
    /// Starts a relay in front of `server` on loopback.
    pub async fn start(server: SocketAddr, faults: Faults, seed: u64) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let shared = Arc::new(Shared {
            blackhole: AtomicBool::new(false),
            stats: Stats::default(),
        });
        let task = tokio::spawn(run(front, back, server, faults, seed, shared.clone()));
        Relay { addr, shared, task }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Swallows every datagram in both directions while `on`.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// What it has done so far.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }
}

async fn run(
    front: Arc<UdpSocket>,
    back: Arc<UdpSocket>,
    server: SocketAddr,
    faults: Faults,
    seed: u64,
    shared: Arc<Shared>,
) {
    let mut up = Direction {
        rng: StdRng::seed_from_u64(seed),
        in_burst: false,
    };
    let mut down = Direction {
        rng: StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
        in_burst: false,
    };
    // The client's address, learnt from its first datagram (one client per relay).
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    let mut a = vec![0u8; 65_536];
    let mut b = vec![0u8; 65_536];
    loop {
        let (datagram, to, socket, dir) = tokio::select! {
            r = front.recv_from(&mut a) => {
                let Ok((n, from)) = r else { continue };
                *client.lock().unwrap() = Some(from);
                (a[..n].to_vec(), server, back.clone(), &mut up)
            }
            r = back.recv_from(&mut b) => {
                let Ok((n, _)) = r else { continue };
                let Some(to) = *client.lock().unwrap() else { continue };
                (b[..n].to_vec(), to, front.clone(), &mut down)
            }
        };
        let stats = &shared.stats;
        if shared.blackhole.load(Ordering::SeqCst) {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let sends = dir.decide(&faults);
        if sends.is_empty() {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if sends.len() > 1 {
            stats.duplicated.fetch_add(1, Ordering::Relaxed);
        }
        for delay in sends {
            stats.forwarded.fetch_add(1, Ordering::Relaxed);
            if delay.is_zero() {
                let _ = socket.send_to(&datagram, to).await;
            } else {
                stats.delayed.fetch_add(1, Ordering::Relaxed);
                let (socket, datagram, shared) = (socket.clone(), datagram.clone(), shared.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    // A blackhole swallows what it finds in flight too.
                    if !shared.blackhole.load(Ordering::SeqCst) {
                        let _ = socket.send_to(&datagram, to).await;
                    }
                });
            }
        }
    }
}

//! `unimic bench soak`: N concurrent chat sessions, each M turns of text and image parts with
//! context reuse, against one server on loopback; reports messages lost (a turn whose reply is
//! missing, late or not what was sent), turn times, and the server's RSS and CPU.
//!
//! The server runs in a child process (this binary with `--server`), so its RSS and CPU are its
//! own: an echo agent (every reply repeats the turn, so a reply can be checked exactly), the
//! adaptive models for images (the transformers would make this a benchmark of the generic
//! model's CPU time, which `bench codec` measures), default limits and context budget.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use unimic_agents::echo::Echo;
use unimic_chat::{serve_with, Chat, ChatConfig, Prompt, ReplyEvent, ServeOptions};
use unimic_transport::bench::rss_bytes;
use unimic_transport::tls::{CertHash, ServerTls};
use unimic_transport::{Server, ServerConfig, SessionConfig, TokenGrid, TokenizerInfo};

/// Arguments of `unimic bench soak`.
#[derive(clap::Args)]
pub struct Args {
    /// Concurrent sessions.
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// Turns per session (odd turns carry a 16×16 image grid, even ones text).
    #[arg(long, default_value_t = 20)]
    pub turns: usize,
    /// Seconds a single turn may take before it counts as lost.
    #[arg(long, default_value_t = 120)]
    pub turn_timeout: u64,
    /// Times to run the whole soak against the same server (RSS after each round shows whether
    /// memory is reused or grows).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Print one JSON object per round.
    #[arg(long)]
    pub json: bool,
    /// Internal: run the soak server (the benchmark starts it as a child process).
    #[arg(long, hide = true)]
    pub server: bool,
}

/// What a soak run measured.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// 1-based round (runs against the same server).
    pub round: usize,
    /// Sessions asked for.
    pub sessions: usize,
    /// Sessions that connected.
    pub connected: usize,
    /// Turns per session.
    pub turns: usize,
    /// Turns sent.
    pub messages_sent: u64,
    /// Turns whose reply did not come back whole and equal to the turn (or that failed to send).
    pub messages_lost: u64,
    /// Median turn time (send to the reply's end), milliseconds.
    pub turn_p50_ms: f64,
    /// 99th percentile turn time, milliseconds.
    pub turn_p99_ms: f64,
    /// Wall time of the whole run, seconds.
    pub elapsed_s: f64,
    /// Server RSS before any session, bytes (0 where unavailable).
    pub rss_start_bytes: u64,
    /// Server RSS once every session connected.
    pub rss_connected_bytes: u64,
    /// Server RSS when half of the turns were done.
    pub rss_half_bytes: u64,
    /// Server RSS after the last turn (sessions still open).
    pub rss_end_bytes: u64,
    /// Highest server RSS sampled (every 50 ms).
    pub rss_peak_bytes: u64,
    /// Server RSS after every session closed.
    pub rss_closed_bytes: u64,
    /// Server CPU time (user + system) per turn, milliseconds.
    pub server_cpu_ms_per_turn: f64,
}

/// The test tokenizer identity both ends name (the server relays grids; it needs no weights).
fn tokenizer() -> TokenizerInfo {
    TokenizerInfo::image("unimic-soak-grid", [0x5a; 32], 1024, 16)
}

/// The soak server's configuration: echo agent, adaptive models, default limits.
fn server(bind: SocketAddr) -> anyhow::Result<(Server, CertHash)> {
    let tls = ServerTls::self_signed()?;
    let pin = tls.identity.cert_hash();
    let mut config = ServerConfig::new(tls)
        .with_bind(bind)
        .with_session(SessionConfig::default().with_tokenizer(tokenizer()));
    config.max_pending_handshakes = 4096;
    Ok((Server::bind(config)?, pin))
}

/// A turn's image: a 16×16 grid that changes with the session and turn.
fn grid(session: usize, turn: usize) -> TokenGrid {
    let ids = (0..256u32)
        .map(|i| (i * 37 + (session as u32) * 101 + (turn as u32) * 7 + i / 16) % 1024)
        .collect();
    TokenGrid::new(16, 16, 1024, ids).unwrap_or_else(|_| unreachable!())
}

/// One session's turns; returns each turn's time, or `None` for a lost one.
async fn session(
    chat: Chat,
    index: usize,
    turns: usize,
    timeout: Duration,
    done: Arc<AtomicU64>,
) -> Vec<Option<Duration>> {
    let mut times = Vec::with_capacity(turns);
    for t in 0..turns {
        let text = format!("session {index} turn {t}: the quick brown fox jumps over the lazy dog");
        let image = (t % 2 == 1).then(|| grid(index, t));
        let mut prompt = Prompt::text(text.clone());
        if let Some(g) = &image {
            prompt = prompt.with_grid(g.clone());
        }
        let started = Instant::now();
        let outcome = tokio::time::timeout(timeout, async {
            let mut reply = chat.send(prompt).await.ok()?;
            let (mut got_text, mut got_image, mut ended) = (String::new(), None, false);
            while let Some(ev) = reply.next().await {
                match ev.ok()? {
                    ReplyEvent::Text(d) => got_text.push_str(&d),
                    ReplyEvent::Image(g) => got_image = Some(g),
                    ReplyEvent::End(_) => ended = true,
                    _ => {}
                }
            }
            (ended && got_text == text && got_image == image).then_some(())
        })
        .await;
        times.push(matches!(outcome, Ok(Some(()))).then(|| started.elapsed()));
        done.fetch_add(1, Ordering::Relaxed);
    }
    chat.close(Duration::from_secs(2)).await;
    times
}

/// Reads a process's user + system CPU time (`/proc/PID/stat`), in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    // Linux reports clock ticks of 1/100 s (USER_HZ) on every mainstream configuration.
    Some((utime + stime) / 100.0)
}

/// Runs the client side against a server at `addr` (process `server_pid` when known, for RSS
/// and CPU).
pub async fn soak(
    addr: SocketAddr,
    pin: CertHash,
    sessions: usize,
    turns: usize,
    turn_timeout: Duration,
    server_pid: Option<u32>,
) -> anyhow::Result<SoakReport> {
    let rss = move || server_pid.and_then(|p| rss_bytes(Some(p))).unwrap_or(0);
    let rss_start = rss();
    let cpu_start = server_pid.and_then(cpu_seconds);
    let peak = Arc::new(AtomicU64::new(rss_start));
    let sampler = {
        let peak = Arc::clone(&peak);
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let started = Instant::now();
    // Connect every session (at most 64 handshakes at a time).
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut connecting = tokio::task::JoinSet::new();
    for i in 0..sessions {
        let gate = Arc::clone(&gate);
        connecting.spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            let config = ChatConfig::pinned(pin).with_image_tokenizer(tokenizer());
            Chat::connect(addr, config).await.ok().map(|c| (i, c))
        });
    }
    let mut chats = Vec::with_capacity(sessions);
    while let Some(r) = connecting.join_next().await {
        if let Ok(Some(c)) = r {
            chats.push(c);
        }
    }
    let connected = chats.len();
    let rss_connected = rss();
    let done = Arc::new(AtomicU64::new(0));
    let total = (connected * turns) as u64;
    let half = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            while done.load(Ordering::Relaxed) < total / 2 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            rss()
        })
    };
    let mut running = tokio::task::JoinSet::new();
    for (i, chat) in chats {
        running.spawn(session(chat, i, turns, turn_timeout, Arc::clone(&done)));
    }
    let mut times = Vec::new();
    let mut lost = ((sessions - connected) * turns) as u64;
    let mut rss_end = 0;
    let mut remaining = running.len();
    while let Some(r) = running.join_next().await {
        remaining -= 1;
        for t in r.unwrap_or_default() {
            match t {
                Some(d) => times.push(d),
                None => lost += 1,
            }
        }
        if remaining == 0 {
            rss_end = rss();
        }
    }
    let rss_half = half.await.unwrap_or(0);
    // The sessions closed as they finished; give the server a moment to drop them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_closed = rss();
    sampler.abort();
    let cpu = match (cpu_start, server_pid.and_then(cpu_seconds)) {
        (Some(a), Some(b)) => (b - a) * 1e3 / (total.max(1)) as f64,
        _ => 0.0,
    };
    times.sort();
    let pct = |p: f64| {
        times
            .get(((times.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Ok(SoakReport {
        round: 1,
        sessions,
        connected,
        turns,
        messages_sent: (sessions * turns) as u64,
        messages_lost: lost,
        turn_p50_ms: pct(0.5),
        turn_p99_ms: pct(0.99),
        elapsed_s: started.elapsed().as_secs_f64(),
        rss_start_bytes: rss_start,
        rss_connected_bytes: rss_connected,
        rss_half_bytes: rss_half,
        rss_end_bytes: rss_end,
        rss_peak_bytes: peak.load(Ordering::Relaxed),
        rss_closed_bytes: rss_closed,
        server_cpu_ms_per_turn: cpu,
    })
}

/// Runs the benchmark (or, with `--server`, its server).
pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if args.server {
        return rt.block_on(async {
            let (server, pin) = server("127.0.0.1:0".parse()?)?;
            println!("{} {pin}", server.local_addr()?);
            serve_with(server, Arc::new(Echo), ServeOptions::default()).await;
            Ok(())
        });
    }
    let (mut child, addr, pin) =
        crate::bench_transport::start_child_server(&["bench", "soak", "--server"], "soak server")?;
    let result = rt.block_on(async {
        let mut reports = Vec::new();
        for round in 1..=args.rounds.max(1) {
            let mut r = soak(
                addr,
                pin,
                args.sessions,
                args.turns,
                Duration::from_secs(args.turn_timeout.max(1)),
                Some(child.id()),
            )
            .await?;
            r.round = round;
            print(&r, args.json)?;
            reports.push(r);
        }
        Ok::<_, anyhow::Error>(reports)
    });
    let _ = child.kill();
    let _ = child.wait();
    result.map(|_| ())
}

fn print(r: &SoakReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "round {}: {} sessions ({} connected) × {} turns: {} sent, {} lost; turn p50 {:.1} ms, p99 {:.1} ms; {:.1} s",
        r.round, r.sessions, r.connected, r.turns, r.messages_sent, r.messages_lost, r.turn_p50_ms,
        r.turn_p99_ms, r.elapsed_s
    );
    println!(
        "  server RSS: start {:.1} MiB, connected {:.1}, half {:.1}, end {:.1}, peak {:.1}, after close {:.1}; CPU {:.2} ms per turn",
        mib(r.rss_start_bytes),
        mib(r.rss_connected_bytes),
        mib(r.rss_half_bytes),
        mib(r.rss_end_bytes),
        mib(r.rss_peak_bytes),
        mib(r.rss_closed_bytes),
        r.server_cpu_ms_per_turn
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_soak_loses_nothing() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let r = rt
            .block_on(async {
                let (server, pin) = server("127.0.0.1:0".parse().unwrap())?;
                let addr = server.local_addr()?;
                tokio::spawn(serve_with(server, Arc::new(Echo), ServeOptions::default()));
                soak(addr, pin, 12, 6, Duration::from_secs(60), None).await
            })
            .unwrap();
        assert_eq!(r.connected, 12);
        assert_eq!(r.messages_sent, 72);
        assert_eq!(r.messages_lost, 0, "{r:?}");
        assert!(r.turn_p50_ms > 0.0 && r.turn_p99_ms >= r.turn_p50_ms);
    }
}

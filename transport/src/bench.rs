//! The transport benchmark behind `unimic bench transport` (feature `bench`).
//!
//! On loopback, in one run, for a small text turn and two image-sized turns, it measures the
//! round trip of one turn (request and reply) and the turn throughput of:
//! - `unimic`, `coding: "tokens"`: the caller hands tokens, the session entropy-codes them, the
//!   server's session decodes them and an echo agent replies with the same tokens, coded again;
//!   the round trip ends when the client has decoded the reply;
//! - `unimic`, `coding: "precoded"`: the same session path carrying the coded bytes of the turn
//!   as a raw part (framing, streams, acknowledgements; no entropy coding in the loop);
//! - `quinn-echo`: a plain quinn bidirectional stream echoing the same bytes;
//! - `http-json`: HTTP/1.1 (axum server, reqwest client) with a JSON body carrying the same
//!   bytes in base64, echoed back.
//!
//! Latency turns of the byte transports (`precoded`, `quinn-echo`, `http-json`) are
//! interleaved: each round runs one turn of each, in an order that changes every round, so that
//! on a shared machine all of them see the same load and none always follows the same other;
//! the `tokens` turns run after those of every payload. Replies carry the request id in a small
//! raw first part, and the waiting turn reads its reply itself (no router task in between).
//! Everything runs in a task spawned on the runtime (see [`run`]).
//!
//! Alone (byte transports): after the interleaved rounds, each byte transport runs alone (at
//! least `turns` turns and 250 ms). Those turns give `rtt_us_p50_alone` and, on Linux, the CPU
//! time and context switches of every thread of the process per turn; the `tokens` line counts
//! its measured turns (and more up to 250 ms). Both ends run in this process, so these are the
//! costs of client and server together. The round trip on an idle machine is dominated by
//! waking sleeping threads (each context switch there costs tens of microseconds), so compare
//! `cpu_us_per_turn`, `ctx_switches_per_turn` and the alone ratio too when the interleaved RTT
//! ratios move between runs.
//!
//! Payloads: `text` (a prompt tokenized with o200k_base), `grid256` and `grid512` (token grids of
//! 256×256 and 512×512 cells, codebook 1024, with smooth regions, coded with the adaptive grid
//! model). The idle-session measurement (sessions one server holds, RSS per session) lives in
//! [`idle_sessions`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;
use thiserror::Error;
use unimic_codec::context::SessionContext;
use unimic_codec::grid::TokenGrid;
use unimic_codec::part::{PartCodec, PartSpec, PartTokens};
use unimic_codec::text::{O200k, TextTokenizer};

use crate::message::{OutgoingMessage, OutgoingPart, PartContent, ReceivedPart};
use crate::tls::{ClientTls, ServerTls};
use crate::{
    Client, ClientConfig, Limits, MessageStats, Role, Server, ServerConfig, Session, SessionConfig,
    TokenizerInfo,
};

/// Codebook size of the synthetic grids.
pub const GRID_CODEBOOK: u32 = 1024;

/// Why the benchmark failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BenchError {
    /// Setting up an endpoint failed.
    #[error(transparent)]
    Endpoint(#[from] crate::EndpointError),
    /// Connecting failed.
    #[error(transparent)]
    Connect(#[from] crate::ConnectError),
    /// Sending failed.
    #[error(transparent)]
    Send(#[from] crate::SendError),
    /// Receiving failed.
    #[error(transparent)]
    Recv(#[from] crate::RecvError),
    /// The session ended.
    #[error(transparent)]
    Session(#[from] crate::SessionError),
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A baseline failed (quinn echo, HTTP).
    #[error("{0}")]
    Baseline(String),
    /// Something else (a task panicked, an echo differed).
    #[error("{0}")]
    Other(String),
}

fn other(e: impl std::fmt::Display) -> BenchError {
    BenchError::Baseline(e.to_string())
}

fn ctx<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> BenchError {
    move |e| BenchError::Baseline(format!("{what}: {e}"))
}

/// What to run.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BenchConfig {
    /// Sequential turns per payload for the latency percentiles (after `warmup`).
    pub turns: usize,
    /// Warm-up turns, not measured.
    pub warmup: usize,
    /// Concurrent turns in flight for the throughput measurement.
    pub concurrency: usize,
    /// Turns per worker in the throughput measurement.
    pub throughput_turns: usize,
    /// Payloads to run (`"text"`, `"grid256"`, `"grid512"`).
    pub payloads: Vec<String>,
    /// Sequential turns for the grid payloads (whose coding is slow); throughput for grids runs
    /// one turn per worker.
    pub grid_turns: usize,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            turns: 100,
            warmup: 5,
            concurrency: 8,
            throughput_turns: 10,
            payloads: vec!["text".into(), "grid256".into(), "grid512".into()],
            grid_turns: 10,
        }
    }
}

impl BenchConfig {
    /// A quick configuration (for tests).
    pub fn quick() -> Self {
        Self {
            turns: 5,
            warmup: 1,
            concurrency: 2,
            throughput_turns: 2,
            payloads: vec!["text".into(), "grid256".into()],
            grid_turns: 2,
        }
    }
}

/// One JSON line of the benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// `"unimic"`, `"quinn-echo"` or `"http-json"`.
    pub transport: &'static str,
    /// `"text"`, `"grid256"` or `"grid512"`.
    pub payload: String,
    /// For `unimic`: `"tokens"` (entropy coding in the loop) or `"precoded"`; else `"bytes"`.
    pub coding: &'static str,
    /// Tokens in the turn's request.
    pub tokens: u64,
    /// Bytes of content one way: the coded payload (the same for every transport).
    pub payload_bytes: u64,
    /// Bytes one way at the application layer: unimic frames on the message stream, the echoed
    /// bytes for quinn, the JSON body for HTTP (headers not counted).
    pub wire_bytes: u64,
    /// Median round trip of one turn, microseconds.
    pub rtt_us_p50: f64,
    /// 99th percentile round trip, microseconds.
    pub rtt_us_p99: f64,
    /// Mean round trip, microseconds.
    pub rtt_us_mean: f64,
    /// Request messages (turns) completed per second with `concurrency` turns in flight.
    pub msgs_per_s: f64,
    /// The entropy model (`"adaptive"` for unimic with tokens, else `"none"`).
    pub model: &'static str,
    /// Turns in flight during the throughput measurement.
    pub concurrency: usize,
    /// Measured sequential turns.
    pub turns: usize,
    /// Payload bits per token (unimic with tokens only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits_per_token: Option<f64>,
    /// `rtt_us_p50` over the quinn echo's for the same payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_p50_vs_quinn_echo: Option<f64>,
    /// CPU time per turn, microseconds, summed over every thread of this process (so both
    /// ends: the client and its server run here), over turns of this transport alone: at least
    /// `turns` of them and at least 250 ms (Linux: `/proc/self/task/*/schedstat`, which lags by
    /// up to a scheduler tick; absent elsewhere). For the `tokens` line, its measured turns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_turn: Option<f64>,
    /// Thread context switches (voluntary and not) per turn over the same turns: how often a
    /// turn put a thread to sleep and woke it, which on an idle machine costs more wall time
    /// than the work itself (Linux only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctx_switches_per_turn: Option<f64>,
    /// Median round trip of the turns that measured `cpu_us_per_turn` (this transport alone,
    /// one turn after another), microseconds; byte transports only. `rtt_us_p50` comes from
    /// interleaved rounds, which share any load fairly; this one shows each transport's own
    /// rhythm (on an idle machine, whether the threads it needs are still awake).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_us_p50_alone: Option<f64>,
    /// `rtt_us_p50_alone` over the quinn echo's for the same payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_alone_vs_quinn_echo: Option<f64>,
}

/// CPU time and context switches of this process so far, summed over its threads (Linux).
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    cpu_us: f64,
    switches: f64,
}

impl CpuSample {
    fn now() -> Option<Self> {
        let mut sample = CpuSample {
            cpu_us: 0.0,
            switches: 0.0,
        };
        for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let dir = task.path();
            // A thread may end between the listing and the reads: skip it.
            if let Ok(stat) = std::fs::read_to_string(dir.join("schedstat")) {
                let ns: f64 = stat.split_whitespace().next()?.parse().ok()?;
                sample.cpu_us += ns / 1e3;
            }
            if let Ok(status) = std::fs::read_to_string(dir.join("status")) {
                for line in status.lines() {
                    if line.starts_with("voluntary_ctxt_switches")
                        || line.starts_with("nonvoluntary_ctxt_switches")
                    {
                        let n: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
                        sample.switches += n;
                    }
                }
            }
        }
        Some(sample)
    }

    /// `(cpu µs, switches)` per turn from `self` to `later` over `turns` turns.
    fn per_turn(self, later: Option<Self>, turns: usize) -> (Option<f64>, Option<f64>) {
        let Some(later) = later else {
            return (None, None);
        };
        let n = turns.max(1) as f64;
        (
            Some((later.cpu_us - self.cpu_us) / n),
            Some((later.switches - self.switches) / n),
        )
    }
}

/// Shortest span the CPU counters are read over: the kernel brings a running thread's CPU time
/// up to date only at scheduler ticks (every 1–10 ms), so short spans would misread.
const CPU_SPAN: Duration = Duration::from_millis(250);

/// What a transport costs when its turns run alone, one after another.
#[derive(Debug, Clone, Copy, Default)]
struct Alone {
    /// CPU µs per turn (Linux).
    cpu_us: Option<f64>,
    /// Context switches per turn (Linux).
    switches: Option<f64>,
    /// Median round trip of those turns, µs.
    rtt_us_p50: f64,
}

/// Runs `turn` alone, at least `turns` times and for at least [`CPU_SPAN`], and measures the
/// CPU time and context switches per turn and the median round trip.
async fn alone<F, Fut>(turns: usize, turn: F) -> Result<Alone, BenchError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), BenchError>>,
{
    let before = CpuSample::now();
    let start = Instant::now();
    let mut rtts = Vec::new();
    while rtts.len() < turns.max(1) || start.elapsed() < CPU_SPAN {
        let t = Instant::now();
        turn().await?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (cpu_us, switches) = match before {
        Some(b) => b.per_turn(CpuSample::now(), rtts.len()),
        None => (None, None),
    };
    Ok(Alone {
        cpu_us,
        switches,
        rtt_us_p50: timing(rtts).p50,
    })
}

/// The result of the idle-session measurement.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// Always `"idle-sessions"`.
    pub measurement: &'static str,
    /// Sessions opened and held at once.
    pub sessions: usize,
    /// Sessions the server reported established.
    pub established: usize,
    /// What the RSS numbers cover.
    pub scope: &'static str,
    /// Resident set size before opening the sessions, bytes.
    pub rss_before_bytes: u64,
    /// Resident set size with every session open, bytes.
    pub rss_after_bytes: u64,
    /// (after - before) / sessions, bytes.
    pub rss_per_session_bytes: f64,
    /// Seconds to open them all.
    pub open_seconds: f64,
}

/// A payload: the request tokens and the coded bytes of the request message.
struct Payload {
    name: String,
    part: OutgoingPart,
    tokens: u64,
}

/// Deterministic smooth-region grid (regions of 16×16 cells drawn from a small palette, plus
/// sparse noise), so that adaptive coding has structure to find, as real VQ grids do.
pub fn synthetic_grid(side: u32) -> Result<TokenGrid, BenchError> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let palette: Vec<u32> = (0..64)
        .map(|_| (next() % u64::from(GRID_CODEBOOK)) as u32)
        .collect();
    let mut ids = Vec::with_capacity((side * side) as usize);
    for y in 0..side {
        for x in 0..side {
            let region = ((y / 16) * 7 + (x / 16) * 3) as usize % palette.len();
            let r = next();
            let id = if r % 8 == 0 {
                (r >> 8) as u32 % GRID_CODEBOOK
            } else {
                palette[(region + (r % 3) as usize) % palette.len()]
            };
            ids.push(id);
        }
    }
    TokenGrid::new(side, side, GRID_CODEBOOK, ids).map_err(|e| BenchError::Other(e.to_string()))
}

/// The text prompt of the `text` payload.
pub const PROMPT: &str =
    "Look at this photo from my phone: is the dog on the beach running toward \
the camera or away from it, and what colour is its collar? Answer in one short sentence.";

fn payload(name: &str) -> Result<Payload, BenchError> {
    match name {
        "text" => {
            let ids = O200k::new().encode(PROMPT);
            let tokens = ids.len() as u64;
            Ok(Payload {
                name: name.into(),
                part: OutgoingPart::text(ids),
                tokens,
            })
        }
        "grid256" | "grid512" => {
            let side = if name == "grid256" { 256 } else { 512 };
            let grid = synthetic_grid(side)?;
            Ok(Payload {
                name: name.into(),
                part: OutgoingPart::image(grid).with_chunk_tokens(16_384),
                tokens: u64::from(side) * u64::from(side),
            })
        }
        other => Err(BenchError::Other(format!("unknown payload {other}"))),
    }
}

fn image_tokenizer() -> TokenizerInfo {
    TokenizerInfo::image("bench-vq", [0x42; 32], GRID_CODEBOOK, 16)
}

/// Session settings for the benchmark: 512×512 grids allowed, 64 MiB messages.
pub fn bench_session() -> SessionConfig {
    let limits = Limits {
        max_grid_height: 512u32.into(),
        max_grid_width: 512u32.into(),
        max_context_bytes: (64u32 << 20).into(),
        ..Limits::default()
    };
    SessionConfig::default()
        .with_limits(limits)
        .with_tokenizer(image_tokenizer())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

struct Timing {
    p50: f64,
    p99: f64,
    mean: f64,
}

fn timing(mut samples: Vec<f64>) -> Timing {
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    Timing {
        p50: percentile(&samples, 50.0),
        p99: percentile(&samples, 99.0),
        mean,
    }
}

/// The orders in which a latency round runs the byte transports (0 `precoded`, 1 `quinn-echo`,
/// 2 `http-json`): every permutation, so each transport runs first, second and last, and after
/// each other one, equally often.
const ROUND_ORDERS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [1, 2, 0],
    [2, 0, 1],
    [0, 2, 1],
    [2, 1, 0],
    [1, 0, 2],
];

/// Runs every transport for every payload; returns one row per (transport, coding, payload).
///
/// The turns run in a task spawned on the runtime, as an application's session code would:
/// driven from `block_on`'s own thread instead, every wake-up (of a QUIC driver, of a session
/// task) would cross threads and roughly double every transport's round trip.
pub async fn run(config: &BenchConfig) -> Result<Vec<BenchRow>, BenchError> {
    tokio::spawn(run_spawned(config.clone()))
        .await
        .map_err(|e| BenchError::Other(format!("bench task: {e}")))?
}

async fn run_spawned(config: BenchConfig) -> Result<Vec<BenchRow>, BenchError> {
    let config = &config;
    let tls = ServerTls::self_signed()?;
    let pin = tls.identity.cert_hash();
    let mut server = Server::bind(ServerConfig::new(tls.clone()).with_session(bench_session()))?;
    let addr = server.local_addr().map_err(other)?;
    let client =
        Client::new(ClientConfig::new(ClientTls::pinned(pin)).with_session(bench_session()))?;
    let (session, accepted) = tokio::join!(client.connect(addr, "localhost"), server.accept());
    let session = Arc::new(session?);
    let peer = accepted.ok_or_else(|| BenchError::Other("server closed".into()))?;
    let echo = tokio::spawn(echo_agent(peer));
    let replies = Arc::new(ReplyRouter::default());

    let quinn_addr = quinn_echo_server(&tls)?;
    let quinn_client = quinn_echo_client(pin)?;
    let quinn_conn = quinn_client
        .connect(quinn_addr.0, "localhost")
        .map_err(ctx("quinn echo connect"))?
        .await
        .map_err(ctx("quinn echo connection"))?;
    let (http_addr, http_task) = http_server().await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .map_err(other)?;

    // Two passes: first the byte transports for every payload, then the turns with tokens coded
    // in the loop. Coding a grid keeps both cores busy for a long time (the QUIC RTT estimate
    // of the unimic connection grows meanwhile), which would disturb the turns right after it.
    let mut per_payload: Vec<Vec<BenchRow>> = vec![Vec::new(); config.payloads.len()];
    for tokens_pass in [false, true] {
        for (k, name) in config.payloads.iter().enumerate() {
            let p = payload(name)?;
            // Coding a whole grid takes far longer than a text turn: fewer turns for grids.
            let config = &if name.starts_with("grid") {
                BenchConfig {
                    turns: config.grid_turns.max(1),
                    warmup: config.warmup.min(1),
                    throughput_turns: 1,
                    ..config.clone()
                }
            } else {
                config.clone()
            };
            let row = |transport, coding, model, payload_bytes, wire_bytes, rtts, tput| {
                let t = timing(rtts);
                BenchRow {
                    transport,
                    payload: p.name.clone(),
                    coding,
                    model,
                    tokens: p.tokens,
                    payload_bytes,
                    wire_bytes,
                    rtt_us_p50: t.p50,
                    rtt_us_p99: t.p99,
                    rtt_us_mean: t.mean,
                    msgs_per_s: tput,
                    concurrency: config.concurrency,
                    turns: config.turns,
                    bits_per_token: None,
                    rtt_p50_vs_quinn_echo: None,
                    cpu_us_per_turn: None,
                    ctx_switches_per_turn: None,
                    rtt_us_p50_alone: None,
                    rtt_alone_vs_quinn_echo: None,
                }
            };
            let rounds = config.warmup + config.turns;
            if tokens_pass {
                let mut rtts = Vec::with_capacity(rounds);
                let mut stats = MessageStats::default();
                let mut before = None;
                let mut since = Instant::now();
                for i in 0..rounds {
                    if i == config.warmup {
                        (before, since) = (CpuSample::now(), Instant::now());
                    }
                    let t = Instant::now();
                    stats = unimic_turn(&session, &replies, &p.part).await?;
                    if i >= config.warmup {
                        rtts.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                }
                // The CPU counters need a long enough span (see CPU_SPAN).
                let mut counted = config.turns;
                while since.elapsed() < CPU_SPAN {
                    unimic_turn(&session, &replies, &p.part).await?;
                    counted += 1;
                }
                let cpu = before.map_or((None, None), |b| b.per_turn(CpuSample::now(), counted));
                let tput = throughput(config, || {
                    let (session, replies, part) =
                        (session.clone(), replies.clone(), p.part.clone());
                    async move { unimic_turn(&session, &replies, &part).await.map(|_| ()) }
                })
                .await?;
                let mut r = row(
                    "unimic",
                    "tokens",
                    "adaptive",
                    stats.payload_bytes,
                    stats.wire_bytes,
                    rtts,
                    tput,
                );
                r.bits_per_token = stats.bits_per_token();
                (r.cpu_us_per_turn, r.ctx_switches_per_turn) = cpu;
                per_payload[k].insert(0, r);
                continue;
            }

            let coded = coded_bytes(&p)?;
            let raw = OutgoingPart::raw("application/x-unimic-coded", coded.clone());
            let body = http_body(&coded);
            // Latency: the three byte transports take turns, one turn each per round, so that
            // all of them see the same load on a shared machine (a phase per transport would
            // not).
            let mut rtts: [Vec<f64>; 3] = std::array::from_fn(|_| Vec::with_capacity(rounds));
            let mut raw_stats = MessageStats::default();
            for i in 0..rounds {
                let mut took = [0.0; 3];
                // The order changes every round (all six orders in turn), so that no transport
                // always follows the same one (whose leftover work, such as HTTP connection
                // bookkeeping, would land on the next turn).
                for &which in &ROUND_ORDERS[i % ROUND_ORDERS.len()] {
                    let t = Instant::now();
                    match which {
                        0 => raw_stats = unimic_turn(&session, &replies, &raw).await?,
                        1 => quinn_turn(&quinn_conn, &coded).await?,
                        _ => http_turn(&http, http_addr, &body, &coded).await?,
                    }
                    took[which] = t.elapsed().as_secs_f64() * 1e6;
                }
                if i >= config.warmup {
                    for (all, one) in rtts.iter_mut().zip(took) {
                        all.push(one);
                    }
                }
            }
            let [raw_rtts, quinn_rtts, http_rtts] = rtts;
            // CPU per turn and the round trip alone: each transport alone (interleaved turns
            // cannot be told apart).
            let raw_alone = alone(config.turns, || async {
                unimic_turn(&session, &replies, &raw).await.map(|_| ())
            })
            .await?;
            let quinn_alone = alone(config.turns, || quinn_turn(&quinn_conn, &coded)).await?;
            let http_alone =
                alone(config.turns, || http_turn(&http, http_addr, &body, &coded)).await?;
            // Throughput: each transport alone.
            let raw_tput = throughput(config, || {
                let (session, replies, part) = (session.clone(), replies.clone(), raw.clone());
                async move { unimic_turn(&session, &replies, &part).await.map(|_| ()) }
            })
            .await?;
            let quinn_tput = throughput(config, || {
                let (conn, bytes) = (quinn_conn.clone(), coded.clone());
                async move { quinn_turn(&conn, &bytes).await }
            })
            .await?;
            let http_tput = throughput(config, || {
                let (http, body, coded) = (http.clone(), body.clone(), coded.clone());
                async move { http_turn(&http, http_addr, &body, &coded).await }
            })
            .await?;
            let n = coded.len() as u64;
            let mut rows = [
                row(
                    "unimic",
                    "precoded",
                    "none",
                    n,
                    raw_stats.wire_bytes,
                    raw_rtts,
                    raw_tput,
                ),
                row("quinn-echo", "bytes", "none", n, n, quinn_rtts, quinn_tput),
                row(
                    "http-json",
                    "bytes",
                    "none",
                    n,
                    body.len() as u64,
                    http_rtts,
                    http_tput,
                ),
            ];
            for (r, a) in rows.iter_mut().zip([raw_alone, quinn_alone, http_alone]) {
                (r.cpu_us_per_turn, r.ctx_switches_per_turn) = (a.cpu_us, a.switches);
                r.rtt_us_p50_alone = Some(a.rtt_us_p50);
            }
            per_payload[k].extend(rows);
        }
    }
    let mut rows = Vec::new();
    for mut group in per_payload {
        let quinn_p50 = group
            .iter()
            .find(|r| r.transport == "quinn-echo")
            .map_or(0.0, |r| r.rtt_us_p50);
        if quinn_p50 > 0.0 {
            for r in &mut group {
                r.rtt_p50_vs_quinn_echo = Some(r.rtt_us_p50 / quinn_p50);
            }
        }
        let quinn_alone = group
            .iter()
            .find(|r| r.transport == "quinn-echo")
            .and_then(|r| r.rtt_us_p50_alone);
        if let Some(q) = quinn_alone.filter(|&q| q > 0.0) {
            for r in &mut group {
                r.rtt_alone_vs_quinn_echo = r.rtt_us_p50_alone.map(|x| x / q);
            }
        }
        rows.extend(group);
    }

    echo.abort();
    http_task.abort();
    quinn_conn.close(0u32.into(), b"done");
    quinn_addr.1.close(0u32.into(), b"done");
    server.close();
    Ok(rows)
}

/// Runs `concurrency` workers of `throughput_turns` turns each; returns turns per second.
async fn throughput<F, Fut>(config: &BenchConfig, make: F) -> Result<f64, BenchError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), BenchError>> + Send + 'static,
{
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency.max(1) {
        let turns: Vec<Fut> = (0..config.throughput_turns).map(|_| make()).collect();
        set.spawn(async move {
            for t in turns {
                t.await?;
            }
            Ok::<(), BenchError>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| BenchError::Other(e.to_string()))??;
    }
    let total = (config.concurrency.max(1) * config.throughput_turns) as f64;
    Ok(total / start.elapsed().as_secs_f64().max(1e-9))
}

/// Replies arrive on the client's one `recv`. There is no router task: a turn waiting for its
/// reply takes the reader lock, looks whether another turn already read its reply, and otherwise
/// reads the next message itself (stashing it if it is someone else's). A lone turn thus reads its
/// reply directly, as an application doing one turn at a time does, with no task in between.
#[derive(Default)]
struct ReplyRouter {
    /// Replies read by a turn other than the one waiting for them, by request id.
    early: std::sync::Mutex<std::collections::HashMap<u64, Vec<ReceivedPart>>>,
    /// Held by the turn that is reading from the session.
    reader: tokio::sync::Mutex<()>,
}

/// Media type of the part that names the request a reply answers (8 bytes, little-endian id).
const REPLY_TO: &str = "application/x-unimic-bench-reply-to";

impl ReplyRouter {
    fn take_early(&self, id: u64) -> Option<Vec<ReceivedPart>> {
        self.early
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
    }

    /// Waits for the reply to request `id`.
    async fn reply(&self, session: &Session, id: u64) -> Result<Vec<ReceivedPart>, BenchError> {
        loop {
            let _reading = self.reader.lock().await;
            if let Some(parts) = self.take_early(id) {
                return Ok(parts);
            }
            let msg = session
                .recv()
                .await?
                .ok_or_else(|| BenchError::Other("session ended".into()))?;
            let got = msg.collect().await?;
            let mut parts = got.parts.into_iter();
            let request = match parts.next() {
                Some(ReceivedPart::Raw { media_type, bytes })
                    if media_type == REPLY_TO && bytes.len() == 8 =>
                {
                    let mut le = [0u8; 8];
                    le.copy_from_slice(&bytes);
                    u64::from_le_bytes(le)
                }
                _ => return Err(BenchError::Other("reply without its request id".into())),
            };
            let rest: Vec<ReceivedPart> = parts.collect();
            if request == id {
                return Ok(rest);
            }
            self.early
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(request, rest);
        }
    }
}

/// One turn: send the request, wait for its reply. Returns the request's statistics.
async fn unimic_turn(
    session: &Session,
    router: &ReplyRouter,
    part: &OutgoingPart,
) -> Result<MessageStats, BenchError> {
    let stats = session
        .send(OutgoingMessage::new(Role::User).with_part(part.clone()))
        .await?;
    let id = stats.message_id;
    let parts = tokio::time::timeout(Duration::from_secs(60), router.reply(session, id))
        .await
        .map_err(|_| BenchError::Other("reply timed out".into()))??;
    check_echo(part, &parts)?;
    Ok(stats)
}

fn check_echo(sent: &OutgoingPart, got: &[ReceivedPart]) -> Result<(), BenchError> {
    let ok = match (&sent.content, got.first()) {
        (PartContent::Text(a), Some(ReceivedPart::Text(b))) => a == b,
        (PartContent::Image(a), Some(ReceivedPart::Image(b))) => a == b,
        (PartContent::Raw { bytes: a, .. }, Some(ReceivedPart::Raw { bytes: b, .. })) => a == b,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(BenchError::Other("echo differs from the request".into()))
    }
}

/// Echoes every message: replies with the request id (a raw part of 8 bytes, see [`REPLY_TO`]),
/// then the same parts, coded again.
async fn echo_agent(session: Session) {
    while let Ok(Some(msg)) = session.recv().await {
        let id = msg.message_id();
        let Ok(got) = msg.collect().await else {
            continue;
        };
        let tag = Bytes::copy_from_slice(&id.to_le_bytes());
        let mut reply =
            OutgoingMessage::new(Role::Assistant).with_part(OutgoingPart::raw(REPLY_TO, tag));
        for p in got.parts {
            let part = match p {
                ReceivedPart::Text(ids) => OutgoingPart::text(ids),
                ReceivedPart::Image(g) => OutgoingPart::image(g).with_chunk_tokens(16_384),
                ReceivedPart::Raw { media_type, bytes } => OutgoingPart::raw(media_type, bytes),
                // The benchmark sends no quality ladders; a refinement is not echoed.
                ReceivedPart::Refinement { .. } => continue,
            };
            reply = reply.with_part(part);
        }
        if let Err(e) = session.send(reply).await {
            tracing::warn!(error = %e, "echo reply failed");
        }
    }
}

/// The coded bytes of the payload's request part (all chunk payloads concatenated), coded as
/// the session codes it (no context references, same chunking).
fn coded_bytes(p: &Payload) -> Result<Bytes, BenchError> {
    let mut codec = PartCodec::new(bench_session().codec);
    let ctx = SessionContext::new(0);
    let tokens = match &p.part.content {
        PartContent::Text(ids) => PartTokens::Text(ids),
        PartContent::Image(g) => PartTokens::Grid(g),
        PartContent::Raw { bytes, .. } => return Ok(bytes.clone()),
    };
    let mut spec = PartSpec::new(p.part.model);
    if let Some(c) = p.part.chunk_tokens {
        spec = spec.with_chunk_tokens(c);
    }
    let coded = codec
        .encode(&ctx, tokens, &spec)
        .map_err(|e| BenchError::Other(e.to_string()))?;
    Ok(coded
        .chunks
        .iter()
        .flat_map(|c| c.payload.iter().copied())
        .collect::<Vec<u8>>()
        .into())
}

fn quinn_echo_server(tls: &ServerTls) -> Result<(SocketAddr, quinn::Endpoint), BenchError> {
    let crypto = tls.quic_config()?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window((1u32 << 20).into());
    transport.receive_window((8u32 << 20).into());
    cfg.transport_config(Arc::new(transport));
    let endpoint =
        quinn::Endpoint::server(cfg, SocketAddr::from(([127, 0, 0, 1], 0))).map_err(other)?;
    let addr = endpoint.local_addr().map_err(other)?;
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        if let Ok(data) = recv.read_to_end(usize::MAX).await {
                            let _ = send.write_all(&data).await;
                            let _ = send.finish();
                        }
                    });
                }
            });
        }
    });
    Ok((addr, endpoint))
}

fn quinn_echo_client(pin: crate::tls::CertHash) -> Result<quinn::Endpoint, BenchError> {
    let crypto = ClientTls::pinned(pin).quic_config()?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // The same keep-alive as unimic sessions: slow coded turns elsewhere must not idle it out.
    transport.keep_alive_interval(Some(Duration::from_secs(10)));
    transport.stream_receive_window((1u32 << 20).into());
    transport.receive_window((8u32 << 20).into());
    cfg.transport_config(Arc::new(transport));
    let mut endpoint =
        quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).map_err(other)?;
    endpoint.set_default_client_config(cfg);
    Ok(endpoint)
}

async fn quinn_turn(conn: &quinn::Connection, bytes: &Bytes) -> Result<(), BenchError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(ctx("quinn echo open"))?;
    send.write_all(bytes)
        .await
        .map_err(ctx("quinn echo write"))?;
    send.finish().map_err(ctx("quinn echo finish"))?;
    let back = recv
        .read_to_end(usize::MAX)
        .await
        .map_err(ctx("quinn echo read"))?;
    if back.len() != bytes.len() {
        return Err(BenchError::Baseline("quinn echo length differs".into()));
    }
    Ok(())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct JsonTurn {
    role: String,
    parts: Vec<JsonPart>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct JsonPart {
    kind: String,
    data: String,
}

fn http_body(coded: &Bytes) -> Bytes {
    let turn = JsonTurn {
        role: "user".into(),
        parts: vec![JsonPart {
            kind: "coded".into(),
            data: base64::engine::general_purpose::STANDARD.encode(coded),
        }],
    };
    Bytes::from(serde_json::to_vec(&turn).unwrap_or_default())
}

async fn http_server() -> Result<(SocketAddr, tokio::task::JoinHandle<()>), BenchError> {
    async fn echo(axum::Json(turn): axum::Json<JsonTurn>) -> Result<axum::Json<JsonTurn>, String> {
        // Decode and re-encode the base64 like a real server handling the content would.
        let mut parts = Vec::with_capacity(turn.parts.len());
        for p in turn.parts {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(p.data.as_bytes())
                .map_err(|e| e.to_string())?;
            parts.push(JsonPart {
                kind: p.kind,
                data: base64::engine::general_purpose::STANDARD.encode(raw),
            });
        }
        Ok(axum::Json(JsonTurn {
            role: "assistant".into(),
            parts,
        }))
    }
    let app = axum::Router::new()
        .route("/turn", axum::routing::post(echo))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20));
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(other)?;
    let addr = listener.local_addr().map_err(other)?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, task))
}

async fn http_turn(
    http: &reqwest::Client,
    addr: SocketAddr,
    body: &Bytes,
    coded: &Bytes,
) -> Result<(), BenchError> {
    let resp = http
        .post(format!("http://{addr}/turn"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .map_err(ctx("http send"))?;
    let turn: JsonTurn = resp.json().await.map_err(ctx("http response"))?;
    let data = turn
        .parts
        .first()
        .map(|p| base64::engine::general_purpose::STANDARD.decode(p.data.as_bytes()))
        .transpose()
        .map_err(other)?
        .unwrap_or_default();
    if data.len() != coded.len() {
        return Err(BenchError::Baseline("http echo length differs".into()));
    }
    Ok(())
}

/// Reads `VmRSS` of a process from `/proc/<pid>/status`, in bytes (`None` where unavailable).
pub fn rss_bytes(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs a server for the idle-session measurement: prints `ADDR PIN` on stdout, then holds
/// every session it accepts (and prints a running count on stderr) until the process is killed.
pub async fn idle_server() -> Result<(), BenchError> {
    let tls = ServerTls::self_signed()?;
    let pin = tls.identity.cert_hash();
    let mut config = ServerConfig::new(tls);
    config.max_pending_handshakes = 4096;
    let mut server = Server::bind(config)?;
    println!("{} {}", server.local_addr().map_err(other)?, pin);
    let mut held = Vec::new();
    while let Some(s) = server.accept().await {
        held.push(s);
        if held.len() % 100 == 0 {
            eprintln!("held {}", held.len());
        }
    }
    Ok(())
}

/// Opens `n` idle sessions to a server at `addr` pinned by `pin`, measures the RSS of process
/// `server_pid` (or of this process when `None`, client and server together) before and after,
/// and reports. The sessions are closed when this returns.
pub async fn idle_sessions(
    addr: SocketAddr,
    pin: crate::tls::CertHash,
    n: usize,
    server_pid: Option<u32>,
) -> Result<IdleReport, BenchError> {
    let client = Client::new(ClientConfig::new(ClientTls::pinned(pin)))?;
    // One session first so that one-time allocations are not counted per session.
    let warm = client.connect(addr, "localhost").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_bytes(server_pid).unwrap_or(0);
    let start = Instant::now();
    let mut sessions = Vec::with_capacity(n);
    let mut set = tokio::task::JoinSet::new();
    let mut opened = 0;
    while opened < n || !set.is_empty() {
        while opened < n && set.len() < 64 {
            let c = client.clone();
            set.spawn(async move { c.connect(addr, "localhost").await });
            opened += 1;
        }
        if let Some(r) = set.join_next().await {
            sessions.push(r.map_err(|e| BenchError::Other(e.to_string()))??);
        }
    }
    let open_seconds = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes(server_pid).unwrap_or(0);
    let established = sessions.len();
    drop(sessions);
    drop(warm);
    client.close();
    Ok(IdleReport {
        measurement: "idle-sessions",
        sessions: n,
        established,
        scope: if server_pid.is_some() {
            "server process only (clients in another process)"
        } else {
            "one process holding both the clients and the server"
        },
        rss_before_bytes: before,
        rss_after_bytes: after,
        rss_per_session_bytes: after.saturating_sub(before) as f64 / n.max(1) as f64,
        open_seconds,
    })
}

//! `unimic bench e2e`: the demo's turns end to end (at 256×256 and 512×512), and a streamed
//! reply's per-delta latency over unimic against the same deltas as SSE over HTTP, all on
//! loopback in one process.
//!
//! The image-streaming comparison asks the local agent (shipped models) for a text-to-image
//! reply of `--image-side` tokens a side and then an inpainting of its middle, `--rounds` times
//! each with the server streaming the images as the agent samples them and with the server
//! sending them whole, alternating, and reports the time to the first rows (a new image) and to
//! the whole image.
//!
//! The streaming comparison runs an agent that emits `--deltas` text deltas `--interval-ms`
//! apart, once behind `unimic_chat::serve` (QUIC) read by a `Chat` client, once behind an
//! axum server that streams them as OpenAI Chat Completions chunks (SSE over HTTP/1.1) read by
//! the OpenAI-compatible adapter (reqwest + eventsource-stream). Both ends share the process's
//! clock, so each delta's latency is its arrival time minus its emission time.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use unimic_agents::openai::{OpenAiAgent, OpenAiConfig};
use unimic_agents::{Agent, AgentFuture, Content, Conversation, ReplySink, Role, SinkFuture, Turn};
use unimic_chat::{serve_with, Chat, ChatConfig, Prompt, ReplyEvent, ServeOptions};

/// Arguments of `unimic bench e2e`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Rate-distortion trade-off of the photo's level-1 codes, as `encode --rdo` (0: the
    /// nearest codes).
    #[arg(long, default_value_t = unimic_codec::rdo::DEFAULT_LAMBDA)]
    pub rdo: f32,
    /// The photo of the scripted turns (default: the committed samples/kodim23.png).
    #[arg(long)]
    pub image: Option<std::path::PathBuf>,
    /// Image sizes (square crops) to run the scripted session at (`0` alone: none, only the
    /// streaming comparison).
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    pub sizes: Vec<u32>,
    /// Text deltas per streamed reply.
    #[arg(long, default_value_t = 200)]
    pub deltas: usize,
    /// Milliseconds between two deltas of a streamed reply.
    #[arg(long, default_value_t = 2)]
    pub interval_ms: u64,
    /// Streamed replies per transport (alternating).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Side (in tokens) of the text-to-image replies (and the inpainting of their middle) timed
    /// streamed as sampled against sent whole (`0`: skip; at most 64, the shipped models' side).
    #[arg(long, default_value_t = 48)]
    pub image_side: u32,
    /// Words of earlier conversation in each streaming prompt (the reply is coded against the
    /// conversation so far, so this shows whether a delta's cost grows with it).
    #[arg(long, default_value_t = 0)]
    pub context_words: usize,
}

/// Emission times of the deltas of the reply in progress.
type Stamps = Arc<Mutex<Vec<Instant>>>;

/// The delta `i` of a streamed reply: one word, one o200k token.
fn delta(i: usize) -> &'static str {
    const WORDS: [&str; 8] = [
        " the", " model", " sees", " two", " birds", " on", " a", " branch",
    ];
    WORDS[i % WORDS.len()]
}

/// Emits `n` deltas `interval` apart, stamping each just before handing it to the sink.
struct Streamer {
    n: usize,
    interval: Duration,
    stamps: Stamps,
}

impl Agent for Streamer {
    fn respond<'a>(&'a self, _: &'a Conversation, sink: &'a mut dyn ReplySink) -> AgentFuture<'a> {
        Box::pin(async move {
            for i in 0..self.n {
                self.stamps
                    .lock()
                    .map_err(|_| unimic_agents::AgentError::Backend("poisoned".into()))?
                    .push(Instant::now());
                sink.text_delta(delta(i)).await?;
                tokio::time::sleep(self.interval).await;
            }
            Ok(())
        })
    }
}

/// Records when each delta arrives.
#[derive(Default)]
struct Arrivals(Vec<Instant>);

impl ReplySink for Arrivals {
    fn text_delta<'a>(&'a mut self, _: &'a str) -> SinkFuture<'a> {
        self.0.push(Instant::now());
        Box::pin(std::future::ready(Ok(())))
    }
    fn image_tokens<'a>(&'a mut self, _: (u32, u32), _: &'a [u32], _: bool) -> SinkFuture<'a> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// One streamed reply's measurements.
struct StreamRun {
    first_delta: Duration,
    latencies: Vec<Duration>,
    bytes: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn latencies(stamps: &Stamps, arrivals: &[Instant], n: usize) -> anyhow::Result<Vec<Duration>> {
    let stamps = stamps.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    if stamps.len() != n || arrivals.len() != n {
        bail!(
            "{} deltas emitted and {} received, expected {n} (deltas were merged or lost)",
            stamps.len(),
            arrivals.len()
        );
    }
    Ok(arrivals
        .iter()
        .zip(stamps.iter())
        .map(|(a, s)| a.saturating_duration_since(*s))
        .collect())
}

/// The unimic side: one `serve` with the streamer, one client.
struct UnimicStream {
    chat: Chat,
    stamps: Stamps,
}

impl UnimicStream {
    async fn start(n: usize, interval: Duration) -> anyhow::Result<Self> {
        let stamps: Stamps = Arc::default();
        let server = unimic_chat::bind_dev("127.0.0.1:0".parse()?, [])?;
        let (addr, pin) = (server.local_addr()?, server.cert_hash());
        let agent = Arc::new(Streamer {
            n,
            interval,
            stamps: Arc::clone(&stamps),
        });
        tokio::spawn(serve_with(server, agent, ServeOptions::default()));
        let chat = Chat::connect(addr, ChatConfig::pinned(pin)).await?;
        Ok(Self { chat, stamps })
    }

    async fn run(&self, n: usize, prompt: &str) -> anyhow::Result<StreamRun> {
        self.stamps
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clear();
        let started = Instant::now();
        let mut reply = self.chat.send(Prompt::text(prompt)).await?;
        let mut arrivals = Vec::with_capacity(n);
        let mut bytes = 0;
        while let Some(ev) = reply.next().await {
            match ev? {
                ReplyEvent::Text(_) => arrivals.push(Instant::now()),
                ReplyEvent::End(s) => bytes = s.received.wire_bytes,
                _ => {}
            }
        }
        let first_delta = arrivals
            .first()
            .map_or(Duration::ZERO, |a| a.duration_since(started));
        Ok(StreamRun {
            first_delta,
            latencies: latencies(&self.stamps, &arrivals, n)?,
            bytes,
        })
    }
}

/// The HTTP side: an axum server streaming OpenAI chunks, read by the OpenAI adapter.
struct SseStream {
    agent: OpenAiAgent,
    stamps: Stamps,
    bytes: Arc<Mutex<u64>>,
}

impl SseStream {
    async fn start(n: usize, interval: Duration) -> anyhow::Result<Self> {
        use axum::response::sse::{Event, Sse};
        let stamps: Stamps = Arc::default();
        let bytes = Arc::new(Mutex::new(0u64));
        let (s, b) = (Arc::clone(&stamps), Arc::clone(&bytes));
        let handler = move || {
            let (stamps, bytes) = (Arc::clone(&s), Arc::clone(&b));
            async move {
                let stream = futures_util::stream::unfold(0usize, move |i| {
                    let (stamps, bytes) = (Arc::clone(&stamps), Arc::clone(&bytes));
                    async move {
                        if i > 0 && i <= n {
                            tokio::time::sleep(interval).await;
                        }
                        if i > n {
                            return None;
                        }
                        let data = if i == n {
                            "[DONE]".to_string()
                        } else {
                            json!({
                                "id": "chatcmpl-bench", "object": "chat.completion.chunk",
                                "created": 0, "model": "bench",
                                "choices": [{"index": 0, "delta": {"content": delta(i)},
                                             "finish_reason": null}]
                            })
                            .to_string()
                        };
                        if let Ok(mut b) = bytes.lock() {
                            // "data: " + data + "\n\n", as the wire carries it.
                            *b += data.len() as u64 + 8;
                        }
                        if i < n {
                            if let Ok(mut s) = stamps.lock() {
                                s.push(Instant::now());
                            }
                        }
                        Some((Ok::<_, Infallible>(Event::default().data(data)), i + 1))
                    }
                });
                Sse::new(stream)
            }
        };
        let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let agent = OpenAiAgent::text_only(OpenAiConfig::new(format!("http://{addr}/v1"), "bench"))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self {
            agent,
            stamps,
            bytes,
        })
    }

    async fn run(&self, n: usize, prompt: &str) -> anyhow::Result<StreamRun> {
        self.stamps
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clear();
        *self.bytes.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = 0;
        let conversation = Conversation {
            turns: vec![Turn {
                role: Role::User,
                content: vec![Content::text(prompt)],
            }],
        };
        let mut arrivals = Arrivals::default();
        let started = Instant::now();
        self.agent
            .respond(&conversation, &mut arrivals)
            .await
            .context("the SSE stream")?;
        let first_delta = arrivals
            .0
            .first()
            .map_or(Duration::ZERO, |a| a.duration_since(started));
        let bytes = *self.bytes.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        Ok(StreamRun {
            first_delta,
            latencies: latencies(&self.stamps, &arrivals.0, n)?,
            bytes,
        })
    }
}

/// Summary of one transport's streamed replies.
fn summarize(name: &str, runs: &[StreamRun], n: usize) -> serde_json::Value {
    let mut all: Vec<Duration> = runs
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    all.sort();
    let mut first: Vec<Duration> = runs.iter().map(|r| r.first_delta).collect();
    first.sort();
    let bytes: u64 = runs.iter().map(|r| r.bytes).sum();
    json!({
        "bench": "e2e", "kind": "stream", "transport": name, "deltas": n, "replies": runs.len(),
        "first_delta_ms": percentile(&first, 0.5).as_secs_f64() * 1e3,
        "delta_latency_p50_us": percentile(&all, 0.5).as_secs_f64() * 1e6,
        "delta_latency_p90_us": percentile(&all, 0.9).as_secs_f64() * 1e6,
        "delta_latency_p99_us": percentile(&all, 0.99).as_secs_f64() * 1e6,
        "bytes_per_delta": bytes as f64 / (runs.len().max(1) * n.max(1)) as f64,
    })
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    let photo = args.image.clone().unwrap_or_else(|| {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../samples/kodim23.png")
    });
    let emit = |v: serde_json::Value| {
        if args.json {
            println!("{v}");
        }
    };
    for &size in args.sizes.iter().filter(|&&s| s > 0) {
        let out =
            std::env::temp_dir().join(format!("unimic-bench-e2e-{}-{size}", std::process::id()));
        std::fs::create_dir_all(&out)?;
        let reports = crate::demo::run_session(&out, &photo, size, 1, args.rdo, None, |_| {});
        let _ = std::fs::remove_dir_all(&out);
        let reports = reports?;
        if !args.json {
            println!("scripted session at {size}×{size}:");
            println!(
                "  {:<27} {:>9} {:>9} {:>12} {:>7} {:>8}",
                "turn", "wire up", "wire down", "JSON+base64", "ratio", "ms"
            );
        }
        for r in &reports {
            emit(json!({
                "bench": "e2e", "kind": "turn", "size": size, "turn": r.turn, "name": r.name,
                "wire_bytes": r.wire_bytes, "wire_up": r.wire_up, "wire_down": r.wire_down,
                "json_base64_jpeg_bytes": r.json_base64_jpeg_bytes, "ratio": r.ratio, "ms": r.ms,
            }));
            if !args.json {
                println!(
                    "  {:<27} {:>9} {:>9} {:>12} {:>6.1}x {:>8.0}",
                    r.name, r.wire_up, r.wire_down, r.json_base64_jpeg_bytes, r.ratio, r.ms
                );
            }
        }
        // The image turn alone, upstream: what the edge sends for a photo and a question.
        if let Some(first) = reports.first() {
            let ratio = first.json_up as f64 / first.wire_up.max(1) as f64;
            emit(json!({
                "bench": "e2e", "kind": "image_turn", "size": size,
                "turn": format!("photo {size}x{size} + question, upstream"),
                "wire_bytes": first.wire_up, "json_base64_jpeg_bytes": first.json_up,
                "ratio": ratio, "ms": first.ms,
            }));
            if !args.json {
                println!(
                    "  the image turn upstream: {} B on the wire vs {} B JSON + base64 JPEG-85 ({ratio:.1}x)",
                    first.wire_up, first.json_up
                );
            }
            // The same turn with the photo's quality ladder (levels 2-4 as refinement parts).
            for levels in [2usize, 4] {
                let wire = crate::demo::ladder_turn_bytes(&photo, size, levels, args.rdo)?;
                let ratio = first.json_up as f64 / wire.max(1) as f64;
                emit(json!({
                    "bench": "e2e", "kind": "ladder_turn", "size": size, "levels": levels,
                    "turn": format!("photo {size}x{size} at {levels} levels + question, upstream"),
                    "wire_bytes": wire, "json_base64_jpeg_bytes": first.json_up, "ratio": ratio,
                }));
                if !args.json {
                    println!("  with {levels} quality levels: {wire} B on the wire ({ratio:.1}x)");
                }
            }
        }
    }

    if args.image_side > 0 {
        image_streaming(&args, &emit)?;
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let n = args.deltas.max(2);
    let interval = Duration::from_millis(args.interval_ms);
    let mut prompt = String::from("stream");
    for i in 0..args.context_words {
        // Varied words, as a real conversation's (numbered pseudo-words, a few tokens each).
        prompt.push_str(&format!(" w{}", (i * 7919) % 10007));
    }
    let prompt = prompt.as_str();
    let (unimic, sse) = rt.block_on(async {
        let u = UnimicStream::start(n, interval).await?;
        let s = SseStream::start(n, interval).await?;
        // Warm-up: connections, pools, lazily loaded tables.
        u.run(n, prompt).await?;
        s.run(n, prompt).await?;
        let (mut ur, mut sr) = (Vec::new(), Vec::new());
        for round in 0..args.rounds.max(1) {
            // Alternate which goes first.
            if round % 2 == 0 {
                ur.push(u.run(n, prompt).await?);
                sr.push(s.run(n, prompt).await?);
            } else {
                sr.push(s.run(n, prompt).await?);
                ur.push(u.run(n, prompt).await?);
            }
        }
        u.chat.close(Duration::from_secs(1)).await;
        Ok::<_, anyhow::Error>((ur, sr))
    })?;
    let u = summarize("unimic", &unimic, n);
    let s = summarize("sse_http", &sse, n);
    let ratio = u["delta_latency_p50_us"].as_f64().unwrap_or(0.0)
        / s["delta_latency_p50_us"].as_f64().unwrap_or(1.0).max(1e-9);
    if args.json {
        emit(u);
        emit(s);
        emit(
            json!({"bench": "e2e", "kind": "stream_ratio", "delta_latency_p50_ratio": ratio,
                    "context_words": args.context_words}),
        );
    } else {
        println!(
            "streamed reply, {n} deltas {} ms apart, {} replies each, {} words of context:",
            args.interval_ms,
            args.rounds.max(1),
            args.context_words
        );
        for v in [&u, &s] {
            println!(
                "  {:<9} first delta {:>6.2} ms, per-delta latency p50 {:>6.0} µs p90 {:>6.0} µs p99 {:>6.0} µs, {:>5.1} B/delta",
                v["transport"].as_str().unwrap_or(""),
                v["first_delta_ms"].as_f64().unwrap_or(0.0),
                v["delta_latency_p50_us"].as_f64().unwrap_or(0.0),
                v["delta_latency_p90_us"].as_f64().unwrap_or(0.0),
                v["delta_latency_p99_us"].as_f64().unwrap_or(0.0),
                v["bytes_per_delta"].as_f64().unwrap_or(0.0),
            );
        }
        println!("  per-delta latency, unimic / SSE over HTTP: {ratio:.2}x (p50)");
    }
    Ok(())
}

/// Text-to-image and inpainting replies streamed as sampled against sent whole (see the module
/// docs).
fn image_streaming(args: &Args, emit: &dyn Fn(serde_json::Value)) -> anyhow::Result<()> {
    let side = args.image_side.min(64);
    let rounds = args.rounds.max(1);
    let (mut streamed, mut whole) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first; each run a fresh server and session, same seeds.
        for stream in [round % 2 == 0, round % 2 != 0] {
            let times = crate::demo::image_reply_times(side, stream, 1)?;
            if stream {
                streamed.extend(times);
            } else {
                whole.extend(times);
            }
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    for task in ["generate", "inpaint"] {
        for (name, runs) in [("streamed", &streamed), ("whole", &whole)] {
            let runs: Vec<_> = runs
                .iter()
                .filter(|(t, _)| *t == task)
                .map(|(_, r)| r)
                .collect();
            let first: Vec<f64> = runs
                .iter()
                .map(|t| ms(t.first_rows.unwrap_or(t.image)))
                .collect();
            let image: Vec<f64> = runs.iter().map(|t| ms(t.image)).collect();
            let v = json!({
                "bench": "e2e", "kind": "image_stream", "task": task, "mode": name,
                "side": side, "rounds": rounds,
                "first_rows_ms_median": median(first.clone()),
                "image_ms_median": median(image.clone()),
                "first_rows_ms": first, "image_ms": image,
                "row_events": runs.iter().map(|t| t.row_events).collect::<Vec<_>>(),
                "wire_down": runs.iter().map(|t| t.wire_down).collect::<Vec<_>>(),
            });
            if args.json {
                emit(v);
            } else {
                println!(
                    "{task} {side}x{side} tokens, {name:>8}: first rows after {:>6.0} ms, whole image after {:>6.0} ms (medians of {rounds}), {} B down",
                    v["first_rows_ms_median"].as_f64().unwrap_or(0.0),
                    v["image_ms_median"].as_f64().unwrap_or(0.0),
                    runs.first().map_or(0, |t| t.wire_down),
                );
            }
        }
    }
    Ok(())
}

//! `unimic demo`: a scripted chat-with-images session, server and client in one process over
//! loopback QUIC, on a committed sample image and the shipped models (no network, no
//! `../shared`). It prints a per-turn table of the bytes on the wire against what the same turn
//! costs as an OpenAI-style JSON request with base64 JPEG-85 images, and writes an HTML report
//! with the sent and received images side by side and a plot of the bytes per turn.
//!
//! The agent is the local token-native agent (`unimic_agents::local`); with
//! `UNIMIC_OPENAI_BASE_URL` and `UNIMIC_OPENAI_MODEL` set, questions go to that OpenAI-compatible
//! server instead (it sees the decoded image), and requests still go to the local agent.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine as _;
use image::RgbImage;
use serde::Serialize;
use serde_json::json;
use unimic_agents::local::LocalAgent;
use unimic_agents::request::{Border, CellRect, Request, Task};
use unimic_agents::{Agent, AgentFuture, Capabilities, Content, Conversation, ReplySink};
use unimic_chat::{serve_with, Chat, ChatConfig, Prompt, ReplyEvent, ServeOptions};
#[allow(unused_imports)] // the trait's methods, whatever type the shipped tokenizer has
use unimic_codec::tokenizer::ImageTokenizer;
use unimic_transport::tls::ServerTls;
use unimic_transport::{Server, ServerConfig, SessionConfig, TokenGrid};

/// `unimic demo` arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Where the report (report.html, report.json, plot.svg, images) is written.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// The photo the session talks about (default: the committed samples/kodim23.png).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// The photo is resized and centre-cropped to SIZE×SIZE pixels.
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// Print one JSON object per turn instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Seed of the local agent's sampling.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Rate-distortion trade-off of the photo's level-1 codes, as `encode --rdo` (0: the
    /// nearest codes).
    #[arg(long, default_value_t = unimic_codec::rdo::DEFAULT_LAMBDA)]
    pub rdo: f32,
}

/// One scripted turn.
struct Step {
    name: &'static str,
    text: String,
    image: bool,
    request: Option<Request>,
}

/// What one turn cost and produced.
#[derive(Debug, Serialize, Clone)]
pub struct TurnReport {
    /// 1-based turn number.
    pub turn: usize,
    /// What the turn does.
    pub name: String,
    /// The user's text.
    pub prompt: String,
    /// The reply's text.
    pub reply_text: String,
    /// Bytes of the turn's message on the wire (QUIC stream bytes, framing included).
    pub wire_up: u64,
    /// Bytes of the reply's message on the wire.
    pub wire_down: u64,
    /// `wire_up + wire_down`.
    pub wire_bytes: u64,
    /// The request body an OpenAI-style client sends for this turn (a stateless API: the whole
    /// history again, every image as a base64 JPEG-85 data URL).
    pub json_up: u64,
    /// The reply as an OpenAI-style JSON completion (text; an image as a base64 JPEG-85).
    pub json_down: u64,
    /// `json_up + json_down`.
    pub json_base64_jpeg_bytes: u64,
    /// `json_base64_jpeg_bytes / wire_bytes`.
    pub ratio: f64,
    /// From sending the turn to the end of its reply, in milliseconds.
    pub ms: f64,
    /// Image files of the report for this turn (relative to the output directory).
    pub images: Vec<(String, String)>,
}

/// Sends turns that carry a request (or another raw part) to the local agent, and the others
/// (questions) to `questions` when there is one.
pub struct Router {
    local: LocalAgent,
    questions: Option<Arc<dyn Agent>>,
}

impl Router {
    /// Questions to `questions` (or to `local` when `None`), requests to `local`.
    pub fn new(local: LocalAgent, questions: Option<Arc<dyn Agent>>) -> Self {
        Self { local, questions }
    }
}

impl Agent for Router {
    fn capabilities(&self) -> Capabilities {
        self.local.capabilities()
    }

    fn respond<'a>(&'a self, c: &'a Conversation, sink: &'a mut dyn ReplySink) -> AgentFuture<'a> {
        let is_request = c.turns.last().is_some_and(|t| {
            t.content
                .iter()
                .any(|x| matches!(x, Content::Request(_) | Content::Raw { .. }))
        });
        match &self.questions {
            Some(q) if !is_request => q.respond(c, sink),
            _ => self.local.respond(c, sink),
        }
    }
}

/// The local agent on the shipped masked and text-conditioned models.
pub fn local_agent() -> anyhow::Result<LocalAgent> {
    let dir = crate::models::entropy_dir(None);
    LocalAgent::load(
        &unimic_codec::shipped::manifest_path(&dir, unimic_codec::shipped::MASKED_ID),
        &unimic_codec::shipped::manifest_path(&dir, unimic_codec::shipped::TEXT_ID),
    )
    .with_context(|| format!("loading the local agent's models from {}", dir.display()))
}

fn script(image_side_cells: u32) -> Vec<Step> {
    let c = image_side_cells;
    let (a, b) = (c * 5 / 16, c * 11 / 16);
    vec![
        Step {
            name: "question about a photo",
            text: "What is in this photo?".into(),
            image: true,
            request: None,
        },
        Step {
            name: "follow-up (context reuse)",
            text: "Which bird is on the left, and what colour is it?".into(),
            image: false,
            request: None,
        },
        Step {
            name: "inpainting edit",
            text: format!("Repaint the middle of the picture (cells x {a}..{b}, y {a}..{b})."),
            image: false,
            request: Some(Request::new(Task::Inpaint {
                region: CellRect {
                    x0: a,
                    y0: a,
                    x1: b,
                    y1: b,
                },
            })),
        },
        Step {
            name: "outpainting",
            text: "Extend the picture by two cells on every side.".into(),
            image: false,
            request: Some(Request::new(Task::Outpaint {
                border: Border {
                    top: 2,
                    right: 2,
                    bottom: 2,
                    left: 2,
                },
            })),
        },
        Step {
            name: "text-to-image",
            text: "A red parrot on a green branch.".into(),
            image: false,
            request: Some(Request::new(Task::Generate {
                height: c.min(16),
                width: c.min(16),
            })),
        },
    ]
}

/// An OpenAI-style user message: the text and each image as a base64 JPEG-85 data URL.
pub fn json_user_message(text: &str, images: &[&RgbImage]) -> anyhow::Result<serde_json::Value> {
    let mut content = vec![json!({"type": "text", "text": text})];
    for img in images {
        content.push(json!({
            "type": "image_url",
            "image_url": {"url": jpeg_data_url(img)?}
        }));
    }
    Ok(json!({"role": "user", "content": content}))
}

fn jpeg_data_url(img: &RgbImage) -> anyhow::Result<String> {
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
        .encode_image(img)
        .context("JPEG encoding")?;
    Ok(format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&jpeg)
    ))
}

/// Bytes of a streaming Chat Completions request body with `messages`.
pub fn json_request_bytes(messages: &[serde_json::Value]) -> anyhow::Result<u64> {
    let body = json!({"model": "gpt-4o", "stream": true, "messages": messages});
    Ok(serde_json::to_vec(&body)?.len() as u64)
}

/// The content of an OpenAI-style assistant message with `text` and `images` (base64 JPEG-85).
pub fn json_assistant_content(
    text: &str,
    images: &[RgbImage],
) -> anyhow::Result<serde_json::Value> {
    let mut content = vec![json!({"type": "text", "text": text})];
    for img in images {
        content.push(json!({"type": "image_url", "image_url": {"url": jpeg_data_url(img)?}}));
    }
    Ok(serde_json::Value::Array(content))
}

/// Bytes of a JSON completion whose message has `content`.
pub fn json_reply_bytes(content: &serde_json::Value) -> anyhow::Result<u64> {
    let body = json!({
        "id": "chatcmpl-0000000000000000000000000000",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}]
    });
    Ok(serde_json::to_vec(&body)?.len() as u64)
}

/// What the edge sends for the photo at `size` with its first `levels` quality-ladder levels and
/// the demo's first question, over loopback QUIC to a server with the echo agent: the turn's
/// bytes on the wire (a fresh session, so no context reuse).
pub fn ladder_turn_bytes(photo: &Path, size: u32, levels: usize, rdo: f32) -> anyhow::Result<u64> {
    let tok = crate::models::image_encoder(None, None, rdo)?;
    let img = image::open(photo)
        .with_context(|| format!("cannot read image {}", photo.display()))?
        .to_rgb8();
    let pixels = crate::models::prepare(img, size);
    let grids = tok
        .encode_levels(&pixels, levels)
        .context("tokenizing the photo")?;
    let rt = tokio::runtime::Runtime::new()?;
    let (addr, pin) = start_server(
        &rt,
        Arc::new(unimic_agents::echo::Echo),
        ServeOptions::default(),
    )?;
    let config = ChatConfig::pinned(pin)
        .with_image_tokenizer(crate::serve::shipped_tokenizer_info()?)
        .with_codec(crate::serve::codec_config()?);
    rt.block_on(async {
        let chat = Chat::connect(addr, config).await?;
        let reply = chat
            .send(Prompt::text("What is in this photo?").with_grid_levels(grids))
            .await?;
        let bytes = reply.sent().wire_bytes;
        reply.text().await?;
        chat.close(Duration::from_secs(1)).await;
        Ok(bytes)
    })
}

/// One text-to-image reply from the local agent, timed at the client.
#[derive(Debug, Clone, Copy)]
pub struct ImageReplyTimes {
    /// From sending the turn to the first rows of the image (`None`: the image came whole).
    pub first_rows: Option<Duration>,
    /// From sending the turn to the whole image.
    pub image: Duration,
    /// Row events before the whole image.
    pub row_events: u32,
    /// The reply's bytes on the wire.
    pub wire_down: u64,
}

/// Asks the local agent (shipped models) over loopback QUIC, on one session, `rounds` times for a
/// text-to-image reply of `side × side` tokens (seeds 1, 2, …) and then for an inpainting of its
/// middle (half the side each way), with reply images streamed as sampled (`streamed`: the
/// server's default, chunks from 50 ms on) or sent whole at the end; returns the times of each
/// reply with its task (`"generate"`, `"inpaint"`).
pub fn image_reply_times(
    side: u32,
    streamed: bool,
    rounds: usize,
) -> anyhow::Result<Vec<(&'static str, ImageReplyTimes)>> {
    let rt = tokio::runtime::Runtime::new()?;
    let options = if streamed {
        ServeOptions::default()
    } else {
        ServeOptions::default().with_stream_images_after(None)
    };
    let (addr, pin) = start_server(&rt, Arc::new(local_agent()?), options)?;
    let config = ChatConfig::pinned(pin)
        .with_image_tokenizer(crate::serve::shipped_tokenizer_info()?)
        .with_codec(crate::serve::codec_config()?)
        .with_reply_timeout(Some(Duration::from_secs(300)));
    let (a, b) = (side / 4, side - side / 4);
    rt.block_on(async {
        let chat = Chat::connect(addr, config).await?;
        let mut out = Vec::new();
        for round in 0..rounds {
            let seed = 1 + round as u64;
            let turns = [
                (
                    "generate",
                    "A red parrot on a green branch.",
                    Request::new(Task::Generate {
                        height: side,
                        width: side,
                    }),
                ),
                (
                    "inpaint",
                    "Repaint the middle.",
                    Request::new(Task::Inpaint {
                        region: CellRect {
                            x0: a,
                            y0: a,
                            x1: b,
                            y1: b,
                        },
                    }),
                ),
            ];
            for (task, text, request) in turns {
                let start = Instant::now();
                let mut reply = chat
                    .send(Prompt::text(text).with_request(request.with_seed(seed)))
                    .await?;
                let (mut first_rows, mut image, mut row_events) = (None, None, 0);
                let mut wire_down = 0;
                while let Some(ev) = reply.next().await {
                    match ev? {
                        ReplyEvent::ImageRows { .. } => {
                            row_events += 1;
                            first_rows.get_or_insert(start.elapsed());
                        }
                        ReplyEvent::Image(_) => image = Some(start.elapsed()),
                        ReplyEvent::End(s) => wire_down = s.received.wire_bytes,
                        _ => {}
                    }
                }
                let image = image.with_context(|| format!("the {task} reply has no image"))?;
                out.push((
                    task,
                    ImageReplyTimes {
                        first_rows,
                        image,
                        row_events,
                        wire_down,
                    },
                ));
            }
        }
        chat.close(Duration::from_secs(1)).await;
        Ok(out)
    })
}

/// The server side: a dev-mode server on an ephemeral loopback port with `agent`.
fn start_server(
    rt: &tokio::runtime::Runtime,
    agent: Arc<dyn Agent>,
    options: ServeOptions,
) -> anyhow::Result<(std::net::SocketAddr, unimic_transport::tls::CertHash)> {
    let info = crate::serve::shipped_tokenizer_info()?;
    let codec = crate::serve::codec_config()?;
    let _guard = rt.enter();
    let tls = ServerTls::self_signed().context("making the certificate")?;
    let pin = tls.identity.cert_hash();
    let session = SessionConfig::default()
        .with_tokenizer(info)
        .with_codec(codec);
    let server = Server::bind(
        ServerConfig::new(tls)
            .with_bind("127.0.0.1:0".parse()?)
            .with_session(session),
    )
    .context("listening on loopback")?;
    let addr = server.local_addr()?;
    rt.spawn(serve_with(server, agent, options));
    Ok((addr, pin))
}

/// Runs the scripted session; returns its per-turn reports (images written under `out`). The
/// photo's level-1 codes are chosen at `rdo` (`encode --rdo`).
#[allow(clippy::too_many_arguments)]
pub fn run_session(
    out: &Path,
    photo: &Path,
    size: u32,
    seed: u64,
    rdo: f32,
    question_agent: Option<Arc<dyn Agent>>,
    mut on_turn: impl FnMut(&TurnReport),
) -> anyhow::Result<Vec<TurnReport>> {
    let tok = crate::models::image_encoder(None, None, rdo)?;
    let img = image::open(photo)
        .with_context(|| format!("cannot read image {}", photo.display()))?
        .to_rgb8();
    let pixels = crate::models::prepare(img, size);
    let agent: Arc<dyn Agent> = Arc::new(Router::new(local_agent()?, question_agent));
    let rt = tokio::runtime::Runtime::new()?;
    let (addr, pin) = start_server(&rt, agent, ServeOptions::default())?;
    let config = ChatConfig::pinned(pin)
        .with_image_tokenizer(crate::serve::shipped_tokenizer_info()?)
        .with_codec(crate::serve::codec_config()?)
        .with_reply_timeout(Some(Duration::from_secs(300)));
    let chat = rt
        .block_on(Chat::connect(addr, config))
        .context("connecting to the demo server on loopback")?;

    let save = |name: &str, img: &RgbImage| -> anyhow::Result<String> {
        let path = out.join(name);
        img.save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(name.to_string())
    };
    let grid = tok.encode(&pixels).context("tokenizing the photo")?;
    let seen = tok.decode(&grid).context("detokenizing the photo")?;
    let cells = grid.width().min(grid.height());
    let mut history: Vec<serde_json::Value> = Vec::new();
    let mut reports = Vec::new();
    // Images of the conversation as pixels, for the JSON comparison (what the other side holds).
    let mut last_image: Option<RgbImage> = None;
    for (i, step) in script(cells).into_iter().enumerate() {
        let n = i + 1;
        let mut images = Vec::new();
        let mut prompt = Prompt::text(step.text.clone());
        let mut json_images: Vec<&RgbImage> = Vec::new();
        if step.image {
            prompt = prompt.with_grid(grid.clone());
            images.push((
                "sent: the photo".to_string(),
                save(&format!("turn{n}-photo.png"), &pixels)?,
            ));
            images.push((
                format!(
                    "what the server sees: {}×{} tokens, decoded",
                    grid.width(),
                    grid.height()
                ),
                save(&format!("turn{n}-decoded.png"), &seen)?,
            ));
            json_images.push(&pixels);
            last_image = Some(seen.clone());
        }
        if let Some(r) = step.request {
            prompt = prompt.with_request(r.with_seed(seed.wrapping_add(n as u64)));
        }
        history.push(json_user_message(&step.text, &json_images)?);
        let json_up = json_request_bytes(&history)?;

        let started = Instant::now();
        let (text, grids, stats) = rt.block_on(async {
            let mut reply = chat.send(prompt).await?;
            let (mut text, mut grids, mut stats) = (String::new(), Vec::new(), None);
            while let Some(ev) = reply.next().await {
                match ev? {
                    ReplyEvent::Text(t) => text.push_str(&t),
                    ReplyEvent::Image(g) => grids.push(g),
                    ReplyEvent::End(s) => stats = Some(s),
                    _ => {}
                }
            }
            Ok::<_, unimic_chat::ChatError>((text, grids, stats))
        })?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let Some(stats) = stats else {
            bail!("turn {n}: the reply ended without its end")
        };
        let mut reply_pixels = Vec::new();
        for (j, g) in grids.iter().enumerate() {
            let img = decode_grid(&tok, g)?;
            images.push((
                format!("reply image: {}×{} tokens, decoded", g.width(), g.height()),
                save(&format!("turn{n}-reply{}.png", j + 1), &img)?,
            ));
            reply_pixels.push(img);
        }
        if let Some(before) = last_image
            .as_ref()
            .filter(|_| step.request.is_some() && n > 1)
        {
            if !matches!(step.request.map(|r| r.task), Some(Task::Generate { .. })) {
                images.insert(
                    0,
                    (
                        "the image it edits".into(),
                        save(&format!("turn{n}-before.png"), before)?,
                    ),
                );
            }
        }
        if let Some(last) = reply_pixels.last() {
            last_image = Some(last.clone());
        }
        // One JPEG encoding per reply image serves both the reply's size and the history.
        let assistant = json_assistant_content(&text, &reply_pixels)?;
        let json_down = json_reply_bytes(&assistant)?;
        history.push(json!({"role": "assistant", "content": assistant}));
        let wire_up = stats.sent.wire_bytes;
        let wire_down = stats.received.wire_bytes;
        let report = TurnReport {
            turn: n,
            name: step.name.into(),
            prompt: step.text,
            reply_text: text,
            wire_up,
            wire_down,
            wire_bytes: wire_up + wire_down,
            json_up,
            json_down,
            json_base64_jpeg_bytes: json_up + json_down,
            ratio: (json_up + json_down) as f64 / (wire_up + wire_down).max(1) as f64,
            ms,
            images,
        };
        on_turn(&report);
        reports.push(report);
    }
    rt.block_on(chat.close(Duration::from_secs(1)));
    Ok(reports)
}

/// Detokenizes a reply grid: the tokenizer takes any grid its decoder can, so outpainted and
/// generated grids of other sizes decode too.
fn decode_grid(
    tok: &unimic_codec::tokenizer::DynTokenizer,
    g: &TokenGrid,
) -> anyhow::Result<RgbImage> {
    tok.decode(g)
        .with_context(|| format!("detokenizing a {}×{} reply grid", g.width(), g.height()))
}

/// Runs `unimic demo`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let photo = args.image.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../samples/kodim23.png")
    });
    crate::models::check_input_file(&photo).context("the photo (pass --image PATH)")?;
    crate::models::create_output_dir(&args.out)?;
    let questions = crate::openai::from_env()?;
    let via = match &questions {
        Some((name, _)) => format!("questions answered by {name} (OpenAI-compatible), requests by the local agent"),
        None => "the local token-native agent (set UNIMIC_OPENAI_BASE_URL and UNIMIC_OPENAI_MODEL for an LMM)".into(),
    };
    if !args.json {
        println!("unimic demo: server and client over loopback QUIC; agent: {via}");
        println!(
            "{:<2} {:<27} {:>9} {:>9} {:>12} {:>7} {:>8}",
            "#", "turn", "wire up", "wire down", "JSON+base64", "ratio", "ms"
        );
    }
    let json = args.json;
    let reports = run_session(
        &args.out,
        &photo,
        args.size,
        args.seed,
        args.rdo,
        questions.map(|(_, a)| a),
        |r| {
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&json!({
                        "turn": r.turn, "name": r.name, "wire_bytes": r.wire_bytes,
                        "wire_up": r.wire_up, "wire_down": r.wire_down,
                        "json_base64_jpeg_bytes": r.json_base64_jpeg_bytes,
                        "ratio": r.ratio, "ms": r.ms,
                    }))
                    .unwrap_or_default()
                );
            } else {
                println!(
                    "{:<2} {:<27} {:>9} {:>9} {:>12} {:>6.1}x {:>8.0}",
                    r.turn, r.name, r.wire_up, r.wire_down, r.json_base64_jpeg_bytes, r.ratio, r.ms
                );
                let reply = r.reply_text.trim();
                let reply: String = reply.chars().take(160).collect();
                println!("   > {}\n   < {}", r.prompt, reply.replace('\n', " "));
            }
        },
    )?;
    let (wire, json_total): (u64, u64) = reports.iter().fold((0, 0), |(a, b), r| {
        (a + r.wire_bytes, b + r.json_base64_jpeg_bytes)
    });
    write_report(&args.out, &via, &reports)?;
    if !json {
        println!(
            "session: {wire} B on the wire vs {json_total} B as OpenAI-style JSON + base64 JPEG-85 ({:.1}x)",
            json_total as f64 / wire.max(1) as f64
        );
        println!("report: {}", args.out.join("report.html").display());
    }
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Writes report.json, plot.svg and report.html.
fn write_report(out: &Path, via: &str, reports: &[TurnReport]) -> anyhow::Result<()> {
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(reports)?)
        .context("writing report.json")?;
    plot(&out.join("plot.svg"), reports)?;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>unimic demo</title><style>\
         body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}}\
         td.l,th.l{{text-align:left}}figure{{display:inline-block;margin:0 12px 12px 0;vertical-align:top}}\
         figure img{{width:256px;image-rendering:auto;border:1px solid #ccc}}figcaption{{font-size:12px;max-width:256px}}\
         .turn{{border-top:2px solid #444;margin-top:1.5em;padding-top:.5em}}.reply{{white-space:pre-wrap;background:#f5f5f5;padding:6px}}\
         </style></head><body><h1>unimic demo</h1><p>Server and client in one process over loopback QUIC. Agent: {}.</p>\
         <p>Bytes per turn: <b>wire</b> is what unimic puts on the QUIC streams (turn and reply, framing included); \
         <b>JSON+base64</b> is what the same turn costs an OpenAI-style client: the request body with the whole history \
         (a stateless API resends it) and every image as a base64 JPEG-85 data URL, plus the reply as a JSON completion.</p>\
         <img src=\"plot.svg\" alt=\"bytes per turn\"><table><tr><th>#</th><th class=l>turn</th><th>wire up</th>\
         <th>wire down</th><th>JSON+base64</th><th>ratio</th><th>ms</th></tr>",
        esc(via)
    );
    for r in reports {
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=l>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}×</td><td>{:.0}</td></tr>",
            r.turn,
            esc(&r.name),
            r.wire_up,
            r.wire_down,
            r.json_base64_jpeg_bytes,
            r.ratio,
            r.ms
        );
    }
    h.push_str("</table>");
    for r in reports {
        let _ = write!(
            h,
            "<div class=turn><h3>Turn {}: {}</h3><p><b>user:</b> {}</p><p><b>agent:</b></p><div class=reply>{}</div><p>",
            r.turn,
            esc(&r.name),
            esc(&r.prompt),
            esc(&r.reply_text)
        );
        for (caption, file) in &r.images {
            let _ = write!(
                h,
                "<figure><img src=\"{}\" alt=\"{}\"><figcaption>{}</figcaption></figure>",
                esc(file),
                esc(caption),
                esc(caption)
            );
        }
        let _ = write!(
            h,
            "</p><p>{} B on the wire ({} up, {} down) vs {} B JSON+base64: {:.1}× fewer; {:.0} ms.</p></div>",
            r.wire_bytes, r.wire_up, r.wire_down, r.json_base64_jpeg_bytes, r.ratio, r.ms
        );
    }
    h.push_str("</body></html>\n");
    std::fs::write(out.join("report.html"), h).context("writing report.html")
}

/// A bar chart of the bytes per turn, unimic against JSON + base64 (log scale).
fn plot(path: &Path, reports: &[TurnReport]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let n = reports.len().max(1);
    let max = reports
        .iter()
        .map(|r| r.json_base64_jpeg_bytes.max(r.wire_bytes))
        .max()
        .unwrap_or(1) as f64;
    let root = SVGBackend::new(path, (760, 360)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Bytes per turn (log scale)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, (10f64..max * 12.0).log_scale())
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let names: Vec<String> = reports.iter().map(|r| format!("turn {}", r.turn)).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            // Groups are centred on integers; ticks elsewhere get no label.
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("bytes")
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let blue = RGBColor(40, 110, 190);
    let grey = RGBColor(170, 170, 170);
    chart
        .draw_series(reports.iter().enumerate().map(|(i, r)| {
            let x = i as f64;
            Rectangle::new(
                [(x - 0.38, 10.0), (x - 0.02, r.wire_bytes.max(11) as f64)],
                blue.filled(),
            )
        }))
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?
        .label("unimic (wire)")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], blue.filled()));
    chart
        .draw_series(reports.iter().enumerate().map(|(i, r)| {
            let x = i as f64;
            Rectangle::new(
                [
                    (x + 0.02, 10.0),
                    (x + 0.38, r.json_base64_jpeg_bytes.max(11) as f64),
                ],
                grey.filled(),
            )
        }))
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?
        .label("OpenAI-style JSON + base64 JPEG-85")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], grey.filled()));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripted_session_runs_over_quic_and_reports_every_turn() {
        let out = crate::models::Scratch::new("demo");
        std::fs::create_dir_all(out.path()).unwrap();
        let photo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../samples/kodim23.png");
        let mut seen = Vec::new();
        let reports = run_session(
            out.path(),
            &photo,
            128,
            7,
            unimic_codec::rdo::DEFAULT_LAMBDA,
            None,
            |r| seen.push(r.turn),
        )
        .unwrap();
        assert_eq!(seen, [1, 2, 3, 4, 5]);
        write_report(out.path(), "the local agent", &reports).unwrap();
        for r in &reports {
            assert!(r.wire_up > 0 && r.wire_down > 0, "turn {}", r.turn);
            assert!(
                r.ratio > 5.0,
                "turn {} is only {:.1}x smaller",
                r.turn,
                r.ratio
            );
            for (_, file) in &r.images {
                let img = image::open(out.path().join(file)).unwrap();
                assert!(img.width() >= 64, "{file}");
            }
        }
        // The question is answered by the local agent, which says what it is.
        assert!(reports[0].reply_text.contains("not a language model"));
        assert!(
            reports[0].images.len() == 2,
            "the photo and what the server sees"
        );
        // The follow-up reuses the context: no image travels again.
        assert!(reports[1].wire_up < reports[0].wire_up);
        // Inpainting and outpainting reply with an image of the right size; text-to-image too.
        assert!(reports[2].reply_text.starts_with("Inpainted"));
        let size = |turn: usize| {
            let file = &reports[turn].images.last().unwrap().1;
            image::image_dimensions(out.path().join(file)).unwrap()
        };
        assert_eq!(size(2), (128, 128));
        assert_eq!(size(3), (128 + 4 * 16, 128 + 4 * 16));
        assert_eq!(size(4), (128, 128));
        let html = std::fs::read_to_string(out.path().join("report.html")).unwrap();
        for r in &reports {
            assert!(html.contains(&format!("Turn {}: {}", r.turn, esc(&r.name))));
        }
        let svg = std::fs::read_to_string(out.path().join("plot.svg")).unwrap();
        assert!(svg.contains("turn 5") && svg.contains("unimic (wire)"));
        let json: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap())
                .unwrap();
        assert_eq!(json.len(), 5);
    }

    #[test]
    fn a_missing_photo_is_a_clear_error() {
        let out = crate::models::Scratch::new("demo-missing");
        let e = run_session(
            out.path(),
            Path::new("/nonexistent.png"),
            128,
            1,
            unimic_codec::rdo::DEFAULT_LAMBDA,
            None,
            |_| {},
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot read image /nonexistent.png"),
            "{e:#}"
        );
    }
}

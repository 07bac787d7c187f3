//! `unimic chat`: a terminal chat with a unimic server. Text lines are turns; `/image PATH`
//! attaches an image to the next turn; replies stream as they arrive. After each turn it shows
//! the bytes on the wire against what the same turn costs as an OpenAI-style JSON request with
//! the image as a base64 JPEG (quality 85) of the same pixels.

use std::io::{BufRead, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine as _;
use image::RgbImage;
use serde_json::json;
use unimic_chat::{Chat, ChatConfig, ChatError, Prompt, ReplyEvent};
#[allow(unused_imports)] // the trait's methods, whatever type the shipped tokenizer has
use unimic_codec::tokenizer::ImageTokenizer;
use unimic_transport::tls::CertHash;

/// `unimic chat` arguments.
#[derive(clap::Args)]
pub struct Args {
    /// The server's address, as `unimic serve` prints it (HOST:PORT).
    pub addr: String,
    /// The SHA-256 of the server's certificate (64 hex digits), as `unimic serve` prints it.
    #[arg(long)]
    pub pin: String,
    /// Bearer token, if the server asks for one.
    #[arg(long)]
    pub token: Option<String>,
    /// Images are scaled down to this many pixels on their longer side before tokenizing.
    #[arg(long, default_value_t = 512)]
    pub max_side: u32,
    /// Seconds to wait for each part of a reply (and for the connection).
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

/// An image attached to the next turn: its pixels as tokenized.
struct Attached {
    pixels: RgbImage,
    grid: unimic_transport::TokenGrid,
}

fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("{addr:?} is not a HOST:PORT address"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))
}

/// An OpenAI-style Chat Completions user message: the text and each image as a base64 JPEG-85
/// data URL.
fn json_message(text: &str, images: &[RgbImage]) -> anyhow::Result<serde_json::Value> {
    let mut content = vec![json!({"type": "text", "text": text})];
    for img in images {
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
            .encode_image(img)
            .context("JPEG encoding")?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&jpeg);
        content.push(json!({
            "type": "image_url",
            "image_url": {"url": format!("data:image/jpeg;base64,{b64}")}
        }));
    }
    Ok(json!({"role": "user", "content": content}))
}

fn request_bytes(messages: &[serde_json::Value]) -> anyhow::Result<usize> {
    let body = json!({"model": "gpt-4o", "stream": true, "messages": messages});
    Ok(serde_json::to_vec(&body)?.len())
}

/// Runs the chat until end of input or `/quit`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let pin: CertHash = args
        .pin
        .parse()
        .map_err(|_| anyhow::anyhow!("--pin must be the 64 hex digits `unimic serve` prints"))?;
    let addr = resolve(&args.addr)?;
    let tok = crate::models::tokenizer(None)?;
    let info = crate::serve::shipped_tokenizer_info()?;
    let codec = crate::serve::codec_config()?;
    let timeout = Duration::from_secs(args.timeout.max(1));
    let rt = tokio::runtime::Runtime::new()?;

    let mut config = ChatConfig::pinned(pin)
        .with_image_tokenizer(info)
        .with_codec(codec)
        .with_reply_timeout(Some(timeout));
    config.connect_timeout = timeout.min(Duration::from_secs(10));
    if let Some(t) = &args.token {
        config = config.with_token(t.clone().into_bytes());
    }
    let chat = rt
        .block_on(Chat::connect(addr, config))
        .map_err(|e| match e {
            ChatError::Connect(e) => anyhow::anyhow!(
            "could not connect to {addr}: {e} (is `unimic serve` running there, and is --pin the \
             one it printed?)"
        ),
            other => other.into(),
        })?;
    println!("connected to {addr}. Type a message; /image PATH attaches an image; /quit ends.");

    let mut attached: Vec<Attached> = Vec::new();
    let mut history: Vec<serde_json::Value> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/quit" {
            break;
        }
        if let Some(path) = line.strip_prefix("/image") {
            let path = path.trim();
            match attach(|img| tok.encode(img), Path::new(path), args.max_side) {
                Ok(a) => {
                    println!(
                        "[attached {path}: {}x{} px, {}x{} tokens; sent with the next message]",
                        a.pixels.width(),
                        a.pixels.height(),
                        a.grid.width(),
                        a.grid.height()
                    );
                    attached.push(a);
                }
                Err(e) => println!("[{e:#}]"),
            }
            continue;
        }
        if line.starts_with('/') {
            println!("[unknown command; /image PATH attaches an image, /quit ends]");
            continue;
        }
        let images: Vec<Attached> = std::mem::take(&mut attached);
        let mut prompt = Prompt::text(line);
        for a in &images {
            prompt = prompt.with_grid(a.grid.clone());
        }
        let pixels: Vec<RgbImage> = images.into_iter().map(|a| a.pixels).collect();
        let message = json_message(line, &pixels)?;
        let alone = request_bytes(std::slice::from_ref(&message))?;
        history.push(message);
        let with_history = request_bytes(&history)?;

        let result = rt.block_on(async {
            let mut reply = chat.send(prompt).await?;
            let mut text = String::new();
            let mut stats = None;
            while let Some(ev) = reply.next().await {
                match ev? {
                    ReplyEvent::Text(t) => {
                        print!("{t}");
                        let _ = std::io::stdout().flush();
                        text.push_str(&t);
                    }
                    ReplyEvent::Image(g) => {
                        println!("\n[an image, {}x{} tokens]", g.width(), g.height())
                    }
                    ReplyEvent::End(s) => stats = Some(s),
                    _ => {}
                }
            }
            Ok::<_, ChatError>((text, stats))
        });
        match result {
            Ok((text, Some(s))) => {
                println!();
                let wire = s.sent.wire_bytes;
                println!(
                    "[turn {}: {} B on the wire (reply {} B, {} ms); OpenAI-style JSON + base64 \
                     JPEG-85: {} B this turn alone ({:.1}x), {} B with the history a stateless \
                     API resends ({:.1}x)]",
                    s.turn,
                    wire,
                    s.received.wire_bytes,
                    s.elapsed.as_millis(),
                    alone,
                    alone as f64 / wire.max(1) as f64,
                    with_history,
                    with_history as f64 / wire.max(1) as f64
                );
                history.push(json!({"role": "assistant", "content": text}));
            }
            Ok((_, None)) => println!("\n[the reply ended without its end]"),
            Err(ChatError::Closed(reason)) => bail!("the server is gone: {reason}"),
            Err(e @ ChatError::Timeout(_)) => bail!("no reply: {e}"),
            Err(e) => println!("\n[error: {e}]"),
        }
    }
    rt.block_on(chat.close(Duration::from_secs(1)));
    Ok(())
}

/// Reads, scales and tokenizes an image with `encode`.
fn attach(
    encode: impl Fn(
        &RgbImage,
    ) -> Result<unimic_transport::TokenGrid, unimic_codec::tokenizer::TokenizerError>,
    path: &Path,
    max_side: u32,
) -> anyhow::Result<Attached> {
    if path.as_os_str().is_empty() {
        bail!("usage: /image PATH");
    }
    let img = image::open(path)
        .with_context(|| format!("cannot read image {}", path.display()))?
        .to_rgb8();
    let pixels = crate::models::fit(img, max_side);
    let grid = encode(&pixels).with_context(|| format!("tokenizing {}", path.display()))?;
    Ok(Attached { pixels, grid })
}

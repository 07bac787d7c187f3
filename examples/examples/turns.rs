//! Sends the same turn several times to a unimic server and prints, per turn, the reply and the
//! round trip (from sending the turn to the end of its reply), as one JSON object a line, then
//! a summary line: the Rust client's side of `python/bench/roundtrip.py`, and the Rust client
//! of the Python package's tests.
//!
//! ```text
//! cargo run -p unimic-examples --example turns -- ADDR PIN [--text T] [--image PATH | --grid PATH]
//!     [--turns N] [--warmup N] [--token T]
//! ```
//!
//! It connects as the Python client does: the shipped image tokenizer and entropy models
//! (`unimic_codec::shipped`), context reuse on. `--image` sends the photo as pixels (tokenized
//! every turn); `--grid` tokenizes it once and sends its grid every turn.
use std::sync::Arc;
use std::time::{Duration, Instant};

use unimic_chat::{Chat, ChatConfig, Prompt, ReplyEvent};
use unimic_codec::shipped;
use unimic_codec::tokenizer::{self, ImageTokenizer};
use unimic_transport::tls::CertHash;

struct Args {
    addr: std::net::SocketAddr,
    pin: CertHash,
    text: String,
    image: Option<String>,
    grid: bool,
    turns: usize,
    warmup: usize,
    token: Option<String>,
}

fn parse() -> Result<Args, String> {
    let usage = "usage: turns ADDR PIN [--text T] [--image PATH | --grid PATH] [--turns N] [--warmup N] [--token T]";
    let mut it = std::env::args().skip(1);
    let addr = it
        .next()
        .ok_or(usage)?
        .parse()
        .map_err(|e| format!("ADDR: {e}"))?;
    let pin = it
        .next()
        .ok_or(usage)?
        .parse()
        .map_err(|e| format!("PIN: {e}"))?;
    let mut a = Args {
        addr,
        pin,
        text: "hello".into(),
        image: None,
        grid: false,
        turns: 10,
        warmup: 2,
        token: None,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--text" => a.text = value()?,
            "--image" => a.image = Some(value()?),
            "--grid" => {
                a.image = Some(value()?);
                a.grid = true;
            }
            "--turns" => a.turns = value()?.parse().map_err(|e| format!("--turns: {e}"))?,
            "--warmup" => a.warmup = value()?.parse().map_err(|e| format!("--warmup: {e}"))?,
            "--token" => a.token = Some(value()?),
            other => return Err(format!("unknown argument {other:?}\n{usage}")),
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse()?;
    let tok = Arc::new(tokenizer::load_default()?);
    let codec = shipped::codec_config(&shipped::entropy_dir(None))?;
    let mut config = ChatConfig::pinned(args.pin)
        .with_codec(codec)
        .with_pixels(tok.clone())?;
    if let Some(t) = &args.token {
        config = config.with_token(t.clone().into_bytes());
    }
    let chat = Chat::connect(args.addr, config).await?;
    let photo = match &args.image {
        Some(p) => Some(tokenizer::fit(
            image::open(p)?.to_rgb8(),
            tokenizer::DEFAULT_MAX_SIDE,
        )),
        None => None,
    };
    let grid = match (&photo, args.grid) {
        (Some(p), true) => Some(tok.encode(p)?),
        _ => None,
    };
    let mut times = Vec::new();
    for i in 0..args.warmup + args.turns {
        let mut prompt = Prompt::text(args.text.clone());
        if let Some(g) = &grid {
            prompt = prompt.with_grid(g.clone());
        } else if let Some(p) = &photo {
            prompt = prompt.with_image(p.clone());
        }
        let started = Instant::now();
        let mut reply = chat.send(prompt).await?;
        let send_us = started.elapsed().as_secs_f64() * 1e6;
        let (mut text, mut images, mut stats) = (String::new(), Vec::new(), None);
        while let Some(ev) = reply.next().await {
            match ev? {
                ReplyEvent::Text(t) => text.push_str(&t),
                ReplyEvent::Image(g) => images.push([g.height(), g.width()]),
                ReplyEvent::End(s) => stats = Some(s),
                _ => {}
            }
        }
        let us = started.elapsed().as_secs_f64() * 1e6;
        let stats = stats.ok_or("the reply ended without its end")?;
        if i >= args.warmup {
            times.push(us);
            let text = serde_json::to_string(&text)?;
            println!(
                "{{\"turn\": {}, \"us\": {us:.1}, \"send_us\": {send_us:.1}, \"text\": {text}, \"images\": {images:?}, \"sent_wire_bytes\": {}, \"received_wire_bytes\": {}}}",
                i - args.warmup,
                stats.sent.wire_bytes,
                stats.received.wire_bytes
            );
        }
    }
    chat.close(Duration::from_secs(1)).await;
    times.sort_by(f64::total_cmp);
    if !times.is_empty() {
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        println!(
            "{{\"summary\": true, \"turns\": {}, \"p50_us\": {:.1}, \"mean_us\": {mean:.1}, \"min_us\": {:.1}}}",
            times.len(),
            times[times.len() / 2],
            times[0]
        );
    }
    Ok(())
}

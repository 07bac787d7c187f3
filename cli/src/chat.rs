//! `unimic chat`: a terminal chat with a unimic server. Text lines are turns; `/image PATH`
//! attaches an image to the next turn; `/edit`, `/outpaint`, `/vary` and `/gen` send requests
//! to a token-native agent; `/save DIR` writes the conversation's images; replies stream as
//! they arrive. After each turn it shows
//! the bytes on the wire against what the same turn costs as an OpenAI-style JSON request with
//! the image as a base64 JPEG (quality 85) of the same pixels.

use std::io::{BufRead, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use image::RgbImage;
use serde_json::json;
use unimic_agents::request::{Border, CellRect, Request, Task};
use unimic_chat::{Chat, ChatConfig, ChatError, Prompt, ReplyEvent};

use crate::demo::{
    json_assistant_content, json_reply_bytes, json_request_bytes, json_user_message,
};
#[allow(unused_imports)] // the trait's methods, whatever type the shipped tokenizer has
use unimic_codec::tokenizer::ImageTokenizer;
use unimic_transport::tls::{CertHash, Roots};

/// `unimic chat` arguments.
#[derive(clap::Args)]
pub struct Args {
    /// The server's address, as `unimic serve` prints it (HOST:PORT).
    pub addr: String,
    /// The SHA-256 of the server's certificate (64 hex digits), as `unimic serve` prints it.
    #[arg(long, required_unless_present = "ca", conflicts_with = "ca")]
    pub pin: Option<String>,
    /// Verify the server's certificate chain against the CA certificates in this PEM file (and
    /// its name against `--server-name`) instead of pinning it.
    #[arg(long, value_name = "PEM")]
    pub ca: Option<std::path::PathBuf>,
    /// The name the server's certificate must be valid for (with `--ca`; also sent as SNI).
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Bearer token, if the server asks for one.
    #[arg(long)]
    pub token: Option<String>,
    /// Images are scaled down to this many pixels on their longer side before tokenizing.
    #[arg(long, default_value_t = 512)]
    pub max_side: u32,
    /// Seconds to wait for each part of a reply (and for the connection).
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Levels of the quality ladder each attached image is sent with (1: the base grid; up to
    /// the tokenizer's levels, 4 for the default one; each level adds about as many bytes as
    /// the base and sharpens what the server sees).
    #[arg(long, default_value_t = 1)]
    pub levels: usize,
    /// Rate-distortion trade-off of the image codes: the weight of a bit against the image's
    /// mean quantization error (0 sends the nearest codes; the default saves about 3% of an
    /// image's bytes for 0.03 dB). Only when the server codes images with the generic model:
    /// otherwise the nearest codes are sent.
    #[arg(long, default_value_t = unimic_codec::rdo::DEFAULT_LAMBDA)]
    pub rdo: f32,
}

/// An image attached to the next turn: its pixels as tokenized, and its grids (the base grid,
/// then the refinement levels sent with it).
struct Attached {
    pixels: RgbImage,
    levels: Vec<unimic_transport::TokenGrid>,
}

fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("{addr:?} is not a HOST:PORT address"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))
}

/// One line typed at the prompt.
#[derive(Debug, Clone, PartialEq)]
enum Line {
    Quit,
    Help,
    Image(String),
    Request(Request, String),
    Seed(u64),
    Save(String),
    Text(String),
    Bad(String),
}

const HELP: &str = "text lines are turns; /image PATH attaches an image to the next turn; \
/edit X0 Y0 X1 Y1 [PROMPT] redraws cells x X0..X1, y Y0..Y1 of the last image; \
/outpaint N extends it by N cells on every side; /vary STRENGTH redraws that fraction of its cells; \
/gen [SIDE] PROMPT draws a new SIDExSIDE-token image (16 by default; larger ones stream in as \
they are drawn); /seed N sets the sampling seed; \
/save DIR writes the conversation's images as PNG; /quit ends";

/// Parses a line typed at the prompt (`seed` is the sampling seed of requests).
fn parse_line(line: &str, seed: u64) -> Line {
    let line = line.trim();
    let Some(command) = line.strip_prefix('/') else {
        return Line::Text(line.to_string());
    };
    let (name, rest) = command
        .split_once(char::is_whitespace)
        .unwrap_or((command, ""));
    let rest = rest.trim();
    let req = |task| Request::new(task).with_seed(seed);
    match name {
        "quit" | "exit" => Line::Quit,
        "help" => Line::Help,
        "image" if !rest.is_empty() => Line::Image(rest.to_string()),
        "image" => Line::Bad("usage: /image PATH".into()),
        "edit" => {
            let mut words = rest.split_whitespace();
            let nums: Vec<Option<u32>> = (0..4)
                .map(|_| words.next().and_then(|w| w.parse().ok()))
                .collect();
            let [Some(x0), Some(y0), Some(x1), Some(y1)] = nums[..] else {
                return Line::Bad(
                    "usage: /edit X0 Y0 X1 Y1 [PROMPT] (cells, end exclusive)".into(),
                );
            };
            let prompt: Vec<&str> = words.collect();
            let prompt = if prompt.is_empty() {
                format!("Redraw cells x {x0}..{x1}, y {y0}..{y1} of the last image.")
            } else {
                prompt.join(" ")
            };
            Line::Request(
                req(Task::Inpaint {
                    region: CellRect { x0, y0, x1, y1 },
                }),
                prompt,
            )
        }
        "outpaint" => match rest.parse::<u32>() {
            Ok(n) if n > 0 => Line::Request(
                req(Task::Outpaint {
                    border: Border {
                        top: n,
                        right: n,
                        bottom: n,
                        left: n,
                    },
                }),
                format!("Extend the last image by {n} cells on every side."),
            ),
            _ => Line::Bad("usage: /outpaint N (cells, at least 1)".into()),
        },
        "vary" => match rest.parse::<f32>() {
            Ok(s) if (0.0..=1.0).contains(&s) => Line::Request(
                req(Task::Variation { strength: s }),
                format!("A variation of the last image ({s})."),
            ),
            _ => Line::Bad("usage: /vary STRENGTH (0 to 1)".into()),
        },
        "gen" if !rest.is_empty() => {
            // An optional side first: `/gen 48 a parrot` (the shipped models take up to 64).
            let (side, prompt) = match rest.split_once(char::is_whitespace) {
                Some((n, p)) => match n.parse::<u32>() {
                    Ok(n) if (1..=64).contains(&n) && !p.trim().is_empty() => (n, p.trim()),
                    Ok(_) => return Line::Bad("usage: /gen [SIDE 1..64] PROMPT".into()),
                    Err(_) => (16, rest),
                },
                None => (16, rest),
            };
            Line::Request(
                req(Task::Generate {
                    height: side,
                    width: side,
                }),
                prompt.to_string(),
            )
        }
        "gen" => Line::Bad("usage: /gen [SIDE 1..64] PROMPT".into()),
        "seed" => match rest.parse() {
            Ok(n) => Line::Seed(n),
            Err(_) => Line::Bad("usage: /seed N".into()),
        },
        "save" if !rest.is_empty() => Line::Save(rest.to_string()),
        "save" => Line::Bad("usage: /save DIR".into()),
        other => Line::Bad(format!("unknown command /{other}; /help lists them")),
    }
}

/// Runs the chat until end of input or `/quit`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let base = match (&args.pin, &args.ca) {
        (Some(pin), None) => {
            let pin: CertHash = pin.parse().map_err(|_| {
                anyhow::anyhow!("--pin must be the 64 hex digits `unimic serve` prints")
            })?;
            ChatConfig::pinned(pin)
        }
        (None, Some(ca)) => ChatConfig::webpki(
            Roots::from_pem_file(ca)
                .with_context(|| format!("reading the CA certificates in {}", ca.display()))?,
        ),
        _ => anyhow::bail!("give either --pin or --ca"),
    };
    let addr = resolve(&args.addr)?;
    anyhow::ensure!(
        args.rdo.is_finite() && args.rdo >= 0.0,
        "--rdo {}: give a number >= 0 (0 keeps the nearest codes)",
        args.rdo
    );
    let info = crate::serve::shipped_tokenizer_info()?;
    let codec = crate::serve::codec_config()?;
    let generic = codec.generic.clone();
    let timeout = Duration::from_secs(args.timeout.max(1));
    let rt = tokio::runtime::Runtime::new()?;

    let mut config = base
        .with_server_name(args.server_name.clone())
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
             one it printed, or --ca the CA that signed its --cert for --server-name?)"
        ),
            other => other.into(),
        })?;
    println!("connected to {addr}. Type a message; /help lists the commands.");
    // Codes chosen for the generic model's bits when the server codes images with it (known
    // once connected), the nearest codes otherwise; both decode the same way.
    let generic = generic.filter(|_| chat.images_use_generic());
    let tok = crate::models::image_encoder_with(None, generic, args.rdo)?;

    let mut attached: Vec<Attached> = Vec::new();
    let mut history: Vec<serde_json::Value> = Vec::new();
    // Every image of the conversation (sent and received), for /save.
    let mut images: Vec<(String, Vec<unimic_transport::TokenGrid>)> = Vec::new();
    let mut seed = 1u64;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let Some(line) = lines.next() else { break };
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let (text, request) = match parse_line(&line, seed) {
            Line::Quit => break,
            Line::Help => {
                println!("[{HELP}]");
                continue;
            }
            Line::Bad(e) => {
                println!("[{e}]");
                continue;
            }
            Line::Seed(n) => {
                seed = n;
                println!("[sampling seed {n}]");
                continue;
            }
            Line::Save(dir) => {
                match save(&tok, &images, Path::new(&dir)) {
                    Ok(n) => println!("[wrote {n} images to {dir}]"),
                    Err(e) => println!("[{e:#}]"),
                }
                continue;
            }
            Line::Image(path) => {
                let levels = args.levels;
                match attach(
                    |img| tok.encode_levels(img, levels),
                    Path::new(&path),
                    args.max_side,
                ) {
                    Ok(a) => {
                        println!(
                            "[attached {path}: {}x{} px, {}x{} tokens{}; sent with the next message]",
                            a.pixels.width(),
                            a.pixels.height(),
                            a.levels[0].width(),
                            a.levels[0].height(),
                            match a.levels.len() {
                                1 => String::new(),
                                n => format!(", {n} quality levels"),
                            }
                        );
                        attached.push(a);
                    }
                    Err(e) => println!("[{e:#}]"),
                }
                continue;
            }
            Line::Text(text) => (text, None),
            Line::Request(r, text) => {
                seed = seed.wrapping_add(1);
                (text, Some(r))
            }
        };
        let sent_images: Vec<Attached> = std::mem::take(&mut attached);
        let mut prompt = Prompt::text(text.clone());
        for a in &sent_images {
            prompt = prompt.with_grid_levels(a.levels.clone());
            images.push((format!("sent-{}", images.len() + 1), a.levels.clone()));
        }
        if let Some(r) = request {
            prompt = prompt.with_request(r);
        }
        let pixels: Vec<RgbImage> = sent_images.into_iter().map(|a| a.pixels).collect();
        history.push(json_user_message(
            &text,
            &pixels.iter().collect::<Vec<_>>(),
        )?);
        // What a stateless API is sent for this turn: the whole conversation again.
        let json_up = json_request_bytes(&history)?;

        let result = rt.block_on(async {
            let mut reply = chat.send(prompt).await?;
            let mut text = String::new();
            let mut stats = None;
            let mut grids = Vec::new();
            while let Some(ev) = reply.next().await {
                match ev? {
                    ReplyEvent::Text(t) => {
                        print!("{t}");
                        let _ = std::io::stdout().flush();
                        text.push_str(&t);
                    }
                    ReplyEvent::ImageRows { height, rows, .. } => {
                        // The server streams an image the agent draws row by row.
                        print!("\r[receiving an image: {rows} of {height} rows]");
                        let _ = std::io::stdout().flush();
                    }
                    ReplyEvent::Image(g) => {
                        println!(
                            "\n[an image, {}x{} tokens; /save DIR writes it]",
                            g.width(),
                            g.height()
                        );
                        grids.push(g);
                    }
                    ReplyEvent::End(s) => stats = Some(s),
                    _ => {}
                }
            }
            Ok::<_, ChatError>((text, grids, stats))
        });
        match result {
            Ok((text, grids, Some(s))) => {
                println!();
                // The reply as such an API would send it: its images as base64 JPEG-85 of the
                // same pixels; they join the history (an edit of one needs it there).
                let reply_pixels = match grids.iter().map(|g| tok.decode(g)).collect() {
                    Ok(p) => p,
                    Err(e) => {
                        // The comparison leaves the images out; the chat goes on.
                        println!("[cannot detokenize the reply's image for the comparison: {e}]");
                        Vec::new()
                    }
                };
                let assistant = json_assistant_content(&text, &reply_pixels)?;
                let json_down = json_reply_bytes(&assistant)?;
                println!(
                    "{}",
                    turn_summary(
                        s.turn,
                        (s.sent.wire_bytes, s.received.wire_bytes),
                        s.elapsed,
                        (json_up, json_down)
                    )
                );
                history.push(json!({"role": "assistant", "content": assistant}));
                for g in grids {
                    images.push((format!("reply-{}", images.len() + 1), vec![g]));
                }
            }
            Ok((_, _, None)) => println!("\n[the reply ended without its end]"),
            Err(ChatError::Closed(reason)) => bail!("the server is gone: {reason}"),
            Err(e @ ChatError::Timeout(_)) => bail!("no reply: {e}"),
            Err(e) => println!("\n[error: {e}]"),
        }
    }
    rt.block_on(chat.close(Duration::from_secs(1)));
    Ok(())
}

/// The line after each turn: its bytes on the wire each way against the same turn as OpenAI-style
/// JSON with base64 JPEG-85 images (`json`: the request, with the history a stateless API resends,
/// and the reply), as `unimic demo` counts them.
fn turn_summary(turn: u64, wire: (u64, u64), elapsed: Duration, json: (u64, u64)) -> String {
    let (wire_total, json_total) = (wire.0 + wire.1, json.0 + json.1);
    format!(
        "[turn {turn}: {} B up + {} B down on the wire, {} ms; as OpenAI-style JSON + base64 \
         JPEG-85: {} B up (with the history a stateless API resends) + {} B down: {:.1}x]",
        wire.0,
        wire.1,
        elapsed.as_millis(),
        json.0,
        json.1,
        json_total as f64 / wire_total.max(1) as f64
    )
}

/// Writes every image of the conversation to `dir` as `NAME.png`; returns how many.
fn save(
    tok: &unimic_codec::tokenizer::DynTokenizer,
    images: &[(String, Vec<unimic_transport::TokenGrid>)],
    dir: &Path,
) -> anyhow::Result<usize> {
    if images.is_empty() {
        bail!("no image in the conversation yet");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, levels) in images {
        let path = dir.join(format!("{name}.png"));
        tok.decode_levels(levels)
            .with_context(|| format!("detokenizing {name}"))?
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(images.len())
}

/// Reads, scales and tokenizes an image with `encode` (its grids, base first).
fn attach(
    encode: impl Fn(
        &RgbImage,
    )
        -> Result<Vec<unimic_transport::TokenGrid>, unimic_codec::tokenizer::TokenizerError>,
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
    let levels = encode(&pixels).with_context(|| format!("tokenizing {}", path.display()))?;
    Ok(Attached { pixels, levels })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_turn_summary_counts_both_directions() {
        let line = turn_summary(4, (219, 239), Duration::from_millis(149), (51_188, 20_812));
        assert_eq!(
            line,
            "[turn 4: 219 B up + 239 B down on the wire, 149 ms; as OpenAI-style JSON + base64 \
             JPEG-85: 51188 B up (with the history a stateless API resends) + 20812 B down: 157.2x]"
        );
        // Nothing on the wire (cannot happen, but no division by zero).
        assert!(turn_summary(0, (0, 0), Duration::ZERO, (10, 0)).ends_with(": 10.0x]"));
    }

    #[test]
    fn commands_parse_into_requests_and_bad_ones_say_how() {
        assert_eq!(
            parse_line("hello there", 1),
            Line::Text("hello there".into())
        );
        assert_eq!(parse_line("/quit", 1), Line::Quit);
        assert_eq!(
            parse_line("/image a b.png", 1),
            Line::Image("a b.png".into())
        );
        let Line::Request(r, text) = parse_line("/edit 1 2 5 6 a blue sky", 9) else {
            panic!()
        };
        assert_eq!(text, "a blue sky");
        assert_eq!(r.seed, 9);
        assert_eq!(
            r.task,
            Task::Inpaint {
                region: CellRect {
                    x0: 1,
                    y0: 2,
                    x1: 5,
                    y1: 6
                }
            }
        );
        assert!(matches!(parse_line("/outpaint 2", 1), Line::Request(r, _)
            if r.task == Task::Outpaint { border: Border { top: 2, right: 2, bottom: 2, left: 2 } }));
        assert!(matches!(parse_line("/vary 0.3", 1), Line::Request(r, _)
            if r.task == Task::Variation { strength: 0.3 }));
        assert!(matches!(parse_line("/gen a cat", 1), Line::Request(_, t) if t == "a cat"));
        assert!(matches!(
            parse_line("/gen 48 a cat", 1),
            Line::Request(r, t) if t == "a cat"
                && r.task == Task::Generate { height: 48, width: 48 }
        ));
        assert!(matches!(parse_line("/gen 65 a cat", 1), Line::Bad(_)));
        assert!(matches!(parse_line("/gen 7", 1), Line::Request(_, t) if t == "7"));
        assert_eq!(parse_line("/seed 42", 1), Line::Seed(42));
        assert_eq!(parse_line("/save out", 1), Line::Save("out".into()));
        for bad in [
            "/edit 1 2 x 4",
            "/edit",
            "/outpaint 0",
            "/vary 2",
            "/gen",
            "/seed x",
            "/save",
            "/image",
            "/frobnicate",
        ] {
            assert!(matches!(parse_line(bad, 1), Line::Bad(_)), "{bad}");
        }
    }
}

//! What an edit reply costs on the wire, with real models, over a real session on loopback:
//!
//! ```text
//! cargo run -p unimic-transport --release --example edit_cost -- \
//!     --grids models/entropy/data/<hash>.val.umtg [--models models/entropy] [--n 12]
//! ```
//!
//! For each of the first `n` grids of a token-grid file (`.umtg`, docs/CODING.md §5) `a` and the
//! next one `b`: the client sends the *reference*, `a` with its centre (half the height and half
//! the width: a quarter of the cells) taken from `b`, coded with the generic transformer; the
//! server replies with `a` three ways in one message: an edit (masked transformer, only the centre
//! travels, conditioned on the reference the client holds), the whole grid with the generic
//! transformer, and the whole grid with the adaptive model after learning the reference. The
//! client checks that every reply decodes to `a`. Prints the mean wire bytes (frames of the part)
//! and payload bytes of each, then one JSON line.
//!
//! The models are the shipped manifests `unimic-entropy-generic-v11.json` and
//! `unimic-entropy-masked-v10.json` in `--models`; the grids must use their codebook (1,024) and
//! fit their largest side.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use unimic_codec::entropy::generic::Generic;
use unimic_codec::entropy::masked::Masked;
use unimic_codec::grid::{read_grid_file, TokenGrid};
use unimic_codec::part::CodecConfig;
use unimic_codec::shipped;
use unimic_transport::tls::{ClientTls, ServerTls};
use unimic_transport::{
    Client, ClientConfig, ContextKey, ModelChoice, OutgoingMessage, OutgoingPart, ReceivedPart,
    Role, Server, ServerConfig, SessionConfig, TokenizerInfo,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Args {
    grids: PathBuf,
    models: PathBuf,
    n: usize,
}

fn args() -> Result<Args> {
    let mut out = Args {
        grids: PathBuf::new(),
        models: PathBuf::from("models/entropy"),
        n: 12,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--grids" => out.grids = value.into(),
            "--models" => out.models = value.into(),
            "--n" => out.n = value.parse()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    if out.grids.as_os_str().is_empty() {
        return Err("--grids FILE (.umtg) is required".into());
    }
    Ok(out)
}

/// The centre quarter of a grid: rows `h/4 .. h/4 + h/2`, columns likewise.
fn centre(h: u32, w: u32) -> Vec<bool> {
    let (rows, cols) = (h / 4..h / 4 + h / 2, w / 4..w / 4 + w / 2);
    (0..h * w)
        .map(|i| rows.contains(&(i / w)) && cols.contains(&(i % w)))
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = args()?;
    let (generic, _) = Generic::load(&shipped::manifest_path(&args.models, shipped::GENERIC_ID))?;
    let (masked, _) = Masked::load(&shipped::manifest_path(&args.models, shipped::MASKED_ID))?;
    let k = generic.config().codebook_size as u32;
    let codec = CodecConfig::default()
        .with_generic(Arc::new(generic))
        .with_masked(Arc::new(masked));
    let session = SessionConfig::default()
        .with_tokenizer(TokenizerInfo::image("edit-cost-vq", [0; 32], k, 16))
        .with_codec(codec);
    let grids = read_grid_file(&std::fs::read(&args.grids)?, 1 << 26)?;
    if grids.len() < 2 {
        return Err("the grid file needs at least two grids".into());
    }

    let tls = ServerTls::self_signed()?;
    let pin = tls.identity.cert_hash();
    let mut server = Server::bind(ServerConfig::new(tls).with_session(session.clone()))?;
    let addr: SocketAddr = server.local_addr()?;
    let client = Client::new(ClientConfig::new(ClientTls::pinned(pin)).with_session(session))?;
    let (c, s) = tokio::join!(client.connect(addr, "localhost"), server.accept());
    let (client, server) = (c?, s.ok_or("server closed")?);

    // Per reply form: (wire bytes, payload bytes, tokens), summed.
    let mut sums = [(0u64, 0u64, 0u64); 3];
    let n = args.n.min(grids.len());
    for i in 0..n {
        let (a, b) = (&grids[i], &grids[(i + 1) % grids.len()]);
        if (b.height(), b.width()) != (a.height(), a.width()) {
            return Err(format!("grids {i} and {} differ in shape", i + 1).into());
        }
        let region = centre(a.height(), a.width());
        let pasted = a
            .ids()
            .iter()
            .zip(b.ids())
            .zip(&region)
            .map(|((&x, &y), &r)| if r { y } else { x })
            .collect();
        let reference = TokenGrid::new(a.height(), a.width(), a.codebook_size(), pasted)?;
        let up = client
            .send(
                OutgoingMessage::new(Role::User)
                    .with_part(OutgoingPart::image(reference).with_model(ModelChoice::Generic)),
            )
            .await?;
        server.recv().await?.ok_or("no message")?.collect().await?;
        let key = ContextKey::new(up.message_id, 0);
        let reply = server
            .send(
                OutgoingMessage::new(Role::Assistant)
                    .with_part(OutgoingPart::edit(a.clone(), key, region))
                    .with_part(OutgoingPart::image(a.clone()).with_model(ModelChoice::Generic))
                    .with_part(OutgoingPart::image(a.clone()).with_context(vec![key])),
            )
            .await?;
        let got = client.recv().await?.ok_or("no reply")?.collect().await?;
        if got
            .parts
            .iter()
            .any(|p| *p != ReceivedPart::Image(a.clone()))
        {
            return Err(format!("grid {i}: a reply did not decode to the edited grid").into());
        }
        for (sum, part) in sums.iter_mut().zip(&reply.parts) {
            sum.0 += part.wire_bytes;
            sum.1 += part.payload_bytes;
            sum.2 += part.tokens;
        }
    }

    let names = ["edit_masked", "whole_generic", "whole_adaptive_learned"];
    let mut json = format!("{{\"grids\":{n}");
    for (name, (wire, payload, tokens)) in names.iter().zip(sums) {
        let (w, p) = (wire as f64 / n as f64, payload as f64 / n as f64);
        let bpt = 8.0 * payload as f64 / tokens.max(1) as f64;
        println!(
            "{name:24} wire {w:8.1} B  payload {p:8.1} B  {:6.1} tokens  {bpt:5.2} bits/token",
            tokens as f64 / n as f64
        );
        json.push_str(&format!(
            ",\"{name}\":{{\"wire_bytes\":{w:.1},\"payload_bytes\":{p:.1},\"bits_per_token\":{bpt:.3}}}"
        ));
    }
    println!("{json}}}");
    Ok(())
}

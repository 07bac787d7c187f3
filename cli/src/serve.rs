//! `unimic serve`: answers chat sessions over QUIC with an agent (`unimic_chat::serve_with`),
//! printing the address and the certificate pin a client needs, and one line per turn.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use unimic_agents::echo::Echo;
use unimic_agents::Agent;
use unimic_chat::{serve_with, HistoryLimits, ServeOptions, TurnOutcome};
use unimic_codec::part::CodecConfig;
#[allow(unused_imports)] // the trait's methods, whatever type the shipped tokenizer has
use unimic_codec::tokenizer::ImageTokenizer;
use unimic_transport::tls::ServerTls;
use unimic_transport::{Server, ServerConfig, SessionConfig, TokenizerInfo};

/// `unimic serve` arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on (UDP).
    #[arg(long, default_value = "127.0.0.1:4433")]
    pub listen: SocketAddr,
    /// The agent that answers: `local` (the token-native agent: inpainting, outpainting,
    /// variations and text-to-image with the shipped models; no network), `openai` (an
    /// OpenAI-compatible server from `UNIMIC_OPENAI_BASE_URL`, `UNIMIC_OPENAI_MODEL` and
    /// `UNIMIC_OPENAI_API_KEY`; requests still go to the local agent) or `echo` (returns each
    /// turn's text and images).
    #[arg(long, default_value = "local", value_parser = ["local", "openai", "echo"])]
    pub agent: String,
    /// Accept only clients that send this bearer token.
    #[arg(long)]
    pub token: Option<String>,
    /// PEM file of the server's certificate chain (leaf first), for example one a CA signed for
    /// the server's name; clients then verify it with `unimic chat --ca` (or pin it). Without it
    /// the server makes a fresh self-signed certificate that clients pin.
    #[arg(long, requires = "key", value_name = "PEM")]
    pub cert: Option<std::path::PathBuf>,
    /// PEM file of the certificate's private key (with `--cert`).
    #[arg(long, requires = "cert", value_name = "PEM")]
    pub key: Option<std::path::PathBuf>,
    /// Stream a reply image the agent draws row by row once its first rows took this many
    /// milliseconds (the client sees it grow; an image done sooner goes whole, in the fewest
    /// bytes). `off`: always send images whole.
    #[arg(long, default_value = "50", value_name = "MS|off", value_parser = parse_stream_after)]
    pub stream_images_after: StreamAfter,
    /// Most turns of each session's conversation the agent is shown and the server keeps (the
    /// newest; the turn being answered is always kept).
    #[arg(long, default_value_t = HistoryLimits::default().max_turns as u32, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub history_turns: u32,
    /// Most mebibytes of each session's conversation kept (text, 4 bytes per image token, raw
    /// attachments; the newest turns that fit).
    #[arg(long, default_value_t = (HistoryLimits::default().max_bytes >> 20) as u32, value_name = "MIB",
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub history_mib: u32,
}

/// `--stream-images-after`: milliseconds, or `None` for `off`.
#[derive(Debug, Clone, Copy)]
pub struct StreamAfter(pub Option<std::time::Duration>);

fn parse_stream_after(s: &str) -> Result<StreamAfter, String> {
    if s == "off" {
        return Ok(StreamAfter(None));
    }
    s.parse::<u64>()
        .map(|ms| StreamAfter(Some(std::time::Duration::from_millis(ms))))
        .map_err(|_| format!("{s:?} is neither a number of milliseconds nor `off`"))
}

/// The server's TLS identity: the PEM certificate and key given, or a fresh self-signed one.
pub fn server_tls(
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> anyhow::Result<ServerTls> {
    match (cert, key) {
        (Some(c), Some(k)) => ServerTls::from_pem_files(c, k).with_context(|| {
            format!(
                "loading the certificate {} and key {}",
                c.display(),
                k.display()
            )
        }),
        (None, None) => ServerTls::self_signed().context("making the certificate"),
        _ => anyhow::bail!("--cert and --key go together"),
    }
}

/// The codec `serve`, `chat` and `demo` use: with the shipped generic transformer (images) and
/// masked transformer (edits: only the region travels) when present, so that both ends
/// negotiate them.
pub fn codec_config() -> anyhow::Result<CodecConfig> {
    let dir = crate::models::entropy_dir(None);
    unimic_codec::shipped::codec_config(&dir)
        .with_context(|| format!("loading the entropy models from {}", dir.display()))
}

/// The shipped image tokenizer's handshake identity (`serve` needs no weights to relay grids).
pub fn shipped_tokenizer_info() -> anyhow::Result<TokenizerInfo> {
    let tok = crate::models::tokenizer(None)?;
    let id = tok.id();
    Ok(unimic_chat::image_tokenizer_info(
        &id.name,
        &id.sha256,
        tok.codebook_size(),
        tok.factor(),
    )?)
}

/// Runs `unimic serve` until it is interrupted.
pub fn run(args: Args) -> anyhow::Result<()> {
    let agent: Arc<dyn Agent> = match args.agent.as_str() {
        "echo" => Arc::new(Echo),
        "local" => Arc::new(crate::demo::local_agent()?),
        "openai" => {
            let Some((_, lmm)) = crate::openai::from_env()? else {
                anyhow::bail!(
                    "--agent openai needs UNIMIC_OPENAI_BASE_URL (and UNIMIC_OPENAI_MODEL) set"
                )
            };
            Arc::new(crate::demo::Router::new(
                crate::demo::local_agent()?,
                Some(lmm),
            ))
        }
        other => anyhow::bail!("unknown agent {other:?} (available: local, openai, echo)"),
    };
    let (info, codec) = (shipped_tokenizer_info()?, codec_config()?);
    let tls = server_tls(args.cert.as_deref(), args.key.as_deref())?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let pin = tls.identity.cert_hash();
        let session = SessionConfig::default()
            .with_tokenizer(info)
            .with_codec(codec);
        let mut config = ServerConfig::new(tls)
            .with_bind(args.listen)
            .with_session(session);
        if let Some(t) = &args.token {
            config = config.with_tokens([t.clone().into_bytes()]);
        }
        let server =
            Server::bind(config).with_context(|| format!("listening on {}", args.listen))?;
        let addr = server.local_addr()?;
        println!("unimic serve: listening on {addr} (agent {})", args.agent);
        println!("pin {pin}");
        let token = args
            .token
            .as_ref()
            .map(|t| format!(" --token {t}"))
            .unwrap_or_default();
        println!("connect with: unimic chat {addr} --pin {pin}{token}");
        if args.cert.is_some() {
            println!(
                "or, verifying the certificate: unimic chat HOST:{} --ca CA.pem --server-name NAME{token}",
                addr.port()
            );
        }
        let options = ServeOptions::default()
            .with_stream_images_after(args.stream_images_after.0)
            .with_history(HistoryLimits {
                max_turns: args.history_turns as usize,
                max_bytes: (args.history_mib as usize) << 20,
            })
            .on_turn(|log| {
            let outcome = match &log.outcome {
                TurnOutcome::Answered => "answered".to_string(),
                TurnOutcome::Cancelled => "cancelled".to_string(),
                TurnOutcome::AgentFailed(r) => format!("agent failed: {r}"),
                TurnOutcome::Failed(r) => format!("failed: {r}"),
                other => format!("{other:?}"),
            };
            println!(
                "turn {} from {}: in {} B, out {} B, {} ms, {outcome}",
                log.turn,
                log.remote,
                log.bytes_in,
                log.bytes_out,
                log.elapsed.as_millis()
            );
        });
        serve_with(server, agent, options).await;
        Ok(())
    })
}

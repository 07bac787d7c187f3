//! unimic-chat: conversations between an edge client and an agent, over unimic sessions.
//!
//! This crate is the thin glue where the transport (`unimic-transport`, QUIC) and the agents
//! (`unimic-agents`, which know nothing of QUIC) meet:
//!
//! - **Server:** [`serve`] runs every session a [`Server`] accepts
//!   through an [`Agent`](unimic_agents::Agent): each turn is decoded into the agent's
//!   [`Conversation`](unimic_agents::Conversation) (kept per session), and the agent's output is
//!   streamed back as the reply (text deltas as one streamed text part, each image as an image
//!   part), correlated with the turn by `IN_REPLY_TO` (docs/PROTOCOL.md §5.3), with backpressure
//!   and cancellation.
//! - **Client:** [`Chat`] connects, sends a [`Prompt`] (text, token grids, or with feature
//!   `pixels` images as pixels), and returns its [`Reply`]: a stream of [`ReplyEvent`]s (text
//!   deltas as `String`s, images as token grids, with their first rows while a streamed image
//!   is still arriving, the end with statistics). Every turn is coded
//!   against the conversation so far by default.
//!
//! # A server with an agent of your own
//!
//! ```no_run
//! use unimic_agents::{Agent, AgentError, AgentFuture, Content, Conversation, ReplySink};
//!
//! struct Shout;
//! impl Agent for Shout {
//!     fn respond<'a>(&'a self, c: &'a Conversation, sink: &'a mut dyn ReplySink) -> AgentFuture<'a> {
//!         Box::pin(async move {
//!             for part in &c.turns.last().ok_or(AgentError::EmptyConversation)?.content {
//!                 if let Content::Text { text, .. } = part {
//!                     sink.text_delta(&text.to_uppercase()).await?;
//!                 }
//!             }
//!             Ok(())
//!         })
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let server = unimic_chat::bind_dev("127.0.0.1:4433".parse()?, [])?;
//!     println!("listening on {} with pin {}", server.local_addr()?, server.cert_hash());
//!     unimic_chat::serve(server, Shout).await;
//!     Ok(())
//! }
//! ```
//!
//! # A client
//!
//! ```no_run
//! use unimic_chat::{Chat, ChatConfig, Prompt, ReplyEvent};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let (addr, pin) = ("127.0.0.1:4433".parse()?, std::env::args().nth(1).ok_or("PIN")?.parse()?);
//!     let chat = Chat::connect(addr, ChatConfig::pinned(pin)).await?;
//!     let mut reply = chat.send(Prompt::text("hello, agent")).await?;
//!     while let Some(event) = reply.next().await {
//!         match event? {
//!             ReplyEvent::Text(delta) => print!("{delta}"),
//!             ReplyEvent::End(stats) => println!("\n({} bytes sent)", stats.sent.wire_bytes),
//!             _ => {}
//!         }
//!     }
//!     Ok(())
//! }
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod client;
mod context;
mod error;
mod history;
mod serve;
mod text;

use std::net::SocketAddr;

pub use client::{Chat, ChatConfig, Prompt, Reply, ReplyEvent, ReplyStats};
pub use error::ChatError;
pub use history::{content_bytes, HistoryLimits, BYTES_PER_CONTENT};
pub use serve::{
    serve, serve_session, serve_until, serve_with, ServeOptions, TurnCallback, TurnLog, TurnOutcome,
};

use unimic_transport::tls::ServerTls;
use unimic_transport::{Server, ServerConfig, SessionConfig, TokenizerInfo};

/// A server on `addr` in development mode (a fresh self-signed certificate, which clients pin by
/// [`Server::cert_hash`]), holding the o200k text tokenizer and `image_tokenizers` (by identity:
/// no weights are needed to relay grids), no authentication, default limits.
pub fn bind_dev(
    addr: SocketAddr,
    image_tokenizers: impl IntoIterator<Item = TokenizerInfo>,
) -> Result<Server, ChatError> {
    let tls = ServerTls::self_signed().map_err(|e| ChatError::Content(e.to_string()))?;
    bind(addr, tls, image_tokenizers)
}

/// A server on `addr` with the TLS identity `tls` (for example
/// [`ServerTls::from_pem_files`] with a certificate a CA signed, which clients verify with
/// [`ChatConfig::webpki`]; they can pin it too), holding the o200k text tokenizer and
/// `image_tokenizers`, no authentication, default limits.
pub fn bind(
    addr: SocketAddr,
    tls: ServerTls,
    image_tokenizers: impl IntoIterator<Item = TokenizerInfo>,
) -> Result<Server, ChatError> {
    let session = image_tokenizers
        .into_iter()
        .fold(SessionConfig::default(), |s, t| s.with_tokenizer(t));
    Ok(Server::bind(
        ServerConfig::new(tls).with_bind(addr).with_session(session),
    )?)
}

/// The handshake identity of an image tokenizer: its name, the lower-case hex SHA-256 of its
/// weights (as `TokenizerId::sha256` holds it), its codebook size and patch side in pixels.
pub fn image_tokenizer_info(
    name: &str,
    sha256_hex: &str,
    codebook_size: u32,
    patch: u32,
) -> Result<TokenizerInfo, ChatError> {
    let bad = || {
        ChatError::Content(format!(
            "tokenizer hash {sha256_hex:?} is not 64 hex digits"
        ))
    };
    if sha256_hex.len() != 64 || !sha256_hex.is_ascii() {
        return Err(bad());
    }
    let mut hash = [0u8; 32];
    for (i, b) in hash.iter_mut().enumerate() {
        *b = u8::from_str_radix(&sha256_hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(TokenizerInfo::image(name, hash, codebook_size, patch))
}

/// [`image_tokenizer_info`] of a loaded image tokenizer (feature `pixels`).
#[cfg(feature = "pixels")]
pub fn tokenizer_info(
    tokenizer: &dyn unimic_codec::tokenizer::ImageTokenizer,
) -> Result<TokenizerInfo, ChatError> {
    image_tokenizer_info(
        &tokenizer.id().name,
        &tokenizer.id().sha256,
        tokenizer.codebook_size(),
        tokenizer.factor(),
    )
}

//! unimic-transport: the unimic protocol over QUIC (quinn + tokio).
//!
//! A [`Client`] connects and a [`Server`] accepts; each yields a [`Session`] once the handshake
//! on the first bidirectional stream (docs/PROTOCOL.md) has agreed on the protocol version, the
//! tokenizers and entropy models (by content hash), the limits, and authenticated the client's
//! bearer token. Then each message travels on its own unidirectional stream, so messages never
//! block each other; parts arrive chunk by chunk, decoded as they come.
//!
//! Callers hand the session tokens ([`OutgoingPart::text`], [`OutgoingPart::image`]); the session
//! entropy-codes them with the negotiated models (unimic-codec's `PartCodec`), references and
//! digests the session context, and the receiving session verifies the digest and decodes. Both
//! ends keep their `SessionContext` in step (see [`session`](crate::Session) for the rules).
//!
//! When both codecs hold the same transformer weights (negotiated by weights hash), an image part
//! can be coded with the generic, masked or text-conditioned model (in one chunk, or in chunks
//! that continue one run of the model: [`MessageWriter::begin_image`] streams an image part as
//! its tokens come, and the receiver decodes each chunk as it arrives, PROTOCOL.md §6.6). An
//! **edit** ([`OutgoingPart::edit`]) sends only the cells of a region of an image the peer already
//! holds (masked mode, PROTOCOL.md §6.3); the peer rebuilds the whole grid. A
//! [`ModelChoice::TextCond`] image part reads the text parts it references.
//!
//! The API is caller-driven: [`Server::accept`], [`Session::recv`] and
//! [`IncomingMessage::next`] are pulled by the caller; nothing calls back. The background tasks
//! (one per server, one per session, and one per incoming message that cannot be handled at
//! once) are owned by the handles and end with them.
//!
//! # TLS
//! [`tls`]: development mode (a self-signed certificate the client pins by its SHA-256) and
//! production mode (PEM files, WebPKI verification), optional client certificates. ALPN is
//! `unimic/1`.
//!
//! # Example
//! A full turn on loopback:
//!
//! ```
//! use unimic_transport::tls::{ClientTls, ServerTls};
//! use unimic_transport::{Client, ClientConfig, OutgoingMessage, OutgoingPart, ReceivedPart, Role, Server, ServerConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tls = ServerTls::self_signed()?;
//! let pin = tls.identity.cert_hash();
//! let mut server = Server::bind(ServerConfig::new(tls).with_tokens(["s3cret"]))?;
//! let addr = server.local_addr()?;
//!
//! let client = Client::new(ClientConfig::new(ClientTls::pinned(pin)).with_token("s3cret"))?;
//! let (session, accepted) = tokio::join!(client.connect(addr, "localhost"), server.accept());
//! let (session, peer) = (session?, accepted.ok_or("server closed")?);
//!
//! let prompt = vec![13225, 11, 2375, 0];
//! let stats = session
//!     .send(OutgoingMessage::new(Role::User).with_part(OutgoingPart::text(prompt.clone())))
//!     .await?;
//! let got = peer.recv().await?.ok_or("no message")?.collect().await?;
//! assert_eq!(got.parts, vec![ReceivedPart::Text(prompt)]);
//! assert!(stats.wire_bytes > 0);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod budget;
mod config;
mod endpoint;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod inbox;
mod message;
mod models;
mod peer_ids;
mod recv;
mod region;
mod send;
mod session;
pub mod tls;
mod wire;

#[cfg(feature = "bench")]
pub mod bench;

pub use budget::{Rate, WorkBudget};
pub use config::{ClientConfig, QuicConfig, ServerConfig, SessionConfig};
pub use endpoint::{Client, Server};
pub use error::{ConnectError, EndpointError, RecvError, SendError, SessionError};
pub use message::{
    ChunkData, ImageStream, MessageEvent, MessageStats, OutgoingMessage, OutgoingPart, PartContent,
    PartInfo, PartKind, PartStats, ReceivedMessage, ReceivedPart, TextStream,
};
pub use models::{TokenizerInfo, TokenizerKind};
pub use recv::IncomingMessage;
pub use send::MessageWriter;
pub use session::{Session, Side};

pub use unimic_codec::context::ContextKey;
pub use unimic_codec::grid::TokenGrid;
pub use unimic_codec::part::ModelChoice;
pub use unimic_protocol::control::AckStage;
pub use unimic_protocol::handshake::{Auth, Negotiated};
pub use unimic_protocol::{ErrorCode, Limits, Role};

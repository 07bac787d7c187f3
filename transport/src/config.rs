//! Endpoint configuration: `Default` values that are safe, and `with_*` builder methods.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use unimic_codec::part::CodecConfig;
use unimic_protocol::handshake::Auth;
use unimic_protocol::Limits;

use crate::models::TokenizerInfo;
use crate::tls::{ClientTls, ServerTls};

/// QUIC-level settings shared by both sides.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct QuicConfig {
    /// Close the connection after this long without any packet from the peer (30 s).
    pub idle_timeout: Duration,
    /// Send a keep-alive packet after this long without sending (10 s); `None` disables.
    pub keep_alive: Option<Duration>,
    /// Per-stream receive window in bytes (1 MiB). Bounds what one message stream may buffer.
    pub stream_receive_window: u32,
    /// Connection-wide receive window in bytes (8 MiB).
    pub receive_window: u32,
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            keep_alive: Some(Duration::from_secs(10)),
            stream_receive_window: 1 << 20,
            receive_window: 8 << 20,
        }
    }
}

impl QuicConfig {
    /// Sets the idle timeout.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets (or disables) the keep-alive interval.
    pub fn with_keep_alive(mut self, interval: Option<Duration>) -> Self {
        self.keep_alive = interval;
        self
    }

    /// Builds quinn's transport config. Message streams start at zero and are opened up only
    /// when the handshake has finished; `bidi` is the number of bidirectional streams the peer may
    /// open (1 for a server: the control stream; 0 for a client).
    pub(crate) fn transport(&self, bidi: u32) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        // An idle timeout above quinn's bound (2^62 ms) is not representable; clamp to a day.
        let idle = self.idle_timeout.min(Duration::from_secs(86_400));
        t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
        t.keep_alive_interval(self.keep_alive);
        t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(bidi));
        t.stream_receive_window(quinn::VarInt::from_u32(self.stream_receive_window));
        t.receive_window(quinn::VarInt::from_u32(self.receive_window));
        t.datagram_receive_buffer_size(None);
        t
    }
}

/// What both sides of a session need beside TLS: models, limits, timeouts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionConfig {
    /// The limits this side announces (what it is willing to receive and hold).
    pub limits: Limits,
    /// The part codec configuration (text id space, static models). Its model identities are
    /// offered in the handshake.
    pub codec: CodecConfig,
    /// The tokenizers this side holds.
    pub tokenizers: Vec<TokenizerInfo>,
    /// Time allowed for the whole handshake, from connection accept (or connect) to hello (10 s).
    pub handshake_timeout: Duration,
    /// How long a part may wait for a context entry that is still arriving on another stream (5 s).
    pub context_wait: Duration,
    /// Acknowledge every received message on the control stream once decoded (on).
    pub send_acks: bool,
    /// How long a received message waits for its acknowledgement to be written (5 ms). Acks are
    /// never written on a message's critical path: they are queued, and the session driver
    /// writes whatever is queued, in one control-stream write, once this delay has passed since
    /// the first of them (so a busy session sends one batch per delay, not one frame per
    /// message).
    pub ack_delay: Duration,
    /// Tokens per chunk when the caller does not choose (4096).
    pub default_chunk_tokens: u32,
    /// Most positions the transformer entropy models (generic, masked, text-conditioned) may run
    /// for one received message, summed over its parts (65,536: sixteen 64×64 grids). A part is
    /// charged by the positions its model runs, not the cells it codes: a generic part its grid,
    /// a masked part the cells up to its last coded cell plus the known cells after its first
    /// (so a 1-cell edit of a 64×64 grid costs 4,096), a text-conditioned part its grid plus 64
    /// for the prompt. A part that would go past it is refused with `LIMIT_EXCEEDED` before any
    /// decoding, so a few bytes of payload cannot buy unbounded model work.
    pub max_message_model_tokens: u64,
    /// Longest a received message may go without new bytes before its end (60 s; `None`: no
    /// bound). A message that stalls longer is refused with `TIMEOUT` (PROTOCOL.md §11), so a
    /// peer cannot hold streams and their buffers open by trickling or stopping (slow-loris).
    /// Set it above the longest pause a legitimate sender makes mid-message (for example between
    /// two deltas of a streamed reply).
    pub message_stall_timeout: Option<Duration>,
    /// Each session's own budget of transformer positions per second
    /// ([`WorkBudget`](crate::WorkBudget); 16,384 per second, bursts of 131,072 = two messages at
    /// the per-message bound; `None`: unbounded). A part that would overdraw it is refused with
    /// `BUSY` before any decoding.
    pub session_model_rate: Option<crate::budget::Rate>,
    /// A budget every session made from this configuration shares (a server's sessions are made
    /// from clones of one configuration, so this bounds the whole server; `None` by default).
    pub shared_model_budget: Option<std::sync::Arc<crate::WorkBudget>>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            codec: CodecConfig::default(),
            tokenizers: vec![TokenizerInfo::o200k()],
            handshake_timeout: Duration::from_secs(10),
            context_wait: Duration::from_secs(5),
            send_acks: true,
            ack_delay: Duration::from_millis(5),
            default_chunk_tokens: 4096,
            max_message_model_tokens: 65_536,
            message_stall_timeout: Some(Duration::from_secs(60)),
            session_model_rate: Some(crate::budget::Rate {
                per_second: 16_384,
                burst: 131_072,
            }),
            shared_model_budget: None,
        }
    }
}

impl SessionConfig {
    /// Sets the announced limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets the codec configuration.
    pub fn with_codec(mut self, codec: CodecConfig) -> Self {
        self.codec = codec;
        self
    }

    /// Adds a tokenizer.
    pub fn with_tokenizer(mut self, tokenizer: TokenizerInfo) -> Self {
        self.tokenizers.push(tokenizer);
        self
    }

    /// Replaces the tokenizers.
    pub fn with_tokenizers(mut self, tokenizers: Vec<TokenizerInfo>) -> Self {
        self.tokenizers = tokenizers;
        self
    }

    /// Sets the handshake timeout.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Turns acknowledgements on or off.
    pub fn with_acks(mut self, on: bool) -> Self {
        self.send_acks = on;
        self
    }

    /// Sets how long acknowledgements are batched before they are written.
    pub fn with_ack_delay(mut self, delay: Duration) -> Self {
        self.ack_delay = delay;
        self
    }

    /// Sets each session's budget of transformer positions per second (`None`: unbounded).
    pub fn with_session_model_rate(mut self, rate: Option<crate::budget::Rate>) -> Self {
        self.session_model_rate = rate;
        self
    }

    /// Sets a budget of transformer positions per second that every session made from this
    /// configuration shares (for a server: all its sessions).
    pub fn with_shared_model_budget(
        mut self,
        budget: Option<std::sync::Arc<crate::WorkBudget>>,
    ) -> Self {
        self.shared_model_budget = budget;
        self
    }

    /// Sets how long a received message may stall before its end (`None`: no bound).
    pub fn with_message_stall_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.message_stall_timeout = timeout;
        self
    }

    /// Sets the most transformer positions one received message may ask for.
    pub fn with_max_message_model_tokens(mut self, tokens: u64) -> Self {
        self.max_message_model_tokens = tokens;
        self
    }

    /// Sets the default chunk size in tokens (at least 1).
    pub fn with_default_chunk_tokens(mut self, tokens: u32) -> Self {
        self.default_chunk_tokens = tokens.max(1);
        self
    }
}

/// Configuration of a [`Server`](crate::Server).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Address to bind (`127.0.0.1:0`).
    pub bind: SocketAddr,
    /// TLS: certificate, key, client certificate policy.
    pub tls: ServerTls,
    /// QUIC settings.
    pub quic: QuicConfig,
    /// Session settings.
    pub session: SessionConfig,
    /// Bearer-token policy (no authentication by default).
    pub auth: Auth,
    /// Most handshakes in progress at once; further connections are refused (256).
    pub max_pending_handshakes: usize,
}

impl ServerConfig {
    /// A configuration with `tls` and every other field at its default.
    pub fn new(tls: ServerTls) -> Self {
        Self {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            tls,
            quic: QuicConfig::default(),
            session: SessionConfig::default(),
            auth: Auth::None,
            max_pending_handshakes: 256,
        }
    }

    /// Sets the bind address.
    pub fn with_bind(mut self, bind: SocketAddr) -> Self {
        self.bind = bind;
        self
    }

    /// Sets the QUIC settings.
    pub fn with_quic(mut self, quic: QuicConfig) -> Self {
        self.quic = quic;
        self
    }

    /// Sets the session settings.
    pub fn with_session(mut self, session: SessionConfig) -> Self {
        self.session = session;
        self
    }

    /// Accepts exactly these bearer tokens (compared in constant time).
    pub fn with_tokens<I, T>(mut self, tokens: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<Bytes>,
    {
        self.auth = Auth::tokens(tokens);
        self
    }

    /// Sets the authentication policy.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }
}

/// Configuration of a [`Client`](crate::Client).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Local address to bind (`127.0.0.1:0`; use `0.0.0.0:0` to reach other hosts).
    pub bind: SocketAddr,
    /// TLS: how the server is verified, optional client certificate.
    pub tls: ClientTls,
    /// QUIC settings.
    pub quic: QuicConfig,
    /// Session settings.
    pub session: SessionConfig,
    /// The bearer token sent in the client hello (empty: none).
    pub token: Bytes,
}

impl ClientConfig {
    /// A configuration with `tls` and every other field at its default.
    pub fn new(tls: ClientTls) -> Self {
        Self {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            tls,
            quic: QuicConfig::default(),
            session: SessionConfig::default(),
            token: Bytes::new(),
        }
    }

    /// Sets the local bind address.
    pub fn with_bind(mut self, bind: SocketAddr) -> Self {
        self.bind = bind;
        self
    }

    /// Sets the QUIC settings.
    pub fn with_quic(mut self, quic: QuicConfig) -> Self {
        self.quic = quic;
        self
    }

    /// Sets the session settings.
    pub fn with_session(mut self, session: SessionConfig) -> Self {
        self.session = session;
        self
    }

    /// Sets the bearer token.
    pub fn with_token(mut self, token: impl Into<Bytes>) -> Self {
        self.token = token.into();
        self
    }
}

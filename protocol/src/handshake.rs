//! The handshake: hello messages, the rejection, and the sans-IO state machines of both sides.
//!
//! The client opens the first bidirectional stream of the connection (the *control stream*) and
//! sends a [`ClientHello`]. The server answers with a [`ServerHello`] (the connection is
//! established) or a [`Reject`] (the server then closes the connection with the reject's code).
//! Until then both sides decode frames with [`Limits::HANDSHAKE`]; afterwards with the negotiated
//! limits of [`Negotiated::limits`].
//!
//! [`Client`] and [`Server`] are pure state machines: they hold no sockets and no clock. Feed
//! them received frames; they return events or typed errors, and the frames to send.
//!
//! ```
//! use unimic_protocol::handshake::{self, Auth, ClientHello, ModelInfo, Policy, ServerEvent, ClientEvent};
//! use unimic_protocol::{Frame, Limits, VarInt};
//!
//! let vq = ModelInfo { id: "vq16".into(), version: VarInt::from_u32(1), hash: [7; 32] };
//! let mut client = handshake::Client::new(ClientHello {
//!     versions: vec![handshake::VERSION_1],
//!     tokenizers: vec![vq.clone()],
//!     entropy_models: vec![],
//!     limits: Limits::default(),
//!     token: b"secret".to_vec().into(),
//! });
//! let mut server = handshake::Server::new(Policy {
//!     versions: vec![handshake::VERSION_1],
//!     tokenizers: vec![vq],
//!     entropy_models: vec![],
//!     limits: Limits::default(),
//!     auth: Auth::tokens([b"secret".to_vec()]),
//! });
//! let hello = client.poll_transmit().unwrap();
//! let ServerEvent::Accepted { hello: reply, negotiated } = server.on_frame(hello)? else { panic!() };
//! let ClientEvent::Established(n) = client.on_frame(Frame::ServerHello(reply))? else { panic!() };
//! assert_eq!(n, negotiated);
//! assert_eq!(n.tokenizers.len(), 1);
//! # Ok::<(), handshake::HandshakeError>(())
//! ```

use std::fmt;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};

use crate::coding::{
    put_len, put_len_bytes, read_count, read_hash, read_len_bytes, read_string, read_varint,
    Decode, DecodeError, Encode,
};
use crate::error_code::ErrorCode;
use crate::frame::Frame;
use crate::limits::{
    Limits, MAX_MODELS, MAX_MODEL_ID_LEN, MAX_REASON_LEN, MAX_TOKEN_LEN, MAX_VERSIONS,
};
use crate::varint::VarInt;

/// Protocol version 1, the version this crate implements (ALPN `unimic/1`).
pub const VERSION_1: VarInt = VarInt::from_u32(1);

/// The identity of a tokenizer or entropy model: both sides must hold byte-identical weights.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ModelInfo {
    /// A short name, 1 to 64 bytes of UTF-8 (for example `"vq16-k1024"`).
    pub id: String,
    /// The model's version number.
    pub version: VarInt,
    /// SHA-256 of the model's weights file.
    pub hash: [u8; 32],
}

/// The client's offer, the first frame on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ClientHello {
    /// Protocol versions the client speaks, most preferred first (1 to 16, no duplicates).
    pub versions: Vec<VarInt>,
    /// Tokenizers the client holds (at most 64, no duplicates).
    pub tokenizers: Vec<ModelInfo>,
    /// Entropy models the client holds (at most 64, no duplicates).
    pub entropy_models: Vec<ModelInfo>,
    /// What the client is willing to receive.
    pub limits: Limits,
    /// A bearer token (at most 4096 bytes; empty for none).
    #[cfg_attr(feature = "arbitrary", arbitrary(with = crate::part::arbitrary_bytes))]
    pub token: Bytes,
}

/// The server's acceptance. Its model tables are the ones coded parts refer to by index.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ServerHello {
    /// The version chosen, one of the client's.
    pub version: VarInt,
    /// The tokenizers both sides hold, in the client's order: the session's tokenizer table.
    pub tokenizers: Vec<ModelInfo>,
    /// The entropy models both sides hold, in the client's order: the session's model table.
    pub entropy_models: Vec<ModelInfo>,
    /// The limits in force: the per-field minimum of the client's and the server's.
    pub limits: Limits,
}

/// The server's refusal, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Reject {
    /// `VERSION_UNSUPPORTED`, `MODEL_MISSING`, `UNAUTHORIZED`, `LIMITS_UNACCEPTABLE`, or another
    /// registry code.
    pub code: ErrorCode,
    /// A short human-readable reason (at most 1024 bytes).
    pub reason: String,
    /// The versions the server speaks (filled for `VERSION_UNSUPPORTED`, may be empty otherwise).
    pub supported_versions: Vec<VarInt>,
    /// The offered models the server lacks (filled for `MODEL_MISSING`).
    pub missing_models: Vec<ModelInfo>,
}

// ---------------------------------------------------------------------------------------------
// Wire encoding

impl Encode for ModelInfo {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        put_len_bytes(buf, self.id.as_bytes());
        self.version.encode(buf);
        buf.put_slice(&self.hash);
    }
}

impl Decode for ModelInfo {
    fn decode<B: Buf>(buf: &mut B, _limits: &Limits) -> Result<Self, DecodeError> {
        let id = read_string(buf, "model id length", MAX_MODEL_ID_LEN)?;
        if id.is_empty() {
            return Err(DecodeError::Malformed {
                what: "model id",
                reason: "empty",
            });
        }
        Ok(ModelInfo {
            id,
            version: read_varint(buf)?,
            hash: read_hash(buf)?,
        })
    }
}

fn put_versions<B: BufMut>(buf: &mut B, versions: &[VarInt]) {
    put_len(buf, versions.len());
    for v in versions {
        v.encode(buf);
    }
}

fn read_versions<B: Buf>(buf: &mut B, allow_empty: bool) -> Result<Vec<VarInt>, DecodeError> {
    let n = read_count(buf, "version count", MAX_VERSIONS, 1)?;
    if n == 0 && !allow_empty {
        return Err(DecodeError::Malformed {
            what: "versions",
            reason: "empty list",
        });
    }
    let mut out: Vec<VarInt> = Vec::with_capacity(n);
    for _ in 0..n {
        let v = read_varint(buf)?;
        if out.contains(&v) {
            return Err(DecodeError::Malformed {
                what: "versions",
                reason: "duplicate version",
            });
        }
        out.push(v);
    }
    Ok(out)
}

fn put_models<B: BufMut>(buf: &mut B, models: &[ModelInfo]) {
    put_len(buf, models.len());
    for m in models {
        m.encode(buf);
    }
}

fn read_models<B: Buf>(
    buf: &mut B,
    what: &'static str,
    limits: &Limits,
) -> Result<Vec<ModelInfo>, DecodeError> {
    // Each entry takes at least 1 + 1 + 1 + 32 bytes.
    let n = read_count(buf, what, MAX_MODELS, 35)?;
    let mut out: Vec<ModelInfo> = Vec::with_capacity(n);
    for _ in 0..n {
        let m = ModelInfo::decode(buf, limits)?;
        if out.contains(&m) {
            return Err(DecodeError::Malformed {
                what,
                reason: "duplicate model",
            });
        }
        out.push(m);
    }
    Ok(out)
}

impl Encode for ClientHello {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        put_versions(buf, &self.versions);
        put_models(buf, &self.tokenizers);
        put_models(buf, &self.entropy_models);
        self.limits.encode(buf);
        put_len_bytes(buf, &self.token);
    }
}

impl Decode for ClientHello {
    fn decode<B: Buf>(buf: &mut B, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(ClientHello {
            versions: read_versions(buf, false)?,
            tokenizers: read_models(buf, "tokenizer count", limits)?,
            entropy_models: read_models(buf, "entropy model count", limits)?,
            limits: Limits::decode(buf, limits)?,
            token: read_len_bytes(buf, "token length", MAX_TOKEN_LEN)?,
        })
    }
}

impl Encode for ServerHello {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.version.encode(buf);
        put_models(buf, &self.tokenizers);
        put_models(buf, &self.entropy_models);
        self.limits.encode(buf);
    }
}

impl Decode for ServerHello {
    fn decode<B: Buf>(buf: &mut B, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(ServerHello {
            version: read_varint(buf)?,
            tokenizers: read_models(buf, "tokenizer count", limits)?,
            entropy_models: read_models(buf, "entropy model count", limits)?,
            limits: Limits::decode(buf, limits)?,
        })
    }
}

impl Encode for Reject {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.code.encode(buf);
        put_len_bytes(buf, self.reason.as_bytes());
        put_versions(buf, &self.supported_versions);
        put_models(buf, &self.missing_models);
    }
}

impl Decode for Reject {
    fn decode<B: Buf>(buf: &mut B, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Reject {
            code: ErrorCode::decode(buf, limits)?,
            reason: read_string(buf, "reason length", MAX_REASON_LEN)?,
            supported_versions: read_versions(buf, true)?,
            missing_models: read_models(buf, "missing model count", limits)?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// State machines

/// What both sides agreed on; the session runs under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The protocol version.
    pub version: VarInt,
    /// The tokenizer table: `CodedPart::tokenizer` indexes it.
    pub tokenizers: Vec<ModelInfo>,
    /// The entropy model table: `CodedPart::entropy_model` indexes it.
    pub entropy_models: Vec<ModelInfo>,
    /// The limits in force (per-field minimum of both sides' limits).
    pub limits: Limits,
}

impl Negotiated {
    /// The tokenizer at `index` in the table, if any.
    pub fn tokenizer(&self, index: VarInt) -> Option<&ModelInfo> {
        self.tokenizers.get(index.to_usize()?)
    }

    /// The entropy model at `index` in the table, if any.
    pub fn entropy_model(&self, index: VarInt) -> Option<&ModelInfo> {
        self.entropy_models.get(index.to_usize()?)
    }

    fn from_hello(h: &ServerHello) -> Self {
        Negotiated {
            version: h.version,
            tokenizers: h.tokenizers.clone(),
            entropy_models: h.entropy_models.clone(),
            limits: h.limits,
        }
    }
}

/// Why a handshake failed on this side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// A frame that is not allowed in the current state.
    #[error("unexpected {frame} frame while {state}")]
    UnexpectedFrame {
        /// The frame's type name.
        frame: &'static str,
        /// What the state machine was waiting for.
        state: &'static str,
    },
    /// The server refused the connection.
    #[error("rejected by the server: {} ({})", .0.code, .0.reason)]
    Rejected(Reject),
    /// The server hello broke the rules (chose a version or a model the client did not offer,
    /// or raised a limit).
    #[error("invalid server hello: {0}")]
    InvalidServerHello(&'static str),
    /// The handshake had already finished (established, rejected or failed).
    #[error("the handshake has already finished")]
    Finished,
}

impl HandshakeError {
    /// The code to close the connection with.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            HandshakeError::Rejected(r) => r.code,
            HandshakeError::InvalidServerHello(reason) if reason.contains("limit") => {
                ErrorCode::LIMITS_UNACCEPTABLE
            }
            _ => ErrorCode::PROTOCOL_VIOLATION,
        }
    }
}

/// What the client's handshake produced.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The server accepted: the session is established under these terms.
    Established(Negotiated),
    /// An extension frame was skipped.
    Ignored,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    Start,
    AwaitServer,
    Done,
}

/// The client side of the handshake.
///
/// Call [`poll_transmit`](Client::poll_transmit) once to get the hello to send, then pass every
/// frame received on the control stream to [`on_frame`](Client::on_frame) until it returns
/// [`ClientEvent::Established`] or an error. Close the connection with
/// [`HandshakeError::error_code`] on error.
#[derive(Debug, Clone)]
pub struct Client {
    hello: ClientHello,
    state: ClientState,
}

impl Client {
    /// A client that will offer `hello`.
    pub fn new(hello: ClientHello) -> Self {
        Client {
            hello,
            state: ClientState::Start,
        }
    }

    /// The offer.
    pub fn hello(&self) -> &ClientHello {
        &self.hello
    }

    /// The next frame to send: the client hello, once.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        if self.state == ClientState::Start {
            self.state = ClientState::AwaitServer;
            Some(Frame::ClientHello(self.hello.clone()))
        } else {
            None
        }
    }

    /// Whether the handshake has finished, successfully or not.
    pub fn is_finished(&self) -> bool {
        self.state == ClientState::Done
    }

    /// Handles a frame received on the control stream.
    pub fn on_frame(&mut self, frame: Frame) -> Result<ClientEvent, HandshakeError> {
        match self.state {
            ClientState::Done => return Err(HandshakeError::Finished),
            ClientState::Start => {
                return Err(HandshakeError::UnexpectedFrame {
                    frame: frame.name(),
                    state: "the client hello is not sent yet",
                })
            }
            ClientState::AwaitServer => {}
        }
        let result = match frame {
            Frame::Extension { .. } => return Ok(ClientEvent::Ignored),
            Frame::ServerHello(h) => self
                .check(&h)
                .map(|()| ClientEvent::Established(Negotiated::from_hello(&h))),
            Frame::Reject(r) => Err(HandshakeError::Rejected(r)),
            other => Err(HandshakeError::UnexpectedFrame {
                frame: other.name(),
                state: "awaiting the server hello",
            }),
        };
        self.state = ClientState::Done;
        result
    }

    fn check(&self, h: &ServerHello) -> Result<(), HandshakeError> {
        if !self.hello.versions.contains(&h.version) {
            return Err(HandshakeError::InvalidServerHello("version not offered"));
        }
        if !subsequence(&h.tokenizers, &self.hello.tokenizers) {
            return Err(HandshakeError::InvalidServerHello(
                "tokenizer table is not a subset of the offer in its order",
            ));
        }
        if !subsequence(&h.entropy_models, &self.hello.entropy_models) {
            return Err(HandshakeError::InvalidServerHello(
                "entropy model table is not a subset of the offer in its order",
            ));
        }
        if !h.limits.within(&self.hello.limits) {
            return Err(HandshakeError::InvalidServerHello(
                "a limit is above the client's",
            ));
        }
        if h.limits.below_floor().is_some() {
            return Err(HandshakeError::InvalidServerHello(
                "a limit is below the protocol floor",
            ));
        }
        Ok(())
    }
}

/// Whether `sub` is `of` with some entries removed (order kept).
fn subsequence(sub: &[ModelInfo], of: &[ModelInfo]) -> bool {
    let mut rest = of.iter();
    sub.iter().all(|m| rest.any(|o| o == m))
}

/// A function that decides whether a bearer token is accepted.
pub type TokenCheck = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// How the server checks bearer tokens.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Auth {
    /// Every client is accepted (for local use and tests).
    #[default]
    None,
    /// The token must equal one of these (compared in constant time).
    Tokens(Vec<Bytes>),
    /// A function decides.
    Check(TokenCheck),
}

impl Auth {
    /// Accepts exactly these tokens.
    pub fn tokens<I, T>(tokens: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<Bytes>,
    {
        Auth::Tokens(tokens.into_iter().map(Into::into).collect())
    }

    /// Whether `token` is accepted.
    pub fn accepts(&self, token: &[u8]) -> bool {
        match self {
            Auth::None => true,
            Auth::Tokens(list) => list
                .iter()
                .fold(false, |ok, t| ok | constant_time_eq(t, token)),
            Auth::Check(f) => f(token),
        }
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("Auth::None"),
            Auth::Tokens(list) => write!(f, "Auth::Tokens({} tokens)", list.len()),
            Auth::Check(_) => f.write_str("Auth::Check(..)"),
        }
    }
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a server accepts.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Versions the server speaks.
    pub versions: Vec<VarInt>,
    /// Tokenizers the server holds.
    pub tokenizers: Vec<ModelInfo>,
    /// Entropy models the server holds.
    pub entropy_models: Vec<ModelInfo>,
    /// What the server is willing to receive.
    pub limits: Limits,
    /// How bearer tokens are checked.
    pub auth: Auth,
}

/// What the server's handshake produced.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// Send `Frame::ServerHello(hello)`; the session is established under `negotiated`.
    Accepted {
        /// The reply to send.
        hello: ServerHello,
        /// The terms of the session.
        negotiated: Negotiated,
    },
    /// Send `Frame::Reject(reject)`, then close the connection with `reject.code`.
    Rejected(Reject),
    /// An extension frame was skipped.
    Ignored,
}

/// The server side of the handshake.
///
/// Pass every frame received on the control stream to [`on_frame`](Server::on_frame) until it
/// returns [`ServerEvent::Accepted`], [`ServerEvent::Rejected`] or an error. The checks run in
/// this order: version, token, limits, models; the first failure decides the reject.
#[derive(Debug, Clone)]
pub struct Server {
    policy: Policy,
    done: bool,
}

impl Server {
    /// A server applying `policy`.
    pub fn new(policy: Policy) -> Self {
        Server {
            policy,
            done: false,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Whether the handshake has finished.
    pub fn is_finished(&self) -> bool {
        self.done
    }

    /// Handles a frame received on the control stream.
    pub fn on_frame(&mut self, frame: Frame) -> Result<ServerEvent, HandshakeError> {
        if self.done {
            return Err(HandshakeError::Finished);
        }
        let hello = match frame {
            Frame::Extension { .. } => return Ok(ServerEvent::Ignored),
            Frame::ClientHello(h) => h,
            other => {
                self.done = true;
                return Err(HandshakeError::UnexpectedFrame {
                    frame: other.name(),
                    state: "awaiting the client hello",
                });
            }
        };
        self.done = true;
        Ok(self.decide(&hello))
    }

    fn decide(&self, hello: &ClientHello) -> ServerEvent {
        let p = &self.policy;
        let reject = |code, reason: &str, missing: Vec<ModelInfo>| {
            ServerEvent::Rejected(Reject {
                code,
                reason: reason.to_owned(),
                supported_versions: p.versions.clone(),
                missing_models: missing,
            })
        };
        let Some(version) = hello
            .versions
            .iter()
            .copied()
            .find(|v| p.versions.contains(v))
        else {
            return reject(
                ErrorCode::VERSION_UNSUPPORTED,
                "no common protocol version",
                vec![],
            );
        };
        if !p.auth.accepts(&hello.token) {
            return reject(ErrorCode::UNAUTHORIZED, "bearer token not accepted", vec![]);
        }
        if let Some(field) = hello.limits.below_floor() {
            return reject(ErrorCode::LIMITS_UNACCEPTABLE, field, vec![]);
        }
        let (tokenizers, missing_tok) = split_held(&hello.tokenizers, &p.tokenizers);
        let (entropy_models, missing_ent) = split_held(&hello.entropy_models, &p.entropy_models);
        let no_tok = !hello.tokenizers.is_empty() && tokenizers.is_empty();
        let no_ent = !hello.entropy_models.is_empty() && entropy_models.is_empty();
        if no_tok || no_ent {
            let mut missing = missing_tok;
            missing.extend(missing_ent);
            let reason = if no_tok {
                "none of the offered tokenizers is held"
            } else {
                "none of the offered entropy models is held"
            };
            return reject(ErrorCode::MODEL_MISSING, reason, missing);
        }
        let hello = ServerHello {
            version,
            tokenizers,
            entropy_models,
            limits: hello.limits.negotiate(&p.limits),
        };
        let negotiated = Negotiated::from_hello(&hello);
        ServerEvent::Accepted { hello, negotiated }
    }
}

/// Splits `offered` into the models `held` contains and the others, keeping order.
fn split_held(offered: &[ModelInfo], held: &[ModelInfo]) -> (Vec<ModelInfo>, Vec<ModelInfo>) {
    offered.iter().cloned().partition(|m| held.contains(m))
}

//! The session state machine over real QUIC on loopback, driven by a sequence of operations.
//!
//! One server (built once per process, like a long-running deployment) holds a well-behaved client
//! session for the whole run. Each input connects a raw peer that runs the handshake by hand and
//! then plays the input's operations: it opens up to four message streams at once and writes into
//! them, in any interleaving, message headers, text and image parts coded honestly against the
//! context it has built so far (uniform, adaptive, static and a tiny transformer model, chunked or
//! not, referring to its earlier parts), raw parts, arbitrary frames and bytes, corrupted payloads,
//! message ends with right or wrong part counts, FIN and resets, and arbitrary frames on its
//! control stream. Meanwhile the good client sends a turn that refers to its previous one.
//!
//! Invariants:
//! - nothing panics (the panic hook aborts, so a panic inside a session task is a crash too);
//! - nothing hangs: every stream the peer finishes is read to its end or stopped, and the server's
//!   session for the peer ends once the peer closes, each within a bound;
//! - a message the peer sent honestly (one header, parts coded as a real sender codes them, its
//!   part count, FIN) that the server delivers is delivered with exactly the tokens and bytes sent;
//! - every frame the server writes on the control stream parses, and every ERROR it sends carries
//!   a registered code;
//! - if the server closes the connection, it does so with a registered error code;
//! - the good client's turn arrives whole and both ends of its session agree on the context
//!   digest, whatever the raw peer does next to it.
//!
//! The input is a byte grammar (see [`Op`] and [`encode`]), so that seeds can be written by hand.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use bytes::{Bytes, BytesMut};
use tokio::runtime::Runtime;
use tokio::sync::Mutex;
use unimic_codec::context::{ContextKey, Sequence, SessionContext};
use unimic_codec::entropy::generic::{Generic, GenericConfig};
use unimic_codec::entropy::Static;
use unimic_codec::grid::TokenGrid;
use unimic_codec::part::{model_id, CodecConfig, ModelChoice, PartCodec, PartSpec, PartTokens};
use unimic_protocol::handshake::{ClientHello, ModelInfo, ServerHello, VERSION_1};
use unimic_protocol::{
    frame, CodedPart, CodingMode, ContextRef, Encode, ErrorCode, Frame, Limits, MessageEnd,
    MessageHeader, PartBody, PartChunk, PartHeader, RawPart, Role, Shape, VarInt,
};
use unimic_transport::tls::{ClientTls, ServerTls};
use unimic_transport::{
    Client, ClientConfig, OutgoingMessage, OutgoingPart, ReceivedMessage, ReceivedPart, Server,
    ServerConfig, Session, SessionConfig, TokenizerInfo,
};

/// Codebook size of the image tokenizer the session negotiates.
const K: u32 = 16;
/// Streams the peer may hold open at once.
const SLOTS: usize = 4;
/// Operations read from one input at most.
const MAX_OPS: usize = 48;
/// Bound on every wait of the harness: exceeding it is a hang.
const STEP: Duration = Duration::from_secs(15);
/// How long the server lets a message stall before its end (PROTOCOL.md §11).
const STALL: Duration = Duration::from_secs(2);
/// The session's context budget (both ends).
const BUDGET: u64 = 64 * 1024;

/// One operation of the raw peer. Byte layout: a tag byte (`tag % 12`), then the operands, each
/// one byte unless said otherwise; `slot` is `byte % 4`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// (0) Opens a message stream in `slot` (finishing the one there).
    Open {
        /// Stream slot.
        slot: u8,
    },
    /// (1) MESSAGE_HEADER with this id and role (`role % 4`).
    Header {
        /// Stream slot.
        slot: u8,
        /// Message id.
        id: u8,
        /// Role (wire value, `% 4`).
        role: u8,
    },
    /// (2) A text part: its ids (byte count, then two bytes per id), model (`% 3`: uniform,
    /// adaptive, static), tokens per chunk (0: one chunk) and context references.
    Text {
        /// Stream slot.
        slot: u8,
        /// Token ids.
        ids: Vec<u16>,
        /// Model selector.
        model: u8,
        /// Tokens per chunk (0: the codec's default).
        chunk: u8,
        /// Reference selectors (count `% 4`): below `0xc0` one of the peer's context keys, else a
        /// key the peer does not hold.
        refs: Vec<u8>,
    },
    /// (3) An image part of `rows × cols` (each `% 6 + 1`), ids `% K` (one byte each), model
    /// (`% 4`: uniform, adaptive, static, generic), chunk and references as for text.
    Image {
        /// Stream slot.
        slot: u8,
        /// Rows selector.
        rows: u8,
        /// Columns selector.
        cols: u8,
        /// Token ids (exactly `rows × cols` bytes).
        ids: Vec<u8>,
        /// Model selector.
        model: u8,
        /// Tokens per chunk.
        chunk: u8,
        /// Reference selectors.
        refs: Vec<u8>,
    },
    /// (4) A raw part with these bytes (length byte, then the bytes).
    Raw {
        /// Stream slot.
        slot: u8,
        /// The part's bytes.
        bytes: Vec<u8>,
    },
    /// (5) An arbitrary frame (length byte, then bytes for `Arbitrary`).
    Frame {
        /// Stream slot.
        slot: u8,
        /// Input of `Frame::arbitrary`.
        seed: Vec<u8>,
    },
    /// (6) Arbitrary bytes (length byte, then the bytes).
    Bytes {
        /// Stream slot.
        slot: u8,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// (7) MESSAGE_END: the part count written (`count == 0xff`: the parts written so far).
    End {
        /// Stream slot.
        slot: u8,
        /// Declared part count.
        count: u8,
    },
    /// (8) FIN on the stream in `slot`.
    Finish {
        /// Stream slot.
        slot: u8,
    },
    /// (9) RESET_STREAM with this code.
    Reset {
        /// Stream slot.
        slot: u8,
        /// Error code.
        code: u8,
    },
    /// (10) An arbitrary frame on the control stream (length byte, then bytes for `Arbitrary`).
    Control {
        /// Input of `Frame::arbitrary`.
        seed: Vec<u8>,
    },
    /// (11) Flips a bit of the next chunk payload written in `slot`.
    Corrupt {
        /// Stream slot.
        slot: u8,
    },
}

/// Reads the operations of an input (at most [`MAX_OPS`]; a truncated last one is dropped).
pub fn parse(data: &[u8]) -> Vec<Op> {
    let mut c = Cursor(data);
    let mut ops = Vec::new();
    while ops.len() < MAX_OPS {
        let Some(op) = c.op() else { break };
        ops.push(op);
    }
    ops
}

/// The bytes of `ops` in the input grammar (the inverse of [`parse`]), for writing seeds.
pub fn encode(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    let with_len = |out: &mut Vec<u8>, b: &[u8]| {
        out.push(b.len() as u8);
        out.extend_from_slice(&b[..b.len().min(255)]);
    };
    for op in ops {
        match op {
            Op::Open { slot } => out.extend([0, *slot]),
            Op::Header { slot, id, role } => out.extend([1, *slot, *id, *role]),
            Op::Text {
                slot,
                ids,
                model,
                chunk,
                refs,
            } => {
                out.extend([2, *slot, ids.len() as u8]);
                for id in ids {
                    out.extend(id.to_be_bytes());
                }
                out.extend([*model, *chunk, refs.len() as u8]);
                out.extend(refs);
            }
            Op::Image {
                slot,
                rows,
                cols,
                ids,
                model,
                chunk,
                refs,
            } => {
                out.extend([3, *slot, rows.wrapping_sub(1), cols.wrapping_sub(1)]);
                out.extend(ids);
                out.extend([*model, *chunk, refs.len() as u8]);
                out.extend(refs);
            }
            Op::Raw { slot, bytes } => {
                out.extend([4, *slot]);
                with_len(&mut out, bytes);
            }
            Op::Frame { slot, seed } => {
                out.extend([5, *slot]);
                with_len(&mut out, seed);
            }
            Op::Bytes { slot, bytes } => {
                out.extend([6, *slot]);
                with_len(&mut out, bytes);
            }
            Op::End { slot, count } => out.extend([7, *slot, *count]),
            Op::Finish { slot } => out.extend([8, *slot]),
            Op::Reset { slot, code } => out.extend([9, *slot, *code]),
            Op::Control { seed } => {
                out.push(10);
                with_len(&mut out, seed);
            }
            Op::Corrupt { slot } => out.extend([11, *slot]),
        }
    }
    out
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a.to_vec())
    }

    fn counted(&mut self) -> Option<Vec<u8>> {
        let n = self.byte()?;
        self.take(usize::from(n))
    }

    fn refs(&mut self) -> Option<Vec<u8>> {
        let n = self.byte()? % 4;
        self.take(usize::from(n))
    }

    fn slot(&mut self) -> Option<u8> {
        Some(self.byte()? % SLOTS as u8)
    }

    fn op(&mut self) -> Option<Op> {
        Some(match self.byte()? % 12 {
            0 => Op::Open { slot: self.slot()? },
            1 => Op::Header {
                slot: self.slot()?,
                id: self.byte()?,
                role: self.byte()? % 4,
            },
            2 => {
                let slot = self.slot()?;
                let n = self.byte()? % 48;
                let raw = self.take(2 * usize::from(n))?;
                let ids = raw
                    .chunks(2)
                    .map(|p| u16::from_be_bytes([p[0], p[1]]))
                    .collect();
                Op::Text {
                    slot,
                    ids,
                    model: self.byte()? % 3,
                    chunk: self.byte()?,
                    refs: self.refs()?,
                }
            }
            3 => {
                let slot = self.slot()?;
                let (rows, cols) = (self.byte()? % 6 + 1, self.byte()? % 6 + 1);
                Op::Image {
                    slot,
                    rows,
                    cols,
                    ids: self.take(usize::from(rows) * usize::from(cols))?,
                    model: self.byte()? % 4,
                    chunk: self.byte()?,
                    refs: self.refs()?,
                }
            }
            4 => Op::Raw {
                slot: self.slot()?,
                bytes: self.counted()?,
            },
            5 => Op::Frame {
                slot: self.slot()?,
                seed: self.counted()?,
            },
            6 => Op::Bytes {
                slot: self.slot()?,
                bytes: self.counted()?,
            },
            7 => Op::End {
                slot: self.slot()?,
                count: self.byte()?,
            },
            8 => Op::Finish { slot: self.slot()? },
            9 => Op::Reset {
                slot: self.slot()?,
                code: self.byte()?,
            },
            10 => Op::Control {
                seed: self.counted()?,
            },
            _ => Op::Corrupt { slot: self.slot()? },
        })
    }
}

/// The server, its settings, and the good client's session pair.
struct Harness {
    rt: Runtime,
    server: Mutex<Server>,
    addr: SocketAddr,
    /// The raw peers' endpoint (one socket for every input; a fresh endpoint per input would
    /// spend most of an execution waiting for it to drain).
    peer_endpoint: quinn::Endpoint,
    codec: CodecConfig,
    limits: Limits,
    tokenizers: Vec<ModelInfo>,
    models: Vec<ModelInfo>,
    good: Mutex<Good>,
}

/// The good client's session and the server's end of it.
struct Good {
    _client: Client,
    client: Session,
    server: Session,
    turns: u64,
    last: Option<ContextKey>,
}

/// The codec both ends hold: the built-in models plus a static grid model and a tiny generic
/// transformer (so that the blocking pool and the model-work budget are on the path).
fn codec() -> CodecConfig {
    CodecConfig::default()
        .with_generic(Arc::new(
            Generic::synthetic(&GenericConfig::tiny(K as usize), 1).expect("tiny generic model"),
        ))
        .with_static_grid(Arc::new(
            Static::from_counts(vec![1; K as usize]).expect("static model"),
        ))
}

/// Small grids and messages, so that one execution stays cheap.
fn limits() -> Limits {
    Limits {
        max_grid_height: VarInt::from_u32(16),
        max_grid_width: VarInt::from_u32(16),
        max_message_bytes: VarInt::from_u32(1 << 20),
        max_context_bytes: VarInt::from_u64(BUDGET).expect("small"),
        ..Limits::default()
    }
}

fn session_config(codec: &CodecConfig, limits: Limits) -> SessionConfig {
    SessionConfig::default()
        .with_codec(codec.clone())
        .with_tokenizer(TokenizerInfo::image("fuzz-vq", [9; 32], K, 16))
        .with_limits(limits)
        .with_message_stall_timeout(Some(STALL))
        .with_handshake_timeout(STALL)
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        // A panic anywhere, a session task included, is a crash.
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            std::process::abort();
        }));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let codec = codec();
        let limits = limits();
        let config = session_config(&codec, limits);
        let tokenizers = config.tokenizers.iter().map(|t| t.info.clone()).collect();
        let (server, addr, good, models, peer_endpoint) = rt.block_on(async {
            let tls = ServerTls::self_signed().expect("certificate");
            let pin = tls.identity.cert_hash();
            let mut server =
                Server::bind(ServerConfig::new(tls).with_session(config.clone())).expect("server");
            let addr = server.local_addr().expect("address");
            let client =
                Client::new(ClientConfig::new(ClientTls::pinned(pin)).with_session(config.clone()))
                    .expect("client");
            let (c, s) = tokio::join!(client.connect(addr, "localhost"), server.accept());
            let (c, s) = (c.expect("good client"), s.expect("good session"));
            let models = c.negotiated().entropy_models.clone();
            let good = Good {
                _client: client,
                client: c,
                server: s,
                turns: 0,
                last: None,
            };
            let crypto = ClientTls::pinned(pin).quic_config().expect("TLS");
            let mut peer_endpoint =
                quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("endpoint");
            peer_endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
            (server, addr, good, models, peer_endpoint)
        });
        Harness {
            rt,
            server: Mutex::new(server),
            addr,
            peer_endpoint,
            codec,
            limits,
            tokenizers,
            models,
            good: Mutex::new(good),
        }
    })
}

/// What one execution reached, for checking that the seeds exercise the interesting paths.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reached {
    /// Honest messages the server delivered (each checked against what was sent).
    pub delivered: usize,
    /// Messages the server delivered whole, honest or not.
    pub received: usize,
    /// Messages whose receipt failed (refused, reset, incomplete).
    pub failed: usize,
    /// ERROR frames the server wrote on the control stream, by code name.
    pub errors: Vec<&'static str>,
    /// Whether the server closed the connection.
    pub closed: bool,
}

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    run_reached(data);
}

/// Runs the target on one input and says what it reached.
pub fn run_reached(data: &[u8]) -> Reached {
    let ops = parse(data);
    let h = harness();
    h.rt.block_on(async {
        tokio::time::timeout(4 * STEP, exec(h, ops))
            .await
            .expect("an execution hung")
    })
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("hang: {what} took more than {STEP:?}"),
    }
}

async fn exec(h: &'static Harness, ops: Vec<Op>) -> Reached {
    let mut reached = Reached::default();
    let (peer, accepted) = {
        let mut server = h.server.lock().await;
        within("connecting the raw peer", async {
            tokio::join!(RawPeer::connect(h), server.accept())
        })
        .await
    };
    let session = accepted.expect("the server accepts the raw peer");
    let drain = tokio::spawn(drain(session));
    let RawPeer {
        conn,
        control_send,
        control_recv,
        control,
        hello,
    } = peer;
    let control = tokio::spawn(read_control(control_recv, control));
    let mut player = Player::new(h, conn.clone(), control_send, &hello);
    let ((), ()) = tokio::join!(player.play(ops), good_turn(h));
    // Every stream the peer finished is read to its end or stopped by the server.
    let streams = player.finish_all().await;
    for s in streams {
        let _ = within("a finished stream to be received or stopped", s.stopped()).await;
    }
    // Let the server's tasks on this thread run what has arrived.
    for _ in 0..32 {
        tokio::task::yield_now().await;
    }
    let sent = std::mem::take(&mut player.honest);
    drop(player);
    let closed_by_server = conn.close_reason();
    conn.close(0u32.into(), b"done");
    let received = within("the server's session of the closed peer to end", drain)
        .await
        .expect("drain task");
    let control = within("the control stream to end", control)
        .await
        .expect("control task");
    if let Some(reason) = closed_by_server {
        check_close(&reason);
        reached.closed = true;
    }
    for (id, outcome) in received {
        let Ok(message) = outcome else {
            reached.failed += 1;
            continue;
        };
        reached.received += 1;
        if let Some(Some(parts)) = sent.get(&id) {
            check_delivered(&message, parts);
            reached.delivered += 1;
        }
    }
    for f in control {
        if let Frame::Error(e) = f {
            let name = e.code.name();
            assert!(
                name.is_some(),
                "the server sent an unregistered error code {:?}",
                e.code
            );
            reached.errors.extend(name);
        }
    }
    reached
}

/// A connection the server closed carries a registered code.
fn check_close(reason: &quinn::ConnectionError) {
    if let quinn::ConnectionError::ApplicationClosed(c) = reason {
        let code = ErrorCode(VarInt::from_u64(c.error_code.into_inner()).expect("a varint"));
        assert!(
            code.name().is_some(),
            "the server closed with an unregistered code {code:?}"
        );
    }
}

/// An honest message the server delivered holds what was sent.
fn check_delivered(message: &ReceivedMessage, parts: &[Sent]) {
    assert_eq!(
        message.parts.len(),
        parts.len(),
        "message {}: parts delivered vs sent",
        message.message_id
    );
    for (got, sent) in message.parts.iter().zip(parts) {
        match (got, sent) {
            (ReceivedPart::Text(ids), Sent::Text(s)) => assert_eq!(ids, s, "text part"),
            (ReceivedPart::Image(g), Sent::Image(s)) => assert_eq!(g, s, "image part"),
            (ReceivedPart::Raw { bytes, .. }, Sent::Raw(s)) => {
                assert_eq!(&bytes[..], &s[..], "raw part")
            }
            (got, sent) => panic!("delivered {got:?} for sent {sent:?}"),
        }
    }
}

/// Collects every message of the server's session with the peer until the connection ends.
async fn drain(session: Session) -> Vec<(u64, Result<ReceivedMessage, String>)> {
    let mut tasks = Vec::new();
    while let Ok(Some(m)) = session.recv().await {
        let id = m.message_id();
        tasks.push(tokio::spawn(async move {
            (id, m.collect().await.map_err(|e| e.to_string()))
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("collect task"));
    }
    out
}

/// Reads the control stream to its end (`dec` holds what the handshake read past the server
/// hello): every frame must parse.
async fn read_control(mut recv: quinn::RecvStream, mut dec: frame::Decoder) -> Vec<Frame> {
    let mut frames = Vec::new();
    loop {
        while let Some(f) = dec
            .next_frame()
            .unwrap_or_else(|e| panic!("the server wrote a control frame that does not parse: {e}"))
        {
            frames.push(f);
        }
        match recv.read_chunk(1 << 16, true).await {
            Ok(Some(c)) => dec.push(&c.bytes),
            _ => return frames,
        }
    }
}

/// One turn of the good client, referring to its previous turn: it arrives whole and both ends
/// agree on the context.
async fn good_turn(h: &Harness) {
    let mut good = h.good.lock().await;
    let good = &mut *good;
    good.turns += 1;
    let ids: Vec<u32> = (0..8)
        .map(|i| (good.turns as u32 * 31 + i) % 1000)
        .collect();
    let mut part = OutgoingPart::text(ids.clone()).with_model(ModelChoice::Adaptive);
    if let Some(last) = good.last {
        part = part.with_context(vec![last]);
    }
    let sent = within(
        "the good client's send",
        good.client
            .send(OutgoingMessage::new(Role::User).with_part(part)),
    )
    .await;
    let sent = sent.expect("the good client's turn is sent");
    let incoming = within("the good turn to reach the server", good.server.recv())
        .await
        .expect("the good session is alive")
        .expect("the good session is open");
    let id = incoming.message_id();
    let message = within("the good turn to be received", incoming.collect())
        .await
        .expect("the good turn arrives whole");
    assert_eq!(message.parts, vec![ReceivedPart::Text(ids)]);
    assert_eq!(id, sent.message_id);
    good.last = Some(ContextKey::new(id, 0));
    assert_eq!(
        good.client.context_digest(),
        good.server.context_digest(),
        "the good session's two ends disagree on the context"
    );
}

/// What an honest part carried.
#[derive(Debug, Clone)]
enum Sent {
    Text(Vec<u32>),
    Image(TokenGrid),
    Raw(Vec<u8>),
}

/// A message stream of the peer.
struct Slot {
    stream: quinn::SendStream,
    id: Option<u64>,
    parts: Vec<(u64, Sent, Option<Sequence>)>,
    honest: bool,
    ended: bool,
    corrupt: bool,
}

/// The raw peer's side: streams, the context it believes both ends hold, what it sent honestly.
struct Player {
    conn: quinn::Connection,
    control: quinn::SendStream,
    slots: Vec<Option<Slot>>,
    finished: Vec<quinn::SendStream>,
    mirror: SessionContext,
    codec: PartCodec,
    /// Message id → the parts of the honest message sent with it (`None`: the id was used more
    /// than once, or by a message that was not honest).
    honest: HashMap<u64, Option<Vec<Sent>>>,
    text_tokenizer: u64,
    image_tokenizer: u64,
    models: HashMap<String, u64>,
    budget: u64,
}

fn frame_bytes(f: &Frame) -> Bytes {
    let mut b = BytesMut::new();
    f.encode(&mut b);
    b.freeze()
}

fn v(x: u64) -> VarInt {
    VarInt::from_u64(x).expect("small value")
}

impl Player {
    fn new(
        h: &Harness,
        conn: quinn::Connection,
        control: quinn::SendStream,
        hello: &ServerHello,
    ) -> Self {
        let position =
            |list: &[ModelInfo], id: &str| list.iter().position(|m| m.id == id).unwrap_or(0) as u64;
        // The server's model table, by wire id (PROTOCOL.md §4.4).
        let models = hello
            .entropy_models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.clone(), i as u64))
            .collect();
        let budget = hello.limits.max_frame_bytes.into_inner().saturating_sub(64);
        Player {
            conn,
            control,
            slots: (0..SLOTS).map(|_| None).collect(),
            finished: Vec::new(),
            mirror: SessionContext::new(BUDGET),
            codec: PartCodec::new(h.codec.clone()),
            honest: HashMap::new(),
            text_tokenizer: position(&hello.tokenizers, "o200k_base"),
            image_tokenizer: position(&hello.tokenizers, "fuzz-vq"),
            models,
            budget,
        }
    }

    async fn play(&mut self, ops: Vec<Op>) {
        for op in ops {
            if self.conn.close_reason().is_some() {
                return;
            }
            self.step(op).await;
        }
    }

    async fn write(&mut self, slot: u8, bytes: &[u8]) {
        let Some(s) = self.slots[usize::from(slot)].as_mut() else {
            return;
        };
        // The server may stop the stream or close the connection at any point.
        if s.stream.write_all(bytes).await.is_err() {
            s.honest = false;
        }
    }

    async fn write_frame(&mut self, slot: u8, f: &Frame) {
        self.write(slot, &frame_bytes(f)).await;
    }

    fn dishonest(&mut self, slot: u8) {
        if let Some(s) = self.slots[usize::from(slot)].as_mut() {
            s.honest = false;
        }
    }

    async fn step(&mut self, op: Op) {
        match op {
            Op::Open { slot } => {
                self.close_slot(slot).await;
                if let Ok(Ok(stream)) =
                    tokio::time::timeout(Duration::from_millis(200), self.conn.open_uni()).await
                {
                    self.slots[usize::from(slot)] = Some(Slot {
                        stream,
                        id: None,
                        parts: Vec::new(),
                        honest: true,
                        ended: false,
                        corrupt: false,
                    });
                }
            }
            Op::Header { slot, id, role } => {
                let Some(s) = self.slots[usize::from(slot)].as_mut() else {
                    return;
                };
                if s.id.is_some() {
                    s.honest = false;
                }
                s.id = Some(u64::from(id));
                let role =
                    [Role::User, Role::Assistant, Role::System, Role::Tool][usize::from(role)];
                let f = Frame::MessageHeader(MessageHeader {
                    message_id: v(u64::from(id)),
                    role,
                });
                self.write_frame(slot, &f).await;
            }
            Op::Text {
                slot,
                ids,
                model,
                chunk,
                refs,
            } => {
                let ids: Vec<u32> = ids.iter().map(|&i| u32::from(i)).collect();
                let choice = [
                    ModelChoice::Uniform,
                    ModelChoice::Adaptive,
                    ModelChoice::Static,
                ][usize::from(model)];
                self.coded(slot, PartTokens::Text(&ids), choice, chunk, &refs)
                    .await;
            }
            Op::Image {
                slot,
                rows,
                cols,
                ids,
                model,
                chunk,
                refs,
            } => {
                let ids = ids.iter().map(|&i| u32::from(i) % K).collect();
                let Ok(grid) = TokenGrid::new(u32::from(rows), u32::from(cols), K, ids) else {
                    return;
                };
                let choice = [
                    ModelChoice::Uniform,
                    ModelChoice::Adaptive,
                    ModelChoice::Static,
                    ModelChoice::Generic,
                ][usize::from(model)];
                self.coded(slot, PartTokens::Grid(&grid), choice, chunk, &refs)
                    .await;
            }
            Op::Raw { slot, bytes } => {
                let Some(s) = self.slots[usize::from(slot)].as_mut() else {
                    return;
                };
                let index = s.parts.len() as u64;
                s.parts.push((index, Sent::Raw(bytes.clone()), None));
                let header = Frame::PartHeader(PartHeader {
                    index: v(index),
                    body: PartBody::Raw(RawPart {
                        media_type: "application/octet-stream".into(),
                    }),
                });
                let chunk = Frame::PartChunk(PartChunk {
                    part_index: v(index),
                    seq: v(0),
                    fin: true,
                    token_count: v(0),
                    payload: Bytes::from(bytes),
                });
                self.write_frame(slot, &header).await;
                self.write_frame(slot, &chunk).await;
            }
            Op::Frame { slot, seed } => {
                self.dishonest(slot);
                if let Ok(f) = Frame::arbitrary(&mut Unstructured::new(&seed)) {
                    self.write_frame(slot, &f).await;
                }
            }
            Op::Bytes { slot, bytes } => {
                self.dishonest(slot);
                self.write(slot, &bytes).await;
            }
            Op::End { slot, count } => {
                let Some(s) = self.slots[usize::from(slot)].as_mut() else {
                    return;
                };
                let actual = s.parts.len() as u64;
                let count = if count == 0xff {
                    actual
                } else {
                    u64::from(count)
                };
                if s.ended || count != actual {
                    s.honest = false;
                }
                s.ended = true;
                let f = Frame::MessageEnd(MessageEnd {
                    part_count: v(count),
                });
                self.write_frame(slot, &f).await;
            }
            Op::Finish { slot } => self.close_slot(slot).await,
            Op::Reset { slot, code } => {
                if let Some(mut s) = self.slots[usize::from(slot)].take() {
                    let _ = s.stream.reset(u32::from(code).into());
                    self.note(s, false);
                }
            }
            Op::Control { seed } => {
                if let Ok(f) = Frame::arbitrary(&mut Unstructured::new(&seed)) {
                    let _ = self.control.write_all(&frame_bytes(&f)).await;
                }
            }
            Op::Corrupt { slot } => {
                if let Some(s) = self.slots[usize::from(slot)].as_mut() {
                    s.corrupt = true;
                    s.honest = false;
                }
            }
        }
    }

    /// Writes a coded part, coded as a real sender codes it against the peer's context.
    async fn coded(
        &mut self,
        slot: u8,
        tokens: PartTokens<'_>,
        choice: ModelChoice,
        chunk: u8,
        refs: &[u8],
    ) {
        let Some(s) = self.slots[usize::from(slot)].as_ref() else {
            return;
        };
        let index = s.parts.len() as u64;
        let keys = self.mirror.keys();
        let mut known = true;
        let refs: Vec<ContextKey> = refs
            .iter()
            .map(|&r| {
                if r < 0xc0 && !keys.is_empty() {
                    keys[usize::from(r) % keys.len()]
                } else {
                    known = false;
                    ContextKey::new(u64::from(r), 0)
                }
            })
            .collect();
        let mut spec = PartSpec::new(choice);
        if chunk > 0 {
            // Transformer parts too: their chunks continue one run of the model.
            spec = spec.with_chunk_tokens(u32::from(chunk));
        }
        let coded = if known {
            self.codec
                .encode(&self.mirror, tokens, &spec.clone().with_refs(refs.clone()))
        } else {
            self.codec.encode(&self.mirror, tokens, &spec)
        };
        let Ok(coded) = coded else {
            return;
        };
        if coded
            .chunks
            .iter()
            .any(|c| c.payload.len() as u64 > self.budget)
        {
            return;
        }
        let digest = if known { coded.digest } else { [0; 32] };
        let (body, sent, seq) = {
            // A model the session did not negotiate cannot be sent honestly.
            let Some(&model) = self.models.get(model_id::wire_name(coded.model.id)) else {
                return;
            };
            let context = refs
                .iter()
                .map(|k| ContextRef {
                    message_id: v(k.message_id),
                    part_index: v(k.part_index),
                })
                .collect();
            match tokens {
                PartTokens::Text(ids) => (
                    PartBody::Text(CodedPart {
                        tokenizer: v(self.text_tokenizer),
                        entropy_model: v(model),
                        shape: Shape {
                            rows: v(1),
                            cols: v(ids.len() as u64),
                        },
                        token_count: v(ids.len() as u64),
                        mode: CodingMode::Uniform,
                        context,
                        context_digest: digest,
                    }),
                    Sent::Text(ids.to_vec()),
                    Sequence::text(ids.to_vec()),
                ),
                PartTokens::Grid(g) => (
                    PartBody::Image(CodedPart {
                        tokenizer: v(self.image_tokenizer),
                        entropy_model: v(model),
                        shape: Shape {
                            rows: v(u64::from(g.height())),
                            cols: v(u64::from(g.width())),
                        },
                        token_count: v(u64::from(g.height() * g.width())),
                        mode: if choice == ModelChoice::Generic {
                            CodingMode::Generic
                        } else {
                            CodingMode::Uniform
                        },
                        context,
                        context_digest: digest,
                    }),
                    Sent::Image(g.clone()),
                    Sequence::grid(g),
                ),
            }
        };
        let mut frames = vec![Frame::PartHeader(PartHeader {
            index: v(index),
            body,
        })];
        let count = coded.chunks.len();
        let s = self.slots[usize::from(slot)]
            .as_mut()
            .expect("slot checked");
        for (i, c) in coded.chunks.into_iter().enumerate() {
            let mut payload = c.payload;
            if std::mem::take(&mut s.corrupt) {
                match payload.first_mut() {
                    Some(b) => *b ^= 0x10,
                    None => payload.push(0x10),
                }
            }
            frames.push(Frame::PartChunk(PartChunk {
                part_index: v(index),
                seq: v(i as u64),
                fin: i + 1 == count,
                token_count: VarInt::from_u32(c.tokens),
                payload: Bytes::from(payload),
            }));
        }
        if !known {
            s.honest = false;
        }
        s.parts.push((index, sent, Some(seq)));
        for f in frames {
            self.write_frame(slot, &f).await;
        }
    }

    /// Finishes the stream in `slot` (if any) and records an honest message.
    async fn close_slot(&mut self, slot: u8) {
        if let Some(mut s) = self.slots[usize::from(slot)].take() {
            let ok = s.stream.finish().is_ok();
            self.note(s, ok);
        }
    }

    /// Records a stream that is done: its message, if honest and finished, enters the peer's
    /// context and the list of what must arrive intact.
    fn note(&mut self, s: Slot, finished: bool) {
        let honest = s.honest && s.ended && finished;
        if let Some(id) = s.id {
            // An id used twice: the server refuses the second; no check for either.
            let first = !self.honest.contains_key(&id);
            let entry = self.honest.entry(id).or_insert(None);
            *entry = None;
            if honest && first {
                *entry = Some(s.parts.iter().map(|(_, p, _)| p.clone()).collect());
                for (index, _, seq) in &s.parts {
                    if let Some(seq) = seq {
                        let _ = self.mirror.insert(ContextKey::new(id, *index), seq.clone());
                    }
                }
            }
        }
        if finished {
            self.finished.push(s.stream);
        }
    }

    /// Finishes every open stream; returns every finished stream.
    async fn finish_all(&mut self) -> Vec<quinn::SendStream> {
        for slot in 0..SLOTS as u8 {
            self.close_slot(slot).await;
        }
        std::mem::take(&mut self.finished)
    }
}

/// A raw peer after a successful handshake.
struct RawPeer {
    conn: quinn::Connection,
    control_send: quinn::SendStream,
    control_recv: quinn::RecvStream,
    control: frame::Decoder,
    hello: ServerHello,
}

impl RawPeer {
    /// Connects and runs the handshake by hand, offering what the good client offers.
    async fn connect(h: &Harness) -> RawPeer {
        let conn = h
            .peer_endpoint
            .connect(h.addr, "localhost")
            .expect("connect")
            .await
            .expect("QUIC handshake");
        let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
        let hello = ClientHello {
            versions: vec![VERSION_1],
            tokenizers: h.tokenizers.clone(),
            entropy_models: h.models.clone(),
            limits: h.limits,
            token: Bytes::new(),
        };
        send.write_all(&frame_bytes(&Frame::ClientHello(hello)))
            .await
            .expect("client hello");
        let mut dec = frame::Decoder::new(Limits::HANDSHAKE);
        let hello = loop {
            if let Some(f) = dec.next_frame().expect("server hello parses") {
                match f {
                    Frame::ServerHello(h) => break h,
                    other => panic!("expected a server hello, got {other:?}"),
                }
            }
            let chunk = recv
                .read_chunk(1 << 16, true)
                .await
                .expect("control stream")
                .expect("control stream open");
            dec.push(&chunk.bytes);
        };
        dec.set_limits(hello.limits);
        RawPeer {
            conn,
            control_send: send,
            control_recv: recv,
            control: dec,
            hello,
        }
    }
}

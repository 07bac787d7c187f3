//! Incoming messages: the per-stream task that parses, checks and decodes a message (run first by
//! whoever accepted the stream, see [`crate::inbox`]), and the [`IncomingMessage`] handle
//! through which the caller pulls its events.
//!
//! This file holds the handle and the task's stream loop (frames in, events out, the message's
//! end); `part.rs` the part layer (a part header checked before any decoding, chunks decoded,
//! the part assembled and committed to the context).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use unimic_codec::context::{ContextError, ContextKey, Sequence, SequenceKind};
use unimic_codec::grid::TokenGrid;
use unimic_codec::part::{DecodedPart, ModelChoice, PartDecoder, PartError, PartShape, PartSpec};
use unimic_protocol::control::{Ack, AckStage, Cancel};
use unimic_protocol::message::{Event, Reader};
use unimic_protocol::{
    CodedPart, CodingMode, ErrorCode, ErrorFrame, Frame, PartBody, PartChunk, PartHeader, Role,
    VarInt,
};

use crate::error::RecvError;
use crate::inbox::LiveTask;
use crate::message::{
    ChunkData, MessageEvent, MessageStats, PartInfo, PartKind, PartStats, ReceivedMessage,
    ReceivedPart,
};
use crate::models::{entropy_at, TokenizerKind};
use crate::session::Shared;
use crate::wire;

/// Positions charged for a text-conditioned part's prompt on top of its grid: the prompt the
/// model reads is at most this long (`TextCondConfig::max_text` of the shipped models).
const TEXT_PROMPT_POSITIONS: u64 = 64;

/// Event batches buffered per message before the reader waits for the caller.
const BATCH_DEPTH: usize = 4;
/// Most events in one batch (so at most `BATCH_DEPTH * BATCH_EVENTS` wait for the caller).
const BATCH_EVENTS: usize = 8;
/// A chunk of more tokens than [`BLOCKING_TOKENS`] is decoded only after the events before it
/// were handed over (so that a long decode does not hold them back), and on tokio's blocking
/// pool (so that it does not hold an async worker either); so is the decoder of a large grid or
/// of a part with context references (learning the references takes time).
use crate::send::BLOCKING_TOKENS;

mod part;
pub(crate) use part::check_header;

/// One message event, or the error that ended the message.
type EventResult = Result<MessageEvent, RecvError>;
/// Most tokens one chunk may carry (PROTOCOL.md §6.6).
fn max_chunk_tokens(limits: &unimic_protocol::Limits) -> u64 {
    let grid = limits
        .max_grid_height
        .into_inner()
        .saturating_mul(limits.max_grid_width.into_inner());
    grid.max(limits.max_context_bytes.into_inner() / 4)
}
/// Largest read from a message stream at once.
const READ_CHUNK: usize = 64 * 1024;
/// Reads taken without waiting (bytes already there) before the task waits anyway.
const EAGER_READS: u32 = 4;

/// One incoming message. Pull its events with [`next`](Self::next), or everything at once with
/// [`collect`](Self::collect).
///
/// Dropping the handle does not stop the message: it is still decoded (so both contexts stay in
/// step), its events discarded. [`cancel`](Self::cancel) stops it.
#[derive(Debug)]
pub struct IncomingMessage {
    message_id: u64,
    role: Role,
    in_reply_to: Option<u64>,
    /// Events still to come arrive in batches (one wake-up of the caller for everything read at
    /// once). `None` for a message that was read whole before it was handed over: all its events
    /// are in `buffered` (no channel, no cancellation token: nothing is left to stop).
    events: Option<mpsc::Receiver<Vec<EventResult>>>,
    /// The rest of the batch being consumed.
    buffered: VecDeque<EventResult>,
    cancel: Option<CancellationToken>,
    done: bool,
}

impl IncomingMessage {
    /// The message id.
    pub fn message_id(&self) -> u64 {
        self.message_id
    }

    /// Who speaks.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The message of ours this one answers, if it carried an `IN_REPLY_TO` frame
    /// (PROTOCOL.md §5.3; checked to name a message we sent).
    pub fn in_reply_to(&self) -> Option<u64> {
        self.in_reply_to
    }

    /// The context key of part `index` of this message.
    pub fn key(&self, index: u64) -> ContextKey {
        ContextKey::new(self.message_id, index)
    }

    /// The next event; `None` after [`MessageEvent::End`] or an error.
    ///
    /// Cancel safety: safe.
    pub async fn next(&mut self) -> Option<Result<MessageEvent, RecvError>> {
        if self.done {
            return None;
        }
        if self.buffered.is_empty() {
            if let Some(events) = self.events.as_mut() {
                // `recv` is cancel safe and the batch is stored before any other await.
                if let Some(batch) = events.recv().await {
                    self.buffered = batch.into();
                }
            }
        }
        let ev = self.buffered.pop_front();
        match &ev {
            Some(Ok(MessageEvent::End(_))) | Some(Err(_)) => self.done = true,
            None => {
                self.done = true;
                return Some(Err(RecvError::ConnectionLost(
                    "the message task ended".into(),
                )));
            }
            _ => {}
        }
        ev
    }

    /// Reads the whole message.
    pub async fn collect(mut self) -> Result<ReceivedMessage, RecvError> {
        let mut parts = Vec::new();
        while let Some(ev) = self.next().await {
            match ev? {
                MessageEvent::PartEnd { part, .. } => parts.push(part),
                MessageEvent::End(stats) => {
                    return Ok(ReceivedMessage {
                        message_id: self.message_id,
                        role: self.role,
                        in_reply_to: self.in_reply_to,
                        parts,
                        stats,
                    })
                }
                _ => {}
            }
        }
        Err(RecvError::ConnectionLost("message ended early".into()))
    }

    /// Stops the message: the stream is stopped with `CANCELLED` and the sender told with a
    /// Cancel frame. Like every message that does not complete, it leaves nothing in the context
    /// (its parts already complete are taken out again, here and at the sender: PROTOCOL.md
    /// §5.4). Does nothing once the whole message has been read from its stream.
    pub fn cancel(&self) {
        if let Some(cancel) = &self.cancel {
            cancel.cancel();
        }
    }
}

/// The bytes of a raw part being received: a part that arrives in one chunk keeps that chunk's
/// buffer (no copy); later chunks are appended to a copy.
#[derive(Default)]
enum RawBytes {
    #[default]
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl RawBytes {
    fn len(&self) -> usize {
        match self {
            RawBytes::Empty => 0,
            RawBytes::One(b) => b.len(),
            RawBytes::Many(b) => b.len(),
        }
    }

    fn push(&mut self, chunk: &Bytes) {
        *self = match std::mem::take(self) {
            RawBytes::Empty => RawBytes::One(chunk.clone()),
            RawBytes::One(first) => {
                let mut all = BytesMut::with_capacity(first.len() + chunk.len());
                all.extend_from_slice(&first);
                all.extend_from_slice(chunk);
                RawBytes::Many(all)
            }
            RawBytes::Many(mut all) => {
                all.extend_from_slice(chunk);
                RawBytes::Many(all)
            }
        };
    }

    fn into_bytes(self) -> Bytes {
        match self {
            RawBytes::Empty => Bytes::new(),
            RawBytes::One(b) => b,
            RawBytes::Many(b) => b.freeze(),
        }
    }
}

/// The part being received.
enum Current {
    Raw {
        index: u64,
        media_type: String,
        bytes: RawBytes,
        stats: PartStats,
    },
    Coded {
        index: u64,
        spec: PartSpec,
        digest: [u8; 32],
        identity: unimic_codec::part::ModelIdentity,
        kind: SequenceKind,
        grid: Option<(u32, u32, u32)>,
        decoder: Option<Arc<PartDecoder>>,
        ids: Vec<u32>,
        stats: PartStats,
    },
}

struct Task {
    shared: Arc<Shared>,
    recv: quinn::RecvStream,
    reader: Reader,
    /// Made when the message is handed over before it has been read whole (with `events`).
    cancel: Option<CancellationToken>,
    /// Counts this task as running (see `Inbox::live`) until it ends.
    live: LiveTask,
    /// The handle for this message, until it is queued in the session's inbox (at the first
    /// flush).
    undelivered: Option<IncomingMessage>,
    /// Where later events go, once the message was handed over before its end.
    events: Option<mpsc::Sender<Vec<EventResult>>>,
    /// Events not handed over yet (see [`Task::flush_events`]).
    batch: Vec<EventResult>,
    message_id: Option<u64>,
    /// The role of a message whose header was read and whose handle is not made yet: it is made
    /// with the next frame, which may be its `IN_REPLY_TO` (see [`Task::materialize`]).
    header_role: Option<Role>,
    /// Whether `message_id` was entered in the in-flight set (and must be removed at the end).
    registered: bool,
    /// The last chunk decoded: (part index, chunk sequence number).
    last_chunk: (u64, u64),
    /// Parts of this message entered in the context so far: taken out again if the message
    /// does not complete (PROTOCOL.md §5.4).
    kept: Vec<ContextKey>,
    current: Option<Current>,
    stats: MessageStats,
    /// Bytes read from the stream.
    read_bytes: u64,
    /// Tokens of this message's transformer-coded parts so far (bounded by
    /// `SessionConfig::max_message_model_tokens`).
    model_tokens: u64,
    /// When the message header was read.
    started: Option<Instant>,
}

/// Failure inside the task: what to tell the peer and the caller.
pub(crate) struct Fail {
    pub(crate) code: ErrorCode,
    pub(crate) reason: String,
}

impl Fail {
    fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// Waits for `wait` (the next bytes of a message stream) at most `limit`: a message whose bytes
/// stop arriving before its end is refused with `TIMEOUT` (PROTOCOL.md §11), so a peer cannot
/// hold a stream and its buffers open forever by trickling or stalling (slow-loris).
async fn stalled<T>(
    limit: Option<std::time::Duration>,
    wait: impl std::future::Future<Output = T>,
) -> Result<T, Fail> {
    match limit {
        None => Ok(wait.await),
        Some(limit) => tokio::time::timeout(limit, wait).await.map_err(|_| {
            Fail::new(
                ErrorCode::TIMEOUT,
                format!(
                    "no bytes of the message for {:.1} s before its end",
                    limit.as_secs_f64()
                ),
            )
        }),
    }
}

/// Runs one incoming message stream to its end (`live` counts it as running until then).
pub(crate) async fn run(shared: Arc<Shared>, recv: quinn::RecvStream, live: LiveTask) {
    let limits = shared.negotiated.limits;
    let mut task = Task {
        shared,
        recv,
        reader: Reader::new(limits),
        cancel: None,
        live,
        undelivered: None,
        events: None,
        batch: Vec::with_capacity(BATCH_EVENTS),
        message_id: None,
        header_role: None,
        registered: false,
        last_chunk: (0, 0),
        kept: Vec::new(),
        current: None,
        stats: MessageStats::default(),
        read_bytes: 0,
        model_tokens: 0,
        started: None,
    };
    let outcome = task.pump().await;
    task.finish(outcome).await;
}

/// How the stream ended.
enum Outcome {
    Done,
    Failed(Fail),
    Reset(ErrorCode),
    Cancelled,
    Lost(String),
}

impl Task {
    async fn pump(&mut self) -> Outcome {
        let mut eager = 0;
        loop {
            if self.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                return Outcome::Cancelled;
            }
            loop {
                let before = self.reader.consumed();
                let ev = match self.reader.next_event() {
                    Ok(Some(ev)) => ev,
                    Ok(None) => break,
                    Err(e) => {
                        return Outcome::Failed(Fail::new(e.error_code(), e.to_string()));
                    }
                };
                // The size of the event's frame on the wire.
                let wire = self.reader.consumed().saturating_sub(before);
                match self.on_event(ev, wire).await {
                    Ok(true) => return self.drain_end().await,
                    Ok(false) => {}
                    Err(f) => return Outcome::Failed(f),
                }
                if self.batch.len() >= BATCH_EVENTS {
                    self.flush_events().await;
                }
            }
            // What has already arrived is parsed before the events go to the caller, so that a
            // message read at once reaches the caller in one wake-up (for a few reads at most:
            // the first run of this task happens inside whoever accepted the stream).
            eager += 1;
            if eager > EAGER_READS {
                eager = 0;
                self.flush_events().await;
                tokio::task::yield_now().await;
            }
            let read = match self.recv.read_chunk(READ_CHUNK, true).now_or_never() {
                Some(r) => r,
                None => {
                    eager = 0;
                    self.flush_events().await;
                    let (recv, cancel) = (&mut self.recv, self.cancel.as_ref());
                    let wait = async move {
                        match cancel {
                            Some(cancel) => tokio::select! {
                                r = recv.read_chunk(READ_CHUNK, true) => Some(r),
                                _ = cancel.cancelled() => None,
                            },
                            // Not handed over yet (no header): nobody can cancel it.
                            None => Some(recv.read_chunk(READ_CHUNK, true).await),
                        }
                    };
                    match stalled(self.shared.config.message_stall_timeout, wait).await {
                        Ok(Some(r)) => r,
                        Ok(None) => return Outcome::Cancelled,
                        Err(f) => return Outcome::Failed(f),
                    }
                }
            };
            match read {
                Ok(Some(chunk)) => {
                    self.read_bytes += chunk.bytes.len() as u64;
                    self.reader.push(&chunk.bytes)
                }
                Ok(None) => {
                    let e = self.reader.finish().err();
                    return Outcome::Failed(Fail::new(
                        e.as_ref()
                            .map_or(ErrorCode::PROTOCOL_VIOLATION, |e| e.error_code()),
                        "message stream ended before the message end",
                    ));
                }
                Err(quinn::ReadError::Reset(code)) => {
                    return Outcome::Reset(wire::registry_code(code))
                }
                Err(e) => return Outcome::Lost(e.to_string()),
            }
        }
    }

    /// After the message end: the stream must end right there.
    async fn drain_end(&mut self) -> Outcome {
        let read = match self.recv.read_chunk(READ_CHUNK, true).now_or_never() {
            Some(r) => r,
            None => {
                self.flush_events().await;
                let wait = self.recv.read_chunk(READ_CHUNK, true);
                match stalled(self.shared.config.message_stall_timeout, wait).await {
                    Ok(r) => r,
                    Err(f) => return Outcome::Failed(f),
                }
            }
        };
        match read {
            Ok(None) => match self.reader.finish() {
                Ok(()) => Outcome::Done,
                Err(e) => Outcome::Failed(Fail::new(e.error_code(), e.to_string())),
            },
            Ok(Some(_)) => Outcome::Failed(Fail::new(
                ErrorCode::PROTOCOL_VIOLATION,
                "bytes after the message end",
            )),
            Err(quinn::ReadError::Reset(code)) => Outcome::Reset(wire::registry_code(code)),
            Err(e) => Outcome::Lost(e.to_string()),
        }
    }

    /// Adds an event to the batch (once the message has a handle). Not async: the batch is
    /// handed over by the caller of the event handlers ([`pump`](Self::pump)) once it holds
    /// [`BATCH_EVENTS`], and before every wait. (The handlers thus stay small futures: each
    /// `.await` of one moves it whole.)
    fn emit(&mut self, ev: EventResult) {
        if self.events.is_some() || self.undelivered.is_some() {
            self.batch.push(ev);
        }
    }

    /// Hands the message to the session's `recv` (the first time) and the batched events to
    /// the caller. Called before every wait (for bytes, for context, for a long decode) and at
    /// the end.
    async fn flush_events(&mut self) {
        self.hand_over(false).await;
    }

    /// [`flush_events`](Self::flush_events); `last`: no event follows. A message handed over
    /// only at its end (it was read whole without waiting) takes its events along, with no
    /// channel and no cancellation token; otherwise both are made at the first hand-over.
    async fn hand_over(&mut self, last: bool) {
        if !last && self.undelivered.is_some() && !self.shared.inbox.is_turn(self.live.index()) {
            // A stream the peer opened before this one has not queued its message yet
            // (`inbox`, "Order"): keep reading and decoding (so that the message is
            // acknowledged and enters the context as it arrives), the events waiting here.
            return;
        }
        if let Some(mut msg) = self.undelivered.take() {
            if last {
                msg.buffered = std::mem::take(&mut self.batch).into();
            } else {
                let (tx, rx) = mpsc::channel(BATCH_DEPTH);
                let cancel = CancellationToken::new();
                msg.events = Some(rx);
                msg.cancel = Some(cancel.clone());
                self.events = Some(tx);
                self.cancel = Some(cancel);
            }
            // The session may be gone; the message is still decoded to keep the context.
            self.shared.inbox.push(self.live.index(), msg).await;
        }
        if self.batch.is_empty() {
            return;
        }
        // The next batch starts with room for a whole small message (no regrowth per event).
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_EVENTS));
        if let Some(tx) = &self.events {
            // The caller may have dropped the handle; the message is still decoded.
            let _ = tx.send(batch).await;
        }
    }

    /// Handles one reader event; `Ok(true)` at the message end.
    /// `wire`: the size of the event's frame.
    async fn on_event(&mut self, ev: Event, wire: u64) -> Result<bool, Fail> {
        match ev {
            Event::Header(h) => {
                let id = h.message_id.into_inner();
                // Named in the Error frame even if the header is refused below.
                self.message_id = Some(id);
                {
                    let mut st = self.shared.state();
                    st.pending_headers = st.pending_headers.saturating_sub(1);
                    if !self.shared.is_peer_id(id) {
                        return Err(Fail::new(
                            ErrorCode::PROTOCOL_VIOLATION,
                            "message id has the wrong parity for its sender",
                        ));
                    }
                    if let Err(why) = st.peer_ids.admit(self.recv.id().index(), id) {
                        return Err(Fail::new(ErrorCode::PROTOCOL_VIOLATION, why));
                    }
                    if !st.peer_inflight.insert(id) {
                        return Err(Fail::new(
                            ErrorCode::PROTOCOL_VIOLATION,
                            "message id reused",
                        ));
                    }
                }
                self.registered = true;
                self.shared.notify_changed();
                self.stats.message_id = id;
                self.started = Some(Instant::now());
                // The handle is made with the next frame, which may say what this answers.
                self.header_role = Some(h.role);
                tracing::debug!(id, role = ?h.role, "message started");
                Ok(false)
            }
            Event::InReplyTo(r) => {
                let answered = r.message_id.into_inner();
                if !self.shared.is_sent_id(answered) {
                    return Err(Fail::new(
                        ErrorCode::PROTOCOL_VIOLATION,
                        "IN_REPLY_TO names a message this side never sent",
                    ));
                }
                self.materialize(Some(answered));
                Ok(false)
            }
            Event::Part(h) => {
                self.materialize(None);
                let (current, info) = self.start_part(h).await?;
                self.current = Some(current);
                if let Some(Current::Raw { stats, .. } | Current::Coded { stats, .. }) =
                    self.current.as_mut()
                {
                    stats.wire_bytes += wire;
                }
                self.emit(Ok(MessageEvent::PartStart(info)));
                Ok(false)
            }
            Event::Chunk(c) => {
                self.on_chunk(c, wire).await?;
                Ok(false)
            }
            Event::End(_) => {
                self.materialize(None);
                Ok(true)
            }
            _ => {
                self.materialize(None);
                Ok(false)
            }
        }
    }

    /// Makes the message's handle once the header has been read and the frame after it is known
    /// (`in_reply_to`: what that frame said); it is handed to the session's `recv` at the next
    /// flush, with the first events. Does nothing before the header or once made.
    fn materialize(&mut self, in_reply_to: Option<u64>) {
        let (Some(role), Some(id)) = (self.header_role.take(), self.message_id) else {
            return;
        };
        self.undelivered = Some(IncomingMessage {
            message_id: id,
            role,
            in_reply_to,
            events: None,
            buffered: VecDeque::new(),
            cancel: None,
            done: false,
        });
    }

    /// Ends the message after `outcome` (by reference: moving the task into this future would
    /// copy it whole).
    async fn finish(&mut self, outcome: Outcome) {
        // A message that ends (or fails) right after its header still reaches the caller.
        self.materialize(None);
        let id = self.message_id;
        if !matches!(outcome, Outcome::Done) && !self.kept.is_empty() {
            // PROTOCOL.md §5.4: a message that does not complete leaves no part in the context
            // (its sender takes them out too: it reset the stream, or it learns of the refusal
            // from the Error or Cancel frame below).
            let mut st = self.shared.state();
            for key in self.kept.drain(..) {
                st.context.evict(key);
            }
        }
        if id.is_none() {
            let mut st = self.shared.state();
            st.pending_headers = st.pending_headers.saturating_sub(1);
        }
        match outcome {
            Outcome::Done => {
                self.stats.wire_bytes = self.read_bytes;
                self.stats.elapsed = self.started.map(|t| t.elapsed()).unwrap_or_default();
                if let (Some(id), true) = (id, self.shared.config.send_acks) {
                    // Queued, not written: it rides with our next message (or goes alone after
                    // the ack delay), so the caller gets the message end without waiting on it.
                    let (part, chunk) = self.last_chunk;
                    self.shared.queue_ack(Ack {
                        message_id: VarInt::saturating(id),
                        part_index: VarInt::saturating(part),
                        chunk_seq: VarInt::saturating(chunk),
                        stage: AckStage::Decoded,
                    });
                }
                let stats = std::mem::take(&mut self.stats);
                tracing::debug!(id, wire = stats.wire_bytes, "message received");
                self.emit(Ok(MessageEvent::End(stats)));
            }
            Outcome::Failed(f) => {
                tracing::warn!(id, code = %f.code, reason = %f.reason, "incoming message refused");
                let _ = self.recv.stop(wire::quic_code(f.code));
                // Boxed (here and below): the control write would enlarge the future of every
                // message for the sake of the failed ones.
                Box::pin(self.shared.send_control(Frame::Error(ErrorFrame {
                    code: f.code,
                    message_id: id.map(VarInt::saturating),
                    reason: wire::short_reason(&f.reason),
                })))
                .await;
                self.emit(Err(RecvError::Protocol {
                    code: f.code,
                    reason: f.reason,
                }));
            }
            Outcome::Reset(code) => {
                tracing::debug!(id, %code, "message reset by the sender");
                self.emit(Err(RecvError::Reset(code)));
            }
            Outcome::Cancelled => {
                let _ = self.recv.stop(wire::quic_code(ErrorCode::CANCELLED));
                if let Some(id) = id {
                    Box::pin(self.shared.send_control(Frame::Cancel(Cancel {
                        message_id: VarInt::saturating(id),
                        code: ErrorCode::CANCELLED,
                    })))
                    .await;
                }
                self.emit(Err(RecvError::Cancelled));
            }
            Outcome::Lost(reason) => {
                self.emit(Err(RecvError::ConnectionLost(reason)));
            }
        }
        self.hand_over(true).await;
        if let (Some(id), true) = (id, self.registered) {
            self.shared.state().peer_inflight.remove(&id);
        }
        self.shared.notify_changed();
    }
}

#[cfg(test)]
mod tests {
    use super::RawBytes;
    use bytes::Bytes;

    #[test]
    fn raw_part_of_one_chunk_keeps_its_buffer_and_chunks_concatenate() {
        assert_eq!(RawBytes::default().into_bytes(), Bytes::new());

        let first = Bytes::from(vec![1u8, 2, 3]);
        let mut one = RawBytes::default();
        one.push(&first);
        assert_eq!(one.len(), 3);
        let kept = one.into_bytes();
        // The same buffer, not a copy.
        assert_eq!(kept.as_ptr(), first.as_ptr());
        assert_eq!(kept, first);

        let mut many = RawBytes::default();
        for chunk in [&[1u8, 2][..], &[], &[3, 4, 5], &[6]] {
            many.push(&Bytes::copy_from_slice(chunk));
        }
        assert_eq!(many.len(), 6);
        assert_eq!(many.into_bytes(), Bytes::from(vec![1u8, 2, 3, 4, 5, 6]));
    }
}

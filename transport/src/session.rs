//! [`Session`]: one established connection, after the handshake.
//!
//! # Tasks
//! Each session runs one driver task (spawned when the handshake finishes, aborted when the
//! [`Session`] is dropped) that reads the control stream, writes batched acknowledgements, and
//! accepts the peer's message streams while no caller waits in [`Session::recv`]; a waiting
//! caller accepts them itself (see `inbox.rs` for the hand-over). Each incoming message is
//! parsed and decoded by its own future, which feeds the [`IncomingMessage`] the caller got from
//! [`Session::recv`]: whoever accepted the stream runs it until it first has to wait (a small
//! message that arrived whole completes right there, with no task hop), and spawns the rest as
//! a short task. Parts and chunks above 1,024 tokens, and every part coded with a transformer
//! model, are coded and decoded on tokio's blocking pool, never on an async worker. Nothing
//! calls back into caller code: the caller pulls messages and their events.
//!
//! # Context
//! Both ends keep a [`SessionContext`] bounded by the negotiated `max_context_bytes`. A sender
//! inserts a part when it has coded the part (so later parts of the message may refer to it); a
//! receiver when it has decoded it. A message that does not complete (reset by its sender,
//! refused or cancelled by its receiver, ended before its end) takes its parts out again on both
//! ends: the receiver when it drops it, the sender when it resets it or when an Error or Cancel
//! frame names it (PROTOCOL.md §5.4).
//! Evictions (oldest first, deterministic) are announced to the peer in a ContextEvicted frame and
//! applied there too, so both ends converge even when the two directions interleave. A part that
//! refers to a part still arriving on another stream waits for it (at most
//! [`SessionConfig::context_wait`](crate::SessionConfig::context_wait)); a reference to something
//! the receiver does not hold fails that message with `CONTEXT_UNKNOWN`, a digest difference with
//! `CONTEXT_MISMATCH`: a desync is detected, never decoded.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::Instrument;
use unimic_codec::context::{ContextKey, SessionContext};
use unimic_codec::part::PartCodec;
use unimic_protocol::control::{Ack, AckStage, ContextEvicted, GoAway};
use unimic_protocol::handshake::Negotiated;
use unimic_protocol::limits::MAX_EVICTED;
use unimic_protocol::{ContextRef, ErrorCode, ErrorFrame, Frame, VarInt};

use crate::config::SessionConfig;
use crate::error::{SendError, SessionError};
use crate::handshake::Control;
use crate::inbox::{self, AcceptTurn, DriverMode, Inbox};
use crate::message::OutgoingMessage;
use crate::models::{entropy_table, EntropyEntry, TokenizerInfo};
use crate::recv::IncomingMessage;
use crate::send::MessageWriter;
use crate::wire::{self, FrameReader, ReadFrameError};
use crate::MessageStats;

/// Which end of the connection a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The end that connected (sends even message ids).
    Client,
    /// The end that accepted (sends odd message ids).
    Server,
}

/// Mutable session state behind one lock; held only for short, non-async sections (coding a part
/// with an algorithmic model happens under it, so both ends see the context exactly as it was
/// when the part was coded; a transformer part is coded from the sequences it refers to, taken
/// under it).
pub(crate) struct State {
    pub context: SessionContext,
    pub codec: PartCodec,
    /// Peer messages whose header has been read and that have not ended.
    pub peer_inflight: HashSet<u64>,
    /// Peer streams accepted whose header has not been read yet.
    pub pending_headers: usize,
    /// The peer's message ids by stream, to refuse reused or out-of-order ids (PROTOCOL.md §5).
    pub peer_ids: crate::peer_ids::PeerIds,
    /// Our messages being written.
    pub own_inflight: HashSet<u64>,
    /// Our finished messages the peer has not acknowledged yet (bounded).
    pub unacked: HashSet<u64>,
    /// Acknowledgements received, by message id (bounded).
    pub acks: HashMap<u64, AckStage>,
    /// Error frames the peer sent (bounded, oldest dropped).
    pub peer_errors: Vec<ErrorFrame>,
    /// Peer messages the peer asked us to stop (Cancel frames).
    pub cancelled: HashSet<u64>,
    /// Our messages the peer discarded (an Error or Cancel frame naming them): none of their
    /// parts is kept in the context (PROTOCOL.md §5.4; bounded).
    pub dropped: HashSet<u64>,
    /// Acknowledgements queued for the peer, not written yet (see [`Shared::queue_ack`]).
    pub pending_acks: Vec<Ack>,
}

const MAX_REMEMBERED: usize = 1024;

impl State {
    /// The peer discarded our message `id` (PROTOCOL.md §5.4): its parts leave our context, and
    /// parts of it committed later are not kept either.
    fn peer_dropped(&mut self, id: u64) {
        if self.dropped.len() >= MAX_REMEMBERED {
            self.dropped.clear();
        }
        self.dropped.insert(id);
        for key in self.context.keys() {
            if key.message_id == id {
                self.context.evict(key);
            }
        }
    }
}

pub(crate) struct Shared {
    pub conn: quinn::Connection,
    pub side: Side,
    pub negotiated: Negotiated,
    pub entropy: Vec<EntropyEntry>,
    pub tokenizers: Vec<TokenizerInfo>,
    pub config: SessionConfig,
    state: Mutex<State>,
    /// Signalled whenever the context or the in-flight sets change, or an ack arrives, while
    /// someone watches (see [`Shared::watch`]); always when the connection ends.
    changed: Notify,
    /// Callers waiting for `changed` (see [`Shared::watch`]).
    watchers: AtomicUsize,
    /// Signalled (one permit) when an acknowledgement is queued while none was pending: arms the
    /// driver's ack timer.
    ack_queued: Notify,
    control: tokio::sync::Mutex<quinn::SendStream>,
    /// Next message id to use, behind the lock that also orders stream opening.
    next_id: tokio::sync::Mutex<u64>,
    /// The next message id as last issued (readable without the lock): our ids below it exist.
    issued: std::sync::atomic::AtomicU64,
    /// Either end announced go-away: no new messages from us.
    pub going_away: AtomicBool,
    /// We announced go-away: new message streams from the peer are refused.
    pub sent_go_away: AtomicBool,
    /// Messages waiting for [`Session::recv`].
    pub inbox: Inbox,
    /// Who accepts the peer's message streams (a waiting `recv`, or the driver).
    pub accept: AcceptTurn,
    pub span: tracing::Span,
    /// This session's budget of model positions per second (`SessionConfig::session_model_rate`).
    pub model_budget: Option<crate::WorkBudget>,
}

impl Shared {
    /// Takes `n` model positions from the session's budget and the shared one, or from none of
    /// them; `Err` says which was short.
    pub fn take_model_work(&self, n: u64) -> Result<(), &'static str> {
        if let Some(b) = &self.model_budget {
            b.try_take(n).map_err(|_| "this session's")?;
        }
        if let Some(b) = &self.config.shared_model_budget {
            if b.try_take(n).is_err() {
                if let Some(own) = &self.model_budget {
                    own.give_back(n);
                }
                return Err("the server's");
            }
        }
        Ok(())
    }
}

impl Shared {
    /// Locks the state. A poisoned lock (a panic elsewhere) is taken over: the state is only
    /// ever mutated in small steps that leave it consistent.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the callers waiting for a change of the state (context, in-flight sets, acks).
    /// Call it after the change, made under the state lock. When nobody watches, as is usual
    /// (waits are for acknowledgements, a graceful close, or parts still arriving), it costs one
    /// atomic load instead of the notifier's lock.
    ///
    /// Nothing is missed: a watcher counts itself before it looks at the state. If this load
    /// sees no watcher, the watcher's count, and so its look under the state lock, come after
    /// this change was unlocked: it sees the change.
    pub fn notify_changed(&self) {
        if self.watchers.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// Counts the caller as waiting for changes until the guard is dropped. Take it before the
    /// first look at the state, and make each [`Watch::changed`] future before looking again.
    pub fn watch(&self) -> Watch<'_> {
        self.watchers.fetch_add(1, Ordering::SeqCst);
        Watch(self)
    }

    /// Whether `id` is one of the peer's message ids.
    pub fn is_peer_id(&self, id: u64) -> bool {
        let peer_parity = match self.side {
            Side::Client => 1,
            Side::Server => 0,
        };
        id % 2 == peer_parity
    }

    /// Whether `id` is one of our message ids already issued (a message we opened).
    pub fn is_sent_id(&self, id: u64) -> bool {
        !self.is_peer_id(id) && id < self.issued.load(Ordering::Acquire)
    }

    /// Writes a frame on the control stream; failures (closed connection) are logged only.
    pub async fn send_control(&self, frame: Frame) {
        let bytes = wire::frame_bytes(&frame);
        let mut send = self.control.lock().await;
        if let Err(e) = send.write_all(&bytes).await {
            tracing::debug!(parent: &self.span, error = %e, frame = frame.name(), "control write failed");
        }
    }

    /// Queues an acknowledgement. The driver writes the queue ([`flush_acks`](Self::flush_acks))
    /// once [`SessionConfig::ack_delay`] has passed since it stopped being empty. Never waits.
    pub fn queue_ack(&self, ack: Ack) {
        let first = {
            let mut st = self.state();
            st.pending_acks.push(ack);
            st.pending_acks.len() == 1
        };
        if first {
            self.ack_queued.notify_one();
        }
    }

    /// Writes every queued acknowledgement on the control stream, in one write.
    pub async fn flush_acks(&self) {
        let acks = {
            let mut st = self.state();
            if st.pending_acks.is_empty() {
                return;
            }
            std::mem::take(&mut st.pending_acks)
        };
        let mut bytes = bytes::BytesMut::new();
        for ack in acks {
            bytes.extend_from_slice(&wire::frame_bytes(&Frame::Ack(ack)));
        }
        let mut send = self.control.lock().await;
        if let Err(e) = send.write_all(&bytes).await {
            tracing::debug!(parent: &self.span, error = %e, "ack write failed");
        }
    }

    /// Announces evicted context entries to the peer.
    pub async fn announce_evicted(&self, evicted: Vec<ContextKey>) {
        for batch in evicted.chunks(MAX_EVICTED as usize) {
            let refs = batch
                .iter()
                .map(|k| ContextRef {
                    message_id: VarInt::saturating(k.message_id),
                    part_index: VarInt::saturating(k.part_index),
                })
                .collect();
            self.send_control(Frame::ContextEvicted(ContextEvicted { refs }))
                .await;
        }
    }

    /// Reserves the next message id and opens its stream, in id order.
    pub async fn open_stream(&self) -> Result<(u64, quinn::SendStream), SendError> {
        if self.going_away.load(Ordering::Acquire) {
            return Err(SendError::GoingAway);
        }
        let mut next = self.next_id.lock().await;
        let stream = self.conn.open_uni().await?;
        let id = *next;
        *next += 2;
        self.issued.store(*next, Ordering::Release);
        self.state().own_inflight.insert(id);
        Ok((id, stream))
    }

    /// Our message `id` is finished (`delivered`: written completely) or abandoned.
    pub fn own_done(&self, id: u64, delivered: bool) {
        {
            let mut st = self.state();
            st.own_inflight.remove(&id);
            if delivered {
                if st.unacked.len() >= MAX_REMEMBERED {
                    st.unacked.clear();
                }
                st.unacked.insert(id);
            }
        }
        self.notify_changed();
    }

    /// Waits until nothing is in flight in either direction and our messages are acknowledged.
    pub async fn quiesce(&self) {
        let watch = self.watch();
        loop {
            let notified = watch.changed();
            {
                let st = self.state();
                if st.own_inflight.is_empty()
                    && st.unacked.is_empty()
                    && st.peer_inflight.is_empty()
                    && st.pending_headers == 0
                {
                    return;
                }
            }
            if self.conn.close_reason().is_some() {
                return;
            }
            notified.await;
        }
    }
}

/// A caller waiting for changes of the session state (see [`Shared::watch`]).
pub(crate) struct Watch<'a>(&'a Shared);

impl Watch<'_> {
    /// Completes at the next change notified after this call.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.changed.notified()
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An established unimic session: send messages, receive messages, close.
///
/// Dropping a session closes its connection at once (code `NO_ERROR`); data not yet delivered is
/// lost. Use [`Session::close`] for a graceful end.
pub struct Session {
    shared: Arc<Shared>,
    /// Held by the caller of [`Session::recv`] that is waiting (one at a time).
    receiving: tokio::sync::Mutex<()>,
    _driver: AbortOnDrop,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("side", &self.shared.side)
            .field("remote", &self.shared.conn.remote_address())
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn start(
        conn: quinn::Connection,
        side: Side,
        control: Control,
        config: SessionConfig,
    ) -> Session {
        let span = tracing::info_span!(
            "unimic.session",
            side = ?side,
            remote = %conn.remote_address(),
            id = conn.stable_id()
        );
        let negotiated = control.negotiated;
        let codec = PartCodec::new(config.codec.clone());
        let entropy = entropy_table(&codec);
        let budget = negotiated.limits.max_context_bytes.into_inner();
        let concurrent = negotiated.limits.max_concurrent_messages.into_inner();
        let state = State {
            context: SessionContext::new(budget),
            codec,
            peer_inflight: HashSet::new(),
            pending_headers: 0,
            peer_ids: crate::peer_ids::PeerIds::new(concurrent),
            own_inflight: HashSet::new(),
            unacked: HashSet::new(),
            acks: HashMap::new(),
            peer_errors: Vec::new(),
            cancelled: HashSet::new(),
            dropped: HashSet::new(),
            pending_acks: Vec::new(),
        };
        conn.set_max_concurrent_uni_streams(
            quinn::VarInt::from_u64(concurrent).unwrap_or(quinn::VarInt::from_u32(1)),
        );
        let model_budget = config
            .session_model_rate
            .map(|r| crate::WorkBudget::new(r.per_second, r.burst));
        let shared = Arc::new(Shared {
            conn,
            side,
            model_budget,
            tokenizers: config.tokenizers.clone(),
            negotiated,
            entropy,
            config,
            state: Mutex::new(state),
            changed: Notify::new(),
            watchers: AtomicUsize::new(0),
            ack_queued: Notify::new(),
            control: tokio::sync::Mutex::new(control.send),
            next_id: tokio::sync::Mutex::new(match side {
                Side::Client => 0,
                Side::Server => 1,
            }),
            issued: std::sync::atomic::AtomicU64::new(match side {
                Side::Client => 0,
                Side::Server => 1,
            }),
            going_away: AtomicBool::new(false),
            sent_go_away: AtomicBool::new(false),
            inbox: Inbox::new(usize::try_from(concurrent).unwrap_or(1024).clamp(1, 1024)),
            accept: AcceptTurn::new(),
            span: span.clone(),
        });
        let driver = tokio::spawn(drive(shared.clone(), control.reader).instrument(span));
        tracing::debug!(parent: &shared.span, "session established");
        Session {
            shared,
            receiving: tokio::sync::Mutex::new(()),
            _driver: AbortOnDrop(driver),
        }
    }

    /// Which end this is.
    pub fn side(&self) -> Side {
        self.shared.side
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.shared.conn.remote_address()
    }

    /// What the handshake agreed: version, tokenizer and entropy model tables, limits.
    pub fn negotiated(&self) -> &Negotiated {
        &self.shared.negotiated
    }

    /// The tokenizers of the negotiated table that this side holds, with what they produce, in
    /// table order.
    pub fn tokenizers(&self) -> Vec<crate::TokenizerInfo> {
        self.shared
            .negotiated
            .tokenizers
            .iter()
            .filter_map(|m| {
                self.shared
                    .tokenizers
                    .iter()
                    .find(|t| t.info == *m)
                    .cloned()
            })
            .collect()
    }

    /// The underlying QUIC connection (for statistics such as RTT; do not open streams on it).
    pub fn connection(&self) -> &quinn::Connection {
        &self.shared.conn
    }

    /// Sends a whole message: codes every part, writes it on a new stream, and returns its
    /// statistics once the stream is finished (not necessarily delivered; see
    /// [`Session::wait_ack`]). The frames are written in one stream write together with the
    /// stream end (parts are written early only once more than 16 KiB are waiting), so a small
    /// message leaves in one packet.
    ///
    /// Cancel safety: dropping the future resets the stream with `CANCELLED`; the peer drops the
    /// message.
    pub async fn send(&self, message: OutgoingMessage) -> Result<MessageStats, SendError> {
        // Whole-message mode: the frames go out in one write with the stream end (unless large).
        let mut writer =
            MessageWriter::open(self.shared.clone(), message.role, message.in_reply_to, true)
                .await?;
        for part in message.parts {
            writer.write_part(part).await?;
        }
        writer.finish_here().await
    }

    /// Opens a message to write part by part, or to stream text into (see [`MessageWriter`]).
    pub async fn open(&self, role: unimic_protocol::Role) -> Result<MessageWriter, SendError> {
        MessageWriter::open(self.shared.clone(), role, None, false).await
    }

    /// Opens a message that answers the peer's message `in_reply_to` (an `IN_REPLY_TO` frame
    /// right after its header, PROTOCOL.md §5.3), to write part by part or to stream into.
    pub async fn open_reply(
        &self,
        role: unimic_protocol::Role,
        in_reply_to: u64,
    ) -> Result<MessageWriter, SendError> {
        MessageWriter::open(self.shared.clone(), role, Some(in_reply_to), false).await
    }

    /// Asks the peer to stop generating and sending every reply to our message `message_id`
    /// (a CANCEL naming our own message, PROTOCOL.md §5.3). Replies already arriving are stopped
    /// by the peer; cancel their [`IncomingMessage`]s too to stop reading them at once.
    pub async fn cancel_replies(&self, message_id: u64) {
        self.shared
            .send_control(Frame::Cancel(unimic_protocol::Cancel {
                message_id: VarInt::saturating(message_id),
                code: ErrorCode::CANCELLED,
            }))
            .await;
    }

    /// Whether the peer sent a CANCEL naming `message_id`: one of ours (stop sending it) or one
    /// of its own (stop replying to it, PROTOCOL.md §5.3).
    pub fn is_cancelled(&self, message_id: u64) -> bool {
        self.shared.state().cancelled.contains(&message_id)
    }

    /// Completes once the peer has sent a CANCEL naming `message_id` (see
    /// [`is_cancelled`](Self::is_cancelled)), or the connection has ended.
    ///
    /// Cancel safety: safe.
    pub async fn cancelled(&self, message_id: u64) {
        let watch = self.shared.watch();
        loop {
            let notified = watch.changed();
            if self.is_cancelled(message_id) || self.shared.conn.close_reason().is_some() {
                return;
            }
            notified.await;
        }
    }

    /// Sends an ERROR frame (PROTOCOL.md §7.3) about `message_id` (or the session), for
    /// example `AGENT_FAILED` naming the turn an agent could not answer.
    pub async fn report_error(&self, code: ErrorCode, message_id: Option<u64>, reason: &str) {
        self.shared
            .send_control(Frame::Error(ErrorFrame {
                code,
                message_id: message_id.map(VarInt::saturating),
                reason: wire::short_reason(reason),
            }))
            .await;
    }

    /// The next error frame the peer sent (oldest first), waiting for one; `None` once the
    /// connection has ended and none is left.
    ///
    /// Cancel safety: safe (an error is taken out only when returned).
    pub async fn next_peer_error(&self) -> Option<ErrorFrame> {
        let watch = self.shared.watch();
        loop {
            let notified = watch.changed();
            {
                let mut st = self.shared.state();
                if !st.peer_errors.is_empty() {
                    return Some(st.peer_errors.remove(0));
                }
            }
            if self.shared.conn.close_reason().is_some() {
                return None;
            }
            notified.await;
        }
    }

    /// Completes when the connection has ended (closed by either side, or lost).
    pub async fn closed(&self) {
        self.shared.conn.closed().await;
    }

    /// The next incoming message, in the order the peer opened them; `Ok(None)` once the session
    /// ended gracefully. Each message's parts arrive chunk by chunk through
    /// [`IncomingMessage::next`].
    ///
    /// While it waits, the caller accepts the peer's next message stream itself and parses what
    /// has arrived of it (a small message usually whole) before it returns: no other task is
    /// woken for the message. While no caller waits, the session's driver accepts instead.
    ///
    /// Several tasks may call it; each message goes to one of them.
    ///
    /// Cancel safety: safe; no message is lost if the future is dropped (a stream it accepted is
    /// read to its end by a task of its own and its message kept for the next call).
    pub async fn recv(&self) -> Result<Option<IncomingMessage>, SessionError> {
        let shared = &self.shared;
        let _turn = self.receiving.lock().await;
        let _waiting = shared.accept.waiting();
        loop {
            let accepted = {
                // Enabled before looking at the inbox, dropped before the accepted stream is run
                // here (its message, queued, would otherwise wake this very task).
                let ready = shared.inbox.ready();
                tokio::pin!(ready);
                ready.as_mut().enable();
                if let Some(m) = shared.inbox.pop() {
                    return Ok(Some(m));
                }
                tokio::select! {
                    biased;
                    () = &mut ready => continue,
                    stream = shared.conn.accept_uni() => stream,
                }
            };
            match accepted {
                Ok(stream) => inbox::admit(shared, stream).await,
                Err(_) => {
                    // No more streams: what is still being read may yet be queued.
                    let ready = shared.inbox.ready();
                    tokio::pin!(ready);
                    ready.as_mut().enable();
                    if shared.inbox.live() == 0 {
                        return match shared.inbox.pop() {
                            Some(m) => Ok(Some(m)),
                            None => self.ended(),
                        };
                    }
                    ready.await;
                }
            }
        }
    }

    /// What `recv` returns once the connection ended and nothing is left to deliver.
    fn ended(&self) -> Result<Option<IncomingMessage>, SessionError> {
        match self.shared.conn.close_reason() {
            Some(e) => match SessionError::from_connection(&e) {
                Some(err) => Err(err),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// Waits until the peer acknowledges message `message_id` at `stage` or beyond.
    pub async fn wait_ack(
        &self,
        message_id: u64,
        stage: AckStage,
    ) -> Result<AckStage, SessionError> {
        let watch = self.shared.watch();
        loop {
            let notified = watch.changed();
            if let Some(&got) = self.shared.state().acks.get(&message_id) {
                if got >= stage {
                    return Ok(got);
                }
            }
            if let Some(e) = self.shared.conn.close_reason() {
                return Err(
                    SessionError::from_connection(&e).unwrap_or(SessionError::Closed {
                        code: ErrorCode::NO_ERROR,
                        reason: "closed".into(),
                    }),
                );
            }
            notified.await;
        }
    }

    /// Error frames the peer sent about our messages or the session, oldest first (at most
    /// 1024 are kept), taken out.
    pub fn take_peer_errors(&self) -> Vec<ErrorFrame> {
        std::mem::take(&mut self.shared.state().peer_errors)
    }

    /// The keys of the session context this end holds, oldest first.
    pub fn context_keys(&self) -> Vec<ContextKey> {
        self.shared.state().context.keys()
    }

    /// Whether this end's session context still holds `key` (not evicted, not unknown): one
    /// lookup, where [`Self::context_keys`] lists every entry.
    pub fn context_holds(&self, key: ContextKey) -> bool {
        self.shared.state().context.get(key).is_some()
    }

    /// The context digest (PROTOCOL.md §8) over every entry this end holds, in key order
    /// (message id, then part index): keys and tokens. Two ends hold the same context when
    /// their digests are equal (whatever order the entries arrived in).
    pub fn context_digest(&self) -> [u8; 32] {
        let st = self.shared.state();
        let mut keys = st.context.keys();
        keys.sort();
        // Every key listed is held, so resolving cannot fail (all zeros would say it did).
        st.context.digest(&keys).unwrap_or([0; 32])
    }

    /// Announces go-away: this end starts no new messages; the peer finishes what is in flight
    /// and then closes the connection.
    pub async fn go_away(&self, reason: &str) {
        self.shared.going_away.store(true, Ordering::Release);
        self.shared.sent_go_away.store(true, Ordering::Release);
        self.shared
            .send_control(Frame::GoAway(GoAway {
                code: ErrorCode::NO_ERROR,
                reason: wire::short_reason(reason),
            }))
            .await;
    }

    /// Closes gracefully: waits (within `grace`) until our messages are written and
    /// acknowledged, announces go-away, waits for the peer to finish what it has in flight and
    /// close, then closes with `NO_ERROR`.
    pub async fn close(self, grace: Duration) {
        let shared = self.shared.clone();
        let deadline = tokio::time::Instant::now() + grace;
        let _ = tokio::time::timeout_at(deadline, shared.quiesce()).await;
        shared.flush_acks().await;
        self.go_away("closing").await;
        let _ = tokio::time::timeout_at(deadline, shared.conn.closed()).await;
        wire::close(&shared.conn, ErrorCode::NO_ERROR, "closed");
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.inbox.close();
        wire::close(&self.shared.conn, ErrorCode::NO_ERROR, "session dropped");
    }
}

/// The driver: reads the control stream, writes acknowledgements that found no message to ride
/// with, and accepts message streams while no caller waits in [`Session::recv`] (see
/// [`crate::inbox`]), until the connection ends.
async fn drive(shared: Arc<Shared>, mut control: FrameReader) {
    // Armed only while acknowledgements wait: an idle session holds no timer.
    let mut ack_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut mode = DriverMode::Accepting;
    loop {
        tokio::select! {
            () = shared.ack_queued.notified(), if ack_timer.is_none() => {
                ack_timer = Some(Box::pin(tokio::time::sleep(shared.config.ack_delay)));
            }
            () = fire(&mut ack_timer), if ack_timer.is_some() => {
                ack_timer = None;
                // In a task: a control stream blocked by flow control must not stop the driver
                // from reading the peer's control stream.
                let s = shared.clone();
                tokio::spawn(async move { s.flush_acks().await }.instrument(shared.span.clone()));
            }
            () = DriverMode::wake(&shared.accept) => mode.woken(&shared.accept),
            () = mode.recheck_due() => mode.recheck(&shared.accept),
            stream = shared.conn.accept_uni(), if mode.accepting() => match stream {
                Ok(stream) => inbox::admit(&shared, stream).await,
                Err(e) => {
                    tracing::debug!(reason = %e, "connection ended");
                    break;
                }
            },
            frame = control.next() => match frame {
                Ok(Some(frame)) => {
                    if let Err((code, reason)) = on_control(&shared, frame).await {
                        tracing::warn!(%code, reason, "closing: bad control frame");
                        wire::close(&shared.conn, code, reason);
                        break;
                    }
                }
                Ok(None) => {
                    // PROTOCOL.md §2: the control stream lives as long as the connection.
                    tracing::warn!("closing: the peer finished the control stream");
                    wire::close(&shared.conn, ErrorCode::PROTOCOL_VIOLATION, "control stream finished");
                    break;
                }
                Err(ReadFrameError::Decode(e)) => {
                    tracing::warn!(error = %e, "closing: malformed control stream");
                    wire::close(&shared.conn, e.error_code(), &e.to_string());
                    break;
                }
                Err(ReadFrameError::Read(e)) => {
                    tracing::debug!(error = %e, "control stream ended");
                    if shared.conn.close_reason().is_none() {
                        wire::close(&shared.conn, ErrorCode::PROTOCOL_VIOLATION, "control stream reset");
                    }
                    break;
                }
            },
        }
    }
    shared.changed.notify_waiters();
}

/// Completes when the armed timer fires (never when none is armed).
async fn fire(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// How long a go-away waits for messages in flight before closing anyway.
const GO_AWAY_GRACE: Duration = Duration::from_secs(10);

fn peer_going_away(shared: &Arc<Shared>) {
    shared.going_away.store(true, Ordering::Release);
    let s = shared.clone();
    tokio::spawn(
        async move {
            // Finish what is in flight in both directions, then close.
            let _ = tokio::time::timeout(GO_AWAY_GRACE, s.quiesce()).await;
            s.flush_acks().await;
            wire::close(&s.conn, ErrorCode::NO_ERROR, "go away");
        }
        .instrument(shared.span.clone()),
    );
}

async fn on_control(shared: &Arc<Shared>, frame: Frame) -> Result<(), (ErrorCode, &'static str)> {
    match frame {
        Frame::Ack(Ack {
            message_id, stage, ..
        }) => {
            let mut st = shared.state();
            if st.acks.len() >= MAX_REMEMBERED {
                st.acks.clear();
            }
            st.unacked.remove(&message_id.into_inner());
            let e = st.acks.entry(message_id.into_inner()).or_insert(stage);
            if stage > *e {
                *e = stage;
            }
            drop(st);
            shared.notify_changed();
        }
        Frame::Cancel(c) => {
            tracing::debug!(message = c.message_id.into_inner(), code = %c.code, "peer cancelled a message");
            let id = c.message_id.into_inner();
            let mut st = shared.state();
            if st.cancelled.len() >= MAX_REMEMBERED {
                st.cancelled.clear();
            }
            st.cancelled.insert(id);
            if !shared.is_peer_id(id) {
                // The peer stopped receiving our message: it keeps none of it (§5.4).
                st.peer_dropped(id);
            }
            drop(st);
            shared.notify_changed();
        }
        Frame::Error(e) => {
            tracing::warn!(code = %e.code, message = ?e.message_id, reason = %e.reason, "peer reported an error");
            let mut st = shared.state();
            if let Some(id) = e.message_id.map(|m| m.into_inner()) {
                // An Error naming our message refuses it (§5.4), except AGENT_FAILED, which
                // names a turn the peer received whole and could not answer (§5.3).
                if !shared.is_peer_id(id) && e.code != ErrorCode::AGENT_FAILED {
                    st.peer_dropped(id);
                }
            }
            if st.peer_errors.len() >= MAX_REMEMBERED {
                st.peer_errors.remove(0);
            }
            st.peer_errors.push(e);
            drop(st);
            shared.notify_changed();
        }
        Frame::GoAway(g) => {
            tracing::debug!(code = %g.code, reason = %g.reason, "peer is going away");
            peer_going_away(shared);
        }
        Frame::ContextEvicted(ev) => {
            let mut st = shared.state();
            for r in ev.refs {
                st.context.evict(ContextKey::new(
                    r.message_id.into_inner(),
                    r.part_index.into_inner(),
                ));
            }
        }
        Frame::Extension { .. } => {}
        _ => {
            return Err((
                ErrorCode::PROTOCOL_VIOLATION,
                "handshake or message frame on the control stream",
            ))
        }
    }
    Ok(())
}

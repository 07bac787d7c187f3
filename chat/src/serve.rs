//! The server side: every accepted session's turns run through an [`Agent`], whose output is
//! streamed back as the reply, correlated with the turn (`IN_REPLY_TO`, PROTOCOL.md §5.3).
//!
//! Per session, turns are answered one at a time, in order, and the [`Conversation`] (every
//! turn and every reply) is kept for the agent. A reply's text is streamed as one text part,
//! delta by delta; each image the agent emits becomes one image part when its last tokens
//! arrive. Every sink call waits until its bytes are written to the QUIC stream, so a slow
//! client slows the agent down (flow control is the backpressure). A CANCEL from the client
//! (naming the turn or the reply) drops the agent's future and resets the reply. An agent that
//! fails is reported to the client (ERROR `AGENT_FAILED` naming the turn, and the reply reset with
//! it); the session goes on. A session that fails, or a peer that misbehaves, ends only that
//! session: each one runs in a task of its own.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use unimic_agents::{
    Agent, AgentError, BoolFuture, Content, ImageRef, ReplySink, Role as AgentRole, SinkError,
    SinkFuture, Turn,
};
use unimic_codec::grid::fill_region;
use unimic_codec::text::{O200k, TextTokenizer};
use unimic_transport::{
    ContextKey, ErrorCode, ImageStream, MessageWriter, ModelChoice, OutgoingPart, ReceivedMessage,
    ReceivedPart, Role, SendError, Server, Session, TextStream, TokenGrid, TokenizerKind,
};

use crate::context::{Kind, Tracker};
use crate::history::{History, HistoryLimits};

/// One answered (or not) turn, for logs: [`ServeOptions::on_turn`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TurnLog {
    /// The client's address.
    pub remote: SocketAddr,
    /// The turn's message id.
    pub turn: u64,
    /// The reply's message id, if one was opened.
    pub reply: Option<u64>,
    /// Bytes of the turn's message stream (all frames).
    pub bytes_in: u64,
    /// Bytes of the reply's message stream (all frames; 0 when no reply was finished).
    pub bytes_out: u64,
    /// From the turn's arrival to the reply's end.
    pub elapsed: Duration,
    /// How it ended.
    pub outcome: TurnOutcome,
}

/// How a turn ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TurnOutcome {
    /// The reply was sent whole.
    Answered,
    /// The client cancelled the reply.
    Cancelled,
    /// The agent failed; the client was told (ERROR `AGENT_FAILED`).
    AgentFailed(String),
    /// The turn or the reply could not be received or sent (reason).
    Failed(String),
}

/// A callback that gets every [`TurnLog`].
pub type TurnCallback = Arc<dyn Fn(&TurnLog) + Send + Sync>;

/// How [`serve_with`] answers turns.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// The text tokenizer the sessions' text parts are coded with (o200k_base; it must match the
    /// transport's text tokenizer).
    pub text: Arc<dyn TextTokenizer>,
    /// Called after every turn (for logs).
    pub on_turn: Option<TurnCallback>,
    /// Code reply images with the generic transformer when the session negotiated it (on);
    /// otherwise with the adaptive model.
    pub transformer_images: bool,
    /// Stream a reply image that an agent hands over in pieces (as the local agent does, row by
    /// row while it samples) once its first pieces have taken this long: the rows so far go out
    /// as the first chunk, and every later chunk of as many tokens as soon as they are there,
    /// so the client sees the picture grow. An image complete before then goes in one chunk
    /// (the fewest bytes). `None`: always one chunk. Default: 50 ms.
    pub stream_images_after: Option<Duration>,
    /// How much of each session's conversation the agent is shown and the server keeps: the
    /// newest turns within these bounds (default: 256 turns, 16 MiB). Older turns leave, so a
    /// long session holds bounded memory; an agent cannot name an image that has left, and a
    /// refinement level that arrives for one is dropped.
    pub history: HistoryLimits,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("text", &self.text.name())
            .field("on_turn", &self.on_turn.is_some())
            .field("transformer_images", &self.transformer_images)
            .field("stream_images_after", &self.stream_images_after)
            .field("history", &self.history)
            .finish()
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            text: Arc::new(O200k::new()),
            on_turn: None,
            transformer_images: true,
            stream_images_after: Some(Duration::from_millis(50)),
            history: HistoryLimits::default(),
        }
    }
}

impl ServeOptions {
    /// Sets [`history`](Self::history): how much of each session's conversation is kept.
    pub fn with_history(mut self, history: HistoryLimits) -> Self {
        self.history = history;
        self
    }

    /// Sets [`stream_images_after`](Self::stream_images_after) (`None`: reply images always go
    /// in one chunk).
    pub fn with_stream_images_after(mut self, after: Option<Duration>) -> Self {
        self.stream_images_after = after;
        self
    }

    /// Calls `f` after every turn.
    pub fn on_turn(mut self, f: impl Fn(&TurnLog) + Send + Sync + 'static) -> Self {
        self.on_turn = Some(Arc::new(f));
        self
    }
}

/// Answers every session `server` accepts with `agent`, until the server is closed. Sessions run
/// concurrently, each in a task of its own; one that fails ends alone.
///
/// ```no_run
/// use unimic_agents::echo::Echo;
/// use unimic_transport::{tls::ServerTls, Server, ServerConfig};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let server = Server::bind(ServerConfig::new(ServerTls::self_signed()?))?;
/// println!("pin {}", server.cert_hash());
/// unimic_chat::serve(server, Echo).await;
/// # Ok(())
/// # }
/// ```
pub async fn serve(server: Server, agent: impl Agent + 'static) {
    serve_with(server, Arc::new(agent), ServeOptions::default()).await
}

/// [`serve`] with a shared agent and options.
pub async fn serve_with(server: Server, agent: Arc<dyn Agent>, options: ServeOptions) {
    serve_until(server, agent, options, std::future::pending()).await
}

/// [`serve_with`] until `stop` completes (or the server is closed): then the server stops
/// accepting and closes every session with `GOING_AWAY`, the sessions' tasks end, and it returns
/// once every connection is closed and the UDP socket is released.
///
/// ```no_run
/// use std::sync::Arc;
/// use unimic_agents::echo::Echo;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let server = unimic_chat::bind_dev("127.0.0.1:0".parse()?, [])?;
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let task = tokio::spawn(unimic_chat::serve_until(
///     server,
///     Arc::new(Echo),
///     unimic_chat::ServeOptions::default(),
///     async move { let _ = stopped.await; },
/// ));
/// // ... later:
/// let _ = stop.send(());
/// task.await?;
/// # Ok(())
/// # }
/// ```
pub async fn serve_until(
    mut server: Server,
    agent: Arc<dyn Agent>,
    options: ServeOptions,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut sessions = JoinSet::new();
    let mut stop = std::pin::pin!(stop);
    let mut stopped = false;
    loop {
        tokio::select! {
            () = &mut stop, if !stopped => {
                stopped = true;
                server.close();
                break;
            }
            accepted = server.accept() => match accepted {
                Some(session) => {
                    sessions.spawn(serve_session(session, agent.clone(), options.clone()));
                }
                None => break,
            },
            Some(done) = sessions.join_next(), if !sessions.is_empty() => {
                if let Err(e) = done {
                    // A panicking agent ends its session only.
                    tracing::warn!(error = %e, "a session task failed");
                }
            }
        }
    }
    sessions.shutdown().await;
    if stopped {
        server.wait_idle().await;
    }
}

fn agent_role(role: Role) -> AgentRole {
    match role {
        Role::Assistant => AgentRole::Assistant,
        Role::System => AgentRole::System,
        _ => AgentRole::User,
    }
}

/// The turn's parts as the agent sees them (text detokenized, keeping the ids), each with the
/// index of its part when the part entered the context (text and images).
fn content(parts: &[ReceivedPart], text: &dyn TextTokenizer) -> (Vec<Content>, Vec<Option<usize>>) {
    parts
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p {
            ReceivedPart::Text(ids) => Some((
                Content::Text {
                    // Ids that are not valid text are decoded lossily (the agent sees the ids too).
                    text: crate::text::TextDecoder::default()
                        .push_all(text, ids)
                        .unwrap_or_default(),
                    ids: Some(ids.clone()),
                },
                Some(i),
            )),
            ReceivedPart::Image(grid) => Some((Content::Image(grid.clone()), Some(i))),
            // Request parts (docs/PROTOCOL.md §6.5.1) become `Content::Request`.
            ReceivedPart::Raw { media_type, bytes } => {
                Some((Content::from_raw(media_type.clone(), bytes.to_vec()), None))
            }
            _ => None,
        })
        .unzip()
}

/// Answers the turns of one session with `agent` until the session ends. [`serve_with`] runs one
/// per accepted session; call it directly to serve sessions accepted elsewhere.
pub async fn serve_session(session: Session, agent: Arc<dyn Agent>, options: ServeOptions) {
    let remote = session.remote_address();
    // The conversation (bounded), with the context key of every piece both ends hold (what an
    // edit reply references) and where refinement levels went.
    let mut history = History::new(options.history);
    let mut tracker = Tracker::default();
    loop {
        let incoming = match session.recv().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(%remote, error = %e, "session ended");
                break;
            }
        };
        let turn = incoming.message_id();
        let started = Instant::now();
        let received: ReceivedMessage = match incoming.collect().await {
            Ok(r) => r,
            Err(e) => {
                // A broken turn fails alone (the transport told the peer).
                log(
                    &options,
                    TurnLog {
                        remote,
                        turn,
                        reply: None,
                        bytes_in: 0,
                        bytes_out: 0,
                        elapsed: started.elapsed(),
                        outcome: TurnOutcome::Failed(e.to_string()),
                    },
                );
                continue;
            }
        };
        for (i, part) in received.parts.iter().enumerate() {
            let kind = match part {
                ReceivedPart::Text(_) => Kind::Text,
                ReceivedPart::Image(_) => Kind::Image,
                _ => continue,
            };
            tracker.record(received_key(&received, i), kind);
        }
        let (turn_content, parts) = content(&received.parts, options.text.as_ref());
        let keys = parts
            .into_iter()
            .map(|i| i.map(|i| received_key(&received, i)))
            .collect();
        history.push(
            Turn {
                role: agent_role(received.role),
                content: turn_content,
            },
            keys,
        );
        fold_refinements(&received, &mut history);
        let mut sink = WireSink::new(&session, turn, &tracker, &options, history.keys());
        let result = tokio::select! {
            r = agent.respond(history.conversation(), &mut sink) => r,
            () = session.cancelled(turn) => Err(AgentError::Sink(SinkError("cancelled".into()))),
        };
        let result = match (result, sink.incomplete()) {
            (Ok(()), Some(why)) => Err(AgentError::Backend(format!(
                "the agent returned, but {why}"
            ))),
            (r, _) => r,
        };
        let cancelled = session.is_cancelled(turn) || sink.cancelled();
        let reply = sink.writer.as_ref().map(|w| w.message_id());
        let (outcome, bytes_out, reply_content, written) = match result {
            Ok(()) => match sink.finish().await {
                Ok((stats, content, written)) => {
                    (TurnOutcome::Answered, stats.wire_bytes, content, written)
                }
                Err(e) if cancelled || matches!(e, SendError::Stopped(_)) => {
                    (TurnOutcome::Cancelled, 0, Vec::new(), Vec::new())
                }
                Err(e) => (
                    TurnOutcome::Failed(e.to_string()),
                    0,
                    Vec::new(),
                    Vec::new(),
                ),
            },
            Err(_) if cancelled => {
                sink.abort(ErrorCode::CANCELLED);
                (TurnOutcome::Cancelled, 0, Vec::new(), Vec::new())
            }
            Err(AgentError::Sink(e)) => {
                sink.abort(ErrorCode::CANCELLED);
                (
                    TurnOutcome::Failed(e.to_string()),
                    0,
                    Vec::new(),
                    Vec::new(),
                )
            }
            Err(e) => {
                let reason = e.to_string();
                session
                    .report_error(ErrorCode::AGENT_FAILED, Some(turn), &reason)
                    .await;
                sink.abort(ErrorCode::AGENT_FAILED);
                (TurnOutcome::AgentFailed(reason), 0, Vec::new(), Vec::new())
            }
        };
        for (key, kind) in written {
            tracker.record(key, kind);
        }
        if outcome == TurnOutcome::Answered {
            let (content, content_keys): (Vec<Content>, Vec<Option<ContextKey>>) =
                reply_content.into_iter().unzip();
            history.push(
                Turn {
                    role: AgentRole::Assistant,
                    content,
                },
                content_keys,
            );
        }
        log(
            &options,
            TurnLog {
                remote,
                turn,
                reply,
                bytes_in: received.stats.wire_bytes,
                bytes_out,
                elapsed: started.elapsed(),
                outcome,
            },
        );
    }
}

/// Adds every refinement level of `received` to the image it sharpens (PROTOCOL.md §6.3 mode
/// 5), found by the key of its base (an image, or a refinement already added): the image
/// becomes [`Content::ImageLevels`]. The transport has checked that each level follows its base;
/// a second refinement of the same level replaces the first and the levels above it.
fn fold_refinements(received: &ReceivedMessage, history: &mut History) {
    for (i, part) in received.parts.iter().enumerate() {
        let ReceivedPart::Refinement { level, base, grid } = part else {
            continue;
        };
        if !history.refine(received_key(received, i), *base, *level, grid) {
            tracing::debug!(
                ?base,
                "a refinement of an image the conversation does not hold"
            );
        }
    }
}

fn received_key(m: &ReceivedMessage, index: usize) -> ContextKey {
    ContextKey::new(m.message_id, index as u64)
}

fn log(options: &ServeOptions, entry: TurnLog) {
    tracing::debug!(turn = entry.turn, outcome = ?entry.outcome, bytes_in = entry.bytes_in, bytes_out = entry.bytes_out, "turn");
    if let Some(f) = &options.on_turn {
        f(&entry);
    }
}

/// The first negotiated image tokenizer's codebook size.
fn image_codebook(session: &Session) -> Option<u32> {
    session.tokenizers().iter().find_map(|t| match t.kind {
        TokenizerKind::Image { codebook_size, .. } => Some(codebook_size),
        _ => None,
    })
}

/// Whether the session negotiated the generic transformer.
pub(crate) fn has_generic(session: &Session) -> bool {
    has_model(session, "unimic-entropy/generic")
}

/// Whether the session negotiated the entropy model `id`.
fn has_model(session: &Session, id: &str) -> bool {
    session
        .negotiated()
        .entropy_models
        .iter()
        .any(|m| m.id == id)
}

/// The [`ReplySink`] that writes an agent's output into the reply message.
/// An edit in progress: sent as a masked part of `reference`, streamed once its first cells took
/// `ServeOptions::stream_images_after`.
struct OpenEdit {
    reference: ContextKey,
    base: TokenGrid,
    region: Vec<bool>,
    /// The redrawn cells so far (row-major over the region), and how many there are in all.
    cells: Vec<u32>,
    total: usize,
    /// When the first cells came (the time to stream counts from there, as for new images).
    since: Option<Instant>,
    /// The index of the streamed part, once it is open.
    streaming: Option<u64>,
}

impl OpenEdit {
    /// The base with the region's cells redrawn (all of them pushed).
    fn grid(&self) -> Result<TokenGrid, SinkError> {
        let ids = fill_region(self.base.ids(), &self.region, &self.cells);
        TokenGrid::new(
            self.base.height(),
            self.base.width(),
            self.base.codebook_size(),
            ids,
        )
        .map_err(|e| SinkError(format!("the agent's edit: {e}")))
    }
}

struct WireSink<'s> {
    session: &'s Session,
    turn: u64,
    options: &'s ServeOptions,
    writer: Option<MessageWriter>,
    /// The index of the open streamed text part, and its text so far.
    text: Option<(u64, String)>,
    next_part: u64,
    text_refs: Vec<unimic_transport::ContextKey>,
    image_refs: Vec<unimic_transport::ContextKey>,
    /// The agent's image so far, and when its first piece came with which shape.
    image: Vec<u32>,
    image_since: Option<(Instant, (u32, u32))>,
    /// The index of the reply image part being streamed, if one is.
    streaming: Option<u64>,
    /// An edit whose redrawn cells are still coming (`ReplySink::begin_edit`).
    edit: Option<OpenEdit>,
    /// What the reply said, with the context key of each piece.
    content: Vec<(Content, Option<ContextKey>)>,
    written: Vec<(ContextKey, Kind)>,
    /// The conversation's context keys (see `serve_session`), for edits.
    keys: &'s VecDeque<Vec<Option<ContextKey>>>,
    stopped: bool,
}

impl<'s> WireSink<'s> {
    fn new(
        session: &'s Session,
        turn: u64,
        tracker: &Tracker,
        options: &'s ServeOptions,
        keys: &'s VecDeque<Vec<Option<ContextKey>>>,
    ) -> Self {
        Self {
            session,
            turn,
            options,
            writer: None,
            text: None,
            next_part: 0,
            text_refs: tracker.refs(session, Kind::Text),
            image_refs: tracker.refs(session, Kind::Image),
            image: Vec::new(),
            image_since: None,
            streaming: None,
            edit: None,
            content: Vec::new(),
            written: Vec::new(),
            keys,
            stopped: false,
        }
    }

    fn cancelled(&self) -> bool {
        self.stopped
            || self
                .writer
                .as_ref()
                .is_some_and(|w| w.is_cancelled_or_reply_cancelled(Some(self.turn)))
    }

    fn fail(&mut self, e: SendError) -> SinkError {
        self.stopped = true;
        SinkError(e.to_string())
    }

    async fn writer(&mut self) -> Result<&mut MessageWriter, SinkError> {
        if self.writer.is_none() {
            match self.session.open_reply(Role::Assistant, self.turn).await {
                Ok(w) => self.writer = Some(w),
                Err(e) => return Err(self.fail(e)),
            }
        }
        self.writer
            .as_mut()
            .ok_or_else(|| SinkError("no reply".into()))
    }

    async fn close_text(&mut self) -> Result<(), SendError> {
        if let Some((index, text)) = self.text.take() {
            let mut key = None;
            if let Some(w) = self.writer.as_mut() {
                w.end_text().await?;
                key = Some(w.key(index));
                self.written.push((w.key(index), Kind::Text));
            }
            self.content.push((Content::text(text), key));
        }
        Ok(())
    }

    async fn text(&mut self, delta: &str) -> Result<(), SinkError> {
        if self.cancelled() {
            return Err(SinkError("the client cancelled the reply".into()));
        }
        if self.streaming.is_some() || self.edit.as_ref().is_some_and(|e| e.streaming.is_some()) {
            // The image's part is open on the stream: text would need a part of its own.
            return Err(SinkError(format!(
                "text while {}",
                self.incomplete().unwrap_or_default()
            )));
        }
        let ids = self.options.text.encode(delta);
        let refs = self.text_refs.clone();
        let index = self.next_part;
        let open = self.text.is_some();
        let w = self.writer().await?;
        let r = async {
            if !open {
                w.begin_text(TextStream::default().with_context(refs))
                    .await?;
            }
            w.push_text(&ids).await
        }
        .await;
        if let Err(e) = r {
            return Err(self.fail(e));
        }
        if !open {
            self.next_part += 1;
            self.text = Some((index, String::new()));
        }
        if let Some((_, t)) = self.text.as_mut() {
            t.push_str(delta);
        }
        Ok(())
    }

    async fn image(&mut self, shape: (u32, u32), ids: &[u32], last: bool) -> Result<(), SinkError> {
        if self.cancelled() {
            return Err(SinkError("the client cancelled the reply".into()));
        }
        if self.edit.is_some() {
            return Err(SinkError(format!(
                "an image while {}",
                self.incomplete().unwrap_or_default()
            )));
        }
        let codebook = image_codebook(self.session)
            .ok_or_else(|| SinkError("the session negotiated no image tokenizer".into()))?;
        let cells = shape.0 as usize * shape.1 as usize;
        if self.image.len() + ids.len() > cells || (last && self.image.len() + ids.len() != cells) {
            // Refused whole: the image stays as it was (the agent may still complete it).
            return Err(SinkError(format!(
                "the agent's image: {} ids for a {}x{} grid",
                self.image.len() + ids.len(),
                shape.0,
                shape.1
            )));
        }
        let (since, started) = *self.image_since.get_or_insert((Instant::now(), shape));
        if started != shape {
            return Err(SinkError(format!(
                "the agent's image changed shape from {}x{} to {}x{} part way",
                started.0, started.1, shape.0, shape.1
            )));
        }
        self.image.extend_from_slice(ids);
        let generic = self.options.transformer_images && has_generic(self.session);
        if let Some(index) = self.streaming {
            return self.stream_image(index, shape, codebook, ids).await;
        }
        let width = shape.1 as usize;
        let stream = !last
            && self.image.len() >= width
            && self
                .options
                .stream_images_after
                .is_some_and(|after| since.elapsed() >= after);
        if stream {
            // The rows so far are the first chunk; every chunk after it as many tokens.
            let rows = self.image.len() - self.image.len() % width;
            let mut spec = ImageStream::new(shape.0, shape.1, codebook)
                .with_chunk_tokens(u32::try_from(rows).unwrap_or(u32::MAX));
            spec = if generic {
                spec.with_model(ModelChoice::Generic)
            } else {
                spec.with_context(self.image_refs.clone())
            };
            let index = self.open_image(spec).await?;
            self.streaming = Some(index);
            let all = self.image.clone();
            return self.stream_image(index, shape, codebook, &all).await;
        }
        if !last {
            return Ok(());
        }
        let ids = std::mem::take(&mut self.image);
        self.image_since = None;
        let grid = TokenGrid::new(shape.0, shape.1, codebook, ids)
            .map_err(|e| SinkError(format!("the agent's image: {e}")))?;
        let part = if generic {
            OutgoingPart::image(grid.clone()).with_model(ModelChoice::Generic)
        } else {
            OutgoingPart::image(grid.clone()).with_context(self.image_refs.clone())
        };
        self.write_image(part, grid).await
    }

    /// The image or edit the agent began and has not completed, if any: what ending the reply
    /// now would drop (or leave half on the wire).
    fn incomplete(&self) -> Option<String> {
        if let Some((_, (h, w))) = self.image_since {
            return Some(format!(
                "the image begun is not complete ({} of {} tokens)",
                self.image.len(),
                h as usize * w as usize
            ));
        }
        self.edit.as_ref().map(|e| {
            format!(
                "the edit begun is not complete ({} of {} cells)",
                e.cells.len(),
                e.total
            )
        })
    }

    /// Closes the text part, if open, and opens the streamed image part `spec`; returns its index.
    async fn open_image(&mut self, spec: ImageStream) -> Result<u64, SinkError> {
        if let Err(e) = self.close_text().await {
            return Err(self.fail(e));
        }
        let index = self.next_part;
        let w = self.writer().await?;
        if let Err(e) = w.begin_image(spec).await {
            return Err(self.fail(e));
        }
        self.next_part += 1;
        Ok(index)
    }

    /// Pushes `ids` into the streamed image part `index`; its context key once it is whole.
    async fn push_streamed(
        &mut self,
        index: u64,
        ids: &[u32],
    ) -> Result<Option<ContextKey>, SinkError> {
        let w = self.writer().await?;
        let key = w.key(index);
        match w.push_image(ids).await {
            Ok(done) => Ok(done.map(|_| key)),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Pushes `ids` into the streamed image part `index`; records the image once it is whole.
    async fn stream_image(
        &mut self,
        index: u64,
        shape: (u32, u32),
        codebook: u32,
        ids: &[u32],
    ) -> Result<(), SinkError> {
        if let Some(key) = self.push_streamed(index, ids).await? {
            self.streaming = None;
            self.image_since = None;
            let ids = std::mem::take(&mut self.image);
            let grid = TokenGrid::new(shape.0, shape.1, codebook, ids)
                .map_err(|e| SinkError(format!("the agent's image: {e}")))?;
            self.written.push((key, Kind::Image));
            self.content.push((Content::Image(grid), Some(key)));
        }
        Ok(())
    }

    /// Closes the text part, if open, and writes the image part `part` of `grid`.
    async fn write_image(&mut self, part: OutgoingPart, grid: TokenGrid) -> Result<(), SinkError> {
        if let Err(e) = self.close_text().await {
            return Err(self.fail(e));
        }
        let index = self.next_part;
        let w = self.writer().await?;
        let key = w.key(index);
        if let Err(e) = w.write_part(part).await {
            return Err(self.fail(e));
        }
        self.next_part += 1;
        self.written.push((key, Kind::Image));
        self.content.push((Content::Image(grid), Some(key)));
        Ok(())
    }

    /// An image that equals the conversation's image at `base` outside `region`: sent as a
    /// masked edit of it (only the region's cells travel) when the session negotiated the
    /// masked transformer and both ends still hold the base; otherwise whole.
    async fn edit(
        &mut self,
        base: ImageRef,
        grid: &TokenGrid,
        region: &[bool],
    ) -> Result<(), SinkError> {
        if self.cancelled() {
            return Err(SinkError("the client cancelled the reply".into()));
        }
        if let Some(why) = self.incomplete() {
            return Err(SinkError(format!("an edit while {why}")));
        }
        let Some(reference) = self.edit_reference(base, grid.len(), region) else {
            return self
                .image((grid.height(), grid.width()), grid.ids(), true)
                .await;
        };
        let part = OutgoingPart::edit(grid.clone(), reference, region.to_vec());
        self.write_image(part, grid.clone()).await
    }

    /// The context key of the image at `base` when an edit of it can travel as one (the session
    /// negotiated the masked transformer, both ends still hold the base, `region` fits it and
    /// redraws something).
    fn edit_reference(&self, base: ImageRef, cells: usize, region: &[bool]) -> Option<ContextKey> {
        self.keys
            .get(base.turn)
            .and_then(|t| t.get(base.content))
            .copied()
            .flatten()
            .filter(|key| {
                self.options.transformer_images
                    && has_model(self.session, "unimic-entropy/masked")
                    && region.len() == cells
                    && region.iter().any(|&r| r)
                    && self.session.context_holds(*key)
            })
    }

    /// Starts an edit whose cells come later (see `ReplySink::begin_edit`): only where it can
    /// travel as an edit and images may stream.
    fn begin_edit(
        &mut self,
        base: ImageRef,
        base_grid: &TokenGrid,
        region: &[bool],
    ) -> Result<bool, SinkError> {
        if self.cancelled() {
            return Err(SinkError("the client cancelled the reply".into()));
        }
        if let Some(why) = self.incomplete() {
            return Err(SinkError(format!("an edit while {why}")));
        }
        let reference = self.edit_reference(base, base_grid.len(), region);
        let (Some(reference), Some(_)) = (reference, self.options.stream_images_after) else {
            return Ok(false);
        };
        self.edit = Some(OpenEdit {
            reference,
            base: base_grid.clone(),
            region: region.to_vec(),
            cells: Vec::new(),
            total: region.iter().filter(|&&r| r).count(),
            since: None,
            streaming: None,
        });
        Ok(true)
    }

    /// The next redrawn cells of the edit begun (see `ReplySink::edit_tokens`).
    async fn edit_tokens(&mut self, ids: &[u32], last: bool) -> Result<(), SinkError> {
        if self.cancelled() {
            return Err(SinkError("the client cancelled the reply".into()));
        }
        let after = self.options.stream_images_after.unwrap_or_default();
        let Some(e) = self.edit.as_mut() else {
            return Err(SinkError("no edit was begun".into()));
        };
        let got = e.cells.len() + ids.len();
        if got > e.total || (last && got != e.total) {
            return Err(SinkError(format!(
                "the agent's edit: {got} cells for a region of {}",
                e.total
            )));
        }
        e.cells.extend_from_slice(ids);
        if let Some(index) = e.streaming {
            return self.push_edit(index, ids).await;
        }
        let since = *e.since.get_or_insert_with(Instant::now);
        if last {
            // Complete before it was worth streaming: one masked part, as `image_edit`.
            let grid = e.grid()?;
            let part = OutgoingPart::edit(grid.clone(), e.reference, e.region.clone());
            self.edit = None;
            return self.write_image(part, grid).await;
        }
        if since.elapsed() < after || e.cells.is_empty() {
            return Ok(());
        }
        // The cells so far are the first chunk; every chunk after it as many.
        let spec = ImageStream::new(e.base.height(), e.base.width(), e.base.codebook_size())
            .edit(e.reference, e.region.clone())
            .with_chunk_tokens(u32::try_from(e.cells.len()).unwrap_or(u32::MAX));
        let pending = e.cells.clone();
        let index = self.open_image(spec).await?;
        if let Some(e) = self.edit.as_mut() {
            e.streaming = Some(index);
        }
        self.push_edit(index, &pending).await
    }

    /// Pushes redrawn cells into the streamed edit part `index`; records the image once whole.
    async fn push_edit(&mut self, index: u64, ids: &[u32]) -> Result<(), SinkError> {
        if let Some(key) = self.push_streamed(index, ids).await? {
            let Some(e) = self.edit.take() else {
                return Err(SinkError("no edit was begun".into()));
            };
            self.written.push((key, Kind::Image));
            self.content.push((Content::Image(e.grid()?), Some(key)));
        }
        Ok(())
    }

    /// Ends the reply (an empty one if the agent said nothing): its statistics, what it said,
    /// and the context keys of its parts.
    #[allow(clippy::type_complexity)]
    async fn finish(
        mut self,
    ) -> Result<
        (
            unimic_transport::MessageStats,
            Vec<(Content, Option<ContextKey>)>,
            Vec<(ContextKey, Kind)>,
        ),
        SendError,
    > {
        if self.writer.is_none() {
            self.writer = Some(self.session.open_reply(Role::Assistant, self.turn).await?);
        }
        self.close_text().await?;
        let writer = self.writer.take().ok_or(SendError::Cancelled)?;
        let stats = writer.finish().await?;
        Ok((stats, self.content, self.written))
    }

    /// Abandons the reply, resetting its stream with `code` if it was opened.
    fn abort(&mut self, code: ErrorCode) {
        if let Some(w) = self.writer.take() {
            w.abort(code);
        }
    }
}

impl ReplySink for WireSink<'_> {
    fn text_delta<'a>(&'a mut self, delta: &'a str) -> SinkFuture<'a> {
        Box::pin(self.text(delta))
    }

    fn image_tokens<'a>(
        &'a mut self,
        shape: (u32, u32),
        ids: &'a [u32],
        last: bool,
    ) -> SinkFuture<'a> {
        Box::pin(self.image(shape, ids, last))
    }

    fn image_edit<'a>(
        &'a mut self,
        base: ImageRef,
        grid: &'a TokenGrid,
        region: &'a [bool],
    ) -> SinkFuture<'a> {
        Box::pin(self.edit(base, grid, region))
    }

    fn begin_edit<'a>(
        &'a mut self,
        base: ImageRef,
        base_grid: &'a TokenGrid,
        region: &'a [bool],
    ) -> BoolFuture<'a> {
        let r = WireSink::begin_edit(self, base, base_grid, region);
        Box::pin(std::future::ready(r))
    }

    fn edit_tokens<'a>(&'a mut self, ids: &'a [u32], last: bool) -> SinkFuture<'a> {
        Box::pin(WireSink::edit_tokens(self, ids, last))
    }
}

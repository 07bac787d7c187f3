//! [`MessageWriter`]: one outgoing message on its own unidirectional stream.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tracing::Instrument;
use unimic_codec::context::{ContextKey, Sequence, SequenceKind, SessionContext};
use unimic_codec::part::{
    Chunk, EncodedPart, GridStream, ModelChoice, PartCodec, PartSpec, PartTokens,
};
use unimic_protocol::{
    CodedPart, CodingMode, ContextRef, Encode, ErrorCode, Frame, InReplyTo, MessageEnd,
    MessageHeader, PartBody, PartChunk, PartHeader, RawPart, Role, Shape, VarInt,
};

use crate::error::SendError;
use crate::message::{ImageStream, MessageStats, OutgoingPart, PartContent, PartStats, TextStream};
use crate::models::{find_entropy, TokenizerKind};
use crate::session::Shared;
use crate::wire;

/// Room left in a frame for the chunk fields before the payload.
const CHUNK_OVERHEAD: u64 = 40;

/// A message sent whole ([`Session::send`](crate::Session::send)) is written in one go at the
/// end, unless its frames pile up beyond this many bytes: then what is coded so far is written
/// before the next part is coded, so large parts start travelling early.
const DEFER_FLUSH_BYTES: usize = 16 * 1024;

/// Initial capacity of a message's pending frames: a small message (header, a few parts, end)
/// is staged without growing the buffer.
const PENDING_CAPACITY: usize = 512;

/// Parts of more tokens than this are coded on tokio's blocking pool, not on the async workers:
/// a 256×256 grid takes tens of milliseconds to code, during which a worker would otherwise run
/// nothing else (no QUIC connection driver, no other session). Smaller parts are coded inline,
/// where a thread hop would cost more than the coding.
pub(crate) const BLOCKING_TOKENS: u64 = 1024;

/// A streamed text part in progress.
struct OpenText {
    index: u64,
    spec: PartSpec,
    seq: u64,
    ids: Vec<u32>,
    stats: PartStats,
}

/// A streamed image part in progress.
struct OpenImage {
    index: u64,
    /// The codec's stream (taken out while a push codes on the blocking pool).
    stream: Option<GridStream>,
    transformer: bool,
    seq: u64,
    stats: PartStats,
}

/// One outgoing message. Write parts with [`write_part`](Self::write_part), stream a text part
/// with [`begin_text`](Self::begin_text) / [`push_text`](Self::push_text) /
/// [`end_text`](Self::end_text) or an image part with [`begin_image`](Self::begin_image) /
/// [`push_image`](Self::push_image); then [`finish`](Self::finish).
///
/// Frames are coalesced: the message header goes out with the first part (or with the end), and
/// each call writes what it produced in one stream write, so a small message travels in one
/// packet together with its stream end. Nothing reaches the peer before the first
/// `write_part`, `begin_text` or `finish`.
///
/// Dropping a writer before `finish` (or calling [`cancel`](Self::cancel)) resets the stream with
/// `CANCELLED`: the peer drops the message. A message that does not complete leaves no part in
/// either context (PROTOCOL.md §5.4): the parts already coded are taken out of ours again, and
/// the peer takes out those it had decoded. So does a message the peer refuses or cancels (an
/// Error or Cancel frame naming it), even if it was finished here.
pub struct MessageWriter {
    shared: Arc<Shared>,
    stream: Option<quinn::SendStream>,
    /// Frames encoded and not written yet.
    pending: BytesMut,
    /// Whole-message mode: keep frames until `finish` (or [`DEFER_FLUSH_BYTES`]).
    defer: bool,
    /// Parts of this message in our context: taken out again if the message is abandoned
    /// (PROTOCOL.md §5.4).
    kept: Vec<ContextKey>,
    message_id: u64,
    next_part: u64,
    text: Option<OpenText>,
    image: Option<OpenImage>,
    stats: MessageStats,
    /// Bytes of every frame written so far (checked against `max_message_bytes`).
    total_wire: u64,
    started: Instant,
    span: tracing::Span,
}

impl std::fmt::Debug for MessageWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageWriter")
            .field("message_id", &self.message_id)
            .field("next_part", &self.next_part)
            .finish_non_exhaustive()
    }
}

fn v(n: u64) -> VarInt {
    VarInt::saturating(n)
}

fn refs(keys: &[ContextKey]) -> Vec<ContextRef> {
    keys.iter()
        .map(|k| ContextRef {
            message_id: v(k.message_id),
            part_index: v(k.part_index),
        })
        .collect()
}

/// The coding mode a part announces (PROTOCOL.md §6.3): the masked transformer codes a region
/// (mode 2, built by the caller from the region), the text-conditioned one is mode 3, the
/// generic one mode 1; the built-in models say what their references are.
fn mode(
    model: ModelChoice,
    kind: SequenceKind,
    context: &[ContextKey],
    level: Option<u32>,
) -> CodingMode {
    if let (ModelChoice::Ladder, Some(l)) = (model, level) {
        return CodingMode::Refinement {
            level: VarInt::from_u32(l),
        };
    }
    match (model, kind) {
        (ModelChoice::Uniform, _) => CodingMode::Uniform,
        (ModelChoice::TextCond, _) => CodingMode::TextConditioned,
        (ModelChoice::Generic, _) => CodingMode::Generic,
        _ if context.is_empty() => CodingMode::Generic,
        (_, SequenceKind::Grid) => CodingMode::ImageConditioned,
        _ => CodingMode::TextConditioned,
    }
}

/// The chunk size to code `part` with: the part's own or the session default; a transformer part
/// is one chunk unless it asks for a size (its chunks decode in order, one after the other, so
/// splitting it gains a receiver nothing when the whole part is at hand) or does not fit a frame.
fn chunking(part: &OutgoingPart, default: u32) -> u32 {
    match part.chunk_tokens {
        Some(c) => c,
        None if part.model.is_transformer() => 0,
        None => default,
    }
}

/// The codec's spec for `part`.
fn part_spec(part: &OutgoingPart, chunk_tokens: u32) -> PartSpec {
    let spec = PartSpec::new(part.model)
        .with_refs(part.context.clone())
        .with_chunk_tokens(chunk_tokens);
    let spec = match &part.region {
        Some(region) => spec.with_region(region.clone()),
        None => spec,
    };
    match part.level {
        Some(level) => spec.with_level(level),
        None => spec,
    }
}

impl MessageWriter {
    /// Opens the stream and stages the message header. `defer`: whole-message mode (see
    /// [`DEFER_FLUSH_BYTES`]).
    pub(crate) async fn open(
        shared: Arc<Shared>,
        role: Role,
        in_reply_to: Option<u64>,
        defer: bool,
    ) -> Result<Self, SendError> {
        if let Some(id) = in_reply_to {
            if !shared.is_peer_id(id) {
                return Err(SendError::Usage(
                    "in_reply_to must name a message of the peer",
                ));
            }
        }
        let (message_id, stream) = shared.open_stream().await?;
        let span = tracing::debug_span!(parent: &shared.span, "message.send", id = message_id);
        let mut w = MessageWriter {
            shared,
            stream: Some(stream),
            // Room for the frames of a small message, which is written in one go.
            pending: BytesMut::with_capacity(PENDING_CAPACITY),
            defer,
            kept: Vec::new(),
            message_id,
            next_part: 0,
            text: None,
            image: None,
            stats: MessageStats {
                message_id,
                ..MessageStats::default()
            },
            total_wire: 0,
            started: Instant::now(),
            span,
        };
        let header = Frame::MessageHeader(MessageHeader {
            message_id: v(message_id),
            role,
        });
        let mut out = std::mem::take(&mut w.pending);
        w.put(&mut out, &header)?;
        if let Some(id) = in_reply_to {
            // PROTOCOL.md §5.3: directly after the header, in the same write.
            w.put(&mut out, &Frame::InReplyTo(InReplyTo { message_id: v(id) }))?;
        }
        w.pending = out;
        Ok(w)
    }

    /// This message's id (for context references and acknowledgements).
    pub fn message_id(&self) -> u64 {
        self.message_id
    }

    /// The context key of part `index` of this message.
    pub fn key(&self, index: u64) -> ContextKey {
        ContextKey::new(self.message_id, index)
    }

    /// Encodes a frame at the end of `out`, counting it against the message size limit.
    fn put(&mut self, out: &mut BytesMut, frame: &Frame) -> Result<(), SendError> {
        let len = frame.encoded_len() as u64;
        let limit = self.shared.negotiated.limits.max_message_bytes.into_inner();
        let total = self.total_wire + len;
        if total > limit {
            return Err(SendError::Limit {
                what: "message size",
                value: total,
                limit,
            });
        }
        self.total_wire = total;
        frame.encode(out);
        Ok(())
    }

    /// Runs `stage`, which appends frames to the pending bytes; if it fails, the pending bytes
    /// and the size count are as before (nothing of a failed part is sent).
    fn staged<T>(
        &mut self,
        stage: impl FnOnce(&mut Self, &mut BytesMut) -> Result<T, SendError>,
    ) -> Result<T, SendError> {
        let mut out = std::mem::take(&mut self.pending);
        let (mark, wire) = (out.len(), self.total_wire);
        let r = stage(self, &mut out);
        if r.is_err() {
            out.truncate(mark);
            self.total_wire = wire;
        }
        self.pending = out;
        r
    }

    /// Writes the pending frames in one stream write.
    async fn flush(&mut self) -> Result<(), SendError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.stream.is_none() {
            return Err(SendError::Cancelled);
        }
        let bytes = std::mem::take(&mut self.pending).freeze();
        let stream = self.stream.as_mut().ok_or(SendError::Cancelled)?;
        let r = stream
            .write_chunk(bytes)
            .instrument(self.span.clone())
            .await;
        r.map_err(SendError::from)?;
        Ok(())
    }

    /// Whether the peer asked (with a Cancel frame) to stop this message.
    pub fn is_cancelled(&self) -> bool {
        self.shared.state().cancelled.contains(&self.message_id)
    }

    fn tokenizer(
        &self,
        kind: SequenceKind,
        name: Option<&str>,
        codebook: u32,
    ) -> Result<(VarInt, Option<u32>), SendError> {
        let neg = &self.shared.negotiated.tokenizers;
        for (i, info) in neg.iter().enumerate() {
            if name.is_some_and(|n| n != info.id) {
                continue;
            }
            let Some(local) = self.shared.tokenizers.iter().find(|t| t.info == *info) else {
                continue;
            };
            let fits = match (kind, local.kind) {
                (SequenceKind::Text, TokenizerKind::Text { .. }) => Some(None),
                (
                    SequenceKind::Grid,
                    TokenizerKind::Image {
                        codebook_size,
                        patch,
                    },
                ) if codebook_size == codebook => Some(Some(patch)),
                _ => None,
            };
            if let Some(patch) = fits {
                return Ok((v(i as u64), patch));
            }
        }
        Err(SendError::NotNegotiated(match name {
            Some(n) => format!("tokenizer {n}"),
            None if kind == SequenceKind::Grid => {
                format!("an image tokenizer with codebook size {codebook}")
            }
            None => "a text tokenizer".into(),
        }))
    }

    fn entropy(&self, model: ModelChoice, kind: SequenceKind) -> Result<VarInt, SendError> {
        find_entropy(
            &self.shared.negotiated.entropy_models,
            &self.shared.entropy,
            model,
            kind,
        )
        .map(|(i, _)| i)
        .ok_or_else(|| SendError::NotNegotiated(format!("entropy model {model:?} for {kind:?}")))
    }

    /// Checks an image part's shape against the negotiated limits and finds its tokenizer
    /// (index, patch size) and entropy model (index) in the session tables.
    fn image_tables(
        &self,
        (height, width, codebook): (u32, u32, u32),
        tokenizer: Option<&str>,
        model: ModelChoice,
    ) -> Result<(VarInt, Option<u32>, VarInt), SendError> {
        let limits = self.shared.negotiated.limits;
        for (what, value, limit) in [
            ("grid height", height, limits.max_grid_height.into_inner()),
            ("grid width", width, limits.max_grid_width.into_inner()),
        ] {
            let value = u64::from(value);
            if value > limit {
                return Err(SendError::Limit { what, value, limit });
            }
        }
        let (tok, patch) = self.tokenizer(SequenceKind::Grid, tokenizer, codebook)?;
        Ok((tok, patch, self.entropy(model, SequenceKind::Grid)?))
    }

    fn frame_budget(&self) -> u64 {
        self.shared
            .negotiated
            .limits
            .max_frame_bytes
            .into_inner()
            .saturating_sub(CHUNK_OVERHEAD)
    }

    /// Codes tokens so that every chunk fits a frame (see [`encode_part`]).
    fn encode(
        &self,
        tokens: PartTokens<'_>,
        spec: PartSpec,
        n: u64,
    ) -> Result<EncodedPart, SendError> {
        encode_part(&self.shared, tokens, spec, n)
    }

    /// Codes a large text or image part on the blocking pool (see [`BLOCKING_TOKENS`]) after the
    /// cheap checks; `None` for raw and small parts, which [`stage_part`](Self::stage_part) codes
    /// inline.
    async fn precode(
        &self,
        part: &mut OutgoingPart,
        chunk_tokens: u32,
    ) -> Result<Option<EncodedPart>, SendError> {
        let limits = self.shared.negotiated.limits;
        let n = match &part.content {
            PartContent::Text(ids) => {
                self.tokenizer(SequenceKind::Text, part.tokenizer.as_deref(), 0)?;
                self.entropy(part.model, SequenceKind::Text)?;
                ids.len() as u64
            }
            PartContent::Image(grid) => {
                let (h, w) = (u64::from(grid.height()), u64::from(grid.width()));
                if h > limits.max_grid_height.into_inner() || w > limits.max_grid_width.into_inner()
                {
                    // stage_part reports which limit.
                    return Ok(None);
                }
                self.tokenizer(
                    SequenceKind::Grid,
                    part.tokenizer.as_deref(),
                    grid.codebook_size(),
                )?;
                self.entropy(part.model, SequenceKind::Grid)?;
                h * w
            }
            PartContent::Raw { .. } => return Ok(None),
        };
        // A transformer runs a network per token (the masked one whole-grid passes): off the
        // async workers whatever the size.
        if n <= BLOCKING_TOKENS && !part.model.is_transformer() {
            return Ok(None);
        }
        let spec = part_spec(part, chunk_tokens);
        let content = std::mem::replace(&mut part.content, PartContent::Text(Vec::new()));
        let shared = self.shared.clone();
        let (coded, content) = tokio::task::spawn_blocking(move || {
            let coded = match &content {
                PartContent::Text(ids) => encode_part(&shared, PartTokens::Text(ids), spec, n),
                PartContent::Image(grid) => encode_part(&shared, PartTokens::Grid(grid), spec, n),
                PartContent::Raw { .. } => Err(SendError::Usage("raw parts are not coded")),
            };
            (coded, content)
        })
        .await
        .map_err(|e| SendError::Task(e.to_string()))?;
        part.content = content;
        coded.map(Some)
    }

    fn check_open(&self) -> Result<(), SendError> {
        if self.text.is_some() {
            return Err(SendError::Usage("a streamed text part is open"));
        }
        if self.image.is_some() {
            return Err(SendError::Usage("a streamed image part is not complete"));
        }
        if self.stream.is_none() {
            return Err(SendError::Cancelled);
        }
        Ok(())
    }

    /// Codes and writes one whole part. Returns its statistics.
    pub async fn write_part(&mut self, part: OutgoingPart) -> Result<PartStats, SendError> {
        self.check_open()?;
        let index = self.next_part;
        let mut part = part;
        if let Some(i) = part.refines_part.take() {
            if i >= index {
                return Err(SendError::Usage(
                    "a refinement must follow the part of this message it refines",
                ));
            }
            part.context.insert(0, self.key(i));
        }
        let chunk_tokens = chunking(&part, self.shared.config.default_chunk_tokens);
        let pre = self.precode(&mut part, chunk_tokens).await?;
        let (stats, commit) = self.staged(|w, out| w.stage_part(out, index, part, pre))?;
        self.next_part += 1;
        if !self.defer || self.pending.len() >= DEFER_FLUSH_BYTES {
            self.flush().await?;
        }
        if let Some(seq) = commit {
            self.commit(index, seq).await?;
        }
        self.stats.add_part(stats.clone());
        Ok(stats)
    }

    /// Codes part `index` and appends its frames to `out`. Returns its statistics and the
    /// sequence to insert into the context (none for raw parts).
    fn stage_part(
        &mut self,
        out: &mut BytesMut,
        index: u64,
        part: OutgoingPart,
        pre: Option<EncodedPart>,
    ) -> Result<(PartStats, Option<Sequence>), SendError> {
        let chunk_tokens = chunking(&part, self.shared.config.default_chunk_tokens);
        let mut stats = PartStats {
            index,
            ..PartStats::default()
        };
        let before = self.total_wire;
        let spec = part_spec(&part, chunk_tokens);
        let commit = match part.content {
            PartContent::Raw { media_type, bytes } => {
                let header = Frame::PartHeader(PartHeader {
                    index: v(index),
                    body: PartBody::Raw(RawPart { media_type }),
                });
                self.put(out, &header)?;
                let budget = usize::try_from(self.frame_budget())
                    .unwrap_or(usize::MAX)
                    .max(1);
                // A chunk per `budget` bytes (an empty part has one, empty, chunk); each a
                // slice of the caller's buffer.
                let count = bytes.len().div_ceil(budget).max(1);
                for seq in 0..count {
                    let start = seq * budget;
                    let payload = bytes.slice(start..start.saturating_add(budget).min(bytes.len()));
                    stats.payload_bytes += payload.len() as u64;
                    let f = Frame::PartChunk(PartChunk {
                        part_index: v(index),
                        seq: v(seq as u64),
                        fin: seq + 1 == count,
                        token_count: VarInt::ZERO,
                        payload,
                    });
                    self.put(out, &f)?;
                }
                stats.wire_bytes = self.total_wire - before;
                None
            }
            PartContent::Text(ids) => {
                let (tok, _) = self.tokenizer(SequenceKind::Text, part.tokenizer.as_deref(), 0)?;
                let model = self.entropy(part.model, SequenceKind::Text)?;
                let n = ids.len() as u64;
                let coded = match pre {
                    Some(c) => c,
                    None => self.encode(PartTokens::Text(&ids), spec, n)?,
                };
                let header = CodedPart {
                    tokenizer: tok,
                    entropy_model: model,
                    shape: Shape {
                        rows: VarInt::from_u32(1),
                        cols: v(n),
                    },
                    token_count: v(n),
                    mode: mode(part.model, SequenceKind::Text, &part.context, None),
                    context: refs(&part.context),
                    context_digest: coded.digest,
                };
                self.coded_frames(out, index, PartBody::Text(header), coded, &mut stats)?;
                Some(Sequence::text(ids))
            }
            PartContent::Image(grid) => {
                let (h, w) = (u64::from(grid.height()), u64::from(grid.width()));
                let (tok, patch, model) = self.image_tables(
                    (grid.height(), grid.width(), grid.codebook_size()),
                    part.tokenizer.as_deref(),
                    part.model,
                )?;
                let coded = match pre {
                    Some(c) => c,
                    None => self.encode(PartTokens::Grid(&grid), spec, h * w)?,
                };
                // The codec has checked the region against the grid and the model.
                let mode = match &part.region {
                    Some(region) => {
                        CodingMode::Masked(crate::region::to_wire(region, grid.width()))
                    }
                    None => mode(part.model, SequenceKind::Grid, &part.context, part.level),
                };
                let header = CodedPart {
                    tokenizer: tok,
                    entropy_model: model,
                    shape: Shape {
                        rows: v(h),
                        cols: v(w),
                    },
                    // A masked part codes only its region's cells.
                    token_count: v(coded.tokens),
                    mode,
                    context: refs(&part.context),
                    context_digest: coded.digest,
                };
                stats.pixels = patch.map(|p| coded.tokens * u64::from(p) * u64::from(p));
                self.coded_frames(out, index, PartBody::Image(header), coded, &mut stats)?;
                // The codec has checked the level against the part it refines.
                Some(match part.level {
                    Some(level) => Sequence::refinement(&grid, level),
                    None => Sequence::grid(&grid),
                })
            }
        };
        Ok((stats, commit))
    }

    fn coded_frames(
        &mut self,
        out: &mut BytesMut,
        index: u64,
        body: PartBody,
        coded: EncodedPart,
        stats: &mut PartStats,
    ) -> Result<(), SendError> {
        let header = Frame::PartHeader(PartHeader {
            index: v(index),
            body,
        });
        let before = self.total_wire;
        self.put(out, &header)?;
        let (payload_bytes, _) = self.put_chunks(out, index, 0, coded.chunks, true)?;
        stats.payload_bytes += payload_bytes;
        stats.tokens = coded.tokens;
        stats.wire_bytes = self.total_wire - before;
        Ok(())
    }

    /// Appends chunk frames of part `index`, numbered from `seq`; `fin` marks the last of them
    /// as the part's final chunk. Returns their payload bytes and tokens.
    fn put_chunks(
        &mut self,
        out: &mut BytesMut,
        index: u64,
        seq: u64,
        chunks: Vec<Chunk>,
        fin: bool,
    ) -> Result<(u64, u64), SendError> {
        let (mut payload_bytes, mut tokens) = (0, 0);
        let count = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            payload_bytes += chunk.payload.len() as u64;
            tokens += u64::from(chunk.tokens);
            let f = Frame::PartChunk(PartChunk {
                part_index: v(index),
                seq: v(seq + i as u64),
                fin: fin && i + 1 == count,
                token_count: VarInt::from_u32(chunk.tokens),
                payload: Bytes::from(chunk.payload),
            });
            self.put(out, &f)?;
        }
        Ok((payload_bytes, tokens))
    }

    /// Inserts a finished part into our context and announces evictions.
    async fn commit(&mut self, index: u64, seq: Sequence) -> Result<(), SendError> {
        let key = self.key(index);
        let evicted = {
            let mut st = self.shared.state();
            let evicted = st.context.insert(key, seq);
            if evicted.is_ok() {
                if st.dropped.contains(&self.message_id) {
                    // The peer already refused or cancelled this message (§5.4).
                    st.context.evict(key);
                } else {
                    self.kept.push(key);
                }
            }
            evicted
        };
        self.shared.notify_changed();
        match evicted {
            // Boxed: evictions are rare, and the write would enlarge every part's future.
            Ok(ev) if !ev.is_empty() => Box::pin(self.shared.announce_evicted(ev)).await,
            Ok(_) => {}
            // A part larger than the whole context budget is simply not kept.
            Err(e) => tracing::debug!(parent: &self.span, error = %e, "part not kept in context"),
        }
        Ok(())
    }

    /// Starts a streamed text part whose length is not known yet.
    pub async fn begin_text(&mut self, stream: TextStream) -> Result<(), SendError> {
        self.check_open()?;
        let index = self.next_part;
        let (tok, _) = self.tokenizer(SequenceKind::Text, stream.tokenizer.as_deref(), 0)?;
        let model = self.entropy(stream.model, SequenceKind::Text)?;
        let digest = {
            let st = self.shared.state();
            st.context
                .digest(&stream.context)
                .map_err(unimic_codec::part::PartError::from)?
        };
        let header = Frame::PartHeader(PartHeader {
            index: v(index),
            body: PartBody::Text(CodedPart {
                tokenizer: tok,
                entropy_model: model,
                shape: Shape {
                    rows: VarInt::from_u32(1),
                    cols: VarInt::ZERO,
                },
                token_count: VarInt::ZERO,
                mode: mode(stream.model, SequenceKind::Text, &stream.context, None),
                context: refs(&stream.context),
                context_digest: digest,
            }),
        });
        let before = self.total_wire;
        self.staged(|w, out| w.put(out, &header))?;
        self.flush().await?;
        self.next_part += 1;
        self.text = Some(OpenText {
            index,
            spec: PartSpec::new(stream.model).with_refs(stream.context),
            seq: 0,
            ids: Vec::new(),
            stats: PartStats {
                index,
                wire_bytes: self.total_wire - before,
                ..PartStats::default()
            },
        });
        Ok(())
    }

    /// Codes and sends `ids` as the next chunk of the open streamed text part. The receiver gets
    /// them decoded as soon as the chunk arrives.
    pub async fn push_text(&mut self, ids: &[u32]) -> Result<(), SendError> {
        self.text_chunk(ids, false).await?;
        self.flush().await
    }

    /// Ends the streamed text part (with a final, possibly empty, chunk).
    pub async fn end_text(&mut self) -> Result<PartStats, SendError> {
        let stats = self.close_text().await?;
        self.flush().await?;
        Ok(stats)
    }

    /// Stages the final chunk of the open text part and commits the part.
    async fn close_text(&mut self) -> Result<PartStats, SendError> {
        self.text_chunk(&[], true).await?;
        let Some(open) = self.text.take() else {
            return Err(SendError::Usage("no streamed text part is open"));
        };
        self.commit(open.index, Sequence::text(open.ids)).await?;
        self.stats.add_part(open.stats.clone());
        Ok(open.stats)
    }

    /// Codes `ids` as the next chunk(s) of the open text part and stages them (not written).
    async fn text_chunk(&mut self, ids: &[u32], fin: bool) -> Result<(), SendError> {
        if self.stream.is_none() {
            return Err(SendError::Cancelled);
        }
        let Some(open) = self.text.as_ref() else {
            return Err(SendError::Usage("no streamed text part is open"));
        };
        let (index, seq) = (open.index, open.seq);
        let spec = open.spec.clone();
        // Each chunk is coded alone from the state after the references (chunks are independent).
        let coded = self.encode(PartTokens::Text(ids), spec, ids.len() as u64)?;
        let before = self.total_wire;
        let seqs = coded.chunks.len() as u64;
        let (payload_bytes, _) =
            self.staged(|w, out| w.put_chunks(out, index, seq, coded.chunks, fin))?;
        let wire = self.total_wire - before;
        if let Some(open) = self.text.as_mut() {
            open.seq += seqs;
            open.ids.extend_from_slice(ids);
            open.stats.tokens += ids.len() as u64;
            open.stats.payload_bytes += payload_bytes;
            open.stats.wire_bytes += wire;
        }
        Ok(())
    }

    /// Starts a streamed image part: its header goes out now, its tokens with
    /// [`push_image`](Self::push_image) as they come (a reply image sent row by row while an
    /// agent samples it). Each chunk of `stream.chunk_tokens` tokens is coded and written as soon
    /// as its tokens are pushed; with a transformer model the chunks continue one run of the
    /// model (PROTOCOL.md §6.6), so the bytes are those of the grid coded whole in chunks of that
    /// size. A chunk size whose worst-case payload would not fit a frame is lowered to one that
    /// does (to whole rows where it can).
    pub async fn begin_image(&mut self, stream: ImageStream) -> Result<(), SendError> {
        self.check_open()?;
        let (h, w) = (u64::from(stream.height), u64::from(stream.width));
        let (tok, patch, model) = self.image_tables(
            (stream.height, stream.width, stream.codebook_size),
            stream.tokenizer.as_deref(),
            stream.model,
        )?;
        // Every chunk must fit a frame whatever its tokens cost: at most 24 bits each (the
        // coder's precision) and the coder's termination.
        let most = (self.frame_budget().saturating_sub(16) / 3).max(1);
        let total = stream
            .region
            .as_ref()
            .map_or(h * w, |r| r.iter().filter(|&&c| c).count() as u64);
        let mut chunk = match u64::from(stream.chunk_tokens) {
            0 => total.max(1),
            c => c,
        };
        if chunk > most {
            chunk = if most >= w { most - most % w } else { most };
        }
        let mut spec = PartSpec::new(stream.model)
            .with_refs(stream.context.clone())
            .with_chunk_tokens(u32::try_from(chunk).unwrap_or(u32::MAX));
        if let Some(r) = &stream.region {
            spec = spec.with_region(r.clone());
        }
        let transformer = stream.model.is_transformer();
        let (height, width, k) = (stream.height, stream.width, stream.codebook_size);
        let shared = self.shared.clone();
        let start = move || -> Result<GridStream, SendError> {
            if transformer {
                // As in `encode_part`: the model passes run without the state lock.
                let (mut codec, context) = {
                    let st = shared.state();
                    (
                        PartCodec::new(st.codec.config().clone()),
                        references_only(&st.context, &spec.refs),
                    )
                };
                Ok(codec.grid_stream(&context, height, width, k, &spec)?)
            } else {
                let mut st = shared.state();
                let st = &mut *st;
                Ok(st.codec.grid_stream(&st.context, height, width, k, &spec)?)
            }
        };
        let grid_stream = if transformer || !stream.context.is_empty() {
            tokio::task::spawn_blocking(start)
                .await
                .map_err(|e| SendError::Task(e.to_string()))??
        } else {
            start()?
        };
        let mode = match &stream.region {
            Some(region) => CodingMode::Masked(crate::region::to_wire(region, stream.width)),
            None => mode(stream.model, SequenceKind::Grid, &stream.context, None),
        };
        let header = Frame::PartHeader(PartHeader {
            index: v(self.next_part),
            body: PartBody::Image(CodedPart {
                tokenizer: tok,
                entropy_model: model,
                shape: Shape {
                    rows: v(h),
                    cols: v(w),
                },
                token_count: v(grid_stream.total()),
                mode,
                context: refs(&stream.context),
                context_digest: grid_stream.digest(),
            }),
        });
        let index = self.next_part;
        let before = self.total_wire;
        self.staged(|w, out| w.put(out, &header))?;
        self.flush().await?;
        self.next_part += 1;
        self.image = Some(OpenImage {
            index,
            stats: PartStats {
                index,
                wire_bytes: self.total_wire - before,
                pixels: patch.map(|p| grid_stream.total() * u64::from(p) * u64::from(p)),
                ..PartStats::default()
            },
            stream: Some(grid_stream),
            transformer,
            seq: 0,
        });
        Ok(())
    }

    /// Pushes the next tokens of the open streamed image part (row-major; a masked part's region
    /// cells only) and writes every chunk they complete. The push that completes the grid ends
    /// the part: it is committed to the context and its statistics are returned. Pushing past
    /// the grid, or an id outside the codebook, is refused (`SendError::Codec`) and sends
    /// nothing; a chunk that would take the message past its size limit fails the part (the
    /// message cannot complete: drop or cancel the writer).
    pub async fn push_image(&mut self, ids: &[u32]) -> Result<Option<PartStats>, SendError> {
        if self.stream.is_none() {
            return Err(SendError::Cancelled);
        }
        let Some(open) = self.image.as_mut() else {
            return Err(SendError::Usage("no streamed image part is open"));
        };
        let Some(mut stream) = open.stream.take() else {
            return Err(SendError::Usage(
                "the streamed image part failed earlier; the message cannot complete",
            ));
        };
        let (chunks, stream) = if open.transformer || ids.len() as u64 > BLOCKING_TOKENS {
            let ids = ids.to_vec();
            tokio::task::spawn_blocking(move || (stream.push(&ids), stream))
                .await
                .map_err(|e| SendError::Task(e.to_string()))?
        } else {
            (stream.push(ids), stream)
        };
        let done = stream.is_done();
        open.stream = Some(stream);
        let chunks: Vec<Chunk> = chunks?;
        let (index, seq) = (open.index, open.seq);
        let before = self.total_wire;
        let count = chunks.len();
        let staged = self.staged(|w, out| w.put_chunks(out, index, seq, chunks, done));
        let (payload_bytes, tokens) = match staged {
            Ok(v) => v,
            Err(e) => {
                // The codec has moved past tokens the peer will never get: the part cannot go
                // on (later pushes are refused, and so is `finish`).
                if let Some(open) = self.image.as_mut() {
                    open.stream = None;
                }
                return Err(e);
            }
        };
        let wire = self.total_wire - before;
        if let Some(open) = self.image.as_mut() {
            open.seq += count as u64;
            open.stats.tokens += tokens;
            open.stats.payload_bytes += payload_bytes;
            open.stats.wire_bytes += wire;
        }
        self.flush().await?;
        if !done {
            return Ok(None);
        }
        let Some(OpenImage {
            index,
            stream: Some(stream),
            stats,
            ..
        }) = self.image.take()
        else {
            return Err(SendError::Usage("no streamed image part is open"));
        };
        let grid = stream.into_grid()?;
        self.commit(index, Sequence::grid(&grid)).await?;
        self.stats.add_part(stats.clone());
        Ok(Some(stats))
    }

    /// Writes the message end (with whatever is still pending, in one write) and finishes the
    /// stream. Returns the message statistics.
    pub async fn finish(mut self) -> Result<MessageStats, SendError> {
        self.finish_here().await
    }

    /// [`finish`](Self::finish) without moving the writer into the future (a writer left
    /// unfinished by an error resets its stream when dropped, as before).
    pub(crate) async fn finish_here(&mut self) -> Result<MessageStats, SendError> {
        if self.text.is_some() {
            self.close_text().await?;
        }
        if self.image.is_some() {
            return Err(SendError::Usage("a streamed image part is not complete"));
        }
        let end = Frame::MessageEnd(MessageEnd {
            part_count: v(self.next_part),
        });
        self.staged(|w, out| w.put(out, &end))?;
        self.flush().await?;
        if let Some(mut stream) = self.stream.take() {
            // Fails only if the stream was already reset: the message did not complete.
            if stream.finish().is_err() {
                self.abandon();
                return Err(SendError::Cancelled);
            }
        }
        self.shared.own_done(self.message_id, true);
        let mut stats = std::mem::take(&mut self.stats);
        stats.wire_bytes = self.total_wire;
        stats.elapsed = self.started.elapsed();
        tracing::debug!(parent: &self.span, wire = stats.wire_bytes, tokens = stats.tokens, "message sent");
        Ok(stats)
    }

    /// Abandons the message: resets the stream with `CANCELLED`.
    pub fn cancel(mut self) {
        self.reset(ErrorCode::CANCELLED);
    }

    /// Abandons the message with `code` (for example `AGENT_FAILED`): resets the stream with it.
    pub fn abort(mut self, code: ErrorCode) {
        self.reset(code);
    }

    /// Whether the peer asked to stop this message, or every reply to the message it answers
    /// (a CANCEL naming that message, PROTOCOL.md §5.3).
    pub fn is_cancelled_or_reply_cancelled(&self, in_reply_to: Option<u64>) -> bool {
        let st = self.shared.state();
        st.cancelled.contains(&self.message_id)
            || in_reply_to.is_some_and(|id| st.cancelled.contains(&id))
    }

    fn reset(&mut self, code: ErrorCode) {
        if let Some(mut stream) = self.stream.take() {
            let _ = stream.reset(wire::quic_code(code));
            self.abandon();
        }
    }

    /// The message will not complete: its parts leave our context (PROTOCOL.md §5.4; the peer
    /// drops those it decoded when the stream is reset) and it is no longer in flight.
    fn abandon(&mut self) {
        if !self.kept.is_empty() {
            let mut st = self.shared.state();
            for key in self.kept.drain(..) {
                st.context.evict(key);
            }
        }
        self.shared.own_done(self.message_id, false);
    }
}

impl Drop for MessageWriter {
    fn drop(&mut self) {
        self.reset(ErrorCode::CANCELLED);
    }
}

/// Codes tokens so that every chunk fits a frame: halves the chunk size until it does. Codes
/// against the context as it is at that moment (what the peer checks with the digest).
///
/// Algorithmic models code under the state lock: they learn the references through the shared
/// codec's cache of learned states. A transformer part depends only on the codec configuration
/// and the sequences it refers to (nothing is learned or cached for it), so only those are taken
/// under the lock ([`references_only`]) and the model passes run without it: a long encode does
/// not hold up the receive side's context lookups. (A transformer part split this way is still
/// one run of the model, its chunks decoded in order, PROTOCOL.md §6.6.) The bytes are the same either way, and our
/// context is still updated only when the part is written ([`MessageWriter::commit`]), in the
/// same order as before.
fn encode_part(
    shared: &Shared,
    tokens: PartTokens<'_>,
    spec: PartSpec,
    n: u64,
) -> Result<EncodedPart, SendError> {
    let budget = shared
        .negotiated
        .limits
        .max_frame_bytes
        .into_inner()
        .saturating_sub(CHUNK_OVERHEAD);
    let mut spec = spec;
    let transformer = spec.model.is_transformer();
    let mut own = None;
    if transformer {
        let st = shared.state();
        own = Some((
            PartCodec::new(st.codec.config().clone()),
            references_only(&st.context, &spec.refs),
        ));
    }
    loop {
        let part = match own.as_mut() {
            Some((codec, context)) => codec.encode(context, tokens, &spec)?,
            None => {
                let mut st = shared.state();
                let st = &mut *st;
                st.codec.encode(&st.context, tokens, &spec)?
            }
        };
        let largest = part
            .chunks
            .iter()
            .map(|c| c.payload.len() as u64)
            .max()
            .unwrap_or(0);
        let chunk = u64::from(spec.chunk_tokens.unwrap_or(u32::MAX)).min(n);
        if largest <= budget || chunk <= 1 {
            if largest > budget {
                return Err(SendError::Limit {
                    what: "chunk payload",
                    value: largest,
                    limit: budget,
                });
            }
            return Ok(part);
        }
        spec = spec.with_chunk_tokens(u32::try_from(chunk / 2).unwrap_or(u32::MAX).max(1));
    }
}

/// A context holding only the entries of `context` that `refs` name (sequences are shared, not
/// copied): the digest over `refs` and the sequences they resolve to are the same in both, and a
/// reference `context` lacks is lacking here too (the encode fails the same way).
fn references_only(context: &SessionContext, refs: &[ContextKey]) -> SessionContext {
    let mut only = SessionContext::new(u64::MAX);
    for &key in refs {
        if let Some(seq) = context.get(key) {
            // A key named twice is already in.
            let _ = only.insert(key, seq.clone());
        }
    }
    only
}

#[cfg(test)]
mod tests {
    use super::references_only;
    use unimic_codec::context::{ContextError, ContextKey, Sequence, SessionContext};
    use unimic_codec::grid::TokenGrid;

    #[test]
    fn references_only_keeps_the_digest_and_what_is_missing() {
        let k = ContextKey::new;
        let mut ctx = SessionContext::new(1 << 20);
        ctx.insert(k(0, 0), Sequence::text(vec![1, 2, 3])).unwrap();
        ctx.insert(k(2, 0), Sequence::text(vec![4])).unwrap();
        let grid = TokenGrid::new(2, 2, 16, vec![1, 2, 3, 4]).unwrap();
        ctx.insert(k(2, 1), Sequence::grid(&grid)).unwrap();

        // Out of order, and one key named twice.
        let refs = [k(2, 1), k(0, 0), k(2, 1)];
        let only = references_only(&ctx, &refs);
        assert_eq!(only.keys().len(), 2);
        assert_eq!(only.digest(&refs).unwrap(), ctx.digest(&refs).unwrap());
        assert_eq!(only.resolve(&refs).unwrap(), ctx.resolve(&refs).unwrap());
        assert!(only.get(k(2, 0)).is_none());

        // A reference the context lacks is lacking in the copy too.
        let refs = [k(0, 0), k(4, 0)];
        let only = references_only(&ctx, &refs);
        assert!(matches!(ctx.digest(&refs), Err(ContextError::Missing(m)) if m == k(4, 0)));
        assert!(matches!(only.digest(&refs), Err(ContextError::Missing(m)) if m == k(4, 0)));
    }
}

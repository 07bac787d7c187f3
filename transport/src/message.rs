//! What callers hand a session to send, what they get back when receiving, and the per-message
//! statistics of both.

use std::time::Duration;

use bytes::Bytes;
use unimic_codec::context::ContextKey;
use unimic_codec::grid::TokenGrid;
use unimic_codec::part::ModelChoice;
use unimic_protocol::Role;

/// A message to send: a role and its parts, coded by the session.
///
/// ```
/// use unimic_transport::{OutgoingMessage, OutgoingPart, Role};
/// let msg = OutgoingMessage::new(Role::User).with_part(OutgoingPart::text(vec![1, 2, 3]));
/// assert_eq!(msg.parts.len(), 1);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OutgoingMessage {
    /// Who speaks.
    pub role: Role,
    /// The peer's message this one answers, sent as an `IN_REPLY_TO` frame (PROTOCOL.md §5.3).
    pub in_reply_to: Option<u64>,
    /// The parts, in order.
    pub parts: Vec<OutgoingPart>,
}

impl OutgoingMessage {
    /// A message without parts.
    pub fn new(role: Role) -> Self {
        Self {
            role,
            in_reply_to: None,
            parts: Vec::new(),
        }
    }

    /// Marks the message as the answer to the peer's message `message_id` (PROTOCOL.md §5.3).
    pub fn in_reply_to(mut self, message_id: u64) -> Self {
        self.in_reply_to = Some(message_id);
        self
    }

    /// Appends a part.
    pub fn with_part(mut self, part: OutgoingPart) -> Self {
        self.parts.push(part);
        self
    }
}

/// The content of a part to send.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PartContent {
    /// Text token ids of a negotiated text tokenizer.
    Text(Vec<u32>),
    /// An image token grid of a negotiated image tokenizer.
    Image(TokenGrid),
    /// An opaque attachment, sent as it is (not entropy-coded, not part of the context).
    Raw {
        /// Media type, for example `image/png` (1 to 127 bytes).
        media_type: String,
        /// The bytes.
        bytes: Bytes,
    },
}

/// One part to send and how to code it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OutgoingPart {
    /// The content.
    pub content: PartContent,
    /// The entropy model (adaptive by default).
    pub model: ModelChoice,
    /// Earlier parts of the session (or of this message) the coding conditions on, in order.
    pub context: Vec<ContextKey>,
    /// Tokens per independently decodable chunk; `None` uses the session default.
    pub chunk_tokens: Option<u32>,
    /// The tokenizer id to name; `None` picks the first negotiated tokenizer of the right kind
    /// (for images: with the grid's codebook size).
    pub tokenizer: Option<String>,
    /// The cells a [`ModelChoice::Masked`] image part codes (row-major, `true` inside the
    /// region); see [`OutgoingPart::edit`].
    pub region: Option<Vec<bool>>,
    /// The quality-ladder level a [`ModelChoice::Ladder`] image part carries (2 ..= 16); see
    /// [`OutgoingPart::refinement`].
    pub level: Option<u32>,
    /// The index of an earlier part of the same message this part refines: put first in
    /// `context` (as that part's key) when the part is written; see
    /// [`OutgoingPart::refinement_of_part`].
    pub refines_part: Option<u64>,
}

impl OutgoingPart {
    fn new(content: PartContent) -> Self {
        Self {
            content,
            model: ModelChoice::Adaptive,
            context: Vec::new(),
            chunk_tokens: None,
            tokenizer: None,
            region: None,
            level: None,
            refines_part: None,
        }
    }

    /// Text token ids.
    pub fn text(ids: Vec<u32>) -> Self {
        Self::new(PartContent::Text(ids))
    }

    /// An image token grid.
    pub fn image(grid: TokenGrid) -> Self {
        Self::new(PartContent::Image(grid))
    }

    /// An edit of an image the peer already holds: `grid` is the whole edited grid, equal to the
    /// image at `reference` outside `region` (row-major, `true` = edited cell). Coded with the
    /// masked transformer ([`ModelChoice::Masked`], PROTOCOL.md §6.4), so only the region's cells
    /// travel; the peer rebuilds the whole grid from its copy of `reference`, and the whole grid
    /// is what enters both contexts. Further context (to be digest-checked) can follow the
    /// reference through [`with_context`](Self::with_context), as long as `reference` stays the
    /// first image part listed.
    ///
    /// ```
    /// use unimic_codec::context::ContextKey;
    /// use unimic_codec::grid::TokenGrid;
    /// use unimic_transport::OutgoingPart;
    /// let edited = TokenGrid::new(2, 2, 16, vec![1, 2, 3, 9]).unwrap();
    /// let part = OutgoingPart::edit(edited, ContextKey::new(0, 0), vec![false, false, false, true]);
    /// assert_eq!(part.context, [ContextKey::new(0, 0)]);
    /// ```
    pub fn edit(grid: TokenGrid, reference: ContextKey, region: Vec<bool>) -> Self {
        let mut part = Self::new(PartContent::Image(grid));
        part.model = ModelChoice::Masked;
        part.context = vec![reference];
        part.region = Some(region);
        part
    }

    /// Refinement level `level` (2 ..= 16) of a quality ladder: `grid` holds the residual codes
    /// that refine the image part at `below` (level `level - 1`, the same shape; the base image
    /// for level 2). Coded with the ladder's model of that level ([`ModelChoice::Ladder`],
    /// PROTOCOL.md §6.3 mode 5), so the peer can show the image at once and sharpen it as the
    /// levels arrive. Get the grids from
    /// `ImageTokenizer::encode_levels`.
    ///
    /// ```
    /// use unimic_codec::context::ContextKey;
    /// use unimic_codec::grid::TokenGrid;
    /// use unimic_transport::OutgoingPart;
    /// let level2 = TokenGrid::new(2, 2, 16, vec![1, 2, 3, 9]).unwrap();
    /// let part = OutgoingPart::refinement(level2, ContextKey::new(0, 0), 2);
    /// assert_eq!((part.context.as_slice(), part.level), (&[ContextKey::new(0, 0)][..], Some(2)));
    /// ```
    pub fn refinement(grid: TokenGrid, below: ContextKey, level: u32) -> Self {
        let mut part = Self::new(PartContent::Image(grid));
        part.model = ModelChoice::Ladder;
        part.context = vec![below];
        part.level = Some(level);
        part
    }

    /// Like [`refinement`](Self::refinement), for a level below sent earlier in the same
    /// message, as its part `index` (the message id is known only once the message is opened).
    ///
    /// ```
    /// use unimic_codec::grid::TokenGrid;
    /// use unimic_transport::{OutgoingMessage, OutgoingPart, Role};
    /// let base = TokenGrid::new(2, 2, 16, vec![1, 2, 3, 4]).unwrap();
    /// let level2 = TokenGrid::new(2, 2, 16, vec![0, 5, 0, 9]).unwrap();
    /// let message = OutgoingMessage::new(Role::User)
    ///     .with_part(OutgoingPart::image(base))
    ///     .with_part(OutgoingPart::refinement_of_part(level2, 0, 2));
    /// assert_eq!(message.parts[1].refines_part, Some(0));
    /// ```
    pub fn refinement_of_part(grid: TokenGrid, index: u64, level: u32) -> Self {
        let mut part = Self::new(PartContent::Image(grid));
        part.model = ModelChoice::Ladder;
        part.level = Some(level);
        part.refines_part = Some(index);
        part
    }

    /// A raw attachment.
    pub fn raw(media_type: impl Into<String>, bytes: impl Into<Bytes>) -> Self {
        Self::new(PartContent::Raw {
            media_type: media_type.into(),
            bytes: bytes.into(),
        })
    }

    /// Sets the entropy model.
    pub fn with_model(mut self, model: ModelChoice) -> Self {
        self.model = model;
        self
    }

    /// Sets the context references.
    pub fn with_context(mut self, context: Vec<ContextKey>) -> Self {
        self.context = context;
        self
    }

    /// Sets the chunk size in tokens.
    pub fn with_chunk_tokens(mut self, tokens: u32) -> Self {
        self.chunk_tokens = Some(tokens.max(1));
        self
    }

    /// Sets the region a masked part codes (row-major, `true` = coded cell); the model must be
    /// [`ModelChoice::Masked`] (see [`edit`](Self::edit)).
    pub fn with_region(mut self, region: Vec<bool>) -> Self {
        self.region = Some(region);
        self
    }

    /// Names the tokenizer.
    pub fn with_tokenizer(mut self, id: impl Into<String>) -> Self {
        self.tokenizer = Some(id.into());
        self
    }
}

/// How a streamed text part is coded (see [`MessageWriter::begin_text`](crate::MessageWriter::begin_text)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TextStream {
    /// The entropy model.
    pub model: ModelChoice,
    /// Context references.
    pub context: Vec<ContextKey>,
    /// Tokenizer id; `None` picks the first negotiated text tokenizer.
    pub tokenizer: Option<String>,
}

impl Default for TextStream {
    fn default() -> Self {
        Self {
            model: ModelChoice::Adaptive,
            context: Vec::new(),
            tokenizer: None,
        }
    }
}

impl TextStream {
    /// Sets the context references.
    pub fn with_context(mut self, context: Vec<ContextKey>) -> Self {
        self.context = context;
        self
    }

    /// Sets the entropy model.
    pub fn with_model(mut self, model: ModelChoice) -> Self {
        self.model = model;
        self
    }
}

/// How a streamed image part is coded (see
/// [`MessageWriter::begin_image`](crate::MessageWriter::begin_image)): its shape is known at the
/// start, its tokens come later, a chunk at a time.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ImageStream {
    /// Grid rows.
    pub height: u32,
    /// Grid columns.
    pub width: u32,
    /// The tokenizer's codebook size.
    pub codebook_size: u32,
    /// The entropy model (adaptive by default).
    pub model: ModelChoice,
    /// Context references.
    pub context: Vec<ContextKey>,
    /// The cells a [`ModelChoice::Masked`] part codes (row-major, `true` inside): its tokens are
    /// then pushed for those cells only, in row-major order.
    pub region: Option<Vec<bool>>,
    /// Tokens per chunk: each chunk goes out once its tokens are pushed. `0`: the whole part in
    /// one chunk, sent when the last token is pushed.
    pub chunk_tokens: u32,
    /// Tokenizer id; `None` picks the first negotiated image tokenizer with this codebook size.
    pub tokenizer: Option<String>,
}

impl ImageStream {
    /// A `height × width` grid of a tokenizer with `codebook_size` codes, adaptive model, no
    /// context, one chunk.
    pub fn new(height: u32, width: u32, codebook_size: u32) -> Self {
        Self {
            height,
            width,
            codebook_size,
            model: ModelChoice::Adaptive,
            context: Vec::new(),
            region: None,
            chunk_tokens: 0,
            tokenizer: None,
        }
    }

    /// Sets the entropy model.
    pub fn with_model(mut self, model: ModelChoice) -> Self {
        self.model = model;
        self
    }

    /// Sets the context references.
    pub fn with_context(mut self, context: Vec<ContextKey>) -> Self {
        self.context = context;
        self
    }

    /// Sets the tokens per chunk (`0`: one chunk).
    pub fn with_chunk_tokens(mut self, tokens: u32) -> Self {
        self.chunk_tokens = tokens;
        self
    }

    /// An edit of `reference` (same shape) with the masked model: only `region`'s cells are
    /// pushed and travel (see [`OutgoingPart::edit`]).
    pub fn edit(mut self, reference: ContextKey, region: Vec<bool>) -> Self {
        self.model = ModelChoice::Masked;
        self.context = vec![reference];
        self.region = Some(region);
        self
    }
}

/// What kind of part, as announced by its header.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PartKind {
    /// Text ids; `tokens` is `None` while a streamed part's length is unknown.
    Text {
        /// Announced token count.
        tokens: Option<u64>,
    },
    /// An image token grid.
    Image {
        /// Rows.
        height: u32,
        /// Columns.
        width: u32,
        /// Codebook size.
        codebook_size: u32,
    },
    /// A raw attachment.
    Raw {
        /// Media type.
        media_type: String,
    },
}

/// A part header as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartInfo {
    /// Index in the message.
    pub index: u64,
    /// What it holds.
    pub kind: PartKind,
    /// The context it was coded against.
    pub context: Vec<ContextKey>,
    /// The tokenizer id it names (empty for raw parts).
    pub tokenizer: String,
    /// For a masked image part (an edit of a referenced image): the cells it codes, row-major,
    /// `true` inside the region. Its chunk carries those cells' tokens (row-major); the whole
    /// grid arrives with [`MessageEvent::PartEnd`].
    pub region: Option<Vec<bool>>,
    /// The quality-ladder level: 1, except for a refinement part (PROTOCOL.md §6.3, mode 5),
    /// which arrives as [`ReceivedPart::Refinement`].
    pub level: u32,
}

/// The content of one received chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChunkData {
    /// Decoded token ids, starting at token `start` of the part (row-major for grids; for a
    /// masked part, the region's cells in row-major order).
    Tokens {
        /// Position of the first id in the part.
        start: u64,
        /// The ids.
        ids: Vec<u32>,
    },
    /// Bytes of a raw attachment.
    Raw(Bytes),
}

/// A whole received part.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReceivedPart {
    /// Text ids.
    Text(Vec<u32>),
    /// An image token grid.
    Image(TokenGrid),
    /// Refinement level `level` of a quality ladder (PROTOCOL.md §6.3, mode 5): residual codes
    /// that sharpen the image at `base` (level `level - 1`; level 1 is an [`Image`](Self::Image)).
    /// Decode an image from its levels in order with `ImageTokenizer::decode_levels`.
    Refinement {
        /// The level, 2 ..= 16.
        level: u32,
        /// The part it refines: the level below.
        base: ContextKey,
        /// The residual codes, the base's shape.
        grid: TokenGrid,
    },
    /// A raw attachment.
    Raw {
        /// Media type.
        media_type: String,
        /// The bytes.
        bytes: Bytes,
    },
}

/// One step of an incoming message, in stream order.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MessageEvent {
    /// A part starts.
    PartStart(PartInfo),
    /// A chunk of the current part arrived and was decoded.
    Chunk {
        /// The part.
        part_index: u64,
        /// Chunk number in the part.
        seq: u64,
        /// Whether it is the last chunk of the part.
        fin: bool,
        /// The decoded content.
        data: ChunkData,
    },
    /// A part is complete (and now in the session context).
    PartEnd {
        /// The part.
        index: u64,
        /// The whole part.
        part: ReceivedPart,
        /// Its statistics.
        stats: PartStats,
    },
    /// The message is complete.
    End(MessageStats),
}

/// A whole received message (see [`IncomingMessage::collect`](crate::IncomingMessage::collect)).
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedMessage {
    /// The message id.
    pub message_id: u64,
    /// Who spoke.
    pub role: Role,
    /// The message of ours it answers (its `IN_REPLY_TO` frame, PROTOCOL.md §5.3), if it said.
    pub in_reply_to: Option<u64>,
    /// The parts.
    pub parts: Vec<ReceivedPart>,
    /// Statistics.
    pub stats: MessageStats,
}

/// Statistics of one part.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartStats {
    /// Index in the message.
    pub index: u64,
    /// Tokens coded (0 for raw parts; for a masked part, the cells of its region only).
    pub tokens: u64,
    /// Bytes of chunk payloads (the entropy-coded bits, rounded up per chunk).
    pub payload_bytes: u64,
    /// Bytes of the part's frames on the stream (header and chunks, framing included).
    pub wire_bytes: u64,
    /// Pixels of the coded tokens (image parts with a known patch size: coded tokens × patch²,
    /// so for a masked part the region's pixels), for bits per pixel.
    pub pixels: Option<u64>,
}

impl PartStats {
    /// Payload bits per token (`None` for parts without tokens).
    pub fn bits_per_token(&self) -> Option<f64> {
        (self.tokens > 0).then(|| 8.0 * self.payload_bytes as f64 / self.tokens as f64)
    }

    /// Payload bits per pixel (image parts whose tokenizer states a patch size).
    pub fn bits_per_pixel(&self) -> Option<f64> {
        self.pixels
            .filter(|&p| p > 0)
            .map(|p| 8.0 * self.payload_bytes as f64 / p as f64)
    }
}

/// Statistics of one message, sent or received.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageStats {
    /// The message id.
    pub message_id: u64,
    /// Per part.
    pub parts: Vec<PartStats>,
    /// Bytes of all frames on the message stream (QUIC packet overhead not included).
    pub wire_bytes: u64,
    /// Bytes of chunk payloads.
    pub payload_bytes: u64,
    /// Tokens over all parts.
    pub tokens: u64,
    /// From opening the stream to finishing it (sent), or from the header to the end (received).
    pub elapsed: Duration,
}

impl MessageStats {
    /// Payload bits per token over all coded parts.
    pub fn bits_per_token(&self) -> Option<f64> {
        let (bytes, tokens) = self
            .parts
            .iter()
            .filter(|p| p.tokens > 0)
            .fold((0, 0), |(b, t), p| (b + p.payload_bytes, t + p.tokens));
        (tokens > 0).then(|| 8.0 * bytes as f64 / tokens as f64)
    }

    /// Payload bits per pixel over the image parts.
    pub fn bits_per_pixel(&self) -> Option<f64> {
        let (bytes, pixels) = self
            .parts
            .iter()
            .filter_map(|p| p.pixels.map(|px| (p.payload_bytes, px)))
            .fold((0, 0), |(b, x), (pb, px)| (b + pb, x + px));
        (pixels > 0).then(|| 8.0 * bytes as f64 / pixels as f64)
    }

    pub(crate) fn add_part(&mut self, part: PartStats) {
        self.wire_bytes += part.wire_bytes;
        self.payload_bytes += part.payload_bytes;
        self.tokens += part.tokens;
        self.parts.push(part);
    }
}

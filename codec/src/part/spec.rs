//! What a part is and how it is to be coded: the model choice and identity, the tokens and
//! shape, the spec (references, chunking, region, ladder level) and the encoded result.

use super::*;

/// The entropy model a part is coded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ModelChoice {
    /// `log2 K` bits per token.
    Uniform,
    /// The configured static model (order-0 grid counts, or the text prior frozen).
    Static,
    /// [`AdaptiveGrid`] for grids, [`AdaptiveText`] for text.
    Adaptive,
    /// The configured generic transformer ([`Generic`], docs/CODING.md §7), for grids only. It
    /// conditions on the tokens of the grid itself, not on the context references (which are
    /// still digest-checked). Its chunks continue one run of the model over the grid, so they
    /// decode in order ([`PartError::ChunkOrder`]).
    Generic,
    /// The configured masked transformer ([`Masked`], docs/CODING.md §7.7), for grids only: codes
    /// the cells of the spec's region given the other cells, which come from the first image
    /// part among the references. Chunks decode in order.
    Masked,
    /// The configured text-conditioned transformer ([`TextCond`], docs/CODING.md §7.8), for grids
    /// only: conditions on the text parts among the references, concatenated in order. Chunks
    /// decode in order.
    TextCond,
    /// The configured quality-ladder models ([`Ladder`], docs/PROTOCOL.md §6.3 mode 5), for grids
    /// only: codes refinement level [`PartSpec::level`] of the first image part among the
    /// references (the level below: same shape, level one less), each token with the order-0
    /// model of that level.
    Ladder,
}

impl ModelChoice {
    /// Whether this is a transformer model (docs/CODING.md §7): it does not learn from the
    /// references, and its chunks of a part continue one run of the model (they decode in order,
    /// not independently).
    pub fn is_transformer(self) -> bool {
        matches!(
            self,
            ModelChoice::Generic | ModelChoice::Masked | ModelChoice::TextCond
        )
    }
}

/// Wire ids of the built-in models (later built-in models take 5 and up; the learned
/// transformer models are named by id string and content hash instead, see docs/CODING.md §7).
pub mod model_id {
    /// [`ModelChoice::Uniform`](super::ModelChoice::Uniform), grids and text.
    pub const UNIFORM: u32 = 0;
    /// [`ModelChoice::Static`](super::ModelChoice::Static) for grids.
    pub const STATIC_GRID: u32 = 1;
    /// [`ModelChoice::Adaptive`](super::ModelChoice::Adaptive) for grids.
    pub const ADAPTIVE_GRID: u32 = 2;
    /// [`ModelChoice::Adaptive`](super::ModelChoice::Adaptive) for text.
    pub const ADAPTIVE_TEXT: u32 = 3;
    /// [`ModelChoice::Static`](super::ModelChoice::Static) for text.
    pub const STATIC_TEXT: u32 = 4;
    /// [`ModelChoice::Generic`](super::ModelChoice::Generic): the configured transformer, whose
    /// identity hash is the SHA-256 of its weights file.
    pub const GENERIC_GRID: u32 = 5;
    /// [`ModelChoice::Masked`](super::ModelChoice::Masked): the configured masked transformer,
    /// whose identity hash is the SHA-256 of its weights file.
    pub const MASKED_GRID: u32 = 6;
    /// [`ModelChoice::TextCond`](super::ModelChoice::TextCond): the configured text-conditioned
    /// transformer, whose identity hash is the SHA-256 of its weights file.
    pub const TEXT_COND_GRID: u32 = 7;
    /// [`ModelChoice::Ladder`](super::ModelChoice::Ladder): the quality ladder's per-level models,
    /// whose identity hash is [`Ladder::content_hash`](crate::entropy::ladder::Ladder::content_hash).
    pub const LADDER_GRID: u32 = 8;

    /// The id a handshake's model table gives the model with this wire id (PROTOCOL.md §4.4),
    /// `"unimic-entropy/unknown"` for ids not listed above.
    ///
    /// ```
    /// use unimic_codec::part::model_id;
    /// assert_eq!(model_id::wire_name(model_id::GENERIC_GRID), "unimic-entropy/generic");
    /// ```
    pub fn wire_name(id: u32) -> &'static str {
        match id {
            UNIFORM => "unimic-entropy/uniform",
            STATIC_GRID => "unimic-entropy/static-grid",
            ADAPTIVE_GRID => "unimic-entropy/adaptive-grid",
            ADAPTIVE_TEXT => "unimic-entropy/adaptive-text",
            STATIC_TEXT => "unimic-entropy/static-text",
            GENERIC_GRID => "unimic-entropy/generic",
            MASKED_GRID => "unimic-entropy/masked",
            TEXT_COND_GRID => "unimic-entropy/text",
            LADDER_GRID => "unimic-entropy/ladder",
            _ => "unimic-entropy/unknown",
        }
    }
}

/// Names a model exactly: wire id, version, and a SHA-256 content hash (of the model file, or of a
/// canonical description string for algorithmic models, see [`PartCodec::identity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelIdentity {
    /// Wire id (see [`model_id`]).
    pub id: u32,
    /// Version of the algorithm.
    pub version: u32,
    /// Content hash.
    pub hash: [u8; 32],
}

/// The tokens of one part.
#[derive(Debug, Clone, Copy)]
pub enum PartTokens<'a> {
    /// Text token ids.
    Text(&'a [u32]),
    /// An image token grid.
    Grid(&'a TokenGrid),
}

/// The shape of a part, known to the receiver before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartShape {
    /// `count` text ids.
    Text {
        /// Number of ids.
        count: u64,
    },
    /// A grid.
    Grid {
        /// Rows.
        height: u32,
        /// Columns.
        width: u32,
        /// Codebook size.
        codebook_size: u32,
    },
}

impl PartShape {
    /// Number of tokens.
    pub fn tokens(&self) -> u64 {
        match *self {
            PartShape::Text { count } => count,
            PartShape::Grid { height, width, .. } => u64::from(height) * u64::from(width),
        }
    }
    pub(super) fn kind(&self) -> SequenceKind {
        match self {
            PartShape::Text { .. } => SequenceKind::Text,
            PartShape::Grid { .. } => SequenceKind::Grid,
        }
    }
}

/// How a part is coded: model, context references, chunking, and (masked model) region.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartSpec {
    /// The model.
    pub model: ModelChoice,
    /// The context the part conditions on, in order.
    pub refs: Vec<ContextKey>,
    /// Tokens per chunk (independently decodable but for the transformer models, whose chunks
    /// decode in order); `None` for one chunk.
    pub chunk_tokens: Option<u32>,
    /// The cells a [`ModelChoice::Masked`] part codes: one entry per grid cell, row-major, `true`
    /// inside the region. Required by the masked model and refused with any other.
    pub region: Option<Vec<bool>>,
    /// The quality-ladder level a [`ModelChoice::Ladder`] part carries (2 ..= 16). Required by
    /// the ladder model and refused with any other.
    pub level: Option<u32>,
}

impl PartSpec {
    /// One chunk, no references.
    pub fn new(model: ModelChoice) -> Self {
        Self {
            model,
            refs: Vec::new(),
            chunk_tokens: None,
            region: None,
            level: None,
        }
    }
    /// Sets the references.
    pub fn with_refs(mut self, refs: Vec<ContextKey>) -> Self {
        self.refs = refs;
        self
    }
    /// Sets the chunk size in tokens (0 means one chunk).
    pub fn with_chunk_tokens(mut self, chunk_tokens: u32) -> Self {
        self.chunk_tokens = (chunk_tokens > 0).then_some(chunk_tokens);
        self
    }
    /// Sets the region a [`ModelChoice::Masked`] part codes (row-major, `true` = coded).
    pub fn with_region(mut self, region: Vec<bool>) -> Self {
        self.region = Some(region);
        self
    }
    /// Sets the ladder level a [`ModelChoice::Ladder`] part carries (2 ..= 16).
    pub fn with_level(mut self, level: u32) -> Self {
        self.level = Some(level);
        self
    }
}

/// One independently decodable chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Range-coder payload.
    pub payload: Vec<u8>,
    /// Tokens it holds.
    pub tokens: u32,
}

/// An encoded part.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedPart {
    /// The chunks, in order.
    pub chunks: Vec<Chunk>,
    /// Context digest over the spec's references.
    pub digest: [u8; 32],
    /// The model used.
    pub model: ModelIdentity,
    /// Payload bits over all chunks (8 × bytes).
    pub bits: u64,
    /// `Σ -log2 p` of the coded symbols under the quantized model.
    pub cross_entropy_bits: f64,
    /// Tokens coded.
    pub tokens: u64,
}

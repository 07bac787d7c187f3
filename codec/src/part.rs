//! The facade transport calls: code one part (text ids or a token grid) with a chosen entropy
//! model, conditioned on referenced session context, as independently decodable chunks.
//!
//! # Contract (see docs/CODING.md)
//! * **Model state is a function of the references.** For a part with references `refs`, both
//!   ends start from the model's initial state (a fresh [`AdaptiveGrid`], or a fresh
//!   [`AdaptiveText`] seeded by the configured [`TextPrior`] if any), let it learn every
//!   referenced sequence in the order listed (text references teach the text model, grid
//!   references whose ids fit the codebook teach the grid model; others are skipped), and code
//!   the part from that state. Nothing else updates a model, so the order in which the two ends
//!   commit other parts cannot desynchronize them, and the context digest covers everything the
//!   model depends on.
//! * **Chunks are independent.** With `chunk_tokens = c`, chunk `i` holds tokens
//!   `[i*c, min((i+1)*c, n))` (row-major for grids) and is coded by its own range coder from the
//!   state above; within a chunk the model keeps learning, and grid neighbours before the chunk's
//!   first token are absent. A receiver decodes chunk `i` as soon as it arrives, in any order,
//!   and a corrupt chunk loses only itself. Without `chunk_tokens` the part is one chunk.
//! * **Transformer models** (docs/CODING.md §7) code a grid part as exactly one chunk, one
//!   range-coder payload in the model's own order (smaller chunks are refused with
//!   [`PartError::Unchunkable`]); they do not learn from the references:
//!   - [`ModelChoice::Generic`] conditions only on the grid's own earlier tokens (the references
//!     are digest-checked, nothing more).
//!   - [`ModelChoice::Masked`] codes only the cells of the spec's region
//!     ([`PartSpec::with_region`]), in the model's schedule order, given every other cell, which
//!     it takes from the **first image part among the references** (same height and width). The
//!     part's grid must equal that reference outside the region; the decoded part is the full
//!     grid (reference outside the region, decoded cells inside).
//!   - [`ModelChoice::TextCond`] conditions on the **text parts among the references**,
//!     concatenated in the order listed (the model reads the first `max_text` ids); image
//!     references are digest-checked only. At least one text reference is required.
//! * **Commit.** After a part is fully encoded (sender) or decoded (receiver), the caller inserts
//!   it into its [`SessionContext`] under (message id, part index) if later parts may refer to it;
//!   both ends must apply the same inserts and evictions.
//! * **Digest first.** [`PartCodec::decoder`] verifies the sender's context digest and the model
//!   identity before any decoding and refuses with a typed error on mismatch.
//!
//! ```
//! use unimic_codec::context::{ContextKey, Sequence, SessionContext};
//! use unimic_codec::part::{ModelChoice, PartCodec, PartShape, PartSpec, PartTokens};
//!
//! let mut ctx = SessionContext::new(1 << 20);
//! let first = vec![32u32, 5679, 306, 290, 16300, 13];
//! ctx.insert(ContextKey::new(1, 0), Sequence::text(first)).unwrap();
//! let spec = PartSpec::new(ModelChoice::Adaptive).with_refs(vec![ContextKey::new(1, 0)]);
//! let reply = [32u32, 5679, 306, 13];
//!
//! let mut sender = PartCodec::default();
//! let part = sender.encode(&ctx, PartTokens::Text(&reply), &spec).unwrap();
//!
//! let mut receiver = PartCodec::default();
//! let dec = receiver
//!     .decoder(&ctx, PartShape::Text { count: 4 }, &spec, &part.digest, &part.model)
//!     .unwrap();
//! let ids = dec.decode_chunk(0, &part.chunks[0].payload).unwrap();
//! assert_eq!(ids, reply);
//! ```
//!
//! An edit with the masked transformer: only the region's cells are coded, and the decoder
//! rebuilds the whole grid from the reference it holds.
//!
//! ```
//! use std::sync::Arc;
//! use unimic_codec::context::{ContextKey, Sequence, SessionContext};
//! use unimic_codec::entropy::masked::{Masked, MaskedConfig};
//! use unimic_codec::grid::TokenGrid;
//! use unimic_codec::part::{
//!     CodecConfig, DecodedPart, ModelChoice, PartCodec, PartShape, PartSpec, PartTokens,
//! };
//!
//! let model = Arc::new(Masked::synthetic(&MaskedConfig::tiny(16), 3).unwrap());
//! let mut ctx = SessionContext::new(1 << 20);
//! let original = TokenGrid::new(2, 3, 16, vec![1, 2, 3, 4, 5, 6]).unwrap();
//! ctx.insert(ContextKey::new(0, 0), Sequence::grid(&original)).unwrap();
//! let edited = TokenGrid::new(2, 3, 16, vec![1, 9, 3, 4, 5, 6]).unwrap();
//! let spec = PartSpec::new(ModelChoice::Masked)
//!     .with_refs(vec![ContextKey::new(0, 0)])
//!     .with_region(vec![false, true, false, false, false, false]);
//!
//! let mut codec = PartCodec::new(CodecConfig::default().with_masked(model));
//! let part = codec.encode(&ctx, PartTokens::Grid(&edited), &spec).unwrap();
//! assert_eq!((part.chunks.len(), part.tokens), (1, 1));
//! let shape = PartShape::Grid { height: 2, width: 3, codebook_size: 16 };
//! let dec = codec.decoder(&ctx, shape, &spec, &part.digest, &part.model).unwrap();
//! let back = dec.decode_all([part.chunks[0].payload.as_slice()]).unwrap();
//! assert_eq!(back, DecodedPart::Grid(edited));
//! ```

use crate::coder::{CodeError, Decoder, Encoder};
use crate::context::{ContextError, ContextKey, Sequence, SequenceKind, SessionContext};
use crate::entropy::generic::Generic;
use crate::entropy::ladder::Ladder;
use crate::entropy::masked::Masked;
use crate::entropy::text_cond::TextCond;
use crate::entropy::{AdaptiveGrid, AdaptiveText, Dense, Static, TextPrior, Uniform};
use crate::grid::{GridError, TokenGrid};
use crate::text::O200K_VOCAB;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use thiserror::Error;

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
    /// still digest-checked), and codes a part as one chunk: a spec asking for smaller chunks is
    /// refused with [`PartError::Unchunkable`].
    Generic,
    /// The configured masked transformer ([`Masked`], docs/CODING.md §7.7), for grids only: codes
    /// the cells of the spec's region given the other cells, which come from the first image
    /// part among the references. One chunk per part.
    Masked,
    /// The configured text-conditioned transformer ([`TextCond`], docs/CODING.md §7.8), for grids
    /// only: conditions on the text parts among the references, concatenated in order. One chunk
    /// per part.
    TextCond,
    /// The configured quality-ladder models ([`Ladder`], docs/PROTOCOL.md §6.3 mode 5), for grids
    /// only: codes refinement level [`PartSpec::level`] of the first image part among the
    /// references (the level below: same shape, level one less), each token with the order-0
    /// model of that level.
    Ladder,
}

impl ModelChoice {
    /// Whether this is a transformer model (docs/CODING.md §7): it codes a part as exactly one
    /// chunk and does not learn from the references.
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
    fn kind(&self) -> SequenceKind {
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
    /// Tokens per independently decodable chunk; `None` for one chunk.
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

/// Why a part could not be coded.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum PartError {
    /// Context reference missing or digest mismatch (refused before decoding).
    #[error(transparent)]
    Context(#[from] ContextError),
    /// The range coder or model failed (a corrupt payload when decoding).
    #[error(transparent)]
    Code(#[from] CodeError),
    /// This codec has no such model for this kind of part (e.g. no static model configured).
    #[error("model {model:?} is not available for {kind:?} parts")]
    ModelUnavailable {
        /// Requested model.
        model: ModelChoice,
        /// Kind of part.
        kind: SequenceKind,
    },
    /// The sender's model identity differs from ours.
    #[error("model identity mismatch: the part names {theirs:?}, we hold {ours:?}")]
    ModelMismatch {
        /// The identity in the part.
        theirs: ModelIdentity,
        /// Our identity for the same choice.
        ours: ModelIdentity,
    },
    /// The part exceeds this codec's token limit.
    #[error("part of {tokens} tokens exceeds the limit of {limit}")]
    TooLarge {
        /// Tokens in the part.
        tokens: u64,
        /// The limit.
        limit: u64,
    },
    /// A chunk index beyond the part.
    #[error("chunk {index} does not exist (the part has {chunks} chunks)")]
    NoSuchChunk {
        /// The index asked for.
        index: u64,
        /// Number of chunks.
        chunks: u64,
    },
    /// Decoded ids do not form a valid grid.
    #[error(transparent)]
    Grid(#[from] GridError),
    /// The model codes a part as one chunk, and the spec asks for smaller chunks.
    #[error("model {model:?} codes a part of {tokens} tokens as one chunk, not in chunks of {chunk_tokens}")]
    Unchunkable {
        /// The model.
        model: ModelChoice,
        /// Tokens in the part.
        tokens: u64,
        /// The chunk size asked for.
        chunk_tokens: u64,
    },
    /// A transformer model refused the part or the payload (shape beyond its position tables,
    /// codebook mismatch, corrupt payload).
    #[error("transformer model: {0}")]
    Transformer(String),
    /// A text id is not below the id space.
    #[error("text id {id} is not below the id space {space}")]
    TextId {
        /// The id.
        id: u32,
        /// The id space.
        space: u32,
    },
    /// The spec has a region, and the model is not the masked model.
    #[error("model {model:?} codes whole grids, not a region")]
    RegionNotAllowed {
        /// The model.
        model: ModelChoice,
    },
    /// The masked model needs a region, and the spec has none.
    #[error("the masked model needs a region")]
    RegionRequired,
    /// The region does not have one entry per grid cell.
    #[error("region of {cells} cells for a grid of {expected}")]
    RegionSize {
        /// Entries in the region.
        cells: u64,
        /// Cells in the grid.
        expected: u64,
    },
    /// The model conditions on a part of this kind, and the references hold none.
    #[error("model {model:?} needs a {kind:?} part among the references")]
    MissingReference {
        /// The model.
        model: ModelChoice,
        /// The kind of part it needs.
        kind: SequenceKind,
    },
    /// The reference image of a masked part does not fit the part (other shape, ids beyond the
    /// codebook, or a refinement level rather than an image).
    #[error("reference {key:?} ({rows}x{cols}) does not fit a {height}x{width} grid of codebook {codebook_size}")]
    ReferenceShape {
        /// The reference.
        key: ContextKey,
        /// Its rows.
        rows: u32,
        /// Its columns.
        cols: u32,
        /// The part's height.
        height: u32,
        /// The part's width.
        width: u32,
        /// The part's codebook size.
        codebook_size: u32,
    },
    /// A masked part's grid differs from its reference image outside the region (the receiver
    /// would decode another grid).
    #[error("the grid differs from the reference at cell {cell}, outside the region")]
    OutsideRegion {
        /// The first differing cell (row-major).
        cell: u64,
    },
    /// The spec has a ladder level, and the model is not the ladder model.
    #[error("model {model:?} does not code ladder levels")]
    LevelNotAllowed {
        /// The model.
        model: ModelChoice,
    },
    /// A ladder part without a level, or with one the ladder has no model for.
    #[error("ladder level {level:?}: the ladder codes levels 2 ..= {top}")]
    Level {
        /// The level asked for.
        level: Option<u32>,
        /// The highest level the ladder codes.
        top: u32,
    },
    /// The image a ladder part refines is not the level below it: another shape, or another
    /// level than `level - 1`.
    #[error("reference {key:?} (level {base_level}, {rows}x{cols}) is not the level below a level-{level} {height}x{width} refinement")]
    LadderBase {
        /// The reference.
        key: ContextKey,
        /// Its level.
        base_level: u32,
        /// Its rows.
        rows: u32,
        /// Its columns.
        cols: u32,
        /// The part's level.
        level: u32,
        /// The part's height.
        height: u32,
        /// The part's width.
        width: u32,
    },
    /// Decoded tokens handed to [`PartDecoder::assemble`] are not as many as the part codes.
    #[error("{got} decoded tokens for a part that codes {expected}")]
    TokenCount {
        /// Tokens given.
        got: u64,
        /// Tokens the part codes.
        expected: u64,
    },
}

/// Settings of a [`PartCodec`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CodecConfig {
    /// Text id space (the text tokenizer's vocabulary size).
    pub text_space: u32,
    /// Static grid model, if any.
    pub static_grid: Option<Arc<Static>>,
    /// Text prior: the static text model, and the seed of the adaptive text model when
    /// `prime_adaptive_text` is set.
    pub text_prior: Option<Arc<TextPrior>>,
    /// Seed [`AdaptiveText`] with `text_prior` (changes the model identity).
    pub prime_adaptive_text: bool,
    /// Largest part, in tokens, this codec accepts.
    pub max_part_tokens: u64,
    /// The generic transformer model for [`ModelChoice::Generic`], if any.
    pub generic: Option<Arc<Generic>>,
    /// The masked transformer model for [`ModelChoice::Masked`], if any.
    pub masked: Option<Arc<Masked>>,
    /// The text-conditioned transformer model for [`ModelChoice::TextCond`], if any.
    pub text_cond: Option<Arc<TextCond>>,
    /// The quality ladder's models for [`ModelChoice::Ladder`], if any.
    pub ladder: Option<Arc<Ladder>>,
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            text_space: O200K_VOCAB,
            static_grid: None,
            text_prior: None,
            prime_adaptive_text: false,
            max_part_tokens: 1 << 22,
            generic: None,
            masked: None,
            text_cond: None,
            ladder: None,
        }
    }
}

impl CodecConfig {
    /// Sets the generic transformer model ([`ModelChoice::Generic`]).
    pub fn with_generic(mut self, model: Arc<Generic>) -> Self {
        self.generic = Some(model);
        self
    }
    /// Sets the masked transformer model ([`ModelChoice::Masked`]).
    pub fn with_masked(mut self, model: Arc<Masked>) -> Self {
        self.masked = Some(model);
        self
    }
    /// Sets the text-conditioned transformer model ([`ModelChoice::TextCond`]).
    pub fn with_text_cond(mut self, model: Arc<TextCond>) -> Self {
        self.text_cond = Some(model);
        self
    }
    /// Sets the quality ladder's models ([`ModelChoice::Ladder`]).
    pub fn with_ladder(mut self, ladder: Arc<Ladder>) -> Self {
        self.ladder = Some(ladder);
        self
    }
    /// Sets the static grid model.
    pub fn with_static_grid(mut self, model: Arc<Static>) -> Self {
        self.static_grid = Some(model);
        self
    }
    /// Sets the text prior; `prime` also seeds the adaptive text model with it.
    pub fn with_text_prior(mut self, prior: Arc<TextPrior>, prime: bool) -> Self {
        self.text_prior = Some(prior);
        self.prime_adaptive_text = prime;
        self
    }
    /// Sets the text id space.
    pub fn with_text_space(mut self, space: u32) -> Self {
        self.text_space = space;
        self
    }
}

/// A model ready to code one chunk (cloned per chunk).
#[derive(Debug, Clone)]
enum State {
    Uniform,
    Static(Arc<Static>),
    Grid(AdaptiveGrid),
    Text(AdaptiveText),
    Generic(Arc<Generic>),
    /// The masked model with the known ids (from the reference) and the region.
    Masked {
        model: Arc<Masked>,
        known: Vec<u32>,
        unknown: Vec<bool>,
    },
    /// The text-conditioned model with the prompt (the text references, concatenated).
    TextCond {
        model: Arc<TextCond>,
        prompt: Vec<u32>,
    },
}

/// Cached learned state: valid while the references extend `refs` and their digest matches.
#[derive(Debug, Clone)]
struct Cached {
    key: (u32, u32),
    refs: Vec<ContextKey>,
    digest: [u8; 32],
    state: State,
}

/// One end's part coder for a session: configuration plus a cache of learned model states.
/// Results depend only on the configuration, the context and the part; the cache only saves
/// re-learning a growing reference list.
#[derive(Debug, Clone, Default)]
pub struct PartCodec {
    config: CodecConfig,
    cache: Vec<Cached>,
}

fn hash_str(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// 64 hex digits to 32 bytes (`None` if malformed).
fn hex32(hex: &str) -> Option<[u8; 32]> {
    let b = hex.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let s = std::str::from_utf8(pair).ok()?;
        *o = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Codes a grid with a transformer state as one payload: returns the payload, the number of
/// tokens coded and `Σ -log2 p` (the same bytes as the model's own `encode`).
fn encode_transformer(
    state: &State,
    grid: &TokenGrid,
    chunk_tokens: Option<u32>,
    model: ModelChoice,
) -> Result<(Vec<u8>, u64, f64), PartError> {
    let transformer = |e: crate::nn::model::ModelError| PartError::Transformer(e.to_string());
    let mut enc = Encoder::new();
    let ids = grid.ids();
    let tokens = match state {
        State::Generic(m) => {
            one_chunk(model, ids.len() as u64, chunk_tokens)?;
            for (w, &s) in m
                .weights_full(grid)
                .map_err(transformer)?
                .into_iter()
                .zip(ids)
            {
                enc.encode(s, &Dense::from_weights(w))?;
            }
            ids.len() as u64
        }
        State::TextCond { model: m, prompt } => {
            one_chunk(model, ids.len() as u64, chunk_tokens)?;
            let weights = m.weights_full(prompt, grid).map_err(transformer)?;
            for (w, &s) in weights.into_iter().zip(ids) {
                enc.encode(s, &Dense::from_weights(w))?;
            }
            ids.len() as u64
        }
        State::Masked {
            model: m,
            known,
            unknown,
        } => {
            let coded = unknown.iter().filter(|&&u| u).count();
            one_chunk(model, coded as u64, chunk_tokens)?;
            // The receiver takes every cell outside the region from the reference.
            if let Some(cell) = ids
                .iter()
                .zip(known)
                .zip(unknown)
                .position(|((a, b), &u)| !u && a != b)
            {
                return Err(PartError::OutsideRegion { cell: cell as u64 });
            }
            let weights = m.weights_unknown(grid.width() as usize, ids, unknown);
            let region = ids.iter().zip(unknown).filter(|(_, &u)| u);
            for (w, (&s, _)) in weights.into_iter().zip(region) {
                enc.encode(s, &Dense::from_weights(w))?;
            }
            coded as u64
        }
        _ => {
            return Err(PartError::ModelUnavailable {
                model,
                kind: SequenceKind::Grid,
            })
        }
    };
    let cross_entropy_bits = enc.cross_entropy_bits();
    Ok((enc.finish(), tokens, cross_entropy_bits))
}

/// Refuses chunking for models that code a part as one chunk.
/// The first image part among a part's references (with its key): the reference image of a
/// masked part, the level below of a ladder part.
fn first_image<'a>(
    refs: &'a [ContextKey],
    seqs: Vec<&'a Sequence>,
    model: ModelChoice,
) -> Result<(&'a ContextKey, &'a Sequence), PartError> {
    refs.iter()
        .zip(seqs)
        .find(|(_, s)| s.kind() == SequenceKind::Grid)
        .ok_or(PartError::MissingReference {
            model,
            kind: SequenceKind::Grid,
        })
}

fn one_chunk(model: ModelChoice, tokens: u64, chunk_tokens: Option<u32>) -> Result<(), PartError> {
    match chunk_tokens {
        Some(c) if u64::from(c) < tokens => Err(PartError::Unchunkable {
            model,
            tokens,
            chunk_tokens: u64::from(c),
        }),
        _ => Ok(()),
    }
}

impl PartCodec {
    /// A codec with the given configuration.
    pub fn new(config: CodecConfig) -> Self {
        Self {
            config,
            cache: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CodecConfig {
        &self.config
    }

    /// The identity of `model` for parts of `kind`. Algorithmic models hash a canonical
    /// description: `"unimic-entropy/uniform/v1"`, `"unimic-entropy/adaptive-grid/v1"`,
    /// `"unimic-entropy/adaptive-text/v1"` (with `";prior=" + hex(SHA-256(prior file))` appended
    /// when primed); static models hash their file.
    pub fn identity(
        &self,
        model: ModelChoice,
        kind: SequenceKind,
    ) -> Result<ModelIdentity, PartError> {
        let unavailable = PartError::ModelUnavailable { model, kind };
        let (id, hash) = match (model, kind) {
            (ModelChoice::Uniform, _) => (model_id::UNIFORM, hash_str("unimic-entropy/uniform/v1")),
            (ModelChoice::Static, SequenceKind::Grid) => {
                let s = self.config.static_grid.as_ref().ok_or(unavailable)?;
                (model_id::STATIC_GRID, s.content_hash())
            }
            (ModelChoice::Static, _) => {
                let p = self.config.text_prior.as_ref().ok_or(unavailable)?;
                (model_id::STATIC_TEXT, Sha256::digest(p.to_bytes()).into())
            }
            (ModelChoice::Generic, SequenceKind::Grid) => {
                let hash = self
                    .config
                    .generic
                    .as_ref()
                    .and_then(|g| hex32(g.content_hash()));
                (model_id::GENERIC_GRID, hash.ok_or(unavailable)?)
            }
            (ModelChoice::Masked, SequenceKind::Grid) => {
                let hash = self
                    .config
                    .masked
                    .as_ref()
                    .and_then(|m| hex32(m.content_hash()));
                (model_id::MASKED_GRID, hash.ok_or(unavailable)?)
            }
            (ModelChoice::TextCond, SequenceKind::Grid) => {
                let hash = self
                    .config
                    .text_cond
                    .as_ref()
                    .and_then(|m| hex32(m.content_hash()));
                (model_id::TEXT_COND_GRID, hash.ok_or(unavailable)?)
            }
            (ModelChoice::Ladder, SequenceKind::Grid) => {
                let l = self.config.ladder.as_ref().ok_or(unavailable)?;
                (model_id::LADDER_GRID, l.content_hash())
            }
            (
                ModelChoice::Generic
                | ModelChoice::Masked
                | ModelChoice::TextCond
                | ModelChoice::Ladder,
                _,
            ) => return Err(unavailable),
            (ModelChoice::Adaptive, SequenceKind::Grid) => (
                model_id::ADAPTIVE_GRID,
                hash_str("unimic-entropy/adaptive-grid/v1"),
            ),
            (ModelChoice::Adaptive, _) => {
                let mut desc = String::from("unimic-entropy/adaptive-text/v1");
                if let (true, Some(p)) = (self.config.prime_adaptive_text, &self.config.text_prior)
                {
                    let h: [u8; 32] = Sha256::digest(p.to_bytes()).into();
                    desc.push_str(";prior=");
                    for b in h {
                        desc.push_str(&format!("{b:02x}"));
                    }
                }
                (model_id::ADAPTIVE_TEXT, hash_str(&desc))
            }
        };
        Ok(ModelIdentity {
            id,
            version: 1,
            hash,
        })
    }

    fn initial(&self, model: ModelChoice, shape: &PartShape) -> Result<State, PartError> {
        let unavailable = PartError::ModelUnavailable {
            model,
            kind: shape.kind(),
        };
        Ok(match (model, shape) {
            (ModelChoice::Uniform, _) => State::Uniform,
            (ModelChoice::Static, PartShape::Grid { codebook_size, .. }) => {
                let s = self.config.static_grid.clone().ok_or(unavailable)?;
                if s.alphabet_size() != *codebook_size {
                    return Err(PartError::ModelUnavailable {
                        model,
                        kind: SequenceKind::Grid,
                    });
                }
                State::Static(s)
            }
            (ModelChoice::Static, PartShape::Text { .. }) => {
                let p = self.config.text_prior.as_ref().ok_or(unavailable)?;
                State::Text(AdaptiveText::frozen(p))
            }
            (ModelChoice::Adaptive, PartShape::Grid { codebook_size, .. }) => {
                State::Grid(AdaptiveGrid::new(*codebook_size))
            }
            // Built with the references by `transformer_state` / `ladder_state`.
            (
                ModelChoice::Generic
                | ModelChoice::Masked
                | ModelChoice::TextCond
                | ModelChoice::Ladder,
                _,
            ) => return Err(unavailable),
            (ModelChoice::Adaptive, PartShape::Text { .. }) => State::Text(
                match (&self.config.text_prior, self.config.prime_adaptive_text) {
                    (Some(p), true) => AdaptiveText::with_prior(p),
                    _ => AdaptiveText::new(self.config.text_space),
                },
            ),
        })
    }

    /// The state of a transformer model for a part (`None` for the other models): the model
    /// checked against the shape, plus what it conditions on from the references.
    fn transformer_state(
        &self,
        ctx: &SessionContext,
        spec: &PartSpec,
        shape: &PartShape,
    ) -> Result<Option<State>, PartError> {
        let model = spec.model;
        if spec.region.is_some() && model != ModelChoice::Masked {
            return Err(PartError::RegionNotAllowed { model });
        }
        if !model.is_transformer() {
            return Ok(None);
        }
        let unavailable = || PartError::ModelUnavailable {
            model,
            kind: shape.kind(),
        };
        let PartShape::Grid {
            height,
            width,
            codebook_size,
        } = *shape
        else {
            return Err(unavailable());
        };
        let (k, side) = match model {
            ModelChoice::Generic => {
                let g = self.config.generic.as_ref().ok_or_else(unavailable)?;
                (g.config().codebook_size, g.config().max_side)
            }
            ModelChoice::Masked => {
                let m = self.config.masked.as_ref().ok_or_else(unavailable)?;
                (m.config().codebook_size, m.config().max_side)
            }
            _ => {
                let t = self.config.text_cond.as_ref().ok_or_else(unavailable)?;
                (t.config().codebook_size, t.config().max_side)
            }
        };
        if k != codebook_size as usize {
            return Err(unavailable());
        }
        if height as usize > side || width as usize > side {
            return Err(PartError::Transformer(format!(
                "{height}x{width} exceeds the model's largest side {side}"
            )));
        }
        let seqs = ctx.resolve(&spec.refs)?;
        Ok(Some(match model {
            ModelChoice::Generic => {
                State::Generic(self.config.generic.clone().ok_or_else(unavailable)?)
            }
            ModelChoice::Masked => {
                let m = self.config.masked.clone().ok_or_else(unavailable)?;
                let region = spec.region.as_ref().ok_or(PartError::RegionRequired)?;
                let cells = shape.tokens();
                if region.len() as u64 != cells {
                    return Err(PartError::RegionSize {
                        cells: region.len() as u64,
                        expected: cells,
                    });
                }
                let (key, seq) = first_image(&spec.refs, seqs, model)?;
                // The reference is an image: not a refinement level's residual codes.
                if seq.rows() != height
                    || seq.cols() != width
                    || seq.level() != 1
                    || seq.ids().iter().any(|&id| id >= codebook_size)
                {
                    return Err(PartError::ReferenceShape {
                        key: *key,
                        rows: seq.rows(),
                        cols: seq.cols(),
                        height,
                        width,
                        codebook_size,
                    });
                }
                State::Masked {
                    model: m,
                    known: seq.ids().to_vec(),
                    unknown: region.clone(),
                }
            }
            _ => {
                let t = self.config.text_cond.clone().ok_or_else(unavailable)?;
                let max_text = t.config().max_text;
                let texts: Vec<_> = seqs
                    .into_iter()
                    .filter(|s| s.kind() == SequenceKind::Text)
                    .collect();
                if texts.is_empty() {
                    return Err(PartError::MissingReference {
                        model,
                        kind: SequenceKind::Text,
                    });
                }
                // The model reads the first `max_text` ids of the concatenation.
                let mut prompt = Vec::new();
                for s in texts {
                    let room = max_text.saturating_sub(prompt.len());
                    prompt.extend(s.ids().iter().take(room));
                }
                State::TextCond { model: t, prompt }
            }
        }))
    }

    /// The state of the ladder model for a part (`None` for the other models): the model of
    /// the part's level, once the first image reference is checked to be the level below.
    fn ladder_state(
        &self,
        ctx: &SessionContext,
        spec: &PartSpec,
        shape: &PartShape,
    ) -> Result<Option<State>, PartError> {
        let model = spec.model;
        if model != ModelChoice::Ladder {
            return match spec.level {
                Some(_) => Err(PartError::LevelNotAllowed { model }),
                None => Ok(None),
            };
        }
        let unavailable = || PartError::ModelUnavailable {
            model,
            kind: shape.kind(),
        };
        let ladder = self.config.ladder.as_ref().ok_or_else(unavailable)?;
        let PartShape::Grid {
            height,
            width,
            codebook_size,
        } = *shape
        else {
            return Err(unavailable());
        };
        if codebook_size != ladder.alphabet_size() {
            return Err(unavailable());
        }
        let top = ladder.top_level() as u32;
        let level = spec
            .level
            .filter(|l| (2..=top).contains(l))
            .ok_or(PartError::Level {
                level: spec.level,
                top,
            })?;
        let seqs = ctx.resolve(&spec.refs)?;
        let (key, base) = first_image(&spec.refs, seqs, model)?;
        if base.rows() != height || base.cols() != width || base.level() + 1 != level {
            return Err(PartError::LadderBase {
                key: *key,
                base_level: base.level(),
                rows: base.rows(),
                cols: base.cols(),
                level,
                height,
                width,
            });
        }
        let m = ladder.level(level as usize).ok_or(PartError::Level {
            level: Some(level),
            top,
        })?;
        Ok(Some(State::Static(Arc::new(m.model().clone()))))
    }

    /// The model state for a part: initial state, then learn the references (cached).
    fn state(
        &mut self,
        ctx: &SessionContext,
        spec: &PartSpec,
        shape: &PartShape,
    ) -> Result<State, PartError> {
        if let Some(state) = self.ladder_state(ctx, spec, shape)? {
            return Ok(state);
        }
        if let Some(state) = self.transformer_state(ctx, spec, shape)? {
            return Ok(state);
        }
        let (model, refs) = (spec.model, spec.refs.as_slice());
        let mut state = self.initial(model, shape)?;
        if !matches!(state, State::Grid(_))
            && !matches!((&state, model), (State::Text(_), ModelChoice::Adaptive))
        {
            return Ok(state);
        }
        let key = match shape {
            PartShape::Grid { codebook_size, .. } => (0, *codebook_size),
            PartShape::Text { .. } => (1, 0),
        };
        let mut learned = 0;
        if let Some(c) = self.cache.iter().find(|c| c.key == key) {
            if refs.starts_with(&c.refs) && ctx.digest(&c.refs).ok() == Some(c.digest) {
                if c.refs.len() == refs.len() {
                    // Everything is learned already (the next chunk of a streamed part).
                    return Ok(c.state.clone());
                }
                state = c.state.clone();
                learned = c.refs.len();
            }
        }
        for seq in ctx.resolve(&refs[learned..])? {
            match (&mut state, seq.kind()) {
                (State::Grid(g), SequenceKind::Grid) => g.learn(seq.ids(), seq.cols()),
                (State::Text(t), SequenceKind::Text) => t.learn(seq.ids()),
                _ => {}
            }
        }
        let cached = Cached {
            key,
            refs: refs.to_vec(),
            digest: ctx.digest(refs)?,
            state: state.clone(),
        };
        self.cache.retain(|c| c.key != key);
        self.cache.push(cached);
        Ok(state)
    }

    fn check_size(&self, tokens: u64) -> Result<(), PartError> {
        if tokens > self.config.max_part_tokens {
            return Err(PartError::TooLarge {
                tokens,
                limit: self.config.max_part_tokens,
            });
        }
        Ok(())
    }

    /// Encodes a part.
    pub fn encode(
        &mut self,
        ctx: &SessionContext,
        tokens: PartTokens<'_>,
        spec: &PartSpec,
    ) -> Result<EncodedPart, PartError> {
        let grid = match tokens {
            PartTokens::Grid(g) => Some(g),
            PartTokens::Text(_) => None,
        };
        let (shape, ids, width) = match tokens {
            PartTokens::Text(ids) => {
                if let Some(&id) = ids.iter().find(|&&id| id >= self.config.text_space) {
                    return Err(PartError::TextId {
                        id,
                        space: self.config.text_space,
                    });
                }
                (
                    PartShape::Text {
                        count: ids.len() as u64,
                    },
                    ids,
                    0,
                )
            }
            PartTokens::Grid(g) => (
                PartShape::Grid {
                    height: g.height(),
                    width: g.width(),
                    codebook_size: g.codebook_size(),
                },
                g.ids(),
                g.width(),
            ),
        };
        self.check_size(shape.tokens())?;
        let digest = ctx.digest(&spec.refs)?;
        let model = self.identity(spec.model, shape.kind())?;
        let state = self.state(ctx, spec, &shape)?;
        if let (Some(grid), true) = (grid, spec.model.is_transformer()) {
            let (payload, tokens, cross_entropy_bits) =
                encode_transformer(&state, grid, spec.chunk_tokens, spec.model)?;
            return Ok(EncodedPart {
                bits: 8 * payload.len() as u64,
                chunks: vec![Chunk {
                    payload,
                    tokens: u32::try_from(tokens).unwrap_or(u32::MAX),
                }],
                digest,
                model,
                cross_entropy_bits,
                tokens,
            });
        }
        let n = ids.len();
        let c = spec.chunk_tokens.map_or(n.max(1), |c| c as usize);
        let mut chunks = Vec::with_capacity(n.div_ceil(c).max(1));
        let mut cross_entropy_bits = 0.0;
        let mut start = 0;
        // Every chunk starts from the state after the references (chunks are independent); the
        // last one takes it, the others a copy.
        let mut state = Some(state);
        loop {
            let end = (start + c).min(n);
            let mut enc = Encoder::new();
            let this = if end >= n {
                state.take()
            } else {
                state.clone()
            };
            let Some(this) = this else { break };
            match this {
                State::Uniform => match shape {
                    PartShape::Grid { codebook_size, .. } => {
                        let u = Uniform::new(codebook_size);
                        for &s in &ids[start..end] {
                            enc.encode(s, &u)?;
                        }
                    }
                    PartShape::Text { .. } => {
                        for &s in &ids[start..end] {
                            Uniform::encode_wide(&mut enc, s, self.config.text_space)?;
                        }
                    }
                },
                State::Static(m) => {
                    for &s in &ids[start..end] {
                        enc.encode(s, m.distribution())?;
                    }
                }
                State::Grid(mut g) => g.encode(&mut enc, ids, width, start..end)?,
                State::Text(mut t) => t.encode(&mut enc, &ids[start..end])?,
                State::Generic(_) | State::Masked { .. } | State::TextCond { .. } => {
                    // Transformer parts are grids, coded above.
                    return Err(PartError::ModelUnavailable {
                        model: spec.model,
                        kind: SequenceKind::Text,
                    });
                }
            }
            cross_entropy_bits += enc.cross_entropy_bits();
            chunks.push(Chunk {
                payload: enc.finish(),
                tokens: (end - start) as u32,
            });
            start = end;
            if start >= n {
                break;
            }
        }
        let bits = chunks.iter().map(|c| 8 * c.payload.len() as u64).sum();
        Ok(EncodedPart {
            chunks,
            digest,
            model,
            bits,
            cross_entropy_bits,
            tokens: n as u64,
        })
    }

    /// Prepares to decode a part: checks the model identity and the context digest (typed
    /// errors, before any decoding), then learns the references.
    pub fn decoder(
        &mut self,
        ctx: &SessionContext,
        shape: PartShape,
        spec: &PartSpec,
        digest: &[u8; 32],
        model: &ModelIdentity,
    ) -> Result<PartDecoder, PartError> {
        self.check_size(shape.tokens())?;
        let ours = self.identity(spec.model, shape.kind())?;
        if &ours != model {
            return Err(PartError::ModelMismatch {
                theirs: *model,
                ours,
            });
        }
        ctx.verify(&spec.refs, digest)?;
        if let PartShape::Grid {
            height,
            width,
            codebook_size,
        } = shape
        {
            if height == 0 || width == 0 {
                return Err(GridError::Empty { height, width }.into());
            }
            if codebook_size == 0 || codebook_size > crate::grid::MAX_CODEBOOK {
                return Err(GridError::BadCodebook(codebook_size).into());
            }
        }
        let state = self.state(ctx, spec, &shape)?;
        let n = match &state {
            State::Masked { unknown, .. } => unknown.iter().filter(|&&u| u).count() as u64,
            _ => shape.tokens(),
        };
        if spec.model.is_transformer() {
            one_chunk(spec.model, n, spec.chunk_tokens)?;
        }
        let c = match spec.chunk_tokens {
            Some(c) if !spec.model.is_transformer() => u64::from(c),
            _ => n.max(1),
        };
        Ok(PartDecoder {
            shape,
            state,
            tokens: n,
            chunk_tokens: c,
            chunks: n.div_ceil(c).max(1),
            text_space: self.config.text_space,
        })
    }
}

/// Decodes the chunks of one part, each independently and in any order.
#[derive(Debug, Clone)]
pub struct PartDecoder {
    shape: PartShape,
    state: State,
    /// Tokens the part codes (the region's cells for a masked part).
    tokens: u64,
    chunk_tokens: u64,
    chunks: u64,
    text_space: u32,
}

impl PartDecoder {
    /// Number of chunks the part has.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Number of tokens the part codes: every token of the part, except for a masked part,
    /// which codes only the cells of its region.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The token range `[start, end)` chunk `index` covers.
    pub fn chunk_range(&self, index: u64) -> Result<(u64, u64), PartError> {
        if index >= self.chunks {
            return Err(PartError::NoSuchChunk {
                index,
                chunks: self.chunks,
            });
        }
        let start = index * self.chunk_tokens;
        Ok((start, (start + self.chunk_tokens).min(self.tokens)))
    }

    /// Decodes chunk `index` from its payload. A corrupt payload yields an error or wrong
    /// tokens for this chunk only. A masked part's one chunk decodes to the tokens of its
    /// region's cells in row-major order ([`assemble`](Self::assemble) adds the other cells).
    pub fn decode_chunk(&self, index: u64, payload: &[u8]) -> Result<Vec<u32>, PartError> {
        let (start, end) = self.chunk_range(index)?;
        let (start, end) = (start as usize, end as usize);
        let mut dec = Decoder::new(payload);
        let mut out = Vec::with_capacity((end - start).min(1 << 16));
        match (self.state.clone(), self.shape) {
            (State::Uniform, PartShape::Grid { codebook_size, .. }) => {
                let u = Uniform::new(codebook_size);
                for _ in start..end {
                    out.push(dec.decode(&u)?);
                }
            }
            (State::Uniform, PartShape::Text { .. }) => {
                for _ in start..end {
                    out.push(Uniform::decode_wide(&mut dec, self.text_space)?);
                }
            }
            (State::Static(m), _) => {
                for _ in start..end {
                    out.push(dec.decode(m.distribution())?);
                }
            }
            (State::Grid(mut g), PartShape::Grid { width, .. }) => {
                g.decode(&mut dec, &mut out, width, start..end)?
            }
            (State::Text(mut t), _) => out = t.decode(&mut dec, end - start)?,
            (State::Generic(m), PartShape::Grid { height, width, .. }) => {
                out = m
                    .decode(height, width, payload)
                    .map_err(|e| PartError::Transformer(e.to_string()))?
                    .into_ids();
            }
            (
                State::Masked {
                    model: m,
                    known,
                    unknown,
                },
                PartShape::Grid { height, width, .. },
            ) => {
                let grid = m
                    .decode(height, width, &known, &unknown, payload)
                    .map_err(|e| PartError::Transformer(e.to_string()))?;
                out = grid
                    .ids()
                    .iter()
                    .zip(&unknown)
                    .filter(|(_, &u)| u)
                    .map(|(&id, _)| id)
                    .collect();
            }
            (State::TextCond { model: m, prompt }, PartShape::Grid { height, width, .. }) => {
                out = m
                    .decode(&prompt, height, width, payload)
                    .map_err(|e| PartError::Transformer(e.to_string()))?
                    .into_ids();
            }
            (State::Generic(_) | State::Masked { .. } | State::TextCond { .. }, _) => {
                return Err(PartError::ModelUnavailable {
                    model: ModelChoice::Generic,
                    kind: SequenceKind::Text,
                })
            }
            (State::Grid(_), PartShape::Text { .. }) => {
                return Err(PartError::ModelUnavailable {
                    model: ModelChoice::Adaptive,
                    kind: SequenceKind::Text,
                })
            }
        }
        Ok(out)
    }

    /// Decodes every chunk (in order) and assembles the part.
    pub fn decode_all<'a>(
        &self,
        payloads: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<DecodedPart, PartError> {
        let mut ids = Vec::new();
        let mut got = 0;
        for (i, p) in payloads.into_iter().enumerate() {
            ids.extend(self.decode_chunk(i as u64, p)?);
            got += 1;
        }
        if got != self.chunks {
            return Err(PartError::NoSuchChunk {
                index: got,
                chunks: self.chunks,
            });
        }
        self.assemble(ids)
    }

    /// Builds the part from all its decoded tokens in order (the concatenation of its chunks'
    /// tokens). For a masked part, `ids` are the region's cells (row-major) and every other cell
    /// is taken from the reference image: the result is the full grid.
    pub fn assemble(&self, ids: Vec<u32>) -> Result<DecodedPart, PartError> {
        if ids.len() as u64 != self.tokens {
            return Err(PartError::TokenCount {
                got: ids.len() as u64,
                expected: self.tokens,
            });
        }
        let ids = match &self.state {
            State::Masked { known, unknown, .. } => {
                let mut coded = ids.into_iter();
                known
                    .iter()
                    .zip(unknown)
                    .map(|(&k, &u)| if u { coded.next().unwrap_or(k) } else { k })
                    .collect()
            }
            _ => ids,
        };
        Ok(match self.shape {
            PartShape::Text { .. } => DecodedPart::Text(ids),
            PartShape::Grid {
                height,
                width,
                codebook_size,
            } => DecodedPart::Grid(TokenGrid::new(height, width, codebook_size, ids)?),
        })
    }
}

/// A decoded part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodedPart {
    /// Text ids.
    Text(Vec<u32>),
    /// A grid.
    Grid(TokenGrid),
}

#[cfg(test)]
mod tests {
    //! The masked and text-conditioned transformers through the facade, with tiny synthetic
    //! models: round trips, identity by weights hash, and the typed refusals.
    use super::*;
    use crate::context::Sequence;
    use crate::entropy::masked::MaskedConfig;
    use crate::entropy::text_cond::TextCondConfig;
    use crate::nn::weights::splitmix64;

    const K: u32 = 16;

    fn grid(h: u32, w: u32, seed: u64) -> TokenGrid {
        let mut z = seed;
        let ids = (0..h * w)
            .map(|_| {
                z = splitmix64(z);
                (z % u64::from(K)) as u32
            })
            .collect();
        TokenGrid::new(h, w, K, ids).unwrap()
    }

    fn shape(g: &TokenGrid) -> PartShape {
        PartShape::Grid {
            height: g.height(),
            width: g.width(),
            codebook_size: g.codebook_size(),
        }
    }

    fn masked(seed: u64) -> Arc<Masked> {
        Arc::new(Masked::synthetic(&MaskedConfig::tiny(K as usize), seed).unwrap())
    }

    fn text_cond(seed: u64) -> Arc<TextCond> {
        Arc::new(TextCond::synthetic(&TextCondConfig::tiny(K as usize), seed).unwrap())
    }

    fn hex(h: &[u8; 32]) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The reference 6 × 5 image as (0, 0), and an edit of it: the 2 × 3 block at row 2, column
    /// 1 replaced. Returns (context, edited grid, region).
    fn edit_setup() -> (SessionContext, TokenGrid, Vec<bool>) {
        let mut ctx = SessionContext::new(1 << 20);
        let original = grid(6, 5, 7);
        ctx.insert(ContextKey::new(0, 0), Sequence::grid(&original))
            .unwrap();
        let region: Vec<bool> = (0..30)
            .map(|i| (2..4).contains(&(i / 5)) && (1..4).contains(&(i % 5)))
            .collect();
        let fresh = grid(6, 5, 99);
        let ids = original
            .ids()
            .iter()
            .zip(fresh.ids())
            .zip(&region)
            .map(|((&o, &f), &r)| if r { f } else { o })
            .collect();
        (ctx, TokenGrid::new(6, 5, K, ids).unwrap(), region)
    }

    #[test]
    fn masked_part_codes_only_the_region_and_decodes_to_the_full_grid() {
        let m = masked(12);
        let (ctx, edited, region) = edit_setup();
        let spec = PartSpec::new(ModelChoice::Masked)
            .with_refs(vec![ContextKey::new(0, 0)])
            .with_region(region.clone());
        let mut sender = PartCodec::new(CodecConfig::default().with_masked(m.clone()));
        let part = sender
            .encode(&ctx, PartTokens::Grid(&edited), &spec)
            .unwrap();
        assert_eq!(part.chunks.len(), 1);
        assert_eq!(part.tokens, 6);
        assert_eq!(part.chunks[0].tokens, 6);
        assert_eq!(part.model.id, model_id::MASKED_GRID);
        assert_eq!(hex(&part.model.hash), m.content_hash());
        // The facade's payload is the model's own payload for this split.
        assert_eq!(part.chunks[0].payload, m.encode(&edited, &region).unwrap());
        assert!(part.cross_entropy_bits > 0.0);

        let mut receiver = PartCodec::new(CodecConfig::default().with_masked(m));
        let dec = receiver
            .decoder(&ctx, shape(&edited), &spec, &part.digest, &part.model)
            .unwrap();
        assert_eq!((dec.chunks(), dec.tokens()), (1, 6));
        assert_eq!(dec.chunk_range(0).unwrap(), (0, 6));
        let inside: Vec<u32> = edited
            .ids()
            .iter()
            .zip(&region)
            .filter(|(_, &r)| r)
            .map(|(&id, _)| id)
            .collect();
        assert_eq!(
            dec.decode_chunk(0, &part.chunks[0].payload).unwrap(),
            inside
        );
        let back = dec.decode_all([part.chunks[0].payload.as_slice()]).unwrap();
        assert_eq!(back, DecodedPart::Grid(edited));
        assert_eq!(
            dec.assemble(vec![0; 5]),
            Err(PartError::TokenCount {
                got: 5,
                expected: 6
            })
        );
    }

    fn ladder() -> Arc<Ladder> {
        use crate::entropy::ladder::LadderModel;
        let l2 = LadderModel::new(2, 1, Static::from_counts((1..=K).collect()).unwrap());
        let l3 = LadderModel::new(3, 1, Static::from_counts(vec![1; K as usize]).unwrap());
        Arc::new(Ladder::new(vec![l2, l3]).unwrap())
    }

    #[test]
    fn ladder_parts_refine_the_level_below_and_round_trip() {
        let ladder = ladder();
        let mut ctx = SessionContext::new(1 << 20);
        let base = grid(4, 5, 3);
        ctx.insert(ContextKey::new(0, 0), Sequence::grid(&base))
            .unwrap();
        let mut sender = PartCodec::new(CodecConfig::default().with_ladder(ladder.clone()));
        let mut receiver = PartCodec::new(CodecConfig::default().with_ladder(ladder.clone()));
        let mut below = ContextKey::new(0, 0);
        for level in 2..=3u32 {
            let g = grid(4, 5, 10 + u64::from(level));
            let spec = PartSpec::new(ModelChoice::Ladder)
                .with_refs(vec![below])
                .with_level(level)
                .with_chunk_tokens(7);
            let part = sender.encode(&ctx, PartTokens::Grid(&g), &spec).unwrap();
            assert_eq!(part.model.id, model_id::LADDER_GRID);
            assert_eq!(part.model.hash, ladder.content_hash());
            assert_eq!(part.chunks.len(), 3);
            let dec = receiver
                .decoder(&ctx, shape(&g), &spec, &part.digest, &part.model)
                .unwrap();
            let back = dec
                .decode_all(part.chunks.iter().map(|c| c.payload.as_slice()))
                .unwrap();
            assert_eq!(back, DecodedPart::Grid(g.clone()));
            let key = ContextKey::new(1, u64::from(level));
            ctx.insert(key, Sequence::refinement(&g, level)).unwrap();
            below = key;
        }
        // Each level is coded by its own model: level 2's skewed counts make the common ids
        // cheaper than level 3's flat model does.
        let common = TokenGrid::new(4, 5, K, vec![K - 1; 20]).unwrap();
        let cost = |level: u32, base: ContextKey| {
            let spec = PartSpec::new(ModelChoice::Ladder)
                .with_refs(vec![base])
                .with_level(level);
            let mut c = PartCodec::new(CodecConfig::default().with_ladder(ladder.clone()));
            c.encode(&ctx, PartTokens::Grid(&common), &spec)
                .unwrap()
                .cross_entropy_bits
        };
        assert!(cost(2, ContextKey::new(0, 0)) < cost(3, ContextKey::new(1, 2)));
    }

    #[test]
    fn a_masked_edit_of_a_refinement_level_is_refused() {
        let mut ctx = SessionContext::new(1 << 20);
        let level2 = grid(6, 5, 7);
        ctx.insert(ContextKey::new(0, 1), Sequence::refinement(&level2, 2))
            .unwrap();
        let mut codec = PartCodec::new(CodecConfig::default().with_masked(masked(12)));
        let spec = PartSpec::new(ModelChoice::Masked)
            .with_refs(vec![ContextKey::new(0, 1)])
            .with_region(vec![true; 30]);
        assert!(matches!(
            codec.encode(&ctx, PartTokens::Grid(&grid(6, 5, 9)), &spec),
            Err(PartError::ReferenceShape { .. })
        ));
    }

    #[test]
    fn ladder_refusals_are_typed() {
        let mut ctx = SessionContext::new(1 << 20);
        ctx.insert(ContextKey::new(0, 0), Sequence::grid(&grid(4, 5, 3)))
            .unwrap();
        ctx.insert(ContextKey::new(0, 1), Sequence::grid(&grid(5, 4, 3)))
            .unwrap();
        ctx.insert(ContextKey::new(0, 2), Sequence::text(vec![1, 2]))
            .unwrap();
        let g = grid(4, 5, 9);
        let mut codec = PartCodec::new(CodecConfig::default().with_ladder(ladder()));
        let mut enc = |spec: PartSpec| codec.encode(&ctx, PartTokens::Grid(&g), &spec).err();
        let on = |refs: Vec<ContextKey>| PartSpec::new(ModelChoice::Ladder).with_refs(refs);
        let base = vec![ContextKey::new(0, 0)];
        assert!(matches!(
            enc(on(base.clone())),
            Some(PartError::Level {
                level: None,
                top: 3
            })
        ));
        for l in [0, 1, 4] {
            assert!(matches!(
                enc(on(base.clone()).with_level(l)),
                Some(PartError::Level { .. })
            ));
        }
        // The level below must be level 1 for level 2, and of the same shape.
        assert!(matches!(
            enc(on(base.clone()).with_level(3)),
            Some(PartError::LadderBase {
                base_level: 1,
                level: 3,
                ..
            })
        ));
        assert!(matches!(
            enc(on(vec![ContextKey::new(0, 1)]).with_level(2)),
            Some(PartError::LadderBase {
                rows: 5,
                cols: 4,
                ..
            })
        ));
        assert!(matches!(
            enc(on(vec![ContextKey::new(0, 2)]).with_level(2)),
            Some(PartError::MissingReference { .. })
        ));
        // A level on another model; the ladder on text; no ladder configured.
        assert!(matches!(
            enc(PartSpec::new(ModelChoice::Adaptive).with_level(2)),
            Some(PartError::LevelNotAllowed { .. })
        ));
        assert!(matches!(
            codec.encode(
                &ctx,
                PartTokens::Text(&[1]),
                &on(base.clone()).with_level(2)
            ),
            Err(PartError::ModelUnavailable { .. })
        ));
        let mut none = PartCodec::new(CodecConfig::default());
        assert!(matches!(
            none.encode(&ctx, PartTokens::Grid(&g), &on(base).with_level(2)),
            Err(PartError::ModelUnavailable { .. })
        ));
    }

    #[test]
    fn masked_part_refusals_are_typed() {
        let (mut ctx, edited, region) = edit_setup();
        ctx.insert(ContextKey::new(0, 1), Sequence::text(vec![1, 2, 3]))
            .unwrap();
        ctx.insert(ContextKey::new(0, 2), Sequence::grid(&grid(5, 6, 1)))
            .unwrap();
        let mut codec = PartCodec::new(
            CodecConfig::default()
                .with_masked(masked(12))
                .with_generic(Arc::new(
                    Generic::synthetic(
                        &crate::entropy::generic::GenericConfig::tiny(K as usize),
                        1,
                    )
                    .unwrap(),
                )),
        );
        let refs = vec![ContextKey::new(0, 0)];
        let base = PartSpec::new(ModelChoice::Masked).with_refs(refs.clone());
        let mut enc = |spec: &PartSpec, g: &TokenGrid| {
            codec
                .encode(&ctx, PartTokens::Grid(g), spec)
                .map(|p| p.tokens)
        };
        assert_eq!(enc(&base, &edited), Err(PartError::RegionRequired));
        assert_eq!(
            enc(&base.clone().with_region(vec![true; 29]), &edited),
            Err(PartError::RegionSize {
                cells: 29,
                expected: 30
            })
        );
        for model in [ModelChoice::Adaptive, ModelChoice::Generic] {
            let spec = PartSpec::new(model)
                .with_refs(refs.clone())
                .with_region(region.clone());
            assert_eq!(
                enc(&spec, &edited),
                Err(PartError::RegionNotAllowed { model })
            );
        }
        // Only a text reference: no image to take the known cells from.
        let text_only = PartSpec::new(ModelChoice::Masked)
            .with_refs(vec![ContextKey::new(0, 1)])
            .with_region(region.clone());
        assert_eq!(
            enc(&text_only, &edited),
            Err(PartError::MissingReference {
                model: ModelChoice::Masked,
                kind: SequenceKind::Grid
            })
        );
        // The first image reference is 5 × 6, the part 6 × 5.
        let other_shape = PartSpec::new(ModelChoice::Masked)
            .with_refs(vec![ContextKey::new(0, 1), ContextKey::new(0, 2)])
            .with_region(region.clone());
        assert!(matches!(
            enc(&other_shape, &edited),
            Err(PartError::ReferenceShape { key, rows: 5, cols: 6, .. }) if key == ContextKey::new(0, 2)
        ));
        // A grid that differs from the reference outside the region.
        let mut ids = edited.ids().to_vec();
        ids[29] = (ids[29] + 1) % K;
        let off = TokenGrid::new(6, 5, K, ids).unwrap();
        let spec = base.clone().with_region(region.clone());
        assert_eq!(enc(&spec, &off), Err(PartError::OutsideRegion { cell: 29 }));
        assert!(matches!(
            enc(&spec.clone().with_chunk_tokens(3), &edited),
            Err(PartError::Unchunkable { tokens: 6, .. })
        ));
        // A reference the context does not hold.
        let unknown_ref = PartSpec::new(ModelChoice::Masked)
            .with_refs(vec![ContextKey::new(8, 0)])
            .with_region(region.clone());
        assert!(matches!(
            enc(&unknown_ref, &edited),
            Err(PartError::Context(ContextError::Missing(_)))
        ));
        // A codec without the masked model, and one with other weights.
        let part = codec
            .encode(&ctx, PartTokens::Grid(&edited), &spec)
            .unwrap();
        assert_eq!(
            PartCodec::default()
                .encode(&ctx, PartTokens::Grid(&edited), &spec)
                .map(|p| p.tokens),
            Err(PartError::ModelUnavailable {
                model: ModelChoice::Masked,
                kind: SequenceKind::Grid
            })
        );
        let mut other = PartCodec::new(CodecConfig::default().with_masked(masked(13)));
        assert!(matches!(
            other.decoder(&ctx, shape(&edited), &spec, &part.digest, &part.model),
            Err(PartError::ModelMismatch { .. })
        ));
    }

    #[test]
    fn text_conditioned_part_reads_the_text_references_in_order() {
        let t = text_cond(13);
        let mut ctx = SessionContext::new(1 << 20);
        let (a, b) = (vec![3923u32, 41, 200_000], vec![7u32, 12_345]);
        ctx.insert(ContextKey::new(0, 0), Sequence::text(a.clone()))
            .unwrap();
        ctx.insert(ContextKey::new(0, 1), Sequence::grid(&grid(3, 3, 4)))
            .unwrap();
        ctx.insert(ContextKey::new(2, 0), Sequence::text(b.clone()))
            .unwrap();
        let g = grid(5, 4, 21);
        let refs = vec![
            ContextKey::new(0, 0),
            ContextKey::new(0, 1),
            ContextKey::new(2, 0),
        ];
        let spec = PartSpec::new(ModelChoice::TextCond).with_refs(refs);
        let mut sender = PartCodec::new(CodecConfig::default().with_text_cond(t.clone()));
        let part = sender.encode(&ctx, PartTokens::Grid(&g), &spec).unwrap();
        assert_eq!(part.model.id, model_id::TEXT_COND_GRID);
        assert_eq!(hex(&part.model.hash), t.content_hash());
        assert_eq!((part.chunks.len(), part.tokens), (1, 20));
        // The prompt is the text references concatenated in the order listed.
        let prompt: Vec<u32> = a.iter().chain(&b).copied().collect();
        assert_eq!(part.chunks[0].payload, t.encode(&prompt, &g).unwrap());
        let swapped = PartSpec::new(ModelChoice::TextCond)
            .with_refs(vec![ContextKey::new(2, 0), ContextKey::new(0, 0)]);
        let prompt2: Vec<u32> = b.iter().chain(&a).copied().collect();
        let part2 = sender.encode(&ctx, PartTokens::Grid(&g), &swapped).unwrap();
        assert_eq!(part2.chunks[0].payload, t.encode(&prompt2, &g).unwrap());

        let mut receiver = PartCodec::new(CodecConfig::default().with_text_cond(t));
        let dec = receiver
            .decoder(&ctx, shape(&g), &spec, &part.digest, &part.model)
            .unwrap();
        let back = dec.decode_all([part.chunks[0].payload.as_slice()]).unwrap();
        assert_eq!(back, DecodedPart::Grid(g));
    }

    #[test]
    fn text_conditioned_prompt_beyond_max_text_matches_the_model() {
        let t = text_cond(13);
        let mut ctx = SessionContext::new(1 << 20);
        let long: Vec<u32> = (0..6).map(|i| 1000 + i).collect();
        ctx.insert(ContextKey::new(0, 0), Sequence::text(long.clone()))
            .unwrap();
        ctx.insert(ContextKey::new(0, 1), Sequence::text(long.clone()))
            .unwrap();
        let g = grid(4, 4, 5);
        let spec = PartSpec::new(ModelChoice::TextCond)
            .with_refs(vec![ContextKey::new(0, 0), ContextKey::new(0, 1)]);
        let mut codec = PartCodec::new(CodecConfig::default().with_text_cond(t.clone()));
        let part = codec.encode(&ctx, PartTokens::Grid(&g), &spec).unwrap();
        let all: Vec<u32> = long.iter().chain(&long).copied().collect();
        assert_eq!(part.chunks[0].payload, t.encode(&all, &g).unwrap());
    }

    #[test]
    fn text_conditioned_refusals_are_typed() {
        let mut ctx = SessionContext::new(1 << 20);
        ctx.insert(ContextKey::new(0, 0), Sequence::grid(&grid(3, 3, 4)))
            .unwrap();
        let mut codec = PartCodec::new(CodecConfig::default().with_text_cond(text_cond(13)));
        let g = grid(4, 4, 5);
        let no_text = PartSpec::new(ModelChoice::TextCond).with_refs(vec![ContextKey::new(0, 0)]);
        assert_eq!(
            codec
                .encode(&ctx, PartTokens::Grid(&g), &no_text)
                .map(|p| p.tokens),
            Err(PartError::MissingReference {
                model: ModelChoice::TextCond,
                kind: SequenceKind::Text
            })
        );
        assert_eq!(
            codec
                .encode(
                    &ctx,
                    PartTokens::Text(&[1, 2]),
                    &PartSpec::new(ModelChoice::TextCond)
                )
                .map(|p| p.tokens),
            Err(PartError::ModelUnavailable {
                model: ModelChoice::TextCond,
                kind: SequenceKind::Text
            })
        );
        // Larger than the model's position tables (tiny: 16).
        let big = grid(17, 2, 1);
        ctx.insert(ContextKey::new(0, 1), Sequence::text(vec![5]))
            .unwrap();
        let spec = PartSpec::new(ModelChoice::TextCond).with_refs(vec![ContextKey::new(0, 1)]);
        assert!(matches!(
            codec.encode(&ctx, PartTokens::Grid(&big), &spec),
            Err(PartError::Transformer(_))
        ));
        assert!(ModelChoice::TextCond.is_transformer() && !ModelChoice::Adaptive.is_transformer());
    }
}

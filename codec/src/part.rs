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
//! * **Transformer models.** [`ModelChoice::Generic`] (the configured generic transformer,
//!   docs/CODING.md §7) conditions only on the grid's own earlier tokens, so its state does not
//!   depend on the references (they are still digest-checked), and it codes a part as exactly one
//!   chunk (smaller chunks are refused with [`PartError::Unchunkable`]).
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

use crate::coder::{CodeError, Decoder, Encoder};
use crate::context::{ContextError, ContextKey, SequenceKind, SessionContext};
use crate::entropy::generic::Generic;
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

/// How a part is coded: model, context references, chunking.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartSpec {
    /// The model.
    pub model: ModelChoice,
    /// The context the part conditions on, in order.
    pub refs: Vec<ContextKey>,
    /// Tokens per independently decodable chunk; `None` for one chunk.
    pub chunk_tokens: Option<u32>,
}

impl PartSpec {
    /// One chunk, no references.
    pub fn new(model: ModelChoice) -> Self {
        Self {
            model,
            refs: Vec::new(),
            chunk_tokens: None,
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
        }
    }
}

impl CodecConfig {
    /// Sets the generic transformer model ([`ModelChoice::Generic`]).
    pub fn with_generic(mut self, model: Arc<Generic>) -> Self {
        self.generic = Some(model);
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

/// Refuses chunking for models that code a part as one chunk.
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
            (ModelChoice::Generic, _) => return Err(unavailable),
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
            (ModelChoice::Generic, PartShape::Grid { codebook_size, .. }) => {
                let g = self.config.generic.clone().ok_or(unavailable)?;
                if g.config().codebook_size != *codebook_size as usize {
                    return Err(PartError::ModelUnavailable {
                        model,
                        kind: SequenceKind::Grid,
                    });
                }
                State::Generic(g)
            }
            (ModelChoice::Generic, PartShape::Text { .. }) => return Err(unavailable),
            (ModelChoice::Adaptive, PartShape::Text { .. }) => State::Text(
                match (&self.config.text_prior, self.config.prime_adaptive_text) {
                    (Some(p), true) => AdaptiveText::with_prior(p),
                    _ => AdaptiveText::new(self.config.text_space),
                },
            ),
        })
    }

    /// The model state for a part: initial state, then learn the references (cached).
    fn state(
        &mut self,
        ctx: &SessionContext,
        model: ModelChoice,
        shape: &PartShape,
        refs: &[ContextKey],
    ) -> Result<State, PartError> {
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
        let state = self.state(ctx, spec.model, &shape, &spec.refs)?;
        let n = ids.len();
        if matches!(state, State::Generic(_)) {
            one_chunk(spec.model, n as u64, spec.chunk_tokens)?;
        }
        let c = spec.chunk_tokens.map_or(n.max(1), |c| c as usize);
        let mut chunks = Vec::with_capacity(n.div_ceil(c).max(1));
        let mut cross_entropy_bits = 0.0;
        let mut start = 0;
        loop {
            let end = (start + c).min(n);
            let mut enc = Encoder::new();
            match state.clone() {
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
                State::Generic(m) => {
                    let grid = grid.ok_or(PartError::ModelUnavailable {
                        model: spec.model,
                        kind: SequenceKind::Text,
                    })?;
                    let weights = m
                        .weights_full(grid)
                        .map_err(|e| PartError::Transformer(e.to_string()))?;
                    for (w, &s) in weights.into_iter().zip(ids) {
                        enc.encode(s, &Dense::from_weights(w))?;
                    }
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
        let state = self.state(ctx, spec.model, &shape, &spec.refs)?;
        let n = shape.tokens();
        if let State::Generic(g) = &state {
            one_chunk(spec.model, n, spec.chunk_tokens)?;
            if let PartShape::Grid { height, width, .. } = shape {
                let side = g.config().max_side as u32;
                if height > side || width > side {
                    return Err(PartError::Transformer(format!(
                        "{height}x{width} exceeds the model's largest side {side}"
                    )));
                }
            }
        }
        let c = spec.chunk_tokens.map_or(n.max(1), u64::from);
        Ok(PartDecoder {
            shape,
            state,
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
    chunk_tokens: u64,
    chunks: u64,
    text_space: u32,
}

impl PartDecoder {
    /// Number of chunks the part has.
    pub fn chunks(&self) -> u64 {
        self.chunks
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
        Ok((start, (start + self.chunk_tokens).min(self.shape.tokens())))
    }

    /// Decodes chunk `index` from its payload. A corrupt payload yields an error or wrong
    /// tokens for this chunk only.
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
            (State::Generic(_), PartShape::Text { .. }) => {
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

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
//! * **Transformer models** (docs/CODING.md §7) do not learn from the references, and their
//!   chunks are not independent: the model runs over the whole part in its own order, each
//!   chunk's tokens coded by a separately terminated range coder with the probabilities of that
//!   one run, so chunk `i` decodes once chunks `0..i` have (in order, else
//!   [`PartError::ChunkOrder`]); one chunk is the model's one-shot payload:
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
//! * **Quality ladder** ([`ModelChoice::Ladder`], docs/CODING.md §3.5): a refinement part of
//!   level `l` ([`PartSpec::with_level`]) codes its residual codes with the order-0 model of that
//!   level, chunked like the built-in models; its first image reference must be the level below
//!   (the same shape, level `l - 1`, as [`Sequence::level`](crate::context::Sequence::level)
//!   says), or it is refused with [`PartError::LadderBase`].
//!
//! The module's files: `spec.rs` (what a part is and how to code it), `config.rs` (the models a
//! codec holds), `error.rs`, `decoder.rs` (decoding chunks and assembling a part), `stream.rs`
//! (a grid part coded as its tokens arrive), and this file (the codec: model identities, the
//! model state a part starts from, encoding).
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

mod config;
mod decoder;
mod error;
mod spec;
mod stream;
#[cfg(test)]
mod tests;

pub use config::CodecConfig;
use decoder::Run;
pub use decoder::{DecodedPart, PartDecoder};
pub use error::PartError;
pub use spec::{
    model_id, Chunk, EncodedPart, ModelChoice, ModelIdentity, PartShape, PartSpec, PartTokens,
};
pub use stream::GridStream;

use crate::coder::{CodeError, Decoder, Encoder};
use crate::context::{ContextError, ContextKey, Sequence, SequenceKind, SessionContext};
use crate::entropy::cursor::{code_chunk, Cursor};
use crate::entropy::generic::Generic;
use crate::entropy::ladder::Ladder;
use crate::entropy::masked::Masked;
use crate::entropy::text_cond::TextCond;
use crate::entropy::{AdaptiveGrid, AdaptiveText, Dense, Static, TextPrior, Uniform};
use crate::grid::{GridError, TokenGrid};
use crate::text::O200K_VOCAB;
use sha2::{Digest, Sha256};
use std::sync::{Arc, LazyLock, OnceLock};
use thiserror::Error;

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
    /// The adaptive text model's identity hash, made at first use (the configuration does not
    /// change; a streamed part asks for it at every chunk).
    adaptive_text_hash: OnceLock<[u8; 32]>,
}

fn hash_str(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// 64 hex digits to 32 bytes (`None` if malformed).
/// The raw SHA-256 of a configured transformer's weights from its hex form (`None` when the
/// model is not configured or the hex is not 32 bytes).
fn weights_hash(hex: Option<&str>) -> Option<[u8; 32]> {
    hex.and_then(hex32)
}

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

/// Codes a grid with a transformer state: one batched pass for the weights of every coded
/// token, then chunks of `chunk_tokens` tokens (all of them in one chunk if `None`), each its own
/// range-coder message. Returns the chunks, the number of tokens coded and `Σ -log2 p` (one
/// chunk: the same bytes as the model's own `encode`).
fn encode_transformer(
    state: &State,
    grid: &TokenGrid,
    chunk_tokens: Option<u32>,
    model: ModelChoice,
) -> Result<(Vec<Chunk>, u64, f64), PartError> {
    let transformer = |e: crate::nn::model::ModelError| PartError::Transformer(e.to_string());
    let ids = grid.ids();
    let (weights, coded): (Vec<Vec<u64>>, Vec<u32>) = match state {
        State::Generic(m) => (m.weights_full(grid).map_err(transformer)?, ids.to_vec()),
        State::TextCond { model: m, prompt } => (
            m.weights_full(prompt, grid).map_err(transformer)?,
            ids.to_vec(),
        ),
        State::Masked {
            model: m,
            known,
            unknown,
        } => {
            // The receiver takes every cell outside the region from the reference.
            if let Some(cell) = ids
                .iter()
                .zip(known)
                .zip(unknown)
                .position(|((a, b), &u)| !u && a != b)
            {
                return Err(PartError::OutsideRegion { cell: cell as u64 });
            }
            let coded = ids
                .iter()
                .zip(unknown)
                .filter(|(_, &u)| u)
                .map(|(&id, _)| id)
                .collect();
            (
                m.weights_unknown(grid.width() as usize, ids, unknown),
                coded,
            )
        }
        _ => {
            return Err(PartError::ModelUnavailable {
                model,
                kind: SequenceKind::Grid,
            })
        }
    };
    let c = chunk_tokens.map_or(coded.len(), |c| c as usize).max(1);
    let mut chunks = Vec::with_capacity(coded.len().div_ceil(c).max(1));
    let mut bits = 0.0;
    let mut weights = weights.into_iter();
    // A part without coded tokens (an empty region) still has its one, empty, chunk.
    for tokens in coded.chunks(c).chain(coded.is_empty().then_some(&[][..])) {
        let (payload, b) = code_chunk(weights.by_ref().take(tokens.len()).collect(), tokens)?;
        bits += b;
        chunks.push(Chunk {
            payload,
            tokens: tokens.len() as u32,
        });
    }
    Ok((chunks, coded.len() as u64, bits))
}

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

impl PartCodec {
    /// A codec with the given configuration.
    pub fn new(config: CodecConfig) -> Self {
        Self {
            config,
            cache: Vec::new(),
            adaptive_text_hash: OnceLock::new(),
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
            (ModelChoice::Uniform, _) => {
                static UNIFORM: LazyLock<[u8; 32]> =
                    LazyLock::new(|| hash_str("unimic-entropy/uniform/v1"));
                (model_id::UNIFORM, *UNIFORM)
            }
            (ModelChoice::Static, SequenceKind::Grid) => {
                let s = self.config.static_grid.as_ref().ok_or(unavailable)?;
                (model_id::STATIC_GRID, s.content_hash())
            }
            (ModelChoice::Static, _) => {
                let p = self.config.text_prior.as_ref().ok_or(unavailable)?;
                (model_id::STATIC_TEXT, p.content_hash())
            }
            // The transformers are named by the SHA-256 of their weights (hex in the model).
            (ModelChoice::Generic, SequenceKind::Grid) => (
                model_id::GENERIC_GRID,
                weights_hash(self.config.generic.as_ref().map(|g| g.content_hash()))
                    .ok_or(unavailable)?,
            ),
            (ModelChoice::Masked, SequenceKind::Grid) => (
                model_id::MASKED_GRID,
                weights_hash(self.config.masked.as_ref().map(|m| m.content_hash()))
                    .ok_or(unavailable)?,
            ),
            (ModelChoice::TextCond, SequenceKind::Grid) => (
                model_id::TEXT_COND_GRID,
                weights_hash(self.config.text_cond.as_ref().map(|m| m.content_hash()))
                    .ok_or(unavailable)?,
            ),
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
            (ModelChoice::Adaptive, SequenceKind::Grid) => {
                static ADAPTIVE_GRID: LazyLock<[u8; 32]> =
                    LazyLock::new(|| hash_str("unimic-entropy/adaptive-grid/v1"));
                (model_id::ADAPTIVE_GRID, *ADAPTIVE_GRID)
            }
            (ModelChoice::Adaptive, _) => {
                let hash = self.adaptive_text_hash.get_or_init(|| {
                    let mut desc = String::from("unimic-entropy/adaptive-text/v1");
                    if let (true, Some(p)) =
                        (self.config.prime_adaptive_text, &self.config.text_prior)
                    {
                        desc.push_str(";prior=");
                        for b in p.content_hash() {
                            desc.push_str(&format!("{b:02x}"));
                        }
                    }
                    hash_str(&desc)
                });
                (model_id::ADAPTIVE_TEXT, *hash)
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
        Ok(Some(State::Static(m.model().clone())))
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

    /// The cached state of an adaptive text part's references, learned first if the cache does
    /// not hold them (see [`state`](Self::state)), for coding in place. `digest`: the context
    /// digest of `spec.refs` in `ctx`, which the caller has already computed or verified.
    fn cached_state_mut(
        &mut self,
        ctx: &SessionContext,
        spec: &PartSpec,
        shape: &PartShape,
        digest: &[u8; 32],
    ) -> Result<&mut State, PartError> {
        const TEXT: (u32, u32) = (1, 0);
        let fresh = self
            .cache
            .iter()
            .any(|c| c.key == TEXT && c.refs == spec.refs && &c.digest == digest);
        if !fresh {
            // Learns the references and caches the state.
            self.state(ctx, spec, shape)?;
        }
        self.cache
            .iter_mut()
            .find(|c| c.key == TEXT && c.refs == spec.refs)
            .map(|c| &mut c.state)
            .ok_or(PartError::ModelUnavailable {
                model: ModelChoice::Adaptive,
                kind: SequenceKind::Text,
            })
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
        let text_space = self.config.text_space;
        // Adaptive text codes from the cached state in place (each chunk a trial that is undone),
        // so the next chunk of a streamed part costs its own tokens, not the context's size.
        let mut owned;
        let state: &mut State = if matches!(
            (spec.model, &shape),
            (ModelChoice::Adaptive, PartShape::Text { .. })
        ) {
            self.cached_state_mut(ctx, spec, &shape, &digest)?
        } else {
            owned = self.state(ctx, spec, &shape)?;
            &mut owned
        };
        if let (Some(grid), true) = (grid, spec.model.is_transformer()) {
            let (chunks, tokens, cross_entropy_bits) =
                encode_transformer(state, grid, spec.chunk_tokens, spec.model)?;
            return Ok(EncodedPart {
                bits: chunks.iter().map(|c| 8 * c.payload.len() as u64).sum(),
                chunks,
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
        // Every chunk starts from the state after the references (chunks are independent): an
        // adaptive grid codes on a copy but for the last chunk, text as a trial that leaves the
        // (cached) state as it was.
        loop {
            let end = (start + c).min(n);
            let mut enc = Encoder::new();
            match &mut *state {
                State::Uniform => match shape {
                    PartShape::Grid { codebook_size, .. } => {
                        let u = Uniform::new(codebook_size);
                        for &s in &ids[start..end] {
                            enc.encode(s, &u)?;
                        }
                    }
                    PartShape::Text { .. } => {
                        for &s in &ids[start..end] {
                            Uniform::encode_wide(&mut enc, s, text_space)?;
                        }
                    }
                },
                State::Static(m) => {
                    for &s in &ids[start..end] {
                        enc.encode(s, m.distribution())?;
                    }
                }
                // The last chunk codes on the state itself (it is this call's own copy).
                State::Grid(g) if end >= n => g.encode(&mut enc, ids, width, start..end)?,
                State::Grid(g) => g.clone().encode(&mut enc, ids, width, start..end)?,
                State::Text(t) => t.encode_trial(&mut enc, &ids[start..end])?,
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

    /// Decodes one chunk of a text part (`count` tokens from `payload`), checked as
    /// [`decoder`](Self::decoder) checks a part. Text chunks are independent (each codes from the
    /// state after the references), and the adaptive model decodes from its cached state in
    /// place, so the next chunk of a streamed reply costs its own tokens, not a copy of all the
    /// session has learned: what a receiver calls per chunk.
    ///
    /// ```
    /// use unimic_codec::context::SessionContext;
    /// use unimic_codec::part::{ModelChoice, PartCodec, PartSpec, PartTokens};
    ///
    /// let ctx = SessionContext::default();
    /// let spec = PartSpec::new(ModelChoice::Adaptive).with_chunk_tokens(2);
    /// let mut sender = PartCodec::default();
    /// let part = sender.encode(&ctx, PartTokens::Text(&[17, 17, 4, 9]), &spec).unwrap();
    /// let mut receiver = PartCodec::default();
    /// let second = receiver
    ///     .decode_text_chunk(&ctx, &spec, &part.digest, &part.model, 2, &part.chunks[1].payload)
    ///     .unwrap();
    /// assert_eq!(second, [4, 9]);
    /// ```
    pub fn decode_text_chunk(
        &mut self,
        ctx: &SessionContext,
        spec: &PartSpec,
        digest: &[u8; 32],
        model: &ModelIdentity,
        count: u64,
        payload: &[u8],
    ) -> Result<Vec<u32>, PartError> {
        let shape = PartShape::Text { count };
        if spec.model != ModelChoice::Adaptive {
            return self
                .decoder(ctx, shape, spec, digest, model)?
                .decode_chunk(0, payload);
        }
        self.check_size(count)?;
        let ours = self.identity(spec.model, SequenceKind::Text)?;
        if &ours != model {
            return Err(PartError::ModelMismatch {
                theirs: *model,
                ours,
            });
        }
        ctx.verify(&spec.refs, digest)?;
        let State::Text(t) = self.cached_state_mut(ctx, spec, &shape, digest)? else {
            return Err(PartError::ModelUnavailable {
                model: spec.model,
                kind: SequenceKind::Text,
            });
        };
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        Ok(t.decode_trial(&mut Decoder::new(payload), count)?)
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
        let c = spec.chunk_tokens.map_or(n.max(1), u64::from);
        // A transformer part's chunks continue one run of the model. It starts with the first
        // chunk's decoding, not here: a receiver may call this under a lock, and the masked
        // model's known cells or the text model's prompt take a model pass.
        let transformer = matches!(
            (&state, &shape),
            (
                State::Generic(_) | State::Masked { .. } | State::TextCond { .. },
                PartShape::Grid { .. }
            )
        );
        let run = transformer.then(|| {
            Arc::new(std::sync::Mutex::new(Run {
                cursor: None,
                at: 0,
                done: Vec::new(),
            }))
        });
        let (state, text) = match state {
            State::Text(t) => (State::Uniform, Some(Arc::new(std::sync::Mutex::new(t)))),
            other => (other, None),
        };
        Ok(PartDecoder {
            shape,
            state,
            text,
            run,
            tokens: n,
            chunk_tokens: c,
            chunks: n.div_ceil(c).max(1),
            text_space: self.config.text_space,
        })
    }
}

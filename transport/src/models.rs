//! The tokenizers and entropy models a session offers in its handshake, named by id, version and
//! content hash, and the mapping from the negotiated tables back to the codec.
//!
//! # Names on the wire
//! Entropy models are the codec's built-in [`ModelChoice`]s, named
//! `unimic-entropy/uniform`, `unimic-entropy/static-grid`, `unimic-entropy/adaptive-grid`,
//! `unimic-entropy/adaptive-text` and `unimic-entropy/static-text`, each with the version and
//! content hash the codec reports ([`PartCodec::identity`]). Static models appear only when the
//! codec configuration holds one; so do the transformers, `unimic-entropy/generic`,
//! `unimic-entropy/masked` and `unimic-entropy/text` (text-conditioned), whose hash is the SHA-256
//! of their weights file (docs/CODING.md §7), so the handshake proves both ends hold the same
//! weights, and the quality ladder's models, `unimic-entropy/ladder` (refinement levels, hashed
//! over the per-level model files). Tokenizers are whatever the caller registers
//! ([`TokenizerInfo`]); the default is OpenAI's `o200k_base`.

use sha2::{Digest, Sha256};
use unimic_codec::context::SequenceKind;
use unimic_codec::part::{model_id, ModelChoice, ModelIdentity, PartCodec};
use unimic_codec::text::O200K_VOCAB;
use unimic_protocol::{ModelInfo, VarInt};

/// What a tokenizer produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenizerKind {
    /// Text token ids below `vocab_size`.
    Text {
        /// Number of ids.
        vocab_size: u32,
    },
    /// Image token grids with ids below `codebook_size`; one token covers `patch × patch`
    /// pixels (used for bits-per-pixel statistics).
    Image {
        /// Codebook size.
        codebook_size: u32,
        /// Pixels per token side (16 for a VQ-16 tokenizer).
        patch: u32,
    },
}

/// A tokenizer a session holds: its handshake name and what it produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerInfo {
    /// Handshake identity (id, version, content hash).
    pub info: ModelInfo,
    /// What it produces.
    pub kind: TokenizerKind,
}

impl TokenizerInfo {
    /// OpenAI's o200k_base, hashed as the string `"tiktoken/o200k_base"` (its tables are compiled
    /// into tiktoken-rs, so the name fixes the content).
    pub fn o200k() -> Self {
        Self {
            info: ModelInfo {
                id: "o200k_base".into(),
                version: VarInt::from_u32(1),
                hash: Sha256::digest(b"tiktoken/o200k_base").into(),
            },
            kind: TokenizerKind::Text {
                vocab_size: O200K_VOCAB,
            },
        }
    }

    /// An image tokenizer with the given id and content hash (e.g. the SHA-256 of its weights).
    pub fn image(id: impl Into<String>, hash: [u8; 32], codebook_size: u32, patch: u32) -> Self {
        Self {
            info: ModelInfo {
                id: id.into(),
                version: VarInt::from_u32(1),
                hash,
            },
            kind: TokenizerKind::Image {
                codebook_size,
                patch,
            },
        }
    }

    /// Whether this is an image tokenizer.
    pub fn is_image(&self) -> bool {
        matches!(self.kind, TokenizerKind::Image { .. })
    }
}

/// One entropy model a codec holds, as offered in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntropyEntry {
    pub info: ModelInfo,
    pub choice: ModelChoice,
    /// `None` for models that code both kinds (uniform).
    pub kind: Option<SequenceKind>,
    pub identity: ModelIdentity,
}

/// The entropy models `codec` can use, in a fixed order.
pub(crate) fn entropy_table(codec: &PartCodec) -> Vec<EntropyEntry> {
    let candidates = [
        (ModelChoice::Uniform, SequenceKind::Text, None),
        (
            ModelChoice::Adaptive,
            SequenceKind::Text,
            Some(SequenceKind::Text),
        ),
        (
            ModelChoice::Adaptive,
            SequenceKind::Grid,
            Some(SequenceKind::Grid),
        ),
        (
            ModelChoice::Static,
            SequenceKind::Text,
            Some(SequenceKind::Text),
        ),
        (
            ModelChoice::Static,
            SequenceKind::Grid,
            Some(SequenceKind::Grid),
        ),
        (
            ModelChoice::Generic,
            SequenceKind::Grid,
            Some(SequenceKind::Grid),
        ),
        (
            ModelChoice::Masked,
            SequenceKind::Grid,
            Some(SequenceKind::Grid),
        ),
        (
            ModelChoice::TextCond,
            SequenceKind::Grid,
            Some(SequenceKind::Grid),
        ),
        (
            ModelChoice::Ladder,
            SequenceKind::Grid,
            Some(SequenceKind::Grid),
        ),
    ];
    candidates
        .into_iter()
        .filter_map(|(choice, kind, entry_kind)| {
            let identity = codec.identity(choice, kind).ok()?;
            Some(EntropyEntry {
                info: ModelInfo {
                    id: model_id::wire_name(identity.id).into(),
                    version: VarInt::from_u32(identity.version),
                    hash: identity.hash,
                },
                choice,
                kind: entry_kind,
                identity,
            })
        })
        .collect()
}

/// Finds the negotiated index of the model `choice` for parts of `kind`.
pub(crate) fn find_entropy(
    negotiated: &[ModelInfo],
    local: &[EntropyEntry],
    choice: ModelChoice,
    kind: SequenceKind,
) -> Option<(VarInt, ModelIdentity)> {
    let entry = local
        .iter()
        .find(|e| e.choice == choice && e.kind.is_none_or(|k| k == kind))?;
    let index = negotiated.iter().position(|m| *m == entry.info)?;
    Some((VarInt::from_u32(u32::try_from(index).ok()?), entry.identity))
}

/// The local entry behind a negotiated model index, if it codes parts of `kind`.
pub(crate) fn entropy_at<'a>(
    negotiated: &[ModelInfo],
    local: &'a [EntropyEntry],
    index: VarInt,
) -> Option<&'a EntropyEntry> {
    let info = negotiated.get(index.to_usize()?)?;
    local.iter().find(|e| e.info == *info)
}

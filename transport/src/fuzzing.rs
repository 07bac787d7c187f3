//! Pure pieces of the receiver, exposed for the fuzz targets in `fuzz/` (not a stable API).
//!
//! [`HeaderChecker`] runs the checks a receiver makes on a coded part's header before it waits
//! for context or decodes anything (PROTOCOL.md §6.2–6.4: table indices, the part kind against
//! the tokenizer, modes against models, shapes against limits, token counts, regions, ladder
//! levels, and the transformer positions the part would cost), exactly as a session does, with no
//! connection.
//!
//! ```
//! use unimic_codec::part::CodecConfig;
//! use unimic_protocol::{CodedPart, CodingMode, Limits, Shape, VarInt};
//! use unimic_transport::fuzzing::HeaderChecker;
//! use unimic_transport::TokenizerInfo;
//!
//! let image = TokenizerInfo::image("test-vq", [7; 32], 16, 16);
//! let checker = HeaderChecker::new(&CodecConfig::default(), &[TokenizerInfo::o200k(), image], Limits::default());
//! let v = VarInt::from_u32;
//! let mut part = CodedPart {
//!     tokenizer: v(1),
//!     entropy_model: v(0),
//!     shape: Shape { rows: v(2), cols: v(3) },
//!     token_count: v(6),
//!     mode: CodingMode::Uniform,
//!     context: vec![],
//!     context_digest: [0; 32],
//! };
//! assert_eq!(checker.check(true, &part).unwrap().tokens, 6);
//! part.token_count = v(5);
//! assert!(checker.check(true, &part).is_err());
//! ```

use unimic_codec::context::SequenceKind;
use unimic_codec::part::{CodecConfig, PartCodec};
use unimic_protocol::handshake::Negotiated;
use unimic_protocol::{CodedPart, ErrorCode, Limits, VarInt};

use crate::models::{entropy_table, EntropyEntry, TokenizerInfo};

/// What a receiver learns from a header it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeaderSummary {
    /// The entropy model's wire id (`unimic-entropy/…`).
    pub model: String,
    /// The tokenizer's id.
    pub tokenizer: String,
    /// Tokens the chunks will carry (an image's cells, a masked part's region).
    pub tokens: u64,
    /// Rows, columns and codebook size of an image part.
    pub grid: Option<(u32, u32, u32)>,
    /// The cells of a masked part's region, row-major.
    pub region: Option<Vec<bool>>,
    /// The ladder level of a refinement part.
    pub level: Option<u32>,
    /// Positions a transformer model runs to decode the part (0 for the other models).
    pub positions: u64,
}

/// The header checks of a session whose tables are what `codec` and `tokenizers` offer (both
/// ends alike), under `limits`.
pub struct HeaderChecker {
    negotiated: Negotiated,
    tokenizers: Vec<TokenizerInfo>,
    entropy: Vec<EntropyEntry>,
}

impl HeaderChecker {
    /// The checker of a session that negotiated these tables and limits.
    pub fn new(codec: &CodecConfig, tokenizers: &[TokenizerInfo], limits: Limits) -> Self {
        let entropy = entropy_table(&PartCodec::new(codec.clone()));
        Self {
            negotiated: Negotiated {
                version: VarInt::from_u32(1),
                tokenizers: tokenizers.iter().map(|t| t.info.clone()).collect(),
                entropy_models: entropy.iter().map(|e| e.info.clone()).collect(),
                limits,
            },
            tokenizers: tokenizers.to_vec(),
            entropy,
        }
    }

    /// The negotiated tables (what the indices of a part header name).
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// Checks a text (`image = false`) or image part's header as a receiver does before any
    /// decoding; on refusal, the error code the receiver sends and its reason.
    pub fn check(
        &self,
        image: bool,
        part: &CodedPart,
    ) -> Result<HeaderSummary, (ErrorCode, String)> {
        let kind = if image {
            SequenceKind::Grid
        } else {
            SequenceKind::Text
        };
        let c = crate::recv::check_header(
            &self.negotiated,
            &self.tokenizers,
            &self.entropy,
            kind,
            part,
        )
        .map_err(|f| (f.code, f.reason))?;
        Ok(HeaderSummary {
            model: c.entry.info.id.clone(),
            tokenizer: c.tokenizer,
            tokens: part.token_count.into_inner(),
            grid: c.grid,
            region: c.region,
            level: c.level,
            positions: c.positions,
        })
    }
}

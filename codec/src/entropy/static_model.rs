//! [`Static`]: order-0 frequencies learned from training tokens, stored in a small file.

use super::{Dense, MAX_ALPHABET};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Magic bytes that start a static model file.
pub const STATIC_MAGIC: &[u8; 8] = b"UMSTATIC";
/// The file format version written by this crate.
pub const STATIC_VERSION: u32 = 1;

/// An order-0 model: one fixed distribution for every token, with weights `2 * count + 1` (the
/// Krichevsky–Trofimov add-½ estimate, scaled to integers) quantized by the crate rule.
///
/// File format (little-endian): `"UMSTATIC"` (8 bytes), version `u32` (= 1), `K` `u32`
/// (`1..=65536`), then `K` counts as `u32`. Its content hash is SHA-256 of those bytes.
///
/// ```
/// use unimic_codec::entropy::{Distribution, Static};
/// let m = Static::train(4, [&[0u32, 0, 0, 1][..]]).unwrap();
/// let bytes = m.to_bytes();
/// assert_eq!(Static::from_bytes(&bytes).unwrap(), m);
/// let d = m.distribution();
/// assert!(d.cumulative(1) > d.cumulative(2) - d.cumulative(1)); // 0 is the likeliest
/// ```
#[derive(Debug, Clone)]
pub struct Static {
    counts: Vec<u32>,
    dist: Dense,
}

impl PartialEq for Static {
    fn eq(&self, other: &Self) -> bool {
        self.counts == other.counts
    }
}

/// Why a static model could not be built or read.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StaticError {
    /// The alphabet size is outside `1..=65536`.
    #[error("alphabet of {0} symbols is outside 1..=65536")]
    BadAlphabet(u64),
    /// A training token is not below the alphabet size.
    #[error("training token {token} is not below the alphabet size {k}")]
    TokenOutOfRange {
        /// The token.
        token: u32,
        /// The alphabet size.
        k: u32,
    },
    /// The file does not start with the magic bytes or has another version.
    #[error("not a static model file (version 1)")]
    BadHeader,
    /// The file length does not match its header.
    #[error("static model file has {got} bytes, its header implies {expected}")]
    BadLength {
        /// Bytes implied by the header.
        expected: u64,
        /// Bytes present.
        got: usize,
    },
}

impl Static {
    /// A model from per-symbol counts (`counts.len()` is the alphabet size).
    pub fn from_counts(counts: Vec<u32>) -> Result<Self, StaticError> {
        let k = counts.len() as u64;
        if k == 0 || k > u64::from(MAX_ALPHABET) {
            return Err(StaticError::BadAlphabet(k));
        }
        let dist = Dense::from_weights(counts.iter().map(|&c| 2 * u64::from(c) + 1));
        Ok(Self { counts, dist })
    }

    /// Counts the tokens of `sequences` over an alphabet of `k` symbols. Counts saturate at
    /// `u32::MAX`.
    pub fn train<'a>(
        k: u32,
        sequences: impl IntoIterator<Item = &'a [u32]>,
    ) -> Result<Self, StaticError> {
        if k == 0 || k > MAX_ALPHABET {
            return Err(StaticError::BadAlphabet(u64::from(k)));
        }
        let mut counts = vec![0u32; k as usize];
        for seq in sequences {
            for &t in seq {
                let c = counts
                    .get_mut(t as usize)
                    .ok_or(StaticError::TokenOutOfRange { token: t, k })?;
                *c = c.saturating_add(1);
            }
        }
        Self::from_counts(counts)
    }

    /// Alphabet size.
    pub fn alphabet_size(&self) -> u32 {
        self.counts.len() as u32
    }

    /// The training counts.
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }

    /// The quantized distribution used for every token.
    pub fn distribution(&self) -> &Dense {
        &self.dist
    }

    /// The model file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 4 * self.counts.len());
        out.extend_from_slice(STATIC_MAGIC);
        out.extend_from_slice(&STATIC_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.counts.len() as u32).to_le_bytes());
        for c in &self.counts {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out
    }

    /// Parses a model file, checking its length against the header before allocating.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StaticError> {
        if bytes.len() < 16 || &bytes[..8] != STATIC_MAGIC {
            return Err(StaticError::BadHeader);
        }
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        if word(8) != STATIC_VERSION {
            return Err(StaticError::BadHeader);
        }
        let k = word(12);
        if k == 0 || k > MAX_ALPHABET {
            return Err(StaticError::BadAlphabet(u64::from(k)));
        }
        let expected = 16 + 4 * u64::from(k);
        if bytes.len() as u64 != expected {
            return Err(StaticError::BadLength {
                expected,
                got: bytes.len(),
            });
        }
        Self::from_counts((0..k as usize).map(|i| word(16 + 4 * i)).collect())
    }

    /// SHA-256 of the model file: the content hash named in a handshake.
    pub fn content_hash(&self) -> [u8; 32] {
        Sha256::digest(self.to_bytes()).into()
    }
}

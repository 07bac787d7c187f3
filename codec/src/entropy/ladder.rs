//! Entropy models of a quality ladder's refinement levels (levels 2, 3, … of an image).
//!
//! A refinement level is a grid of residual codes of the same shape as level 1 (see
//! `docs/UMIC_FILE.md`). Each level is coded token by token in row-major order with a [`Static`]
//! model trained on that level's tokens of the training photos (`tools/taef2/export_tokens.py`
//! writes the counts), under the id `unimic-entropy-ladder-l<level>-v<version>`, stored as
//! `<id>.umstatic` next to the transformer models. A model file's identity is its content hash
//! ([`Static::content_hash`]).
//!
//! ```
//! use unimic_codec::entropy::ladder::LadderModel;
//! use unimic_codec::entropy::Static;
//! use unimic_codec::grid::TokenGrid;
//! let model = LadderModel::new(2, 1, Static::train(8, [&[0u32, 0, 1, 7][..]]).unwrap());
//! let grid = TokenGrid::new(2, 2, 8, vec![0, 1, 0, 7]).unwrap();
//! let payload = model.encode(&grid).unwrap();
//! assert_eq!(model.decode(2, 2, &payload).unwrap(), grid);
//! assert_eq!(model.id(), "unimic-entropy-ladder-l2-v1");
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use thiserror::Error;

use super::{Static, StaticError};
use crate::coder::{CodeError, Decoder, Encoder};
use crate::grid::{GridError, TokenGrid};

/// Why a ladder model could not be loaded or could not code a grid.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LadderError {
    /// Reading the model file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The model file is not a valid static model.
    #[error("model file: {0}")]
    Model(#[from] StaticError),
    /// The grid's codebook differs from the model's alphabet.
    #[error("grid codebook {grid} differs from the model's alphabet {model}")]
    Alphabet {
        /// Of the grid.
        grid: u32,
        /// Of the model.
        model: u32,
    },
    /// Range coding failed (a corrupt payload).
    #[error("coding: {0}")]
    Code(#[from] CodeError),
    /// The decoded tokens do not form a grid.
    #[error("grid: {0}")]
    Grid(#[from] GridError),
    /// The models given do not form a ladder (levels 2, 3, … in order).
    #[error("ladder: {0}")]
    Levels(String),
}

/// The entropy model of one refinement level.
#[derive(Debug, Clone)]
pub struct LadderModel {
    level: usize,
    version: u64,
    model: Arc<Static>,
}

impl LadderModel {
    /// The model of refinement `level` (2, 3, …), `version`, from trained counts.
    pub fn new(level: usize, version: u64, model: Static) -> Self {
        Self {
            level,
            version,
            model: Arc::new(model),
        }
    }

    /// The id of the model of `level`, `version`: `unimic-entropy-ladder-l<level>-v<version>`.
    pub fn id_of(level: usize, version: u64) -> String {
        format!("unimic-entropy-ladder-l{level}-v{version}")
    }

    /// Loads `<dir>/<id>.umstatic` for `level`, `version`.
    pub fn load(dir: &Path, level: usize, version: u64) -> Result<Self, LadderError> {
        let path = dir.join(format!("{}.umstatic", Self::id_of(level, version)));
        let bytes = std::fs::read(&path).map_err(|source| LadderError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Self::new(level, version, Static::from_bytes(&bytes)?))
    }

    /// This model's id.
    pub fn id(&self) -> String {
        Self::id_of(self.level, self.version)
    }

    /// The refinement level it codes.
    pub fn level(&self) -> usize {
        self.level
    }

    /// Its version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// SHA-256 of the model file: its identity.
    pub fn content_hash(&self) -> [u8; 32] {
        self.model.content_hash()
    }

    /// The order-0 model this level's tokens are coded with (shared, so a part codec takes it
    /// without copying its tables).
    pub fn model(&self) -> &Arc<Static> {
        &self.model
    }

    /// The token alphabet.
    pub fn alphabet_size(&self) -> u32 {
        self.model.alphabet_size()
    }

    /// Codes `grid` (row-major) as one range-coder payload.
    pub fn encode(&self, grid: &TokenGrid) -> Result<Vec<u8>, LadderError> {
        self.check(grid.codebook_size())?;
        let dist = self.model.distribution();
        let mut enc = Encoder::new();
        for &t in grid.ids() {
            enc.encode(t, dist)?;
        }
        Ok(enc.finish())
    }

    /// Decodes a `height × width` grid from `payload`. The caller bounds the grid size.
    pub fn decode(
        &self,
        height: u32,
        width: u32,
        payload: &[u8],
    ) -> Result<TokenGrid, LadderError> {
        let dist = self.model.distribution();
        let mut dec = Decoder::new(payload);
        let n = height as usize * width as usize;
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(dec.decode(dist)?);
        }
        Ok(TokenGrid::new(
            height,
            width,
            self.model.alphabet_size(),
            ids,
        )?)
    }

    fn check(&self, k: u32) -> Result<(), LadderError> {
        if k != self.model.alphabet_size() {
            return Err(LadderError::Alphabet {
                grid: k,
                model: self.model.alphabet_size(),
            });
        }
        Ok(())
    }
}

/// The entropy models of every refinement level of a ladder, as one session model: the
/// `unimic-entropy/ladder` entry of the handshake (docs/PROTOCOL.md §4.4, §6.3 mode 5), which
/// codes a refinement part of level `l` with the model of level `l`.
///
/// Its identity hash is SHA-256 over the level models' identity hashes (the SHA-256 of each
/// `.umstatic` file), concatenated as raw 32-byte digests in level order 2, 3, ….
///
/// ```
/// use unimic_codec::entropy::ladder::{Ladder, LadderModel};
/// use unimic_codec::entropy::Static;
/// let l2 = LadderModel::new(2, 1, Static::train(8, [&[0u32, 1][..]]).unwrap());
/// let l3 = LadderModel::new(3, 1, Static::train(8, [&[7u32, 7][..]]).unwrap());
/// let ladder = Ladder::new(vec![l2, l3]).unwrap();
/// assert_eq!(ladder.top_level(), 3);
/// assert!(ladder.level(3).is_some() && ladder.level(4).is_none());
/// ```
#[derive(Debug, Clone)]
pub struct Ladder {
    levels: Vec<LadderModel>,
    hash: [u8; 32],
}

impl Ladder {
    /// The ladder of `levels`, which must be the models of levels 2, 3, … in order, all of one
    /// alphabet, at most 15 of them ([`LadderError::Levels`] otherwise).
    pub fn new(levels: Vec<LadderModel>) -> Result<Self, LadderError> {
        if levels.is_empty() || levels.len() > 15 {
            return Err(LadderError::Levels(format!(
                "{} refinement levels (1 ..= 15)",
                levels.len()
            )));
        }
        for (i, m) in levels.iter().enumerate() {
            if m.level() != i + 2 {
                return Err(LadderError::Levels(format!(
                    "model {i} codes level {}, expected {}",
                    m.level(),
                    i + 2
                )));
            }
            if m.alphabet_size() != levels[0].alphabet_size() {
                return Err(LadderError::Alphabet {
                    grid: m.alphabet_size(),
                    model: levels[0].alphabet_size(),
                });
            }
        }
        let mut all = Vec::with_capacity(32 * levels.len());
        for m in &levels {
            all.extend_from_slice(&m.content_hash());
        }
        let hash = Sha256::digest(&all).into();
        Ok(Self { levels, hash })
    }

    /// Loads the models of levels `2 ..= top` (`version`) from `dir` ([`LadderModel::load`]).
    pub fn load(dir: &Path, top: usize, version: u64) -> Result<Self, LadderError> {
        let levels = (2..=top.max(2))
            .map(|l| LadderModel::load(dir, l, version))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(levels)
    }

    /// The highest level it codes.
    pub fn top_level(&self) -> usize {
        self.levels.len() + 1
    }

    /// The model of refinement `level`, if this ladder has it.
    pub fn level(&self, level: usize) -> Option<&LadderModel> {
        level.checked_sub(2).and_then(|i| self.levels.get(i))
    }

    /// The token alphabet (the image tokenizer's codebook size).
    pub fn alphabet_size(&self) -> u32 {
        self.levels[0].alphabet_size()
    }

    /// The identity hash (see the type's docs).
    pub fn content_hash(&self) -> [u8; 32] {
        self.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden payload (docs/UMIC_FILE.md, refinement levels): counts `c_i = i` for `i < 16`, a 2×3
    /// grid. Weights `2 c_i + 1` quantized by the crate rule, row-major, range-coded (CODING.md §2).
    #[test]
    fn golden_payload() {
        let m = LadderModel::new(2, 1, Static::from_counts((0..16).collect()).unwrap());
        let grid = TokenGrid::new(2, 3, 16, vec![15, 0, 7, 7, 3, 12]).unwrap();
        let payload = m.encode(&grid).unwrap();
        let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, GOLDEN);
        assert_eq!(m.decode(2, 3, &payload).unwrap(), grid);
    }

    const GOLDEN: &str = "e1064962";

    #[test]
    fn round_trip_and_cost_follows_the_counts() {
        let mut counts = vec![1u32; 64];
        counts[5] = 10_000;
        let m = LadderModel::new(3, 1, Static::from_counts(counts).unwrap());
        let common = TokenGrid::new(4, 4, 64, vec![5; 16]).unwrap();
        let rare = TokenGrid::new(4, 4, 64, (0..16).collect()).unwrap();
        for g in [&common, &rare] {
            let p = m.encode(g).unwrap();
            assert_eq!(&m.decode(4, 4, &p).unwrap(), g);
        }
        assert!(m.encode(&common).unwrap().len() < m.encode(&rare).unwrap().len());
        let wrong = TokenGrid::new(1, 1, 32, vec![0]).unwrap();
        assert!(matches!(
            m.encode(&wrong),
            Err(LadderError::Alphabet { .. })
        ));
    }
}

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
}

/// The entropy model of one refinement level.
#[derive(Debug, Clone)]
pub struct LadderModel {
    level: usize,
    version: u64,
    model: Static,
}

impl LadderModel {
    /// The model of refinement `level` (2, 3, …), `version`, from trained counts.
    pub fn new(level: usize, version: u64, model: Static) -> Self {
        Self {
            level,
            version,
            model,
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

//! Rate-distortion optimized tokenization: level-1 codes chosen for the bits they cost as well
//! as for how close they are.
//!
//! The TAEF2 tokenizer picks, for every grid cell, the codeword nearest to the cell's vector.
//! Often a codeword almost as near costs far fewer bits under the generic entropy model (it is
//! what the model expects after the cells before it). [`choose_level1`] walks the grid in the
//! model's raster order and picks, among the `candidates` nearest codewords of each cell, the one
//! that minimises
//!
//! ```text
//! J(c) = (d(c) − d(c₀)) / d̄  +  λ · bits(c)
//! ```
//!
//! where `d(c)` is the squared distance of codeword `c` to the cell's vector, `c₀` the nearest
//! codeword, `d̄` the mean of `d(c₀)` over the image's cells (so `λ` does not depend on the
//! image's scale: `λ = 0.05` trades one bit for 5% of the image's mean quantization error in one
//! cell), and `bits(c) = 24 − log2 f(c)` the cost of `c` under the model's quantized
//! distribution given the codes already chosen, with `f(c) = 1 + ⌊w(c)·M/W⌋` (CODING.md §1; the
//! coder's frequency is that or one more, so the estimate errs high by at most `log2(1 + 1/f)`). Ties go to the nearer candidate,
//! so `λ = 0` gives exactly the tokenizer's own grid. The later levels of a quality ladder then
//! quantize what the chosen codes leave ([`Taef2Tokenizer::quantize_levels`]).
//!
//! This is an encoder's choice only: the wire, the models and the decoder are unchanged, and a
//! receiver cannot tell. It costs one sequential pass of the generic model per image (as much as
//! decoding it), on top of the tokenizer. The choice is greedy: a code's effect on the bits of
//! the cells after it is not weighed.
//!
//! [`RdoTokenizer`] wraps a tokenizer and a model as an [`ImageTokenizer`], so that anything that
//! tokenizes images (the chat client, `unimic encode --rdo`) can use it unchanged.
//!
//! ```no_run
//! use std::sync::Arc;
//! use unimic_codec::entropy::generic::Generic;
//! use unimic_codec::rdo::{RdoConfig, RdoTokenizer};
//! use unimic_codec::shipped::{entropy_dir, manifest_path, GENERIC_ID};
//! use unimic_codec::tokenizer::{ImageTokenizer, Taef2Tokenizer};
//! let tok = Arc::new(Taef2Tokenizer::default_model()?);
//! let (generic, _) = Generic::load(&manifest_path(&entropy_dir(None), GENERIC_ID))?;
//! let rdo = RdoTokenizer::new(tok, Arc::new(generic), RdoConfig::default())?;
//! let img = image::RgbImage::from_pixel(64, 48, image::Rgb([120, 80, 40]));
//! let grid = rdo.encode(&img)?; // cheaper to code than tok.encode(&img), nearly as close
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::Path;
use std::sync::Arc;

use image::RgbImage;
use serde::Deserialize;

use crate::entropy::generic::Generic;
use crate::entropy::{PRECISION, TOTAL};
use crate::grid::TokenGrid;
use crate::nn::model::ModelError;
use crate::tokenizer::taef2::TAEF2_MANIFEST_FORMAT;
use crate::tokenizer::taef2::{CellVectors, Taef2Quantizer};
use crate::tokenizer::{
    DynTokenizer, ImageTokenizer, Taef2Tokenizer, TokenizerError, TokenizerId, MANIFEST_FILE,
};

/// Loads the tokenizer in `dir` as [`crate::tokenizer::load_dir`] does, wrapped in an
/// [`RdoTokenizer`] when it is a TAEF2 tokenizer, a model is given and `cfg.lambda > 0`: what a
/// program that sends images uses (it decodes the same way). Returns the settings in force
/// (`None`: not wrapped, the nearest codes). Settings [`RdoConfig::validate`] refuses, or a
/// model of another codebook size than the tokenizer's, are an error.
pub fn load_dir(
    dir: &Path,
    model: Option<Arc<Generic>>,
    cfg: RdoConfig,
) -> Result<(DynTokenizer, Option<RdoConfig>), TokenizerError> {
    #[derive(Deserialize)]
    struct Format {
        format: String,
    }
    cfg.validate()
        .map_err(|e| TokenizerError::Rdo(Box::new(e)))?;
    let path = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&path).map_err(|source| TokenizerError::Io { path, source })?;
    let f: Format = serde_json::from_slice(&bytes)?;
    match model {
        Some(model) if f.format == TAEF2_MANIFEST_FORMAT && cfg.lambda > 0.0 => {
            let tok = Arc::new(Taef2Tokenizer::from_dir(dir)?);
            let rdo =
                RdoTokenizer::new(tok, model, cfg).map_err(|e| TokenizerError::Rdo(Box::new(e)))?;
            Ok((Box::new(rdo), Some(cfg)))
        }
        _ => Ok((crate::tokenizer::load_dir(dir)?, None)),
    }
}

/// How [`choose_level1`] trades bits for fidelity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RdoConfig {
    /// Weight of one bit against the image's mean quantization error (see the [module
    /// docs](self)); `0` keeps the nearest codes. Must be finite and non-negative.
    pub lambda: f32,
    /// Codewords considered per cell, nearest first (at least 1).
    pub candidates: usize,
}

/// The `λ` that [`RdoConfig::default`] and the shipped programs use: on Kodak at 256×256 it
/// codes level 1 in 2.9% fewer bytes for 0.03 dB of PSNR (docs/CODING.md §7.12).
pub const DEFAULT_LAMBDA: f32 = 0.02;

impl Default for RdoConfig {
    /// `λ =` [`DEFAULT_LAMBDA`] among the 16 nearest codewords.
    fn default() -> Self {
        Self {
            lambda: DEFAULT_LAMBDA,
            candidates: 16,
        }
    }
}

impl RdoConfig {
    /// `λ = lambda` among the default number of candidates.
    pub fn with_lambda(lambda: f32) -> Self {
        Self {
            lambda,
            ..Self::default()
        }
    }

    /// Checks that `lambda` is a finite number `>= 0` and `candidates` at least 1.
    pub fn validate(&self) -> Result<(), RdoError> {
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(RdoError::Config(format!(
                "lambda {} is not a finite number >= 0",
                self.lambda
            )));
        }
        if self.candidates == 0 {
            return Err(RdoError::Config("candidates must be at least 1".into()));
        }
        Ok(())
    }
}

/// What [`choose_level1`] did to one grid.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RdoStats {
    /// Cells whose code is not the nearest codeword.
    pub changed: usize,
    /// `Σ bits(c)` of the chosen codes: about what the generic model codes them in (each term
    /// is at most a rounding unit above the coder's cost, so this errs a little high).
    pub bits: f64,
    /// The chosen codes' summed squared distance over the nearest codes', minus one (0 when
    /// nothing changed, or when the distances are not finite).
    pub extra_distortion: f64,
}

/// Why [`choose_level1`] could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RdoError {
    /// `lambda` is negative or not finite, or `candidates` is 0 ([`RdoConfig::validate`]).
    #[error("rate-distortion settings: {0}")]
    Config(String),
    /// The tokenizer and the model do not go together (codebook sizes), or the vectors are not
    /// the tokenizer's (their dimension or count).
    #[error("{0}")]
    Mismatch(String),
    /// The grid is empty, or wider or taller than the model's positions: nothing to choose for
    /// ([`RdoTokenizer`] then keeps the nearest codes).
    #[error("a {height}x{width} grid does not fit the model's {max_side} positions a side")]
    TooLarge {
        /// Grid rows.
        height: usize,
        /// Grid columns.
        width: usize,
        /// The model's largest side.
        max_side: usize,
    },
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Checks that `quantizer` and `model` go together: the same number of codes.
fn check_pair(quantizer: &Taef2Quantizer, model: &Generic) -> Result<(), RdoError> {
    let (codes, k) = (quantizer.config().codes, model.config().codebook_size);
    if codes != k {
        return Err(RdoError::Mismatch(format!(
            "the tokenizer has {codes} codes, the generic model {k}"
        )));
    }
    Ok(())
}

/// The level-1 codes of `cells` (from [`Taef2Tokenizer::embed`]), chosen cell by cell in raster
/// order for distance and bits under `model` (see the [module docs](self)), with what the choice
/// did.
pub fn choose_level1(
    quantizer: &Taef2Quantizer,
    cells: &CellVectors,
    model: &Generic,
    cfg: &RdoConfig,
) -> Result<(Vec<u32>, RdoStats), RdoError> {
    cfg.validate()?;
    check_pair(quantizer, model)?;
    let dim = quantizer.config().dim;
    let n = cells
        .height
        .checked_mul(cells.width)
        .filter(|&n| cells.dim == dim && n.checked_mul(dim) == Some(cells.data.len()))
        .ok_or_else(|| {
            RdoError::Mismatch(format!(
                "{} values of dimension {} for a {}x{} grid; the quantizer's vectors have {dim}",
                cells.data.len(),
                cells.dim,
                cells.height,
                cells.width
            ))
        })?;
    let max_side = model.config().max_side;
    if n == 0 || cells.height > max_side || cells.width > max_side {
        return Err(RdoError::TooLarge {
            height: cells.height,
            width: cells.width,
            max_side,
        });
    }
    let k = cfg.candidates.min(quantizer.config().codes);
    let mut cand = Vec::with_capacity(n);
    let mut scratch = Vec::with_capacity(k);
    for i in 0..n {
        quantizer.nearest_k(0, cells.cell(i), k, &mut scratch);
        cand.push(scratch.clone());
    }
    // The mean over finite distances (NaN weights give infinite ones; those cells' costs are
    // NaN, which never wins, so they keep the nearest code).
    let finite: Vec<f64> = cand
        .iter()
        .map(|c| f64::from(c[0].0))
        .filter(|d| d.is_finite())
        .collect();
    let nearest_total: f64 = finite.iter().sum();
    let mean = (nearest_total / finite.len().max(1) as f64).max(f64::MIN_POSITIVE);
    let lambda = f64::from(cfg.lambda);
    let mut stats = RdoStats::default();
    let mut extra = 0f64;
    // Both fit in u32: they are at most `max_side`.
    let grid = model.generate(cells.height as u32, cells.width as u32, |i, w| {
        let c = &cand[i];
        let bits = bits_under(w);
        let (d0, _) = c[0];
        let mut best = (f64::INFINITY, 0usize);
        for (j, &(d, code)) in c.iter().enumerate() {
            let cost = f64::from(d - d0) / mean + lambda * bits(code);
            if cost < best.0 {
                best = (cost, j);
            }
        }
        let (d, code) = c[best.1];
        stats.changed += usize::from(best.1 != 0);
        stats.bits += bits(code);
        if best.1 != 0 {
            extra += f64::from(d - d0);
        }
        Ok(code)
    })?;
    stats.extra_distortion = if nearest_total > 0.0 && extra.is_finite() {
        extra / nearest_total
    } else {
        0.0
    };
    Ok((grid.ids().to_vec(), stats))
}

/// `code ↦ 24 − log2 f(code)` for the model's integer weights `w`, with `f` the frequency the
/// quantization rule of [`crate::entropy`] gives (`1 + ⌊w·M/W⌋` up to the rounding of the
/// prefix sums, never below 1).
fn bits_under(w: &[u64]) -> impl Fn(u32) -> f64 + '_ {
    let total: u128 = w.iter().map(|&x| u128::from(x)).sum();
    let m = u128::from(TOTAL) - w.len() as u128;
    move |code| {
        let wi = u128::from(w.get(code as usize).copied().unwrap_or(0));
        // All-zero weights code as uniform (the quantization rule).
        let f = (wi * m)
            .checked_div(total)
            .map_or(u128::from(TOTAL) / w.len().max(1) as u128, |q| 1 + q)
            .max(1);
        f64::from(PRECISION) - (f as f64).log2()
    }
}

/// A TAEF2 tokenizer whose level-1 codes are chosen by [`choose_level1`] under a generic
/// model: the same grids' shape, codebook and identity ([`ImageTokenizer::id`] is the wrapped
/// tokenizer's, since a receiver decodes them the same way), fewer bits, slightly farther codes.
///
/// An image whose grid the model cannot code (larger than its positions) gets the tokenizer's
/// nearest codes, as without the wrapper.
#[derive(Debug, Clone)]
pub struct RdoTokenizer {
    tokenizer: Arc<Taef2Tokenizer>,
    model: Arc<Generic>,
    cfg: RdoConfig,
}

impl RdoTokenizer {
    /// Wraps `tokenizer`, choosing its level-1 codes for `model` with `cfg`; fails on settings
    /// [`RdoConfig::validate`] refuses and on a model of another codebook size.
    pub fn new(
        tokenizer: Arc<Taef2Tokenizer>,
        model: Arc<Generic>,
        cfg: RdoConfig,
    ) -> Result<Self, RdoError> {
        cfg.validate()?;
        check_pair(tokenizer.quantizer(), &model)?;
        Ok(Self {
            tokenizer,
            model,
            cfg,
        })
    }

    /// The wrapped tokenizer.
    pub fn tokenizer(&self) -> &Arc<Taef2Tokenizer> {
        &self.tokenizer
    }

    /// The settings.
    pub fn config(&self) -> &RdoConfig {
        &self.cfg
    }

    /// The grids of levels `1..=n` and what the choice did (`None`: the model could not code
    /// the grid, so the codes are the nearest ones).
    pub fn encode_levels_with_stats(
        &self,
        image: &RgbImage,
        n: usize,
    ) -> Result<(Vec<TokenGrid>, Option<RdoStats>), TokenizerError> {
        if n == 0 || n > self.tokenizer.levels() {
            return Err(TokenizerError::Levels {
                requested: n,
                available: self.tokenizer.levels(),
            });
        }
        let cells = self.tokenizer.embed(image)?;
        match choose_level1(self.tokenizer.quantizer(), &cells, &self.model, &self.cfg) {
            Ok((first, stats)) => Ok((
                self.tokenizer.quantize_levels(&cells, n, Some(&first))?,
                Some(stats),
            )),
            Err(RdoError::TooLarge { .. }) => {
                Ok((self.tokenizer.quantize_levels(&cells, n, None)?, None))
            }
            Err(e) => Err(TokenizerError::Rdo(Box::new(e))),
        }
    }
}

impl ImageTokenizer for RdoTokenizer {
    fn encode(&self, image: &RgbImage) -> Result<TokenGrid, TokenizerError> {
        Ok(self.encode_levels(image, 1)?.remove(0))
    }

    fn decode(&self, grid: &TokenGrid) -> Result<RgbImage, TokenizerError> {
        self.tokenizer.decode(grid)
    }

    fn codebook_size(&self) -> u32 {
        self.tokenizer.codebook_size()
    }

    fn factor(&self) -> u32 {
        self.tokenizer.factor()
    }

    fn id(&self) -> &TokenizerId {
        self.tokenizer.id()
    }

    fn levels(&self) -> usize {
        self.tokenizer.levels()
    }

    fn encode_levels(&self, image: &RgbImage, n: usize) -> Result<Vec<TokenGrid>, TokenizerError> {
        Ok(self.encode_levels_with_stats(image, n)?.0)
    }

    fn decode_levels(&self, grids: &[TokenGrid]) -> Result<RgbImage, TokenizerError> {
        self.tokenizer.decode_levels(grids)
    }
}

//! Coding a grid with a transformer model a piece at a time.
//!
//! A [`Cursor`] is where one of the transformer models ([`Generic`](super::generic::Generic),
//! [`Masked`](super::masked::Masked), [`TextCond`](super::text_cond::TextCond)) stands in a
//! grid: the keys and values of every position it has run (its KV cache), the tokens decided so
//! far, and the next position. Each model makes one (`cursor`) and moves it on in two ways:
//!
//! - `advance(cursor, n, pick)` runs the next `n` coded tokens **one position at a time**, each
//!   token chosen by `pick` from the model's integer weights: the range decoder when decoding, a
//!   [`Sampler`](super::sample::Sampler) when generating;
//! - `advance_known(cursor, tokens)` takes the next tokens as given and returns the weights each
//!   was coded with, from **one batched pass** over them: what an encoder needs.
//!
//! Both give the same weights bit for bit (docs/CODING.md §7.4: a sum keeps its order whatever
//! the batching), so a part can travel in chunks (docs/CODING.md §7.9): the sender codes each
//! chunk's tokens as a separately terminated range-coder message ([`code_chunk`]), the receiver
//! decodes chunk after chunk on one cursor, and the probabilities are those of the part coded
//! whole. A model's one-shot `encode`, `decode` and `generate` are a cursor moved over the
//! whole grid at once.
//!
//! ```
//! use unimic_codec::coder::Decoder;
//! use unimic_codec::entropy::cursor::code_chunk;
//! use unimic_codec::entropy::generic::{Generic, GenericConfig};
//! use unimic_codec::entropy::Dense;
//! use unimic_codec::grid::TokenGrid;
//!
//! let model = Generic::synthetic(&GenericConfig::tiny(16), 1).unwrap();
//! let grid = TokenGrid::new(3, 4, 16, (0..12).map(|i| i % 16).collect()).unwrap();
//!
//! // The sender: two rows, then the last row, each its own payload.
//! let mut tx = model.cursor(3, 4).unwrap();
//! let first = model.advance_known(&mut tx, &grid.ids()[..8]).unwrap();
//! let rest = model.advance_known(&mut tx, &grid.ids()[8..]).unwrap();
//! let chunks = [code_chunk(first, &grid.ids()[..8]).unwrap().0,
//!               code_chunk(rest, &grid.ids()[8..]).unwrap().0];
//!
//! // The receiver: chunk after chunk on one cursor.
//! let mut rx = model.cursor(3, 4).unwrap();
//! for (payload, n) in chunks.iter().zip([8, 4]) {
//!     let mut dec = Decoder::new(payload);
//!     model.advance(&mut rx, n, |_, w| Ok(dec.decode(&Dense::from_weights(w.iter().copied()))?))
//!         .unwrap();
//! }
//! assert_eq!(rx.into_grid().unwrap(), grid);
//! ```

use crate::coder::{CodeError, Encoder};
use crate::entropy::Dense;
use crate::grid::TokenGrid;
use crate::nn::kernels::Kernel;
use crate::nn::model::{Head, ModelError};
use crate::nn::transformer::{Body, KvCache, Mask};

/// A model's input row for raster position `t` of a grid `width` wide after the token `prev`.
pub(crate) type InputRow<'a> = &'a dyn Fn(Option<u32>, usize, usize, &mut [f32]);

/// Where a transformer model stands in a grid (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct Cursor {
    pub(crate) cache: KvCache,
    /// Every cell, row-major: the known cells of a masked grid, the decided ones, zeros after.
    pub(crate) ids: Vec<u32>,
    pub(crate) height: u32,
    pub(crate) width: u32,
    pub(crate) codebook_size: u32,
    /// The next raster position the model runs.
    pub(crate) t: usize,
    /// Tokens decided so far (coded cells).
    pub(crate) coded: usize,
    /// Tokens the grid codes: every cell, or a masked grid's unknown cells.
    pub(crate) total: usize,
    /// A masked grid's unknown cells (`None`: every cell is coded).
    pub(crate) unknown: Option<Vec<bool>>,
    /// Raster positions the model runs: every cell, or up to a masked grid's last unknown cell.
    pub(crate) len: usize,
}

impl Cursor {
    /// A cursor at the start of a grid (the cache holds what comes before the grid's cells).
    pub(crate) fn new(
        cache: KvCache,
        (height, width, codebook_size): (u32, u32, u32),
        ids: Vec<u32>,
        unknown: Option<Vec<bool>>,
        len: usize,
    ) -> Self {
        let total = unknown
            .as_ref()
            .map_or(ids.len(), |u| u.iter().filter(|&&u| u).count());
        Self {
            cache,
            ids,
            height,
            width,
            codebook_size,
            t: 0,
            coded: 0,
            total,
            unknown,
            len,
        }
    }

    /// Tokens decided so far.
    pub fn coded(&self) -> usize {
        self.coded
    }

    /// Tokens the grid codes: every cell, or the unknown cells of a masked grid.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Whether every token has been decided.
    pub fn is_done(&self) -> bool {
        self.coded == self.total
    }

    /// The grid's cells, row-major: known and decided cells hold their tokens, the others 0.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The grid, once every token is decided.
    pub fn into_grid(self) -> Result<TokenGrid, ModelError> {
        if !self.is_done() {
            return Err(ModelError::Grid(format!(
                "{} of {} tokens decided",
                self.coded, self.total
            )));
        }
        TokenGrid::new(self.height, self.width, self.codebook_size, self.ids)
            .map_err(|e| ModelError::Grid(e.to_string()))
    }

    /// Whether cell `t` is coded (not a known cell of a masked grid).
    pub(crate) fn is_coded(&self, t: usize) -> bool {
        self.unknown.as_ref().is_none_or(|u| u[t])
    }

    /// Checks that `n` more tokens fit the grid.
    pub(crate) fn check_more(&self, n: usize) -> Result<(), ModelError> {
        if n > self.total - self.coded {
            return Err(ModelError::Grid(format!(
                "{n} more tokens asked, {} left of {}",
                self.total - self.coded,
                self.total
            )));
        }
        Ok(())
    }

    /// The end (exclusive raster position) of the span that holds the next `n` coded cells,
    /// and writes `tokens` into those cells (each checked against the codebook).
    pub(crate) fn place(&mut self, tokens: &[u32]) -> Result<usize, ModelError> {
        self.check_more(tokens.len())?;
        if let Some(&id) = tokens.iter().find(|&&id| id >= self.codebook_size) {
            return Err(ModelError::Grid(format!(
                "token {id} outside the codebook of {}",
                self.codebook_size
            )));
        }
        let mut end = self.t;
        for &id in tokens {
            while !self.is_coded(end) {
                end += 1;
            }
            self.ids[end] = id;
            end += 1;
        }
        Ok(end)
    }
}

impl Cursor {
    /// Decides the next `n` tokens one position at a time (every position coded): `step(cache,
    /// t, prev, width, weights)` runs the model at position `t` after the token `prev` and
    /// writes its integer weights, `pick(t, weights)` chooses the token.
    pub(crate) fn steps(
        &mut self,
        n: usize,
        mut step: impl FnMut(&mut KvCache, usize, Option<u32>, usize, &mut Vec<u64>),
        mut pick: impl FnMut(usize, &[u64]) -> Result<u32, ModelError>,
    ) -> Result<(), ModelError> {
        self.check_more(n)?;
        let k = self.codebook_size;
        let width = (self.width as usize).max(1);
        let mut w = Vec::new();
        for _ in 0..n {
            let t = self.t;
            let prev = t.checked_sub(1).map(|p| self.ids[p]);
            step(&mut self.cache, t, prev, width, &mut w);
            self.ids[t] = pick(t, &w)?.min(k.saturating_sub(1));
            self.t += 1;
            self.coded += 1;
        }
        Ok(())
    }

    /// Takes `tokens` as the next coded tokens and runs the raster span that holds them (with
    /// any known cells between) in one batched pass: `input` writes each position's input row
    /// (`d` values), `run(rows, cache, coded)` runs the rows on the cache and returns the
    /// weights of the rows listed in `coded` (the span's coded cells).
    pub(crate) fn batch(
        &mut self,
        tokens: &[u32],
        d: usize,
        input: InputRow<'_>,
        run: impl FnOnce(&mut [f32], &mut KvCache, &[usize]) -> Vec<Vec<u64>>,
    ) -> Result<Vec<Vec<u64>>, ModelError> {
        let (from, to) = (self.t, self.place(tokens)?);
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let width = (self.width as usize).max(1);
        let mut xs = vec![0.0f32; (to - from) * d];
        for (row, t) in xs.chunks_exact_mut(d).zip(from..to) {
            input(t.checked_sub(1).map(|p| self.ids[p]), t, width, row);
        }
        let coded: Vec<usize> = (from..to)
            .filter(|&t| self.is_coded(t))
            .map(|t| t - from)
            .collect();
        let weights = run(&mut xs, &mut self.cache, &coded);
        self.t = to;
        self.coded += tokens.len();
        Ok(weights)
    }
}

/// The `run` of [`Cursor::batch`] for a causal body and its head: the rows through `body` on
/// the cache, then the head's integer weights of the coded rows.
pub(crate) fn causal<'m>(
    body: &'m Body,
    head: &'m Head,
    kernel: Kernel,
    d: usize,
) -> impl FnOnce(&mut [f32], &mut KvCache, &[usize]) -> Vec<Vec<u64>> + 'm {
    move |xs, cache, rows| {
        body.forward(kernel, xs, cache, Mask::Causal);
        head.weights_rows(kernel, xs, d, rows)
    }
}

/// Codes `ids` with their integer `weights` (one vector per token, in order) as one separately
/// terminated range-coder message: one chunk of a part. Returns the payload and `Σ -log2 p`.
pub fn code_chunk(weights: Vec<Vec<u64>>, ids: &[u32]) -> Result<(Vec<u8>, f64), CodeError> {
    let mut enc = Encoder::new();
    for (w, &id) in weights.into_iter().zip(ids) {
        enc.encode(id, &Dense::from_weights(w))?;
    }
    let bits = enc.cross_entropy_bits();
    Ok((enc.finish(), bits))
}

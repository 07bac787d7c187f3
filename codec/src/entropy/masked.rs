//! [`Masked`]: a transformer that codes the unknown positions of a grid given the known ones,
//! seeing the known tokens on every side.
//!
//! # Model
//! The [generic](super::generic) raster-order model with a **prefix of known cells**. Let `f` be
//! the first unknown cell and `l` the last one (raster indices). The sequence is:
//!
//! 1. **Prefix**: every known cell after `f` (raster order), input
//!    `tok_emb[id] + known_row_emb[r] + known_col_emb[c]`, with attention among the prefix rows
//!    in both directions. These are the cells a raster scan would only reach later: below and to
//!    the right of the region.
//! 2. **Raster part**: cells `0 ..= l` exactly as in the generic model (input: the previous cell's
//!    token and the position of the cell predicted; `K` begins), causal, and each row also sees
//!    the whole prefix. The hidden state of an unknown cell's row gives the distribution of its
//!    token; known cells are inputs only.
//!
//! So every coded token is predicted from the cells before it in raster order (known or already
//! coded) *and* every known cell after it; with nothing known, the model is the generic model.
//! Fine-tuned from the generic model's weights, it starts from generic quality and learns to use
//! the prefix.
//!
//! Any split works: an inpainting hole inside a known image, an outpainting border around a
//! known centre, or the whole grid (everything unknown). The known tokens are not coded: the
//! receiver already holds them (for example, in its session context). The prefix's keys and
//! values are computed in one pass; the decoder then runs the raster part with runs of known
//! cells batched and one incremental step per unknown cell.
//!
//! ```
//! use unimic_codec::entropy::masked::{Masked, MaskedConfig};
//! use unimic_codec::grid::TokenGrid;
//! let model = Masked::synthetic(&MaskedConfig::tiny(16), 3).unwrap();
//! let grid = TokenGrid::new(3, 3, 16, (0..9).collect()).unwrap();
//! let unknown = [false, false, false, false, true, false, false, false, false];
//! let bytes = model.encode(&grid, &unknown).unwrap();
//! let mut partial = grid.ids().to_vec();
//! partial[4] = 0; // whatever the receiver holds there is ignored
//! let back = model.decode(3, 3, &partial, &unknown, &bytes).unwrap();
//! assert_eq!(back, grid);
//! ```

use serde::{Deserialize, Serialize};

use crate::coder::Decoder;
use crate::entropy::cursor::{causal, code_chunk, Cursor};
use crate::entropy::Dense;
use crate::grid::TokenGrid;
use crate::nn::kernels::Kernel;
use crate::nn::model::{check_shape, Head, Manifest, ModelError, Pos2d};
use crate::nn::transformer::{Body, BodyConfig, KvCache, Mask};
use crate::nn::weights::{sha256_hex, Weights};
use crate::nn::{embedding_row, NnError};

/// The `kind` of a masked model's manifest.
pub const KIND: &str = "masked";

/// Name prefix of the known cells' position tables (`known_row_emb.weight`, `known_col_emb.weight`).
pub const KNOWN_PREFIX: &str = "known_";

/// Architecture of a [`Masked`] model (the `config` object of its manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedConfig {
    /// Codebook size `K`; token `K` is the begin token.
    pub codebook_size: usize,
    /// Largest grid side.
    pub max_side: usize,
    /// The transformer body.
    pub body: BodyConfig,
}

impl MaskedConfig {
    /// The default size: d 256, 4 layers, 4 heads, MLP 768.
    pub fn small(codebook_size: usize) -> Self {
        Self {
            codebook_size,
            max_side: 64,
            body: BodyConfig {
                d_model: 256,
                n_layers: 4,
                n_heads: 4,
                d_ff: 768,
            },
        }
    }

    /// A very small model for tests and examples.
    pub fn tiny(codebook_size: usize) -> Self {
        Self {
            codebook_size,
            max_side: 16,
            body: BodyConfig {
                d_model: 16,
                n_layers: 2,
                n_heads: 2,
                d_ff: 32,
            },
        }
    }

    /// Checks the sizes.
    pub fn validate(&self) -> Result<(), NnError> {
        self.body.validate()?;
        if self.codebook_size < 2 || self.codebook_size > crate::grid::MAX_CODEBOOK as usize {
            return Err(NnError::Config(format!(
                "codebook size {} outside 2..=65536",
                self.codebook_size
            )));
        }
        if self.max_side == 0 || self.max_side > 1024 {
            return Err(NnError::Config(format!("max_side {}", self.max_side)));
        }
        Ok(())
    }

    /// Names and shapes of every tensor: the generic model's, plus the known cells' position
    /// tables.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.body.d_model;
        let mut v = vec![(
            "tok_emb.weight".to_string(),
            vec![self.codebook_size + 1, d],
        )];
        v.extend(Pos2d::tensor_shapes(self.max_side, d));
        v.extend(Pos2d::tensor_shapes_named(KNOWN_PREFIX, self.max_side, d));
        v.extend(self.body.tensor_shapes());
        v.extend(Head::tensor_shapes(self.codebook_size, d));
        v
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// The model's sequence (see the [module docs](self)) for an unknown mask: the prefix (raster
/// indices of the known cells after the first unknown cell) and the length of the raster part
/// (the last unknown cell's index plus one; 0 when nothing is unknown).
pub fn layout(unknown: &[bool]) -> (Vec<usize>, usize) {
    let Some(first) = unknown.iter().position(|&u| u) else {
        return (Vec::new(), 0);
    };
    let last = unknown.iter().rposition(|&u| u).unwrap_or(first);
    let prefix = (first + 1..unknown.len())
        .filter(|&i| !unknown[i])
        .collect();
    (prefix, last + 1)
}

/// The masked (known-prefix) transformer entropy model.
#[derive(Debug, Clone)]
pub struct Masked {
    cfg: MaskedConfig,
    tok_emb: Vec<f32>,
    pos: Pos2d,
    known_pos: Pos2d,
    body: Body,
    head: Head,
    kernel: Kernel,
    content_hash: String,
}

impl Masked {
    /// Builds the model from a checkpoint's tensors (every tensor must be used).
    pub fn from_weights(cfg: &MaskedConfig, mut w: Weights) -> Result<Self, NnError> {
        cfg.validate()?;
        let content_hash = sha256_hex(&w.to_safetensors()?);
        let d = cfg.body.d_model;
        let tok_emb = w.take("tok_emb.weight", &[cfg.codebook_size + 1, d])?;
        let pos = Pos2d::from_weights(cfg.max_side, d, &mut w)?;
        let known_pos = Pos2d::from_weights_named(KNOWN_PREFIX, cfg.max_side, d, &mut w)?;
        let body = Body::from_weights(&cfg.body, &mut w)?;
        let head = Head::from_weights(cfg.codebook_size, d, &mut w)?;
        w.finish()?;
        Ok(Self {
            cfg: cfg.clone(),
            tok_emb,
            pos,
            known_pos,
            body,
            head,
            kernel: Kernel::default(),
            content_hash,
        })
    }

    /// Loads safetensors bytes; the content hash is the SHA-256 of exactly these bytes.
    pub fn from_safetensors(cfg: &MaskedConfig, bytes: &[u8]) -> Result<Self, NnError> {
        let mut m = Self::from_weights(cfg, Weights::from_safetensors(bytes)?)?;
        m.content_hash = sha256_hex(bytes);
        Ok(m)
    }

    /// Loads a model from its JSON manifest (and the weights file it names, hash-checked).
    pub fn load(manifest: &std::path::Path) -> Result<(Self, Manifest), ModelError> {
        let (m, bytes) = Manifest::load(manifest, KIND)?;
        let cfg: MaskedConfig = serde_json::from_value(m.config.clone())
            .map_err(|e| ModelError::Manifest(e.to_string()))?;
        Ok((Self::from_safetensors(&cfg, &bytes)?, m))
    }

    /// A model with deterministic synthetic weights: for tests.
    pub fn synthetic(cfg: &MaskedConfig, seed: u64) -> Result<Self, NnError> {
        Self::from_weights(cfg, Weights::synthetic(&cfg.tensor_shapes(), seed, 1.0))
    }

    /// Selects the kernel implementation (results are identical; see [`Kernel`]).
    pub fn with_kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// The architecture.
    pub fn config(&self) -> &MaskedConfig {
        &self.cfg
    }

    /// SHA-256 (hex) of the safetensors weights.
    pub fn content_hash(&self) -> &str {
        &self.content_hash
    }

    /// The input row of known cell `i` holding token `id`.
    fn known_input(&self, id: u32, i: usize, width: usize, out: &mut [f32]) {
        let d = self.cfg.body.d_model;
        let id = (id as usize).min(self.cfg.codebook_size);
        if let Some(tok) = embedding_row(&self.tok_emb, d, id) {
            self.known_pos.add_to(tok, i / width, i % width, out);
        }
    }

    /// The raster-part input row of cell `i`, after the token `prev` (`None`: the first cell).
    fn raster_input(&self, prev: Option<u32>, i: usize, width: usize, out: &mut [f32]) {
        let d = self.cfg.body.d_model;
        let id = prev.map_or(self.cfg.codebook_size, |p| p as usize);
        if let Some(tok) = embedding_row(&self.tok_emb, d, id.min(self.cfg.codebook_size)) {
            self.pos.add_to(tok, i / width, i % width, out);
        }
    }

    /// Runs the prefix cells (`ids[i]` for each `i` of `prefix`) through the body with full
    /// attention among them; returns the cache holding their keys and values.
    fn known_prefix(&self, width: usize, ids: &[u32], prefix: &[usize]) -> KvCache {
        let d = self.cfg.body.d_model;
        let mut xs = vec![0.0f32; prefix.len() * d];
        for (row, &i) in xs.chunks_exact_mut(d).zip(prefix) {
            self.known_input(ids[i], i, width, row);
        }
        let mut cache = KvCache::new(&self.cfg.body);
        self.body
            .forward(self.kernel, &mut xs, &mut cache, Mask::Full);
        cache
    }

    /// The raster-part input rows of cells `from..to` (`ids[t - 1]` before cell `t`, `K` first).
    fn raster_inputs(&self, width: usize, ids: &[u32], from: usize, to: usize) -> Vec<f32> {
        let d = self.cfg.body.d_model;
        let mut xs = vec![0.0f32; (to - from) * d];
        for (row, t) in xs.chunks_exact_mut(d).zip(from..to) {
            let prev = if t == 0 { None } else { Some(ids[t - 1]) };
            self.raster_input(prev, t, width, row);
        }
        xs
    }

    /// A [`Cursor`] at the start of the unknown cells of a `height × width` grid whose known
    /// cells hold `known_ids` (row-major, `height * width` entries; values at unknown positions
    /// are ignored): the known prefix is run (see [`super::cursor`]).
    pub fn cursor(
        &self,
        height: u32,
        width: u32,
        known_ids: &[u32],
        unknown: &[bool],
    ) -> Result<Cursor, ModelError> {
        let k = self.cfg.codebook_size as u32;
        let n = height as usize * width as usize;
        self.check(height, width, k, n, unknown)?;
        if known_ids.len() != n {
            return Err(ModelError::Grid(format!(
                "{} known ids for {n} positions",
                known_ids.len()
            )));
        }
        let w = (width as usize).max(1);
        let ids: Vec<u32> = known_ids
            .iter()
            .zip(unknown)
            .map(|(&id, &u)| if u { 0 } else { id })
            .collect();
        let (prefix, len) = layout(unknown);
        let cache = self.known_prefix(w, &ids, &prefix);
        Ok(Cursor::new(
            cache,
            (height, width, k),
            ids,
            Some(unknown.to_vec()),
            len,
        ))
    }

    /// Decides the next `n` unknown cells of `cursor`, in raster order: runs of known cells in
    /// one batched pass, one incremental step per unknown cell, whose token `pick(index,
    /// weights)` chooses from the model's integer weights. An error from `pick` ends the run.
    pub fn advance(
        &self,
        cursor: &mut Cursor,
        n: usize,
        mut pick: impl FnMut(usize, &[u64]) -> Result<u32, ModelError>,
    ) -> Result<(), ModelError> {
        cursor.check_more(n)?;
        let k = cursor.codebook_size;
        let w = (cursor.width as usize).max(1);
        let target = cursor.coded + n;
        let (mut scratch, mut wts) = (Vec::new(), Vec::new());
        while cursor.coded < target {
            let t = cursor.t;
            if cursor.is_coded(t) {
                let mut x = self.raster_inputs(w, &cursor.ids, t, t + 1);
                self.body
                    .forward(self.kernel, &mut x, &mut cursor.cache, Mask::Causal);
                self.head.weights(self.kernel, &x, &mut scratch, &mut wts);
                cursor.ids[t] = pick(t, &wts)?.min(k.saturating_sub(1));
                cursor.t += 1;
                cursor.coded += 1;
            } else {
                // A run of known cells: inputs only, one batched pass.
                let end = (t..cursor.len)
                    .find(|&i| cursor.is_coded(i))
                    .unwrap_or(cursor.len);
                let mut xs = self.raster_inputs(w, &cursor.ids, t, end);
                self.body
                    .forward(self.kernel, &mut xs, &mut cursor.cache, Mask::Causal);
                cursor.t = end;
            }
        }
        Ok(())
    }

    /// Takes `tokens` as the next unknown cells of `cursor` and returns the integer weights each
    /// is coded with, from one batched pass over the raster span that holds them (the same bits
    /// as [`Self::advance`]'s).
    pub fn advance_known(
        &self,
        cursor: &mut Cursor,
        tokens: &[u32],
    ) -> Result<Vec<Vec<u64>>, ModelError> {
        let d = self.cfg.body.d_model;
        let input = |prev, t, width, row: &mut [f32]| self.raster_input(prev, t, width, row);
        let run = causal(&self.body, &self.head, self.kernel, d);
        cursor.batch(tokens, d, &input, run)
    }

    /// The integer weights of every unknown cell's token, in raster order of the unknown cells,
    /// from one pass over the prefix and one batched causal pass over the raster part (`ids`
    /// must hold the true tokens of every cell).
    pub fn weights_unknown(&self, width: usize, ids: &[u32], unknown: &[bool]) -> Vec<Vec<u64>> {
        let d = self.cfg.body.d_model;
        let width = width.max(1);
        let (prefix, len) = layout(unknown);
        let mut cache = self.known_prefix(width, ids, &prefix);
        let mut xs = self.raster_inputs(width, ids, 0, len);
        self.body
            .forward(self.kernel, &mut xs, &mut cache, Mask::Causal);
        let rows: Vec<usize> = (0..len).filter(|&t| unknown[t]).collect();
        self.head.weights_rows(self.kernel, &xs, d, &rows)
    }

    fn check(&self, h: u32, w: u32, k: u32, n: usize, unknown: &[bool]) -> Result<(), ModelError> {
        check_shape(h, w, k, self.cfg.max_side, self.cfg.codebook_size)?;
        if unknown.len() != n {
            return Err(ModelError::Grid(format!(
                "unknown mask has {} entries for {n} positions",
                unknown.len()
            )));
        }
        Ok(())
    }

    /// Codes the positions of `grid` where `unknown` is true (raster order), given the others.
    pub fn encode(&self, grid: &TokenGrid, unknown: &[bool]) -> Result<Vec<u8>, ModelError> {
        self.check(
            grid.height(),
            grid.width(),
            grid.codebook_size(),
            grid.len(),
            unknown,
        )?;
        let ids = grid.ids();
        let weights = self.weights_unknown(grid.width() as usize, ids, unknown);
        let coded: Vec<u32> = ids
            .iter()
            .zip(unknown)
            .filter(|(_, &u)| u)
            .map(|(&id, _)| id)
            .collect();
        Ok(code_chunk(weights, &coded)?.0)
    }

    /// Decodes the unknown positions of a `height × width` grid from `payload`; `known_ids` holds
    /// the receiver's tokens (row-major, `height * width` entries; values at unknown positions are
    /// ignored). One pass over the prefix, then the raster part: runs of known cells batched,
    /// one incremental step per unknown cell.
    pub fn decode(
        &self,
        height: u32,
        width: u32,
        known_ids: &[u32],
        unknown: &[bool],
        payload: &[u8],
    ) -> Result<TokenGrid, ModelError> {
        let mut dec = Decoder::new(payload);
        self.generate(height, width, known_ids, unknown, |_, w| {
            Ok(dec.decode(&Dense::from_weights(w.iter().copied()))?)
        })
    }

    /// Fills the unknown positions of a `height × width` grid given the known ones (as in
    /// [`Self::decode`]): `pick(index, weights)` chooses the token of each unknown cell, in
    /// raster order, from the model's integer weights. With a
    /// [`Sampler`](super::sample::Sampler) this is inpainting (a hole inside a known image),
    /// outpainting (a border around one) or a variation (a scattered subset). An error from
    /// `pick` ends the generation.
    ///
    /// ```
    /// use unimic_codec::entropy::masked::{Masked, MaskedConfig};
    /// use unimic_codec::entropy::sample::Sampler;
    /// let model = Masked::synthetic(&MaskedConfig::tiny(16), 3).unwrap();
    /// let known = vec![7u32; 9];
    /// let hole: Vec<bool> = (0..9).map(|i| i == 4).collect();
    /// let mut sampler = Sampler::new(1);
    /// let grid = model.generate(3, 3, &known, &hole, |_, w| Ok(sampler.pick(w))).unwrap();
    /// assert!(grid.ids().iter().enumerate().all(|(i, &id)| i == 4 || id == 7));
    /// ```
    pub fn generate(
        &self,
        height: u32,
        width: u32,
        known_ids: &[u32],
        unknown: &[bool],
        pick: impl FnMut(usize, &[u64]) -> Result<u32, ModelError>,
    ) -> Result<TokenGrid, ModelError> {
        let mut cursor = self.cursor(height, width, known_ids, unknown)?;
        let n = cursor.total();
        self.advance(&mut cursor, n, pick)?;
        cursor.into_grid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_prefixes_the_known_cells_after_the_first_unknown() {
        let unknown = [false, true, false, true, false, false];
        assert_eq!(layout(&unknown), (vec![2, 4, 5], 4));
        assert_eq!(layout(&[true, true]), (vec![], 2));
        assert_eq!(layout(&[false, false]), (vec![], 0));
        assert_eq!(layout(&[]), (vec![], 0));
    }

    #[test]
    fn whole_grid_weights_match_incremental_decoding_inputs() {
        // The batched unknown pass after an empty prefix equals step-by-step decoding: a round
        // trip of a random grid proves both paths give the same weights.
        let m = Masked::synthetic(&MaskedConfig::tiny(16), 4).unwrap();
        let ids: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 16).collect();
        let g = TokenGrid::new(4, 5, 16, ids).unwrap();
        for unknown in [vec![true; 20], (0..20).map(|i| i % 3 == 1).collect()] {
            let bytes = m.encode(&g, &unknown).unwrap();
            assert_eq!(m.decode(4, 5, g.ids(), &unknown, &bytes).unwrap(), g);
        }
    }
}

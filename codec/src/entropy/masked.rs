//! [`Masked`]: a bidirectional transformer that codes the unknown positions of a grid, in a fixed
//! schedule of groups, given the known ones.
//!
//! # Model
//! A MaskGIT-style encoder-only transformer: every position's input is
//! `tok_emb[id] + row_emb[r] + col_emb[c]`, where `id` is the token if the position is known
//! and `K` (the mask token, one past the codebook) if not; attention sees every position. The
//! hidden state of an unknown position gives the distribution of its token.
//!
//! # Schedule (part of the bitstream contract)
//! Given the unknown positions `U` of a `height × width` grid (`N = |U|`) and `S` =
//! [`MaskedConfig::steps`]:
//! 1. **Order**: `U` sorted by `splitmix64(0x6d61736b ^ (r << 16 | c))` (then by raster index),
//!    a fixed quasi-random order that spreads each group over the region.
//! 2. **Groups**: after step `s` (`1..=S`) the first `n_s = max(n_{s-1} + 1, ceil(N * s^2 / S^2))`
//!    positions of the order are coded (`n_0 = 0`, capped at `N`; all integer arithmetic). Groups
//!    grow quadratically, like MaskGIT's cosine schedule: few tokens are coded blind, most with
//!    plenty of context. Empty groups are skipped.
//! 3. **Step**: one full bidirectional pass over the grid with the current known set; the tokens
//!    of the group are coded in raster order, each with the distribution from that pass; then
//!    they become known.
//!
//! Any split works: an inpainting hole inside a known image, an outpainting border around a
//! known centre, or the whole grid (everything unknown). The known tokens are not coded: the
//! receiver already holds them (for example, in its session context).
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

use crate::coder::{Decoder, Encoder};
use crate::entropy::Dense;
use crate::grid::TokenGrid;
use crate::nn::kernels::Kernel;
use crate::nn::model::{check_shape, Head, Manifest, ModelError, Pos2d};
use crate::nn::transformer::{Body, BodyConfig, KvCache, Mask};
use crate::nn::weights::{sha256_hex, splitmix64, Weights};
use crate::nn::{embedding_row, NnError};

/// The `kind` of a masked model's manifest.
pub const KIND: &str = "masked";

/// Architecture of a [`Masked`] model (the `config` object of its manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedConfig {
    /// Codebook size `K`; token `K` is the mask token.
    pub codebook_size: usize,
    /// Largest grid side.
    pub max_side: usize,
    /// Number of schedule steps `S` (groups).
    pub steps: usize,
    /// The transformer body.
    pub body: BodyConfig,
}

impl MaskedConfig {
    /// The default size: d 256, 4 layers, 4 heads, MLP 768, 8 steps.
    pub fn small(codebook_size: usize) -> Self {
        Self {
            codebook_size,
            max_side: 64,
            steps: 8,
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
            steps: 4,
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
        if self.max_side == 0 || self.max_side > 1024 || self.steps == 0 || self.steps > 256 {
            return Err(NnError::Config(format!(
                "max_side {} / steps {}",
                self.max_side, self.steps
            )));
        }
        Ok(())
    }

    /// Names and shapes of every tensor.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.body.d_model;
        let mut v = vec![(
            "tok_emb.weight".to_string(),
            vec![self.codebook_size + 1, d],
        )];
        v.extend(Pos2d::tensor_shapes(self.max_side, d));
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

/// The fixed group schedule (see the [module docs](self)): the raster indices of the unknown
/// positions, split into at most `steps` non-empty groups, each group in raster order.
pub fn schedule(width: usize, unknown: &[bool], steps: usize) -> Vec<Vec<usize>> {
    let width = width.max(1);
    let mut order: Vec<(u64, usize)> = unknown
        .iter()
        .enumerate()
        .filter(|(_, &u)| u)
        .map(|(i, _)| {
            let (r, c) = ((i / width) as u64, (i % width) as u64);
            (splitmix64(0x6d61_736b ^ ((r << 16) | c)), i)
        })
        .collect();
    order.sort_unstable();
    let n = order.len() as u128;
    let s_total = steps.max(1) as u128;
    let mut groups = Vec::new();
    let mut done = 0usize;
    for s in 1..=s_total {
        let target = (n * s * s).div_ceil(s_total * s_total) as usize;
        let upto = target.max(done + 1).min(order.len());
        if upto > done {
            let mut g: Vec<usize> = order[done..upto].iter().map(|&(_, i)| i).collect();
            g.sort_unstable();
            groups.push(g);
            done = upto;
        }
    }
    groups
}

/// The masked (bidirectional, grouped) transformer entropy model.
#[derive(Debug, Clone)]
pub struct Masked {
    cfg: MaskedConfig,
    tok_emb: Vec<f32>,
    pos: Pos2d,
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
        let body = Body::from_weights(&cfg.body, &mut w)?;
        let head = Head::from_weights(cfg.codebook_size, d, &mut w)?;
        w.finish()?;
        Ok(Self {
            cfg: cfg.clone(),
            tok_emb,
            pos,
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

    /// Runs one pass with `ids` (mask token where `known[i]` is false) and returns the integer
    /// weights of the positions in `group` (one full bidirectional pass over the grid).
    pub fn group_weights(
        &self,
        width: usize,
        ids: &[u32],
        known: &[bool],
        group: &[usize],
    ) -> Vec<Vec<u64>> {
        let d = self.cfg.body.d_model;
        let k = self.cfg.codebook_size;
        let n = ids.len();
        let width = width.max(1);
        let mut xs = vec![0.0f32; n * d];
        for (i, (&tid, &kn)) in ids.iter().zip(known).enumerate().take(n) {
            let id = if kn { (tid as usize).min(k) } else { k };
            if let Some(tok) = embedding_row(&self.tok_emb, d, id) {
                self.pos
                    .add_to(tok, i / width, i % width, &mut xs[i * d..(i + 1) * d]);
            }
        }
        let mut cache = KvCache::new(&self.cfg.body);
        self.body
            .forward(self.kernel, &mut xs, &mut cache, Mask::Full);
        // A position outside the grid gets no weights (the rule makes them uniform).
        self.head.weights_rows(self.kernel, &xs, d, group)
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

    /// Codes the positions of `grid` where `unknown` is true, given the others.
    pub fn encode(&self, grid: &TokenGrid, unknown: &[bool]) -> Result<Vec<u8>, ModelError> {
        self.check(
            grid.height(),
            grid.width(),
            grid.codebook_size(),
            grid.len(),
            unknown,
        )?;
        let width = grid.width() as usize;
        let ids = grid.ids();
        let mut known: Vec<bool> = unknown.iter().map(|u| !u).collect();
        let mut enc = Encoder::new();
        for group in schedule(width, unknown, self.cfg.steps) {
            let ws = self.group_weights(width, ids, &known, &group);
            for (&i, w) in group.iter().zip(ws) {
                enc.encode(ids[i], &Dense::from_weights(w))?;
                known[i] = true;
            }
        }
        Ok(enc.finish())
    }

    /// Decodes the unknown positions of a `height × width` grid from `payload`; `known_ids` holds
    /// the receiver's tokens (row-major, `height * width` entries; values at unknown positions are
    /// ignored).
    pub fn decode(
        &self,
        height: u32,
        width: u32,
        known_ids: &[u32],
        unknown: &[bool],
        payload: &[u8],
    ) -> Result<TokenGrid, ModelError> {
        let k = self.cfg.codebook_size as u32;
        let n = height as usize * width as usize;
        self.check(height, width, k, n, unknown)?;
        if known_ids.len() != n {
            return Err(ModelError::Grid(format!(
                "{} known ids for {n} positions",
                known_ids.len()
            )));
        }
        let w = width as usize;
        let mut ids: Vec<u32> = known_ids
            .iter()
            .zip(unknown)
            .map(|(&id, &u)| if u { 0 } else { id })
            .collect();
        let mut known: Vec<bool> = unknown.iter().map(|u| !u).collect();
        let mut dec = Decoder::new(payload);
        for group in schedule(w, unknown, self.cfg.steps) {
            let ws = self.group_weights(w, &ids, &known, &group);
            for (&i, wt) in group.iter().zip(ws) {
                ids[i] = dec.decode(&Dense::from_weights(wt))?;
                known[i] = true;
            }
        }
        TokenGrid::new(height, width, k, ids).map_err(|e| ModelError::Grid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_covers_unknown_once_in_growing_groups() {
        let unknown: Vec<bool> = (0..256).map(|i| i % 3 != 0).collect();
        let groups = schedule(16, &unknown, 8);
        assert_eq!(groups.len(), 8);
        let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
        seen.sort_unstable();
        let want: Vec<usize> = (0..256).filter(|i| i % 3 != 0).collect();
        assert_eq!(seen, want);
        assert!(groups[0].len() < groups[7].len());
        // ceil(170 * 1 / 64) = 3 tokens in the first group.
        assert_eq!(groups[0].len(), 3);
        assert!(schedule(4, &[false; 16], 8).is_empty());
        assert_eq!(schedule(4, &[true; 3], 8).len(), 3);
    }
}

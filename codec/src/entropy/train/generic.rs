//! The [`crate::entropy::generic`] model in candle, for training.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::blocks::{causal_mask, embedding, head, masked_bits, Body};
use super::Batch;
use crate::entropy::generic::GenericConfig;

/// The generic (causal, raster-order) model; tensor names as in [`GenericConfig::tensor_shapes`].
#[derive(Debug, Clone)]
pub struct GenericNet {
    cfg: GenericConfig,
    tok_emb: Embedding,
    row_emb: Embedding,
    col_emb: Embedding,
    body: Body,
    head: Linear,
}

/// Row and column index tensors `(T)` for a raster scan of an `h × w` grid.
pub(crate) fn raster_positions(h: usize, w: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let rows: Vec<u32> = (0..h * w).map(|t| (t / w) as u32).collect();
    let cols: Vec<u32> = (0..h * w).map(|t| (t % w) as u32).collect();
    Ok((
        Tensor::from_vec(rows, h * w, dev)?,
        Tensor::from_vec(cols, h * w, dev)?,
    ))
}

/// `ids` shifted right by one with the begin token `k` first: the generic model's inputs.
pub(crate) fn shifted_inputs(batch: &Batch, k: u32) -> Vec<u32> {
    let n = batch.height * batch.width;
    let mut prev = Vec::with_capacity(batch.len() * n);
    for g in batch.ids.chunks_exact(n) {
        prev.push(k);
        prev.extend_from_slice(&g[..n - 1]);
    }
    prev
}

impl GenericNet {
    /// Creates (or loads) the variables under `vb`.
    pub fn new(cfg: &GenericConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.body.d_model;
        Ok(Self {
            cfg: cfg.clone(),
            tok_emb: embedding(cfg.codebook_size + 1, d, vb.pp("tok_emb"))?,
            row_emb: embedding(cfg.max_side, d, vb.pp("row_emb"))?,
            col_emb: embedding(cfg.max_side, d, vb.pp("col_emb"))?,
            body: Body::new(&cfg.body, vb.clone())?,
            head: head(d, cfg.codebook_size, vb)?,
        })
    }

    /// Logits `(B, h*w, K)` for raster-order inputs `prev` (`(B, h*w)` u32: begin token `K`, then
    /// each grid shifted right by one).
    pub fn forward(&self, prev: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let dev = prev.device();
        let (rows, cols) = raster_positions(h, w, dev)?;
        let x = self
            .tok_emb
            .forward(prev)?
            .broadcast_add(&self.row_emb.forward(&rows)?)?
            .broadcast_add(&self.col_emb.forward(&cols)?)?;
        let mask = causal_mask(h * w, dev)?;
        self.head.forward(&self.body.forward(&x, Some(&mask))?)
    }

    /// Mean bits per token of `batch` (every position is a target).
    pub fn loss(&self, batch: &Batch, dev: &Device) -> Result<Tensor> {
        let (b, n) = (batch.len(), batch.height * batch.width);
        let k = self.cfg.codebook_size;
        let prev = Tensor::from_vec(shifted_inputs(batch, k as u32), (b, n), dev)?;
        let logits = self.forward(&prev, batch.height, batch.width)?;
        let targets = Tensor::from_vec(batch.ids.clone(), b * n, dev)?;
        let weight = Tensor::ones(b * n, candle_core::DType::F32, dev)?;
        masked_bits(&logits.reshape((b * n, k))?, &targets, &weight)
    }
}

//! The [`crate::entropy::text_cond`] model in candle, for training.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::blocks::{embedding, head, masked_bits, Body};
use super::generic::{raster_positions, shifted_inputs};
use super::Batch;
use crate::entropy::text_cond::{text_bucket, TextCondConfig};

/// The text-conditioned model; tensor names as in [`TextCondConfig::tensor_shapes`].
#[derive(Debug, Clone)]
pub struct TextCondNet {
    cfg: TextCondConfig,
    tok_emb: Embedding,
    text_emb: Embedding,
    text_pos: Embedding,
    row_emb: Embedding,
    col_emb: Embedding,
    body: Body,
    head: Linear,
}

impl TextCondNet {
    /// Creates (or loads) the variables under `vb`.
    pub fn new(cfg: &TextCondConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.body.d_model;
        Ok(Self {
            cfg: cfg.clone(),
            tok_emb: embedding(cfg.codebook_size + 1, d, vb.pp("tok_emb"))?,
            text_emb: embedding(cfg.text_vocab, d, vb.pp("text_emb"))?,
            text_pos: embedding(cfg.max_text.max(1), d, vb.pp("text_pos"))?,
            row_emb: embedding(cfg.max_side, d, vb.pp("row_emb"))?,
            col_emb: embedding(cfg.max_side, d, vb.pp("col_emb"))?,
            body: Body::new(&cfg.body, vb.clone())?,
            head: head(d, cfg.codebook_size, vb)?,
        })
    }

    /// Logits `(B, h*w, K)` of the image positions. `texts` are the prompts' o200k ids (each cut
    /// to `max_text`); shorter prompts are left-padded, and padding is masked out of attention,
    /// so every example computes exactly what the unpadded sequence would.
    pub fn forward(&self, texts: &[Vec<u32>], prev: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let dev = prev.device();
        let b = texts.len();
        let n = h * w;
        let lt = texts
            .iter()
            .map(|t| t.len().min(self.cfg.max_text))
            .max()
            .unwrap_or(0);
        let (rows, cols) = raster_positions(h, w, dev)?;
        let img = self
            .tok_emb
            .forward(prev)?
            .broadcast_add(&self.row_emb.forward(&rows)?)?
            .broadcast_add(&self.col_emb.forward(&cols)?)?;
        let total = lt + n;
        let mut mask = vec![0f32; b * total * total];
        let x = if lt == 0 {
            img
        } else {
            let mut bucket = Vec::with_capacity(b * lt);
            let mut pos = Vec::with_capacity(b * lt);
            for (e, t) in texts.iter().enumerate() {
                let t = &t[..t.len().min(self.cfg.max_text)];
                let pad = lt - t.len();
                for i in 0..lt {
                    if i < pad {
                        bucket.push(0u32);
                        pos.push(0u32);
                    } else {
                        bucket.push(text_bucket(t[i - pad], self.cfg.text_vocab) as u32);
                        pos.push((i - pad) as u32);
                    }
                }
                // Key j is hidden from query q if it is padding (except from itself) or later.
                for q in 0..total {
                    for j in 0..total {
                        let hide = j > q || (j < pad && j != q);
                        if hide {
                            mask[(e * total + q) * total + j] = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            let bucket = Tensor::from_vec(bucket, (b, lt), dev)?;
            let pos = Tensor::from_vec(pos, (b, lt), dev)?;
            let txt = (self.text_emb.forward(&bucket)? + self.text_pos.forward(&pos)?)?;
            Tensor::cat(&[&txt, &img], 1)?
        };
        if lt == 0 {
            for q in 0..total {
                for j in q + 1..total {
                    for e in 0..b {
                        mask[(e * total + q) * total + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, total, total), dev)?;
        let hidden = self.body.forward(&x, Some(&mask))?.narrow(1, lt, n)?;
        self.head.forward(&hidden)
    }

    /// Mean bits per image token of `batch` given its texts.
    pub fn loss(&self, batch: &Batch, dev: &Device) -> Result<Tensor> {
        let (b, n) = (batch.len(), batch.height * batch.width);
        let k = self.cfg.codebook_size;
        let prev = Tensor::from_vec(shifted_inputs(batch, k as u32), (b, n), dev)?;
        let logits = self.forward(&batch.texts, &prev, batch.height, batch.width)?;
        let targets = Tensor::from_vec(batch.ids.clone(), b * n, dev)?;
        let weight = Tensor::ones(b * n, DType::F32, dev)?;
        masked_bits(&logits.reshape((b * n, k))?, &targets, &weight)
    }
}

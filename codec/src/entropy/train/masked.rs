//! The [`crate::entropy::masked`] model in candle, for training, and the random known/unknown
//! splits it is trained on.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use rand::Rng;

use super::blocks::{embedding, head, masked_bits, Body};
use super::generic::raster_positions;
use super::Batch;
use crate::entropy::masked::{schedule, MaskedConfig};

/// The masked (bidirectional) model; tensor names as in [`MaskedConfig::tensor_shapes`].
#[derive(Debug, Clone)]
pub struct MaskedNet {
    cfg: MaskedConfig,
    tok_emb: Embedding,
    row_emb: Embedding,
    col_emb: Embedding,
    body: Body,
    head: Linear,
}

/// A random unknown region of an `h × w` grid, as the coder meets them: the whole grid (25%), a
/// centred-ish inpainting rectangle (30%), an outpainting border around a known rectangle (20%),
/// or independent positions at a random rate (25%).
pub fn random_unknown<R: Rng>(h: usize, w: usize, rng: &mut R) -> Vec<bool> {
    let n = h * w;
    let rect = |rng: &mut R| {
        let rh = rng.gen_range(1..=h);
        let rw = rng.gen_range(1..=w);
        let r0 = rng.gen_range(0..=h - rh);
        let c0 = rng.gen_range(0..=w - rw);
        (r0, c0, rh, rw)
    };
    let inside = |i: usize, (r0, c0, rh, rw): (usize, usize, usize, usize)| {
        let (r, c) = (i / w, i % w);
        r >= r0 && r < r0 + rh && c >= c0 && c < c0 + rw
    };
    let u: f64 = rng.gen();
    let mut m: Vec<bool> = if u < 0.25 {
        vec![true; n]
    } else if u < 0.55 {
        let r = rect(rng);
        (0..n).map(|i| inside(i, r)).collect()
    } else if u < 0.75 {
        let r = rect(rng);
        (0..n).map(|i| !inside(i, r)).collect()
    } else {
        let p: f64 = rng.gen_range(0.05..1.0);
        (0..n).map(|_| rng.gen_bool(p)).collect()
    };
    if !m.iter().any(|&x| x) {
        let i = rng.gen_range(0..n);
        m[i] = true;
    }
    m
}

/// For one grid: the model input ids (mask token `k` where unknown) and the loss weights (1 at
/// positions still unknown), after revealing the first `s` schedule groups for a random `s`.
pub fn masked_example<R: Rng>(
    ids: &[u32],
    h: usize,
    w: usize,
    k: u32,
    steps: usize,
    rng: &mut R,
) -> (Vec<u32>, Vec<f32>) {
    let unknown = random_unknown(h, w, rng);
    let groups = schedule(w, &unknown, steps);
    let s = rng.gen_range(0..groups.len().max(1));
    let mut hidden = unknown;
    for g in &groups[..s] {
        for &i in g {
            hidden[i] = false;
        }
    }
    let input = ids
        .iter()
        .zip(&hidden)
        .map(|(&id, &hd)| if hd { k } else { id })
        .collect();
    let weight = hidden.iter().map(|&hd| f32::from(u8::from(hd))).collect();
    (input, weight)
}

impl MaskedNet {
    /// Creates (or loads) the variables under `vb`.
    pub fn new(cfg: &MaskedConfig, vb: VarBuilder) -> Result<Self> {
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

    /// Logits `(B, h*w, K)` for inputs `(B, h*w)` u32 (mask token `K` where unknown).
    pub fn forward(&self, input: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (rows, cols) = raster_positions(h, w, input.device())?;
        let x = self
            .tok_emb
            .forward(input)?
            .broadcast_add(&self.row_emb.forward(&rows)?)?
            .broadcast_add(&self.col_emb.forward(&cols)?)?;
        self.head.forward(&self.body.forward(&x, None)?)
    }

    /// Mean bits per unknown token over random splits of `batch` drawn from `rng`.
    pub fn loss<R: Rng>(&self, batch: &Batch, dev: &Device, rng: &mut R) -> Result<Tensor> {
        let (b, h, w) = (batch.len(), batch.height, batch.width);
        let n = h * w;
        let k = self.cfg.codebook_size;
        let mut input = Vec::with_capacity(b * n);
        let mut weight = Vec::with_capacity(b * n);
        for g in batch.ids.chunks_exact(n) {
            let (i, wt) = masked_example(g, h, w, k as u32, self.cfg.steps, rng);
            input.extend(i);
            weight.extend(wt);
        }
        let input = Tensor::from_vec(input, (b, n), dev)?;
        let logits = self.forward(&input, h, w)?.reshape((b * n, k))?;
        let targets = Tensor::from_vec(batch.ids.clone(), b * n, dev)?;
        let weight = Tensor::from_vec(weight, b * n, dev)?.to_dtype(DType::F32)?;
        masked_bits(&logits, &targets, &weight)
    }
}

//! The [`crate::entropy::masked`] model in candle, for training, and the random known/unknown
//! splits it is trained on.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use rand::Rng;

use super::blocks::{embedding, head, masked_bits, Body};
use super::Batch;
use crate::entropy::masked::{sequence_order, MaskedConfig, KNOWN_PREFIX};

/// The masked (known-prefix) model; tensor names as in [`MaskedConfig::tensor_shapes`].
#[derive(Debug, Clone)]
pub struct MaskedNet {
    cfg: MaskedConfig,
    tok_emb: Embedding,
    row_emb: Embedding,
    col_emb: Embedding,
    known_row_emb: Embedding,
    known_col_emb: Embedding,
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

/// One grid laid out as the masked model's sequence (known cells, then unknown cells; see
/// [`crate::entropy::masked`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedSequence {
    /// Input token of each row: the cell's token for a known row; the previous unknown cell's
    /// token (`K` for the first) for an unknown row.
    pub input: Vec<u32>,
    /// Position-table index of each row: `r` (unknown rows) or `max_side + r` (known rows).
    pub rows: Vec<u32>,
    /// Like `rows`, for the column.
    pub cols: Vec<u32>,
    /// The token each row predicts (its own cell's token; unused for known rows).
    pub targets: Vec<u32>,
    /// 1 for the unknown rows (the ones coded), 0 for the known ones.
    pub weight: Vec<f32>,
    /// Number of known rows (they come first).
    pub known: usize,
}

/// Lays out the grid `ids` (`h × w`, codebook `k`) with `unknown` cells as the masked model's
/// sequence, for a model with position tables of `max_side` rows.
pub fn masked_sequence(
    ids: &[u32],
    w: usize,
    k: u32,
    max_side: usize,
    unknown: &[bool],
) -> MaskedSequence {
    let (order, known) = sequence_order(unknown);
    let n = order.len();
    let w = w.max(1);
    let mut s = MaskedSequence {
        input: Vec::with_capacity(n),
        rows: Vec::with_capacity(n),
        cols: Vec::with_capacity(n),
        targets: Vec::with_capacity(n),
        weight: Vec::with_capacity(n),
        known,
    };
    let mut prev = k;
    for (j, &i) in order.iter().enumerate() {
        let (r, c) = ((i / w) as u32, (i % w) as u32);
        if j < known {
            let off = max_side as u32;
            s.input.push(ids[i]);
            s.rows.push(off + r);
            s.cols.push(off + c);
            s.weight.push(0.0);
        } else {
            s.input.push(prev);
            s.rows.push(r);
            s.cols.push(c);
            s.weight.push(1.0);
            prev = ids[i];
        }
        s.targets.push(ids[i]);
    }
    s
}

/// Additive attention masks `(B, 1, n, n)`: row `i` sees row `j` when `j <= i` or both are among
/// the first `known[b]` rows.
fn prefix_masks(known: &[usize], n: usize, dev: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(known.len() * n * n);
    for &m in known {
        for i in 0..n {
            for j in 0..n {
                let see = j <= i || (i < m && j < m);
                v.push(if see { 0.0f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    Tensor::from_vec(v, (known.len(), 1, n, n), dev)
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
            known_row_emb: embedding(cfg.max_side, d, vb.pp(format!("{KNOWN_PREFIX}row_emb")))?,
            known_col_emb: embedding(cfg.max_side, d, vb.pp(format!("{KNOWN_PREFIX}col_emb")))?,
            body: Body::new(&cfg.body, vb.clone())?,
            head: head(d, cfg.codebook_size, vb)?,
        })
    }

    /// Logits `(B, n, K)` for sequences of equal length `n` (row `i` predicts `targets[i]`).
    pub fn forward(&self, seqs: &[MaskedSequence], dev: &Device) -> Result<Tensor> {
        let b = seqs.len();
        let n = seqs.first().map_or(0, |s| s.input.len());
        let d = self.cfg.body.d_model;
        let cat = |a: &Embedding, k: &Embedding| -> Result<Embedding> {
            Ok(Embedding::new(
                Tensor::cat(&[a.embeddings(), k.embeddings()], 0)?,
                d,
            ))
        };
        let rows_tab = cat(&self.row_emb, &self.known_row_emb)?;
        let cols_tab = cat(&self.col_emb, &self.known_col_emb)?;
        let gather = |f: &dyn Fn(&MaskedSequence) -> &Vec<u32>| -> Result<Tensor> {
            let v: Vec<u32> = seqs.iter().flat_map(|s| f(s).iter().copied()).collect();
            Tensor::from_vec(v, (b, n), dev)
        };
        let input = gather(&|s| &s.input)?;
        let rows = gather(&|s| &s.rows)?;
        let cols = gather(&|s| &s.cols)?;
        let x = self
            .tok_emb
            .forward(&input)?
            .add(&rows_tab.forward(&rows)?)?
            .add(&cols_tab.forward(&cols)?)?;
        let known: Vec<usize> = seqs.iter().map(|s| s.known).collect();
        let mask = prefix_masks(&known, n, dev)?;
        self.head.forward(&self.body.forward(&x, Some(&mask))?)
    }

    /// Mean bits per unknown token over random splits of `batch` drawn from `rng`.
    pub fn loss<R: Rng>(&self, batch: &Batch, dev: &Device, rng: &mut R) -> Result<Tensor> {
        let (b, h, w) = (batch.len(), batch.height, batch.width);
        let n = h * w;
        let k = self.cfg.codebook_size;
        let seqs: Vec<MaskedSequence> = batch
            .ids
            .chunks_exact(n)
            .map(|g| {
                let unknown = random_unknown(h, w, rng);
                masked_sequence(g, w, k as u32, self.cfg.max_side, &unknown)
            })
            .collect();
        let logits = self.forward(&seqs, dev)?.reshape((b * n, k))?;
        let targets: Vec<u32> = seqs.iter().flat_map(|s| s.targets.clone()).collect();
        let weight: Vec<f32> = seqs.iter().flat_map(|s| s.weight.clone()).collect();
        let targets = Tensor::from_vec(targets, b * n, dev)?;
        let weight = Tensor::from_vec(weight, b * n, dev)?.to_dtype(DType::F32)?;
        masked_bits(&logits, &targets, &weight)
    }
}

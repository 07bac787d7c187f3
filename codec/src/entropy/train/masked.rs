//! The [`crate::entropy::masked`] model in candle, for training, and the random known/unknown
//! splits it is trained on.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use rand::Rng;

use super::blocks::{embedding, head, masked_bits, Body};
use super::Batch;
use crate::entropy::masked::{layout, MaskedConfig, KNOWN_PREFIX};

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

/// One grid laid out as the masked model's sequence (the prefix of known cells, then the raster
/// part; see [`crate::entropy::masked`]). For training, the raster part always covers the whole
/// grid (rows after the last unknown cell carry no loss).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedSequence {
    /// Input token of each row: the cell's token for a prefix row; the previous cell's token
    /// (`K` for cell 0) for a raster row.
    pub input: Vec<u32>,
    /// Position-table index of each row: `r` (raster rows) or `max_side + r` (prefix rows).
    pub rows: Vec<u32>,
    /// Like `rows`, for the column.
    pub cols: Vec<u32>,
    /// The token each row predicts (its own cell's token; unused for prefix rows).
    pub targets: Vec<u32>,
    /// 1 for the raster rows of unknown cells (the ones coded), 0 otherwise.
    pub weight: Vec<f32>,
    /// Number of prefix rows (they come first).
    pub prefix: usize,
}

/// Lays out the grid `ids` (`w` columns, codebook `k`) with `unknown` cells as the masked model's
/// sequence, for a model with position tables of `max_side` rows.
pub fn masked_sequence(
    ids: &[u32],
    w: usize,
    k: u32,
    max_side: usize,
    unknown: &[bool],
) -> MaskedSequence {
    let (prefix, _) = layout(unknown);
    let n = ids.len();
    let w = w.max(1);
    let rows = prefix.len() + n;
    let mut s = MaskedSequence {
        input: Vec::with_capacity(rows),
        rows: Vec::with_capacity(rows),
        cols: Vec::with_capacity(rows),
        targets: Vec::with_capacity(rows),
        weight: Vec::with_capacity(rows),
        prefix: prefix.len(),
    };
    let off = max_side as u32;
    for &i in &prefix {
        s.input.push(ids[i]);
        s.rows.push(off + (i / w) as u32);
        s.cols.push(off + (i % w) as u32);
        s.targets.push(ids[i]);
        s.weight.push(0.0);
    }
    for t in 0..n {
        s.input.push(if t == 0 { k } else { ids[t - 1] });
        s.rows.push((t / w) as u32);
        s.cols.push((t % w) as u32);
        s.targets.push(ids[t]);
        s.weight.push(f32::from(u8::from(unknown[t])));
    }
    s
}

/// Additive attention masks `(B, 1, T, T)` for sequences of `prefix[b] + n` rows padded to `T`:
/// prefix rows see the prefix; raster row `i` sees every row up to itself; padding rows see only
/// themselves and nobody sees them.
fn prefix_masks(prefix: &[usize], n: usize, t: usize, dev: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(prefix.len() * t * t);
    for &p in prefix {
        let len = p + n;
        for i in 0..t {
            for j in 0..t {
                let see = if i >= len {
                    j == i
                } else if i < p {
                    j < p
                } else {
                    j <= i
                };
                v.push(if see { 0.0f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    Tensor::from_vec(v, (prefix.len(), 1, t, t), dev)
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

    /// Logits `(B, T, K)` for the sequences, each padded at the end to the longest, `T` rows
    /// (row `i` of sequence `b` predicts `seqs[b].targets[i]`).
    pub fn forward(&self, seqs: &[MaskedSequence], dev: &Device) -> Result<Tensor> {
        let b = seqs.len();
        let t = seqs.iter().map(|s| s.input.len()).max().unwrap_or(0);
        let d = self.cfg.body.d_model;
        let k = self.cfg.codebook_size as u32;
        let cat = |a: &Embedding, kn: &Embedding| -> Result<Embedding> {
            Ok(Embedding::new(
                Tensor::cat(&[a.embeddings(), kn.embeddings()], 0)?,
                d,
            ))
        };
        let rows_tab = cat(&self.row_emb, &self.known_row_emb)?;
        let cols_tab = cat(&self.col_emb, &self.known_col_emb)?;
        let gather = |f: &dyn Fn(&MaskedSequence) -> &Vec<u32>, pad: u32| -> Result<Tensor> {
            let mut v = Vec::with_capacity(b * t);
            for s in seqs {
                let x = f(s);
                v.extend_from_slice(x);
                v.extend(std::iter::repeat_n(pad, t - x.len()));
            }
            Tensor::from_vec(v, (b, t), dev)
        };
        let input = gather(&|s| &s.input, k)?;
        let rows = gather(&|s| &s.rows, 0)?;
        let cols = gather(&|s| &s.cols, 0)?;
        let x = self
            .tok_emb
            .forward(&input)?
            .add(&rows_tab.forward(&rows)?)?
            .add(&cols_tab.forward(&cols)?)?;
        let prefix: Vec<usize> = seqs.iter().map(|s| s.prefix).collect();
        let n = seqs.first().map_or(0, |s| s.input.len() - s.prefix);
        let mask = prefix_masks(&prefix, n, t, dev)?;
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
        let logits = self.forward(&seqs, dev)?;
        let t = logits.dim(1)?;
        let logits = logits.reshape((b * t, k))?;
        let (mut targets, mut weight) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for s in &seqs {
            targets.extend_from_slice(&s.targets);
            weight.extend_from_slice(&s.weight);
            targets.extend(std::iter::repeat_n(0, t - s.targets.len()));
            weight.extend(std::iter::repeat_n(0.0, t - s.weight.len()));
        }
        let targets = Tensor::from_vec(targets, b * t, dev)?;
        let weight = Tensor::from_vec(weight, b * t, dev)?.to_dtype(DType::F32)?;
        masked_bits(&logits, &targets, &weight)
    }
}

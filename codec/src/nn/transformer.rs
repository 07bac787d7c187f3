//! The deterministic pre-norm transformer body shared by the three entropy models, and its
//! explicit [`KvCache`].
//!
//! Block `i` (names as in the safetensors checkpoint, `blocks.{i}.…`):
//!
//! ```text
//! a = rms_norm(x, norm1)                       q|k|v = attn.qkv(a)        (one Linear, 3d outputs)
//! per head h:  s_j = dot(q_h, k_hj) * (1/sqrt(d_head))   for the visible keys j, in order
//!              p = softmax(s)                  o_h = Σ_j p_j v_hj         (sequential over j)
//! x = x + attn.out(o)
//! x = x + mlp.fc2(silu(mlp.fc1(rms_norm(x, norm2))))
//! ```
//!
//! and after the last block `rms_norm(x, norm_f)`. Every product, sum and reduction follows
//! [`super::kernels`] and [`super::math`]; each row (position) is computed by exactly the same
//! sequence of operations whether it is run alone with a cache of earlier keys ("incremental") or
//! inside a batch of rows ("full recompute"), so both give the same bits.

use serde::{Deserialize, Serialize};

use super::kernels::{dot_with, linear_rows, Kernel};
use super::math::{rms_norm, silu, softmax_in_place};
use super::weights::Weights;
use super::NnError;

/// Shape of a transformer body (mirrors the `body` fields of a model manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyConfig {
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of blocks.
    pub n_layers: usize,
    /// Attention heads; must divide `d_model`.
    pub n_heads: usize,
    /// Hidden width of the MLP.
    pub d_ff: usize,
}

impl BodyConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Checks that the shape is usable (non-zero sizes, heads divide the width, bounded sizes).
    pub fn validate(&self) -> Result<(), NnError> {
        let ok = self.d_model > 0
            && self.n_layers > 0
            && self.n_heads > 0
            && self.d_ff > 0
            && self.d_model % self.n_heads == 0
            && self.d_model <= 4096
            && self.d_ff <= 16384
            && self.n_layers <= 64;
        if ok {
            Ok(())
        } else {
            Err(NnError::Config(format!(
                "invalid transformer body {self:?}"
            )))
        }
    }

    /// Names and shapes of the body's tensors.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f) = (self.d_model, self.d_ff);
        let mut v = Vec::new();
        for i in 0..self.n_layers {
            let p = format!("blocks.{i}");
            v.push((format!("{p}.norm1.weight"), vec![d]));
            v.push((format!("{p}.attn.qkv.weight"), vec![3 * d, d]));
            v.push((format!("{p}.attn.qkv.bias"), vec![3 * d]));
            v.push((format!("{p}.attn.out.weight"), vec![d, d]));
            v.push((format!("{p}.attn.out.bias"), vec![d]));
            v.push((format!("{p}.norm2.weight"), vec![d]));
            v.push((format!("{p}.mlp.fc1.weight"), vec![f, d]));
            v.push((format!("{p}.mlp.fc1.bias"), vec![f]));
            v.push((format!("{p}.mlp.fc2.weight"), vec![d, f]));
            v.push((format!("{p}.mlp.fc2.bias"), vec![d]));
        }
        v.push(("norm_f.weight".to_string(), vec![d]));
        v
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: Vec<f32>,
    qkv_w: Vec<f32>,
    qkv_b: Vec<f32>,
    out_w: Vec<f32>,
    out_b: Vec<f32>,
    norm2: Vec<f32>,
    fc1_w: Vec<f32>,
    fc1_b: Vec<f32>,
    fc2_w: Vec<f32>,
    fc2_b: Vec<f32>,
}

/// Keys and values of every position seen so far, per layer: the state of incremental decoding,
/// owned by the caller and passed as `&mut`.
#[derive(Debug, Clone)]
pub struct KvCache {
    d: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a body of this shape.
    pub fn new(cfg: &BodyConfig) -> Self {
        Self {
            d: cfg.d_model,
            k: vec![Vec::new(); cfg.n_layers],
            v: vec![Vec::new(); cfg.n_layers],
            len: 0,
        }
    }

    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keeps only the first `len` positions (a no-op if it holds fewer).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        for (k, v) in self.k.iter_mut().zip(self.v.iter_mut()) {
            k.truncate(len * self.d);
            v.truncate(len * self.d);
        }
        self.len = len;
    }
}

/// Which keys a row may attend to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mask {
    /// Row `t` of a call sits at position `cache.len() + t` and sees every position up to and
    /// including its own.
    Causal,
    /// Every row sees every position (cached ones and all rows of the call).
    Full,
}

/// The deterministic transformer body.
#[derive(Debug, Clone)]
pub struct Body {
    cfg: BodyConfig,
    blocks: Vec<Block>,
    norm_f: Vec<f32>,
}

impl Body {
    /// Takes the body's tensors out of `w` (see [`BodyConfig::tensor_shapes`]).
    pub fn from_weights(cfg: &BodyConfig, w: &mut Weights) -> Result<Self, NnError> {
        cfg.validate()?;
        let (d, f) = (cfg.d_model, cfg.d_ff);
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("blocks.{i}");
            blocks.push(Block {
                norm1: w.take(&format!("{p}.norm1.weight"), &[d])?,
                qkv_w: w.take(&format!("{p}.attn.qkv.weight"), &[3 * d, d])?,
                qkv_b: w.take(&format!("{p}.attn.qkv.bias"), &[3 * d])?,
                out_w: w.take(&format!("{p}.attn.out.weight"), &[d, d])?,
                out_b: w.take(&format!("{p}.attn.out.bias"), &[d])?,
                norm2: w.take(&format!("{p}.norm2.weight"), &[d])?,
                fc1_w: w.take(&format!("{p}.mlp.fc1.weight"), &[f, d])?,
                fc1_b: w.take(&format!("{p}.mlp.fc1.bias"), &[f])?,
                fc2_w: w.take(&format!("{p}.mlp.fc2.weight"), &[d, f])?,
                fc2_b: w.take(&format!("{p}.mlp.fc2.bias"), &[d])?,
            });
        }
        let norm_f = w.take("norm_f.weight", &[d])?;
        Ok(Self {
            cfg: cfg.clone(),
            blocks,
            norm_f,
        })
    }

    /// The body's shape.
    pub fn config(&self) -> &BodyConfig {
        &self.cfg
    }

    /// Runs `xs` (`rows × d_model`, row-major input embeddings) through every block, appending the
    /// rows' keys and values to `cache`, and replaces `xs` by the final normalised hidden states.
    pub fn forward(&self, kernel: Kernel, xs: &mut [f32], cache: &mut KvCache, mask: Mask) {
        let d = self.cfg.d_model;
        let f = self.cfg.d_ff;
        let rows = xs.len() / d;
        if rows == 0 {
            return;
        }
        let base = cache.len;
        let total = base + rows;
        let nh = self.cfg.n_heads;
        let hd = self.cfg.head_dim();
        let scale = 1.0 / (hd as f32).sqrt();
        let mut a = vec![0.0f32; rows * d];
        let mut qkv = vec![0.0f32; rows * 3 * d];
        let mut o = vec![0.0f32; rows * d];
        let mut proj = vec![0.0f32; rows * d];
        let mut hidden = vec![0.0f32; rows * f];
        let mut scores = vec![0.0f32; total];
        for (li, b) in self.blocks.iter().enumerate() {
            for r in 0..rows {
                rms_norm(
                    &xs[r * d..(r + 1) * d],
                    &b.norm1,
                    &mut a[r * d..(r + 1) * d],
                );
            }
            linear_rows(
                kernel,
                &a,
                rows,
                d,
                &b.qkv_w,
                Some(&b.qkv_b),
                3 * d,
                &mut qkv,
            );
            let kc = &mut cache.k[li];
            let vc = &mut cache.v[li];
            kc.truncate(base * d);
            vc.truncate(base * d);
            for r in 0..rows {
                let row = &qkv[r * 3 * d..(r + 1) * 3 * d];
                kc.extend_from_slice(&row[d..2 * d]);
                vc.extend_from_slice(&row[2 * d..3 * d]);
            }
            for r in 0..rows {
                let visible = match mask {
                    Mask::Causal => base + r + 1,
                    Mask::Full => total,
                };
                let q = &qkv[r * 3 * d..r * 3 * d + d];
                let out = &mut o[r * d..(r + 1) * d];
                for h in 0..nh {
                    let qh = &q[h * hd..(h + 1) * hd];
                    let s = &mut scores[..visible];
                    for (j, sj) in s.iter_mut().enumerate() {
                        let kj = &kc[j * d + h * hd..j * d + (h + 1) * hd];
                        *sj = dot_with(kernel, qh, kj) * scale;
                    }
                    softmax_in_place(s);
                    let oh = &mut out[h * hd..(h + 1) * hd];
                    oh.fill(0.0);
                    for (j, &p) in s.iter().enumerate() {
                        let vj = &vc[j * d + h * hd..j * d + (h + 1) * hd];
                        for (oe, &ve) in oh.iter_mut().zip(vj) {
                            *oe += p * ve;
                        }
                    }
                }
            }
            linear_rows(kernel, &o, rows, d, &b.out_w, Some(&b.out_b), d, &mut proj);
            for (x, p) in xs.iter_mut().zip(&proj) {
                *x += *p;
            }
            for r in 0..rows {
                rms_norm(
                    &xs[r * d..(r + 1) * d],
                    &b.norm2,
                    &mut a[r * d..(r + 1) * d],
                );
            }
            linear_rows(
                kernel,
                &a,
                rows,
                d,
                &b.fc1_w,
                Some(&b.fc1_b),
                f,
                &mut hidden,
            );
            for v in hidden.iter_mut() {
                *v = silu(*v);
            }
            linear_rows(
                kernel,
                &hidden,
                rows,
                f,
                &b.fc2_w,
                Some(&b.fc2_b),
                d,
                &mut proj,
            );
            for (x, p) in xs.iter_mut().zip(&proj) {
                *x += *p;
            }
        }
        cache.len = total;
        for r in 0..rows {
            let x = xs[r * d..(r + 1) * d].to_vec();
            rms_norm(&x, &self.norm_f, &mut xs[r * d..(r + 1) * d]);
        }
    }
}

//! candle building blocks of the entropy models, mirroring [`crate::nn::transformer`] tensor for
//! tensor and formula for formula (so a trained checkpoint loads into the deterministic path).

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};

use crate::nn::math::RMS_EPS;
use crate::nn::transformer::BodyConfig;

/// Standard deviation of the normal initialisation of embeddings and linear weights.
pub const INIT_STD: f64 = 0.02;

fn linear(d_in: usize, d_out: usize, vb: VarBuilder, out_scale: f64) -> Result<Linear> {
    let w = vb.get_with_hints(
        (d_out, d_in),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: INIT_STD * out_scale,
        },
    )?;
    let b = vb.get_with_hints(d_out, "bias", Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

/// An embedding table `name.weight` of shape `(rows, d)`, normal(0, 0.02) initialised.
pub fn embedding(rows: usize, d: usize, vb: VarBuilder) -> Result<candle_nn::Embedding> {
    let w = vb.get_with_hints(
        (rows, d),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: INIT_STD,
        },
    )?;
    Ok(candle_nn::Embedding::new(w, d))
}

/// RMS norm with a learned scale (`weight`, ones initialised), differentiable.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    /// Loads or creates `weight` of size `d`.
    pub fn new(d: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(d, "weight", Init::Const(1.0))?,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm_slow(x, &self.weight, RMS_EPS)
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: RmsNorm,
    qkv: Linear,
    out: Linear,
    norm2: RmsNorm,
    fc1: Linear,
    fc2: Linear,
}

/// The transformer body (blocks and final norm), candle version.
#[derive(Debug, Clone)]
pub struct Body {
    cfg: BodyConfig,
    blocks: Vec<Block>,
    norm_f: RmsNorm,
}

impl Body {
    /// Builds the body under `vb` with the names of [`BodyConfig::tensor_shapes`].
    pub fn new(cfg: &BodyConfig, vb: VarBuilder) -> Result<Self> {
        let (d, f) = (cfg.d_model, cfg.d_ff);
        // GPT-2 style: residual output projections scaled by 1/sqrt(2 * layers).
        let res_scale = 1.0 / ((2 * cfg.n_layers) as f64).sqrt();
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let vb = vb.pp(format!("blocks.{i}"));
            blocks.push(Block {
                norm1: RmsNorm::new(d, vb.pp("norm1"))?,
                qkv: linear(d, 3 * d, vb.pp("attn").pp("qkv"), 1.0)?,
                out: linear(d, d, vb.pp("attn").pp("out"), res_scale)?,
                norm2: RmsNorm::new(d, vb.pp("norm2"))?,
                fc1: linear(d, f, vb.pp("mlp").pp("fc1"), 1.0)?,
                fc2: linear(f, d, vb.pp("mlp").pp("fc2"), res_scale)?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            blocks,
            norm_f: RmsNorm::new(d, vb.pp("norm_f"))?,
        })
    }

    /// `x`: `(B, T, d)`; `mask`: additive attention mask broadcastable to `(B, heads, T, T)`
    /// (`-inf` where a query must not see a key), or `None` for full attention.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let nh = self.cfg.n_heads;
        let hd = self.cfg.head_dim();
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = x.clone();
        for blk in &self.blocks {
            let a = blk.norm1.forward(&x)?;
            let qkv = blk.qkv.forward(&a)?;
            let split = |i: usize| -> Result<Tensor> {
                qkv.narrow(2, i * d, d)?
                    .reshape((b, t, nh, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let mut s = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
            if let Some(m) = mask {
                s = s.broadcast_add(m)?;
            }
            let p = candle_nn::ops::softmax(&s, D::Minus1)?;
            let o = p
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, t, d))?;
            x = (x + blk.out.forward(&o)?)?;
            let h = blk.fc1.forward(&blk.norm2.forward(&x)?)?.silu()?;
            x = (x + blk.fc2.forward(&h)?)?;
        }
        self.norm_f.forward(&x)
    }
}

/// The output head `head.weight` `(K, d)`, `head.bias` `(K)`.
pub fn head(d: usize, k: usize, vb: VarBuilder) -> Result<Linear> {
    linear(d, k, vb.pp("head"), 1.0)
}

/// Additive causal mask `(T, T)`: 0 on and below the diagonal, `-inf` above.
pub fn causal_mask(t: usize, dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(v, (t, t), dev)
}

/// Mean cross-entropy in **bits** over the positions where `weight` is 1.
/// `logits`: `(N, K)`, `targets`: `(N)` u32, `weight`: `(N)` f32 of zeros and ones.
pub fn masked_bits(logits: &Tensor, targets: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let lsm = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = lsm.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let n = weight.sum_all()?.to_dtype(DType::F32)?;
    let total = (picked * weight)?.sum_all()?;
    let nats = (total.neg()? / n.maximum(1.0)?)?;
    nats / std::f64::consts::LN_2
}

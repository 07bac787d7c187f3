//! The LlamaGen VQ image tokenizer in candle ([`VqModel`]).
//!
//! Architecture of Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image
//! Generation" (LlamaGen, 2024), `tokenizer/tokenizer_image/vq_model.py`, itself the VQGAN
//! encoder/decoder of Esser et al. (2021): a convolutional encoder of ResNet blocks with GroupNorm
//! and swish, stride-2 downsamples, self-attention at the lowest resolution; a 1×1 `quant_conv` to
//! a small latent; an l2-normalised nearest-neighbour codebook; a 1×1 `post_quant_conv` and a
//! mirrored decoder with nearest-neighbour upsampling.
//!
//! Parameter paths mirror the reference's `state_dict` (`encoder.conv_blocks.0.res.1.norm1.weight`,
//! `quantize.embedding.weight`, …), so a checkpoint saved by the reference and converted to
//! safetensors loads unchanged, and the files this crate writes load into the reference.
//!
//! Two convolution paths compute the same function: [`ConvPath::Direct`] calls candle's
//! `conv2d` (used for inference), [`ConvPath::Im2col`] unfolds patches with tensor ops and
//! multiplies, which makes the backward pass a matrix product rather than candle's slow CPU
//! transposed convolution (used for training).

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{GroupNorm, Module, VarBuilder};

use super::config::VqConfig;

const NORM_EPS: f64 = 1e-6;
const L2_EPS: f64 = 1e-12;

/// How convolutions are computed; both give the same result up to float rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvPath {
    /// candle's `conv2d` (fast forward, slow backward on CPU).
    #[default]
    Direct,
    /// Explicit patch unfolding plus a matrix product (fast backward).
    Im2col,
}

#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    k: usize,
}

impl Conv {
    fn new(cin: usize, cout: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((cout, cin, k, k), "weight", candle_nn::Init::Const(0.))?;
        let bias = vb.get_with_hints(cout, "bias", candle_nn::Init::Const(0.))?;
        Ok(Self { weight, bias, k })
    }

    /// Convolution with symmetric `padding` (k = 3 → 1, k = 1 → 0) and stride 1.
    fn forward(&self, x: &Tensor, path: ConvPath) -> Result<Tensor> {
        let pad = self.k / 2;
        match path {
            ConvPath::Direct => {
                let y = x.conv2d(&self.weight, pad, 1, 1, 1)?;
                y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
            }
            ConvPath::Im2col => {
                let xp = if pad > 0 {
                    x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?
                } else {
                    x.clone()
                };
                self.unfolded(&xp, 1)
            }
        }
    }

    /// LlamaGen's `Downsample`: zero-pad right and bottom by one, then stride-2 unpadded conv.
    fn forward_down(&self, x: &Tensor, path: ConvPath) -> Result<Tensor> {
        let xp = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
        match path {
            ConvPath::Direct => {
                let y = xp.conv2d(&self.weight, 0, 2, 1, 1)?;
                y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
            }
            ConvPath::Im2col => self.unfolded(&xp, 2),
        }
    }

    /// Valid (unpadded) convolution of an already padded input by unfolding.
    fn unfolded(&self, xp: &Tensor, stride: usize) -> Result<Tensor> {
        let (b, c, hp, wp) = xp.dims4()?;
        let k = self.k;
        let cout = self.weight.dim(0)?;
        let ho = (hp - k) / stride + 1;
        let wo = (wp - k) / stride + 1;
        let w2 = self.weight.reshape((cout, c * k * k))?;
        let cols = if k == 1 && stride == 1 {
            xp.reshape((b, c, hp * wp))?
        } else {
            // For stride 2, one extra zero row/column lets every offset take 2*n elements.
            let xq = if stride > 1 {
                xp.pad_with_zeros(2, 0, stride)?
                    .pad_with_zeros(3, 0, stride)?
            } else {
                xp.clone()
            };
            let mut patches = Vec::with_capacity(k * k);
            for ky in 0..k {
                let rows = take_strided(&xq, 2, ky, ho, stride)?;
                for kx in 0..k {
                    patches.push(take_strided(&rows, 3, kx, wo, stride)?);
                }
            }
            Tensor::stack(&patches, 2)?.reshape((b, c * k * k, ho * wo))?
        };
        let y = w2.broadcast_matmul(&cols)?;
        y.broadcast_add(&self.bias.reshape((1, cout, 1))?)?
            .reshape((b, cout, ho, wo))
    }
}

/// `n` elements of dimension `dim` (2 or 3 of a 4-D tensor) starting at `start`, every `stride`.
fn take_strided(x: &Tensor, dim: usize, start: usize, n: usize, stride: usize) -> Result<Tensor> {
    if stride == 1 {
        return x.narrow(dim, start, n);
    }
    let t = x.narrow(dim, start, n * stride)?;
    let (b, c, h, w) = t.dims4()?;
    if dim == 2 {
        t.reshape((b, c, n, stride, w))?
            .narrow(3, 0, 1)?
            .reshape((b, c, n, w))
    } else {
        t.reshape((b, c, h, n, stride))?
            .narrow(4, 0, 1)?
            .reshape((b, c, h, n))
    }
}

fn norm(groups: usize, ch: usize, vb: VarBuilder) -> Result<GroupNorm> {
    candle_nn::group_norm(groups, ch, NORM_EPS, vb)
}

fn swish(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    nin_shortcut: Option<Conv>,
}

impl ResnetBlock {
    fn new(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: norm(groups, cin, vb.pp("norm1"))?,
            conv1: Conv::new(cin, cout, 3, vb.pp("conv1"))?,
            norm2: norm(groups, cout, vb.pp("norm2"))?,
            conv2: Conv::new(cout, cout, 3, vb.pp("conv2"))?,
            nin_shortcut: if cin != cout {
                Some(Conv::new(cin, cout, 1, vb.pp("nin_shortcut"))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, path: ConvPath) -> Result<Tensor> {
        let h = self.conv1.forward(&swish(&self.norm1.forward(x)?)?, path)?;
        let h = self
            .conv2
            .forward(&swish(&self.norm2.forward(&h)?)?, path)?;
        let skip = match &self.nin_shortcut {
            Some(c) => c.forward(x, path)?,
            None => x.clone(),
        };
        skip + h
    }
}

#[derive(Debug, Clone)]
struct AttnBlock {
    norm: GroupNorm,
    q: Conv,
    k: Conv,
    v: Conv,
    proj_out: Conv,
}

impl AttnBlock {
    fn new(ch: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: norm(groups, ch, vb.pp("norm"))?,
            q: Conv::new(ch, ch, 1, vb.pp("q"))?,
            k: Conv::new(ch, ch, 1, vb.pp("k"))?,
            v: Conv::new(ch, ch, 1, vb.pp("v"))?,
            proj_out: Conv::new(ch, ch, 1, vb.pp("proj_out"))?,
        })
    }

    fn forward(&self, x: &Tensor, path: ConvPath) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hn = self.norm.forward(x)?;
        let q = self.q.forward(&hn, path)?.reshape((b, c, h * w))?;
        let k = self.k.forward(&hn, path)?.reshape((b, c, h * w))?;
        let v = self.v.forward(&hn, path)?.reshape((b, c, h * w))?;
        // scores[b, i, j] = <q_i, k_j> / sqrt(c); softmax over keys j.
        let scores = (q.transpose(1, 2)?.contiguous()?.matmul(&k)? * (c as f64).powf(-0.5))?;
        let attn = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = v.matmul(&attn.transpose(1, 2)?.contiguous()?)?;
        let out = self.proj_out.forward(&out.reshape((b, c, h, w))?, path)?;
        x + out
    }
}

#[derive(Debug, Clone)]
struct Level {
    res: Vec<ResnetBlock>,
    attn: Vec<AttnBlock>,
    resample: Option<Conv>,
}

impl Level {
    fn forward_blocks(&self, mut h: Tensor, path: ConvPath) -> Result<Tensor> {
        for (i, r) in self.res.iter().enumerate() {
            h = r.forward(&h, path)?;
            if let Some(a) = self.attn.get(i) {
                h = a.forward(&h, path)?;
            }
        }
        Ok(h)
    }
}

#[derive(Debug, Clone)]
struct Mid {
    res0: ResnetBlock,
    attn: AttnBlock,
    res1: ResnetBlock,
}

impl Mid {
    fn new(ch: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            res0: ResnetBlock::new(ch, ch, groups, vb.pp("0"))?,
            attn: AttnBlock::new(ch, groups, vb.pp("1"))?,
            res1: ResnetBlock::new(ch, ch, groups, vb.pp("2"))?,
        })
    }

    fn forward(&self, x: &Tensor, path: ConvPath) -> Result<Tensor> {
        let h = self.res0.forward(x, path)?;
        let h = self.attn.forward(&h, path)?;
        self.res1.forward(&h, path)
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv,
    levels: Vec<Level>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Encoder {
    fn new(cfg: &VqConfig, vb: VarBuilder) -> Result<Self> {
        let g = cfg.norm_groups;
        let mult = &cfg.encoder_ch_mult;
        let n = mult.len();
        let conv_in = Conv::new(3, cfg.ch, 3, vb.pp("conv_in"))?;
        let mut levels = Vec::with_capacity(n);
        let mut block_in = cfg.ch;
        for (i, &m) in mult.iter().enumerate() {
            let vbl = vb.pp("conv_blocks").pp(i);
            let block_out = cfg.ch * m;
            let mut res = Vec::new();
            let mut attn = Vec::new();
            for j in 0..cfg.num_res_blocks {
                res.push(ResnetBlock::new(
                    block_in,
                    block_out,
                    g,
                    vbl.pp("res").pp(j),
                )?);
                block_in = block_out;
                if i == n - 1 {
                    attn.push(AttnBlock::new(block_in, g, vbl.pp("attn").pp(j))?);
                }
            }
            let resample = if i != n - 1 {
                Some(Conv::new(
                    block_in,
                    block_in,
                    3,
                    vbl.pp("downsample").pp("conv"),
                )?)
            } else {
                None
            };
            levels.push(Level {
                res,
                attn,
                resample,
            });
        }
        Ok(Self {
            conv_in,
            levels,
            mid: Mid::new(block_in, g, vb.pp("mid"))?,
            norm_out: norm(g, block_in, vb.pp("norm_out"))?,
            conv_out: Conv::new(block_in, cfg.z_channels, 3, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor, path: ConvPath) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x, path)?;
        for l in &self.levels {
            h = l.forward_blocks(h, path)?;
            if let Some(d) = &l.resample {
                h = d.forward_down(&h, path)?;
            }
        }
        let h = self.mid.forward(&h, path)?;
        let h = swish(&self.norm_out.forward(&h)?)?;
        self.conv_out.forward(&h, path)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv,
    mid: Mid,
    levels: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Decoder {
    fn new(cfg: &VqConfig, vb: VarBuilder) -> Result<Self> {
        let g = cfg.norm_groups;
        let mult = &cfg.decoder_ch_mult;
        let n = mult.len();
        let mut block_in = cfg.ch * mult[n - 1];
        let conv_in = Conv::new(cfg.z_channels, block_in, 3, vb.pp("conv_in"))?;
        let mid = Mid::new(block_in, g, vb.pp("mid"))?;
        let mut levels = Vec::with_capacity(n);
        for i in 0..n {
            let vbl = vb.pp("conv_blocks").pp(i);
            let block_out = cfg.ch * mult[n - 1 - i];
            let mut res = Vec::new();
            let mut attn = Vec::new();
            for j in 0..cfg.num_res_blocks + 1 {
                res.push(ResnetBlock::new(
                    block_in,
                    block_out,
                    g,
                    vbl.pp("res").pp(j),
                )?);
                block_in = block_out;
                if i == 0 {
                    attn.push(AttnBlock::new(block_in, g, vbl.pp("attn").pp(j))?);
                }
            }
            let resample = if i != n - 1 {
                Some(Conv::new(
                    block_in,
                    block_in,
                    3,
                    vbl.pp("upsample").pp("conv"),
                )?)
            } else {
                None
            };
            levels.push(Level {
                res,
                attn,
                resample,
            });
        }
        Ok(Self {
            conv_in,
            mid,
            levels,
            norm_out: norm(g, block_in, vb.pp("norm_out"))?,
            conv_out: Conv::new(block_in, 3, 3, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor, path: ConvPath) -> Result<Tensor> {
        let h = self.conv_in.forward(z, path)?;
        let mut h = self.mid.forward(&h, path)?;
        for l in &self.levels {
            h = l.forward_blocks(h, path)?;
            if let Some(u) = &l.resample {
                let (_, _, hh, ww) = h.dims4()?;
                h = u.forward(&h.upsample_nearest2d(2 * hh, 2 * ww)?, path)?;
            }
        }
        let h = swish(&self.norm_out.forward(&h)?)?;
        self.conv_out.forward(&h, path)
    }
}

/// What one training forward pass returns.
#[derive(Debug)]
pub struct TrainOutput {
    /// Reconstruction, NCHW in about [-1, 1].
    pub recon: Tensor,
    /// Codebook loss `mean((e - sg[z_n])^2)`.
    pub codebook_loss: Tensor,
    /// Commitment loss `mean((sg[e] - z_n)^2)` (not yet multiplied by beta).
    pub commit_loss: Tensor,
    /// Chosen codes, u32 `[B, h, w]`.
    pub indices: Tensor,
    /// The normalised latents `[B*h*w, D]`, detached (for code restarts).
    pub latents: Tensor,
}

/// The LlamaGen VQ model: encoder, `quant_conv`, codebook, `post_quant_conv`, decoder.
#[derive(Debug, Clone)]
pub struct VqModel {
    cfg: VqConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv,
    post_quant_conv: Conv,
    embedding: Tensor,
}

impl VqModel {
    /// Builds the model, reading (or, with a `VarMap` builder, creating) every parameter under the
    /// reference's names.
    pub fn new(cfg: &VqConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        Ok(Self {
            cfg: cfg.clone(),
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            quant_conv: Conv::new(
                cfg.z_channels,
                cfg.codebook_embed_dim,
                1,
                vb.pp("quant_conv"),
            )?,
            post_quant_conv: Conv::new(
                cfg.codebook_embed_dim,
                cfg.z_channels,
                1,
                vb.pp("post_quant_conv"),
            )?,
            embedding: vb.pp("quantize").pp("embedding").get_with_hints(
                (cfg.codebook_size, cfg.codebook_embed_dim),
                "weight",
                candle_nn::Init::Const(0.),
            )?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VqConfig {
        &self.cfg
    }

    /// Encoder output (before `quant_conv`), `[B, z_channels, H/f, W/f]`, for input `[B, 3, H, W]`
    /// in [-1, 1] with `H`, `W` multiples of the factor.
    pub fn encoder_out(&self, x: &Tensor, path: ConvPath) -> Result<Tensor> {
        self.encoder.forward(x, path)
    }

    /// The continuous latent `quant_conv(encoder(x))`, `[B, D, h, w]` (not normalised).
    pub fn latent(&self, x: &Tensor, path: ConvPath) -> Result<Tensor> {
        let e = self.encoder.forward(x, path)?;
        self.quant_conv.forward(&e, path)
    }

    /// The codebook as used for search and lookup: rows l2-normalised when the config says so.
    pub fn codebook(&self) -> Result<Tensor> {
        if self.cfg.codebook_l2_norm {
            l2_normalize(&self.embedding)
        } else {
            Ok(self.embedding.clone())
        }
    }

    /// Rows of the latent `[B, D, h, w]` as `[B*h*w, D]`, normalised when the config says so.
    fn flat_latent(&self, latent: &Tensor) -> Result<Tensor> {
        let d = latent.dim(1)?;
        let z = latent.permute((0, 2, 3, 1))?.reshape(((), d))?;
        if self.cfg.codebook_l2_norm {
            l2_normalize(&z)
        } else {
            Ok(z)
        }
    }

    /// Nearest codes for `[N, D]` rows against codebook `[K, D]`: `argmin |z|^2 + |e|^2 - 2 z·e`.
    fn nearest(z: &Tensor, codebook: &Tensor) -> Result<Tensor> {
        let zz = z.sqr()?.sum_keepdim(1)?;
        let ee = codebook.sqr()?.sum(1)?.unsqueeze(0)?;
        let ze = z.matmul(&codebook.t()?)?;
        let d = zz.broadcast_add(&ee)?.broadcast_sub(&(ze * 2.0)?)?;
        d.argmin(1)
    }

    /// Code indices (u32 `[B, h, w]`) for a latent `[B, D, h, w]`.
    pub fn quantize(&self, latent: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = latent.dims4()?;
        let z = self.flat_latent(latent)?;
        Self::nearest(&z, &self.codebook()?)?.reshape((b, h, w))
    }

    /// Like [`Self::quantize`], but only the codes in `allowed` may be chosen (for studying
    /// smaller codebooks carved out of a trained one). `allowed` must be non-empty, in range and
    /// free of duplicates; the result holds indices of the full codebook.
    pub fn quantize_among(&self, latent: &Tensor, allowed: &[u32]) -> Result<Tensor> {
        let k = self.cfg.codebook_size;
        let mut seen = vec![false; k];
        for &a in allowed {
            let i = a as usize;
            if i >= k || std::mem::replace(&mut seen[i], true) {
                candle_core::bail!("allowed code {a} out of range or repeated (codebook {k})");
            }
        }
        if allowed.is_empty() {
            candle_core::bail!("no allowed codes");
        }
        let (b, _, h, w) = latent.dims4()?;
        let z = self.flat_latent(latent)?;
        let sel = Tensor::from_slice(allowed, allowed.len(), latent.device())?;
        let sub = self.codebook()?.index_select(&sel, 0)?;
        let local = Self::nearest(&z, &sub)?.to_vec1::<u32>()?;
        let ids: Vec<u32> = local.iter().map(|&j| allowed[j as usize]).collect();
        Tensor::from_vec(ids, (b, h, w), latent.device())
    }

    /// Codebook vectors at `indices` (integer `[B, h, w]`), as NCHW `[B, D, h, w]`.
    pub fn lookup(&self, indices: &Tensor) -> Result<Tensor> {
        let (b, h, w) = indices.dims3()?;
        let flat = indices.flatten_all()?.to_dtype(DType::U32)?;
        let e = self.codebook()?.index_select(&flat, 0)?;
        e.reshape((b, h, w, ()))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// `post_quant_conv(quant)`: the decoder's input.
    pub fn post_quant(&self, quant: &Tensor, path: ConvPath) -> Result<Tensor> {
        self.post_quant_conv.forward(quant, path)
    }

    /// Decodes codebook vectors `[B, D, h, w]` to an image `[B, 3, f*h, f*w]` (not clamped).
    pub fn decode_quant(&self, quant: &Tensor, path: ConvPath) -> Result<Tensor> {
        let p = self.post_quant_conv.forward(quant, path)?;
        self.decoder.forward(&p, path)
    }

    /// Decodes code indices `[B, h, w]` to an image `[B, 3, f*h, f*w]` (not clamped).
    pub fn decode_indices(&self, indices: &Tensor, path: ConvPath) -> Result<Tensor> {
        self.decode_quant(&self.lookup(indices)?, path)
    }

    /// Training pass: encode, quantise with the straight-through estimator, decode.
    pub fn forward_train(&self, x: &Tensor, path: ConvPath) -> Result<TrainOutput> {
        let latent = self.latent(x, path)?;
        let (b, d, h, w) = latent.dims4()?;
        let z = self.flat_latent(&latent)?;
        let codebook = self.codebook()?;
        let indices = Self::nearest(&z.detach(), &codebook.detach())?;
        let e = codebook.index_select(&indices, 0)?;
        let codebook_loss = (&e - z.detach())?.sqr()?.mean_all()?;
        let commit_loss = (e.detach() - &z)?.sqr()?.mean_all()?;
        let zq = (&z + (e - &z)?.detach())?;
        let quant = zq.reshape((b, h, w, d))?.permute((0, 3, 1, 2))?;
        let recon = self.decode_quant(&quant, path)?;
        Ok(TrainOutput {
            recon,
            codebook_loss,
            commit_loss,
            indices: indices.reshape((b, h, w))?,
            latents: z.detach(),
        })
    }
}

/// Rows divided by `max(l2 norm, 1e-12)` (PyTorch's `F.normalize(x, p=2, dim=-1)`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(L2_EPS)?;
    x.broadcast_div(&n)
}

/// Converts `[1, 3, H, W]` model output to interleaved RGB bytes with LlamaGen's rounding:
/// `clamp(127.5 * x + 128, 0, 255)` truncated.
pub fn to_rgb8(decoded: &Tensor) -> Result<(usize, usize, Vec<u8>)> {
    let (_, _, h, w) = decoded.dims4()?;
    let t = ((decoded.get(0)? * 127.5)? + 128.0)?
        .clamp(0f32, 255f32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((h, w, t.into_iter().map(|v| v as u8).collect()))
}

/// Converts interleaved RGB bytes to a model input `[1, 3, H, W]`: `u8 / 127.5 - 1`.
pub fn from_rgb8(h: usize, w: usize, rgb: &[u8], device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = rgb.iter().map(|&u| f32::from(u) / 127.5 - 1.0).collect();
    Tensor::from_vec(v, (h, w, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()
}

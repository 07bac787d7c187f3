//! The TAEF2 residual-VQ image tokenizer ([`Taef2Tokenizer`]): a pretrained tiny autoencoder with a
//! trained quantizer between its halves.
//!
//! Three networks run in a row on the CPU in f32 (weights read with candle's safetensors loader;
//! the forward passes run on plain buffers: 3×3 convolutions by Winograd F(4×4, 3×3) and strided
//! ones as per-tap GEMMs in the `conv` module, the other layers in `act`, whose per-call buffer
//! pool spares large images a fresh, page-faulting allocation at every layer):
//! 1. [`Taef2Encoder`]: the encoder of TAEF2 (Ollin Boer Bohan's tiny autoencoder distilled from the
//!    FLUX.2 VAE, MIT licence, `models/taef2/`), RGB in `[0, 1]` to 32-channel latents at 1/8 of
//!    the image size.
//! 2. [`Taef2Quantizer`]: `down` maps the latents to `dim`-dimensional vectors at 1/16 (one per
//!    16×16 pixel block), a residual vector quantizer with `levels` codebooks of `codes` entries
//!    turns each vector into one token per level, and `up` maps the summed codewords back to
//!    latents at 1/8.
//! 3. [`Taef2Decoder`]: the decoder of TAEF2, latents to RGB (not clamped by the network).
//!
//! `tools/taef2/taef2.py` is the PyTorch definition this file mirrors tensor for tensor (functions
//! `encoder()`, `decoder()`, classes `Block`, `Clamp`, `Res`, `Quantizer`); parameter names are
//! its `state_dict` keys (upstream `nn.Sequential` indices for TAEF2, so the shipped safetensors
//! load unchanged; the f16 weights are widened to f32).
//!
//! # Quantization
//! For each grid cell, with `e` the `down` output there: `r = e`; for level `l = 0, 1, …`:
//! `i_l = argmin_k Σ_j (r_j − C_l[k]_j)²` (the squared distance summed over `j` in order, in f32;
//! on a tie the lowest index wins), then `r -= C_l[i_l]`. Decoding `n` levels computes
//! `q = C_0[i_0] + … + C_{n−1}[i_{n−1}]` (added in level order), `up(q)`, then the TAEF2 decoder.
//! The distance is computed from the difference rather than PyTorch's `|x|² − 2x·c + |c|²`
//! expansion, which cancels badly; the two can disagree only on near ties.
//!
//! The [`ImageTokenizer`] implementation codes level 1 only (a grid of `codes`-ary tokens per 16×16
//! block); [`Taef2Tokenizer::encode_levels`] and [`Taef2Tokenizer::decode_levels`] code the first
//! `n` levels, one grid per level, from one encoder pass. The module's size policy applies (edge
//! replication to multiples of 16, at most [`MAX_TOKENS`] tokens per level, `decode_to` crops).
//!
//! # Directory and manifest
//! A tokenizer directory holds `manifest.json` ([`Taef2Manifest`]):
//!
//! ```json
//! {
//!   "format": "unimic-taef2-tokenizer/1",
//!   "name": "unimic-taef2-rvq",
//!   "architecture": "taef2-rvq",
//!   "config": {"ch": 128, "dim": 32, "codes": 1024, "levels": 4, "res": 2},
//!   "files": {
//!     "quantizer": {"path": "quantizer.safetensors", "sha256": "…"},
//!     "encoder": {"path": "../taef2/taef2_encoder.safetensors", "sha256": "…"},
//!     "decoder": {"path": "../taef2/taef2_decoder.safetensors", "sha256": "…"}
//!   },
//!   "training": {}
//! }
//! ```
//!
//! Paths are relative to the manifest's directory; every file's SHA-256 is checked at load
//! ([`TokenizerError::HashMismatch`]). The quantizer file holds the `Quantizer` state dict
//! (`down_in.weight`, `down_a.0.conv1.weight`, …, `codebooks` `[levels, codes, dim]`; the training
//! buffers `ema_count`, `ema_sum`, `last_used` may be present and are ignored).
//!
//! # Identity
//! [`TokenizerId::sha256`] of a TAEF2 tokenizer is [`combined_sha256`]: the lower-case hex SHA-256
//! of the three files' raw 32-byte SHA-256 digests concatenated in the order encoder, decoder,
//! quantizer. Any change to any of the three changes the id.
//!
//! # Example
//! ```no_run
//! use unimic_codec::tokenizer::{ImageTokenizer, Taef2Tokenizer};
//! let tok = Taef2Tokenizer::default_model()?;
//! let img = image::RgbImage::from_pixel(100, 60, image::Rgb([120, 80, 40]));
//! let grids = tok.encode_levels(&img, tok.levels())?; // one grid per level, 4x7 each
//! let coarse = tok.decode_to(&grids[0], 100, 60)?; // level 1 only
//! let fine = tok.decode_levels(&grids)?; // all levels, 112x64 (padded)
//! # Ok::<(), unimic_codec::tokenizer::TokenizerError>(())
//! ```

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::act::{Act, Conv1, PoolScope};
use super::conv::{Conv3, ConvS2};
use super::MAX_TOKENS;
use super::{read, sha256_hex, ImageTokenizer, TokenizerError, TokenizerId, MANIFEST_FILE};
use crate::grid::{TokenGrid, MAX_CODEBOOK};

/// Format tag of a TAEF2 tokenizer manifest.
pub const TAEF2_MANIFEST_FORMAT: &str = "unimic-taef2-tokenizer/1";

/// Architecture name in a TAEF2 tokenizer manifest.
pub const TAEF2_ARCHITECTURE: &str = "taef2-rvq";

/// Channels of the TAEF2 latents.
pub const LATENT_CHANNELS: usize = 32;

/// Pixels per latent side of the TAEF2 autoencoder.
pub const LATENT_FACTOR: usize = 8;

/// Pixels per token side of [`Taef2Tokenizer`].
pub const TAEF2_FACTOR: u32 = 16;

/// Width of TAEF2's hidden layers.
const HIDDEN: usize = 64;
/// GroupNorm of the pooled branch: PyTorch's default epsilon.
const GN_EPS: f64 = 1e-5;

// ---------------------------------------------------------------------------------------------
// Building blocks

/// A 2-D convolution of one of the four shapes TAEF2 and its quantizer use, on [`Act`]s.
#[derive(Debug, Clone)]
enum Conv {
    /// 3×3, stride 1, `padding = 1`: Winograd F(4×4, 3×3).
    W3(Conv3),
    /// 3×3 stride 2 `padding = 1`, or 2×2 stride 2 `padding = 0`: per-tap GEMMs on phases.
    S2(ConvS2),
    /// 1×1: one GEMM.
    P1(Conv1),
}

impl Conv {
    /// `nn.Conv2d(cin, cout, k, stride, padding, bias)` from `weight` (`[cout, cin, k, k]`) and
    /// `bias` under `vb`; any other shape than the four above is an error.
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = vb
            .get((cout, cin, k, k), "weight")?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bias = if bias {
            Some(vb.get(cout, "bias")?.to_vec1::<f32>()?)
        } else {
            None
        };
        let b = bias.as_deref();
        Ok(match (k, stride, padding) {
            (3, 1, 1) => Conv::W3(Conv3::new(cin, cout, &weight, b)),
            (3, 2, 1) | (2, 2, 0) => Conv::S2(ConvS2::new(cin, cout, k, padding, &weight, b)),
            (1, 1, 0) => Conv::P1(Conv1::new(cin, cout, &weight, b)),
            _ => candle_core::bail!("conv: kernel {k}, stride {stride}, padding {padding}"),
        })
    }

    /// `nn.Conv2d(cin, cout, 3, stride, padding=1, bias)`.
    fn conv3(vb: VarBuilder, cin: usize, cout: usize, stride: usize, bias: bool) -> Result<Self> {
        Self::new(vb, cin, cout, 3, stride, 1, bias)
    }

    fn cin(&self) -> usize {
        match self {
            Conv::W3(c) => c.cin(),
            Conv::S2(c) => c.cin(),
            Conv::P1(c) => c.cin(),
        }
    }

    fn forward(&self, x: &Act) -> Result<Act> {
        self.forward_res(x, None, false)
    }

    /// The convolution, plus `residual` (the output's shape) when given, then ReLU when `relu`
    /// is set (fused into the 3×3 stride-1 path).
    fn forward_res(&self, x: &Act, residual: Option<&Act>, relu: bool) -> Result<Act> {
        if x.c != self.cin() {
            candle_core::bail!("conv: {} input channels, weights take {}", x.c, self.cin());
        }
        let y = match self {
            Conv::W3(c) => {
                if let Some(r) = residual {
                    if (r.c, r.h, r.w) != (c.cout(), x.h, x.w) {
                        candle_core::bail!("conv: residual {}x{}x{}", r.c, r.h, r.w);
                    }
                }
                let data = c.forward_res(&x.data, x.h, x.w, residual.map(|r| &r.data[..]), relu);
                return Ok(Act::new(c.cout(), x.h, x.w, data));
            }
            Conv::S2(c) => {
                let Some((ho, wo)) = c.out_size(x.h, x.w) else {
                    candle_core::bail!("conv: {}x{} input is smaller than the kernel", x.h, x.w);
                };
                Act::new(c.cout(), ho, wo, c.forward(&x.data, x.h, x.w))
            }
            Conv::P1(c) => c.forward(x),
        };
        let y = match residual {
            Some(r) if (r.c, r.h, r.w) == (y.c, y.h, y.w) => y.add(r),
            Some(r) => candle_core::bail!("conv: residual {}x{}x{}", r.c, r.h, r.w),
            None => y,
        };
        Ok(if relu { y.relu() } else { y })
    }
}

/// PyTorch's `GroupNorm(groups, channels)` with its affine parameters.
#[derive(Debug, Clone)]
struct GroupNorm {
    groups: usize,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl GroupNorm {
    fn new(vb: VarBuilder, groups: usize, channels: usize) -> Result<Self> {
        Ok(Self {
            groups,
            weight: vb.get(channels, "weight")?.to_vec1::<f32>()?,
            bias: vb.get(channels, "bias")?.to_vec1::<f32>()?,
        })
    }

    fn forward(&self, x: Act) -> Act {
        x.group_norm(self.groups, GN_EPS, &self.weight, &self.bias)
    }
}

/// TAEF2's `Block`: `relu(conv(x') + x')`, `x' = x + pool(x)` when the pooled branch is present.
#[derive(Debug, Clone)]
struct Block {
    conv: [Conv; 3],
    pool: Option<(Conv, GroupNorm, Conv)>,
}

impl Block {
    fn new(vb: VarBuilder, pool: bool) -> Result<Self> {
        let c = vb.pp("conv");
        let conv = [
            Conv::conv3(c.pp("0"), HIDDEN, HIDDEN, 1, true)?,
            Conv::conv3(c.pp("2"), HIDDEN, HIDDEN, 1, true)?,
            Conv::conv3(c.pp("4"), HIDDEN, HIDDEN, 1, true)?,
        ];
        let pool = if pool {
            let p = vb.pp("pool");
            Some((
                Conv::new(p.pp("0"), HIDDEN, 4 * HIDDEN, 1, 1, 0, false)?,
                GroupNorm::new(p.pp("1"), 4, 4 * HIDDEN)?,
                Conv::new(p.pp("3"), 4 * HIDDEN, HIDDEN, 1, 1, 0, false)?,
            ))
        } else {
            None
        };
        Ok(Self { conv, pool })
    }

    fn forward(&self, x: Act) -> Result<Act> {
        let x = match &self.pool {
            Some((c0, norm, c3)) => {
                let p = norm.forward(c0.forward(&x)?).relu();
                let q = c3.forward(&p)?;
                p.recycle();
                let x = x.add(&q);
                q.recycle();
                x
            }
            None => x,
        };
        let h = self.conv[0].forward_res(&x, None, true)?;
        let h2 = self.conv[1].forward_res(&h, None, true)?;
        h.recycle();
        let out = self.conv[2].forward_res(&h2, Some(&x), true)?;
        h2.recycle();
        x.recycle();
        Ok(out)
    }
}

/// One entry of TAEF2's `nn.Sequential`.
#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv),
    Block(Box<Block>),
    Relu,
    /// `tanh(x / 3) * 3`.
    Clamp,
    /// Nearest-neighbour 2× upsampling.
    Up,
}

impl Layer {
    fn forward(&self, x: Act) -> Result<Act> {
        Ok(match self {
            Layer::Conv(c) => {
                let y = c.forward(&x)?;
                x.recycle();
                y
            }
            Layer::Block(b) => b.forward(x)?,
            Layer::Relu => x.relu(),
            Layer::Clamp => x.clamp3(),
            Layer::Up => {
                let y = x.up2();
                x.recycle();
                y
            }
        })
    }
}

fn run(layers: &[Layer], x: Act) -> Result<Act> {
    layers.iter().try_fold(x, |h, l| l.forward(h))
}

/// Runs `f` on each image of the `[B, C, H, W]` tensor `x` and stacks the results.
fn per_image(x: &Tensor, f: impl Fn(Act) -> Result<Act>) -> Result<Tensor> {
    let _scope = PoolScope::new();
    let out = Act::from_tensor(x)?
        .into_iter()
        .map(f)
        .collect::<Result<Vec<_>>>()?;
    Act::to_tensor(out, x.device())
}

fn weights_from_bytes(bytes: Vec<u8>) -> Result<VarBuilder<'static>> {
    VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu)
}

// ---------------------------------------------------------------------------------------------
// TAEF2 encoder and decoder

/// The TAEF2 encoder: RGB `[B, 3, H, W]` in `[0, 1]` to latents `[B, 32, H/8, W/8]`.
///
/// Layers (upstream indices): `0` conv 3→64; `1` block; `2` stride-2 conv (no bias); `3–5` blocks;
/// `6` stride-2 conv; `7–9` blocks; `10` stride-2 conv; `11–13` blocks with the pooled branch;
/// `14` conv 64→32.
///
/// ```
/// use std::path::Path;
/// use candle_core::Device;
/// use unimic_codec::tokenizer::taef2::{from_rgb8, to_rgb8, Taef2Decoder, Taef2Encoder};
/// let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/taef2"));
/// let enc = Taef2Encoder::load(&dir.join("taef2_encoder.safetensors"))?;
/// let dec = Taef2Decoder::load(&dir.join("taef2_decoder.safetensors"))?;
/// let rgb: Vec<u8> = (0..32 * 48 * 3).map(|i| (i % 251) as u8).collect();
/// let x = from_rgb8(32, 48, &rgb, &Device::Cpu)?; // [1, 3, 32, 48] in [0, 1]
/// let z = enc.latent(&x)?;
/// assert_eq!(z.dims(), &[1, 32, 4, 6]);
/// let (h, w, back) = to_rgb8(&dec.forward(&z)?)?;
/// assert_eq!((h, w, back.len()), (32, 48, rgb.len()));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Taef2Encoder {
    layers: Vec<Layer>,
}

impl Taef2Encoder {
    /// Builds the encoder from weights under the upstream names (`0.weight`, `1.conv.0.weight`,
    /// `11.pool.1.weight`, …), read as f32.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let s2 = |i: usize| -> Result<Layer> {
            Ok(Layer::Conv(Conv::conv3(
                vb.pp(i),
                HIDDEN,
                HIDDEN,
                2,
                false,
            )?))
        };
        let block = |i: usize, pool: bool| -> Result<Layer> {
            Ok(Layer::Block(Box::new(Block::new(vb.pp(i), pool)?)))
        };
        let layers = vec![
            Layer::Conv(Conv::conv3(vb.pp("0"), 3, HIDDEN, 1, true)?),
            block(1, false)?,
            s2(2)?,
            block(3, false)?,
            block(4, false)?,
            block(5, false)?,
            s2(6)?,
            block(7, false)?,
            block(8, false)?,
            block(9, false)?,
            s2(10)?,
            block(11, true)?,
            block(12, true)?,
            block(13, true)?,
            Layer::Conv(Conv::conv3(vb.pp("14"), HIDDEN, LATENT_CHANNELS, 1, true)?),
        ];
        Ok(Self { layers })
    }

    /// Loads the encoder from safetensors bytes (`taef2_encoder.safetensors`) on the CPU.
    pub fn from_bytes(bytes: Vec<u8>) -> std::result::Result<Self, TokenizerError> {
        Ok(Self::new(weights_from_bytes(bytes)?)?)
    }

    /// Loads the encoder from a safetensors file on the CPU.
    pub fn load(path: &Path) -> std::result::Result<Self, TokenizerError> {
        Self::from_bytes(read(path)?)
    }

    /// Latents `[B, 32, ceil(H/8), ceil(W/8)]` of images `[B, 3, H, W]` with values in `[0, 1]`
    /// (see [`from_rgb8`]).
    pub fn latent(&self, x: &Tensor) -> Result<Tensor> {
        per_image(x, |a| self.latent_act(a))
    }

    /// [`Self::latent`] of one image.
    fn latent_act(&self, x: Act) -> Result<Act> {
        if x.c != 3 {
            candle_core::bail!("encoder: {} input channels, expected 3", x.c);
        }
        run(&self.layers, x)
    }
}

/// The TAEF2 decoder: latents `[B, 32, h, w]` to RGB `[B, 3, 8h, 8w]`, nominally in `[0, 1]` but not
/// clamped (see [`to_rgb8`]).
///
/// Layers (upstream indices): `0` `tanh(x/3)·3`; `1` conv 32→64; `2` ReLU; `3–5` blocks with the
/// pooled branch; `6` upsample; `7` conv (no bias); `8–10` blocks; `11` upsample; `12` conv;
/// `13–15` blocks; `16` upsample; `17` conv; `18` block; `19` conv 64→3.
#[derive(Debug, Clone)]
pub struct Taef2Decoder {
    layers: Vec<Layer>,
}

impl Taef2Decoder {
    /// Builds the decoder from weights under the upstream names (`1.weight`, `3.pool.0.weight`,
    /// …), read as f32.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let c = |i: usize| -> Result<Layer> {
            Ok(Layer::Conv(Conv::conv3(
                vb.pp(i),
                HIDDEN,
                HIDDEN,
                1,
                false,
            )?))
        };
        let block = |i: usize, pool: bool| -> Result<Layer> {
            Ok(Layer::Block(Box::new(Block::new(vb.pp(i), pool)?)))
        };
        let layers = vec![
            Layer::Clamp,
            Layer::Conv(Conv::conv3(vb.pp("1"), LATENT_CHANNELS, HIDDEN, 1, true)?),
            Layer::Relu,
            block(3, true)?,
            block(4, true)?,
            block(5, true)?,
            Layer::Up,
            c(7)?,
            block(8, false)?,
            block(9, false)?,
            block(10, false)?,
            Layer::Up,
            c(12)?,
            block(13, false)?,
            block(14, false)?,
            block(15, false)?,
            Layer::Up,
            c(17)?,
            block(18, false)?,
            Layer::Conv(Conv::conv3(vb.pp("19"), HIDDEN, 3, 1, true)?),
        ];
        Ok(Self { layers })
    }

    /// Loads the decoder from safetensors bytes (`taef2_decoder.safetensors`) on the CPU.
    pub fn from_bytes(bytes: Vec<u8>) -> std::result::Result<Self, TokenizerError> {
        Ok(Self::new(weights_from_bytes(bytes)?)?)
    }

    /// Loads the decoder from a safetensors file on the CPU.
    pub fn load(path: &Path) -> std::result::Result<Self, TokenizerError> {
        Self::from_bytes(read(path)?)
    }

    /// RGB `[B, 3, 8h, 8w]` (unclamped) of latents `[B, 32, h, w]`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        per_image(z, |a| self.forward_act(a))
    }

    /// [`Self::forward`] of one image's latents.
    fn forward_act(&self, z: Act) -> Result<Act> {
        run(&self.layers, z)
    }
}

/// Converts interleaved RGB bytes of an `h × w` image to a TAEF2 input `[1, 3, h, w]`: `u8 / 255`.
pub fn from_rgb8(h: usize, w: usize, rgb: &[u8], device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = rgb.iter().map(|&u| f32::from(u) / 255.0).collect();
    Tensor::from_vec(v, (h, w, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()
}

/// Converts decoder output `[1, 3, H, W]` to `(H, W, interleaved RGB bytes)`:
/// `clamp(round(255 v), 0, 255)` (round half away from zero).
pub fn to_rgb8(decoded: &Tensor) -> Result<(usize, usize, Vec<u8>)> {
    let (_, _, h, w) = decoded.dims4()?;
    let v = decoded
        .get(0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((h, w, v.into_iter().map(to_u8).collect()))
}

/// `clamp(round(255 v), 0, 255)` (round half away from zero).
fn to_u8(v: f32) -> u8 {
    (v * 255.0).round().clamp(0.0, 255.0) as u8
}

/// Interleaved RGB bytes of `n` pixels as three planes of `u8 / 255`.
fn planes_of_rgb8(rgb: &[u8], n: usize) -> Vec<f32> {
    (0..3)
        .flat_map(|c| rgb.iter().skip(c).step_by(3).take(n))
        .map(|&u| f32::from(u) / 255.0)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The quantizer

/// Hyper-parameters of a [`Taef2Quantizer`] (the `config` of a [`Taef2Manifest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taef2Config {
    /// Channels of the quantizer's convolutions.
    pub ch: usize,
    /// Dimension of the codewords.
    pub dim: usize,
    /// Entries per codebook (`K`, the token alphabet).
    pub codes: usize,
    /// Residual levels (`L`, number of codebooks).
    pub levels: usize,
    /// Residual blocks in each of the four stacks (`down_a`, `down_b`, `up_a`, `up_b`).
    pub res: usize,
}

impl Default for Taef2Config {
    /// The defaults of `Quantizer` in `tools/taef2/taef2.py`: 128, 32, 1024, 4, 2.
    fn default() -> Self {
        Self {
            ch: 128,
            dim: 32,
            codes: 1024,
            levels: 4,
            res: 2,
        }
    }
}

impl Taef2Config {
    /// Checks that the configuration describes a model: non-zero sizes and
    /// `codes <= MAX_CODEBOOK`.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.ch == 0 || self.dim == 0 || self.levels == 0 {
            return Err(format!(
                "ch {}, dim {} and levels {} must be non-zero",
                self.ch, self.dim, self.levels
            ));
        }
        if self.codes == 0 || self.codes > MAX_CODEBOOK as usize {
            return Err(format!("codes {} outside 1..={MAX_CODEBOOK}", self.codes));
        }
        Ok(())
    }
}

/// `Res`: `x + conv2(silu(conv1(silu(x))))`.
#[derive(Debug, Clone)]
struct Res {
    conv1: Conv,
    conv2: Conv,
}

impl Res {
    fn new(vb: VarBuilder, ch: usize) -> Result<Self> {
        Ok(Self {
            conv1: Conv::conv3(vb.pp("conv1"), ch, ch, 1, true)?,
            conv2: Conv::conv3(vb.pp("conv2"), ch, ch, 1, true)?,
        })
    }

    fn forward(&self, x: Act) -> Result<Act> {
        let s = x.silu_of();
        let h = self.conv1.forward(&s)?.silu();
        s.recycle();
        let out = self.conv2.forward_res(&h, Some(&x), false)?;
        h.recycle();
        x.recycle();
        Ok(out)
    }
}

fn res_stack(vb: VarBuilder, ch: usize, n: usize) -> Result<Vec<Res>> {
    (0..n).map(|i| Res::new(vb.pp(i), ch)).collect()
}

fn run_res(stack: &[Res], x: Act) -> Result<Act> {
    stack.iter().try_fold(x, |h, r| r.forward(h))
}

/// `conv.forward(x)`, recycling `x`.
fn step(conv: &Conv, x: Act) -> Result<Act> {
    let y = conv.forward(&x)?;
    x.recycle();
    Ok(y)
}

/// The quantizer between TAEF2's encoder and decoder (`Quantizer` of `tools/taef2/taef2.py`).
///
/// `down`: conv3 32→ch, `res` blocks, 2×2 stride-2 conv, `res` blocks, SiLU, 1×1 conv ch→dim.
/// `up`: 1×1 conv dim→ch, `res` blocks, nearest 2×, conv3, `res` blocks, SiLU, conv3 ch→32.
/// Codebooks `[levels, codes, dim]`, searched as the [module docs](self) describe.
#[derive(Debug, Clone)]
pub struct Taef2Quantizer {
    cfg: Taef2Config,
    down_in: Conv,
    down_a: Vec<Res>,
    down_s: Conv,
    down_b: Vec<Res>,
    down_out: Conv,
    up_in: Conv,
    up_a: Vec<Res>,
    up_s: Conv,
    up_b: Vec<Res>,
    up_out: Conv,
    /// `[levels][codes][dim]`, row-major.
    codebooks: Vec<f32>,
}

impl Taef2Quantizer {
    /// Builds the quantizer from weights under the `Quantizer` state-dict names, read as f32.
    pub fn new(cfg: &Taef2Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let (ch, res) = (cfg.ch, cfg.res);
        let codebooks = vb
            .get((cfg.levels, cfg.codes, cfg.dim), "codebooks")?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self {
            cfg: *cfg,
            down_in: Conv::conv3(vb.pp("down_in"), LATENT_CHANNELS, ch, 1, true)?,
            down_a: res_stack(vb.pp("down_a"), ch, res)?,
            down_s: Conv::new(vb.pp("down_s"), ch, ch, 2, 2, 0, true)?,
            down_b: res_stack(vb.pp("down_b"), ch, res)?,
            down_out: Conv::new(vb.pp("down_out"), ch, cfg.dim, 1, 1, 0, true)?,
            up_in: Conv::new(vb.pp("up_in"), cfg.dim, ch, 1, 1, 0, true)?,
            up_a: res_stack(vb.pp("up_a"), ch, res)?,
            up_s: Conv::conv3(vb.pp("up_s"), ch, ch, 1, true)?,
            up_b: res_stack(vb.pp("up_b"), ch, res)?,
            up_out: Conv::conv3(vb.pp("up_out"), ch, LATENT_CHANNELS, 1, true)?,
            codebooks,
        })
    }

    /// Loads the quantizer from safetensors bytes on the CPU.
    pub fn from_bytes(
        cfg: &Taef2Config,
        bytes: Vec<u8>,
    ) -> std::result::Result<Self, TokenizerError> {
        cfg.validate().map_err(TokenizerError::Config)?;
        Ok(Self::new(cfg, weights_from_bytes(bytes)?)?)
    }

    /// The configuration.
    pub fn config(&self) -> &Taef2Config {
        &self.cfg
    }

    /// Codebook of `level` (0-based, `< levels`): `codes × dim` values, row-major.
    ///
    /// # Panics
    /// If `level >= levels`.
    pub fn codebook(&self, level: usize) -> &[f32] {
        assert!(level < self.cfg.levels, "level {level} out of range");
        let n = self.cfg.codes * self.cfg.dim;
        &self.codebooks[level * n..(level + 1) * n]
    }

    /// `down`: latents `[B, 32, h, w]` (`h`, `w` even) to vectors `[B, dim, h/2, w/2]`.
    pub fn down(&self, z: &Tensor) -> Result<Tensor> {
        per_image(z, |a| self.down_act(a))
    }

    /// [`Self::down`] of one image's latents.
    fn down_act(&self, z: Act) -> Result<Act> {
        let h = run_res(&self.down_a, step(&self.down_in, z)?)?;
        let h = run_res(&self.down_b, step(&self.down_s, h)?)?;
        step(&self.down_out, h.silu())
    }

    /// `up`: summed codewords `[B, dim, h, w]` to latents `[B, 32, 2h, 2w]`.
    pub fn up(&self, q: &Tensor) -> Result<Tensor> {
        per_image(q, |a| self.up_act(a))
    }

    /// [`Self::up`] of one image's summed codewords.
    fn up_act(&self, q: Act) -> Result<Act> {
        let h = run_res(&self.up_a, step(&self.up_in, q)?)?;
        let u = h.up2();
        h.recycle();
        let h = run_res(&self.up_b, step(&self.up_s, u)?)?;
        step(&self.up_out, h.silu())
    }

    /// Residual quantization of `down` output `e` `[B, dim, h, w]` to the first `levels` levels:
    /// one vector of `B·h·w` codes per level, in `(b, y, x)` row-major order. The search is the
    /// [module docs'](self) (exact squared distance, lowest index on ties).
    pub fn quantize(&self, e: &Tensor, levels: usize) -> Result<Vec<Vec<u32>>> {
        let (b, d, h, w) = e.dims4()?;
        if d != self.cfg.dim {
            candle_core::bail!("quantize: {d} channels, codewords have {}", self.cfg.dim);
        }
        if levels == 0 || levels > self.cfg.levels {
            candle_core::bail!("quantize: {levels} levels, model has {}", self.cfg.levels);
        }
        let flat = e.permute((0, 2, 3, 1))?.flatten_all()?.to_vec1::<f32>()?;
        Ok(self.quantize_cells(&flat, b * h * w, levels, None))
    }

    /// Residual search of `cells` vectors of `dim` values each (`flat`, cell-major); level 1
    /// takes `first`'s codes where given (checked by the caller).
    fn quantize_cells(
        &self,
        flat: &[f32],
        cells: usize,
        levels: usize,
        first: Option<&[u32]>,
    ) -> Vec<Vec<u32>> {
        let d = self.cfg.dim;
        let mut out = vec![Vec::with_capacity(cells); levels];
        let mut r = vec![0f32; d];
        for (i, cell) in flat.chunks_exact(d).enumerate() {
            r.copy_from_slice(cell);
            for (l, ids) in out.iter_mut().enumerate() {
                let cb = self.codebook(l);
                let k = match first {
                    Some(f) if l == 0 => f[i] as usize,
                    _ => nearest(&r, cb, d),
                };
                ids.push(k as u32);
                for (x, c) in r.iter_mut().zip(&cb[k * d..(k + 1) * d]) {
                    *x -= c;
                }
            }
        }
        out
    }

    /// The sum of the codewords `ids[0][i] + ids[1][i] + …` (level order) as `[b, dim, h, w]`;
    /// `ids[l]` holds the `b·h·w` codes of level `l` in `(b, y, x)` order.
    pub fn dequantize(&self, ids: &[&[u32]], (b, h, w): (usize, usize, usize)) -> Result<Tensor> {
        let q = self.dequantize_cells(ids, b * h * w)?;
        Tensor::from_vec(q, (b, h, w, self.cfg.dim), &Device::Cpu)?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// [`Self::dequantize`] of one image's `h × w` grids, as `[dim, h, w]`.
    fn dequantize_act(&self, ids: &[&[u32]], (h, w): (usize, usize)) -> Result<Act> {
        let (d, n) = (self.cfg.dim, h * w);
        let q = self.dequantize_cells(ids, n)?;
        let mut planes = vec![0f32; d * n];
        for (i, cell) in q.chunks_exact(d).enumerate() {
            for (j, &v) in cell.iter().enumerate() {
                planes[j * n + i] = v;
            }
        }
        Ok(Act::new(d, h, w, planes))
    }

    /// The summed codewords of `cells` cells, cell-major (`cells × dim`).
    fn dequantize_cells(&self, ids: &[&[u32]], cells: usize) -> Result<Vec<f32>> {
        let d = self.cfg.dim;
        if ids.is_empty() || ids.len() > self.cfg.levels {
            candle_core::bail!(
                "dequantize: {} levels, model has {}",
                ids.len(),
                self.cfg.levels
            );
        }
        let mut q = vec![0f32; cells * d];
        for (l, level) in ids.iter().enumerate() {
            if level.len() != cells {
                candle_core::bail!(
                    "dequantize: level {l} has {} codes, need {cells}",
                    level.len()
                );
            }
            let cb = self.codebook(l);
            for (dst, &k) in q.chunks_exact_mut(d).zip(level.iter()) {
                let k = k as usize;
                if k >= self.cfg.codes {
                    candle_core::bail!("dequantize: code {k} >= {}", self.cfg.codes);
                }
                for (x, c) in dst.iter_mut().zip(&cb[k * d..(k + 1) * d]) {
                    *x += c;
                }
            }
        }
        Ok(q)
    }

    /// The `k` codewords of level `level` (0-based) nearest to `r`, as `(squared distance,
    /// code)` by increasing distance (lowest code first on ties), into `out` (cleared first).
    /// The first is the code the residual search picks.
    ///
    /// # Panics
    /// If `level >= levels` or `r` is not `dim` long.
    pub fn nearest_k(&self, level: usize, r: &[f32], k: usize, out: &mut Vec<(f32, u32)>) {
        let d = self.cfg.dim;
        assert_eq!(
            r.len(),
            d,
            "a vector of {} values, codewords have {d}",
            r.len()
        );
        out.clear();
        let k = k.clamp(1, self.cfg.codes);
        for (i, c) in self.codebook(level).chunks_exact(d).enumerate() {
            // NaN (from NaN weights) ranks last, as in the residual search.
            let s = match sq_dist(r, c) {
                s if s.is_nan() => f32::INFINITY,
                s => s,
            };
            // Keep the k best seen so far, sorted; equal distances keep the earlier code first.
            if out.len() == k && s >= out[k - 1].0 {
                continue;
            }
            let at = out.partition_point(|&(t, _)| t <= s);
            if out.len() == k {
                out.pop();
            }
            out.insert(at, (s, i as u32));
        }
    }
}

/// The vectors a TAEF2 tokenizer quantizes, one per grid cell ([`Taef2Tokenizer::embed`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CellVectors {
    /// Grid rows.
    pub height: usize,
    /// Grid columns.
    pub width: usize,
    /// Values per vector (the quantizer's `dim`).
    pub dim: usize,
    /// `height × width` vectors of `dim` values, cell-major in raster order.
    pub data: Vec<f32>,
}

impl CellVectors {
    /// The vector of cell `i` (raster order).
    ///
    /// # Panics
    /// If `i >= height × width`.
    pub fn cell(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

/// `Σ_j (r_j − c_j)²`, summed in order in f32 (the module docs' distance).
fn sq_dist(r: &[f32], c: &[f32]) -> f32 {
    let mut s = 0f32;
    for (x, y) in r.iter().zip(c) {
        let t = x - y;
        s += t * t;
    }
    s
}

/// Index of the row of `cb` (`K × d`) nearest to `r` by squared distance, lowest on ties.
fn nearest(r: &[f32], cb: &[f32], d: usize) -> usize {
    let mut best = (f32::INFINITY, 0usize);
    for (k, c) in cb.chunks_exact(d).enumerate() {
        let s = sq_dist(r, c);
        if s < best.0 {
            best = (s, k);
        }
    }
    best.1
}

// ---------------------------------------------------------------------------------------------
// Manifest

/// One file of a TAEF2 tokenizer directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taef2File {
    /// Path relative to the manifest's directory (`..` allowed).
    pub path: String,
    /// Lower-case hex SHA-256 of the file's bytes, checked at load.
    pub sha256: String,
}

/// The three files of a TAEF2 tokenizer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taef2Files {
    /// The trained quantizer (`Quantizer` state dict).
    pub quantizer: Taef2File,
    /// TAEF2's encoder (`taef2_encoder.safetensors`).
    pub encoder: Taef2File,
    /// TAEF2's decoder (`taef2_decoder.safetensors`).
    pub decoder: Taef2File,
}

/// The `manifest.json` of a TAEF2 tokenizer directory (see the [module docs](self)).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Taef2Manifest {
    /// Format tag, [`TAEF2_MANIFEST_FORMAT`].
    pub format: String,
    /// Name of this tokenizer (becomes [`TokenizerId::name`]).
    pub name: String,
    /// Architecture, [`TAEF2_ARCHITECTURE`].
    pub architecture: String,
    /// Quantizer hyper-parameters.
    pub config: Taef2Config,
    /// The weights files and their hashes.
    pub files: Taef2Files,
    /// How the quantizer was trained (free-form).
    #[serde(default)]
    pub training: serde_json::Value,
}

/// The TAEF2 tokenizer's identity hash: lower-case hex SHA-256 of
/// `SHA256(encoder) ‖ SHA256(decoder) ‖ SHA256(quantizer)` (raw 32-byte digests of the files'
/// bytes).
pub fn combined_sha256(encoder: &[u8], decoder: &[u8], quantizer: &[u8]) -> String {
    let mut all = Vec::with_capacity(96);
    for bytes in [encoder, decoder, quantizer] {
        all.extend_from_slice(&Sha256::digest(bytes));
    }
    sha256_hex(&all)
}

// ---------------------------------------------------------------------------------------------
// The tokenizer

/// The TAEF2 residual-VQ tokenizer: factor 16, `codes`-ary tokens, `levels` grids per image (see
/// the [module docs](self)). The [`ImageTokenizer`] methods code level 1.
#[derive(Debug, Clone)]
pub struct Taef2Tokenizer {
    encoder: Taef2Encoder,
    decoder: Taef2Decoder,
    quantizer: Taef2Quantizer,
    device: Device,
    id: TokenizerId,
}

impl Taef2Tokenizer {
    /// Builds a tokenizer from the three safetensors files' bytes; the id's hash is
    /// [`combined_sha256`] of them.
    pub fn from_bytes(
        name: &str,
        config: &Taef2Config,
        encoder: Vec<u8>,
        decoder: Vec<u8>,
        quantizer: Vec<u8>,
    ) -> std::result::Result<Self, TokenizerError> {
        config.validate().map_err(TokenizerError::Config)?;
        let sha256 = combined_sha256(&encoder, &decoder, &quantizer);
        Ok(Self {
            encoder: Taef2Encoder::from_bytes(encoder)?,
            decoder: Taef2Decoder::from_bytes(decoder)?,
            quantizer: Taef2Quantizer::from_bytes(config, quantizer)?,
            device: Device::Cpu,
            id: TokenizerId {
                name: name.to_string(),
                sha256,
            },
        })
    }

    /// Loads a tokenizer directory: `manifest.json` ([`Taef2Manifest`]) and the three files it
    /// names, checking the format tag, the architecture and every file's SHA-256.
    pub fn from_dir(dir: &Path) -> std::result::Result<Self, TokenizerError> {
        let m: Taef2Manifest = serde_json::from_slice(&read(&dir.join(MANIFEST_FILE))?)?;
        if m.format != TAEF2_MANIFEST_FORMAT {
            return Err(TokenizerError::Config(format!(
                "manifest format {:?}, expected {TAEF2_MANIFEST_FORMAT:?}",
                m.format
            )));
        }
        if m.architecture != TAEF2_ARCHITECTURE {
            return Err(TokenizerError::Config(format!(
                "architecture {:?}, expected {TAEF2_ARCHITECTURE:?}",
                m.architecture
            )));
        }
        m.config.validate().map_err(TokenizerError::Config)?;
        let load = |f: &Taef2File| -> std::result::Result<Vec<u8>, TokenizerError> {
            let bytes = read(&dir.join(&f.path))?;
            let actual = sha256_hex(&bytes);
            if actual != f.sha256.to_ascii_lowercase() {
                return Err(TokenizerError::HashMismatch {
                    expected: f.sha256.clone(),
                    actual,
                });
            }
            Ok(bytes)
        };
        let encoder = load(&m.files.encoder)?;
        let decoder = load(&m.files.decoder)?;
        let quantizer = load(&m.files.quantizer)?;
        Self::from_bytes(&m.name, &m.config, encoder, decoder, quantizer)
    }

    /// Directory of the TAEF2 tokenizer shipped with the source tree: `$UNIMIC_TOKENIZER` if set,
    /// else `models/tokenizer-taef2` of the workspace this crate was built from.
    pub fn default_dir() -> PathBuf {
        match std::env::var_os("UNIMIC_TOKENIZER") {
            Some(p) => PathBuf::from(p),
            None => PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../models/tokenizer-taef2"
            )),
        }
    }

    /// Loads the tokenizer in [`Taef2Tokenizer::default_dir`].
    pub fn default_model() -> std::result::Result<Self, TokenizerError> {
        Self::from_dir(&Self::default_dir())
    }

    /// Residual levels the model has (`L`): the most grids one image can have.
    pub fn levels(&self) -> usize {
        self.quantizer.cfg.levels
    }

    /// The quantizer's configuration.
    pub fn config(&self) -> &Taef2Config {
        &self.quantizer.cfg
    }

    /// The TAEF2 encoder.
    pub fn encoder(&self) -> &Taef2Encoder {
        &self.encoder
    }

    /// The TAEF2 decoder.
    pub fn decoder(&self) -> &Taef2Decoder {
        &self.decoder
    }

    /// The quantizer.
    pub fn quantizer(&self) -> &Taef2Quantizer {
        &self.quantizer
    }

    /// The encoder input for `image`: padded on the right and at the bottom by edge replication
    /// to multiples of 16, as `[1, 3, H', W']` in `[0, 1]`. Fails on an empty image or one of
    /// more than [`MAX_TOKENS`] tokens.
    pub fn input(&self, image: &RgbImage) -> std::result::Result<Tensor, TokenizerError> {
        let (ph, pw, rgb) = super::padded_rgb8(image, TAEF2_FACTOR)?;
        Ok(from_rgb8(ph, pw, &rgb, &self.device)?)
    }

    /// Tokenizes `image` to the grids of levels `1..=n` (one encoder pass), each
    /// `ceil(H/16) × ceil(W/16)` with codebook size `codes`. `n` must be in `1..=levels()`
    /// ([`TokenizerError::Levels`]).
    pub fn encode_levels(
        &self,
        image: &RgbImage,
        n: usize,
    ) -> std::result::Result<Vec<TokenGrid>, TokenizerError> {
        if n == 0 || n > self.levels() {
            return Err(TokenizerError::Levels {
                requested: n,
                available: self.levels(),
            });
        }
        let cells = self.embed(image)?;
        self.quantize_levels(&cells, n, None)
    }

    /// The vector each grid cell is quantized from: the encoder and the quantizer's `down` run
    /// on `image` (padded as for [`Self::encode_levels`]), before any codebook search. With
    /// [`Self::quantize_levels`] it splits [`Self::encode_levels`] in two, so that an encoder can
    /// choose the level-1 codes itself (for example for their bits, [`crate::rdo`]).
    pub fn embed(&self, image: &RgbImage) -> std::result::Result<CellVectors, TokenizerError> {
        let (ph, pw, rgb) = super::padded_rgb8(image, TAEF2_FACTOR)?;
        let _scope = PoolScope::new();
        let x = Act::new(3, ph, pw, planes_of_rgb8(&rgb, ph * pw));
        let e = self.quantizer.down_act(self.encoder.latent_act(x)?)?;
        let (d, n) = (e.c, e.h * e.w);
        let mut data = Vec::with_capacity(d * n);
        for i in 0..n {
            data.extend((0..d).map(|j| e.data[j * n + i]));
        }
        Ok(CellVectors {
            height: e.h,
            width: e.w,
            dim: d,
            data,
        })
    }

    /// The grids of levels `1..=n` of `cells` (from [`Self::embed`]): the residual search of
    /// the [module docs](self), except that with `first` the level-1 codes are those given (one
    /// per cell, raster order, each below `codes`) and the later levels quantize what they leave.
    /// `first = None` gives exactly [`Self::encode_levels`]' grids.
    pub fn quantize_levels(
        &self,
        cells: &CellVectors,
        n: usize,
        first: Option<&[u32]>,
    ) -> std::result::Result<Vec<TokenGrid>, TokenizerError> {
        if n == 0 || n > self.levels() {
            return Err(TokenizerError::Levels {
                requested: n,
                available: self.levels(),
            });
        }
        let count = cells.height * cells.width;
        if cells.dim != self.quantizer.cfg.dim || cells.data.len() != count * cells.dim {
            return Err(TokenizerError::Config(format!(
                "{} values of dimension {} for {count} cells; the quantizer's vectors have {}",
                cells.data.len(),
                cells.dim,
                self.quantizer.cfg.dim
            )));
        }
        if let Some(f) = first {
            if f.len() != count {
                return Err(TokenizerError::Config(format!(
                    "{} level-1 codes for {count} cells",
                    f.len()
                )));
            }
            if let Some(&k) = f.iter().find(|&&k| k as usize >= self.quantizer.cfg.codes) {
                return Err(TokenizerError::Config(format!(
                    "level-1 code {k} is not below the codebook size {}",
                    self.quantizer.cfg.codes
                )));
            }
        }
        let ids = self.quantizer.quantize_cells(&cells.data, count, n, first);
        ids.into_iter()
            .map(|v| {
                Ok(TokenGrid::new(
                    cells.height as u32,
                    cells.width as u32,
                    self.codebook_size(),
                    v,
                )?)
            })
            .collect()
    }

    /// Reconstructs the padded image (`16·height × 16·width`) from the grids of levels `1..=n`,
    /// `n = grids.len()` in `1..=levels()` ([`TokenizerError::Levels`]). Every grid must have the
    /// tokenizer's codebook size ([`TokenizerError::CodebookMismatch`]) and the first grid's shape
    /// ([`TokenizerError::GridShape`]), and at most [`MAX_TOKENS`] cells.
    pub fn decode_levels(
        &self,
        grids: &[TokenGrid],
    ) -> std::result::Result<RgbImage, TokenizerError> {
        if grids.is_empty() || grids.len() > self.levels() {
            return Err(TokenizerError::Levels {
                requested: grids.len(),
                available: self.levels(),
            });
        }
        let first = &grids[0];
        for (l, g) in grids.iter().enumerate() {
            if g.codebook_size() != self.codebook_size() {
                return Err(TokenizerError::CodebookMismatch {
                    grid: g.codebook_size(),
                    tokenizer: self.codebook_size(),
                });
            }
            if (g.height(), g.width()) != (first.height(), first.width()) {
                return Err(TokenizerError::GridShape {
                    level: l + 1,
                    height: g.height(),
                    width: g.width(),
                    expected_height: first.height(),
                    expected_width: first.width(),
                });
            }
        }
        if first.len() > MAX_TOKENS {
            return Err(TokenizerError::TooLarge(first.len()));
        }
        let (h, w) = (first.height() as usize, first.width() as usize);
        let ids: Vec<&[u32]> = grids.iter().map(|g| g.ids()).collect();
        let _scope = PoolScope::new();
        let q = self.quantizer.dequantize_act(&ids, (h, w))?;
        let out = self.decoder.forward_act(self.quantizer.up_act(q)?)?;
        if out.c != 3 {
            return Err(candle_core::Error::Msg(format!("decoder gave {} channels", out.c)).into());
        }
        let n = out.h * out.w;
        let rgb = (0..n)
            .flat_map(|i| [0, 1, 2].map(|c| to_u8(out.data[c * n + i])))
            .collect();
        RgbImage::from_raw(out.w as u32, out.h as u32, rgb).ok_or(TokenizerError::EmptyImage)
    }
}

impl ImageTokenizer for Taef2Tokenizer {
    /// The level-1 grid (see [`Taef2Tokenizer::encode_levels`]).
    fn encode(&self, image: &RgbImage) -> std::result::Result<TokenGrid, TokenizerError> {
        Ok(self.encode_levels(image, 1)?.remove(0))
    }

    /// Reconstruction from level 1 alone (see [`Taef2Tokenizer::decode_levels`]).
    fn decode(&self, grid: &TokenGrid) -> std::result::Result<RgbImage, TokenizerError> {
        self.decode_levels(std::slice::from_ref(grid))
    }

    fn codebook_size(&self) -> u32 {
        self.quantizer.cfg.codes as u32
    }

    fn factor(&self) -> u32 {
        TAEF2_FACTOR
    }

    fn id(&self) -> &TokenizerId {
        &self.id
    }

    fn levels(&self) -> usize {
        Taef2Tokenizer::levels(self)
    }

    fn encode_levels(
        &self,
        image: &RgbImage,
        n: usize,
    ) -> std::result::Result<Vec<TokenGrid>, TokenizerError> {
        Taef2Tokenizer::encode_levels(self, image, n)
    }

    fn decode_levels(&self, grids: &[TokenGrid]) -> std::result::Result<RgbImage, TokenizerError> {
        Taef2Tokenizer::decode_levels(self, grids)
    }
}

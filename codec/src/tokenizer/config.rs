//! [`VqConfig`]: the JSON configuration of a LlamaGen-style VQ tokenizer.

use serde::{Deserialize, Serialize};

/// Architecture of a [`super::vq::VqModel`], mirroring LlamaGen's `ModelArgs` plus the
/// `Encoder`/`Decoder` constructor arguments it leaves at their defaults.
///
/// Field names follow the reference so that a JSON file describing a released checkpoint reads
/// naturally. [`VqConfig::default`] is the released VQ-16 layout (`ch = 128`, codebook 16384).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct VqConfig {
    /// Number of codebook entries (the token alphabet).
    pub codebook_size: usize,
    /// Dimension of each codebook vector (and of the latent after `quant_conv`).
    pub codebook_embed_dim: usize,
    /// Whether latents and codebook rows are l2-normalised before the nearest-code search.
    pub codebook_l2_norm: bool,
    /// Base width of encoder and decoder (`ch` of the reference classes).
    pub ch: usize,
    /// Per-level width multipliers of the encoder; `len - 1` stride-2 downsamples.
    pub encoder_ch_mult: Vec<usize>,
    /// Per-level width multipliers of the decoder (listed from full to lowest resolution).
    pub decoder_ch_mult: Vec<usize>,
    /// Channels of the encoder output / decoder input around the quantiser.
    pub z_channels: usize,
    /// ResNet blocks per encoder level; the decoder uses one more per level, as the reference.
    pub num_res_blocks: usize,
    /// GroupNorm groups (32 in the reference; every width must be a multiple).
    pub norm_groups: usize,
    /// Weight of the commitment loss in training (`commit_loss_beta`).
    pub commit_loss_beta: f64,
}

impl Default for VqConfig {
    fn default() -> Self {
        Self {
            codebook_size: 16384,
            codebook_embed_dim: 8,
            codebook_l2_norm: true,
            ch: 128,
            encoder_ch_mult: vec![1, 1, 2, 2, 4],
            decoder_ch_mult: vec![1, 1, 2, 2, 4],
            z_channels: 256,
            num_res_blocks: 2,
            norm_groups: 32,
            commit_loss_beta: 0.25,
        }
    }
}

impl VqConfig {
    /// The released LlamaGen VQ-16 configuration (same as [`Default`]).
    pub fn llamagen_vq16() -> Self {
        Self::default()
    }

    /// The reduced-width configuration of the golden vectors in `shared/vectors/llamagen-vq16`:
    /// `ch = 32`, multipliers `[1, 1, 2, 2, 3]`, codebook 1024.
    pub fn golden_small() -> Self {
        Self {
            codebook_size: 1024,
            ch: 32,
            encoder_ch_mult: vec![1, 1, 2, 2, 3],
            decoder_ch_mult: vec![1, 1, 2, 2, 3],
            ..Self::default()
        }
    }

    /// Spatial downsampling factor: `2^(levels - 1)`.
    pub fn factor(&self) -> usize {
        1 << self.encoder_ch_mult.len().saturating_sub(1)
    }

    /// Checks that the configuration describes a buildable model.
    pub fn validate(&self) -> Result<(), String> {
        if self.codebook_size == 0 || self.codebook_size > crate::grid::MAX_CODEBOOK as usize {
            return Err(format!("codebook_size {} out of range", self.codebook_size));
        }
        if self.codebook_embed_dim == 0 || self.z_channels == 0 || self.ch == 0 {
            return Err("codebook_embed_dim, z_channels and ch must be non-zero".into());
        }
        if self.encoder_ch_mult.is_empty()
            || self.encoder_ch_mult.len() != self.decoder_ch_mult.len()
        {
            return Err(
                "encoder_ch_mult and decoder_ch_mult must be non-empty and equally long".into(),
            );
        }
        if self.encoder_ch_mult.len() > 8 {
            return Err("at most 8 levels".into());
        }
        if self.norm_groups == 0 {
            return Err("norm_groups must be non-zero".into());
        }
        for &m in self.encoder_ch_mult.iter().chain(&self.decoder_ch_mult) {
            if m == 0 || (self.ch * m) % self.norm_groups != 0 {
                return Err(format!(
                    "width {} is not a non-zero multiple of norm_groups {}",
                    self.ch * m,
                    self.norm_groups
                ));
            }
        }
        Ok(())
    }
}

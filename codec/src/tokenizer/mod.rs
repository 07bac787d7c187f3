//! Image tokenizers: RGB images to [`TokenGrid`]s and back.
//!
//! [`ImageTokenizer`] is the interface; [`Vq`] implements it with the LlamaGen VQ architecture
//! ([`vq::VqModel`]) and weights from a safetensors file under the reference's parameter names.
//! [`Vq::default_model`] loads the tokenizer the project trained (`models/tokenizer/`).
//! [`Taef2Tokenizer`] implements it with the pretrained TAEF2 autoencoder and a trained residual
//! vector quantizer between its halves ([`taef2`]).
//!
//! # Size policy
//! A model with downsampling factor `f` (16 by default) maps an `f×f` pixel block to one token.
//! [`ImageTokenizer::encode`] accepts any size: the image is padded on the right and at the bottom
//! by replicating its last column and row up to the next multiples of `f` (no resizing, so no
//! resampling blur), giving a grid of `ceil(H/f)` rows by `ceil(W/f)` columns. Grid cell `(r, c)`
//! covers pixels `[r*f, (r+1)*f) × [c*f, (c+1)*f)`. [`ImageTokenizer::decode`] returns the padded
//! `f*rows × f*cols` image; [`ImageTokenizer::decode_to`] crops it back to the original size, which
//! the sender must transmit next to the grid.
//!
//! ```
//! use unimic_codec::tokenizer::{ImageTokenizer, Vq};
//! let tok = Vq::default_model()?;
//! let img = image::RgbImage::from_pixel(100, 60, image::Rgb([120, 80, 40]));
//! let grid = tok.encode(&img)?;
//! assert_eq!((grid.height(), grid.width()), (4, 7)); // ceil(60/16), ceil(100/16)
//! let back = tok.decode_to(&grid, 100, 60)?;
//! assert_eq!(back.dimensions(), (100, 60));
//! # Ok::<(), unimic_codec::tokenizer::TokenizerError>(())
//! ```

pub mod config;
pub mod metrics;
pub mod train;

mod act;
mod conv;
pub mod taef2;
pub mod vq;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::grid::{GridError, TokenGrid};
pub use config::VqConfig;
pub use taef2::{Taef2Config, Taef2Tokenizer};
use vq::{ConvPath, VqModel};

/// Largest number of tokens one image may produce (attention cost grows with its square).
pub const MAX_TOKENS: usize = 4096;

/// Name of the manifest file in a tokenizer directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Why tokenizing, detokenizing or loading failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// A candle operation failed (shape mismatch, missing tensor in the weights, …).
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    /// The configuration describes no valid model.
    #[error("invalid config: {0}")]
    Config(String),
    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("manifest: {0}")]
    Manifest(#[from] serde_json::Error),
    /// The weights file's content hash differs from the manifest's.
    #[error("weights hash {actual} does not match the manifest's {expected}")]
    HashMismatch {
        /// From the manifest.
        expected: String,
        /// Of the file.
        actual: String,
    },
    /// The image has a zero dimension.
    #[error("image has a zero dimension")]
    EmptyImage,
    /// The image would produce more than [`MAX_TOKENS`] tokens.
    #[error("image needs {0} tokens, more than {MAX_TOKENS}")]
    TooLarge(usize),
    /// The grid's codebook size differs from the tokenizer's.
    #[error("grid codebook size {grid} differs from the tokenizer's {tokenizer}")]
    CodebookMismatch {
        /// Of the grid.
        grid: u32,
        /// Of the tokenizer.
        tokenizer: u32,
    },
    /// A grid could not be built.
    #[error("grid: {0}")]
    Grid(#[from] GridError),
    /// A residual tokenizer was asked for 0 levels or more than it has
    /// ([`Taef2Tokenizer::encode_levels`], [`Taef2Tokenizer::decode_levels`]).
    #[error("{requested} levels requested; the tokenizer has 1..={available}")]
    Levels {
        /// Levels asked for (grids given).
        requested: usize,
        /// Levels the model has.
        available: usize,
    },
    /// The grids of one multi-level image differ in shape ([`Taef2Tokenizer::decode_levels`]).
    #[error(
        "level {level} grid is {height}x{width}, level 1 is {expected_height}x{expected_width}"
    )]
    GridShape {
        /// 1-based level of the offending grid.
        level: usize,
        /// Its rows.
        height: u32,
        /// Its columns.
        width: u32,
        /// Rows of the level-1 grid.
        expected_height: u32,
        /// Columns of the level-1 grid.
        expected_width: u32,
    },
    /// Choosing the level-1 codes for their bits failed ([`crate::rdo::RdoTokenizer`]).
    #[error("choosing the codes for their bits: {0}")]
    Rdo(#[source] Box<crate::rdo::RdoError>),
    /// The requested crop is larger than the decoded image.
    #[error("crop {width}x{height} exceeds the decoded {max_width}x{max_height}")]
    BadCrop {
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
        /// Decoded width.
        max_width: u32,
        /// Decoded height.
        max_height: u32,
    },
}

/// Which weights a tokenizer runs: a name and the SHA-256 of the weights file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerId {
    /// Human-readable name (from the manifest).
    pub name: String,
    /// Lower-case hex SHA-256 of the safetensors file's bytes ([`Vq`]), or of the weights files'
    /// digests ([`Taef2Tokenizer`], see [`taef2::combined_sha256`]).
    pub sha256: String,
}

/// An image tokenizer: images to token grids and back. See the module docs for the size policy.
pub trait ImageTokenizer {
    /// Tokenizes an RGB image of any non-zero size (padded to multiples of [`Self::factor`]).
    fn encode(&self, image: &RgbImage) -> Result<TokenGrid, TokenizerError>;
    /// Reconstructs the padded image, `factor*height × factor*width` pixels.
    fn decode(&self, grid: &TokenGrid) -> Result<RgbImage, TokenizerError>;
    /// Number of codebook entries (every token is below it).
    fn codebook_size(&self) -> u32;
    /// Pixels per token side.
    fn factor(&self) -> u32;
    /// Which weights are running.
    fn id(&self) -> &TokenizerId;

    /// Reconstructs and crops to the original `width × height` (top-left corner).
    fn decode_to(
        &self,
        grid: &TokenGrid,
        width: u32,
        height: u32,
    ) -> Result<RgbImage, TokenizerError> {
        crop_top_left(self.decode(grid)?, width, height)
    }

    /// Levels of the tokenizer's quality ladder: level 1 is the grid [`Self::encode`] gives,
    /// levels 2… refine it (residual codes). 1 for a tokenizer without a ladder.
    fn levels(&self) -> usize {
        1
    }

    /// Tokenizes into the grids of levels `1..=n` (all of one shape), one encoder pass.
    /// The default (no ladder) accepts only `n == 1`.
    fn encode_levels(&self, image: &RgbImage, n: usize) -> Result<Vec<TokenGrid>, TokenizerError> {
        if n != 1 {
            return Err(TokenizerError::Levels {
                requested: n,
                available: self.levels(),
            });
        }
        Ok(vec![self.encode(image)?])
    }

    /// Reconstructs the padded image from the grids of levels `1..=grids.len()`.
    /// The default (no ladder) accepts exactly one grid.
    fn decode_levels(&self, grids: &[TokenGrid]) -> Result<RgbImage, TokenizerError> {
        match grids {
            [grid] => self.decode(grid),
            _ => Err(TokenizerError::Levels {
                requested: grids.len(),
                available: self.levels(),
            }),
        }
    }

    /// [`Self::decode_levels`], cropped to the original `width × height` (top-left corner).
    fn decode_levels_to(
        &self,
        grids: &[TokenGrid],
        width: u32,
        height: u32,
    ) -> Result<RgbImage, TokenizerError> {
        crop_top_left(self.decode_levels(grids)?, width, height)
    }
}

/// Longest image side, in pixels, that [`fit`] scales photos to by default (`unimic encode
/// --max-side`, the Python package): at 16 pixels per token it keeps a grid within the
/// [`MAX_TOKENS`] limit and the transformer entropy models' 64×64 positions.
pub const DEFAULT_MAX_SIDE: u32 = 1024;

/// Scales `img` down (Catmull-Rom, aspect ratio kept, sides rounded, at least one pixel) so that
/// neither side exceeds `max_side` pixels; `max_side == 0` or an image that already fits is
/// returned as it is. A phone photo (4032×3024) becomes 1024×768 at [`DEFAULT_MAX_SIDE`].
///
/// ```
/// use unimic_codec::tokenizer::fit;
/// let img = image::RgbImage::new(4032, 3024);
/// assert_eq!(fit(img, 1024).dimensions(), (1024, 768));
/// ```
pub fn fit(img: RgbImage, max_side: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if max_side == 0 || (w <= max_side && h <= max_side) {
        return img;
    }
    let s = f64::from(max_side) / f64::from(w.max(h));
    let nw = ((f64::from(w) * s).round() as u32).clamp(1, max_side);
    let nh = ((f64::from(h) * s).round() as u32).clamp(1, max_side);
    image::imageops::resize(&img, nw, nh, image::imageops::FilterType::CatmullRom)
}

/// `image` padded on the right and at the bottom by edge replication to multiples of `factor`
/// (the size policy of the module docs), as `(height, width, RGB bytes)`. Fails on an empty image
/// or one of more than [`MAX_TOKENS`] tokens.
pub(crate) fn padded_rgb8(
    image: &RgbImage,
    factor: u32,
) -> Result<(usize, usize, Vec<u8>), TokenizerError> {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(TokenizerError::EmptyImage);
    }
    let f = factor;
    let (gw, gh) = (w.div_ceil(f), h.div_ceil(f));
    let tokens = gw as usize * gh as usize;
    if tokens > MAX_TOKENS {
        return Err(TokenizerError::TooLarge(tokens));
    }
    let (pw, ph) = (gw * f, gh * f);
    let mut rgb = Vec::with_capacity(pw as usize * ph as usize * 3);
    for y in 0..ph {
        for x in 0..pw {
            rgb.extend_from_slice(&image.get_pixel(x.min(w - 1), y.min(h - 1)).0);
        }
    }
    Ok((ph as usize, pw as usize, rgb))
}

/// `full` cropped to its top-left `width × height` (the size policy of the module docs).
fn crop_top_left(full: RgbImage, width: u32, height: u32) -> Result<RgbImage, TokenizerError> {
    if width == 0 || height == 0 || width > full.width() || height > full.height() {
        return Err(TokenizerError::BadCrop {
            width,
            height,
            max_width: full.width(),
            max_height: full.height(),
        });
    }
    if (width, height) == full.dimensions() {
        return Ok(full);
    }
    Ok(image::imageops::crop_imm(&full, 0, 0, width, height).to_image())
}

/// Implements [`ImageTokenizer`] for a smart pointer to a tokenizer: every method forwards.
macro_rules! forward_tokenizer {
    ($(#[$doc:meta])* $ptr:ident) => {
        $(#[$doc])*
        impl<T: ImageTokenizer + ?Sized> ImageTokenizer for $ptr<T> {
            fn encode(&self, image: &RgbImage) -> Result<TokenGrid, TokenizerError> {
                (**self).encode(image)
            }
            fn decode(&self, grid: &TokenGrid) -> Result<RgbImage, TokenizerError> {
                (**self).decode(grid)
            }
            fn codebook_size(&self) -> u32 {
                (**self).codebook_size()
            }
            fn factor(&self) -> u32 {
                (**self).factor()
            }
            fn id(&self) -> &TokenizerId {
                (**self).id()
            }
            fn levels(&self) -> usize {
                (**self).levels()
            }
            fn encode_levels(
                &self,
                image: &RgbImage,
                n: usize,
            ) -> Result<Vec<TokenGrid>, TokenizerError> {
                (**self).encode_levels(image, n)
            }
            fn decode_levels(&self, grids: &[TokenGrid]) -> Result<RgbImage, TokenizerError> {
                (**self).decode_levels(grids)
            }
        }
    };
}

forward_tokenizer!(
    /// A boxed tokenizer is a tokenizer, so `&Box<dyn ImageTokenizer>` goes wherever a
    /// `&impl ImageTokenizer` or `&dyn ImageTokenizer` does.
    Box
);

forward_tokenizer!(
    /// A shared tokenizer is a tokenizer, so one loaded model can serve several wrappers (for
    /// example [`crate::rdo::RdoTokenizer`]s of different settings).
    Arc
);

/// Any tokenizer a directory may hold, behind the [`ImageTokenizer`] trait.
pub type DynTokenizer = Box<dyn ImageTokenizer + Send + Sync>;

/// Directory of the default tokenizer: `$UNIMIC_TOKENIZER` if set, else the TAEF2 tokenizer
/// shipped in `models/tokenizer-taef2` of the workspace this crate was built from.
pub fn default_dir() -> PathBuf {
    Taef2Tokenizer::default_dir()
}

/// The tokenizer directories shipped with the source tree, default first: the TAEF2 tokenizer
/// (`models/tokenizer-taef2`), its first version with the smoother decoder
/// (`models/tokenizer-taef2-v1`, the same tokens) and the earlier LlamaGen-architecture VQ
/// tokenizer (`models/tokenizer`); the older ones are kept so that files made with them still
/// decode.
pub fn shipped_dirs() -> Vec<PathBuf> {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models"));
    vec![
        root.join("tokenizer-taef2"),
        root.join("tokenizer-taef2-v1"),
        root.join("tokenizer"),
    ]
}

/// Loads the tokenizer in `dir`, whichever kind its `manifest.json` names (`format`
/// [`MANIFEST_FORMAT`]: [`Vq`]; [`taef2::TAEF2_MANIFEST_FORMAT`]: [`Taef2Tokenizer`]).
pub fn load_dir(dir: &Path) -> Result<DynTokenizer, TokenizerError> {
    #[derive(Deserialize)]
    struct Format {
        format: String,
    }
    let f: Format = serde_json::from_slice(&read(&dir.join(MANIFEST_FILE))?)?;
    match f.format.as_str() {
        MANIFEST_FORMAT => Ok(Box::new(Vq::from_dir(dir)?)),
        taef2::TAEF2_MANIFEST_FORMAT => Ok(Box::new(Taef2Tokenizer::from_dir(dir)?)),
        other => Err(TokenizerError::Config(format!(
            "{}: unknown tokenizer format {other:?}",
            dir.join(MANIFEST_FILE).display()
        ))),
    }
}

/// Loads the default tokenizer ([`default_dir`]).
pub fn load_default() -> Result<DynTokenizer, TokenizerError> {
    load_dir(&default_dir())
}

/// The JSON manifest stored next to a tokenizer's weights (`manifest.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Format tag, `unimic-vq-tokenizer/1`.
    pub format: String,
    /// Name of these weights.
    pub name: String,
    /// Architecture family, `llamagen-vq`.
    pub architecture: String,
    /// The model configuration.
    pub config: VqConfig,
    /// Weights file name, relative to the manifest.
    pub weights: String,
    /// SHA-256 of the weights file (lower-case hex).
    pub sha256: String,
    /// Size of the weights file in bytes.
    pub bytes: u64,
    /// How the weights were produced (free-form; see [`train::TrainingRecord`]).
    #[serde(default)]
    pub training: serde_json::Value,
}

/// Format tag written into manifests.
pub const MANIFEST_FORMAT: &str = "unimic-vq-tokenizer/1";

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn read(path: &Path) -> Result<Vec<u8>, TokenizerError> {
    std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A LlamaGen-architecture VQ tokenizer running on the CPU.
#[derive(Debug, Clone)]
pub struct Vq {
    model: VqModel,
    device: Device,
    id: TokenizerId,
}

impl Vq {
    /// Loads weights (safetensors bytes, reference parameter names) for `config`.
    pub fn from_bytes(
        name: &str,
        config: &VqConfig,
        weights: Vec<u8>,
    ) -> Result<Self, TokenizerError> {
        config.validate().map_err(TokenizerError::Config)?;
        let sha256 = sha256_hex(&weights);
        let device = Device::Cpu;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &device)?;
        let model = VqModel::new(config, vb)?;
        Ok(Self {
            model,
            device,
            id: TokenizerId {
                name: name.to_string(),
                sha256,
            },
        })
    }

    /// Loads a safetensors file for `config`; the name is the file stem.
    pub fn load(weights: &Path, config: &VqConfig) -> Result<Self, TokenizerError> {
        let name = weights
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_bytes(&name, config, read(weights)?)
    }

    /// Loads a tokenizer directory (`manifest.json` plus the weights it names), checking the hash.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let manifest: Manifest = serde_json::from_slice(&read(&dir.join(MANIFEST_FILE))?)?;
        let bytes = read(&dir.join(&manifest.weights))?;
        let actual = sha256_hex(&bytes);
        if actual != manifest.sha256 {
            return Err(TokenizerError::HashMismatch {
                expected: manifest.sha256,
                actual,
            });
        }
        Self::from_bytes(&manifest.name, &manifest.config, bytes)
    }

    /// Directory of the tokenizer shipped with the source tree: `$UNIMIC_TOKENIZER` if set,
    /// else `models/tokenizer` of the workspace this crate was built from.
    pub fn default_dir() -> PathBuf {
        match std::env::var_os("UNIMIC_TOKENIZER") {
            Some(p) => PathBuf::from(p),
            None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tokenizer")),
        }
    }

    /// Loads the project's default tokenizer from [`Vq::default_dir`].
    pub fn default_model() -> Result<Self, TokenizerError> {
        Self::from_dir(&Self::default_dir())
    }

    /// The underlying model (for golden tests and training tools).
    pub fn model(&self) -> &VqModel {
        &self.model
    }

    /// Pads `image` to multiples of the factor by edge replication; returns the model input.
    fn input(&self, image: &RgbImage) -> Result<Tensor, TokenizerError> {
        let (ph, pw, rgb) = padded_rgb8(image, self.factor())?;
        Ok(vq::from_rgb8(ph, pw, &rgb, &self.device)?)
    }
}

impl Vq {
    /// Tokenizes like [`ImageTokenizer::encode`] once per set of allowed codes, choosing each
    /// token only among the codes in the set (indices of the full codebook; non-empty, no
    /// duplicates); one encoder pass serves all sets. The grids keep the full codebook size.
    /// `unimic bench tokenizer --codebook-subsets` uses it to measure what a smaller codebook of
    /// the most used codes would cost in quality.
    pub fn encode_among(
        &self,
        image: &RgbImage,
        sets: &[&[u32]],
    ) -> Result<Vec<TokenGrid>, TokenizerError> {
        let x = self.input(image)?;
        let latent = self.model.latent(&x, ConvPath::Direct)?;
        sets.iter()
            .map(|set| self.grid_of(&self.model.quantize_among(&latent, set)?))
            .collect()
    }

    fn grid_of(&self, idx: &Tensor) -> Result<TokenGrid, TokenizerError> {
        let (_, h, w) = idx.dims3()?;
        let ids = idx.flatten_all()?.to_vec1::<u32>()?;
        Ok(TokenGrid::new(
            h as u32,
            w as u32,
            self.codebook_size(),
            ids,
        )?)
    }
}

impl ImageTokenizer for Vq {
    fn encode(&self, image: &RgbImage) -> Result<TokenGrid, TokenizerError> {
        let x = self.input(image)?;
        let latent = self.model.latent(&x, ConvPath::Direct)?;
        self.grid_of(&self.model.quantize(&latent)?)
    }

    fn decode(&self, grid: &TokenGrid) -> Result<RgbImage, TokenizerError> {
        if grid.codebook_size() != self.codebook_size() {
            return Err(TokenizerError::CodebookMismatch {
                grid: grid.codebook_size(),
                tokenizer: self.codebook_size(),
            });
        }
        if grid.len() > MAX_TOKENS {
            return Err(TokenizerError::TooLarge(grid.len()));
        }
        let (h, w) = (grid.height() as usize, grid.width() as usize);
        let idx = Tensor::from_slice(grid.ids(), (1, h, w), &self.device)?;
        let out = self.model.decode_indices(&idx, ConvPath::Direct)?;
        let (oh, ow, rgb) = vq::to_rgb8(&out)?;
        RgbImage::from_raw(ow as u32, oh as u32, rgb).ok_or(TokenizerError::EmptyImage)
    }

    fn codebook_size(&self) -> u32 {
        self.model.config().codebook_size as u32
    }

    fn factor(&self) -> u32 {
        self.model.config().factor() as u32
    }

    fn id(&self) -> &TokenizerId {
        &self.id
    }
}

//! The models a client, a server and the codec functions run on, loaded once per models folder
//! and shared: the image tokenizer (`tokenizer-taef2/`), its handshake identity, the codec with
//! the shipped transformer entropy models (`entropy/`), and, when asked for, the local agent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use unimic_agents::local::LocalAgent;
use unimic_codec::grid::TokenGrid;
use unimic_codec::part::CodecConfig;
use unimic_codec::rdo::{RdoConfig, RdoTokenizer};
use unimic_codec::shipped;
use unimic_codec::tokenizer::{self, DynTokenizer, ImageTokenizer, Taef2Tokenizer};
use unimic_transport::TokenizerInfo;

use crate::bridge::sync;
use crate::errors::Failure;

/// Everything loaded from one models folder.
pub struct Stack {
    /// The models folder.
    pub root: PathBuf,
    /// The image tokenizer, with the level-1 codes chosen for the generic model's bits at the
    /// default λ when it is held ([`Stack::with_encoder`] for another λ).
    pub tokenizer: Arc<DynTokenizer>,
    /// The TAEF2 tokenizer underneath.
    taef2: Arc<Taef2Tokenizer>,
    /// Its handshake identity.
    pub info: TokenizerInfo,
    /// The codec: the generic and masked transformers when shipped.
    pub codec: CodecConfig,
    local: OnceLock<Result<Arc<LocalAgent>, Failure>>,
}

impl Stack {
    /// The shipped generic transformer, with its id, when it is held.
    pub fn generic(&self) -> Option<(&'static str, &unimic_codec::entropy::generic::Generic)> {
        self.codec
            .generic
            .as_deref()
            .map(|g| (shipped::GENERIC_ID, g))
    }

    /// The image tokenizer with the nearest codes (the same identity as [`Stack::tokenizer`]).
    pub fn nearest_tokenizer(&self) -> Arc<Taef2Tokenizer> {
        self.taef2.clone()
    }

    /// The entropy models' folder.
    pub fn entropy_dir(&self) -> PathBuf {
        self.root.join("entropy")
    }

    /// The local agent on the shipped masked and text-conditioned models (loaded on first use).
    pub fn local_agent(&self) -> Result<Arc<LocalAgent>, Failure> {
        self.local
            .get_or_init(|| {
                let dir = self.entropy_dir();
                LocalAgent::load(
                    &shipped::manifest_path(&dir, shipped::MASKED_ID),
                    &shipped::manifest_path(&dir, shipped::TEXT_ID),
                )
                .map(Arc::new)
                .map_err(|e| {
                    Failure::codec(format!(
                        "loading the local agent's models from {}: {e}",
                        dir.display()
                    ))
                })
            })
            .clone()
    }

    /// Runs `f` with the tokenizer that sends images with level-1 codes chosen at `rdo`
    /// ([`unimic_codec::rdo`]; 0: the nearest codes; the generic model must be held for any
    /// other choice to be made).
    pub fn with_encoder<R>(
        &self,
        rdo: f32,
        f: impl FnOnce(&dyn ImageTokenizer) -> Result<R, Failure>,
    ) -> Result<R, Failure> {
        if !(rdo.is_finite() && rdo >= 0.0) {
            return Err(Failure::content(format!(
                "rdo={rdo}: give a number >= 0 (0 keeps the nearest codes)"
            )));
        }
        match &self.codec.generic {
            _ if rdo == RdoConfig::default().lambda => f(self.tokenizer.as_ref()),
            Some(g) if rdo > 0.0 => {
                f(
                    &RdoTokenizer::new(self.taef2.clone(), g.clone(), RdoConfig::with_lambda(rdo))
                        .map_err(|e| Failure::codec(format!("the image tokenizer: {e}")))?,
                )
            }
            _ => f(&self.taef2),
        }
    }

    fn load(root: &Path) -> Result<Stack, Failure> {
        let tok_dir = root.join("tokenizer-taef2");
        let entropy = root.join("entropy");
        let codec = shipped::codec_config(&entropy).map_err(|e| {
            Failure::codec(format!(
                "loading the entropy models from {}: {e}",
                entropy.display()
            ))
        })?;
        let taef2 = Arc::new(Taef2Tokenizer::from_dir(&tok_dir).map_err(|e| {
            Failure::codec(format!(
                "loading the image tokenizer from {}: {e} (pass models=PATH or set \
                 UNIMIC_MODELS to a folder laid out like the repository's models/)",
                tok_dir.display()
            ))
        })?);
        // Images are sent with their level-1 codes chosen for the generic model's bits.
        let tokenizer: DynTokenizer = match &codec.generic {
            Some(g) => Box::new(
                RdoTokenizer::new(taef2.clone(), g.clone(), RdoConfig::default())
                    .map_err(|e| Failure::codec(format!("the image tokenizer: {e}")))?,
            ),
            None => Box::new(taef2.clone()),
        };
        let info =
            unimic_chat::tokenizer_info(&tokenizer).map_err(|e| Failure::codec(e.to_string()))?;
        Ok(Stack {
            root: root.to_path_buf(),
            tokenizer: Arc::new(tokenizer),
            taef2,
            info,
            codec,
            local: OnceLock::new(),
        })
    }
}

static STACKS: Mutex<Option<HashMap<PathBuf, Arc<Stack>>>> = Mutex::new(None);

/// The stack of `root`, loaded on first use (blocking: call it off the event loop).
pub fn load(root: &Path) -> Result<Arc<Stack>, Failure> {
    let key = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    if let Some(s) = STACKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .get(&key)
    {
        return Ok(s.clone());
    }
    let stack = Arc::new(Stack::load(&key)?);
    Ok(STACKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .entry(key)
        .or_insert(stack)
        .clone())
}

/// A token grid from the bytes of a little-endian `u32` array of `height × width` ids.
pub fn grid_from_bytes(
    height: u32,
    width: u32,
    ids: &[u8],
    codebook_size: u32,
) -> Result<TokenGrid, Failure> {
    let n = height as usize * width as usize;
    if ids.len() != n * 4 {
        return Err(Failure::content(format!(
            "a {height}×{width} grid needs {} bytes of ids, got {}",
            n * 4,
            ids.len()
        )));
    }
    let ids: Vec<u32> = ids
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    TokenGrid::new(height, width, codebook_size, ids).map_err(|e| Failure::content(e.to_string()))
}

/// The ids of `grid` as little-endian `u32` bytes.
pub fn grid_bytes(grid: &TokenGrid) -> Vec<u8> {
    grid.ids().iter().flat_map(|i| i.to_le_bytes()).collect()
}

/// An RGB image from `width × height × 3` bytes.
pub fn rgb_from_bytes(width: u32, height: u32, rgb: Vec<u8>) -> Result<image::RgbImage, Failure> {
    if width == 0 || height == 0 {
        return Err(Failure::content("the image has a zero dimension"));
    }
    let n = rgb.len();
    image::RgbImage::from_raw(width, height, rgb).ok_or_else(|| {
        Failure::content(format!(
            "a {width}×{height} RGB image needs {} bytes, got {n}",
            width as usize * height as usize * 3
        ))
    })
}

/// A models folder, loaded on first use: the codec functions, and what clients and servers are
/// given to run on (`unimic.Models` wraps it).
#[pyclass(module = "unimic._native", frozen)]
pub struct Models {
    root: PathBuf,
    loaded: OnceLock<Result<Arc<Stack>, Failure>>,
}

impl Models {
    /// The loaded stack (blocking: loads on first use).
    pub fn stack(&self) -> Result<Arc<Stack>, Failure> {
        self.loaded.get_or_init(|| load(&self.root)).clone()
    }

    /// The stack if it is loaded already (no blocking).
    pub fn loaded(&self) -> Option<Result<Arc<Stack>, Failure>> {
        self.loaded.get().cloned()
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[pymethods]
impl Models {
    #[new]
    fn new(root: PathBuf) -> Self {
        Self {
            root,
            loaded: OnceLock::new(),
        }
    }

    /// The folder.
    #[getter]
    fn path(&self) -> PathBuf {
        self.root.clone()
    }

    /// Loads the models now (they load on first use otherwise). Releases the GIL.
    fn load(&self, py: Python<'_>) -> PyResult<()> {
        sync(py, py.detach(|| self.stack().map(drop)))
    }

    /// The image tokenizer: name, hash, codebook size, pixels per token, ladder levels.
    fn tokenizer_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stack = sync(py, py.detach(|| self.stack()))?;
        let t = &stack.tokenizer;
        let d = PyDict::new(py);
        d.set_item("name", &t.id().name)?;
        d.set_item("sha256", &t.id().sha256)?;
        d.set_item("codebook_size", t.codebook_size())?;
        d.set_item("patch", t.factor())?;
        d.set_item("levels", t.levels())?;
        Ok(d)
    }

    /// Tokenizes an RGB image (`width × height × 3` bytes) into the grids of levels `1..=levels`
    /// after scaling it down to `max_side` (0: never): `(levels, height, width, ids as
    /// little-endian u32 bytes)`. Releases the GIL.
    #[pyo3(signature = (width, height, rgb, levels, max_side, rdo=RdoConfig::default().lambda))]
    #[allow(clippy::too_many_arguments)]
    fn tokenize<'py>(
        &self,
        py: Python<'py>,
        width: u32,
        height: u32,
        rgb: Vec<u8>,
        levels: usize,
        max_side: u32,
        rdo: f32,
    ) -> PyResult<(usize, u32, u32, Bound<'py, PyBytes>)> {
        let r = py.detach(|| -> Result<_, Failure> {
            let stack = self.stack()?;
            let img = tokenizer::fit(rgb_from_bytes(width, height, rgb)?, max_side);
            let grids = stack.with_encoder(rdo, |t| {
                if levels == 0 || levels > t.levels() {
                    return Err(Failure::content(format!(
                        "levels={levels}: the tokenizer {:?} has levels 1..={}",
                        t.id().name,
                        t.levels()
                    )));
                }
                t.encode_levels(&img, levels)
                    .map_err(|e| Failure::content(format!("tokenizing the image: {e}")))
            })?;
            let (h, w) = (grids[0].height(), grids[0].width());
            let bytes: Vec<u8> = grids.iter().flat_map(grid_bytes).collect();
            Ok((grids.len(), h, w, bytes))
        });
        let (n, h, w, bytes) = sync(py, r)?;
        Ok((n, h, w, PyBytes::new(py, &bytes)))
    }

    /// Detokenizes the grids of levels `1..=levels` (`levels × height × width` little-endian
    /// u32 ids): `(width, height, RGB bytes)`, cropped to `crop` (width, height) when given.
    /// Releases the GIL.
    #[pyo3(signature = (levels, height, width, ids, crop=None))]
    fn detokenize<'py>(
        &self,
        py: Python<'py>,
        levels: usize,
        height: u32,
        width: u32,
        ids: Vec<u8>,
        crop: Option<(u32, u32)>,
    ) -> PyResult<(u32, u32, Bound<'py, PyBytes>)> {
        let r = py.detach(|| -> Result<_, Failure> {
            let stack = self.stack()?;
            let t = &stack.tokenizer;
            let per = height as usize * width as usize * 4;
            if levels == 0 || ids.len() != per * levels {
                return Err(Failure::content(format!(
                    "{levels} level(s) of a {height}×{width} grid need {} bytes of ids, got {}",
                    per * levels.max(1),
                    ids.len()
                )));
            }
            let grids = ids
                .chunks_exact(per.max(1))
                .map(|c| grid_from_bytes(height, width, c, t.codebook_size()))
                .collect::<Result<Vec<_>, _>>()?;
            let img = match crop {
                Some((w, h)) => t.decode_levels_to(&grids, w, h),
                None => t.decode_levels(&grids),
            }
            .map_err(|e| Failure::content(format!("detokenizing the grid: {e}")))?;
            Ok((img.width(), img.height(), img.into_raw()))
        });
        let (w, h, rgb) = sync(py, r)?;
        Ok((w, h, PyBytes::new(py, &rgb)))
    }

    /// Encodes an RGB image into the bytes of a `.umic` file (what `unimic encode` writes):
    /// scaled down to `max_side`, `quality` levels of the ladder, or as many as fit in
    /// `max_bytes`. Releases the GIL.
    #[pyo3(signature = (width, height, rgb, quality=1, max_bytes=None, max_side=1024, rdo=RdoConfig::default().lambda))]
    #[allow(clippy::too_many_arguments)]
    fn encode<'py>(
        &self,
        py: Python<'py>,
        width: u32,
        height: u32,
        rgb: Vec<u8>,
        quality: usize,
        max_bytes: Option<usize>,
        max_side: u32,
        rdo: f32,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let r = py.detach(|| -> Result<Vec<u8>, Failure> {
            let stack = self.stack()?;
            let img = tokenizer::fit(rgb_from_bytes(width, height, rgb)?, max_side);
            let options = unimic_codec::umic::EncodeOptions::default()
                .with_levels(quality)
                .with_max_bytes(max_bytes);
            let generic = stack.generic();
            let encoded = stack.with_encoder(rdo, |t| {
                unimic_codec::umic::encode_image(t, &img, generic, &stack.entropy_dir(), &options)
                    .map_err(umic_failure)
            })?;
            Ok(encoded.bytes)
        });
        let bytes = sync(py, r)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Decodes the bytes of a `.umic` file: `(width, height, RGB bytes)`, from its first
    /// `levels` levels (0: all). Releases the GIL.
    #[pyo3(signature = (data, levels=0))]
    fn decode<'py>(
        &self,
        py: Python<'py>,
        data: Vec<u8>,
        levels: usize,
    ) -> PyResult<(u32, u32, Bound<'py, PyBytes>)> {
        let r = py.detach(|| -> Result<_, Failure> {
            let stack = self.stack()?;
            let file = unimic_codec::umic::UmicFile::from_bytes(&data)
                .map_err(|e| Failure::codec(format!("not a readable .umic file: {e}")))?;
            // A file that names another shipped generic model is decoded with that one,
            // loaded from the entropy folder (`umic::decode_image`).
            let generic = stack.generic();
            let decoded = unimic_codec::umic::decode_image(
                stack.tokenizer.as_ref(),
                &file,
                generic,
                &stack.entropy_dir(),
                levels,
            )
            .map_err(umic_failure)?;
            Ok((decoded.width(), decoded.height(), decoded.into_raw()))
        });
        let (w, h, rgb) = sync(py, r)?;
        Ok((w, h, PyBytes::new(py, &rgb)))
    }
}

fn umic_failure(e: unimic_codec::umic::ImageError) -> Failure {
    match e {
        unimic_codec::umic::ImageError::Image(m) | unimic_codec::umic::ImageError::Budget(m) => {
            Failure::content(m)
        }
        other => Failure::codec(other.to_string()),
    }
}

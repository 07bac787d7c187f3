//! Images to `.umic` files and back (feature `vq`): what `unimic encode` / `unimic decode` and
//! the Python package's `encode` / `decode` do, in one place.
//!
//! Encoding tokenizes the image into the levels asked for, codes level 1 with the generic
//! transformer when one is given, fits and no chunking is asked for (else with the adaptive
//! model through the part codec), each refinement level with its ladder model, and drops levels
//! from the top until the file fits a byte budget. Decoding checks the file against the
//! tokenizer and the models it names **before** any decoding work (a crafted header cannot ask
//! for more than a tokenizer could have produced, and names read from a file are compared, never
//! made into paths), then decodes the levels kept and detokenizes, cropped to the image size.
//!
//! ```
//! use unimic_codec::umic::{decode_image, encode_image, EncodeOptions, UmicFile};
//! use unimic_codec::{shipped, tokenizer};
//! let tok = tokenizer::load_default()?;
//! let (generic, _) = unimic_codec::entropy::generic::Generic::load(
//!     &shipped::manifest_path(&shipped::entropy_dir(None), shipped::GENERIC_ID),
//! )?;
//! let img = image::RgbImage::from_fn(40, 24, |x, y| image::Rgb([x as u8 * 6, y as u8 * 9, 90]));
//! let ladder = shipped::entropy_dir(None);
//! let options = EncodeOptions::default().with_levels(2);
//! let enc = encode_image(&tok, &img, Some((shipped::GENERIC_ID, &generic)), &ladder, &options)?;
//! let file = UmicFile::from_bytes(&enc.bytes)?;
//! let back = decode_image(&tok, &file, Some((shipped::GENERIC_ID, &generic)), &ladder, 0)?;
//! assert_eq!(back.dimensions(), (40, 24));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::Path;

use image::RgbImage;
use thiserror::Error;

use super::{hash8, is_model_id, model_kind, Level, ModelTag, UmicFile};
use crate::context::{SequenceKind, SessionContext};
use crate::entropy::generic::Generic;
use crate::entropy::ladder::LadderModel;
use crate::grid::TokenGrid;
use crate::part::{model_id, DecodedPart, ModelChoice, PartCodec, PartShape, PartSpec, PartTokens};
use crate::tokenizer::{ImageTokenizer, MAX_TOKENS};

/// Why an image could not be encoded into a `.umic` file, or a file decoded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The image cannot be tokenized (empty, too many tokens) or the options ask for what the
    /// tokenizer cannot do (levels).
    #[error("{0}")]
    Image(String),
    /// Even level 1 does not fit the byte budget.
    #[error("{0}")]
    Budget(String),
    /// A model the file names is not held here, or differs from ours.
    #[error("{0}")]
    Model(String),
    /// The file is inconsistent with itself or with the tokenizer (refused before decoding).
    #[error("{0}")]
    File(String),
    /// Coding failed (a corrupt payload, when decoding).
    #[error("{0}")]
    Coding(String),
}

fn coding(e: impl std::fmt::Display) -> ImageError {
    ImageError::Coding(e.to_string())
}

/// How level 1 is entropy-coded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Level1Model {
    /// The generic transformer when one is given, the grid fits its positions and codebook and
    /// no chunking is asked for; the adaptive model otherwise.
    #[default]
    Auto,
    /// The adaptive context-mixing model (no weights; chunkable).
    Adaptive,
    /// The generic transformer (an error when none is given).
    Generic,
}

/// How [`encode_image`] codes an image.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EncodeOptions {
    /// Levels of the quality ladder to send (1: the base grid only).
    pub levels: usize,
    /// Send as many levels as fit in a file of at most this many bytes (at least level 1;
    /// [`ImageError::Budget`] when even that does not fit). Overrides `levels`.
    pub max_bytes: Option<usize>,
    /// Tokens per independently decodable chunk of level 1 (0: one chunk; only the adaptive
    /// model chunks).
    pub chunk_tokens: u32,
    /// The model of level 1.
    pub model: Level1Model,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            levels: 1,
            max_bytes: None,
            chunk_tokens: 0,
            model: Level1Model::Auto,
        }
    }
}

impl EncodeOptions {
    /// Sends `levels` levels of the ladder.
    pub fn with_levels(mut self, levels: usize) -> Self {
        self.levels = levels;
        self
    }

    /// Sends as many levels as fit in `max_bytes` (`None`: [`Self::levels`]).
    pub fn with_max_bytes(mut self, max_bytes: Option<usize>) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Chunks level 1 into parts of `chunk_tokens` tokens (0: one chunk).
    pub fn with_chunk_tokens(mut self, chunk_tokens: u32) -> Self {
        self.chunk_tokens = chunk_tokens;
        self
    }

    /// Codes level 1 with `model`.
    pub fn with_model(mut self, model: Level1Model) -> Self {
        self.model = model;
        self
    }
}

/// An encoded image.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Encoded {
    /// The file.
    pub file: UmicFile,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Bits of level 1's payload.
    pub level1_bits: u64,
    /// Level 1's grid.
    pub grid: TokenGrid,
    /// Whether level 1 fell back to the adaptive model under [`Level1Model::Auto`] because the
    /// grid exceeds the generic transformer's positions (with the generic model's side).
    pub exceeds_generic: Option<u32>,
}

/// The name a `.umic` file gives a built-in entropy model's wire id.
pub fn builtin_model_name(id: u32) -> &'static str {
    match id {
        model_id::UNIFORM
        | model_id::STATIC_GRID
        | model_id::ADAPTIVE_GRID
        | model_id::ADAPTIVE_TEXT
        | model_id::STATIC_TEXT => model_id::wire_name(id),
        _ => "unimic-entropy/unknown",
    }
}

/// The model choice of a grid model named by [`builtin_model_name`] (uniform and adaptive are
/// the weightless ones a file can be decoded with).
pub fn builtin_choice(name: &str) -> Option<ModelChoice> {
    match name {
        "unimic-entropy/uniform" => Some(ModelChoice::Uniform),
        "unimic-entropy/adaptive-grid" => Some(ModelChoice::Adaptive),
        _ => None,
    }
}

fn hex_hash8(hex: &str) -> Result<[u8; 8], ImageError> {
    let mut out = [0u8; 8];
    for (i, b) in out.iter_mut().enumerate() {
        let pair = hex
            .get(2 * i..2 * i + 2)
            .ok_or_else(|| ImageError::Model(format!("hash {hex:?} is too short")))?;
        *b = u8::from_str_radix(pair, 16)
            .map_err(|_| ImageError::Model(format!("hash {hex:?} is not hex")))?;
    }
    Ok(out)
}

fn hex8(h: &[u8; 8]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// Encodes `image` (any size the tokenizer takes; scale it first with
/// [`tokenizer::fit`](crate::tokenizer::fit)) into a `.umic` file: `generic` is the generic
/// transformer `(id, model)` for level 1, `ladder_dir` the folder of the ladder models
/// (`unimic-entropy-ladder-l<level>-v1.umstatic`).
pub fn encode_image(
    tokenizer: &dyn ImageTokenizer,
    image: &RgbImage,
    generic: Option<(&str, &Generic)>,
    ladder_dir: &Path,
    options: &EncodeOptions,
) -> Result<Encoded, ImageError> {
    let levels_wanted = match options.max_bytes {
        Some(_) => tokenizer.levels(),
        None => options.levels,
    };
    if levels_wanted == 0 || levels_wanted > tokenizer.levels() {
        return Err(ImageError::Image(format!(
            "quality {levels_wanted}: the tokenizer {:?} has levels 1..={}",
            tokenizer.id().name,
            tokenizer.levels()
        )));
    }
    let mut grids = tokenizer.encode_levels(image, levels_wanted).map_err(|e| {
        ImageError::Image(format!(
            "tokenizing the {}×{} px image: {e} (scaling it down makes fewer tokens)",
            image.width(),
            image.height()
        ))
    })?;
    let refinements = grids.split_off(1);
    let grid = grids.remove(0);
    let mut exceeds_generic = None;
    let generic = match options.model {
        Level1Model::Adaptive => None,
        Level1Model::Generic => {
            if options.chunk_tokens != 0 {
                return Err(ImageError::Image(
                    "the generic transformer codes one chunk; ask for no chunking".into(),
                ));
            }
            Some(generic.ok_or_else(|| {
                ImageError::Model("no generic transformer entropy model is held here".into())
            })?)
        }
        Level1Model::Auto if options.chunk_tokens != 0 => None,
        Level1Model::Auto => generic.filter(|(_, g)| {
            let side = g.config().max_side as u32;
            let fits = grid.height() <= side && grid.width() <= side;
            if !fits {
                exceeds_generic = Some(side);
            }
            fits && grid.codebook_size() as usize == g.config().codebook_size
        }),
    };
    let (model, chunks, level1_bits) = match generic {
        Some((id, g)) => {
            let payload = g.encode(&grid).map_err(coding)?;
            let bits = 8 * payload.len() as u64;
            (
                ModelTag {
                    name: id.to_string(),
                    version: 1,
                    hash: hex_hash8(g.content_hash())?,
                },
                vec![(grid.len() as u64, payload)],
                bits,
            )
        }
        None => {
            let mut codec = PartCodec::default();
            let ctx = SessionContext::default();
            let spec = PartSpec::new(ModelChoice::Adaptive).with_chunk_tokens(options.chunk_tokens);
            let part = codec
                .encode(&ctx, PartTokens::Grid(&grid), &spec)
                .map_err(coding)?;
            (
                ModelTag {
                    name: builtin_model_name(part.model.id).to_string(),
                    version: u64::from(part.model.version),
                    hash: hash8(&part.model.hash),
                },
                part.chunks
                    .iter()
                    .map(|c| (u64::from(c.tokens), c.payload.clone()))
                    .collect(),
                part.bits,
            )
        }
    };
    let mut levels = Vec::with_capacity(refinements.len());
    for (i, g) in refinements.iter().enumerate() {
        let level = i + 2;
        let m = LadderModel::load(ladder_dir, level, 1).map_err(|e| {
            ImageError::Model(format!(
                "loading the entropy model of ladder level {level}: {e}"
            ))
        })?;
        let payload = m.encode(g).map_err(coding)?;
        levels.push(Level {
            model: ModelTag {
                name: m.id(),
                version: m.version(),
                hash: hash8(&m.content_hash()),
            },
            chunks: vec![(g.len() as u64, payload)],
        });
    }
    let tokenizer_hash = hex_hash8(&tokenizer.id().sha256)?;
    let mut file = UmicFile {
        tokenizer: ModelTag {
            name: tokenizer.id().name.clone(),
            version: 1,
            hash: tokenizer_hash,
        },
        model,
        image_width: u64::from(image.width()),
        image_height: u64::from(image.height()),
        grid_height: u64::from(grid.height()),
        grid_width: u64::from(grid.width()),
        codebook_size: u64::from(grid.codebook_size()),
        chunks,
        levels,
    };
    let mut bytes = file.to_bytes();
    if let Some(limit) = options.max_bytes {
        while bytes.len() > limit && !file.levels.is_empty() {
            file.levels.pop();
            bytes = file.to_bytes();
        }
        if bytes.len() > limit {
            return Err(ImageError::Budget(format!(
                "a budget of {limit} bytes: even level 1 alone takes {} bytes (a smaller image \
                 makes fewer tokens)",
                bytes.len()
            )));
        }
    }
    Ok(Encoded {
        file,
        bytes,
        level1_bits,
        grid,
        exceeds_generic,
    })
}

/// Checks a file before anything is loaded or decoded for it: [`check_names`], then
/// [`check_against`] `tokenizer`.
pub fn check_file(file: &UmicFile, tokenizer: &dyn ImageTokenizer) -> Result<(), ImageError> {
    check_names(file)?;
    check_against(file, tokenizer)
}

/// Checks the models a file names before anything is loaded for them: level 1's is a built-in
/// model or a generic transformer's id, each refinement level's is the ladder model of that
/// level. Names are only compared, never made into paths (a ladder model's file name is made of
/// the level's position and the version number alone).
pub fn check_names(file: &UmicFile) -> Result<(), ImageError> {
    let name = &file.model.name;
    if builtin_choice(name).is_none() && model_kind(name) != Some("generic") {
        return Err(ImageError::Model(format!("unknown entropy model {name:?}")));
    }
    for (i, l) in file.levels.iter().enumerate() {
        let level = i + 2;
        if l.model.name != LadderModel::id_of(level, l.model.version) {
            return Err(ImageError::Model(format!(
                "level {level} names the entropy model {:?}; a level-{level} model is {}",
                l.model.name,
                LadderModel::id_of(level, l.model.version)
            )));
        }
    }
    Ok(())
}

/// Checks the file's grid, levels and image size against the tokenizer before any decoding:
/// codebook size, at most [`MAX_TOKENS`] tokens, no more levels than the tokenizer has, and an
/// image no larger than the grid's pixels (the decoder crops to it).
pub fn check_against(file: &UmicFile, tokenizer: &dyn ImageTokenizer) -> Result<(), ImageError> {
    let tokens = file.grid_height * file.grid_width;
    if tokens > MAX_TOKENS as u64 {
        return Err(ImageError::File(format!(
            "the file declares a {}×{} grid ({tokens} tokens); tokenizers here decode at most {MAX_TOKENS}",
            file.grid_height, file.grid_width
        )));
    }
    if file.codebook_size != u64::from(tokenizer.codebook_size()) {
        return Err(ImageError::File(format!(
            "the file's codebook size {} differs from the tokenizer's {}",
            file.codebook_size,
            tokenizer.codebook_size()
        )));
    }
    let levels = 1 + file.levels.len();
    if levels > tokenizer.levels() {
        return Err(ImageError::File(format!(
            "the file carries {levels} levels; the tokenizer {:?} has {}",
            tokenizer.id().name,
            tokenizer.levels()
        )));
    }
    let f = u64::from(tokenizer.factor());
    let (w, h) = (file.grid_width * f, file.grid_height * f);
    if file.image_width > w || file.image_height > h {
        return Err(ImageError::File(format!(
            "the file declares a {}×{} px image; its {}×{} grid decodes to {w}×{h} px",
            file.image_width, file.image_height, file.grid_height, file.grid_width
        )));
    }
    Ok(())
}

/// Decodes a `.umic` file with `tokenizer` (which must be the one the file names: compare
/// [`UmicFile::tokenizer`] first when several are held): [`check_file`], then level 1 (with
/// `generic`, the generic transformer `(id, model)` held, when the file names it; else the
/// generic model the file names, loaded from `entropy_dir` by
/// [`crate::shipped::generic_model`]; or a built-in model), the first `levels` levels (0: all
/// the file carries) with the ladder models in `entropy_dir`, and the image cropped to its size.
pub fn decode_image(
    tokenizer: &dyn ImageTokenizer,
    file: &UmicFile,
    generic: Option<(&str, &Generic)>,
    entropy_dir: &Path,
    levels: usize,
) -> Result<RgbImage, ImageError> {
    let grids = decode_grids(tokenizer, file, generic, entropy_dir, levels)?;
    let size = |v: u64| u32::try_from(v).map_err(|_| ImageError::File("image too large".into()));
    tokenizer
        .decode_levels_to(&grids, size(file.image_width)?, size(file.image_height)?)
        .map_err(coding)
}

/// The grids of the levels [`decode_image`] detokenizes (level 1 first).
pub fn decode_grids(
    tokenizer: &dyn ImageTokenizer,
    file: &UmicFile,
    generic: Option<(&str, &Generic)>,
    entropy_dir: &Path,
    levels: usize,
) -> Result<Vec<TokenGrid>, ImageError> {
    if hex_hash8(&tokenizer.id().sha256)? != file.tokenizer.hash {
        return Err(ImageError::Model(format!(
            "the file was encoded with tokenizer {:?} (hash {}), not with {:?}",
            file.tokenizer.name,
            hex8(&file.tokenizer.hash),
            tokenizer.id().name
        )));
    }
    check_file(file, tokenizer)?;
    let dim = |v: u64| u32::try_from(v).map_err(|_| ImageError::File("grid too large".into()));
    let (height, width) = (dim(file.grid_height)?, dim(file.grid_width)?);
    let shape = PartShape::Grid {
        height,
        width,
        codebook_size: dim(file.codebook_size)?,
    };
    let grid = if is_model_id(&file.model.name) {
        decode_transformer(file, generic, entropy_dir, height, width)?
    } else {
        decode_builtin(file, shape)?
    };
    let keep = if levels == 0 {
        file.levels.len()
    } else {
        levels.saturating_sub(1).min(file.levels.len())
    };
    let mut grids = vec![grid];
    for (i, level) in file.levels.iter().take(keep).enumerate() {
        grids.push(decode_level(entropy_dir, i + 2, level, height, width)?);
    }
    Ok(grids)
}

/// Decodes refinement level `level` of a ladder file with the ladder model it names.
fn decode_level(
    dir: &Path,
    level: usize,
    l: &Level,
    height: u32,
    width: u32,
) -> Result<TokenGrid, ImageError> {
    let m = LadderModel::load(dir, level, l.model.version).map_err(|e| {
        ImageError::Model(format!(
            "level {level} needs entropy model {:?} (version {}), which is not in {}: {e}",
            l.model.name,
            l.model.version,
            dir.display()
        ))
    })?;
    if m.id() != l.model.name || hash8(&m.content_hash()) != l.model.hash {
        return Err(ImageError::Model(format!(
            "level {level}'s entropy model {:?} has hash {}, ours ({}) has {}",
            l.model.name,
            hex8(&l.model.hash),
            m.id(),
            hex8(&hash8(&m.content_hash()))
        )));
    }
    let [(tokens, payload)] = l.chunks.as_slice() else {
        return Err(ImageError::File(format!(
            "a ladder level has exactly one chunk, level {level} has {}",
            l.chunks.len()
        )));
    };
    if *tokens != u64::from(height) * u64::from(width) {
        return Err(ImageError::File(format!(
            "level {level}'s chunk declares {tokens} tokens for a {height}×{width} grid"
        )));
    }
    m.decode(height, width, payload).map_err(coding)
}

/// Decodes level 1 coded by a generic transformer (one chunk; the model named by its id and
/// identified by its weights' hash).
fn decode_transformer(
    file: &UmicFile,
    generic: Option<(&str, &Generic)>,
    entropy_dir: &Path,
    height: u32,
    width: u32,
) -> Result<TokenGrid, ImageError> {
    // A file written with another (an earlier shipped) generic model names it: load that one.
    let loaded;
    let (id, model) = match generic.filter(|(id, _)| *id == file.model.name) {
        Some(held) => held,
        None => {
            loaded = crate::shipped::generic_model(entropy_dir, &file.model.name)
                .map_err(|e| {
                    ImageError::Model(format!(
                        "the file's entropy model {:?}: {e}",
                        file.model.name
                    ))
                })?
                .ok_or_else(|| {
                    ImageError::Model(format!(
                        "the file needs entropy model {:?}, which is not in {}",
                        file.model.name,
                        entropy_dir.display()
                    ))
                })?;
            (file.model.name.as_str(), &loaded.0)
        }
    };
    let ours = hex_hash8(model.content_hash())?;
    if ours != file.model.hash || file.model.version != 1 {
        return Err(ImageError::Model(format!(
            "the file's entropy model {:?} has hash {} (version {}), ours ({id}) has {} (version 1)",
            file.model.name,
            hex8(&file.model.hash),
            file.model.version,
            hex8(&ours)
        )));
    }
    let [(tokens, payload)] = file.chunks.as_slice() else {
        return Err(ImageError::File(format!(
            "a {} file has exactly one chunk, this one has {}",
            file.model.name,
            file.chunks.len()
        )));
    };
    if *tokens != u64::from(height) * u64::from(width) {
        return Err(ImageError::File(format!(
            "the chunk declares {tokens} tokens for a {height}×{width} grid"
        )));
    }
    model.decode(height, width, payload).map_err(coding)
}

/// Decodes level 1 coded by a built-in (weightless) model through the part codec.
fn decode_builtin(file: &UmicFile, shape: PartShape) -> Result<TokenGrid, ImageError> {
    let choice = builtin_choice(&file.model.name)
        .ok_or_else(|| ImageError::Model(format!("unknown entropy model {:?}", file.model.name)))?;
    let mut codec = PartCodec::default();
    let ctx = SessionContext::default();
    let chunk_tokens = match file.chunks.as_slice() {
        [] => return Err(ImageError::File("the file has no chunks".into())),
        [_] => 0,
        [(first, _), ..] => u32::try_from(*first)
            .map_err(|_| ImageError::File("a chunk of too many tokens".into()))?,
    };
    let spec = PartSpec::new(choice).with_chunk_tokens(chunk_tokens);
    let identity = codec.identity(choice, SequenceKind::Grid).map_err(coding)?;
    if hash8(&identity.hash) != file.model.hash || u64::from(identity.version) != file.model.version
    {
        return Err(ImageError::Model(format!(
            "the file's entropy model {:?} differs from ours (hash or version)",
            file.model.name
        )));
    }
    let digest = ctx.digest(&[]).map_err(coding)?;
    let decoder = codec
        .decoder(&ctx, shape, &spec, &digest, &identity)
        .map_err(coding)?;
    if decoder.chunks() != file.chunks.len() as u64 {
        return Err(ImageError::File(format!(
            "the file has {} chunks where its shape implies {}",
            file.chunks.len(),
            decoder.chunks()
        )));
    }
    for (i, (tokens, _)) in file.chunks.iter().enumerate() {
        let (start, end) = decoder.chunk_range(i as u64).map_err(coding)?;
        if end - start != *tokens {
            return Err(ImageError::File(format!(
                "chunk {i} declares {tokens} tokens where the chunking implies {}",
                end - start
            )));
        }
    }
    match decoder
        .decode_all(file.chunks.iter().map(|(_, p)| p.as_slice()))
        .map_err(coding)?
    {
        DecodedPart::Grid(g) => Ok(g),
        other => Err(ImageError::Coding(format!(
            "decoded a {other:?} where a grid was expected"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_are_recognised_by_form_only() {
        assert_eq!(model_kind("unimic-entropy-generic-v7"), Some("generic"));
        assert_eq!(model_kind("unimic-entropy-masked-v12"), Some("masked"));
        for bad in [
            "unimic-entropy-x/../../decoy",
            "unimic-entropy--v1",
            "unimic-entropy-generic-v",
            "unimic-entropy-Generic-v1",
            "unimic-entropy/adaptive-grid",
            "unimic-entropy-generic-v1234567890",
        ] {
            assert!(!is_model_id(bad), "{bad}");
        }
        assert_eq!(
            builtin_choice(builtin_model_name(model_id::ADAPTIVE_GRID)),
            Some(ModelChoice::Adaptive)
        );
    }
}

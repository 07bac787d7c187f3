//! The models shipped in the repository's `models/` folder: their ids, where they are found, and
//! the codec configuration that offers them in a session's handshake.
//!
//! The folder of a source checkout is compiled in (`models/` next to this crate); every function
//! also takes an explicit folder, so a build that keeps the models elsewhere (the Python wheel
//! carries them as package data) passes its own. The layout under a models root is the
//! repository's: `tokenizer-taef2/` (the default image tokenizer, whose manifest names
//! `../taef2/taef2_encoder.safetensors`), `taef2/` and `entropy/`.
//!
//! ```
//! use unimic_codec::shipped;
//! let dir = shipped::entropy_dir(None);
//! let codec = shipped::codec_config(&dir)?;
//! // The shipped generic and masked transformers are offered when their files are present.
//! assert_eq!(codec.generic.is_some(), dir.join(format!("{}.json", shipped::GENERIC_ID)).exists());
//! # Ok::<(), unimic_codec::nn::model::ModelError>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::entropy::generic::Generic;
use crate::entropy::ladder::{Ladder, LadderModel};
use crate::entropy::masked::Masked;
use crate::nn::model::{Manifest, ModelError};
use crate::part::CodecConfig;

/// Id of the shipped generic (raster, causal) transformer entropy model.
pub const GENERIC_ID: &str = "unimic-entropy-generic-v11";

/// Id of the shipped masked (known-prefix) transformer entropy model.
pub const MASKED_ID: &str = "unimic-entropy-masked-v10";

/// Id of the shipped text-conditioned transformer entropy model.
pub const TEXT_ID: &str = "unimic-entropy-text-v7";

/// Highest quality-ladder level the shipped ladder models code (levels 2 ..= 4 of the default
/// tokenizer, `unimic-entropy-ladder-l<level>-v1.umstatic`).
pub const LADDER_TOP_LEVEL: usize = 4;

/// Version of the shipped ladder models.
pub const LADDER_VERSION: u64 = 1;

/// The `models/` folder of the source tree this crate was built from.
pub fn source_models_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models"))
}

/// The folder of the transformer entropy models: `dir`, else `$UNIMIC_ENTROPY`, else
/// `entropy/` of [`source_models_dir`].
pub fn entropy_dir(dir: Option<&Path>) -> PathBuf {
    match (dir, std::env::var_os("UNIMIC_ENTROPY")) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(p)) => PathBuf::from(p),
        (None, None) => source_models_dir().join("entropy"),
    }
}

/// The manifest of the shipped model `id` in `entropy_dir` (`<entropy_dir>/<id>.json`).
pub fn manifest_path(entropy_dir: &Path, id: &str) -> PathBuf {
    entropy_dir.join(format!("{id}.json"))
}

/// The codec that `unimic serve`, `chat`, `demo` and the Python package use: with the shipped
/// generic transformer (images), masked transformer (edits: only the region travels) and
/// quality-ladder models (refinement levels 2 ..= [`LADDER_TOP_LEVEL`]) from `entropy_dir` when
/// their files are there, so that both ends of a session negotiate them. A model whose file is
/// present but does not load is an error.
pub fn codec_config(entropy_dir: &Path) -> Result<CodecConfig, ModelError> {
    let mut codec = CodecConfig::default();
    let generic = manifest_path(entropy_dir, GENERIC_ID);
    if generic.exists() {
        let (model, _) = Generic::load(&generic)?;
        codec = codec.with_generic(Arc::new(model));
    }
    let masked = manifest_path(entropy_dir, MASKED_ID);
    if masked.exists() {
        let (model, _) = Masked::load(&masked)?;
        codec = codec.with_masked(Arc::new(model));
    }
    let ladder_file = |l: usize| {
        entropy_dir.join(format!(
            "{}.umstatic",
            LadderModel::id_of(l, LADDER_VERSION)
        ))
    };
    if (2..=LADDER_TOP_LEVEL).all(|l| ladder_file(l).exists()) {
        let ladder = Ladder::load(entropy_dir, LADDER_TOP_LEVEL, LADDER_VERSION)
            .map_err(|e| ModelError::Manifest(format!("the quality ladder's models: {e}")))?;
        codec = codec.with_ladder(Arc::new(ladder));
    }
    Ok(codec)
}

/// Loads the generic transformer `id` from `entropy_dir`, or `None` when its manifest is not
/// there: how a `.umic` file written with an earlier shipped model (the file names it) still
/// decodes. `id` may come from a file, so it must have the form of a generic model's id
/// (`unimic-entropy-generic-v<n>`, [`crate::umic::model_kind`]); its manifest `<id>.json` is
/// found among the folder's entries (no path is made of the name), and it must carry that id.
///
/// ```
/// use unimic_codec::shipped;
/// let dir = shipped::entropy_dir(None);
/// if let Some((model, manifest)) = shipped::generic_model(&dir, shipped::GENERIC_ID)? {
///     assert_eq!(manifest.id, shipped::GENERIC_ID);
///     # let _ = model;
/// }
/// assert!(shipped::generic_model(&dir, "unimic-entropy-generic-v7/../../x").is_err());
/// # Ok::<(), unimic_codec::nn::model::ModelError>(())
/// ```
pub fn generic_model(
    entropy_dir: &Path,
    id: &str,
) -> Result<Option<(Generic, Manifest)>, ModelError> {
    if crate::umic::model_kind(id) != Some("generic") {
        return Err(ModelError::Manifest(format!(
            "{id:?} is not the id of a generic entropy model (unimic-entropy-generic-v<n>)"
        )));
    }
    let name = std::ffi::OsString::from(format!("{id}.json"));
    let entries = match std::fs::read_dir(entropy_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ModelError::Io {
                path: entropy_dir.to_path_buf(),
                source,
            })
        }
    };
    let mut path = None;
    for entry in entries {
        let entry = entry.map_err(|source| ModelError::Io {
            path: entropy_dir.to_path_buf(),
            source,
        })?;
        if entry.file_name() == name && entry.path().is_file() {
            path = Some(entry.path());
            break;
        }
    }
    let Some(path) = path else {
        return Ok(None);
    };
    let (model, manifest) = Generic::load(&path)?;
    if manifest.id != id {
        return Err(ModelError::Manifest(format!(
            "{} holds the model {:?}, not {id:?}",
            path.display(),
            manifest.id
        )));
    }
    Ok(Some((model, manifest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_folder_gives_the_weightless_codec_and_a_broken_manifest_is_an_error() {
        let dir = std::env::temp_dir().join(format!("unimic-shipped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let codec = codec_config(&dir).unwrap();
        assert!(codec.generic.is_none() && codec.masked.is_none() && codec.ladder.is_none());
        std::fs::write(manifest_path(&dir, GENERIC_ID), b"{ not json").unwrap();
        assert!(codec_config(&dir).is_err());
        std::fs::remove_file(manifest_path(&dir, GENERIC_ID)).unwrap();
        for l in 2..=LADDER_TOP_LEVEL {
            let f = dir.join(format!(
                "{}.umstatic",
                LadderModel::id_of(l, LADDER_VERSION)
            ));
            std::fs::write(f, b"not a model").unwrap();
        }
        assert!(codec_config(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_source_tree_holds_the_shipped_models() {
        let dir = entropy_dir(Some(&source_models_dir().join("entropy")));
        let codec = codec_config(&dir).unwrap();
        assert!(codec.generic.is_some() && codec.masked.is_some());
        assert_eq!(
            codec.ladder.as_ref().map(|l| l.top_level()),
            Some(LADDER_TOP_LEVEL)
        );
        assert!(manifest_path(&dir, TEXT_ID).exists());
    }
}

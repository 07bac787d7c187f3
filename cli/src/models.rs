//! Model loading and image preparation shared by the CLI's commands.

use std::path::Path;

use anyhow::{bail, Context};
use image::{imageops, RgbImage};
use unimic_codec::entropy::generic::Generic;
use unimic_codec::nn::model::Manifest;
use unimic_codec::part::{model_id, ModelChoice};
use unimic_codec::tokenizer::{self, DynTokenizer, ImageTokenizer};

/// Loads the tokenizer from `dir`, or the shipped default (`models/tokenizer-taef2`, or
/// `$UNIMIC_TOKENIZER`).
pub fn tokenizer(dir: Option<&Path>) -> anyhow::Result<DynTokenizer> {
    match dir {
        Some(d) => tokenizer::load_dir(d)
            .with_context(|| format!("loading tokenizer from {}", d.display())),
        None => tokenizer::load_default().with_context(|| {
            format!(
                "loading the default tokenizer from {}",
                tokenizer::default_dir().display()
            )
        }),
    }
}

/// The tokenizer a file names (by `name` and the first 8 bytes of its hash): `dir` when given
/// (which must match), else the default or whichever shipped tokenizer matches. The error names
/// the tokenizer the file needs when none here does.
pub fn tokenizer_for(
    dir: Option<&Path>,
    name: &str,
    hash: [u8; 8],
) -> anyhow::Result<DynTokenizer> {
    let hex = |h: &[u8; 8]| h.iter().map(|b| format!("{b:02x}")).collect::<String>();
    if let Some(d) = dir {
        let t = tokenizer(Some(d))?;
        let ours = tokenizer_hash8(t.as_ref())?;
        if ours != hash {
            bail!(
                "the file was encoded with tokenizer {name:?} (hash {}), but {} holds {:?} (hash {})",
                hex(&hash),
                d.display(),
                t.id().name,
                hex(&ours)
            );
        }
        return Ok(t);
    }
    let mut dirs = vec![tokenizer::default_dir()];
    dirs.extend(tokenizer::shipped_dirs());
    let mut seen = Vec::new();
    for d in dirs {
        if !d.join(tokenizer::MANIFEST_FILE).exists() || seen.contains(&d) {
            continue;
        }
        seen.push(d.clone());
        let t = tokenizer(Some(&d))?;
        if tokenizer_hash8(t.as_ref())? == hash {
            return Ok(t);
        }
    }
    bail!(
        "the file was encoded with tokenizer {name:?} (hash {}), which is not shipped here \
         (looked in {}); pass its directory with --tokenizer",
        hex(&hash),
        seen.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The folder of the transformer entropy models: `dir`, else `$UNIMIC_ENTROPY`, else the
/// shipped `models/entropy`.
pub fn entropy_dir(dir: Option<&Path>) -> std::path::PathBuf {
    match (dir, std::env::var_os("UNIMIC_ENTROPY")) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(p)) => std::path::PathBuf::from(p),
        (None, None) => {
            std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/entropy"))
        }
    }
}

/// The first 8 bytes of the tokenizer's weights hash.
pub fn tokenizer_hash8(t: &dyn ImageTokenizer) -> anyhow::Result<[u8; 8]> {
    hex_hash8(&t.id().sha256).context("tokenizer hash")
}

/// The first 8 bytes of a hex SHA-256.
pub fn hex_hash8(hex: &str) -> anyhow::Result<[u8; 8]> {
    let mut out = [0u8; 8];
    for (i, b) in out.iter_mut().enumerate() {
        let pair = hex.get(2 * i..2 * i + 2).context("hash is too short")?;
        *b = u8::from_str_radix(pair, 16).context("hash is not hex")?;
    }
    Ok(out)
}

/// PNG and JPEG files directly in `dir`, sorted by file name.
pub fn list_images(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut v: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Reads a captions file (`captions.csv`: an optional `image,caption` header, then one
/// `image,caption` line per caption, several per image allowed) into `(image, caption)` pairs in
/// file order. The caption is everything after the first comma, trimmed; one wrapped in double
/// quotes (CSV quoting, as when it contains a comma) loses them and `""` becomes `"`. Blank lines
/// are skipped; a line without a comma is an error. Training and the benchmarks read captions
/// only through this function, so both see the same text.
pub fn read_captions(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if n == 0 && line.starts_with("image,") {
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let (image, caption) = line
            .split_once(',')
            .with_context(|| format!("{}:{}: no comma", path.display(), n + 1))?;
        let caption = caption.trim();
        let caption = caption
            .strip_prefix('"')
            .and_then(|c| c.strip_suffix('"'))
            .map(|c| c.replace("\"\"", "\""))
            .unwrap_or_else(|| caption.to_string());
        out.push((image.trim().to_string(), caption));
    }
    Ok(out)
}

/// A path under the system's temporary folder that is unique to this process and call, removed
/// (with everything under it) when dropped: scratch space for tests.
#[cfg(test)]
pub struct Scratch(std::path::PathBuf);

#[cfg(test)]
impl Scratch {
    /// A new scratch path whose name starts with `unimic-{tag}-` (nothing is created yet).
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self(std::env::temp_dir().join(format!(
            "unimic-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )))
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Id of the shipped generic (raster, causal) transformer entropy model.
pub const GENERIC_ID: &str = "unimic-entropy-generic-v7";

/// Id of the shipped masked (known-prefix) transformer entropy model.
pub const MASKED_ID: &str = "unimic-entropy-masked-v7";

/// Id of the shipped text-conditioned transformer entropy model.
pub const TEXT_ID: &str = "unimic-entropy-text-v6";

/// The shipped model id of a transformer kind (`generic`, `masked` or `text`).
pub fn shipped_id(kind: &str) -> Option<&'static str> {
    match kind {
        "generic" => Some(GENERIC_ID),
        "masked" => Some(MASKED_ID),
        "text" => Some(TEXT_ID),
        _ => None,
    }
}

/// Loads the transformer entropy model `id` (kind generic) from the entropy folder, or `None`
/// when its manifest is absent.
pub fn generic_model(dir: Option<&Path>, id: &str) -> anyhow::Result<Option<(Generic, Manifest)>> {
    let path = entropy_dir(dir).join(format!("{id}.json"));
    if !path.exists() {
        return Ok(None);
    }
    Generic::load(&path)
        .map(Some)
        .with_context(|| format!("loading {}", path.display()))
}

/// The name written to files for a built-in entropy model's wire id.
pub fn entropy_name(id: u32) -> &'static str {
    match id {
        model_id::UNIFORM => "unimic-entropy/uniform",
        model_id::STATIC_GRID => "unimic-entropy/static-grid",
        model_id::ADAPTIVE_GRID => "unimic-entropy/adaptive-grid",
        model_id::ADAPTIVE_TEXT => "unimic-entropy/adaptive-text",
        model_id::STATIC_TEXT => "unimic-entropy/static-text",
        _ => "unimic-entropy/unknown",
    }
}

/// The model choice for a grid model name written by [`entropy_name`].
pub fn entropy_choice(name: &str) -> Option<ModelChoice> {
    match name {
        "unimic-entropy/uniform" => Some(ModelChoice::Uniform),
        "unimic-entropy/adaptive-grid" => Some(ModelChoice::Adaptive),
        _ => None,
    }
}

/// Scales `img` down (Catmull-Rom, aspect ratio kept, sides rounded, at least one pixel) so that
/// neither side exceeds `max_side` pixels; `max_side == 0` or an image that already fits is
/// returned as it is.
pub fn fit(img: RgbImage, max_side: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if max_side == 0 || (w <= max_side && h <= max_side) {
        return img;
    }
    let s = f64::from(max_side) / f64::from(w.max(h));
    let nw = ((f64::from(w) * s).round() as u32).clamp(1, max_side);
    let nh = ((f64::from(h) * s).round() as u32).clamp(1, max_side);
    imageops::resize(&img, nw, nh, imageops::FilterType::CatmullRom)
}

/// Resizes the shorter side to `size` (Catmull-Rom) and center-crops to `size × size` (the
/// preparation every bench and `encode --size` share);
/// `size == 0` keeps the image as it is.
pub fn prepare(img: RgbImage, size: u32) -> RgbImage {
    if size == 0 {
        return img;
    }
    let (w, h) = img.dimensions();
    let s = f64::from(size) / f64::from(w.min(h));
    let nw = ((f64::from(w) * s).round() as u32).max(size);
    let nh = ((f64::from(h) * s).round() as u32).max(size);
    let r = imageops::resize(&img, nw, nh, imageops::FilterType::CatmullRom);
    imageops::crop_imm(&r, (nw - size) / 2, (nh - size) / 2, size, size).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;
    use unimic_codec::grid::TokenGrid;
    use unimic_codec::nn::weights::splitmix64;

    #[test]
    fn fit_scales_down_to_the_longer_side_only_when_needed() {
        let img = RgbImage::new(4032, 3024);
        assert_eq!(fit(img.clone(), 1024).dimensions(), (1024, 768));
        assert_eq!(fit(img.clone(), 0).dimensions(), (4032, 3024));
        assert_eq!(fit(img, 5000).dimensions(), (4032, 3024));
        assert_eq!(fit(RgbImage::new(3000, 2), 1000).dimensions(), (1000, 1));
        assert_eq!(fit(RgbImage::new(700, 1401), 700).dimensions(), (350, 700));
    }

    fn grid(height: u32, width: u32, seed: u64) -> TokenGrid {
        let ids = (0..u64::from(height * width))
            .map(|i| (splitmix64(seed ^ i) % 1024) as u32)
            .collect();
        TokenGrid::new(height, width, 1024, ids).unwrap()
    }

    #[test]
    fn captions_are_read_with_csv_quoting() {
        let scratch = Scratch::new("captions-csv");
        let path = scratch.path().join("captions.csv");
        std::fs::create_dir_all(scratch.path()).unwrap();
        std::fs::write(
            &path,
            "image,caption\na.jpg,A dog runs .\n\nb.jpg ,\"Two cats , asleep .\"\nb.jpg,\"A \"\"big\"\" cat\"\n",
        )
        .unwrap();
        let caps = read_captions(&path);
        std::fs::write(&path, "image,caption\nno comma here\n").unwrap();
        let bad = read_captions(&path);
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            caps.unwrap(),
            pairs(&[
                ("a.jpg", "A dog runs ."),
                ("b.jpg", "Two cats , asleep ."),
                ("b.jpg", "A \"big\" cat"),
            ])
        );
        assert!(bad.unwrap_err().to_string().contains(":2: no comma"));
    }

    /// `.umic` files name their generic model by id: every generic model a released `encode`
    /// has written with stays shipped and loads (its weights' hash checked against the manifest).
    #[test]
    fn every_generic_model_a_file_may_name_still_loads() {
        for v in 1..=GENERIC_ID
            .rsplit('v')
            .next()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap()
        {
            let id = format!("unimic-entropy-generic-v{v}");
            let (model, manifest) = generic_model(None, &id).unwrap().unwrap();
            assert_eq!(manifest.id, id);
            assert_eq!(model.config().codebook_size, 1024, "{id}");
        }
    }

    /// generic-v4 is generic-v3 with position rows 16.. trained (models/entropy/README.md): a grid
    /// within 16×16 codes to the same bytes, one with a row beyond 15 does not, and both decode.
    #[test]
    fn generic_v4_codes_grids_within_16x16_exactly_as_v3() {
        let (v3, _) = generic_model(None, "unimic-entropy-generic-v3")
            .unwrap()
            .unwrap();
        let (v4, m4) = generic_model(None, "unimic-entropy-generic-v4")
            .unwrap()
            .unwrap();
        assert_ne!(v3.content_hash(), v4.content_hash());
        assert_eq!(m4.training.map(|t| t.steps), Some(1200));
        for (h, w) in [(16, 16), (3, 16), (16, 5)] {
            let g = grid(h, w, u64::from(h * 100 + w));
            assert_eq!(v3.encode(&g).unwrap(), v4.encode(&g).unwrap(), "{h}x{w}");
        }
        let tall = grid(18, 3, 7);
        let (a, b) = (v3.encode(&tall).unwrap(), v4.encode(&tall).unwrap());
        assert_ne!(a, b);
        assert_eq!(v3.decode(18, 3, &a).unwrap(), tall);
        assert_eq!(v4.decode(18, 3, &b).unwrap(), tall);
    }
}

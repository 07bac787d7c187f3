//! Model loading and image preparation shared by the CLI's commands.

use std::path::Path;

use anyhow::{bail, Context};
use image::{imageops, RgbImage};
use unimic_codec::entropy::generic::Generic;
use unimic_codec::nn::model::Manifest;
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

/// The tokenizer that sends images (`chat`, `demo`, `encode`): the tokenizer from `dir` (else the
/// shipped default) with its level-1 codes chosen for the shipped generic model's bits at
/// `lambda` ([`unimic_codec::rdo`]; 0, a tokenizer other than TAEF2 or no generic model in
/// `entropy`: the nearest codes). It decodes as [`tokenizer`]'s does.
pub fn image_encoder(
    dir: Option<&Path>,
    entropy: Option<&Path>,
    lambda: f32,
) -> anyhow::Result<DynTokenizer> {
    anyhow::ensure!(
        lambda.is_finite() && lambda >= 0.0,
        "--rdo {lambda}: give a number >= 0 (0 keeps the nearest codes)"
    );
    let generic = if lambda > 0.0 {
        generic_model(entropy, GENERIC_ID)?.map(|(g, _)| std::sync::Arc::new(g))
    } else {
        None
    };
    image_encoder_with(dir, generic, lambda)
}

/// [`image_encoder`] with the generic model already loaded (`None`: the nearest codes).
pub fn image_encoder_with(
    dir: Option<&Path>,
    generic: Option<std::sync::Arc<Generic>>,
    lambda: f32,
) -> anyhow::Result<DynTokenizer> {
    let dir = dir.map_or_else(tokenizer::default_dir, Path::to_path_buf);
    let cfg = unimic_codec::rdo::RdoConfig::with_lambda(lambda);
    let (tok, _) = unimic_codec::rdo::load_dir(&dir, generic, cfg)
        .with_context(|| format!("loading tokenizer from {}", dir.display()))?;
    Ok(tok)
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
/// shipped `models/entropy` ([`unimic_codec::shipped::entropy_dir`]).
pub fn entropy_dir(dir: Option<&Path>) -> std::path::PathBuf {
    unimic_codec::shipped::entropy_dir(dir)
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

/// Reads a captions file (`captions.csv`) into `(image, caption)` pairs in file order: CSV as
/// RFC 4180 defines it, parsed by the `csv` crate (LF or CRLF line ends; a field in double quotes
/// may hold commas, line breaks and quotes written `""`). Every record has two fields, `image` and
/// `caption` (several records per image allowed), each trimmed of surrounding whitespace; a first
/// record `image,caption` is a header and skipped, blank lines are skipped. A record with another
/// number of fields, an empty image name, text that is not UTF-8 or a quoted field still open at
/// the end of the file is an error naming the file and the line the record starts on. Training
/// and the benchmarks read captions only through this function, so both see the same text.
pub fn read_captions(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    check_input_file(path)?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse_captions(&bytes, &path.display().to_string())
}

/// [`read_captions`] on the bytes of a file; `name` prefixes the errors (`name:line: ...`).
pub fn parse_captions(bytes: &[u8], name: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let mut record = csv::StringRecord::new();
    let mut out = Vec::new();
    let mut first = true;
    let mut last = None;
    // Line numbers are counted here from the records' byte offsets: csv-core 0.1 does not count
    // the line breaks inside a quoted field, so its own line numbers fall behind after one.
    let mut lines = LineCounter::default();
    loop {
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                let line = e
                    .position()
                    .map_or(0, |p| lines.line_at(bytes, record_start(bytes, p.byte())));
                match e.kind() {
                    csv::ErrorKind::Utf8 { err, .. } => {
                        bail!("{name}:{line}: field {} is not UTF-8", err.field() + 1)
                    }
                    _ => bail!("{name}:{line}: {e}"),
                }
            }
        }
        let pos = record
            .position()
            .context("the CSV reader gave a record without a position")?;
        let start = record_start(bytes, pos.byte());
        let line = lines.line_at(bytes, start);
        last = Some((start, line));
        let is_header =
            first && record.len() == 2 && &record[0] == "image" && &record[1] == "caption";
        first = false;
        if is_header || (record.len() == 1 && record[0].is_empty()) {
            continue;
        }
        if record.len() != 2 {
            bail!(
                "{name}:{line}: {} field(s) where a record has 2 (image,caption; quote a caption \
                 that holds a comma)",
                record.len()
            );
        }
        if record[0].is_empty() {
            bail!("{name}:{line}: empty image name");
        }
        out.push((record[0].to_string(), record[1].to_string()));
    }
    // The csv crate ends a quoted field left open at the end of the input as if it were closed,
    // which would take the rest of the file for one caption: refuse that.
    if let Some((start, line)) = last {
        if quote_left_open(&bytes[start..]) {
            bail!("{name}:{line}: a quoted field is not closed before the end of the file");
        }
    }
    Ok(out)
}

/// Where the record the csv crate places at byte `at` starts: past the line breaks there (after
/// a CRLF the crate's position points at the LF, and blank lines before a record are skipped).
fn record_start(bytes: &[u8], at: u64) -> usize {
    let mut at = usize::try_from(at).unwrap_or(usize::MAX).min(bytes.len());
    while at < bytes.len() && matches!(bytes[at], b'\r' | b'\n') {
        at += 1;
    }
    at
}

/// 1-based line numbers of byte offsets met in increasing order.
#[derive(Default)]
struct LineCounter {
    offset: usize,
    breaks: u64,
}

impl LineCounter {
    /// The line that byte `at` of `bytes` is on (offsets at or after the previous one).
    fn line_at(&mut self, bytes: &[u8], at: usize) -> u64 {
        let at = at.min(bytes.len());
        if at > self.offset {
            self.breaks += bytes[self.offset..at]
                .iter()
                .filter(|&&b| b == b'\n')
                .count() as u64;
            self.offset = at;
        }
        self.breaks + 1
    }
}

/// Whether the CSV record that `raw` starts with (and runs to the end of `raw`) leaves a quoted
/// field open: a field whose first byte is `"` must end with a `"` not doubled.
fn quote_left_open(raw: &[u8]) -> bool {
    let mut at_field_start = true;
    let mut quoted = false;
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if quoted {
            if b == b'"' {
                if raw.get(i + 1) == Some(&b'"') {
                    i += 1;
                } else {
                    quoted = false;
                }
            }
        } else if at_field_start && b == b'"' {
            quoted = true;
            at_field_start = false;
        } else if b == b',' {
            at_field_start = true;
        } else if b == b'\n' || b == b'\r' {
            return false;
        } else {
            at_field_start = false;
        }
        i += 1;
    }
    quoted
}

/// Checks, before any work, that `path` names a file that can be read: says plainly when it is
/// missing or a directory.
pub fn check_input_file(path: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => bail!(
            "{} is a directory; give the path of a file in it",
            path.display()
        ),
        Ok(_) => std::fs::File::open(path)
            .map(drop)
            .with_context(|| format!("cannot read {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{} does not exist", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Checks, before any work, that `path` names a directory (of images, say): says plainly when
/// it is missing or a file.
pub fn check_input_dir(path: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!("{} is a file; give a directory", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("the directory {} does not exist", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The directory a file `path` would be written into (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Checks, before any work, that a file can be written at `path`: it is not a directory, its
/// directory exists, and the file can be opened for writing there (an existing file is left as
/// it is; a new one is created and removed again).
pub fn check_output_file(path: &Path) -> anyhow::Result<()> {
    if path.as_os_str().is_empty() {
        bail!("the output path is empty");
    }
    if path.is_dir() {
        bail!(
            "the output {} is a directory; give a file name (e.g. {})",
            path.display(),
            path.join("out").display()
        );
    }
    let dir = parent_dir(path);
    if !dir.is_dir() {
        bail!(
            "cannot write {}: the directory {} does not exist{}",
            path.display(),
            dir.display(),
            if dir.exists() { " (it is a file)" } else { "" }
        );
    }
    if path.exists() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .with_context(|| format!("cannot write {}", path.display()))
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
    }
}

/// Checks, before any work, that files named `PREFIX-…` can be written for the output prefix
/// `prefix`: it is not a directory (nor ends with a separator) and its directory exists.
pub fn check_output_prefix(prefix: &Path) -> anyhow::Result<()> {
    let s = prefix.as_os_str().to_string_lossy();
    if s.is_empty() || s.ends_with(std::path::MAIN_SEPARATOR) || s.ends_with('/') || prefix.is_dir()
    {
        bail!(
            "the output {} is a directory; give a prefix for the file names (e.g. {})",
            prefix.display(),
            Path::new(s.trim_end_matches(['/', std::path::MAIN_SEPARATOR]))
                .join("grids")
                .display()
        );
    }
    let dir = parent_dir(prefix);
    if !dir.is_dir() {
        bail!(
            "cannot write {}-…: the directory {} does not exist",
            prefix.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Creates the output directory `dir` (and its parents) before any work, with a plain error
/// when a file is in the way or it cannot be created.
pub fn create_output_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!(
            "the output directory {} exists and is a file",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the output directory {}", dir.display()))
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

/// Ids of the shipped transformer entropy models (generic, masked, text-conditioned).
pub use unimic_codec::shipped::{GENERIC_ID, MASKED_ID, TEXT_ID};

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
/// when its manifest is absent ([`unimic_codec::shipped::generic_model`]: `id` may come from a
/// file; it must be a generic model's id, and no path is made of it).
pub fn generic_model(dir: Option<&Path>, id: &str) -> anyhow::Result<Option<(Generic, Manifest)>> {
    let dir = entropy_dir(dir);
    unimic_codec::shipped::generic_model(&dir, id)
        .with_context(|| format!("loading the entropy model {id:?} from {}", dir.display()))
}

/// Scales `img` down so that neither side exceeds `max_side` pixels (0: never): the size policy
/// of `encode --max-side` and the Python package, [`unimic_codec::tokenizer::fit`].
pub fn fit(img: RgbImage, max_side: u32) -> RgbImage {
    tokenizer::fit(img, max_side)
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
    use unimic_codec::umic::{is_model_id, model_kind};

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

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
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
        assert_eq!(
            read_captions(&path).unwrap(),
            pairs(&[
                ("a.jpg", "A dog runs ."),
                ("b.jpg", "Two cats , asleep ."),
                ("b.jpg", "A \"big\" cat"),
            ])
        );
        // A directory where the file should be is named as such.
        let err = read_captions(scratch.path()).unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
    }

    /// What a real captioned set's export looks like: CRLF line ends, a quoted caption spanning
    /// two lines, embedded quotes and commas; the hand-written reader failed on it with "no
    /// comma" at the caption's second line.
    #[test]
    fn captions_csv_with_crlf_and_a_caption_spanning_two_lines() {
        let text = "image,caption\r\n\
                    1.jpg,A child climbs stairs .\r\n\
                    1.jpg,\"A girl, in pink,\r\ngoes up \"\"slowly\"\" .\"\r\n\
                    2.jpg,\"Dogs , \"\"two\"\" of them\"\r\n\
                    \r\n\
                    2.jpg,  Padded caption  \r\n\
                    3.jpg,\"\"\r\n\
                    4.jpg,Last line without a line end";
        assert_eq!(
            parse_captions(text.as_bytes(), "captions.csv").unwrap(),
            pairs(&[
                ("1.jpg", "A child climbs stairs ."),
                ("1.jpg", "A girl, in pink,\r\ngoes up \"slowly\" ."),
                ("2.jpg", "Dogs , \"two\" of them"),
                ("2.jpg", "Padded caption"),
                ("3.jpg", ""),
                ("4.jpg", "Last line without a line end"),
            ])
        );
        // Without a header the first record is a caption; a header is only skipped first.
        let caps = parse_captions(b"x.jpg,A\nimage,caption\n", "c").unwrap();
        assert_eq!(caps, pairs(&[("x.jpg", "A"), ("image", "caption")]));
        // LF only, the same multi-line caption.
        let caps = parse_captions(b"a.jpg,\"one\ntwo\"\nb.jpg,three\n", "c").unwrap();
        assert_eq!(caps, pairs(&[("a.jpg", "one\ntwo"), ("b.jpg", "three")]));
        assert!(parse_captions(b"", "c").unwrap().is_empty());
        assert!(parse_captions(b"image,caption\r\n", "c")
            .unwrap()
            .is_empty());
    }

    /// Malformed files fail with the file name and the line the bad record starts on.
    #[test]
    fn malformed_captions_name_the_line() {
        let err = |text: &[u8]| parse_captions(text, "caps.csv").unwrap_err().to_string();
        let e = err(b"image,caption\na.jpg,ok\nno comma here\n");
        assert!(e.starts_with("caps.csv:3: 1 field(s)"), "{e}");
        // An unquoted comma in a caption makes three fields.
        let e = err(b"image,caption\r\na.jpg,\"two\r\nlines\"\r\nb.jpg,a dog, a cat\r\n");
        assert!(e.starts_with("caps.csv:4: 3 field(s)"), "{e}");
        let e = err(b"a.jpg,fine\n,no image\n");
        assert!(e.starts_with("caps.csv:2: empty image name"), "{e}");
        let e = err(b"a.jpg,fine\nb.jpg,\"never closed\nc.jpg,swallowed\n");
        assert!(
            e.starts_with("caps.csv:2: a quoted field is not closed"),
            "{e}"
        );
        let e = err(b"image,caption\r\na.jpg,\"x\r\ny\"\r\n\r\nb.jpg,\"open\r\nc.jpg,z\r\n");
        assert!(
            e.starts_with("caps.csv:5: a quoted field is not closed"),
            "{e}"
        );
        let e = err(b"image,caption\na.jpg,ok\nb.jpg,caf\xe9\n");
        assert!(e.starts_with("caps.csv:3: field 2 is not UTF-8"), "{e}");
        // A quote inside an unquoted field is literal (the csv crate's reading), and a closed
        // quoted field at the end of the file is not mistaken for an open one.
        assert_eq!(
            parse_captions(b"a.jpg,5\" tall\nb.jpg,\"x\"\"\"", "c").unwrap(),
            pairs(&[("a.jpg", "5\" tall"), ("b.jpg", "x\"")])
        );
    }

    #[test]
    fn input_and_output_paths_are_checked_before_the_work() {
        let scratch = Scratch::new("paths");
        let dir = scratch.path();
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join("in.png");
        std::fs::write(&file, b"x").unwrap();
        let msg = |r: anyhow::Result<()>| r.unwrap_err().to_string();

        check_input_file(&file).unwrap();
        assert!(msg(check_input_file(dir)).contains("is a directory"));
        assert!(msg(check_input_file(&dir.join("nope.png"))).contains("does not exist"));
        check_input_dir(dir).unwrap();
        assert!(msg(check_input_dir(&file)).contains("is a file"));
        assert!(msg(check_input_dir(&dir.join("nope"))).contains("does not exist"));

        // A new file in an existing directory: fine, and nothing is left behind.
        let out = dir.join("out.umic");
        check_output_file(&out).unwrap();
        assert!(!out.exists());
        // An existing file is fine and kept as it is.
        check_output_file(&file).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
        let e = msg(check_output_file(&dir.join("missing").join("out.umic")));
        assert!(e.contains("does not exist") && e.contains("missing"), "{e}");
        let e = msg(check_output_file(&file.join("out.umic")));
        assert!(e.contains("it is a file"), "{e}");
        assert!(msg(check_output_file(dir)).contains("is a directory"));

        check_output_prefix(&dir.join("grids")).unwrap();
        assert!(msg(check_output_prefix(dir)).contains("is a directory"));
        assert!(msg(check_output_prefix(&dir.join("missing").join("g"))).contains("does not exist"));

        let sub = dir.join("a").join("b");
        create_output_dir(&sub).unwrap();
        assert!(sub.is_dir());
        create_output_dir(&sub).unwrap();
        assert!(msg(create_output_dir(&file)).contains("is a file"));
    }

    #[test]
    fn model_ids_name_no_folder_and_are_looked_up_by_listing() {
        for ok in ["unimic-entropy-generic-v7", "unimic-entropy-masked-v12"] {
            assert!(is_model_id(ok), "{ok}");
        }
        for bad in [
            "unimic-entropy-generic-v7/../../x",
            "unimic-entropy-../v1",
            "unimic-entropy-generic-v",
            "unimic-entropy--v1",
            "unimic-entropy-generic-v1.json",
            "unimic-entropy/adaptive-grid",
            "../unimic-entropy-generic-v7",
        ] {
            assert!(!is_model_id(bad), "{bad}");
        }
        assert_eq!(model_kind("unimic-entropy-text-v6"), Some("text"));
        let e = generic_model(None, "unimic-entropy-generic-v7/../../x").unwrap_err();
        assert!(format!("{e:#}").contains("is not the id"), "{e:#}");
        assert!(generic_model(None, "unimic-entropy-generic-v999")
            .unwrap()
            .is_none());
        // A manifest under another file name than its id is not taken for it.
        let scratch = Scratch::new("entropy-ids");
        std::fs::create_dir_all(scratch.path()).unwrap();
        let shipped = entropy_dir(None);
        std::fs::copy(
            shipped.join(format!("{GENERIC_ID}.json")),
            scratch.path().join("unimic-entropy-generic-v99.json"),
        )
        .unwrap();
        let weights = format!("{GENERIC_ID}.safetensors");
        std::fs::copy(shipped.join(&weights), scratch.path().join(&weights)).unwrap();
        let e = generic_model(Some(scratch.path()), "unimic-entropy-generic-v99").unwrap_err();
        assert!(format!("{e:#}").contains("holds the model"), "{e:#}");
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

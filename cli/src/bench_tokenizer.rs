//! `unimic bench tokenizer`: an image tokenizer against the classic codecs at equal bytes.
//!
//! For each image: the tokens' raw size (`ceil(tokens · log2(K) / 8)` bytes, before any entropy
//! coding), then each classic codec at the setting whose file size is nearest to the token bytes:
//! JPEG (image crate, quality 1–100, every setting tried) and lossy WebP (libwebp, quality 0–100,
//! every setting tried); AVIF (`avifenc`/`avifdec` from Debian's `libavif-bin`: 4:2:0, speed 6,
//! one thread, `--min Q --max Q` with quantizer `Q` 0–63) and JPEG XL (`cjxl`/`djxl` from
//! `libjxl-tools`: effort 7, one thread, butteraugli distance 0.1–25) when their tools are on
//! `PATH`. Those two are searched by bisection, since their file size shrinks steadily as the
//! setting coarsens (see [`nearest_sorted`]). A codec whose tools are missing is reported on its own
//! line (`"missing"` in JSON) and left out. At the tokens' rate the classic codecs usually sit at
//! their smallest file, which is then what "nearest" picks.
//!
//! Each row (codec × image) reports bytes, bpp, PSNR, SSIM, MS-SSIM and mean CIEDE2000 against the
//! prepared original (definitions in [`unimic_codec::tokenizer::metrics`]); the tokenizer's rows
//! also its encode and decode time (wall clock, one untimed warm-up first; `threads` is the CPU
//! thread count candle uses, `RAYON_NUM_THREADS` or all cores, so `RAYON_NUM_THREADS=1` gives the
//! one-core time). The last rows are means per codec.
//!
//! `--recognize PYTHON` adds recognition agreement: every original and every decoded image is
//! written as PNG under `--out DIR/decoded/` (or a temporary folder, removed afterwards), and
//! `tools/recognizers/agreement.py` runs once with that interpreter over all (original, decoded)
//! pairs, with the two pretrained recognizers of `../shared/models/recognizers` (or
//! `--recognizers DIR`; needs onnxruntime, numpy and Pillow). Each row then carries
//! `"recognition"`: classifier top-1 agreement, the original's top-1 within the decoded top-3,
//! cosine between the softmax vectors, and the detector's recall of the original's detections; the
//! mean rows carry the counts, the mean cosine and the pooled recall (matched / original
//! detections over all images).
//!
//! `--codebook-subsets 128,256,512 --usage-images DIR` (VQ tokenizers only) also measures smaller
//! codebooks carved out of the trained one: the codes are ranked by how often they occur in the
//! tokens of `DIR` (never the evaluation images), and each image is tokenized again choosing only
//! among the top `k` codes (`codec` `"vq-k<k>"`, bytes `ceil(tokens · log2(k) / 8)`). This is the
//! cheap half of a codebook-size study: it says what fewer codes cost, not what a larger trained
//! codebook gains.
//!
//! `--size S` resizes the shorter side to `S` (Catmull-Rom) and centre-crops `S×S`; `--size 0`
//! keeps the native size (the tokenizer pads to multiples of its factor; metrics are computed on
//! the original pixels). `--out DIR` writes one side-by-side PNG per image (original | tokens |
//! JPEG | WebP | AVIF | JPEG XL, the codecs measured, in that order) and, when every image has the
//! same size, `sheet.png` with all of them stacked top to bottom.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use std::sync::Arc;

use anyhow::{bail, ensure, Context};
use image::{imageops, RgbImage};
use serde::{Deserialize, Serialize};
use unimic_codec::rdo::{RdoConfig, RdoTokenizer};
use unimic_codec::tokenizer::metrics::{mean_ciede2000, ms_ssim, psnr, ssim};
use unimic_codec::tokenizer::taef2::TAEF2_MANIFEST_FORMAT;
use unimic_codec::tokenizer::{ImageTokenizer, Taef2Tokenizer, Vq, MANIFEST_FILE, MANIFEST_FORMAT};

/// Arguments of `unimic bench tokenizer`.
#[derive(clap::Args)]
pub struct Args {
    /// Directory of test images (PNG/JPEG), e.g. ../shared/data/kodak.
    #[arg(long)]
    pub images: PathBuf,
    /// Centre-crop side after resizing the shorter side to it; 0 keeps the native size.
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write side-by-side PNGs (original | tokens | JPEG | WebP | AVIF | JPEG XL) and sheet.png
    /// here (and, with --recognize, the decoded images under decoded/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Tokenizer directory (manifest.json + weights); default: the shipped models/tokenizer.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Use at most this many images (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Also measure codebooks of only the `k` most used codes, for each `k` listed
    /// (comma-separated, each below the codebook size); needs `--usage-images` and a VQ tokenizer.
    #[arg(long, value_delimiter = ',')]
    pub codebook_subsets: Vec<u32>,
    /// Images whose tokens rank the codes by use, for `--codebook-subsets` (not the test images;
    /// e.g. ../shared/data/bsds500/test).
    #[arg(long)]
    pub usage_images: Option<PathBuf>,
    /// Use at most this many usage images (0: all).
    #[arg(long, default_value_t = 50)]
    pub usage_limit: usize,
    /// Measure recognition agreement with this Python interpreter (needs onnxruntime, numpy,
    /// Pillow), running tools/recognizers/agreement.py once over all images.
    #[arg(long, value_name = "PYTHON")]
    pub recognize: Option<PathBuf>,
    /// The recognizers' folder; default: $UNIMIC_SHARED/models/recognizers, else
    /// ../shared/models/recognizers next to the checkout.
    #[arg(long)]
    pub recognizers: Option<PathBuf>,
    /// Also measure rate-distortion optimized level-1 codes (TAEF2 tokenizers only), one row per
    /// λ listed (comma-separated; `0` is the nearest codes): `bytes` is then the range-coded
    /// payload under the shipped generic model, not the raw size.
    #[arg(long, value_delimiter = ',')]
    pub rdo: Vec<f32>,
    /// Codewords considered per cell for `--rdo`.
    #[arg(long, default_value_t = unimic_codec::rdo::RdoConfig::default().candidates)]
    pub rdo_candidates: usize,
    /// Folder of the generic entropy model for `--rdo` (default: the shipped `models/entropy`,
    /// or `$UNIMIC_ENTROPY`).
    #[arg(long)]
    pub entropy_dir: Option<PathBuf>,
}

/// The codes of `tok` ranked by use in the tokens of `dir`'s images (ties by index), and how many
/// images were read.
fn rank_codes(tok: &Vq, dir: &Path, size: u32, limit: usize) -> anyhow::Result<(Vec<u32>, usize)> {
    let mut paths = crate::models::list_images(dir)?;
    if limit > 0 {
        paths.truncate(limit);
    }
    if paths.is_empty() {
        bail!("no images in {}", dir.display());
    }
    let mut counts = vec![0u64; tok.codebook_size() as usize];
    for p in &paths {
        let img = image::open(p)
            .with_context(|| format!("opening {}", p.display()))?
            .to_rgb8();
        let size = if size == 0 { 256 } else { size };
        for &id in tok.encode(&crate::models::prepare(img, size))?.ids() {
            counts[id as usize] += 1;
        }
    }
    let mut order: Vec<u32> = (0..tok.codebook_size()).collect();
    order.sort_by_key(|&c| (std::cmp::Reverse(counts[c as usize]), c));
    Ok((order, paths.len()))
}

/// Loads the tokenizer in `dir` as a trait object, by its manifest's `format`, with the name its
/// rows carry as `codec` (`vq`, or `taef2`: level 1 only, the trait's encoding).
fn load_tokenizer(dir: &Path) -> anyhow::Result<(Box<dyn ImageTokenizer>, &'static str)> {
    #[derive(Deserialize)]
    struct Format {
        format: String,
    }
    let m = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&m).with_context(|| format!("reading {}", m.display()))?;
    let f: Format =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", m.display()))?;
    let codec = match f.format.as_str() {
        MANIFEST_FORMAT => "vq",
        TAEF2_MANIFEST_FORMAT => "taef2",
        other => bail!(
            "{}: unknown tokenizer format {other:?} (this bench knows {MANIFEST_FORMAT:?} and \
             {TAEF2_MANIFEST_FORMAT:?})",
            m.display()
        ),
    };
    Ok((unimic_codec::tokenizer::load_dir(dir)?, codec))
}

/// One image's recognition agreement, as `tools/recognizers/agreement.py` prints it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct PairAgreement {
    top1_agree: bool,
    orig_top1_in_top3: bool,
    prob_cosine: f64,
    orig_top1: String,
    decoded_top1: String,
    orig_detections: u32,
    decoded_detections: u32,
    matched_detections: u32,
    detector_recall: Option<f64>,
}

/// Recognition agreement summed over a codec's images.
#[derive(Serialize, Clone, Debug, PartialEq)]
struct AgreementSummary {
    pairs: usize,
    top1_agree: usize,
    orig_top1_in_top3: usize,
    prob_cosine: f64,
    orig_detections: u32,
    matched_detections: u32,
    /// Matched over original detections, pooled over the images; `None` without any.
    detector_recall: Option<f64>,
}

impl AgreementSummary {
    fn of(pairs: &[&PairAgreement]) -> Self {
        let n = pairs.len();
        let orig: u32 = pairs.iter().map(|p| p.orig_detections).sum();
        let matched: u32 = pairs.iter().map(|p| p.matched_detections).sum();
        AgreementSummary {
            pairs: n,
            top1_agree: pairs.iter().filter(|p| p.top1_agree).count(),
            orig_top1_in_top3: pairs.iter().filter(|p| p.orig_top1_in_top3).count(),
            prob_cosine: pairs.iter().map(|p| p.prob_cosine).sum::<f64>() / n as f64,
            orig_detections: orig,
            matched_detections: matched,
            detector_recall: (orig > 0).then(|| f64::from(matched) / f64::from(orig)),
        }
    }
}

/// A row's recognition result: one pair's, or a codec's summary.
#[derive(Serialize, Clone, Debug)]
#[serde(untagged)]
enum Recognition {
    Pair(PairAgreement),
    Summary(AgreementSummary),
}

#[derive(Serialize, Clone)]
struct Row {
    codec: String,
    images: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    width: u32,
    height: u32,
    bytes: f64,
    bpp: f64,
    psnr: f64,
    ssim: f64,
    ms_ssim: f64,
    ciede2000: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    setting: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokenizer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encode_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decode_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    threads: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recognition: Option<Recognition>,
}

/// A codec that could not be measured.
#[derive(Serialize)]
struct Missing<'a> {
    codec: &'a str,
    missing: String,
}

fn jpeg(img: &RgbImage, q: u8) -> anyhow::Result<(Vec<u8>, RgbImage)> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, q).encode_image(img)?;
    let dec = image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg)?.to_rgb8();
    Ok((buf, dec))
}

fn webp_enc(img: &RgbImage, q: u8) -> anyhow::Result<(Vec<u8>, RgbImage)> {
    let enc = webp::Encoder::from_rgb(img.as_raw(), img.width(), img.height());
    let mem = enc
        .encode_simple(false, f32::from(q))
        .map_err(|e| anyhow::anyhow!("webp encode: {e:?}"))?;
    let buf = mem.to_vec();
    let dec = webp::Decoder::new(&buf)
        .decode()
        .context("webp decode failed")?;
    if dec.is_alpha() {
        bail!("unexpected alpha in webp output");
    }
    let out = RgbImage::from_raw(dec.width(), dec.height(), dec.to_vec())
        .context("webp decode size mismatch")?;
    Ok((buf, out))
}

/// Scans every one of `settings`, returning the encoding whose size is nearest to `target` bytes
/// (the first such on ties).
fn nearest<S, F>(settings: &[S], target: f64, mut enc: F) -> anyhow::Result<(S, Vec<u8>, RgbImage)>
where
    S: Copy,
    F: FnMut(S) -> anyhow::Result<(Vec<u8>, RgbImage)>,
{
    let mut best: Option<(S, Vec<u8>, RgbImage)> = None;
    for &q in settings {
        let (b, d) = enc(q)?;
        let better = best.as_ref().is_none_or(|(_, bb, _)| {
            (b.len() as f64 - target).abs() < (bb.len() as f64 - target).abs()
        });
        if better {
            best = Some((q, b, d));
        }
    }
    best.context("no settings")
}

/// Like [`nearest`] for `settings` ordered so that the file size grows along them: bisects for
/// the two settings around `target`, also tries one more on each side (a guard against small
/// non-monotonic steps), and returns the nearest of those tried (the earliest setting on ties).
/// About `log2(n) + 4` encodings instead of `n`.
fn nearest_sorted<S, F>(
    settings: &[S],
    target: f64,
    mut enc: F,
) -> anyhow::Result<(S, Vec<u8>, RgbImage)>
where
    S: Copy,
    F: FnMut(S) -> anyhow::Result<(Vec<u8>, RgbImage)>,
{
    let n = settings.len();
    if n == 0 {
        bail!("no settings");
    }
    let mut tried: Vec<Option<(Vec<u8>, RgbImage)>> = vec![None; n];
    let mut size =
        |i: usize, tried: &mut Vec<Option<(Vec<u8>, RgbImage)>>| -> anyhow::Result<f64> {
            if tried[i].is_none() {
                tried[i] = Some(enc(settings[i])?);
            }
            Ok(tried[i].as_ref().map_or(0.0, |(b, _)| b.len() as f64))
        };
    let (mut lo, mut hi) = (0, n - 1);
    if size(lo, &mut tried)? >= target {
        hi = lo;
    } else if size(hi, &mut tried)? <= target {
        lo = hi;
    } else {
        // size(lo) < target < size(hi)
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if size(mid, &mut tried)? < target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    for i in [lo.checked_sub(1), Some(hi + 1)].into_iter().flatten() {
        if i < n {
            size(i, &mut tried)?;
        }
    }
    let (i, (b, d)) = tried
        .into_iter()
        .enumerate()
        .filter_map(|(i, t)| t.map(|t| (i, t)))
        .min_by(|(i, (a, _)), (j, (b, _))| {
            let da = (a.len() as f64 - target).abs();
            let db = (b.len() as f64 - target).abs();
            da.total_cmp(&db).then(i.cmp(j))
        })
        .context("nothing encoded")?;
    Ok((settings[i], b, d))
}

/// The first executable file called `name` in the folders of `path` (a `PATH`-style list).
fn which_in(name: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    #[cfg(unix)]
    fn executable(m: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    fn executable(_: &std::fs::Metadata) -> bool {
        true
    }
    std::env::split_paths(path?)
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && executable(&m)))
}

/// A lossy codec run through its command-line encoder and decoder.
struct CliCodec {
    /// Row name: `avif` or `jxl`.
    codec: &'static str,
    enc: PathBuf,
    dec: PathBuf,
}

impl CliCodec {
    /// Finds `enc` and `dec` on `PATH`; `Err` says which are missing and where to get them.
    fn find(codec: &'static str, enc: &str, dec: &str, package: &str) -> Result<CliCodec, String> {
        let path = std::env::var_os("PATH");
        match (
            which_in(enc, path.as_deref()),
            which_in(dec, path.as_deref()),
        ) {
            (Some(e), Some(d)) => Ok(CliCodec {
                codec,
                enc: e,
                dec: d,
            }),
            (e, d) => {
                let gone: Vec<&str> = [(enc, e.is_none()), (dec, d.is_none())]
                    .into_iter()
                    .filter(|(_, m)| *m)
                    .map(|(n, _)| n)
                    .collect();
                Err(format!(
                    "{} not found on PATH (Debian package {package})",
                    gone.join(" and ")
                ))
            }
        }
    }

    /// Settings, smallest files first: AVIF quantizers 63..=0, JPEG XL distances 25 down to 0.1.
    fn settings(&self) -> Vec<f64> {
        match self.codec {
            "avif" => (0..=63).rev().map(f64::from).collect(),
            _ => JXL_DISTANCES.to_vec(),
        }
    }

    fn describe(&self, s: f64) -> String {
        match self.codec {
            "avif" => format!("quantizer {s}"),
            _ => format!("distance {s}"),
        }
    }

    /// Encodes `src` (a PNG of `w × h`) at setting `s` into `work`, decodes it back.
    fn run(
        &self,
        src: &Path,
        work: &Path,
        s: f64,
        w: u32,
        h: u32,
    ) -> anyhow::Result<(Vec<u8>, RgbImage)> {
        let coded = work.join(format!("coded.{}", self.codec));
        let back = work.join(format!("{}-decoded.png", self.codec));
        let mut enc = Command::new(&self.enc);
        let mut dec = Command::new(&self.dec);
        if self.codec == "avif" {
            let q = format!("{s}");
            enc.args(["-j", "1", "-s", "6", "-y", "420", "--min", &q, "--max", &q]);
            enc.arg(src).arg(&coded);
            dec.args(["-j", "1"]).arg(&coded).arg(&back);
        } else {
            enc.arg(src).arg(&coded);
            enc.args(["-d", &format!("{s}"), "-e", "7", "--num_threads=1"]);
            dec.arg(&coded).arg(&back).arg("--num_threads=1");
        }
        run_quiet(&mut enc)?;
        run_quiet(&mut dec)?;
        let bytes =
            std::fs::read(&coded).with_context(|| format!("reading {}", coded.display()))?;
        let img = image::open(&back)
            .with_context(|| format!("reading {}", back.display()))?
            .to_rgb8();
        for f in [&coded, &back] {
            let _ = std::fs::remove_file(f);
        }
        if img.dimensions() != (w, h) {
            bail!(
                "{} decoded {:?}, expected {w}x{h}",
                self.codec,
                img.dimensions()
            );
        }
        Ok((bytes, img))
    }
}

/// Butteraugli distances tried for JPEG XL, largest (smallest files) first.
const JXL_DISTANCES: [f64; 28] = [
    25.0, 22.0, 19.0, 17.0, 15.0, 13.0, 11.5, 10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.5, 4.0, 3.5, 3.0,
    2.5, 2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.3, 0.2, 0.1,
];

/// Runs a tool, failing with its stderr when it fails.
fn run_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn row(codec: &str, name: &str, img: &RgbImage, rec: &RgbImage, bytes: f64) -> anyhow::Result<Row> {
    let (w, h) = img.dimensions();
    Ok(Row {
        codec: codec.into(),
        images: 1,
        image: Some(name.into()),
        width: w,
        height: h,
        bytes,
        bpp: bytes * 8.0 / (f64::from(w) * f64::from(h)),
        psnr: psnr(img, rec).context("psnr")?,
        ssim: ssim(img, rec).context("ssim")?,
        ms_ssim: ms_ssim(img, rec).context("ms-ssim")?,
        ciede2000: mean_ciede2000(img, rec).context("ciede2000")?,
        setting: None,
        tokenizer: None,
        encode_ms: None,
        decode_ms: None,
        threads: None,
        recognition: None,
    })
}

fn mean(rows: &[Row]) -> Row {
    let n = rows.len() as f64;
    let m = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).sum::<f64>() / n;
    let opt = |f: &dyn Fn(&Row) -> Option<f64>| {
        rows.iter()
            .map(f)
            .collect::<Option<Vec<f64>>>()
            .map(|v| v.iter().sum::<f64>() / n)
    };
    let pairs: Option<Vec<&PairAgreement>> = rows
        .iter()
        .map(|r| match &r.recognition {
            Some(Recognition::Pair(p)) => Some(p),
            _ => None,
        })
        .collect();
    let same = |f: &dyn Fn(&Row) -> u32| rows.iter().all(|r| f(r) == f(&rows[0]));
    Row {
        codec: rows[0].codec.clone(),
        images: rows.len(),
        image: None,
        // 0 when the images differ in size.
        width: if same(&|r| r.width) { rows[0].width } else { 0 },
        height: if same(&|r| r.height) {
            rows[0].height
        } else {
            0
        },
        bytes: m(&|r| r.bytes),
        bpp: m(&|r| r.bpp),
        psnr: m(&|r| r.psnr),
        ssim: m(&|r| r.ssim),
        ms_ssim: m(&|r| r.ms_ssim),
        ciede2000: m(&|r| r.ciede2000),
        setting: None,
        tokenizer: rows[0].tokenizer.clone(),
        encode_ms: opt(&|r| r.encode_ms),
        decode_ms: opt(&|r| r.decode_ms),
        threads: rows[0].threads,
        recognition: pairs.map(|p| Recognition::Summary(AgreementSummary::of(&p))),
    }
}

/// The CPU threads candle's kernels use: `RAYON_NUM_THREADS` when a positive number, else every
/// core (candle's `get_num_threads` rule).
pub(crate) fn candle_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// `$UNIMIC_SHARED/models/recognizers`, else `../shared/models/recognizers` next to the checkout.
fn default_recognizers() -> PathBuf {
    std::env::var_os("UNIMIC_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
        .join("models/recognizers")
}

/// The agreement tool's script.
fn agreement_script() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tools/recognizers/agreement.py"
    ))
}

/// One (original, decoded) pair for the agreement tool.
#[derive(Serialize)]
struct Pair {
    id: String,
    original: PathBuf,
    decoded: PathBuf,
}

/// Parses the agreement tool's output, one JSON object with an `"id"` per line (blank lines
/// ignored), into results by id; fails on a malformed line or a repeated id.
fn parse_agreement(out: &str) -> anyhow::Result<HashMap<String, PairAgreement>> {
    #[derive(Deserialize)]
    struct Line {
        id: String,
        #[serde(flatten)]
        agreement: PairAgreement,
    }
    let mut map = HashMap::new();
    for (n, line) in out.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line)
            .with_context(|| format!("agreement tool output line {}: {line}", n + 1))?;
        if map.insert(l.id.clone(), l.agreement).is_some() {
            bail!("agreement tool output repeats id {:?}", l.id);
        }
    }
    Ok(map)
}

/// Runs `tools/recognizers/agreement.py` with `python` over `pairs` (manifest written to
/// `work/pairs.json`) and returns its results by id; every pair must have one.
fn run_agreement(
    python: &Path,
    models: &Path,
    work: &Path,
    pairs: &[Pair],
) -> anyhow::Result<HashMap<String, PairAgreement>> {
    let manifest = work.join("pairs.json");
    std::fs::write(&manifest, serde_json::to_vec(pairs)?)
        .with_context(|| format!("writing {}", manifest.display()))?;
    let script = agreement_script();
    eprintln!(
        "recognizers: {} pairs through {} {}",
        pairs.len(),
        python.display(),
        script.display()
    );
    let out = Command::new(python)
        .arg(&script)
        .arg("--pairs")
        .arg(&manifest)
        .arg("--models")
        .arg(models)
        .args(["--threads", "1"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({})",
            python.display(),
            script.display(),
            out.status
        );
    }
    let map = parse_agreement(&String::from_utf8_lossy(&out.stdout))?;
    if let Some(p) = pairs.iter().find(|p| !map.contains_key(&p.id)) {
        bail!("agreement tool gave no result for {:?}", p.id);
    }
    Ok(map)
}

/// A scratch folder removed when dropped (when the bench made it).
struct Scratch {
    dir: PathBuf,
    remove: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn save_png(img: &RgbImage, path: &Path) -> anyhow::Result<()> {
    img.save(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Formats one row of the table (`name` is the image, or `MEAN` for the summary rows).
fn table_line(name: &str, r: &Row) -> String {
    let mut s = format!(
        "{:<10} {:<7} {:>8.0} B {:>7.4} bpp {:>6.2} dB SSIM {:.4} MS-SSIM {:.4} dE00 {:>5.2}",
        name, r.codec, r.bytes, r.bpp, r.psnr, r.ssim, r.ms_ssim, r.ciede2000
    );
    match &r.recognition {
        Some(Recognition::Pair(p)) => s.push_str(&format!(
            "  top1 {} top3 {} cos {:.3} det {}/{}",
            u8::from(p.top1_agree),
            u8::from(p.orig_top1_in_top3),
            p.prob_cosine,
            p.matched_detections,
            p.orig_detections
        )),
        Some(Recognition::Summary(a)) => s.push_str(&format!(
            "  top1 {}/{} top3 {}/{} cos {:.3} det {}/{}",
            a.top1_agree,
            a.pairs,
            a.orig_top1_in_top3,
            a.pairs,
            a.prob_cosine,
            a.matched_detections,
            a.orig_detections
        )),
        None => {}
    }
    if let (Some(e), Some(d)) = (r.encode_ms, r.decode_ms) {
        s.push_str(&format!(
            "  enc {e:.0} ms dec {d:.0} ms ({} thr)",
            r.threads.unwrap_or(0)
        ));
    }
    if let Some(set) = &r.setting {
        s.push_str("  ");
        s.push_str(set);
    }
    s
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    crate::models::check_input_dir(&args.images)?;
    if let Some(o) = &args.out {
        crate::models::create_output_dir(o)?;
    }
    let dir = args
        .tokenizer
        .clone()
        .unwrap_or_else(unimic_codec::tokenizer::default_dir);
    let (tok, tok_codec) =
        load_tokenizer(&dir).with_context(|| format!("loading tokenizer {}", dir.display()))?;
    let tok: &dyn ImageTokenizer = tok.as_ref();
    let tok_id = format!("{}@{}", tok.id().name, &tok.id().sha256[..12]);
    let mut paths = crate::models::list_images(&args.images)?;
    if args.limit > 0 {
        paths.truncate(args.limit);
    }
    if paths.is_empty() {
        bail!("no images in {}", args.images.display());
    }
    let models = args.recognizers.clone().unwrap_or_else(default_recognizers);
    if args.recognize.is_some() {
        for f in ["efficientnet_lite0.onnx", "yolox_nano.onnx"] {
            if !models.join(f).is_file() {
                bail!(
                    "--recognize: {} not found (see --recognizers)",
                    models.join(f).display()
                );
            }
        }
    }
    let scratch = match &args.out {
        Some(o) if args.recognize.is_some() => Scratch {
            dir: o.join("decoded"),
            remove: false,
        },
        _ => Scratch {
            dir: std::env::temp_dir()
                .join(format!("unimic-bench-tokenizer-{}", std::process::id())),
            remove: true,
        },
    };
    std::fs::create_dir_all(&scratch.dir)
        .with_context(|| format!("creating {}", scratch.dir.display()))?;

    let bits_per_token = f64::from(tok.codebook_size()).log2();
    let subset_vq = if args.codebook_subsets.is_empty() {
        None
    } else {
        Some(Vq::from_dir(&dir).context("--codebook-subsets needs a VQ tokenizer")?)
    };
    let subsets: Vec<(u32, Vec<u32>)> = if let Some(vq) = &subset_vq {
        let dir_u = args
            .usage_images
            .as_deref()
            .context("--codebook-subsets needs --usage-images")?;
        if let Some(&k) = args
            .codebook_subsets
            .iter()
            .find(|&&k| k == 0 || k >= tok.codebook_size())
        {
            bail!("codebook subset {k} must be in 1..{}", tok.codebook_size());
        }
        let (order, n) = rank_codes(vq, dir_u, args.size, args.usage_limit)?;
        eprintln!(
            "ranked {} codes by use over {n} images of {}",
            order.len(),
            dir_u.display()
        );
        args.codebook_subsets
            .iter()
            .map(|&k| (k, order[..k as usize].to_vec()))
            .collect()
    } else {
        Vec::new()
    };

    let mut cli_codecs = Vec::new();
    for (codec, enc, dec, pkg) in [
        ("avif", "avifenc", "avifdec", "libavif-bin"),
        ("jxl", "cjxl", "djxl", "libjxl-tools"),
    ] {
        match CliCodec::find(codec, enc, dec, pkg) {
            Ok(c) => cli_codecs.push(c),
            Err(why) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::to_string(&Missing {
                            codec,
                            missing: why
                        })?
                    );
                } else {
                    println!("{codec}: not measured: {why}");
                }
            }
        }
    }

    let rdo = if args.rdo.is_empty() {
        None
    } else {
        let taef2 =
            Arc::new(Taef2Tokenizer::from_dir(&dir).context("--rdo needs a TAEF2 tokenizer")?);
        let edir = unimic_codec::shipped::entropy_dir(args.entropy_dir.as_deref());
        let (generic, manifest) =
            unimic_codec::shipped::generic_model(&edir, unimic_codec::shipped::GENERIC_ID)?
                .with_context(|| {
                    format!(
                        "--rdo: no {} in {}",
                        unimic_codec::shipped::GENERIC_ID,
                        edir.display()
                    )
                })?;
        let generic = Arc::new(generic);
        let mut wrapped = Vec::new();
        for &lambda in &args.rdo {
            let cfg = RdoConfig {
                lambda,
                candidates: args.rdo_candidates,
            };
            wrapped.push(RdoTokenizer::new(taef2.clone(), generic.clone(), cfg)?);
        }
        Some((generic, manifest.id, wrapped))
    };

    let threads = candle_threads();
    let jpeg_q: Vec<u8> = (1..=100).collect();
    let webp_q: Vec<u8> = (0..=100).collect();
    // Rows by codec, in the order the codecs are first seen.
    let mut by_codec: Vec<(String, Vec<Row>)> = Vec::new();
    let mut pairs: Vec<Pair> = Vec::new();
    let mut sheet_rows: Vec<RgbImage> = Vec::new();
    let mut warmed = false;
    for p in &paths {
        let name = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let img = crate::models::prepare(
            image::open(p)
                .with_context(|| format!("opening {}", p.display()))?
                .to_rgb8(),
            args.size,
        );
        let (w, h) = img.dimensions();
        let work = scratch.dir.join(&name);
        std::fs::create_dir_all(&work)?;
        let orig_png = work.join("original.png");
        save_png(&img, &orig_png)?;

        if !warmed {
            tok.decode_to(&tok.encode(&img)?, w, h)?;
            warmed = true;
        }
        let t = Instant::now();
        let grid = tok.encode(&img)?;
        let enc_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let rec = tok.decode_to(&grid, w, h)?;
        let dec_ms = t.elapsed().as_secs_f64() * 1e3;
        let tok_bytes = (grid.len() as f64 * bits_per_token / 8.0).ceil();
        let mut r = row(tok_codec, &name, &img, &rec, tok_bytes)?;
        r.setting = Some(format!(
            "{}x{} tokens, K={}",
            grid.height(),
            grid.width(),
            tok.codebook_size()
        ));
        r.tokenizer = Some(tok_id.clone());
        r.encode_ms = Some(enc_ms);
        r.decode_ms = Some(dec_ms);
        r.threads = Some(threads);
        let mut rows: Vec<(Row, RgbImage)> = vec![(r, rec)];
        // The quality ladder: levels 1..=n decoded together, n = 2.. (raw bytes n times level 1's).
        if tok.levels() > 1 {
            let t = Instant::now();
            let all = tok.encode_levels(&img, tok.levels())?;
            let enc_all_ms = t.elapsed().as_secs_f64() * 1e3;
            for n in 2..=all.len() {
                let t = Instant::now();
                let rec_n = tok.decode_levels_to(&all[..n], w, h)?;
                let dec_n_ms = t.elapsed().as_secs_f64() * 1e3;
                let mut rn = row(
                    &format!("{tok_codec}-L{n}"),
                    &name,
                    &img,
                    &rec_n,
                    tok_bytes * n as f64,
                )?;
                rn.setting = Some(format!("levels 1..={n} of {}", tok.levels()));
                rn.tokenizer = Some(tok_id.clone());
                rn.encode_ms = Some(enc_all_ms);
                rn.decode_ms = Some(dec_n_ms);
                rn.threads = Some(threads);
                rows.push((rn, rec_n));
            }
        }

        if let Some((generic, generic_id, wrapped)) = &rdo {
            for r in wrapped {
                let lambda = r.config().lambda;
                let t = Instant::now();
                let (grids, stats) = r.encode_levels_with_stats(&img, 1)?;
                let enc_ms = t.elapsed().as_secs_f64() * 1e3;
                let grid = &grids[0];
                let Some(s) = stats else {
                    eprintln!(
                        "{name}: its {}x{} grid does not fit {generic_id}: no --rdo rows",
                        grid.height(),
                        grid.width()
                    );
                    break;
                };
                let payload = generic.encode(grid)?;
                let back = generic.decode(grid.height(), grid.width(), &payload)?;
                ensure!(
                    back.ids() == grid.ids(),
                    "{name}: the generic model's round trip failed at λ = {lambda}"
                );
                let rec = r.decode_to(grid, w, h)?;
                let mut rr = row(
                    &format!("{tok_codec}-rdo{lambda}"),
                    &name,
                    &img,
                    &rec,
                    payload.len() as f64,
                )?;
                rr.setting = Some(format!(
                    "λ {lambda}, {} candidates: {} of {} codes not the nearest, \
                     +{:.1}% squared error in the codes, {generic_id} payload",
                    r.config().candidates,
                    s.changed,
                    grid.len(),
                    100.0 * s.extra_distortion
                ));
                rr.tokenizer = Some(tok_id.clone());
                rr.encode_ms = Some(enc_ms);
                rr.threads = Some(threads);
                rows.push((rr, rec));
            }
        }

        if let Some(vq) = &subset_vq {
            let sets: Vec<&[u32]> = subsets.iter().map(|(_, s)| s.as_slice()).collect();
            for ((k, _), g) in subsets.iter().zip(vq.encode_among(&img, &sets)?) {
                let rec_k = vq.decode_to(&g, w, h)?;
                let bytes = (g.len() as f64 * f64::from(*k).log2() / 8.0).ceil();
                let mut rk = row(&format!("vq-k{k}"), &name, &img, &rec_k, bytes)?;
                rk.setting = Some(format!("top {k} codes by use"));
                rk.tokenizer = Some(tok_id.clone());
                rows.push((rk, rec_k));
            }
        }

        let mut sheet_parts = vec![img.clone(), rows[0].1.clone()];
        let (jq, jb, jd) = nearest(&jpeg_q, tok_bytes, |q| jpeg(&img, q))?;
        let mut rj = row("jpeg", &name, &img, &jd, jb.len() as f64)?;
        rj.setting = Some(format!("quality {jq}"));
        sheet_parts.push(jd.clone());
        rows.push((rj, jd));
        let (wq, wb, wd) = nearest(&webp_q, tok_bytes, |q| webp_enc(&img, q))?;
        let mut rw = row("webp", &name, &img, &wd, wb.len() as f64)?;
        rw.setting = Some(format!("quality {wq}"));
        sheet_parts.push(wd.clone());
        rows.push((rw, wd));
        for c in &cli_codecs {
            let (s, b, d) = nearest_sorted(&c.settings(), tok_bytes, |s| {
                c.run(&orig_png, &work, s, w, h)
            })
            .with_context(|| format!("{} on {name}", c.codec))?;
            let mut rc = row(c.codec, &name, &img, &d, b.len() as f64)?;
            rc.setting = Some(c.describe(s));
            sheet_parts.push(d.clone());
            rows.push((rc, d));
        }

        if let Some(o) = &args.out {
            let mut sbs = RgbImage::new(w * sheet_parts.len() as u32, h);
            for (i, part) in sheet_parts.iter().enumerate() {
                imageops::replace(&mut sbs, part, i64::from(w) * i as i64, 0);
            }
            save_png(&sbs, &o.join(format!("{name}.png")))?;
            if args.size != 0 {
                sheet_rows.push(sbs);
            }
        }
        for (r, dec) in rows {
            if args.recognize.is_some() {
                let f = work.join(format!("{}.png", r.codec));
                save_png(&dec, &f)?;
                pairs.push(Pair {
                    id: format!("{name}/{}", r.codec),
                    original: orig_png.clone(),
                    decoded: f,
                });
            }
            if !args.json && args.recognize.is_none() {
                println!("{}", table_line(&name, &r));
            }
            match by_codec.iter_mut().find(|(c, _)| *c == r.codec) {
                Some((_, v)) => v.push(r),
                None => by_codec.push((r.codec.clone(), vec![r])),
            }
        }
        eprintln!("{name}: done");
    }

    if let Some(python) = &args.recognize {
        let results = run_agreement(python, &models, &scratch.dir, &pairs)?;
        for (_, rows) in by_codec.iter_mut() {
            for r in rows.iter_mut() {
                let id = format!("{}/{}", r.image.as_deref().unwrap_or(""), r.codec);
                r.recognition = results.get(&id).cloned().map(Recognition::Pair);
            }
        }
        if !args.json {
            let mut all: Vec<&Row> = by_codec.iter().flat_map(|(_, v)| v).collect();
            all.sort_by(|a, b| a.image.cmp(&b.image));
            for r in all {
                println!("{}", table_line(r.image.as_deref().unwrap_or(""), r));
            }
        }
    }
    if let (Some(o), Some(first)) = (&args.out, sheet_rows.first()) {
        let (sw, sh) = first.dimensions();
        if sheet_rows.iter().all(|s| s.dimensions() == (sw, sh)) {
            let mut sheet = RgbImage::new(sw, sh * sheet_rows.len() as u32);
            for (i, s) in sheet_rows.iter().enumerate() {
                imageops::replace(&mut sheet, s, 0, i64::from(sh) * i as i64);
            }
            save_png(&sheet, &o.join("sheet.png"))?;
        }
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        for (_, rows) in &by_codec {
            for r in rows {
                writeln!(out, "{}", serde_json::to_string(r)?)?;
            }
        }
    }
    for (_, rows) in &by_codec {
        let m = mean(rows);
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&m)?)?;
        } else {
            writeln!(out, "{}", table_line(&format!("MEAN/{}", m.images), &m))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(len: usize) -> anyhow::Result<(Vec<u8>, RgbImage)> {
        Ok((vec![0; len], RgbImage::new(1, 1)))
    }

    #[test]
    fn nearest_sorted_finds_the_nearest_size_in_few_encodings() {
        // Sizes grow along the settings: 100, 110, ..., 1090.
        let settings: Vec<usize> = (0..100).collect();
        for (target, want) in [
            (0.0, 0),
            (100.0, 0),
            (104.0, 0),
            (106.0, 1),
            (555.0, 45),
            (556.0, 46),
            (1090.0, 99),
            (5000.0, 99),
        ] {
            let mut calls = 0;
            let (s, b, _) = nearest_sorted(&settings, target, |i| {
                calls += 1;
                fake(100 + 10 * i)
            })
            .unwrap();
            assert_eq!(s, want, "target {target}");
            assert_eq!(b.len(), 100 + 10 * want);
            assert!(calls <= 12, "{calls} encodings for target {target}");
            let (s2, _, _) = nearest(&settings, target, |i| fake(100 + 10 * i)).unwrap();
            assert_eq!(s2, want, "scan, target {target}");
        }
    }

    #[test]
    fn nearest_sorted_tolerates_a_small_dip_and_rejects_nothing() {
        // One non-monotonic step next to the crossing: 100, 200, 300, 290, 400, 500.
        let sizes = [100, 200, 300, 290, 400, 500];
        let settings: Vec<usize> = (0..sizes.len()).collect();
        let (s, b, _) = nearest_sorted(&settings, 292.0, |i| fake(sizes[i])).unwrap();
        assert_eq!((s, b.len()), (3, 290));
        assert!(nearest_sorted(&[] as &[usize], 1.0, fake).is_err());
        assert!(nearest_sorted(&settings, 1.0, |_| anyhow::bail!("boom")).is_err());
        // Float settings, as the CLI codecs use.
        let d = [25.0, 10.0, 1.0];
        let (s, _, _) = nearest_sorted(&d, 900.0, |x: f64| fake((1000.0 / x) as usize)).unwrap();
        assert_eq!(s, 1.0);
    }

    const LINE: &str = r#"{"id": "kodim01/jpeg", "original": "a.png", "decoded": "b.png", "top1_agree": true, "orig_top1_in_top3": true, "prob_cosine": 0.93, "orig_top1": "macaw", "decoded_top1": "macaw", "orig_detections": 3, "decoded_detections": 2, "matched_detections": 2, "detector_recall": 0.6666666666666666}"#;

    #[test]
    fn parses_the_agreement_tools_output() {
        let none = LINE
            .replace("kodim01/jpeg", "kodim02/vq")
            .replace("0.6666666666666666", "null")
            .replace("\"top1_agree\": true", "\"top1_agree\": false");
        let map = parse_agreement(&format!("{LINE}\n\n{none}\n")).unwrap();
        assert_eq!(map.len(), 2);
        let a = &map["kodim01/jpeg"];
        assert!(a.top1_agree && a.orig_top1_in_top3);
        assert_eq!((a.orig_detections, a.matched_detections), (3, 2));
        assert_eq!(a.orig_top1, "macaw");
        let b = &map["kodim02/vq"];
        assert!(!b.top1_agree);
        assert_eq!(b.detector_recall, None);

        assert!(
            parse_agreement(&format!("{LINE}\n{LINE}")).is_err(),
            "repeated id"
        );
        assert!(parse_agreement("not json").is_err());
        assert!(
            parse_agreement(r#"{"id": "x", "top1_agree": true}"#).is_err(),
            "fields missing"
        );
        assert!(parse_agreement("").unwrap().is_empty());
    }

    #[test]
    fn agreement_summary_counts_and_pools_recall() {
        let map = parse_agreement(LINE).unwrap();
        let a = map["kodim01/jpeg"].clone();
        let mut b = a.clone();
        b.top1_agree = false;
        b.orig_top1_in_top3 = false;
        b.prob_cosine = 0.5;
        b.orig_detections = 0;
        b.matched_detections = 0;
        b.detector_recall = None;
        let s = AgreementSummary::of(&[&a, &b]);
        assert_eq!((s.pairs, s.top1_agree, s.orig_top1_in_top3), (2, 1, 1));
        assert!((s.prob_cosine - 0.715).abs() < 1e-12);
        assert_eq!((s.matched_detections, s.orig_detections), (2, 3));
        assert_eq!(s.detector_recall, Some(2.0 / 3.0));
        assert_eq!(AgreementSummary::of(&[&b]).detector_recall, None);
    }

    #[test]
    fn mean_rows_summarise_recognition_only_when_every_row_has_it() {
        let img = RgbImage::from_pixel(16, 16, image::Rgb([10, 20, 30]));
        let mut a = row("jpeg", "x", &img, &img, 10.0).unwrap();
        let mut b = a.clone();
        b.bytes = 30.0;
        let m = mean(&[a.clone(), b.clone()]);
        assert_eq!(
            (m.images, m.bytes, m.ms_ssim, m.ciede2000),
            (2, 20.0, 1.0, 0.0)
        );
        assert!(m.recognition.is_none());
        let p = parse_agreement(LINE).unwrap()["kodim01/jpeg"].clone();
        a.recognition = Some(Recognition::Pair(p.clone()));
        assert!(mean(&[a.clone(), b.clone()]).recognition.is_none());
        b.recognition = Some(Recognition::Pair(p));
        match mean(&[a, b]).recognition {
            Some(Recognition::Summary(s)) => assert_eq!((s.pairs, s.top1_agree), (2, 2)),
            other => panic!("{other:?}"),
        }
    }

    #[cfg(unix)]
    #[test]
    fn which_finds_executables_only() {
        let d = std::env::temp_dir().join(format!("unimic-which-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let exe = d.join("tool-x");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::write(d.join("plain-y"), "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([PathBuf::from("/nonexistent"), d.clone()]).unwrap();
        assert_eq!(which_in("tool-x", Some(&path)), Some(exe));
        assert_eq!(which_in("plain-y", Some(&path)), None);
        assert_eq!(which_in("absent-z", Some(&path)), None);
        assert_eq!(which_in("tool-x", None), None);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_tools_are_named_with_their_package() {
        let e = CliCodec::find(
            "avif",
            "no-such-avifenc-x",
            "no-such-avifdec-x",
            "libavif-bin",
        )
        .err()
        .unwrap();
        assert!(e.contains("no-such-avifenc-x and no-such-avifdec-x"), "{e}");
        assert!(e.contains("libavif-bin"), "{e}");
        let j = serde_json::to_string(&Missing {
            codec: "avif",
            missing: e,
        })
        .unwrap();
        assert!(j.starts_with(r#"{"codec":"avif","missing":"#), "{j}");
    }
}

//! `unimic bench tokenizer`: the VQ tokenizer against JPEG and WebP at equal bytes.
//!
//! For each image: the tokens' raw size (`ceil(tokens · log2(K) / 8)` bytes, before any entropy
//! coding) and the reconstruction's PSNR/SSIM; then JPEG (image crate, quality 1–100) and lossy
//! WebP (libwebp, quality 0–100) at the setting whose file size is nearest to the token bytes.
//! AVIF is not measured: ravif encodes, but no AV1 decoder builds here without system C libraries
//! (dav1d/libaom headers), so its PSNR could not be computed.
//!
//! `--codebook-subsets 128,256,512 --usage-images DIR` also measures smaller codebooks carved out
//! of the trained one: the codes are ranked by how often they occur in the tokens of `DIR` (never
//! the evaluation images), and each image is tokenized again choosing only among the top `k`
//! codes (`codec` `"vq-k<k>"`, bytes `ceil(tokens · log2(k) / 8)`). This is the cheap half of a
//! codebook-size study: it says what fewer codes cost, not what a larger trained codebook gains.
//!
//! `--size S` resizes the shorter side to `S` (Catmull-Rom) and centre-crops `S×S`; `--size 0`
//! keeps the native size (the tokenizer pads to multiples of its factor; metrics are computed on
//! the original pixels).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use image::{imageops, RgbImage};
use serde::Serialize;
use unimic_codec::tokenizer::metrics::{psnr, ssim};
use unimic_codec::tokenizer::{ImageTokenizer, Vq};

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
    /// Write side-by-side PNGs (original | tokens | JPEG | WebP) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Tokenizer directory (manifest.json + weights); default: the shipped models/tokenizer.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Use at most this many images (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Also measure codebooks of only the `k` most used codes, for each `k` listed
    /// (comma-separated, each below the codebook size); needs `--usage-images`.
    #[arg(long, value_delimiter = ',')]
    pub codebook_subsets: Vec<u32>,
    /// Images whose tokens rank the codes by use, for `--codebook-subsets` (not the test images;
    /// e.g. ../shared/data/bsds500/test).
    #[arg(long)]
    pub usage_images: Option<PathBuf>,
    /// Use at most this many usage images (0: all).
    #[arg(long, default_value_t = 50)]
    pub usage_limit: usize,
}

/// The codes of `tok` ranked by use in the tokens of `dir`'s images (ties by index), and how many
/// images were read.
fn rank_codes(
    tok: &Vq,
    dir: &std::path::Path,
    size: u32,
    limit: usize,
) -> anyhow::Result<(Vec<u32>, usize)> {
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
    #[serde(skip_serializing_if = "Option::is_none")]
    setting: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokenizer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encode_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decode_ms: Option<f64>,
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

/// Scans `settings`, returning the encoding whose size is nearest to `target` bytes.
fn nearest<F>(settings: &[u8], target: f64, enc: F) -> anyhow::Result<(u8, Vec<u8>, RgbImage)>
where
    F: Fn(u8) -> anyhow::Result<(Vec<u8>, RgbImage)>,
{
    let mut best: Option<(u8, Vec<u8>, RgbImage)> = None;
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

fn row(codec: &str, name: &str, img: &RgbImage, rec: &RgbImage, bytes: f64) -> anyhow::Result<Row> {
    let (w, h) = img.dimensions();
    Ok(Row {
        codec: codec.into(),
        images: 1,
        image: Some(name.into()),
        width: w,
        height: h,
        bytes,
        bpp: bytes * 8.0 / f64::from(w * h),
        psnr: psnr(img, rec).context("psnr")?,
        ssim: ssim(img, rec).context("ssim")?,
        setting: None,
        tokenizer: None,
        encode_ms: None,
        decode_ms: None,
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
    Row {
        codec: rows[0].codec.clone(),
        images: rows.len(),
        image: None,
        width: rows[0].width,
        height: rows[0].height,
        bytes: m(&|r| r.bytes),
        bpp: m(&|r| r.bpp),
        psnr: m(&|r| r.psnr),
        ssim: m(&|r| r.ssim),
        setting: None,
        tokenizer: rows[0].tokenizer.clone(),
        encode_ms: opt(&|r| r.encode_ms),
        decode_ms: opt(&|r| r.decode_ms),
    }
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = args.tokenizer.clone().unwrap_or_else(Vq::default_dir);
    let tok = Vq::from_dir(&dir).with_context(|| format!("loading tokenizer {}", dir.display()))?;
    let tok_id = format!("{}@{}", tok.id().name, &tok.id().sha256[..12]);
    let mut paths = crate::models::list_images(&args.images)?;
    if args.limit > 0 {
        paths.truncate(args.limit);
    }
    if paths.is_empty() {
        bail!("no images in {}", args.images.display());
    }
    if let Some(o) = &args.out {
        std::fs::create_dir_all(o)?;
    }
    let bits_per_token = f64::from(tok.codebook_size()).log2();
    let subsets: Vec<(u32, Vec<u32>)> = if args.codebook_subsets.is_empty() {
        Vec::new()
    } else {
        let dir = args
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
        let (order, n) = rank_codes(&tok, dir, args.size, args.usage_limit)?;
        eprintln!(
            "ranked {} codes by use over {n} images of {}",
            order.len(),
            dir.display()
        );
        args.codebook_subsets
            .iter()
            .map(|&k| (k, order[..k as usize].to_vec()))
            .collect()
    };
    let mut subset_rows: Vec<Vec<Row>> = vec![Vec::new(); subsets.len()];
    let jpeg_q: Vec<u8> = (1..=100).collect();
    let webp_q: Vec<u8> = (0..=100).collect();
    let (mut vq_rows, mut jpeg_rows, mut webp_rows) = (Vec::new(), Vec::new(), Vec::new());
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
        let t = Instant::now();
        let grid = tok.encode(&img)?;
        let enc_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let rec = tok.decode_to(&grid, w, h)?;
        let dec_ms = t.elapsed().as_secs_f64() * 1e3;
        let tok_bytes = (grid.len() as f64 * bits_per_token / 8.0).ceil();
        let mut r = row("vq", &name, &img, &rec, tok_bytes)?;
        r.setting = Some(format!(
            "{}x{} tokens, K={}",
            grid.height(),
            grid.width(),
            tok.codebook_size()
        ));
        r.tokenizer = Some(tok_id.clone());
        r.encode_ms = Some(enc_ms);
        r.decode_ms = Some(dec_ms);

        let sets: Vec<&[u32]> = subsets.iter().map(|(_, s)| s.as_slice()).collect();
        let mut extra = Vec::new();
        for (((k, _), g), rows) in subsets
            .iter()
            .zip(tok.encode_among(&img, &sets)?)
            .zip(&mut subset_rows)
        {
            let rec_k = tok.decode_to(&g, w, h)?;
            let bytes = (g.len() as f64 * f64::from(*k).log2() / 8.0).ceil();
            let mut rk = row(&format!("vq-k{k}"), &name, &img, &rec_k, bytes)?;
            rk.setting = Some(format!("top {k} codes by use"));
            rk.tokenizer = Some(tok_id.clone());
            rows.push(rk.clone());
            extra.push(rk);
        }

        let (jq, jb, jd) = nearest(&jpeg_q, tok_bytes, |q| jpeg(&img, q))?;
        let mut rj = row("jpeg", &name, &img, &jd, jb.len() as f64)?;
        rj.setting = Some(format!("quality {jq}"));
        let (wq, wb, wd) = nearest(&webp_q, tok_bytes, |q| webp_enc(&img, q))?;
        let mut rw = row("webp", &name, &img, &wd, wb.len() as f64)?;
        rw.setting = Some(format!("quality {wq}"));

        if let Some(o) = &args.out {
            let mut sbs = RgbImage::new(w * 4, h);
            for (i, part) in [&img, &rec, &jd, &wd].into_iter().enumerate() {
                imageops::replace(&mut sbs, part, i64::from(w) * i as i64, 0);
            }
            let f = o.join(format!("{name}.png"));
            sbs.save(&f)
                .with_context(|| format!("writing {}", f.display()))?;
        }
        for r in [&r, &rj, &rw].into_iter().chain(&extra) {
            if args.json {
                println!("{}", serde_json::to_string(r)?);
            } else {
                println!(
                    "{:<10} {:<5} {:>8.0} B {:>7.4} bpp {:>6.2} dB SSIM {:.4}  {}",
                    name,
                    r.codec,
                    r.bytes,
                    r.bpp,
                    r.psnr,
                    r.ssim,
                    r.setting.as_deref().unwrap_or("")
                );
            }
        }
        vq_rows.push(r);
        jpeg_rows.push(rj);
        webp_rows.push(rw);
    }
    for rows in [&vq_rows, &jpeg_rows, &webp_rows]
        .into_iter()
        .chain(&subset_rows)
    {
        let m = mean(rows);
        if args.json {
            println!("{}", serde_json::to_string(&m)?);
        } else {
            println!(
                "MEAN {:<5} over {} images: {:.1} B {:.4} bpp {:.2} dB SSIM {:.4}",
                m.codec, m.images, m.bytes, m.bpp, m.psnr, m.ssim
            );
        }
    }
    Ok(())
}

//! `unimic bench umic`: the whole `.umic` path per image, as `unimic encode` and `unimic decode`
//! run it with the shipped models: tokenizing, entropy coding (the generic transformer where the
//! grid fits it, as `--entropy auto` picks) and the file, then parsing, entropy decoding and
//! detokenizing. Reports per image its size, the file's bytes and bits per pixel, and the wall
//! time of each direction (after one untimed warm-up round trip of the first image), with the CPU
//! threads the kernels were allowed (`RAYON_NUM_THREADS`); then the means.
//!
//! The speed target of the default tokenizer is measured here: `RAYON_NUM_THREADS=2 unimic
//! bench umic --images ../shared/data/kodak --fill 1024x768` for photos of a phone's 1024×768
//! on two cores, entropy coding included.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use unimic_codec::umic::{self, EncodeOptions, UmicFile};

use crate::models;

/// `unimic bench umic` arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Directory of images (PNG, JPEG or WebP), taken in file-name order.
    #[arg(long)]
    pub images: PathBuf,
    /// Resize the shorter side to SIZE and centre-crop to SIZE×SIZE first (0: keep the size).
    #[arg(long, default_value_t = 0)]
    pub size: u32,
    /// Then scale down so that neither side exceeds this many pixels (0: never), as `encode`.
    #[arg(long, default_value_t = 1024)]
    pub max_side: u32,
    /// Instead of `--size`: scale each image to cover WIDTHxHEIGHT (up or down, Catmull-Rom)
    /// and centre-crop to exactly that, for example `1024x768` for a phone photo's size.
    #[arg(long, value_name = "WIDTHxHEIGHT", conflicts_with = "size", value_parser = parse_dims)]
    pub fill: Option<(u32, u32)>,
    /// At most this many images (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Rate-distortion trade-off of the level-1 codes, as `encode --rdo` (0: the nearest codes).
    #[arg(long, default_value_t = unimic_codec::rdo::DEFAULT_LAMBDA)]
    pub rdo: f32,
    /// One JSON object per line (otherwise a table).
    #[arg(long)]
    pub json: bool,
}

/// One image's row, or the means (`image` = "mean").
#[derive(Debug, Clone, Serialize)]
struct Row {
    image: String,
    width: u32,
    height: u32,
    bytes: usize,
    bpp: f64,
    entropy_model: String,
    encode_ms: f64,
    decode_ms: f64,
    threads: usize,
}

/// Runs `unimic bench umic`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let mut files = models::list_images(&args.images)?;
    if args.limit > 0 {
        files.truncate(args.limit);
    }
    anyhow::ensure!(!files.is_empty(), "no images in {}", args.images.display());
    anyhow::ensure!(
        args.rdo.is_finite() && args.rdo >= 0.0,
        "--rdo {}: give a number >= 0 (0 keeps the nearest codes)",
        args.rdo
    );
    let generic = models::generic_model(None, models::GENERIC_ID)?;
    // What `encode` writes: the level-1 codes chosen for the generic model at --rdo.
    let shared = generic
        .as_ref()
        .map(|(g, _)| std::sync::Arc::new(g.clone()));
    let tokenizer = models::image_encoder_with(None, shared, args.rdo)?;
    let dir = models::entropy_dir(None);
    let options = EncodeOptions::default();
    let threads = crate::bench_tokenizer::candle_threads();
    let mut rows = Vec::with_capacity(files.len());
    for (i, path) in files.iter().enumerate() {
        let image = image::open(path)
            .with_context(|| format!("reading {}", path.display()))?
            .to_rgb8();
        let image = match args.fill {
            Some((w, h)) => fill(&image, w, h),
            None => models::fit(models::prepare(image, args.size), args.max_side),
        };
        let gen = generic.as_ref().map(|(g, m)| (m.id.as_str(), g));
        let encode = || umic::encode_image(tokenizer.as_ref(), &image, gen, &dir, &options);
        if i == 0 {
            // Warm-up, both ways: first-touch memory, lazily built tables.
            let warm = UmicFile::from_bytes(&encode()?.bytes)?;
            umic::decode_image(tokenizer.as_ref(), &warm, gen, &dir, 1)?;
        }
        let t = Instant::now();
        let encoded = encode()?;
        let encode_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let file = UmicFile::from_bytes(&encoded.bytes).context("parsing the file just written")?;
        let back = umic::decode_image(tokenizer.as_ref(), &file, gen, &dir, 1)?;
        let decode_ms = t.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(
            back.dimensions() == image.dimensions(),
            "decoded {:?}, encoded {:?}",
            back.dimensions(),
            image.dimensions()
        );
        let (w, h) = image.dimensions();
        rows.push(Row {
            image: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            width: w,
            height: h,
            bytes: encoded.bytes.len(),
            bpp: 8.0 * encoded.bytes.len() as f64 / (f64::from(w) * f64::from(h)),
            entropy_model: file.model.name.clone(),
            encode_ms,
            decode_ms,
            threads,
        });
        if !args.json {
            eprintln!("{}: done", rows[rows.len() - 1].image);
        }
    }
    let n = rows.len() as f64;
    let mean = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).sum::<f64>() / n;
    let summary = Row {
        image: "mean".into(),
        width: mean(&|r| f64::from(r.width)).round() as u32,
        height: mean(&|r| f64::from(r.height)).round() as u32,
        bytes: mean(&|r| r.bytes as f64).round() as usize,
        bpp: mean(&|r| r.bpp),
        entropy_model: String::new(),
        encode_ms: mean(&|r| r.encode_ms),
        decode_ms: mean(&|r| r.decode_ms),
        threads,
    };
    if args.json {
        for r in rows.iter().chain([&summary]) {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "{:<12} {:>11} {:>7} {:>7} {:>10} {:>10}  model",
            "image", "size", "bytes", "bpp", "encode ms", "decode ms"
        );
        for r in rows.iter().chain([&summary]) {
            println!(
                "{:<12} {:>5}x{:<5} {:>7} {:>7.4} {:>10.1} {:>10.1}  {}",
                r.image,
                r.width,
                r.height,
                r.bytes,
                r.bpp,
                r.encode_ms,
                r.decode_ms,
                r.entropy_model
            );
        }
        println!("threads: {threads} (RAYON_NUM_THREADS)");
    }
    Ok(())
}

/// `WIDTHxHEIGHT`, both positive.
fn parse_dims(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?} is not WIDTHxHEIGHT"))?;
    let p = |v: &str| v.trim().parse::<u32>().ok().filter(|&n| n > 0);
    match (p(w), p(h)) {
        (Some(w), Some(h)) => Ok((w, h)),
        _ => Err(format!("{s:?} is not WIDTHxHEIGHT with positive numbers")),
    }
}

/// `img` scaled to cover `w × h` and centre-cropped to it.
fn fill(img: &image::RgbImage, w: u32, h: u32) -> image::RgbImage {
    let (iw, ih) = img.dimensions();
    let s = (f64::from(w) / f64::from(iw)).max(f64::from(h) / f64::from(ih));
    let nw = ((f64::from(iw) * s).round() as u32).max(w);
    let nh = ((f64::from(ih) * s).round() as u32).max(h);
    let r = image::imageops::resize(img, nw, nh, image::imageops::FilterType::CatmullRom);
    image::imageops::crop_imm(&r, (nw - w) / 2, (nh - h) / 2, w, h).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_sizes_and_dims_parse() {
        assert_eq!(parse_dims("1024x768"), Ok((1024, 768)));
        assert!(parse_dims("1024").is_err() && parse_dims("0x5").is_err());
        let img = image::RgbImage::from_pixel(768, 512, image::Rgb([9, 8, 7]));
        assert_eq!(fill(&img, 1024, 768).dimensions(), (1024, 768));
        assert_eq!(fill(&img, 100, 100).dimensions(), (100, 100));
    }
}

//! `unimic tokenize DIR... -o PREFIX`: images to token-grid files, whole, one file per grid shape.
//!
//! Each image is optionally scaled by `--scale`, cut at its right and bottom edges to multiples of
//! the tokenizer's factor (the corner [`ImageTokenizer::decode_to`] crops back to), and tokenized
//! whole. Grids of the same shape go to `PREFIX-{height}x{width}.umtg` (docs/CODING.md §5) in
//! the order the images were read (folders as given, file names sorted). Training tools that need
//! whole-image grids of varied sizes read these files (`tools/gpu-train/train_positions.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};
use image::imageops::{self, FilterType};
use image::RgbImage;
use unimic_codec::grid::{write_grid_file, TokenGrid};
use unimic_codec::tokenizer::ImageTokenizer;

use crate::models;

/// Arguments of `unimic tokenize`.
#[derive(clap::Args)]
pub struct Args {
    /// Folders of PNG/JPEG images (read in the order given, file names sorted within each).
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Output prefix: grids of shape H×W go to `PREFIX-HxW.umtg`.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Scale every image by this factor first (Catmull-Rom; sides rounded to whole pixels).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Tokenizer directory (manifest.json + weights); default: the shipped one.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// `img` scaled by `scale` and cut at the right and bottom to multiples of `factor`; `None` when
/// less than one token remains.
pub fn prepare(img: RgbImage, scale: f64, factor: u32) -> Option<RgbImage> {
    let img = if scale == 1.0 {
        img
    } else {
        let (w, h) = img.dimensions();
        let sw = (f64::from(w) * scale).round() as u32;
        let sh = (f64::from(h) * scale).round() as u32;
        if sw == 0 || sh == 0 {
            return None;
        }
        imageops::resize(&img, sw, sh, FilterType::CatmullRom)
    };
    let (w, h) = img.dimensions();
    let (cw, ch) = (w / factor * factor, h / factor * factor);
    if cw == 0 || ch == 0 {
        return None;
    }
    Some(imageops::crop_imm(&img, 0, 0, cw, ch).to_image())
}

/// Writes the grids, one file per shape; returns the paths written with their grid counts.
pub fn write_by_shape(
    prefix: &Path,
    grids: Vec<TokenGrid>,
) -> anyhow::Result<Vec<(PathBuf, usize)>> {
    let mut by: BTreeMap<(u32, u32), Vec<TokenGrid>> = BTreeMap::new();
    for g in grids {
        by.entry((g.height(), g.width())).or_default().push(g);
    }
    let mut out = Vec::new();
    for ((h, w), gs) in by {
        let mut name = prefix.as_os_str().to_os_string();
        name.push(format!("-{h}x{w}.umtg"));
        let path = PathBuf::from(name);
        std::fs::write(&path, write_grid_file(&gs)?)
            .with_context(|| format!("writing {}", path.display()))?;
        out.push((path, gs.len()));
    }
    Ok(out)
}

/// Runs `unimic tokenize`.
pub fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.scale.is_finite() && args.scale > 0.0 && args.scale <= 16.0,
        "--scale must be in (0, 16], got {}",
        args.scale
    );
    for d in &args.dirs {
        models::check_input_dir(d)?;
    }
    models::check_output_prefix(&args.output)?;
    let tok = models::tokenizer(args.tokenizer.as_deref())?;
    let mut paths = Vec::new();
    for d in &args.dirs {
        paths.extend(models::list_images(d)?);
    }
    ensure!(!paths.is_empty(), "no PNG/JPEG images in the folders given");
    let pb = indicatif::ProgressBar::new(paths.len() as u64);
    let mut grids = Vec::with_capacity(paths.len());
    for p in &paths {
        let img = image::open(p)
            .with_context(|| format!("decoding {}", p.display()))?
            .to_rgb8();
        let Some(img) = prepare(img, args.scale, tok.factor()) else {
            pb.println(format!(
                "skipped {}: smaller than one token after scaling",
                p.display()
            ));
            pb.inc(1);
            continue;
        };
        grids.push(
            tok.encode(&img)
                .with_context(|| format!("tokenizing {}", p.display()))?,
        );
        pb.inc(1);
    }
    pb.finish_and_clear();
    for (path, n) in write_by_shape(&args.output, grids)? {
        println!("{}: {n} grids", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use unimic_codec::grid::read_grid_file;

    #[test]
    fn prepare_scales_and_cuts_to_whole_tokens() {
        let img = RgbImage::from_fn(481, 321, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let p = prepare(img.clone(), 1.0, 16).unwrap();
        assert_eq!(p.dimensions(), (480, 320));
        assert_eq!(
            p.get_pixel(479, 319),
            img.get_pixel(479, 319),
            "cut at right/bottom"
        );
        let p = prepare(img.clone(), 1.6, 16).unwrap();
        assert_eq!(p.dimensions(), (768, 512)); // 770 x 514 before the cut
        assert!(prepare(img.clone(), 0.03, 16).is_none());
        assert!(prepare(RgbImage::new(15, 40), 1.0, 16).is_none());
    }

    #[test]
    fn tokenizes_a_folder_whole_with_the_shipped_tokenizer() {
        let dir = std::env::temp_dir().join(format!("unimic-tokenize-run-{}", std::process::id()));
        let imgs = dir.join("imgs");
        std::fs::create_dir_all(&imgs).unwrap();
        let img = RgbImage::from_fn(70, 40, |x, y| {
            image::Rgb([(x * 3) as u8, (y * 5) as u8, 90])
        });
        img.save(imgs.join("a.png")).unwrap();
        std::fs::write(imgs.join("notes.txt"), "not an image").unwrap();
        run(Args {
            dirs: vec![imgs.clone()],
            output: dir.join("out"),
            scale: 1.0,
            tokenizer: None,
        })
        .unwrap();
        // 70x40 is cut to 64x32: a 2x4 grid, the same tokens as tokenizing the cut image.
        let grids =
            read_grid_file(&std::fs::read(dir.join("out-2x4.umtg")).unwrap(), 1 << 20).unwrap();
        let tok = models::tokenizer(None).unwrap();
        let direct = tok.encode(&prepare(img, 1.0, 16).unwrap()).unwrap();
        assert_eq!(grids, vec![direct]);
        let bad = run(Args {
            dirs: vec![imgs],
            output: dir.join("out"),
            scale: 0.0,
            tokenizer: None,
        });
        assert!(bad.unwrap_err().to_string().contains("--scale"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn grids_are_grouped_by_shape_in_reading_order() {
        let dir = std::env::temp_dir().join(format!("unimic-tokenize-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let g =
            |h: u32, w: u32, v: u32| TokenGrid::new(h, w, 8, vec![v; (h * w) as usize]).unwrap();
        let written = write_by_shape(
            &dir.as_path().join("set"),
            vec![g(2, 3, 1), g(3, 2, 2), g(2, 3, 3)],
        )
        .unwrap();
        assert_eq!(written.len(), 2);
        let a = read_grid_file(
            &std::fs::read(dir.as_path().join("set-2x3.umtg")).unwrap(),
            1 << 20,
        )
        .unwrap();
        assert_eq!(a.iter().map(|g| g.ids()[0]).collect::<Vec<_>>(), vec![1, 3]);
        let b = read_grid_file(
            &std::fs::read(dir.as_path().join("set-3x2.umtg")).unwrap(),
            1 << 20,
        )
        .unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].height(), b[0].width()), (3, 2));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Token grids from images for `unimic train entropy`: random crops and flips tokenized with the
//! project's VQ tokenizer, cached as token-grid files next to the model so a resumed or repeated
//! run does not tokenize again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use image::imageops::{self, FilterType};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use unimic_codec::entropy::train::{tokenize_captions, GridSet, Sample};
use unimic_codec::grid::{read_grid_file, write_grid_file, TokenGrid};
use unimic_codec::nn::weights::splitmix64;
use unimic_codec::tokenizer::{self, ImageTokenizer};

use super::Args;

/// The crop sampler's random numbers: SplitMix64 from the run's seed.
struct CropRng(u64);

impl CropRng {
    fn seed_from_u64(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = splitmix64(self.0);
        self.0
    }

    /// Uniform in `0..=hi`.
    fn upto(&mut self, hi: u32) -> u32 {
        (self.next() % (u64::from(hi) + 1)) as u32
    }
}

/// Scales `img` up (keeping its aspect) so that both sides are at least `crop`.
fn at_least(img: RgbImage, crop: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let short = w.min(h).max(1);
    if short >= crop {
        return img;
    }
    let (nw, nh) = (
        (w * crop).div_ceil(short).max(crop),
        (h * crop).div_ceil(short).max(crop),
    );
    imageops::resize(&img, nw, nh, FilterType::Triangle)
}

/// `crop × crop` pieces of one image: `n` random ones or, when `rng` is `None`, the centre.
///
/// A random crop first scales the image so that its shorter side is uniform in
/// `crop..=native` (so the grids cover both native detail and the whole-frame views that
/// `--size` benchmarks and `encode --size` produce), then cuts a random square and flips it
/// horizontally with probability 1/2.
fn crops(img: RgbImage, crop: u32, n: usize, rng: Option<&mut CropRng>) -> Vec<RgbImage> {
    let img = at_least(img, crop);
    let (w, h) = img.dimensions();
    match rng {
        None => {
            vec![imageops::crop_imm(&img, (w - crop) / 2, (h - crop) / 2, crop, crop).to_image()]
        }
        Some(rng) => (0..n)
            .map(|_| {
                let short = w.min(h);
                let target = crop + rng.upto(short - crop);
                let scaled;
                let (img, w, h) = if target < short {
                    let (sw, sh) = (
                        (u64::from(w) * u64::from(target) / u64::from(short)).max(u64::from(crop))
                            as u32,
                        (u64::from(h) * u64::from(target) / u64::from(short)).max(u64::from(crop))
                            as u32,
                    );
                    scaled = imageops::resize(&img, sw, sh, FilterType::CatmullRom);
                    (&scaled, sw, sh)
                } else {
                    (&img, w, h)
                };
                let x = rng.upto(w - crop);
                let y = rng.upto(h - crop);
                let c = imageops::crop_imm(img, x, y, crop, crop).to_image();
                if rng.next() & 1 == 1 {
                    imageops::flip_horizontal(&c)
                } else {
                    c
                }
            })
            .collect(),
    }
}

/// A progress bar over `len` images being tokenized, labelled `label`.
fn images_bar(len: usize, label: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} tokenizing {msg} {bar:30} {pos}/{len} images ({eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message(label.to_string());
    pb
}

/// Tokenizes `(image path, caption)` items, `n` crops each (centre crop if `rng` is `None`).
fn tokenize(
    tok: &dyn ImageTokenizer,
    items: &[(PathBuf, Vec<String>)],
    crop: u32,
    n: usize,
    mut rng: Option<&mut CropRng>,
    label: &str,
) -> anyhow::Result<(Vec<TokenGrid>, Vec<String>)> {
    let pb = images_bar(items.len(), label);
    let mut grids = Vec::new();
    let mut caps = Vec::new();
    for (path, captions) in items {
        let img = image::open(path)
            .with_context(|| format!("decoding {}", path.display()))?
            .to_rgb8();
        for (i, c) in crops(img, crop, n, rng.as_deref_mut())
            .into_iter()
            .enumerate()
        {
            grids.push(tok.encode(&c)?);
            caps.push(if captions.is_empty() {
                String::new()
            } else {
                captions[i % captions.len()].clone()
            });
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok((grids, caps))
}

/// Every `win × win` window, at `stride` tokens, of each training image tokenized whole: scaled
/// so that its shorter side is `side` pixels, cut (centred) to multiples of 16, as is and flipped.
fn whole_windows(
    tok: &dyn ImageTokenizer,
    items: &[(PathBuf, Vec<String>)],
    side: u32,
    win: usize,
    stride: usize,
) -> anyhow::Result<(Vec<TokenGrid>, Vec<String>)> {
    let pb = images_bar(items.len(), "whole images");
    let stride = stride.max(1);
    let mut out = Vec::new();
    let mut caps = Vec::new();
    for (path, captions) in items {
        let img = image::open(path)
            .with_context(|| format!("decoding {}", path.display()))?
            .to_rgb8();
        let (w, h) = img.dimensions();
        let (sw, sh, cw, ch) = whole_dims(w, h, side);
        let scaled = imageops::resize(&img, sw, sh, FilterType::CatmullRom);
        let base = imageops::crop_imm(&scaled, (sw - cw) / 2, (sh - ch) / 2, cw, ch).to_image();
        let mut j = 0;
        for view in [imageops::flip_horizontal(&base), base] {
            let g = tok.encode(&view)?;
            let (gh, gw, k) = (g.height() as usize, g.width() as usize, g.codebook_size());
            if gh < win || gw < win {
                continue;
            }
            let ids = g.ids();
            for r0 in (0..=gh - win).step_by(stride) {
                for c0 in (0..=gw - win).step_by(stride) {
                    let mut v = Vec::with_capacity(win * win);
                    for r in r0..r0 + win {
                        v.extend_from_slice(&ids[r * gw + c0..r * gw + c0 + win]);
                    }
                    out.push(TokenGrid::new(win as u32, win as u32, k, v)?);
                    // Window j of a captioned image takes caption j (mod their number) as its
                    // own; `add_alternative_captions` gives it the others.
                    caps.push(if captions.is_empty() {
                        String::new()
                    } else {
                        captions[j % captions.len()].clone()
                    });
                    j += 1;
                }
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok((out, caps))
}

/// The whole-image view of a `w × h` image at shorter side `side`: the scaled size `(sw, sh)` and
/// the centred cut `(cw, ch)` to multiples of 16.
fn whole_dims(w: u32, h: u32, side: u32) -> (u32, u32, u32, u32) {
    let short = w.min(h).max(1);
    let (sw, sh) = (
        (u64::from(w) * u64::from(side) / u64::from(short)).max(u64::from(side)) as u32,
        (u64::from(h) * u64::from(side) / u64::from(short)).max(u64::from(side)) as u32,
    );
    (sw, sh, sw / 16 * 16, sh / 16 * 16)
}

/// How many windows [`whole_windows`] cuts from each item (read from the image headers, without
/// decoding), so cached windows can be matched to their images again.
fn window_counts(
    items: &[(PathBuf, Vec<String>)],
    side: u32,
    win: usize,
    stride: usize,
) -> anyhow::Result<Vec<usize>> {
    let stride = stride.max(1);
    items
        .iter()
        .map(|(path, _)| {
            let (w, h) = image::image_dimensions(path)
                .with_context(|| format!("reading the size of {}", path.display()))?;
            let (_, _, cw, ch) = whole_dims(w, h, side);
            let (gh, gw) = ((ch / 16) as usize, (cw / 16) as usize);
            Ok(if gh < win || gw < win {
                0
            } else {
                2 * ((gh - win) / stride + 1) * ((gw - win) / stride + 1)
            })
        })
        .collect()
}

/// Reads `captions.csv` ([`crate::models::read_captions`]) into the captions of each image.
fn read_captions(path: &Path) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (image, caption) in crate::models::read_captions(path)? {
        map.entry(image).or_default().push(caption);
    }
    Ok(map)
}

fn to_set(grids: Vec<TokenGrid>, caps: &[String], text: bool) -> anyhow::Result<GridSet> {
    let Some(first) = grids.first() else {
        bail!("no grids");
    };
    let (h, w, k) = (
        first.height() as usize,
        first.width() as usize,
        first.codebook_size() as usize,
    );
    let ids: Vec<Vec<u32>> = if text {
        tokenize_captions(&caps.iter().map(String::as_str).collect::<Vec<_>>())?
    } else {
        vec![Vec::new(); grids.len()]
    };
    Ok(GridSet {
        height: h,
        width: w,
        codebook_size: k,
        samples: grids
            .into_iter()
            .zip(ids)
            .map(|(g, text)| Sample {
                ids: g.into_ids(),
                text,
                alt_texts: Vec::new(),
            })
            .collect(),
    })
}

/// Gives every training grid the other captions of its image: `counts[i]` consecutive samples
/// of `samples` belong to item `i`, sample `j` of an image owning caption `j` (mod their number).
fn add_alternative_captions(
    samples: &mut [Sample],
    items: &[(PathBuf, Vec<String>)],
    counts: &[usize],
) -> anyhow::Result<()> {
    let total: usize = counts.iter().sum();
    if samples.len() != total || counts.len() != items.len() {
        bail!(
            "{} training grids for {} images ({total} expected)",
            samples.len(),
            items.len()
        );
    }
    // One tokenizer for every caption (building the o200k tokenizer is the expensive part).
    let all: Vec<&str> = items
        .iter()
        .flat_map(|(_, c)| c.iter().map(String::as_str))
        .collect();
    let mut all_ids = tokenize_captions(&all)?.into_iter();
    let mut rest = samples;
    for ((_, captions), &n) in items.iter().zip(counts) {
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(n);
        rest = tail;
        let ids: Vec<Vec<u32>> = all_ids.by_ref().take(captions.len()).collect();
        if captions.len() < 2 {
            continue;
        }
        for (i, s) in mine.iter_mut().enumerate() {
            let own = i % captions.len();
            s.alt_texts = ids
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != own)
                .map(|(_, t)| t.clone())
                .collect();
        }
    }
    Ok(())
}

/// Loads a cached grid file and its captions, or builds and caches them.
fn cached(
    path: &Path,
    text: bool,
    build: impl FnOnce() -> anyhow::Result<(Vec<TokenGrid>, Vec<String>)>,
) -> anyhow::Result<GridSet> {
    let cap_path = path.with_extension("captions.txt");
    if path.exists() && (!text || cap_path.exists()) {
        let bytes = std::fs::read(path)?;
        let grids = read_grid_file(&bytes, 1 << 28)?;
        let caps: Vec<String> = if text {
            std::fs::read_to_string(&cap_path)?
                .lines()
                .map(str::to_string)
                .collect()
        } else {
            vec![String::new(); grids.len()]
        };
        if caps.len() != grids.len() {
            bail!("{} does not match {}", cap_path.display(), path.display());
        }
        eprintln!("using cached grids {}", path.display());
        return to_set(grids, &caps, text);
    }
    let (grids, caps) = build()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, write_grid_file(&grids)?)?;
    if text {
        std::fs::write(&cap_path, caps.join("\n"))?;
    }
    to_set(grids, &caps, text)
}

/// The training and validation sets and a description of the data.
pub fn grid_sets(args: &Args, text: bool) -> anyhow::Result<(GridSet, GridSet, String)> {
    let tok_dir = args
        .tokenizer
        .clone()
        .unwrap_or_else(tokenizer::default_dir);
    let tok = tokenizer::load_dir(&tok_dir)
        .with_context(|| format!("loading the tokenizer from {}", tok_dir.display()))?;
    let (train_items, val_items, src): (Vec<_>, Vec<_>, String) = if let Some(dir) = &args.captioned
    {
        let caps = read_captions(&dir.join("captions.csv"))?;
        let all = crate::models::list_images(&dir.join("images"))?;
        if all.len() <= args.holdout {
            bail!("{} has only {} images", dir.display(), all.len());
        }
        let split = all.len() - args.holdout;
        let with = |p: &PathBuf| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (p.clone(), caps.get(&name).cloned().unwrap_or_default())
        };
        (
            all[..split].iter().map(with).collect(),
            all[split..].iter().map(with).collect(),
            format!(
                "{} (captions.csv; last {} images by name held out)",
                dir.display(),
                args.holdout
            ),
        )
    } else {
        let mut tr = Vec::new();
        for d in &args.images {
            tr.extend(
                crate::models::list_images(d)?
                    .into_iter()
                    .map(|p| (p, Vec::new())),
            );
        }
        let mut va = Vec::new();
        for d in &args.val_images {
            va.extend(
                crate::models::list_images(d)?
                    .into_iter()
                    .map(|p| (p, Vec::new())),
            );
        }
        if va.is_empty() {
            bail!("--images needs --val-images");
        }
        let names = |v: &[PathBuf]| {
            v.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" + ")
        };
        (
            tr,
            va,
            format!(
                "train {} / val {}",
                names(&args.images),
                names(&args.val_images)
            ),
        )
    };
    if train_items.is_empty() {
        bail!("no training images found");
    }
    // The cache is shared by every model trained on the same crops of the same images with the
    // same tokenizer (generic and masked tokenize once), whatever the model's id.
    let key = {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (p, c) in train_items.iter().chain(&val_items) {
            h.update(p.display().to_string().as_bytes());
            h.update([0]);
            h.update(c.join("\n").as_bytes());
            h.update([0]);
        }
        h.update(format!(
            "crops-v2|{}|{}|{}|{text}",
            args.crop,
            args.crops_per_image.max(1),
            args.seed
        ));
        hex::encode(&h.finalize()[..6])
    };
    let tag = &tok.id().sha256[..12];
    let train_cache = args.out.join(format!("data/{tag}-{key}.train.umtg"));
    let val_cache = args.out.join(format!("data/{tag}-{key}.val.umtg"));
    let mut rng = CropRng::seed_from_u64(args.seed);
    let crop = args.crop;
    let n = args.crops_per_image.max(1);
    let mut train_set = cached(&train_cache, text, || {
        tokenize(&tok, &train_items, crop, n, Some(&mut rng), "train")
    })?;
    let mut whole = String::new();
    if text {
        add_alternative_captions(
            &mut train_set.samples,
            &train_items,
            &vec![n; train_items.len()],
        )?;
        whole = "; each training step draws one of the image's captions".to_string();
    }
    if args.whole_side > 0 {
        if args.whole_side < crop {
            bail!("--whole-side {} is below the crop {crop}", args.whole_side);
        }
        let win = (crop / 16) as usize;
        let stride = args.window_stride.max(1);
        let wkey = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            for (p, c) in &train_items {
                h.update(p.display().to_string().as_bytes());
                h.update([0]);
                if text {
                    // The windows' cached captions must be those read now.
                    h.update(c.join("\n").as_bytes());
                    h.update([0]);
                }
            }
            h.update(format!("whole-v1|{}|{win}|{stride}", args.whole_side));
            if text {
                h.update("|captioned");
            }
            hex::encode(&h.finalize()[..6])
        };
        let path = args.out.join(format!("data/{tag}-{wkey}.whole.umtg"));
        let mut windows = cached(&path, text, || {
            whole_windows(&tok, &train_items, args.whole_side, win, stride)
        })?;
        if text {
            let counts = window_counts(&train_items, args.whole_side, win, stride)?;
            add_alternative_captions(&mut windows.samples, &train_items, &counts)?;
        }
        if (windows.height, windows.width) != (train_set.height, train_set.width) {
            bail!("whole-image windows do not match the crops' grid shape");
        }
        whole = format!(
            "{whole} + {} windows ({win}x{win}, stride {stride}) of the training images tokenized whole \
             at shorter side {} px, as is and flipped",
            windows.samples.len(),
            args.whole_side
        );
        train_set.samples.extend(windows.samples);
    }
    let val_set = cached(&val_cache, text, || {
        tokenize(&tok, &val_items, crop, 1, None, "val")
    })?;
    let data = format!(
        "{src}; {crop}x{crop} crops ({n} random+flip per training image, centre crop for validation){whole}; \
         tokenized by {} sha256 {}: {} train / {} val grids of {}x{}",
        tok.id().name,
        tok.id().sha256,
        train_set.samples.len(),
        val_set.samples.len(),
        train_set.height,
        train_set.width
    );
    Ok((train_set, val_set, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_follow_the_whole_image_geometry() {
        let dir = std::env::temp_dir().join(format!("unimic-windows-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // 500x375 at shorter side 288: 384x288 -> cut 384x288 -> 24x18 tokens.
        let a = dir.join("a.png");
        RgbImage::new(500, 375).save(&a).unwrap();
        // 300x300 at 288: 288x288 -> 18x18 tokens.
        let b = dir.join("b.png");
        RgbImage::new(300, 300).save(&b).unwrap();
        assert_eq!(whole_dims(500, 375, 288), (384, 288, 384, 288));
        let items = vec![(a, vec![]), (b, vec![])];
        // Two views each; stride 1: (18-16+1)*(24-16+1) and 3*3.
        assert_eq!(window_counts(&items, 288, 16, 1).unwrap(), vec![54, 18]);
        // Stride 2: rows 0,2 and columns 0,2,4,6,8.
        assert_eq!(window_counts(&items, 288, 16, 2).unwrap(), vec![20, 8]);
        // Windows larger than the grid: none.
        assert_eq!(window_counts(&items, 288, 20, 1).unwrap(), vec![0, 0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn each_grid_gets_the_other_captions_of_its_own_image() {
        let sample = |t: u32| Sample {
            ids: vec![t],
            text: Vec::new(),
            alt_texts: Vec::new(),
        };
        let mut samples: Vec<Sample> = (0..5).map(sample).collect();
        let items = vec![
            (
                PathBuf::from("a"),
                vec!["one".to_string(), "two".to_string()],
            ),
            (PathBuf::from("b"), vec!["only".to_string()]),
            (PathBuf::from("c"), vec!["x y".to_string(), "z".to_string()]),
        ];
        // Uneven counts: image a has 3 grids, b 1, c 1.
        add_alternative_captions(&mut samples, &items, &[3, 1, 1]).unwrap();
        let ids = |s: &str| tokenize_captions(&[s]).unwrap().remove(0);
        assert_eq!(samples[0].alt_texts, vec![ids("two")]);
        assert_eq!(samples[1].alt_texts, vec![ids("one")]);
        assert_eq!(samples[2].alt_texts, vec![ids("two")]);
        assert!(
            samples[3].alt_texts.is_empty(),
            "one caption: no alternative"
        );
        assert_eq!(samples[4].alt_texts, vec![ids("z")]);
        // Counts that do not add up are refused.
        assert!(add_alternative_captions(&mut samples, &items, &[2, 1, 1]).is_err());
    }
}

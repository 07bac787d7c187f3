//! The transformer entropy models in `unimic bench codec`: `generic`, `masked` (whole grid and the
//! inpaint / outpaint scenarios) and `text` (captioned held-out images), each round trip verified.
//!
//! Bits are the coded payload (what travels). `bits_generic` in a scenario line is what the
//! generic model spends on the same tokens: the sum of their code lengths `-log2 p` (ideal, without
//! the coder's termination) inside its raster pass over the whole grid, so that it can be compared
//! token for token; `bits_uniform` is `tokens × log2 K`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context};
use serde_json::{json, Map, Value};
use unimic_codec::entropy::generic::Generic;
use unimic_codec::entropy::masked::Masked;
use unimic_codec::entropy::text_cond::TextCond;
use unimic_codec::grid::TokenGrid;
use unimic_codec::nn::model::Manifest;
use unimic_codec::text::{O200k, TextTokenizer};

use super::Tally;

/// The shipped transformer models found in a directory (each optional).
pub struct Models {
    /// Causal raster model and its manifest.
    pub generic: Option<(Generic, Manifest)>,
    /// Masked model and its manifest.
    pub masked: Option<(Masked, Manifest)>,
    /// Text-conditioned model and its manifest.
    pub text: Option<(TextCond, Manifest)>,
}

impl Models {
    /// Loads the shipped models (ids from [`crate::models::shipped_id`]) from `dir` when present
    /// (a model whose manifest exists but fails to load is an error; a missing one is reported
    /// and skipped).
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        fn one<T>(
            dir: &Path,
            kind: &str,
            load: impl Fn(&Path) -> Result<(T, Manifest), unimic_codec::nn::model::ModelError>,
        ) -> anyhow::Result<Option<(T, Manifest)>> {
            let id = crate::models::shipped_id(kind).context("unknown model kind")?;
            let p = dir.join(format!("{id}.json"));
            if !p.exists() {
                eprintln!("bench codec: no {kind} model at {} (skipped)", p.display());
                return Ok(None);
            }
            Ok(Some(
                load(&p).with_context(|| format!("loading {}", p.display()))?,
            ))
        }
        Ok(Self {
            generic: one(dir, "generic", Generic::load)?,
            masked: one(dir, "masked", Masked::load)?,
            text: one(dir, "text", TextCond::load)?,
        })
    }
}

/// `-log2(w[id] / Σw)` for each position, from integer weight vectors.
fn code_lengths(weights: &[Vec<u64>], ids: &[u32]) -> Vec<f64> {
    weights
        .iter()
        .zip(ids)
        .map(|(w, &id)| {
            let total: u64 = w.iter().sum();
            let p = w.get(id as usize).copied().unwrap_or(0) as f64 / total.max(1) as f64;
            -p.max(f64::MIN_POSITIVE).log2()
        })
        .collect()
}

/// Names of the masked-model scenarios, in output order.
pub const SCENARIOS: [&str; 4] = ["inpaint25", "inpaint50", "outpaint", "checker"];

/// The unknown positions of scenario `name` on an `h × w` grid: `inpaint25` / `inpaint50` are
/// centred squares (sides `round(side·√0.25)`, `round(side·√0.5)`) covering about 25% / 50% of the
/// grid; `outpaint` is the border around a known centred square of side `round(side·√0.75)`, about
/// 25% of the grid (on 16×16: 64, 121 and 60 of 256 tokens). `checker` is a diagnostic, not an
/// edit: the cells with `row + column` even (half the grid), so that every unknown cell's four
/// neighbours are known. It is the split most favourable to the masked model, so its ratio to
/// generic shows the most that context on every side gives this model per token. `None` for an
/// unknown name.
pub fn scenario(name: &str, h: usize, w: usize) -> Option<Vec<bool>> {
    let rect = |frac: f64| -> Vec<bool> {
        let side = |n: usize| ((n as f64 * frac.sqrt()).round() as usize).clamp(1, n);
        let (rh, rw) = (side(h), side(w));
        let (r0, c0) = ((h - rh) / 2, (w - rw) / 2);
        (0..h * w)
            .map(|i| {
                let (r, c) = (i / w, i % w);
                r >= r0 && r < r0 + rh && c >= c0 && c < c0 + rw
            })
            .collect()
    };
    match name {
        "inpaint25" => Some(rect(0.25)),
        "inpaint50" => Some(rect(0.5)),
        "outpaint" => Some(rect(0.75).into_iter().map(|k| !k).collect()),
        "checker" => Some((0..h * w).map(|i| (i / w + i % w) % 2 == 0).collect()),
        _ => None,
    }
}

/// Lines for the generic and masked models (whole grids and the masked scenarios) on `items`.
pub fn bench_images(
    models: &Models,
    items: &[TokenGrid],
    pixels: &[u64],
    extra: &[(&str, Value)],
) -> anyhow::Result<Vec<Map<String, Value>>> {
    let mut rows = Vec::new();
    let total_pixels: u64 = pixels.iter().sum::<u64>().max(1);
    // The generic model's code length of every token, reused by the scenario lines.
    let mut generic_lengths: Vec<Vec<f64>> = Vec::new();
    if let Some((g, man)) = &models.generic {
        let mut tally = Tally::default();
        for (i, grid) in items.iter().enumerate() {
            generic_lengths.push(generic_roundtrip(g, grid, &mut tally, i)?);
        }
        rows.push(tally.row(
            "image",
            "generic",
            &with_model(extra, &tally, man, total_pixels),
        ));
    }
    if let Some((m, man)) = &models.masked {
        // Whole grid: everything unknown.
        let mut tally = Tally::default();
        for (i, grid) in items.iter().enumerate() {
            let unknown = vec![true; grid.len()];
            let (bits, ce) = masked_roundtrip(m, grid, &unknown, &mut tally, i)?;
            tally.cross_entropy += ce;
            tally.add(grid, bits);
        }
        let mut ex = with_model(extra, &tally, man, total_pixels);
        ex.push(("scenario", json!("whole")));
        rows.push(tally.row("image", "masked", &ex));
        for name in SCENARIOS {
            let mut tally = Tally::default();
            let (mut bits_generic, mut bits_uniform) = (0.0f64, 0.0f64);
            let mut has_generic = !generic_lengths.is_empty();
            for (i, grid) in items.iter().enumerate() {
                let (h, w) = (grid.height() as usize, grid.width() as usize);
                let unknown = scenario(name, h, w).context("unknown scenario")?;
                let n_unknown = unknown.iter().filter(|&&u| u).count();
                let (bits, ce) = masked_roundtrip(m, grid, &unknown, &mut tally, i)?;
                tally.cross_entropy += ce;
                tally.items += 1;
                tally.tokens += n_unknown as u64;
                tally.bits += bits;
                tally.raw_bits += n_unknown as f64 * f64::from(grid.codebook_size()).log2();
                bits_uniform += n_unknown as f64 * f64::from(grid.codebook_size()).log2();
                match generic_lengths.get(i) {
                    Some(l) => {
                        bits_generic += l
                            .iter()
                            .zip(&unknown)
                            .filter(|(_, &u)| u)
                            .map(|(b, _)| b)
                            .sum::<f64>()
                    }
                    None => has_generic = false,
                }
            }
            let mut ex = with_model(extra, &tally, man, total_pixels);
            ex.push(("scenario", json!(name)));
            ex.push(("bits_uniform", json!(bits_uniform)));
            if has_generic {
                ex.push(("bits_generic", json!(bits_generic)));
                ex.push((
                    "ratio_vs_generic",
                    json!(tally.bits as f64 / bits_generic.max(f64::MIN_POSITIVE)),
                ));
            }
            rows.push(tally.row("image", "masked", &ex));
        }
    }
    Ok(rows)
}

/// Codes `grid` with the generic model, decodes it back (timed, verified), counts it in `tally`
/// and returns the code length of every token.
fn generic_roundtrip(
    g: &Generic,
    grid: &TokenGrid,
    tally: &mut Tally,
    item: usize,
) -> anyhow::Result<Vec<f64>> {
    let t0 = Instant::now();
    let bytes = g.encode(grid)?;
    tally.enc_s += t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let back = g.decode(grid.height(), grid.width(), &bytes)?;
    tally.dec_s += t0.elapsed().as_secs_f64();
    ensure!(
        &back == grid,
        "round trip failed: model generic, item {item}"
    );
    let lens = code_lengths(&g.weights_full(grid)?, grid.ids());
    tally.cross_entropy += lens.iter().sum::<f64>();
    tally.add(grid, 8 * bytes.len() as u64);
    Ok(lens)
}

/// Codes the unknown positions of `grid` with the masked model and decodes them back from only
/// the known ones; returns (coded bits, ideal bits).
fn masked_roundtrip(
    m: &Masked,
    grid: &TokenGrid,
    unknown: &[bool],
    tally: &mut Tally,
    item: usize,
) -> anyhow::Result<(u64, f64)> {
    let t0 = Instant::now();
    let bytes = m.encode(grid, unknown)?;
    tally.enc_s += t0.elapsed().as_secs_f64();
    // The receiver holds only the known tokens.
    let partial: Vec<u32> = grid
        .ids()
        .iter()
        .zip(unknown)
        .map(|(&id, &u)| if u { 0 } else { id })
        .collect();
    let t0 = Instant::now();
    let back = m.decode(grid.height(), grid.width(), &partial, unknown, &bytes)?;
    tally.dec_s += t0.elapsed().as_secs_f64();
    ensure!(
        &back == grid,
        "round trip failed: model masked, item {item}"
    );
    // Ideal code length of the same symbols (a second encoder-side pass).
    let ids = grid.ids();
    let ws = m.weights_unknown(grid.width() as usize, ids, unknown);
    let coded: Vec<u32> = ids
        .iter()
        .zip(unknown)
        .filter(|(_, &u)| u)
        .map(|(&id, _)| id)
        .collect();
    let ce = code_lengths(&ws, &coded).iter().sum::<f64>();
    Ok((8 * bytes.len() as u64, ce))
}

fn with_model<'a>(
    extra: &[(&'a str, Value)],
    tally: &Tally,
    man: &Manifest,
    total_pixels: u64,
) -> Vec<(&'a str, Value)> {
    let mut ex = extra.to_vec();
    ex.push(("model_id", json!(man.id)));
    ex.push(("model_sha256", json!(man.sha256)));
    ex.push(("params", json!(man.params)));
    ex.push(("bpp", json!(tally.bits as f64 / total_pixels as f64)));
    ex.push((
        "bits_per_item",
        json!(tally.bits as f64 / tally.items.max(1) as f64),
    ));
    let n = tally.items.max(1) as f64;
    ex.push(("encode_ms_per_item", json!(1e3 * tally.enc_s / n)));
    ex.push(("decode_ms_per_item", json!(1e3 * tally.dec_s / n)));
    ex
}

/// A captioned set's held-out images (last `holdout` by file name) with the first caption of each.
pub fn held_out_captioned(dir: &Path, holdout: usize) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let caps = crate::models::read_captions(&dir.join("captions.csv"))?;
    let mut paths = crate::models::list_images(&dir.join("images"))?;
    ensure!(
        holdout > 0 && holdout <= paths.len(),
        "--holdout {holdout} must be in 1..={}",
        paths.len()
    );
    let held = paths.split_off(paths.len() - holdout);
    held.into_iter()
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let cap = caps
                .iter()
                .find(|(i, _)| *i == name)
                .map(|(_, c)| c.clone())
                .with_context(|| format!("no caption for {name}"))?;
            Ok((p, cap))
        })
        .collect()
}

/// Every caption of the images `held_out_captioned` does not hold out (the text models' training
/// captions), in file order.
pub fn training_captions(dir: &Path, holdout: usize) -> anyhow::Result<Vec<String>> {
    let caps = crate::models::read_captions(&dir.join("captions.csv"))?;
    let mut paths = crate::models::list_images(&dir.join("images"))?;
    paths.truncate(paths.len().saturating_sub(holdout));
    let names: std::collections::HashSet<String> = paths
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    Ok(caps
        .into_iter()
        .filter(|(image, _)| names.contains(image))
        .map(|(_, c)| c)
        .collect())
}

/// The `caption` line: how many bits the held-out captions themselves carry, measured as their
/// ideal code length (`-log2 p`, no coder termination) under the adaptive text model (order 0–2)
/// after it has learned every training caption, each held-out caption coded from that same
/// state. A caption can save the text model at most the information it shares with its image,
/// and `I(image; caption) <= H(caption) <=` this code length, so `ratio_vs_generic` here (caption
/// bits over what generic spends on the images) bounds the saving any caption-conditioned model
/// can owe to the captions (what `text-empty` versus `text` measures).
fn caption_information(
    train_captions: &[String],
    captions: &[String],
    generic_bits: Option<u64>,
    extra: &[(&str, Value)],
) -> anyhow::Result<Map<String, Value>> {
    use unimic_codec::coder::Encoder;
    use unimic_codec::entropy::AdaptiveText;
    let tok = O200k::new();
    let mut learned = AdaptiveText::new(tok.vocab_size());
    for c in train_captions {
        learned.learn(&tok.encode(c));
    }
    let (mut bits, mut tokens) = (0.0f64, 0usize);
    for c in captions {
        let ids = tok.encode(c);
        let mut model = learned.clone();
        let mut enc = Encoder::new();
        model.encode(&mut enc, &ids)?;
        bits += enc.cross_entropy_bits();
        tokens += ids.len();
    }
    let mut m = Map::new();
    m.insert("kind".into(), json!("caption"));
    m.insert("model".into(), json!("adaptive-text"));
    m.insert("items".into(), json!(captions.len()));
    m.insert("tokens".into(), json!(tokens));
    m.insert("cross_entropy_bits".into(), json!(bits));
    m.insert("bits_per_token".into(), json!(bits / tokens.max(1) as f64));
    m.insert(
        "bits_per_item".into(),
        json!(bits / captions.len().max(1) as f64),
    );
    m.insert("learned_captions".into(), json!(train_captions.len()));
    if let Some(gb) = generic_bits {
        m.insert("bits_generic".into(), json!(gb));
        m.insert(
            "ratio_vs_generic".into(),
            json!(bits / (gb as f64).max(f64::MIN_POSITIVE)),
        );
    }
    for (k, v) in extra {
        m.insert((*k).into(), v.clone());
    }
    Ok(m)
}

/// Text-conditioned versus generic on the same held-out captioned grids (`captions[i]` belongs to
/// `items[i]`), and the `caption` line bounding what the captions can add (see
/// `caption_information`; `train_captions` are the captions of the training images).
pub fn bench_captioned(
    models: &Models,
    items: &[TokenGrid],
    captions: &[String],
    train_captions: &[String],
    pixels: &[u64],
    extra: &[(&str, Value)],
) -> anyhow::Result<Vec<Map<String, Value>>> {
    let mut rows = Vec::new();
    let total_pixels: u64 = pixels.iter().sum::<u64>().max(1);
    let mut generic_bits = None;
    if let Some((g, man)) = &models.generic {
        let mut tally = Tally::default();
        for (i, grid) in items.iter().enumerate() {
            generic_roundtrip(g, grid, &mut tally, i)?;
        }
        generic_bits = Some(tally.bits);
        rows.push(tally.row(
            "image",
            "generic",
            &with_model(extra, &tally, man, total_pixels),
        ));
    }
    if let Some((t, man)) = &models.text {
        let tok = O200k::new();
        // "text": each image with its caption; "text-empty": the same model with no caption, the
        // control that separates what the caption adds from what the model's training data adds.
        for (label, use_caption) in [("text", true), ("text-empty", false)] {
            let mut tally = Tally::default();
            let mut text_tokens = 0usize;
            for (i, (grid, cap)) in items.iter().zip(captions).enumerate() {
                let ids = if use_caption {
                    tok.encode(cap)
                } else {
                    Vec::new()
                };
                text_tokens += ids.len();
                let t0 = Instant::now();
                let bytes = t.encode(&ids, grid)?;
                tally.enc_s += t0.elapsed().as_secs_f64();
                let t0 = Instant::now();
                let back = t.decode(&ids, grid.height(), grid.width(), &bytes)?;
                tally.dec_s += t0.elapsed().as_secs_f64();
                ensure!(&back == grid, "round trip failed: model {label}, item {i}");
                tally.cross_entropy += code_lengths(&t.weights_full(&ids, grid)?, grid.ids())
                    .iter()
                    .sum::<f64>();
                tally.add(grid, 8 * bytes.len() as u64);
            }
            let mut ex = with_model(extra, &tally, man, total_pixels);
            ex.push(("caption_tokens", json!(text_tokens)));
            if let Some(gb) = generic_bits {
                ex.push(("bits_generic", json!(gb)));
                ex.push((
                    "ratio_vs_generic",
                    json!(tally.bits as f64 / (gb as f64).max(f64::MIN_POSITIVE)),
                ));
            }
            rows.push(tally.row("image", label, &ex));
        }
    }
    rows.push(caption_information(
        train_captions,
        captions,
        generic_bits,
        extra,
    )?);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_captions_leave_out_the_held_out_images() {
        let dir = crate::models::Scratch::new("captions");
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        for name in ["a.jpg", "b.jpg", "c.jpg", "notes.txt"] {
            std::fs::write(dir.path().join("images").join(name), b"").unwrap();
        }
        std::fs::write(
            dir.path().join("captions.csv"),
            "image,caption\na.jpg,a dog runs\nb.jpg,\"two cats, asleep\"\nc.jpg,held out\na.jpg,a brown dog\n",
        )
        .unwrap();
        let train = training_captions(dir.path(), 1).unwrap();
        assert_eq!(train, ["a dog runs", "two cats, asleep", "a brown dog"]);
        assert_eq!(
            training_captions(dir.path(), 3).unwrap(),
            Vec::<String>::new()
        );
        let held = held_out_captioned(dir.path(), 1).unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].1, "held out");
    }

    #[test]
    fn caption_information_counts_what_the_training_captions_do_not_predict() {
        let train: Vec<String> = (0..50)
            .map(|i| format!("a dog runs across the grass number {}", i % 5))
            .collect();
        let seen = caption_information(
            &train,
            &["a dog runs across the grass".into()],
            Some(1000),
            &[],
        )
        .unwrap();
        let novel = caption_information(
            &train,
            &["zebras juggle purple umbrellas".into()],
            Some(1000),
            &[],
        )
        .unwrap();
        let bits = |m: &Map<String, Value>| m["cross_entropy_bits"].as_f64().unwrap();
        assert!(bits(&seen) > 0.0);
        assert!(bits(&seen) < bits(&novel) / 3.0, "{seen:?} {novel:?}");
        assert_eq!(seen["kind"], "caption");
        assert_eq!(seen["learned_captions"], 50);
        let ratio = seen["ratio_vs_generic"].as_f64().unwrap();
        assert!((ratio - bits(&seen) / 1000.0).abs() < 1e-12);
        // Every held-out caption is coded from the learned state, not after the previous one.
        let twice = caption_information(
            &train,
            &[
                "zebras juggle purple umbrellas".into(),
                "zebras juggle purple umbrellas".into(),
            ],
            None,
            &[],
        )
        .unwrap();
        assert!((bits(&twice) - 2.0 * bits(&novel)).abs() < 1e-9);
        assert!(twice.get("ratio_vs_generic").is_none());
    }

    #[test]
    fn scenario_areas() {
        let count = |m: &[bool]| m.iter().filter(|&&u| u).count();
        let s: Vec<Vec<bool>> = SCENARIOS
            .iter()
            .map(|n| scenario(n, 16, 16).unwrap())
            .collect();
        assert_eq!(count(&s[0]), 64); // 8×8 of 256
        assert_eq!(count(&s[1]), 121); // 11×11, 47%
        assert_eq!(count(&s[2]), 256 - 196); // border around 14×14, 23%
                                             // The inpainting square is centred: rows and columns 4..12.
        assert!(s[0][4 * 16 + 4] && !s[0][3 * 16 + 4] && s[0][11 * 16 + 11] && !s[0][12 * 16 + 11]);
        // The outpainting border is the complement of a centred square.
        assert!(s[2][0] && !s[2][16 + 1] && s[2][15 * 16 + 15]);
        // The checkerboard: half the cells, and no two unknown cells side by side.
        assert_eq!(count(&s[3]), 128);
        for i in 0..256 {
            let (r, c) = (i / 16, i % 16);
            if s[3][i] {
                assert!(c == 15 || !s[3][i + 1]);
                assert!(r == 15 || !s[3][i + 16]);
            }
        }
        assert_eq!(count(&scenario("checker", 3, 5).unwrap()), 8);
        assert!(scenario("nope", 4, 4).is_none());
        // Native Kodak grids (32×48) work too.
        assert_eq!(count(&scenario("inpaint25", 32, 48).unwrap()), 16 * 24);
    }
}

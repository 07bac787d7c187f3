//! `unimic bench codec`: every entropy model on every item, every round trip verified, one JSON
//! object per line.
//!
//! * `--tokens FILE..`: token-grid files (`UMTG`, see docs/CODING.md); each grid is one message
//!   of a session. `--images DIR --size S` tokenizes images with the VQ tokenizer first
//!   (shorter side resized to `S`, centre crop `S×S`; `--size 0` keeps the native size).
//! * `--captions FILE --holdout N`: the captions of the last `N` images (file-name order), one
//!   caption per message of one session, against zstd -19 and brotli -11 of the same UTF-8 text,
//!   per caption (each compressed alone, as a message would be) and as one stream.
//! * `--adversarial`: synthetic 16×16 grids (all one symbol, 0/K−1 alternating, K−1 everywhere,
//!   the static model's least likely symbol everywhere, uniform random) for K = 1,024 and 16,384.
//!
//! Models: `uniform`; `static` (order-0 counts from `--train-tokens` files, or else leave-one-out
//! over the bench items: each item is coded with counts from all the *other* items; for text,
//! the captions of the non-held-out images); `adaptive` (conditioned on every earlier message of
//! the session still in its context). Text also reports `adaptive` with `"variant": "primed"`,
//! whose vocabulary starts from the training captions' counts.
//!
//! With `--images` (and `--captioned DIR --holdout N`) the transformer models shipped in
//! `--entropy-dir` (default `models/entropy`) are measured as well: `generic`, `masked` (the whole
//! grid, then the `inpaint25`, `inpaint50`, `outpaint` and diagnostic `checker` scenarios against
//! what `generic` and `uniform` spend on the same tokens) and, on the captioned held-out images,
//! `text` against `generic`, plus `text-empty` (the text model given no caption: the control that shows how much
//! of the gain is the caption); see [`transformers`].
//!
//! A failed round trip is an error, not a number. `ratio_vs_raw` is coded bits divided by raw
//! bits (`tokens × log2 K`); `coder_overhead` is `bits / cross_entropy_bits − 1`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use serde_json::{json, Map, Value};
use unimic_codec::context::{ContextKey, Sequence, SessionContext};
use unimic_codec::entropy::{Static, TextPrior};
use unimic_codec::grid::{read_grid_file, TokenGrid};
use unimic_codec::part::{
    CodecConfig, DecodedPart, ModelChoice, PartCodec, PartShape, PartSpec, PartTokens,
};
use unimic_codec::text::{O200k, TextTokenizer};

mod transformers;

/// Arguments of `unimic bench codec`.
#[derive(clap::Args)]
pub struct Args {
    /// Token-grid files (UMTG format); every grid is one item.
    #[arg(long, num_args = 1..)]
    pub tokens: Vec<PathBuf>,
    /// Directory of images to tokenize with the VQ tokenizer.
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Image side after resize + centre crop; 0 keeps the native size.
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// Tokenizer directory for --images (default: the shipped models/tokenizer).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// captions.csv (image,caption) for the text benchmark.
    #[arg(long)]
    pub captions: Option<PathBuf>,
    /// Number of images (file-name order, last ones) whose captions are coded.
    #[arg(long, default_value_t = 100)]
    pub holdout: usize,
    /// A captioned image set (`images/` + `captions.csv`): its last `--holdout` images by file
    /// name, each with its first caption, code with the text-conditioned and generic models.
    #[arg(long)]
    pub captioned: Option<PathBuf>,
    /// Folder of the transformer entropy models (default: the shipped `models/entropy`, or
    /// `$UNIMIC_ENTROPY`).
    #[arg(long)]
    pub entropy_dir: Option<PathBuf>,
    /// Token-grid files to train the static model on (default: leave-one-out over the items).
    #[arg(long, num_args = 1..)]
    pub train_tokens: Vec<PathBuf>,
    /// Also run the synthetic adversarial grids.
    #[arg(long)]
    pub adversarial: bool,
    /// Tokens per independently decodable chunk (0: one chunk per message).
    #[arg(long, default_value_t = 0)]
    pub chunk_tokens: u32,
    /// Session context budget in bytes (128 per stored part plus 4 per token).
    #[arg(long, default_value_t = 64 << 20)]
    pub context_bytes: u64,
    /// Pixels per token side, for bpp of --tokens runs (a VQ-16 tokenizer: 16).
    #[arg(long, default_value_t = 16)]
    pub patch: u32,
    /// One JSON object per line (otherwise a table).
    #[arg(long)]
    pub json: bool,
}

const MAX_FILE_TOKENS: u64 = 1 << 28;

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.tokens.is_empty()
        && args.images.is_none()
        && args.captions.is_none()
        && args.captioned.is_none()
        && !args.adversarial
    {
        bail!("nothing to measure: pass --tokens FILE.., --images DIR, --captions FILE, --captioned DIR or --adversarial");
    }
    let transformers = if args.images.is_some() || args.captioned.is_some() {
        let dir = crate::models::entropy_dir(args.entropy_dir.as_deref());
        transformers::Models::load(&dir)?
    } else {
        transformers::Models {
            generic: None,
            masked: None,
            text: None,
        }
    };
    let mut rows = Vec::new();
    let train = load_grids(&args.train_tokens)?;
    if !args.tokens.is_empty() {
        let items = load_grids(&args.tokens)?;
        ensure!(!items.is_empty(), "the token files hold no grids");
        let pixels: Vec<u64> = items
            .iter()
            .map(|g| u64::from(g.height() * args.patch) * u64::from(g.width() * args.patch))
            .collect();
        rows.extend(bench_grids(
            &args,
            &items,
            &pixels,
            &train,
            &[("source", json!("tokens"))],
        )?);
    }
    if let Some(dir) = &args.images {
        let (items, pixels) = tokenize_images(&args, dir)?;
        rows.extend(bench_grids(
            &args,
            &items,
            &pixels,
            &train,
            &[("source", json!("images"))],
        )?);
        rows.extend(transformers::bench_images(
            &transformers,
            &items,
            &pixels,
            &[("source", json!("images"))],
        )?);
    }
    if let Some(dir) = &args.captioned {
        let held = transformers::held_out_captioned(dir, args.holdout)?;
        let tok = crate::models::tokenizer(args.tokenizer.as_deref())?;
        let mut items = Vec::with_capacity(held.len());
        let mut pixels = Vec::with_capacity(held.len());
        for (p, _) in &held {
            use unimic_codec::tokenizer::ImageTokenizer;
            let img = image::open(p)
                .with_context(|| format!("decoding {}", p.display()))?
                .to_rgb8();
            let img = crate::models::prepare(img, args.size);
            pixels.push(u64::from(img.width()) * u64::from(img.height()));
            items.push(tok.encode(&img)?);
        }
        let caps: Vec<String> = held.into_iter().map(|(_, c)| c).collect();
        let train_caps = transformers::training_captions(dir, args.holdout)?;
        rows.extend(transformers::bench_captioned(
            &transformers,
            &items,
            &caps,
            &train_caps,
            &pixels,
            &[
                ("source", json!("captioned")),
                ("holdout_images", json!(args.holdout)),
            ],
        )?);
    }
    if args.adversarial {
        rows.extend(bench_adversarial(&args)?);
    }
    if let Some(path) = &args.captions {
        rows.extend(bench_captions(&args, path)?);
    }
    for row in &rows {
        if args.json {
            println!("{}", serde_json::to_string(row)?);
        } else {
            let g = |k: &str| row.get(k).cloned().unwrap_or(Value::Null);
            println!(
                "{:<6} {:<9} {:<8} items {:>5} tokens {:>8} bits/token {:>8.3} raw {:>6.2} ratio {:.4} overhead {:+.4}% enc {:.2}us dec {:.2}us",
                g("kind").as_str().unwrap_or(""),
                g("model").as_str().unwrap_or(""),
                g("variant").as_str().or(g("set").as_str()).or(g("scenario").as_str()).unwrap_or(""),
                g("items"),
                g("tokens"),
                g("bits_per_token").as_f64().unwrap_or(0.0),
                g("raw_bits_per_token").as_f64().unwrap_or(0.0),
                g("ratio_vs_raw").as_f64().unwrap_or(0.0),
                100.0 * g("coder_overhead").as_f64().unwrap_or(0.0),
                g("encode_us_per_token").as_f64().unwrap_or(0.0),
                g("decode_us_per_token").as_f64().unwrap_or(0.0),
            );
            if let Some(b) = row.get("bytes_per_caption") {
                println!(
                    "       bytes/caption {:.2}  zstd-19 {:.2}  brotli-11 {:.2}  (stream: zstd {:.2} brotli {:.2})  vs zstd {:.3}",
                    b.as_f64().unwrap_or(0.0),
                    g("zstd_bytes_per_caption").as_f64().unwrap_or(0.0),
                    g("brotli_bytes_per_caption").as_f64().unwrap_or(0.0),
                    g("zstd_stream_bytes_per_caption").as_f64().unwrap_or(0.0),
                    g("brotli_stream_bytes_per_caption").as_f64().unwrap_or(0.0),
                    g("ratio_vs_zstd").as_f64().unwrap_or(0.0),
                );
            }
        }
    }
    Ok(())
}

fn load_grids(paths: &[PathBuf]) -> anyhow::Result<Vec<TokenGrid>> {
    let mut out = Vec::new();
    for p in paths {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        out.extend(
            read_grid_file(&bytes, MAX_FILE_TOKENS)
                .with_context(|| format!("parsing token-grid file {}", p.display()))?,
        );
    }
    Ok(out)
}

fn tokenize_images(args: &Args, dir: &Path) -> anyhow::Result<(Vec<TokenGrid>, Vec<u64>)> {
    use image::RgbImage;
    use unimic_codec::tokenizer::{self, ImageTokenizer};
    let tdir = args
        .tokenizer
        .clone()
        .unwrap_or_else(tokenizer::default_dir);
    let tok = tokenizer::load_dir(&tdir)
        .with_context(|| format!("loading tokenizer {}", tdir.display()))?;
    let paths = crate::models::list_images(dir)?;
    ensure!(!paths.is_empty(), "no PNG/JPEG images in {}", dir.display());
    let mut grids = Vec::with_capacity(paths.len());
    let mut pixels = Vec::with_capacity(paths.len());
    for p in &paths {
        let img: RgbImage = image::open(p)
            .with_context(|| format!("decoding {}", p.display()))?
            .to_rgb8();
        let img = crate::models::prepare(img, args.size);
        pixels.push(u64::from(img.width()) * u64::from(img.height()));
        grids.push(
            tok.encode(&img)
                .with_context(|| format!("tokenizing {}", p.display()))?,
        );
    }
    Ok((grids, pixels))
}

/// Accumulated measurements of one model over a run.
#[derive(Default)]
struct Tally {
    items: usize,
    tokens: u64,
    bits: u64,
    raw_bits: f64,
    cross_entropy: f64,
    enc_s: f64,
    dec_s: f64,
}

impl Tally {
    /// Counts one coded grid.
    fn add(&mut self, grid: &TokenGrid, bits: u64) {
        self.items += 1;
        self.tokens += grid.len() as u64;
        self.bits += bits;
        self.raw_bits += grid.len() as f64 * f64::from(grid.codebook_size()).log2();
    }

    fn row(&self, kind: &str, model: &str, extra: &[(&str, Value)]) -> Map<String, Value> {
        let t = self.tokens.max(1) as f64;
        let mut m = Map::new();
        m.insert("kind".into(), json!(kind));
        m.insert("model".into(), json!(model));
        m.insert("items".into(), json!(self.items));
        m.insert("tokens".into(), json!(self.tokens));
        m.insert("bits".into(), json!(self.bits));
        m.insert("bits_per_token".into(), json!(self.bits as f64 / t));
        m.insert("raw_bits_per_token".into(), json!(self.raw_bits / t));
        m.insert(
            "ratio_vs_raw".into(),
            json!(self.bits as f64 / self.raw_bits.max(f64::MIN_POSITIVE)),
        );
        m.insert("cross_entropy_bits".into(), json!(self.cross_entropy));
        m.insert(
            "coder_overhead".into(),
            json!(if self.cross_entropy > 0.0 {
                self.bits as f64 / self.cross_entropy - 1.0
            } else {
                0.0
            }),
        );
        m.insert("encode_us_per_token".into(), json!(1e6 * self.enc_s / t));
        m.insert("decode_us_per_token".into(), json!(1e6 * self.dec_s / t));
        m.insert("roundtrip".into(), json!(true));
        for (k, v) in extra {
            m.insert((*k).into(), v.clone());
        }
        m
    }
}

/// Codes `items` as the messages of one session with each model; checks every round trip.
fn bench_grids(
    args: &Args,
    items: &[TokenGrid],
    pixels: &[u64],
    train: &[TokenGrid],
    extra: &[(&str, Value)],
) -> anyhow::Result<Vec<Map<String, Value>>> {
    let mut rows = Vec::new();
    // Static counts per codebook size: from --train-tokens, or all items (leave-one-out).
    let source: &[TokenGrid] = if train.is_empty() { items } else { train };
    let mut totals: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
    for g in source {
        let c = totals
            .entry(g.codebook_size())
            .or_insert_with(|| vec![0; g.codebook_size() as usize]);
        for &id in g.ids() {
            c[id as usize] += 1;
        }
    }
    let leave_one_out = train.is_empty();
    let total_pixels: u64 = pixels.iter().sum();
    for model in [
        ModelChoice::Uniform,
        ModelChoice::Static,
        ModelChoice::Adaptive,
    ] {
        let name = model_name(model);
        let mut tally = Tally::default();
        let mut sender_ctx = SessionContext::new(args.context_bytes);
        let mut receiver_ctx = SessionContext::new(args.context_bytes);
        let mut sender = PartCodec::default();
        let mut receiver = PartCodec::default();
        for (i, grid) in items.iter().enumerate() {
            if model == ModelChoice::Static {
                let mut counts = totals
                    .get(&grid.codebook_size())
                    .cloned()
                    .unwrap_or_else(|| vec![0; grid.codebook_size() as usize]);
                if leave_one_out {
                    for &id in grid.ids() {
                        counts[id as usize] -= 1;
                    }
                }
                let st = Arc::new(Static::from_counts(counts)?);
                sender = PartCodec::new(CodecConfig::default().with_static_grid(st.clone()));
                receiver = PartCodec::new(CodecConfig::default().with_static_grid(st));
            }
            let refs = if model == ModelChoice::Adaptive {
                sender_ctx.keys()
            } else {
                Vec::new()
            };
            let spec = PartSpec::new(model)
                .with_refs(refs)
                .with_chunk_tokens(args.chunk_tokens);
            let t0 = Instant::now();
            let part = sender.encode(&sender_ctx, PartTokens::Grid(grid), &spec)?;
            tally.enc_s += t0.elapsed().as_secs_f64();
            let shape = PartShape::Grid {
                height: grid.height(),
                width: grid.width(),
                codebook_size: grid.codebook_size(),
            };
            let t0 = Instant::now();
            let dec = receiver.decoder(&receiver_ctx, shape, &spec, &part.digest, &part.model)?;
            let back = dec.decode_all(part.chunks.iter().map(|c| c.payload.as_slice()))?;
            tally.dec_s += t0.elapsed().as_secs_f64();
            ensure!(
                back == DecodedPart::Grid(grid.clone()),
                "round trip failed: model {name}, item {i}"
            );
            let key = ContextKey::new(i as u64, 0);
            if model == ModelChoice::Adaptive {
                let a = sender_ctx.insert(key, Sequence::grid(grid))?;
                let b = receiver_ctx.insert(key, Sequence::grid(grid))?;
                ensure!(a == b, "the two ends evicted different context");
            }
            tally.items += 1;
            tally.tokens += grid.len() as u64;
            tally.bits += part.bits;
            tally.raw_bits += grid.len() as f64 * f64::from(grid.codebook_size()).log2();
            tally.cross_entropy += part.cross_entropy_bits;
        }
        let mut ex: Vec<(&str, Value)> = extra.to_vec();
        ex.push(("bpp", json!(tally.bits as f64 / total_pixels.max(1) as f64)));
        ex.push(("chunk_tokens", json!(args.chunk_tokens)));
        ex.push((
            "bits_per_item",
            json!(tally.bits as f64 / tally.items.max(1) as f64),
        ));
        if model == ModelChoice::Static {
            ex.push((
                "static_training",
                json!(if leave_one_out {
                    "leave-one-out"
                } else {
                    "train-tokens"
                }),
            ));
        }
        rows.push(tally.row("image", name, &ex));
    }
    Ok(rows)
}

fn model_name(m: ModelChoice) -> &'static str {
    match m {
        ModelChoice::Uniform => "uniform",
        ModelChoice::Static => "static",
        _ => "adaptive",
    }
}

/// Small deterministic generator (xorshift64*), so the adversarial sets are reproducible.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn bench_adversarial(args: &Args) -> anyhow::Result<Vec<Map<String, Value>>> {
    let mut rows = Vec::new();
    for k in [1024u32, 16_384] {
        // A skewed training set makes a static model with a clear least likely symbol.
        let train_ids: Vec<u32> = (0..4096u32).map(|i| (i * i) % (k - 1)).collect();
        let train = vec![TokenGrid::new(64, 64, k, train_ids)?];
        let st = Static::train(k, train.iter().map(|g| g.ids()))?;
        let least = (0..k)
            .min_by_key(|&s| (st.counts()[s as usize], s))
            .unwrap_or(k - 1);
        let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(k);
        let sets: Vec<(&str, Vec<u32>)> = vec![
            ("all-equal", vec![7 % k; 256]),
            (
                "alternating-0-kmax",
                (0..256)
                    .map(|i| if i % 2 == 0 { 0 } else { k - 1 })
                    .collect(),
            ),
            ("kmax-everywhere", vec![k - 1; 256]),
            ("least-likely-everywhere", vec![least; 256]),
            (
                "random",
                (0..256)
                    .map(|_| (xorshift(&mut seed) % u64::from(k)) as u32)
                    .collect(),
            ),
        ];
        for (set, ids) in sets {
            let items: Vec<TokenGrid> = (0..8)
                .map(|_| TokenGrid::new(16, 16, k, ids.clone()))
                .collect::<Result<_, _>>()?;
            let pixels = vec![u64::from(16 * args.patch).pow(2); items.len()];
            rows.extend(bench_grids(
                args,
                &items,
                &pixels,
                &train,
                &[("source", json!("adversarial")), ("set", json!(set))],
            )?);
        }
    }
    Ok(rows)
}

fn bench_captions(args: &Args, path: &Path) -> anyhow::Result<Vec<Map<String, Value>>> {
    let all = crate::models::read_captions(path)?;
    let images: BTreeSet<&str> = all.iter().map(|(i, _)| i.as_str()).collect();
    ensure!(
        args.holdout > 0 && args.holdout <= images.len(),
        "--holdout {} must be in 1..={}",
        args.holdout,
        images.len()
    );
    let held: BTreeSet<&str> = images
        .iter()
        .skip(images.len() - args.holdout)
        .copied()
        .collect();
    let (test, train): (Vec<_>, Vec<_>) = all.iter().partition(|(i, _)| held.contains(i.as_str()));
    let tok = O200k::new();
    let test_ids: Vec<Vec<u32>> = test.iter().map(|(_, c)| tok.encode(c)).collect();
    let train_ids: Vec<Vec<u32>> = train.iter().map(|(_, c)| tok.encode(c)).collect();
    let prior = Arc::new(TextPrior::train(
        tok.vocab_size(),
        train_ids.iter().map(Vec::as_slice),
    ));

    // General-purpose compressors on the same UTF-8 text.
    let mut zstd_each = 0usize;
    let mut brotli_each = 0usize;
    let utf8: usize = test.iter().map(|(_, c)| c.len()).sum();
    for (_, c) in &test {
        zstd_each += zstd::bulk::compress(c.as_bytes(), 19)?.len();
        brotli_each += brotli_len(c.as_bytes())?;
    }
    let stream = test
        .iter()
        .map(|(_, c)| c.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let zstd_stream = zstd::bulk::compress(stream.as_bytes(), 19)?.len();
    let brotli_stream = brotli_len(stream.as_bytes())?;

    let variants: [(ModelChoice, &str, CodecConfig); 4] = [
        (ModelChoice::Uniform, "", CodecConfig::default()),
        (
            ModelChoice::Static,
            "train-captions",
            CodecConfig::default().with_text_prior(prior.clone(), false),
        ),
        (ModelChoice::Adaptive, "cold", CodecConfig::default()),
        (
            ModelChoice::Adaptive,
            "primed",
            CodecConfig::default().with_text_prior(prior.clone(), true),
        ),
    ];
    let mut rows = Vec::new();
    let n = test.len() as f64;
    for (model, variant, config) in variants {
        let mut tally = Tally::default();
        let mut bytes = 0usize;
        let mut sender_ctx = SessionContext::new(args.context_bytes);
        let mut receiver_ctx = SessionContext::new(args.context_bytes);
        let mut sender = PartCodec::new(config.clone());
        let mut receiver = PartCodec::new(config);
        for (i, ids) in test_ids.iter().enumerate() {
            let refs = if model == ModelChoice::Adaptive {
                sender_ctx.keys()
            } else {
                Vec::new()
            };
            let spec = PartSpec::new(model)
                .with_refs(refs)
                .with_chunk_tokens(args.chunk_tokens);
            let t0 = Instant::now();
            let part = sender.encode(&sender_ctx, PartTokens::Text(ids), &spec)?;
            tally.enc_s += t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            let dec = receiver.decoder(
                &receiver_ctx,
                PartShape::Text {
                    count: ids.len() as u64,
                },
                &spec,
                &part.digest,
                &part.model,
            )?;
            let back = dec.decode_all(part.chunks.iter().map(|c| c.payload.as_slice()))?;
            tally.dec_s += t0.elapsed().as_secs_f64();
            ensure!(
                back == DecodedPart::Text(ids.clone()),
                "round trip failed: text model {}, caption {i}",
                model_name(model)
            );
            ensure!(
                tok.decode(ids)? == test[i].1,
                "o200k does not round-trip caption {i}"
            );
            let key = ContextKey::new(i as u64, 0);
            if model == ModelChoice::Adaptive {
                let a = sender_ctx.insert(key, Sequence::text(ids.clone()))?;
                let b = receiver_ctx.insert(key, Sequence::text(ids.clone()))?;
                ensure!(a == b, "the two ends evicted different context");
            }
            bytes += part.chunks.iter().map(|c| c.payload.len()).sum::<usize>();
            tally.items += 1;
            tally.tokens += ids.len() as u64;
            tally.bits += part.bits;
            tally.raw_bits += ids.len() as f64 * f64::from(tok.vocab_size()).log2();
            tally.cross_entropy += part.cross_entropy_bits;
        }
        let mut ex: Vec<(&str, Value)> = vec![
            ("bytes", json!(bytes)),
            ("bytes_zstd", json!(zstd_each)),
            ("bytes_brotli", json!(brotli_each)),
            ("bytes_zstd_stream", json!(zstd_stream)),
            ("bytes_brotli_stream", json!(brotli_stream)),
            ("bytes_utf8", json!(utf8)),
            ("bytes_per_caption", json!(bytes as f64 / n)),
            ("zstd_bytes_per_caption", json!(zstd_each as f64 / n)),
            ("brotli_bytes_per_caption", json!(brotli_each as f64 / n)),
            (
                "zstd_stream_bytes_per_caption",
                json!(zstd_stream as f64 / n),
            ),
            (
                "brotli_stream_bytes_per_caption",
                json!(brotli_stream as f64 / n),
            ),
            ("ratio_vs_zstd", json!(bytes as f64 / zstd_each as f64)),
            (
                "ratio_vs_zstd_stream",
                json!(bytes as f64 / zstd_stream as f64),
            ),
            ("holdout_images", json!(args.holdout)),
            ("train_captions", json!(train.len())),
            ("tokenizer", json!(tok.name())),
        ];
        if !variant.is_empty() {
            ex.push(("variant", json!(variant)));
        }
        rows.push(tally.row("text", model_name(model), &ex));
    }
    Ok(rows)
}

fn brotli_len(data: &[u8]) -> anyhow::Result<usize> {
    let mut out = Vec::new();
    let params = brotli::enc::BrotliEncoderParams {
        quality: 11,
        lgwin: 22,
        ..Default::default()
    };
    brotli::BrotliCompress(&mut &data[..], &mut out, &params)?;
    Ok(out.len())
}

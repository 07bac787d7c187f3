//! `unimic train entropy --kind generic|masked|text`: trains a transformer entropy model on token
//! grids and writes `<out>/<id>.safetensors` + `<out>/<id>.json` (the manifest the codec loads).
//!
//! Data: token-grid files (`UMTG`, see `unimic_codec::grid::write_grid_file`) for training and
//! validation; for `--kind text` also caption files with one caption per line, line `i` belonging
//! to grid `i`. `--synthetic N` trains on generated grids instead (a smoke test of the loop).
//! Runs are seeded and resumable: rerunning the same command continues from the last checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use unimic_codec::entropy::generic::GenericConfig;
use unimic_codec::entropy::masked::MaskedConfig;
use unimic_codec::entropy::text_cond::TextCondConfig;
use unimic_codec::entropy::train::{
    import_weights, tokenize_captions, train, Device, Event, GridSet, ModelSpec, Sample,
    TrainOptions, TrainReport,
};
use unimic_codec::grid::read_grid_file;
use unimic_codec::nn::transformer::BodyConfig;

mod external;
mod images;

/// Which model to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Causal, raster order, KV cache.
    Generic,
    /// Bidirectional, fixed group schedule over unknown positions.
    Masked,
    /// Causal, conditioned on the caption's text tokens.
    Text,
}

/// Arguments of `unimic train entropy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model to train.
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// Training grids (token-grid file).
    #[arg(long)]
    pub grids: Option<PathBuf>,
    /// Validation grids (token-grid file).
    #[arg(long)]
    pub val_grids: Option<PathBuf>,
    /// Captions of the training grids, one per line (`--kind text`).
    #[arg(long)]
    pub captions: Option<PathBuf>,
    /// Captions of the validation grids, one per line (`--kind text`).
    #[arg(long)]
    pub val_captions: Option<PathBuf>,
    /// Training images (folders of JPEG/PNG, repeatable): random crops and flips are tokenized
    /// with the tokenizer in `--tokenizer` (cached under `<out>/data/`, shared by every model trained on the same crops).
    #[arg(long)]
    pub images: Vec<PathBuf>,
    /// Validation images (folders, repeatable): one centre crop each (cached next to the training grids).
    #[arg(long)]
    pub val_images: Vec<PathBuf>,
    /// A captioned image set (`images/` + `captions.csv`, e.g. ../shared/data/flickr8k-1000): the
    /// last `--holdout` images by file name validate, the rest train (`--kind text`).
    #[arg(long)]
    pub captioned: Option<PathBuf>,
    /// Images held out for validation from `--captioned`.
    #[arg(long, default_value_t = 100)]
    pub holdout: usize,
    /// Crop side in pixels (images with a shorter side are scaled up first).
    #[arg(long, default_value_t = 256)]
    pub crop: u32,
    /// Random crops (each flipped with probability 1/2) per training image.
    #[arg(long, default_value_t = 8)]
    pub crops_per_image: usize,
    /// Also tokenize every training image whole, scaled so that its shorter side is this many
    /// pixels (then cut to a multiple of 16), as is and flipped horizontally, and add every
    /// `crop`-sized window of those token grids (at `--window-stride`) to the training grids;
    /// 0: off. Many more distinct grids for about two crops' tokenizing cost per image. With
    /// `--captioned`, each window carries its image's captions.
    #[arg(long, default_value_t = 0)]
    pub whole_side: u32,
    /// Stride, in tokens, between the windows of `--whole-side`.
    #[arg(long, default_value_t = 1)]
    pub window_stride: usize,
    /// Tokenizer folder (manifest.json + weights); default: the project's `models/tokenizer`.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Train on this many generated grids instead of files (smoke test).
    #[arg(long)]
    pub synthetic: Option<usize>,
    /// Codebook size of the synthetic grids.
    #[arg(long, default_value_t = 256)]
    pub synthetic_codebook: usize,
    /// Side of the synthetic grids.
    #[arg(long, default_value_t = 8)]
    pub synthetic_side: usize,
    /// Output folder.
    #[arg(long, default_value = "models/entropy")]
    pub out: PathBuf,
    /// Model id (also the file stem); default: the shipped id of the kind (`crate::models::shipped_id`).
    #[arg(long)]
    pub id: Option<String>,
    /// Optimiser steps in total.
    #[arg(long, default_value_t = 4000)]
    pub steps: u64,
    /// Grids per step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 200)]
    pub warmup: u64,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Validate and checkpoint every this many steps.
    #[arg(long, default_value_t = 250)]
    pub eval_every: u64,
    /// Validation grids used.
    #[arg(long, default_value_t = 256)]
    pub val_samples: usize,
    /// Start from scratch even if a checkpoint exists.
    #[arg(long)]
    pub no_resume: bool,
    /// Width of the transformer.
    #[arg(long, default_value_t = 256)]
    pub d_model: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// MLP width.
    #[arg(long, default_value_t = 768)]
    pub d_ff: usize,
    /// Largest grid side the model accepts.
    #[arg(long, default_value_t = 64)]
    pub max_side: usize,
    /// Start a new run from the tensors of this safetensors file that have the same name and
    /// shape (e.g. the masked model from a trained generic model); the others keep their seeded
    /// initialisation. Ignored when resuming from a checkpoint.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Hash buckets of the text model.
    #[arg(long, default_value_t = 4096)]
    pub text_vocab: usize,
    /// Longest text prefix of the text model.
    #[arg(long, default_value_t = 64)]
    pub max_text: usize,
    /// Largest token-grid file accepted, in tokens.
    #[arg(long, default_value_t = 1 << 28)]
    pub max_tokens: u64,
    /// Write the assembled training and validation data to this folder (`train.umtg`,
    /// `val.umtg`, `data.txt`, and `texts.json` with the captions' o200k ids) and exit without
    /// training: the input of an outside trainer such as `tools/gpu-train/train_entropy.py`.
    #[arg(long, conflicts_with = "import")]
    pub export_data: Option<PathBuf>,
    /// Do not train: adopt the weights in this safetensors file, trained elsewhere on the same
    /// data (for example by `tools/gpu-train/train_entropy.py` on a GPU). Every tensor of the
    /// architecture must be there with its shape; the validation loss is measured here, and the
    /// outside run's steps, batch, seed, data, training loss and command are read from the
    /// `<stem>.train.json` beside the file. Writes `<out>/<id>.safetensors` and its manifest.
    #[arg(long)]
    pub import: Option<PathBuf>,
}

fn load_set(
    grids: &Path,
    captions: Option<&Path>,
    text: bool,
    max_tokens: u64,
) -> anyhow::Result<GridSet> {
    let bytes = std::fs::read(grids).with_context(|| format!("reading {}", grids.display()))?;
    let grids_v = read_grid_file(&bytes, max_tokens)
        .with_context(|| format!("parsing {}", grids.display()))?;
    let Some(first) = grids_v.first() else {
        bail!("{} holds no grids", grids.display());
    };
    let (h, w, k) = (
        first.height() as usize,
        first.width() as usize,
        first.codebook_size() as usize,
    );
    let caps: Vec<Vec<u32>> = match (captions, text) {
        (Some(p), true) => {
            let t =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let caps = tokenize_captions(&t.lines().collect::<Vec<_>>())?;
            if caps.len() != grids_v.len() {
                bail!(
                    "{} has {} captions for {} grids",
                    p.display(),
                    caps.len(),
                    grids_v.len()
                );
            }
            caps
        }
        (None, true) => bail!("--kind text needs --captions and --val-captions"),
        _ => vec![Vec::new(); grids_v.len()],
    };
    let samples = grids_v
        .into_iter()
        .zip(caps)
        .map(|(g, text)| Sample {
            ids: g.into_ids(),
            text,
            alt_texts: Vec::new(),
        })
        .collect();
    Ok(GridSet {
        height: h,
        width: w,
        codebook_size: k,
        samples,
    })
}

/// Prints a log line above the progress bar, or on stderr when the bar is hidden (not a terminal),
/// so that logs of background runs keep their evaluations.
fn log_line(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    let text = args.kind == Kind::Text;
    let (train_set, val_set, data) = match args.synthetic {
        Some(n) => {
            let s = args.synthetic_side;
            let k = args.synthetic_codebook;
            let tr = GridSet::synthetic(s, s, k, n.max(1), args.seed);
            let va = GridSet::synthetic(s, s, k, (n / 10).max(1), args.seed ^ 0xABCD);
            (tr, va, format!("synthetic: {n} grids {s}x{s}, K={k}"))
        }
        None if !args.images.is_empty() || args.captioned.is_some() => {
            images::grid_sets(&args, text)?
        }
        None => {
            let (Some(g), Some(vg)) = (&args.grids, &args.val_grids) else {
                bail!("give --grids and --val-grids, --images and --val-images, --captioned, or --synthetic");
            };
            let tr = load_set(g, args.captions.as_deref(), text, args.max_tokens)?;
            let va = load_set(vg, args.val_captions.as_deref(), text, args.max_tokens)?;
            let data = format!(
                "train {} ({} grids {}x{}), val {} ({} grids){}",
                g.display(),
                tr.samples.len(),
                tr.height,
                tr.width,
                vg.display(),
                va.samples.len(),
                args.captions
                    .as_ref()
                    .map(|c| format!(", captions {}", c.display()))
                    .unwrap_or_default()
            );
            (tr, va, data)
        }
    };
    let k = train_set.codebook_size;
    let body = BodyConfig {
        d_model: args.d_model,
        n_layers: args.layers,
        n_heads: args.heads,
        d_ff: args.d_ff,
    };
    let spec = match args.kind {
        Kind::Generic => ModelSpec::Generic(GenericConfig {
            codebook_size: k,
            max_side: args.max_side,
            body,
        }),
        Kind::Masked => ModelSpec::Masked(MaskedConfig {
            codebook_size: k,
            max_side: args.max_side,
            body,
        }),
        Kind::Text => ModelSpec::Text(TextCondConfig {
            codebook_size: k,
            max_side: args.max_side,
            text_vocab: args.text_vocab,
            max_text: args.max_text,
            body,
        }),
    };
    let kind = spec.kind();
    let id = args.id.clone().unwrap_or_else(|| {
        crate::models::shipped_id(kind)
            .map_or_else(|| format!("unimic-entropy-{kind}-v1"), str::to_string)
    });
    let mut opts = TrainOptions::new(&id, &args.out);
    opts.steps = args.steps;
    opts.batch_size = args.batch_size;
    opts.lr = args.lr;
    opts.warmup = args.warmup;
    opts.seed = args.seed;
    opts.eval_every = args.eval_every;
    opts.val_samples = args.val_samples;
    opts.resume = !args.no_resume;
    opts.init_from = args.init_from.clone();
    opts.data = data;
    opts.command = std::env::args().collect::<Vec<_>>().join(" ");

    if let Some(dir) = &args.export_data {
        external::export_data(dir, &train_set, &val_set, &opts.data)?;
        println!(
            "{}",
            serde_json::json!({
                "exported": dir.display().to_string(),
                "kind": kind,
                "train_grids": train_set.samples.len(),
                "val_grids": val_set.samples.len(),
                "height": train_set.height,
                "width": train_set.width,
                "codebook_size": k,
            })
        );
        return Ok(());
    }
    if let Some(weights) = &args.import {
        return import(&spec, weights, &val_set, opts);
    }

    let pb = ProgressBar::new(args.steps);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps ({eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let uniform = (k as f64).log2();
    let mut on_event = |e: Event| {
        match e {
        Event::Start { step, params, .. } => {
            pb.set_position(step);
            log_line(&pb, format!(
                "training {kind} model {id}: {params} parameters, uniform = {uniform:.3} bits/token{}",
                if step > 0 { format!(", resuming at step {step}") } else { String::new() }
            ));
        }
        Event::Step { step, bits } => {
            pb.set_position(step);
            pb.set_message(format!("train {bits:.3} bits/token"));
        }
        Event::Eval {
            step,
            train_bits,
            val_bits,
        } => log_line(&pb, format!(
            "step {step}: train {train_bits:.4} bits/token, val {val_bits:.4} bits/token ({:.1}% of uniform), {:.0} s",
            100.0 * val_bits / uniform,
            pb.elapsed().as_secs_f64()
        )),
        _ => {}
    }
    };
    // CPU: the same command works on every machine (this workspace builds candle without CUDA).
    let dev = Device::Cpu;
    let report = train(&spec, &train_set, &val_set, &opts, &dev, &mut on_event)?;
    pb.finish_and_clear();
    println!("{}", summary(&report, "uniform_bits_per_token", uniform));
    Ok(())
}

/// `--import`: adopts outside weights after measuring them here; for the generic and text models
/// (whose validation loss has no random part) the outside trainer's own figure must agree.
fn import(
    spec: &ModelSpec,
    weights: &Path,
    val_set: &GridSet,
    mut opts: TrainOptions,
) -> anyhow::Result<()> {
    let (run, record) = external::read_record(weights)?;
    let rec = &run.record;
    opts.batch_size = rec.batch_size;
    opts.seed = rec.seed;
    if !rec.data.is_empty() {
        opts.data.clone_from(&rec.data);
    }
    opts.command = format!(
        "{}{}; then {}",
        rec.command,
        if run.device.is_empty() {
            String::new()
        } else {
            format!(" (on {})", run.device)
        },
        opts.command
    );
    let report = import_weights(
        spec,
        weights,
        val_set,
        &opts,
        rec.steps,
        rec.train_bits_per_token,
        &Device::Cpu,
    )?;
    let t = report.manifest.training.clone().unwrap_or_default();
    let gap = (t.val_bits_per_token - rec.val_bits_per_token).abs();
    if !matches!(spec, ModelSpec::Masked(_)) && gap > 0.01 {
        bail!(
            "{}: validation here is {:.4} bits/token, {} recorded {:.4}: the outside network \
             does not compute this architecture (or used other validation data); {} was \
             written but must not be shipped",
            weights.display(),
            t.val_bits_per_token,
            record.display(),
            rec.val_bits_per_token,
            report.manifest_path.display()
        );
    }
    println!(
        "{}",
        summary(
            &report,
            "outside_val_bits_per_token",
            rec.val_bits_per_token
        )
    );
    Ok(())
}

/// The JSON line printed after training or importing: the manifest's identity and losses, plus one
/// figure named `extra`.
fn summary(report: &TrainReport, extra: &str, value: f64) -> serde_json::Value {
    let t = report.manifest.training.clone().unwrap_or_default();
    let mut v = serde_json::json!({
        "manifest": report.manifest_path.display().to_string(),
        "id": report.manifest.id,
        "kind": report.manifest.kind,
        "sha256": report.manifest.sha256,
        "params": report.manifest.params,
        "steps": t.steps,
        "train_bits_per_token": t.train_bits_per_token,
        "val_bits_per_token": t.val_bits_per_token,
    });
    v[extra] = value.into();
    v
}

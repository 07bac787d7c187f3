//! `unimic train tokenizer`: trains the VQ image tokenizer on the CPU (candle).
//!
//! Writes `OUT/latest/` every `--val-every` steps or `--checkpoint-secs` seconds, `OUT/best/`
//! whenever the validation L1 (bsds500/test centre crops) improves, and one JSON line per
//! validation to `OUT/log.jsonl`. Both checkpoint directories are shippable tokenizer directories
//! (`manifest.json` + `tokenizer.safetensors`) and can be passed to `--resume`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use unimic_codec::tokenizer::train::{self, TrainConfig, Trainer, TrainingRecord};
use unimic_codec::tokenizer::VqConfig;

/// Arguments of `unimic train tokenizer`.
#[derive(clap::Args)]
pub struct Args {
    /// Output directory for checkpoints and the log.
    #[arg(long, default_value = "runs/tokenizer")]
    pub out: PathBuf,
    /// Continue from a checkpoint directory (its architecture and step count are used).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Total steps to reach (counting the resumed ones).
    #[arg(long, default_value_t = 20000)]
    pub steps: usize,
    /// Base width `ch`.
    #[arg(long, default_value_t = 32)]
    pub ch: usize,
    /// Channel multipliers per level, comma-separated (levels - 1 = log2 of the factor).
    #[arg(long, default_value = "1,1,2,2,4", value_delimiter = ',')]
    pub ch_mult: Vec<usize>,
    /// ResNet blocks per encoder level (the decoder has one more).
    #[arg(long, default_value_t = 2)]
    pub num_res_blocks: usize,
    /// Channels around the quantiser.
    #[arg(long, default_value_t = 256)]
    pub z_channels: usize,
    /// Codebook size.
    #[arg(long, default_value_t = 1024)]
    pub codebook: usize,
    /// Codebook vector dimension.
    #[arg(long, default_value_t = 8)]
    pub embed_dim: usize,
    /// GroupNorm groups.
    #[arg(long, default_value_t = 32)]
    pub norm_groups: usize,
    /// Crop side in pixels.
    #[arg(long, default_value_t = 128)]
    pub crop: usize,
    /// Crops per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 4e-4)]
    pub lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// Weight of the gradient (structural) loss.
    #[arg(long, default_value_t = 0.5)]
    pub grad_weight: f64,
    /// Smallest random down-scaling of crops.
    #[arg(long, default_value_t = 0.5)]
    pub min_scale: f64,
    /// Steps between dead-code restarts (0: never).
    #[arg(long, default_value_t = 50)]
    pub restart_every: usize,
    /// Seed of initialisation and data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training image directories (default: shared bsds500 train+val and flickr8k-1000 images
    /// without its last 100 held-out files).
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// Validation image directory (default: shared bsds500/test).
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Validation crops (the first N images of the validation directory).
    #[arg(long, default_value_t = 16)]
    pub val_count: usize,
    /// Validate and write `latest/` every N steps.
    #[arg(long, default_value_t = 200)]
    pub val_every: usize,
    /// Also validate and checkpoint when this many seconds passed since the last checkpoint.
    #[arg(long, default_value_t = 600)]
    pub checkpoint_secs: u64,
}

fn shared_dir() -> PathBuf {
    std::env::var_os("UNIMIC_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
}

fn load_data(dirs: &[(PathBuf, usize)]) -> anyhow::Result<Vec<image::RgbImage>> {
    let mut out = Vec::new();
    for (d, holdout) in dirs {
        let imgs =
            train::load_dir(d, *holdout).with_context(|| format!("loading {}", d.display()))?;
        eprintln!("loaded {} images from {}", imgs.len(), d.display());
        out.extend(imgs);
    }
    Ok(out)
}

/// Runs the training loop.
pub fn run(args: Args) -> anyhow::Result<()> {
    let shared = shared_dir();
    let data: Vec<(PathBuf, usize)> = if args.data.is_empty() {
        vec![
            (shared.join("data/bsds500/train"), 0),
            (shared.join("data/bsds500/val"), 0),
            (shared.join("data/flickr8k-1000/images"), 100),
        ]
    } else {
        args.data.iter().map(|d| (d.clone(), 0)).collect()
    };
    if data
        .iter()
        .any(|(d, _)| d.components().any(|c| c.as_os_str() == "kodak"))
    {
        bail!("refusing to train on Kodak: it is the evaluation set");
    }
    let val_dir = args
        .val_data
        .clone()
        .unwrap_or_else(|| shared.join("data/bsds500/test"));

    let (cfg, mut record_prev) = match &args.resume {
        Some(dir) => {
            let m: unimic_codec::tokenizer::Manifest = serde_json::from_slice(
                &std::fs::read(dir.join(unimic_codec::tokenizer::MANIFEST_FILE))
                    .with_context(|| format!("reading manifest in {}", dir.display()))?,
            )?;
            (m.config, Some(train::read_record(dir)?))
        }
        None => {
            let mut c = VqConfig::default();
            c.ch = args.ch;
            c.encoder_ch_mult = args.ch_mult.clone();
            c.decoder_ch_mult = args.ch_mult.clone();
            c.num_res_blocks = args.num_res_blocks;
            c.z_channels = args.z_channels;
            c.codebook_size = args.codebook;
            c.codebook_embed_dim = args.embed_dim;
            c.norm_groups = args.norm_groups;
            (c, None)
        }
    };
    let mut tc = TrainConfig::default();
    tc.crop = args.crop;
    tc.batch = args.batch;
    tc.lr = args.lr;
    tc.warmup = args.warmup;
    tc.grad = args.grad_weight;
    tc.min_scale = args.min_scale;
    tc.restart_every = args.restart_every;
    tc.seed = args.seed;

    let images = load_data(&data)?;
    let mut val =
        train::load_dir(&val_dir, 0).with_context(|| format!("loading {}", val_dir.display()))?;
    val.truncate(args.val_count);
    eprintln!(
        "validation: {} images from {}",
        val.len(),
        val_dir.display()
    );

    let mut trainer = Trainer::new(&cfg, &tc, images, &val, args.resume.as_deref())?;
    let name = format!("unimic-vq{}-k{}", cfg.factor(), cfg.codebook_size);
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let wall_before = record_prev.as_ref().map_or(0.0, |r| r.wall_seconds);
    let mut best = record_prev.as_ref().and_then(|r| r.best_val_l1);
    std::fs::create_dir_all(&args.out)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.out.join("log.jsonl"))?;

    let start = trainer.step_count();
    let pb = ProgressBar::new(args.steps as u64);
    pb.set_position(start as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
        )?
        .progress_chars("=> "),
    );
    let t0 = Instant::now();
    let mut last_ckpt = Instant::now();
    let mut ema: Option<(f64, f64)> = None;
    while trainer.step_count() < args.steps {
        let s = trainer.train_step()?;
        let (l, p) = ema.map_or((s.loss, s.psnr), |(l, p)| {
            (0.95 * l + 0.05 * s.loss, 0.95 * p + 0.05 * s.psnr)
        });
        ema = Some((l, p));
        pb.set_position(s.step as u64);
        pb.set_message(format!(
            "loss {l:.4} psnr {p:.2} usage {:.2} ppl {:.0}",
            s.usage, s.perplexity
        ));
        if pb.is_hidden() && s.step % 20 == 0 {
            let dt = t0.elapsed().as_secs_f64();
            eprintln!(
                "step {} loss {l:.4} psnr {p:.2} usage {:.3} ppl {:.0} restarted {} | {:.2} s/step",
                s.step,
                s.usage,
                s.perplexity,
                s.restarted,
                dt / (s.step - start) as f64
            );
        }
        let done = trainer.step_count() >= args.steps;
        if done
            || s.step % args.val_every.max(1) == 0
            || last_ckpt.elapsed().as_secs() >= args.checkpoint_secs
        {
            let v = trainer.validate()?;
            let is_best = best.is_none_or(|b| v.l1 < b);
            if is_best {
                best = Some(v.l1);
            }
            let record = TrainingRecord {
                step: s.step,
                train: tc.clone(),
                data: data
                    .iter()
                    .map(|(d, h)| format!("{} (holdout last {h})", d.display()))
                    .collect(),
                val_data: format!(
                    "{} (first {} images, centre crops)",
                    val_dir.display(),
                    args.val_count
                ),
                last: Some(s),
                val: Some(v),
                best_val_l1: best,
                wall_seconds: wall_before + t0.elapsed().as_secs_f64(),
                command: command.clone(),
                notes: "AdamW moments restart from zero on --resume (not saved)".into(),
            };
            trainer.save(&args.out.join("latest"), &name, &record)?;
            if is_best {
                trainer.save(&args.out.join("best"), &name, &record)?;
            }
            writeln!(
                log,
                "{}",
                serde_json::json!({"step": s.step, "wall_seconds": record.wall_seconds,
                    "train_loss_ema": l, "train_psnr_ema": p, "last": s, "val": v, "best": is_best})
            )?;
            let line = format!(
                "checkpoint step {}: val l1 {:.4} psnr {:.2} usage {:.3} ppl {:.0}{}",
                s.step,
                v.l1,
                v.psnr,
                v.usage,
                v.perplexity,
                if is_best { " (best)" } else { "" }
            );
            if pb.is_hidden() {
                eprintln!("{line}");
            } else {
                pb.println(line);
            }
            record_prev = Some(record);
            last_ckpt = Instant::now();
        }
    }
    pb.finish();
    if let Some(r) = record_prev {
        eprintln!(
            "done: {} steps, {:.0} s of training in total; checkpoints in {}",
            r.step,
            r.wall_seconds,
            Path::new(&args.out).display()
        );
    }
    Ok(())
}

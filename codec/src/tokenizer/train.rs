//! Training a [`VqModel`] on the CPU with candle: [`Trainer`].
//!
//! Each step draws `batch` random crops (random scale in `[min_scale, 1]`, random horizontal flip)
//! from images held in memory, runs [`VqModel::forward_train`] on the unfolded-convolution path and
//! takes one AdamW step on
//!
//! `L = l1·|x̂−x|₁ + mse·|x̂−x|² + grad·|∇x̂−∇x|₁ + |e−sg(z)|² + β·|sg(e)−z|²`
//!
//! (means over elements; `∇` are horizontal and vertical pixel differences, a cheap structural
//! term that fights the blur plain L2 produces at low rates; `z` and `e` are the l2-normalised
//! latent and code).
//!
//! Codebook usage: code counts accumulate between restarts; every `restart_every` steps each code
//! used fewer than `restart_min_count` times is reset to a randomly chosen recent (normalised)
//! encoder output plus small noise, as in "code restarts" (Dhariwal et al., Jukebox, 2020; Zeghidour
//! et al., SoundStream, 2021). [`StepStats`] reports usage (fraction of codes used) and perplexity
//! (`exp` of the entropy of the code histogram) over the window.
//!
//! Determinism: the model is initialised from `seed`; the crops of step `n` come from an RNG seeded
//! with `(seed, n)`, so a resumed run sees the same data as an uninterrupted one. AdamW moments
//! are not saved (candle's optimiser does not expose them): they restart from zero on resume.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::config::VqConfig;
use super::vq::{ConvPath, VqModel};
use super::{sha256_hex, Manifest, TokenizerError, MANIFEST_FILE, MANIFEST_FORMAT};

/// Name of the weights file in a checkpoint directory.
pub const WEIGHTS_FILE: &str = "tokenizer.safetensors";

/// Hyper-parameters of a training run (everything except the model architecture).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TrainConfig {
    /// Crop side in pixels (a multiple of the model's factor).
    pub crop: usize,
    /// Crops per step.
    pub batch: usize,
    /// Peak learning rate of AdamW.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Weight of the L1 reconstruction loss.
    pub l1: f64,
    /// Weight of the squared-error reconstruction loss.
    pub mse: f64,
    /// Weight of the L1 loss on horizontal and vertical pixel differences.
    pub grad: f64,
    /// Smallest random down-scaling of a crop's source region (1 = native resolution only).
    pub min_scale: f64,
    /// Steps between dead-code restarts (0 disables them).
    pub restart_every: usize,
    /// Codes used fewer times than this in a window are restarted.
    pub restart_min_count: u64,
    /// Seed of initialisation and data order.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            crop: 128,
            batch: 4,
            lr: 4e-4,
            warmup: 100,
            weight_decay: 0.0,
            l1: 1.0,
            mse: 1.0,
            grad: 0.5,
            min_scale: 0.5,
            restart_every: 50,
            restart_min_count: 1,
            seed: 0,
        }
    }
}

/// Numbers from one training step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// Step number (1-based, counting resumed steps).
    pub step: usize,
    /// Total loss.
    pub loss: f64,
    /// L1 reconstruction loss (on the [-1, 1] scale).
    pub l1: f64,
    /// PSNR of the batch's reconstruction in dB (from the MSE on the [-1, 1] scale).
    pub psnr: f64,
    /// Codebook loss.
    pub codebook: f64,
    /// Commitment loss (before β).
    pub commit: f64,
    /// Fraction of codes used in the current restart window.
    pub usage: f64,
    /// Perplexity of the code histogram in the current window.
    pub perplexity: f64,
    /// Codes restarted at this step.
    pub restarted: usize,
}

/// Validation numbers on fixed crops, quantised codes, inference path.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ValStats {
    /// Mean L1 on the [-1, 1] scale (the checkpoint selection criterion).
    pub l1: f64,
    /// PSNR in dB over all validation crops (from the pooled MSE of 8-bit outputs).
    pub psnr: f64,
    /// Fraction of codes used by the validation crops.
    pub usage: f64,
    /// Perplexity of the validation codes.
    pub perplexity: f64,
}

/// What a checkpoint's manifest records under `training`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingRecord {
    /// Steps completed.
    pub step: usize,
    /// Hyper-parameters.
    pub train: TrainConfig,
    /// Data directories used for training.
    pub data: Vec<String>,
    /// Validation directory.
    pub val_data: String,
    /// The last training step's numbers.
    pub last: Option<StepStats>,
    /// Validation numbers of this checkpoint.
    pub val: Option<ValStats>,
    /// Best validation L1 so far in the run.
    pub best_val_l1: Option<f64>,
    /// Seconds of training wall time, summed over sessions.
    pub wall_seconds: f64,
    /// Command that produced (or resumes) the run.
    pub command: String,
    /// Notes (e.g. that optimiser moments restart on resume).
    pub notes: String,
}

/// Loads every `.jpg`/`.jpeg`/`.png` in `dir` (sorted by name), skipping the last `holdout` files.
pub fn load_dir(dir: &Path, holdout: usize) -> Result<Vec<RgbImage>, TokenizerError> {
    let rd = std::fs::read_dir(dir).map_err(|source| TokenizerError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        })
        .collect();
    paths.sort();
    paths.truncate(paths.len().saturating_sub(holdout));
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        match image::open(&p) {
            Ok(img) => out.push(img.to_rgb8()),
            Err(e) => tracing::warn!("skipping {}: {e}", p.display()),
        }
    }
    Ok(out)
}

/// Resizes (Catmull-Rom) so the shorter side is at least `side`, keeping the aspect ratio.
fn ensure_min_side(img: RgbImage, side: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let s = w.min(h);
    if s >= side {
        return img;
    }
    let f = f64::from(side) / f64::from(s);
    let nw = ((f64::from(w) * f).ceil() as u32).max(side);
    let nh = ((f64::from(h) * f).ceil() as u32).max(side);
    image::imageops::resize(&img, nw, nh, image::imageops::FilterType::CatmullRom)
}

/// A `side × side` crop of `img` starting at (`x`, `y`) from a `src × src` region, resized.
fn crop_resized(img: &RgbImage, x: u32, y: u32, src: u32, side: u32, flip: bool) -> RgbImage {
    let c = image::imageops::crop_imm(img, x, y, src, src).to_image();
    let c = if src == side {
        c
    } else {
        image::imageops::resize(&c, side, side, image::imageops::FilterType::Triangle)
    };
    if flip {
        image::imageops::flip_horizontal(&c)
    } else {
        c
    }
}

fn batch_tensor(crops: &[RgbImage], side: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mut v = Vec::with_capacity(crops.len() * side * side * 3);
    for c in crops {
        v.extend(c.as_raw().iter().map(|&u| f32::from(u) / 127.5 - 1.0));
    }
    Tensor::from_vec(v, (crops.len(), side, side, 3), device)?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

fn usage_and_perplexity(counts: &[u64]) -> (f64, f64) {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return (0.0, 0.0);
    }
    let used = counts.iter().filter(|&&c| c > 0).count();
    let h: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum();
    (used as f64 / counts.len() as f64, h.exp())
}

/// Seeded initialisation in PyTorch's style: conv weights uniform in ±1/√fan_in, biases zero,
/// GroupNorm scale 1 and shift 0, codebook uniform in ±1/K.
fn init_params(varmap: &VarMap, cfg: &VqConfig, seed: u64) -> candle_core::Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = StdRng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let vals: Vec<f32> = if name == "quantize.embedding.weight" {
            let b = 1.0 / cfg.codebook_size as f32;
            (0..n).map(|_| rng.gen_range(-b..b)).collect()
        } else if dims.len() == 4 {
            let fan_in = (dims[1] * dims[2] * dims[3]) as f32;
            let b = 1.0 / fan_in.sqrt();
            (0..n).map(|_| rng.gen_range(-b..b)).collect()
        } else if name.ends_with(".weight") && name.contains("norm") {
            vec![1.0; n]
        } else {
            vec![0.0; n]
        };
        var.set(&Tensor::from_vec(vals, dims, var.device())?)?;
    }
    Ok(())
}

/// A training run in progress: model, optimiser, data and counters.
pub struct Trainer {
    cfg: VqConfig,
    tc: TrainConfig,
    varmap: VarMap,
    model: VqModel,
    opt: AdamW,
    embedding: Var,
    images: Vec<RgbImage>,
    val: Vec<RgbImage>,
    step: usize,
    counts: Vec<u64>,
    recent: VecDeque<Tensor>,
    device: Device,
}

impl Trainer {
    /// Starts a run (fresh, seeded initialisation) or, with `resume`, continues from a checkpoint
    /// directory written by [`Trainer::save`] (its config and step are used; `tc` replaces the
    /// hyper-parameters).
    pub fn new(
        cfg: &VqConfig,
        tc: &TrainConfig,
        images: Vec<RgbImage>,
        val_images: &[RgbImage],
        resume: Option<&Path>,
    ) -> Result<Self, TokenizerError> {
        cfg.validate().map_err(TokenizerError::Config)?;
        let f = cfg.factor();
        if tc.crop == 0 || tc.crop % f != 0 || tc.batch == 0 {
            return Err(TokenizerError::Config(format!(
                "crop {} must be a non-zero multiple of the factor {f}, batch non-zero",
                tc.crop
            )));
        }
        if images.is_empty() {
            return Err(TokenizerError::Config("no training images".into()));
        }
        let device = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let model = VqModel::new(cfg, vb)?;
        init_params(&varmap, cfg, tc.seed)?;
        let mut step = 0;
        if let Some(dir) = resume {
            let mut vm = varmap.clone();
            vm.load(dir.join(WEIGHTS_FILE))?;
            let bytes =
                std::fs::read(dir.join(MANIFEST_FILE)).map_err(|source| TokenizerError::Io {
                    path: dir.join(MANIFEST_FILE),
                    source,
                })?;
            let m: Manifest = serde_json::from_slice(&bytes)?;
            let rec: TrainingRecord = serde_json::from_value(m.training)?;
            step = rec.step;
        }
        let embedding = varmap
            .data()
            .lock()
            .map_err(|_| TokenizerError::Config("poisoned var map".into()))?
            .get("quantize.embedding.weight")
            .cloned()
            .ok_or_else(|| TokenizerError::Config("no codebook variable".into()))?;
        let opt = AdamW::new(
            varmap.all_vars(),
            ParamsAdamW {
                lr: tc.lr,
                weight_decay: tc.weight_decay,
                ..ParamsAdamW::default()
            },
        )?;
        let min_side = tc.crop as u32;
        let images = images
            .into_iter()
            .map(|i| ensure_min_side(i, min_side))
            .collect();
        let val = val_images
            .iter()
            .map(|i| {
                let i = ensure_min_side(i.clone(), min_side);
                let (w, h) = i.dimensions();
                let c = tc.crop as u32;
                image::imageops::crop_imm(&i, (w - c) / 2, (h - c) / 2, c, c).to_image()
            })
            .collect();
        Ok(Self {
            cfg: cfg.clone(),
            tc: tc.clone(),
            varmap,
            model,
            opt,
            embedding,
            images,
            val,
            step,
            counts: vec![0; cfg.codebook_size],
            recent: VecDeque::new(),
            device,
        })
    }

    /// Steps completed so far (including those before a resume).
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The model being trained.
    pub fn model(&self) -> &VqModel {
        &self.model
    }

    fn sample_batch(&self) -> candle_core::Result<Tensor> {
        let mut rng = StdRng::seed_from_u64(
            self.tc.seed ^ (self.step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let side = self.tc.crop as u32;
        let mut crops = Vec::with_capacity(self.tc.batch);
        for _ in 0..self.tc.batch {
            let img = &self.images[rng.gen_range(0..self.images.len())];
            let (w, h) = img.dimensions();
            let max_src = w.min(h);
            let lo = self.tc.min_scale.clamp(0.05, 1.0);
            let scale: f64 = rng.gen_range(lo..=1.0);
            let src = ((f64::from(side) / scale).round() as u32).clamp(side, max_src);
            let x = rng.gen_range(0..=w - src);
            let y = rng.gen_range(0..=h - src);
            let flip = rng.gen_bool(0.5);
            crops.push(crop_resized(img, x, y, src, side, flip));
        }
        batch_tensor(&crops, self.tc.crop, &self.device)
    }

    /// One optimisation step.
    pub fn train_step(&mut self) -> Result<StepStats, TokenizerError> {
        let x = self.sample_batch()?;
        let out = self.model.forward_train(&x, ConvPath::Im2col)?;
        let diff = (&out.recon - &x)?;
        let l1 = diff.abs()?.mean_all()?;
        let mse = diff.sqr()?.mean_all()?;
        let (_, _, h, w) = x.dims4()?;
        let dx = (diff.narrow(3, 1, w - 1)? - diff.narrow(3, 0, w - 1)?)?;
        let dy = (diff.narrow(2, 1, h - 1)? - diff.narrow(2, 0, h - 1)?)?;
        let grad = ((dx.abs()?.mean_all()? + dy.abs()?.mean_all()?)? * 0.5)?;
        let loss = ((&l1 * self.tc.l1)?
            + (&mse * self.tc.mse)?
            + (&grad * self.tc.grad)?
            + &out.codebook_loss
            + (&out.commit_loss * self.cfg.commit_loss_beta)?)?;
        let warm = if self.tc.warmup == 0 {
            1.0
        } else {
            ((self.step + 1) as f64 / self.tc.warmup as f64).min(1.0)
        };
        self.opt.set_learning_rate(self.tc.lr * warm);
        self.opt.backward_step(&loss)?;
        self.step += 1;

        for i in out.indices.flatten_all()?.to_vec1::<u32>()? {
            self.counts[i as usize] += 1;
        }
        self.recent.push_back(out.latents);
        while self.recent.len() > 8 {
            self.recent.pop_front();
        }
        let (usage, perplexity) = usage_and_perplexity(&self.counts);
        let mut restarted = 0;
        if self.tc.restart_every > 0 && self.step % self.tc.restart_every == 0 {
            restarted = self.restart_dead_codes()?;
            self.counts.iter_mut().for_each(|c| *c = 0);
        }
        let mse_v = mse.to_scalar::<f32>()? as f64;
        Ok(StepStats {
            step: self.step,
            loss: loss.to_scalar::<f32>()? as f64,
            l1: l1.to_scalar::<f32>()? as f64,
            // MSE on [-1, 1] is 4x the MSE on [0, 1].
            psnr: 10.0 * (4.0 / mse_v.max(1e-12)).log10(),
            codebook: out.codebook_loss.to_scalar::<f32>()? as f64,
            commit: out.commit_loss.to_scalar::<f32>()? as f64,
            usage,
            perplexity,
            restarted,
        })
    }

    fn restart_dead_codes(&mut self) -> Result<usize, TokenizerError> {
        let dead: Vec<usize> = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c < self.tc.restart_min_count)
            .map(|(i, _)| i)
            .collect();
        if dead.is_empty() || self.recent.is_empty() {
            return Ok(0);
        }
        let pool = Tensor::cat(&self.recent.iter().cloned().collect::<Vec<_>>(), 0)?;
        let d = pool.dim(1)?;
        let pool = pool.to_vec2::<f32>()?;
        let mut emb = self.embedding.as_tensor().to_vec2::<f32>()?;
        let mut rng = StdRng::seed_from_u64(self.tc.seed ^ 0xC0DE ^ self.step as u64);
        for &k in &dead {
            let src = &pool[rng.gen_range(0..pool.len())];
            for (e, &v) in emb[k].iter_mut().zip(src) {
                *e = v + rng.gen_range(-0.02f32..0.02);
            }
        }
        let flat: Vec<f32> = emb.into_iter().flatten().collect();
        self.embedding.set(&Tensor::from_vec(
            flat,
            (self.cfg.codebook_size, d),
            &self.device,
        )?)?;
        Ok(dead.len())
    }

    /// Validation on the fixed centre crops (inference path, real code lookup).
    pub fn validate(&self) -> Result<ValStats, TokenizerError> {
        let mut counts = vec![0u64; self.cfg.codebook_size];
        let (mut l1_sum, mut se, mut n) = (0.0f64, 0.0f64, 0usize);
        for chunk in self.val.chunks(self.tc.batch.max(1)) {
            let x = batch_tensor(chunk, self.tc.crop, &self.device)?;
            let latent = self.model.latent(&x, ConvPath::Direct)?;
            let idx = self.model.quantize(&latent)?;
            for i in idx.flatten_all()?.to_vec1::<u32>()? {
                counts[i as usize] += 1;
            }
            let y = self.model.decode_indices(&idx, ConvPath::Direct)?;
            l1_sum += (&y - &x)?.abs()?.sum_all()?.to_scalar::<f32>()? as f64;
            let y8 = ((y * 127.5)? + 128.0)?.clamp(0f32, 255f32)?.floor()?;
            let x8 = ((x + 1.0)? * 127.5)?.round()?;
            se += (y8 - x8)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            n += chunk.len() * 3 * self.tc.crop * self.tc.crop;
        }
        let (usage, perplexity) = usage_and_perplexity(&counts);
        let mse = se / n.max(1) as f64;
        Ok(ValStats {
            l1: l1_sum / n.max(1) as f64,
            psnr: 10.0 * (255.0 * 255.0 / mse.max(1e-12)).log10(),
            usage,
            perplexity,
        })
    }

    /// Writes `dir/tokenizer.safetensors` (reference parameter names) and `dir/manifest.json`
    /// (config, SHA-256, `record`), each through a temporary file and a rename.
    pub fn save(
        &self,
        dir: &Path,
        name: &str,
        record: &TrainingRecord,
    ) -> Result<Manifest, TokenizerError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TokenizerError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let tensors: Vec<(String, Tensor)> = {
            let data = self
                .varmap
                .data()
                .lock()
                .map_err(|_| TokenizerError::Config("poisoned var map".into()))?;
            let mut v: Vec<(String, Tensor)> = data
                .iter()
                .map(|(k, var)| (k.clone(), var.as_tensor().clone()))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let bytes = safetensors::tensor::serialize(tensors, None)
            .map_err(|e| TokenizerError::Model(candle_core::Error::Msg(e.to_string())))?;
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            name: name.into(),
            architecture: "llamagen-vq".into(),
            config: self.cfg.clone(),
            weights: WEIGHTS_FILE.into(),
            sha256: sha256_hex(&bytes),
            bytes: bytes.len() as u64,
            training: serde_json::to_value(record)?,
        };
        let wtmp = dir.join(format!("{WEIGHTS_FILE}.tmp"));
        std::fs::write(&wtmp, &bytes).map_err(io(&wtmp))?;
        let mtmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
        std::fs::write(&mtmp, serde_json::to_vec_pretty(&manifest)?).map_err(io(&mtmp))?;
        let wdst = dir.join(WEIGHTS_FILE);
        std::fs::rename(&wtmp, &wdst).map_err(io(&wdst))?;
        let mdst = dir.join(MANIFEST_FILE);
        std::fs::rename(&mtmp, &mdst).map_err(io(&mdst))?;
        Ok(manifest)
    }
}

/// Reads the training record of a checkpoint directory's manifest.
pub fn read_record(dir: &Path) -> Result<TrainingRecord, TokenizerError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&path).map_err(|source| TokenizerError::Io { path, source })?;
    let m: Manifest = serde_json::from_slice(&bytes)?;
    Ok(serde_json::from_value(m.training)?)
}

//! Training of the transformer entropy models with candle (feature `vq`).
//!
//! The networks ([`GenericNet`], [`MaskedNet`], [`TextCondNet`]) mirror the deterministic models
//! of [`crate::entropy::generic`], [`crate::entropy::masked`] and [`crate::entropy::text_cond`]
//! tensor for tensor; [`train`] optimises one of them on a [`GridSet`] and writes
//! `<out>/<id>.safetensors` plus its JSON [`Manifest`] (architecture, data, steps, validation bits
//! per token, SHA-256 content hash, reproduction command), which the deterministic models load.
//!
//! Training is seeded and resumable: batch `s` is drawn from an RNG seeded with
//! `(seed, s)`, and a checkpoint (`<id>.safetensors`, `<id>.opt.safetensors` with the AdamW
//! moments, `<id>.json`) is written every `checkpoint_every` steps, so a run restarted with the
//! same options continues where the last checkpoint left off and sees the same batches.
//!
//! Losses are reported in **bits per token** (`log2 K` for a uniform model).

mod blocks;
mod generic;
mod masked;
mod text_cond;

pub use blocks::Body;
pub use generic::GenericNet;
pub use masked::{masked_sequence, random_unknown, MaskedNet, MaskedSequence};
pub use text_cond::TextCondNet;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use candle_core::Device;
use candle_core::{DType, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::entropy::generic::GenericConfig;
use crate::entropy::masked::MaskedConfig;
use crate::entropy::text_cond::TextCondConfig;
use crate::nn::model::{Manifest, TrainingRecord};
use crate::nn::weights::{sha256_hex, splitmix64};

/// Why training failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A candle operation failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The data or options are unusable.
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One training example: a grid's ids (row-major) and, for the text model, its caption's o200k ids.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sample {
    /// Token ids, `height * width` of them.
    pub ids: Vec<u32>,
    /// Caption token ids (empty when there is none); validation always uses this one.
    pub text: Vec<u32>,
    /// Other captions of the same image: a training step conditions the grid on one of `text`
    /// and these, drawn uniformly with the step's seeded RNG (more caption variety per image).
    pub alt_texts: Vec<Vec<u32>>,
}

/// o200k ids of each caption (ordinary text, no special tokens), for the text model.
pub fn tokenize_captions(captions: &[&str]) -> Result<Vec<Vec<u32>>, TrainError> {
    let bpe = tiktoken_rs::o200k_base().map_err(|e| TrainError::Invalid(format!("o200k: {e}")))?;
    Ok(captions.iter().map(|c| bpe.encode_ordinary(c)).collect())
}

/// Grids of one shape and codebook: a training or validation set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GridSet {
    /// Rows of every grid.
    pub height: usize,
    /// Columns of every grid.
    pub width: usize,
    /// Codebook size; every id is below it.
    pub codebook_size: usize,
    /// The examples.
    pub samples: Vec<Sample>,
}

impl GridSet {
    /// Checks shapes and id ranges.
    pub fn validate(&self) -> Result<(), TrainError> {
        let n = self.height * self.width;
        if n == 0 || self.samples.is_empty() {
            return Err(TrainError::Invalid("empty grid set".into()));
        }
        for (i, s) in self.samples.iter().enumerate() {
            if s.ids.len() != n {
                return Err(TrainError::Invalid(format!(
                    "sample {i} has {} ids, expected {n}",
                    s.ids.len()
                )));
            }
            if let Some(&bad) = s.ids.iter().find(|&&id| id as usize >= self.codebook_size) {
                return Err(TrainError::Invalid(format!(
                    "sample {i} has id {bad} >= codebook size {}",
                    self.codebook_size
                )));
            }
        }
        Ok(())
    }

    /// Deterministic synthetic grids with learnable structure (smooth regions of a few ids with
    /// noise): for smoke tests of the training loop. Sample `i` draws from `splitmix64`.
    pub fn synthetic(
        height: usize,
        width: usize,
        codebook_size: usize,
        count: usize,
        seed: u64,
    ) -> Self {
        let mut samples = Vec::with_capacity(count);
        let mut z = seed;
        let mut next = move || {
            z = splitmix64(z);
            z
        };
        for _ in 0..count {
            let base = (next() % codebook_size as u64) as u32;
            let stripe = 1 + (next() % 4) as usize;
            let mut ids = Vec::with_capacity(height * width);
            for r in 0..height {
                for c in 0..width {
                    let v = if next() % 8 == 0 {
                        (next() % codebook_size as u64) as u32
                    } else {
                        (base + ((r / stripe + c / stripe) % 3) as u32) % codebook_size as u32
                    };
                    ids.push(v);
                }
            }
            let text = vec![base, stripe as u32];
            samples.push(Sample {
                ids,
                text,
                alt_texts: Vec::new(),
            });
        }
        Self {
            height,
            width,
            codebook_size,
            samples,
        }
    }
}

/// A batch of grids of one shape (row-major ids of each grid, concatenated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `len() * height * width` ids.
    pub ids: Vec<u32>,
    /// One caption per grid (possibly empty).
    pub texts: Vec<Vec<u32>>,
}

impl Batch {
    /// Number of grids.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// True when the batch holds no grid.
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    fn from_indices(set: &GridSet, idx: impl Iterator<Item = usize>) -> Self {
        let mut ids = Vec::new();
        let mut texts = Vec::new();
        for i in idx {
            let s = &set.samples[i];
            ids.extend_from_slice(&s.ids);
            texts.push(s.text.clone());
        }
        Self {
            height: set.height,
            width: set.width,
            ids,
            texts,
        }
    }
}

/// Which model to train, with its architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "config", rename_all = "lowercase")]
pub enum ModelSpec {
    /// The causal raster-order model.
    Generic(GenericConfig),
    /// The known-prefix model for inpainting and outpainting.
    Masked(MaskedConfig),
    /// The text-conditioned causal model.
    Text(TextCondConfig),
}

impl ModelSpec {
    /// `generic`, `masked` or `text` (the manifest `kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Generic(_) => crate::entropy::generic::KIND,
            Self::Masked(_) => crate::entropy::masked::KIND,
            Self::Text(_) => crate::entropy::text_cond::KIND,
        }
    }

    /// Codebook size of the model.
    pub fn codebook_size(&self) -> usize {
        match self {
            Self::Generic(c) => c.codebook_size,
            Self::Masked(c) => c.codebook_size,
            Self::Text(c) => c.codebook_size,
        }
    }

    /// Largest grid side of the model.
    pub fn max_side(&self) -> usize {
        match self {
            Self::Generic(c) => c.max_side,
            Self::Masked(c) => c.max_side,
            Self::Text(c) => c.max_side,
        }
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        match self {
            Self::Generic(c) => c.num_params(),
            Self::Masked(c) => c.num_params(),
            Self::Text(c) => c.num_params(),
        }
    }

    /// Names and shapes of the model's tensors.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Self::Generic(c) => c.tensor_shapes(),
            Self::Masked(c) => c.tensor_shapes(),
            Self::Text(c) => c.tensor_shapes(),
        }
    }

    fn n_layers(&self) -> usize {
        match self {
            Self::Generic(c) => c.body.n_layers,
            Self::Masked(c) => c.body.n_layers,
            Self::Text(c) => c.body.n_layers,
        }
    }

    fn config_json(&self) -> serde_json::Value {
        match self {
            Self::Generic(c) => serde_json::to_value(c),
            Self::Masked(c) => serde_json::to_value(c),
            Self::Text(c) => serde_json::to_value(c),
        }
        .unwrap_or(serde_json::Value::Null)
    }
}

enum Net {
    Generic(GenericNet),
    Masked(MaskedNet),
    Text(TextCondNet),
}

impl Net {
    fn new(spec: &ModelSpec, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(match spec {
            ModelSpec::Generic(c) => Self::Generic(GenericNet::new(c, vb)?),
            ModelSpec::Masked(c) => Self::Masked(MaskedNet::new(c, vb)?),
            ModelSpec::Text(c) => Self::Text(TextCondNet::new(c, vb)?),
        })
    }

    fn loss(&self, b: &Batch, dev: &Device, rng: &mut StdRng) -> candle_core::Result<Tensor> {
        match self {
            Self::Generic(n) => n.loss(b, dev),
            Self::Masked(n) => n.loss(b, dev, rng),
            Self::Text(n) => n.loss(b, dev),
        }
    }
}

/// Options of a training run.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Model id written to the manifest, also the file stem (`<out_dir>/<id>.safetensors`).
    pub id: String,
    /// Output folder.
    pub out_dir: PathBuf,
    /// Total optimiser steps (a resumed run stops at the same total).
    pub steps: u64,
    /// Grids per step.
    pub batch_size: usize,
    /// Peak learning rate (AdamW), reached after `warmup` steps, cosine-decayed to 10%.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: u64,
    /// AdamW weight decay (applied to matrices only).
    pub weight_decay: f64,
    /// Seed of initialisation and batch sampling.
    pub seed: u64,
    /// Validate (and checkpoint) every this many steps, and at the end.
    pub eval_every: u64,
    /// Validation grids used (the first ones of the validation set).
    pub val_samples: usize,
    /// Continue from an existing checkpoint in `out_dir` if there is one.
    pub resume: bool,
    /// A fresh run (not a resumed one) starts from the tensors of this safetensors file that
    /// have the same name and shape as the model's; the others keep their seeded values. At
    /// least one tensor must match.
    pub init_from: Option<PathBuf>,
    /// Description of the training data, for the manifest.
    pub data: String,
    /// The command line that reproduces this run, for the manifest.
    pub command: String,
}

impl TrainOptions {
    /// Defaults for a CPU run: 4,000 steps of 16 grids, lr 1e-3 with 200 warm-up steps.
    pub fn new(id: &str, out_dir: &Path) -> Self {
        Self {
            id: id.to_string(),
            out_dir: out_dir.to_path_buf(),
            steps: 4000,
            batch_size: 16,
            lr: 1e-3,
            warmup: 200,
            weight_decay: 0.01,
            seed: 1,
            eval_every: 250,
            val_samples: 256,
            resume: true,
            init_from: None,
            data: String::new(),
            command: String::new(),
        }
    }
}

/// What the loop reports to its caller (the CLI draws progress bars from these).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// Training starts (or resumes) at `step` of `total`.
    Start {
        /// First step to run.
        step: u64,
        /// Last step.
        total: u64,
        /// Parameters of the model.
        params: usize,
    },
    /// One optimiser step finished.
    Step {
        /// Steps done.
        step: u64,
        /// Training loss of this step, bits per token.
        bits: f64,
    },
    /// A validation pass (followed by a checkpoint).
    Eval {
        /// Steps done.
        step: u64,
        /// Mean training loss since the last validation, bits per token.
        train_bits: f64,
        /// Validation loss, bits per token.
        val_bits: f64,
    },
}

/// Result of [`train`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// The manifest written (weights next to it).
    pub manifest: Manifest,
    /// Path of the manifest.
    pub manifest_path: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
struct OptState {
    step: u64,
    spec: ModelSpec,
    train_bits: f64,
}

/// AdamW whose moments can be saved and restored (candle's own keeps them private).
struct AdamW {
    vars: Vec<(String, Var)>,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
    t: u64,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.95;
const ADAM_EPS: f64 = 1e-8;
const CLIP: f64 = 1.0;

impl AdamW {
    fn new(varmap: &VarMap) -> candle_core::Result<Self> {
        let mut vars: Vec<(String, Var)> = match varmap.data().lock() {
            Ok(g) => g.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => candle_core::bail!("variable map lock poisoned"),
        };
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut m = HashMap::new();
        let mut v = HashMap::new();
        for (n, var) in &vars {
            m.insert(n.clone(), var.zeros_like()?);
            v.insert(n.clone(), var.zeros_like()?);
        }
        Ok(Self { vars, m, v, t: 0 })
    }

    fn step(&mut self, loss: &Tensor, lr: f64, wd: f64) -> candle_core::Result<()> {
        let grads = loss.backward()?;
        let mut sq = 0.0f64;
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var) {
                sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
            }
        }
        let norm = sq.sqrt();
        let clip = if norm > CLIP { CLIP / norm } else { 1.0 };
        self.t += 1;
        let c1 = 1.0 - BETA1.powi(self.t as i32);
        let c2 = 1.0 - BETA2.powi(self.t as i32);
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var) else { continue };
            let g = (g * clip)?;
            let (Some(m), Some(v)) = (self.m.get(name), self.v.get(name)) else {
                continue;
            };
            let m = ((m * BETA1)? + (&g * (1.0 - BETA1))?)?;
            let v = ((v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let upd = ((&m / c1)? / ((&v / c2)?.sqrt()? + ADAM_EPS)?)?;
            let mut nv = (var.as_tensor() - (upd * lr)?)?;
            if var.rank() == 2 && wd > 0.0 {
                nv = (nv - (var.as_tensor() * (lr * wd))?)?;
            }
            var.set(&nv)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    fn save(&self, path: &Path) -> candle_core::Result<()> {
        let mut all: HashMap<String, Tensor> = HashMap::new();
        for (n, t) in &self.m {
            all.insert(format!("m.{n}"), t.clone());
        }
        for (n, t) in &self.v {
            all.insert(format!("v.{n}"), t.clone());
        }
        candle_core::safetensors::save(&all, path)
    }

    fn load(&mut self, path: &Path, t: u64, dev: &Device) -> candle_core::Result<()> {
        let all = candle_core::safetensors::load(path, dev)?;
        for (n, _) in &self.vars {
            if let (Some(m), Some(v)) = (all.get(&format!("m.{n}")), all.get(&format!("v.{n}"))) {
                self.m.insert(n.clone(), m.clone());
                self.v.insert(n.clone(), v.clone());
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Seeded initial values (candle's CPU generator cannot be seeded): norms 1, biases 0, every
/// other tensor uniform with standard deviation 0.02 (residual output projections `attn.out` and
/// `mlp.fc2` scaled by `1/sqrt(2 * layers)`), drawn from SplitMix64 streams keyed by the seed and
/// the tensor name.
fn seeded_init(
    spec: &ModelSpec,
    seed: u64,
    dev: &Device,
) -> candle_core::Result<Vec<(String, Tensor)>> {
    let res_scale = 1.0 / ((2 * spec.n_layers().max(1)) as f64).sqrt();
    let mut out = Vec::new();
    for (name, shape) in spec.tensor_shapes() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.contains("norm") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            let scale = if name.contains("attn.out") || name.contains("mlp.fc2") {
                res_scale
            } else {
                1.0
            };
            // Uniform on [-a, a] has standard deviation a / sqrt(3).
            let a = (blocks::INIT_STD * scale * 3f64.sqrt()) as f32;
            let mut z = splitmix64(seed ^ crate::nn::weights::fnv1a64(name.as_bytes()));
            (0..n)
                .map(|_| {
                    z = splitmix64(z);
                    ((z >> 40) as f32 / 16_777_216.0 * 2.0 - 1.0) * a
                })
                .collect()
        };
        out.push((name, Tensor::from_vec(data, shape, dev)?));
    }
    Ok(out)
}

/// Copies into `varmap` every tensor of the safetensors file `path` with the same name and shape
/// as one of its variables; returns how many were copied.
fn init_from(varmap: &VarMap, path: &Path, dev: &Device) -> Result<usize, TrainError> {
    let all = candle_core::safetensors::load(path, dev)?;
    let vars = match varmap.data().lock() {
        Ok(g) => g.clone(),
        Err(_) => return Err(TrainError::Invalid("variable map lock poisoned".into())),
    };
    let mut copied = 0;
    for (name, var) in &vars {
        if let Some(t) = all.get(name) {
            if t.dims() == var.dims() {
                var.set(&t.to_dtype(DType::F32)?)?;
                copied += 1;
            }
        }
    }
    Ok(copied)
}

fn lr_at(step: u64, opts: &TrainOptions) -> f64 {
    if step < opts.warmup {
        return opts.lr * (step + 1) as f64 / opts.warmup as f64;
    }
    let span = opts.steps.saturating_sub(opts.warmup).max(1) as f64;
    let p = ((step - opts.warmup) as f64 / span).min(1.0);
    opts.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

/// The batch of step `step`: indices drawn uniformly with an RNG seeded by `(seed, step)`.
fn batch_for(set: &GridSet, seed: u64, step: u64, size: usize) -> (Batch, StdRng) {
    let mut rng = StdRng::seed_from_u64(splitmix64(seed ^ splitmix64(step)));
    let n = set.samples.len();
    let idx: Vec<usize> = (0..size).map(|_| rng.gen_range(0..n)).collect();
    let mut batch = Batch::from_indices(set, idx.iter().copied());
    // Only samples with other captions draw from the RNG, so sets without them keep the batches
    // (and loss randomness) they always had.
    for (text, &i) in batch.texts.iter_mut().zip(&idx) {
        let alt = &set.samples[i].alt_texts;
        if !alt.is_empty() {
            let c = rng.gen_range(0..=alt.len());
            if c > 0 {
                text.clone_from(&alt[c - 1]);
            }
        }
    }
    (batch, rng)
}

fn validate(
    net: &Net,
    val: &GridSet,
    opts: &TrainOptions,
    dev: &Device,
) -> Result<f64, TrainError> {
    let n = val.samples.len().min(opts.val_samples.max(1));
    let bs = opts.batch_size.max(1);
    let mut rng = StdRng::seed_from_u64(0x7661_6c69_6461_7465);
    let (mut sum, mut count) = (0.0f64, 0usize);
    let mut i = 0;
    while i < n {
        let j = (i + bs).min(n);
        let b = Batch::from_indices(val, i..j);
        let l = net.loss(&b, dev, &mut rng)?.to_scalar::<f32>()?;
        sum += f64::from(l) * (j - i) as f64;
        count += j - i;
        i = j;
    }
    Ok(sum / count.max(1) as f64)
}

/// Paths of a run's files.
fn paths(opts: &TrainOptions) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let d = &opts.out_dir;
    (
        d.join(format!("{}.safetensors", opts.id)),
        d.join(format!("{}.json", opts.id)),
        d.join(format!("{}.opt.safetensors", opts.id)),
        d.join(format!("{}.opt.json", opts.id)),
    )
}

/// Trains `spec` on `train_set`, validating on `val_set`, writing checkpoints and the manifest to
/// `opts.out_dir`; `on_event` sees progress. Runs on `dev` (CPU or CUDA).
pub fn train(
    spec: &ModelSpec,
    train_set: &GridSet,
    val_set: &GridSet,
    opts: &TrainOptions,
    dev: &Device,
    on_event: &mut dyn FnMut(Event),
) -> Result<TrainReport, TrainError> {
    train_set.validate()?;
    val_set.validate()?;
    for s in [train_set, val_set] {
        if s.codebook_size != spec.codebook_size() {
            return Err(TrainError::Invalid(format!(
                "data codebook {} differs from the model's {}",
                s.codebook_size,
                spec.codebook_size()
            )));
        }
        if s.height > spec.max_side() || s.width > spec.max_side() {
            return Err(TrainError::Invalid(format!(
                "grids {}x{} exceed max_side {}",
                s.height,
                s.width,
                spec.max_side()
            )));
        }
    }
    if opts.batch_size == 0 || opts.eval_every == 0 || opts.steps == 0 {
        return Err(TrainError::Invalid(
            "steps, batch size and eval interval must be > 0".into(),
        ));
    }
    std::fs::create_dir_all(&opts.out_dir).map_err(io_err(&opts.out_dir))?;
    let (wpath, mpath, opath, spath) = paths(opts);

    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let net = Net::new(spec, vb)?;
    varmap.set(seeded_init(spec, opts.seed, dev)?.into_iter())?;
    let mut opt = AdamW::new(&varmap)?;
    let mut step = 0u64;
    let mut last_train = f64::NAN;
    if opts.resume && spath.exists() && wpath.exists() && opath.exists() {
        let text = std::fs::read(&spath).map_err(io_err(&spath))?;
        let st: OptState = serde_json::from_slice(&text)
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", spath.display())))?;
        if &st.spec != spec {
            return Err(TrainError::Invalid(format!(
                "{} holds a different architecture; use another id or out dir",
                spath.display()
            )));
        }
        varmap.load(&wpath)?;
        opt.load(&opath, st.step, dev)?;
        step = st.step;
        last_train = st.train_bits;
    } else if let Some(init) = &opts.init_from {
        let copied = init_from(&varmap, init, dev)?;
        if copied == 0 {
            return Err(TrainError::Invalid(format!(
                "{} holds no tensor of this model's names and shapes",
                init.display()
            )));
        }
    }
    on_event(Event::Start {
        step,
        total: opts.steps,
        params: spec.num_params(),
    });
    let mut window = (0.0f64, 0u64);
    let mut evaluated_at = u64::MAX;
    while step < opts.steps {
        let (batch, mut rng) = batch_for(train_set, opts.seed, step, opts.batch_size);
        let loss = net.loss(&batch, dev, &mut rng)?;
        let bits = f64::from(loss.to_scalar::<f32>()?);
        if !bits.is_finite() {
            return Err(TrainError::Invalid(format!(
                "loss became {bits} at step {step}"
            )));
        }
        opt.step(&loss, lr_at(step, opts), opts.weight_decay)?;
        step += 1;
        window.0 += bits;
        window.1 += 1;
        on_event(Event::Step { step, bits });
        if step % opts.eval_every == 0 || step == opts.steps {
            last_train = window.0 / window.1.max(1) as f64;
            window = (0.0, 0);
            let val_bits = validate(&net, val_set, opts, dev)?;
            evaluated_at = step;
            on_event(Event::Eval {
                step,
                train_bits: last_train,
                val_bits,
            });
            varmap.save(&wpath)?;
            opt.save(&opath)?;
            let st = OptState {
                step,
                spec: spec.clone(),
                train_bits: last_train,
            };
            let text =
                serde_json::to_vec_pretty(&st).map_err(|e| TrainError::Invalid(e.to_string()))?;
            std::fs::write(&spath, text).map_err(io_err(&spath))?;
            write_manifest(spec, opts, &wpath, &mpath, step, last_train, val_bits)?;
        }
    }
    if evaluated_at != step {
        // Resumed at the end: refresh validation and the manifest.
        let val_bits = validate(&net, val_set, opts, dev)?;
        varmap.save(&wpath)?;
        write_manifest(spec, opts, &wpath, &mpath, step, last_train, val_bits)?;
    }
    report(mpath)
}

/// Adopts weights trained outside [`train`] (for example by `tools/gpu-train/train_entropy.py`,
/// the same networks in PyTorch for an accelerator): checks that `weights` holds exactly the
/// tensors of `spec` (every name, every shape, nothing else), measures their validation loss on
/// `val_set` with this module's networks (the same pass [`train`] reports), and writes them with
/// their [`Manifest`] as `<out_dir>/<id>.safetensors` and `.json`. `steps` and `train_bits` are
/// the outside run's own record; `opts` supplies the id, folder, batch size, seed, data
/// description, command and validation size.
pub fn import_weights(
    spec: &ModelSpec,
    weights: &Path,
    val_set: &GridSet,
    opts: &TrainOptions,
    steps: u64,
    train_bits: f64,
    dev: &Device,
) -> Result<TrainReport, TrainError> {
    val_set.validate()?;
    if val_set.codebook_size != spec.codebook_size() {
        return Err(TrainError::Invalid(format!(
            "data codebook {} differs from the model's {}",
            val_set.codebook_size,
            spec.codebook_size()
        )));
    }
    let all = candle_core::safetensors::load(weights, dev)?;
    let shapes = spec.tensor_shapes();
    for (name, shape) in &shapes {
        match all.get(name) {
            Some(t) if t.dims() == shape.as_slice() => {}
            Some(t) => {
                return Err(TrainError::Invalid(format!(
                    "{}: {name} has shape {:?}, the model needs {shape:?}",
                    weights.display(),
                    t.dims()
                )))
            }
            None => {
                return Err(TrainError::Invalid(format!(
                    "{}: tensor {name} is missing",
                    weights.display()
                )))
            }
        }
    }
    if all.len() != shapes.len() {
        return Err(TrainError::Invalid(format!(
            "{} holds {} tensors, the model has {}",
            weights.display(),
            all.len(),
            shapes.len()
        )));
    }
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let net = Net::new(spec, vb)?;
    init_from(&varmap, weights, dev)?;
    let val_bits = validate(&net, val_set, opts, dev)?;
    if !val_bits.is_finite() {
        return Err(TrainError::Invalid(format!(
            "{}: validation loss is {val_bits}",
            weights.display()
        )));
    }
    std::fs::create_dir_all(&opts.out_dir).map_err(io_err(&opts.out_dir))?;
    let (wpath, mpath, _, _) = paths(opts);
    varmap.save(&wpath)?;
    write_manifest(spec, opts, &wpath, &mpath, steps, train_bits, val_bits)?;
    report(mpath)
}

/// Reads back the manifest just written.
fn report(mpath: PathBuf) -> Result<TrainReport, TrainError> {
    let text = std::fs::read(&mpath).map_err(io_err(&mpath))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| TrainError::Invalid(e.to_string()))?;
    Ok(TrainReport {
        manifest,
        manifest_path: mpath,
    })
}

fn write_manifest(
    spec: &ModelSpec,
    opts: &TrainOptions,
    wpath: &Path,
    mpath: &Path,
    step: u64,
    train_bits: f64,
    val_bits: f64,
) -> Result<(), TrainError> {
    let bytes = std::fs::read(wpath).map_err(io_err(wpath))?;
    let m = Manifest {
        id: opts.id.clone(),
        kind: spec.kind().to_string(),
        weights: format!("{}.safetensors", opts.id),
        sha256: sha256_hex(&bytes),
        params: spec.num_params() as u64,
        config: spec.config_json(),
        training: Some(TrainingRecord {
            data: opts.data.clone(),
            steps: step,
            batch_size: opts.batch_size,
            seed: opts.seed,
            train_bits_per_token: train_bits,
            val_bits_per_token: val_bits,
            command: opts.command.clone(),
        }),
    };
    let text = serde_json::to_vec_pretty(&m).map_err(|e| TrainError::Invalid(e.to_string()))?;
    std::fs::write(mpath, text).map_err(io_err(mpath))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_draw_alternative_captions_deterministically() {
        let mut set = GridSet::synthetic(4, 4, 8, 4, 1);
        let plain = set.clone();
        for (i, s) in set.samples.iter_mut().enumerate() {
            s.text = vec![100 + i as u32];
            s.alt_texts = vec![vec![200 + i as u32], vec![300 + i as u32]];
        }
        let mut seen = std::collections::BTreeSet::new();
        for step in 0..50 {
            let (a, _) = batch_for(&set, 7, step, 4);
            let (b, _) = batch_for(&set, 7, step, 4);
            assert_eq!(a, b, "same seed and step, same batch");
            for t in &a.texts {
                assert_eq!(t.len(), 1);
                seen.insert(t[0] / 100);
            }
            // Without alternatives the primary caption is always used.
            let (p, _) = batch_for(&plain, 7, step, 4);
            for (t, id) in p.texts.iter().zip(p.ids.chunks_exact(16)) {
                let s = plain.samples.iter().find(|s| s.ids == id).unwrap();
                assert_eq!(t, &s.text);
            }
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 2, 3]);
    }
}

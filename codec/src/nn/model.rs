//! Pieces shared by the three transformer entropy models: the error type, the model manifest, the
//! 2-D position embedding and the output head.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::fast::Panels;
use super::kernels::{linear, Kernel};
use super::lanes::V8;
use super::weights::{sha256_hex, Weights};
use super::{logits_to_weights, NnError};
use crate::coder::CodeError;

/// Why a transformer entropy model could not load, encode or decode.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The weights or configuration are unusable.
    #[error(transparent)]
    Nn(#[from] NnError),
    /// The range coder failed (a corrupt payload, usually).
    #[error(transparent)]
    Code(#[from] CodeError),
    /// The grid does not fit the model (codebook size, dimensions, known mask).
    #[error("grid does not fit the model: {0}")]
    Grid(String),
    /// The manifest could not be read or parsed, or its hash does not match the weights.
    #[error("manifest: {0}")]
    Manifest(String),
    /// A caller's token picker stopped the generation (for example, the reply was cancelled).
    #[error("stopped by the caller")]
    Stopped,
    /// Reading a model file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Where a model's training data and results are recorded (the `training` object of a manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TrainingRecord {
    /// Data the model was trained on (folders, tokenizer id and hash, crops).
    pub data: String,
    /// Optimiser steps taken.
    pub steps: u64,
    /// Sequences per step.
    pub batch_size: usize,
    /// Random seed.
    pub seed: u64,
    /// Mean training loss over the last logging window, bits per token.
    pub train_bits_per_token: f64,
    /// Validation loss, bits per token (`log2 K` is the uniform baseline).
    pub val_bits_per_token: f64,
    /// The exact command that reproduces the file.
    pub command: String,
}

/// The JSON manifest that accompanies a model's safetensors weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Model id, used with `sha256` in the handshake (e.g. `unimic-entropy-generic-v1`).
    pub id: String,
    /// `generic`, `masked` or `text`.
    pub kind: String,
    /// File name of the safetensors weights, relative to the manifest.
    pub weights: String,
    /// Lower-case hex SHA-256 of the weights file: the content hash.
    pub sha256: String,
    /// Number of parameters.
    pub params: u64,
    /// The model's configuration (architecture and shapes), as its `*Config` serialises.
    pub config: serde_json::Value,
    /// How the weights were produced, if they were trained.
    #[serde(default)]
    pub training: Option<TrainingRecord>,
}

/// Largest manifest accepted (bytes).
const MAX_MANIFEST: u64 = 1 << 20;
/// Largest weights file accepted (bytes): 256 MiB, far above the 10 M-parameter target.
const MAX_WEIGHTS: u64 = 256 << 20;

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > max {
        return Err(ModelError::Manifest(format!(
            "{} is {len} bytes, more than {max}",
            path.display()
        )));
    }
    std::fs::read(path).map_err(io)
}

impl Manifest {
    /// Reads a manifest and the weights it names; checks the kind and the content hash.
    pub fn load(path: &Path, kind: &str) -> Result<(Self, Vec<u8>), ModelError> {
        let text = read_bounded(path, MAX_MANIFEST)?;
        let m: Manifest =
            serde_json::from_slice(&text).map_err(|e| ModelError::Manifest(e.to_string()))?;
        if m.kind != kind {
            return Err(ModelError::Manifest(format!(
                "manifest is for a {} model, not {kind}",
                m.kind
            )));
        }
        // The weights must sit next to the manifest: a plain file name, never a path that could
        // reach elsewhere (absolute, `..`, or into a subfolder).
        let plain = Path::new(&m.weights)
            .file_name()
            .is_some_and(|f| f == std::ffi::OsStr::new(&m.weights));
        if !plain || m.weights == ".." || m.weights == "." {
            return Err(ModelError::Manifest(format!(
                "weights {:?} must be a file name in the manifest's folder",
                m.weights
            )));
        }
        let wpath = path.parent().unwrap_or(Path::new(".")).join(&m.weights);
        let bytes = read_bounded(&wpath, MAX_WEIGHTS)?;
        let h = sha256_hex(&bytes);
        if !h.eq_ignore_ascii_case(&m.sha256) {
            return Err(ModelError::Manifest(format!(
                "{} has sha256 {h}, the manifest says {}",
                wpath.display(),
                m.sha256
            )));
        }
        Ok((m, bytes))
    }
}

/// Learned absolute 2-D positions: `row_emb[row] + col_emb[col]` (tables of `max_side` rows).
#[derive(Debug, Clone)]
pub struct Pos2d {
    d: usize,
    max_side: usize,
    row: Vec<f32>,
    col: Vec<f32>,
}

impl Pos2d {
    /// Names and shapes of the position tables (`row_emb.weight`, `col_emb.weight`).
    pub fn tensor_shapes(max_side: usize, d: usize) -> Vec<(String, Vec<usize>)> {
        Self::tensor_shapes_named("", max_side, d)
    }

    /// Names and shapes of a second pair of tables whose names start with `prefix`
    /// (`{prefix}row_emb.weight`, `{prefix}col_emb.weight`).
    pub fn tensor_shapes_named(
        prefix: &str,
        max_side: usize,
        d: usize,
    ) -> Vec<(String, Vec<usize>)> {
        vec![
            (format!("{prefix}row_emb.weight"), vec![max_side, d]),
            (format!("{prefix}col_emb.weight"), vec![max_side, d]),
        ]
    }

    /// Takes the tables out of `w`.
    pub fn from_weights(max_side: usize, d: usize, w: &mut Weights) -> Result<Self, NnError> {
        Self::from_weights_named("", max_side, d, w)
    }

    /// Takes the tables named with `prefix` (see [`Self::tensor_shapes_named`]) out of `w`.
    pub fn from_weights_named(
        prefix: &str,
        max_side: usize,
        d: usize,
        w: &mut Weights,
    ) -> Result<Self, NnError> {
        Ok(Self {
            d,
            max_side,
            row: w.take(&format!("{prefix}row_emb.weight"), &[max_side, d])?,
            col: w.take(&format!("{prefix}col_emb.weight"), &[max_side, d])?,
        })
    }

    /// Largest grid side.
    pub fn max_side(&self) -> usize {
        self.max_side
    }

    /// `out = (tok + row_emb[r]) + col_emb[c]` elementwise (this order).
    pub fn add_to(&self, tok: &[f32], r: usize, c: usize, out: &mut [f32]) {
        let d = self.d;
        let re = &self.row[r * d..(r + 1) * d];
        let ce = &self.col[c * d..(c + 1) * d];
        for (o, ((&t, &r), &c)) in out.iter_mut().zip(tok.iter().zip(re).zip(ce)).take(d) {
            *o = (t + r) + c;
        }
    }
}

/// The output projection `head` (`codebook_size × d` weight and bias) and the step to integer
/// weights.
#[derive(Debug, Clone)]
pub struct Head {
    w: Vec<f32>,
    b: Vec<f32>,
    k: usize,
    /// `w` re-laid for one-row products (incremental decoding).
    panels: Panels,
}

impl Head {
    /// Names and shapes of the head tensors.
    pub fn tensor_shapes(k: usize, d: usize) -> Vec<(String, Vec<usize>)> {
        vec![
            ("head.weight".to_string(), vec![k, d]),
            ("head.bias".to_string(), vec![k]),
        ]
    }

    /// Takes the head out of `w`.
    pub fn from_weights(k: usize, d: usize, w: &mut Weights) -> Result<Self, NnError> {
        let hw = w.take("head.weight", &[k, d])?;
        Ok(Self {
            panels: Panels::new(&hw, k, d),
            w: hw,
            b: w.take("head.bias", &[k])?,
            k,
        })
    }

    /// Logits for one hidden state.
    pub fn logits(&self, kernel: Kernel, hidden: &[f32], logits: &mut Vec<f32>) {
        logits.resize(self.k, 0.0);
        linear(kernel, hidden, &self.w, Some(&self.b), logits);
    }

    /// Integer weights (see [`logits_to_weights`]) for one hidden state; `scratch` holds logits.
    pub fn weights(
        &self,
        kernel: Kernel,
        hidden: &[f32],
        scratch: &mut Vec<f32>,
        out: &mut Vec<u64>,
    ) {
        let d = hidden.len();
        if kernel == Kernel::Scalar || d == 0 || self.w.len() != self.k * d {
            self.logits(kernel, hidden, scratch);
            logits_to_weights(scratch, out);
            return;
        }
        scratch.resize(2 * self.k, 0.0);
        let (logits, tmp) = scratch.split_at_mut(self.k);
        let mut outs = [std::mem::take(out)];
        head_lanes(self, hidden, d, &[0], logits, tmp, &mut outs);
        *out = std::mem::take(&mut outs[0]);
    }

    /// Integer weights for the hidden states `hidden[r * d .. (r + 1) * d]` of each row `r` in
    /// `rows`, in the order of `rows`; a row past the end of `hidden` gets no weights (an empty
    /// vector, which the quantization rule reads as uniform). Bit-identical to calling
    /// [`Self::weights`] per row; [`Kernel::Lanes`] computes the logits of a block of rows in one
    /// blocked matrix product.
    pub fn weights_rows(
        &self,
        kernel: Kernel,
        hidden: &[f32],
        d: usize,
        rows: &[usize],
    ) -> Vec<Vec<u64>> {
        let n = hidden.len().checked_div(d).unwrap_or(0);
        let mut outs: Vec<Vec<u64>> = vec![Vec::new(); rows.len()];
        if kernel == Kernel::Scalar || d == 0 || self.w.len() != self.k * d {
            let mut scratch = Vec::new();
            for (&r, out) in rows.iter().zip(outs.iter_mut()) {
                if r < n {
                    self.weights(kernel, &hidden[r * d..(r + 1) * d], &mut scratch, out);
                }
            }
            return outs;
        }
        let valid: Vec<usize> = rows.iter().copied().filter(|&r| r < n).collect();
        let mut got: Vec<Vec<u64>> = vec![Vec::new(); valid.len()];
        let mut buf = vec![0.0f32; HEAD_ROWS * self.k + self.k];
        let (logits, tmp) = buf.split_at_mut(HEAD_ROWS * self.k);
        for (ids, outs) in valid.chunks(HEAD_ROWS).zip(got.chunks_mut(HEAD_ROWS)) {
            head_lanes(self, hidden, d, ids, logits, tmp, outs);
        }
        let mut got = got.into_iter();
        for (&r, out) in rows.iter().zip(outs.iter_mut()) {
            if r < n {
                *out = got.next().unwrap_or_default();
            }
        }
        outs
    }
}

/// Rows of logits computed per blocked product in [`Head::weights_rows`].
const HEAD_ROWS: usize = 32;

/// The head of the rows `ids` of `hidden` (`d` wide): their hidden states gathered, one blocked
/// product into `logits` (`ids.len() * k`), then the integer weights of each row into `outs`.
fn head_lanes(
    head: &Head,
    hidden: &[f32],
    d: usize,
    ids: &[usize],
    logits: &mut [f32],
    tmp: &mut [f32],
    outs: &mut [Vec<u64>],
) {
    let k = head.k;
    let n = ids.len();
    let mut x = vec![0.0f32; n * d];
    for (row, &i) in x.chunks_exact_mut(d).zip(ids) {
        row.copy_from_slice(&hidden[i * d..(i + 1) * d]);
    }
    assert!(
        logits.len() >= n * k
            && tmp.len() >= k
            && outs.len() >= n
            && super::fast::gemm_fits(&x, d, n, &head.w, d, k, d, Some(&head.b), logits, k)
    );
    #[cfg(target_arch = "x86_64")]
    if super::kernels::simd::avx_enabled() {
        // SAFETY: sizes checked above; the CPU has AVX (checked at run time).
        unsafe { head_avx(head, &x, d, n, logits, tmp, outs) };
        return;
    }
    // SAFETY: sizes checked above.
    unsafe { head_generic::<super::lanes::Portable>(head, &x, d, n, logits, tmp, outs) };
}

/// [`head_generic`] compiled with AVX.
///
/// # Safety
/// As [`head_generic`]; the CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn head_avx(
    head: &Head,
    x: &[f32],
    d: usize,
    n: usize,
    logits: &mut [f32],
    tmp: &mut [f32],
    outs: &mut [Vec<u64>],
) {
    head_generic::<super::lanes::Avx>(head, x, d, n, logits, tmp, outs)
}

/// # Safety
/// `x` holds `n * d`, `logits` `n * k`, `tmp` `k` floats, `outs` `n` vectors, the head `k * d`
/// weights and `k` biases; `V` must be usable on this CPU.
#[inline(always)]
unsafe fn head_generic<V: V8>(
    head: &Head,
    x: &[f32],
    d: usize,
    n: usize,
    logits: &mut [f32],
    tmp: &mut [f32],
    outs: &mut [Vec<u64>],
) {
    let k = head.k;
    let (lp, tp) = (logits.as_mut_ptr(), tmp.as_mut_ptr());
    let b = Some(head.b.as_ptr());
    if n == 1 {
        super::fast::matvec::<V>(x.as_ptr(), &head.panels, head.w.as_ptr(), k, d, b, lp);
    } else {
        super::fast::gemm::<V>(x.as_ptr(), d, n, head.w.as_ptr(), d, k, d, b, lp, k);
    }
    for (r, out) in outs.iter_mut().enumerate().take(n) {
        super::fast::logits_to_weights::<V>(lp.add(r * k), k, tp, out);
    }
}

/// Checks that a grid shape fits a model.
pub(crate) fn check_shape(
    height: u32,
    width: u32,
    codebook: u32,
    max_side: usize,
    want_codebook: usize,
) -> Result<(), ModelError> {
    if height as usize > max_side || width as usize > max_side {
        return Err(ModelError::Grid(format!(
            "{height}x{width} exceeds the model's largest side {max_side}"
        )));
    }
    if codebook as usize != want_codebook {
        return Err(ModelError::Grid(format!(
            "grid codebook {codebook} differs from the model's {want_codebook}"
        )));
    }
    Ok(())
}

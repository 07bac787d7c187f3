//! [`TextCond`]: image tokens conditioned on the prompt's text tokens.
//!
//! # Model
//! The [`super::generic`] model with a text prefix: the sequence is the prompt's o200k token ids
//! (at most [`TextCondConfig::max_text`], the first ones kept), then the image grid in raster
//! order, all under one causal mask. Text position `i` has input
//! `text_emb[bucket(id)] + text_pos[i]`; image position `t` has
//! `tok_emb[previous token or K] + row_emb[r] + col_emb[c]` as in the generic model (`K` is the
//! begin token; it follows the text). Only image tokens are coded: the receiver already holds the
//! prompt.
//!
//! # Text vocabulary (part of the model contract)
//! o200k has about 200,000 ids; a learned table that large would dwarf the model. Ids are hashed
//! into [`TextCondConfig::text_vocab`] buckets: `bucket(id) = splitmix64(id) mod text_vocab`
//! ([`text_bucket`]). Collisions are rare for the few hundred ids a caption corpus uses with the
//! default 4,096 buckets, and the hash needs no table to ship or to keep in sync.
//!
//! ```
//! use unimic_codec::entropy::text_cond::{TextCond, TextCondConfig};
//! use unimic_codec::grid::TokenGrid;
//! let model = TextCond::synthetic(&TextCondConfig::tiny(16), 5).unwrap();
//! let grid = TokenGrid::new(2, 2, 16, vec![9, 8, 7, 6]).unwrap();
//! let prompt = [1_000u32, 2_000, 3_000];
//! let bytes = model.encode(&prompt, &grid).unwrap();
//! assert_eq!(model.decode(&prompt, 2, 2, &bytes).unwrap(), grid);
//! ```

use serde::{Deserialize, Serialize};

use crate::coder::Decoder;
use crate::entropy::cursor::{causal, code_chunk, Cursor};
use crate::entropy::Dense;
use crate::grid::TokenGrid;
use crate::nn::kernels::Kernel;
use crate::nn::model::{check_shape, Head, Manifest, ModelError, Pos2d};
use crate::nn::transformer::{Body, BodyConfig, KvCache, Mask};
use crate::nn::weights::{sha256_hex, splitmix64, Weights};
use crate::nn::{embedding_row, NnError};

/// The `kind` of a text-conditioned model's manifest.
pub const KIND: &str = "text";

/// Architecture of a [`TextCond`] model (the `config` object of its manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextCondConfig {
    /// Codebook size `K` of the image tokenizer; token `K` is the begin token.
    pub codebook_size: usize,
    /// Largest grid side.
    pub max_side: usize,
    /// Number of hash buckets for text ids.
    pub text_vocab: usize,
    /// Longest text prefix (longer prompts keep their first `max_text` ids).
    pub max_text: usize,
    /// The transformer body.
    pub body: BodyConfig,
}

/// The bucket of an o200k id: `splitmix64(id) mod text_vocab` (see the [module docs](self)).
pub fn text_bucket(id: u32, text_vocab: usize) -> usize {
    (splitmix64(u64::from(id)) % text_vocab.max(1) as u64) as usize
}

impl TextCondConfig {
    /// The default size: d 256, 4 layers, 4 heads, MLP 768, 4,096 buckets, 64 text tokens.
    pub fn small(codebook_size: usize) -> Self {
        Self {
            codebook_size,
            max_side: 64,
            text_vocab: 4096,
            max_text: 64,
            body: BodyConfig {
                d_model: 256,
                n_layers: 4,
                n_heads: 4,
                d_ff: 768,
            },
        }
    }

    /// A very small model for tests and examples.
    pub fn tiny(codebook_size: usize) -> Self {
        Self {
            codebook_size,
            max_side: 16,
            text_vocab: 64,
            max_text: 8,
            body: BodyConfig {
                d_model: 16,
                n_layers: 2,
                n_heads: 2,
                d_ff: 32,
            },
        }
    }

    /// Checks the sizes.
    pub fn validate(&self) -> Result<(), NnError> {
        self.body.validate()?;
        if self.codebook_size < 2 || self.codebook_size > crate::grid::MAX_CODEBOOK as usize {
            return Err(NnError::Config(format!(
                "codebook size {} outside 2..=65536",
                self.codebook_size
            )));
        }
        if self.max_side == 0
            || self.max_side > 1024
            || self.text_vocab == 0
            || self.text_vocab > 1 << 20
            || self.max_text > 4096
        {
            return Err(NnError::Config(format!("{self:?}")));
        }
        Ok(())
    }

    /// Names and shapes of every tensor.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.body.d_model;
        let mut v = vec![
            (
                "tok_emb.weight".to_string(),
                vec![self.codebook_size + 1, d],
            ),
            ("text_emb.weight".to_string(), vec![self.text_vocab, d]),
            ("text_pos.weight".to_string(), vec![self.max_text.max(1), d]),
        ];
        v.extend(Pos2d::tensor_shapes(self.max_side, d));
        v.extend(self.body.tensor_shapes());
        v.extend(Head::tensor_shapes(self.codebook_size, d));
        v
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// The text-conditioned transformer entropy model.
#[derive(Debug, Clone)]
pub struct TextCond {
    cfg: TextCondConfig,
    tok_emb: Vec<f32>,
    text_emb: Vec<f32>,
    text_pos: Vec<f32>,
    pos: Pos2d,
    body: Body,
    head: Head,
    kernel: Kernel,
    content_hash: String,
}

impl TextCond {
    /// Builds the model from a checkpoint's tensors (every tensor must be used).
    pub fn from_weights(cfg: &TextCondConfig, mut w: Weights) -> Result<Self, NnError> {
        cfg.validate()?;
        let content_hash = sha256_hex(&w.to_safetensors()?);
        let d = cfg.body.d_model;
        let tok_emb = w.take("tok_emb.weight", &[cfg.codebook_size + 1, d])?;
        let text_emb = w.take("text_emb.weight", &[cfg.text_vocab, d])?;
        let text_pos = w.take("text_pos.weight", &[cfg.max_text.max(1), d])?;
        let pos = Pos2d::from_weights(cfg.max_side, d, &mut w)?;
        let body = Body::from_weights(&cfg.body, &mut w)?;
        let head = Head::from_weights(cfg.codebook_size, d, &mut w)?;
        w.finish()?;
        Ok(Self {
            cfg: cfg.clone(),
            tok_emb,
            text_emb,
            text_pos,
            pos,
            body,
            head,
            kernel: Kernel::default(),
            content_hash,
        })
    }

    /// Loads safetensors bytes; the content hash is the SHA-256 of exactly these bytes.
    pub fn from_safetensors(cfg: &TextCondConfig, bytes: &[u8]) -> Result<Self, NnError> {
        let mut m = Self::from_weights(cfg, Weights::from_safetensors(bytes)?)?;
        m.content_hash = sha256_hex(bytes);
        Ok(m)
    }

    /// Loads a model from its JSON manifest (and the weights file it names, hash-checked).
    pub fn load(manifest: &std::path::Path) -> Result<(Self, Manifest), ModelError> {
        let (m, bytes) = Manifest::load(manifest, KIND)?;
        let cfg: TextCondConfig = serde_json::from_value(m.config.clone())
            .map_err(|e| ModelError::Manifest(e.to_string()))?;
        Ok((Self::from_safetensors(&cfg, &bytes)?, m))
    }

    /// A model with deterministic synthetic weights: for tests.
    pub fn synthetic(cfg: &TextCondConfig, seed: u64) -> Result<Self, NnError> {
        Self::from_weights(cfg, Weights::synthetic(&cfg.tensor_shapes(), seed, 1.0))
    }

    /// Selects the kernel implementation (results are identical; see [`Kernel`]).
    pub fn with_kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// The architecture.
    pub fn config(&self) -> &TextCondConfig {
        &self.cfg
    }

    /// SHA-256 (hex) of the safetensors weights.
    pub fn content_hash(&self) -> &str {
        &self.content_hash
    }

    /// The prompt ids actually used (the first `max_text`).
    fn prefix<'a>(&self, text: &'a [u32]) -> &'a [u32] {
        &text[..text.len().min(self.cfg.max_text)]
    }

    /// Runs the text prefix into a fresh cache; image positions follow.
    pub fn start(&self, text: &[u32]) -> KvCache {
        let d = self.cfg.body.d_model;
        let text = self.prefix(text);
        let mut cache = KvCache::new(&self.cfg.body);
        if text.is_empty() {
            return cache;
        }
        let mut xs = vec![0.0f32; text.len() * d];
        for (i, &id) in text.iter().enumerate() {
            let b = text_bucket(id, self.cfg.text_vocab);
            let e = &self.text_emb[b * d..(b + 1) * d];
            let p = &self.text_pos[i * d..(i + 1) * d];
            for (x, (a, q)) in xs[i * d..(i + 1) * d].iter_mut().zip(e.iter().zip(p)) {
                *x = a + q;
            }
        }
        self.body
            .forward(self.kernel, &mut xs, &mut cache, Mask::Causal);
        cache
    }

    fn input(&self, prev: Option<u32>, t: usize, width: usize, out: &mut [f32]) {
        let d = self.cfg.body.d_model;
        let id = prev.map_or(self.cfg.codebook_size, |p| p as usize);
        if let Some(tok) = embedding_row(&self.tok_emb, d, id.min(self.cfg.codebook_size)) {
            self.pos.add_to(tok, t / width, t % width, out);
        }
    }

    /// Incremental step: integer weights for image position `t` (raster order) of a grid `width`
    /// wide, given the token before it (`None` at `t = 0`); `cache` comes from [`Self::start`].
    pub fn step(
        &self,
        cache: &mut KvCache,
        t: usize,
        prev: Option<u32>,
        width: usize,
        out: &mut Vec<u64>,
    ) {
        let d = self.cfg.body.d_model;
        let mut x = vec![0.0f32; d];
        self.input(prev, t, width.max(1), &mut x);
        self.body.forward(self.kernel, &mut x, cache, Mask::Causal);
        let mut scratch = Vec::new();
        self.head.weights(self.kernel, &x, &mut scratch, out);
    }

    /// A [`Cursor`] at the start of a `height × width` grid prompted by `text` (its prompt
    /// prefix is run; see [`super::cursor`]).
    pub fn cursor(&self, text: &[u32], height: u32, width: u32) -> Result<Cursor, ModelError> {
        let k = self.cfg.codebook_size as u32;
        check_shape(height, width, k, self.cfg.max_side, self.cfg.codebook_size)?;
        let n = height as usize * width as usize;
        Ok(Cursor::new(
            self.start(text),
            (height, width, k),
            vec![0; n],
            None,
            n,
        ))
    }

    /// Decides the next `n` tokens of `cursor` one position at a time: `pick(index, weights)`
    /// chooses each from the model's integer weights. An error from `pick` ends the run.
    pub fn advance(
        &self,
        cursor: &mut Cursor,
        n: usize,
        pick: impl FnMut(usize, &[u64]) -> Result<u32, ModelError>,
    ) -> Result<(), ModelError> {
        cursor.steps(
            n,
            |cache, t, prev, width, w| self.step(cache, t, prev, width, w),
            pick,
        )
    }

    /// Takes `tokens` as the next tokens of `cursor` and returns the integer weights each is
    /// coded with, from one batched pass (the same bits as [`Self::advance`]'s).
    pub fn advance_known(
        &self,
        cursor: &mut Cursor,
        tokens: &[u32],
    ) -> Result<Vec<Vec<u64>>, ModelError> {
        let d = self.cfg.body.d_model;
        let input = |prev, t, width, row: &mut [f32]| self.input(prev, t, width, row);
        let run = causal(&self.body, &self.head, self.kernel, d);
        cursor.batch(tokens, d, &input, run)
    }

    /// Full recompute: the integer weights of every image position, text and grid in one pass.
    pub fn weights_full(
        &self,
        text: &[u32],
        grid: &TokenGrid,
    ) -> Result<Vec<Vec<u64>>, ModelError> {
        check_shape(
            grid.height(),
            grid.width(),
            grid.codebook_size(),
            self.cfg.max_side,
            self.cfg.codebook_size,
        )?;
        let d = self.cfg.body.d_model;
        let text = self.prefix(text);
        let nt = text.len();
        let n = grid.len();
        let w = grid.width() as usize;
        let ids = grid.ids();
        let mut xs = vec![0.0f32; (nt + n) * d];
        for (i, &id) in text.iter().enumerate() {
            let b = text_bucket(id, self.cfg.text_vocab);
            let e = &self.text_emb[b * d..(b + 1) * d];
            let p = &self.text_pos[i * d..(i + 1) * d];
            for (x, (a, q)) in xs[i * d..(i + 1) * d].iter_mut().zip(e.iter().zip(p)) {
                *x = a + q;
            }
        }
        for t in 0..n {
            let prev = if t == 0 { None } else { Some(ids[t - 1]) };
            let row = nt + t;
            self.input(prev, t, w, &mut xs[row * d..(row + 1) * d]);
        }
        let mut cache = KvCache::new(&self.cfg.body);
        self.body
            .forward(self.kernel, &mut xs, &mut cache, Mask::Causal);
        let rows: Vec<usize> = (nt..nt + n).collect();
        Ok(self.head.weights_rows(self.kernel, &xs, d, &rows))
    }

    /// Codes `grid` conditioned on the prompt ids `text`, using the batched path.
    pub fn encode(&self, text: &[u32], grid: &TokenGrid) -> Result<Vec<u8>, ModelError> {
        let all = self.weights_full(text, grid)?;
        Ok(code_chunk(all, grid.ids())?.0)
    }

    /// Decodes a `height × width` grid conditioned on `text`, incrementally with a KV cache.
    pub fn decode(
        &self,
        text: &[u32],
        height: u32,
        width: u32,
        payload: &[u8],
    ) -> Result<TokenGrid, ModelError> {
        let mut dec = Decoder::new(payload);
        self.generate(text, height, width, |_, w| {
            Ok(dec.decode(&Dense::from_weights(w.iter().copied()))?)
        })
    }

    /// Builds a `height × width` grid conditioned on the prompt ids `text`, in raster order:
    /// `pick(index, weights)` chooses each token from the model's integer weights (the range
    /// decoder in [`Self::decode`]; a [`Sampler`](super::sample::Sampler) for text-to-image).
    /// An error from `pick` ends the generation.
    pub fn generate(
        &self,
        text: &[u32],
        height: u32,
        width: u32,
        pick: impl FnMut(usize, &[u64]) -> Result<u32, ModelError>,
    ) -> Result<TokenGrid, ModelError> {
        let mut cursor = self.cursor(text, height, width)?;
        let n = cursor.total();
        self.advance(&mut cursor, n, pick)?;
        cursor.into_grid()
    }
}

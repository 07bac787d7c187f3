//! The deterministic pre-norm transformer body shared by the three entropy models, and its
//! explicit [`KvCache`].
//!
//! Block `i` (names as in the safetensors checkpoint, `blocks.{i}.…`):
//!
//! ```text
//! a = rms_norm(x, norm1)                       q|k|v = attn.qkv(a)        (one Linear, 3d outputs)
//! per head h:  s_j = dot(q_h, k_hj) * (1/sqrt(d_head))   for the visible keys j, in order
//!              p = softmax(s)                  o_h = Σ_j p_j v_hj         (sequential over j)
//! x = x + attn.out(o)
//! x = x + mlp.fc2(silu(mlp.fc1(rms_norm(x, norm2))))
//! ```
//!
//! and after the last block `rms_norm(x, norm_f)`. Every product, sum and reduction follows
//! [`super::kernels`] and [`super::math`]; each row (position) is computed by exactly the same
//! sequence of operations whether it is run alone with a cache of earlier keys ("incremental") or
//! inside a batch of rows ("full recompute"), so both give the same bits.

use serde::{Deserialize, Serialize};

use super::fast::{self, AttnShape, Panels};
use super::kernels::{dot_with, linear_rows, Kernel};
use super::lanes::V8;
use super::math::{rms_norm, silu, softmax_in_place};
use super::weights::Weights;
use super::NnError;

/// Shape of a transformer body (mirrors the `body` fields of a model manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyConfig {
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of blocks.
    pub n_layers: usize,
    /// Attention heads; must divide `d_model`.
    pub n_heads: usize,
    /// Hidden width of the MLP.
    pub d_ff: usize,
}

impl BodyConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Checks that the shape is usable (non-zero sizes, heads divide the width, bounded sizes).
    pub fn validate(&self) -> Result<(), NnError> {
        let ok = self.d_model > 0
            && self.n_layers > 0
            && self.n_heads > 0
            && self.d_ff > 0
            && self.d_model % self.n_heads == 0
            && self.d_model <= 4096
            && self.d_ff <= 16384
            && self.n_layers <= 64;
        if ok {
            Ok(())
        } else {
            Err(NnError::Config(format!(
                "invalid transformer body {self:?}"
            )))
        }
    }

    /// Names and shapes of the body's tensors.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f) = (self.d_model, self.d_ff);
        let mut v = Vec::new();
        for i in 0..self.n_layers {
            let p = format!("blocks.{i}");
            v.push((format!("{p}.norm1.weight"), vec![d]));
            v.push((format!("{p}.attn.qkv.weight"), vec![3 * d, d]));
            v.push((format!("{p}.attn.qkv.bias"), vec![3 * d]));
            v.push((format!("{p}.attn.out.weight"), vec![d, d]));
            v.push((format!("{p}.attn.out.bias"), vec![d]));
            v.push((format!("{p}.norm2.weight"), vec![d]));
            v.push((format!("{p}.mlp.fc1.weight"), vec![f, d]));
            v.push((format!("{p}.mlp.fc1.bias"), vec![f]));
            v.push((format!("{p}.mlp.fc2.weight"), vec![d, f]));
            v.push((format!("{p}.mlp.fc2.bias"), vec![d]));
        }
        v.push(("norm_f.weight".to_string(), vec![d]));
        v
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: Vec<f32>,
    qkv_w: Vec<f32>,
    qkv_b: Vec<f32>,
    out_w: Vec<f32>,
    out_b: Vec<f32>,
    norm2: Vec<f32>,
    fc1_w: Vec<f32>,
    fc1_b: Vec<f32>,
    fc2_w: Vec<f32>,
    fc2_b: Vec<f32>,
    /// The four matrices re-laid for one-row products (incremental decoding).
    qkv_p: Panels,
    out_p: Panels,
    fc1_p: Panels,
    fc2_p: Panels,
}

/// Keys and values of every position seen so far, per layer: the state of incremental decoding,
/// owned by the caller and passed as `&mut`. It also keeps the work buffers of
/// [`Body::forward`], so that decoding one position after another allocates nothing.
#[derive(Debug, Clone)]
pub struct KvCache {
    d: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    scratch: Scratch,
}

/// Work buffers of the fast forward pass (contents meaningless between calls).
#[derive(Debug, Clone, Default)]
struct Scratch {
    a: Vec<f32>,
    qkv: Vec<f32>,
    o: Vec<f32>,
    proj: Vec<f32>,
    hidden: Vec<f32>,
    scores: Vec<f32>,
}

/// Makes `v` hold at least `n` floats.
fn ensure(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

impl KvCache {
    /// An empty cache for a body of this shape.
    pub fn new(cfg: &BodyConfig) -> Self {
        Self {
            d: cfg.d_model,
            k: vec![Vec::new(); cfg.n_layers],
            v: vec![Vec::new(); cfg.n_layers],
            len: 0,
            scratch: Scratch::default(),
        }
    }

    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keeps only the first `len` positions (a no-op if it holds fewer).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        for (k, v) in self.k.iter_mut().zip(self.v.iter_mut()) {
            k.truncate(len * self.d);
            v.truncate(len * self.d);
        }
        self.len = len;
    }
}

/// Which keys a row may attend to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mask {
    /// Row `t` of a call sits at position `cache.len() + t` and sees every position up to and
    /// including its own.
    Causal,
    /// Every row sees every position (cached ones and all rows of the call).
    Full,
}

/// The deterministic transformer body.
#[derive(Debug, Clone)]
pub struct Body {
    cfg: BodyConfig,
    blocks: Vec<Block>,
    norm_f: Vec<f32>,
}

impl Body {
    /// Takes the body's tensors out of `w` (see [`BodyConfig::tensor_shapes`]).
    pub fn from_weights(cfg: &BodyConfig, w: &mut Weights) -> Result<Self, NnError> {
        cfg.validate()?;
        let (d, f) = (cfg.d_model, cfg.d_ff);
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("blocks.{i}");
            let qkv_w = w.take(&format!("{p}.attn.qkv.weight"), &[3 * d, d])?;
            let out_w = w.take(&format!("{p}.attn.out.weight"), &[d, d])?;
            let fc1_w = w.take(&format!("{p}.mlp.fc1.weight"), &[f, d])?;
            let fc2_w = w.take(&format!("{p}.mlp.fc2.weight"), &[d, f])?;
            blocks.push(Block {
                norm1: w.take(&format!("{p}.norm1.weight"), &[d])?,
                qkv_b: w.take(&format!("{p}.attn.qkv.bias"), &[3 * d])?,
                out_b: w.take(&format!("{p}.attn.out.bias"), &[d])?,
                norm2: w.take(&format!("{p}.norm2.weight"), &[d])?,
                fc1_b: w.take(&format!("{p}.mlp.fc1.bias"), &[f])?,
                fc2_b: w.take(&format!("{p}.mlp.fc2.bias"), &[d])?,
                qkv_p: Panels::new(&qkv_w, 3 * d, d),
                out_p: Panels::new(&out_w, d, d),
                fc1_p: Panels::new(&fc1_w, f, d),
                fc2_p: Panels::new(&fc2_w, d, f),
                qkv_w,
                out_w,
                fc1_w,
                fc2_w,
            });
        }
        let norm_f = w.take("norm_f.weight", &[d])?;
        Ok(Self {
            cfg: cfg.clone(),
            blocks,
            norm_f,
        })
    }

    /// The body's shape.
    pub fn config(&self) -> &BodyConfig {
        &self.cfg
    }

    /// Runs `xs` (`rows × d_model`, row-major input embeddings) through every block, appending the
    /// rows' keys and values to `cache`, and replaces `xs` by the final normalised hidden states.
    ///
    /// [`Kernel::Scalar`] runs the definition as written in the module docs, one operation at a
    /// time; [`Kernel::Lanes`] runs the blocked, vectorised implementation (matrix products over
    /// all rows at once, attention a block of rows at a time), compiled with AVX where the CPU has
    /// it. Both give the same bits.
    pub fn forward(&self, kernel: Kernel, xs: &mut [f32], cache: &mut KvCache, mask: Mask) {
        match kernel {
            Kernel::Scalar => self.forward_reference(kernel, xs, cache, mask),
            Kernel::Lanes => self.forward_fast(xs, cache, mask),
        }
    }

    fn forward_fast(&self, xs: &mut [f32], cache: &mut KvCache, mask: Mask) {
        let d = self.cfg.d_model;
        let rows = xs.len() / d;
        if rows == 0 {
            return;
        }
        // The unsafe kernels below trust the cache's shape: it must come from this body's
        // configuration (`Body::new_cache` / `KvCache::new` with the same `d_model` and layer
        // count). A mismatched cache is a caller bug; refuse it loudly rather than read out of
        // bounds.
        assert!(
            cache.d == d
                && cache.k.len() == self.blocks.len()
                && cache.v.len() == self.blocks.len()
                && cache
                    .k
                    .iter()
                    .chain(&cache.v)
                    .all(|t| t.len() == cache.len * d),
            "KvCache does not match this transformer body (d_model {d}, {} layers)",
            self.blocks.len()
        );
        let xs = &mut xs[..rows * d];
        let total = cache.len + rows;
        let sc = &mut cache.scratch;
        ensure(&mut sc.a, rows * d);
        ensure(&mut sc.qkv, rows * 3 * d);
        ensure(&mut sc.o, rows * d);
        ensure(&mut sc.proj, rows * d);
        ensure(&mut sc.hidden, rows * self.cfg.d_ff);
        ensure(&mut sc.scores, fast::ATT_ROWS * total);
        for (k, v) in cache.k.iter_mut().zip(cache.v.iter_mut()) {
            k.reserve((total * d).saturating_sub(k.len()));
            v.reserve((total * d).saturating_sub(v.len()));
        }
        #[cfg(target_arch = "x86_64")]
        if super::kernels::simd::avx_enabled() {
            // SAFETY: the buffers were sized just above; the CPU has AVX (checked at run time).
            unsafe { forward_avx(self, xs, cache, mask) };
            return;
        }
        // SAFETY: the buffers were sized just above.
        unsafe { forward_lanes::<super::lanes::Portable>(self, xs, cache, mask) };
    }

    /// The definition of [`Self::forward`], one operation at a time.
    fn forward_reference(&self, kernel: Kernel, xs: &mut [f32], cache: &mut KvCache, mask: Mask) {
        let d = self.cfg.d_model;
        let f = self.cfg.d_ff;
        let rows = xs.len() / d;
        if rows == 0 {
            return;
        }
        let base = cache.len;
        let total = base + rows;
        let nh = self.cfg.n_heads;
        let hd = self.cfg.head_dim();
        let scale = 1.0 / (hd as f32).sqrt();
        let mut a = vec![0.0f32; rows * d];
        let mut qkv = vec![0.0f32; rows * 3 * d];
        let mut o = vec![0.0f32; rows * d];
        let mut proj = vec![0.0f32; rows * d];
        let mut hidden = vec![0.0f32; rows * f];
        let mut scores = vec![0.0f32; total];
        for (li, b) in self.blocks.iter().enumerate() {
            for r in 0..rows {
                rms_norm(
                    &xs[r * d..(r + 1) * d],
                    &b.norm1,
                    &mut a[r * d..(r + 1) * d],
                );
            }
            linear_rows(
                kernel,
                &a,
                rows,
                d,
                &b.qkv_w,
                Some(&b.qkv_b),
                3 * d,
                &mut qkv,
            );
            let kc = &mut cache.k[li];
            let vc = &mut cache.v[li];
            kc.truncate(base * d);
            vc.truncate(base * d);
            for r in 0..rows {
                let row = &qkv[r * 3 * d..(r + 1) * 3 * d];
                kc.extend_from_slice(&row[d..2 * d]);
                vc.extend_from_slice(&row[2 * d..3 * d]);
            }
            for r in 0..rows {
                let visible = match mask {
                    Mask::Causal => base + r + 1,
                    Mask::Full => total,
                };
                let q = &qkv[r * 3 * d..r * 3 * d + d];
                let out = &mut o[r * d..(r + 1) * d];
                for h in 0..nh {
                    let qh = &q[h * hd..(h + 1) * hd];
                    let s = &mut scores[..visible];
                    for (j, sj) in s.iter_mut().enumerate() {
                        let kj = &kc[j * d + h * hd..j * d + (h + 1) * hd];
                        *sj = dot_with(kernel, qh, kj) * scale;
                    }
                    softmax_in_place(s);
                    let oh = &mut out[h * hd..(h + 1) * hd];
                    oh.fill(0.0);
                    for (j, &p) in s.iter().enumerate() {
                        let vj = &vc[j * d + h * hd..j * d + (h + 1) * hd];
                        for (oe, &ve) in oh.iter_mut().zip(vj) {
                            *oe += p * ve;
                        }
                    }
                }
            }
            linear_rows(kernel, &o, rows, d, &b.out_w, Some(&b.out_b), d, &mut proj);
            for (x, p) in xs.iter_mut().zip(&proj) {
                *x += *p;
            }
            for r in 0..rows {
                rms_norm(
                    &xs[r * d..(r + 1) * d],
                    &b.norm2,
                    &mut a[r * d..(r + 1) * d],
                );
            }
            linear_rows(
                kernel,
                &a,
                rows,
                d,
                &b.fc1_w,
                Some(&b.fc1_b),
                f,
                &mut hidden,
            );
            for v in hidden.iter_mut() {
                *v = silu(*v);
            }
            linear_rows(
                kernel,
                &hidden,
                rows,
                f,
                &b.fc2_w,
                Some(&b.fc2_b),
                d,
                &mut proj,
            );
            for (x, p) in xs.iter_mut().zip(&proj) {
                *x += *p;
            }
        }
        cache.len = total;
        for r in 0..rows {
            let x = xs[r * d..(r + 1) * d].to_vec();
            rms_norm(&x, &self.norm_f, &mut xs[r * d..(r + 1) * d]);
        }
    }
}

/// [`forward_lanes`] compiled with AVX.
///
/// # Safety
/// As [`forward_lanes`]; the CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn forward_avx(body: &Body, xs: &mut [f32], cache: &mut KvCache, mask: Mask) {
    forward_lanes::<super::lanes::Avx>(body, xs, cache, mask)
}

/// The fast forward pass over `xs` (exactly `rows × d_model`): [`Body::forward`]'s operations with
/// the blocked kernels of [`fast`].
///
/// # Safety
/// `cache`'s work buffers must hold the sizes [`Body::forward_fast`] gives them; `V` must be usable
/// on this CPU.
#[inline(always)]
unsafe fn forward_lanes<V: V8>(body: &Body, xs: &mut [f32], cache: &mut KvCache, mask: Mask) {
    let cfg = &body.cfg;
    let (d, f) = (cfg.d_model, cfg.d_ff);
    let rows = xs.len() / d;
    let base = cache.len;
    let total = base + rows;
    let sh = AttnShape {
        rows,
        base,
        total,
        nh: cfg.n_heads,
        hd: cfg.head_dim(),
        causal: mask == Mask::Causal,
    };
    let x = xs.as_mut_ptr();
    let sc = &mut cache.scratch;
    let (a, qkv, o) = (sc.a.as_mut_ptr(), sc.qkv.as_mut_ptr(), sc.o.as_mut_ptr());
    let (proj, hidden) = (sc.proj.as_mut_ptr(), sc.hidden.as_mut_ptr());
    let scores = sc.scores.as_mut_ptr();
    for (li, b) in body.blocks.iter().enumerate() {
        for r in 0..rows {
            fast::rms_norm::<V>(x.add(r * d), b.norm1.as_ptr(), a.add(r * d), d);
        }
        let qb = Some(b.qkv_b.as_ptr());
        if rows == 1 {
            fast::matvec::<V>(a, &b.qkv_p, b.qkv_w.as_ptr(), 3 * d, d, qb, qkv);
        } else {
            fast::gemm::<V>(a, d, rows, b.qkv_w.as_ptr(), d, 3 * d, d, qb, qkv, 3 * d);
        }
        let kc = &mut cache.k[li];
        let vc = &mut cache.v[li];
        kc.truncate(base * d);
        vc.truncate(base * d);
        let qkv_rows = std::slice::from_raw_parts(qkv, rows * 3 * d);
        for row in qkv_rows.chunks_exact(3 * d) {
            kc.extend_from_slice(&row[d..2 * d]);
            vc.extend_from_slice(&row[2 * d..]);
        }
        fast::attention::<V>(sh, qkv, kc.as_ptr(), vc.as_ptr(), o, scores);
        let ob = Some(b.out_b.as_ptr());
        if rows == 1 {
            fast::matvec::<V>(o, &b.out_p, b.out_w.as_ptr(), d, d, ob, proj);
        } else {
            fast::gemm::<V>(o, d, rows, b.out_w.as_ptr(), d, d, d, ob, proj, d);
        }
        fast::add_assign::<V>(x, proj, rows * d);
        for r in 0..rows {
            fast::rms_norm::<V>(x.add(r * d), b.norm2.as_ptr(), a.add(r * d), d);
        }
        let f1 = Some(b.fc1_b.as_ptr());
        if rows == 1 {
            fast::matvec::<V>(a, &b.fc1_p, b.fc1_w.as_ptr(), f, d, f1, hidden);
        } else {
            fast::gemm::<V>(a, d, rows, b.fc1_w.as_ptr(), d, f, d, f1, hidden, f);
        }
        fast::silu::<V>(hidden, rows * f);
        let f2 = Some(b.fc2_b.as_ptr());
        if rows == 1 {
            fast::matvec::<V>(hidden, &b.fc2_p, b.fc2_w.as_ptr(), d, f, f2, proj);
        } else {
            fast::gemm::<V>(hidden, f, rows, b.fc2_w.as_ptr(), f, d, f, f2, proj, d);
        }
        fast::add_assign::<V>(x, proj, rows * d);
    }
    cache.len = total;
    for r in 0..rows {
        // In place: every element is read before it is written.
        fast::rms_norm::<V>(x.add(r * d), body.norm_f.as_ptr(), x.add(r * d), d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(d_model: usize, n_heads: usize, d_ff: usize) -> Body {
        let cfg = BodyConfig {
            d_model,
            n_layers: 2,
            n_heads,
            d_ff,
        };
        let mut w = Weights::synthetic(&cfg.tensor_shapes(), 21, 1.0);
        Body::from_weights(&cfg, &mut w).unwrap()
    }

    fn input(rows: usize, d: usize) -> Vec<f32> {
        crate::nn::fast::tests::data(rows * d, 99 + d as u64)
            .iter()
            .map(|v| v * 4.0)
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Runs the fast pass with the portable lanes, bypassing the AVX dispatch.
    fn forward_portable(b: &Body, xs: &mut [f32], cache: &mut KvCache, mask: Mask) {
        let rows = xs.len() / b.cfg.d_model;
        let total = cache.len + rows;
        let d = b.cfg.d_model;
        let sc = &mut cache.scratch;
        ensure(&mut sc.a, rows * d);
        ensure(&mut sc.qkv, rows * 3 * d);
        ensure(&mut sc.o, rows * d);
        ensure(&mut sc.proj, rows * d);
        ensure(&mut sc.hidden, rows * b.cfg.d_ff);
        ensure(&mut sc.scores, fast::ATT_ROWS * total);
        // SAFETY: buffers sized above; portable lanes run anywhere.
        unsafe { forward_lanes::<crate::nn::lanes::Portable>(b, xs, cache, mask) };
    }

    /// Blocked and vectorised (AVX where present, and portable) equal the one-operation-at-a-time
    /// definition bit for bit, for odd shapes: a head width of 40 (one block of 32 lanes and a
    /// partial vector), row counts that leave partial attention and register blocks, both masks,
    /// and a cache that already holds positions.
    #[test]
    fn fast_forward_equals_reference_bitwise() {
        // One row (a decoding step) runs the heads two at a time: even and odd head counts,
        // and more heads than that path takes (5).
        for (d, nh, ff) in [(80, 2, 96), (24, 3, 40), (128, 4, 384), (40, 5, 48)] {
            let b = body(d, nh, ff);
            for (rows, mask) in [
                (11, Mask::Causal),
                (7, Mask::Full),
                (1, Mask::Causal),
                (1, Mask::Full),
            ] {
                let x0 = input(rows, d);
                let prefix = input(5, d + 1)[..5 * d].to_vec();
                let run = |kernel: Option<Kernel>| {
                    let mut cache = KvCache::new(&b.cfg);
                    let mut p = prefix.clone();
                    let mut x = x0.clone();
                    match kernel {
                        Some(k) => {
                            b.forward(k, &mut p, &mut cache, Mask::Causal);
                            b.forward(k, &mut x, &mut cache, mask);
                        }
                        None => {
                            forward_portable(&b, &mut p, &mut cache, Mask::Causal);
                            forward_portable(&b, &mut x, &mut cache, mask);
                        }
                    }
                    (bits(&p), bits(&x), bits(&cache.k[1]), bits(&cache.v[1]))
                };
                let want = run(Some(Kernel::Scalar));
                assert_eq!(run(Some(Kernel::Lanes)), want, "{d} {nh} {rows} {mask:?}");
                assert_eq!(run(None), want, "portable {d} {nh} {rows} {mask:?}");
            }
        }
    }

    /// Position by position with the cache equals one causal pass over all rows.
    #[test]
    fn incremental_equals_batched_bitwise() {
        let b = body(80, 2, 96);
        let rows = 9;
        let x0 = input(rows, 80);
        let mut all = x0.clone();
        b.forward(
            Kernel::Lanes,
            &mut all,
            &mut KvCache::new(&b.cfg),
            Mask::Causal,
        );
        let mut cache = KvCache::new(&b.cfg);
        for r in 0..rows {
            let mut x = x0[r * 80..(r + 1) * 80].to_vec();
            b.forward(Kernel::Lanes, &mut x, &mut cache, Mask::Causal);
            assert_eq!(bits(&x), bits(&all[r * 80..(r + 1) * 80]), "row {r}");
        }
    }
}

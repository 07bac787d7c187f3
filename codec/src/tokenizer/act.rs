//! Activations of the CPU forward passes ([`Act`]), a per-thread pool that recycles their buffers
//! within one call ([`PoolScope`]), and the element-wise layers of TAEF2 and its quantizer.
//!
//! TAEF2's activations are large (64 channels at full resolution: 180 MB for a 1024×683 photo),
//! and a fresh allocation of that size is a fresh `mmap` whose every page faults on first touch:
//! on candle tensors, where every layer allocates its output, that cost about a quarter of a
//! 1024-pixel encode (kernel time, measured with `time`). Here layers take their input by value, work in place where they can, and
//! hand dead buffers back to a small per-thread pool that the next layer draws from. The pool lives
//! as long as the outermost [`PoolScope`] of its thread (one tokenizer call), so nothing is held
//! between calls.

use std::cell::RefCell;

use candle_core::{Device, Result, Tensor};

use rayon::prelude::*;

use super::conv::matmul;

/// Buffers the pool keeps at most; the smallest goes when a buffer beyond this comes back.
const POOL_MAX: usize = 8;

#[derive(Default)]
struct Pool {
    free: Vec<Vec<f32>>,
    /// Nesting depth of live [`PoolScope`]s; buffers are pooled only while it is non-zero.
    depth: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::default();
}

/// While a value of this type lives, buffers given back on this thread are kept for reuse; when
/// the outermost one drops, the pool is emptied.
pub(crate) struct PoolScope(());

impl PoolScope {
    /// Opens a scope (nested scopes are fine).
    pub(crate) fn new() -> Self {
        POOL.with(|p| p.borrow_mut().depth += 1);
        Self(())
    }
}

impl Drop for PoolScope {
    fn drop(&mut self) {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            p.depth -= 1;
            if p.depth == 0 {
                p.free = Vec::new();
            }
        });
    }
}

/// An empty vector with capacity for at least `n` values: the smallest pooled buffer that fits,
/// or a new one.
pub(crate) fn take(n: usize) -> Vec<f32> {
    let mut v = pooled(n);
    v.clear();
    v
}

/// `n` values whose contents are unspecified (left over from the buffer's last use, zeros where
/// it grows): for outputs that are written in full. Skips the zeroing of [`zeros`], a pass over
/// memory as large as the output (hundreds of megabytes for a photo's full-size layers).
pub(crate) fn dirty(n: usize) -> Vec<f32> {
    let mut v = pooled(n);
    if v.len() >= n {
        v.truncate(n);
    } else if n - v.len() < PAR_ZERO {
        v.resize(n, 0.0);
    } else {
        // A fresh buffer's first touch page-faults: zero it on every thread, not one.
        let old = v.len();
        v.spare_capacity_mut()[..n - old]
            .par_chunks_mut(PAR_ZERO / 4)
            .for_each(|c| {
                for x in c {
                    x.write(0.0);
                }
            });
        // SAFETY: the capacity is at least `n` (`pooled`), and the `n − old` values after the
        // first `old` were all written just above.
        unsafe { v.set_len(n) };
    }
    v
}

/// Growth (in values) from which [`dirty`] zeroes a buffer on several threads.
const PAR_ZERO: usize = 1 << 20;

/// The smallest pooled buffer with capacity for `n` values (its old length and contents kept),
/// or a new empty one.
fn pooled(n: usize) -> Vec<f32> {
    let reused = POOL.with(|p| {
        let mut p = p.borrow_mut();
        let best = p
            .free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= n)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        best.map(|i| p.free.swap_remove(i))
    });
    reused.unwrap_or_else(|| Vec::with_capacity(n))
}

/// `n` zeros in a pooled or new buffer.
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    let mut v = take(n);
    v.resize(n, 0.0);
    v
}

/// Hands a dead buffer back to the pool (dropped when no scope is open).
pub(crate) fn give(v: Vec<f32>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.depth == 0 || v.capacity() == 0 {
            return;
        }
        p.free.push(v);
        if p.free.len() > POOL_MAX {
            let smallest = p
                .free
                .iter()
                .enumerate()
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
                .unwrap_or(0);
            p.free.swap_remove(smallest);
        }
    });
}

/// One image's activations: `c` planes of `h × w` values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Act {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

impl Act {
    /// Wraps `data` (`c·h·w` values).
    ///
    /// # Panics
    /// If the length does not match.
    pub(crate) fn new(c: usize, h: usize, w: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), c * h * w, "activation length");
        Self { c, h, w, data }
    }

    /// The images of a `[B, C, H, W]` f32 tensor.
    pub(crate) fn from_tensor(x: &Tensor) -> Result<Vec<Self>> {
        let (b, c, h, w) = x.dims4()?;
        let flat = x.flatten_all()?.to_vec1::<f32>()?;
        Ok(flat
            .chunks_exact((c * h * w).max(1))
            .take(b)
            .map(|d| Self::new(c, h, w, d.to_vec()))
            .collect())
    }

    /// Stacks same-shaped images into a `[B, C, H, W]` tensor.
    pub(crate) fn to_tensor(items: Vec<Self>, device: &Device) -> Result<Tensor> {
        let Some(first) = items.first() else {
            candle_core::bail!("no images");
        };
        let (c, h, w) = (first.c, first.h, first.w);
        let b = items.len();
        let mut data = Vec::with_capacity(b * c * h * w);
        for a in items {
            if (a.c, a.h, a.w) != (c, h, w) {
                candle_core::bail!("images of different shapes");
            }
            data.extend_from_slice(&a.data);
        }
        Tensor::from_vec(data, (b, c, h, w), device)
    }

    /// Gives the buffer back to the pool.
    pub(crate) fn recycle(self) {
        give(self.data);
    }

    /// `max(x, 0)` in place.
    pub(crate) fn relu(mut self) -> Self {
        self.data.iter_mut().for_each(|v| *v = v.max(0.0));
        self
    }

    /// `tanh(x / 3) · 3` in place.
    pub(crate) fn clamp3(mut self) -> Self {
        self.data
            .iter_mut()
            .for_each(|v| *v = (*v / 3.0).tanh() * 3.0);
        self
    }

    /// `x · sigmoid(x)` in place.
    pub(crate) fn silu(mut self) -> Self {
        self.data.iter_mut().for_each(|v| *v = silu(*v));
        self
    }

    /// `x · sigmoid(x)` into a new buffer (the input stays).
    pub(crate) fn silu_of(&self) -> Self {
        let mut d = take(self.data.len());
        d.extend(self.data.iter().map(|&v| silu(v)));
        Self::new(self.c, self.h, self.w, d)
    }

    /// `self + other` in place.
    ///
    /// # Panics
    /// If the shapes differ.
    pub(crate) fn add(mut self, other: &Self) -> Self {
        assert_eq!(
            (self.c, self.h, self.w),
            (other.c, other.h, other.w),
            "add: shapes"
        );
        for (a, b) in self.data.iter_mut().zip(&other.data) {
            *a += b;
        }
        self
    }

    /// Nearest-neighbour 2× upsampling.
    pub(crate) fn up2(&self) -> Self {
        let (h, w) = (self.h, self.w);
        if h * w == 0 {
            return Self::new(self.c, 2 * h, 2 * w, Vec::new());
        }
        // Written in full below.
        let mut d = dirty(self.c * 4 * h * w);
        d.par_chunks_exact_mut(4 * h * w)
            .zip(self.data.par_chunks_exact(h * w))
            .for_each(|(dst, src)| {
                for (row, pair) in src.chunks_exact(w).zip(dst.chunks_exact_mut(4 * w)) {
                    let (top, bottom) = pair.split_at_mut(2 * w);
                    for (o, &v) in top.chunks_exact_mut(2).zip(row) {
                        o.fill(v);
                    }
                    bottom.copy_from_slice(top);
                }
            });
        Self::new(self.c, 2 * h, 2 * w, d)
    }

    /// PyTorch's `GroupNorm(groups, c, eps)` with per-channel `weight` and `bias`, in place:
    /// each group of `c / groups` channels is normalised by its mean and biased variance
    /// (accumulated in f64).
    ///
    /// # Panics
    /// If `groups` does not divide `c` or the affine vectors are not `c` long.
    pub(crate) fn group_norm(
        mut self,
        groups: usize,
        eps: f64,
        weight: &[f32],
        bias: &[f32],
    ) -> Self {
        let (c, hw) = (self.c, self.h * self.w);
        assert!(
            groups > 0 && c % groups == 0,
            "group norm: {c} channels, {groups} groups"
        );
        assert!(
            weight.len() == c && bias.len() == c,
            "group norm: affine length"
        );
        let per = c / groups;
        if hw == 0 {
            return self;
        }
        for (g, chunk) in self.data.chunks_exact_mut(per * hw).enumerate() {
            let n = chunk.len() as f64;
            let mean = chunk.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = chunk
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n;
            let inv = 1.0 / (var + eps).sqrt();
            for (j, plane) in chunk.chunks_exact_mut(hw).enumerate() {
                let ch = g * per + j;
                let a = (inv * f64::from(weight[ch])) as f32;
                let b = (f64::from(bias[ch]) - mean * inv * f64::from(weight[ch])) as f32;
                plane.iter_mut().for_each(|v| *v = *v * a + b);
            }
        }
        self
    }
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// A 1×1 convolution: `out[o] = bias[o] + Σᵢ w[o][i] · x[i]` per pixel (one GEMM).
#[derive(Debug, Clone)]
pub(crate) struct Conv1 {
    cin: usize,
    cout: usize,
    /// `[cout][cin]`.
    w: Vec<f32>,
    /// `[cout]`, or empty.
    bias: Vec<f32>,
}

impl Conv1 {
    /// From PyTorch's `[cout, cin, 1, 1]` weight (row-major) and an optional bias.
    ///
    /// # Panics
    /// If the lengths do not match.
    pub(crate) fn new(cin: usize, cout: usize, w: &[f32], bias: Option<&[f32]>) -> Self {
        assert_eq!(w.len(), cin * cout, "1x1 conv weight length");
        let bias = bias.map_or_else(Vec::new, |b| {
            assert_eq!(b.len(), cout, "1x1 conv bias length");
            b.to_vec()
        });
        Self {
            cin,
            cout,
            w: w.to_vec(),
            bias,
        }
    }

    /// Input channels.
    pub(crate) fn cin(&self) -> usize {
        self.cin
    }

    /// Applies the convolution.
    ///
    /// # Panics
    /// If `x.c != cin`.
    pub(crate) fn forward(&self, x: &Act) -> Act {
        assert_eq!(x.c, self.cin, "1x1 conv input channels");
        let n = x.h * x.w;
        // Written in full by the product (which does not read it).
        let mut out = dirty(self.cout * n);
        if n > 0 {
            matmul(
                (self.cout, n, self.cin),
                &mut out,
                false,
                &self.w,
                &x.data,
                n,
            );
        }
        if !self.bias.is_empty() {
            for (plane, &b) in out.chunks_exact_mut(n.max(1)).zip(&self.bias) {
                plane.iter_mut().for_each(|v| *v += b);
            }
        }
        Act::new(self.cout, x.h, x.w, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn act(c: usize, h: usize, w: usize) -> Act {
        Act::new(
            c,
            h,
            w,
            (0..c * h * w)
                .map(|i| ((i * 37) % 101) as f32 / 25.0 - 2.0)
                .collect(),
        )
    }

    #[test]
    fn ops_match_candle() {
        let dev = Device::Cpu;
        let a = act(8, 5, 3);
        let t = Act::to_tensor(vec![a.clone()], &dev).unwrap();
        let close = |got: &Act, want: &Tensor| {
            let w = Act::from_tensor(want).unwrap().remove(0);
            assert_eq!((got.c, got.h, got.w), (w.c, w.h, w.w));
            for (x, y) in got.data.iter().zip(&w.data) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
            }
        };
        close(&a.clone().relu(), &t.relu().unwrap());
        close(&a.silu_of(), &t.silu().unwrap());
        close(&a.clone().silu(), &t.silu().unwrap());
        close(
            &a.clone().clamp3(),
            &((&t / 3.0).unwrap().tanh().unwrap() * 3.0).unwrap(),
        );
        close(&a.up2(), &t.upsample_nearest2d(10, 6).unwrap());
        close(&a.clone().add(&a), &(&t + &t).unwrap());
        let wgt: Vec<f32> = (0..8).map(|i| 0.5 + i as f32 * 0.1).collect();
        let bias: Vec<f32> = (0..8).map(|i| i as f32 * 0.2 - 0.5).collect();
        let vb = candle_nn::VarBuilder::from_tensors(
            [
                ("weight".to_string(), Tensor::new(&wgt[..], &dev).unwrap()),
                ("bias".to_string(), Tensor::new(&bias[..], &dev).unwrap()),
            ]
            .into_iter()
            .collect(),
            candle_core::DType::F32,
            &dev,
        );
        let gn = candle_nn::group_norm(4, 8, 1e-5, vb).unwrap();
        close(
            &a.clone().group_norm(4, 1e-5, &wgt, &bias),
            &candle_core::Module::forward(&gn, &t).unwrap(),
        );
        let w1: Vec<f32> = (0..3 * 8).map(|i| (i % 5) as f32 * 0.3 - 0.6).collect();
        let c1 = Conv1::new(8, 3, &w1, Some(&[0.1, -0.2, 0.3]));
        let wt = Tensor::from_vec(w1, (3, 8, 1, 1), &dev).unwrap();
        let want = t
            .conv2d(&wt, 0, 1, 1, 1)
            .unwrap()
            .broadcast_add(
                &Tensor::new(&[0.1f32, -0.2, 0.3], &dev)
                    .unwrap()
                    .reshape((1, 3, 1, 1))
                    .unwrap(),
            )
            .unwrap();
        close(&c1.forward(&a), &want);
    }

    #[test]
    fn the_pool_reuses_buffers_only_inside_a_scope() {
        give(vec![0.0; 16]);
        assert!(take(16).capacity() >= 16);
        let scope = PoolScope::new();
        let v = zeros(1000);
        let p = v.as_ptr();
        give(v);
        let again = take(900);
        assert_eq!(again.as_ptr(), p, "a pooled buffer is reused");
        assert!(again.is_empty());
        give(again);
        drop(scope);
        POOL.with(|p| {
            assert!(
                p.borrow().free.is_empty(),
                "the pool empties with its scope"
            )
        });
    }

    #[test]
    fn dirty_buffers_have_the_asked_length_and_fresh_parts_are_zero() {
        let _scope = PoolScope::new();
        // Fresh, large enough for the parallel zeroing.
        let big = dirty(3 * PAR_ZERO + 5);
        assert_eq!(big.len(), 3 * PAR_ZERO + 5);
        assert!(big.iter().all(|&v| v == 0.0));
        drop(big);
        // Reused smaller: the old contents may stay (they are not read), the length is exact.
        let mut v = dirty(10);
        v.fill(7.0);
        let p = v.as_ptr();
        give(v);
        let w = dirty(6);
        assert_eq!(
            (w.as_ptr(), w.len()),
            (p, 6),
            "the pooled buffer, truncated"
        );
        drop(w);
        // A pooled buffer grown past its old length (on several threads): the new part is zero.
        let mut small = Vec::with_capacity(2 * PAR_ZERO + 3);
        small.extend([7.0f32; 6]);
        let p = small.as_ptr();
        give(small);
        let g = dirty(2 * PAR_ZERO + 3);
        assert_eq!((g.as_ptr(), g.len()), (p, 2 * PAR_ZERO + 3));
        assert_eq!(g[..6], [7.0; 6]);
        assert!(g[6..].iter().all(|&v| v == 0.0));
    }
}

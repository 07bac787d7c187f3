//! The blocked, vectorised implementation of the deterministic operations, generic over the lane
//! vector [`V8`]: matrix products with register and cache blocking, attention over a block of
//! rows, RMS norm, SiLU, softmax and the logits-to-weights step.
//!
//! Only the loop blocking differs from the reference definitions in [`super::kernels`],
//! [`super::math`] and [`super::transformer`]: each dot product keeps its eight lanes, summed in
//! increasing index order and combined in the fixed tree; each softmax sum and each attention
//! output stays sequential over the keys; each elementwise function performs the same IEEE-754
//! operations. The results are therefore identical bit for bit, which the tests in this module
//! and in `tests/transformer_determinism.rs` check against the reference implementation
//! ([`super::kernels::Kernel::Scalar`]).
//!
//! The functions take raw pointers and are `unsafe` so that the AVX instantiation can be compiled
//! with `#[target_feature(enable = "avx")]`; the safe entry points check every bound first.

// Register tiles index their accumulators explicitly: the loop shape is the point.
#![allow(clippy::needless_range_loop)]

use super::kernels::LANES;
use super::lanes::V8;
use super::math::{EXP_MAX, EXP_MIN, LN2_HI, LN2_LO, LOG2E, RMS_EPS};
use super::WEIGHT_SCALE;

/// Output features per cache block of [`gemm`] for an input width `d`: enough rows of the weight
/// matrix to fill about 32 KiB, a multiple of four.
#[inline(always)]
fn out_block(d: usize) -> usize {
    ((8192 / d.max(1)) / 4 * 4).max(4)
}

/// One register tile of [`gemm`]: `R` input rows by `O` output features, `R * O` eight-lane
/// accumulators that each see the elements in increasing index order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<V: V8, const R: usize, const O: usize>(
    x: *const f32,
    xs: usize,
    w: *const f32,
    ws: usize,
    d: usize,
    bias: Option<*const f32>,
    y: *mut f32,
    ys: usize,
) {
    let mut acc = [[V::zero(); O]; R];
    let full = d / LANES * LANES;
    let mut k = 0;
    while k < full {
        let mut xv = [V::zero(); R];
        for (r, v) in xv.iter_mut().enumerate() {
            *v = V::load(x.add(r * xs + k));
        }
        for o in 0..O {
            let wv = V::load(w.add(o * ws + k));
            for r in 0..R {
                acc[r][o] = acc[r][o].add(xv[r].mul(wv));
            }
        }
        k += LANES;
    }
    if k < d {
        // The remainder goes to lanes 0..d-k; the other lanes add +0.0, which leaves a lane sum
        // unchanged (a lane sum starts at +0.0 and so is never -0.0).
        let n = d - k;
        let mut xv = [V::zero(); R];
        for (r, v) in xv.iter_mut().enumerate() {
            *v = V::load_part(x.add(r * xs + k), n);
        }
        for o in 0..O {
            let wv = V::load_part(w.add(o * ws + k), n);
            for r in 0..R {
                acc[r][o] = acc[r][o].add(xv[r].mul(wv));
            }
        }
    }
    for (r, ar) in acc.iter().enumerate() {
        let yr = y.add(r * ys);
        let mut o = 0;
        while o + 4 <= O {
            let s = V::combine4(ar[o], ar[o + 1], ar[o + 2], ar[o + 3]);
            for (i, &v) in s.iter().enumerate() {
                *yr.add(o + i) = match bias {
                    Some(b) => v + *b.add(o + i),
                    None => v,
                };
            }
            o += 4;
        }
        while o < O {
            let v = ar[o].combine1();
            *yr.add(o) = match bias {
                Some(b) => v + *b.add(o),
                None => v,
            };
            o += 1;
        }
    }
}

/// `y[r*ys + o] = dot(x[r*xs ..][..d], w[o*ws ..][..d]) (+ bias[o])` for `r < rows`, `o < n_out`,
/// with [`super::kernels::dot`]'s lane order. `d` must be at least 1.
///
/// # Safety
/// Every row read and written must be in bounds; `V` must be usable on this CPU.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<V: V8>(
    x: *const f32,
    xs: usize,
    rows: usize,
    w: *const f32,
    ws: usize,
    n_out: usize,
    d: usize,
    bias: Option<*const f32>,
    y: *mut f32,
    ys: usize,
) {
    let b = |o: usize| bias.map(|p| p.add(o));
    if rows == 1 {
        let mut o = 0;
        while o + 8 <= n_out {
            tile::<V, 1, 8>(x, xs, w.add(o * ws), ws, d, b(o), y.add(o), ys);
            o += 8;
        }
        while o + 4 <= n_out {
            tile::<V, 1, 4>(x, xs, w.add(o * ws), ws, d, b(o), y.add(o), ys);
            o += 4;
        }
        while o < n_out {
            tile::<V, 1, 1>(x, xs, w.add(o * ws), ws, d, b(o), y.add(o), ys);
            o += 1;
        }
        return;
    }
    let ob = out_block(d);
    let mut o0 = 0;
    while o0 < n_out {
        let o1 = (o0 + ob).min(n_out);
        let mut r = 0;
        while r < rows {
            let xr = x.add(r * xs);
            let yr = y.add(r * ys);
            let mut o = o0;
            if V::PAIR_ROWS && r + 2 <= rows {
                while o + 4 <= o1 {
                    tile::<V, 2, 4>(xr, xs, w.add(o * ws), ws, d, b(o), yr.add(o), ys);
                    o += 4;
                }
                while o < o1 {
                    tile::<V, 2, 1>(xr, xs, w.add(o * ws), ws, d, b(o), yr.add(o), ys);
                    o += 1;
                }
                r += 2;
            } else {
                while o + 4 <= o1 {
                    tile::<V, 1, 4>(xr, xs, w.add(o * ws), ws, d, b(o), yr.add(o), ys);
                    o += 4;
                }
                while o < o1 {
                    tile::<V, 1, 1>(xr, xs, w.add(o * ws), ws, d, b(o), yr.add(o), ys);
                    o += 1;
                }
                r += 1;
            }
        }
        o0 = o1;
    }
}

/// Output rows per panel of [`Panels`].
const PANEL: usize = 8;

/// A weight matrix (`n_out × d`, row-major) re-laid for the one-row product [`matvec`]: for each
/// group of [`PANEL`] output rows, the first eight columns of each of the eight rows, then the
/// next eight columns of each, and so on (the last columns zero-padded to eight). The product then
/// reads memory strictly in order. Rows past the last full group stay in the row-major matrix.
#[derive(Debug, Clone, Default)]
pub(crate) struct Panels {
    data: Vec<f32>,
    groups: usize,
    chunks: usize,
}

impl Panels {
    /// Re-lays `w` (`n_out × d`, row-major).
    pub(crate) fn new(w: &[f32], n_out: usize, d: usize) -> Self {
        let groups = if d == 0 || w.len() < n_out * d {
            0
        } else {
            n_out / PANEL
        };
        let chunks = d.div_ceil(LANES);
        let mut data = vec![0.0f32; groups * chunks * PANEL * LANES];
        for g in 0..groups {
            for c in 0..chunks {
                for r in 0..PANEL {
                    let row = &w[(g * PANEL + r) * d..(g * PANEL + r + 1) * d];
                    let src = &row[c * LANES..((c + 1) * LANES).min(d)];
                    let at = ((g * chunks + c) * PANEL + r) * LANES;
                    data[at..at + src.len()].copy_from_slice(src);
                }
            }
        }
        Self {
            data,
            groups,
            chunks,
        }
    }
}

/// The eight-lane sums of rows `r0..r0 + N` of the panel at `pg` with `x[..d]`.
#[inline(always)]
unsafe fn panel_rows<V: V8, const N: usize>(
    x: *const f32,
    pg: *const f32,
    chunks: usize,
    d: usize,
    r0: usize,
) -> [V; N] {
    let full = d / LANES;
    let mut acc = [V::zero(); N];
    for c in 0..chunks {
        let xv = if c < full {
            V::load(x.add(c * LANES))
        } else {
            V::load_part(x.add(c * LANES), d - c * LANES)
        };
        let pc = pg.add((c * PANEL + r0) * LANES);
        for r in 0..N {
            acc[r] = acc[r].add(xv.mul(V::load(pc.add(r * LANES))));
        }
    }
    acc
}

/// Combines four accumulators into `y[o..o + 4]`, adding `bias[o..o + 4]` if given.
#[inline(always)]
unsafe fn store4<V: V8>(a: V, b: V, c: V, d: V, bias: Option<*const f32>, y: *mut f32, o: usize) {
    for (i, v) in V::combine4(a, b, c, d).into_iter().enumerate() {
        *y.add(o + i) = match bias {
            Some(b) => v + *b.add(o + i),
            None => v,
        };
    }
}

/// `y[o] = dot(x[..d], w[o]) (+ bias[o])` for `o < n_out`, one input row: [`gemm`] with
/// `rows = 1`, reading the full groups of eight output rows from `p` (the [`Panels`] of `w`,
/// built with the same `n_out` and `d`) and the rest from `w`. The same eight-lane sums as
/// [`gemm`]: zero-padded columns add `+0.0` to a lane, which leaves it unchanged.
///
/// # Safety
/// `x` holds `d`, `w` `n_out * d`, `y` `n_out` floats, `bias` `n_out` if given; `V` must be
/// usable on this CPU.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matvec<V: V8>(
    x: *const f32,
    p: &Panels,
    w: *const f32,
    n_out: usize,
    d: usize,
    bias: Option<*const f32>,
    y: *mut f32,
) {
    let chunks = p.chunks;
    let group = chunks * PANEL * LANES;
    for g in 0..p.groups {
        let pg = p.data.as_ptr().add(g * group);
        let o = g * PANEL;
        if V::PAIR_ROWS {
            let acc = panel_rows::<V, 8>(x, pg, chunks, d, 0);
            store4::<V>(acc[0], acc[1], acc[2], acc[3], bias, y, o);
            store4::<V>(acc[4], acc[5], acc[6], acc[7], bias, y, o + 4);
        } else {
            // Four accumulators at a time where registers are few.
            for half in [0, 4] {
                let acc = panel_rows::<V, 4>(x, pg, chunks, d, half);
                store4::<V>(acc[0], acc[1], acc[2], acc[3], bias, y, o + half);
            }
        }
    }
    let o = p.groups * PANEL;
    if o < n_out {
        gemm::<V>(
            x,
            d,
            1,
            w.add(o * d),
            d,
            n_out - o,
            d,
            bias.map(|b| b.add(o)),
            y.add(o),
            n_out - o,
        );
    }
}

/// Checks the bounds of a [`gemm`] call on slices.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_fits(
    x: &[f32],
    xs: usize,
    rows: usize,
    w: &[f32],
    ws: usize,
    n_out: usize,
    d: usize,
    bias: Option<&[f32]>,
    y: &[f32],
    ys: usize,
) -> bool {
    let fits = |len: usize, n: usize, stride: usize, width: usize| {
        n == 0 || ((stride >= width || n == 1) && len >= (n - 1) * stride + width)
    };
    d > 0
        && fits(x.len(), rows, xs, d)
        && fits(w.len(), n_out, ws, d)
        && fits(y.len(), rows, ys, n_out)
        && bias.is_none_or(|b| b.len() >= n_out)
}

/// [`gemm`] on slices (rows of `d_in` packed, outputs packed), with the lanes this CPU runs best:
/// the fast path of [`super::kernels::linear_rows`]. Panics if the slices are too short (a caller
/// bug, never input-dependent).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_rows(
    xs: &[f32],
    rows: usize,
    d_in: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    d_out: usize,
    ys: &mut [f32],
) {
    assert!(gemm_fits(
        xs, d_in, rows, w, d_in, d_out, d_in, bias, ys, d_out
    ));
    let (x, wp, b, y) = (
        xs.as_ptr(),
        w.as_ptr(),
        bias.map(|b| b.as_ptr()),
        ys.as_mut_ptr(),
    );
    #[cfg(target_arch = "x86_64")]
    if super::kernels::simd::avx_enabled() {
        // SAFETY: bounds checked above; the CPU has AVX (checked at run time).
        unsafe { gemm_avx(x, d_in, rows, wp, d_in, d_out, d_in, b, y, d_out) };
        return;
    }
    // SAFETY: bounds checked above.
    unsafe { gemm::<super::lanes::Portable>(x, d_in, rows, wp, d_in, d_out, d_in, b, y, d_out) };
}

/// [`gemm`] compiled with AVX.
///
/// # Safety
/// As [`gemm`]; the CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_avx(
    x: *const f32,
    xs: usize,
    rows: usize,
    w: *const f32,
    ws: usize,
    n_out: usize,
    d: usize,
    bias: Option<*const f32>,
    y: *mut f32,
    ys: usize,
) {
    gemm::<super::lanes::Avx>(x, xs, rows, w, ws, n_out, d, bias, y, ys)
}

/// Dot product of `n` elements in the lane order of [`super::kernels::dot`].
#[inline(always)]
unsafe fn dot_v<V: V8>(a: *const f32, b: *const f32, n: usize) -> f32 {
    let mut acc = V::zero();
    let full = n / LANES * LANES;
    let mut k = 0;
    while k < full {
        acc = acc.add(V::load(a.add(k)).mul(V::load(b.add(k))));
        k += LANES;
    }
    if k < n {
        acc = acc.add(V::load_part(a.add(k), n - k).mul(V::load_part(b.add(k), n - k)));
    }
    acc.combine1()
}

/// An elementwise function of eight lanes. (A trait rather than a closure: closures are not
/// compiled with the caller's target features, so an AVX closure would not inline its
/// intrinsics.)
pub(crate) trait Lanewise {
    /// The function.
    unsafe fn apply<V: V8>(&self, v: V) -> V;
}

/// Applies `f` to `x[..n]` eight lanes at a time (the last partial vector through a masked load
/// and store), writing `out[..n]` (which may equal `x`).
#[inline(always)]
unsafe fn map<V: V8, F: Lanewise>(x: *const f32, out: *mut f32, n: usize, f: &F) {
    let full = n / LANES * LANES;
    let mut k = 0;
    while k < full {
        f.apply(V::load(x.add(k))).store(out.add(k));
        k += LANES;
    }
    if k < n {
        f.apply(V::load_part(x.add(k), n - k))
            .store_part(out.add(k), n - k);
    }
}

/// `x * s`.
struct Scale(f32);
impl Lanewise for Scale {
    #[inline(always)]
    unsafe fn apply<V: V8>(&self, v: V) -> V {
        v.mul(V::splat(self.0))
    }
}

/// `x / s`.
struct DivBy(f32);
impl Lanewise for DivBy {
    #[inline(always)]
    unsafe fn apply<V: V8>(&self, v: V) -> V {
        v.div(V::splat(self.0))
    }
}

/// [`super::math::silu`]: `x / (1 + exp(-x))`.
struct Silu;
impl Lanewise for Silu {
    #[inline(always)]
    unsafe fn apply<V: V8>(&self, v: V) -> V {
        v.div(V::splat(1.0).add(exp8(v.neg())))
    }
}

/// `exp(x - m)`.
struct ExpSub(f32);
impl Lanewise for ExpSub {
    #[inline(always)]
    unsafe fn apply<V: V8>(&self, v: V) -> V {
        exp8(v.sub(V::splat(self.0)))
    }
}

/// `exp(x - m) * s`.
struct ExpShift {
    m: f32,
    s: f32,
}
impl Lanewise for ExpShift {
    #[inline(always)]
    unsafe fn apply<V: V8>(&self, v: V) -> V {
        exp8(v.sub(V::splat(self.m))).mul(V::splat(self.s))
    }
}

/// [`super::math::rms_norm`] of `d` elements.
#[inline(always)]
pub(crate) unsafe fn rms_norm<V: V8>(x: *const f32, w: *const f32, out: *mut f32, d: usize) {
    let ms = dot_v::<V>(x, x, d) / d.max(1) as f32;
    let inv = V::splat(1.0 / (ms + RMS_EPS).sqrt());
    let full = d / LANES * LANES;
    let mut k = 0;
    while k < full {
        V::load(x.add(k))
            .mul(inv)
            .mul(V::load(w.add(k)))
            .store(out.add(k));
        k += LANES;
    }
    if k < d {
        let n = d - k;
        V::load_part(x.add(k), n)
            .mul(inv)
            .mul(V::load_part(w.add(k), n))
            .store_part(out.add(k), n);
    }
}

const C2: f32 = 0.5;
const C3: f32 = 1.0 / 6.0;
const C4: f32 = 1.0 / 24.0;
const C5: f32 = 1.0 / 120.0;
const C6: f32 = 1.0 / 720.0;
const C7: f32 = 1.0 / 5040.0;

/// [`super::math::exp`] on eight lanes: the same operations in the same order, special cases
/// selected afterwards.
#[inline(always)]
pub(crate) unsafe fn exp8<V: V8>(x: V) -> V {
    let s = V::splat;
    let n = x.mul(s(LOG2E)).add(s(0.5)).floor();
    let r = x.sub(n.mul(s(LN2_HI))).sub(n.mul(s(LN2_LO)));
    let t = s(C6).add(r.mul(s(C7)));
    let t = s(C5).add(r.mul(t));
    let t = s(C4).add(r.mul(t));
    let t = s(C3).add(r.mul(t));
    let t = s(C2).add(r.mul(t));
    let t = s(1.0).add(r.mul(t));
    let p = s(1.0).add(r.mul(t));
    let v = p.mul(n.pow2());
    let v = V::select(x.lt(s(EXP_MIN)), s(0.0), v);
    let v = V::select(x.gt(s(EXP_MAX)), s(f32::INFINITY), v);
    V::select(x.is_nan(), x, v)
}

/// [`super::math::silu`] of `x[..n]` in place.
#[inline(always)]
pub(crate) unsafe fn silu<V: V8>(x: *mut f32, n: usize) {
    map::<V, _>(x, x, n, &Silu);
}

/// `x[i] += y[i]` for `i < n`.
#[inline(always)]
pub(crate) unsafe fn add_assign<V: V8>(x: *mut f32, y: *const f32, n: usize) {
    let full = n / LANES * LANES;
    let mut k = 0;
    while k < full {
        V::load(x.add(k)).add(V::load(y.add(k))).store(x.add(k));
        k += LANES;
    }
    for i in k..n {
        *x.add(i) += *y.add(i);
    }
}

/// The largest of `s[..n]`, NaNs ignored (`-inf` if none), as [`super::math::softmax_in_place`]
/// and [`super::logits_to_weights`] take it. The maximum of a set does not depend on the order
/// of the comparisons (a tie between `+0.0` and `-0.0` may resolve either way, which changes no
/// later result: `v - m` and so `exp(v - m)` only differ for `v = ±0`, where `exp` gives 1).
#[inline(always)]
unsafe fn max_ignoring_nan<V: V8>(s: *const f32, n: usize) -> f32 {
    let full = n / LANES * LANES;
    let mut m = V::splat(f32::NEG_INFINITY);
    let mut k = 0;
    while k < full {
        let v = V::load(s.add(k));
        m = V::select(v.gt(m), v, m);
        k += LANES;
    }
    let mut best = f32::NEG_INFINITY;
    for v in m.to_array().into_iter().chain((k..n).map(|i| *s.add(i))) {
        if v > best {
            best = v;
        }
    }
    best
}

/// Scales `s[..n]` by `scale` and applies [`super::math::softmax_in_place`].
#[inline(always)]
#[cfg(test)]
unsafe fn scaled_softmax<V: V8>(s: *mut f32, n: usize, scale: f32) {
    scaled_softmax_rows::<V, 1>([s], [n], scale);
}

/// [`scaled_softmax`] of `R` rows at once: the same operations for each row; only the sequential
/// sums of the rows are interleaved (each row's sum stays in index order).
#[inline(always)]
unsafe fn scaled_softmax_rows<V: V8, const R: usize>(s: [*mut f32; R], n: [usize; R], scale: f32) {
    let mut len = n;
    for r in 0..R {
        map::<V, _>(s[r], s[r], n[r], &Scale(scale));
        let m = max_ignoring_nan::<V>(s[r], n[r]);
        if m == f32::NEG_INFINITY {
            // Left as it is (all scores -inf or NaN), as the reference does.
            len[r] = 0;
            continue;
        }
        map::<V, _>(s[r], s[r], n[r], &ExpSub(m));
    }
    let common = len.iter().copied().min().unwrap_or(0);
    let mut sum = [0.0f32; R];
    for j in 0..common {
        for r in 0..R {
            sum[r] += *s[r].add(j);
        }
    }
    for r in 0..R {
        for j in common..len[r] {
            sum[r] += *s[r].add(j);
        }
        map::<V, _>(s[r], s[r], len[r], &DivBy(sum[r]));
    }
}

/// Vector `e` of value row `j` (only `last` lanes of the last of `E` vectors).
#[inline(always)]
unsafe fn pv_load<V: V8, const E: usize>(
    v: *const f32,
    vs: usize,
    j: usize,
    e: usize,
    last: usize,
) -> V {
    let ptr = v.add(j * vs + e * LANES);
    if e + 1 == E && last < LANES {
        V::load_part(ptr, last)
    } else {
        V::load(ptr)
    }
}

/// `out_r[e] = Σ_{j < vis[r]} p_r[j] * v[j*vs + e]` for `e < 8*E` (only `last` lanes of the last
/// vector are used), each sum sequential in `j` starting from `+0.0`, for `R` rows at once.
#[inline(always)]
unsafe fn pv_tile<V: V8, const R: usize, const E: usize>(
    p: [*const f32; R],
    vis: [usize; R],
    v: *const f32,
    vs: usize,
    out: [*mut f32; R],
    last: usize,
) {
    let mut acc = [[V::zero(); E]; R];
    let common = vis.iter().copied().min().unwrap_or(0);
    for j in 0..common {
        let mut vv = [V::zero(); E];
        for (e, x) in vv.iter_mut().enumerate() {
            *x = pv_load::<V, E>(v, vs, j, e, last);
        }
        for r in 0..R {
            let pj = V::splat(*p[r].add(j));
            for e in 0..E {
                acc[r][e] = acc[r][e].add(pj.mul(vv[e]));
            }
        }
    }
    for r in 0..R {
        for j in common..vis[r] {
            let pj = V::splat(*p[r].add(j));
            for e in 0..E {
                acc[r][e] = acc[r][e].add(pj.mul(pv_load::<V, E>(v, vs, j, e, last)));
            }
        }
        store_sums::<V, E>(&acc[r], out[r], last);
    }
}

/// Stores the `E` vectors of sums of [`pv_tile`] / [`pv_heads_tile`] at `out` (only `last` lanes
/// of the last one).
#[inline(always)]
unsafe fn store_sums<V: V8, const E: usize>(acc: &[V; E], out: *mut f32, last: usize) {
    for (e, a) in acc.iter().enumerate() {
        let ptr = out.add(e * LANES);
        if e + 1 == E && last < LANES {
            a.store_part(ptr, last);
        } else {
            a.store(ptr);
        }
    }
}

/// [`pv_tile`] over a whole head width `hd`.
#[inline(always)]
unsafe fn pv_rows<V: V8, const R: usize>(
    p: [*const f32; R],
    vis: [usize; R],
    v: *const f32,
    vs: usize,
    out: [*mut f32; R],
    hd: usize,
) {
    let mut e0 = 0;
    while e0 + 4 * LANES <= hd {
        let o = out.map(|q| q.add(e0));
        pv_tile::<V, R, 4>(p, vis, v.add(e0), vs, o, LANES);
        e0 += 4 * LANES;
    }
    while e0 < hd {
        let o = out.map(|q| q.add(e0));
        let last = (hd - e0).min(LANES);
        pv_tile::<V, R, 1>(p, vis, v.add(e0), vs, o, last);
        e0 += LANES;
    }
}

/// [`pv_tile`] for one query row and `H` heads at once: `out_h[e] = Σ_{j < vis} p_h[j] *
/// v_h[j*vs + e]` for `e < 8*E` (only `last` lanes of the last vector are used), each sum
/// sequential in `j` starting from `+0.0`. The heads' sums are independent, so interleaving them
/// keeps every bit and gives the CPU `H × E` chains of additions to overlap instead of `E` (a
/// single row's sums are otherwise bound by the latency of one addition per position).
#[inline(always)]
unsafe fn pv_heads_tile<V: V8, const H: usize, const E: usize>(
    p: [*const f32; H],
    vis: usize,
    v: [*const f32; H],
    vs: usize,
    out: [*mut f32; H],
    last: usize,
) {
    let mut acc = [[V::zero(); E]; H];
    for j in 0..vis {
        for h in 0..H {
            let pj = V::splat(*p[h].add(j));
            for e in 0..E {
                acc[h][e] = acc[h][e].add(pj.mul(pv_load::<V, E>(v[h], vs, j, e, last)));
            }
        }
    }
    for h in 0..H {
        store_sums::<V, E>(&acc[h], out[h], last);
    }
}

/// [`pv_heads_tile`] over a whole head width `hd`.
#[inline(always)]
unsafe fn pv_heads<V: V8, const H: usize>(
    p: [*const f32; H],
    vis: usize,
    v: [*const f32; H],
    vs: usize,
    out: [*mut f32; H],
    hd: usize,
) {
    let mut e0 = 0;
    while e0 + 4 * LANES <= hd {
        let (vv, o) = (v.map(|x| x.add(e0)), out.map(|q| q.add(e0)));
        pv_heads_tile::<V, H, 4>(p, vis, vv, vs, o, LANES);
        e0 += 4 * LANES;
    }
    while e0 < hd {
        let (vv, o) = (v.map(|x| x.add(e0)), out.map(|q| q.add(e0)));
        let last = (hd - e0).min(LANES);
        pv_heads_tile::<V, H, 1>(p, vis, vv, vs, o, last);
        e0 += LANES;
    }
}

/// Rows of queries per attention block.
pub(crate) const ATT_ROWS: usize = 4;

/// The shape of one attention call: `rows` query rows at positions `base..base + rows`, keys and
/// values of positions `0..total` (`total >= base + rows`), `nh` heads of width `hd`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnShape {
    pub rows: usize,
    pub base: usize,
    pub total: usize,
    pub nh: usize,
    pub hd: usize,
    pub causal: bool,
}

/// Multi-head attention: for each row `r` and head `h`, scores `dot(q, k_j) * (1/sqrt(hd))` over
/// the visible keys, softmax, and `o = Σ_j p_j v_j`, exactly as
/// [`super::transformer::Body::forward`] defines it. `qkv` holds rows of `3d` (queries first),
/// `k` and `v` rows of `d`; `o` receives rows of `d`; `scores` must hold `ATT_ROWS * total`.
///
/// # Safety
/// The buffers must have the sizes above; `V` must be usable on this CPU.
#[inline(always)]
pub(crate) unsafe fn attention<V: V8>(
    sh: AttnShape,
    qkv: *const f32,
    k: *const f32,
    v: *const f32,
    o: *mut f32,
    scores: *mut f32,
) {
    let d = sh.nh * sh.hd;
    let scale = 1.0 / (sh.hd as f32).sqrt();
    let vis = |r: usize| {
        if sh.causal {
            sh.base + r + 1
        } else {
            sh.total
        }
    };
    let st = sh.total;
    if sh.rows == 1 && sh.nh <= ATT_ROWS {
        // One row (a decoding step): every head's scores first (the buffer holds a row per
        // head), then the value sums of two heads at a time.
        let n = vis(0);
        for h in 0..sh.nh {
            let off = h * sh.hd;
            let row = scores.add(h * st);
            gemm::<V>(
                qkv.add(off),
                3 * d,
                1,
                k.add(off),
                d,
                n,
                sh.hd,
                None,
                row,
                st,
            );
            scaled_softmax_rows::<V, 1>([row], [n], scale);
        }
        let mut h = 0;
        while h + 2 <= sh.nh {
            let (a, b) = (h * sh.hd, (h + 1) * sh.hd);
            pv_heads::<V, 2>(
                [scores.add(h * st), scores.add((h + 1) * st)],
                n,
                [v.add(a), v.add(b)],
                d,
                [o.add(a), o.add(b)],
                sh.hd,
            );
            h += 2;
        }
        if h < sh.nh {
            let a = h * sh.hd;
            pv_heads::<V, 1>([scores.add(h * st)], n, [v.add(a)], d, [o.add(a)], sh.hd);
        }
        return;
    }
    for h in 0..sh.nh {
        let off = h * sh.hd;
        let mut r0 = 0;
        while r0 < sh.rows {
            let r1 = (r0 + ATT_ROWS).min(sh.rows);
            let nr = r1 - r0;
            let vmax = vis(r1 - 1);
            gemm::<V>(
                qkv.add(r0 * 3 * d + off),
                3 * d,
                nr,
                k.add(off),
                d,
                vmax,
                sh.hd,
                None,
                scores,
                st,
            );
            if nr == ATT_ROWS {
                let p: [*mut f32; ATT_ROWS] = std::array::from_fn(|i| scores.add(i * st));
                let n: [usize; ATT_ROWS] = std::array::from_fn(|i| vis(r0 + i));
                scaled_softmax_rows::<V, ATT_ROWS>(p, n, scale);
            } else {
                for i in 0..nr {
                    scaled_softmax_rows::<V, 1>([scores.add(i * st)], [vis(r0 + i)], scale);
                }
            }
            let mut i = 0;
            while i + 2 <= nr {
                let (ra, rb) = (r0 + i, r0 + i + 1);
                pv_rows::<V, 2>(
                    [scores.add(i * st), scores.add((i + 1) * st)],
                    [vis(ra), vis(rb)],
                    v.add(off),
                    d,
                    [o.add(ra * d + off), o.add(rb * d + off)],
                    sh.hd,
                );
                i += 2;
            }
            while i < nr {
                let ra = r0 + i;
                pv_rows::<V, 1>(
                    [scores.add(i * st)],
                    [vis(ra)],
                    v.add(off),
                    d,
                    [o.add(ra * d + off)],
                    sh.hd,
                );
                i += 1;
            }
            r0 = r1;
        }
    }
}

/// [`super::logits_to_weights`] of `n` logits, appended to `out` (cleared first); `tmp` must
/// hold `n` floats.
#[inline(always)]
pub(crate) unsafe fn logits_to_weights<V: V8>(
    logits: *const f32,
    n: usize,
    tmp: *mut f32,
    out: &mut Vec<u64>,
) {
    out.clear();
    let m = max_ignoring_nan::<V>(logits, n);
    if m == f32::NEG_INFINITY {
        out.resize(n, 0);
        return;
    }
    let s = std::slice::from_raw_parts(logits, n);
    if m == f32::INFINITY {
        out.extend(s.iter().map(|&v| u64::from(v == f32::INFINITY)));
        return;
    }
    let f = ExpShift { m, s: WEIGHT_SCALE };
    map::<V, _>(logits, tmp, n, &f);
    // `as u64` saturates and maps NaN to 0, as in the reference.
    out.extend(std::slice::from_raw_parts(tmp, n).iter().map(|&f| f as u64));
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::kernels::dot_scalar;
    use super::super::lanes::Portable;
    use super::super::math;
    use super::*;

    pub(crate) fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = crate::nn::weights::splitmix64(s);
                ((s >> 40) as f32) * (1.0 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Runs `f` with the portable lanes and, where the CPU has AVX, with the AVX lanes (compiled
    /// with AVX), returning both results.
    macro_rules! both {
        ($f:ident, $($arg:expr),*) => {{
            let p = $f::<Portable>($($arg),*);
            #[cfg(target_arch = "x86_64")]
            let a = if std::arch::is_x86_feature_detected!("avx") {
                #[target_feature(enable = "avx")]
                unsafe fn run(f: impl FnOnce() -> Vec<f32>) -> Vec<f32> { f() }
                // SAFETY: AVX is present (checked above).
                Some(unsafe { run(|| $f::<super::super::lanes::Avx>($($arg),*)) })
            } else {
                None
            };
            #[cfg(not(target_arch = "x86_64"))]
            let a: Option<Vec<f32>> = None;
            (p, a)
        }};
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn run_gemm<V: V8>(
        x: &[f32],
        xs: usize,
        rows: usize,
        w: &[f32],
        ws: usize,
        n_out: usize,
        d: usize,
        bias: Option<&[f32]>,
        ys: usize,
    ) -> Vec<f32> {
        let mut y = vec![f32::NAN; rows.max(1) * ys];
        assert!(gemm_fits(x, xs, rows, w, ws, n_out, d, bias, &y, ys));
        // SAFETY: bounds checked just above; the portable lanes run anywhere and the AVX ones
        // only under `both!`, after detection.
        unsafe {
            gemm::<V>(
                x.as_ptr(),
                xs,
                rows,
                w.as_ptr(),
                ws,
                n_out,
                d,
                bias.map(|b| b.as_ptr()),
                y.as_mut_ptr(),
                ys,
            )
        };
        y
    }

    #[test]
    fn gemm_equals_reference_dot_bitwise_on_odd_shapes() {
        for (rows, n_out, d) in [
            (1, 1, 1),
            (1, 13, 7),
            (2, 9, 8),
            (3, 17, 9),
            (5, 67, 259),
            (7, 4, 16),
            (4, 33, 128),
            (9, 130, 384),
        ] {
            // Strided rows (padding after each row) as in attention.
            let (xs, ws, ys) = (d + 3, d + 5, n_out + 2);
            let x = data(rows * xs, 11 + d as u64);
            let w = data(n_out * ws, 12 + n_out as u64);
            let b = data(n_out, 13);
            for bias in [None, Some(&b[..])] {
                let (p, a) = both!(run_gemm, &x, xs, rows, &w, ws, n_out, d, bias, ys);
                for r in 0..rows {
                    for o in 0..n_out {
                        let xr = &x[r * xs..r * xs + d];
                        let wr = &w[o * ws..o * ws + d];
                        let want = match bias {
                            Some(b) => dot_scalar(xr, wr) + b[o],
                            None => dot_scalar(xr, wr),
                        };
                        assert_eq!(
                            p[r * ys + o].to_bits(),
                            want.to_bits(),
                            "{rows}x{n_out}x{d}"
                        );
                    }
                }
                if let Some(a) = a {
                    assert_eq!(bits(&a), bits(&p), "avx {rows}x{n_out}x{d}");
                }
            }
        }
    }

    fn run_matvec<V: V8>(x: &[f32], w: &[f32], n_out: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let d = x.len();
        let p = Panels::new(w, n_out, d);
        let mut y = vec![f32::NAN; n_out];
        assert!(w.len() >= n_out * d && bias.is_none_or(|b| b.len() >= n_out));
        // SAFETY: sizes checked above; see `run_gemm` for the lanes.
        unsafe {
            matvec::<V>(
                x.as_ptr(),
                &p,
                w.as_ptr(),
                n_out,
                d,
                bias.map(|b| b.as_ptr()),
                y.as_mut_ptr(),
            )
        };
        y
    }

    #[test]
    fn panel_matvec_equals_reference_dot_bitwise() {
        for (n_out, d) in [
            (1, 1),
            (7, 5),
            (8, 8),
            (17, 13),
            (64, 128),
            (131, 384),
            (1024, 40),
        ] {
            let x = data(d, 21 + d as u64);
            let w = data(n_out * d, 22 + n_out as u64);
            let b = data(n_out, 23);
            for bias in [None, Some(&b[..])] {
                let (p, a) = both!(run_matvec, &x, &w, n_out, bias);
                for o in 0..n_out {
                    let s = dot_scalar(&x, &w[o * d..(o + 1) * d]);
                    let want = bias.map_or(s, |b| s + b[o]);
                    assert_eq!(p[o].to_bits(), want.to_bits(), "{n_out}x{d} row {o}");
                }
                if let Some(a) = a {
                    assert_eq!(bits(&a), bits(&p), "avx {n_out}x{d}");
                }
            }
        }
    }

    fn run_exp<V: V8>(xs: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; xs.len()];
        // SAFETY: same lengths; see `run_gemm` for the lanes.
        unsafe { map::<V, _>(xs.as_ptr(), out.as_mut_ptr(), xs.len(), &ExpSub(0.0)) };
        out
    }

    fn run_silu<V: V8>(xs: &[f32]) -> Vec<f32> {
        let mut out = xs.to_vec();
        // SAFETY: as above.
        unsafe { silu::<V>(out.as_mut_ptr(), out.len()) };
        out
    }

    #[test]
    fn exp8_and_silu_equal_the_scalar_functions_bitwise() {
        let mut xs = vec![
            0.0f32,
            -0.0,
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            EXP_MIN,
            EXP_MIN - 1e-5,
            EXP_MAX,
            EXP_MAX + 1e-5,
            -86.999_99,
            87.999_99,
            1e-40,
            -1e-40,
            f32::MAX,
            f32::MIN,
        ];
        let mut x = -100.0f32;
        while x < 100.0 {
            xs.push(x);
            x += 0.003_17;
        }
        xs.extend(data(3001, 5).iter().map(|v| v * 200.0));
        let (p, a) = both!(run_exp, &xs);
        for (i, &x) in xs.iter().enumerate() {
            assert_eq!(p[i].to_bits(), math::exp(x).to_bits(), "exp({x})");
        }
        if let Some(a) = a {
            assert_eq!(bits(&a), bits(&p));
        }
        let (p, a) = both!(run_silu, &xs);
        for (i, &x) in xs.iter().enumerate() {
            assert_eq!(p[i].to_bits(), math::silu(x).to_bits(), "silu({x})");
        }
        if let Some(a) = a {
            assert_eq!(bits(&a), bits(&p));
        }
    }

    fn run_norm<V: V8>(x: &[f32], w: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; x.len()];
        // SAFETY: same lengths.
        unsafe { rms_norm::<V>(x.as_ptr(), w.as_ptr(), out.as_mut_ptr(), x.len()) };
        out
    }

    fn run_softmax<V: V8>(s: &[f32]) -> Vec<f32> {
        let mut out = s.to_vec();
        // SAFETY: in bounds.
        unsafe { scaled_softmax::<V>(out.as_mut_ptr(), out.len(), 0.25) };
        out
    }

    fn run_weights<V: V8>(l: &[f32]) -> Vec<f32> {
        let mut tmp = vec![0.0; l.len()];
        let mut out = Vec::new();
        // SAFETY: `tmp` holds `l.len()` floats.
        unsafe { logits_to_weights::<V>(l.as_ptr(), l.len(), tmp.as_mut_ptr(), &mut out) };
        // Weights up to 2^32 as f32 bits would lose precision: return them split in two halves.
        out.iter()
            .flat_map(|&w| [f32::from_bits(w as u32), f32::from_bits((w >> 32) as u32)])
            .collect()
    }

    #[test]
    fn norm_softmax_and_weights_equal_the_reference_bitwise() {
        for n in [1usize, 5, 8, 13, 128, 259, 1024] {
            let x: Vec<f32> = data(n, 40 + n as u64).iter().map(|v| v * 30.0).collect();
            let w = data(n, 41);
            let (p, a) = both!(run_norm, &x, &w);
            let mut want = vec![0.0; n];
            math::rms_norm(&x, &w, &mut want);
            assert_eq!(bits(&p), bits(&want), "norm {n}");
            assert_eq!(a.map(|a| bits(&a)).unwrap_or(bits(&p)), bits(&p));

            let (p, a) = both!(run_softmax, &x);
            let mut want: Vec<f32> = x.iter().map(|v| v * 0.25).collect();
            math::softmax_in_place(&mut want);
            assert_eq!(bits(&p), bits(&want), "softmax {n}");
            assert_eq!(a.map(|a| bits(&a)).unwrap_or(bits(&p)), bits(&p));

            let mut l = x.clone();
            if n > 3 {
                l[1] = f32::NAN;
                l[2] = -1e30;
            }
            let (p, a) = both!(run_weights, &l);
            let mut want = Vec::new();
            super::super::logits_to_weights(&l, &mut want);
            let want: Vec<f32> = want
                .iter()
                .flat_map(|&w| [f32::from_bits(w as u32), f32::from_bits((w >> 32) as u32)])
                .collect();
            assert_eq!(bits(&p), bits(&want), "weights {n}");
            assert_eq!(a.map(|a| bits(&a)).unwrap_or(bits(&p)), bits(&p));
        }
        // Degenerate logits.
        for l in [
            vec![f32::NEG_INFINITY; 9],
            vec![f32::NAN; 9],
            vec![
                1.0,
                f32::INFINITY,
                0.0,
                f32::INFINITY,
                3.0,
                1.0,
                1.0,
                1.0,
                1.0,
            ],
            vec![],
        ] {
            let (p, _) = both!(run_weights, &l);
            let mut want = Vec::new();
            super::super::logits_to_weights(&l, &mut want);
            let got: Vec<u64> = p
                .chunks(2)
                .map(|c| u64::from(c[0].to_bits()) | (u64::from(c[1].to_bits()) << 32))
                .collect();
            assert_eq!(got, want);
            let mut s = l.clone();
            let (p, _) = both!(run_softmax, &s);
            for v in s.iter_mut() {
                *v *= 0.25;
            }
            math::softmax_in_place(&mut s);
            assert_eq!(bits(&p), bits(&s));
        }
    }
}

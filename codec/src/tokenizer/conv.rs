//! 3×3 stride-1 convolutions on the CPU by Winograd's minimal filtering, F(4×4, 3×3).
//!
//! The tokenizers' networks spend nearly all their time in 3×3 convolutions with `padding = 1`
//! over 64 or 128 channels at full image resolution: about 15 G multiply-adds per 256×256 image
//! for TAEF2's encoder, and as many for its decoder. Computed directly, that is a third of a
//! second of one core's peak; F(4×4, 3×3) (Lavin and Gray, "Fast Algorithms for Convolutional
//! Neural Networks", 2016) needs 36 multiplications per 4×4 output tile and channel pair instead
//! of 144, and turns them into 36 independent matrix products per band of tiles, which run on the
//! `gemm` crate (the one candle uses for its own products).
//!
//! # Algorithm
//! Output tile `Y` (4×4) of output channel `o` is `Aᵀ [Σᵢ (G gₒᵢ Gᵀ) ⊙ (Bᵀ dᵢ B)] A`, where `gₒᵢ` is
//! the 3×3 kernel from input channel `i`, `dᵢ` the 6×6 input tile that overlaps it (rows and
//! columns `4t − 1 … 4t + 4` of the input, zero outside), and `Bᵀ`, `G`, `Aᵀ` are the constant
//! matrices below (interpolation points 0, ±1, ±2, ∞). The weight transforms are computed once, in
//! f64, when the layer is built. Per band of tile rows: every input tile is transformed into 36
//! planes `V[ξ][i][tile]`, `M[ξ] = U[ξ] · V[ξ]` runs as one GEMM per `ξ` (`U[ξ]` is `cout × cin`),
//! and each output tile is transformed back, with the bias and an optional ReLU applied on the
//! way out. Bands run in parallel on rayon's pool (`RAYON_NUM_THREADS` bounds it).
//!
//! The result equals the textbook convolution up to f32 rounding (the transforms' constants are
//! small integers and their reciprocals; measured errors are ~1e-6 relative on TAEF2's layers).

use rayon::prelude::*;

use super::act::{dirty, give, zeros};

/// Output tile side.
const M: usize = 4;
/// Input tile side (`M + 2`).
const T: usize = 6;
/// Points of the transformed tile (`T²`), one GEMM each.
const XI: usize = T * T;
/// Tiles per band, at least: `cin`- and `cout`-sized planes of 36 × this many floats stay near L2.
const BAND_TILES: usize = 128;

/// `Bᵀ` of F(4, 3): input tile transform ([`bt6`] computes it; a test checks that they agree).
#[cfg_attr(not(test), allow(dead_code))]
const BT: [[f32; T]; T] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];

/// `G` of F(4, 3): kernel transform.
const G: [[f64; 3]; T] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// `Aᵀ` of F(4, 3): output tile transform ([`at6`] computes it; a test checks that they agree).
#[cfg_attr(not(test), allow(dead_code))]
const AT: [[f32; T]; M] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
    [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
    [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
];

/// A 3×3, stride-1, `padding = 1` convolution with optional bias, weights in Winograd form.
#[derive(Debug, Clone)]
pub(crate) struct Conv3 {
    cin: usize,
    cout: usize,
    /// `[36][cout][cin]`: `U[ξ] = (G g Gᵀ)[ξ]` per channel pair.
    u: Vec<f32>,
    /// `[cout]`, or empty for no bias.
    bias: Vec<f32>,
}

impl Conv3 {
    /// From PyTorch's weight layout `[cout, cin, 3, 3]` (row-major) and an optional `[cout]` bias.
    ///
    /// # Panics
    /// If the lengths do not match `cout`, `cin`.
    pub(crate) fn new(cin: usize, cout: usize, weight: &[f32], bias: Option<&[f32]>) -> Self {
        assert_eq!(weight.len(), cout * cin * 9, "conv3 weight length");
        let mut u = vec![0f32; XI * cout * cin];
        for co in 0..cout {
            for ci in 0..cin {
                let g = &weight[(co * cin + ci) * 9..(co * cin + ci + 1) * 9];
                // G g (6×3), then (G g) Gᵀ (6×6).
                let mut gg = [[0f64; 3]; T];
                for (r, row) in gg.iter_mut().enumerate() {
                    for (c, v) in row.iter_mut().enumerate() {
                        *v = (0..3).map(|k| G[r][k] * f64::from(g[k * 3 + c])).sum();
                    }
                }
                for r in 0..T {
                    for c in 0..T {
                        let v: f64 = (0..3).map(|k| gg[r][k] * G[c][k]).sum();
                        u[((r * T + c) * cout + co) * cin + ci] = v as f32;
                    }
                }
            }
        }
        let bias = match bias {
            Some(b) => {
                assert_eq!(b.len(), cout, "conv3 bias length");
                b.to_vec()
            }
            None => Vec::new(),
        };
        Self { cin, cout, u, bias }
    }

    /// Input channels.
    pub(crate) fn cin(&self) -> usize {
        self.cin
    }

    /// Output channels.
    pub(crate) fn cout(&self) -> usize {
        self.cout
    }

    /// Convolves one image `x` (`[cin, h, w]`, row-major) to `[cout, h, w]`, adding the bias and
    /// `residual` (`[cout, h, w]`) when given, then, when `relu` is set, clamping at zero.
    ///
    /// # Panics
    /// If `x.len() != cin·h·w` or the residual's length is not `cout·h·w`.
    pub(crate) fn forward_res(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        residual: Option<&[f32]>,
        relu: bool,
    ) -> Vec<f32> {
        let (cin, cout) = (self.cin, self.cout);
        assert_eq!(x.len(), cin * h * w, "conv3 input length");
        if let Some(res) = residual {
            assert_eq!(res.len(), cout * h * w, "conv3 residual length");
        }
        if h == 0 || w == 0 {
            return vec![0f32; cout * h * w];
        }
        let (ty, tx) = (h.div_ceil(M), w.div_ceil(M));
        // Padded planes: one zero row/column before the image, zeros after it up to the tiles.
        let (hp, wp) = (M * ty + 2, M * tx + 2);
        let plane = hp * wp;
        // Every value is written below (the image and its zero border), so the buffer need not
        // be zeroed first.
        let mut xp = dirty(cin * plane);
        xp.par_chunks_exact_mut(plane)
            .zip(x.par_chunks_exact(h * w))
            .for_each(|(dst, src)| {
                let (top, rest) = dst.split_at_mut(wp);
                top.fill(0.0);
                let (body, bottom) = rest.split_at_mut(h * wp);
                for (row, d) in src.chunks_exact(w).zip(body.chunks_exact_mut(wp)) {
                    d[0] = 0.0;
                    d[1..=w].copy_from_slice(row);
                    d[w + 1..].fill(0.0);
                }
                bottom.fill(0.0);
            });
        let rows = BAND_TILES.div_ceil(tx).clamp(1, ty);
        // Each band writes its own rows of every output plane, every value of them.
        let mut out = dirty(cout * h * w);
        let mut per_band: Vec<Vec<&mut [f32]>> = (0..ty.div_ceil(rows))
            .map(|_| Vec::with_capacity(cout))
            .collect();
        for plane in out.chunks_exact_mut(h * w) {
            for (b, piece) in plane.chunks_mut(rows * M * w).enumerate() {
                per_band[b].push(piece);
            }
        }
        let io = BandIo {
            xp: &xp,
            plane,
            wp,
            tx,
            h,
            w,
            residual,
            relu,
        };
        per_band
            .into_par_iter()
            .enumerate()
            .for_each(|(b, mut outs)| {
                let t0 = b * rows;
                self.band(&io, t0, rows.min(ty - t0), &mut outs);
            });
        give(xp);
        out
    }

    /// Output rows of tile rows `t0 … t0 + r`, written to `outs[co]` (the band's rows of output
    /// plane `co`, cropped to the image) with the bias, the residual and the ReLU applied.
    fn band(&self, io: &BandIo, t0: usize, r: usize, outs: &mut [&mut [f32]]) {
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2, checked just above.
                return unsafe { self.band_avx2(s, io, t0, r, outs) };
            }
            self.band_in::<false>(s, io, t0, r, outs)
        })
    }

    /// [`Self::band_in`] compiled for AVX2 (the transforms vectorize 8 wide instead of 4).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn band_avx2(
        &self,
        s: &mut Scratch,
        io: &BandIo,
        t0: usize,
        r: usize,
        outs: &mut [&mut [f32]],
    ) {
        self.band_in::<true>(s, io, t0, r, outs)
    }

    /// [`Self::band`] on a thread's scratch buffers; `AVX` only inside [`Self::band_avx2`].
    #[inline(always)]
    fn band_in<const AVX: bool>(
        &self,
        s: &mut Scratch,
        io: &BandIo,
        t0: usize,
        r: usize,
        outs: &mut [&mut [f32]],
    ) {
        let BandIo {
            xp,
            plane,
            wp,
            tx,
            h,
            w,
            residual,
            relu,
        } = *io;
        let (cin, cout) = (self.cin, self.cout);
        let n = r * tx;
        let rows_in = M * r + 2;
        // V[ξ][ci][tile], tiles row-major within the band; the six column phases of one padded
        // row; Bᵀ along the rows, H[b][yy][tc]; M[ξ][co][tile]; Z[i][b][tc]; one output row's phases.
        let v = grown(&mut s.v, XI * cin * n);
        let q = grown(&mut s.q, M * (tx + 1));
        let hb = grown(&mut s.hb, T * rows_in * tx);
        let m = grown(&mut s.m, XI * cout * n);
        let z = grown(&mut s.z, M * T * tx);
        let ys = grown(&mut s.ys, M * tx);
        let rowbuf = grown(&mut s.row, M * tx);
        for ci in 0..cin {
            let p = &xp[ci * plane + t0 * M * wp..][..rows_in * wp];
            for (yy, row) in p.chunks_exact(wp).enumerate() {
                // Phases 0 … 3 of the row (`q_j[tc] = row[4·tc + j]`, one more for phases 0
                // and 1); phases 4 and 5 are phases 0 and 1 one tile on.
                let (q01, q23) = q.split_at_mut(2 * (tx + 1));
                let (q0, q1) = q01.split_at_mut(tx + 1);
                let (q2, q3) = q23.split_at_mut(tx + 1);
                deinterleave4::<AVX>(row, [q0, q1, q2, q3], tx);
                (q0[tx], q1[tx]) = (row[M * tx], row[M * tx + 1]);
                let d = [
                    &q0[..tx],
                    &q1[..tx],
                    &q2[..tx],
                    &q3[..tx],
                    &q0[1..],
                    &q1[1..],
                ];
                let mut out: [&mut [f32]; T] = split6(hb, rows_in * tx, yy * tx, tx);
                bt6(&d, &mut out);
            }
            for tr in 0..r {
                for b in 0..T {
                    let d: [&[f32]; T] = std::array::from_fn(|i| {
                        let o = (b * rows_in + M * tr + i) * tx;
                        &hb[o..o + tx]
                    });
                    // V[a·6 + b][ci][tr·tx …] for a = 0 … 5.
                    let mut out = split6(&mut v[(b * cin + ci) * n..], T * cin * n, tr * tx, tx);
                    bt6(&d, &mut out);
                }
            }
        }
        // M[ξ][co][tile] = U[ξ] V[ξ].
        for xi in 0..XI {
            let lhs = &self.u[xi * cout * cin..(xi + 1) * cout * cin];
            let rhs = &v[xi * cin * n..(xi + 1) * cin * n];
            let dst = &mut m[xi * cout * n..(xi + 1) * cout * n];
            matmul((cout, n, cin), dst, false, lhs, rhs, n);
        }
        // Y = Aᵀ M A per tile: Aᵀ down the columns into Z[i][b][tc], then along the rows, then
        // bias, residual and ReLU on the way into the output row.
        let y0 = t0 * M;
        for (co, dst_rows) in outs.iter_mut().enumerate() {
            let bias = self.bias.get(co).copied().unwrap_or(0.0);
            let rr = dst_rows.len() / w;
            for tr in 0..r {
                for b in 0..T {
                    let mm: [&[f32]; T] = std::array::from_fn(|a| {
                        let o = ((a * T + b) * cout + co) * n + tr * tx;
                        &m[o..o + tx]
                    });
                    let mut out = split4(&mut z[b * tx..], T * tx, tx);
                    at6(&mm, &mut out);
                }
                for i in 0..M {
                    let yy = tr * M + i;
                    if yy >= rr {
                        break;
                    }
                    let zz: [&[f32]; T] = chunks6(&z[i * T * tx..], tx, 0, tx);
                    let mut out = split4(ys, tx, tx);
                    at6(&zz, &mut out);
                    interleave4::<AVX>(chunks4(ys, tx), rowbuf);
                    let dst = &mut dst_rows[yy * w..(yy + 1) * w];
                    match residual {
                        None => {
                            for (d, &v) in dst.iter_mut().zip(&rowbuf[..w]) {
                                let v = v + bias;
                                *d = if relu { v.max(0.0) } else { v };
                            }
                        }
                        Some(res) => {
                            let at = (co * h + y0 + yy) * w;
                            for ((d, &v), &e) in
                                dst.iter_mut().zip(&rowbuf[..w]).zip(&res[at..at + w])
                            {
                                let v = (v + bias) + e;
                                *d = if relu { v.max(0.0) } else { v };
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What a band of [`Conv3::forward_res`] reads: the padded input (`cin` planes of `plane` values,
/// rows of `wp`), the tiles per row, the image size, the residual to add and whether to ReLU.
#[derive(Clone, Copy)]
struct BandIo<'a> {
    xp: &'a [f32],
    plane: usize,
    wp: usize,
    tx: usize,
    h: usize,
    w: usize,
    residual: Option<&'a [f32]>,
    relu: bool,
}

/// A stride-2 convolution with a 2×2 (`padding = 0`) or 3×3 (`padding = 1`) kernel and optional
/// bias, as one GEMM per kernel tap on the input's polyphase planes.
///
/// The zero-padded input is split into its four phases (even/odd rows × even/odd columns), each
/// `cin` planes of `hq × wq` values. Output `(y, x)` reads tap `(ky, kx)` from phase
/// `(ky mod 2, kx mod 2)` at `(y + ky/2, x + kx/2)`, so, as in the flat-layout trick of [`Conv3`]'s
/// module, a band of output rows is `k²` GEMMs on shifted views of one phase each, accumulated
/// into a band buffer (the `kx/2` columns computed past the image are dropped).
#[derive(Debug, Clone)]
pub(crate) struct ConvS2 {
    cin: usize,
    cout: usize,
    k: usize,
    pad: usize,
    /// `[k²][cout][cin]`.
    taps: Vec<f32>,
    /// `[cout]`, or empty for no bias.
    bias: Vec<f32>,
}

impl ConvS2 {
    /// From PyTorch's weight layout `[cout, cin, k, k]` and an optional `[cout]` bias; `(k, pad)`
    /// is `(2, 0)` or `(3, 1)`.
    ///
    /// # Panics
    /// On another `(k, pad)` or lengths that do not match.
    pub(crate) fn new(
        cin: usize,
        cout: usize,
        k: usize,
        pad: usize,
        weight: &[f32],
        bias: Option<&[f32]>,
    ) -> Self {
        assert!(
            matches!((k, pad), (2, 0) | (3, 1)),
            "stride-2 conv: k {k}, padding {pad}"
        );
        assert_eq!(
            weight.len(),
            cout * cin * k * k,
            "stride-2 conv weight length"
        );
        let mut taps = vec![0f32; k * k * cout * cin];
        for co in 0..cout {
            for ci in 0..cin {
                for t in 0..k * k {
                    taps[(t * cout + co) * cin + ci] = weight[(co * cin + ci) * k * k + t];
                }
            }
        }
        let bias = bias.map_or_else(Vec::new, |b| {
            assert_eq!(b.len(), cout, "stride-2 conv bias length");
            b.to_vec()
        });
        Self {
            cin,
            cout,
            k,
            pad,
            taps,
            bias,
        }
    }

    /// Input channels.
    pub(crate) fn cin(&self) -> usize {
        self.cin
    }

    /// Output channels.
    pub(crate) fn cout(&self) -> usize {
        self.cout
    }

    /// Output size for an `h × w` input: `((h + 2·pad − k)/2 + 1, …)`, or `None` when the input
    /// is smaller than the kernel.
    pub(crate) fn out_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let (hh, ww) = (h + 2 * self.pad, w + 2 * self.pad);
        (hh >= self.k && ww >= self.k).then(|| ((hh - self.k) / 2 + 1, (ww - self.k) / 2 + 1))
    }

    /// Convolves one image `x` (`[cin, h, w]`) to `[cout, ho, wo]` (see [`Self::out_size`]).
    ///
    /// # Panics
    /// If `x.len() != cin·h·w` or the input is smaller than the kernel.
    pub(crate) fn forward(&self, x: &[f32], h: usize, w: usize) -> Vec<f32> {
        let (cin, cout, k, pad) = (self.cin, self.cout, self.k, self.pad);
        assert_eq!(x.len(), cin * h * w, "stride-2 conv input length");
        let (ho, wo) = self.out_size(h, w).expect("input at least the kernel");
        let e = (k - 1) / 2;
        let (hq, wq) = (ho + e + 1, wo + e);
        let plane = hq * wq;
        // Phases [py·2 + px][ci][i][j] = padded(2i + py, 2j + px).
        let mut ph = zeros(4 * cin * plane);
        ph.par_chunks_exact_mut(plane)
            .enumerate()
            .for_each(|(pc, d)| {
                let (py, px, ci) = (pc / cin / 2, pc / cin % 2, pc % cin);
                let src = &x[ci * h * w..(ci + 1) * h * w];
                {
                    for (i, drow) in d.chunks_exact_mut(wq).enumerate() {
                        let Some(sy) = (2 * i + py).checked_sub(pad).filter(|&y| y < h) else {
                            continue;
                        };
                        let srow = &src[sy * w..(sy + 1) * w];
                        for (j, v) in drow.iter_mut().enumerate() {
                            if let Some(sx) = (2 * j + px).checked_sub(pad).filter(|&x| x < w) {
                                *v = srow[sx];
                            }
                        }
                    }
                }
            });
        let rows = (BAND_FLOATS / (cout * wq)).clamp(1, ho);
        let bands: Vec<(usize, Vec<f32>)> = (0..ho)
            .step_by(rows)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|y0| (y0, self.band(&ph, plane, wq, y0, rows.min(ho - y0))))
            .collect();
        give(ph);
        // Every value is written below.
        let mut out = dirty(cout * ho * wo);
        out.par_chunks_exact_mut(ho * wo)
            .enumerate()
            .for_each(|(co, plane)| {
                let b = self.bias.get(co).copied().unwrap_or(0.0);
                let rows = bands.iter().flat_map(|(_, acc)| {
                    let per = acc.len() / cout;
                    acc[co * per..(co + 1) * per].chunks_exact(wq)
                });
                for (row, dst) in rows.zip(plane.chunks_exact_mut(wo)) {
                    for (d, v) in dst.iter_mut().zip(&row[..wo]) {
                        *d = v + b;
                    }
                }
            });
        out
    }

    /// The `cout × r·wq` accumulator of output rows `y0 … y0 + r`.
    fn band(&self, ph: &[f32], plane: usize, wq: usize, y0: usize, r: usize) -> Vec<f32> {
        let (cin, cout, k) = (self.cin, self.cout, self.k);
        let n = r * wq;
        let mut acc = vec![0f32; cout * n];
        for t in 0..k * k {
            let (ky, kx) = (t / k, t % k);
            let base = ((ky % 2) * 2 + kx % 2) * cin * plane;
            let off = base + (y0 + ky / 2) * wq + kx / 2;
            // The view stays inside its phase: rows up to y0 + r + ky/2 ≤ ho + e < hq, plus
            // kx/2 ≤ e columns into the spare row (matmul checks the slice's length).
            let lhs = &self.taps[t * cout * cin..(t + 1) * cout * cin];
            let rhs = &ph[off..base + cin * plane];
            matmul((cout, n, cin), &mut acc, t > 0, lhs, rhs, plane);
        }
        acc
    }
}

/// `dst (+)= lhs · rhs` for an `m × n` product over `k`: `lhs` is `m × k` and `dst` `m × n`, both
/// row-major and contiguous; row `i` of `rhs` is `rhs[i·rhs_rs ..][..n]`. With `accumulate` the
/// product is added to `dst`, else it replaces it. Single-threaded (callers parallelise bands).
///
/// # Panics
/// If a slice is too short for its matrix.
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    rhs: &[f32],
    rhs_rs: usize,
) {
    assert!(
        dst.len() >= m * n && lhs.len() >= m * k,
        "matmul: dst or lhs too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    assert!(
        rhs_rs >= n && rhs.len() >= (k - 1) * rhs_rs + n,
        "matmul: rhs too short"
    );
    // SAFETY: by the assertions, `dst` holds `m × n` values (row stride n, column stride 1),
    // `lhs` `m × k` (row stride k) and `rhs` `k × n` (row stride `rhs_rs`, column stride 1); the
    // highest element read from `rhs` is `(k − 1)·rhs_rs + n − 1 < rhs.len()`. `dst` is a unique
    // borrow, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Floats of accumulator per band of [`ConvS2`] (`cout × rows · wq`): 256 KiB.
const BAND_FLOATS: usize = 1 << 16;

/// The four column phases of a padded row: `q[j][tc] = row[4·tc + j]` for `tc < tx`.
///
/// # Panics
/// If `row` is shorter than `4·tx` or a phase than `tx`.
#[inline(always)]
fn deinterleave4<const AVX: bool>(row: &[f32], q: [&mut [f32]; M], tx: usize) {
    assert!(row.len() >= M * tx && q.iter().all(|p| p.len() >= tx));
    let [q0, q1, q2, q3] = q;
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: `AVX` is set only inside `Conv3::band_avx2`, which runs on CPUs with AVX2;
        // the lengths were checked above.
        done = unsafe { x86::deinterleave4(row, [&mut *q0, &mut *q1, &mut *q2, &mut *q3], tx) };
    }
    for tc in done..tx {
        let c = &row[M * tc..M * tc + M];
        (q0[tc], q1[tc], q2[tc], q3[tc]) = (c[0], c[1], c[2], c[3]);
    }
}

/// The inverse of [`deinterleave4`]: `out[4·tc + j] = y[j][tc]` for `tc < y[0].len()`.
///
/// # Panics
/// If the phases differ in length or `out` is shorter than four of them.
#[inline(always)]
fn interleave4<const AVX: bool>(y: [&[f32]; M], out: &mut [f32]) {
    let tx = y[0].len();
    assert!(y.iter().all(|p| p.len() == tx) && out.len() >= M * tx);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: as in `deinterleave4`; the lengths were checked above.
        done = unsafe { x86::interleave4(y, out) };
    }
    for tc in done..tx {
        out[M * tc..M * tc + M].copy_from_slice(&[y[0][tc], y[1][tc], y[2][tc], y[3][tc]]);
    }
}

/// Four consecutive slices of `len` from `buf`.
#[inline(always)]
fn chunks4(buf: &[f32], len: usize) -> [&[f32]; M] {
    std::array::from_fn(|k| &buf[k * len..(k + 1) * len])
}

/// AVX versions of the row (de)interleaving: eight tiles at a time, a 4×4 transpose per 128-bit
/// lane plus a lane exchange.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::M;

    /// [`super::deinterleave4`] for the first multiple of 8 tiles; returns how many it did.
    ///
    /// # Safety
    /// The CPU must have AVX; `row` must hold `4·tx` values and each phase `tx`.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn deinterleave4(row: &[f32], q: [&mut [f32]; M], tx: usize) -> usize {
        let [q0, q1, q2, q3] = q;
        let mut tc = 0;
        while tc + 8 <= tx {
            let p = row.as_ptr().add(M * tc);
            // Two tiles (four phases each) per register.
            let (r0, r1) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
            let (r2, r3) = (_mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24)));
            // Tiles (0 | 4), (1 | 5), (2 | 6), (3 | 7).
            let e = _mm256_permute2f128_ps::<0x20>(r0, r2);
            let f = _mm256_permute2f128_ps::<0x31>(r0, r2);
            let g = _mm256_permute2f128_ps::<0x20>(r1, r3);
            let h = _mm256_permute2f128_ps::<0x31>(r1, r3);
            let (t0, t1) = (_mm256_unpacklo_ps(e, f), _mm256_unpackhi_ps(e, f));
            let (t2, t3) = (_mm256_unpacklo_ps(g, h), _mm256_unpackhi_ps(g, h));
            _mm256_storeu_ps(q0.as_mut_ptr().add(tc), _mm256_shuffle_ps::<0x44>(t0, t2));
            _mm256_storeu_ps(q1.as_mut_ptr().add(tc), _mm256_shuffle_ps::<0xEE>(t0, t2));
            _mm256_storeu_ps(q2.as_mut_ptr().add(tc), _mm256_shuffle_ps::<0x44>(t1, t3));
            _mm256_storeu_ps(q3.as_mut_ptr().add(tc), _mm256_shuffle_ps::<0xEE>(t1, t3));
            tc += 8;
        }
        tc
    }

    /// [`super::interleave4`] for the first multiple of 8 tiles; returns how many it did.
    ///
    /// # Safety
    /// The CPU must have AVX; the phases must be `tx` long and `out` hold `4·tx` values.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn interleave4(y: [&[f32]; M], out: &mut [f32]) -> usize {
        let tx = y[0].len();
        let mut tc = 0;
        while tc + 8 <= tx {
            let a = _mm256_loadu_ps(y[0].as_ptr().add(tc));
            let b = _mm256_loadu_ps(y[1].as_ptr().add(tc));
            let c = _mm256_loadu_ps(y[2].as_ptr().add(tc));
            let d = _mm256_loadu_ps(y[3].as_ptr().add(tc));
            let (t0, t1) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
            let (t2, t3) = (_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
            // Tiles (0 | 4), (1 | 5), (2 | 6), (3 | 7).
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let o = out.as_mut_ptr().add(M * tc);
            _mm256_storeu_ps(o, _mm256_permute2f128_ps::<0x20>(u0, u1));
            _mm256_storeu_ps(o.add(8), _mm256_permute2f128_ps::<0x20>(u2, u3));
            _mm256_storeu_ps(o.add(16), _mm256_permute2f128_ps::<0x31>(u0, u1));
            _mm256_storeu_ps(o.add(24), _mm256_permute2f128_ps::<0x31>(u2, u3));
            tc += 8;
        }
        tc
    }
}

/// Per-thread scratch of [`Conv3::band`], grown to the largest band seen and reused (kept for
/// the thread's life: a few MB per rayon thread for photos, about 20 MB for the widest grid the
/// tokenizers accept).
#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    q: Vec<f32>,
    hb: Vec<f32>,
    m: Vec<f32>,
    z: Vec<f32>,
    ys: Vec<f32>,
    row: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// The first `n` values of `buf`, grown with zeros when shorter (contents unspecified).
#[inline(always)]
fn grown(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// Six slices of `len` at `base + k·stride` in `buf`, `k = 0 … 5`.
#[inline(always)]
fn chunks6(buf: &[f32], stride: usize, base: usize, len: usize) -> [&[f32]; T] {
    std::array::from_fn(|k| &buf[base + k * stride..base + k * stride + len])
}

/// Six disjoint mutable slices of `len` at `off + k·stride` in `buf`, `k = 0 … 5` (`stride >= len`).
#[inline(always)]
fn split6(buf: &mut [f32], stride: usize, off: usize, len: usize) -> [&mut [f32]; T] {
    let mut it = buf[off..].chunks_mut(stride).map(|c| &mut c[..len]);
    std::array::from_fn(|_| it.next().expect("buffer holds six rows"))
}

/// Four disjoint mutable slices of `len` at `k·stride` in `buf`, `k = 0 … 3` (`stride >= len`).
#[inline(always)]
fn split4(buf: &mut [f32], stride: usize, len: usize) -> [&mut [f32]; M] {
    let mut it = buf.chunks_mut(stride).map(|c| &mut c[..len]);
    std::array::from_fn(|_| it.next().expect("buffer holds four rows"))
}

/// Elements per block of [`bt6`] and [`at6`]: fixed-size arrays that the compiler turns into
/// vector operations (8 lanes with AVX), with one bounds check per block instead of one per element.
const LANES: usize = 8;

/// `Bᵀ` of F(4, 3) applied to one column `a`.
#[inline(always)]
fn bt6_one(a: [f32; T]) -> [f32; T] {
    let [a0, a1, a2, a3, a4, a5] = a;
    [
        4.0 * a0 - 5.0 * a2 + a4,
        -4.0 * (a1 + a2) + a3 + a4,
        4.0 * (a1 - a2) - a3 + a4,
        2.0 * (a3 - a1) - a2 + a4,
        2.0 * (a1 - a3) - a2 + a4,
        4.0 * a1 - 5.0 * a3 + a5,
    ]
}

/// `Aᵀ` of F(4, 3) applied to one column `m`.
#[inline(always)]
fn at6_one(m: [f32; T]) -> [f32; M] {
    let [m0, m1, m2, m3, m4, m5] = m;
    let (a1p2, a1m2) = (m1 + m2, m1 - m2);
    let (a3p4, a3m4) = (m3 + m4, m3 - m4);
    [
        m0 + a1p2 + a3p4,
        a1m2 + 2.0 * a3m4,
        a1p2 + 4.0 * a3p4,
        a1m2 + 8.0 * a3m4 + m5,
    ]
}

/// `out[k][t] = f([inp[0][t], …, inp[I−1][t]])[k]` for every `t`, in blocks of [`LANES`]
/// (every element computed by the same operations as alone, so the blocking changes no bits).
#[inline(always)]
fn columns<const I: usize, const O: usize>(
    inp: &[&[f32]; I],
    out: &mut [&mut [f32]; O],
    f: impl Fn([f32; I]) -> [f32; O],
) {
    let n = inp[0].len();
    assert!(inp.iter().all(|s| s.len() >= n) && out.iter().all(|s| s.len() >= n));
    let mut t = 0;
    while t + LANES <= n {
        let block: [[f32; LANES]; I] = std::array::from_fn(|i| {
            let mut b = [0f32; LANES];
            b.copy_from_slice(&inp[i][t..t + LANES]);
            b
        });
        let mut res = [[0f32; LANES]; O];
        for j in 0..LANES {
            let r = f(std::array::from_fn(|i| block[i][j]));
            for k in 0..O {
                res[k][j] = r[k];
            }
        }
        for (o, r) in out.iter_mut().zip(&res) {
            o[t..t + LANES].copy_from_slice(r);
        }
        t += LANES;
    }
    for t in t..n {
        let r = f(std::array::from_fn(|i| inp[i][t]));
        for (o, v) in out.iter_mut().zip(r) {
            o[t] = v;
        }
    }
}

/// `o = Bᵀ d`, element-wise over the slices (all of one length).
#[inline(always)]
fn bt6(d: &[&[f32]; T], o: &mut [&mut [f32]; T]) {
    columns(d, o, bt6_one);
}

/// `o = Aᵀ m`, element-wise over the slices (all of one length).
#[inline(always)]
fn at6(m: &[&[f32]; T], o: &mut [&mut [f32]; M]) {
    columns(m, o, at6_one);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook definition, in f64.
    fn reference(
        x: &[f32],
        wt: &[f32],
        bias: &[f32],
        (cin, cout, h, w): (usize, usize, usize, usize),
    ) -> Vec<f64> {
        let mut out = vec![0f64; cout * h * w];
        for co in 0..cout {
            for y in 0..h {
                for xx in 0..w {
                    let mut s = bias.get(co).map_or(0.0, |&b| f64::from(b));
                    for ci in 0..cin {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = (y + ky, xx + kx);
                                if iy == 0 || ix == 0 || iy > h || ix > w {
                                    continue;
                                }
                                let v = x[(ci * h + iy - 1) * w + ix - 1];
                                s += f64::from(v)
                                    * f64::from(wt[((co * cin + ci) * 3 + ky) * 3 + kx]);
                            }
                        }
                    }
                    out[(co * h + y) * w + xx] = s;
                }
            }
        }
        out
    }

    fn check(cin: usize, cout: usize, h: usize, w: usize, bias: bool) {
        let x: Vec<f32> = (0..cin * h * w)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let wt: Vec<f32> = (0..cout * cin * 9)
            .map(|i| ((i * 104_729) % 997) as f32 / 997.0 - 0.5)
            .collect();
        let b: Vec<f32> = if bias {
            (0..cout).map(|i| i as f32 * 0.1 - 0.3).collect()
        } else {
            Vec::new()
        };
        let conv = Conv3::new(cin, cout, &wt, bias.then_some(&b[..]));
        let want = reference(&x, &wt, &b, (cin, cout, h, w));
        let res: Vec<f32> = (0..cout * h * w).map(|i| (i % 7) as f32 - 3.0).collect();
        for relu in [false, true] {
            let got = conv.forward_res(&x, h, w, Some(&res), relu);
            for (i, (&g, (&r, &e))) in got.iter().zip(want.iter().zip(&res)).enumerate() {
                let r = r + f64::from(e);
                let r = if relu { r.max(0.0) } else { r };
                assert!(
                    (f64::from(g) - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "{cin}->{cout} {h}x{w} relu {relu} + residual: element {i}: {g} vs {r}"
                );
            }
        }
        for relu in [false, true] {
            let got = conv.forward_res(&x, h, w, None, relu);
            assert_eq!(got.len(), want.len());
            for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                let r = if relu { r.max(0.0) } else { r };
                assert!(
                    (f64::from(g) - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "{cin}->{cout} {h}x{w} relu {relu}: element {i}: {g} vs {r}"
                );
            }
        }
    }

    /// The textbook stride-2 convolution, in f64.
    fn reference_s2(
        x: &[f32],
        wt: &[f32],
        bias: &[f32],
        (cin, cout, h, w): (usize, usize, usize, usize),
        (k, pad): (usize, usize),
    ) -> (usize, usize, Vec<f64>) {
        let (ho, wo) = ((h + 2 * pad - k) / 2 + 1, (w + 2 * pad - k) / 2 + 1);
        let mut out = vec![0f64; cout * ho * wo];
        for co in 0..cout {
            for y in 0..ho {
                for xx in 0..wo {
                    let mut s = bias.get(co).map_or(0.0, |&b| f64::from(b));
                    for ci in 0..cin {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (iy, ix) = (2 * y + ky, 2 * xx + kx);
                                if iy < pad || ix < pad || iy - pad >= h || ix - pad >= w {
                                    continue;
                                }
                                let v = x[(ci * h + iy - pad) * w + ix - pad];
                                s += f64::from(v)
                                    * f64::from(wt[((co * cin + ci) * k + ky) * k + kx]);
                            }
                        }
                    }
                    out[(co * ho + y) * wo + xx] = s;
                }
            }
        }
        (ho, wo, out)
    }

    #[test]
    fn stride_two_matches_the_definition() {
        for &(cin, cout, h, w, k, pad) in &[
            (3, 4, 8, 8, 3, 1),
            (2, 5, 7, 9, 3, 1),
            (3, 2, 1, 1, 3, 1),
            (4, 3, 6, 10, 2, 0),
            (2, 64, 6, 2050, 3, 1),
        ] {
            let x: Vec<f32> = (0..cin * h * w)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let wt: Vec<f32> = (0..cout * cin * k * k)
                .map(|i| ((i * 104_729) % 997) as f32 / 997.0 - 0.5)
                .collect();
            let b: Vec<f32> = (0..cout).map(|i| i as f32 * 0.1 - 0.3).collect();
            let conv = ConvS2::new(cin, cout, k, pad, &wt, Some(&b));
            let (ho, wo, want) = reference_s2(&x, &wt, &b, (cin, cout, h, w), (k, pad));
            assert_eq!(conv.out_size(h, w), Some((ho, wo)));
            let got = conv.forward(&x, h, w);
            assert_eq!(got.len(), want.len());
            for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(g) - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "{cin}->{cout} {h}x{w} k{k}: element {i}: {g} vs {r}"
                );
            }
        }
    }

    /// `f` applied to two columns of six inputs equals `mat` times them.
    fn agrees<const O: usize>(mat: &[[f32; T]; O], f: impl Fn(&[&[f32]; T], &mut [&mut [f32]; O])) {
        // Two blocks of `LANES` and a remainder; small integers, so every sum is exact.
        const N: usize = 2 * LANES + 3;
        let d: Vec<Vec<f32>> = (0..T)
            .map(|k| {
                (0..N)
                    .map(|t| ((k * 3 + t * 7) % 11) as f32 - 5.0)
                    .collect()
            })
            .collect();
        let mut o = vec![vec![0f32; N]; O];
        {
            let dd: [&[f32]; T] = std::array::from_fn(|k| &d[k][..]);
            let mut it = o.iter_mut();
            let mut oo: [&mut [f32]; O] = std::array::from_fn(|_| &mut it.next().unwrap()[..]);
            f(&dd, &mut oo);
        }
        for (row, got) in mat.iter().zip(&o) {
            for t in 0..N {
                let want: f32 = (0..T).map(|k| row[k] * d[k][t]).sum();
                assert_eq!(got[t], want);
            }
        }
    }

    #[test]
    fn row_interleaving_is_the_same_on_both_paths() {
        for tx in [1, 7, 8, 9, 16, 23, 64] {
            let row: Vec<f32> = (0..4 * tx + 2).map(|i| i as f32).collect();
            for avx in [false, true] {
                let mut q = vec![vec![-1f32; tx]; 4];
                {
                    let mut it = q.iter_mut();
                    let qq: [&mut [f32]; M] = std::array::from_fn(|_| &mut it.next().unwrap()[..]);
                    #[cfg(target_arch = "x86_64")]
                    if avx && std::is_x86_feature_detected!("avx2") {
                        unsafe { x86_avx_deinterleave(&row, qq, tx) };
                    } else {
                        deinterleave4::<false>(&row, qq, tx);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    deinterleave4::<false>(&row, qq, tx);
                }
                for (j, p) in q.iter().enumerate() {
                    for (tc, &v) in p.iter().enumerate() {
                        assert_eq!(v, (4 * tc + j) as f32, "tx {tx} avx {avx}");
                    }
                }
                let mut back = vec![0f32; 4 * tx];
                let y: [&[f32]; M] = std::array::from_fn(|j| &q[j][..]);
                #[cfg(target_arch = "x86_64")]
                if avx && std::is_x86_feature_detected!("avx2") {
                    unsafe { x86_avx_interleave(y, &mut back) };
                } else {
                    interleave4::<false>(y, &mut back);
                }
                #[cfg(not(target_arch = "x86_64"))]
                interleave4::<false>(y, &mut back);
                assert_eq!(back[..], row[..4 * tx], "tx {tx} avx {avx}");
            }
        }
    }

    /// `deinterleave4::<true>` compiled for AVX2, as `Conv3::band_avx2` runs it.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn x86_avx_deinterleave(row: &[f32], q: [&mut [f32]; M], tx: usize) {
        deinterleave4::<true>(row, q, tx)
    }

    /// `interleave4::<true>` compiled for AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn x86_avx_interleave(y: [&[f32]; M], out: &mut [f32]) {
        interleave4::<true>(y, out)
    }

    #[test]
    fn the_transforms_are_the_matrices() {
        agrees(&BT, bt6);
        agrees(&AT, at6);
    }

    #[test]
    fn blocked_transforms_give_the_bits_of_one_column_at_a_time() {
        for n in [0, 1, LANES - 1, LANES, 3 * LANES + 5] {
            let d: Vec<Vec<f32>> = (0..T)
                .map(|k| {
                    (0..n)
                        .map(|t| ((k * 7919 + t * 104_729) % 1009) as f32 / 97.0 - 5.1)
                        .collect()
                })
                .collect();
            let dd: [&[f32]; T] = std::array::from_fn(|k| &d[k][..]);
            let mut b = vec![vec![0f32; n]; T];
            let mut a = vec![vec![0f32; n]; M];
            {
                let mut it = b.iter_mut();
                let mut bb: [&mut [f32]; T] = std::array::from_fn(|_| &mut it.next().unwrap()[..]);
                bt6(&dd, &mut bb);
                let mut it = a.iter_mut();
                let mut aa: [&mut [f32]; M] = std::array::from_fn(|_| &mut it.next().unwrap()[..]);
                at6(&dd, &mut aa);
            }
            for t in 0..n {
                let col: [f32; T] = std::array::from_fn(|k| d[k][t]);
                let (wb, wa) = (bt6_one(col), at6_one(col));
                for k in 0..T {
                    assert_eq!(
                        b[k][t].to_bits(),
                        wb[k].to_bits(),
                        "Bt row {k}, column {t} of {n}"
                    );
                }
                for k in 0..M {
                    assert_eq!(
                        a[k][t].to_bits(),
                        wa[k].to_bits(),
                        "At row {k}, column {t} of {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn matches_the_definition_on_odd_shapes_and_many_bands() {
        check(3, 5, 1, 1, true);
        check(2, 3, 7, 5, false);
        check(4, 6, 1, 9, true);
        check(3, 2, 9, 1, true);
        // 64 output channels over 2,050 columns: one row per band, many bands.
        check(2, 64, 5, 2048, true);
    }
}

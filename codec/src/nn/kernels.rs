//! Fixed-order f32 kernels: dot products, matrix-vector and matrix-matrix products.
//!
//! # Operation order (part of the bitstream contract)
//!
//! Every reduction in the deterministic path is a [`dot`] of two equal-length slices, computed as
//! [`LANES`] = 8 independent running sums: element `i` is multiplied (one rounding) and then added
//! (one rounding) into lane `i % 8`, in increasing `i`. The eight lanes are then combined as
//! `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`. Each lane is an ordinary sequential IEEE-754
//! binary32 sum, so the compiler may execute the eight lanes with SIMD registers of any width (SSE2,
//! AVX2, NEON) or with scalar instructions and the result is the same bit for bit: vectorising
//! independent lanes never reorders a sum.
//!
//! Rust never contracts `a * b + c` into a fused multiply-add (LLVM's `fp-contract` is off for
//! Rust, and `f32::mul_add` is never called here), even when built with `-C target-cpu=native`;
//! the test `no_fused_multiply_add` checks this in whatever build runs it. Nothing here reads the
//! CPU's features at run time, spawns threads, or calls libm.
//!
//! On x86-64, [`Kernel::Lanes`] runs the matrix products through a copy of the same code compiled
//! with AVX enabled (`#[target_feature(enable = "avx")]`, chosen at run time when the CPU has it):
//! the eight lanes then sit in one 256-bit register instead of two 128-bit ones. FMA is never
//! enabled, so every product is still rounded before its add and the bits are unchanged; the
//! tests `avx_and_baseline_agree_bitwise` and `lanes_and_scalar_agree_bitwise` check this.
//!
//! [`Kernel::Scalar`] computes the same order with every operation hidden from the optimiser
//! (`std::hint::black_box`), so no SIMD is used at all; tests encode with [`Kernel::Lanes`] and
//! decode with [`Kernel::Scalar`] to prove that the SIMD path does not change a single bit.

use std::hint::black_box;

/// Number of independent partial sums in every reduction.
pub const LANES: usize = 8;

/// Which implementation of the (identical) operation order to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kernel {
    /// Eight-lane sums written so the compiler can vectorise them (the fast default).
    #[default]
    Lanes,
    /// The same order, one scalar operation at a time, opaque to the optimiser (slow; used by tests
    /// to show that vectorisation does not change results).
    Scalar,
}

#[inline(always)]
fn combine(acc: &[f32; LANES]) -> f32 {
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// Dot product of `a` and `b` in the documented lane order (only the common prefix is used if the
/// lengths differ).
///
/// ```
/// use unimic_codec::nn::kernels::dot;
/// assert_eq!(dot(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]), 32.0);
/// ```
#[inline(always)]
#[allow(clippy::needless_range_loop)] // explicit lanes: the loop shape is the specification
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    combine(&acc)
}

/// [`dot`] with every multiply and add performed one at a time (no SIMD); bit-identical to [`dot`].
#[allow(clippy::needless_range_loop)] // lane i % 8 is the specification
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0.0f32; LANES];
    for i in 0..n {
        let l = i % LANES;
        let p = black_box(black_box(a[i]) * black_box(b[i]));
        acc[l] = black_box(acc[l] + p);
    }
    combine(&acc)
}

/// [`dot`] or [`dot_scalar`], as `kernel` says.
#[inline]
pub fn dot_with(kernel: Kernel, a: &[f32], b: &[f32]) -> f32 {
    match kernel {
        Kernel::Lanes => dot(a, b),
        Kernel::Scalar => dot_scalar(a, b),
    }
}

/// Four dot products of `x` with `w0..w3` in one pass over `x` (register blocking); each result is
/// bit-identical to [`dot`] (same lanes, same order). The `w` rows must be as long as `x`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // explicit lanes: the loop shape is the specification
pub fn dot4(x: &[f32], w: [&[f32]; 4]) -> [f32; 4] {
    let n = x.len();
    let mut a0 = [0.0f32; LANES];
    let mut a1 = [0.0f32; LANES];
    let mut a2 = [0.0f32; LANES];
    let mut a3 = [0.0f32; LANES];
    let full = n / LANES * LANES;
    let it = x[..full]
        .chunks_exact(LANES)
        .zip(w[0][..full].chunks_exact(LANES))
        .zip(w[1][..full].chunks_exact(LANES))
        .zip(w[2][..full].chunks_exact(LANES))
        .zip(w[3][..full].chunks_exact(LANES));
    for ((((xs, r0), r1), r2), r3) in it {
        for l in 0..LANES {
            a0[l] += xs[l] * r0[l];
            a1[l] += xs[l] * r1[l];
            a2[l] += xs[l] * r2[l];
            a3[l] += xs[l] * r3[l];
        }
    }
    for i in full..n {
        let l = i - full;
        a0[l] += x[i] * w[0][i];
        a1[l] += x[i] * w[1][i];
        a2[l] += x[i] * w[2][i];
        a3[l] += x[i] * w[3][i];
    }
    [combine(&a0), combine(&a1), combine(&a2), combine(&a3)]
}

/// `y[o] = dot(x, w[o, ..]) + bias[o]` for a row-major `w` of shape `(y.len(), x.len())` (the layout
/// of a candle/PyTorch `Linear` weight). The bias is added after the dot product (one rounding).
pub fn linear(kernel: Kernel, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    let d_in = x.len();
    if d_in == 0 {
        for (o, yo) in y.iter_mut().enumerate() {
            *yo = bias.map_or(0.0, |b| b[o]);
        }
        return;
    }
    let d_out = y.len().min(w.len() / d_in);
    linear_rows(kernel, x, 1, d_in, w, bias, d_out, &mut y[..d_out]);
}

/// Selection of the instruction-set variant of the matrix products (x86-64 only).
#[cfg(target_arch = "x86_64")]
pub mod simd {
    use std::sync::atomic::{AtomicU8, Ordering};

    // 0: not probed yet, 1: baseline (SSE2), 2: AVX.
    static MODE: AtomicU8 = AtomicU8::new(0);

    /// Whether [`super::Kernel::Lanes`] uses the AVX variant (the CPU has AVX and it was not
    /// disabled with [`force_baseline`] or the environment variable `UNIMIC_NO_AVX`).
    pub fn avx_enabled() -> bool {
        match MODE.load(Ordering::Relaxed) {
            2 => true,
            1 => false,
            _ => {
                let on = std::env::var_os("UNIMIC_NO_AVX").is_none()
                    && std::arch::is_x86_feature_detected!("avx");
                MODE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
                on
            }
        }
    }

    /// Turns the AVX variant off (`true`) or back to automatic detection (`false`) for the whole
    /// process. Results do not depend on it; tests and benchmarks use it to compare the variants.
    pub fn force_baseline(baseline: bool) {
        MODE.store(if baseline { 1 } else { 0 }, Ordering::Relaxed);
    }
}

/// [`linear`] applied to each of the `rows` rows of `xs` (`rows × d_in`, row-major), writing
/// `ys` (`rows × d_out`). Every output element is the same [`dot`] (plus bias) as in [`linear`],
/// so the result equals `rows` separate calls of [`linear`] bit for bit.
///
/// [`Kernel::Lanes`] runs a blocked product: a register tile of two input rows by four weight
/// rows (eight eight-lane accumulators, each fed in increasing index order), weight rows visited
/// in cache-sized blocks while the input rows pass over them; compiled with AVX where the CPU has
/// it. Only the loop order changes, never the order within a dot product.
#[allow(clippy::too_many_arguments)]
pub fn linear_rows(
    kernel: Kernel,
    xs: &[f32],
    rows: usize,
    d_in: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    d_out: usize,
    ys: &mut [f32],
) {
    if d_in == 0 || kernel == Kernel::Scalar {
        linear_rows_reference(kernel, xs, rows, d_in, w, bias, d_out, ys);
    } else {
        super::fast::linear_rows(xs, rows, d_in, w, bias, d_out, ys);
    }
}

/// The definition of [`linear_rows`]: one [`dot_with`] per output element.
#[allow(clippy::too_many_arguments)]
fn linear_rows_reference(
    kernel: Kernel,
    xs: &[f32],
    rows: usize,
    d_in: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    d_out: usize,
    ys: &mut [f32],
) {
    for r in 0..rows {
        let x = &xs[r * d_in..(r + 1) * d_in];
        for o in 0..d_out {
            let s = if d_in == 0 {
                0.0
            } else {
                dot_with(kernel, x, &w[o * d_in..(o + 1) * d_in])
            };
            ys[r * d_out + o] = match bias {
                Some(b) if d_in == 0 => b[o],
                Some(b) => s + b[o],
                None => s,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = crate::nn::weights::splitmix64(s);
                ((s >> 40) as f32) * (1.0 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn lanes_and_scalar_agree_bitwise() {
        for n in [0, 1, 7, 8, 9, 63, 64, 65, 256, 1000] {
            let a = data(n, 1 + n as u64);
            let b = data(n, 1000 + n as u64);
            assert_eq!(
                dot(&a, &b).to_bits(),
                dot_scalar(&a, &b).to_bits(),
                "n = {n}"
            );
        }
    }

    #[test]
    fn dot4_equals_dot_bitwise() {
        for n in [0, 3, 8, 13, 64, 257] {
            let x = data(n, 7);
            let w: Vec<Vec<f32>> = (0..4).map(|j| data(n, 100 + j)).collect();
            let got = dot4(&x, [&w[0], &w[1], &w[2], &w[3]]);
            for j in 0..4 {
                assert_eq!(got[j].to_bits(), dot(&x, &w[j]).to_bits(), "n = {n}");
            }
        }
    }

    #[test]
    fn no_fused_multiply_add() {
        // Lane 0 sees -(1 + 2^-11) first, then a*a with a = 1 + 2^-12. Rounded separately a*a is
        // 1 + 2^-11 (the 2^-24 term is a tie broken to even) and the lane sums to exactly 0; a
        // fused multiply-add would keep the 2^-24.
        let a = 1.0f32 + f32::powi(2.0, -12);
        let c = 1.0f32 + f32::powi(2.0, -11);
        let mut x = vec![0.0f32; 9];
        let mut y = vec![0.0f32; 9];
        x[0] = 1.0;
        y[0] = -c;
        x[8] = a;
        y[8] = a;
        assert_eq!(dot(&x, &y), 0.0);
        assert_eq!(dot_scalar(&x, &y), 0.0);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx_and_baseline_agree_bitwise() {
        let (rows, d_in, d_out) = (7, 259, 67);
        let xs = data(rows * d_in, 11);
        let w = data(d_out * d_in, 12);
        let b = data(d_out, 13);
        let mut scalar = vec![0.0; rows * d_out];
        linear_rows(
            Kernel::Scalar,
            &xs,
            rows,
            d_in,
            &w,
            Some(&b),
            d_out,
            &mut scalar,
        );
        let run = |avx: bool| {
            let mut y = vec![0.0f32; rows * d_out];
            let (x, wp, bp, yp) = (xs.as_ptr(), w.as_ptr(), Some(b.as_ptr()), y.as_mut_ptr());
            // SAFETY: the sizes match; AVX is only used when the CPU has it.
            unsafe {
                if avx {
                    super::super::fast::gemm_avx(
                        x, d_in, rows, wp, d_in, d_out, d_in, bp, yp, d_out,
                    )
                } else {
                    super::super::fast::gemm::<super::super::lanes::Portable>(
                        x, d_in, rows, wp, d_in, d_out, d_in, bp, yp, d_out,
                    )
                }
            };
            y
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&run(false)), bits(&scalar));
        if std::arch::is_x86_feature_detected!("avx") {
            assert_eq!(bits(&run(true)), bits(&scalar));
        } else {
            println!("skipping the AVX half: this CPU has no AVX");
        }
    }

    #[test]
    fn linear_rows_equals_linear_per_row() {
        let (rows, d_in, d_out) = (5, 37, 41);
        let xs = data(rows * d_in, 3);
        let w = data(d_out * d_in, 4);
        let b = data(d_out, 5);
        let mut ys = vec![0.0; rows * d_out];
        linear_rows(Kernel::Lanes, &xs, rows, d_in, &w, Some(&b), d_out, &mut ys);
        for r in 0..rows {
            let mut y = vec![0.0; d_out];
            linear(
                Kernel::Scalar,
                &xs[r * d_in..(r + 1) * d_in],
                &w,
                Some(&b),
                &mut y,
            );
            for (o, v) in y.iter().enumerate() {
                assert_eq!(v.to_bits(), ys[r * d_out + o].to_bits());
            }
        }
    }
}

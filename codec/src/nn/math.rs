//! Deterministic elementwise functions: [`exp`], [`silu`], [`rms_norm`], [`softmax_in_place`].
//!
//! Only IEEE-754 basic operations are used (`+ - * /`, `sqrt`, `floor`, comparisons and bit
//! conversions), each of which is correctly rounded, hence identical on every conforming platform.
//! No libm transcendental is called: `f32::exp` and friends may differ in the last bit between
//! platforms and library versions.

use super::kernels::dot;

/// `ln 2` split in two for Cody–Waite range reduction: `LN2_HI` has few significant bits so that
/// `n * LN2_HI` is exact for every `|n| <= 127`.
pub(crate) const LN2_HI: f32 = 0.693_359_4; // = 355/512 exactly
/// `ln 2 - LN2_HI`.
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// `1 / ln 2`.
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// Below this, [`exp`] returns 0 (the true value is below 2^-125, near the smallest normal f32).
pub const EXP_MIN: f32 = -87.0;
/// Above this, [`exp`] returns infinity.
pub const EXP_MAX: f32 = 88.0;

/// Deterministic `e^x` for f32 (relative error below 3e-7 in the normal range).
///
/// Algorithm (the specification; changing it changes coded bits):
/// 1. NaN is returned unchanged; `x < -87` gives `0.0`; `x > 88` gives `+inf`.
/// 2. `n = floor(x * log2(e) + 0.5)` (nearest integer, ties up), `r = (x - n*LN2_HI) - n*LN2_LO`
///    with `LN2_HI = 0.693359375`, `LN2_LO = -2.12194440e-4` (f32), so `|r| <= 0.35`.
/// 3. `p = 1 + r(1 + r(1/2 + r(1/6 + r(1/24 + r(1/120 + r(1/720 + r/5040))))))`, Horner order,
///    each coefficient rounded to f32, every product and sum rounded separately (no FMA).
/// 4. The result is `p * 2^n`, with `2^n` built from its exponent bits (`-126 <= n <= 127`).
///
/// ```
/// use unimic_codec::nn::math::exp;
/// assert_eq!(exp(0.0), 1.0);
/// assert!((exp(1.0) - std::f32::consts::E).abs() < 1e-6);
/// assert_eq!(exp(-100.0), 0.0);
/// ```
#[inline]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x < EXP_MIN {
        return 0.0;
    }
    if x > EXP_MAX {
        return f32::INFINITY;
    }
    let n = (x * LOG2E + 0.5).floor();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n is an integer in [-126, 127] here, so the cast is exact and the exponent field is valid.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// SiLU (swish) `x * sigmoid(x)`, computed as `x / (1 + exp(-x))` with the deterministic [`exp`].
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Epsilon added to the mean square in [`rms_norm`].
pub const RMS_EPS: f32 = 1e-5;

/// RMS normalisation: `out[i] = (x[i] * inv) * w[i]` with
/// `inv = 1 / sqrt(dot(x, x) / len + RMS_EPS)` (`dot` in the lane order of
/// [`super::kernels::dot`]).
pub fn rms_norm(x: &[f32], w: &[f32], out: &mut [f32]) {
    let d = x.len();
    let ms = dot(x, x) / d.max(1) as f32;
    let inv = 1.0 / (ms + RMS_EPS).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = (xi * inv) * wi;
    }
}

/// Softmax in place: `m = max`, `e[i] = exp(s[i] - m)`, `sum` accumulated sequentially in index
/// order, `s[i] = e[i] / sum`. NaNs are ignored when taking the maximum.
pub fn softmax_in_place(s: &mut [f32]) {
    let mut m = f32::NEG_INFINITY;
    for &v in s.iter() {
        if v > m {
            m = v;
        }
    }
    if m == f32::NEG_INFINITY {
        return;
    }
    let mut sum = 0.0f32;
    for v in s.iter_mut() {
        *v = exp(*v - m);
        sum += *v;
    }
    for v in s.iter_mut() {
        *v /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut x = -87.0f32;
        let mut worst = 0.0f64;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.013_7;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(-87.5), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-86.9) > 0.0);
    }

    /// Golden values: any change to the algorithm changes these bits (and coded streams).
    #[test]
    fn exp_golden_bits() {
        let xs = [-10.0f32, -1.0, -0.25, 0.1, 2.5];
        let bits: Vec<u32> = xs.iter().map(|&x| exp(x).to_bits()).collect();
        let again: Vec<u32> = xs
            .iter()
            .map(|&x| std::hint::black_box(exp(std::hint::black_box(x))).to_bits())
            .collect();
        assert_eq!(bits, again);
        assert_eq!(bits, GOLDEN_EXP_BITS);
    }

    const GOLDEN_EXP_BITS: [u32; 5] = [943614926, 1052531378, 1061642109, 1066235454, 1094904703];

    #[test]
    fn softmax_sums_to_one() {
        let mut s = vec![1.0, 2.0, 3.0, -1e30, f32::NEG_INFINITY];
        softmax_in_place(&mut s);
        let t: f32 = s.iter().sum();
        assert!((t - 1.0).abs() < 1e-6);
        assert_eq!(s[4], 0.0);
    }
}

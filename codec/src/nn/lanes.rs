//! The eight-lane vector [`V8`] that the blocked kernels of [`super::fast`] are written against,
//! and its implementations: [`Portable`] (plain `[f32; 8]`, vectorised by the compiler where it
//! can) and, on x86-64, `Avx` (one 256-bit register, used from functions compiled with AVX).
//!
//! Every operation is an elementwise IEEE-754 binary32 operation (`+ - * /`, comparisons, exact
//! `floor`, exact power-of-two construction) or a horizontal combine in the fixed tree of
//! [`super::kernels`]; so the two implementations give the same bits, which the tests check. No
//! fused multiply-add is ever emitted: AVX is enabled without FMA.

// Lane loops index several arrays at once.
#![allow(clippy::needless_range_loop)]

use super::kernels::LANES;

/// A vector of eight f32 lanes. The methods are `unsafe` because the AVX implementation may only
/// run on a CPU with AVX (callers guarantee it) and the loads and stores take raw pointers.
pub(crate) trait V8: Copy {
    /// Whether register tiles take two input rows at once (enough registers for eight
    /// accumulators) or one. A blocking choice only: it never changes a result.
    const PAIR_ROWS: bool;
    /// All lanes `+0.0`.
    unsafe fn zero() -> Self;
    /// All lanes `v`.
    unsafe fn splat(v: f32) -> Self;
    /// Loads eight lanes from `p` (unaligned).
    unsafe fn load(p: *const f32) -> Self;
    /// Loads lanes `0..n` (`n < 8`) from `p`; the other lanes are `+0.0`, and nothing past `n` is
    /// read.
    unsafe fn load_part(p: *const f32, n: usize) -> Self;
    /// Stores eight lanes to `p`.
    unsafe fn store(self, p: *mut f32);
    /// Stores lanes `0..n` (`n < 8`) to `p`.
    unsafe fn store_part(self, p: *mut f32, n: usize);
    /// `self + o`, lane by lane.
    unsafe fn add(self, o: Self) -> Self;
    /// `self - o`, lane by lane.
    unsafe fn sub(self, o: Self) -> Self;
    /// `self * o`, lane by lane.
    unsafe fn mul(self, o: Self) -> Self;
    /// `self / o`, lane by lane.
    unsafe fn div(self, o: Self) -> Self;
    /// `-self` (the sign bit flipped, exactly like scalar negation).
    unsafe fn neg(self) -> Self;
    /// Exact `floor` of lanes with `|x| < 2^31` (other lanes: unspecified, callers mask them).
    unsafe fn floor(self) -> Self;
    /// `2^n` for integer-valued lanes `n` in `-126..=127`, built from the exponent bits (other
    /// lanes: unspecified).
    unsafe fn pow2(self) -> Self;
    /// Lanes where `self < o` (false for NaN), as a mask for [`V8::select`].
    unsafe fn lt(self, o: Self) -> Self;
    /// Lanes where `self > o` (false for NaN).
    unsafe fn gt(self, o: Self) -> Self;
    /// Lanes that are NaN.
    unsafe fn is_nan(self) -> Self;
    /// `mask ? a : b`, lane by lane (`mask` from a comparison).
    unsafe fn select(mask: Self, a: Self, b: Self) -> Self;
    /// The lanes as an array.
    unsafe fn to_array(self) -> [f32; LANES];
    /// The combine tree `((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))` of four vectors at once.
    unsafe fn combine4(a: Self, b: Self, c: Self, d: Self) -> [f32; 4];
    /// The combine tree of one vector.
    #[inline(always)]
    unsafe fn combine1(self) -> f32 {
        let l = self.to_array();
        ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
    }
}

/// Exact floor of an f32 with `|x| < 2^31` through an integer conversion, without libm (the
/// baseline x86-64 target has no `roundss`, and `f32::floor` would call `floorf`).
#[inline(always)]
fn floor_exact(x: f32) -> f32 {
    if x.is_nan() || x.abs() >= 8_388_608.0 || x == 0.0 {
        // 2^23 and above (or NaN, or a zero of either sign): already an integer.
        return x;
    }
    let t = x as i32 as f32; // truncation toward zero, exact below 2^23
    if t > x {
        t - 1.0
    } else {
        t
    }
}

/// Eight lanes in a plain array: the portable implementation (the compiler maps it to whatever
/// vector registers the target has).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable([f32; LANES]);

macro_rules! lanewise {
    ($a:expr, $b:expr, |$x:ident, $y:ident| $e:expr) => {{
        let (a, b) = ($a.0, $b.0);
        let mut r = [0.0f32; LANES];
        for l in 0..LANES {
            let ($x, $y) = (a[l], b[l]);
            r[l] = $e;
        }
        Portable(r)
    }};
}

const TRUE: f32 = f32::from_bits(u32::MAX);

impl V8 for Portable {
    // Eight accumulators of two 128-bit registers each would spill on SSE2.
    const PAIR_ROWS: bool = false;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Portable([0.0; LANES])
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Portable([v; LANES])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Portable(std::ptr::read_unaligned(p as *const [f32; LANES]))
    }
    #[inline(always)]
    unsafe fn load_part(p: *const f32, n: usize) -> Self {
        let mut r = [0.0f32; LANES];
        for (l, v) in r.iter_mut().enumerate().take(n) {
            *v = *p.add(l);
        }
        Portable(r)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        std::ptr::write_unaligned(p as *mut [f32; LANES], self.0);
    }
    #[inline(always)]
    unsafe fn store_part(self, p: *mut f32, n: usize) {
        for (l, &v) in self.0.iter().enumerate().take(n) {
            *p.add(l) = v;
        }
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        lanewise!(self, o, |x, y| x + y)
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        lanewise!(self, o, |x, y| x - y)
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        lanewise!(self, o, |x, y| x * y)
    }
    #[inline(always)]
    unsafe fn div(self, o: Self) -> Self {
        lanewise!(self, o, |x, y| x / y)
    }
    #[inline(always)]
    unsafe fn neg(self) -> Self {
        lanewise!(self, self, |x, _y| -x)
    }
    #[inline(always)]
    unsafe fn floor(self) -> Self {
        lanewise!(self, self, |x, _y| floor_exact(x))
    }
    #[inline(always)]
    unsafe fn pow2(self) -> Self {
        lanewise!(self, self, |n, _y| f32::from_bits(
            ((n as i32).wrapping_add(127) as u32) << 23
        ))
    }
    #[inline(always)]
    unsafe fn lt(self, o: Self) -> Self {
        lanewise!(self, o, |x, y| if x < y { TRUE } else { 0.0 })
    }
    #[inline(always)]
    unsafe fn gt(self, o: Self) -> Self {
        lanewise!(self, o, |x, y| if x > y { TRUE } else { 0.0 })
    }
    #[inline(always)]
    unsafe fn is_nan(self) -> Self {
        lanewise!(self, self, |x, _y| if x.is_nan() { TRUE } else { 0.0 })
    }
    #[inline(always)]
    unsafe fn select(mask: Self, a: Self, b: Self) -> Self {
        let mut r = [0.0f32; LANES];
        for l in 0..LANES {
            r[l] = if mask.0[l].to_bits() != 0 {
                a.0[l]
            } else {
                b.0[l]
            };
        }
        Portable(r)
    }
    #[inline(always)]
    unsafe fn to_array(self) -> [f32; LANES] {
        self.0
    }
    #[inline(always)]
    unsafe fn combine4(a: Self, b: Self, c: Self, d: Self) -> [f32; 4] {
        [a.combine1(), b.combine1(), c.combine1(), d.combine1()]
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx::Avx;

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{LANES, V8};
    use std::arch::x86_64::*;

    /// Eight lanes in one 256-bit AVX register. Only used inside functions compiled with
    /// `#[target_feature(enable = "avx")]`, called after checking that the CPU has AVX.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx(__m256);

    #[inline(always)]
    unsafe fn part_mask(n: usize) -> __m256i {
        // Lane l is on when l < n.
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let lim = _mm256_set1_epi32(n as i32);
        // AVX1 has no 256-bit integer compare: compare as floats (exact for these small values).
        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(
            _mm256_cvtepi32_ps(idx),
            _mm256_cvtepi32_ps(lim),
        ))
    }

    impl V8 for Avx {
        const PAIR_ROWS: bool = true;
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx(_mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            Avx(_mm256_set1_ps(v))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx(_mm256_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize) -> Self {
            Avx(_mm256_maskload_ps(p, part_mask(n)))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn store_part(self, p: *mut f32, n: usize) {
            _mm256_maskstore_ps(p, part_mask(n), self.0)
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            Avx(_mm256_add_ps(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            Avx(_mm256_sub_ps(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            Avx(_mm256_mul_ps(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn div(self, o: Self) -> Self {
            Avx(_mm256_div_ps(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn neg(self) -> Self {
            Avx(_mm256_xor_ps(self.0, _mm256_set1_ps(-0.0)))
        }
        #[inline(always)]
        unsafe fn floor(self) -> Self {
            Avx(_mm256_floor_ps(self.0))
        }
        #[inline(always)]
        unsafe fn pow2(self) -> Self {
            let n = _mm256_cvttps_epi32(self.0);
            let (lo, hi) = (_mm256_castsi256_si128(n), _mm256_extractf128_si256::<1>(n));
            let b = _mm_set1_epi32(127);
            let lo = _mm_slli_epi32::<23>(_mm_add_epi32(lo, b));
            let hi = _mm_slli_epi32::<23>(_mm_add_epi32(hi, b));
            Avx(_mm256_castsi256_ps(_mm256_set_m128i(hi, lo)))
        }
        #[inline(always)]
        unsafe fn lt(self, o: Self) -> Self {
            Avx(_mm256_cmp_ps::<_CMP_LT_OQ>(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn gt(self, o: Self) -> Self {
            Avx(_mm256_cmp_ps::<_CMP_GT_OQ>(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn is_nan(self) -> Self {
            Avx(_mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0))
        }
        #[inline(always)]
        unsafe fn select(mask: Self, a: Self, b: Self) -> Self {
            Avx(_mm256_blendv_ps(b.0, a.0, mask.0))
        }
        #[inline(always)]
        unsafe fn to_array(self) -> [f32; LANES] {
            let mut r = [0.0f32; LANES];
            _mm256_storeu_ps(r.as_mut_ptr(), self.0);
            r
        }
        #[inline(always)]
        unsafe fn combine4(a: Self, b: Self, c: Self, d: Self) -> [f32; 4] {
            // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]; a second
            // hadd forms (l0+l1)+(l2+l3) in the low half and (l4+l5)+(l6+l7) in the high half of
            // each of a..d; adding the halves is the last level of the tree. (Each add is one
            // IEEE addition; operand order within an addition does not change its value.)
            let ab = _mm256_hadd_ps(a.0, b.0);
            let cd = _mm256_hadd_ps(c.0, d.0);
            let t = _mm256_hadd_ps(ab, cd);
            let s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
            let mut r = [0.0f32; 4];
            _mm_storeu_ps(r.as_mut_ptr(), s);
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_exact_matches_floor() {
        for &x in &[
            0.0f32,
            -0.0,
            0.5,
            -0.5,
            1.0,
            -1.0,
            1.5,
            -1.5,
            2.999_999_8,
            -2.999_999_8,
            126.5,
            -125.7,
            8_388_607.5,
            -8_388_607.5,
            8_388_608.0,
            1e20,
            -1e20,
            0.499_999_97,
        ] {
            assert_eq!(floor_exact(x).to_bits(), x.floor().to_bits(), "{x}");
        }
        assert!(floor_exact(f32::NAN).is_nan());
    }
}

//! Entropy models: for each next symbol, an integer-quantized distribution over an alphabet of at
//! most 2^16 symbols in which every symbol has non-zero probability.
//!
//! # The quantization rule (wire format; see docs/CODING.md)
//!
//! Every model in this crate, and every later learned model, produces **non-negative integer
//! weights** `w_0 .. w_{K-1}` (`u64`, with `W = Σ w_i < 2^64`) for an alphabet of `K` symbols,
//! `1 <= K <= 65_536`. The coder does not see the weights; it sees the cumulative frequencies
//!
//! ```text
//! M    = 2^PRECISION - K                  (PRECISION = 24)
//! P(i) = w_0 + ... + w_{i-1}              (P(0) = 0, P(K) = W)
//! C(i) = i + floor(P(i) * M / W)          (exact integer arithmetic, 128-bit intermediate)
//! ```
//!
//! so `C(0) = 0`, `C(K) = 2^24`, and symbol `i` gets frequency `f_i = C(i+1) - C(i) >= 1`: every
//! symbol keeps at least one unit of `2^-24` whatever the model believes, and the rounding loses at
//! most one unit per symbol. If `W = 0` the weights are replaced by all ones (uniform). There is no
//! remainder to distribute and no floating point: two machines that agree on the integer weights
//! agree on every frequency. Because `C` only needs prefix sums, a model with a cheap prefix-sum
//! structure (a Fenwick tree, a sparse count list) never builds a table over the whole alphabet.
//!
//! An alphabet of one symbol carries no information: it is never passed to the range coder (zero
//! bits), see [`crate::coder`].
//!
//! # Models
//! - [`Uniform`]: `log2 K` bits per token.
//! - [`Static`]: order-0 frequencies learned from training tokens, stored in a small file.
//! - [`AdaptiveGrid`]: counts conditioned on already-coded neighbours in a token grid, blended
//!   and updated while coding.
//! - [`AdaptiveText`]: order-2/order-1/order-0 counts over text token ids seen in the session,
//!   with an escape for new ids.

mod adaptive_grid;
mod adaptive_text;
mod fenwick;
mod static_model;
mod uniform;

pub mod cursor;
pub mod generic;
pub mod ladder;
pub mod masked;
pub mod sample;
pub mod text_cond;
#[cfg(feature = "vq")]
pub mod train;

pub use adaptive_grid::AdaptiveGrid;
pub use adaptive_text::{AdaptiveText, TextPrior};
pub use static_model::{Static, StaticError};
pub use uniform::Uniform;

pub(crate) use fenwick::Fenwick;

use constriction::stream::model::{DecoderModel, EncoderModel, EntropyModel};
use std::num::NonZeroU32;

/// Bits of fixed-point precision of every quantized distribution (constriction's default).
pub const PRECISION: u32 = 24;

/// `2^PRECISION`: the sum of the frequencies of every quantized distribution.
pub const TOTAL: u32 = 1 << PRECISION;

/// Largest alphabet a single coded symbol may have.
pub const MAX_ALPHABET: u32 = 1 << 16;

/// An integer-quantized distribution over the symbols `0..alphabet_size()`.
///
/// Implementations follow the rule in the [module docs](self): `cumulative(0) == 0`,
/// `cumulative(K) == TOTAL`, and `cumulative` is strictly increasing.
pub trait Distribution {
    /// Number of symbols `K` (`1..=MAX_ALPHABET`).
    fn alphabet_size(&self) -> u32;

    /// `C(i)`, the sum of the frequencies of the symbols below `i`, for `i` in `0..=K`.
    fn cumulative(&self, i: u32) -> u32;

    /// The symbol `s` with `C(s) <= q < C(s+1)`, for `q < TOTAL`. The default is a binary search
    /// over [`cumulative`](Self::cumulative).
    fn symbol_at(&self, q: u32) -> u32 {
        let (mut lo, mut hi) = (0u32, self.alphabet_size());
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.cumulative(mid) <= q {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

/// Prefix sums of integer weights: what a model exposes so that [`Quantized`] can apply the
/// quantization rule lazily.
pub trait WeightPrefix {
    /// Alphabet size `K`.
    fn len(&self) -> u32;
    /// `P(i) = w_0 + ... + w_{i-1}` for `i` in `0..=K`; must be non-decreasing, `P(K) < 2^64`.
    fn prefix(&self, i: u32) -> u64;
    /// True when the alphabet is empty (never for a valid model).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The largest `i` in `0..len()` with `ok(i, prefix(i))`, for a predicate that holds at
    /// `i = 0` and is monotone (true up to some point, false after): what decoding searches for.
    /// The default is a binary search calling [`prefix`](Self::prefix) at each probe; a model
    /// whose prefix sums come from a tree overrides it with one descent.
    fn search(&self, ok: &mut dyn FnMut(u32, u64) -> bool) -> u32 {
        let (mut lo, mut hi) = (0u32, self.len());
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if ok(mid, self.prefix(mid)) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

/// Applies the quantization rule to a [`WeightPrefix`]: `C(i) = i + floor(P(i) * M / W)`.
#[derive(Debug, Clone)]
pub struct Quantized<P> {
    prefix: P,
    k: u32,
    total_weight: u64,
}

impl<P: WeightPrefix> Quantized<P> {
    /// Wraps prefix sums. `prefix.len()` must be in `1..=MAX_ALPHABET` (it is clamped otherwise).
    pub fn new(prefix: P) -> Self {
        let k = prefix.len().clamp(1, MAX_ALPHABET);
        let total_weight = prefix.prefix(k);
        Self {
            prefix,
            k,
            total_weight,
        }
    }

    /// The wrapped prefix sums.
    pub fn inner(&self) -> &P {
        &self.prefix
    }
}

/// `C(i)` from the rule, given `P(i)`, `W` and `K`.
#[inline]
pub fn quantized_cumulative(i: u32, prefix_i: u64, total_weight: u64, k: u32) -> u32 {
    let m = u128::from(TOTAL - k);
    if total_weight == 0 {
        // Uniform: weights all one, P(i) = i, W = K.
        return i + ((u128::from(i) * m) / u128::from(k)) as u32;
    }
    i + ((u128::from(prefix_i) * m) / u128::from(total_weight)) as u32
}

impl<P: WeightPrefix> Distribution for Quantized<P> {
    fn alphabet_size(&self) -> u32 {
        self.k
    }

    fn cumulative(&self, i: u32) -> u32 {
        let i = i.min(self.k);
        if i == self.k {
            return TOTAL;
        }
        quantized_cumulative(i, self.prefix.prefix(i), self.total_weight, self.k)
    }

    /// The symbol `s` with `C(s) <= q < C(s+1)` through [`WeightPrefix::search`], without a
    /// division: `C(i) <= q` exactly when `i <= q` and `P(i) * M < (q - i + 1) * W`.
    fn symbol_at(&self, q: u32) -> u32 {
        if self.total_weight == 0 || self.k <= 1 {
            // Uniform (or a single symbol): the plain search over `C`.
            let (mut lo, mut hi) = (0u32, self.k);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if self.cumulative(mid) <= q {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            return lo;
        }
        let m = u128::from(TOTAL - self.k);
        let w = u128::from(self.total_weight);
        self.prefix
            .search(&mut |i, p| i <= q && u128::from(p) * m < (u128::from(q - i) + 1) * w)
    }
}

/// Dense weights held in a prefix-sum table: for models (such as later learned ones) that produce
/// a weight for every symbol anyway.
#[derive(Debug, Clone)]
pub struct DenseWeights {
    prefix: Vec<u64>,
}

impl DenseWeights {
    /// Builds prefix sums from weights. Sums saturate at `u64::MAX / 2` so `W < 2^64` holds.
    pub fn new(weights: impl IntoIterator<Item = u64>) -> Self {
        let mut prefix = vec![0u64];
        let mut acc = 0u64;
        for w in weights {
            acc = acc.saturating_add(w).min(u64::MAX / 2);
            prefix.push(acc);
        }
        Self { prefix }
    }
}

impl WeightPrefix for DenseWeights {
    fn len(&self) -> u32 {
        (self.prefix.len() - 1) as u32
    }
    fn prefix(&self, i: u32) -> u64 {
        self.prefix[(i as usize).min(self.prefix.len() - 1)]
    }
}

/// Quantized distribution with a dense prefix table: `O(1)` cumulative, `O(log K)` decoding.
pub type Dense = Quantized<DenseWeights>;

impl Dense {
    /// Quantizes the given weights (see the rule in the [module docs](self)).
    ///
    /// ```
    /// use unimic_codec::entropy::{Dense, Distribution, TOTAL};
    /// let d = Dense::from_weights([3u64, 0, 1]);
    /// assert_eq!(d.cumulative(0), 0);
    /// assert!(d.cumulative(2) > d.cumulative(1)); // symbol 1 keeps a non-zero frequency
    /// assert_eq!(d.cumulative(3), TOTAL);
    /// ```
    pub fn from_weights(weights: impl IntoIterator<Item = u64>) -> Self {
        Quantized::new(DenseWeights::new(weights))
    }
}

/// Adapter that lets constriction's range coder call a [`Distribution`].
pub(crate) struct ConstrictionModel<'a, D: ?Sized>(pub(crate) &'a D);

impl<D: Distribution + ?Sized> EntropyModel<24> for ConstrictionModel<'_, D> {
    type Symbol = u32;
    type Probability = u32;
}

impl<D: Distribution + ?Sized> EncoderModel<24> for ConstrictionModel<'_, D> {
    fn left_cumulative_and_probability(
        &self,
        symbol: impl core::borrow::Borrow<u32>,
    ) -> Option<(u32, NonZeroU32)> {
        let s = *symbol.borrow();
        if s >= self.0.alphabet_size() {
            return None;
        }
        let left = self.0.cumulative(s);
        let right = self.0.cumulative(s + 1);
        NonZeroU32::new(right.checked_sub(left)?).map(|p| (left, p))
    }
}

impl<D: Distribution + ?Sized> DecoderModel<24> for ConstrictionModel<'_, D> {
    fn quantile_function(&self, quantile: u32) -> (u32, u32, NonZeroU32) {
        let s = self.0.symbol_at(quantile.min(TOTAL - 1));
        let left = self.0.cumulative(s);
        let right = self.0.cumulative(s + 1);
        // A distribution that follows the rule has right > left; a faulty one desynchronizes the
        // decoder (wrong tokens) instead of panicking.
        (
            s,
            left,
            NonZeroU32::new(right.saturating_sub(left)).unwrap_or(NonZeroU32::MIN),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_is_exact_and_leaves_no_zero() {
        let d = Dense::from_weights([u64::MAX / 4, 0, 0, 1, 0]);
        let mut prev = 0;
        for i in 1..=5 {
            let c = d.cumulative(i);
            assert!(c > prev, "symbol {} has zero frequency", i - 1);
            prev = c;
        }
        assert_eq!(prev, TOTAL);
        // C(1) = 1 + floor(a * M / (a + 1)) = M = TOTAL - 5; the four others get one unit each,
        // except symbol 3 (weight 1), which gets two.
        assert_eq!(d.cumulative(1), TOTAL - 5);
        assert_eq!(d.cumulative(4) - d.cumulative(3), 2);
    }

    #[test]
    fn zero_weights_mean_uniform() {
        let d = Dense::from_weights([0u64; 4]);
        assert_eq!(d.cumulative(1), TOTAL / 4);
        assert_eq!(d.cumulative(2), TOTAL / 2);
    }

    #[test]
    fn symbol_at_inverts_cumulative() {
        let d = Dense::from_weights((0..300u64).map(|i| (i * 7919) % 101));
        for s in 0..300 {
            let (l, r) = (d.cumulative(s), d.cumulative(s + 1));
            assert_eq!(d.symbol_at(l), s);
            assert_eq!(d.symbol_at(r - 1), s);
        }
    }
}

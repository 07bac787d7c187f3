//! The range coder: constriction's queue (range) coder with the crate's own byte serialization
//! and a short termination.
//!
//! # Bitstream (see docs/CODING.md)
//! The coder is constriction 0.5's `DefaultRangeEncoder`: 32-bit words, a 64-bit state
//! (`lower`, `range`), `PRECISION = 24`. For each symbol with cumulative `C(s)` and frequency
//! `f_s` it sets `scale = range >> 24`, `lower += scale * C(s)`, `range = scale * f_s`, and
//! when `range < 2^32` it shifts one 32-bit word out of `lower` (with carry handling). The
//! payload is the emitted words in order, each written **big-endian**, so the payload is the
//! binary expansion of a number in `[0, 1)`; then a termination instead of constriction's
//! one- or two-word seal:
//!
//! * let `L`, `R` be the final state; choose the smallest `m` in `0..=8` such that
//!   `v = ceil(L / 2^(64-8m)) * 2^(64-8m) < L + R` (exact arithmetic);
//! * if words are held back for a pending carry (constriction's "inverted" situation:
//!   `first` then `n-1` words), write `first` then `n-1` words `0xFFFF_FFFF`; if `v >= 2^64`,
//!   add one to the whole byte string written so far (the carry);
//! * write the top `m` bytes of `v mod 2^64`;
//! * finally drop every trailing zero byte of the payload.
//!
//! The decoder pads the payload with zero bytes to a whole number of words and reads zero words
//! past the end, so the payload denotes exactly the number `v` the encoder chose, inside the
//! final interval. An empty message (no symbols) is an empty payload. Symbols whose alphabet has
//! one element are not coded at all.

use crate::entropy::{ConstrictionModel, Distribution, MAX_ALPHABET, PRECISION};
use constriction::stream::queue::{DefaultRangeDecoder, DefaultRangeEncoder, EncoderSituation};
use constriction::stream::{Decode, Encode};
use thiserror::Error;

/// Why a symbol could not be coded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodeError {
    /// The symbol is not in the distribution's alphabet.
    #[error("symbol {symbol} is outside the alphabet of {alphabet} symbols")]
    SymbolOutOfRange {
        /// The symbol.
        symbol: u32,
        /// The alphabet size.
        alphabet: u32,
    },
    /// The alphabet is empty or larger than 2^16.
    #[error("alphabet of {0} symbols is outside 1..=65536")]
    BadAlphabet(u32),
    /// The payload does not decode under the model (corrupt, truncated or a model mismatch).
    #[error("payload is not a valid range-coder stream for this model")]
    InvalidData,
}

/// Encodes symbols, each with its own [`Distribution`], into a byte payload.
///
/// ```
/// use unimic_codec::coder::{Decoder, Encoder};
/// use unimic_codec::entropy::Uniform;
/// let mut enc = Encoder::new();
/// for s in [3u32, 1, 4, 1, 5] {
///     enc.encode(s, &Uniform::new(10)).unwrap();
/// }
/// let bytes = enc.finish();
/// let mut dec = Decoder::new(&bytes);
/// let back: Vec<u32> = (0..5).map(|_| dec.decode(&Uniform::new(10)).unwrap()).collect();
/// assert_eq!(back, [3, 1, 4, 1, 5]);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Encoder {
    inner: DefaultRangeEncoder,
    cross_entropy_bits: f64,
    symbols: u64,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Encodes `symbol` under `dist`.
    pub fn encode<D: Distribution + ?Sized>(
        &mut self,
        symbol: u32,
        dist: &D,
    ) -> Result<(), CodeError> {
        let k = dist.alphabet_size();
        if k == 0 || k > MAX_ALPHABET {
            return Err(CodeError::BadAlphabet(k));
        }
        if symbol >= k {
            return Err(CodeError::SymbolOutOfRange {
                symbol,
                alphabet: k,
            });
        }
        self.symbols += 1;
        if k == 1 {
            return Ok(());
        }
        let freq = dist.cumulative(symbol + 1) - dist.cumulative(symbol);
        self.cross_entropy_bits += f64::from(PRECISION) - f64::from(freq).log2();
        self.inner
            .encode_symbol(symbol, ConstrictionModel(dist))
            .map_err(|_| CodeError::SymbolOutOfRange {
                symbol,
                alphabet: k,
            })
    }

    /// `Σ -log2 p` over the symbols encoded so far, with `p` the quantized probabilities: the
    /// size an ideal coder would reach.
    pub fn cross_entropy_bits(&self) -> f64 {
        self.cross_entropy_bits
    }

    /// Number of symbols encoded (including one-symbol alphabets, which cost nothing).
    pub fn symbols(&self) -> u64 {
        self.symbols
    }

    /// Terminates the stream and returns the payload (see the [module docs](self)).
    pub fn finish(self) -> Vec<u8> {
        let (words, state, situation) = self.inner.into_raw_parts();
        let mut out = Vec::with_capacity(words.len() * 4 + 12);
        for w in &words {
            out.extend_from_slice(&w.to_be_bytes());
        }
        let lower = u128::from(state.lower());
        let upper = lower + u128::from(state.range().get());
        let (m, v) = (0..=8u32)
            .map(|m| {
                let g = 1u128 << (64 - 8 * m);
                (m, lower.div_ceil(g) * g)
            })
            .find(|&(_, v)| v < upper)
            .unwrap_or((8, lower));
        if let EncoderSituation::Inverted(n, first) = situation {
            out.extend_from_slice(&first.to_be_bytes());
            for _ in 1..n.get() {
                out.extend_from_slice(&u32::MAX.to_be_bytes());
            }
        }
        if v >> 64 != 0 {
            for b in out.iter_mut().rev() {
                let (sum, overflow) = b.overflowing_add(1);
                *b = sum;
                if !overflow {
                    break;
                }
            }
        }
        let v64 = (v as u64).to_be_bytes();
        out.extend_from_slice(&v64[..m as usize]);
        while out.last() == Some(&0) {
            out.pop();
        }
        out
    }
}

/// Decodes symbols from a payload written by [`Encoder`], given the same distributions in the
/// same order.
///
/// Decoding a corrupt or truncated payload yields wrong symbols or [`CodeError::InvalidData`],
/// never a panic; reading past the end of the payload reads zeros, so each call is `O(1)` words.
#[derive(Debug, Clone)]
pub struct Decoder {
    inner: DefaultRangeDecoder,
}

impl Decoder {
    /// A decoder over `payload` (copied into 32-bit words; zero-padded).
    pub fn new(payload: &[u8]) -> Self {
        let words: Vec<u32> = payload
            .chunks(4)
            .map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                u32::from_be_bytes(w)
            })
            .collect();
        let inner = match DefaultRangeDecoder::from_compressed(words) {
            Ok(d) => d,
            Err(never) => match never {},
        };
        Self { inner }
    }

    /// Decodes the next symbol under `dist`.
    pub fn decode<D: Distribution + ?Sized>(&mut self, dist: &D) -> Result<u32, CodeError> {
        let k = dist.alphabet_size();
        if k == 0 || k > MAX_ALPHABET {
            return Err(CodeError::BadAlphabet(k));
        }
        if k == 1 {
            return Ok(0);
        }
        self.inner
            .decode_symbol(ConstrictionModel(dist))
            .map_err(|_| CodeError::InvalidData)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entropy::{Dense, Uniform};

    #[test]
    fn empty_message_is_empty_payload() {
        assert!(Encoder::new().finish().is_empty());
    }

    #[test]
    fn one_symbol_alphabets_cost_nothing() {
        let mut enc = Encoder::new();
        enc.encode(0, &Uniform::new(1)).unwrap();
        assert!(enc.finish().is_empty());
    }

    #[test]
    fn termination_is_short() {
        // One symbol of probability 1/2 needs one bit: a single byte, or none.
        let mut enc = Encoder::new();
        enc.encode(1, &Uniform::new(2)).unwrap();
        let b = enc.finish();
        assert!(b.len() <= 1, "{b:?}");
        let mut dec = Decoder::new(&b);
        assert_eq!(dec.decode(&Uniform::new(2)).unwrap(), 1);
    }

    #[test]
    fn skewed_model_round_trips_and_is_near_entropy() {
        let d = Dense::from_weights([1000u64, 10, 1, 1]);
        let syms: Vec<u32> = (0..5000).map(|i| if i % 97 == 0 { 1 } else { 0 }).collect();
        let mut enc = Encoder::new();
        for &s in &syms {
            enc.encode(s, &d).unwrap();
        }
        let ce = enc.cross_entropy_bits();
        let b = enc.finish();
        assert!((b.len() * 8) as f64 <= ce + 16.0, "{} vs {ce}", b.len() * 8);
        let mut dec = Decoder::new(&b);
        for &s in &syms {
            assert_eq!(dec.decode(&d).unwrap(), s);
        }
    }

    #[test]
    fn out_of_range_symbol_is_an_error() {
        let mut enc = Encoder::new();
        assert!(matches!(
            enc.encode(5, &Uniform::new(5)),
            Err(CodeError::SymbolOutOfRange { .. })
        ));
    }
}

//! [`Uniform`]: every symbol equally likely, `log2 K` bits per token.

use super::{quantized_cumulative, Distribution, MAX_ALPHABET, TOTAL};
use crate::coder::{CodeError, Decoder, Encoder};

/// The uniform distribution over `0..K`, quantized by the crate rule with all weights equal:
/// `C(i) = i + floor(i * (2^24 - K) / K)`. Cumulatives cost `O(1)`; nothing is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uniform {
    k: u32,
}

impl Uniform {
    /// The uniform distribution over `k` symbols; `k` is clamped to `1..=MAX_ALPHABET`.
    pub fn new(k: u32) -> Self {
        Self {
            k: k.clamp(1, MAX_ALPHABET),
        }
    }

    /// Codes `id < space` for an id space of up to `2^32` symbols (text token ids exceed the
    /// 2^16 alphabet of one coded symbol). Spaces of at most 2^16 ids are one uniform symbol.
    /// Larger spaces are split into buckets of 65,536 ids: first the bucket `id >> 16`, from a
    /// distribution whose weights are the bucket sizes, then `id & 0xFFFF`, uniform over that
    /// bucket's size. The cost is `log2(space)` bits up to quantization.
    pub fn encode_wide(enc: &mut Encoder, id: u32, space: u32) -> Result<(), CodeError> {
        if space <= MAX_ALPHABET {
            return enc.encode(id, &Uniform::new(space));
        }
        if id >= space {
            return Err(CodeError::SymbolOutOfRange {
                symbol: id,
                alphabet: space,
            });
        }
        let buckets = Buckets::new(space);
        enc.encode(id >> 16, &buckets)?;
        enc.encode(id & 0xFFFF, &Uniform::new(buckets.size(id >> 16)))
    }

    /// Decodes what [`encode_wide`](Self::encode_wide) wrote.
    pub fn decode_wide(dec: &mut Decoder, space: u32) -> Result<u32, CodeError> {
        if space <= MAX_ALPHABET {
            return dec.decode(&Uniform::new(space));
        }
        let buckets = Buckets::new(space);
        let hi = dec.decode(&buckets)?;
        let lo = dec.decode(&Uniform::new(buckets.size(hi)))?;
        Ok((hi << 16) | lo)
    }
}

impl Distribution for Uniform {
    fn alphabet_size(&self) -> u32 {
        self.k
    }

    fn cumulative(&self, i: u32) -> u32 {
        if i >= self.k {
            return TOTAL;
        }
        quantized_cumulative(i, u64::from(i), u64::from(self.k), self.k)
    }

    fn symbol_at(&self, q: u32) -> u32 {
        // Estimate, then correct by at most a step or two.
        let k = u64::from(self.k);
        let mut s = ((u64::from(q) * k) >> 24).min(k - 1) as u32;
        while s > 0 && self.cumulative(s) > q {
            s -= 1;
        }
        while s + 1 < self.k && self.cumulative(s + 1) <= q {
            s += 1;
        }
        s
    }
}

/// Buckets of 65,536 ids weighted by their size (the last one may be partial).
struct Buckets {
    space: u32,
    n: u32,
}

impl Buckets {
    fn new(space: u32) -> Self {
        Self {
            space,
            n: space.div_ceil(1 << 16),
        }
    }
    fn size(&self, bucket: u32) -> u32 {
        (self.space - (bucket << 16)).min(1 << 16)
    }
}

impl Distribution for Buckets {
    fn alphabet_size(&self) -> u32 {
        self.n
    }
    fn cumulative(&self, i: u32) -> u32 {
        if i >= self.n {
            return TOTAL;
        }
        let prefix = u64::from(i) << 16;
        quantized_cumulative(i, prefix, u64::from(self.space), self.n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cumulative_is_even() {
        let u = Uniform::new(1024);
        assert_eq!(u.cumulative(1), TOTAL / 1024);
        for q in [0, 1, 16383, 16384, TOTAL - 1] {
            let s = u.symbol_at(q);
            assert!(u.cumulative(s) <= q && q < u.cumulative(s + 1));
        }
    }

    #[test]
    fn wide_ids_round_trip() {
        let space = 200_019;
        let ids = [0u32, 65_535, 65_536, 199_998, 200_018, 131_072];
        let mut enc = Encoder::new();
        for &id in &ids {
            Uniform::encode_wide(&mut enc, id, space).unwrap();
        }
        let bits = enc.cross_entropy_bits();
        assert!((bits / ids.len() as f64 - (space as f64).log2()).abs() < 0.01);
        let bytes = enc.finish();
        let mut dec = Decoder::new(&bytes);
        for &id in &ids {
            assert_eq!(Uniform::decode_wide(&mut dec, space).unwrap(), id);
        }
    }
}

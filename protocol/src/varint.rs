//! QUIC variable-length integers (RFC 9000 §16).
//!
//! A [`VarInt`] holds a value in `0..=2^62-1`. On the wire it takes 1, 2, 4 or 8 bytes: the two most
//! significant bits of the first byte give the length (`00` = 1, `01` = 2, `10` = 4, `11` = 8) and
//! the remaining bits hold the value, big-endian.
//!
//! unimic is stricter than QUIC in one respect: a value **must** use the shortest encoding that holds
//! it. A longer-than-necessary encoding is rejected as malformed, so every value has exactly one byte
//! representation and a parsed message re-encodes to the bytes it came from.

use std::fmt;

use bytes::{Buf, BufMut};

use crate::coding::{Decode, DecodeError, Encode};
use crate::limits::Limits;

/// An integer in `0..=2^62-1`, encoded as a QUIC variable-length integer.
///
/// ```
/// use unimic_protocol::VarInt;
/// let v = VarInt::from_u32(494_878_333);
/// let mut buf = Vec::new();
/// unimic_protocol::Encode::encode(&v, &mut buf);
/// assert_eq!(buf, [0x9d, 0x7f, 0x3e, 0x7d]);
/// assert_eq!(VarInt::decode_slice(&buf), Ok(v));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VarInt(u64);

/// A value did not fit in a [`VarInt`] (it was above 2^62-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("value {0} is above the varint maximum 2^62-1")]
pub struct VarIntBoundsExceeded(pub u64);

impl VarInt {
    /// The largest value a varint can hold, 2^62-1.
    pub const MAX: VarInt = VarInt((1 << 62) - 1);
    /// Zero.
    pub const ZERO: VarInt = VarInt(0);
    /// The largest encoded size in bytes.
    pub const MAX_SIZE: usize = 8;

    /// Builds a varint from a `u32` (always in range).
    pub const fn from_u32(value: u32) -> Self {
        VarInt(value as u64)
    }

    /// Builds a varint from a `u64`, failing above [`VarInt::MAX`].
    pub const fn from_u64(value: u64) -> Result<Self, VarIntBoundsExceeded> {
        if value <= Self::MAX.0 {
            Ok(VarInt(value))
        } else {
            Err(VarIntBoundsExceeded(value))
        }
    }

    /// Builds a varint from a `u64` that the caller knows to be in range, saturating at
    /// [`VarInt::MAX`] otherwise.
    ///
    /// Used for in-memory lengths: no buffer on a real machine approaches 2^62 bytes.
    pub const fn saturating(value: u64) -> Self {
        if value <= Self::MAX.0 {
            VarInt(value)
        } else {
            Self::MAX
        }
    }

    /// The value as a `u64`.
    pub const fn into_inner(self) -> u64 {
        self.0
    }

    /// The value as a `usize`, or `None` where it does not fit (32-bit targets).
    pub fn to_usize(self) -> Option<usize> {
        usize::try_from(self.0).ok()
    }

    /// The number of bytes the encoding of this value takes (1, 2, 4 or 8).
    pub const fn size(self) -> usize {
        let x = self.0;
        if x < (1 << 6) {
            1
        } else if x < (1 << 14) {
            2
        } else if x < (1 << 30) {
            4
        } else {
            8
        }
    }

    /// Decodes one varint from the start of `bytes`, requiring that it spans all of `bytes`.
    pub fn decode_slice(mut bytes: &[u8]) -> Result<Self, DecodeError> {
        let v = Self::decode(&mut bytes, &Limits::UNLIMITED)?;
        if bytes.is_empty() {
            Ok(v)
        } else {
            Err(DecodeError::TrailingBytes {
                what: "varint",
                count: bytes.len(),
            })
        }
    }
}

impl fmt::Debug for VarInt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for VarInt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<u8> for VarInt {
    fn from(v: u8) -> Self {
        VarInt(u64::from(v))
    }
}

impl From<u16> for VarInt {
    fn from(v: u16) -> Self {
        VarInt(u64::from(v))
    }
}

impl From<u32> for VarInt {
    fn from(v: u32) -> Self {
        VarInt(u64::from(v))
    }
}

impl TryFrom<u64> for VarInt {
    type Error = VarIntBoundsExceeded;
    fn try_from(v: u64) -> Result<Self, Self::Error> {
        Self::from_u64(v)
    }
}

impl TryFrom<usize> for VarInt {
    type Error = VarIntBoundsExceeded;
    fn try_from(v: usize) -> Result<Self, Self::Error> {
        // usize is at most 64 bits on every supported target.
        let v = v as u64;
        Self::from_u64(v)
    }
}

impl From<VarInt> for u64 {
    fn from(v: VarInt) -> u64 {
        v.0
    }
}

impl Encode for VarInt {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        let x = self.0;
        if x < (1 << 6) {
            buf.put_u8(x as u8);
        } else if x < (1 << 14) {
            buf.put_u16(0x4000 | x as u16);
        } else if x < (1 << 30) {
            buf.put_u32(0x8000_0000 | x as u32);
        } else {
            buf.put_u64(0xc000_0000_0000_0000 | x);
        }
    }

    fn encoded_len(&self) -> usize {
        self.size()
    }
}

impl Decode for VarInt {
    fn decode<B: Buf>(buf: &mut B, _limits: &Limits) -> Result<Self, DecodeError> {
        let Some(&first) = buf.chunk().first() else {
            return Err(DecodeError::Incomplete);
        };
        let len = 1usize << (first >> 6);
        if buf.remaining() < len {
            return Err(DecodeError::Incomplete);
        }
        let value = match len {
            1 => u64::from(buf.get_u8()),
            2 => u64::from(buf.get_u16() & 0x3fff),
            4 => u64::from(buf.get_u32() & 0x3fff_ffff),
            _ => buf.get_u64() & 0x3fff_ffff_ffff_ffff,
        };
        let v = VarInt(value);
        if v.size() != len {
            return Err(DecodeError::Malformed {
                what: "varint",
                reason: "not the shortest encoding",
            });
        }
        Ok(v)
    }
}

#[cfg(feature = "arbitrary")]
impl<'a> arbitrary::Arbitrary<'a> for VarInt {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        // Favour small values, which are the common case on the wire, but reach every size.
        let size: u8 = u.int_in_range(0..=3)?;
        let raw: u64 = u.arbitrary()?;
        let mask = match size {
            0 => (1u64 << 6) - 1,
            1 => (1u64 << 14) - 1,
            2 => (1u64 << 30) - 1,
            _ => Self::MAX.0,
        };
        Ok(VarInt(raw & mask))
    }

    fn size_hint(_depth: usize) -> (usize, Option<usize>) {
        (1, Some(9))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        VarInt::from_u64(v).unwrap().encode(&mut out);
        out
    }

    #[test]
    fn rfc9000_examples() {
        // RFC 9000 appendix A.1.
        assert_eq!(
            enc(151_288_809_941_952_652),
            hex::decode("c2197c5eff14e88c").unwrap()
        );
        assert_eq!(enc(494_878_333), hex::decode("9d7f3e7d").unwrap());
        assert_eq!(enc(15_293), hex::decode("7bbd").unwrap());
        assert_eq!(enc(37), hex::decode("25").unwrap());
        for (hex_str, v) in [
            ("c2197c5eff14e88c", 151_288_809_941_952_652u64),
            ("9d7f3e7d", 494_878_333),
            ("7bbd", 15_293),
            ("25", 37),
        ] {
            let bytes = hex::decode(hex_str).unwrap();
            assert_eq!(VarInt::decode_slice(&bytes).unwrap().into_inner(), v);
        }
    }

    #[test]
    fn non_minimal_is_rejected() {
        // RFC 9000 says 0x4025 also decodes to 37; unimic requires the shortest form.
        assert_eq!(
            VarInt::decode_slice(&[0x40, 0x25]),
            Err(DecodeError::Malformed {
                what: "varint",
                reason: "not the shortest encoding"
            })
        );
    }

    #[test]
    fn bounds() {
        assert!(VarInt::from_u64(1 << 62).is_err());
        assert_eq!(VarInt::from_u64((1 << 62) - 1), Ok(VarInt::MAX));
        assert_eq!(enc((1 << 62) - 1), vec![0xff; 8]);
        assert_eq!(VarInt::saturating(u64::MAX), VarInt::MAX);
    }

    #[test]
    fn sizes_at_boundaries() {
        for (v, size) in [
            (0u64, 1usize),
            (63, 1),
            (64, 2),
            (16_383, 2),
            (16_384, 4),
            ((1 << 30) - 1, 4),
            (1 << 30, 8),
            ((1 << 62) - 1, 8),
        ] {
            let bytes = enc(v);
            assert_eq!(bytes.len(), size, "{v}");
            assert_eq!(VarInt::decode_slice(&bytes).unwrap().into_inner(), v);
            for cut in 0..bytes.len() {
                assert_eq!(
                    VarInt::decode_slice(&bytes[..cut]),
                    Err(DecodeError::Incomplete)
                );
            }
        }
    }
}

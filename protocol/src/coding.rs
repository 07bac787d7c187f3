//! The [`Encode`] and [`Decode`] traits, the decoding error, and bounded read helpers.
//!
//! Every wire type encodes into any [`BufMut`] and decodes from any [`Buf`]. Decoding is given the
//! negotiated [`Limits`]: every length and count is checked against a limit (or against the bytes
//! that remain) **before** anything is allocated for it.

use bytes::{Buf, BufMut, Bytes};

use crate::error_code::ErrorCode;
use crate::limits::Limits;
use crate::varint::VarInt;

/// A value with a wire encoding.
///
/// Encoding never fails: public types hold only encodable values (integers are [`VarInt`]s).
/// Encoding does not check semantic rules (for example that a bitmap matches its grid); the
/// decoder does, so a peer never accepts what the spec forbids.
pub trait Encode {
    /// Appends the encoding of `self` to `buf`.
    fn encode<B: BufMut>(&self, buf: &mut B);

    /// The size of the encoding of `self` in bytes: exactly what [`encode`](Self::encode)
    /// appends. The default encodes into a scratch buffer; the types of the message and control
    /// streams compute it without encoding or allocating.
    fn encoded_len(&self) -> usize {
        let mut out = Vec::new();
        self.encode(&mut out);
        out.len()
    }

    /// The encoding of `self` as a new buffer.
    fn to_bytes(&self) -> Bytes {
        let mut out = Vec::new();
        self.encode(&mut out);
        Bytes::from(out)
    }
}

/// A value that can be parsed from the wire.
pub trait Decode: Sized {
    /// Parses one value from the front of `buf`, advancing it past the bytes used.
    ///
    /// Returns [`DecodeError::Incomplete`] when `buf` ends before the value does; `buf` may then
    /// have been partly advanced, so streaming callers retry from a saved copy (as
    /// [`frame::Decoder`](crate::frame::Decoder) does).
    fn decode<B: Buf>(buf: &mut B, limits: &Limits) -> Result<Self, DecodeError>;

    /// Parses a value that must span all of `bytes`: leftover bytes are
    /// [`DecodeError::TrailingBytes`].
    fn decode_exact(mut bytes: &[u8], limits: &Limits) -> Result<Self, DecodeError> {
        let v = Self::decode(&mut bytes, limits)?;
        if bytes.is_empty() {
            Ok(v)
        } else {
            Err(DecodeError::TrailingBytes {
                what: std::any::type_name::<Self>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("value"),
                count: bytes.len(),
            })
        }
    }
}

/// Why bytes could not be decoded.
///
/// The four kinds the protocol distinguishes: more bytes are needed ([`Incomplete`]), the bytes
/// break the format ([`Malformed`], [`TrailingBytes`]), a length or count is above a limit
/// ([`LimitExceeded`]), or the bytes use something this implementation does not know and may not
/// skip ([`Unsupported`]). Every variant except `Incomplete` is final for the stream it came from.
///
/// [`Incomplete`]: DecodeError::Incomplete
/// [`Malformed`]: DecodeError::Malformed
/// [`TrailingBytes`]: DecodeError::TrailingBytes
/// [`LimitExceeded`]: DecodeError::LimitExceeded
/// [`Unsupported`]: DecodeError::Unsupported
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before the value did; feed more bytes and try again.
    #[error("incomplete input: more bytes are needed")]
    Incomplete,
    /// A field has a value the format does not allow.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// The field or structure at fault.
        what: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A length or count is above the negotiated limit or a fixed protocol bound.
    #[error("{what} is {value}, above the limit of {limit}")]
    LimitExceeded {
        /// The length or count at fault.
        what: &'static str,
        /// The value received.
        value: u64,
        /// The largest value allowed.
        limit: u64,
    },
    /// A mandatory frame type or an enumerated value this implementation does not know.
    #[error("unsupported {what} {value}")]
    Unsupported {
        /// The kind of value (for example `"frame type"`).
        what: &'static str,
        /// The value received.
        value: u64,
    },
    /// Bytes remained after a value that must fill its container (a frame payload).
    #[error("{count} trailing bytes after {what}")]
    TrailingBytes {
        /// The value that ended early.
        what: &'static str,
        /// How many bytes were left over.
        count: usize,
    },
}

impl DecodeError {
    /// The registry code a peer should be told (in an Error frame, a stream reset or a connection
    /// close) when this error ends a stream.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            DecodeError::LimitExceeded { .. } => ErrorCode::LIMIT_EXCEEDED,
            DecodeError::Unsupported { .. } => ErrorCode::UNSUPPORTED,
            _ => ErrorCode::PROTOCOL_VIOLATION,
        }
    }
}

/// Fails with [`DecodeError::Incomplete`] unless `n` bytes remain.
pub(crate) fn need<B: Buf>(buf: &B, n: usize) -> Result<(), DecodeError> {
    if buf.remaining() < n {
        Err(DecodeError::Incomplete)
    } else {
        Ok(())
    }
}

/// Reads one varint.
pub(crate) fn read_varint<B: Buf>(buf: &mut B) -> Result<VarInt, DecodeError> {
    VarInt::decode(buf, &Limits::UNLIMITED)
}

/// Reads a varint that must be at most `limit`.
pub(crate) fn read_bounded<B: Buf>(
    buf: &mut B,
    what: &'static str,
    limit: u64,
) -> Result<VarInt, DecodeError> {
    let v = read_varint(buf)?;
    if v.into_inner() > limit {
        return Err(DecodeError::LimitExceeded {
            what,
            value: v.into_inner(),
            limit,
        });
    }
    Ok(v)
}

/// Reads one byte.
pub(crate) fn read_u8<B: Buf>(buf: &mut B) -> Result<u8, DecodeError> {
    need(buf, 1)?;
    Ok(buf.get_u8())
}

/// Reads a boolean encoded as one byte, 0 or 1.
pub(crate) fn read_bool<B: Buf>(buf: &mut B, what: &'static str) -> Result<bool, DecodeError> {
    match read_u8(buf)? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::Malformed {
            what,
            reason: "boolean byte other than 0 or 1",
        }),
    }
}

/// Reads a 32-byte hash.
pub(crate) fn read_hash<B: Buf>(buf: &mut B) -> Result<[u8; 32], DecodeError> {
    need(buf, 32)?;
    let mut out = [0u8; 32];
    buf.copy_to_slice(&mut out);
    Ok(out)
}

/// Reads a count of elements that each take at least `min_size` bytes, bounded by `limit` and by
/// what `buf` still holds; the result is safe to pass to `Vec::with_capacity`.
pub(crate) fn read_count<B: Buf>(
    buf: &mut B,
    what: &'static str,
    limit: u64,
    min_size: usize,
) -> Result<usize, DecodeError> {
    let n = read_bounded(buf, what, limit)?.into_inner();
    // n <= limit, and every limit is far below usize::MAX.
    let n_usize = usize::try_from(n).map_err(|_| DecodeError::LimitExceeded {
        what,
        value: n,
        limit,
    })?;
    // Each element needs min_size bytes: a count the input cannot hold is truncated input.
    match n_usize.checked_mul(min_size) {
        Some(bytes) if bytes <= buf.remaining() => Ok(n_usize),
        _ => Err(DecodeError::Incomplete),
    }
}

/// Reads a varint length followed by that many bytes, the length bounded by `limit`.
pub(crate) fn read_len_bytes<B: Buf>(
    buf: &mut B,
    what: &'static str,
    limit: u64,
) -> Result<Bytes, DecodeError> {
    let n = read_count(buf, what, limit, 1)?;
    Ok(buf.copy_to_bytes(n))
}

/// Reads a varint length followed by that many bytes of UTF-8.
pub(crate) fn read_string<B: Buf>(
    buf: &mut B,
    what: &'static str,
    limit: u64,
) -> Result<String, DecodeError> {
    let bytes = read_len_bytes(buf, what, limit)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Malformed {
        what,
        reason: "not valid UTF-8",
    })
}

/// Writes a length as a varint.
pub(crate) fn put_len<B: BufMut>(buf: &mut B, len: usize) {
    VarInt::saturating(len as u64).encode(buf);
}

/// The size of what [`put_len`] writes.
pub(crate) fn len_size(len: usize) -> usize {
    VarInt::saturating(len as u64).size()
}

/// The size of what [`put_len_bytes`] writes for `len` bytes.
pub(crate) fn len_bytes_size(len: usize) -> usize {
    len_size(len).saturating_add(len)
}

/// Writes a varint length and the bytes.
pub(crate) fn put_len_bytes<B: BufMut>(buf: &mut B, bytes: &[u8]) {
    put_len(buf, bytes.len());
    buf.put_slice(bytes);
}

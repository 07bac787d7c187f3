//! The error code registry.
//!
//! One code space serves Error, Cancel, GoAway and Reject frames, QUIC stream resets
//! (`RESET_STREAM` / `STOP_SENDING`) and QUIC connection closes (`CONNECTION_CLOSE` of type
//! 0x1d, application). Unknown codes are kept as they are and treated like
//! [`ErrorCode::INTERNAL`].

use std::fmt;

use bytes::{Buf, BufMut};

use crate::coding::{read_varint, Decode, DecodeError, Encode};
use crate::limits::Limits;
use crate::varint::VarInt;

/// A code from the registry in docs/PROTOCOL.md §9 (or one this version does not know).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ErrorCode(pub VarInt);

macro_rules! codes {
    ($($(#[$doc:meta])* $name:ident = $value:expr,)*) => {
        impl ErrorCode {
            $($(#[$doc])* pub const $name: ErrorCode = ErrorCode(VarInt::from_u32($value));)*

            /// The registry name of this code (`"PROTOCOL_VIOLATION"`), or `None` if unknown.
            pub fn name(self) -> Option<&'static str> {
                match self.0.into_inner() {
                    $($value => Some(stringify!($name)),)*
                    _ => None,
                }
            }

            /// Every registered code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];
        }
    };
}

codes! {
    /// No error: a graceful close or finish.
    NO_ERROR = 0x00,
    /// The peer failed for a reason of its own (a bug, an exhausted resource).
    INTERNAL = 0x01,
    /// Bytes that break the format: malformed frame, wrong frame order, trailing bytes.
    PROTOCOL_VIOLATION = 0x02,
    /// A length or count above a negotiated limit or a protocol bound.
    LIMIT_EXCEEDED = 0x03,
    /// A mandatory frame type, coding mode or other value this peer does not implement.
    UNSUPPORTED = 0x04,
    /// Handshake: no protocol version in common.
    VERSION_UNSUPPORTED = 0x05,
    /// Handshake: the server holds none of the offered tokenizers or entropy models; or a part
    /// referred to a model index outside the negotiated table.
    MODEL_MISSING = 0x06,
    /// Handshake: the bearer token was missing or not accepted.
    UNAUTHORIZED = 0x07,
    /// Handshake: the announced limits are below the protocol floor, or a server hello raised a
    /// limit above the client's.
    LIMITS_UNACCEPTABLE = 0x08,
    /// A part's context digest differs from the receiver's own digest of the referenced context.
    CONTEXT_MISMATCH = 0x09,
    /// A part referred to a context entry that the receiver does not hold (never sent, or evicted).
    CONTEXT_UNKNOWN = 0x0a,
    /// An entropy-coded payload could not be decoded into the stated number of tokens.
    DECODE_FAILED = 0x0b,
    /// The message was cancelled by its sender or at the receiver's request.
    CANCELLED = 0x0c,
    /// Too many messages at once, or the receiver is overloaded; retry later.
    BUSY = 0x0d,
    /// The agent behind the server failed to produce a reply.
    AGENT_FAILED = 0x0e,
    /// The peer is shutting down.
    GOING_AWAY = 0x0f,
    /// A deadline passed (handshake timeout, idle message stream).
    TIMEOUT = 0x10,
}

impl ErrorCode {
    /// Whether this code is in the range reserved for private, implementation-specific use
    /// (`0x1000..=0x1fff`).
    pub fn is_private(self) -> bool {
        (0x1000..=0x1fff).contains(&self.0.into_inner())
    }

    /// The code as a `u64`, for QUIC `VarInt` error codes.
    pub fn into_inner(self) -> u64 {
        self.0.into_inner()
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}"),
            None => write!(f, "ErrorCode({:#x})", self.0.into_inner()),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl From<ErrorCode> for VarInt {
    fn from(c: ErrorCode) -> VarInt {
        c.0
    }
}

impl From<VarInt> for ErrorCode {
    fn from(v: VarInt) -> ErrorCode {
        ErrorCode(v)
    }
}

impl Encode for ErrorCode {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.0.encode(buf);
    }

    fn encoded_len(&self) -> usize {
        self.0.size()
    }
}

impl Decode for ErrorCode {
    fn decode<B: Buf>(buf: &mut B, _limits: &Limits) -> Result<Self, DecodeError> {
        Ok(ErrorCode(read_varint(buf)?))
    }
}

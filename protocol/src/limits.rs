//! Limits each side announces in its hello, and the fixed protocol bounds.
//!
//! The limits in force on a connection are the per-field minimum of the client's and the server's
//! (see [`Limits::negotiate`]); the server states them in its hello.

use bytes::{Buf, BufMut};

use crate::coding::{read_varint, Decode, DecodeError, Encode};
use crate::varint::VarInt;

/// Largest frame payload accepted before the handshake has finished (hellos and rejects), in bytes.
pub const HANDSHAKE_MAX_FRAME: u64 = 65_536;
/// Largest number of protocol versions in a hello or a reject.
pub const MAX_VERSIONS: u64 = 16;
/// Largest number of tokenizers, and separately of entropy models, in a hello.
pub const MAX_MODELS: u64 = 64;
/// Longest model or tokenizer id, in bytes of UTF-8.
pub const MAX_MODEL_ID_LEN: u64 = 64;
/// Longest bearer token, in bytes.
pub const MAX_TOKEN_LEN: u64 = 4_096;
/// Longest human-readable reason (in Reject, Error, GoAway), in bytes of UTF-8.
pub const MAX_REASON_LEN: u64 = 1_024;
/// Longest media type of a raw attachment, in bytes.
pub const MAX_MEDIA_TYPE_LEN: u64 = 127;
/// Largest number of context references in one part header.
pub const MAX_CONTEXT_REFS: u64 = 256;
/// Largest number of rectangles in a masked region.
pub const MAX_RECTS: u64 = 1_024;
/// Largest number of references in one ContextEvicted frame.
pub const MAX_EVICTED: u64 = 1_024;

/// Resource limits: what one side is willing to receive and hold.
///
/// Every field is a maximum. A side announces its own values in its hello; the values in force are
/// the per-field minimum ([`Limits::negotiate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Limits {
    /// Largest frame payload, in bytes (the frame's `length` field).
    pub max_frame_bytes: VarInt,
    /// Largest message, in bytes: the sum of the encoded sizes of all frames on one message stream.
    pub max_message_bytes: VarInt,
    /// Largest image token grid height (rows).
    pub max_grid_height: VarInt,
    /// Largest image token grid width (columns).
    pub max_grid_width: VarInt,
    /// Largest session context one side keeps for the other, in bytes, counting 4 bytes per token.
    pub max_context_bytes: VarInt,
    /// Most message streams one side may have open toward the other at the same time.
    pub max_concurrent_messages: VarInt,
}

impl Limits {
    /// No limits at all (every field [`VarInt::MAX`]); for decoding standalone values in tests and
    /// tools, never for network input.
    pub const UNLIMITED: Limits = Limits {
        max_frame_bytes: VarInt::MAX,
        max_message_bytes: VarInt::MAX,
        max_grid_height: VarInt::MAX,
        max_grid_width: VarInt::MAX,
        max_context_bytes: VarInt::MAX,
        max_concurrent_messages: VarInt::MAX,
    };

    /// The limits that apply before the handshake has finished: frames of at most
    /// [`HANDSHAKE_MAX_FRAME`] bytes.
    pub const HANDSHAKE: Limits = Limits {
        max_frame_bytes: VarInt::from_u32(HANDSHAKE_MAX_FRAME as u32),
        max_message_bytes: VarInt::from_u32(HANDSHAKE_MAX_FRAME as u32),
        max_grid_height: VarInt::ZERO,
        max_grid_width: VarInt::ZERO,
        max_context_bytes: VarInt::ZERO,
        max_concurrent_messages: VarInt::ZERO,
    };

    /// The smallest values a side may announce; a hello below them is rejected with
    /// `LIMITS_UNACCEPTABLE`.
    pub const FLOOR: Limits = Limits {
        max_frame_bytes: VarInt::from_u32(4_096),
        max_message_bytes: VarInt::from_u32(4_096),
        max_grid_height: VarInt::from_u32(1),
        max_grid_width: VarInt::from_u32(1),
        max_context_bytes: VarInt::ZERO,
        max_concurrent_messages: VarInt::from_u32(1),
    };

    /// The per-field minimum of `self` and `other`: the limits in force on a connection.
    pub fn negotiate(&self, other: &Limits) -> Limits {
        Limits {
            max_frame_bytes: self.max_frame_bytes.min(other.max_frame_bytes),
            max_message_bytes: self.max_message_bytes.min(other.max_message_bytes),
            max_grid_height: self.max_grid_height.min(other.max_grid_height),
            max_grid_width: self.max_grid_width.min(other.max_grid_width),
            max_context_bytes: self.max_context_bytes.min(other.max_context_bytes),
            max_concurrent_messages: self
                .max_concurrent_messages
                .min(other.max_concurrent_messages),
        }
    }

    /// Whether every field of `self` is at most the same field of `other`.
    pub fn within(&self, other: &Limits) -> bool {
        self.negotiate(other) == *self
    }

    /// The name of the first field below [`Limits::FLOOR`], if any.
    pub fn below_floor(&self) -> Option<&'static str> {
        let f = Self::FLOOR;
        let checks = [
            ("max_frame_bytes", self.max_frame_bytes, f.max_frame_bytes),
            (
                "max_message_bytes",
                self.max_message_bytes,
                f.max_message_bytes,
            ),
            ("max_grid_height", self.max_grid_height, f.max_grid_height),
            ("max_grid_width", self.max_grid_width, f.max_grid_width),
            (
                "max_context_bytes",
                self.max_context_bytes,
                f.max_context_bytes,
            ),
            (
                "max_concurrent_messages",
                self.max_concurrent_messages,
                f.max_concurrent_messages,
            ),
        ];
        checks
            .into_iter()
            .find(|(_, v, floor)| v < floor)
            .map(|(name, _, _)| name)
    }
}

impl Default for Limits {
    /// 1 MiB frames, 64 MiB messages, 256×256 grids, 16 MiB of context, 16 concurrent messages.
    fn default() -> Self {
        Limits {
            max_frame_bytes: VarInt::from_u32(1 << 20),
            max_message_bytes: VarInt::from_u32(64 << 20),
            max_grid_height: VarInt::from_u32(256),
            max_grid_width: VarInt::from_u32(256),
            max_context_bytes: VarInt::from_u32(16 << 20),
            max_concurrent_messages: VarInt::from_u32(16),
        }
    }
}

impl Encode for Limits {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.max_frame_bytes.encode(buf);
        self.max_message_bytes.encode(buf);
        self.max_grid_height.encode(buf);
        self.max_grid_width.encode(buf);
        self.max_context_bytes.encode(buf);
        self.max_concurrent_messages.encode(buf);
    }
}

impl Decode for Limits {
    fn decode<B: Buf>(buf: &mut B, _limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Limits {
            max_frame_bytes: read_varint(buf)?,
            max_message_bytes: read_varint(buf)?,
            max_grid_height: read_varint(buf)?,
            max_grid_width: read_varint(buf)?,
            max_context_bytes: read_varint(buf)?,
            max_concurrent_messages: read_varint(buf)?,
        })
    }
}

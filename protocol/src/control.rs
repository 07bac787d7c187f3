//! Control frames, sent on the control stream (the handshake stream) after the handshake.

use bytes::{Buf, BufMut};

use crate::coding::{
    len_bytes_size, len_size, put_len, put_len_bytes, read_bool, read_count, read_string,
    read_varint, Decode, DecodeError, Encode,
};
use crate::error_code::ErrorCode;
use crate::limits::{Limits, MAX_EVICTED, MAX_REASON_LEN};
use crate::part::ContextRef;
use crate::varint::VarInt;

/// How far the receiver got with what it acknowledges. Wire value in parentheses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[non_exhaustive]
pub enum AckStage {
    /// (0) The bytes arrived and parsed.
    Received,
    /// (1) The tokens were entropy-decoded (the context digest matched).
    Decoded,
    /// (2) The content was shown to a user or handed to the agent.
    Rendered,
}

/// Acknowledges a message up to and including one chunk of one part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Ack {
    /// The acknowledged message.
    pub message_id: VarInt,
    /// The last part covered.
    pub part_index: VarInt,
    /// The last chunk of that part covered (all earlier parts are covered entirely).
    pub chunk_seq: VarInt,
    /// How far the receiver got.
    pub stage: AckStage,
}

/// Asks the peer to stop sending (or generating) a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Cancel {
    /// The message to stop.
    pub message_id: VarInt,
    /// Why, usually [`ErrorCode::CANCELLED`].
    pub code: ErrorCode,
}

/// Reports an error, about one message or about the session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ErrorFrame {
    /// The registry code.
    pub code: ErrorCode,
    /// The message concerned, if the error is about one.
    pub message_id: Option<VarInt>,
    /// A short human-readable reason (at most 1024 bytes of UTF-8).
    pub reason: String,
}

/// Announces that the sender will start no new messages and accept none; messages in flight
/// finish, then the connection closes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct GoAway {
    /// Why, usually [`ErrorCode::NO_ERROR`] or [`ErrorCode::GOING_AWAY`].
    pub code: ErrorCode,
    /// A short human-readable reason (at most 1024 bytes of UTF-8).
    pub reason: String,
}

/// Announces that the sender dropped these entries from the context it keeps; parts sent to it
/// afterwards must not refer to them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ContextEvicted {
    /// The evicted entries (at most 1024).
    pub refs: Vec<ContextRef>,
}

impl Encode for AckStage {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        let v: u8 = match self {
            AckStage::Received => 0,
            AckStage::Decoded => 1,
            AckStage::Rendered => 2,
        };
        VarInt::from(v).encode(buf);
    }

    fn encoded_len(&self) -> usize {
        // Every stage value is below 64: one byte.
        1
    }
}

impl Decode for AckStage {
    fn decode<B: Buf>(buf: &mut B, _limits: &Limits) -> Result<Self, DecodeError> {
        match read_varint(buf)?.into_inner() {
            0 => Ok(AckStage::Received),
            1 => Ok(AckStage::Decoded),
            2 => Ok(AckStage::Rendered),
            other => Err(DecodeError::Unsupported {
                what: "ack stage",
                value: other,
            }),
        }
    }
}

impl Encode for Ack {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.message_id.encode(buf);
        self.part_index.encode(buf);
        self.chunk_seq.encode(buf);
        self.stage.encode(buf);
    }

    fn encoded_len(&self) -> usize {
        self.message_id
            .size()
            .saturating_add(self.part_index.size())
            .saturating_add(self.chunk_seq.size())
            .saturating_add(self.stage.encoded_len())
    }
}

impl Decode for Ack {
    fn decode<B: Buf>(buf: &mut B, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Ack {
            message_id: read_varint(buf)?,
            part_index: read_varint(buf)?,
            chunk_seq: read_varint(buf)?,
            stage: AckStage::decode(buf, limits)?,
        })
    }
}

impl Encode for Cancel {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.message_id.encode(buf);
        self.code.encode(buf);
    }

    fn encoded_len(&self) -> usize {
        self.message_id
            .size()
            .saturating_add(self.code.encoded_len())
    }
}

impl Decode for Cancel {
    fn decode<B: Buf>(buf: &mut B, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Cancel {
            message_id: read_varint(buf)?,
            code: ErrorCode::decode(buf, limits)?,
        })
    }
}

impl Encode for ErrorFrame {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.code.encode(buf);
        match self.message_id {
            Some(id) => {
                buf.put_u8(1);
                id.encode(buf);
            }
            None => buf.put_u8(0),
        }
        put_len_bytes(buf, self.reason.as_bytes());
    }

    fn encoded_len(&self) -> usize {
        let id = self.message_id.map_or(0, VarInt::size);
        self.code
            .encoded_len()
            .saturating_add(1)
            .saturating_add(id)
            .saturating_add(len_bytes_size(self.reason.len()))
    }
}

impl Decode for ErrorFrame {
    fn decode<B: Buf>(buf: &mut B, limits: &Limits) -> Result<Self, DecodeError> {
        let code = ErrorCode::decode(buf, limits)?;
        let message_id = if read_bool(buf, "message id presence")? {
            Some(read_varint(buf)?)
        } else {
            None
        };
        let reason = read_string(buf, "reason length", MAX_REASON_LEN)?;
        Ok(ErrorFrame {
            code,
            message_id,
            reason,
        })
    }
}

impl Encode for GoAway {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.code.encode(buf);
        put_len_bytes(buf, self.reason.as_bytes());
    }

    fn encoded_len(&self) -> usize {
        self.code
            .encoded_len()
            .saturating_add(len_bytes_size(self.reason.len()))
    }
}

impl Decode for GoAway {
    fn decode<B: Buf>(buf: &mut B, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(GoAway {
            code: ErrorCode::decode(buf, limits)?,
            reason: read_string(buf, "reason length", MAX_REASON_LEN)?,
        })
    }
}

impl Encode for ContextEvicted {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        put_len(buf, self.refs.len());
        for r in &self.refs {
            r.encode(buf);
        }
    }

    fn encoded_len(&self) -> usize {
        self.refs.iter().fold(len_size(self.refs.len()), |n, r| {
            n.saturating_add(r.encoded_len())
        })
    }
}

impl Decode for ContextEvicted {
    fn decode<B: Buf>(buf: &mut B, limits: &Limits) -> Result<Self, DecodeError> {
        let n = read_count(buf, "evicted reference count", MAX_EVICTED, 2)?;
        let mut refs = Vec::with_capacity(n);
        for _ in 0..n {
            refs.push(ContextRef::decode(buf, limits)?);
        }
        Ok(ContextEvicted { refs })
    }
}

//! Frames: `type (varint) | length (varint) | payload (length bytes)`.
//!
//! A frame type with bit `0x20` set ([`is_ignorable`]) is *ignorable*: a receiver that does not
//! know it parses it as [`Frame::Extension`] and skips it. A frame type without that bit that the
//! receiver does not know is an error ([`DecodeError::Unsupported`]). Every type defined by
//! version 1 is mandatory (below `0x20`).
//!
//! The `length` is checked against [`Limits::max_frame_bytes`] as soon as it has arrived, before
//! the payload is buffered. A payload must be consumed exactly by its fields.
//!
//! [`Decoder`] parses a byte stream that may arrive split at any byte boundary; with the `codec`
//! feature `Codec` does the same for tokio-util's `FramedRead` / `FramedWrite`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::coding::{read_varint, Decode, DecodeError, Encode};
use crate::control::{Ack, Cancel, ContextEvicted, ErrorFrame, GoAway};
use crate::handshake::{ClientHello, Reject, ServerHello};
use crate::limits::Limits;
use crate::message::{MessageEnd, MessageHeader};
use crate::part::{PartChunk, PartHeader};
use crate::varint::VarInt;

/// The frame type values of version 1.
pub mod types {
    use crate::varint::VarInt;

    /// Handshake: client hello.
    pub const CLIENT_HELLO: VarInt = VarInt::from_u32(0x01);
    /// Handshake: server hello.
    pub const SERVER_HELLO: VarInt = VarInt::from_u32(0x02);
    /// Handshake: rejection.
    pub const REJECT: VarInt = VarInt::from_u32(0x03);
    /// Message stream: message header.
    pub const MESSAGE_HEADER: VarInt = VarInt::from_u32(0x04);
    /// Message stream: part header.
    pub const PART_HEADER: VarInt = VarInt::from_u32(0x05);
    /// Message stream: part chunk.
    pub const PART_CHUNK: VarInt = VarInt::from_u32(0x06);
    /// Message stream: message end.
    pub const MESSAGE_END: VarInt = VarInt::from_u32(0x07);
    /// Control: acknowledgement.
    pub const ACK: VarInt = VarInt::from_u32(0x08);
    /// Control: cancel a message.
    pub const CANCEL: VarInt = VarInt::from_u32(0x09);
    /// Control: error report.
    pub const ERROR: VarInt = VarInt::from_u32(0x0a);
    /// Control: go away.
    pub const GO_AWAY: VarInt = VarInt::from_u32(0x0b);
    /// Control: context eviction notice.
    pub const CONTEXT_EVICTED: VarInt = VarInt::from_u32(0x0c);
}

/// The bit that marks a frame type as ignorable.
pub const IGNORABLE_BIT: u64 = 0x20;

/// Whether a receiver that does not know frame type `ty` must skip it (bit `0x20` set) rather
/// than fail.
pub fn is_ignorable(ty: VarInt) -> bool {
    ty.into_inner() & IGNORABLE_BIT != 0
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[non_exhaustive]
pub enum Frame {
    /// Handshake: the client's offer.
    ClientHello(ClientHello),
    /// Handshake: the server's acceptance.
    ServerHello(ServerHello),
    /// Handshake: the server's refusal.
    Reject(Reject),
    /// First frame of a message stream.
    MessageHeader(MessageHeader),
    /// Starts a part.
    PartHeader(PartHeader),
    /// A piece of a part's payload.
    PartChunk(PartChunk),
    /// Last frame of a message stream.
    MessageEnd(MessageEnd),
    /// Control: acknowledgement.
    Ack(Ack),
    /// Control: cancel a message.
    Cancel(Cancel),
    /// Control: error report.
    Error(ErrorFrame),
    /// Control: go away.
    GoAway(GoAway),
    /// Control: context eviction notice.
    ContextEvicted(ContextEvicted),
    /// A frame of an unknown ignorable type, kept so that it can be skipped (or forwarded).
    Extension {
        /// Its type; [`is_ignorable`] holds for it.
        ty: VarInt,
        /// Its payload.
        #[cfg_attr(feature = "arbitrary", arbitrary(with = crate::part::arbitrary_bytes))]
        payload: Bytes,
    },
}

impl Frame {
    /// The frame type value.
    pub fn frame_type(&self) -> VarInt {
        match self {
            Frame::ClientHello(_) => types::CLIENT_HELLO,
            Frame::ServerHello(_) => types::SERVER_HELLO,
            Frame::Reject(_) => types::REJECT,
            Frame::MessageHeader(_) => types::MESSAGE_HEADER,
            Frame::PartHeader(_) => types::PART_HEADER,
            Frame::PartChunk(_) => types::PART_CHUNK,
            Frame::MessageEnd(_) => types::MESSAGE_END,
            Frame::Ack(_) => types::ACK,
            Frame::Cancel(_) => types::CANCEL,
            Frame::Error(_) => types::ERROR,
            Frame::GoAway(_) => types::GO_AWAY,
            Frame::ContextEvicted(_) => types::CONTEXT_EVICTED,
            Frame::Extension { ty, .. } => *ty,
        }
    }

    /// The spec name of the frame type (`"PART_CHUNK"`), for logs and errors.
    pub fn name(&self) -> &'static str {
        type_name(self.frame_type())
    }

    /// The length of the payload, in bytes.
    pub fn payload_len(&self) -> usize {
        match self {
            Frame::ClientHello(f) => f.encoded_len(),
            Frame::ServerHello(f) => f.encoded_len(),
            Frame::Reject(f) => f.encoded_len(),
            Frame::MessageHeader(f) => f.encoded_len(),
            Frame::PartHeader(f) => f.encoded_len(),
            Frame::PartChunk(f) => f.encoded_len(),
            Frame::MessageEnd(f) => f.encoded_len(),
            Frame::Ack(f) => f.encoded_len(),
            Frame::Cancel(f) => f.encoded_len(),
            Frame::Error(f) => f.encoded_len(),
            Frame::GoAway(f) => f.encoded_len(),
            Frame::ContextEvicted(f) => f.encoded_len(),
            Frame::Extension { payload, .. } => payload.len(),
        }
    }

    /// The size of the whole encoded frame, in bytes.
    pub fn encoded_len(&self) -> usize {
        let len = self.payload_len();
        self.frame_type()
            .size()
            .saturating_add(VarInt::saturating(len as u64).size())
            .saturating_add(len)
    }

    fn encode_payload<B: BufMut>(&self, buf: &mut B) {
        match self {
            Frame::ClientHello(f) => f.encode(buf),
            Frame::ServerHello(f) => f.encode(buf),
            Frame::Reject(f) => f.encode(buf),
            Frame::MessageHeader(f) => f.encode(buf),
            Frame::PartHeader(f) => f.encode(buf),
            Frame::PartChunk(f) => f.encode(buf),
            Frame::MessageEnd(f) => f.encode(buf),
            Frame::Ack(f) => f.encode(buf),
            Frame::Cancel(f) => f.encode(buf),
            Frame::Error(f) => f.encode(buf),
            Frame::GoAway(f) => f.encode(buf),
            Frame::ContextEvicted(f) => f.encode(buf),
            Frame::Extension { payload, .. } => buf.put_slice(payload),
        }
    }

    /// Parses a payload of type `ty` that must be consumed exactly.
    fn decode_payload(
        ty: VarInt,
        mut payload: Bytes,
        limits: &Limits,
    ) -> Result<Frame, DecodeError> {
        let name = type_name(ty);
        let buf = &mut payload;
        let frame = match ty {
            types::CLIENT_HELLO => ClientHello::decode(buf, limits).map(Frame::ClientHello),
            types::SERVER_HELLO => ServerHello::decode(buf, limits).map(Frame::ServerHello),
            types::REJECT => Reject::decode(buf, limits).map(Frame::Reject),
            types::MESSAGE_HEADER => MessageHeader::decode(buf, limits).map(Frame::MessageHeader),
            types::PART_HEADER => PartHeader::decode(buf, limits).map(Frame::PartHeader),
            types::PART_CHUNK => PartChunk::decode_rest(buf, limits).map(Frame::PartChunk),
            types::MESSAGE_END => MessageEnd::decode(buf, limits).map(Frame::MessageEnd),
            types::ACK => Ack::decode(buf, limits).map(Frame::Ack),
            types::CANCEL => Cancel::decode(buf, limits).map(Frame::Cancel),
            types::ERROR => ErrorFrame::decode(buf, limits).map(Frame::Error),
            types::GO_AWAY => GoAway::decode(buf, limits).map(Frame::GoAway),
            types::CONTEXT_EVICTED => {
                ContextEvicted::decode(buf, limits).map(Frame::ContextEvicted)
            }
            ty if is_ignorable(ty) => Ok(Frame::Extension {
                ty,
                payload: buf.split_off(0),
            }),
            ty => Err(unsupported(ty)),
        };
        let frame = frame.map_err(|e| match e {
            // Inside a complete frame, running out of bytes means the payload is too short.
            DecodeError::Incomplete => DecodeError::Malformed {
                what: name,
                reason: "payload ends inside a field",
            },
            other => other,
        })?;
        if buf.has_remaining() {
            return Err(DecodeError::TrailingBytes {
                what: name,
                count: buf.remaining(),
            });
        }
        Ok(frame)
    }
}

/// The spec name of a frame type (`"EXTENSION"` for unknown ignorable types, `"UNKNOWN"`
/// otherwise).
pub fn type_name(ty: VarInt) -> &'static str {
    match ty {
        types::CLIENT_HELLO => "CLIENT_HELLO",
        types::SERVER_HELLO => "SERVER_HELLO",
        types::REJECT => "REJECT",
        types::MESSAGE_HEADER => "MESSAGE_HEADER",
        types::PART_HEADER => "PART_HEADER",
        types::PART_CHUNK => "PART_CHUNK",
        types::MESSAGE_END => "MESSAGE_END",
        types::ACK => "ACK",
        types::CANCEL => "CANCEL",
        types::ERROR => "ERROR",
        types::GO_AWAY => "GO_AWAY",
        types::CONTEXT_EVICTED => "CONTEXT_EVICTED",
        ty if is_ignorable(ty) => "EXTENSION",
        _ => "UNKNOWN",
    }
}

fn is_known(ty: VarInt) -> bool {
    (types::CLIENT_HELLO.into_inner()..=types::CONTEXT_EVICTED.into_inner())
        .contains(&ty.into_inner())
}

fn unsupported(ty: VarInt) -> DecodeError {
    DecodeError::Unsupported {
        what: "frame type",
        value: ty.into_inner(),
    }
}

impl Encode for Frame {
    /// Writes the type, the payload length (computed, not measured: no scratch buffer) and
    /// the payload straight into `buf`.
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.frame_type().encode(buf);
        VarInt::saturating(self.payload_len() as u64).encode(buf);
        self.encode_payload(buf);
    }

    fn encoded_len(&self) -> usize {
        Frame::encoded_len(self)
    }
}

/// Parses the frame header at the front of `bytes` without consuming anything: `Ok(None)` while
/// it is incomplete, otherwise the type, the header size and the payload length, checked.
fn peek_header(
    bytes: &[u8],
    limits: &Limits,
) -> Result<Option<(VarInt, usize, usize)>, DecodeError> {
    let mut cursor = bytes;
    let ty = match read_varint(&mut cursor) {
        Ok(v) => v,
        Err(DecodeError::Incomplete) => return Ok(None),
        Err(e) => return Err(e),
    };
    if !is_known(ty) && !is_ignorable(ty) {
        return Err(unsupported(ty));
    }
    let len = match read_varint(&mut cursor) {
        Ok(v) => v,
        Err(DecodeError::Incomplete) => return Ok(None),
        Err(e) => return Err(e),
    };
    let limit = limits.max_frame_bytes.into_inner();
    if len.into_inner() > limit {
        return Err(DecodeError::LimitExceeded {
            what: "frame length",
            value: len.into_inner(),
            limit,
        });
    }
    let len = len.to_usize().ok_or(DecodeError::LimitExceeded {
        what: "frame length",
        value: len.into_inner(),
        limit: usize::MAX as u64,
    })?;
    Ok(Some((ty, bytes.len().saturating_sub(cursor.len()), len)))
}

impl Decode for Frame {
    /// Parses one frame. The type is checked and the length compared with
    /// `limits.max_frame_bytes` before the payload is read. On [`DecodeError::Incomplete`] `buf`
    /// may have been advanced past the header; [`Decoder`] is the streaming interface.
    fn decode<B: Buf>(buf: &mut B, limits: &Limits) -> Result<Self, DecodeError> {
        let ty = read_varint(buf)?;
        if !is_known(ty) && !is_ignorable(ty) {
            return Err(unsupported(ty));
        }
        let len = read_varint(buf)?;
        let limit = limits.max_frame_bytes.into_inner();
        if len.into_inner() > limit {
            return Err(DecodeError::LimitExceeded {
                what: "frame length",
                value: len.into_inner(),
                limit,
            });
        }
        let len = len.to_usize().ok_or(DecodeError::Incomplete)?;
        if buf.remaining() < len {
            return Err(DecodeError::Incomplete);
        }
        let payload = buf.copy_to_bytes(len);
        Frame::decode_payload(ty, payload, limits)
    }
}

/// A streaming frame decoder: push bytes as they arrive, split anywhere, and take frames out.
///
/// The buffer holds at most one partial frame plus the bytes pushed since the last call to
/// [`Decoder::next_frame`]; call it after every push. A frame's length is checked against the
/// limit as soon as the header is complete, so an oversized frame fails before its payload is
/// buffered. After an error the decoder stays failed and returns that error again.
///
/// ```
/// use unimic_protocol::{frame, Encode, Frame, Limits, MessageEnd, VarInt};
/// let bytes = Frame::MessageEnd(MessageEnd { part_count: VarInt::from_u32(2) }).to_bytes();
/// let mut decoder = frame::Decoder::new(Limits::default());
/// decoder.push(&bytes[..1]);
/// assert_eq!(decoder.next_frame(), Ok(None));
/// decoder.push(&bytes[1..]);
/// assert!(matches!(decoder.next_frame(), Ok(Some(Frame::MessageEnd(_)))));
/// assert_eq!(decoder.finish(), Ok(()));
/// ```
#[derive(Debug, Clone)]
pub struct Decoder {
    limits: Limits,
    buf: BytesMut,
    failed: Option<DecodeError>,
    consumed: u64,
}

impl Decoder {
    /// A decoder that enforces `limits` (use [`Limits::HANDSHAKE`] on the control stream until the
    /// handshake is done).
    pub fn new(limits: Limits) -> Self {
        Decoder {
            limits,
            buf: BytesMut::new(),
            failed: None,
            consumed: 0,
        }
    }

    /// Replaces the limits (once the handshake has negotiated them).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Total size of the frames returned so far, in bytes.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.try_next() {
            Ok(f) => Ok(f),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn try_next(&mut self) -> Result<Option<Frame>, DecodeError> {
        let (ty, header_len, len) = match peek_header(&self.buf, &self.limits)? {
            Some(h) => h,
            None => return Ok(None),
        };
        let total = match header_len.checked_add(len) {
            Some(t) => t,
            None => return Ok(None),
        };
        if self.buf.len() < total {
            // Reserve what the frame still needs (bounded by the limit checked above).
            self.buf.reserve(total.saturating_sub(self.buf.len()));
            return Ok(None);
        }
        let mut frame_bytes = self.buf.split_to(total).freeze();
        frame_bytes.advance(header_len);
        self.consumed = self.consumed.saturating_add(total as u64);
        Frame::decode_payload(ty, frame_bytes, &self.limits).map(Some)
    }

    /// How many more bytes the frame being received needs, as far as known: the exact rest once
    /// its header is complete, otherwise 1.
    pub fn needed(&self) -> usize {
        match peek_header(&self.buf, &self.limits) {
            Ok(Some((_, header_len, len))) => header_len
                .saturating_add(len)
                .saturating_sub(self.buf.len())
                .max(1),
            _ => 1,
        }
    }

    /// Declares the end of the stream: an error if a partial frame is left
    /// ([`DecodeError::Incomplete`]) or the decoder had failed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Incomplete)
        }
    }
}

#[cfg(feature = "codec")]
pub use self::codec::{Codec, CodecError};

#[cfg(feature = "codec")]
mod codec {
    use bytes::{Buf, BytesMut};

    use super::{peek_header, Frame};
    use crate::coding::{DecodeError, Encode};
    use crate::limits::Limits;

    /// A tokio-util codec for frames, for `FramedRead` / `FramedWrite` (feature `codec`).
    ///
    /// Decoding enforces the limits like [`Decoder`](super::Decoder); a stream that ends inside a
    /// frame fails with [`DecodeError::Incomplete`]. Encoding writes any frame.
    #[derive(Debug, Clone)]
    pub struct Codec {
        limits: Limits,
    }

    impl Codec {
        /// A codec enforcing `limits`.
        pub fn new(limits: Limits) -> Self {
            Codec { limits }
        }

        /// Replaces the limits.
        pub fn set_limits(&mut self, limits: Limits) {
            self.limits = limits;
        }
    }

    /// An error from [`Codec`].
    #[derive(Debug, thiserror::Error)]
    #[non_exhaustive]
    pub enum CodecError {
        /// The underlying stream failed.
        #[error("i/o error: {0}")]
        Io(#[from] std::io::Error),
        /// The bytes could not be decoded.
        #[error(transparent)]
        Decode(#[from] DecodeError),
    }

    impl tokio_util::codec::Decoder for Codec {
        type Item = Frame;
        type Error = CodecError;

        fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
            let (ty, header_len, len) = match peek_header(src, &self.limits)? {
                Some(h) => h,
                None => return Ok(None),
            };
            let total = header_len.saturating_add(len);
            if src.len() < total {
                src.reserve(total.saturating_sub(src.len()));
                return Ok(None);
            }
            let mut frame = src.split_to(total).freeze();
            frame.advance(header_len);
            Ok(Some(Frame::decode_payload(ty, frame, &self.limits)?))
        }

        fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
            match self.decode(src)? {
                Some(frame) => Ok(Some(frame)),
                None if src.is_empty() => Ok(None),
                None => Err(DecodeError::Incomplete.into()),
            }
        }
    }

    impl tokio_util::codec::Encoder<Frame> for Codec {
        type Error = CodecError;

        fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
            frame.encode(dst);
            Ok(())
        }
    }

    impl tokio_util::codec::Encoder<&Frame> for Codec {
        type Error = CodecError;

        fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
            frame.encode(dst);
            Ok(())
        }
    }
}

//! Messages: one turn of the conversation, sent on its own unidirectional stream.
//!
//! A message stream carries, in this order: one [`MessageHeader`] frame; for each part, a
//! [`PartHeader`] frame followed by one or more [`PartChunk`] frames, the last with `fin` set; and
//! one [`MessageEnd`] frame. An [`InReplyTo`] frame (the extension `IN_REPLY_TO`) may follow the
//! header directly, and only there. Other ignorable extension frames may appear anywhere after the
//! header and are skipped. [`Reader`] checks that order as bytes arrive; [`Message`] holds a whole
//! message in memory.

use bytes::{Buf, BufMut};

use crate::coding::{read_varint, Decode, DecodeError, Encode};
use crate::frame::{self, Frame};
use crate::limits::Limits;
use crate::part::{PartBody, PartChunk, PartHeader};
use crate::varint::VarInt;

/// Who speaks in a turn. Wire value in parentheses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[non_exhaustive]
pub enum Role {
    /// (0) The user (usually the edge side).
    User,
    /// (1) The assistant (usually the agent behind the server).
    Assistant,
    /// (2) System instructions.
    System,
    /// (3) Output of a tool.
    Tool,
}

impl Role {
    /// The wire value.
    pub fn wire_value(self) -> u8 {
        match self {
            Role::User => 0,
            Role::Assistant => 1,
            Role::System => 2,
            Role::Tool => 3,
        }
    }
}

/// The first frame of a message stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct MessageHeader {
    /// The message id: even for messages the client sends, odd for the server's; increasing for
    /// each sender; never reused in a session.
    pub message_id: VarInt,
    /// Who speaks.
    pub role: Role,
}

/// The `IN_REPLY_TO` extension frame (type `0x20`, PROTOCOL.md §5.3): names the message this one
/// answers. It comes right after the [`MessageHeader`], at most once, and names a message of the
/// other side (its id has the other parity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct InReplyTo {
    /// The id of the answered message.
    pub message_id: VarInt,
}

impl Encode for InReplyTo {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.message_id.encode(buf);
    }

    fn encoded_len(&self) -> usize {
        self.message_id.size()
    }
}

impl Decode for InReplyTo {
    fn decode<B: Buf>(buf: &mut B, _limits: &Limits) -> Result<Self, DecodeError> {
        Ok(InReplyTo {
            message_id: read_varint(buf)?,
        })
    }
}

/// The last frame of a message stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct MessageEnd {
    /// How many parts the message had (a check against truncation).
    pub part_count: VarInt,
}

impl Encode for Role {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        VarInt::from(self.wire_value()).encode(buf);
    }

    fn encoded_len(&self) -> usize {
        VarInt::from(self.wire_value()).size()
    }
}

impl Decode for Role {
    fn decode<B: Buf>(buf: &mut B, _limits: &Limits) -> Result<Self, DecodeError> {
        match read_varint(buf)?.into_inner() {
            0 => Ok(Role::User),
            1 => Ok(Role::Assistant),
            2 => Ok(Role::System),
            3 => Ok(Role::Tool),
            other => Err(DecodeError::Unsupported {
                what: "role",
                value: other,
            }),
        }
    }
}

impl Encode for MessageHeader {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.message_id.encode(buf);
        self.role.encode(buf);
    }

    fn encoded_len(&self) -> usize {
        self.message_id
            .size()
            .saturating_add(self.role.encoded_len())
    }
}

impl Decode for MessageHeader {
    fn decode<B: Buf>(buf: &mut B, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(MessageHeader {
            message_id: read_varint(buf)?,
            role: Role::decode(buf, limits)?,
        })
    }
}

impl Encode for MessageEnd {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.part_count.encode(buf);
    }

    fn encoded_len(&self) -> usize {
        self.part_count.size()
    }
}

impl Decode for MessageEnd {
    fn decode<B: Buf>(buf: &mut B, _limits: &Limits) -> Result<Self, DecodeError> {
        Ok(MessageEnd {
            part_count: read_varint(buf)?,
        })
    }
}

/// One part of a whole [`Message`]: its header and its chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Part {
    /// The part header.
    pub header: PartHeader,
    /// The chunks, in order; the last has `fin` set.
    pub chunks: Vec<PartChunk>,
}

/// A whole message in memory. Encoding writes the frames of its stream; decoding reads a whole
/// stream with a [`Reader`] and rejects anything after the [`MessageEnd`] frame.
///
/// Extension frames are skipped when decoding, so `Message` re-encodes only what it understood.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Message {
    /// The message header.
    pub header: MessageHeader,
    /// The message this one answers (an `IN_REPLY_TO` frame right after the header), if any.
    pub in_reply_to: Option<InReplyTo>,
    /// The parts, in order.
    pub parts: Vec<Part>,
}

impl Message {
    /// The frames of this message's stream, in order.
    pub fn frames(&self) -> impl Iterator<Item = Frame> + '_ {
        std::iter::once(Frame::MessageHeader(self.header))
            .chain(self.in_reply_to.map(Frame::InReplyTo))
            .chain(self.parts.iter().flat_map(|p| {
                std::iter::once(Frame::PartHeader(p.header.clone()))
                    .chain(p.chunks.iter().cloned().map(Frame::PartChunk))
            }))
            .chain(std::iter::once(Frame::MessageEnd(MessageEnd {
                part_count: VarInt::saturating(self.parts.len() as u64),
            })))
    }
}

impl Encode for Message {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        for frame in self.frames() {
            frame.encode(buf);
        }
    }
}

impl Decode for Message {
    /// Reads frames until the message end. Returns [`DecodeError::Incomplete`] if the stream ends
    /// before it.
    fn decode<B: Buf>(buf: &mut B, limits: &Limits) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(*limits);
        let mut message: Option<Message> = None;
        loop {
            // Feed one contiguous chunk at a time and stop at the message end, leaving the rest
            // of `buf` (trailing bytes) in place.
            let event = match reader.next_event()? {
                Some(e) => e,
                None => {
                    if !buf.has_remaining() {
                        return Err(DecodeError::Incomplete);
                    }
                    // Feed no more than the current frame needs, so that nothing after the
                    // message end is consumed.
                    let chunk = buf.chunk();
                    let want = reader.wanted().min(chunk.len());
                    reader.push(chunk.get(..want).unwrap_or(chunk));
                    buf.advance(want);
                    continue;
                }
            };
            match event {
                Event::Header(header) => {
                    message = Some(Message {
                        header,
                        in_reply_to: None,
                        parts: Vec::new(),
                    })
                }
                Event::InReplyTo(r) => {
                    if let Some(m) = message.as_mut() {
                        m.in_reply_to = Some(r);
                    }
                }
                Event::Part(header) => {
                    if let Some(m) = message.as_mut() {
                        m.parts.push(Part {
                            header,
                            chunks: Vec::new(),
                        });
                    }
                }
                Event::Chunk(chunk) => {
                    if let Some(p) = message.as_mut().and_then(|m| m.parts.last_mut()) {
                        p.chunks.push(chunk);
                    }
                }
                Event::End(_) => {
                    return message.ok_or(DecodeError::Malformed {
                        what: "message stream",
                        reason: "end without header",
                    })
                }
                Event::Extension { .. } => {}
            }
        }
    }
}

/// What [`Reader`] found on a message stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The message header (always first).
    Header(MessageHeader),
    /// The message this one answers (only ever right after the header).
    InReplyTo(InReplyTo),
    /// A new part starts.
    Part(PartHeader),
    /// A chunk of the current part.
    Chunk(PartChunk),
    /// The message is complete; the stream must end here.
    End(MessageEnd),
    /// An ignorable extension frame, to be skipped.
    Extension {
        /// Its frame type.
        ty: VarInt,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the message header.
    Start,
    /// Header seen, nothing after it yet (the only place for IN_REPLY_TO).
    AfterHeader,
    /// Header seen, no part open.
    BetweenParts,
    /// A part is open: the next chunk must have this sequence number.
    InPart { next_seq: VarInt },
    /// Message end seen.
    Done,
}

/// A sans-IO reader for one message stream: push bytes as they arrive, take [`Event`]s out.
///
/// It enforces the frame order (an `IN_REPLY_TO` only right after the header, naming a message id
/// of the other parity), the part and chunk numbering, the token counts announced in part
/// headers, [`Limits::max_message_bytes`] over the whole stream, and that references to parts of
/// the same message point backwards. Every violation is a [`DecodeError`] and ends the stream
/// (reset it with [`DecodeError::error_code`]).
///
/// ```
/// use unimic_protocol::{message, Encode, Limits, Message, MessageHeader, Role, VarInt};
/// let msg = Message { header: MessageHeader { message_id: VarInt::from_u32(0), role: Role::User }, in_reply_to: None, parts: vec![] };
/// let bytes = msg.to_bytes();
/// let mut reader = message::Reader::new(Limits::default());
/// reader.push(&bytes);
/// assert!(matches!(reader.next_event(), Ok(Some(message::Event::Header(_)))));
/// assert!(matches!(reader.next_event(), Ok(Some(message::Event::End(_)))));
/// assert_eq!(reader.finish(), Ok(()));
/// ```
#[derive(Debug, Clone)]
pub struct Reader {
    frames: frame::Decoder,
    state: State,
    message_id: VarInt,
    /// Index the next part header must have.
    next_part: VarInt,
    /// Kind of the open part and its announced token count (None when not checked).
    current: Option<(u8, Option<u64>)>,
    /// Tokens received so far in the open part.
    tokens: u64,
    /// The first error, returned again by every later call.
    failed: Option<DecodeError>,
}

fn order(reason: &'static str) -> DecodeError {
    DecodeError::Malformed {
        what: "message stream",
        reason,
    }
}

impl Reader {
    /// A reader enforcing the negotiated `limits`.
    pub fn new(limits: Limits) -> Self {
        Reader {
            frames: frame::Decoder::new(limits),
            state: State::Start,
            message_id: VarInt::ZERO,
            next_part: VarInt::ZERO,
            current: None,
            tokens: 0,
            failed: None,
        }
    }

    /// Appends bytes received on the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.frames.push(bytes);
    }

    /// How many more bytes the current frame needs, as far as known (at least 1).
    fn wanted(&self) -> usize {
        self.frames.needed()
    }

    /// The next event, `Ok(None)` if more bytes are needed. After an error the reader stays
    /// failed and returns that error again.
    pub fn next_event(&mut self) -> Result<Option<Event>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.try_next_event();
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    fn try_next_event(&mut self) -> Result<Option<Event>, DecodeError> {
        let Some(frame) = self.frames.next_frame()? else {
            return Ok(None);
        };
        let limit = self.frames.limits().max_message_bytes.into_inner();
        if self.frames.consumed() > limit {
            return Err(DecodeError::LimitExceeded {
                what: "message size",
                value: self.frames.consumed(),
                limit,
            });
        }
        self.on_frame(frame).map(Some)
    }

    /// Declares the end of the stream: an error unless the message ended exactly there.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.frames.finish()?;
        if self.state == State::Done {
            Ok(())
        } else {
            Err(DecodeError::Incomplete)
        }
    }

    /// Total size of the frames read so far, in bytes: across one [`next_event`](Self::next_event)
    /// that returned an event, it grows by the size of that event's frame.
    pub fn consumed(&self) -> u64 {
        self.frames.consumed()
    }

    /// Whether the message end has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn on_frame(&mut self, frame: Frame) -> Result<Event, DecodeError> {
        match (self.state, frame) {
            (State::Done, _) => Err(order("frame after the message end")),
            (State::Start, Frame::MessageHeader(h)) => {
                self.message_id = h.message_id;
                self.state = State::AfterHeader;
                Ok(Event::Header(h))
            }
            (State::Start, _) => Err(order("first frame is not a message header")),
            (State::AfterHeader, Frame::InReplyTo(r)) => {
                if r.message_id.into_inner() % 2 == self.message_id.into_inner() % 2 {
                    return Err(DecodeError::Malformed {
                        what: "IN_REPLY_TO",
                        reason: "names a message of the same sender",
                    });
                }
                self.state = State::BetweenParts;
                Ok(Event::InReplyTo(r))
            }
            (_, Frame::InReplyTo(_)) => {
                Err(order("IN_REPLY_TO not right after the message header"))
            }
            (State::AfterHeader, frame) => {
                self.state = State::BetweenParts;
                self.on_frame(frame)
            }
            (_, Frame::Extension { ty, .. }) => Ok(Event::Extension { ty }),
            (State::BetweenParts, Frame::PartHeader(h)) => {
                if h.index != self.next_part {
                    return Err(order("part index out of sequence"));
                }
                self.next_part = VarInt::saturating(self.next_part.into_inner().saturating_add(1));
                let announced = match &h.body {
                    PartBody::Text(c) if c.token_count == VarInt::ZERO => None,
                    PartBody::Text(c) | PartBody::Image(c) => Some(c.token_count.into_inner()),
                    PartBody::Raw(_) => Some(0),
                };
                if let Some(c) = h.body.coded() {
                    for r in &c.context {
                        if r.message_id == self.message_id && r.part_index >= h.index {
                            return Err(order(
                                "context refers to a later part of the same message",
                            ));
                        }
                    }
                }
                self.current = Some((h.body.kind(), announced));
                self.tokens = 0;
                self.state = State::InPart {
                    next_seq: VarInt::ZERO,
                };
                Ok(Event::Part(h))
            }
            (State::InPart { next_seq }, Frame::PartChunk(c)) => {
                if c.part_index.into_inner().checked_add(1) != Some(self.next_part.into_inner()) {
                    return Err(order("chunk for a part other than the current one"));
                }
                if c.seq != next_seq {
                    return Err(order("chunk sequence number out of order"));
                }
                let (kind, announced) = self.current.unwrap_or((0, None));
                if kind == 2 && c.token_count != VarInt::ZERO {
                    return Err(order("raw attachment chunk with a token count"));
                }
                self.tokens = self
                    .tokens
                    .checked_add(c.token_count.into_inner())
                    .ok_or(order("token count overflows"))?;
                if let Some(total) = announced {
                    if self.tokens > total || (c.fin && self.tokens != total) {
                        return Err(DecodeError::Malformed {
                            what: "part chunk",
                            reason: "token counts do not add up to the part header's",
                        });
                    }
                }
                self.state = if c.fin {
                    State::BetweenParts
                } else {
                    State::InPart {
                        next_seq: VarInt::saturating(next_seq.into_inner().saturating_add(1)),
                    }
                };
                Ok(Event::Chunk(c))
            }
            (State::BetweenParts, Frame::MessageEnd(e)) => {
                if e.part_count != self.next_part {
                    return Err(order("part count differs from the parts sent"));
                }
                self.state = State::Done;
                Ok(Event::End(e))
            }
            (State::InPart { .. }, Frame::PartHeader(_) | Frame::MessageEnd(_)) => {
                Err(order("part ended without a final chunk"))
            }
            (State::BetweenParts, Frame::PartChunk(_)) => Err(order("chunk outside a part")),
            (_, Frame::MessageHeader(_)) => Err(order("second message header")),
            (_, _) => Err(order("handshake or control frame on a message stream")),
        }
    }
}

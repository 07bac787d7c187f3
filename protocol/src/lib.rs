//! The unimic wire format: frames, messages, parts, the handshake and the error registry.
//!
//! This crate is sans-IO: it turns values into bytes and bytes into values, and runs the
//! handshake as a pure state machine. It has no sockets, no async runtime and no models; the
//! transport crate drives it over QUIC, the codec crate fills in the entropy-coded payloads. The
//! byte-level specification is `docs/PROTOCOL.md`; tests check its hex examples byte for byte.
//!
//! # Layout
//! - [`varint`]: QUIC variable-length integers ([`VarInt`]).
//! - [`coding`]: the [`Encode`] / [`Decode`] traits over `bytes::{Buf, BufMut}` and
//!   [`DecodeError`], which tells *need more bytes* from *malformed*, *limit exceeded* and
//!   *unsupported*.
//! - [`frame`]: [`Frame`] (`type | length | payload`), the streaming [`frame::Decoder`] and,
//!   with the `codec` feature, a tokio-util `Encoder`/`Decoder` (`frame::Codec`).
//! - [`handshake`]: hellos, [`Reject`], and the [`handshake::Client`] / [`handshake::Server`]
//!   state machines.
//! - [`message`]: [`MessageHeader`], [`InReplyTo`], [`MessageEnd`], a whole [`Message`], and the
//!   [`message::Reader`] that checks a message stream as it arrives.
//! - [`part`]: [`PartHeader`], coding modes, regions, context references, [`PartChunk`].
//! - [`control`]: Ack, Cancel, Error, GoAway, ContextEvicted.
//! - [`error_code`]: the registry ([`ErrorCode`]).
//! - [`limits`]: [`Limits`] and the fixed protocol bounds.
//!
//! # Example
//! Encode a message to the bytes of its stream and decode it back:
//!
//! ```
//! use bytes::Bytes;
//! use unimic_protocol::{
//!     CodedPart, CodingMode, Decode, Encode, Limits, Message, MessageHeader, Part, PartBody,
//!     PartChunk, PartHeader, Role, Shape, VarInt,
//! };
//!
//! let v = VarInt::from_u32;
//! let message = Message {
//!     header: MessageHeader { message_id: v(0), role: Role::User },
//!     in_reply_to: None,
//!     parts: vec![Part {
//!         header: PartHeader {
//!             index: v(0),
//!             body: PartBody::Text(CodedPart {
//!                 tokenizer: v(0),
//!                 entropy_model: v(0),
//!                 shape: Shape { rows: v(1), cols: v(3) },
//!                 token_count: v(3),
//!                 mode: CodingMode::Generic,
//!                 context: vec![],
//!                 context_digest: [0; 32],
//!             }),
//!         },
//!         chunks: vec![PartChunk {
//!             part_index: v(0),
//!             seq: v(0),
//!             fin: true,
//!             token_count: v(3),
//!             payload: Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef]),
//!         }],
//!     }],
//! };
//!
//! let bytes = message.to_bytes();
//! let decoded = Message::decode_exact(&bytes, &Limits::default())?;
//! assert_eq!(decoded, message);
//!
//! // Truncated input asks for more bytes instead of failing.
//! assert_eq!(
//!     Message::decode_exact(&bytes[..bytes.len() - 1], &Limits::default()),
//!     Err(unimic_protocol::DecodeError::Incomplete)
//! );
//! # Ok::<(), unimic_protocol::DecodeError>(())
//! ```
//!
//! # Features
//! - `codec`: `frame::Codec`, a `tokio_util::codec::{Decoder, Encoder}` for frames.
//! - `arbitrary`: `arbitrary::Arbitrary` for every wire type (fuzzing).

#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

pub mod coding;
pub mod control;
pub mod error_code;
pub mod frame;
pub mod handshake;
pub mod limits;
pub mod message;
pub mod part;
pub mod varint;

pub use coding::{Decode, DecodeError, Encode};
pub use control::{Ack, AckStage, Cancel, ContextEvicted, ErrorFrame, GoAway};
pub use error_code::ErrorCode;
pub use frame::Frame;
pub use handshake::{ClientHello, ModelInfo, Reject, ServerHello};
pub use limits::Limits;
pub use message::{InReplyTo, Message, MessageEnd, MessageHeader, Part, Role};
pub use part::{
    CodedPart, CodingMode, ContextRef, PartBody, PartChunk, PartHeader, RawPart, Rect, Region,
    Shape, CONTEXT_DIGEST_DOMAIN, EMPTY_CONTEXT_DIGEST, MAX_LADDER_LEVEL,
};
pub use varint::{VarInt, VarIntBoundsExceeded};

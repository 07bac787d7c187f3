//! Frame I/O over quinn streams: a frame reader on a receive stream, frame writes, and the
//! conversion between registry codes and QUIC error codes.

use bytes::BytesMut;
use unimic_protocol::{frame, DecodeError, Encode, ErrorCode, Frame, Limits, VarInt};

/// Largest read from a stream at once.
const READ_CHUNK: usize = 64 * 1024;

/// Why a frame could not be read.
#[derive(Debug)]
pub(crate) enum ReadFrameError {
    /// The bytes were not a valid frame (or broke a limit).
    Decode(DecodeError),
    /// The stream failed (reset by the peer, connection lost).
    Read(quinn::ReadError),
}

/// Reads whole frames from a receive stream, enforcing limits before allocating.
#[derive(Debug)]
pub(crate) struct FrameReader {
    recv: quinn::RecvStream,
    decoder: frame::Decoder,
}

impl FrameReader {
    pub(crate) fn new(recv: quinn::RecvStream, limits: Limits) -> Self {
        Self {
            recv,
            decoder: frame::Decoder::new(limits),
        }
    }

    pub(crate) fn set_limits(&mut self, limits: Limits) {
        self.decoder.set_limits(limits);
    }

    /// The next frame; `Ok(None)` when the stream finished cleanly between frames.
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, ReadFrameError> {
        loop {
            if let Some(f) = self.decoder.next_frame().map_err(ReadFrameError::Decode)? {
                return Ok(Some(f));
            }
            match self
                .recv
                .read_chunk(READ_CHUNK, true)
                .await
                .map_err(ReadFrameError::Read)?
            {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None => {
                    self.decoder.finish().map_err(ReadFrameError::Decode)?;
                    return Ok(None);
                }
            }
        }
    }
}

/// The bytes of one frame.
pub(crate) fn frame_bytes(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::with_capacity(frame.encoded_len());
    frame.encode(&mut buf);
    buf
}

/// A registry code as a QUIC application error code.
pub(crate) fn quic_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u64(code.into_inner()).unwrap_or(quinn::VarInt::from_u32(1))
}

/// A QUIC application error code as a registry code.
pub(crate) fn registry_code(code: quinn::VarInt) -> ErrorCode {
    ErrorCode::from(VarInt::saturating(code.into_inner()))
}

/// A reason string cut to the protocol bound (at a character boundary).
pub(crate) fn short_reason(reason: &str) -> String {
    let max = unimic_protocol::limits::MAX_REASON_LEN as usize;
    if reason.len() <= max {
        return reason.to_owned();
    }
    let mut end = max;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// Closes the connection with a registry code and reason.
pub(crate) fn close(conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    conn.close(quic_code(code), short_reason(reason).as_bytes());
}

//! Frame decoding from arbitrary bytes fed in arbitrary chunk sizes.
//!
//! Input layout: byte 0 bit 0 chooses small limits; byte 1 is a count `k`; the next `k` bytes are
//! chunk sizes (0 counts as 1, the list repeats); everything after is the stream. The stream is decoded once in one piece and once fed chunk by chunk; both must yield
//! the same frames and the same final error. Every decoded frame must re-encode to exactly the
//! bytes it was parsed from (but for the empty context's digest, which a part header may carry
//! and senders leave out), and parse back equal.

use unimic_protocol::{
    frame, Decode, DecodeError, Encode, Frame, Limits, VarInt, EMPTY_CONTEXT_DIGEST,
};

/// The outcome of decoding a stream: the frames with their byte ranges, and how it ended.
type Outcome = (Vec<(Frame, u64, u64)>, Result<(), DecodeError>);

fn decode_all(limits: Limits, stream: &[u8], sizes: &[u8]) -> Outcome {
    let mut decoder = frame::Decoder::new(limits);
    let mut frames = Vec::new();
    let mut pos = 0usize;
    let mut sizes = sizes.iter().cycle();
    loop {
        // Take out every frame that is complete.
        loop {
            let before = decoder.consumed();
            match decoder.next_frame() {
                Ok(Some(f)) => frames.push((f, before, decoder.consumed())),
                Ok(None) => break,
                Err(e) => return (frames, Err(e)),
            }
        }
        if pos >= stream.len() {
            return (frames, decoder.finish());
        }
        let step = match sizes.next() {
            Some(&s) => usize::from(s).max(1),
            None => stream.len(),
        };
        let end = pos.saturating_add(step).min(stream.len());
        decoder.push(&stream[pos..end]);
        pos = end;
    }
}

/// The frame `bytes` encode, written with the empty context's digest, if it is a coded part
/// header that leaves that digest out (the one other encoding a frame may arrive in).
pub fn with_empty_digest(frame: &Frame, bytes: &[u8]) -> Option<Vec<u8>> {
    let Frame::PartHeader(h) = frame else {
        return None;
    };
    let coded = h.body.coded()?;
    if coded.digest_on_wire() {
        return None;
    }
    let mut rest = bytes;
    let ty = VarInt::decode(&mut rest, &Limits::default()).ok()?;
    let _len = VarInt::decode(&mut rest, &Limits::default()).ok()?;
    let mut payload = rest.to_vec();
    payload.extend_from_slice(&EMPTY_CONTEXT_DIGEST);
    let mut out = Vec::new();
    ty.encode(&mut out);
    VarInt::try_from(payload.len() as u64)
        .ok()?
        .encode(&mut out);
    out.extend_from_slice(&payload);
    Some(out)
}

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let small = data.first().is_some_and(|b| b & 1 == 1);
    let k = data.get(1).copied().map_or(0, usize::from);
    let sizes = data.get(2..2 + k).unwrap_or_default();
    let stream = data.get(2 + k..).unwrap_or_default();
    let limits = if small {
        Limits {
            max_frame_bytes: VarInt::from_u32(64),
            max_grid_height: VarInt::from_u32(8),
            max_grid_width: VarInt::from_u32(8),
            max_context_bytes: VarInt::from_u32(256),
            ..Limits::default()
        }
    } else {
        Limits::default()
    };

    let whole = decode_all(limits, stream, &[]);
    let chunked = decode_all(limits, stream, sizes);
    assert_eq!(whole, chunked, "chunking changed the result");

    for (frame, start, end) in &whole.0 {
        let original = &stream[*start as usize..*end as usize];
        let bytes = frame.to_bytes();
        if bytes[..] != *original {
            // The one other encoding a header may arrive in: an empty context with its digest
            // (the constant), which senders leave out (PROTOCOL.md §6.2).
            assert_eq!(
                with_empty_digest(frame, &bytes).as_deref(),
                Some(original),
                "re-encoding differs for {frame:?}"
            );
        }
        assert_eq!(frame.encoded_len(), bytes.len());
        let again = Frame::decode_exact(&bytes, &limits).expect("re-encoded frame must parse");
        assert_eq!(&again, frame);
    }
    // What the streaming decoder accepted, the one-shot `Decode` impl accepts too.
    let mut rest = stream;
    for (frame, _, _) in &whole.0 {
        let f = Frame::decode(&mut rest, &limits).expect("one-shot decode must agree");
        assert_eq!(&f, frame);
    }
}

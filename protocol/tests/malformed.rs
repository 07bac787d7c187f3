//! Malformed input: each case asserts the specific error.

mod common;

use common::*;
use unimic_protocol::*;

fn limits() -> Limits {
    Limits::default()
}

fn frame_err(bytes: &[u8]) -> DecodeError {
    Frame::decode_exact(bytes, &limits()).unwrap_err()
}

/// The payload of a frame of type `ty` built from `payload`, decoded.
fn payload_err(ty: u64, payload: &[u8]) -> DecodeError {
    frame_err(&raw_frame(ty, payload))
}

fn malformed(what: &'static str, reason: &'static str) -> DecodeError {
    DecodeError::Malformed { what, reason }
}

fn limit(what: &'static str, value: u64, limit: u64) -> DecodeError {
    DecodeError::LimitExceeded { what, value, limit }
}

#[test]
fn truncation_at_every_byte_needs_more() {
    for frame in all_frames() {
        let bytes = frame.to_bytes();
        for cut in 0..bytes.len() {
            assert_eq!(
                Frame::decode_exact(&bytes[..cut], &limits()),
                Err(DecodeError::Incomplete),
                "{} cut at {cut}",
                frame.name()
            );
            let mut d = frame::Decoder::new(limits());
            d.push(&bytes[..cut]);
            assert_eq!(d.next_frame(), Ok(None));
            assert_eq!(d.finish().is_ok(), cut == 0);
        }
    }
    let bytes = sample_message().to_bytes();
    for cut in 0..bytes.len() {
        assert_eq!(
            Message::decode_exact(&bytes[..cut], &limits()),
            Err(DecodeError::Incomplete),
            "message cut at {cut}"
        );
        let mut reader = message::Reader::new(limits());
        reader.push(&bytes[..cut]);
        while reader.next_event().unwrap().is_some() {}
        assert_eq!(reader.finish(), Err(DecodeError::Incomplete));
    }
}

#[test]
fn truncated_payload_inside_a_complete_frame_is_malformed() {
    // MESSAGE_HEADER whose payload stops after the id.
    assert_eq!(
        payload_err(0x04, &[0x04]),
        malformed("MESSAGE_HEADER", "payload ends inside a field")
    );
    // A count larger than the bytes that follow.
    assert_eq!(
        payload_err(0x0c, &[0x05, 0x00, 0x00]),
        malformed("CONTEXT_EVICTED", "payload ends inside a field")
    );
}

#[test]
fn oversized_frame_length_fails_before_the_payload_arrives() {
    let mut d = frame::Decoder::new(limits());
    // PART_CHUNK with a 4-byte length of 2^20 + 1: only the header is pushed.
    let mut header = varints(&[0x06]);
    v((1 << 20) + 1).encode(&mut header);
    d.push(&header);
    let e = limit("frame length", (1 << 20) + 1, 1 << 20);
    assert_eq!(d.next_frame(), Err(e.clone()));
    // The decoder stays failed.
    d.push(&[0; 8]);
    assert_eq!(d.next_frame(), Err(e.clone()));
    assert_eq!(d.finish(), Err(e.clone()));
    assert_eq!(e.error_code(), ErrorCode::LIMIT_EXCEEDED);
    // Before the handshake the bound is 64 KiB.
    let hello = raw_frame(0x01, &vec![0u8; 70_000]);
    assert_eq!(
        Frame::decode_exact(&hello, &Limits::HANDSHAKE),
        Err(limit("frame length", 70_000, 65_536))
    );
    // The largest possible varint length.
    let mut huge = varints(&[0x06]);
    VarInt::MAX.encode(&mut huge);
    assert_eq!(
        frame_err(&huge),
        limit("frame length", VarInt::MAX.into_inner(), 1 << 20)
    );
}

#[test]
fn varint_overflow_and_non_minimal_encodings() {
    assert_eq!(
        VarInt::from_u64(1 << 62),
        Err(VarIntBoundsExceeded(1 << 62))
    );
    assert!(VarInt::try_from(u64::MAX).is_err());
    // Non-minimal frame type, non-minimal length.
    assert_eq!(
        frame_err(&[0x40, 0x07, 0x01, 0x00]),
        malformed("varint", "not the shortest encoding")
    );
    assert_eq!(
        frame_err(&[0x07, 0x40, 0x01, 0x00]),
        malformed("varint", "not the shortest encoding")
    );
    // Non-minimal varint inside a payload.
    assert_eq!(
        payload_err(0x07, &[0x80, 0x00, 0x00, 0x01]),
        malformed("varint", "not the shortest encoding")
    );
    // A count at the varint maximum.
    let mut p = Vec::new();
    VarInt::MAX.encode(&mut p);
    assert_eq!(
        payload_err(0x0c, &p),
        limit("evicted reference count", VarInt::MAX.into_inner(), 1024)
    );
}

#[test]
fn unknown_frame_types() {
    // Mandatory unknown types fail as soon as the type is read.
    for ty in [0x00u64, 0x0d, 0x1f, 0x40, 0x5f, 0x3fff_ffdf] {
        let mut d = frame::Decoder::new(limits());
        d.push(&varints(&[ty]));
        let e = DecodeError::Unsupported {
            what: "frame type",
            value: ty,
        };
        assert_eq!(d.next_frame(), Err(e.clone()), "type {ty:#x}");
        assert_eq!(e.error_code(), ErrorCode::UNSUPPORTED);
    }
    // Ignorable unknown types come back as extensions.
    for ty in [0x21u64, 0x3f, 0x60, 0x1234_5660] {
        assert!(frame::is_ignorable(v(ty)));
        let f = Frame::decode_exact(&raw_frame(ty, b"abc"), &limits()).unwrap();
        assert_eq!(
            f,
            Frame::Extension {
                ty: v(ty),
                payload: bytes::Bytes::from_static(b"abc")
            }
        );
    }
}

#[test]
fn trailing_bytes() {
    // In a frame payload.
    assert_eq!(
        payload_err(0x07, &[0x01, 0x00]),
        DecodeError::TrailingBytes {
            what: "MESSAGE_END",
            count: 1
        }
    );
    // After a whole message.
    let mut bytes = sample_message().to_bytes().to_vec();
    bytes.push(0x07);
    assert_eq!(
        Message::decode_exact(&bytes, &limits()),
        Err(DecodeError::TrailingBytes {
            what: "Message",
            count: 1
        })
    );
    // After a varint.
    assert_eq!(
        VarInt::decode_slice(&[0x01, 0x02]),
        Err(DecodeError::TrailingBytes {
            what: "varint",
            count: 1
        })
    );
}

/// A client hello payload with the given counts, the rest valid.
fn hello_payload(versions: &[u64], models: usize, token_len: usize) -> Vec<u8> {
    let mut p = varints(&[versions.len() as u64]);
    p.extend(varints(versions));
    p.extend(varints(&[models as u64]));
    for i in 0..models {
        ModelInfo {
            id: format!("m{i}"),
            version: v(1),
            hash: [0; 32],
        }
        .encode(&mut p);
    }
    p.push(0);
    Limits::default().encode(&mut p);
    p.extend(varints(&[token_len as u64]));
    p.extend(vec![b't'; token_len]);
    p
}

#[test]
fn counts_above_limits() {
    let hs = Limits::HANDSHAKE;
    let hello = |p: Vec<u8>| Frame::decode_exact(&raw_frame(0x01, &p), &hs);
    assert!(hello(hello_payload(&[1], 64, 4096)).is_ok());
    assert_eq!(
        hello(hello_payload(&(1..=17).collect::<Vec<_>>(), 1, 0)),
        Err(limit("version count", 17, 16))
    );
    assert_eq!(
        hello(hello_payload(&[1], 65, 0)),
        Err(limit("tokenizer count", 65, 64))
    );
    assert_eq!(
        hello(hello_payload(&[1], 1, 4097)),
        Err(limit("token length", 4097, 4096))
    );
    // Model id longer than 64 bytes.
    let mut p = varints(&[1, 1, 1, 65]);
    p.extend(vec![b'a'; 65]);
    assert_eq!(hello(p), Err(limit("model id length", 65, 64)));
    // Reason longer than 1024 bytes.
    let mut p = varints(&[0x0b]);
    v(1025).encode(&mut p);
    p.extend(vec![b'r'; 1025]);
    assert_eq!(payload_err(0x0b, &p), limit("reason length", 1025, 1024));
    // Evicted references.
    let mut p = Vec::new();
    v(1025).encode(&mut p);
    p.extend(vec![0; 2050]);
    assert_eq!(
        payload_err(0x0c, &p),
        limit("evicted reference count", 1025, 1024)
    );
}

/// A coded image part header payload; `rest` follows the shape fields.
fn image_header(rows: u64, cols: u64, tokens: u64, rest: &[u8]) -> Vec<u8> {
    let mut p = varints(&[0, 1, 0, 0, rows, cols, tokens]);
    p.extend_from_slice(rest);
    p
}

const NO_CONTEXT: [u8; 33] = {
    let mut a = [0u8; 33];
    a[0] = 0;
    a
};

fn with_no_context(mode: &[u8]) -> Vec<u8> {
    let mut v = mode.to_vec();
    v.extend_from_slice(&NO_CONTEXT);
    v
}

#[test]
fn the_digest_after_an_empty_context_is_absent_or_whole() {
    // Ends after the reference count: the empty context's constant.
    let short = image_header(2, 2, 4, &[1, 0]);
    match Frame::decode_exact(&raw_frame(0x05, &short), &limits()).unwrap() {
        Frame::PartHeader(PartHeader {
            body: PartBody::Image(c),
            ..
        }) => {
            assert_eq!(c.context_digest, EMPTY_CONTEXT_DIGEST);
            assert!(c.context.is_empty());
        }
        other => panic!("{other:?}"),
    }
    // 32 bytes: that digest, whatever it is (the receiver's session compares it).
    let whole = image_header(2, 2, 4, &with_no_context(&[1]));
    match Frame::decode_exact(&raw_frame(0x05, &whole), &limits()).unwrap() {
        Frame::PartHeader(PartHeader {
            body: PartBody::Image(c),
            ..
        }) => {
            assert_eq!(c.context_digest, [0; 32]);
            // A digest other than the constant stays on the wire.
            assert!(c.digest_on_wire());
        }
        other => panic!("{other:?}"),
    }
    // 1 … 31 bytes: the payload ends inside the digest; 33: a trailing byte.
    for n in [1usize, 16, 31] {
        let mut p = image_header(2, 2, 4, &[1, 0]);
        p.extend(std::iter::repeat_n(7u8, n));
        assert_eq!(
            payload_err(0x05, &p),
            malformed("PART_HEADER", "payload ends inside a field"),
            "{n} bytes"
        );
    }
    let mut p = whole.clone();
    p.push(0);
    assert_eq!(
        payload_err(0x05, &p),
        DecodeError::TrailingBytes {
            what: "PART_HEADER",
            count: 1
        }
    );
    // A non-empty context always carries its digest.
    let no_digest = image_header(2, 2, 4, &[1, 1, 4, 0]);
    assert_eq!(
        payload_err(0x05, &no_digest),
        malformed("PART_HEADER", "payload ends inside a field")
    );
}

#[test]
fn part_header_limits_and_rules() {
    let ok = image_header(2, 2, 4, &with_no_context(&[1]));
    assert!(Frame::decode_exact(&raw_frame(0x05, &ok), &limits()).is_ok());
    // Grid above the negotiated limits.
    assert_eq!(
        payload_err(0x05, &image_header(257, 2, 514, &with_no_context(&[1]))),
        limit("grid height", 257, 256)
    );
    assert_eq!(
        payload_err(0x05, &image_header(2, 300, 600, &with_no_context(&[1]))),
        limit("grid width", 300, 256)
    );
    assert_eq!(
        payload_err(0x05, &image_header(0, 2, 0, &with_no_context(&[1]))),
        malformed("image shape", "zero height or width")
    );
    assert_eq!(
        payload_err(0x05, &image_header(2, 2, 5, &with_no_context(&[1]))),
        limit("image token count", 5, 4)
    );
    assert_eq!(
        payload_err(0x05, &image_header(2, 2, 3, &with_no_context(&[1]))),
        malformed(
            "image token count",
            "differs from height × width outside masked mode"
        )
    );
    // Unknown part kind, coding mode, region kind.
    assert_eq!(
        payload_err(0x05, &[0x00, 0x03]),
        DecodeError::Unsupported {
            what: "part kind",
            value: 3
        }
    );
    assert_eq!(
        payload_err(0x05, &image_header(2, 2, 4, &with_no_context(&[6]))),
        DecodeError::Unsupported {
            what: "coding mode",
            value: 6
        }
    );
    // Refinement (mode 5): levels 2 ..= 16 only; the token count is the whole grid.
    for level in [2u8, 16] {
        let ok = image_header(2, 2, 4, &with_no_context(&[5, level]));
        assert!(Frame::decode_exact(&raw_frame(0x05, &ok), &limits()).is_ok());
    }
    for level in [0u8, 1, 17] {
        assert_eq!(
            payload_err(0x05, &image_header(2, 2, 4, &with_no_context(&[5, level]))),
            malformed("refinement level", "outside 2 ..= 16")
        );
    }
    assert_eq!(
        payload_err(0x05, &image_header(2, 2, 3, &with_no_context(&[5, 2]))),
        malformed(
            "image token count",
            "differs from height × width outside masked mode"
        )
    );
    assert_eq!(
        payload_err(0x05, &image_header(2, 2, 4, &with_no_context(&[2, 2]))),
        DecodeError::Unsupported {
            what: "region kind",
            value: 2
        }
    );
    // Context references above the bound.
    let mut rest = vec![1];
    v(257).encode(&mut rest);
    rest.extend(vec![0; 2 * 257 + 32]);
    assert_eq!(
        payload_err(0x05, &image_header(2, 2, 4, &rest)),
        limit("context reference count", 257, 256)
    );
    // Model index above the table bound.
    assert_eq!(
        payload_err(0x05, &varints(&[0, 1, 64])),
        limit("tokenizer index", 64, 63)
    );
}

#[test]
fn text_part_rules() {
    // rows must be 1
    let p = varints(&[0, 0, 0, 0, 2, 3, 3]);
    assert_eq!(
        payload_err(0x05, &p),
        malformed("text shape", "rows must be 1")
    );
    let mut p = varints(&[0, 0, 0, 0, 1, 3, 2]);
    p.extend(with_no_context(&[1]));
    assert_eq!(
        payload_err(0x05, &p),
        malformed("text shape", "token count differs from columns")
    );
    // Token count bounded by the context memory (16 MiB / 4 bytes).
    let p = varints(&[0, 0, 0, 0, 1, (4 << 20) + 1]);
    assert_eq!(
        payload_err(0x05, &p),
        limit("text token count", (4 << 20) + 1, 4 << 20)
    );
    // Masked mode on text.
    let mut p = varints(&[0, 0, 0, 0, 1, 3, 3]);
    p.extend(with_no_context(&[2, 1]));
    assert_eq!(
        payload_err(0x05, &p),
        malformed("coding mode", "masked mode on a text part")
    );
    // Refinement mode on text.
    let mut p = varints(&[0, 0, 0, 0, 1, 3, 3]);
    p.extend(with_no_context(&[5, 2]));
    assert_eq!(
        payload_err(0x05, &p),
        malformed("coding mode", "refinement mode on a text part")
    );
}

#[test]
fn region_rules() {
    let bitmap = |bytes: &[u8], tokens: u64| {
        let mut rest = vec![2, 0, bytes.len() as u8];
        rest.extend_from_slice(bytes);
        rest.extend_from_slice(&NO_CONTEXT);
        image_header(3, 3, tokens, &rest)
    };
    assert!(Frame::decode_exact(&raw_frame(0x05, &bitmap(&[0xff, 0x01], 9)), &limits()).is_ok());
    assert_eq!(
        payload_err(0x05, &bitmap(&[0xff], 8)),
        malformed("region bitmap", "length is not ceil(rows × cols / 8)")
    );
    assert_eq!(
        payload_err(0x05, &bitmap(&[0xff, 0xff, 0x00], 9)),
        limit("region bitmap length", 3, 2)
    );
    assert_eq!(
        payload_err(0x05, &bitmap(&[0xff, 0x03], 9)),
        malformed("region bitmap", "padding bits are not zero")
    );
    assert_eq!(
        payload_err(0x05, &bitmap(&[0x0f, 0x00], 3)),
        malformed(
            "image token count",
            "differs from the number of cells in the bitmap"
        )
    );
    let rects = |r: &[u64]| {
        let mut rest = vec![2, 1];
        rest.extend(varints(&[(r.len() / 4) as u64]));
        rest.extend(varints(r));
        rest.extend_from_slice(&NO_CONTEXT);
        image_header(3, 3, 1, &rest)
    };
    assert!(Frame::decode_exact(&raw_frame(0x05, &rects(&[2, 2, 1, 1])), &limits()).is_ok());
    assert_eq!(
        payload_err(0x05, &rects(&[2, 2, 2, 1])),
        malformed("region rectangle", "outside the grid")
    );
    assert_eq!(
        payload_err(0x05, &rects(&[0, 0, 0, 1])),
        malformed("region rectangle", "empty")
    );
    assert_eq!(
        payload_err(0x05, &rects(&[])),
        malformed("region", "no rectangles")
    );
    let mut many = vec![2, 1];
    v(1025).encode(&mut many);
    many.extend(vec![0; 4 * 1025 + 33]);
    assert_eq!(
        payload_err(0x05, &image_header(3, 3, 1, &many)),
        limit("region rectangle count", 1025, 1024)
    );
}

#[test]
fn field_values() {
    // Role 4 is unknown.
    assert_eq!(
        payload_err(0x04, &[0x00, 0x04]),
        DecodeError::Unsupported {
            what: "role",
            value: 4
        }
    );
    // Chunk flags with reserved bits.
    assert_eq!(
        payload_err(0x06, &[0x00, 0x00, 0x02, 0x00]),
        malformed("chunk flags", "reserved bits set")
    );
    // Boolean byte 2 in an Error frame.
    assert_eq!(
        payload_err(0x0a, &[0x01, 0x02, 0x00]),
        malformed("message id presence", "boolean byte other than 0 or 1")
    );
    // Ack stage 3.
    assert_eq!(
        payload_err(0x08, &[0, 0, 0, 3]),
        DecodeError::Unsupported {
            what: "ack stage",
            value: 3
        }
    );
    // Invalid UTF-8 reason.
    assert_eq!(
        payload_err(0x0b, &[0x00, 0x02, 0xc3, 0x28]),
        malformed("reason length", "not valid UTF-8")
    );
    // Empty model id, duplicate versions, duplicate models.
    let hs = Limits::HANDSHAKE;
    let mut p = varints(&[1, 1, 1, 0]);
    p.extend(vec![0; 40]);
    assert_eq!(
        Frame::decode_exact(&raw_frame(0x01, &p), &hs),
        Err(malformed("model id", "empty"))
    );
    assert_eq!(
        Frame::decode_exact(&raw_frame(0x01, &hello_payload(&[1, 1], 0, 0)), &hs),
        Err(malformed("versions", "duplicate version"))
    );
    assert_eq!(
        Frame::decode_exact(&raw_frame(0x01, &hello_payload(&[], 0, 0)), &hs),
        Err(malformed("versions", "empty list"))
    );
    let mut dup = client_hello();
    dup.tokenizers = vec![vq16(), vq16()];
    assert_eq!(
        Frame::decode_exact(&Frame::ClientHello(dup).to_bytes(), &hs),
        Err(malformed("tokenizer count", "duplicate model"))
    );
    // Empty media type.
    assert_eq!(
        payload_err(0x05, &[0x00, 0x02, 0x00]),
        malformed("media type", "empty")
    );
}

/// Decodes a message stream made of `frames`.
fn stream_err(frames: &[Frame]) -> DecodeError {
    let mut bytes = Vec::new();
    for f in frames {
        f.encode(&mut bytes);
    }
    let mut reader = message::Reader::new(limits());
    reader.push(&bytes);
    loop {
        match reader.next_event() {
            Ok(Some(_)) => {}
            Ok(None) => return reader.finish().unwrap_err(),
            Err(e) => {
                // The reader stays failed.
                assert_eq!(reader.next_event(), Err(e.clone()));
                assert_eq!(reader.finish(), Err(e.clone()));
                return e;
            }
        }
    }
}

fn order(reason: &'static str) -> DecodeError {
    malformed("message stream", reason)
}

#[test]
fn message_stream_order() {
    let frames: Vec<Frame> = sample_message().frames().collect();
    // frames: 0 header, 1 part0, 2 chunk0/0, 3 part1, 4 chunk1/0, 5 chunk1/1, 6 end
    let without = |skip: usize| -> Vec<Frame> {
        frames
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, f)| f.clone())
            .collect()
    };
    assert_eq!(
        stream_err(&without(0)),
        order("first frame is not a message header")
    );
    assert_eq!(stream_err(&without(1)), order("chunk outside a part"));
    assert_eq!(
        stream_err(&without(2)),
        order("part ended without a final chunk")
    );
    assert_eq!(stream_err(&without(3)), order("chunk outside a part"));
    assert_eq!(
        stream_err(&without(4)),
        order("chunk sequence number out of order")
    );
    assert_eq!(
        stream_err(&without(5)),
        order("part ended without a final chunk")
    );
    assert_eq!(stream_err(&without(6)), DecodeError::Incomplete);

    let mut extra = frames.clone();
    extra.push(frames[6].clone());
    assert_eq!(stream_err(&extra), order("frame after the message end"));

    let mut second_header = frames.clone();
    second_header.insert(3, frames[0].clone());
    assert_eq!(stream_err(&second_header), order("second message header"));

    let mut control = frames.clone();
    control.insert(3, control_frames()[0].clone());
    assert_eq!(
        stream_err(&control),
        order("handshake or control frame on a message stream")
    );

    let mut gap = frames.clone();
    if let Frame::PartHeader(h) = &mut gap[3] {
        h.index = v(2);
    }
    assert_eq!(stream_err(&gap), order("part index out of sequence"));

    let mut wrong_part = frames.clone();
    if let Frame::PartChunk(c) = &mut wrong_part[4] {
        c.part_index = v(0);
    }
    assert_eq!(
        stream_err(&wrong_part),
        order("chunk for a part other than the current one")
    );

    let mut count = frames.clone();
    count[6] = Frame::MessageEnd(MessageEnd { part_count: v(3) });
    assert_eq!(
        stream_err(&count),
        order("part count differs from the parts sent")
    );

    let mut tokens = frames.clone();
    if let Frame::PartChunk(c) = &mut tokens[5] {
        c.token_count = v(2);
    }
    assert_eq!(
        stream_err(&tokens),
        malformed(
            "part chunk",
            "token counts do not add up to the part header's"
        )
    );

    let mut forward = frames.clone();
    if let Frame::PartHeader(PartHeader {
        body: PartBody::Image(c),
        ..
    }) = &mut forward[3]
    {
        c.context[0].part_index = v(1);
    }
    assert_eq!(
        stream_err(&forward),
        order("context refers to a later part of the same message")
    );
}

#[test]
fn raw_chunks_carry_no_tokens() {
    let frames = vec![
        Frame::MessageHeader(MessageHeader {
            message_id: v(0),
            role: Role::User,
        }),
        Frame::PartHeader(PartHeader {
            index: v(0),
            ..raw_part_header()
        }),
        Frame::PartChunk(PartChunk {
            part_index: v(0),
            seq: v(0),
            fin: true,
            token_count: v(1),
            payload: bytes::Bytes::from_static(b"png"),
        }),
    ];
    assert_eq!(
        stream_err(&frames),
        order("raw attachment chunk with a token count")
    );
}

#[test]
fn message_size_limit_counts_every_frame() {
    let m = sample_message();
    let size = m.to_bytes().len() as u64;
    let tight = Limits {
        max_message_bytes: v(size - 1),
        ..limits()
    };
    let e = Message::decode_exact(&m.to_bytes(), &tight).unwrap_err();
    assert!(
        matches!(e, DecodeError::LimitExceeded { what: "message size", limit, .. } if limit == size - 1),
        "{e:?}"
    );
    let exact = Limits {
        max_message_bytes: v(size),
        ..limits()
    };
    assert_eq!(Message::decode_exact(&m.to_bytes(), &exact), Ok(m));
}

#[test]
fn in_reply_to_is_parsed_strictly() {
    let reply = reply_message();
    let frames: Vec<Frame> = reply.frames().collect();
    // frames: 0 header, 1 in-reply-to, 2 part0, 3 chunk0/0, 4 chunk0/1, 5 end
    assert!(matches!(frames[1], Frame::InReplyTo(_)));
    let ir = frames[1].clone();
    let ext = Frame::Extension {
        ty: v(0x21),
        payload: bytes::Bytes::from_static(b"x"),
    };
    let with = |at: usize, extra: &Frame, base: &[Frame]| -> Vec<Frame> {
        let mut f = base.to_vec();
        f.insert(at, extra.clone());
        f
    };
    let misplaced = order("IN_REPLY_TO not right after the message header");
    // Twice.
    assert_eq!(stream_err(&with(2, &ir, &frames)), misplaced);
    // After a part, between chunks, before the end, after another extension.
    let without: Vec<Frame> = frames
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, f)| f.clone())
        .collect();
    for at in [2, 3, 4] {
        assert_eq!(stream_err(&with(at, &ir, &without)), misplaced, "at {at}");
    }
    let after_ext = with(1, &ext, &without);
    assert_eq!(stream_err(&with(2, &ir, &after_ext)), misplaced);
    // Before the header.
    assert_eq!(
        stream_err(&with(0, &ir, &without)),
        order("first frame is not a message header")
    );
    // Naming a message of the same sender (odd reply id, odd answered id).
    let same = Frame::InReplyTo(InReplyTo { message_id: v(3) });
    assert_eq!(
        stream_err(&with(1, &same, &without)),
        malformed("IN_REPLY_TO", "names a message of the same sender")
    );
    // Right after the header it is fine, also for a message without parts, and an extension
    // may follow it.
    let empty = Message {
        header: MessageHeader {
            message_id: v(7),
            role: Role::Assistant,
        },
        in_reply_to: Some(InReplyTo { message_id: v(0) }),
        parts: vec![],
    };
    assert_eq!(
        Message::decode_exact(&empty.to_bytes(), &limits()),
        Ok(empty.clone())
    );
    let mut stream: Vec<Frame> = empty.frames().collect();
    stream.insert(2, ext.clone());
    let mut bytes = Vec::new();
    for f in &stream {
        f.encode(&mut bytes);
    }
    assert_eq!(Message::decode_exact(&bytes, &limits()), Ok(empty));

    // The payload is exactly one varint.
    assert_eq!(
        payload_err(0x20, &[0x04, 0x00]),
        DecodeError::TrailingBytes {
            what: "IN_REPLY_TO",
            count: 1
        }
    );
    assert_eq!(
        payload_err(0x20, &[]),
        malformed("IN_REPLY_TO", "payload ends inside a field")
    );
    assert!(matches!(
        payload_err(0x20, &[0x40, 0x04]),
        DecodeError::Malformed { .. }
    ));
}

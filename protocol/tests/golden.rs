//! Golden vectors: the hex examples in docs/PROTOCOL.md decode to the expected values and
//! re-encode to the same bytes, so the specification cannot drift from the code.
//!
//! A vector in the spec is a fenced block preceded by `<!-- golden: NAME -->`; on each line,
//! text after `#` is a comment and the rest is hex bytes.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use unimic_protocol::*;

const SPEC: &str = include_str!("../../docs/PROTOCOL.md");

/// The bytes of the golden block `name`.
fn golden(name: &str) -> Option<Vec<u8>> {
    let marker = format!("<!-- golden: {name} -->");
    let start = SPEC.find(&marker)? + marker.len();
    let rest = &SPEC[start..];
    let open = rest.find("```")?;
    let body_start = open + rest[open..].find('\n')? + 1;
    let body_len = rest[body_start..].find("```")?;
    let mut hex_digits = String::new();
    for line in rest[body_start..body_start + body_len].lines() {
        let data = line.split('#').next().unwrap_or("");
        hex_digits.extend(data.chars().filter(|c| !c.is_whitespace()));
    }
    Some(hex::decode(hex_digits).unwrap_or_else(|e| panic!("golden {name}: bad hex: {e}")))
}

/// Hex in 16-byte lines, for pasting into the spec when a vector is added.
fn dump(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The named frames (a name may cover several frames in sequence).
fn frame_vectors() -> Vec<(&'static str, Vec<Frame>)> {
    let c = control_frames();
    vec![
        ("client_hello", vec![Frame::ClientHello(client_hello())]),
        ("server_hello", vec![Frame::ServerHello(server_hello())]),
        ("reject", vec![Frame::Reject(reject())]),
        ("message_stream", sample_message().frames().collect()),
        ("reply_stream", reply_message().frames().collect()),
        (
            "masked_rects",
            vec![Frame::PartHeader(masked_part_header())],
        ),
        (
            "masked_bitmap",
            vec![Frame::PartHeader(bitmap_part_header())],
        ),
        ("raw_part", vec![Frame::PartHeader(raw_part_header())]),
        (
            "refinement",
            vec![Frame::PartHeader(refinement_part_header())],
        ),
        (
            "in_reply_to",
            vec![Frame::InReplyTo(InReplyTo { message_id: v(4) })],
        ),
        ("ack", vec![c[0].clone()]),
        ("cancel", vec![c[1].clone()]),
        ("error", vec![c[2].clone()]),
        ("go_away", vec![c[3].clone()]),
        ("context_evicted", vec![c[4].clone()]),
        (
            "extension",
            vec![Frame::Extension {
                ty: v(0x21),
                payload: bytes::Bytes::from_static(b"ext"),
            }],
        ),
    ]
}

#[test]
fn spec_frames_decode_and_reencode_byte_for_byte() {
    let mut problems = Vec::new();
    for (name, frames) in frame_vectors() {
        let mut expected = Vec::new();
        for f in &frames {
            f.encode(&mut expected);
        }
        let Some(bytes) = golden(name) else {
            problems.push(format!("missing golden {name}:\n{}", dump(&expected)));
            continue;
        };
        if bytes != expected {
            problems.push(format!(
                "golden {name} differs; the code encodes:\n{}",
                dump(&expected)
            ));
            continue;
        }
        // Decode from the spec's bytes and re-encode.
        let mut decoder = frame::Decoder::new(Limits::default());
        decoder.push(&bytes);
        let mut decoded = Vec::new();
        while let Some(f) = decoder.next_frame().unwrap() {
            decoded.push(f);
        }
        decoder.finish().unwrap();
        assert_eq!(decoded, frames, "golden {name} decodes to other values");
        let mut again = Vec::new();
        for f in &decoded {
            f.encode(&mut again);
        }
        assert_eq!(again, bytes, "golden {name} re-encodes differently");
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[test]
fn spec_message_stream_is_a_valid_message() {
    let bytes = golden("message_stream").expect("message_stream vector");
    let m = Message::decode_exact(&bytes, &Limits::default()).unwrap();
    assert_eq!(m, sample_message());
}

#[test]
fn spec_reply_stream_is_a_valid_reply() {
    let bytes = golden("reply_stream").expect("reply_stream vector");
    let m = Message::decode_exact(&bytes, &Limits::default()).unwrap();
    assert_eq!(m, reply_message());
    assert_eq!(m.in_reply_to, Some(InReplyTo { message_id: v(4) }));

    // A version 1 peer that does not know IN_REPLY_TO sees an ignorable frame (type 0x20 has
    // bit 0x20 set) and skips it: the same message without the correlation.
    assert!(frame::is_ignorable(frame::types::IN_REPLY_TO));
    assert_eq!(
        bytes[4], 0x20,
        "IN_REPLY_TO follows the 4-byte MESSAGE_HEADER frame"
    );
    let ir = golden("in_reply_to").expect("in_reply_to vector");
    assert_eq!(&bytes[4..4 + ir.len()], &ir[..]);
    let mut stripped = bytes[..4].to_vec();
    stripped.extend_from_slice(&bytes[4 + ir.len()..]);
    let old = Message::decode_exact(&stripped, &Limits::default()).unwrap();
    assert_eq!(old.in_reply_to, None);
    assert_eq!(old.parts, reply_message().parts);
    let as_unknown = Frame::Extension {
        ty: v(0x20),
        payload: bytes::Bytes::copy_from_slice(&ir[2..]),
    };
    assert_eq!(as_unknown.to_bytes(), ir);
}

/// One context entry: message id, part index, kind, rows, cols, token ids.
type Entry<'a> = (u64, u64, u64, u64, u64, &'a [u32]);

/// The context digest of docs/PROTOCOL.md §8, written out independently of any codec code.
fn context_digest(refs: &[Entry<'_>]) -> (Vec<u8>, [u8; 32]) {
    let mut input = b"unimic-context-v1".to_vec();
    assert_eq!(input.len(), 17);
    v(refs.len() as u64).encode(&mut input);
    for &(message, part, kind, rows, cols, tokens) in refs {
        for x in [message, part, kind, rows, cols] {
            v(x).encode(&mut input);
        }
        assert_eq!(tokens.len() as u64, rows * cols);
        for t in tokens {
            input.extend_from_slice(&t.to_le_bytes());
        }
    }
    let digest: [u8; 32] = Sha256::digest(&input).into();
    (input, digest)
}

#[test]
fn spec_context_digests() {
    let (input, digest) = context_digest(&[]);
    assert_eq!(input, b"unimic-context-v1\x00");
    assert_eq!(&input[..17], CONTEXT_DIGEST_DOMAIN);
    assert_eq!(digest, empty_digest());
    assert_eq!(digest, EMPTY_CONTEXT_DIGEST);
    assert_eq!(golden("digest_empty").as_deref(), Some(&digest[..]));

    let (input, digest) = context_digest(&[(4, 0, 0, 1, 3, &[17, 300, 70000])]);
    assert_eq!(
        golden("digest_text_input"),
        Some(input),
        "{}",
        "digest_text_input"
    );
    assert_eq!(golden("digest_text").as_deref(), Some(&digest[..]));
    assert_eq!(digest, text_context_digest());

    let (input, digest) = context_digest(&[(4, 1, 1, 2, 3, &[1, 2, 3, 4, 5, 6])]);
    assert_eq!(golden("digest_image_input"), Some(input));
    assert_eq!(golden("digest_image").as_deref(), Some(&digest[..]));
    assert_eq!(digest, image_context_digest());
}

#[test]
fn spec_varint_table() {
    for (name, value) in [
        ("varint_37", 37u64),
        ("varint_15293", 15_293),
        ("varint_494878333", 494_878_333),
        ("varint_151288809941952652", 151_288_809_941_952_652),
    ] {
        let bytes = golden(name).unwrap_or_else(|| panic!("missing {name}"));
        assert_eq!(VarInt::decode_slice(&bytes), Ok(v(value)));
        assert_eq!(v(value).to_bytes(), bytes);
    }
}

#[test]
fn spec_lists_every_error_code() {
    for code in ErrorCode::ALL {
        let row = format!(
            "| `{:#04x}` | `{}` |",
            code.into_inner(),
            code.name().unwrap()
        );
        assert!(
            SPEC.contains(&row),
            "PROTOCOL.md lacks the row starting {row}"
        );
    }
}

#[test]
fn spec_lists_every_frame_type() {
    for ty in (1..=0x0c).chain([0x20]) {
        let row = format!("| `{:#04x}` | `{}` |", ty, frame::type_name(v(ty)));
        assert!(
            SPEC.contains(&row),
            "PROTOCOL.md lacks the row starting {row}"
        );
    }
}

#[test]
fn a_part_header_with_the_empty_contexts_digest_decodes_to_the_header_without_it() {
    // §13.4b: the explicit digest of an empty context (as earlier builds send it) is accepted
    // and decodes to the same header as §13.4's, which leaves it out; re-encoding leaves it out.
    let long = golden("part_header_empty_digest").expect("part_header_empty_digest vector");
    let Frame::PartHeader(header) = Frame::decode_exact(&long, &Limits::default()).unwrap() else {
        panic!("not a part header")
    };
    let expected = &sample_message().parts[0].header;
    assert_eq!(&header, expected);
    let short = Frame::PartHeader(header.clone()).to_bytes();
    assert_eq!(short.len() + 32, long.len());
    let stream = golden("message_stream").unwrap();
    assert_eq!(
        &stream[4..4 + short.len()],
        &short[..],
        "§13.4 holds the short form"
    );
    match &header.body {
        PartBody::Text(c) => {
            assert_eq!(c.context_digest, EMPTY_CONTEXT_DIGEST);
            assert!(!c.digest_on_wire());
        }
        other => panic!("not a text part: {other:?}"),
    }
}

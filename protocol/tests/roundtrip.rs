//! Round trips: every frame type, whole messages, and proptest over arbitrary messages and
//! arbitrary chunking of the byte stream.

mod common;

use bytes::Bytes;
use common::*;
use proptest::prelude::*;
use unimic_protocol::*;

#[test]
fn every_frame_round_trips() {
    let limits = Limits::default();
    let mut kinds = std::collections::BTreeSet::new();
    for frame in all_frames() {
        let bytes = frame.to_bytes();
        assert_eq!(bytes.len(), frame.encoded_len(), "{frame:?}");
        let back = Frame::decode_exact(&bytes, &limits).unwrap();
        assert_eq!(back, frame);
        assert_eq!(back.to_bytes(), bytes);
        kinds.insert(frame.name());
    }
    // Every type name of version 1, IN_REPLY_TO, plus an unknown extension.
    assert_eq!(kinds.len(), 14, "{kinds:?}");
}

#[test]
fn whole_message_round_trips() {
    for m in [sample_message(), reply_message()] {
        let bytes = m.to_bytes();
        assert_eq!(
            Message::decode_exact(&bytes, &Limits::default()).unwrap(),
            m
        );
    }
}

#[test]
fn decoder_accepts_every_split_point() {
    let mut stream = Vec::new();
    for f in all_frames() {
        f.encode(&mut stream);
    }
    let expected = all_frames();
    for split in 0..=stream.len() {
        let mut d = frame::Decoder::new(Limits::default());
        let mut got = Vec::new();
        for piece in [&stream[..split], &stream[split..]] {
            d.push(piece);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        d.finish().unwrap();
        assert_eq!(got, expected, "split at {split}");
        assert_eq!(d.consumed(), stream.len() as u64);
    }
}

#[test]
fn decoder_accepts_one_byte_at_a_time() {
    let bytes = sample_message().to_bytes();
    let mut reader = message::Reader::new(Limits::default());
    let mut events = Vec::new();
    let mut sizes = Vec::new();
    for b in bytes.iter() {
        reader.push(std::slice::from_ref(b));
        let before = reader.consumed();
        while let Some(e) = reader.next_event().unwrap() {
            events.push(e);
            sizes.push(reader.consumed() - before);
        }
    }
    reader.finish().unwrap();
    // Header, 2 part headers, 3 chunks, end.
    assert_eq!(events.len(), 7);
    // Each event grew `consumed` by its frame's size.
    let frames: Vec<u64> = sample_message()
        .frames()
        .map(|f| f.encoded_len() as u64)
        .collect();
    assert_eq!(sizes, frames);
    assert_eq!(reader.consumed(), bytes.len() as u64);
    assert!(matches!(events[0], message::Event::Header(_)));
    assert!(matches!(events[6], message::Event::End(_)));
}

#[test]
fn message_reader_skips_extension_frames() {
    let m = sample_message();
    let mut stream = Vec::new();
    for (i, f) in m.frames().enumerate() {
        f.encode(&mut stream);
        if i == 1 {
            stream.extend(raw_frame(0x3f, b"hello"));
        }
    }
    let parsed = Message::decode_exact(&stream, &Limits::default()).unwrap();
    assert_eq!(parsed, m);
}

#[cfg(feature = "codec")]
#[test]
fn tokio_codec_round_trips() {
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder as _, Encoder as _};
    let mut codec = frame::Codec::new(Limits::default());
    let mut buf = BytesMut::new();
    for f in all_frames() {
        codec.encode(f, &mut buf).unwrap();
    }
    let mut got = Vec::new();
    // Feed in 7-byte pieces as a socket might.
    let mut src = BytesMut::new();
    for piece in buf.chunks(7) {
        src.extend_from_slice(piece);
        while let Some(f) = codec.decode(&mut src).unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got, all_frames());
    assert!(codec.decode_eof(&mut src).unwrap().is_none());
    src.extend_from_slice(&[0x04, 0x02, 0x00]);
    assert!(matches!(
        codec.decode_eof(&mut src),
        Err(frame::CodecError::Decode(DecodeError::Incomplete))
    ));
}

// ---- proptest strategies: valid values of every kind --------------------------------------

fn varint() -> impl Strategy<Value = VarInt> {
    prop_oneof![
        0u64..64,
        64u64..16_384,
        16_384u64..(1 << 30),
        (1u64 << 30)..(1 << 62)
    ]
    .prop_map(v)
}

fn context_ref() -> impl Strategy<Value = ContextRef> {
    // Message ids >= 1000 never collide with the message under test (ids < 1000).
    (1000u64..1_000_000, 0u64..100).prop_map(|(m, p)| ContextRef {
        message_id: v(m),
        part_index: v(p),
    })
}

fn context() -> impl Strategy<Value = (Vec<ContextRef>, [u8; 32])> {
    (
        prop::collection::vec(context_ref(), 0..4),
        any::<[u8; 32]>(),
    )
}

fn plain_mode() -> impl Strategy<Value = CodingMode> {
    prop_oneof![
        Just(CodingMode::Uniform),
        Just(CodingMode::Generic),
        Just(CodingMode::TextConditioned),
        Just(CodingMode::ImageConditioned),
    ]
}

/// Splits `total` tokens over `n` chunks with random payloads.
fn chunks(part: u64, total: u64, n: usize, payloads: Vec<Vec<u8>>) -> Vec<PartChunk> {
    let n = n.max(1) as u64;
    (0..n)
        .map(|i| {
            let share = total / n + if i == n - 1 { total % n } else { 0 };
            PartChunk {
                part_index: v(part),
                seq: v(i),
                fin: i == n - 1,
                token_count: v(share),
                payload: Bytes::from(payloads.get(i as usize).cloned().unwrap_or_default()),
            }
        })
        .collect()
}

fn payloads() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..4)
}

fn region(rows: u64, cols: u64) -> impl Strategy<Value = (Region, u64)> {
    let cells = (rows * cols) as usize;
    let bitmap = prop::collection::vec(any::<bool>(), cells).prop_map(move |bits| {
        let mut bytes = vec![0u8; cells.div_ceil(8)];
        for (i, &b) in bits.iter().enumerate() {
            if b {
                bytes[i / 8] |= 1 << (i % 8);
            }
        }
        let count = bits.iter().filter(|&&b| b).count() as u64;
        (Region::Bitmap(Bytes::from(bytes)), count)
    });
    let rect = (0..rows, 0..cols)
        .prop_flat_map(move |(t, l)| (Just(t), Just(l), 1..=rows - t, 1..=cols - l))
        .prop_map(|(t, l, h, w)| Rect {
            top: v(t),
            left: v(l),
            height: v(h),
            width: v(w),
        });
    let rects = prop::collection::vec(rect, 1..4).prop_map(move |rects| {
        let mut cover = vec![false; cells];
        for r in &rects {
            for y in r.top.into_inner()..r.top.into_inner() + r.height.into_inner() {
                for x in r.left.into_inner()..r.left.into_inner() + r.width.into_inner() {
                    cover[(y * cols + x) as usize] = true;
                }
            }
        }
        let count = cover.iter().filter(|&&c| c).count() as u64;
        (Region::Rects(rects), count)
    });
    prop_oneof![bitmap, rects]
}

fn part(index: u64) -> impl Strategy<Value = Part> {
    let text = (
        0u64..200,
        plain_mode(),
        context(),
        0u64..64,
        0u64..64,
        1usize..4,
        payloads(),
    )
        .prop_map(move |(n, mode, (refs, digest), tok, ent, k, p)| Part {
            header: PartHeader {
                index: v(index),
                body: PartBody::Text(CodedPart {
                    tokenizer: v(tok),
                    entropy_model: v(ent),
                    shape: Shape {
                        rows: v(1),
                        cols: v(n),
                    },
                    token_count: v(n),
                    mode,
                    context: refs,
                    context_digest: digest,
                }),
            },
            chunks: chunks(index, n, k, p),
        });
    let image = (1u64..=12, 1u64..=12)
        .prop_flat_map(|(rows, cols)| {
            (
                Just((rows, cols)),
                prop_oneof![
                    plain_mode().prop_map(move |m| (m, rows * cols)),
                    region(rows, cols).prop_map(|(r, c)| (CodingMode::Masked(r), c)),
                    (2u64..=16)
                        .prop_map(move |l| (CodingMode::Refinement { level: v(l) }, rows * cols)),
                ],
                context(),
                1usize..4,
                payloads(),
            )
        })
        .prop_map(
            move |((rows, cols), (mode, n), (refs, digest), k, p)| Part {
                header: PartHeader {
                    index: v(index),
                    body: PartBody::Image(CodedPart {
                        tokenizer: v(0),
                        entropy_model: v(1),
                        shape: Shape {
                            rows: v(rows),
                            cols: v(cols),
                        },
                        token_count: v(n),
                        mode,
                        context: refs,
                        context_digest: digest,
                    }),
                },
                chunks: chunks(index, n, k, p),
            },
        );
    let raw = ("[a-z]{1,8}/[a-z0-9.+-]{1,16}", 1usize..4, payloads()).prop_map(
        move |(media_type, k, p)| Part {
            header: PartHeader {
                index: v(index),
                body: PartBody::Raw(RawPart { media_type }),
            },
            chunks: chunks(index, 0, k, p),
        },
    );
    prop_oneof![text, image, raw]
}

fn message() -> impl Strategy<Value = Message> {
    let role = prop_oneof![
        Just(Role::User),
        Just(Role::Assistant),
        Just(Role::System),
        Just(Role::Tool)
    ];
    (0u64..1000, role, 0usize..4, prop::option::of(0u64..500))
        .prop_flat_map(|(id, role, n, reply)| {
            let parts: Vec<_> = (0..n as u64).map(part).collect();
            (Just(id), Just(role), parts, Just(reply))
        })
        .prop_map(|(id, role, parts, reply)| Message {
            header: MessageHeader {
                message_id: v(id),
                role,
            },
            // The answered message is the other side's: the other parity.
            in_reply_to: reply.map(|r| InReplyTo {
                message_id: v(2 * r + (id + 1) % 2),
            }),
            parts,
        })
}

fn control() -> impl Strategy<Value = Frame> {
    let code = || varint().prop_map(ErrorCode);
    prop_oneof![
        (varint(), varint(), varint(), 0u8..3).prop_map(|(m, p, c, s)| Frame::Ack(Ack {
            message_id: m,
            part_index: p,
            chunk_seq: c,
            stage: [AckStage::Received, AckStage::Decoded, AckStage::Rendered][s as usize],
        })),
        (varint(), code()).prop_map(|(m, code)| Frame::Cancel(Cancel {
            message_id: m,
            code
        })),
        (code(), prop::option::of(varint()), "\\PC{0,40}").prop_map(|(code, m, r)| {
            Frame::Error(ErrorFrame {
                code,
                message_id: m,
                reason: r,
            })
        }),
        (code(), "\\PC{0,40}").prop_map(|(code, reason)| Frame::GoAway(GoAway { code, reason })),
        prop::collection::vec(context_ref(), 0..10)
            .prop_map(|refs| Frame::ContextEvicted(ContextEvicted { refs })),
    ]
}

proptest! {
    #[test]
    fn varint_round_trips(x in varint()) {
        let bytes = x.to_bytes();
        prop_assert_eq!(bytes.len(), x.size());
        prop_assert_eq!(VarInt::decode_slice(&bytes), Ok(x));
    }

    #[test]
    fn arbitrary_message_round_trips(m in message()) {
        let bytes = m.to_bytes();
        let back = Message::decode_exact(&bytes, &Limits::default());
        prop_assert_eq!(back, Ok(m));
    }

    #[test]
    fn arbitrary_chunking_gives_the_same_events(
        m in message(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let bytes = m.to_bytes();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        let mut whole = message::Reader::new(Limits::default());
        whole.push(&bytes);
        let mut expected = Vec::new();
        while let Some(e) = whole.next_event().unwrap() {
            expected.push(e);
        }
        let mut reader = message::Reader::new(Limits::default());
        let mut got = Vec::new();
        for w in points.windows(2) {
            reader.push(&bytes[w[0]..w[1]]);
            while let Some(e) = reader.next_event().unwrap() {
                got.push(e);
            }
        }
        prop_assert!(reader.finish().is_ok());
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn arbitrary_control_frames_round_trip(f in control()) {
        let bytes = f.to_bytes();
        prop_assert_eq!(Frame::decode_exact(&bytes, &Limits::default()), Ok(f));
    }

    #[test]
    fn computed_lengths_match_the_encoding(m in message(), c in control()) {
        // Each type's `encoded_len` (computed, not measured) against what its `encode` writes:
        // a frame's length prefix is that computed size.
        fn same<T: Encode>(t: &T) -> bool {
            let mut out = Vec::new();
            t.encode(&mut out);
            out.len() == t.encoded_len()
        }
        for f in m.frames().chain([c]) {
            let payload = match &f {
                Frame::MessageHeader(h) => same(h) && same(&h.role) && same(&h.message_id),
                Frame::PartHeader(h) => {
                    same(h) && h.body.coded().is_none_or(|c| same(c) && c.context.iter().all(same))
                }
                Frame::PartChunk(c) => same(c),
                Frame::MessageEnd(e) => same(e),
                Frame::Ack(a) => same(a) && same(&a.stage),
                Frame::Cancel(c) => same(c) && same(&c.code),
                Frame::Error(e) => same(e),
                Frame::GoAway(g) => same(g),
                Frame::ContextEvicted(e) => same(e),
                _ => true,
            };
            prop_assert!(payload, "{f:?}");
            prop_assert!(same(&f), "{f:?}");
            prop_assert_eq!(f.to_bytes().len(), f.encoded_len());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Message::decode_exact(&bytes, &Limits::default());
        let mut d = frame::Decoder::new(Limits::default());
        d.push(&bytes);
        while let Ok(Some(_)) = d.next_frame() {}
    }
}

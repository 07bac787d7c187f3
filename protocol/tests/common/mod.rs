//! Sample values and helpers shared by the integration tests.
#![allow(dead_code)]

use bytes::Bytes;
use unimic_protocol::handshake::VERSION_1;
use unimic_protocol::*;

pub fn v(x: u64) -> VarInt {
    VarInt::from_u64(x).unwrap()
}

/// `type | length | payload` built by hand.
pub fn raw_frame(ty: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    v(ty).encode(&mut out);
    v(payload.len() as u64).encode(&mut out);
    out.extend_from_slice(payload);
    out
}

/// Concatenated varints.
pub fn varints(values: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    for &x in values {
        v(x).encode(&mut out);
    }
    out
}

pub fn vq16() -> ModelInfo {
    ModelInfo {
        id: "vq16".into(),
        version: v(1),
        hash: [0x11; 32],
    }
}

pub fn bpe() -> ModelInfo {
    ModelInfo {
        id: "bpe".into(),
        version: v(1),
        hash: [0x22; 32],
    }
}

pub fn ctx_model() -> ModelInfo {
    ModelInfo {
        id: "ctx-tf".into(),
        version: v(2),
        hash: [0x33; 32],
    }
}

pub fn client_hello() -> ClientHello {
    ClientHello {
        versions: vec![VERSION_1],
        tokenizers: vec![vq16(), bpe()],
        entropy_models: vec![ctx_model()],
        limits: Limits::default(),
        token: Bytes::from_static(b"secret"),
    }
}

pub fn server_hello() -> ServerHello {
    ServerHello {
        version: VERSION_1,
        tokenizers: vec![vq16(), bpe()],
        entropy_models: vec![ctx_model()],
        limits: Limits {
            max_grid_height: v(64),
            max_grid_width: v(64),
            ..Limits::default()
        },
    }
}

pub fn reject() -> Reject {
    Reject {
        code: ErrorCode::VERSION_UNSUPPORTED,
        reason: "no common version".into(),
        supported_versions: vec![v(2)],
        missing_models: vec![],
    }
}

fn hex32(s: &str) -> [u8; 32] {
    let mut d = [0u8; 32];
    hex::decode_to_slice(s, &mut d).unwrap();
    d
}

/// Context digest of `[(4, 0)]` where part (4, 0) is the text `[17, 300, 70000]`.
pub fn text_context_digest() -> [u8; 32] {
    hex32("cd7221d896a94b67aefdc7bfce094b2b681b0db613a5ae138d2c990d0cf94b06")
}

/// Context digest of `[(4, 1)]` where part (4, 1) is the 2×3 image grid `[1, 2, 3, 4, 5, 6]`.
pub fn image_context_digest() -> [u8; 32] {
    hex32("11942814493ad17466ca7f4ac102af9669cff34ec73dad47e5837c74e3e9b387")
}

/// A user turn: a 3-token text prompt, and a 2×3 image coded conditioned on it in two chunks.
pub fn sample_message() -> Message {
    Message {
        header: MessageHeader {
            message_id: v(4),
            role: Role::User,
        },
        in_reply_to: None,
        parts: vec![
            Part {
                header: PartHeader {
                    index: v(0),
                    body: PartBody::Text(CodedPart {
                        tokenizer: v(1),
                        entropy_model: v(0),
                        shape: Shape {
                            rows: v(1),
                            cols: v(3),
                        },
                        token_count: v(3),
                        mode: CodingMode::Generic,
                        context: vec![],
                        context_digest: empty_digest(),
                    }),
                },
                chunks: vec![PartChunk {
                    part_index: v(0),
                    seq: v(0),
                    fin: true,
                    token_count: v(3),
                    payload: Bytes::from_static(&[0xa1, 0xa2]),
                }],
            },
            Part {
                header: PartHeader {
                    index: v(1),
                    body: PartBody::Image(CodedPart {
                        tokenizer: v(0),
                        entropy_model: v(0),
                        shape: Shape {
                            rows: v(2),
                            cols: v(3),
                        },
                        token_count: v(6),
                        mode: CodingMode::TextConditioned,
                        context: vec![ContextRef {
                            message_id: v(4),
                            part_index: v(0),
                        }],
                        context_digest: text_context_digest(),
                    }),
                },
                chunks: vec![
                    PartChunk {
                        part_index: v(1),
                        seq: v(0),
                        fin: false,
                        token_count: v(3),
                        payload: Bytes::from_static(&[0xb1, 0xb2, 0xb3]),
                    },
                    PartChunk {
                        part_index: v(1),
                        seq: v(1),
                        fin: true,
                        token_count: v(3),
                        payload: Bytes::from_static(&[0xb4]),
                    },
                ],
            },
        ],
    }
}

/// A masked edit of the 2×3 image of message 4: the region is the 2×2 rectangle at row 0,
/// column 1, conditioned on that image.
pub fn masked_part_header() -> PartHeader {
    PartHeader {
        index: v(0),
        body: PartBody::Image(CodedPart {
            tokenizer: v(0),
            entropy_model: v(0),
            shape: Shape {
                rows: v(2),
                cols: v(3),
            },
            token_count: v(4),
            mode: CodingMode::Masked(Region::Rects(vec![Rect {
                top: v(0),
                left: v(1),
                height: v(2),
                width: v(2),
            }])),
            context: vec![ContextRef {
                message_id: v(4),
                part_index: v(1),
            }],
            context_digest: image_context_digest(),
        }),
    }
}

/// Refinement level 2 of the 2 × 3 image at part 1 of message 4 (PROTOCOL.md §13.6a): entropy
/// model 0 is the ladder here, the whole grid is coded.
pub fn refinement_part_header() -> PartHeader {
    PartHeader {
        index: v(1),
        body: PartBody::Image(CodedPart {
            tokenizer: v(0),
            entropy_model: v(0),
            shape: Shape {
                rows: v(2),
                cols: v(3),
            },
            token_count: v(6),
            mode: CodingMode::Refinement { level: v(2) },
            context: vec![ContextRef {
                message_id: v(4),
                part_index: v(1),
            }],
            context_digest: image_context_digest(),
        }),
    }
}

/// The same region as [`masked_part_header`] given as a bitmap.
pub fn bitmap_part_header() -> PartHeader {
    let mut h = masked_part_header();
    if let PartBody::Image(c) = &mut h.body {
        // Cells 1, 2, 4, 5 of a 2×3 grid: bits 1, 2, 4, 5 of the single byte.
        c.mode = CodingMode::Masked(Region::Bitmap(Bytes::from_static(&[0x36])));
    }
    h
}

pub fn raw_part_header() -> PartHeader {
    PartHeader {
        index: v(2),
        body: PartBody::Raw(RawPart {
            media_type: "image/png".into(),
        }),
    }
}

/// The SHA-256 context digest with no references (see docs/PROTOCOL.md).
pub fn empty_digest() -> [u8; 32] {
    hex32("0d211c00364688509496f5e8329e0a6a8bdb3d91d7d830ea4a70ae111291abcb")
}

/// One of each control frame.
pub fn control_frames() -> Vec<Frame> {
    vec![
        Frame::Ack(Ack {
            message_id: v(5),
            part_index: v(0),
            chunk_seq: v(2),
            stage: AckStage::Rendered,
        }),
        Frame::Cancel(Cancel {
            message_id: v(5),
            code: ErrorCode::CANCELLED,
        }),
        Frame::Error(ErrorFrame {
            code: ErrorCode::CONTEXT_MISMATCH,
            message_id: Some(v(6)),
            reason: "digest".into(),
        }),
        Frame::GoAway(GoAway {
            code: ErrorCode::NO_ERROR,
            reason: String::new(),
        }),
        Frame::ContextEvicted(ContextEvicted {
            refs: vec![
                ContextRef {
                    message_id: v(0),
                    part_index: v(0),
                },
                ContextRef {
                    message_id: v(1),
                    part_index: v(0),
                },
            ],
        }),
    ]
}

/// The server's reply 5 to message 4 (IN_REPLY_TO 4): a streamed text part (length unknown in
/// its header) coded conditioned on the prompt `(4, 0)`, in two chunks, the last one empty.
pub fn reply_message() -> Message {
    Message {
        header: MessageHeader {
            message_id: v(5),
            role: Role::Assistant,
        },
        in_reply_to: Some(InReplyTo { message_id: v(4) }),
        parts: vec![Part {
            header: PartHeader {
                index: v(0),
                body: PartBody::Text(CodedPart {
                    tokenizer: v(1),
                    entropy_model: v(0),
                    shape: Shape {
                        rows: v(1),
                        cols: v(0),
                    },
                    token_count: v(0),
                    mode: CodingMode::TextConditioned,
                    context: vec![ContextRef {
                        message_id: v(4),
                        part_index: v(0),
                    }],
                    context_digest: text_context_digest(),
                }),
            },
            chunks: vec![
                PartChunk {
                    part_index: v(0),
                    seq: v(0),
                    fin: false,
                    token_count: v(2),
                    payload: Bytes::from_static(&[0xc1, 0xc2]),
                },
                PartChunk {
                    part_index: v(0),
                    seq: v(1),
                    fin: true,
                    token_count: v(0),
                    payload: Bytes::new(),
                },
            ],
        }],
    }
}

/// Every frame kind, at least once.
pub fn all_frames() -> Vec<Frame> {
    let mut frames = vec![
        Frame::ClientHello(client_hello()),
        Frame::ServerHello(server_hello()),
        Frame::Reject(reject()),
        Frame::PartHeader(masked_part_header()),
        Frame::PartHeader(bitmap_part_header()),
        Frame::PartHeader(raw_part_header()),
        Frame::Extension {
            ty: v(0x21),
            payload: Bytes::from_static(b"ext"),
        },
    ];
    frames.extend(sample_message().frames());
    frames.push(Frame::InReplyTo(InReplyTo { message_id: v(4) }));
    frames.extend(control_frames());
    frames
}

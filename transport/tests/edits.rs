//! Edits and text-conditioned images over real QUIC sessions on loopback: an edit reply that
//! carries only the edited region (masked transformer, conditioned on the image the peer sent),
//! text-conditioned image parts, and the refusal paths (unknown reference, model not negotiated,
//! a raw peer breaking the masked/text rules).

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use unimic_codec::context::{ContextError, Sequence, SessionContext};
use unimic_codec::entropy::masked::{Masked, MaskedConfig};
use unimic_codec::entropy::text_cond::{TextCond, TextCondConfig};
use unimic_codec::nn::weights::splitmix64;
use unimic_codec::part::{CodecConfig, PartCodec, PartError, PartSpec, PartTokens};
use unimic_protocol::{
    CodedPart, CodingMode, ContextRef, ErrorCode, Frame, MessageEnd, MessageHeader, PartBody,
    PartChunk, PartHeader, Rect, Region, Shape, VarInt,
};
use unimic_transport::{
    ChunkData, ContextKey, MessageEvent, ModelChoice, OutgoingMessage, OutgoingPart, PartKind,
    ReceivedPart, RecvError, Role, SendError, Session, SessionConfig, TokenGrid,
};

const K: u32 = 1024;

/// A pseudo-random grid (no structure a built-in model could exploit).
fn noise(h: u32, w: u32, seed: u64) -> TokenGrid {
    let mut z = seed;
    let ids = (0..h * w)
        .map(|_| {
            z = splitmix64(z);
            (z % u64::from(K)) as u32
        })
        .collect();
    TokenGrid::new(h, w, K, ids).unwrap()
}

/// The cells of rows `rows` and columns `cols` of a `w`-wide, `h`-high grid.
fn block(h: u32, w: u32, rows: std::ops::Range<u32>, cols: std::ops::Range<u32>) -> Vec<bool> {
    (0..h * w)
        .map(|i| rows.contains(&(i / w)) && cols.contains(&(i % w)))
        .collect()
}

/// `base` with the cells of `region` taken from `fresh`.
fn edit(base: &TokenGrid, region: &[bool], fresh: &TokenGrid) -> TokenGrid {
    let ids = base
        .ids()
        .iter()
        .zip(fresh.ids())
        .zip(region)
        .map(|((&b, &f), &r)| if r { f } else { b })
        .collect();
    TokenGrid::new(base.height(), base.width(), K, ids).unwrap()
}

/// Codec settings holding the tiny masked and text-conditioned models with weights from `seed`.
fn codec(seed: u64) -> CodecConfig {
    let masked = Masked::synthetic(&MaskedConfig::tiny(K as usize), seed).unwrap();
    let text = TextCond::synthetic(&TextCondConfig::tiny(K as usize), seed + 1).unwrap();
    CodecConfig::default()
        .with_masked(Arc::new(masked))
        .with_text_cond(Arc::new(text))
}

/// A server and client whose codecs hold the transformers with weights from the given seeds.
fn model_pair(server: CodecConfig, client: CodecConfig) -> Pair {
    model_pair_with(session_config().with_codec(server), client)
}

/// A server with the given session configuration and a client whose codec is `client`.
fn model_pair_with(server: SessionConfig, client: CodecConfig) -> Pair {
    let (server, pin) = server_with(|c| c.with_session(server));
    let addr = server.local_addr().unwrap();
    let client = client_with(pin, |c| c.with_session(session_config().with_codec(client)));
    Pair {
        server,
        client,
        addr,
        pin,
    }
}

async fn collect(session: &Session) -> unimic_transport::ReceivedMessage {
    within(within(session.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap()
}

/// Sends a user message of one edit part: `grid`, differing from `reference` inside `region`.
async fn send_edit(
    session: &Session,
    grid: TokenGrid,
    reference: ContextKey,
    region: Vec<bool>,
) -> Result<unimic_transport::MessageStats, SendError> {
    within(session.send(
        OutgoingMessage::new(Role::User).with_part(OutgoingPart::edit(grid, reference, region)),
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_reply_carries_only_the_region() {
    let mut p = model_pair(codec(12), codec(12));
    let (client, server) = connect(&mut p).await;
    let names: Vec<&str> = client
        .negotiated()
        .entropy_models
        .iter()
        .map(|m| m.id.as_str())
        .collect();
    assert!(names.contains(&"unimic-entropy/masked") && names.contains(&"unimic-entropy/text"));

    // The edge sends an image (message 0, part 1) with a prompt.
    let image = noise(16, 16, 1);
    within(
        client.send(
            OutgoingMessage::new(Role::User)
                .with_part(OutgoingPart::text(vec![3923, 41, 200, 7]))
                .with_part(OutgoingPart::image(image.clone())),
        ),
    )
    .await
    .unwrap();
    collect(&server).await;

    // The server edits a 4 × 4 block and replies with only that region (message 1).
    let region = block(16, 16, 5..9, 6..10);
    let edited = edit(&image, &region, &noise(16, 16, 2));
    let reference = ContextKey::new(0, 1);
    let sent = within(server.send(OutgoingMessage::new(Role::Assistant).with_part(
        OutgoingPart::edit(edited.clone(), reference, region.clone()),
    )))
    .await
    .unwrap();
    let edit_stats = sent.parts[0].clone();
    assert_eq!(edit_stats.tokens, 16);
    assert_eq!(edit_stats.pixels, Some(16 * 16 * 16));
    let bpt = edit_stats.bits_per_token().unwrap();
    assert_eq!(bpt, 8.0 * edit_stats.payload_bytes as f64 / 16.0);

    // The client rebuilds the whole edited grid from its copy of the image.
    let mut msg = within(client.recv()).await.unwrap().unwrap();
    let mut events = Vec::new();
    let received = loop {
        match within(msg.next()).await.unwrap().unwrap() {
            MessageEvent::End(stats) => break stats,
            ev => events.push(ev),
        }
    };
    let inside: Vec<u32> = edited
        .ids()
        .iter()
        .zip(&region)
        .filter(|(_, &r)| r)
        .map(|(&id, _)| id)
        .collect();
    let mut seen = 0;
    for ev in events {
        match ev {
            MessageEvent::PartStart(info) => {
                assert_eq!(
                    info.kind,
                    PartKind::Image {
                        height: 16,
                        width: 16,
                        codebook_size: K
                    }
                );
                assert_eq!(info.context, vec![reference]);
                assert_eq!(info.region.as_deref(), Some(&region[..]));
                seen += 1;
            }
            MessageEvent::Chunk { seq, fin, data, .. } => {
                assert_eq!((seq, fin), (0, true));
                assert_eq!(
                    data,
                    ChunkData::Tokens {
                        start: 0,
                        ids: inside.clone()
                    }
                );
                seen += 1;
            }
            MessageEvent::PartEnd { part, stats, .. } => {
                assert_eq!(part, ReceivedPart::Image(edited.clone()));
                assert_eq!(stats.tokens, 16);
                assert_eq!(stats.bits_per_token(), Some(bpt));
                seen += 1;
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(seen, 3);
    assert_eq!(received.bits_per_token(), Some(bpt));
    assert_eq!(received.wire_bytes, sent.wire_bytes);

    // The same edit as a whole grid: coded alone (what a reply without the edge's image in
    // context costs), and with the built-in adaptive model learning the original first (it
    // predicts the copied cells well, so it is reported, not asserted against).
    let whole = within(
        server.send(
            OutgoingMessage::new(Role::Assistant)
                .with_part(OutgoingPart::image(edited.clone()))
                .with_part(OutgoingPart::image(edited.clone()).with_context(vec![reference])),
        ),
    )
    .await
    .unwrap();
    collect(&client).await;
    let edit_bytes = edit_stats.wire_bytes;
    let (alone, learned) = (&whole.parts[0], &whole.parts[1]);
    println!(
        "edit reply (masked, 16 of 256 cells): {edit_bytes} bytes on the wire, {} payload \
         ({bpt:.2} bits/token); whole grid alone (adaptive): {} bytes, {} payload; whole grid \
         with the original learned (adaptive): {} bytes, {} payload",
        edit_stats.payload_bytes,
        alone.wire_bytes,
        alone.payload_bytes,
        learned.wire_bytes,
        learned.payload_bytes
    );
    assert!(
        edit_bytes * 4 < alone.wire_bytes,
        "edit {edit_bytes} bytes vs whole grid {}",
        alone.wire_bytes
    );

    // Both contexts hold the whole edited grid: the client edits the server's edit (message 2
    // conditioned on (1, 0)), which the server decodes only if its copy is the same grid.
    let region2 = block(16, 16, 0..2, 0..16);
    let edited2 = edit(&edited, &region2, &noise(16, 16, 3));
    send_edit(&client, edited2.clone(), ContextKey::new(1, 0), region2)
        .await
        .unwrap();
    let got = collect(&server).await;
    assert_eq!(got.parts, vec![ReceivedPart::Image(edited2)]);
    assert_eq!(client.context_keys(), server.context_keys());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_conditioned_images_in_the_same_and_a_later_message() {
    let mut p = model_pair(codec(12), codec(12));
    let (client, server) = connect(&mut p).await;
    let prompt = vec![3923u32, 41, 200_000, 7, 12_345];
    let first = noise(8, 8, 4);
    let sent = within(
        client.send(
            OutgoingMessage::new(Role::User)
                .with_part(OutgoingPart::text(prompt.clone()))
                .with_part(
                    OutgoingPart::image(first.clone())
                        .with_model(ModelChoice::TextCond)
                        .with_context(vec![ContextKey::new(0, 0)]),
                ),
        ),
    )
    .await
    .unwrap();
    assert_eq!(sent.parts[1].tokens, 64);
    let got = collect(&server).await;
    assert_eq!(
        got.parts,
        vec![
            ReceivedPart::Text(prompt.clone()),
            ReceivedPart::Image(first)
        ]
    );
    assert_eq!(got.stats.parts[1].tokens, 64);
    assert_eq!(
        got.stats.parts[1].bits_per_token(),
        sent.parts[1].bits_per_token()
    );

    // The reply's image reads the earlier prompt and the reply's own text, in that order.
    let answer = vec![2375u32, 0, 1];
    let second = noise(6, 10, 5);
    within(
        server.send(
            OutgoingMessage::new(Role::Assistant)
                .with_part(OutgoingPart::text(answer.clone()))
                .with_part(
                    OutgoingPart::image(second.clone())
                        .with_model(ModelChoice::TextCond)
                        .with_context(vec![ContextKey::new(0, 0), ContextKey::new(1, 0)]),
                ),
        ),
    )
    .await
    .unwrap();
    let got = collect(&client).await;
    assert_eq!(
        got.parts,
        vec![ReceivedPart::Text(answer), ReceivedPart::Image(second)]
    );
    assert_eq!(client.context_keys(), server.context_keys());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_on_the_sending_side_leave_the_session_usable() {
    // Same weights: an edit of a part nobody holds is refused before anything is sent.
    let mut p = model_pair(codec(12), codec(12));
    let (client, server) = connect(&mut p).await;
    let g = noise(4, 4, 1);
    let err = send_edit(
        &client,
        g.clone(),
        ContextKey::new(9, 0),
        block(4, 4, 0..1, 0..1),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            SendError::Codec(PartError::Context(ContextError::Missing(k))) if k == ContextKey::new(9, 0)
        ),
        "{err}"
    );
    // A text-conditioned image without a text reference.
    let err = within(
        client.send(
            OutgoingMessage::new(Role::User)
                .with_part(OutgoingPart::image(g.clone()).with_model(ModelChoice::TextCond)),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, SendError::Codec(PartError::MissingReference { .. })),
        "{err}"
    );
    within(client.send(OutgoingMessage::new(Role::User).with_part(OutgoingPart::image(g.clone()))))
        .await
        .unwrap();
    assert_eq!(collect(&server).await.parts, vec![ReceivedPart::Image(g)]);

    // Other weights at the client: neither transformer is negotiated.
    let mut p = model_pair(codec(12), codec(20));
    let (client, server) = connect(&mut p).await;
    let names: Vec<String> = client
        .negotiated()
        .entropy_models
        .iter()
        .map(|m| m.id.clone())
        .collect();
    assert!(!names.iter().any(|n| n == "unimic-entropy/masked"));
    let g = noise(4, 4, 2);
    within(client.send(OutgoingMessage::new(Role::User).with_part(OutgoingPart::image(g.clone()))))
        .await
        .unwrap();
    collect(&server).await;
    let err = send_edit(
        &client,
        g.clone(),
        ContextKey::new(0, 0),
        block(4, 4, 1..2, 1..3),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SendError::NotNegotiated(_)), "{err}");
    let err = within(
        client.send(
            OutgoingMessage::new(Role::User)
                .with_part(OutgoingPart::text(vec![1, 2]))
                .with_part(
                    OutgoingPart::image(g.clone())
                        .with_model(ModelChoice::TextCond)
                        .with_context(vec![ContextKey::new(2, 0)]),
                ),
        ),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SendError::NotNegotiated(_)), "{err}");
    within(client.send(OutgoingMessage::new(Role::User).with_part(OutgoingPart::image(g.clone()))))
        .await
        .unwrap();
    assert_eq!(collect(&server).await.parts, vec![ReceivedPart::Image(g)]);
}

fn v(n: u64) -> VarInt {
    VarInt::from_u64(n).unwrap()
}

/// An image part header (part 0) of the test tokenizer.
struct Header {
    tokenizer: u64,
    model: u64,
    rows: u64,
    cols: u64,
    tokens: u64,
    mode: CodingMode,
    context: Vec<ContextKey>,
    /// The sender's context, for the digest (empty: the digest of no references).
    held: SessionContext,
}

impl Header {
    fn bytes(&self) -> Bytes {
        let digest = self
            .held
            .digest(&self.context)
            .unwrap_or_else(|_| SessionContext::new(0).digest(&[]).unwrap());
        frame_bytes(&Frame::PartHeader(PartHeader {
            index: v(0),
            body: PartBody::Image(CodedPart {
                tokenizer: v(self.tokenizer),
                entropy_model: v(self.model),
                shape: Shape {
                    rows: v(self.rows),
                    cols: v(self.cols),
                },
                token_count: v(self.tokens),
                mode: self.mode.clone(),
                context: self
                    .context
                    .iter()
                    .map(|k| ContextRef {
                        message_id: v(k.message_id),
                        part_index: v(k.part_index),
                    })
                    .collect(),
                context_digest: digest,
            }),
        }))
    }
}

/// Message `id` with one part: `header`, then one chunk per entry of `chunks` (token count and
/// payload).
fn message(id: u64, header: &Header, chunks: &[(u64, &[u8])]) -> Vec<u8> {
    let mut frames = vec![
        frame_bytes(&Frame::MessageHeader(MessageHeader {
            message_id: v(id),
            role: Role::User,
        })),
        header.bytes(),
    ];
    for (seq, (tokens, payload)) in chunks.iter().enumerate() {
        frames.push(frame_bytes(&Frame::PartChunk(PartChunk {
            part_index: v(0),
            seq: v(seq as u64),
            fin: seq + 1 == chunks.len(),
            token_count: v(*tokens),
            payload: Bytes::copy_from_slice(payload),
        })));
    }
    frames.push(frame_bytes(&Frame::MessageEnd(MessageEnd {
        part_count: v(1),
    })));
    frames.concat()
}

/// Sends `bytes` as message `id`'s stream; checks the stop code and the Error frame, and returns
/// the frame's reason.
async fn expect_refused(peer: &mut RawPeer, id: u64, bytes: Vec<u8>, code: ErrorCode) -> String {
    let stopped = peer.send_raw_message(&bytes).await;
    assert_eq!(
        stopped,
        Some(code.into_inner()),
        "stop code for message {id}"
    );
    let f = peer
        .control_frame(|f| matches!(f, Frame::Error(e) if e.message_id == Some(v(id))))
        .await;
    let Frame::Error(e) = f else { unreachable!() };
    assert_eq!(e.code, code, "message {id}: {}", e.reason);
    e.reason.to_string()
}

/// Connects a raw peer offering `models` to `p`'s server; returns it, the server's session for
/// it, and the index of the test tokenizer in the peer's hello.
async fn raw_peer(
    p: &mut Pair,
    models: Vec<unimic_protocol::ModelInfo>,
) -> (RawPeer, Session, u64) {
    let connecting = RawPeer::connect(p.addr, p.pin, models);
    let (peer, s) = within(async { tokio::join!(connecting, p.server.accept()) }).await;
    let tok = peer
        .hello
        .tokenizers
        .iter()
        .position(|t| t.id == "test-vq")
        .unwrap() as u64;
    (peer, s.unwrap(), tok)
}

fn rect(top: u32, left: u32, height: u32, width: u32) -> Rect {
    Rect {
        top: VarInt::from_u32(top),
        left: VarInt::from_u32(left),
        height: VarInt::from_u32(height),
        width: VarInt::from_u32(width),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_breaking_the_masked_and_text_rules_gets_documented_errors() {
    let mut p = model_pair(codec(12), codec(12));
    let (good_client, good_server) = connect(&mut p).await;
    let models = good_client.negotiated().entropy_models.clone();
    let index = |name: &str| models.iter().position(|m| m.id == name).unwrap() as u64;
    let (masked, adaptive, text, uniform) = (
        index("unimic-entropy/masked"),
        index("unimic-entropy/adaptive-grid"),
        index("unimic-entropy/text"),
        index("unimic-entropy/uniform"),
    );
    let (mut peer, peer_session, tok) = raw_peer(&mut p, models.clone()).await;
    let drain = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        while let Ok(Some(m)) = peer_session.recv().await {
            outcomes.push(m.collect().await.err().map(|e| e.code()));
        }
        outcomes
    });
    let (masked_mode, one_cell) = (
        |r: Region| CodingMode::Masked(r),
        || Region::Rects(vec![rect(1, 1, 1, 1)]),
    );
    let header = |model: u64, (rows, cols): (u64, u64), tokens: u64, mode: CodingMode| Header {
        tokenizer: tok,
        model,
        rows,
        cols,
        tokens,
        mode,
        context: vec![ContextKey::new(40, 0)],
        held: SessionContext::new(0),
    };

    // A masked part whose reference the server never received.
    let h = header(masked, (4, 4), 1, masked_mode(one_cell()));
    let m = message(0, &h, &[(1, &[9, 9])]);
    expect_refused(&mut peer, 0, m, ErrorCode::CONTEXT_UNKNOWN).await;
    // Mode 2 with a model that is not the masked one.
    let h = header(adaptive, (4, 4), 1, masked_mode(one_cell()));
    let m = message(2, &h, &[(1, &[9, 9])]);
    expect_refused(&mut peer, 2, m, ErrorCode::UNSUPPORTED).await;
    // A token count other than the cells of the region (2 × 2 rectangle, 3 tokens).
    let h = header(
        masked,
        (4, 4),
        3,
        masked_mode(Region::Rects(vec![rect(0, 0, 2, 2)])),
    );
    let m = message(4, &h, &[(3, &[9, 9])]);
    expect_refused(&mut peer, 4, m, ErrorCode::PROTOCOL_VIOLATION).await;
    // The text-conditioned model outside mode 3.
    let h = header(text, (2, 2), 4, CodingMode::Generic);
    let m = message(6, &h, &[(4, &[9, 9])]);
    expect_refused(&mut peer, 6, m, ErrorCode::UNSUPPORTED).await;

    // A valid 4 × 4 image (uniform model) as message 8, then parts that reference it and break
    // the rules only the session layer can check.
    let reference = noise(4, 4, 6);
    let uniform_part = PartCodec::default()
        .encode(
            &SessionContext::new(0),
            PartTokens::Grid(&reference),
            &PartSpec::new(ModelChoice::Uniform),
        )
        .unwrap();
    let mut held = SessionContext::new(1 << 20);
    held.insert(ContextKey::new(8, 0), Sequence::grid(&reference))
        .unwrap();
    let h = Header {
        context: vec![],
        ..header(uniform, (4, 4), 16, CodingMode::Uniform)
    };
    let m = message(8, &h, &[(16, &uniform_part.chunks[0].payload)]);
    let mut s = within(peer.conn.open_uni()).await.unwrap();
    s.write_all(&m).await.unwrap();
    s.finish().unwrap();
    peer.control_frame(|f| matches!(f, Frame::Ack(a) if a.message_id == v(8)))
        .await;
    let on_reference = |model, shape, tokens, mode| Header {
        context: vec![ContextKey::new(8, 0)],
        held: held.clone(),
        ..header(model, shape, tokens, mode)
    };
    // A masked part (3 cells) whose chunks break the chunking: its second chunk is larger than
    // its first (the chunks of a transformer part continue one run of the model, PROTOCOL.md
    // §6.6, and are sized as any image part's).
    let h = on_reference(
        masked,
        (4, 4),
        3,
        masked_mode(Region::Rects(vec![rect(0, 0, 1, 3)])),
    );
    let m = message(10, &h, &[(1, &[9]), (2, &[9])]);
    let why = expect_refused(&mut peer, 10, m, ErrorCode::PROTOCOL_VIOLATION).await;
    assert!(why.contains("does not match the chunking"), "{why}");
    // A 2 × 2 masked part whose reference image is 4 × 4.
    let h = on_reference(masked, (2, 2), 1, masked_mode(one_cell()));
    let m = message(12, &h, &[(1, &[9])]);
    let why = expect_refused(&mut peer, 12, m, ErrorCode::PROTOCOL_VIOLATION).await;
    assert!(why.contains("does not fit"), "{why}");
    // A text-conditioned part whose context holds no text.
    let h = on_reference(text, (4, 4), 16, CodingMode::TextConditioned);
    let m = message(14, &h, &[(16, &[9])]);
    let why = expect_refused(&mut peer, 14, m, ErrorCode::PROTOCOL_VIOLATION).await;
    assert!(why.contains("needs a Text part"), "{why}");

    // The raw peer's session and the good session go on.
    let ok = [
        frame_bytes(&Frame::MessageHeader(MessageHeader {
            message_id: v(16),
            role: Role::User,
        })),
        frame_bytes(&Frame::MessageEnd(MessageEnd { part_count: v(0) })),
    ]
    .concat();
    let mut s = within(peer.conn.open_uni()).await.unwrap();
    s.write_all(&ok).await.unwrap();
    s.finish().unwrap();
    // Its acknowledgement says the server has read it whole: closing the connection at the end
    // can no longer overtake it (the stream would be lost unread, and the outcome with it).
    peer.control_frame(|f| matches!(f, Frame::Ack(a) if a.message_id == v(16)))
        .await;
    let image = noise(4, 4, 7);
    within(
        good_client
            .send(OutgoingMessage::new(Role::User).with_part(OutgoingPart::image(image.clone()))),
    )
    .await
    .unwrap();
    collect(&good_server).await;
    let edited = edit(&image, &block(4, 4, 2..4, 0..2), &noise(4, 4, 8));
    send_edit(
        &good_client,
        edited.clone(),
        ContextKey::new(0, 0),
        block(4, 4, 2..4, 0..2),
    )
    .await
    .unwrap();
    assert_eq!(
        collect(&good_server).await.parts,
        vec![ReceivedPart::Image(edited)]
    );
    peer.conn.close(0u32.into(), b"done");
    let outcomes = within(drain).await.unwrap();
    assert_eq!(
        outcomes,
        vec![
            Some(ErrorCode::CONTEXT_UNKNOWN),
            Some(ErrorCode::UNSUPPORTED),
            Some(ErrorCode::PROTOCOL_VIOLATION),
            Some(ErrorCode::UNSUPPORTED),
            None,
            Some(ErrorCode::PROTOCOL_VIOLATION),
            Some(ErrorCode::PROTOCOL_VIOLATION),
            Some(ErrorCode::PROTOCOL_VIOLATION),
            None
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transformer_work_per_message_is_bounded() {
    // The server lets one message ask for at most 8 transformer-decoded tokens.
    let mut p = model_pair_with(
        session_config()
            .with_codec(codec(12))
            .with_max_message_model_tokens(8),
        codec(12),
    );
    let (good_client, good_server) = connect(&mut p).await;
    let models = good_client.negotiated().entropy_models.clone();
    let masked = models
        .iter()
        .position(|m| m.id == "unimic-entropy/masked")
        .unwrap() as u64;
    let (mut peer, peer_session, tok) = raw_peer(&mut p, models.clone()).await;
    let drain = tokio::spawn(async move {
        while let Ok(Some(m)) = peer_session.recv().await {
            let _ = m.collect().await;
        }
    });
    let header = |side: u64, tokens: u64, region: Region| Header {
        tokenizer: tok,
        model: masked,
        rows: side,
        cols: side,
        tokens,
        mode: CodingMode::Masked(region),
        context: vec![ContextKey::new(40, 0)],
        held: SessionContext::new(0),
    };
    // Work is charged by the positions the model runs, not the cells coded: one cell of a 4 × 4
    // grid runs all 16 positions (the cells before it, and every known cell after it as the
    // prefix), above the budget of 8, so it is refused before anything else is looked at.
    let h = header(4, 1, Region::Rects(vec![rect(1, 1, 1, 1)]));
    let reason = expect_refused(
        &mut peer,
        0,
        message(0, &h, &[(1, &[9, 9])]),
        ErrorCode::LIMIT_EXCEEDED,
    )
    .await;
    assert!(reason.contains("16 transformer positions"), "{reason}");
    // The budget is per message: a 1-cell edit of a 2 × 2 grid (4 positions) in the next message
    // gets as far as its missing reference.
    let h = header(2, 1, Region::Rects(vec![rect(1, 1, 1, 1)]));
    expect_refused(
        &mut peer,
        2,
        message(2, &h, &[(1, &[9, 9])]),
        ErrorCode::CONTEXT_UNKNOWN,
    )
    .await;
    // Other sessions are unaffected: an edit within the budget round-trips.
    // (A 2 × 2 image with one cell edited: 4 positions.)
    let image = noise(2, 2, 3);
    within(
        good_client
            .send(OutgoingMessage::new(Role::User).with_part(OutgoingPart::image(image.clone()))),
    )
    .await
    .unwrap();
    collect(&good_server).await;
    let region = block(2, 2, 1..2, 0..1);
    let edited = edit(&image, &region, &noise(2, 2, 4));
    send_edit(&good_client, edited.clone(), ContextKey::new(0, 0), region)
        .await
        .unwrap();
    assert_eq!(
        collect(&good_server).await.parts,
        vec![ReceivedPart::Image(edited)]
    );
    drop(peer);
    let _ = drain.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_work_per_second_is_budgeted_per_session_and_per_server() {
    use unimic_transport::{Rate, WorkBudget};
    // Each session may run 40 positions at once and refills one per second; all sessions of the
    // server together 48.
    let shared = Arc::new(WorkBudget::new(1, 48));
    let with_generic = || {
        let g = unimic_codec::entropy::generic::Generic::synthetic(
            &unimic_codec::entropy::generic::GenericConfig::tiny(K as usize),
            30,
        )
        .unwrap();
        codec(12).with_generic(Arc::new(g))
    };
    let mut p = model_pair_with(
        session_config()
            .with_codec(with_generic())
            .with_session_model_rate(Some(Rate {
                per_second: 1,
                burst: 40,
            }))
            .with_shared_model_budget(Some(shared.clone())),
        with_generic(),
    );
    let (client, server) = connect(&mut p).await;
    let generic_4x4 = |seed| {
        // A 4 × 4 grid coded with the generic transformer: 16 positions.
        OutgoingMessage::new(Role::User)
            .with_part(OutgoingPart::image(noise(4, 4, seed)).with_model(ModelChoice::Generic))
    };
    async fn outcome(server: &Session) -> Result<(), RecvError> {
        let m = within(server.recv()).await.unwrap().unwrap();
        within(m.collect()).await.map(|_| ())
    }
    // 16 + 16 fit the session's 40; the third would overdraw it: BUSY, before any decoding.
    for seed in 0..3 {
        within(client.send(generic_4x4(seed))).await.unwrap();
    }
    assert!(outcome(&server).await.is_ok());
    assert!(outcome(&server).await.is_ok());
    match outcome(&server).await {
        Err(RecvError::Protocol { code, reason }) => {
            assert_eq!(code, ErrorCode::BUSY);
            assert!(reason.contains("this session's"), "{reason}");
        }
        other => panic!("expected BUSY, got {other:?}"),
    }
    // A second session has its own 40, but the server's shared 48 holds only 16 more.
    let (client2, server2) = connect(&mut p).await;
    within(client2.send(generic_4x4(7))).await.unwrap();
    within(client2.send(generic_4x4(8))).await.unwrap();
    assert!(outcome(&server2).await.is_ok());
    match outcome(&server2).await {
        Err(RecvError::Protocol { code, reason }) => {
            assert_eq!(code, ErrorCode::BUSY);
            assert!(reason.contains("the server's"), "{reason}");
        }
        other => panic!("expected BUSY, got {other:?}"),
    }
    // Work that needs no transformer is not budgeted.
    within(
        client2
            .send(OutgoingMessage::new(Role::User).with_part(OutgoingPart::image(noise(4, 4, 9)))),
    )
    .await
    .unwrap();
    assert!(outcome(&server2).await.is_ok());
}

/// A ladder of two refinement levels over the test tokenizer's codebook: level 2 favours low
/// ids, level 3 is flat.
fn ladder() -> Arc<unimic_codec::entropy::ladder::Ladder> {
    use unimic_codec::entropy::ladder::{Ladder, LadderModel};
    use unimic_codec::entropy::Static;
    let skewed = (0..K).map(|i| 1 + (K - i)).collect();
    Arc::new(
        Ladder::new(vec![
            LadderModel::new(2, 1, Static::from_counts(skewed).unwrap()),
            LadderModel::new(3, 1, Static::from_counts(vec![1; K as usize]).unwrap()),
        ])
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ladder_levels_travel_as_parts_that_refine_the_level_below() {
    let codec = || CodecConfig::default().with_ladder(ladder());
    let mut p = model_pair(codec(), codec());
    let (client, server) = connect(&mut p).await;
    assert!(client
        .negotiated()
        .entropy_models
        .iter()
        .any(|m| m.id == "unimic-entropy/ladder"));
    // Level 1 and level 2 in one message, level 3 in a later one (a receiver shows the image at
    // once and sharpens it as levels arrive).
    let (l1, l2, l3) = (noise(6, 5, 1), noise(6, 5, 2), noise(6, 5, 3));
    let sent = within(
        client.send(
            OutgoingMessage::new(Role::User)
                .with_part(OutgoingPart::image(l1.clone()))
                .with_part(OutgoingPart::refinement_of_part(l2.clone(), 0, 2)),
        ),
    )
    .await
    .unwrap();
    let got = collect(&server).await;
    assert_eq!(
        got.parts,
        vec![
            ReceivedPart::Image(l1.clone()),
            ReceivedPart::Refinement {
                level: 2,
                base: ContextKey::new(0, 0),
                grid: l2.clone()
            }
        ]
    );
    let m2 = within(client.send(OutgoingMessage::new(Role::User).with_part(
        OutgoingPart::refinement(l3.clone(), ContextKey::new(sent.message_id, 1), 3),
    )))
    .await
    .unwrap();
    let got = collect(&server).await;
    assert_eq!(
        got.parts,
        vec![ReceivedPart::Refinement {
            level: 3,
            base: ContextKey::new(0, 1),
            grid: l3
        }]
    );
    // Both contexts hold the levels alike (same keys, same digest over everything held).
    assert_eq!(
        client.context_keys(),
        [
            ContextKey::new(0, 0),
            ContextKey::new(0, 1),
            ContextKey::new(m2.message_id, 0)
        ]
    );
    assert_eq!(server.context_keys(), client.context_keys());
    assert_eq!(server.context_digest(), client.context_digest());
    // The base is the first *image* the refinement references, whatever comes before it.
    let mut w = within(client.open(Role::User)).await.unwrap();
    let m3 = w.message_id();
    let base = noise(6, 5, 4);
    within(w.write_part(OutgoingPart::text(vec![1, 2, 3])))
        .await
        .unwrap();
    within(w.write_part(OutgoingPart::image(base.clone())))
        .await
        .unwrap();
    let level2 = noise(6, 5, 5);
    within(
        w.write_part(
            OutgoingPart::refinement(level2.clone(), ContextKey::new(m3, 1), 2)
                .with_context(vec![ContextKey::new(m3, 0), ContextKey::new(m3, 1)]),
        ),
    )
    .await
    .unwrap();
    within(w.finish()).await.unwrap();
    let got = collect(&server).await;
    assert_eq!(
        got.parts[2],
        ReceivedPart::Refinement {
            level: 2,
            base: ContextKey::new(m3, 1),
            grid: level2
        }
    );
    // The sender refuses a level that does not follow the part it names, before sending.
    let err = within(client.send(
        OutgoingMessage::new(Role::User).with_part(OutgoingPart::refinement(
            l2,
            ContextKey::new(0, 0),
            3,
        )),
    ))
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not the level below"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_breaking_the_ladder_rules_gets_documented_errors() {
    let codec = || CodecConfig::default().with_ladder(ladder());
    let mut p = model_pair(codec(), codec());
    let (good_client, _good_server) = connect(&mut p).await;
    let models = good_client.negotiated().entropy_models.clone();
    let index = |name: &str| models.iter().position(|m| m.id == name).unwrap() as u64;
    let (ladder_ix, adaptive, uniform) = (
        index("unimic-entropy/ladder"),
        index("unimic-entropy/adaptive-grid"),
        index("unimic-entropy/uniform"),
    );
    let (mut peer, peer_session, tok) = raw_peer(&mut p, models.clone()).await;
    let drain = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        while let Ok(Some(m)) = peer_session.recv().await {
            outcomes.push(m.collect().await.err().map(|e| e.code()));
        }
        outcomes
    });
    // A valid 4 × 4 base image as message 0.
    let base = noise(4, 4, 6);
    let uniform_part = PartCodec::default()
        .encode(
            &SessionContext::new(0),
            PartTokens::Grid(&base),
            &PartSpec::new(ModelChoice::Uniform),
        )
        .unwrap();
    let mut held = SessionContext::new(1 << 20);
    held.insert(ContextKey::new(0, 0), Sequence::grid(&base))
        .unwrap();
    let header = |model: u64, (rows, cols): (u64, u64), mode: CodingMode| Header {
        tokenizer: tok,
        model,
        rows,
        cols,
        tokens: rows * cols,
        mode,
        context: vec![ContextKey::new(0, 0)],
        held: held.clone(),
    };
    let refine = |l: u64| CodingMode::Refinement { level: v(l) };
    let h = Header {
        context: vec![],
        ..header(uniform, (4, 4), CodingMode::Uniform)
    };
    let m = message(0, &h, &[(16, &uniform_part.chunks[0].payload)]);
    let mut s = within(peer.conn.open_uni()).await.unwrap();
    s.write_all(&m).await.unwrap();
    s.finish().unwrap();
    peer.control_frame(|f| matches!(f, Frame::Ack(a) if a.message_id == v(0)))
        .await;
    // Mode 5 with a model that is not the ladder, and the ladder outside mode 5.
    let m = message(2, &header(adaptive, (4, 4), refine(2)), &[(16, &[9, 9])]);
    expect_refused(&mut peer, 2, m, ErrorCode::UNSUPPORTED).await;
    let m = message(
        4,
        &header(ladder_ix, (4, 4), CodingMode::ImageConditioned),
        &[(16, &[9])],
    );
    expect_refused(&mut peer, 4, m, ErrorCode::UNSUPPORTED).await;
    // Level 3 on a base image (level 1), a level the ladder has no model for, another shape.
    let m = message(6, &header(ladder_ix, (4, 4), refine(3)), &[(16, &[9])]);
    let why = expect_refused(&mut peer, 6, m, ErrorCode::PROTOCOL_VIOLATION).await;
    assert!(why.contains("not the level below"), "{why}");
    let m = message(8, &header(ladder_ix, (4, 4), refine(9)), &[(16, &[9])]);
    let why = expect_refused(&mut peer, 8, m, ErrorCode::PROTOCOL_VIOLATION).await;
    assert!(why.contains("levels 2 ..= 3"), "{why}");
    let m = message(10, &header(ladder_ix, (2, 2), refine(2)), &[(4, &[9])]);
    expect_refused(&mut peer, 10, m, ErrorCode::PROTOCOL_VIOLATION).await;
    // A good refinement still decodes on the same session.
    let l2 = noise(4, 4, 7);
    let part = PartCodec::new(CodecConfig::default().with_ladder(ladder()))
        .encode(
            &held,
            PartTokens::Grid(&l2),
            &PartSpec::new(ModelChoice::Ladder)
                .with_refs(vec![ContextKey::new(0, 0)])
                .with_level(2),
        )
        .unwrap();
    let m = message(
        12,
        &header(ladder_ix, (4, 4), refine(2)),
        &[(16, &part.chunks[0].payload)],
    );
    let mut s = within(peer.conn.open_uni()).await.unwrap();
    s.write_all(&m).await.unwrap();
    s.finish().unwrap();
    peer.control_frame(|f| matches!(f, Frame::Ack(a) if a.message_id == v(12)))
        .await;
    peer.conn.close(0u32.into(), b"done");
    let outcomes = within(drain).await.unwrap();
    assert_eq!(
        outcomes,
        vec![
            None,
            Some(ErrorCode::UNSUPPORTED),
            Some(ErrorCode::UNSUPPORTED),
            Some(ErrorCode::PROTOCOL_VIOLATION),
            Some(ErrorCode::PROTOCOL_VIOLATION),
            Some(ErrorCode::PROTOCOL_VIOLATION),
            None
        ]
    );
}

/// Image parts streamed as their tokens come (`begin_image` / `push_image`): a generic part in
/// chunks of two rows pushed a row at a time, and an edit whose region's cells come in pieces.
/// Each chunk reaches the receiver as it is written and decodes there on the model's run; the
/// parts equal the grids and both contexts agree. Misuse is refused without sending anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_image_parts_decode_chunk_by_chunk() {
    use unimic_codec::entropy::generic::{Generic, GenericConfig};
    use unimic_transport::ImageStream;

    let generic = Arc::new(Generic::synthetic(&GenericConfig::tiny(K as usize), 3).unwrap());
    let codecs = codec(4).with_generic(generic);
    let mut pair = model_pair(codecs.clone(), codecs);
    let (client, server) = connect(&mut pair).await;

    let image = noise(6, 5, 11);
    let mut w = within(client.open(Role::User)).await.unwrap();
    within(
        w.begin_image(
            ImageStream::new(6, 5, K)
                .with_model(ModelChoice::Generic)
                .with_chunk_tokens(10),
        ),
    )
    .await
    .unwrap();
    // The receiver sees the part and its first chunk before the rest is pushed.
    within(w.push_image(&image.ids()[..10])).await.unwrap();
    let mut incoming = within(server.recv()).await.unwrap().unwrap();
    let first = loop {
        match within(incoming.next()).await.unwrap().unwrap() {
            MessageEvent::Chunk {
                seq: 0,
                fin: false,
                data: ChunkData::Tokens { start: 0, ids },
                ..
            } => break ids,
            MessageEvent::Chunk { .. } => panic!("another chunk first"),
            _ => {}
        }
    };
    assert_eq!(first, &image.ids()[..10]);
    // Past the grid, or outside the codebook: refused, nothing sent; a new part or the end
    // before the image is whole: refused.
    assert!(matches!(
        within(w.push_image(&[0; 40])).await,
        Err(SendError::Codec(_))
    ));
    assert!(matches!(
        within(w.push_image(&[K])).await,
        Err(SendError::Codec(_))
    ));
    assert!(matches!(
        within(w.write_part(OutgoingPart::text(vec![1]))).await,
        Err(SendError::Usage(_))
    ));
    let mut stats = None;
    for row in image.ids()[10..].chunks(5) {
        stats = within(w.push_image(row)).await.unwrap();
    }
    let stats = stats.expect("the last push ends the part");
    assert_eq!(stats.tokens, 30);
    within(w.finish()).await.unwrap();
    let mut got = first;
    loop {
        match within(incoming.next()).await {
            Some(Ok(MessageEvent::Chunk {
                data: ChunkData::Tokens { ids, .. },
                ..
            })) => got.extend(ids),
            Some(Ok(MessageEvent::PartEnd { part, .. })) => {
                assert_eq!(part, ReceivedPart::Image(image.clone()));
            }
            Some(Ok(_)) => {}
            None => break,
            Some(Err(e)) => panic!("{e}"),
        }
    }
    assert_eq!(got, image.ids());

    // An edit streamed: the region's cells in three pushes, in chunks of 4.
    // The image above: part 0 of the client's first message (id 0).
    let key = ContextKey::new(0, 0);
    let region = block(6, 5, 1..4, 1..4);
    let edited = edit(&image, &region, &noise(6, 5, 12));
    let cells: Vec<u32> = edited
        .ids()
        .iter()
        .zip(&region)
        .filter(|(_, &r)| r)
        .map(|(&id, _)| id)
        .collect();
    let mut w = within(client.open(Role::User)).await.unwrap();
    within(
        w.begin_image(
            ImageStream::new(6, 5, K)
                .edit(key, region.clone())
                .with_chunk_tokens(4),
        ),
    )
    .await
    .unwrap();
    for piece in cells.chunks(3) {
        within(w.push_image(piece)).await.unwrap();
    }
    within(w.finish()).await.unwrap();
    let got = collect(&server).await;
    assert_eq!(got.parts[0], ReceivedPart::Image(edited));
    assert_eq!(client.context_digest(), server.context_digest());
}

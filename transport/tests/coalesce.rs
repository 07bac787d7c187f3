//! Behaviour around the fast path: acknowledgements queued off the critical path still reach
//! the peer, a whole message that fails to code sends nothing (and leaves both contexts in
//! step), large parts (coded on the blocking pool) round trip chunk by chunk, and streams
//! accepted inline by a waiting `recv` (or by the driver while nobody waits) each reach exactly
//! one `recv`, even when the waiting future is dropped.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use unimic_protocol::control::Ack;
use unimic_protocol::{
    ErrorCode, Frame, MessageEnd, MessageHeader, PartBody, PartChunk, PartHeader, RawPart, Role,
    VarInt,
};
use unimic_transport::{
    AckStage, ChunkData, ContextKey, MessageEvent, ModelChoice, OutgoingMessage, OutgoingPart,
    ReceivedPart, SendError, TokenGrid,
};

fn v(n: u64) -> VarInt {
    VarInt::from_u64(n).unwrap()
}

/// A whole message with one raw part, as a raw peer writes it.
fn raw_message(id: u64, payload: &'static [u8]) -> Vec<u8> {
    let frames = [
        Frame::MessageHeader(MessageHeader {
            message_id: v(id),
            role: Role::User,
        }),
        Frame::PartHeader(PartHeader {
            index: v(0),
            body: PartBody::Raw(RawPart {
                media_type: "application/octet-stream".into(),
            }),
        }),
        Frame::PartChunk(PartChunk {
            part_index: v(0),
            seq: v(0),
            fin: true,
            token_count: VarInt::ZERO,
            payload: Bytes::from_static(payload),
        }),
        Frame::MessageEnd(MessageEnd { part_count: v(1) }),
    ];
    frames
        .iter()
        .flat_map(|f| frame_bytes(f).to_vec())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_acknowledged_on_the_control_stream() {
    let (mut server, pin) = server_with(|c| c);
    let addr = server.local_addr().unwrap();
    let mut peer = RawPeer::connect(addr, pin, Vec::new()).await;
    let session = within(server.accept()).await.unwrap();
    // Ten messages back to back; the server never sends anything, so every ack is written by
    // the session driver after the ack delay, batched.
    let ids: Vec<u64> = (0..10).map(|i| 2 * i).collect();
    for &id in &ids {
        let mut s = within(peer.conn.open_uni()).await.unwrap();
        within(s.write_all(&raw_message(id, b"hello")))
            .await
            .unwrap();
        s.finish().unwrap();
    }
    // Each stream is read on its own: the order across streams is not fixed.
    let mut received = Vec::new();
    for _ in &ids {
        let msg = within(session.recv()).await.unwrap().unwrap();
        received.push(msg.message_id());
        let got = within(msg.collect()).await.unwrap();
        assert_eq!(
            got.parts,
            vec![ReceivedPart::Raw {
                media_type: "application/octet-stream".into(),
                bytes: Bytes::from_static(b"hello"),
            }]
        );
    }
    received.sort_unstable();
    assert_eq!(received, ids);
    let mut acked = Vec::new();
    while acked.len() < ids.len() {
        let f = peer.control_frame(|f| matches!(f, Frame::Ack(_))).await;
        let Frame::Ack(Ack {
            message_id,
            part_index,
            chunk_seq,
            stage,
        }) = f
        else {
            unreachable!()
        };
        assert_eq!(stage, AckStage::Decoded);
        assert_eq!((part_index, chunk_seq), (VarInt::ZERO, VarInt::ZERO));
        acked.push(message_id.into_inner());
    }
    acked.sort_unstable();
    assert_eq!(acked, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_message_that_fails_to_code_sends_nothing() {
    let mut pair = pair();
    let (client, server) = connect(&mut pair).await;
    // Part 0 codes; part 1 refers to a context entry nobody holds: the send fails before
    // anything is written.
    let bad = OutgoingMessage::new(Role::User)
        .with_part(OutgoingPart::text(vec![1, 2, 3]))
        .with_part(OutgoingPart::text(vec![4]).with_context(vec![ContextKey::new(40, 0)]));
    let r = within(client.send(bad)).await;
    assert!(matches!(r, Err(SendError::Codec(_))), "{r:?}");
    // Part 0 of the failed message was coded and then taken back out of the sender's context.
    assert!(client.context_keys().is_empty());

    let good = OutgoingMessage::new(Role::User).with_part(OutgoingPart::text(vec![5, 6]));
    let st = within(client.send(good)).await.unwrap();
    assert_eq!(st.message_id, 2);
    // The first message the server sees is the good one: nothing of message 0 was sent.
    let got = within(within(server.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert_eq!(got.message_id, 2);
    assert_eq!(got.parts, vec![ReceivedPart::Text(vec![5, 6])]);
    within(client.wait_ack(2, AckStage::Decoded)).await.unwrap();
    assert_eq!(client.context_keys(), server.context_keys());
    assert_eq!(client.context_keys(), vec![ContextKey::new(2, 0)]);
}

fn big_grid(side: u32, seed: u32) -> TokenGrid {
    let ids = (0..side * side)
        .map(|i| ((i / side / 8) * 31 + (i % side / 8) * 7 + seed) % 1024)
        .collect();
    TokenGrid::new(side, side, 1024, ids).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_parts_round_trip_chunk_by_chunk_with_context() {
    let mut pair = pair();
    let (client, server) = connect(&mut pair).await;
    // 4096 grid tokens in chunks of 2048, and 3000 text ids: both above the size from which
    // parts are coded and decoded on the blocking pool.
    let grid = big_grid(64, 1);
    let text: Vec<u32> = (0..3000).map(|i| (i * 7919) % 200_000).collect();
    let msg = OutgoingMessage::new(Role::User)
        .with_part(OutgoingPart::image(grid.clone()).with_chunk_tokens(2048))
        .with_part(OutgoingPart::text(text.clone()));
    within(client.send(msg)).await.unwrap();

    let mut incoming = within(server.recv()).await.unwrap().unwrap();
    let mut starts = Vec::new();
    let mut parts = Vec::new();
    while let Some(ev) = within(incoming.next()).await {
        match ev.unwrap() {
            MessageEvent::Chunk {
                part_index: 0,
                data: ChunkData::Tokens { start, ids },
                ..
            } => {
                assert_eq!(ids.len(), 2048);
                starts.push(start);
            }
            MessageEvent::PartEnd { part, .. } => parts.push(part),
            MessageEvent::End(_) => break,
            _ => {}
        }
    }
    assert_eq!(starts, vec![0, 2048]);
    assert_eq!(
        parts,
        vec![ReceivedPart::Image(grid.clone()), ReceivedPart::Text(text)]
    );

    // The reply conditions on the request's grid: the receiver learns it before decoding.
    let edited = big_grid(64, 2);
    let reply = OutgoingMessage::new(Role::Assistant).with_part(
        OutgoingPart::image(edited.clone())
            .with_chunk_tokens(2048)
            .with_context(vec![ContextKey::new(0, 0)]),
    );
    within(server.send(reply)).await.unwrap();
    let got = within(within(client.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert_eq!(got.parts, vec![ReceivedPart::Image(edited)]);
    within(client.wait_ack(0, AckStage::Decoded)).await.unwrap();
    within(server.wait_ack(1, AckStage::Decoded)).await.unwrap();
    assert_eq!(client.context_keys(), server.context_keys());
    // Nothing went wrong on either side.
    assert!(client.take_peer_errors().is_empty());
    assert!(server
        .take_peer_errors()
        .iter()
        .all(|e| e.code == ErrorCode::NO_ERROR));
}

/// A raw part carrying `i`, so that each message can be told apart.
fn numbered(i: u32) -> OutgoingMessage {
    OutgoingMessage::new(Role::User).with_part(OutgoingPart::raw(
        "application/x-test-index",
        Bytes::copy_from_slice(&i.to_le_bytes()),
    ))
}

/// The index a [`numbered`] message carries.
fn index_of(parts: &[ReceivedPart]) -> u32 {
    match parts {
        [ReceivedPart::Raw { bytes, .. }] => u32::from_le_bytes(bytes[..].try_into().unwrap()),
        other => panic!("not a numbered message: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_accepted_by_a_dropped_recv_reaches_the_next_recv() {
    let (mut server, pin) = server_with(|c| c);
    let addr = server.local_addr().unwrap();
    let peer = RawPeer::connect(addr, pin, Vec::new()).await;
    let session = within(server.accept()).await.unwrap();
    let whole = raw_message(0, b"parked");
    // Only the first byte of the message header: the stream can be accepted, the message not
    // yet parsed.
    let mut s = within(peer.conn.open_uni()).await.unwrap();
    within(s.write_all(&whole[..1])).await.unwrap();
    for _ in 0..3 {
        // Each of these waits accepts the stream (or finds it accepted), then is dropped.
        let r = tokio::time::timeout(Duration::from_millis(30), session.recv()).await;
        assert!(r.is_err(), "a message with half a header was delivered");
    }
    within(s.write_all(&whole[1..])).await.unwrap();
    s.finish().unwrap();
    let got = within(within(session.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert_eq!(got.message_id, 0);
    assert_eq!(
        got.parts,
        vec![ReceivedPart::Raw {
            media_type: "application/octet-stream".into(),
            bytes: Bytes::from_static(b"parked"),
        }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_flight_at_once_each_reach_exactly_one_recv() {
    let mut pair = pair();
    let (client, server) = connect(&mut pair).await;
    let (client, server) = (Arc::new(client), Arc::new(server));
    // Far more messages than the stream credit (16), sent at once.
    const N: u32 = 120;
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..N {
        let c = client.clone();
        sends.spawn(async move { c.send(numbered(i)).await.map(|st| st.message_id) });
    }
    // Three receivers at once: one waits without pause, one drops most of its waits early, one
    // pauses (longer than the driver's standby) so that the driver accepts some streams itself.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut receivers = tokio::task::JoinSet::new();
    for kind in 0..3u32 {
        let (s, tx) = (server.clone(), tx.clone());
        receivers.spawn(async move {
            let mut round = 0u32;
            loop {
                round += 1;
                let msg = match kind {
                    1 => match tokio::time::timeout(
                        Duration::from_micros(u64::from(round % 7) * 50),
                        s.recv(),
                    )
                    .await
                    {
                        Ok(m) => m,
                        Err(_) => continue,
                    },
                    _ => {
                        if kind == 2 {
                            tokio::time::sleep(Duration::from_millis(u64::from(round % 3) * 6))
                                .await;
                        }
                        s.recv().await
                    }
                };
                let Ok(Some(msg)) = msg else { return };
                let got = msg.collect().await.unwrap();
                if tx.send((got.message_id, index_of(&got.parts))).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let mut sent = Vec::new();
    while let Some(r) = within(sends.join_next()).await {
        sent.push(r.unwrap().unwrap());
    }
    let mut got = Vec::new();
    while got.len() < N as usize {
        got.push(within(rx.recv()).await.unwrap());
    }
    receivers.abort_all();
    // Every message exactly once, whoever accepted its stream; ids match what the sends
    // returned.
    got.sort_unstable();
    let mut indices: Vec<u32> = got.iter().map(|&(_, i)| i).collect();
    indices.sort_unstable();
    assert_eq!(indices, (0..N).collect::<Vec<_>>());
    let mut ids: Vec<u64> = got.iter().map(|&(id, _)| id).collect();
    ids.dedup();
    sent.sort_unstable();
    assert_eq!(ids, sent);
    assert!(rx.try_recv().is_err(), "a message was delivered twice");
    assert_eq!(client.context_keys(), server.context_keys());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_accepts_while_nobody_waits() {
    let mut pair = pair();
    let (client, server) = connect(&mut pair).await;
    // The server receives once (so its driver stands by), then waits in recv without result and
    // gives up (so its driver parks, and must be woken when the wait ends).
    within(client.send(numbered(0))).await.unwrap();
    let first = within(within(server.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert_eq!(index_of(&first.parts), 0);
    let r = tokio::time::timeout(Duration::from_millis(40), server.recv()).await;
    assert!(r.is_err());
    // Nobody waits now: the driver reads and acknowledges what arrives.
    let mut ids = Vec::new();
    for i in 1..=5 {
        ids.push(within(client.send(numbered(i))).await.unwrap().message_id);
    }
    for &id in &ids {
        within(client.wait_ack(id, AckStage::Decoded))
            .await
            .unwrap();
    }
    // The messages it read wait for the next recv.
    let mut got = Vec::new();
    for _ in &ids {
        let m = within(within(server.recv()).await.unwrap().unwrap().collect())
            .await
            .unwrap();
        got.push(index_of(&m.parts));
    }
    got.sort_unstable();
    assert_eq!(got, vec![1, 2, 3, 4, 5]);
}

/// The frames of message `id` with one text part of `ids` coded with the uniform model against
/// `held` (the sender's context) with references `refs`: the message header, then the rest.
fn uniform_text_message(
    id: u64,
    (tokenizer, model): (u64, u64),
    ids: &[u32],
    held: &unimic_codec::context::SessionContext,
    refs: Vec<ContextKey>,
) -> (Vec<u8>, Vec<u8>) {
    use unimic_codec::part::{PartCodec, PartSpec, PartTokens};
    use unimic_protocol::{CodedPart, CodingMode, ContextRef, Shape};
    let coded = PartCodec::default()
        .encode(
            held,
            PartTokens::Text(ids),
            &PartSpec::new(ModelChoice::Uniform).with_refs(refs.clone()),
        )
        .unwrap();
    assert_eq!(coded.chunks.len(), 1);
    let n = ids.len() as u64;
    let header = frame_bytes(&Frame::MessageHeader(MessageHeader {
        message_id: v(id),
        role: Role::User,
    }));
    let rest = [
        frame_bytes(&Frame::PartHeader(PartHeader {
            index: v(0),
            body: PartBody::Text(CodedPart {
                tokenizer: v(tokenizer),
                entropy_model: v(model),
                shape: Shape {
                    rows: v(1),
                    cols: v(n),
                },
                token_count: v(n),
                mode: CodingMode::Uniform,
                context: refs
                    .iter()
                    .map(|k| ContextRef {
                        message_id: v(k.message_id),
                        part_index: v(k.part_index),
                    })
                    .collect(),
                context_digest: coded.digest,
            }),
        })),
        frame_bytes(&Frame::PartChunk(PartChunk {
            part_index: v(0),
            seq: v(0),
            fin: true,
            token_count: v(n),
            payload: Bytes::from(coded.chunks[0].payload.clone()),
        })),
        frame_bytes(&Frame::MessageEnd(MessageEnd { part_count: v(1) })),
    ]
    .concat();
    (header.to_vec(), rest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_waits_for_the_part_it_references_while_that_one_is_still_arriving() {
    use unimic_codec::context::{Sequence, SessionContext};
    let mut p = pair();
    // A real client's handshake gives the entropy model table a raw peer offers.
    let (good_client, _good_server) = connect(&mut p).await;
    let models = good_client.negotiated().entropy_models.clone();
    let uniform = models
        .iter()
        .position(|m| m.id == "unimic-entropy/uniform")
        .unwrap() as u64;
    let connecting = RawPeer::connect(p.addr, p.pin, models);
    let (peer, session) = within(async { tokio::join!(connecting, p.server.accept()) }).await;
    let session = session.unwrap();
    let text = peer
        .hello
        .tokenizers
        .iter()
        .position(|t| t.id == "o200k_base")
        .unwrap() as u64;

    // Message 0: a text part; message 2: a text part that references it.
    let first = [13225u32, 11, 2375];
    let (a_header, a_rest) = uniform_text_message(
        0,
        (text, uniform),
        &first,
        &SessionContext::new(0),
        Vec::new(),
    );
    let mut held = SessionContext::new(1 << 20);
    held.insert(ContextKey::new(0, 0), Sequence::text(first.to_vec()))
        .unwrap();
    let (b_header, b_rest) = uniform_text_message(
        2,
        (text, uniform),
        &[7, 8],
        &held,
        vec![ContextKey::new(0, 0)],
    );

    // Only message 0's header, then message 2 whole: its part must wait for part (0, 0).
    let mut a = within(peer.conn.open_uni()).await.unwrap();
    within(a.write_all(&a_header)).await.unwrap();
    let mut b = within(peer.conn.open_uni()).await.unwrap();
    within(b.write_all(&[b_header, b_rest].concat()))
        .await
        .unwrap();
    b.finish().unwrap();
    let receiver = tokio::spawn(async move {
        let mut got = Vec::new();
        for _ in 0..2 {
            let m = within(session.recv()).await.unwrap().unwrap();
            got.push((m.message_id(), within(m.collect()).await.map(|m| m.parts)));
        }
        (got, session)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    within(a.write_all(&a_rest)).await.unwrap();
    a.finish().unwrap();

    let (mut got, session) = within(receiver).await.unwrap();
    got.sort_by_key(|(id, _)| *id);
    assert_eq!(
        got,
        vec![
            (0, Ok(vec![ReceivedPart::Text(first.to_vec())])),
            (2, Ok(vec![ReceivedPart::Text(vec![7, 8])])),
        ]
    );
    assert_eq!(
        session.context_keys(),
        vec![ContextKey::new(0, 0), ContextKey::new(2, 0)]
    );
}

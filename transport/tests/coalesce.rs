//! Behaviour around the fast path: acknowledgements queued off the critical path still reach
//! the peer, a whole message that fails to code sends nothing (and leaves both contexts in
//! step), and large parts (coded on the blocking pool) round trip chunk by chunk.

mod common;

use bytes::Bytes;
use common::*;
use unimic_protocol::control::Ack;
use unimic_protocol::{
    ErrorCode, Frame, MessageEnd, MessageHeader, PartBody, PartChunk, PartHeader, RawPart, Role,
    VarInt,
};
use unimic_transport::{
    AckStage, ChunkData, ContextKey, MessageEvent, OutgoingMessage, OutgoingPart, ReceivedPart,
    SendError, TokenGrid,
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

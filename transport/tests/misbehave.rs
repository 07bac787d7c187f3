//! Misbehaving peers played with raw quinn: each gets the documented error code, and the server
//! keeps serving a well-behaved session connected all along.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use unimic_codec::context::SessionContext;
use unimic_protocol::{
    CodedPart, CodingMode, ContextRef, ErrorCode, Frame, MessageHeader, PartBody, PartChunk,
    PartHeader, Role, Shape, VarInt,
};
use unimic_transport::{OutgoingMessage, OutgoingPart, ReceivedPart, Session};

fn v(n: u64) -> VarInt {
    VarInt::from_u64(n).unwrap()
}

fn header(id: u64) -> Bytes {
    frame_bytes(&Frame::MessageHeader(MessageHeader {
        message_id: v(id),
        role: Role::User,
    }))
}

fn coded(tokenizer: u64, model: u64, rows: u64, cols: u64) -> CodedPart {
    CodedPart {
        tokenizer: v(tokenizer),
        entropy_model: v(model),
        shape: Shape {
            rows: v(rows),
            cols: v(cols),
        },
        token_count: v(rows * cols),
        mode: CodingMode::Generic,
        context: vec![],
        context_digest: SessionContext::new(0).digest(&[]).unwrap(),
    }
}

fn part(body: PartBody) -> Bytes {
    frame_bytes(&Frame::PartHeader(PartHeader { index: v(0), body }))
}

fn chunk() -> Bytes {
    frame_bytes(&Frame::PartChunk(PartChunk {
        part_index: v(0),
        seq: v(0),
        fin: true,
        token_count: v(3),
        payload: Bytes::from_static(&[1, 2, 3, 4]),
    }))
}

fn cat(parts: &[Bytes]) -> Vec<u8> {
    parts.iter().flat_map(|b| b.iter().copied()).collect()
}

/// Sends `bytes` as message `id`'s stream and checks both the stream stop code and the Error
/// frame on the control stream.
async fn expect_refused(peer: &mut RawPeer, id: u64, bytes: &[u8], code: ErrorCode) {
    let stopped = peer.send_raw_message(bytes).await;
    assert_eq!(
        stopped,
        Some(code.into_inner()),
        "stop code for message {id}"
    );
    let f = peer
        .control_frame(|f| matches!(f, Frame::Error(e) if e.message_id == Some(v(id))))
        .await;
    let Frame::Error(e) = f else { unreachable!() };
    assert_eq!(e.code, code, "error frame for message {id}: {}", e.reason);
}

async fn still_serving(client: &Session, server: &Session, n: u32) {
    within(client.send(OutgoingMessage::new(Role::User).with_part(OutgoingPart::text(vec![n]))))
        .await
        .unwrap();
    let got = within(within(server.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert_eq!(got.parts, vec![ReceivedPart::Text(vec![n])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_peers_get_documented_errors_and_others_are_served() {
    let (mut server_ep, pin) = server_with(|c| {
        let s = c
            .session
            .clone()
            .with_handshake_timeout(Duration::from_millis(300));
        c.with_session(s)
    });
    let addr = server_ep.local_addr().unwrap();
    let client_ep = client_with(pin, |c| c);
    let (c, s) =
        within(async { tokio::join!(client_ep.connect(addr, "localhost"), server_ep.accept()) })
            .await;
    let (good_client, good_server) = (c.unwrap(), s.unwrap());
    let models = good_client.negotiated().entropy_models.clone();
    let adaptive_text = models
        .iter()
        .position(|m| m.id == "unimic-entropy/adaptive-text")
        .unwrap() as u64;
    still_serving(&good_client, &good_server, 1).await;

    // A raw peer that completes the handshake, then misbehaves on message streams.
    let (mut peer, peer_session) = {
        let connecting = RawPeer::connect(addr, pin, models.clone());
        let (peer, s) = within(async { tokio::join!(connecting, server_ep.accept()) }).await;
        (peer, s.unwrap())
    };
    let image_tok = peer
        .hello
        .tokenizers
        .iter()
        .position(|t| t.id == "test-vq")
        .unwrap() as u64;
    // The server side of the raw peer's session drains its messages (and sees the failures).
    let drain = tokio::spawn(async move {
        let mut failures = Vec::new();
        while let Ok(Some(m)) = peer_session.recv().await {
            if let Err(e) = m.collect().await {
                failures.push(e.code());
            }
        }
        failures
    });

    // Malformed frame: a part header whose payload is garbage.
    let garbage = Bytes::from_static(&[0x05, 0x03, 0xff, 0xff, 0xff]);
    expect_refused(
        &mut peer,
        0,
        &cat(&[header(0), garbage]),
        ErrorCode::PROTOCOL_VIOLATION,
    )
    .await;

    // Wrong digest.
    let mut c = coded(0, adaptive_text, 1, 3);
    c.context_digest = [0xab; 32];
    expect_refused(
        &mut peer,
        2,
        &cat(&[header(2), part(PartBody::Text(c)), chunk()]),
        ErrorCode::CONTEXT_MISMATCH,
    )
    .await;

    // Unknown entropy model index.
    let c = coded(0, 40, 1, 3);
    expect_refused(
        &mut peer,
        4,
        &cat(&[header(4), part(PartBody::Text(c)), chunk()]),
        ErrorCode::MODEL_MISSING,
    )
    .await;

    // A reference to context nobody sent.
    let mut c = coded(0, adaptive_text, 1, 3);
    c.context = vec![ContextRef {
        message_id: v(98),
        part_index: v(0),
    }];
    expect_refused(
        &mut peer,
        6,
        &cat(&[header(6), part(PartBody::Text(c)), chunk()]),
        ErrorCode::CONTEXT_UNKNOWN,
    )
    .await;

    // A grid above the negotiated size.
    let grid_model = models
        .iter()
        .position(|m| m.id == "unimic-entropy/adaptive-grid")
        .unwrap() as u64;
    let c = coded(image_tok, grid_model, 1000, 1000);
    expect_refused(
        &mut peer,
        8,
        &cat(&[header(8), part(PartBody::Image(c)), chunk()]),
        ErrorCode::LIMIT_EXCEEDED,
    )
    .await;

    // A frame longer than the negotiated frame limit (only its header is sent).
    let mut big = header(10).to_vec();
    big.extend_from_slice(&[0x06, 0x80, 0x40, 0x00, 0x00]); // PART_CHUNK, length 4 MiB
    expect_refused(&mut peer, 10, &big, ErrorCode::LIMIT_EXCEEDED).await;

    // A message id of the server's parity.
    expect_refused(&mut peer, 13, &header(13), ErrorCode::PROTOCOL_VIOLATION).await;

    // Every failure reached the server-side handle too, and its session is still up.
    still_serving(&good_client, &good_server, 2).await;
    peer.conn.close(0u32.into(), b"done");
    let failures = within(drain).await.unwrap();
    assert!(
        failures.contains(&ErrorCode::CONTEXT_MISMATCH),
        "{failures:?}"
    );

    // Skipping the handshake: a message header on the control stream closes the connection.
    let (_ep, conn) = raw_connect(addr, pin).await;
    // Message streams are not open before the handshake.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), conn.open_uni())
            .await
            .is_err()
    );
    let (mut send, _recv) = within(conn.open_bi()).await.unwrap();
    send.write_all(&header(0)).await.unwrap();
    match within(conn.closed()).await {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code.into_inner(),
                ErrorCode::PROTOCOL_VIOLATION.into_inner()
            )
        }
        other => panic!("expected an application close, got {other:?}"),
    }

    // A peer that never speaks is closed when the handshake times out.
    let (_ep2, silent) = raw_connect(addr, pin).await;
    match within(silent.closed()).await {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code.into_inner(), ErrorCode::TIMEOUT.into_inner())
        }
        other => panic!("expected an application close, got {other:?}"),
    }

    // A malformed hello closes with the decode error's code.
    let (_ep3, bad) = raw_connect(addr, pin).await;
    let (mut send, _recv) = within(bad.open_bi()).await.unwrap();
    send.write_all(&[0x01, 0x02, 0xff, 0xff]).await.unwrap();
    match within(bad.closed()).await {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code.into_inner(),
                ErrorCode::PROTOCOL_VIOLATION.into_inner()
            )
        }
        other => panic!("expected an application close, got {other:?}"),
    }

    still_serving(&good_client, &good_server, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_stalls_before_its_end_is_refused_with_timeout() {
    let (mut server_ep, pin) = server_with(|c| {
        let s = c
            .session
            .clone()
            .with_message_stall_timeout(Some(Duration::from_millis(300)));
        c.with_session(s)
    });
    let addr = server_ep.local_addr().unwrap();
    let client_ep = client_with(pin, |c| c);
    let (c, s) =
        within(async { tokio::join!(client_ep.connect(addr, "localhost"), server_ep.accept()) })
            .await;
    let (good_client, good_server) = (c.unwrap(), s.unwrap());
    let models = good_client.negotiated().entropy_models.clone();
    let (mut peer, peer_session) = {
        let connecting = RawPeer::connect(addr, pin, models);
        let (peer, s) = within(async { tokio::join!(connecting, server_ep.accept()) }).await;
        (peer, s.unwrap())
    };
    // The server's application takes every message (and waits on it) as a chat server does.
    tokio::spawn(async move {
        while let Ok(Some(m)) = peer_session.recv().await {
            let _ = m.collect().await;
        }
    });
    // A header, then nothing: the stream is stopped with TIMEOUT and an ERROR frame names it.
    expect_refused(&mut peer, 0, &header(0), ErrorCode::TIMEOUT).await;
    // Half a header, then nothing: the stream is stopped with TIMEOUT too; the ERROR frame
    // names no message (its id never arrived).
    let h = header(2);
    let stopped = peer.send_raw_message(&h[..h.len() - 1]).await;
    assert_eq!(stopped, Some(ErrorCode::TIMEOUT.into_inner()));
    let f = peer
        .control_frame(|f| matches!(f, Frame::Error(e) if e.message_id.is_none()))
        .await;
    let Frame::Error(e) = f else { unreachable!() };
    assert_eq!(e.code, ErrorCode::TIMEOUT, "{}", e.reason);
    // The well-behaved session was served all along.
    still_serving(&good_client, &good_server, 7).await;
}

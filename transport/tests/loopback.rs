//! Sessions over real QUIC on loopback: turns in both directions, concurrency, streaming,
//! cancellation, go-away, context in step, authentication and TLS modes.

mod common;

use std::time::Duration;

use common::*;
use unimic_transport::tls::{ClientAuth, ClientTls, Identity, Roots, ServerTls};
use unimic_transport::{
    AckStage, ChunkData, Client, ClientConfig, ConnectError, ContextKey, ErrorCode, Limits,
    MessageEvent, ModelChoice, OutgoingMessage, OutgoingPart, PartKind, ReceivedPart, RecvError,
    Role, SendError, Server, ServerConfig, TextStream, TokenGrid,
};

fn grid(h: u32, w: u32, seed: u32) -> TokenGrid {
    let ids = (0..h * w)
        .map(|i| ((i / 7 + seed) * 31 + (i % 5)) % 1024)
        .collect();
    TokenGrid::new(h, w, 1024, ids).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_turn_both_directions_with_text_and_image() {
    let mut p = pair();
    let (client, server) = connect(&mut p).await;
    let prompt: Vec<u32> = vec![13225, 11, 2375, 0, 1, 2, 3, 3, 3, 9];
    let image = grid(16, 16, 1);

    // Client → server: text and image, the image in 3 chunks.
    let sent = within(
        client.send(
            OutgoingMessage::new(Role::User)
                .with_part(OutgoingPart::text(prompt.clone()))
                .with_part(OutgoingPart::image(image.clone()).with_chunk_tokens(100)),
        ),
    )
    .await
    .unwrap();
    assert_eq!(sent.message_id, 0);
    assert_eq!(sent.tokens, prompt.len() as u64 + 256);
    assert!(sent.wire_bytes > sent.payload_bytes);
    assert_eq!(sent.parts[1].pixels, Some(256 * 16 * 16));
    assert!(sent.bits_per_pixel().unwrap() > 0.0);
    assert!(sent.bits_per_token().unwrap() > 0.0);

    let mut msg = within(server.recv()).await.unwrap().unwrap();
    assert_eq!(msg.role(), Role::User);
    let mut chunks = 0;
    let mut parts = Vec::new();
    let stats = loop {
        match within(msg.next()).await.unwrap().unwrap() {
            MessageEvent::PartStart(info) if info.index == 1 => {
                assert_eq!(
                    info.kind,
                    PartKind::Image {
                        height: 16,
                        width: 16,
                        codebook_size: 1024
                    }
                );
                assert_eq!(info.tokenizer, "test-vq");
            }
            MessageEvent::Chunk {
                part_index: 1,
                data: ChunkData::Tokens { start, ids },
                ..
            } => {
                assert_eq!(
                    &image.ids()[start as usize..start as usize + ids.len()],
                    &ids[..]
                );
                chunks += 1;
            }
            MessageEvent::PartEnd { part, .. } => parts.push(part),
            MessageEvent::End(stats) => break stats,
            _ => {}
        }
    };
    assert_eq!(chunks, 3);
    assert_eq!(
        parts,
        vec![
            ReceivedPart::Text(prompt.clone()),
            ReceivedPart::Image(image.clone())
        ]
    );
    assert_eq!(stats.wire_bytes, sent.wire_bytes);
    assert_eq!(stats.payload_bytes, sent.payload_bytes);

    // Server → client: a reply conditioned on the client's text and image.
    let reply_text: Vec<u32> = vec![2375, 0, 1, 2, 3, 3];
    let edited = grid(16, 16, 2);
    let reply = within(
        server.send(
            OutgoingMessage::new(Role::Assistant)
                .with_part(
                    OutgoingPart::text(reply_text.clone())
                        .with_context(vec![ContextKey::new(0, 0)]),
                )
                .with_part(
                    OutgoingPart::image(edited.clone()).with_context(vec![ContextKey::new(0, 1)]),
                ),
        ),
    )
    .await
    .unwrap();
    assert_eq!(reply.message_id, 1);
    let got = within(within(client.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert_eq!(got.role, Role::Assistant);
    assert_eq!(
        got.parts,
        vec![ReceivedPart::Text(reply_text), ReceivedPart::Image(edited)]
    );
    // Acknowledged once decoded.
    within(client.wait_ack(0, AckStage::Decoded)).await.unwrap();
    within(server.wait_ack(1, AckStage::Decoded)).await.unwrap();
    // Both ends hold the same context.
    assert_eq!(client.context_keys(), server.context_keys());
    assert_eq!(client.context_keys().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_parts_and_uniform_model_round_trip() {
    let mut p = pair();
    let (client, server) = connect(&mut p).await;
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    within(
        client.send(
            OutgoingMessage::new(Role::User)
                .with_part(OutgoingPart::raw("application/octet-stream", blob.clone()))
                .with_part(
                    OutgoingPart::text(vec![5, 199_000, 7]).with_model(ModelChoice::Uniform),
                ),
        ),
    )
    .await
    .unwrap();
    let got = within(within(server.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert_eq!(
        got.parts,
        vec![
            ReceivedPart::Raw {
                media_type: "application/octet-stream".into(),
                bytes: blob.into()
            },
            ReceivedPart::Text(vec![5, 199_000, 7])
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_parts_are_split_into_frame_sized_chunks() {
    // 4,096-byte frames: 4,056 bytes of payload per chunk.
    let limits = Limits {
        max_frame_bytes: 4096u32.into(),
        ..Limits::default()
    };
    let (server, pin) = server_with(|c| c);
    let mut p = Pair {
        addr: server.local_addr().unwrap(),
        client: client_with(pin, |c| {
            c.with_session(session_config().with_limits(limits))
        }),
        server,
        pin,
    };
    let (client, server) = connect(&mut p).await;
    let blob: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    within(
        client.send(
            OutgoingMessage::new(Role::User)
                .with_part(OutgoingPart::raw("application/octet-stream", blob.clone()))
                .with_part(OutgoingPart::raw("application/x-empty", Vec::new())),
        ),
    )
    .await
    .unwrap();
    let mut msg = within(server.recv()).await.unwrap().unwrap();
    let mut chunks: Vec<(u64, u64, bool, usize)> = Vec::new();
    let mut parts = Vec::new();
    while let Some(ev) = within(msg.next()).await {
        match ev.unwrap() {
            MessageEvent::Chunk {
                part_index,
                seq,
                fin,
                data: ChunkData::Raw(bytes),
            } => chunks.push((part_index, seq, fin, bytes.len())),
            MessageEvent::PartEnd { part, .. } => parts.push(part),
            _ => {}
        }
    }
    assert_eq!(
        chunks,
        vec![
            (0, 0, false, 4056),
            (0, 1, false, 4056),
            (0, 2, true, 1888),
            (1, 0, true, 0)
        ]
    );
    assert_eq!(
        parts,
        vec![
            ReceivedPart::Raw {
                media_type: "application/octet-stream".into(),
                bytes: blob.into()
            },
            ReceivedPart::Raw {
                media_type: "application/x-empty".into(),
                bytes: Vec::<u8>::new().into()
            },
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_read_whole_keeps_every_event_and_its_statistics() {
    let mut p = pair();
    let (client, server) = connect(&mut p).await;
    let sent = within(
        client.send(
            OutgoingMessage::new(Role::User)
                .with_part(OutgoingPart::text(vec![13225, 11, 2375, 0]))
                .with_part(OutgoingPart::raw("application/x-id", vec![1u8, 2, 3]))
                .with_part(OutgoingPart::text(vec![7; 40])),
        ),
    )
    .await
    .unwrap();
    // Decoded (and so read to its end) by the server's driver before anyone receives it.
    let stage = within(client.wait_ack(sent.message_id, AckStage::Decoded)).await;
    assert_eq!(stage, Ok(AckStage::Decoded));
    let msg = within(server.recv()).await.unwrap().unwrap();
    // Nothing is left to stop: the message is still whole.
    msg.cancel();
    let got = within(msg.collect()).await.unwrap();
    assert_eq!(
        got.parts,
        vec![
            ReceivedPart::Text(vec![13225, 11, 2375, 0]),
            ReceivedPart::Raw {
                media_type: "application/x-id".into(),
                bytes: vec![1u8, 2, 3].into()
            },
            ReceivedPart::Text(vec![7; 40]),
        ]
    );
    // Frame sizes counted on receipt match what the sender wrote, part by part.
    assert_eq!(got.stats.wire_bytes, sent.wire_bytes);
    assert_eq!(got.stats.parts.len(), 3);
    for (r, s) in got.stats.parts.iter().zip(&sent.parts) {
        assert_eq!(
            (r.index, r.wire_bytes, r.payload_bytes),
            (s.index, s.wire_bytes, s.payload_bytes)
        );
    }
    assert!(client.take_peer_errors().is_empty());
}

/// A server and client whose codecs hold the generic transformer with weights from `server_seed`
/// and `client_seed`.
fn generic_pair(server_seed: u64, client_seed: u64) -> Pair {
    use std::sync::Arc;
    use unimic_codec::entropy::generic::{Generic, GenericConfig};
    use unimic_codec::part::CodecConfig;
    let with = |seed: u64| {
        let model = Generic::synthetic(&GenericConfig::tiny(1024), seed).unwrap();
        session_config().with_codec(CodecConfig::default().with_generic(Arc::new(model)))
    };
    let (server, pin) = server_with(|c| c.with_session(with(server_seed)));
    let addr = server.local_addr().unwrap();
    let client = client_with(pin, |c| c.with_session(with(client_seed)));
    Pair {
        server,
        client,
        addr,
        pin,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_transformer_is_negotiated_by_weights_hash() {
    // Same weights at both ends: image parts can use it, with or without context references.
    let mut p = generic_pair(5, 5);
    let (client, server) = connect(&mut p).await;
    let image = grid(16, 16, 3);
    let sent = within(
        client.send(
            OutgoingMessage::new(Role::User)
                .with_part(OutgoingPart::image(image.clone()).with_model(ModelChoice::Generic))
                .with_part(
                    OutgoingPart::image(grid(8, 12, 4))
                        .with_model(ModelChoice::Generic)
                        .with_context(vec![ContextKey::new(0, 0)]),
                ),
        ),
    )
    .await
    .unwrap();
    assert!(sent.payload_bytes > 0);
    let got = within(within(server.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert_eq!(
        got.parts,
        vec![
            ReceivedPart::Image(image),
            ReceivedPart::Image(grid(8, 12, 4))
        ]
    );

    // Different weights: the model is not negotiated, so a part asking for it is refused before
    // anything is sent, and the session goes on with the other models.
    let mut p = generic_pair(5, 6);
    let (client, server) = connect(&mut p).await;
    let err = within(
        client.send(
            OutgoingMessage::new(Role::User)
                .with_part(OutgoingPart::image(grid(4, 4, 1)).with_model(ModelChoice::Generic)),
        ),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SendError::NotNegotiated(_)), "{err}");
    within(
        client.send(OutgoingMessage::new(Role::User).with_part(OutgoingPart::image(grid(4, 4, 1)))),
    )
    .await
    .unwrap();
    let got = within(within(server.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert_eq!(got.parts, vec![ReceivedPart::Image(grid(4, 4, 1))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_sessions() {
    let (mut server, pin) = server_with(|c| c);
    let addr = server.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        while let Some(session) = server.accept().await {
            tokio::spawn(async move {
                while let Ok(Some(m)) = session.recv().await {
                    let Ok(got) = m.collect().await else { return };
                    let mut reply = OutgoingMessage::new(Role::Assistant);
                    for part in got.parts {
                        if let ReceivedPart::Text(ids) = part {
                            reply = reply.with_part(OutgoingPart::text(ids));
                        }
                    }
                    if session.send(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let client = client_with(pin, |c| c);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        let client = client.clone();
        tasks.spawn(async move {
            let session = client.connect(addr, "localhost").await?;
            let ids = vec![i, i + 1, i + 2];
            session
                .send(OutgoingMessage::new(Role::User).with_part(OutgoingPart::text(ids.clone())))
                .await
                .map_err(|e| ConnectError::Stream(e.to_string()))?;
            let reply = session
                .recv()
                .await
                .unwrap()
                .unwrap()
                .collect()
                .await
                .unwrap();
            assert_eq!(reply.parts, vec![ReceivedPart::Text(ids)]);
            Ok::<_, ConnectError>(session)
        });
    }
    let mut sessions = Vec::new();
    within(async {
        while let Some(r) = tasks.join_next().await {
            sessions.push(r.unwrap().unwrap());
        }
    })
    .await;
    assert_eq!(sessions.len(), 200);
    echo.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_reply_arrives_chunk_by_chunk_and_can_be_cancelled() {
    let mut p = pair();
    let (client, server) = connect(&mut p).await;
    let (go_tx, mut go_rx) = tokio::sync::mpsc::channel::<()>(1);
    let producer = tokio::spawn(async move {
        let mut w = server.open(Role::Assistant).await.unwrap();
        w.begin_text(TextStream::default()).await.unwrap();
        // Two chunks, each only after the client saw the previous one.
        for chunk in [[10u32, 11, 12], [13, 14, 15]] {
            w.push_text(&chunk).await.unwrap();
            go_rx.recv().await.unwrap();
        }
        // The client cancels now; keep generating until the stop arrives.
        let mut result = Ok(());
        for _ in 0..200 {
            result = w.push_text(&[16, 17]).await;
            if result.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (result, w.is_cancelled(), server)
    });

    let mut msg = within(client.recv()).await.unwrap().unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match within(msg.next()).await.unwrap().unwrap() {
            MessageEvent::PartStart(info) => {
                assert_eq!(info.kind, PartKind::Text { tokens: None })
            }
            MessageEvent::Chunk {
                data: ChunkData::Tokens { ids, .. },
                fin,
                ..
            } => {
                assert!(!fin);
                seen.push(ids);
                go_tx.send(()).await.unwrap();
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, vec![vec![10, 11, 12], vec![13, 14, 15]]);
    msg.cancel();
    // The receiver's handle reports the cancellation.
    loop {
        match within(msg.next()).await {
            Some(Err(e)) => {
                assert_eq!(e, RecvError::Cancelled);
                break;
            }
            Some(Ok(_)) => continue,
            None => panic!("message ended without the cancellation"),
        }
    }
    let (result, cancelled_flag, _server) = within(producer).await.unwrap();
    match result {
        Err(SendError::Stopped(code)) => assert_eq!(code, ErrorCode::CANCELLED),
        other => panic!("expected a stop with CANCELLED, got {other:?}"),
    }
    assert!(cancelled_flag, "the Cancel frame reached the sender");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_reset_is_reported_to_the_receiver() {
    let mut p = pair();
    let (client, server) = connect(&mut p).await;
    let mut w = within(client.open(Role::User)).await.unwrap();
    w.begin_text(TextStream::default()).await.unwrap();
    w.push_text(&[1, 2, 3]).await.unwrap();
    let mut msg = within(server.recv()).await.unwrap().unwrap();
    // Cancel only once the receiver holds the chunk: a reset may discard stream data the
    // receiver has not read yet, so cancelling earlier makes what it sees a race.
    let mut saw_chunk = false;
    while !saw_chunk {
        match within(msg.next()).await.unwrap() {
            Ok(MessageEvent::Chunk { .. }) => saw_chunk = true,
            Ok(_) => {}
            Err(e) => panic!("message failed before the cancellation: {e:?}"),
        }
    }
    w.cancel();
    loop {
        match within(msg.next()).await.unwrap() {
            Ok(MessageEvent::Chunk { .. }) => saw_chunk = true,
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e, RecvError::Reset(ErrorCode::CANCELLED));
                break;
            }
        }
    }
    assert!(saw_chunk);
    // The session carries on.
    within(client.send(OutgoingMessage::new(Role::User).with_part(OutgoingPart::text(vec![4]))))
        .await
        .unwrap();
    let got = within(within(server.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert_eq!(got.parts, vec![ReceivedPart::Text(vec![4])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_disconnect_mid_message_fails_only_that_session() {
    let mut p = pair();
    let (client, server) = connect(&mut p).await;
    let mut w = within(client.open(Role::User)).await.unwrap();
    w.begin_text(TextStream::default()).await.unwrap();
    w.push_text(&[1, 2, 3]).await.unwrap();
    let mut msg = within(server.recv()).await.unwrap().unwrap();
    // Let the first chunk arrive, then vanish.
    loop {
        if let MessageEvent::Chunk { .. } = within(msg.next()).await.unwrap().unwrap() {
            break;
        }
    }
    std::mem::forget(w);
    client
        .connection()
        .close(0x1234u32.into(), b"pulled the plug");
    match within(msg.next()).await.unwrap() {
        Err(RecvError::ConnectionLost(_)) => {}
        other => panic!("expected a lost connection, got {other:?}"),
    }
    assert!(within(server.recv()).await.is_err());
    // The server still serves a new session.
    let (c2, s2) = connect(&mut p).await;
    within(c2.send(OutgoingMessage::new(Role::User).with_part(OutgoingPart::text(vec![9]))))
        .await
        .unwrap();
    let got = within(within(s2.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert_eq!(got.parts, vec![ReceivedPart::Text(vec![9])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_away_then_graceful_close() {
    let mut p = pair();
    let (client, server) = connect(&mut p).await;
    within(client.send(OutgoingMessage::new(Role::User).with_part(OutgoingPart::text(vec![1, 2]))))
        .await
        .unwrap();
    let closing = tokio::spawn(client.close(Duration::from_secs(5)));
    let got = within(within(server.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert_eq!(got.parts, vec![ReceivedPart::Text(vec![1, 2])]);
    // After the go-away the session ends cleanly.
    assert!(matches!(within(server.recv()).await, Ok(None)));
    within(closing).await.unwrap();
    // No new messages after go-away.
    assert!(matches!(
        within(server.send(OutgoingMessage::new(Role::Assistant))).await,
        Err(SendError::GoingAway | SendError::Closed(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_stays_in_step_through_eviction() {
    // Room for two parts of 40 tokens (128 + 160 bytes each), not three.
    let limits = Limits {
        max_context_bytes: 700u32.into(),
        ..Limits::default()
    };
    let (mut server, pin) = server_with(|c| {
        let s = c.session.clone().with_limits(limits);
        c.with_session(s)
    });
    let addr = server.local_addr().unwrap();
    let client = client_with(pin, |c| c);
    let (c, s) =
        within(async { tokio::join!(client.connect(addr, "localhost"), server.accept()) }).await;
    let (client, server) = (c.unwrap(), s.unwrap());
    assert_eq!(client.negotiated().limits.max_context_bytes, 700u32.into());
    for turn in 0..6u32 {
        let ids: Vec<u32> = (0..40).map(|i| i * 3 + turn).collect();
        let last = client.context_keys().last().copied();
        let part = match last {
            Some(k) => OutgoingPart::text(ids.clone()).with_context(vec![k]),
            None => OutgoingPart::text(ids.clone()),
        };
        let st = within(client.send(OutgoingMessage::new(Role::User).with_part(part)))
            .await
            .unwrap();
        let got = within(within(server.recv()).await.unwrap().unwrap().collect())
            .await
            .unwrap();
        assert_eq!(got.parts, vec![ReceivedPart::Text(ids)]);
        within(client.wait_ack(st.message_id, AckStage::Decoded))
            .await
            .unwrap();
        assert_eq!(client.context_keys(), server.context_keys());
    }
    // Only the last two messages remain.
    assert_eq!(
        server.context_keys(),
        vec![ContextKey::new(8, 0), ContextKey::new(10, 0)]
    );
    // Referring to an evicted part fails at the sender, before anything is sent.
    let r = client
        .send(
            OutgoingMessage::new(Role::User)
                .with_part(OutgoingPart::text(vec![1]).with_context(vec![ContextKey::new(0, 0)])),
        )
        .await;
    assert!(matches!(r, Err(SendError::Codec(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_auth_is_rejected_and_the_server_keeps_serving() {
    let (mut server, pin) = server_with(|c| c.with_tokens(["right"]));
    let addr = server.local_addr().unwrap();
    let bad = client_with(pin, |c| c.with_token("wrong"));
    match within(bad.connect(addr, "localhost")).await {
        Err(ConnectError::Rejected { code, .. }) => assert_eq!(code, ErrorCode::UNAUTHORIZED),
        other => panic!("expected UNAUTHORIZED, got {other:?}"),
    }
    let none = client_with(pin, |c| c);
    let e = within(none.connect(addr, "localhost")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UNAUTHORIZED));
    let good = client_with(pin, |c| c.with_token("right"));
    let (c, s) =
        within(async { tokio::join!(good.connect(addr, "localhost"), server.accept()) }).await;
    c.unwrap();
    s.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_models_are_named_in_the_reject() {
    let (server, pin) = server_with(|c| {
        // The server holds only the text tokenizer.
        let s = c
            .session
            .clone()
            .with_tokenizers(vec![unimic_transport::TokenizerInfo::o200k()]);
        c.with_session(s)
    });
    let addr = server.local_addr().unwrap();
    let client = client_with(pin, |c| {
        let s = c.session.clone().with_tokenizers(vec![image_tokenizer()]);
        c.with_session(s)
    });
    match within(client.connect(addr, "localhost")).await {
        Err(ConnectError::Rejected {
            code,
            missing_models,
            ..
        }) => {
            assert_eq!(code, ErrorCode::MODEL_MISSING);
            assert_eq!(missing_models.len(), 1);
            assert_eq!(missing_models[0].id, "test-vq");
        }
        other => panic!("expected MODEL_MISSING, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinning_the_wrong_certificate_fails() {
    let (server, _pin) = server_with(|c| c);
    let addr = server.local_addr().unwrap();
    let other = Identity::self_signed(&["localhost"]).unwrap().cert_hash();
    let client = client_with(other, |c| c);
    assert!(matches!(
        within(client.connect(addr, "localhost")).await,
        Err(ConnectError::Connection(_))
    ));
}

/// A CA, a server certificate and a client certificate it signed, as PEM files.
fn ca_files(dir: &std::path::Path) -> (std::path::PathBuf, Identity, Identity) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        Identity::from_pem(&cert.pem(), &key.serialize_pem()).unwrap()
    };
    let server = leaf(vec!["localhost".into()]);
    let client = leaf(vec!["edge-device".into()]);
    std::fs::create_dir_all(dir).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    (ca_path, server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_mode_verifies_the_chain_and_client_certificates() {
    let dir = std::env::temp_dir().join(format!("unimic-tls-{}", std::process::id()));
    let (ca_path, server_id, client_id) = ca_files(&dir);
    let roots = Roots::from_pem_file(&ca_path).unwrap();
    let tls = ServerTls::new(server_id).with_client_auth(ClientAuth::Required(roots.clone()));
    let mut server = Server::bind(ServerConfig::new(tls).with_session(session_config())).unwrap();
    let addr = server.local_addr().unwrap();

    // With a client certificate signed by the CA: accepted.
    let ok = Client::new(
        ClientConfig::new(ClientTls::webpki(roots.clone()).with_identity(client_id))
            .with_session(session_config()),
    )
    .unwrap();
    let (c, s) =
        within(async { tokio::join!(ok.connect(addr, "localhost"), server.accept()) }).await;
    c.unwrap();
    s.unwrap();

    // Without one: refused during TLS.
    let anonymous = Client::new(
        ClientConfig::new(ClientTls::webpki(roots.clone())).with_session(session_config()),
    )
    .unwrap();
    assert!(within(anonymous.connect(addr, "localhost")).await.is_err());

    // The wrong name: refused by WebPKI verification.
    let named =
        Client::new(ClientConfig::new(ClientTls::webpki(roots)).with_session(session_config()))
            .unwrap();
    assert!(within(named.connect(addr, "not-localhost")).await.is_err());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_carry_in_reply_to_and_replies_can_be_cancelled_before_they_start() {
    let mut p = pair();
    let (client, server) = connect(&mut p).await;
    for i in 0..2u32 {
        within(
            client.send(OutgoingMessage::new(Role::User).with_part(OutgoingPart::text(vec![i]))),
        )
        .await
        .unwrap();
    }
    let first = within(server.recv()).await.unwrap().unwrap();
    assert_eq!(first.in_reply_to(), None);
    let second = within(server.recv()).await.unwrap().unwrap();
    let (t0, t2) = (first.message_id(), second.message_id());
    assert_eq!((t0, t2), (0, 2));

    // Answer the second turn first, whole; then the first one, streamed.
    within(
        server.send(
            OutgoingMessage::new(Role::Assistant)
                .in_reply_to(t2)
                .with_part(OutgoingPart::text(vec![22])),
        ),
    )
    .await
    .unwrap();
    let mut w = within(server.open_reply(Role::Assistant, t0))
        .await
        .unwrap();
    within(w.begin_text(TextStream::default())).await.unwrap();
    within(w.push_text(&[5, 6])).await.unwrap();
    within(w.finish()).await.unwrap();

    let a = within(client.recv()).await.unwrap().unwrap();
    assert_eq!(a.in_reply_to(), Some(t2));
    let a = within(a.collect()).await.unwrap();
    assert_eq!(
        (a.in_reply_to, a.parts.clone()),
        (Some(t2), vec![ReceivedPart::Text(vec![22])])
    );
    let b = within(within(client.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert_eq!(b.in_reply_to, Some(t0));
    assert_eq!(b.parts, vec![ReceivedPart::Text(vec![5, 6])]);

    // A reply may only name a message of the peer.
    assert!(matches!(
        server
            .send(OutgoingMessage::new(Role::Assistant).in_reply_to(1))
            .await,
        Err(SendError::Usage(_))
    ));

    // Cancelling the replies to a turn before any reply started: the server learns it.
    assert!(!server.is_cancelled(t2));
    client.cancel_replies(t2).await;
    within(server.cancelled(t2)).await;
    assert!(server.is_cancelled(t2));

    // An agent failure reported about a turn reaches the client's error queue.
    server
        .report_error(ErrorCode::AGENT_FAILED, Some(t0), "model down")
        .await;
    let e = within(client.next_peer_error()).await.unwrap();
    assert_eq!(
        (e.code, e.message_id.map(|m| m.into_inner())),
        (ErrorCode::AGENT_FAILED, Some(t0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_a_message_never_sent_is_refused() {
    let p = pair();
    let peer = RawPeer::connect(p.addr, p.pin, Vec::new()).await;
    let mut server = p.server;
    let session = within(server.accept()).await.unwrap();
    use unimic_protocol::{InReplyTo, Message, MessageHeader, VarInt};
    // The server has sent nothing, so no message of odd id can be answered.
    let m = Message {
        header: MessageHeader {
            message_id: VarInt::from_u32(0),
            role: Role::User,
        },
        in_reply_to: Some(InReplyTo {
            message_id: VarInt::from_u32(1),
        }),
        parts: vec![],
    };
    let mut bytes = Vec::new();
    unimic_protocol::Encode::encode(&m, &mut bytes);
    let code = peer.send_raw_message(&bytes).await;
    assert_eq!(code, Some(ErrorCode::PROTOCOL_VIOLATION.into_inner()));
    let mut msg = within(session.recv()).await.unwrap().unwrap();
    assert!(matches!(
        within(msg.next()).await,
        Some(Err(RecvError::Protocol {
            code: ErrorCode::PROTOCOL_VIOLATION,
            ..
        }))
    ));
}

//! The behaviour docs/PROTOCOL.md states as rules where the wire alone does not say it, played
//! with raw quinn peers (as `misbehave.rs` does) where the peer must misbehave or observe:
//!
//! * §5.4: a message that does not complete (ended before MESSAGE_END, refused, reset,
//!   cancelled) leaves none of its parts in either context; a sender that learns of the refusal
//!   from an ERROR or CANCEL frame takes its parts out even after it finished;
//! * §5: message ids strictly increase with the streams that carry them: a reused or smaller id
//!   is refused, and the context keeps what the first message with the id put there;
//! * §5.4: a context reference to a raw part is refused at once (raw parts never enter the
//!   context);
//! * §11: truncation seen only at FIN is reported by the ERROR frame (no STOP_SENDING);
//! * §2.1: an unknown first frame on a message stream, or on the control stream;
//! * §4.3: after REJECT the server finishes the control stream, then closes;
//! * §6.3: what mode a uniform part may carry;
//! * §7.4: who closes after GO_AWAY;
//! * §2.2: the initial stream limits (message streams only after the hellos, at most
//!   `max_concurrent_messages`, one bidirectional stream);
//! * §2.3: TLS: pinning ignores the server name;
//! * §8 / CODING.md §4.2: every context entry costs budget, so parts without tokens cannot grow
//!   a context without bound.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use unimic_codec::context::{ContextKey, Sequence, SessionContext};
use unimic_codec::part::{ModelChoice, PartCodec, PartSpec, PartTokens};
use unimic_protocol::handshake::VERSION_1;
use unimic_protocol::{
    frame, Cancel, ClientHello, CodedPart, CodingMode, ContextRef, ErrorCode, ErrorFrame, Frame,
    GoAway, Limits, MessageEnd, MessageHeader, ModelInfo, PartBody, PartChunk, PartHeader, RawPart,
    Rect, Region, Role, Shape, VarInt,
};
use unimic_transport::tls::{CertHash, Identity};
use unimic_transport::{
    MessageEvent, OutgoingMessage, OutgoingPart, RecvError, Session, TextStream,
};

fn v(n: u64) -> VarInt {
    VarInt::from_u64(n).unwrap()
}

fn key(m: u64, p: u64) -> ContextKey {
    ContextKey::new(m, p)
}

fn cat(frames: &[Frame]) -> Vec<u8> {
    frames
        .iter()
        .flat_map(|f| frame_bytes(f).to_vec())
        .collect()
}

fn header(id: u64) -> Frame {
    Frame::MessageHeader(MessageHeader {
        message_id: v(id),
        role: Role::User,
    })
}

fn end(parts: u64) -> Frame {
    Frame::MessageEnd(MessageEnd {
        part_count: v(parts),
    })
}

/// A text part coded with `model` (as a real sender would) against `ctx` and `refs`, sent
/// with `mode`: its header and its one chunk.
fn text_part(
    index: u64,
    ids: &[u32],
    model: (ModelChoice, u64),
    mode: CodingMode,
    ctx: &SessionContext,
    refs: &[ContextKey],
) -> [Frame; 2] {
    let spec = PartSpec::new(model.0).with_refs(refs.to_vec());
    let coded = PartCodec::default()
        .encode(ctx, PartTokens::Text(ids), &spec)
        .unwrap();
    let header = Frame::PartHeader(PartHeader {
        index: v(index),
        body: PartBody::Text(CodedPart {
            tokenizer: v(0),
            entropy_model: v(model.1),
            shape: Shape {
                rows: v(1),
                cols: v(ids.len() as u64),
            },
            token_count: v(ids.len() as u64),
            mode,
            context: refs
                .iter()
                .map(|k| ContextRef {
                    message_id: v(k.message_id),
                    part_index: v(k.part_index),
                })
                .collect(),
            context_digest: coded.digest,
        }),
    });
    let chunk = Frame::PartChunk(PartChunk {
        part_index: v(index),
        seq: v(0),
        fin: true,
        token_count: v(ids.len() as u64),
        payload: Bytes::from(coded.chunks[0].payload.clone()),
    });
    [header, chunk]
}

fn raw_part(index: u64) -> [Frame; 2] {
    [
        Frame::PartHeader(PartHeader {
            index: v(index),
            body: PartBody::Raw(RawPart {
                media_type: "text/plain".into(),
            }),
        }),
        Frame::PartChunk(PartChunk {
            part_index: v(index),
            seq: v(0),
            fin: true,
            token_count: v(0),
            payload: Bytes::from_static(b"attachment"),
        }),
    ]
}

/// A server, a well-behaved client session (for the model table), and a raw peer with its
/// session on the server.
struct Setup {
    server: unimic_transport::Server,
    addr: std::net::SocketAddr,
    pin: CertHash,
    models: Vec<ModelInfo>,
    _good: (Session, Session),
}

impl Setup {
    async fn new(
        configure: impl FnOnce(unimic_transport::ServerConfig) -> unimic_transport::ServerConfig,
    ) -> Setup {
        let (mut server, pin) = server_with(configure);
        let addr = server.local_addr().unwrap();
        let client = client_with(pin, |c| c);
        let (c, s) =
            within(async { tokio::join!(client.connect(addr, "localhost"), server.accept()) })
                .await;
        let good = (c.unwrap(), s.unwrap());
        let models = good.0.negotiated().entropy_models.clone();
        Setup {
            server,
            addr,
            pin,
            models,
            _good: good,
        }
    }

    fn model(&self, id: &str) -> u64 {
        self.models.iter().position(|m| m.id == id).unwrap() as u64
    }

    async fn raw(&mut self) -> (RawPeer, Session) {
        let connecting = RawPeer::connect(self.addr, self.pin, self.models.clone());
        let (peer, s) = within(async { tokio::join!(connecting, self.server.accept()) }).await;
        (peer, s.unwrap())
    }
}

/// Writes `bytes` as a message stream and finishes it; returns how the receiver stopped it
/// (`None`: it did not, the stream was read to its end).
async fn send_finished(peer: &RawPeer, bytes: &[u8]) -> Option<u64> {
    let mut s = within(peer.conn.open_uni()).await.unwrap();
    let _ = s.write_all(bytes).await;
    let _ = s.finish();
    within(s.stopped())
        .await
        .ok()
        .flatten()
        .map(|c| c.into_inner())
}

/// The next ERROR frame on the raw peer's control stream.
async fn next_error(peer: &mut RawPeer) -> ErrorFrame {
    match peer.control_frame(|f| matches!(f, Frame::Error(_))).await {
        Frame::Error(e) => e,
        _ => unreachable!(),
    }
}

/// The server-side handle of the next message fails with `code`.
async fn refused(session: &Session, code: ErrorCode) {
    let m = within(session.recv()).await.unwrap().unwrap();
    match within(m.collect()).await {
        Err(RecvError::Protocol { code: c, .. }) => assert_eq!(c, code),
        other => panic!("expected a refusal with {code}, got {other:?}"),
    }
}

/// Writes a frame on the raw peer's control stream.
async fn write_control(peer: &mut RawPeer, f: Frame) {
    peer.control_send.write_all(&frame_bytes(&f)).await.unwrap();
}

/// Waits (bounded) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_and_decreasing_message_ids_are_refused_and_the_context_keeps_the_first() {
    let mut setup = Setup::new(|c| c).await;
    let uniform = (ModelChoice::Uniform, setup.model("unimic-entropy/uniform"));
    let (mut peer, session) = setup.raw().await;
    let empty = SessionContext::new(1 << 20);
    let message = |id: u64, ids: &[u32]| {
        let p = text_part(0, ids, uniform, CodingMode::Uniform, &empty, &[]);
        cat(&[header(id), p[0].clone(), p[1].clone(), end(1)])
    };
    let delivered = |ids: Vec<u32>| {
        let session = &session;
        async move {
            let m = within(session.recv()).await.unwrap().unwrap();
            let got = within(m.collect()).await.unwrap();
            assert_eq!(got.parts, vec![unimic_transport::ReceivedPart::Text(ids)]);
            got.message_id
        }
    };
    assert_eq!(send_finished(&peer, &message(4, &[1, 2, 3])).await, None);
    assert_eq!(delivered(vec![1, 2, 3]).await, 4);
    // The same id again, after the first message ended, and a smaller id on a later stream:
    // each is refused before any decoding, and names its message.
    for id in [4, 2] {
        assert_eq!(
            peer.send_raw_message(&message(id, &[9, 9])).await,
            Some(ErrorCode::PROTOCOL_VIOLATION.into_inner()),
            "message id {id}"
        );
        let e = next_error(&mut peer).await;
        assert_eq!(
            (e.code, e.message_id),
            (ErrorCode::PROTOCOL_VIOLATION, Some(v(id)))
        );
    }
    // The session goes on: a larger id is delivered, and the context holds the first message 4.
    assert_eq!(send_finished(&peer, &message(6, &[5])).await, None);
    assert_eq!(delivered(vec![5]).await, 6);
    assert_eq!(session.context_keys(), vec![key(4, 0), key(6, 0)]);
    let mut first = SessionContext::new(1 << 20);
    first
        .insert(key(4, 0), Sequence::text(vec![1, 2, 3]))
        .unwrap();
    first.insert(key(6, 0), Sequence::text(vec![5])).unwrap();
    assert_eq!(
        session.context_digest(),
        first.digest(&first.keys()).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_does_not_complete_leaves_nothing_in_the_receivers_context() {
    let mut setup = Setup::new(|c| c).await;
    let uniform = (ModelChoice::Uniform, setup.model("unimic-entropy/uniform"));
    let (mut peer, session) = setup.raw().await;
    let empty = SessionContext::new(1 << 20);
    let mut held = SessionContext::new(1 << 20);
    held.insert(key(0, 0), Sequence::text(vec![1, 2, 3]))
        .unwrap();

    // Part 0 complete, then FIN before MESSAGE_END. The receiver sees the truncation only at
    // the FIN: the stream is already over in both directions, so no STOP_SENDING comes back;
    // the ERROR frame names the message (§11).
    let p0 = text_part(0, &[1, 2, 3], uniform, CodingMode::Uniform, &empty, &[]);
    let stopped = send_finished(&peer, &cat(&[header(0), p0[0].clone(), p0[1].clone()])).await;
    assert_eq!(stopped, None, "no STOP_SENDING after the FIN");
    let e = next_error(&mut peer).await;
    assert_eq!(
        (e.code, e.message_id),
        (ErrorCode::PROTOCOL_VIOLATION, Some(v(0)))
    );
    refused(&session, ErrorCode::PROTOCOL_VIOLATION).await;
    // The completed part 0 did not enter the context: a reference to it is refused.
    assert!(!session.context_keys().contains(&key(0, 0)));
    let p = text_part(
        0,
        &[4],
        uniform,
        CodingMode::TextConditioned,
        &held,
        &[key(0, 0)],
    );
    let bytes = cat(&[header(2), p[0].clone(), p[1].clone(), end(1)]);
    assert_eq!(
        peer.send_raw_message(&bytes).await,
        Some(ErrorCode::CONTEXT_UNKNOWN.into_inner())
    );
    assert_eq!(next_error(&mut peer).await.code, ErrorCode::CONTEXT_UNKNOWN);
    refused(&session, ErrorCode::CONTEXT_UNKNOWN).await;

    // A truncation inside a frame, also seen only at the FIN.
    let mut cut = cat(&[header(4), p0[0].clone(), p0[1].clone()]);
    cut.truncate(cut.len() - 2);
    assert_eq!(send_finished(&peer, &cut).await, None);
    let e = next_error(&mut peer).await;
    assert_eq!(
        (e.code, e.message_id),
        (ErrorCode::PROTOCOL_VIOLATION, Some(v(4)))
    );
    refused(&session, ErrorCode::PROTOCOL_VIOLATION).await;

    // Refused at part 1 (wrong digest): part 0, decoded, is taken out again.
    let mut p1 = text_part(1, &[5, 6], uniform, CodingMode::Uniform, &empty, &[]);
    if let Frame::PartHeader(PartHeader {
        body: PartBody::Text(c),
        ..
    }) = &mut p1[0]
    {
        c.context_digest = [0xab; 32];
    }
    let bytes = cat(&[
        header(6),
        p0[0].clone(),
        p0[1].clone(),
        p1[0].clone(),
        p1[1].clone(),
        end(2),
    ]);
    assert_eq!(
        peer.send_raw_message(&bytes).await,
        Some(ErrorCode::CONTEXT_MISMATCH.into_inner())
    );
    assert_eq!(
        next_error(&mut peer).await.code,
        ErrorCode::CONTEXT_MISMATCH
    );
    refused(&session, ErrorCode::CONTEXT_MISMATCH).await;
    assert!(!session.context_keys().contains(&key(6, 0)));

    // Reset by the sender after part 0 was decoded: held while the message was open, then
    // taken out.
    let mut s = within(peer.conn.open_uni()).await.unwrap();
    s.write_all(&cat(&[header(8), p0[0].clone(), p0[1].clone()]))
        .await
        .unwrap();
    let mut m = within(session.recv()).await.unwrap().unwrap();
    loop {
        if let MessageEvent::PartEnd { .. } = within(m.next()).await.unwrap().unwrap() {
            break;
        }
    }
    assert!(session.context_keys().contains(&key(8, 0)));
    s.reset(quinn::VarInt::from_u32(0x0c)).unwrap();
    assert_eq!(
        within(m.next()).await,
        Some(Err(RecvError::Reset(ErrorCode::CANCELLED)))
    );
    assert!(!session.context_keys().contains(&key(8, 0)));

    // A complete message is kept.
    let bytes = cat(&[header(10), p0[0].clone(), p0[1].clone(), end(1)]);
    assert_eq!(send_finished(&peer, &bytes).await, None);
    within(within(session.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert!(session.context_keys().contains(&key(10, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_reference_to_a_raw_part_is_refused_at_once() {
    // A long context wait: a reference that can never be satisfied must not wait for it.
    let mut setup = Setup::new(|c| {
        let mut s = c.session.clone();
        s.context_wait = Duration::from_secs(60);
        c.with_session(s)
    })
    .await;
    let uniform = (ModelChoice::Uniform, setup.model("unimic-entropy/uniform"));
    let (peer, session) = setup.raw().await;
    let mut ctx = SessionContext::new(1 << 20);
    // Digest as if the raw part were a text part [1]: the receiver never gets that far.
    ctx.insert(key(0, 0), Sequence::text(vec![1])).unwrap();
    ctx.insert(key(6, 0), Sequence::text(vec![1])).unwrap();

    // The raw part of an earlier, complete message.
    let r = raw_part(0);
    let bytes = cat(&[header(0), r[0].clone(), r[1].clone(), end(1)]);
    assert_eq!(send_finished(&peer, &bytes).await, None);
    within(within(session.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert!(session.context_keys().is_empty(), "raw parts are not kept");
    let p = text_part(
        0,
        &[7],
        uniform,
        CodingMode::TextConditioned,
        &ctx,
        &[key(0, 0)],
    );
    let refused_in = tokio::time::Instant::now();
    assert_eq!(
        peer.send_raw_message(&cat(&[header(4), p[0].clone(), p[1].clone(), end(1)]))
            .await,
        Some(ErrorCode::CONTEXT_UNKNOWN.into_inner())
    );

    // The raw part 0 of the same message.
    let r = raw_part(0);
    let p = text_part(
        1,
        &[7],
        uniform,
        CodingMode::TextConditioned,
        &ctx,
        &[key(6, 0)],
    );
    let bytes = cat(&[
        header(6),
        r[0].clone(),
        r[1].clone(),
        p[0].clone(),
        p[1].clone(),
        end(2),
    ]);
    assert_eq!(
        peer.send_raw_message(&bytes).await,
        Some(ErrorCode::CONTEXT_UNKNOWN.into_inner())
    );
    assert!(refused_in.elapsed() < Duration::from_secs(10), "it waited");
    refused(&session, ErrorCode::CONTEXT_UNKNOWN).await;
    refused(&session, ErrorCode::CONTEXT_UNKNOWN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_drops_a_message_the_receiver_refuses_or_cancels_even_after_finishing() {
    let mut setup = Setup::new(|c| c).await;
    let (mut peer, session) = setup.raw().await;
    // The server sends three complete messages to the raw peer, which reads them whole.
    for n in 0..3u32 {
        within(
            session
                .send(OutgoingMessage::new(Role::Assistant).with_part(OutgoingPart::text(vec![n]))),
        )
        .await
        .unwrap();
        let mut s = within(peer.conn.accept_uni()).await.unwrap();
        within(s.read_to_end(1 << 20)).await.unwrap();
    }
    assert_eq!(
        session.context_keys(),
        vec![key(1, 0), key(3, 0), key(5, 0)]
    );
    // AGENT_FAILED names a turn received whole: nothing is dropped. An ERROR with another code
    // refuses the message, and a CANCEL naming it says the peer stopped reading it: the sender
    // takes its parts out although it finished the message.
    write_control(
        &mut peer,
        Frame::Error(ErrorFrame {
            code: ErrorCode::AGENT_FAILED,
            message_id: Some(v(1)),
            reason: "no agent".into(),
        }),
    )
    .await;
    write_control(
        &mut peer,
        Frame::Cancel(Cancel {
            message_id: v(3),
            code: ErrorCode::CANCELLED,
        }),
    )
    .await;
    eventually("message 3 dropped", || {
        !session.context_keys().contains(&key(3, 0))
    })
    .await;
    assert!(session.context_keys().contains(&key(1, 0)));
    write_control(
        &mut peer,
        Frame::Error(ErrorFrame {
            code: ErrorCode::DECODE_FAILED,
            message_id: Some(v(5)),
            reason: "corrupt".into(),
        }),
    )
    .await;
    eventually("message 5 dropped", || {
        !session.context_keys().contains(&key(5, 0))
    })
    .await;
    assert_eq!(session.context_keys(), vec![key(1, 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_message_leaves_nothing_in_either_context() {
    let mut p = pair();
    let (client, server) = connect(&mut p).await;
    let mut w = within(client.open(Role::User)).await.unwrap();
    w.write_part(OutgoingPart::text(vec![1, 2, 3]))
        .await
        .unwrap();
    w.begin_text(TextStream::default()).await.unwrap();
    let mut m = within(server.recv()).await.unwrap().unwrap();
    loop {
        if let MessageEvent::PartEnd { .. } = within(m.next()).await.unwrap().unwrap() {
            break;
        }
    }
    // Part 0 is complete at both ends while the message is open.
    assert_eq!(client.context_keys(), vec![key(0, 0)]);
    assert_eq!(server.context_keys(), vec![key(0, 0)]);
    w.cancel();
    assert!(client.context_keys().is_empty());
    loop {
        match within(m.next()).await.unwrap() {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e, RecvError::Reset(ErrorCode::CANCELLED));
                break;
            }
        }
    }
    assert!(server.context_keys().is_empty());
    // And a receiver that cancels: both ends drop the message.
    let mut w = within(client.open(Role::User)).await.unwrap();
    w.write_part(OutgoingPart::text(vec![4])).await.unwrap();
    w.begin_text(TextStream::default()).await.unwrap();
    let mut m = within(server.recv()).await.unwrap().unwrap();
    loop {
        if let MessageEvent::PartEnd { .. } = within(m.next()).await.unwrap().unwrap() {
            break;
        }
    }
    m.cancel();
    while let Some(Ok(_)) = within(m.next()).await {}
    assert!(server.context_keys().is_empty());
    eventually("the sender drops the cancelled message", || {
        client.context_keys().is_empty()
    })
    .await;
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_first_frame() {
    let mut setup = Setup::new(|c| c).await;
    let (mut peer, session) = setup.raw().await;
    // On a message stream: an unknown mandatory type is UNSUPPORTED (known from its type
    // alone); an ignorable one, or any frame other than MESSAGE_HEADER, is PROTOCOL_VIOLATION.
    for (bytes, code) in [
        (vec![0x0d, 0x01, 0x00], ErrorCode::UNSUPPORTED),
        (vec![0x21, 0x01, 0x00], ErrorCode::PROTOCOL_VIOLATION),
        (cat(&[end(0)]), ErrorCode::PROTOCOL_VIOLATION),
    ] {
        assert_eq!(peer.send_raw_message(&bytes).await, Some(code.into_inner()));
        let e = next_error(&mut peer).await;
        assert_eq!((e.code, e.message_id), (code, None), "{bytes:02x?}");
    }
    drop(session);

    // On the control stream before the hello: an ignorable frame is skipped...
    let mut hello = default_hello(b"");
    hello.entropy_models = setup.models.clone();
    let (_ep, conn) = raw_connect(setup.addr, setup.pin).await;
    let (mut send, mut recv) = within(conn.open_bi()).await.unwrap();
    let mut bytes = vec![0x21, 0x02, 0xaa, 0xbb];
    bytes.extend_from_slice(&frame_bytes(&Frame::ClientHello(hello)));
    send.write_all(&bytes).await.unwrap();
    let accepted = within(setup.server.accept());
    let mut dec = frame::Decoder::new(Limits::HANDSHAKE);
    let reply = async {
        loop {
            if let Some(f) = dec.next_frame().unwrap() {
                return f;
            }
            let c = within(recv.read_chunk(65536, true)).await.unwrap().unwrap();
            dec.push(&c.bytes);
        }
    };
    let (reply, accepted) = tokio::join!(reply, accepted);
    assert!(matches!(reply, Frame::ServerHello(_)), "{reply:?}");
    accepted.unwrap();
    // ...an unknown mandatory type closes the connection with UNSUPPORTED.
    let (_ep, conn) = raw_connect(setup.addr, setup.pin).await;
    let (mut send, _recv) = within(conn.open_bi()).await.unwrap();
    send.write_all(&[0x0d, 0x01, 0x00]).await.unwrap();
    assert_eq!(closed_with(&conn).await, ErrorCode::UNSUPPORTED);
}

/// The application error code the connection was closed with.
async fn closed_with(conn: &quinn::Connection) -> ErrorCode {
    match within(conn.closed()).await {
        quinn::ConnectionError::ApplicationClosed(c) => {
            ErrorCode::from(v(c.error_code.into_inner()))
        }
        other => panic!("expected an application close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_reject_the_server_finishes_the_control_stream_then_closes() {
    let setup = Setup::new(|c| c).await;
    let (_ep, conn) = raw_connect(setup.addr, setup.pin).await;
    let (mut send, mut recv) = within(conn.open_bi()).await.unwrap();
    let hello = ClientHello {
        versions: vec![v(2)],
        ..default_hello(b"")
    };
    send.write_all(&frame_bytes(&Frame::ClientHello(hello)))
        .await
        .unwrap();
    // Everything the server sends on the control stream: one REJECT, then FIN.
    let all = within(recv.read_to_end(65536)).await.unwrap();
    let mut dec = frame::Decoder::new(Limits::HANDSHAKE);
    dec.push(&all);
    match dec.next_frame().unwrap() {
        Some(Frame::Reject(r)) => assert_eq!(r.code, ErrorCode::VERSION_UNSUPPORTED),
        other => panic!("expected a reject, got {other:?}"),
    }
    assert_eq!(dec.next_frame().unwrap(), None);
    dec.finish().unwrap();
    // Then the server closes with the reject's code.
    assert_eq!(closed_with(&conn).await, ErrorCode::VERSION_UNSUPPORTED);
    let _ = VERSION_1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uniform_part_may_carry_any_mode_but_masked() {
    let mut setup = Setup::new(|c| c).await;
    let uniform = (ModelChoice::Uniform, setup.model("unimic-entropy/uniform"));
    let adaptive = (
        ModelChoice::Adaptive,
        setup.model("unimic-entropy/adaptive-text"),
    );
    let (peer, session) = setup.raw().await;
    let ctx = SessionContext::new(1 << 20);
    let mut id = 0;
    for (model, mode) in [
        (uniform, CodingMode::Uniform),
        (uniform, CodingMode::Generic),
        (uniform, CodingMode::TextConditioned),
        (uniform, CodingMode::ImageConditioned),
        // Mode 0 on an adaptive part: decoded with the adaptive model the index names.
        (adaptive, CodingMode::Uniform),
    ] {
        let ids = [13_225u32, 11, 2_375, 0, 13_225, 11];
        let p = text_part(0, &ids, model, mode.clone(), &ctx, &[]);
        let bytes = cat(&[header(id), p[0].clone(), p[1].clone(), end(1)]);
        assert_eq!(send_finished(&peer, &bytes).await, None);
        let got = within(within(session.recv()).await.unwrap().unwrap().collect())
            .await
            .unwrap();
        assert_eq!(
            got.parts,
            vec![unimic_transport::ReceivedPart::Text(ids.to_vec())],
            "{mode:?}"
        );
        id += 2;
    }
    // Mode 2 (masked) with the uniform model: UNSUPPORTED.
    let image_tok = peer
        .hello
        .tokenizers
        .iter()
        .position(|t| t.id == "test-vq")
        .unwrap() as u64;
    let region = Region::Rects(vec![Rect {
        top: v(0),
        left: v(0),
        height: v(1),
        width: v(1),
    }]);
    let h = Frame::PartHeader(PartHeader {
        index: v(0),
        body: PartBody::Image(CodedPart {
            tokenizer: v(image_tok),
            entropy_model: v(uniform.1),
            shape: Shape {
                rows: v(1),
                cols: v(2),
            },
            token_count: v(1),
            mode: CodingMode::Masked(region),
            context: vec![],
            context_digest: ctx.digest(&[]).unwrap(),
        }),
    });
    assert_eq!(
        peer.send_raw_message(&cat(&[header(id), h])).await,
        Some(ErrorCode::UNSUPPORTED.into_inner())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_of_go_away_closes() {
    let mut setup = Setup::new(|c| c).await;
    // The raw peer sends GO_AWAY: the server finishes what is in flight and closes, NO_ERROR.
    let (mut peer, _session) = setup.raw().await;
    peer.control_send
        .write_all(&frame_bytes(&Frame::GoAway(GoAway {
            code: ErrorCode::NO_ERROR,
            reason: String::new(),
        })))
        .await
        .unwrap();
    assert_eq!(closed_with(&peer.conn).await, ErrorCode::NO_ERROR);

    // The server sends GO_AWAY: new message streams are refused with GOING_AWAY, and the server
    // leaves the close to the peer.
    let (mut peer, session) = setup.raw().await;
    within(session.go_away("bye")).await;
    peer.control_frame(|f| matches!(f, Frame::GoAway(_))).await;
    let bytes = cat(&[header(0), end(0)]);
    assert_eq!(
        peer.send_raw_message(&bytes).await,
        Some(ErrorCode::GOING_AWAY.into_inner())
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        peer.conn.close_reason().is_none(),
        "the sender of GO_AWAY closed"
    );
    peer.conn.close(0u32.into(), b"done");
    within(session.closed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_streams_open_only_after_the_hellos_and_up_to_the_negotiated_count() {
    let setup = Setup::new(|c| c).await;
    let (ep, conn) = raw_connect(setup.addr, setup.pin).await;
    // Initial limits: no unidirectional stream, one bidirectional (the control stream).
    let quick = Duration::from_millis(200);
    assert!(tokio::time::timeout(quick, conn.open_uni()).await.is_err());
    let (mut send, mut recv) = within(conn.open_bi()).await.unwrap();
    let hello = ClientHello {
        entropy_models: setup.models.clone(),
        limits: Limits {
            max_concurrent_messages: v(2),
            ..Limits::default()
        },
        ..default_hello(b"")
    };
    send.write_all(&frame_bytes(&Frame::ClientHello(hello)))
        .await
        .unwrap();
    let mut server = setup.server;
    let accepted = within(server.accept());
    let mut dec = frame::Decoder::new(Limits::HANDSHAKE);
    let reply = async {
        loop {
            if let Some(f) = dec.next_frame().unwrap() {
                return f;
            }
            let c = within(recv.read_chunk(65536, true)).await.unwrap().unwrap();
            dec.push(&c.bytes);
        }
    };
    let (reply, accepted) = tokio::join!(reply, accepted);
    let Frame::ServerHello(h) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(h.limits.max_concurrent_messages, v(2));
    let _session = accepted.unwrap();
    // MAX_STREAMS follows the hello: two message streams at once, not three.
    let mut a = within(conn.open_uni()).await.unwrap();
    let mut b = within(conn.open_uni()).await.unwrap();
    a.write_all(&frame_bytes(&header(0))).await.unwrap();
    b.write_all(&frame_bytes(&header(2))).await.unwrap();
    assert!(tokio::time::timeout(quick, conn.open_uni()).await.is_err());
    // No second bidirectional stream, ever.
    assert!(tokio::time::timeout(quick, conn.open_bi()).await.is_err());
    // A message that ends frees its stream.
    a.write_all(&frame_bytes(&end(0))).await.unwrap();
    a.finish().unwrap();
    within(conn.open_uni()).await.unwrap();
    drop(ep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_pinning_ignores_the_server_name() {
    let setup = Setup::new(|c| c).await;
    // The pin is the SHA-256 of the leaf certificate's DER bytes.
    let id = Identity::self_signed(&["localhost"]).unwrap();
    assert_eq!(CertHash::of(id.leaf()).0.len(), 32);
    // A pinned client connects whatever server name it gives (SNI is not checked).
    let client = client_with(setup.pin, |c| c);
    let mut server = setup.server;
    let (c, s) = within(async {
        tokio::join!(
            client.connect(setup.addr, "not-the-server.invalid"),
            server.accept()
        )
    })
    .await;
    c.unwrap();
    s.unwrap();
}

/// CODING.md §4.2: each stored part costs 128 budget bytes plus 4 per token, so a peer that
/// sends thousands of parts with no tokens (20 bytes each on the wire) fills the context to its
/// budget and evicts, oldest first, like any other part: it cannot grow the other end's memory
/// past `max_context_bytes`. Both ends stay in step, and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_without_tokens_cannot_grow_a_context_past_its_budget() {
    let budget = 64 * 1024;
    let limits = Limits {
        max_context_bytes: v(budget),
        ..Limits::default()
    };
    let (mut server, pin) = server_with(|c| c.with_session(session_config().with_limits(limits)));
    let addr = server.local_addr().unwrap();
    let client = client_with(pin, |c| c);
    let (c, s) =
        within(async { tokio::join!(client.connect(addr, "localhost"), server.accept()) }).await;
    let (client, server) = (c.unwrap(), s.unwrap());
    let most = (budget / Sequence::text(Vec::new()).cost()) as usize;
    assert_eq!(most, 512);
    for _ in 0..3 {
        let mut m = OutgoingMessage::new(Role::User);
        for _ in 0..400 {
            m = m.with_part(OutgoingPart::text(Vec::new()));
        }
        let sent = within(client.send(m)).await.unwrap();
        let got = within(within(server.recv()).await.unwrap().unwrap().collect())
            .await
            .unwrap();
        assert_eq!(got.parts.len(), 400);
        within(client.wait_ack(sent.message_id, unimic_protocol::AckStage::Decoded))
            .await
            .unwrap();
        assert!(server.context_keys().len() <= most);
    }
    assert_eq!(server.context_keys().len(), most);
    assert_eq!(client.context_keys(), server.context_keys());
    // A part that references the newest of them still codes against the same context.
    let last = *server.context_keys().last().unwrap();
    let m = OutgoingMessage::new(Role::User)
        .with_part(OutgoingPart::text(vec![5, 6, 7]).with_context(vec![last]));
    within(client.send(m)).await.unwrap();
    let got = within(within(server.recv()).await.unwrap().unwrap().collect())
        .await
        .unwrap();
    assert_eq!(
        got.parts,
        vec![unimic_transport::ReceivedPart::Text(vec![5, 6, 7])]
    );
}

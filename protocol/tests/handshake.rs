//! The handshake state machines: acceptance, each rejection reason, invalid server hellos and
//! out-of-order frames.

mod common;

use bytes::Bytes;
use common::*;
use unimic_protocol::handshake::{
    self, Auth, ClientEvent, HandshakeError, Negotiated, Policy, ServerEvent, VERSION_1,
};
use unimic_protocol::*;

fn policy() -> Policy {
    Policy {
        versions: vec![VERSION_1],
        tokenizers: vec![bpe(), vq16()],
        entropy_models: vec![ctx_model()],
        limits: Limits {
            max_grid_height: v(64),
            max_grid_width: v(64),
            ..Limits::default()
        },
        auth: Auth::tokens([Bytes::from_static(b"secret")]),
    }
}

/// Runs a full exchange; returns what the server decided.
fn serve(hello: ClientHello, policy: Policy) -> ServerEvent {
    let mut client = handshake::Client::new(hello);
    let mut server = handshake::Server::new(policy);
    let frame = client.poll_transmit().unwrap();
    assert!(client.poll_transmit().is_none(), "hello is sent once");
    server.on_frame(frame).unwrap()
}

fn rejected(event: ServerEvent) -> Reject {
    match event {
        ServerEvent::Rejected(r) => r,
        other => panic!("expected a reject, got {other:?}"),
    }
}

#[test]
fn accept_negotiates_minimum_limits_and_client_order() {
    let mut client = handshake::Client::new(client_hello());
    let mut server = handshake::Server::new(policy());
    let hello = client.poll_transmit().unwrap();
    // Over the wire, under the handshake limits.
    let hello = Frame::decode_exact(&hello.to_bytes(), &Limits::HANDSHAKE).unwrap();
    let ServerEvent::Accepted { hello, negotiated } = server.on_frame(hello).unwrap() else {
        panic!("not accepted");
    };
    assert!(server.is_finished());
    // Client's order (vq16, bpe), not the server's (bpe, vq16).
    assert_eq!(hello, server_hello());
    assert_eq!(negotiated.limits.max_grid_height, v(64));
    assert_eq!(
        negotiated.limits.max_frame_bytes,
        Limits::default().max_frame_bytes
    );
    let reply =
        Frame::decode_exact(&Frame::ServerHello(hello).to_bytes(), &Limits::HANDSHAKE).unwrap();
    let ClientEvent::Established(n) = client.on_frame(reply).unwrap() else {
        panic!("not established");
    };
    assert_eq!(n, negotiated);
    assert_eq!(n.tokenizer(v(1)), Some(&bpe()));
    assert_eq!(n.entropy_model(v(0)), Some(&ctx_model()));
    assert_eq!(n.tokenizer(v(2)), None);
    assert!(client.is_finished());
    assert_eq!(
        client.on_frame(Frame::GoAway(GoAway {
            code: ErrorCode::NO_ERROR,
            reason: String::new()
        })),
        Err(HandshakeError::Finished)
    );
}

#[test]
fn partial_model_overlap_is_accepted() {
    let mut hello = client_hello();
    hello.tokenizers.push(ModelInfo {
        id: "other".into(),
        version: v(9),
        hash: [9; 32],
    });
    let ServerEvent::Accepted { hello: reply, .. } = serve(hello, policy()) else {
        panic!("not accepted");
    };
    assert_eq!(reply.tokenizers, vec![vq16(), bpe()]);
}

#[test]
fn reject_version() {
    let mut hello = client_hello();
    hello.versions = vec![v(7), v(8)];
    let r = rejected(serve(hello, policy()));
    assert_eq!(r.code, ErrorCode::VERSION_UNSUPPORTED);
    assert_eq!(r.supported_versions, vec![VERSION_1]);
}

#[test]
fn version_preference_is_the_clients() {
    let mut p = policy();
    p.versions = vec![v(1), v(2)];
    let mut hello = client_hello();
    hello.versions = vec![v(2), v(1)];
    let ServerEvent::Accepted { hello: reply, .. } = serve(hello, p) else {
        panic!("not accepted");
    };
    assert_eq!(reply.version, v(2));
}

#[test]
fn reject_auth() {
    let mut hello = client_hello();
    hello.token = Bytes::from_static(b"secreT");
    let r = rejected(serve(hello.clone(), policy()));
    assert_eq!(r.code, ErrorCode::UNAUTHORIZED);
    hello.token = Bytes::new();
    assert_eq!(
        rejected(serve(hello.clone(), policy())).code,
        ErrorCode::UNAUTHORIZED
    );
    // A check function.
    let mut p = policy();
    p.auth = Auth::Check(std::sync::Arc::new(|t: &[u8]| t.is_empty()));
    assert!(matches!(serve(hello, p), ServerEvent::Accepted { .. }));
}

#[test]
fn reject_limits_below_floor() {
    let mut hello = client_hello();
    hello.limits.max_frame_bytes = v(100);
    let r = rejected(serve(hello, policy()));
    assert_eq!(r.code, ErrorCode::LIMITS_UNACCEPTABLE);
    assert_eq!(r.reason, "max_frame_bytes");
}

#[test]
fn reject_missing_model_lists_what_is_missing() {
    let mut hello = client_hello();
    let wrong_hash = ModelInfo {
        hash: [0x12; 32],
        ..vq16()
    };
    hello.tokenizers = vec![wrong_hash.clone()];
    let r = rejected(serve(hello, policy()));
    assert_eq!(r.code, ErrorCode::MODEL_MISSING);
    assert_eq!(r.missing_models, vec![wrong_hash]);
    // Round trip of the reject itself.
    let f = Frame::Reject(r);
    assert_eq!(
        Frame::decode_exact(&f.to_bytes(), &Limits::HANDSHAKE).unwrap(),
        f
    );
}

#[test]
fn client_reports_reject() {
    let mut client = handshake::Client::new(client_hello());
    client.poll_transmit().unwrap();
    let err = client.on_frame(Frame::Reject(reject())).unwrap_err();
    assert_eq!(err, HandshakeError::Rejected(reject()));
    assert_eq!(err.error_code(), ErrorCode::VERSION_UNSUPPORTED);
    assert!(client.is_finished());
}

fn client_check(mutate: impl FnOnce(&mut ServerHello)) -> HandshakeError {
    let mut client = handshake::Client::new(client_hello());
    client.poll_transmit().unwrap();
    let mut h = server_hello();
    mutate(&mut h);
    client.on_frame(Frame::ServerHello(h)).unwrap_err()
}

#[test]
fn client_refuses_invalid_server_hellos() {
    assert_eq!(
        client_check(|h| h.version = v(2)),
        HandshakeError::InvalidServerHello("version not offered")
    );
    assert!(matches!(
        client_check(|h| h.tokenizers.reverse()),
        HandshakeError::InvalidServerHello(r) if r.starts_with("tokenizer table")
    ));
    assert!(matches!(
        client_check(|h| h.entropy_models.push(vq16())),
        HandshakeError::InvalidServerHello(r) if r.starts_with("entropy model table")
    ));
    let e = client_check(|h| h.limits.max_message_bytes = VarInt::MAX);
    assert_eq!(
        e,
        HandshakeError::InvalidServerHello("a limit is above the client's")
    );
    assert_eq!(e.error_code(), ErrorCode::LIMITS_UNACCEPTABLE);
    assert_eq!(
        client_check(|h| h.limits.max_grid_width = v(0)),
        HandshakeError::InvalidServerHello("a limit is below the protocol floor")
    );
}

#[test]
fn out_of_order_frames() {
    // The client must send first.
    let mut client = handshake::Client::new(client_hello());
    assert!(matches!(
        client.on_frame(Frame::ServerHello(server_hello())),
        Err(HandshakeError::UnexpectedFrame {
            frame: "SERVER_HELLO",
            ..
        })
    ));
    // A client receiving a client hello.
    let mut client = handshake::Client::new(client_hello());
    client.poll_transmit();
    let e = client
        .on_frame(Frame::ClientHello(client_hello()))
        .unwrap_err();
    assert!(matches!(
        e,
        HandshakeError::UnexpectedFrame {
            frame: "CLIENT_HELLO",
            ..
        }
    ));
    assert_eq!(e.error_code(), ErrorCode::PROTOCOL_VIOLATION);
    // A server receiving a message frame first.
    let mut server = handshake::Server::new(policy());
    assert!(matches!(
        server.on_frame(Frame::MessageEnd(MessageEnd { part_count: v(0) })),
        Err(HandshakeError::UnexpectedFrame {
            frame: "MESSAGE_END",
            ..
        })
    ));
    assert_eq!(
        server.on_frame(Frame::ClientHello(client_hello())),
        Err(HandshakeError::Finished)
    );
    // A second client hello after acceptance.
    let mut server = handshake::Server::new(policy());
    server.on_frame(Frame::ClientHello(client_hello())).unwrap();
    assert_eq!(
        server.on_frame(Frame::ClientHello(client_hello())),
        Err(HandshakeError::Finished)
    );
}

#[test]
fn extension_frames_are_ignored_during_the_handshake() {
    let ext = Frame::Extension {
        ty: v(0x21),
        payload: Bytes::from_static(b"x"),
    };
    let mut server = handshake::Server::new(policy());
    assert_eq!(server.on_frame(ext.clone()), Ok(ServerEvent::Ignored));
    assert!(!server.is_finished());
    let ServerEvent::Accepted { hello, negotiated } =
        server.on_frame(Frame::ClientHello(client_hello())).unwrap()
    else {
        panic!()
    };
    let mut client = handshake::Client::new(client_hello());
    client.poll_transmit();
    assert_eq!(client.on_frame(ext), Ok(ClientEvent::Ignored));
    assert_eq!(
        client.on_frame(Frame::ServerHello(hello)),
        Ok(ClientEvent::Established(Negotiated { ..negotiated }))
    );
}

#[test]
fn auth_debug_does_not_print_tokens() {
    let s = format!("{:?}", Auth::tokens([b"hunter2".to_vec()]));
    assert!(!s.contains("hunter2"), "{s}");
}

//! The handshake state machines driven by an `Arbitrary` sequence of operations.
//!
//! A client and a server with arbitrary offers and policies exchange frames through an encoder
//! and decoder (as on the wire), interleaved with injected arbitrary frames. The target checks
//! that nothing panics, that the server's decision follows the policy, that an honest server
//! hello is accepted by the client, that an established session respects both offers, and that a
//! finished machine stays finished.

use arbitrary::{Arbitrary, Unstructured};
use unimic_protocol::handshake::{
    self, Auth, ClientEvent, ClientHello, HandshakeError, ModelInfo, Policy, ServerEvent,
};
use unimic_protocol::{Decode, Encode, ErrorCode, Frame, Limits, VarInt};

/// One step.
#[derive(Debug, Arbitrary)]
enum Op {
    /// The client emits its hello, which goes to the server's inbox.
    ClientTransmit,
    /// The server handles the oldest frame in its inbox.
    ServerReceive,
    /// The client handles the oldest frame in its inbox.
    ClientReceive,
    /// An arbitrary frame is delivered to the server.
    InjectServer(Frame),
    /// An arbitrary frame is delivered to the client.
    InjectClient(Frame),
}

#[derive(Debug, Arbitrary)]
struct Input {
    hello: ClientHello,
    server_versions: Vec<VarInt>,
    server_tokenizers: Vec<ModelInfo>,
    server_entropy_models: Vec<ModelInfo>,
    server_limits: Limits,
    /// Tokens the server accepts (`None`: no authentication).
    server_tokens: Option<Vec<Vec<u8>>>,
    /// Share models and versions with the client so that acceptance is reachable.
    share: bool,
    ops: Vec<Op>,
}

/// Sends `frame` over the wire: encode, then decode under the handshake limits.
fn wire(frame: &Frame) -> Option<Frame> {
    let bytes = frame.to_bytes();
    match Frame::decode_exact(&bytes, &Limits::HANDSHAKE) {
        Ok(f) => {
            assert_eq!(&f, frame, "frame changed on the wire");
            Some(f)
        }
        // Arbitrary values may break the bounds the decoder enforces; a real peer would close.
        Err(_) => None,
    }
}

/// What one run reached, for checking that the seeds exercise the interesting paths.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reached {
    /// The server accepted a client hello.
    pub accepted: bool,
    /// The server rejected a client hello.
    pub rejected: bool,
    /// The client established a session.
    pub established: bool,
}

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    run_reached(data);
}

/// Runs the target on one input and says what it reached.
pub fn run_reached(data: &[u8]) -> Reached {
    let mut reached = Reached::default();
    let mut u = Unstructured::new(data);
    let Ok(mut input) = Input::arbitrary(&mut u) else {
        return reached;
    };
    if input.share {
        // Make acceptance likely: common version and models, an accepted token, legal limits.
        input.hello.limits = raise_to_floor(input.hello.limits);
        input.server_limits = raise_to_floor(input.server_limits);
        if let Some(tokens) = input.server_tokens.as_mut() {
            tokens.push(input.hello.token.to_vec());
        }
        input
            .server_versions
            .extend(input.hello.versions.first().copied());
        input
            .server_tokenizers
            .extend(input.hello.tokenizers.iter().take(2).cloned());
        input
            .server_entropy_models
            .extend(input.hello.entropy_models.iter().take(2).cloned());
    }
    let tokens = input.server_tokens.clone();
    let policy = Policy {
        versions: input.server_versions.clone(),
        tokenizers: input.server_tokenizers.clone(),
        entropy_models: input.server_entropy_models.clone(),
        limits: input.server_limits,
        auth: match &tokens {
            None => Auth::None,
            Some(list) => Auth::tokens(list.iter().cloned()),
        },
    };
    let mut client = handshake::Client::new(input.hello.clone());
    let mut server = handshake::Server::new(policy);
    let mut to_server: Vec<Frame> = Vec::new();
    let mut to_client: Vec<Frame> = Vec::new();
    let mut honest_reply: Option<handshake::ServerHello> = None;

    for op in input.ops {
        match op {
            Op::ClientTransmit => {
                let was_started = client.poll_transmit();
                if let Some(f) = was_started {
                    assert!(matches!(f, Frame::ClientHello(ref h) if *h == input.hello));
                    to_server.extend(wire(&f));
                }
            }
            Op::InjectServer(f) => to_server.push(f),
            Op::InjectClient(f) => {
                honest_reply = None;
                to_client.push(f)
            }
            Op::ServerReceive => {
                if to_server.is_empty() {
                    continue;
                }
                let frame = to_server.remove(0);
                let finished_before = server.is_finished();
                let result = server.on_frame(frame.clone());
                if finished_before {
                    assert_eq!(result, Err(HandshakeError::Finished));
                    continue;
                }
                match result {
                    Ok(ServerEvent::Accepted { hello, negotiated }) => {
                        reached.accepted = true;
                        let Frame::ClientHello(offer) = &frame else {
                            panic!("accepted without a client hello");
                        };
                        check_accept(offer, server.policy(), &hello, &negotiated);
                        let reply = Frame::ServerHello(hello.clone());
                        if let Some(f) = wire(&reply) {
                            if *offer == input.hello && to_client.is_empty() {
                                honest_reply = Some(hello);
                            }
                            to_client.push(f);
                        }
                    }
                    Ok(ServerEvent::Rejected(reject)) => {
                        reached.rejected = true;
                        let Frame::ClientHello(offer) = &frame else {
                            panic!("rejected without a client hello");
                        };
                        check_reject(offer, server.policy(), &reject.code);
                        to_client.extend(wire(&Frame::Reject(reject)));
                    }
                    Ok(ServerEvent::Ignored) => {
                        assert!(matches!(frame, Frame::Extension { .. }));
                        assert!(!server.is_finished());
                    }
                    Ok(other) => panic!("unknown event {other:?}"),
                    Err(e) => {
                        assert!(matches!(e, HandshakeError::UnexpectedFrame { .. }), "{e:?}");
                        assert!(server.is_finished());
                    }
                }
            }
            Op::ClientReceive => {
                if to_client.is_empty() {
                    continue;
                }
                let frame = to_client.remove(0);
                let honest = honest_reply.take();
                let finished_before = client.is_finished();
                let result = client.on_frame(frame.clone());
                if finished_before {
                    assert_eq!(result, Err(HandshakeError::Finished));
                    continue;
                }
                match result {
                    Ok(ClientEvent::Established(n)) => {
                        reached.established = true;
                        let hello = client.hello();
                        assert!(hello.versions.contains(&n.version));
                        assert!(n.limits.within(&hello.limits));
                        assert!(n.tokenizers.iter().all(|m| hello.tokenizers.contains(m)));
                        assert!(n
                            .entropy_models
                            .iter()
                            .all(|m| hello.entropy_models.contains(m)));
                        assert!(client.is_finished());
                    }
                    Ok(ClientEvent::Ignored) => assert!(matches!(frame, Frame::Extension { .. })),
                    Ok(other) => panic!("unknown event {other:?}"),
                    Err(HandshakeError::InvalidServerHello(reason)) => {
                        // An honest server's reply is refused only for its own floor breach.
                        if honest.is_some() {
                            assert!(reason.contains("floor"), "honest hello refused: {reason}");
                        }
                    }
                    Err(HandshakeError::Rejected(r)) => {
                        assert!(matches!(frame, Frame::Reject(ref x) if *x == r))
                    }
                    Err(HandshakeError::UnexpectedFrame { .. }) => {}
                    Err(e) => panic!("unexpected error {e:?}"),
                }
            }
        }
    }
    reached
}

/// Each field at least the protocol floor.
fn raise_to_floor(l: Limits) -> Limits {
    let f = Limits::FLOOR;
    Limits {
        max_frame_bytes: l.max_frame_bytes.max(f.max_frame_bytes),
        max_message_bytes: l.max_message_bytes.max(f.max_message_bytes),
        max_grid_height: l.max_grid_height.max(f.max_grid_height),
        max_grid_width: l.max_grid_width.max(f.max_grid_width),
        max_context_bytes: l.max_context_bytes.max(f.max_context_bytes),
        max_concurrent_messages: l.max_concurrent_messages.max(f.max_concurrent_messages),
    }
}

fn check_accept(
    offer: &ClientHello,
    policy: &Policy,
    hello: &handshake::ServerHello,
    negotiated: &handshake::Negotiated,
) {
    assert!(offer.versions.contains(&hello.version));
    assert!(policy.versions.contains(&hello.version));
    assert_eq!(hello.limits, offer.limits.negotiate(&policy.limits));
    assert!(policy.auth.accepts(&offer.token));
    for m in hello.tokenizers.iter().chain(&hello.entropy_models) {
        assert!(policy.tokenizers.contains(m) || policy.entropy_models.contains(m));
    }
    assert_eq!(negotiated.version, hello.version);
    assert_eq!(negotiated.tokenizers, hello.tokenizers);
    assert_eq!(negotiated.limits, hello.limits);
}

fn check_reject(offer: &ClientHello, policy: &Policy, code: &ErrorCode) {
    let common_version = offer.versions.iter().any(|v| policy.versions.contains(v));
    match *code {
        ErrorCode::VERSION_UNSUPPORTED => assert!(!common_version),
        ErrorCode::UNAUTHORIZED => {
            assert!(common_version);
            assert!(!policy.auth.accepts(&offer.token));
        }
        ErrorCode::LIMITS_UNACCEPTABLE => assert!(offer.limits.below_floor().is_some()),
        ErrorCode::MODEL_MISSING => {
            let none_tok = !offer.tokenizers.is_empty()
                && !offer
                    .tokenizers
                    .iter()
                    .any(|m| policy.tokenizers.contains(m));
            let none_ent = !offer.entropy_models.is_empty()
                && !offer
                    .entropy_models
                    .iter()
                    .any(|m| policy.entropy_models.contains(m));
            assert!(none_tok || none_ent);
        }
        other => panic!("unexpected reject code {other:?}"),
    }
}

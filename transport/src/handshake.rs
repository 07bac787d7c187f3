//! Drives the protocol's sans-IO handshake state machines over the first bidirectional stream
//! (the control stream), as docs/PROTOCOL.md prescribes.
//!
//! The client opens the control stream and sends its hello; the server answers with its hello or
//! a reject, after which it closes the connection with the reject's code. Frames are read with
//! [`Limits::HANDSHAKE`] until the hellos are exchanged. The callers bound the whole exchange by
//! the configured handshake timeout.

use unimic_protocol::handshake::{
    self, ClientEvent, ClientHello, HandshakeError, Negotiated, Policy, ServerEvent,
};
use unimic_protocol::{ErrorCode, Frame, Limits};

use crate::error::ConnectError;
use crate::wire::{self, FrameReader, ReadFrameError};

/// The control stream once the handshake is done.
pub(crate) struct Control {
    pub send: quinn::SendStream,
    pub reader: FrameReader,
    pub negotiated: Negotiated,
}

async fn write(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), ConnectError> {
    send.write_all(&wire::frame_bytes(frame))
        .await
        .map_err(|e| match e {
            quinn::WriteError::ConnectionLost(c) => ConnectError::Connection(c),
            other => ConnectError::Stream(other.to_string()),
        })
}

fn read_failed(conn: &quinn::Connection, e: ReadFrameError) -> ConnectError {
    match e {
        ReadFrameError::Decode(d) => {
            wire::close(conn, d.error_code(), &d.to_string());
            ConnectError::Protocol {
                code: d.error_code(),
                reason: d.to_string(),
            }
        }
        ReadFrameError::Read(quinn::ReadError::ConnectionLost(c)) => ConnectError::Connection(c),
        ReadFrameError::Read(other) => ConnectError::Stream(other.to_string()),
    }
}

/// The client side: open the control stream, send the hello, wait for the answer.
pub(crate) async fn client(
    conn: &quinn::Connection,
    hello: ClientHello,
) -> Result<Control, ConnectError> {
    let (mut send, recv) = conn.open_bi().await?;
    let mut machine = handshake::Client::new(hello);
    while let Some(frame) = machine.poll_transmit() {
        write(&mut send, &frame).await?;
    }
    let mut reader = FrameReader::new(recv, Limits::HANDSHAKE);
    loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => {
                // The server finished the stream without an answer; its close (if any) says why.
                return Err(match conn.close_reason() {
                    Some(reason) => ConnectError::Connection(reason),
                    None => ConnectError::Protocol {
                        code: ErrorCode::PROTOCOL_VIOLATION,
                        reason: "control stream ended before the server hello".into(),
                    },
                });
            }
            Err(e) => return Err(read_failed(conn, e)),
        };
        match machine.on_frame(frame) {
            Ok(ClientEvent::Established(negotiated)) => {
                reader.set_limits(negotiated.limits);
                return Ok(Control {
                    send,
                    reader,
                    negotiated,
                });
            }
            Ok(_) => continue,
            Err(HandshakeError::Rejected(r)) => {
                wire::close(conn, r.code, &r.reason);
                return Err(ConnectError::Rejected {
                    code: r.code,
                    reason: r.reason,
                    missing_models: r.missing_models,
                });
            }
            Err(e) => {
                let code = e.error_code();
                wire::close(conn, code, &e.to_string());
                return Err(ConnectError::Protocol {
                    code,
                    reason: e.to_string(),
                });
            }
        }
    }
}

/// The server side: accept the control stream, read the hello, answer. On a reject the reject
/// frame is sent, given a moment to arrive, and the connection closed with its code.
pub(crate) async fn server(
    conn: &quinn::Connection,
    policy: Policy,
) -> Result<Control, ConnectError> {
    let (mut send, recv) = conn.accept_bi().await?;
    let mut machine = handshake::Server::new(policy);
    let mut reader = FrameReader::new(recv, Limits::HANDSHAKE);
    loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => {
                let reason = "control stream ended before the client hello";
                wire::close(conn, ErrorCode::PROTOCOL_VIOLATION, reason);
                return Err(ConnectError::Protocol {
                    code: ErrorCode::PROTOCOL_VIOLATION,
                    reason: reason.into(),
                });
            }
            Err(e) => return Err(read_failed(conn, e)),
        };
        match machine.on_frame(frame) {
            Ok(ServerEvent::Accepted { hello, negotiated }) => {
                write(&mut send, &Frame::ServerHello(hello)).await?;
                reader.set_limits(negotiated.limits);
                return Ok(Control {
                    send,
                    reader,
                    negotiated,
                });
            }
            Ok(ServerEvent::Rejected(reject)) => {
                let code = reject.code;
                let reason = reject.reason.clone();
                let missing = reject.missing_models.clone();
                write(&mut send, &Frame::Reject(reject)).await?;
                // Let the reject arrive before the close overtakes it (bounded wait).
                let _ = send.finish();
                let _ = tokio::time::timeout(std::time::Duration::from_millis(500), send.stopped())
                    .await;
                wire::close(conn, code, &reason);
                return Err(ConnectError::Rejected {
                    code,
                    reason,
                    missing_models: missing,
                });
            }
            Ok(_) => continue,
            Err(e) => {
                let code = e.error_code();
                wire::close(conn, code, &e.to_string());
                return Err(ConnectError::Protocol {
                    code,
                    reason: e.to_string(),
                });
            }
        }
    }
}

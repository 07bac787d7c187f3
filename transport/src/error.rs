//! Typed errors, one enum per operation. Each knows the registry code
//! ([`ErrorCode`]) the peer is (or was) told.

use thiserror::Error;
use unimic_protocol::{ErrorCode, ModelInfo};

use crate::tls::TlsError;

/// Why a [`Server`](crate::Server) or [`Client`](crate::Client) endpoint could not be created.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The TLS configuration was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("binding the UDP socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a connection did not produce a [`Session`](crate::Session).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// quinn refused to start the connection (bad server name, endpoint stopping).
    #[error("starting the connection: {0}")]
    Start(#[from] quinn::ConnectError),
    /// The QUIC connection failed or was closed (TLS failure, peer close, idle timeout).
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The server rejected the handshake.
    #[error("rejected by the server: {code} ({reason}){}", missing_list(.missing_models))]
    Rejected {
        /// The reject code (`VERSION_UNSUPPORTED`, `MODEL_MISSING`, `UNAUTHORIZED`, ...).
        code: ErrorCode,
        /// The server's reason.
        reason: String,
        /// The offered models the server does not hold (for `MODEL_MISSING`).
        missing_models: Vec<ModelInfo>,
    },
    /// The peer broke the handshake (malformed or unexpected frames).
    #[error("handshake: {reason}")]
    Protocol {
        /// The code the connection was closed with.
        code: ErrorCode,
        /// What went wrong.
        reason: String,
    },
    /// The handshake did not finish in time.
    #[error("the handshake did not finish within the timeout")]
    Timeout,
    /// A stream operation failed during the handshake.
    #[error("handshake stream: {0}")]
    Stream(String),
}

fn missing_list(models: &[ModelInfo]) -> String {
    if models.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
    format!("; missing: {}", names.join(", "))
}

impl ConnectError {
    /// The registry code of the failure, where there is one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ConnectError::Rejected { code, .. } | ConnectError::Protocol { code, .. } => {
                Some(*code)
            }
            ConnectError::Timeout => Some(ErrorCode::TIMEOUT),
            ConnectError::Connection(quinn::ConnectionError::ApplicationClosed(c)) => {
                Some(ErrorCode::from(unimic_protocol::VarInt::saturating(
                    c.error_code.into_inner(),
                )))
            }
            _ => None,
        }
    }
}

/// Why a message could not be sent.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SendError {
    /// The connection is closed.
    #[error("connection closed: {0}")]
    Closed(#[from] quinn::ConnectionError),
    /// The peer (or this side) announced go-away: no new messages.
    #[error("the session is going away")]
    GoingAway,
    /// The peer stopped the message stream (usually `CANCELLED`).
    #[error("the peer stopped the message with {0}")]
    Stopped(ErrorCode),
    /// The message was cancelled by this side.
    #[error("the message was cancelled")]
    Cancelled,
    /// The message or a part is above a negotiated limit.
    #[error("{what} is {value}, above the negotiated limit of {limit}")]
    Limit {
        /// What is too large.
        what: &'static str,
        /// Its size.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// The part asks for a tokenizer or entropy model that the handshake did not agree on.
    #[error("not negotiated in the handshake: {0}")]
    NotNegotiated(String),
    /// The codec could not code a part (unknown context reference, id out of range, ...).
    #[error("coding a part: {0}")]
    Codec(#[from] unimic_codec::part::PartError),
    /// The caller used the message writer out of order (a chunk outside a part, ...).
    #[error("invalid use: {0}")]
    Usage(&'static str),
    /// Coding on the blocking pool did not finish (the task panicked or the runtime is
    /// shutting down).
    #[error("coding task failed: {0}")]
    Task(String),
}

impl SendError {
    /// The registry code that describes this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            SendError::Closed(_) => ErrorCode::INTERNAL,
            SendError::GoingAway => ErrorCode::GOING_AWAY,
            SendError::Stopped(c) => *c,
            SendError::Cancelled => ErrorCode::CANCELLED,
            SendError::Limit { .. } => ErrorCode::LIMIT_EXCEEDED,
            SendError::NotNegotiated(_) => ErrorCode::MODEL_MISSING,
            SendError::Codec(_) | SendError::Usage(_) | SendError::Task(_) => ErrorCode::INTERNAL,
        }
    }
}

impl From<quinn::WriteError> for SendError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(code) => SendError::Stopped(ErrorCode::from(
                unimic_protocol::VarInt::saturating(code.into_inner()),
            )),
            quinn::WriteError::ConnectionLost(c) => SendError::Closed(c),
            quinn::WriteError::ClosedStream | quinn::WriteError::ZeroRttRejected => {
                SendError::Cancelled
            }
        }
    }
}

/// Why an incoming message failed. The server keeps serving: only this message is lost.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum RecvError {
    /// The message stream broke the format or a limit; the stream was stopped with `code` and the
    /// peer told in an Error frame.
    #[error("{code}: {reason}")]
    Protocol {
        /// The registry code.
        code: ErrorCode,
        /// What went wrong.
        reason: String,
    },
    /// The sender reset the stream (for example `CANCELLED`).
    #[error("the sender reset the message with {0}")]
    Reset(ErrorCode),
    /// This side cancelled the message.
    #[error("the message was cancelled here")]
    Cancelled,
    /// The connection closed before the message ended.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
}

impl RecvError {
    /// The registry code.
    pub fn code(&self) -> ErrorCode {
        match self {
            RecvError::Protocol { code, .. } => *code,
            RecvError::Reset(c) => *c,
            RecvError::Cancelled => ErrorCode::CANCELLED,
            RecvError::ConnectionLost(_) => ErrorCode::INTERNAL,
        }
    }
}

/// Why a session ended, as [`Session::recv`](crate::Session::recv) reports it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError {
    /// The peer or this side closed the connection with an error code.
    #[error("closed with {code}: {reason}")]
    Closed {
        /// The code.
        code: ErrorCode,
        /// The reason given.
        reason: String,
    },
    /// The connection was lost (timeout, reset, transport error).
    #[error("connection lost: {0}")]
    Lost(String),
}

impl SessionError {
    /// The registry code.
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::Closed { code, .. } => *code,
            SessionError::Lost(_) => ErrorCode::INTERNAL,
        }
    }

    pub(crate) fn from_connection(e: &quinn::ConnectionError) -> Option<Self> {
        match e {
            quinn::ConnectionError::ApplicationClosed(c) => {
                let code = ErrorCode::from(unimic_protocol::VarInt::saturating(
                    c.error_code.into_inner(),
                ));
                if code == ErrorCode::NO_ERROR {
                    None
                } else {
                    Some(SessionError::Closed {
                        code,
                        reason: String::from_utf8_lossy(&c.reason).into_owned(),
                    })
                }
            }
            quinn::ConnectionError::LocallyClosed => None,
            other => Some(SessionError::Lost(other.to_string())),
        }
    }
}

//! [`ChatError`]: what can go wrong in a conversation.

use unimic_transport::{ConnectError, EndpointError, ErrorCode, RecvError, SendError};

/// Why connecting, sending a turn or receiving its reply failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    /// The endpoint could not be set up (socket, TLS configuration).
    #[error("endpoint: {0}")]
    Endpoint(#[from] EndpointError),
    /// Connecting or the handshake failed (wrong certificate pin, token refused, timeout, …).
    #[error("connecting: {0}")]
    Connect(#[from] ConnectError),
    /// Sending the turn failed.
    #[error("sending: {0}")]
    Send(#[from] SendError),
    /// Receiving the reply failed.
    #[error("receiving the reply: {0}")]
    Recv(#[from] RecvError),
    /// The server's agent could not answer the turn (an ERROR `AGENT_FAILED`, or another code,
    /// naming the turn).
    #[error("the agent failed: {reason} ({code})")]
    Agent {
        /// The error code the server sent.
        code: ErrorCode,
        /// Its reason.
        reason: String,
    },
    /// The reply was cancelled.
    #[error("the reply was cancelled")]
    Cancelled,
    /// The session has ended (the server closed it, went away, or stopped answering).
    #[error("the session has ended: {0}")]
    Closed(String),
    /// Nothing arrived within the configured time.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The content could not be prepared (tokenizer, text decoding, …).
    #[error("{0}")]
    Content(String),
}

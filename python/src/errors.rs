//! Failures as Python exceptions: every error this module raises is an instance of a class in
//! `unimic.errors` (all subclasses of `unimic.errors.UnimicError`), made from a [`Failure`] that
//! names the class, the message and the registry code where there is one. Failures are built
//! without the GIL (in Rust futures) and become `PyErr`s when the result is handed to Python.

use pyo3::prelude::*;
use pyo3::types::PyDict;
use unimic_chat::ChatError;
use unimic_transport::{ConnectError, ErrorCode, SendError};

/// A failure to raise in Python as `unimic.errors.<class>(message, code=code)`.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The class name in `unimic.errors`.
    pub class: &'static str,
    /// The message.
    pub message: String,
    /// The registry code (`UNAUTHORIZED`, `AGENT_FAILED`, ...), when the failure has one.
    pub code: Option<String>,
}

impl Failure {
    /// A failure of `class` with `message` and no code.
    pub fn new(class: &'static str, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
            code: None,
        }
    }

    /// `ContentError`: the input is not something this can send or code.
    pub fn content(message: impl Into<String>) -> Self {
        Self::new("ContentError", message)
    }

    /// `CodecError`: coding or decoding failed, or the models are missing or different.
    pub fn codec(message: impl Into<String>) -> Self {
        Self::new("CodecError", message)
    }

    /// `ClosedError`: the client, server or session is closed.
    pub fn closed(message: impl Into<String>) -> Self {
        Self::new("ClosedError", message)
    }

    fn with_code(mut self, code: ErrorCode) -> Self {
        self.code = Some(code.name().map_or_else(|| code.to_string(), str::to_string));
        self
    }

    /// The Python exception.
    pub fn into_pyerr(self, py: Python<'_>) -> PyErr {
        let make = || -> PyResult<PyErr> {
            let class = py.import("unimic.errors")?.getattr(self.class)?;
            let kwargs = PyDict::new(py);
            kwargs.set_item("code", self.code.as_deref())?;
            let exc = class.call((self.message.as_str(),), Some(&kwargs))?;
            Ok(PyErr::from_value(exc))
        };
        make().unwrap_or_else(|e| e)
    }
}

impl From<ChatError> for Failure {
    fn from(e: ChatError) -> Self {
        let message = e.to_string();
        match e {
            ChatError::Endpoint(_) => Failure::new("ConnectError", message),
            ChatError::Connect(c) => {
                let code = c.code();
                let f = match c {
                    ConnectError::Timeout => Failure::new("TimeoutError", message),
                    _ => Failure::new("ConnectError", message),
                };
                match code {
                    Some(code) => f.with_code(code),
                    None => f,
                }
            }
            ChatError::Send(s) => {
                let code = s.code();
                let f = match s {
                    SendError::Closed(_) | SendError::GoingAway => Failure::closed(message),
                    SendError::Limit { .. }
                    | SendError::NotNegotiated(_)
                    | SendError::Codec(_)
                    | SendError::Usage(_) => Failure::content(message),
                    SendError::Cancelled | SendError::Stopped(_) => {
                        Failure::new("ReplyCancelledError", message)
                    }
                    _ => Failure::new("TransportError", message),
                };
                f.with_code(code)
            }
            ChatError::Recv(r) => {
                let code = r.code();
                Failure::new("TransportError", message).with_code(code)
            }
            ChatError::Agent { code, .. } => Failure::new("AgentError", message).with_code(code),
            ChatError::Cancelled => Failure::new("ReplyCancelledError", message),
            ChatError::Closed(_) => Failure::closed(message),
            ChatError::Timeout(_) => Failure::new("TimeoutError", message),
            ChatError::Content(_) => Failure::content(message),
            _ => Failure::new("UnimicError", message),
        }
    }
}

/// Converts a [`Failure`] result into a `PyResult` (with the GIL).
pub trait IntoPyResult<T> {
    /// The `PyResult`.
    fn py(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Failure> {
    fn py(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|f| f.into_pyerr(py))
    }
}

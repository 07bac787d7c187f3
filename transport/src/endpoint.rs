//! [`Server`] and [`Client`]: QUIC endpoints that yield [`Session`]s once the handshake is done.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;
use unimic_protocol::handshake::{ClientHello, Policy, VERSION_1};
use unimic_protocol::ErrorCode;

use crate::config::{ClientConfig, ServerConfig, SessionConfig};
use crate::error::{ConnectError, EndpointError};
use crate::handshake;
use crate::models::entropy_table;
use crate::session::{Session, Side};
use crate::wire;

/// A unimic server: binds a UDP socket, runs the handshake of every incoming connection
/// concurrently, and hands out established sessions through [`accept`](Self::accept).
///
/// # Tasks
/// One accept task per server (aborted when the `Server` is dropped) and one task per handshake
/// in progress, bounded by [`ServerConfig::max_pending_handshakes`]. A connection whose handshake
/// fails is closed with the documented code and logged; the server keeps serving the others.
pub struct Server {
    endpoint: quinn::Endpoint,
    sessions: mpsc::Receiver<Session>,
    accept_task: tokio::task::JoinHandle<()>,
    cert_hash: crate::tls::CertHash,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

fn policy(session: &SessionConfig, auth: unimic_protocol::handshake::Auth) -> Policy {
    let codec = unimic_codec::part::PartCodec::new(session.codec.clone());
    Policy {
        versions: vec![VERSION_1],
        tokenizers: session.tokenizers.iter().map(|t| t.info.clone()).collect(),
        entropy_models: entropy_table(&codec).into_iter().map(|e| e.info).collect(),
        limits: session.limits,
        auth,
    }
}

impl Server {
    /// Binds the endpoint and starts accepting connections. Must be called inside a tokio
    /// runtime.
    pub fn bind(config: ServerConfig) -> Result<Server, EndpointError> {
        let crypto = config.tls.quic_config()?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server_config.transport_config(Arc::new(config.quic.transport(1)));
        let endpoint = quinn::Endpoint::server(server_config, config.bind)?;
        let cert_hash = config.tls.identity.cert_hash();
        let (tx, rx) = mpsc::channel(64);
        let span = tracing::info_span!("unimic.server", addr = %endpoint.local_addr()?);
        let accept_task = tokio::spawn(accept_loop(endpoint.clone(), config, tx).instrument(span));
        Ok(Server {
            endpoint,
            sessions: rx,
            accept_task,
            cert_hash,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The SHA-256 of the server certificate, for clients to pin in development mode.
    pub fn cert_hash(&self) -> crate::tls::CertHash {
        self.cert_hash
    }

    /// The next established session; `None` once the server is closed.
    ///
    /// Cancel safety: safe.
    pub async fn accept(&mut self) -> Option<Session> {
        self.sessions.recv().await
    }

    /// Stops accepting and closes every connection with `GOING_AWAY`.
    pub fn close(&self) {
        self.accept_task.abort();
        self.endpoint
            .close(wire::quic_code(ErrorCode::GOING_AWAY), b"server closing");
    }

    /// Waits until every connection is closed (after [`close`](Self::close)).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, config: ServerConfig, tx: mpsc::Sender<Session>) {
    let permits = Arc::new(Semaphore::new(config.max_pending_handshakes.max(1)));
    let config = Arc::new(config);
    let mut handshakes = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            // Reap finished handshakes so the set does not grow.
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "too many handshakes in progress; refusing");
            incoming.refuse();
            continue;
        };
        let config = config.clone();
        let tx = tx.clone();
        let span = tracing::info_span!("unimic.handshake", remote = %incoming.remote_address());
        handshakes.spawn(
            async move {
                let _permit = permit;
                match server_handshake(incoming, &config).await {
                    Ok(session) => {
                        if tx.send(session).await.is_err() {
                            tracing::debug!("server dropped; session discarded");
                        }
                    }
                    Err(e) => tracing::info!(error = %e, "handshake failed"),
                }
            }
            .instrument(span),
        );
    }
}

async fn server_handshake(
    incoming: quinn::Incoming,
    config: &ServerConfig,
) -> Result<Session, ConnectError> {
    let timeout = config.session.handshake_timeout;
    let start = tokio::time::Instant::now();
    let connecting = incoming.accept().map_err(ConnectError::Connection)?;
    let conn = match tokio::time::timeout(timeout, connecting).await {
        Ok(c) => c?,
        Err(_) => return Err(ConnectError::Timeout),
    };
    let policy = policy(&config.session, config.auth.clone());
    let rest = timeout.saturating_sub(start.elapsed());
    match tokio::time::timeout(rest, handshake::server(&conn, policy)).await {
        Ok(Ok(control)) => Ok(Session::start(
            conn,
            Side::Server,
            control,
            config.session.clone(),
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            wire::close(&conn, ErrorCode::TIMEOUT, "handshake timeout");
            Err(ConnectError::Timeout)
        }
    }
}

/// A unimic client endpoint: one UDP socket from which any number of sessions connect.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: quinn::Endpoint,
    config: Arc<ClientConfig>,
}

impl Client {
    /// Binds the endpoint. Must be called inside a tokio runtime.
    pub fn new(config: ClientConfig) -> Result<Client, EndpointError> {
        let crypto = config.tls.quic_config()?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
        client_config.transport_config(Arc::new(config.quic.transport(0)));
        let mut endpoint = quinn::Endpoint::client(config.bind)?;
        endpoint.set_default_client_config(client_config);
        Ok(Client {
            endpoint,
            config: Arc::new(config),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Connects to `addr` (verifying the certificate for `server_name`) and runs the handshake,
    /// all within the configured handshake timeout.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Session, ConnectError> {
        let session = &self.config.session;
        let connecting = self.endpoint.connect(addr, server_name)?;
        let run = async {
            let conn = connecting.await?;
            let codec = unimic_codec::part::PartCodec::new(session.codec.clone());
            let hello = ClientHello {
                versions: vec![VERSION_1],
                tokenizers: session.tokenizers.iter().map(|t| t.info.clone()).collect(),
                entropy_models: entropy_table(&codec).into_iter().map(|e| e.info).collect(),
                limits: session.limits,
                token: self.config.token.clone(),
            };
            match handshake::client(&conn, hello).await {
                Ok(control) => Ok((conn, control)),
                Err(e) => Err(e),
            }
        };
        match tokio::time::timeout(session.handshake_timeout, run).await {
            Ok(Ok((conn, control))) => {
                Ok(Session::start(conn, Side::Client, control, session.clone()))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ConnectError::Timeout),
        }
    }

    /// Closes every connection of this endpoint with `NO_ERROR`.
    pub fn close(&self) {
        self.endpoint
            .close(wire::quic_code(ErrorCode::NO_ERROR), b"client closing");
    }

    /// Waits until every connection of this endpoint is closed and drained (after
    /// [`close`](Self::close)); the UDP socket is released once the last handle is dropped.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

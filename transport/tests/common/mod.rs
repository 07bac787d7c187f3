//! Shared helpers for the loopback tests: endpoints, and a raw quinn peer that speaks the wire
//! format by hand (to misbehave).
#![allow(dead_code)]

pub mod relay;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use unimic_protocol::handshake::{ClientHello, VERSION_1};
use unimic_protocol::{frame, Encode, Frame, Limits};
use unimic_transport::tls::{CertHash, ClientTls, ServerTls};
use unimic_transport::{
    Client, ClientConfig, Server, ServerConfig, Session, SessionConfig, TokenizerInfo,
};

/// Every test step is bounded so nothing hangs.
pub const STEP: Duration = Duration::from_secs(20);

pub async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .expect("test step timed out")
}

pub fn image_tokenizer() -> TokenizerInfo {
    TokenizerInfo::image("test-vq", [7; 32], 1024, 16)
}

pub fn session_config() -> SessionConfig {
    SessionConfig::default().with_tokenizer(image_tokenizer())
}

pub struct Pair {
    pub server: Server,
    pub client: Client,
    pub addr: SocketAddr,
    pub pin: CertHash,
}

pub fn server_with(config: impl FnOnce(ServerConfig) -> ServerConfig) -> (Server, CertHash) {
    let tls = ServerTls::self_signed().unwrap();
    let pin = tls.identity.cert_hash();
    let server = Server::bind(config(
        ServerConfig::new(tls).with_session(session_config()),
    ))
    .unwrap();
    (server, pin)
}

pub fn client_with(pin: CertHash, config: impl FnOnce(ClientConfig) -> ClientConfig) -> Client {
    Client::new(config(
        ClientConfig::new(ClientTls::pinned(pin)).with_session(session_config()),
    ))
    .unwrap()
}

pub fn pair() -> Pair {
    let (server, pin) = server_with(|c| c);
    let addr = server.local_addr().unwrap();
    let client = client_with(pin, |c| c);
    Pair {
        server,
        client,
        addr,
        pin,
    }
}

/// Connects one client session and accepts it on the server.
pub async fn connect(pair: &mut Pair) -> (Session, Session) {
    let (c, s) = within(async {
        tokio::join!(
            pair.client.connect(pair.addr, "localhost"),
            pair.server.accept()
        )
    })
    .await;
    (c.unwrap(), s.unwrap())
}

/// A raw quinn connection with the unimic ALPN and the pinned certificate, no handshake yet.
pub async fn raw_connect(addr: SocketAddr, pin: CertHash) -> (quinn::Endpoint, quinn::Connection) {
    let crypto = ClientTls::pinned(pin).quic_config().unwrap();
    let cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut ep = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    ep.set_default_client_config(cfg);
    let conn = within(ep.connect(addr, "localhost").unwrap())
        .await
        .unwrap();
    (ep, conn)
}

pub fn frame_bytes(f: &Frame) -> Bytes {
    let mut b = BytesMut::new();
    f.encode(&mut b);
    b.freeze()
}

/// The hello a default session offers (tokenizers and entropy models as the server holds them).
pub fn default_hello(token: &[u8]) -> ClientHello {
    // The server hello lists what it holds; to learn the model table, a raw peer offers exactly
    // what a real client would: copy it from a real handshake's negotiated tables.
    ClientHello {
        versions: vec![VERSION_1],
        tokenizers: session_config()
            .tokenizers
            .iter()
            .map(|t| t.info.clone())
            .collect(),
        entropy_models: Vec::new(),
        limits: Limits::default(),
        token: Bytes::copy_from_slice(token),
    }
}

/// A raw peer after a successful handshake: the control stream and the negotiated hello.
pub struct RawPeer {
    pub ep: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub control_send: quinn::SendStream,
    pub control: frame::Decoder,
    pub control_recv: quinn::RecvStream,
    pub hello: unimic_protocol::ServerHello,
}

impl RawPeer {
    /// Connects and runs the handshake by hand, offering `entropy_models`.
    pub async fn connect(
        addr: SocketAddr,
        pin: CertHash,
        entropy_models: Vec<unimic_protocol::ModelInfo>,
    ) -> RawPeer {
        let (ep, conn) = raw_connect(addr, pin).await;
        let (mut send, mut recv) = within(conn.open_bi()).await.unwrap();
        let mut hello = default_hello(b"");
        hello.entropy_models = entropy_models;
        send.write_all(&frame_bytes(&Frame::ClientHello(hello)))
            .await
            .unwrap();
        let mut dec = frame::Decoder::new(Limits::HANDSHAKE);
        let hello = loop {
            if let Some(f) = dec.next_frame().unwrap() {
                match f {
                    Frame::ServerHello(h) => break h,
                    other => panic!("expected a server hello, got {other:?}"),
                }
            }
            let chunk = within(recv.read_chunk(65536, true))
                .await
                .unwrap()
                .expect("control stream ended");
            dec.push(&chunk.bytes);
        };
        dec.set_limits(hello.limits);
        RawPeer {
            ep,
            conn,
            control_send: send,
            control: dec,
            control_recv: recv,
            hello,
        }
    }

    /// Reads control frames until one matches `pred`.
    pub async fn control_frame(&mut self, pred: impl Fn(&Frame) -> bool) -> Frame {
        loop {
            while let Some(f) = self.control.next_frame().unwrap() {
                if pred(&f) {
                    return f;
                }
            }
            let chunk = within(self.control_recv.read_chunk(65536, true))
                .await
                .unwrap()
                .expect("control stream ended");
            self.control.push(&chunk.bytes);
        }
    }

    /// Opens a message stream, writes `bytes` without finishing it, and returns the code the
    /// receiver stopped the stream with.
    pub async fn send_raw_message(&self, bytes: &[u8]) -> Option<u64> {
        let mut s = within(self.conn.open_uni()).await.unwrap();
        // The receiver may stop the stream before everything is written.
        let _ = s.write_all(bytes).await;
        within(s.stopped())
            .await
            .ok()
            .flatten()
            .map(|c| c.into_inner())
    }
}

//! Sessions through a fault-injecting UDP relay on loopback (`common::relay`, in-process and
//! seeded): loss (1 %, 10 %, bursts), reordering, duplication, jitter, a blackhole that heals
//! and one that does not, and a peer that vanishes mid-message (in either direction).
//!
//! Under each fault every message either arrives whole, with both ends' contexts in step
//! (the same keys and the same context digest over all they hold), or fails with the
//! documented error (docs/ARCHITECTURE.md, "Faults and reconnects"): `SessionError::Lost`
//! from `recv` and `wait_ack`, `RecvError::ConnectionLost` from a message being read,
//! `SendError::Closed` from a send. Every await is under a bound, so nothing hangs; the QUIC
//! idle timeout is short so that a dead path is noticed quickly. After a session is lost, the
//! same client endpoint connects again and continues in a new session with an empty context.

mod common;

use std::time::Duration;

use common::relay::{Faults, Relay};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use unimic_transport::{
    AckStage, Client, ContextKey, Limits, MessageEvent, ModelChoice, OutgoingMessage, OutgoingPart,
    QuicConfig, ReceivedPart, RecvError, Role, SendError, Server, Session, SessionError,
    TextStream, TokenGrid,
};

/// Close a connection after this long without a packet from the peer.
const IDLE: Duration = Duration::from_secs(3);
/// Keep-alive interval (well under `IDLE`, so that loss alone never idles a session out).
const KEEP_ALIVE: Duration = Duration::from_millis(300);
/// Bound on any single await: a test that hits it has hung (it is not a timing assertion).
const BOUND: Duration = Duration::from_secs(15);

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("hung: {what} did not complete within {BOUND:?}"))
}

fn quic() -> QuicConfig {
    QuicConfig::default()
        .with_idle_timeout(IDLE)
        .with_keep_alive(Some(KEEP_ALIVE))
}

/// A context budget small enough that a few turns evict (evictions must stay in step too):
/// about a dozen parts of 30-40 tokens (128 bytes each plus 4 per token).
fn limits() -> Limits {
    Limits {
        max_context_bytes: 3_500u32.into(),
        ..Limits::default()
    }
}

struct Net {
    relay: Relay,
    server_ep: Server,
    client_ep: Client,
    client: Session,
    server: Session,
}

async fn connect_via(
    relay: &Relay,
    client_ep: &Client,
    server_ep: &mut Server,
) -> (Session, Session) {
    let (c, s) = bounded("connect", async {
        tokio::join!(
            client_ep.connect(relay.addr(), "localhost"),
            server_ep.accept()
        )
    })
    .await;
    (c.expect("client connects"), s.expect("server accepts"))
}

/// A server, a relay in front of it with `faults`, and a client session through the relay.
async fn net(faults: Faults, seed: u64) -> Net {
    let (mut server_ep, pin) = server_with(|c| {
        c.with_quic(quic())
            .with_session(session_config().with_limits(limits()))
    });
    let relay = Relay::start(server_ep.local_addr().unwrap(), faults, seed).await;
    let client_ep = client_with(pin, |c| {
        c.with_quic(quic())
            .with_session(session_config().with_limits(limits()))
    });
    let (client, server) = connect_via(&relay, &client_ep, &mut server_ep).await;
    Net {
        relay,
        server_ep,
        client_ep,
        client,
        server,
    }
}

/// How a turn failed, when it did (each the documented error of its operation). The errors
/// are read through `Debug`, in the failure messages.
#[derive(Debug)]
#[allow(dead_code)]
enum Failure {
    Send(SendError),
    Session(SessionError),
    Recv(RecvError),
    Ended,
}

/// A scripted conversation: every turn the client sends text (and every other turn an 8×8
/// image in 2 chunks) referring to what both ends still hold, and the server answers with text
/// referring to the turn.
struct Convo {
    rng: StdRng,
    turn: u32,
    text: Vec<ContextKey>,
    images: Vec<ContextKey>,
}

impl Convo {
    fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            turn: 0,
            text: Vec::new(),
            images: Vec::new(),
        }
    }

    fn ids(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| self.rng.gen_range(0..5_000)).collect()
    }

    fn grid(&mut self) -> TokenGrid {
        let base = self.rng.gen_range(0..1_000);
        let ids = (0..64)
            .map(|i| (base + i / 3 + (i % 8) * 2) % 1024)
            .collect();
        TokenGrid::new(8, 8, 1024, ids).unwrap()
    }

    /// The last `n` of `keys` that `session` still holds.
    fn recent(keys: &[ContextKey], session: &Session, n: usize) -> Vec<ContextKey> {
        let held = session.context_keys();
        let mut v: Vec<ContextKey> = keys.iter().filter(|k| held.contains(k)).copied().collect();
        v.drain(..v.len().saturating_sub(n));
        v
    }

    /// One turn; panics if a message arrives other than it was sent, returns the failure if
    /// an operation failed.
    async fn turn(&mut self, client: &Session, server: &Session) -> Result<(), Failure> {
        let text = self.ids(24);
        let mut msg = OutgoingMessage::new(Role::User).with_part(
            OutgoingPart::text(text.clone()).with_context(Self::recent(&self.text, client, 4)),
        );
        let mut expect = vec![ReceivedPart::Text(text)];
        if self.turn % 2 == 0 {
            let g = self.grid();
            msg = msg.with_part(
                OutgoingPart::image(g.clone())
                    .with_model(ModelChoice::Adaptive)
                    .with_chunk_tokens(32)
                    .with_context(Self::recent(&self.images, client, 2)),
            );
            expect.push(ReceivedPart::Image(g));
        }
        self.turn += 1;
        let sent = bounded("send", client.send(msg))
            .await
            .map_err(Failure::Send)?;
        let incoming = bounded("server recv", server.recv())
            .await
            .map_err(Failure::Session)?
            .ok_or(Failure::Ended)?;
        let got = bounded("server collect", incoming.collect())
            .await
            .map_err(Failure::Recv)?;
        assert_eq!(got.message_id, sent.message_id);
        assert_eq!(got.parts, expect, "turn {} arrived altered", self.turn);
        self.text.push(ContextKey::new(sent.message_id, 0));
        if expect.len() == 2 {
            self.images.push(ContextKey::new(sent.message_id, 1));
        }

        let reply = self.ids(16);
        let mut refs = Self::recent(&self.text, server, 2);
        refs.retain(|k| server.context_keys().contains(k));
        let answered = bounded(
            "reply send",
            server.send(
                OutgoingMessage::new(Role::Assistant)
                    .in_reply_to(sent.message_id)
                    .with_part(OutgoingPart::text(reply.clone()).with_context(refs)),
            ),
        )
        .await
        .map_err(Failure::Send)?;
        let incoming = bounded("client recv", client.recv())
            .await
            .map_err(Failure::Session)?
            .ok_or(Failure::Ended)?;
        let got = bounded("client collect", incoming.collect())
            .await
            .map_err(Failure::Recv)?;
        assert_eq!(got.message_id, answered.message_id);
        assert_eq!(got.in_reply_to, Some(sent.message_id));
        assert_eq!(got.parts, vec![ReceivedPart::Text(reply)]);
        self.text.push(ContextKey::new(answered.message_id, 0));
        Ok(())
    }
}

/// Both ends hold the same context: keys and tokens (the digest over everything held).
fn assert_in_step(client: &Session, server: &Session, when: &str) {
    let sorted = |s: &Session| {
        let mut k = s.context_keys();
        k.sort();
        k
    };
    assert_eq!(sorted(client), sorted(server), "{when}: keys");
    assert_eq!(
        client.context_digest(),
        server.context_digest(),
        "{when}: digests"
    );
}

/// `turns` turns under `faults`; every one must complete, in step after each.
async fn survive(faults: Faults, seed: u64, turns: u32) -> Relay {
    let n = net(faults, seed).await;
    let mut convo = Convo::new(seed);
    for t in 0..turns {
        if let Err(e) = convo.turn(&n.client, &n.server).await {
            panic!("turn {t} failed under {faults:?}: {e:?}");
        }
        assert_in_step(&n.client, &n.server, &format!("after turn {t}"));
    }
    // The budget was small enough to evict: the contexts stayed in step through evictions.
    assert!(!n.client.context_keys().contains(&ContextKey::new(0, 0)));
    n.relay
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_of_one_percent() {
    let relay = survive(
        Faults {
            loss: 0.01,
            ..Faults::default()
        },
        11,
        10,
    )
    .await;
    // The turns went through the relay (a turn is at least a message and its acknowledgement
    // each way; QUIC coalesces more into one datagram when the machine is busy, so the count
    // is a floor, not an expectation: it was > 50 on an idle machine and 50 or fewer under load).
    let forwarded = relay
        .stats()
        .forwarded
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(forwarded >= 20, "{forwarded} datagrams forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_of_ten_percent() {
    let relay = survive(
        Faults {
            loss: 0.10,
            ..Faults::default()
        },
        12,
        10,
    )
    .await;
    assert!(
        relay
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_in_bursts() {
    // Bursts of 3 datagrams on average, entered from 5 % of the good datagrams.
    let relay = survive(
        Faults {
            burst: Some((0.05, 0.3)),
            ..Faults::default()
        },
        13,
        10,
    )
    .await;
    assert!(
        relay
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordering() {
    let relay = survive(
        Faults {
            reorder: 0.25,
            reorder_hold: Duration::from_millis(15),
            ..Faults::default()
        },
        14,
        10,
    )
    .await;
    assert!(
        relay
            .stats()
            .delayed
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplication() {
    let relay = survive(
        Faults {
            duplicate: 0.25,
            reorder_hold: Duration::from_millis(5),
            ..Faults::default()
        },
        15,
        10,
    )
    .await;
    assert!(
        relay
            .stats()
            .duplicated
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter() {
    let relay = survive(
        Faults {
            jitter: Duration::from_millis(20),
            ..Faults::default()
        },
        16,
        10,
    )
    .await;
    assert!(
        relay
            .stats()
            .delayed
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_faults_at_once() {
    survive(
        Faults {
            loss: 0.05,
            burst: Some((0.01, 0.3)),
            duplicate: 0.05,
            reorder: 0.1,
            reorder_hold: Duration::from_millis(10),
            jitter: Duration::from_millis(5),
        },
        17,
        10,
    )
    .await;
}

/// A blackhole shorter than the idle timeout, in the middle of a message: it arrives whole
/// once the path heals, and the session goes on in step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_that_heals() {
    let n = net(Faults::default(), 21).await;
    let mut convo = Convo::new(21);
    for t in 0..2 {
        convo.turn(&n.client, &n.server).await.unwrap();
        assert_in_step(&n.client, &n.server, &format!("after turn {t}"));
    }
    // A streamed text message: its first chunk gets through, the rest is sent into the
    // blackhole, which heals before the idle timeout.
    let mut w = bounded("open", n.client.open(Role::User)).await.unwrap();
    bounded("begin", w.begin_text(TextStream::default()))
        .await
        .unwrap();
    bounded("push", w.push_text(&[1, 2, 3])).await.unwrap();
    let mut incoming = bounded("recv", n.server.recv()).await.unwrap().unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        match bounded("first chunk", incoming.next())
            .await
            .unwrap()
            .unwrap()
        {
            MessageEvent::Chunk {
                data: unimic_transport::ChunkData::Tokens { ids, .. },
                ..
            } => got.extend(ids),
            MessageEvent::PartStart(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    n.relay.blackhole(true);
    for chunk in [[4, 5, 6], [7, 8, 9]] {
        bounded("push", w.push_text(&chunk)).await.unwrap();
    }
    let stats = bounded("finish", w.finish()).await.unwrap();
    tokio::time::sleep(IDLE / 3).await;
    n.relay.blackhole(false);
    let rest = loop {
        match bounded("rest", incoming.next()).await.unwrap().unwrap() {
            MessageEvent::PartEnd { part, .. } => break part,
            _ => continue,
        }
    };
    assert_eq!(rest, ReceivedPart::Text((1..=9).collect()));
    assert!(matches!(
        bounded("end", incoming.next()).await,
        Some(Ok(MessageEvent::End(_)))
    ));
    bounded(
        "ack",
        n.client.wait_ack(stats.message_id, AckStage::Decoded),
    )
    .await
    .unwrap();
    assert_in_step(&n.client, &n.server, "after the blackhole");
    convo.text.push(ContextKey::new(stats.message_id, 0));
    for t in 2..4 {
        convo.turn(&n.client, &n.server).await.unwrap();
        assert_in_step(&n.client, &n.server, &format!("after turn {t}"));
    }
}

/// A blackhole that does not heal: the turn fails with the documented errors once the idle
/// timeout passes, on both ends; then the same client endpoint connects again and the
/// conversation continues in a new session, which keeps nothing of the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_that_does_not_heal_then_reconnect() {
    let Net {
        relay,
        mut server_ep,
        client_ep,
        client,
        server,
    } = net(Faults::default(), 31).await;
    let mut convo = Convo::new(31);
    for _ in 0..2 {
        convo.turn(&client, &server).await.unwrap();
    }
    let old_key = ContextKey::new(0, 0);
    assert!(client.context_keys().contains(&old_key));
    relay.blackhole(true);
    let failure = convo.turn(&client, &server).await.unwrap_err();
    // The client's message is written into its stream (a send completes once written, not
    // delivered), so the first to fail is the server's wait for it.
    assert!(
        matches!(failure, Failure::Session(SessionError::Lost(_))),
        "{failure:?}"
    );
    assert!(matches!(
        bounded("client recv", client.recv()).await,
        Err(SessionError::Lost(_))
    ));
    // The client's last message was never acknowledged, and waiting for it fails too.
    assert!(matches!(
        bounded("wait ack", client.wait_ack(4, AckStage::Received)).await,
        Err(SessionError::Lost(_))
    ));
    assert!(matches!(
        bounded("send", client.send(OutgoingMessage::new(Role::User))).await,
        Err(SendError::Closed(_))
    ));
    drop((client, server));

    // The path comes back; the client reconnects from the same endpoint.
    relay.blackhole(false);
    let (client, server) = connect_via(&relay, &client_ep, &mut server_ep).await;
    assert!(client.context_keys().is_empty() && server.context_keys().is_empty());
    // The old session's context is gone: a reference to it is refused before anything is sent.
    let err = bounded(
        "stale reference",
        client.send(
            OutgoingMessage::new(Role::User)
                .with_part(OutgoingPart::text(vec![1, 2]).with_context(vec![old_key])),
        ),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SendError::Codec(_)), "{err:?}");
    let mut convo = Convo::new(32);
    for t in 0..3 {
        convo.turn(&client, &server).await.unwrap();
        assert_in_step(
            &client,
            &server,
            &format!("after turn {t} of the new session"),
        );
    }
}

/// The server vanishes (no close reaches the client) while the client is sending it a
/// streamed message: the client's session fails with the documented errors, bounded by the
/// idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_vanishes_while_receiving() {
    let Net {
        relay,
        server_ep,
        client_ep: _client_ep,
        client,
        server,
    } = net(Faults::default(), 41).await;
    let mut convo = Convo::new(41);
    convo.turn(&client, &server).await.unwrap();
    let mut w = bounded("open", client.open(Role::User)).await.unwrap();
    let id = w.message_id();
    bounded("begin", w.begin_text(TextStream::default()))
        .await
        .unwrap();
    bounded("push", w.push_text(&[10, 11, 12])).await.unwrap();
    let mut incoming = bounded("recv", server.recv()).await.unwrap().unwrap();
    assert!(matches!(
        bounded("start", incoming.next()).await,
        Some(Ok(MessageEvent::PartStart(_)))
    ));
    // Gone: every datagram from now on is lost, and the server's end is dropped (its close
    // never arrives).
    relay.blackhole(true);
    drop((incoming, server, server_ep));
    // The writes may still be buffered; sooner or later the session says the peer is lost.
    let mut sent = Ok(());
    for i in 0..50u32 {
        if let Err(e) = bounded("push", w.push_text(&[i; 64])).await {
            sent = Err(e);
            break;
        }
    }
    let outcome = match sent {
        Ok(()) => bounded("finish", w.finish()).await.map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = outcome {
        assert!(matches!(e, SendError::Closed(_)), "{e:?}");
    }
    assert!(matches!(
        bounded("ack", client.wait_ack(id, AckStage::Decoded)).await,
        Err(SessionError::Lost(_))
    ));
    assert!(matches!(
        bounded("recv", client.recv()).await,
        Err(SessionError::Lost(_))
    ));
}

/// The server vanishes while streaming a reply: the client's message fails with
/// `ConnectionLost` and its session with `Lost`, bounded by the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_vanishes_while_sending() {
    let Net {
        relay,
        server_ep,
        client_ep: _client_ep,
        client,
        server,
    } = net(Faults::default(), 42).await;
    let mut convo = Convo::new(42);
    convo.turn(&client, &server).await.unwrap();
    let mut w = bounded("open", server.open(Role::Assistant)).await.unwrap();
    bounded("begin", w.begin_text(TextStream::default()))
        .await
        .unwrap();
    bounded("push", w.push_text(&[20, 21, 22])).await.unwrap();
    let mut incoming = bounded("recv", client.recv()).await.unwrap().unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match bounded("first chunk", incoming.next())
            .await
            .unwrap()
            .unwrap()
        {
            MessageEvent::Chunk {
                data: unimic_transport::ChunkData::Tokens { ids, .. },
                ..
            } => seen.extend(ids),
            MessageEvent::PartStart(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    relay.blackhole(true);
    let _ = bounded("push", w.push_text(&[23, 24])).await;
    drop((w, server, server_ep));
    let end = loop {
        match bounded("rest of the reply", incoming.next()).await {
            Some(Ok(MessageEvent::Chunk { .. })) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(end, Some(Err(RecvError::ConnectionLost(_)))),
        "{end:?}"
    );
    assert!(matches!(
        bounded("recv", client.recv()).await,
        Err(SessionError::Lost(_))
    ));
}

/// Both directions at once under jitter and reordering: the client sends its turns without
/// waiting for the replies, the server answers each as it arrives, each side referring to the
/// most recent text it holds. Every message must arrive whole and, once all are through, the
/// contexts must hold the same entries, although each end inserted them in another order and
/// evicted by its own oldest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_at_once_under_jitter() {
    let n = net(
        Faults {
            jitter: Duration::from_millis(8),
            reorder: 0.1,
            reorder_hold: Duration::from_millis(10),
            ..Faults::default()
        },
        51,
    )
    .await;
    let (client, server) = (&n.client, &n.server);
    const TURNS: usize = 12;
    let mut rng = StdRng::seed_from_u64(51);
    let texts: Vec<Vec<u32>> = (0..TURNS)
        .map(|_| (0..40).map(|_| rng.gen_range(0..5_000)).collect())
        .collect();
    let recent_text = |s: &Session| {
        let mut k: Vec<ContextKey> = s.context_keys();
        k.retain(|k| k.part_index == 0);
        k.drain(..k.len().saturating_sub(2));
        k
    };
    let send_all = async {
        for t in &texts {
            let refs = recent_text(client);
            bounded(
                "client send",
                client.send(
                    OutgoingMessage::new(Role::User)
                        .with_part(OutgoingPart::text(t.clone()).with_context(refs)),
                ),
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    };
    let serve = async {
        let mut failures = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let msg = bounded("server recv", server.recv())
                .await
                .unwrap()
                .unwrap();
            let id = msg.message_id();
            // Turns are handed out in the order they were sent, however the packets came.
            assert_eq!(id, 2 * i as u64, "turn {i} out of order");
            match bounded("server collect", msg.collect()).await {
                Ok(got) => assert_eq!(got.parts, vec![ReceivedPart::Text(text.clone())]),
                Err(e) => failures.push((id, e)),
            }
            let refs = recent_text(server);
            bounded(
                "server send",
                server.send(
                    OutgoingMessage::new(Role::Assistant)
                        .in_reply_to(id)
                        .with_part(OutgoingPart::text(vec![id as u32; 30]).with_context(refs)),
                ),
            )
            .await
            .unwrap();
        }
        failures
    };
    let receive = async {
        let mut failures = Vec::new();
        for i in 0..TURNS {
            let msg = bounded("client recv", client.recv())
                .await
                .unwrap()
                .unwrap();
            let id = msg.message_id();
            assert_eq!(id, 2 * i as u64 + 1, "reply {i} out of order");
            match bounded("client collect", msg.collect()).await {
                Ok(got) => {
                    let turn = got.in_reply_to.unwrap();
                    assert_eq!(got.parts, vec![ReceivedPart::Text(vec![turn as u32; 30])]);
                }
                Err(e) => failures.push((id, e)),
            }
        }
        failures
    };
    let ((), server_failures, client_failures) = tokio::join!(send_all, serve, receive);
    assert_eq!(server_failures, vec![], "client messages refused");
    assert_eq!(client_failures, vec![], "server messages refused");
    // Evictions travel on the control stream: wait (bounded) until both ends have applied
    // the other's.
    bounded("quiet", async {
        while client.context_digest() != server.context_digest() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_in_step(client, server, "after all turns");
    assert!(
        client.context_keys().len() < 2 * TURNS,
        "nothing was evicted"
    );
}

/// Regression: a message whose stream was opened later but whose bytes arrived first was
/// handed out first (`Session::recv` promises the order the peer opened the streams; under
/// reordering a server answered turns out of order). A raw peer opens two streams and writes
/// the second message whole before the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_received_in_the_order_their_streams_were_opened() {
    use unimic_protocol::{Frame, MessageEnd, MessageHeader, VarInt};
    let (mut server_ep, pin) = server_with(|c| c);
    let addr = server_ep.local_addr().unwrap();
    let (mut peer, server) = tokio::join!(RawPeer::connect(addr, pin, vec![]), server_ep.accept());
    let server = server.unwrap();
    let message = |id: u32| -> Vec<u8> {
        [
            Frame::MessageHeader(MessageHeader {
                message_id: VarInt::from_u32(id),
                role: Role::User,
            }),
            Frame::MessageEnd(MessageEnd {
                part_count: VarInt::ZERO,
            }),
        ]
        .iter()
        .flat_map(|f| frame_bytes(f).to_vec())
        .collect()
    };
    let mut first = bounded("open", peer.conn.open_uni()).await.unwrap();
    let mut second = bounded("open", peer.conn.open_uni()).await.unwrap();
    bounded("write", second.write_all(&message(2)))
        .await
        .unwrap();
    second.finish().unwrap();
    // The second message is read whole (its acknowledgement says so) before a byte of the
    // first is sent.
    bounded(
        "ack",
        peer.control_frame(|f| matches!(f, Frame::Ack(a) if a.message_id == VarInt::from_u32(2))),
    )
    .await;
    bounded("write", first.write_all(&message(0)))
        .await
        .unwrap();
    first.finish().unwrap();
    for id in [0, 2] {
        let msg = bounded("recv", server.recv()).await.unwrap().unwrap();
        assert_eq!(msg.message_id(), id);
        bounded("collect", msg.collect()).await.unwrap();
    }
}

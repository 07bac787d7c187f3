//! End to end over real QUIC on loopback: `serve` with agents, `Chat` clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use unimic_agents::echo::Echo;
use unimic_agents::{Agent, AgentError, AgentFuture, Content, Conversation, ReplySink};
use unimic_chat::{
    bind, bind_dev, content_bytes, image_tokenizer_info, serve_with, Chat, ChatConfig, ChatError,
    HistoryLimits, Prompt, ReplyEvent, ServeOptions, TurnLog, TurnOutcome,
};
use unimic_transport::tls::{CertHash, ClientTls, Roots, ServerTls};
use unimic_transport::{TokenGrid, TokenizerInfo};

/// Every step is bounded so nothing hangs.
const STEP: Duration = Duration::from_secs(30);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .expect("test step timed out")
}

fn vq() -> TokenizerInfo {
    image_tokenizer_info("test-vq", &"ab".repeat(32), 1024, 16).unwrap()
}

fn grid(h: u32, w: u32, seed: u32) -> TokenGrid {
    let ids = (0..h * w)
        .map(|i| (i * 7 + seed * 13 + i / 5) % 1024)
        .collect();
    TokenGrid::new(h, w, 1024, ids).unwrap()
}

struct Running {
    addr: SocketAddr,
    pin: CertHash,
    logs: mpsc::UnboundedReceiver<TurnLog>,
    _task: tokio::task::JoinHandle<()>,
}

fn start(agent: Arc<dyn Agent>) -> Running {
    let server = bind_dev("127.0.0.1:0".parse().unwrap(), [vq()]).unwrap();
    let (addr, pin) = (server.local_addr().unwrap(), server.cert_hash());
    let (tx, logs) = mpsc::unbounded_channel();
    let options = ServeOptions::default().on_turn(move |log| {
        let _ = tx.send(log.clone());
    });
    let task = tokio::spawn(serve_with(server, agent, options));
    Running {
        addr,
        pin,
        logs,
        _task: task,
    }
}

/// A dev server on loopback whose sessions hold `codec`'s models, answering with `agent`.
fn start_with_codec(
    codec: unimic_codec::part::CodecConfig,
    agent: Arc<dyn Agent>,
    options: ServeOptions,
) -> (SocketAddr, CertHash) {
    let session = unimic_transport::SessionConfig::default()
        .with_tokenizer(vq())
        .with_codec(codec);
    start_with_session(session, agent, options)
}

/// A dev server on loopback with `session`'s settings, answering with `agent`.
fn start_with_session(
    session: unimic_transport::SessionConfig,
    agent: Arc<dyn Agent>,
    options: ServeOptions,
) -> (SocketAddr, CertHash) {
    use unimic_transport::{Server, ServerConfig};
    let tls = ServerTls::self_signed().unwrap();
    let pin = tls.identity.cert_hash();
    let server = Server::bind(
        ServerConfig::new(tls)
            .with_bind("127.0.0.1:0".parse().unwrap())
            .with_session(session),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(serve_with(server, agent, options));
    (addr, pin)
}

async fn chat(r: &Running) -> Chat {
    within(Chat::connect(
        r.addr,
        ChatConfig::pinned(r.pin).with_image_tokenizer(vq()),
    ))
    .await
    .unwrap()
}

/// Every event of a reply.
async fn events(reply: unimic_chat::Reply) -> Vec<ReplyEvent> {
    let mut reply = reply;
    let mut out = Vec::new();
    while let Some(ev) = within(reply.next()).await {
        out.push(ev.unwrap());
    }
    out
}

fn text_of(events: &[ReplyEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            ReplyEvent::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_turns_through_serve_and_echo_reuse_the_context() {
    let mut r = start(Arc::new(Echo));
    let chat = chat(&r).await;
    let first = "Hello, agent: naïve café 日本語 🐕";
    let ev = events(within(chat.send(Prompt::text(first))).await.unwrap()).await;
    assert_eq!(text_of(&ev), first);
    let Some(ReplyEvent::End(stats)) = ev.last() else {
        panic!("no end: {ev:?}")
    };
    assert_eq!(stats.turn, 0);
    assert_eq!(stats.reply % 2, 1);
    assert!(stats.sent.wire_bytes > 0 && stats.received.wire_bytes > 0);

    // The second turn is coded against the first (and the reply): the same text costs fewer
    // payload bytes than it did alone.
    let again = within(chat.send(Prompt::text(first))).await.unwrap();
    let sent_again = again.sent().payload_bytes;
    assert_eq!(within(again.text()).await.unwrap(), first);
    assert!(
        sent_again < stats.sent.payload_bytes,
        "{sent_again} vs {}",
        stats.sent.payload_bytes
    );
    let log = within(r.logs.recv()).await.unwrap();
    assert_eq!(log.outcome, TurnOutcome::Answered);
    assert!(log.bytes_in > 0 && log.bytes_out > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_turn_through_serve_and_echo() {
    let r = start(Arc::new(Echo));
    let chat = chat(&r).await;
    let image = grid(12, 20, 3);
    let ev = events(
        within(chat.send(Prompt::text("look:").with_grid(image.clone())))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(text_of(&ev), "look:");
    let images: Vec<&TokenGrid> = ev
        .iter()
        .filter_map(|e| match e {
            ReplyEvent::Image(g) => Some(g),
            _ => None,
        })
        .collect();
    assert_eq!(images, vec![&image]);
    // A second image turn references the first image (context reuse) and still round-trips.
    let image2 = grid(12, 20, 4);
    let ev = events(
        within(chat.send(Prompt::default().with_grid(image2.clone())))
            .await
            .unwrap(),
    )
    .await;
    assert!(ev.contains(&ReplyEvent::Image(image2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_sessions_get_their_own_replies() {
    let r = start(Arc::new(Echo));
    let (a, b) = tokio::join!(chat(&r), chat(&r));
    let run = |chat: Chat, tag: &'static str| async move {
        let mut got = Vec::new();
        for i in 0..3 {
            let text = format!("{tag} turn {i}");
            got.push(
                within(
                    within(chat.send(Prompt::text(text.clone())))
                        .await
                        .unwrap()
                        .text(),
                )
                .await
                .unwrap(),
            );
        }
        got
    };
    let (ga, gb) = tokio::join!(run(a, "alpha"), run(b, "beta"));
    assert_eq!(ga, ["alpha turn 0", "alpha turn 1", "alpha turn 2"]);
    assert_eq!(gb, ["beta turn 0", "beta turn 1", "beta turn 2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_correlated_with_their_turns() {
    let r = start(Arc::new(Echo));
    let chat = chat(&r).await;
    // Three turns outstanding at once; their replies are read in reverse order.
    let r0 = within(chat.send(Prompt::text("zero"))).await.unwrap();
    let r1 = within(chat.send(Prompt::text("one"))).await.unwrap();
    let r2 = within(chat.send(Prompt::text("two"))).await.unwrap();
    assert_eq!((r0.turn(), r1.turn(), r2.turn()), (0, 2, 4));
    assert_eq!(within(r2.text()).await.unwrap(), "two");
    assert_eq!(within(r1.text()).await.unwrap(), "one");
    let ev = events(r0).await;
    assert_eq!(text_of(&ev), "zero");
    match ev.last() {
        Some(ReplyEvent::End(s)) => assert_eq!(s.turn, 0),
        other => panic!("{other:?}"),
    }
}

/// Streams `n` deltas, one every `pause`.
struct Slow {
    n: usize,
    pause: Duration,
}

impl Agent for Slow {
    fn respond<'a>(&'a self, _: &'a Conversation, sink: &'a mut dyn ReplySink) -> AgentFuture<'a> {
        Box::pin(async move {
            for i in 0..self.n {
                sink.text_delta(&format!("delta {i}. ")).await?;
                tokio::time::sleep(self.pause).await;
            }
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_reply_stops_the_agent_and_the_session_goes_on() {
    let mut r = start(Arc::new(Slow {
        n: 1000,
        pause: Duration::from_millis(20),
    }));
    let chat = chat(&r).await;
    let mut reply = within(chat.send(Prompt::text("talk"))).await.unwrap();
    match within(reply.next()).await {
        Some(Ok(ReplyEvent::Text(t))) => assert!(t.starts_with("delta 0")),
        other => panic!("{other:?}"),
    }
    within(reply.cancel()).await;
    let log = within(r.logs.recv()).await.unwrap();
    assert_eq!(log.outcome, TurnOutcome::Cancelled, "{log:?}");

    // Cancelled before anything was said: the agent is dropped while it waits.
    let reply = within(chat.send(Prompt::text("again"))).await.unwrap();
    within(reply.cancel()).await;
    let log = within(r.logs.recv()).await.unwrap();
    assert_eq!(log.outcome, TurnOutcome::Cancelled, "{log:?}");
}

/// Fails on "fail", panics on "panic", echoes otherwise.
struct Moody;

impl Agent for Moody {
    fn respond<'a>(&'a self, c: &'a Conversation, sink: &'a mut dyn ReplySink) -> AgentFuture<'a> {
        Box::pin(async move {
            let text = match c.turns.last().and_then(|t| t.content.first()) {
                Some(Content::Text { text, .. }) => text.clone(),
                _ => String::new(),
            };
            match text.as_str() {
                "fail" => {
                    sink.text_delta("about to fail").await?;
                    Err(AgentError::Backend("the model is down".into()))
                }
                "fail early" => Err(AgentError::Backend("no model".into())),
                "panic" => panic!("agent bug"),
                _ => sink.text_delta(&text).await.map_err(Into::into),
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_failures_and_bad_peers_do_not_stop_the_server() {
    let r = start(Arc::new(Moody));

    // A peer that speaks garbage on the control stream is closed; the server goes on.
    {
        let crypto = ClientTls::pinned(r.pin).quic_config().unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let conn = within(ep.connect(r.addr, "localhost").unwrap())
            .await
            .unwrap();
        let (mut send, _recv) = within(conn.open_bi()).await.unwrap();
        send.write_all(&[0xff; 64]).await.unwrap();
        let closed = within(conn.closed()).await;
        assert!(
            matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
            "{closed:?}"
        );
    }
    // A peer that opens a QUIC connection and never says hello times out alone; meanwhile:
    let chat = chat(&r).await;

    // The agent fails after saying something: the client gets the reason.
    let reply = within(chat.send(Prompt::text("fail"))).await.unwrap();
    match within(reply.text()).await {
        Err(ChatError::Agent { reason, .. }) => {
            assert!(
                reason.contains("agent") || reason.contains("down"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    // ... or before.
    let reply = within(chat.send(Prompt::text("fail early"))).await.unwrap();
    match within(reply.text()).await {
        Err(ChatError::Agent { reason, .. }) => assert!(reason.contains("no model"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // The session goes on.
    let reply = within(chat.send(Prompt::text("still here"))).await.unwrap();
    assert_eq!(within(reply.text()).await.unwrap(), "still here");

    // A panicking agent ends its own session only.
    let doomed = chat_with_timeout(&r).await;
    let reply = within(doomed.send(Prompt::text("panic"))).await.unwrap();
    assert!(within(reply.text()).await.is_err());
    let reply = within(chat.send(Prompt::text("after the panic")))
        .await
        .unwrap();
    assert_eq!(within(reply.text()).await.unwrap(), "after the panic");
    let fresh = chat_with_timeout(&r).await;
    let reply = within(fresh.send(Prompt::text("new session")))
        .await
        .unwrap();
    assert_eq!(within(reply.text()).await.unwrap(), "new session");
}

async fn chat_with_timeout(r: &Running) -> Chat {
    within(Chat::connect(
        r.addr,
        ChatConfig::pinned(r.pin)
            .with_image_tokenizer(vq())
            .with_reply_timeout(Some(Duration::from_secs(5))),
    ))
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pin_and_absent_server_fail_clearly() {
    let r = start(Arc::new(Echo));
    let wrong = CertHash([9; 32]);
    let e = within(Chat::connect(r.addr, ChatConfig::pinned(wrong)))
        .await
        .unwrap_err();
    assert!(matches!(e, ChatError::Connect(_)), "{e}");

    // Nobody listens there: the handshake times out, quickly.
    let nobody: SocketAddr = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let mut config = ChatConfig::pinned(r.pin);
    config.connect_timeout = Duration::from_millis(500);
    let e = within(Chat::connect(nobody, config)).await.unwrap_err();
    assert!(matches!(e, ChatError::Connect(_)), "{e}");
}

/// Replies to every turn with the last image, its first row changed, sent as an edit.
struct FirstRowEditor;

impl Agent for FirstRowEditor {
    fn respond<'a>(&'a self, c: &'a Conversation, sink: &'a mut dyn ReplySink) -> AgentFuture<'a> {
        Box::pin(async move {
            let (at, base) = c
                .last_image()
                .ok_or_else(|| AgentError::Unsupported("no image".into()))?;
            let w = base.width() as usize;
            let mut ids = base.ids().to_vec();
            for id in &mut ids[..w] {
                *id = (*id + 1) % 1024;
            }
            let edited = TokenGrid::new(base.height(), base.width(), 1024, ids).unwrap();
            let region: Vec<bool> = (0..edited.len()).map(|i| i < w).collect();
            sink.text_delta("edited").await?;
            sink.image_edit(at, &edited, &region).await?;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_replies_send_only_the_region_when_both_ends_have_the_masked_model() {
    use unimic_codec::entropy::masked::{Masked, MaskedConfig};
    use unimic_codec::part::CodecConfig;

    let masked = Arc::new(Masked::synthetic(&MaskedConfig::tiny(1024), 5).unwrap());
    let codec = CodecConfig::default().with_masked(masked);
    let (addr, pin) = start_with_codec(
        codec.clone(),
        Arc::new(FirstRowEditor),
        ServeOptions::default(),
    );
    let image = grid(8, 10, 1);
    let mut expected = image.ids().to_vec();
    for id in &mut expected[..10] {
        *id = (*id + 1) % 1024;
    }
    let expected = TokenGrid::new(8, 10, 1024, expected).unwrap();

    // Both ends hold the masked model: the reply's image part codes the 10 cells of the region.
    let with = within(Chat::connect(
        addr,
        ChatConfig::pinned(pin)
            .with_image_tokenizer(vq())
            .with_codec(codec),
    ))
    .await
    .unwrap();
    let ev = events(
        within(with.send(Prompt::text("edit this").with_grid(image.clone())))
            .await
            .unwrap(),
    )
    .await;
    assert!(ev.contains(&ReplyEvent::Image(expected.clone())), "{ev:?}");
    let Some(ReplyEvent::End(stats)) = ev.last() else {
        panic!("no end")
    };
    let image_part = stats.received.parts.last().unwrap();
    assert_eq!(image_part.tokens, 10, "only the region travelled");
    // The edited image is in both contexts: a second edit builds on it.
    let ev = events(within(with.send(Prompt::text("again"))).await.unwrap()).await;
    let mut twice = expected.ids().to_vec();
    for id in &mut twice[..10] {
        *id = (*id + 1) % 1024;
    }
    assert!(ev.contains(&ReplyEvent::Image(
        TokenGrid::new(8, 10, 1024, twice).unwrap()
    )));

    // A client without the masked model gets the whole grid instead.
    let without = within(Chat::connect(
        addr,
        ChatConfig::pinned(pin).with_image_tokenizer(vq()),
    ))
    .await
    .unwrap();
    let ev = events(
        within(without.send(Prompt::text("edit this").with_grid(image)))
            .await
            .unwrap(),
    )
    .await;
    assert!(ev.contains(&ReplyEvent::Image(expected)));
    let Some(ReplyEvent::End(stats)) = ev.last() else {
        panic!("no end")
    };
    assert_eq!(stats.received.parts.last().unwrap().tokens, 80);
}

/// Describes the images of the last turn as text: `levels=N` per image.
struct LevelCounter;

impl Agent for LevelCounter {
    fn respond<'a>(
        &'a self,
        conversation: &'a Conversation,
        sink: &'a mut dyn ReplySink,
    ) -> AgentFuture<'a> {
        Box::pin(async move {
            let turn = conversation
                .turns
                .last()
                .ok_or(AgentError::EmptyConversation)?;
            let mut said = Vec::new();
            for c in &turn.content {
                if let Some(levels) = c.image_levels() {
                    said.push(format!("levels={}", levels.len()));
                }
            }
            sink.text_delta(&said.join(" ")).await?;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ladder_images_reach_the_agent_as_one_image_with_its_levels() {
    use unimic_codec::entropy::ladder::{Ladder, LadderModel};
    use unimic_codec::entropy::Static;
    use unimic_codec::part::CodecConfig;

    let ladder = Arc::new(
        Ladder::new(
            (2..=4)
                .map(|l| LadderModel::new(l, 1, Static::from_counts(vec![1; 1024]).unwrap()))
                .collect(),
        )
        .unwrap(),
    );
    let codec = CodecConfig::default().with_ladder(ladder);
    let (addr, pin) = start_with_codec(
        codec.clone(),
        Arc::new(LevelCounter),
        ServeOptions::default(),
    );
    let chat = within(Chat::connect(
        addr,
        ChatConfig::pinned(pin)
            .with_image_tokenizer(vq())
            .with_codec(codec),
    ))
    .await
    .unwrap();
    let levels = vec![grid(4, 6, 1), grid(4, 6, 2), grid(4, 6, 3)];
    let reply = within(
        chat.send(
            Prompt::text("two images:")
                .with_grid_levels(levels.clone())
                .with_grid(grid(4, 6, 9)),
        ),
    )
    .await
    .unwrap();
    let sent = reply.sent().clone();
    assert_eq!(within(reply.text()).await.unwrap(), "levels=3 levels=1");
    // Text, the base image, two refinement parts, the second image.
    assert_eq!(sent.parts.len(), 5);
    // A session without the ladder's models refuses a turn with refinement levels, and the
    // chat goes on.
    let plain = chat_without_ladder(addr, pin).await;
    let err = within(plain.send(Prompt::default().with_grid_levels(levels)))
        .await
        .unwrap_err();
    assert!(matches!(err, ChatError::Send(_)), "{err}");
    let ok = within(plain.send(Prompt::text("still here")))
        .await
        .unwrap();
    assert_eq!(within(ok.text()).await.unwrap(), "");
}

async fn chat_without_ladder(addr: SocketAddr, pin: CertHash) -> Chat {
    within(Chat::connect(
        addr,
        ChatConfig::pinned(pin).with_image_tokenizer(vq()),
    ))
    .await
    .unwrap()
}

/// A server with a PEM certificate a CA signed, and a client that verifies it against that CA
/// (WebPKI: chain and name) instead of pinning it; a client expecting another name is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_signed_pem_certificate_verified_by_its_roots() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let dir = std::env::temp_dir().join(format!("unimic-chat-pem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (ca, cert_path, key_path) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();

    let tls = ServerTls::from_pem_files(&cert_path, &key_path).unwrap();
    let pin = tls.identity.cert_hash();
    let server = bind("127.0.0.1:0".parse().unwrap(), tls, [vq()]).unwrap();
    let addr = server.local_addr().unwrap();
    let _task = tokio::spawn(serve_with(server, Arc::new(Echo), ServeOptions::default()));

    let roots = Roots::from_pem_file(&ca).unwrap();
    let chat = within(Chat::connect(addr, ChatConfig::webpki(roots.clone())))
        .await
        .unwrap();
    let ev = events(within(chat.send(Prompt::text("verified"))).await.unwrap()).await;
    assert_eq!(text_of(&ev), "verified");
    // The same certificate can still be pinned.
    let pinned = within(Chat::connect(addr, ChatConfig::pinned(pin)))
        .await
        .unwrap();
    let ev = events(within(pinned.send(Prompt::text("pinned"))).await.unwrap()).await;
    assert_eq!(text_of(&ev), "pinned");
    // A certificate for `localhost` does not pass as `elsewhere.example`.
    let wrong = ChatConfig::webpki(roots).with_server_name("elsewhere.example");
    assert!(matches!(
        within(Chat::connect(addr, wrong)).await,
        Err(ChatError::Connect(_))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Paints an 8×10 image row by row, pausing between rows as a sampling agent does.
struct RowPainter {
    pause: Duration,
}

impl Agent for RowPainter {
    fn respond<'a>(&'a self, _: &'a Conversation, sink: &'a mut dyn ReplySink) -> AgentFuture<'a> {
        Box::pin(async move {
            sink.text_delta("painting").await?;
            let image = grid(8, 10, 4);
            for (r, row) in image.ids().chunks(10).enumerate() {
                if !self.pause.is_zero() {
                    tokio::time::sleep(self.pause).await;
                }
                sink.image_tokens((8, 10), row, r == 7).await?;
            }
            Ok(())
        })
    }
}

/// A server streaming reply images from the first row (`stream_images_after: 0`), with the
/// generic transformer or the adaptive model: the client sees the rows grow, then the whole
/// image, and the next turn still codes against a context both ends agree on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_images_stream_row_by_row() {
    use unimic_codec::entropy::generic::{Generic, GenericConfig};
    use unimic_codec::part::CodecConfig;

    let generic = Arc::new(Generic::synthetic(&GenericConfig::tiny(1024), 5).unwrap());
    for codec in [
        CodecConfig::default().with_generic(generic),
        CodecConfig::default(),
    ] {
        let (addr, pin) = start_with_codec(
            codec.clone(),
            Arc::new(RowPainter {
                pause: Duration::from_millis(5),
            }),
            ServeOptions::default().with_stream_images_after(Some(Duration::ZERO)),
        );
        let chat = within(Chat::connect(
            addr,
            ChatConfig::pinned(pin)
                .with_image_tokenizer(vq())
                .with_codec(codec),
        ))
        .await
        .unwrap();
        let ev = events(within(chat.send(Prompt::text("paint"))).await.unwrap()).await;
        let rows: Vec<u32> = ev
            .iter()
            .filter_map(|e| match e {
                ReplyEvent::ImageRows {
                    height: 8,
                    width: 10,
                    rows,
                    ids,
                } => {
                    assert_eq!(&ids[..], &grid(8, 10, 4).ids()[..*rows as usize * 10]);
                    Some(*rows)
                }
                _ => None,
            })
            .collect();
        assert!(
            !rows.is_empty(),
            "rows arrive before the whole image: {ev:?}"
        );
        assert!(rows.windows(2).all(|w| w[0] < w[1]) && rows[rows.len() - 1] < 8);
        let images = ev.iter().filter(|e| matches!(e, ReplyEvent::Image(_)));
        assert_eq!(images.count(), 1, "{ev:?}");
        assert!(ev.contains(&ReplyEvent::Image(grid(8, 10, 4))), "{ev:?}");
        assert_eq!(text_of(&ev), "painting");
        // The context is in step: a second turn (whose reply references the first image when
        // adaptive) decodes too.
        let ev = events(within(chat.send(Prompt::text("again"))).await.unwrap()).await;
        assert!(ev.contains(&ReplyEvent::Image(grid(8, 10, 4))), "{ev:?}");
    }

    // With the default threshold an image complete at once goes whole: no rows first.
    let r = start(Arc::new(RowPainter {
        pause: Duration::ZERO,
    }));
    let chat = chat(&r).await;
    let ev = events(within(chat.send(Prompt::text("paint"))).await.unwrap()).await;
    assert!(ev.contains(&ReplyEvent::Image(grid(8, 10, 4))));
    assert!(!ev.iter().any(|e| matches!(e, ReplyEvent::ImageRows { .. })));
}

/// Paints the first half of an 8×10 image, a row at a time, and returns.
struct HalfPainter;

impl Agent for HalfPainter {
    fn respond<'a>(&'a self, c: &'a Conversation, sink: &'a mut dyn ReplySink) -> AgentFuture<'a> {
        Box::pin(async move {
            let text = match c.turns.last().and_then(|t| t.content.first()) {
                Some(Content::Text { text, .. }) => text.clone(),
                _ => String::new(),
            };
            sink.text_delta(&text).await?;
            if text == "half" {
                for row in grid(8, 10, 4).ids().chunks(10).take(4) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    sink.image_tokens((8, 10), row, false).await?;
                }
            }
            Ok(())
        })
    }
}

/// An agent that returns with its image half made fails the turn with a clear reason, whether
/// the rows so far were streamed or held back; the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_returns_with_its_image_half_made_fails_the_turn() {
    for after in [Some(Duration::ZERO), None] {
        let (addr, pin) = start_with_codec(
            unimic_codec::part::CodecConfig::default(),
            Arc::new(HalfPainter),
            ServeOptions::default().with_stream_images_after(after),
        );
        let chat = within(Chat::connect(
            addr,
            ChatConfig::pinned(pin).with_image_tokenizer(vq()),
        ))
        .await
        .unwrap();
        let reply = within(chat.send(Prompt::text("half"))).await.unwrap();
        match within(reply.text()).await {
            Err(ChatError::Agent { reason, .. }) => assert!(
                reason.contains(
                    "the agent returned, but the image begun is not complete (40 of 80 tokens)"
                ),
                "{after:?}: {reason}"
            ),
            other => panic!("{after:?}: {other:?}"),
        }
        let reply = within(chat.send(Prompt::text("still here"))).await.unwrap();
        assert_eq!(within(reply.text()).await.unwrap(), "still here");
    }
}

/// Redraws rows 2..6 of the last image (+1 on each id), handing the redrawn cells to the sink a
/// row at a time with a pause between, through `begin_edit` / `edit_tokens` when the sink takes
/// them so (else the whole edit at the end).
struct SlowEditor;

impl Agent for SlowEditor {
    fn respond<'a>(&'a self, c: &'a Conversation, sink: &'a mut dyn ReplySink) -> AgentFuture<'a> {
        Box::pin(async move {
            let (at, base) = c
                .last_image()
                .ok_or_else(|| AgentError::Unsupported("no image".into()))?;
            let w = base.width() as usize;
            let region: Vec<bool> = (0..base.len()).map(|i| (2..6).contains(&(i / w))).collect();
            let mut ids = base.ids().to_vec();
            for (id, _) in ids.iter_mut().zip(&region).filter(|(_, &r)| r) {
                *id = (*id + 1) % 1024;
            }
            let edited = TokenGrid::new(base.height(), base.width(), 1024, ids).unwrap();
            sink.text_delta("editing").await?;
            if !sink.begin_edit(at, base, &region).await? {
                return Ok(sink.image_edit(at, &edited, &region).await?);
            }
            for r in 2..6 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                sink.edit_tokens(&edited.ids()[r * w..(r + 1) * w], r == 5)
                    .await?;
            }
            Ok(())
        })
    }
}

/// An edit streamed through the serving glue (from its first row on): only the region's cells
/// travel, the client gets the whole edited grid, and a second edit builds on it; with
/// streaming off the same edit goes whole, as the same masked part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_stream_as_masked_parts() {
    use unimic_codec::entropy::masked::{Masked, MaskedConfig};
    use unimic_codec::part::CodecConfig;

    let masked = Arc::new(Masked::synthetic(&MaskedConfig::tiny(1024), 5).unwrap());
    let codec = CodecConfig::default().with_masked(masked);
    let mut part_bytes = Vec::new();
    for after in [Some(Duration::ZERO), None] {
        let (addr, pin) = start_with_codec(
            codec.clone(),
            Arc::new(SlowEditor),
            ServeOptions::default().with_stream_images_after(after),
        );
        let chat = within(Chat::connect(
            addr,
            ChatConfig::pinned(pin)
                .with_image_tokenizer(vq())
                .with_codec(codec.clone()),
        ))
        .await
        .unwrap();
        let image = grid(8, 10, 2);
        let bump = |g: &TokenGrid| {
            let ids = g
                .ids()
                .iter()
                .enumerate()
                .map(|(i, &id)| {
                    if (20..60).contains(&i) {
                        (id + 1) % 1024
                    } else {
                        id
                    }
                })
                .collect();
            TokenGrid::new(8, 10, 1024, ids).unwrap()
        };
        let ev = events(
            within(chat.send(Prompt::text("edit").with_grid(image.clone())))
                .await
                .unwrap(),
        )
        .await;
        let once = bump(&image);
        assert!(
            ev.contains(&ReplyEvent::Image(once.clone())),
            "{after:?}: {ev:?}"
        );
        // Streamed, the client draws the edit's rows on the image as they come.
        let rows: Vec<u32> = ev
            .iter()
            .filter_map(|e| match e {
                ReplyEvent::ImageRows { rows, ids, .. } => {
                    assert_eq!(&ids[..], &once.ids()[..*rows as usize * 10]);
                    Some(*rows)
                }
                _ => None,
            })
            .collect();
        assert_eq!(!rows.is_empty(), after.is_some(), "{after:?}: {ev:?}");
        assert!(rows.windows(2).all(|w| w[0] < w[1]));
        let Some(ReplyEvent::End(stats)) = ev.last() else {
            panic!("no end")
        };
        let part = stats.received.parts.last().unwrap();
        assert_eq!(part.tokens, 40, "only the region");
        part_bytes.push(part.wire_bytes);
        // Both contexts hold the edited image: the next edit builds on it.
        let ev = events(within(chat.send(Prompt::text("again"))).await.unwrap()).await;
        assert!(
            ev.contains(&ReplyEvent::Image(bump(&once))),
            "{after:?}: {ev:?}"
        );
    }
    // Streamed, the part came in four chunks (a row each), each with its frame: more bytes.
    assert!(part_bytes[0] > part_bytes[1], "{part_bytes:?}");
}

/// Images given as pixels carry codes chosen for the generic model's bits only when the session
/// codes images with that model; with a server that does not hold it, the nearest codes.
#[cfg(feature = "pixels")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pixels_take_the_generic_models_codes_only_where_the_server_codes_with_it() {
    use unimic_codec::rdo::{RdoConfig, RdoTokenizer};
    use unimic_codec::shipped;
    use unimic_codec::tokenizer::{ImageTokenizer, Taef2Tokenizer};
    use unimic_transport::SessionConfig;

    let plain = Arc::new(Taef2Tokenizer::from_dir(&Taef2Tokenizer::default_dir()).unwrap());
    let codec = shipped::codec_config(&shipped::entropy_dir(None)).unwrap();
    let generic = codec.generic.clone().expect("the generic model is shipped");
    // A strong trade, so that the chosen codes surely differ from the nearest ones.
    let rdo =
        Arc::new(RdoTokenizer::new(plain.clone(), generic, RdoConfig::with_lambda(1.0)).unwrap());
    let photo = image::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../samples/kodim23.png"
    ))
    .unwrap()
    .resize_exact(128, 128, image::imageops::FilterType::Triangle)
    .to_rgb8();
    let nearest = plain.encode(&photo).unwrap();
    let chosen = rdo.encode(&photo).unwrap();
    assert_ne!(nearest, chosen, "the test needs codes that differ");
    let info = unimic_chat::tokenizer_info(plain.as_ref()).unwrap();

    for (server_codec, generic_session, expected) in [
        (codec.clone(), true, &chosen),
        (unimic_codec::part::CodecConfig::default(), false, &nearest),
    ] {
        let (addr, pin) = start_with_session(
            SessionConfig::default()
                .with_tokenizer(info.clone())
                .with_codec(server_codec),
            Arc::new(Echo),
            ServeOptions::default(),
        );
        let config = ChatConfig::pinned(pin)
            .with_codec(codec.clone())
            .with_pixels(plain.clone())
            .unwrap()
            .with_generic_pixels(rdo.clone())
            .unwrap();
        let chat = within(Chat::connect(addr, config)).await.unwrap();
        assert_eq!(chat.images_use_generic(), generic_session);
        let ev = events(
            within(chat.send(Prompt::text("look:").with_image(photo.clone())))
                .await
                .unwrap(),
        )
        .await;
        assert!(
            ev.contains(&ReplyEvent::Image(expected.clone())),
            "generic session: {generic_session}"
        );
    }

    // The two tokenizers must mean the same tokens.
    let other = Arc::new(unimic_codec::tokenizer::Vq::default_model().unwrap());
    let err = ChatConfig::pinned(CertHash([0; 32]))
        .with_pixels(other.clone())
        .unwrap()
        .with_generic_pixels(rdo.clone())
        .unwrap_err();
    assert!(matches!(err, ChatError::Content(_)), "{err}");
    // Another pixels tokenizer afterwards drops the one for the generic model.
    let config = ChatConfig::pinned(CertHash([0; 32]))
        .with_pixels(plain.clone())
        .unwrap()
        .with_generic_pixels(rdo)
        .unwrap();
    assert!(config.generic_pixels.is_some());
    assert!(config.with_pixels(other).unwrap().generic_pixels.is_none());
}

/// Replies with what it was shown: how many turns, their bytes, how many images, and the first
/// turn's first text.
struct Recall;

impl Agent for Recall {
    fn respond<'a>(&'a self, c: &'a Conversation, sink: &'a mut dyn ReplySink) -> AgentFuture<'a> {
        Box::pin(async move {
            let bytes: usize = c
                .turns
                .iter()
                .flat_map(|t| &t.content)
                .map(content_bytes)
                .sum();
            let images = c
                .turns
                .iter()
                .flat_map(|t| &t.content)
                .filter(|x| matches!(x, Content::Image(_)))
                .count();
            let first = match c.turns.first().and_then(|t| t.content.first()) {
                Some(Content::Text { text, .. }) => text.clone(),
                _ => String::new(),
            };
            let reply = format!(
                "{} turns, {bytes} bytes, {images} images, first {first}",
                c.turns.len()
            );
            sink.text_delta(&reply).await.map_err(Into::into)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_sees_the_newest_turns_within_the_history_limits() {
    let limits = HistoryLimits {
        max_turns: 5,
        max_bytes: 3000,
    };
    let (addr, pin) = start_with_session(
        unimic_transport::SessionConfig::default().with_tokenizer(vq()),
        Arc::new(Recall),
        ServeOptions::default().with_history(limits),
    );
    let chat = within(Chat::connect(
        addr,
        ChatConfig::pinned(pin).with_image_tokenizer(vq()),
    ))
    .await
    .unwrap();
    let mut said = Vec::new();
    for i in 0..6 {
        let reply = within(chat.send(Prompt::text(format!("t{i}"))))
            .await
            .unwrap();
        said.push(within(reply.text()).await.unwrap());
    }
    // Turns so far: t0, its reply, …, t5: the agent saw t3, its reply, t4, its reply and t5.
    assert!(said[1].starts_with("3 turns,"), "{said:?}");
    assert!(
        said[2].starts_with("5 turns,") && said[2].ends_with("first t0"),
        "{said:?}"
    );
    assert!(
        said[5].starts_with("5 turns,") && said[5].ends_with("first t3"),
        "{said:?}"
    );
    // A turn with a 16×16 grid counts about 1.2 KB: in 3,000 bytes two fit, with the replies
    // between.
    for i in 0..3 {
        let prompt = Prompt::text(format!("g{i}")).with_grid(grid(16, 16, i));
        let reply = within(chat.send(prompt)).await.unwrap();
        said.push(within(reply.text()).await.unwrap());
    }
    let last = said.last().unwrap();
    assert!(
        last.starts_with("4 turns,") && last.contains(" 2 images,"),
        "{said:?}"
    );
    let bytes: usize = last.split(' ').nth(2).unwrap().parse().unwrap();
    assert!(bytes <= limits.max_bytes, "{last}");
    // The session itself goes on as usual.
    let reply = within(chat.send(Prompt::text("still here"))).await.unwrap();
    assert!(within(reply.text()).await.unwrap().ends_with("first g1"));
}

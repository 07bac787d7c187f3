//! Every agent of this crate passes the conformance suite; agents that break the contract fail
//! the check they break.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use unimic_agents::conformance::{run, Options, Report};
use unimic_agents::echo::Echo;
use unimic_agents::local::LocalAgent;
use unimic_agents::{Agent, AgentError, AgentFuture, Conversation, ReplySink};
use unimic_codec::shipped;

fn options() -> Options {
    Options::default().with_timeout(Duration::from_secs(20))
}

fn failed(report: &Report) -> Vec<&'static str> {
    report.failures().map(|c| c.name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_passes() {
    let report = run(Arc::new(Echo), &options()).await;
    assert!(report.passed(), "{report}");
    assert!(report.checks.iter().any(|c| c.name == "images_well_formed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_agent_passes() {
    let m = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/entropy");
    let agent = LocalAgent::load(
        &shipped::manifest_path(&m, shipped::MASKED_ID),
        &shipped::manifest_path(&m, shipped::TEXT_ID),
    )
    .unwrap();
    let report = run(Arc::new(agent), &options()).await;
    assert!(report.passed(), "{report}");
}

#[cfg(feature = "openai")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_adapter_passes_against_a_loopback_server() {
    use unimic_agents::openai::{OpenAiAgent, OpenAiConfig};
    let body = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openai/openai.sse"),
    )
    .unwrap();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            let body = body.clone();
            async move { ([("content-type", "text/event-stream")], body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = OpenAiConfig::new(format!("http://{addr}/v1"), "conformance")
        .with_idle_timeout(Duration::from_secs(5));
    // Without a renderer it takes no image grids, and says so in its capabilities.
    let agent = OpenAiAgent::text_only(config).unwrap();
    let report = run(Arc::new(agent), &options()).await;
    assert!(report.passed(), "{report}");
}

/// Keeps writing after its sink refused, and answers nothing it cannot take with a backend error.
struct Careless;

impl Agent for Careless {
    fn respond<'a>(&'a self, c: &'a Conversation, sink: &'a mut dyn ReplySink) -> AgentFuture<'a> {
        Box::pin(async move {
            if c.turns.is_empty() {
                return Err(AgentError::Backend("nothing to do".into()));
            }
            let _ = sink.text_delta("one").await;
            let _ = sink.text_delta("two").await;
            // An image whose chunks do not add up.
            let _ = sink.image_tokens((2, 2), &[1, 2, 3], true).await;
            Ok(())
        })
    }
}

/// Never answers.
struct Hangs;

impl Agent for Hangs {
    fn respond<'a>(&'a self, _: &'a Conversation, _: &'a mut dyn ReplySink) -> AgentFuture<'a> {
        Box::pin(std::future::pending())
    }
}

/// Panics on every turn.
struct Panics;

impl Agent for Panics {
    fn respond<'a>(&'a self, _: &'a Conversation, _: &'a mut dyn ReplySink) -> AgentFuture<'a> {
        Box::pin(async { panic!("conformance: a panicking agent") })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_that_break_the_contract_fail_the_checks_they_break() {
    let quick = Options::default().with_timeout(Duration::from_millis(300));
    let careless = run(Arc::new(Careless), &quick).await;
    let f = failed(&careless);
    for name in ["empty_conversation", "sink_refuses", "paced"] {
        assert!(f.contains(&name), "{name} should fail:\n{careless}");
    }
    let hangs = run(Arc::new(Hangs), &quick).await;
    assert!(failed(&hangs).contains(&"text_turn"), "{hangs}");
    assert!(hangs.to_string().contains("hang"), "{hangs}");
    let panics = run(Arc::new(Panics), &quick).await;
    assert!(failed(&panics).contains(&"text_turn"), "{panics}");
    assert!(panics.to_string().contains("panicked"), "{panics}");
}

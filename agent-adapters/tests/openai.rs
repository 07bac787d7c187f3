//! The OpenAI-compatible adapter against a loopback HTTP server (axum) that speaks the streaming
//! Chat Completions format, serving the fixtures in `tests/fixtures/openai/` (see the README
//! there) and scripted failures. No test needs a network except `live_endpoint`, which runs only
//! when `UNIMIC_OPENAI_BASE_URL` is set.
#![cfg(feature = "openai")]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use base64::Engine as _;
use image::RgbImage;
use serde_json::{json, Value};
use unimic_agents::openai::{
    OpenAiAgent, OpenAiConfig, OpenAiError, ENV_API_KEY, ENV_BASE_URL, ENV_MODEL,
    ENV_OPENAI_API_KEY, MAX_EVENT_BYTES,
};
use unimic_agents::{
    Agent, AgentError, CollectSink, Content, Conversation, ReplySink, Role, SinkError, SinkFuture,
    Turn,
};
use unimic_codec::grid::TokenGrid;

// ---- a scripted streaming server -----------------------------------------------------------------

/// One step of a response body.
#[derive(Clone)]
enum Step {
    /// Write these bytes as one chunk.
    Send(Bytes),
    /// Wait (lets the server flush what it wrote before the next step).
    Sleep(Duration),
    /// Never write again (and never end).
    Stall,
    /// Fail the body: the server drops the connection without ending the chunked encoding.
    Abort,
    /// Write `chunk` every `every`, forever.
    Repeat { chunk: Bytes, every: Duration },
}

#[derive(Clone)]
struct Reply {
    status: u16,
    content_type: &'static str,
    steps: Vec<Step>,
}

impl Reply {
    fn sse(steps: Vec<Step>) -> Self {
        Reply {
            status: 200,
            content_type: "text/event-stream",
            steps,
        }
    }

    fn events(events: &[&str]) -> Self {
        Reply::sse(
            events
                .iter()
                .map(|e| Step::Send(Bytes::from(format!("{e}\n\n"))))
                .collect(),
        )
    }
}

#[derive(Clone)]
struct Recorded {
    headers: HeaderMap,
    body: Value,
}

struct ServerState {
    reply: Reply,
    requests: Mutex<Vec<Recorded>>,
    /// Set when a response body is dropped (finished, or the client went away).
    body_dropped: Arc<AtomicBool>,
}

struct Server {
    base_url: String,
    state: Arc<ServerState>,
}

/// Sets its flag when the response body that owns it is dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Server {
    async fn start(reply: Reply) -> Server {
        let state = Arc::new(ServerState {
            reply,
            requests: Mutex::new(Vec::new()),
            body_dropped: Arc::new(AtomicBool::new(false)),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Server {
            base_url: format!("http://{addr}/v1"),
            state,
        }
    }

    fn config(&self) -> OpenAiConfig {
        OpenAiConfig::new(&self.base_url, "test-model")
            .with_timeout(Duration::from_secs(5))
            .with_idle_timeout(Duration::from_secs(2))
    }

    /// The requests received so far.
    fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Waits up to a second for the response body to be dropped (the client closed the
    /// connection, or the body ended).
    async fn body_dropped(&self) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(1) {
            if self.state.body_dropped.load(Ordering::SeqCst) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }
}

async fn handle(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state
        .requests
        .lock()
        .unwrap()
        .push(Recorded { headers, body });
    let steps: VecDeque<Step> = state.reply.steps.iter().cloned().collect();
    let flag = DropFlag(state.body_dropped.clone());
    let stream = futures_util::stream::unfold((steps, flag), |(mut steps, flag)| async move {
        loop {
            match steps.pop_front()? {
                Step::Send(bytes) => return Some((Ok::<_, std::io::Error>(bytes), (steps, flag))),
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Stall => std::future::pending::<()>().await,
                Step::Abort => {
                    return Some((Err(std::io::Error::other("scripted abort")), (steps, flag)))
                }
                Step::Repeat { chunk, every } => {
                    tokio::time::sleep(every).await;
                    steps.push_front(Step::Repeat {
                        chunk: chunk.clone(),
                        every,
                    });
                    return Some((Ok(chunk), (steps, flag)));
                }
            }
        }
    });
    Response::builder()
        .status(state.reply.status)
        .header(header::CONTENT_TYPE, state.reply.content_type)
        .body(Body::from_stream(stream))
        .unwrap()
}

// ---- helpers -------------------------------------------------------------------------------------

/// Records every delta as a separate call; can fail from a given call on.
#[derive(Default)]
struct RecordingSink {
    deltas: Vec<String>,
    /// Refuse the call with this index (0-based) and all later ones.
    fail_at: Option<usize>,
}

impl ReplySink for RecordingSink {
    fn text_delta<'a>(&'a mut self, delta: &'a str) -> SinkFuture<'a> {
        if self.fail_at.is_some_and(|n| self.deltas.len() >= n) {
            return Box::pin(async { Err(SinkError("receiver cancelled the turn".into())) });
        }
        self.deltas.push(delta.to_string());
        Box::pin(async { Ok(()) })
    }

    fn image_tokens<'a>(&'a mut self, _: (u32, u32), _: &'a [u32], _: bool) -> SinkFuture<'a> {
        Box::pin(async { Ok(()) })
    }
}

/// Draws each token as an 8×8 block whose colour depends on the id.
fn block_renderer(grid: &TokenGrid) -> Result<RgbImage, String> {
    Ok(RgbImage::from_fn(
        grid.width() * 8,
        grid.height() * 8,
        |x, y| {
            let id = grid.get(y / 8, x / 8);
            image::Rgb([(id * 40) as u8, (id * 90) as u8, 200])
        },
    ))
}

fn user(text: &str) -> Conversation {
    Conversation {
        turns: vec![Turn {
            role: Role::User,
            content: vec![Content::text(text)],
        }],
    }
}

fn chunk(content: &str) -> String {
    format!(
        "data: {}",
        json!({"id":"chatcmpl-t","object":"chat.completion.chunk","created":1,"model":"m",
               "choices":[{"index":0,"delta":{"content":content},"logprobs":null,"finish_reason":null}]})
    )
}

fn finish_chunk() -> String {
    format!(
        "data: {}",
        json!({"id":"chatcmpl-t","object":"chat.completion.chunk","created":1,"model":"m",
               "choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]})
    )
}

/// The fixture cut into one chunk per event (blank-line terminated, as servers flush them).
fn fixture_events(name: &str) -> Vec<Step> {
    let text = fixture(name);
    let sep = if text.contains("\r\n") {
        "\r\n\r\n"
    } else {
        "\n\n"
    };
    text.split_inclusive(sep)
        .map(|e| Step::Send(Bytes::from(e.to_string())))
        .collect()
}

/// The fixture cut into chunks of `n` bytes (splitting lines, CRLF pairs and UTF-8 characters).
fn fixture_bytes(name: &str, n: usize) -> Vec<Step> {
    fixture(name)
        .into_bytes()
        .chunks(n)
        .map(|c| Step::Send(Bytes::copy_from_slice(c)))
        .collect()
}

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/openai/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Each fixture, the deltas it must produce.
const FIXTURES: &[(&str, &[&str])] = &[
    (
        "openai.sse",
        &["The", " capital", " of", " France", " is", " Paris", "."],
    ),
    (
        "vllm.sse",
        &[
            "A",
            " red",
            " bicycle",
            " 🚲",
            " leans",
            " on",
            " a",
            " wall",
            " — 自行车",
            ".",
        ],
    ),
    (
        "ollama.sse",
        &["Hello", "!", " I", "'m", " here", " to", " help", "."],
    ),
    ("llamacpp.sse", &["Bonjour", ",", " le", " monde", " !"]),
    ("llamacpp_no_done.sse", &["Yes", ", it works", "."]),
    ("openrouter.sse", &["I am a helpf", "ul ", "assistant."]),
    (
        "sse_starlette_crlf.sse",
        &["I'm", " delighted", " to", " help", " you", " café"],
    ),
];

async fn run(
    agent: &OpenAiAgent,
    conversation: &Conversation,
) -> (Vec<String>, Result<(), OpenAiError>) {
    let mut sink = RecordingSink::default();
    let result = agent.stream_chat(conversation, &mut sink).await;
    (sink.deltas, result)
}

// ---- (1) fixtures --------------------------------------------------------------------------------

#[tokio::test]
async fn fixtures_stream_their_text_as_separate_deltas() {
    for (name, expected) in FIXTURES {
        let server = Server::start(Reply::sse(fixture_events(name))).await;
        let agent = OpenAiAgent::new(server.config(), block_renderer).unwrap();
        let mut sink = RecordingSink::default();
        agent
            .respond(&user("hi"), &mut sink)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(sink.deltas, *expected, "{name}");
    }
}

#[tokio::test]
async fn fixtures_parse_the_same_in_arbitrary_chunks() {
    for (name, expected) in FIXTURES {
        for n in [1, 5, 64] {
            let server = Server::start(Reply::sse(fixture_bytes(name, n))).await;
            let agent = OpenAiAgent::text_only(server.config()).unwrap();
            let (deltas, result) = run(&agent, &user("hi")).await;
            result.unwrap_or_else(|e| panic!("{name} in {n}-byte chunks: {e}"));
            assert_eq!(deltas, *expected, "{name} in {n}-byte chunks");
        }
    }
}

// ---- (2) the request ----------------------------------------------------------------------------

#[tokio::test]
async fn the_request_carries_roles_text_images_model_and_key() {
    let server = Server::start(Reply::sse(fixture_events("openai.sse"))).await;
    let renders = Arc::new(AtomicUsize::new(0));
    let counted = {
        let renders = renders.clone();
        move |grid: &TokenGrid| -> Result<RgbImage, String> {
            renders.fetch_add(1, Ordering::SeqCst);
            block_renderer(grid)
        }
    };
    let config = server
        .config()
        .with_api_key("sk-test-0123456789abcdef")
        .with_system_prompt("You are terse.")
        .with_max_tokens(64)
        .with_temperature(0.5);
    let agent = OpenAiAgent::new(config, counted).unwrap();
    assert!(agent.capabilities().image_input && agent.capabilities().streaming);
    assert!(!agent.capabilities().image_output);

    let grid = TokenGrid::new(2, 3, 16, vec![0, 1, 2, 3, 4, 5]).unwrap();
    let mut png = Vec::new();
    RgbImage::new(4, 4)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let conversation = Conversation {
        turns: vec![
            Turn {
                role: Role::System,
                content: vec![Content::text("Be brief.")],
            },
            Turn {
                role: Role::User,
                content: vec![
                    Content::text("What is this?"),
                    Content::Image(grid.clone()),
                    Content::Raw {
                        media_type: "image/png".into(),
                        bytes: png.clone(),
                    },
                ],
            },
            Turn {
                role: Role::Assistant,
                content: vec![
                    Content::text("A gradient. Again: "),
                    Content::Image(grid.clone()),
                ],
            },
            Turn {
                role: Role::User,
                content: vec![Content::text("And now?")],
            },
        ],
    };
    let mut sink = CollectSink::default();
    agent.respond(&conversation, &mut sink).await.unwrap();
    assert_eq!(sink.text, "The capital of France is Paris.");
    // A second turn over the same history renders nothing new.
    agent
        .respond(&conversation, &mut CollectSink::default())
        .await
        .unwrap();
    assert_eq!(renders.load(Ordering::SeqCst), 1);

    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    let r = &requests[0];
    assert_eq!(r.body, requests[1].body);
    assert_eq!(
        r.headers["authorization"],
        "Bearer sk-test-0123456789abcdef"
    );
    assert_eq!(r.headers["accept"], "text/event-stream");
    assert_eq!(r.headers["content-type"], "application/json");
    let body = &r.body;
    assert_eq!(body["model"], "test-model");
    assert_eq!(body["stream"], true);
    assert_eq!(body["max_tokens"], 64);
    assert_eq!(body["temperature"], 0.5);
    let messages = body["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["system", "system", "user", "assistant", "user"]);
    assert_eq!(messages[0]["content"], "You are terse.");
    assert_eq!(messages[1]["content"], "Be brief.");
    assert_eq!(
        messages[3]["content"],
        "A gradient. Again: [image 3x2 tokens]"
    );
    assert_eq!(
        messages[4]["content"],
        json!([{"type": "text", "text": "And now?"}])
    );

    let parts = messages[2]["content"].as_array().unwrap();
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[0], json!({"type": "text", "text": "What is this?"}));
    assert_eq!(parts[1]["type"], "image_url");
    let url = parts[1]["image_url"]["url"].as_str().unwrap();
    let b64 = url
        .strip_prefix("data:image/jpeg;base64,")
        .expect("a JPEG data URL");
    let jpeg = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let decoded = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (3 * 8, 2 * 8));
    let url = parts[2]["image_url"]["url"].as_str().unwrap();
    let b64 = url
        .strip_prefix("data:image/png;base64,")
        .expect("a PNG data URL");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
        png
    );

    // Without a key there is no Authorization header, and no optional fields.
    let server = Server::start(Reply::sse(fixture_events("openai.sse"))).await;
    let agent = OpenAiAgent::text_only(server.config()).unwrap();
    assert!(!agent.capabilities().image_input);
    agent
        .respond(&user("hi"), &mut CollectSink::default())
        .await
        .unwrap();
    let requests = server.requests();
    assert!(requests[0].headers.get("authorization").is_none());
    assert!(requests[0].body.get("max_tokens").is_none());
    assert!(requests[0].body.get("temperature").is_none());
    assert_eq!(requests[0].body["messages"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn content_it_cannot_send_is_refused_before_any_request() {
    let server = Server::start(Reply::sse(fixture_events("openai.sse"))).await;
    let agent = OpenAiAgent::new(server.config(), block_renderer).unwrap();
    let raw = Conversation {
        turns: vec![Turn {
            role: Role::User,
            content: vec![Content::Raw {
                media_type: "application/pdf".into(),
                bytes: vec![1, 2, 3],
            }],
        }],
    };
    let err = agent
        .respond(&raw, &mut CollectSink::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AgentError::Unsupported(m) if m.contains("application/pdf")),
        "{err}"
    );

    let failing = OpenAiAgent::new(
        server.config(),
        |_: &TokenGrid| -> Result<RgbImage, String> { Err("decoder weights missing".into()) },
    )
    .unwrap();
    let image = Conversation {
        turns: vec![Turn {
            role: Role::User,
            content: vec![Content::Image(TokenGrid::new(1, 1, 4, vec![0]).unwrap())],
        }],
    };
    let err = failing
        .respond(&image, &mut CollectSink::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AgentError::Backend(m) if m.contains("decoder weights missing")),
        "{err}"
    );

    let text_only = OpenAiAgent::text_only(server.config()).unwrap();
    let err = text_only
        .respond(&image, &mut CollectSink::default())
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Unsupported(_)), "{err}");

    let err = agent
        .respond(&Conversation::default(), &mut CollectSink::default())
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::EmptyConversation));
    assert!(server.requests().is_empty());
}

// ---- (3) HTTP errors ----------------------------------------------------------------------------

#[tokio::test]
async fn http_errors_carry_status_and_server_message() {
    const KEY: &str = "sk-test-0123456789abcdef";
    let cases: &[(u16, &str, &str, &str)] = &[
        (
            401,
            "application/json",
            r#"{"error":{"message":"Incorrect API key provided: sk-test-0123456789abcdef. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
            "Incorrect API key provided: <redacted>.",
        ),
        (
            429,
            "application/json",
            r#"{"error":{"message":"Rate limit reached for gpt-4o-mini in organization org-x on requests per min (RPM): Limit 3, Used 3, Requested 1.","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
            "Rate limit reached for gpt-4o-mini",
        ),
        (
            500,
            "application/json",
            r#"{"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}"#,
            "The server had an error while processing your request.",
        ),
        (
            404,
            "application/json; charset=utf-8",
            r#"{"error":{"code":404,"message":"model 'llava:13b' not found","type":"not_found_error"}}"#,
            "model 'llava:13b' not found",
        ),
        (
            502,
            "text/html",
            "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
            "502 Bad Gateway",
        ),
    ];
    for (status, content_type, body, message) in cases {
        let server = Server::start(Reply {
            status: *status,
            content_type,
            steps: vec![Step::Send(Bytes::from(*body))],
        })
        .await;
        let agent = OpenAiAgent::text_only(server.config().with_api_key(KEY)).unwrap();
        let err = agent
            .respond(&user("hi"), &mut CollectSink::default())
            .await
            .unwrap_err();
        let AgentError::Backend(text) = &err else {
            panic!("{status}: {err:?}")
        };
        assert!(text.contains(&format!("HTTP {status}")), "{text}");
        assert!(text.contains(message), "{text}");
        assert!(!text.contains(KEY), "{text}");
        let (_, typed) = run(&agent, &user("hi")).await;
        assert!(
            matches!(typed, Err(OpenAiError::Status { status: s, message: Some(_) }) if s == *status)
        );
    }

    // A long message is cut.
    let long = format!(r#"{{"error":{{"message":"{}"}}}}"#, "x".repeat(5000));
    let server = Server::start(Reply {
        status: 400,
        content_type: "application/json",
        steps: vec![Step::Send(Bytes::from(long))],
    })
    .await;
    let agent = OpenAiAgent::text_only(server.config()).unwrap();
    let (_, result) = run(&agent, &user("hi")).await;
    let err = result.unwrap_err().to_string();
    assert!(err.len() < 400 && err.ends_with('…'), "{err}");
}

#[tokio::test]
async fn a_response_that_is_not_an_event_stream_is_an_error() {
    // A server that ignored "stream": true and sent a whole completion.
    let server = Server::start(Reply {
        status: 200,
        content_type: "application/json",
        steps: vec![Step::Send(Bytes::from_static(
            br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#,
        ))],
    })
    .await;
    let agent = OpenAiAgent::text_only(server.config()).unwrap();
    let (_, result) = run(&agent, &user("hi")).await;
    match result {
        Err(e @ OpenAiError::NotEventStream { .. }) => {
            assert!(e.to_string().contains("application/json"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

// ---- (4) errors inside the stream ---------------------------------------------------------------

#[tokio::test]
async fn an_error_object_in_the_stream_is_reported() {
    let first = chunk("Partial");
    // OpenAI / vLLM (current) / llama.cpp (current): a data event with an error object, then
    // [DONE]; older vLLM: the error fields at the top level; older llama.cpp: an `error:` field;
    // servers that name the event.
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                first.clone(),
                r#"data: {"error":{"message":"CUDA out of memory","type":"InternalServerError","param":null,"code":500}}"#.into(),
                "data: [DONE]".into(),
            ],
            "CUDA out of memory",
        ),
        (
            vec![
                first.clone(),
                r#"data: {"object":"error","message":"This model's maximum context length is 4096 tokens.","type":"BadRequestError","param":null,"code":400}"#.into(),
                "data: [DONE]".into(),
            ],
            "maximum context length is 4096 tokens",
        ),
        (
            vec![
                first.clone(),
                r#"error: {"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error"}"#.into(),
                "data: [DONE]".into(),
            ],
            "exceeds the available context size",
        ),
        (
            vec![
                first.clone(),
                "event: error\ndata: {\"error\":{\"message\":\"upstream provider failed\",\"code\":502}}".into(),
            ],
            "upstream provider failed",
        ),
    ];
    for (events, message) in cases {
        let events: Vec<&str> = events.iter().map(String::as_str).collect();
        let server = Server::start(Reply::events(&events)).await;
        let agent = OpenAiAgent::text_only(server.config()).unwrap();
        let (deltas, result) = run(&agent, &user("hi")).await;
        assert_eq!(deltas, ["Partial"]);
        match result {
            Err(OpenAiError::InStream(m)) => assert!(m.contains(message), "{m}"),
            other => panic!("{message}: {other:?}"),
        }
        let err = AgentError::from(OpenAiError::InStream(message.into())).to_string();
        assert!(err.contains("mid-stream") && err.contains(message), "{err}");
    }
}

// ---- (5) malformed data -------------------------------------------------------------------------

#[tokio::test]
async fn malformed_json_in_a_data_line_is_an_error() {
    for bad in [
        r#"data: {"choices":[{"index":0,"delta":{"content":"Hi"}"#,
        "data: not json",
        r#"data: {"choices":[{"index":0,"delta":{"content":["not","a","string"]}}]}"#,
    ] {
        let server = Server::start(Reply::events(&[&chunk("ok"), bad, "data: [DONE]"])).await;
        let agent = OpenAiAgent::text_only(server.config()).unwrap();
        let (deltas, result) = run(&agent, &user("hi")).await;
        assert_eq!(deltas, ["ok"]);
        match result {
            Err(e @ OpenAiError::MalformedJson { .. }) => {
                assert!(e.to_string().contains("malformed JSON"), "{e}")
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn invalid_utf8_and_oversized_events_are_errors() {
    let server = Server::start(Reply::sse(vec![Step::Send(Bytes::from_static(
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\xff\xfe\"}}]}\n\n",
    ))]))
    .await;
    let agent = OpenAiAgent::text_only(server.config()).unwrap();
    let (_, result) = run(&agent, &user("hi")).await;
    assert!(
        matches!(result, Err(OpenAiError::MalformedSse(_))),
        "{result:?}"
    );

    // An event larger than the cap fails without buffering the rest; the server's body is
    // dropped.
    let big = Bytes::from(vec![b'a'; 64 << 10]);
    let mut steps = vec![Step::Send(Bytes::from_static(b"data: "))];
    steps.extend(std::iter::repeat_n(
        Step::Send(big),
        MAX_EVENT_BYTES / (64 << 10) + 1,
    ));
    steps.push(Step::Stall);
    let server = Server::start(Reply::sse(steps)).await;
    let agent = OpenAiAgent::text_only(server.config()).unwrap();
    let (_, result) = run(&agent, &user("hi")).await;
    assert!(
        matches!(result, Err(OpenAiError::EventTooLarge { limit }) if limit == MAX_EVENT_BYTES),
        "{result:?}"
    );
    assert!(server.body_dropped().await);
}

// ---- (6) the connection closes early ------------------------------------------------------------

#[tokio::test]
async fn a_stream_that_ends_early_is_an_error() {
    // The body ends cleanly, but without [DONE] or a finish_reason.
    let server = Server::start(Reply::events(&[&chunk("Hel"), &chunk("lo")])).await;
    let agent = OpenAiAgent::text_only(server.config()).unwrap();
    let (deltas, result) = run(&agent, &user("hi")).await;
    assert_eq!(deltas, ["Hel", "lo"]);
    assert!(matches!(result, Err(OpenAiError::Truncated)), "{result:?}");
    assert!(AgentError::from(OpenAiError::Truncated)
        .to_string()
        .contains("closed mid-stream"));

    // The server drops the connection mid-body.
    let server = Server::start(Reply::sse(vec![
        Step::Send(Bytes::from(format!("{}\n\n", chunk("Hel")))),
        Step::Send(Bytes::from_static(b"data: {\"choi")),
        Step::Sleep(Duration::from_millis(20)),
        Step::Abort,
    ]))
    .await;
    let agent = OpenAiAgent::text_only(server.config()).unwrap();
    let (deltas, result) = run(&agent, &user("hi")).await;
    assert_eq!(deltas, ["Hel"]);
    assert!(matches!(result, Err(OpenAiError::Read(_))), "{result:?}");

    // After a finish_reason, a dropped connection is the end of a complete reply.
    let server = Server::start(Reply::sse(vec![
        Step::Send(Bytes::from(format!(
            "{}\n\n{}\n\n",
            chunk("Done"),
            finish_chunk()
        ))),
        Step::Sleep(Duration::from_millis(20)),
        Step::Abort,
    ]))
    .await;
    let agent = OpenAiAgent::text_only(server.config()).unwrap();
    let (deltas, result) = run(&agent, &user("hi")).await;
    assert_eq!(deltas, ["Done"]);
    result.unwrap();
}

#[tokio::test]
async fn an_unreachable_server_is_a_connect_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let agent = OpenAiAgent::text_only(OpenAiConfig::new(
        format!("http://127.0.0.1:{port}/v1"),
        "m",
    ))
    .unwrap();
    let (_, result) = run(&agent, &user("hi")).await;
    match result {
        Err(e @ OpenAiError::Connect { .. }) => {
            assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

// ---- (7) timeouts -------------------------------------------------------------------------------

#[tokio::test]
async fn a_stalled_stream_hits_the_idle_timeout() {
    let server = Server::start(Reply::sse(vec![
        Step::Send(Bytes::from(format!("{}\n\n", chunk("Thinking")))),
        Step::Stall,
    ]))
    .await;
    let config = server
        .config()
        .with_idle_timeout(Duration::from_millis(200))
        .with_timeout(Duration::from_secs(5));
    let agent = OpenAiAgent::text_only(config).unwrap();
    let start = Instant::now();
    let (deltas, result) = run(&agent, &user("hi")).await;
    let elapsed = start.elapsed();
    assert_eq!(deltas, ["Thinking"]);
    assert!(
        matches!(result, Err(OpenAiError::IdleTimeout(d)) if d == Duration::from_millis(200)),
        "{result:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(1),
        "{elapsed:?}"
    );
    assert!(server.body_dropped().await, "the connection was not closed");
}

#[tokio::test]
async fn a_trickling_stream_hits_the_request_timeout() {
    let server = Server::start(Reply::sse(vec![Step::Repeat {
        chunk: Bytes::from(format!("{}\n\n", chunk("."))),
        every: Duration::from_millis(20),
    }]))
    .await;
    let config = server
        .config()
        .with_idle_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_millis(300));
    let agent = OpenAiAgent::text_only(config).unwrap();
    let start = Instant::now();
    let (deltas, result) = run(&agent, &user("hi")).await;
    assert!(!deltas.is_empty());
    assert!(
        matches!(result, Err(OpenAiError::Timeout(d)) if d == Duration::from_millis(300)),
        "{result:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(server.body_dropped().await, "the connection was not closed");
}

// ---- (8) the receiver goes away -----------------------------------------------------------------

#[tokio::test]
async fn a_sink_error_stops_the_request() {
    let server = Server::start(Reply::sse(vec![Step::Repeat {
        chunk: Bytes::from(format!("{}\n\n", chunk("tick"))),
        every: Duration::from_millis(10),
    }]))
    .await;
    let agent = OpenAiAgent::text_only(server.config()).unwrap();
    let mut sink = RecordingSink {
        fail_at: Some(1),
        ..Default::default()
    };
    let start = Instant::now();
    let err = agent.respond(&user("hi"), &mut sink).await.unwrap_err();
    assert!(matches!(err, AgentError::Sink(_)), "{err:?}");
    assert_eq!(sink.deltas, ["tick"]);
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(server.body_dropped().await, "the connection was not closed");
}

#[tokio::test]
async fn dropping_the_reply_future_closes_the_connection() {
    let server = Server::start(Reply::sse(vec![Step::Repeat {
        chunk: Bytes::from(format!("{}\n\n", chunk("tick"))),
        every: Duration::from_millis(10),
    }]))
    .await;
    let agent = OpenAiAgent::text_only(server.config()).unwrap();
    let mut sink = RecordingSink::default();
    let conversation = user("hi");
    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        agent.respond(&conversation, &mut sink),
    )
    .await;
    assert!(cancelled.is_err(), "the endless reply ended");
    assert!(!sink.deltas.is_empty());
    assert!(server.body_dropped().await, "the connection was not closed");
}

// ---- (9) configuration --------------------------------------------------------------------------

#[test]
fn from_env_names_the_missing_variable_and_reads_the_key() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    };
    let err = OpenAiConfig::from_env_with(env(&[])).unwrap_err();
    assert!(matches!(err, OpenAiError::MissingEnv(v) if v == ENV_BASE_URL));
    assert!(err.to_string().contains("UNIMIC_OPENAI_BASE_URL"), "{err}");
    let err = OpenAiConfig::from_env_with(env(&[(ENV_BASE_URL, "http://h/v1"), (ENV_MODEL, " ")]))
        .unwrap_err();
    assert!(err.to_string().contains("UNIMIC_OPENAI_MODEL"), "{err}");

    let config = OpenAiConfig::from_env_with(env(&[
        (ENV_BASE_URL, "http://localhost:11434/v1"),
        (ENV_MODEL, "qwen2.5vl:7b"),
    ]))
    .unwrap();
    assert_eq!(config.base_url, "http://localhost:11434/v1");
    assert_eq!(config.model, "qwen2.5vl:7b");
    assert_eq!(config.api_key, None);
    assert_eq!(config.timeout, Duration::from_secs(120));
    assert_eq!(config.idle_timeout, Duration::from_secs(60));
    assert_eq!(config.jpeg_quality, 90);

    let config = OpenAiConfig::from_env_with(env(&[
        (ENV_BASE_URL, "https://api.openai.com/v1"),
        (ENV_MODEL, "gpt-4o-mini"),
        (ENV_OPENAI_API_KEY, "sk-fallback-secret"),
    ]))
    .unwrap();
    assert_eq!(config.api_key.as_deref(), Some("sk-fallback-secret"));
    let config = OpenAiConfig::from_env_with(env(&[
        (ENV_BASE_URL, "https://api.openai.com/v1"),
        (ENV_MODEL, "gpt-4o-mini"),
        (ENV_API_KEY, "sk-unimic-secret"),
        (ENV_OPENAI_API_KEY, "sk-fallback-secret"),
    ]))
    .unwrap();
    assert_eq!(config.api_key.as_deref(), Some("sk-unimic-secret"));

    let debug = format!("{config:?}");
    assert!(!debug.contains("sk-unimic-secret"), "{debug}");
    assert!(
        debug.contains("<redacted>") && debug.contains("gpt-4o-mini"),
        "{debug}"
    );
    let agent = OpenAiAgent::text_only(config).unwrap();
    let debug = format!("{agent:?}");
    assert!(!debug.contains("sk-unimic-secret"), "{debug}");

    let err = OpenAiAgent::text_only(OpenAiConfig::new("localhost:11434", "m")).unwrap_err();
    assert!(matches!(err, OpenAiError::InvalidBaseUrl(_)), "{err}");
}

// ---- (10) a live server, when one is configured -------------------------------------------------

#[tokio::test]
async fn live_endpoint() {
    if std::env::var_os(ENV_BASE_URL).is_none() {
        println!(
            "skip: {ENV_BASE_URL} is not set (set it and {ENV_MODEL} to run against a live server)"
        );
        return;
    }
    let config = OpenAiConfig::from_env()
        .expect("UNIMIC_OPENAI_* variables")
        .with_max_tokens(32)
        .with_temperature(0.0);
    let agent = OpenAiAgent::new(config, block_renderer).unwrap();
    let mut sink = RecordingSink::default();
    agent
        .respond(&user("Reply with the single word: pong"), &mut sink)
        .await
        .unwrap_or_else(|e| panic!("{} ({}): {e}", agent.endpoint(), agent.config().model));
    let text = sink.deltas.concat();
    println!(
        "live {} ({}): {} deltas: {text:?}",
        agent.endpoint(),
        agent.config().model,
        sink.deltas.len()
    );
    assert!(!text.trim().is_empty());
}

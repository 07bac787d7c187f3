//! [`OpenAiAgent`]: an agent backed by any server that speaks the OpenAI Chat Completions API
//! with streaming (`POST {base_url}/chat/completions` with `"stream": true`): OpenAI itself, vLLM,
//! Ollama (`http://localhost:11434/v1`), llama.cpp's `llama-server`, LM Studio, OpenRouter and
//! the like. Enabled by the crate feature `openai`.
//!
//! Each call to [`Agent::respond`] sends the whole [`Conversation`] (the API is stateless):
//!
//! - turns map to `messages` by role (`system`, `user`, `assistant`), after
//!   [`OpenAiConfig::system_prompt`] when one is set;
//! - user text becomes `{"type":"text"}` content parts; a [`Content::Image`] token grid is turned
//!   into pixels by the [`GridRenderer`] the agent was built with (the caller's image tokenizer;
//!   this crate knows no model), encoded as JPEG and sent as an `image_url` data URL; a
//!   [`Content::Raw`] PNG or JPEG goes as a data URL as it is;
//! - assistant turns go as plain strings (their images as a short `[image WxH tokens]`
//!   placeholder), system turns as plain strings (text only).
//!
//! The reply is read as server-sent events (parsed with `eventsource-stream`) and every
//! `choices[0].delta.content` is handed to [`ReplySink::text_delta`] as it arrives, awaiting each
//! call (so a slow receiver slows the read: backpressure). Role-only deltas, empty content,
//! reasoning deltas (`reasoning_content`, `reasoning`), usage-only chunks and SSE comments
//! (keep-alives such as OpenRouter's `: OPENROUTER PROCESSING`) are skipped. The reply ends at
//! `data: [DONE]`, or when the connection closes after a chunk that carried a `finish_reason`
//! (servers that do not send `[DONE]`).
//!
//! Failures come back as [`OpenAiError`] from [`OpenAiAgent::stream_chat`], and through the
//! [`Agent`] trait as [`AgentError::Backend`] with the same text (sink errors stay
//! [`AgentError::Sink`], unsupported content [`AgentError::Unsupported`]): an HTTP status with the
//! server's `error.message`, an error object sent inside the stream (OpenAI, vLLM, llama.cpp and
//! OpenRouter do that, and older llama.cpp builds send an `error:` SSE field), malformed SSE or
//! JSON, a connect, idle or whole-request timeout, a stream that ends early, a response that is
//! not an event stream. The API key is sent as `Authorization: Bearer …` and never appears in
//! `Debug` output or error messages.
//!
//! Memory is bounded: one SSE event may hold at most [`MAX_EVENT_BYTES`], an error body is read up
//! to [`MAX_ERROR_BODY_BYTES`]. Dropping the future returned by `respond` closes the connection;
//! the adapter spawns no task of its own. Image rendering and JPEG encoding run on the calling
//! task (a slow renderer blocks it for that long); the last few rendered images are cached, so
//! a long conversation does not re-render its history on every turn.
//!
//! HTTPS uses rustls with `ring` and the operating system's root certificates; the
//! `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` environment variables are honoured except for loopback
//! servers, which are always reached directly.
//!
//! ```no_run
//! use image::RgbImage;
//! use unimic_agents::openai::{OpenAiAgent, OpenAiConfig};
//! use unimic_agents::{Agent, CollectSink, Content, Conversation, Role, Turn};
//! use unimic_codec::grid::TokenGrid;
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // UNIMIC_OPENAI_BASE_URL (e.g. http://localhost:11434/v1), UNIMIC_OPENAI_MODEL and optionally
//! // UNIMIC_OPENAI_API_KEY (or OPENAI_API_KEY); or build one with OpenAiConfig::new(url, model).
//! let config = OpenAiConfig::from_env()?.with_max_tokens(256);
//! // The renderer turns an image token grid into pixels: in a real deployment a closure over the
//! // session's image tokenizer; a flat grey picture stands in here.
//! let agent = OpenAiAgent::new(config, |grid: &TokenGrid| -> Result<RgbImage, String> {
//!     Ok(RgbImage::from_pixel(grid.width() * 16, grid.height() * 16, image::Rgb([128, 128, 128])))
//! })?;
//! let conversation = Conversation {
//!     turns: vec![Turn {
//!         role: Role::User,
//!         content: vec![
//!             Content::text("What is in this picture?"),
//!             Content::Image(TokenGrid::new(2, 2, 16, vec![1, 2, 3, 4])?),
//!         ],
//!     }],
//! };
//! let mut sink = CollectSink::default();
//! agent.respond(&conversation, &mut sink).await?;
//! println!("{}", sink.text);
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use eventsource_stream::{EventStream, EventStreamError};
use futures_util::{Stream, StreamExt};
use image::RgbImage;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use unimic_codec::grid::TokenGrid;

use crate::{
    Agent, AgentError, AgentFuture, Capabilities, Content, Conversation, ReplySink, Role,
    SinkError, Turn,
};

/// Environment variable with the server's base URL, e.g. `http://localhost:11434/v1` (required
/// by [`OpenAiConfig::from_env`]).
pub const ENV_BASE_URL: &str = "UNIMIC_OPENAI_BASE_URL";
/// Environment variable with the model name (required by [`OpenAiConfig::from_env`]).
pub const ENV_MODEL: &str = "UNIMIC_OPENAI_MODEL";
/// Environment variable with the API key (optional; [`ENV_OPENAI_API_KEY`] is the fallback).
pub const ENV_API_KEY: &str = "UNIMIC_OPENAI_API_KEY";
/// The conventional OpenAI key variable, read when [`ENV_API_KEY`] is not set.
pub const ENV_OPENAI_API_KEY: &str = "OPENAI_API_KEY";

/// Default limit on a whole request, from sending it to the end of the stream.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default limit on establishing the connection (TCP and TLS).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit on silence between two reads of the stream (keep-alive comments count).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default JPEG quality for rendered images.
pub const DEFAULT_JPEG_QUALITY: u8 = 90;

/// The most bytes one server-sent event may hold (its lines without their terminators); a larger
/// event fails the request with [`OpenAiError::EventTooLarge`].
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// The most bytes read of an error response's body (and of an `error:` field in the stream).
pub const MAX_ERROR_BODY_BYTES: usize = 64 << 10;

/// Server messages quoted in errors are cut to this many characters.
const MAX_MESSAGE_CHARS: usize = 300;
/// Rendered images kept, as data URLs, so a conversation's history is not re-rendered each turn.
const IMAGE_CACHE_ENTRIES: usize = 16;
/// After `[DONE]`, how long to wait for the body's end so the connection can be reused.
const DRAIN_AFTER_DONE: Duration = Duration::from_millis(100);

/// Turns an image token grid into pixels: the receiving side's image tokenizer (decoder).
///
/// Implemented for every `Fn(&TokenGrid) -> Result<RgbImage, String> + Send + Sync` closure, so
/// the caller can pass a closure over the project's tokenizer; this crate knows no model. The
/// error string is reported in [`OpenAiError::Render`].
pub trait GridRenderer: Send + Sync {
    /// Renders `grid` as an RGB image.
    fn render(&self, grid: &TokenGrid) -> Result<RgbImage, String>;

    /// Renders an image sent as a quality ladder ([`Content::ImageLevels`]: the base grid, then
    /// refinement levels). The default draws the base grid alone; [`LevelsRenderer`] draws
    /// every level.
    fn render_levels(&self, levels: &[TokenGrid]) -> Result<RgbImage, String> {
        let base = levels
            .first()
            .ok_or_else(|| "an image without levels".to_string())?;
        self.render(base)
    }
}

/// A [`GridRenderer`] from a closure over every level of an image (for example the tokenizer's
/// `decode_levels`): a plain grid is drawn as a ladder of one level.
///
/// ```
/// use image::RgbImage;
/// use unimic_agents::openai::{GridRenderer, LevelsRenderer};
/// use unimic_codec::grid::TokenGrid;
/// let r = LevelsRenderer(|levels: &[TokenGrid]| -> Result<RgbImage, String> {
///     Ok(RgbImage::new(levels.len() as u32, 1))
/// });
/// let g = TokenGrid::new(1, 1, 4, vec![0]).unwrap();
/// assert_eq!(r.render_levels(&[g.clone(), g.clone()]).unwrap().width(), 2);
/// assert_eq!(r.render(&g).unwrap().width(), 1);
/// ```
pub struct LevelsRenderer<F>(pub F);

impl<F> GridRenderer for LevelsRenderer<F>
where
    F: Fn(&[TokenGrid]) -> Result<RgbImage, String> + Send + Sync,
{
    fn render(&self, grid: &TokenGrid) -> Result<RgbImage, String> {
        (self.0)(std::slice::from_ref(grid))
    }

    fn render_levels(&self, levels: &[TokenGrid]) -> Result<RgbImage, String> {
        (self.0)(levels)
    }
}

impl<F> GridRenderer for F
where
    F: Fn(&TokenGrid) -> Result<RgbImage, String> + Send + Sync,
{
    fn render(&self, grid: &TokenGrid) -> Result<RgbImage, String> {
        self(grid)
    }
}

/// How to reach an OpenAI-compatible server and what to ask it.
///
/// Build one with [`OpenAiConfig::new`] and the `with_*` methods, or [`OpenAiConfig::from_env`].
/// `Debug` shows whether a key is set, never the key.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct OpenAiConfig {
    /// The API's base URL, up to and including the version, e.g. `https://api.openai.com/v1`
    /// or `http://localhost:11434/v1`; `/chat/completions` is appended (unless the URL already
    /// ends with it).
    pub base_url: String,
    /// The model name, as the server knows it.
    pub model: String,
    /// Sent as `Authorization: Bearer …` when set.
    pub api_key: Option<String>,
    /// Limit on the whole request, from sending it to the end of the stream (time spent waiting
    /// on a slow reply sink included).
    pub timeout: Duration,
    /// Limit on establishing the connection.
    pub connect_timeout: Duration,
    /// Limit on silence between two reads of the response body (between SSE events, keep-alive
    /// comments included). The wait for the response headers (a server loading its model, say)
    /// counts only against [`OpenAiConfig::timeout`].
    pub idle_timeout: Duration,
    /// `max_tokens` for the reply, when set.
    pub max_tokens: Option<u32>,
    /// Sampling `temperature`, when set.
    pub temperature: Option<f32>,
    /// JPEG quality (1–100) for rendered images.
    pub jpeg_quality: u8,
    /// A system message sent before the conversation's turns, when set.
    pub system_prompt: Option<String>,
}

impl OpenAiConfig {
    /// A configuration for `model` on the server at `base_url`, with no key and the default
    /// timeouts ([`DEFAULT_TIMEOUT`], [`DEFAULT_CONNECT_TIMEOUT`], [`DEFAULT_IDLE_TIMEOUT`]).
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        OpenAiConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_tokens: None,
            temperature: None,
            jpeg_quality: DEFAULT_JPEG_QUALITY,
            system_prompt: None,
        }
    }

    /// Reads [`ENV_BASE_URL`] and [`ENV_MODEL`] (both required) and [`ENV_API_KEY`] (optional,
    /// falling back to [`ENV_OPENAI_API_KEY`]). An empty variable counts as unset. Fails with
    /// [`OpenAiError::MissingEnv`] naming the first missing variable.
    pub fn from_env() -> Result<Self, OpenAiError> {
        Self::from_env_with(|name| std::env::var(name).ok())
    }

    /// [`OpenAiConfig::from_env`] with the variables looked up by `lookup` instead of in the
    /// process environment (for tests and for callers with their own configuration source).
    pub fn from_env_with(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, OpenAiError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let base_url = get(ENV_BASE_URL).ok_or(OpenAiError::MissingEnv(ENV_BASE_URL))?;
        let model = get(ENV_MODEL).ok_or(OpenAiError::MissingEnv(ENV_MODEL))?;
        let mut config = OpenAiConfig::new(base_url, model);
        config.api_key = get(ENV_API_KEY).or_else(|| get(ENV_OPENAI_API_KEY));
        Ok(config)
    }

    /// Sets the API key.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Sets the limit on the whole request.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the limit on establishing the connection.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the limit on silence between reads of the stream.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets `max_tokens`.
    pub fn with_max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }

    /// Sets the sampling temperature.
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// Sets the JPEG quality of rendered images (clamped to 1–100).
    pub fn with_jpeg_quality(mut self, quality: u8) -> Self {
        self.jpeg_quality = quality.clamp(1, 100);
        self
    }

    /// Sets a system message sent before the conversation.
    pub fn with_system_prompt(mut self, prompt: impl Into<String>) -> Self {
        self.system_prompt = Some(prompt.into());
        self
    }
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_tokens", &self.max_tokens)
            .field("temperature", &self.temperature)
            .field("jpeg_quality", &self.jpeg_quality)
            .field("system_prompt", &self.system_prompt)
            .finish()
    }
}

/// Why the OpenAI-compatible adapter failed. Converts into [`AgentError`] (see the module docs).
/// No variant carries the API key.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OpenAiError {
    /// A required environment variable is not set (or empty).
    #[error("environment variable {0} is not set")]
    MissingEnv(&'static str),
    /// The base URL is not an absolute `http` or `https` URL.
    #[error("invalid base URL: {0}")]
    InvalidBaseUrl(String),
    /// The HTTP client could not be built (for example the TLS roots could not be loaded).
    #[error("could not set up the HTTP client: {0}")]
    Client(String),
    /// The conversation has no turns.
    #[error("the conversation is empty")]
    EmptyConversation,
    /// The conversation holds something this adapter cannot send.
    #[error("{0}")]
    Unsupported(String),
    /// The renderer failed on an image grid, or its image could not be encoded.
    #[error("could not render an image for the request: {0}")]
    Render(String),
    /// The connection could not be established.
    #[error("could not connect to {endpoint}: {detail}")]
    Connect {
        /// The endpoint (without credentials or query).
        endpoint: String,
        /// What failed.
        detail: String,
    },
    /// Establishing the connection took longer than [`OpenAiConfig::connect_timeout`].
    #[error("connecting to {endpoint} timed out after {after:?}")]
    ConnectTimeout {
        /// The endpoint (without credentials or query).
        endpoint: String,
        /// The limit that ran out.
        after: Duration,
    },
    /// Sending the request failed after connecting.
    #[error("request to {endpoint} failed: {detail}")]
    Request {
        /// The endpoint (without credentials or query).
        endpoint: String,
        /// What failed.
        detail: String,
    },
    /// The server answered with a status other than 2xx.
    #[error("the server answered HTTP {status}{}{}", reason_suffix(*.status), message_suffix(.message))]
    Status {
        /// The HTTP status code.
        status: u16,
        /// The server's `error.message` (or the start of its body), cut to about 300 characters.
        message: Option<String>,
    },
    /// The server answered 2xx with something other than `text/event-stream` (for example a
    /// server that ignored `"stream": true`, or a proxy's HTML page).
    #[error("the server answered {content_type} instead of an event stream (text/event-stream){}", message_suffix(.message))]
    NotEventStream {
        /// The response's content type (`none` when absent).
        content_type: String,
        /// The server's error message or the start of its body, when there is one.
        message: Option<String>,
    },
    /// The server reported an error inside the stream (a `{"error": …}` data event, an
    /// `event: error`, or llama.cpp's `error:` field).
    #[error("the server reported an error mid-stream: {0}")]
    InStream(String),
    /// The byte stream is not valid server-sent events (or not valid UTF-8).
    #[error("malformed event stream: {0}")]
    MalformedSse(String),
    /// A `data:` line is not the JSON of a chat completion chunk.
    #[error("malformed JSON in a data line ({detail}): {excerpt}")]
    MalformedJson {
        /// What the JSON parser said.
        detail: String,
        /// The start of the offending data.
        excerpt: String,
    },
    /// One server-sent event exceeded [`MAX_EVENT_BYTES`].
    #[error("a server-sent event exceeded {limit} bytes")]
    EventTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The server sent nothing for [`OpenAiConfig::idle_timeout`].
    #[error("the server sent nothing for {0:?} (idle timeout)")]
    IdleTimeout(Duration),
    /// The whole request took longer than [`OpenAiConfig::timeout`].
    #[error("the request did not complete within {0:?}")]
    Timeout(Duration),
    /// The connection failed while the reply was being read.
    #[error("the connection failed mid-stream: {0}")]
    Read(String),
    /// The stream ended without `data: [DONE]` and without a chunk carrying a `finish_reason`.
    #[error("the connection closed mid-stream (no [DONE] and no finish_reason)")]
    Truncated,
    /// The reply sink refused output.
    #[error(transparent)]
    Sink(#[from] SinkError),
}

fn reason_suffix(status: u16) -> String {
    reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .map(|r| format!(" {r}"))
        .unwrap_or_default()
}

fn message_suffix(message: &Option<String>) -> String {
    message
        .as_ref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default()
}

impl From<OpenAiError> for AgentError {
    fn from(err: OpenAiError) -> Self {
        match err {
            OpenAiError::EmptyConversation => AgentError::EmptyConversation,
            OpenAiError::Unsupported(what) => AgentError::Unsupported(what),
            OpenAiError::Sink(e) => AgentError::Sink(e),
            other => AgentError::Backend(other.to_string()),
        }
    }
}

/// An [`Agent`] backed by an OpenAI-compatible Chat Completions server (see the module docs).
///
/// It holds a connection pool: build it once and share it (it is `Send + Sync`).
pub struct OpenAiAgent {
    config: OpenAiConfig,
    client: reqwest::Client,
    endpoint: reqwest::Url,
    /// The endpoint without credentials, query or fragment, for messages.
    endpoint_shown: String,
    renderer: Option<Box<dyn GridRenderer>>,
    /// Recently rendered grids and their data URLs, most recently used last.
    images: Mutex<VecDeque<(Vec<TokenGrid>, String)>>,
}

impl fmt::Debug for OpenAiAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiAgent")
            .field("endpoint", &self.endpoint_shown)
            .field("config", &self.config)
            .field("renderer", &self.renderer.is_some())
            .finish_non_exhaustive()
    }
}

impl OpenAiAgent {
    /// An agent that sends image grids as pictures drawn by `renderer`.
    ///
    /// Fails when the base URL is not an absolute `http(s)` URL or the HTTP client cannot be
    /// set up; it does not contact the server.
    pub fn new(
        config: OpenAiConfig,
        renderer: impl GridRenderer + 'static,
    ) -> Result<Self, OpenAiError> {
        Self::build(config, Some(Box::new(renderer)))
    }

    /// An agent without a renderer: it sends text and raw PNG/JPEG attachments, and refuses
    /// image grids with [`OpenAiError::Unsupported`] (its capabilities say `image_input: false`).
    pub fn text_only(config: OpenAiConfig) -> Result<Self, OpenAiError> {
        Self::build(config, None)
    }

    fn build(
        mut config: OpenAiConfig,
        renderer: Option<Box<dyn GridRenderer>>,
    ) -> Result<Self, OpenAiError> {
        config.jpeg_quality = config.jpeg_quality.clamp(1, 100);
        let endpoint = endpoint_url(&config.base_url)?;
        let mut shown = endpoint.clone();
        // Only fails for URLs that cannot have credentials, which then have none to hide.
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        shown.set_query(None);
        shown.set_fragment(None);
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .user_agent(concat!("unimic-agents/", env!("CARGO_PKG_VERSION")))
            .tcp_nodelay(true);
        if is_loopback(&endpoint) {
            // A proxy cannot reach this machine's loopback server; go direct.
            builder = builder.no_proxy();
        }
        let client = builder
            .build()
            .map_err(|e| OpenAiError::Client(error_chain(&e)))?;
        Ok(OpenAiAgent {
            config,
            client,
            endpoint,
            endpoint_shown: shown.to_string(),
            renderer,
            images: Mutex::new(VecDeque::new()),
        })
    }

    /// The configuration the agent was built with.
    pub fn config(&self) -> &OpenAiConfig {
        &self.config
    }

    /// The URL requests go to (`{base_url}/chat/completions`), shown without credentials or
    /// query.
    pub fn endpoint(&self) -> &str {
        &self.endpoint_shown
    }

    /// Sends `conversation` and streams the reply's text into `sink`, with a typed error.
    /// [`Agent::respond`] is this with the error converted into [`AgentError`].
    pub async fn stream_chat(
        &self,
        conversation: &Conversation,
        sink: &mut dyn ReplySink,
    ) -> Result<(), OpenAiError> {
        let body = self.request_body(conversation)?;
        let timeout = self.config.timeout;
        match tokio::time::timeout(timeout, self.exchange(body, sink)).await {
            Ok(result) => result,
            Err(_) => Err(OpenAiError::Timeout(timeout)),
        }
    }

    /// The JSON request body for `conversation`.
    fn request_body(&self, conversation: &Conversation) -> Result<Vec<u8>, OpenAiError> {
        if conversation.turns.is_empty() {
            return Err(OpenAiError::EmptyConversation);
        }
        let mut messages = Vec::with_capacity(conversation.turns.len() + 1);
        if let Some(prompt) = &self.config.system_prompt {
            messages.push(Message {
                role: "system",
                content: MessageContent::Text(prompt.clone()),
            });
        }
        for turn in &conversation.turns {
            messages.push(match turn.role {
                Role::System => Message {
                    role: "system",
                    content: MessageContent::Text(system_text(turn)?),
                },
                Role::User => Message {
                    role: "user",
                    content: self.user_content(turn)?,
                },
                Role::Assistant => Message {
                    role: "assistant",
                    content: MessageContent::Text(assistant_text(turn)?),
                },
            });
        }
        let request = ChatRequest {
            model: &self.config.model,
            messages,
            stream: true,
            max_tokens: self.config.max_tokens,
            temperature: self.config.temperature,
        };
        serde_json::to_vec(&request).map_err(|e| {
            OpenAiError::Unsupported(format!("the request cannot be written as JSON: {e}"))
        })
    }

    fn user_content<'t>(&self, turn: &'t Turn) -> Result<MessageContent<'t>, OpenAiError> {
        let mut parts = Vec::with_capacity(turn.content.len());
        for content in &turn.content {
            match content {
                Content::Text { text, .. } => parts.push(Part::Text { text }),
                Content::Image(grid) => parts.push(Part::ImageUrl {
                    image_url: ImageUrl {
                        url: self.image_data_url(std::slice::from_ref(grid))?,
                    },
                }),
                Content::ImageLevels(levels) => parts.push(Part::ImageUrl {
                    image_url: ImageUrl {
                        url: self.image_data_url(levels)?,
                    },
                }),
                Content::Raw { media_type, bytes } => {
                    let media_type = sendable_image_type(media_type).ok_or_else(|| {
                        OpenAiError::Unsupported(format!(
                            "the OpenAI adapter cannot send a raw attachment of type \
                             {media_type:?} (PNG and JPEG go as data URLs)"
                        ))
                    })?;
                    let url = format!(
                        "data:{media_type};base64,{}",
                        base64::engine::general_purpose::STANDARD.encode(bytes)
                    );
                    parts.push(Part::ImageUrl {
                        image_url: ImageUrl { url },
                    });
                }
                _ => return Err(unsupported_content()),
            }
        }
        if parts.is_empty() {
            return Ok(MessageContent::Text(String::new()));
        }
        Ok(MessageContent::Parts(parts))
    }

    /// Renders `grid` (or finds it in the cache) and returns its JPEG data URL.
    fn image_data_url(&self, levels: &[TokenGrid]) -> Result<String, OpenAiError> {
        let renderer = self.renderer.as_ref().ok_or_else(|| {
            OpenAiError::Unsupported(
                "this OpenAI agent has no image renderer (built with OpenAiAgent::text_only), \
                 so it cannot send image grids"
                    .into(),
            )
        })?;
        {
            let mut cache = self.images.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = cache.iter().position(|(g, _)| g == levels) {
                let entry = cache.remove(i).expect("index from position");
                let url = entry.1.clone();
                cache.push_back(entry);
                return Ok(url);
            }
        }
        let image = match levels {
            [grid] => renderer.render(grid),
            _ => renderer.render_levels(levels),
        }
        .map_err(OpenAiError::Render)?;
        let (width, height) = image.dimensions();
        if width == 0 || height == 0 {
            return Err(OpenAiError::Render(
                "the renderer returned an empty image".into(),
            ));
        }
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, self.config.jpeg_quality)
            .encode(
                image.as_raw(),
                width,
                height,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| OpenAiError::Render(format!("JPEG encoding failed: {e}")))?;
        let url = format!(
            "data:image/jpeg;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&jpeg)
        );
        let mut cache = self.images.lock().unwrap_or_else(|e| e.into_inner());
        cache.push_back((levels.to_vec(), url.clone()));
        while cache.len() > IMAGE_CACHE_ENTRIES {
            cache.pop_front();
        }
        Ok(url)
    }

    /// Sends the request and reads the reply into `sink`.
    async fn exchange(&self, body: Vec<u8>, sink: &mut dyn ReplySink) -> Result<(), OpenAiError> {
        let mut request = self
            .client
            .post(self.endpoint.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream")
            .body(body);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let mut response = request.send().await.map_err(|e| self.send_error(e))?;

        let status = response.status();
        if !status.is_success() {
            let body = read_capped(
                &mut response,
                MAX_ERROR_BODY_BYTES,
                self.config.idle_timeout,
            )
            .await;
            return Err(OpenAiError::Status {
                status: status.as_u16(),
                message: self.server_message(&body),
            });
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let is_sse = content_type.as_deref().is_some_and(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("text/event-stream")
        });
        if !is_sse {
            let body = read_capped(
                &mut response,
                MAX_ERROR_BODY_BYTES,
                self.config.idle_timeout,
            )
            .await;
            return Err(OpenAiError::NotEventStream {
                content_type: content_type.unwrap_or_else(|| "none".into()),
                message: self.server_message(&body),
            });
        }

        let body = response
            .bytes_stream()
            .map(|r| r.map_err(|e| OpenAiError::Read(error_chain(&e.without_url()))));
        let events = EventStream::new(guard(body, self.config.idle_timeout, MAX_EVENT_BYTES));
        let mut events = std::pin::pin!(events);
        let mut finished = false;
        loop {
            let event = match events.next().await {
                None if finished => return Ok(()),
                None => return Err(OpenAiError::Truncated),
                Some(Ok(event)) => event,
                Some(Err(EventStreamError::Transport(e))) => {
                    // A server that ends the reply with a finish_reason and then drops or stalls
                    // the connection has still answered in full.
                    let ended_late =
                        matches!(e, OpenAiError::Read(_) | OpenAiError::IdleTimeout(_));
                    return if finished && ended_late {
                        Ok(())
                    } else {
                        Err(self.redact_error(e))
                    };
                }
                Some(Err(EventStreamError::Utf8(e))) => {
                    return Err(OpenAiError::MalformedSse(format!("invalid UTF-8: {e}")))
                }
                Some(Err(EventStreamError::Parser(e))) => {
                    return Err(OpenAiError::MalformedSse(format!(
                        "unparseable line: {}",
                        truncate(&e.input, 80)
                    )))
                }
            };
            match event.event.as_str() {
                "message" => {}
                "error" => {
                    return Err(OpenAiError::InStream(
                        self.server_message(event.data.as_bytes())
                            .unwrap_or_else(|| "(no message)".into()),
                    ))
                }
                // Other event types are not part of Chat Completions streaming.
                _ => continue,
            }
            if event.data.trim() == "[DONE]" {
                // Let the body end so the connection goes back to the pool.
                let _ = tokio::time::timeout(DRAIN_AFTER_DONE, async {
                    while events.next().await.is_some() {}
                })
                .await;
                return Ok(());
            }
            let chunk: Chunk =
                serde_json::from_str(&event.data).map_err(|e| OpenAiError::MalformedJson {
                    detail: e.to_string(),
                    excerpt: self.redact(truncate(&event.data, 120)),
                })?;
            if let Some(message) = chunk.error_message() {
                return Err(OpenAiError::InStream(
                    self.redact(truncate(&message, MAX_MESSAGE_CHARS)),
                ));
            }
            let choice = chunk
                .choices
                .iter()
                .flatten()
                .find(|c| c.index.unwrap_or(0) == 0);
            if let Some(choice) = choice {
                if let Some(text) = choice.delta.as_ref().and_then(|d| d.content.as_deref()) {
                    if !text.is_empty() {
                        sink.text_delta(text).await?;
                    }
                }
                if choice.finish_reason.is_some() {
                    finished = true;
                }
            }
        }
    }

    fn send_error(&self, e: reqwest::Error) -> OpenAiError {
        let e = e.without_url();
        let endpoint = self.endpoint_shown.clone();
        if e.is_connect() {
            if e.is_timeout() {
                return OpenAiError::ConnectTimeout {
                    endpoint,
                    after: self.config.connect_timeout,
                };
            }
            return OpenAiError::Connect {
                endpoint,
                detail: error_chain(&e),
            };
        }
        OpenAiError::Request {
            endpoint,
            detail: error_chain(&e),
        }
    }

    /// The message in an error body: `error.message` and its variants when the body is JSON,
    /// otherwise the start of the text; cut and with the key redacted.
    fn server_message(&self, body: &[u8]) -> Option<String> {
        let text = String::from_utf8_lossy(body);
        let message = match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(value) => json_error_message(&value).unwrap_or_else(|| text.trim().to_string()),
            Err(_) => text.trim().to_string(),
        };
        if message.is_empty() {
            return None;
        }
        Some(self.redact(truncate(&message, MAX_MESSAGE_CHARS)))
    }

    /// Replaces the API key, should a server echo it, in text quoted from the server.
    fn redact(&self, text: String) -> String {
        match &self.config.api_key {
            Some(key) if key.len() >= 4 && text.contains(key.as_str()) => {
                text.replace(key.as_str(), "<redacted>")
            }
            _ => text,
        }
    }

    fn redact_error(&self, e: OpenAiError) -> OpenAiError {
        match e {
            OpenAiError::InStream(m) => OpenAiError::InStream(self.redact(m)),
            OpenAiError::Read(m) => OpenAiError::Read(self.redact(m)),
            other => other,
        }
    }
}

impl Agent for OpenAiAgent {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            image_input: self.renderer.is_some(),
            image_output: false,
            streaming: true,
        }
    }

    fn respond<'a>(
        &'a self,
        conversation: &'a Conversation,
        sink: &'a mut dyn ReplySink,
    ) -> AgentFuture<'a> {
        Box::pin(async move {
            self.stream_chat(conversation, sink)
                .await
                .map_err(AgentError::from)
        })
    }
}

// ---- request ------------------------------------------------------------------------------------

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<Message<'a>>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: MessageContent<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum MessageContent<'a> {
    Text(String),
    Parts(Vec<Part<'a>>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Part<'a> {
    Text { text: &'a str },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Serialize)]
struct ImageUrl {
    url: String,
}

fn unsupported_content() -> OpenAiError {
    OpenAiError::Unsupported(
        "the OpenAI adapter sends text, image grids and PNG/JPEG attachments only".into(),
    )
}

/// A system turn's text; anything else in it is refused.
fn system_text(turn: &Turn) -> Result<String, OpenAiError> {
    let mut text = String::new();
    for content in &turn.content {
        match content {
            Content::Text { text: t, .. } => text.push_str(t),
            Content::Image(_) | Content::ImageLevels(_) | Content::Raw { .. } => {
                return Err(OpenAiError::Unsupported(
                    "the OpenAI adapter sends only text in system turns".into(),
                ))
            }
            _ => return Err(unsupported_content()),
        }
    }
    Ok(text)
}

/// An assistant turn as one string: its text, with placeholders for images and attachments.
fn assistant_text(turn: &Turn) -> Result<String, OpenAiError> {
    let mut text = String::new();
    for content in &turn.content {
        match content {
            Content::Text { text: t, .. } => text.push_str(t),
            Content::Image(grid) => text.push_str(&format!(
                "[image {}x{} tokens]",
                grid.width(),
                grid.height()
            )),
            Content::ImageLevels(levels) => {
                if let Some(grid) = levels.first() {
                    text.push_str(&format!(
                        "[image {}x{} tokens, {} levels]",
                        grid.width(),
                        grid.height(),
                        levels.len()
                    ))
                }
            }
            Content::Raw { media_type, bytes } => {
                text.push_str(&format!("[attachment {media_type}, {} bytes]", bytes.len()))
            }
            _ => return Err(unsupported_content()),
        }
    }
    Ok(text)
}

/// `image/png` or `image/jpeg` (parameters and case ignored), the raw types sent as data URLs.
fn sendable_image_type(media_type: &str) -> Option<&'static str> {
    let essence = media_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("image/png") {
        Some("image/png")
    } else if essence.eq_ignore_ascii_case("image/jpeg")
        || essence.eq_ignore_ascii_case("image/jpg")
    {
        Some("image/jpeg")
    } else {
        None
    }
}

/// `{base_url}/chat/completions` (a query on the base URL is kept), validated.
fn endpoint_url(base_url: &str) -> Result<reqwest::Url, OpenAiError> {
    let mut url = reqwest::Url::parse(base_url.trim()).map_err(|e| {
        OpenAiError::InvalidBaseUrl(format!(
            "{e} (expected an absolute URL such as http://localhost:11434/v1)"
        ))
    })?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(OpenAiError::InvalidBaseUrl(format!(
            "scheme {:?} is not http or https",
            url.scheme()
        )));
    }
    if url.host_str().is_none() {
        return Err(OpenAiError::InvalidBaseUrl("the URL has no host".into()));
    }
    let path = url.path().trim_end_matches('/');
    if !path.ends_with("/chat/completions") {
        let path = format!("{path}/chat/completions");
        url.set_path(&path);
    }
    Ok(url)
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

// ---- response -----------------------------------------------------------------------------------

/// The parts of a `chat.completion.chunk` (or of an error object) the adapter reads. Unknown
/// fields are ignored.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    error: Option<serde_json::Value>,
    /// `"error"` in vLLM's older top-level error objects.
    #[serde(default)]
    object: Option<String>,
    #[serde(default)]
    message: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    delta: Option<Delta>,
    /// Any non-null value ends the reply (`"stop"`, `"length"`, `"tool_calls"`, OpenRouter's
    /// `"error"`…).
    #[serde(default)]
    finish_reason: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

impl Chunk {
    /// The error this chunk reports, if it is an error object.
    fn error_message(&self) -> Option<String> {
        match &self.error {
            None | Some(serde_json::Value::Null) => {}
            Some(error) => {
                return Some(
                    json_error_message(&serde_json::json!({ "error": error }))
                        .unwrap_or_else(|| error.to_string()),
                )
            }
        }
        if self.object.as_deref() == Some("error") {
            return Some(match &self.message {
                Some(serde_json::Value::String(m)) => m.clone(),
                Some(other) => other.to_string(),
                None => "(no message)".into(),
            });
        }
        None
    }
}

/// The message of a JSON error body, in the shapes servers use: `{"error": {"message": …}}`
/// (OpenAI, vLLM, llama.cpp, Ollama's OpenAI endpoint, OpenRouter), `{"error": "…"}` (Ollama),
/// `{"message": …}` (older vLLM), `{"detail": …}` (FastAPI servers).
fn json_error_message(value: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        _ => None,
    };
    match value.get("error") {
        Some(Value::Object(error)) => {
            return Some(
                error
                    .get("message")
                    .and_then(text)
                    .unwrap_or_else(|| Value::Object(error.clone()).to_string()),
            )
        }
        Some(Value::String(s)) => return Some(s.clone()),
        _ => {}
    }
    value.get("message").and_then(text).or_else(|| {
        value
            .get("detail")
            .map(|d| text(d).unwrap_or_else(|| d.to_string()))
    })
}

/// Reads at most `limit` bytes of the body, giving up after `idle` without data (what arrived
/// is kept; a read error ends it too).
async fn read_capped(response: &mut reqwest::Response, limit: usize, idle: Duration) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match tokio::time::timeout(idle, response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                let take = chunk.len().min(limit - body.len());
                body.extend_from_slice(&chunk[..take]);
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break,
        }
    }
    body
}

/// `text` trimmed and cut to `max` characters (with `…` when cut).
fn truncate(text: &str, max: usize) -> String {
    let text = text.trim();
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// An error and its sources, `a: b: c`, without repeats.
fn error_chain(e: &dyn StdError) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if parts.last() != Some(&s_text) {
            parts.push(s_text);
        }
        source = s.source();
    }
    parts.join(": ")
}

// ---- the byte-stream guard ----------------------------------------------------------------------

/// Wraps the response body for the SSE parser: applies the idle timeout to every read, checks
/// UTF-8 (handing the parser only whole characters), caps the size of one event, turns
/// llama.cpp's `error:` field (which SSE parsers ignore) into [`OpenAiError::InStream`] after the
/// bytes before it, and, at the end, completes a last event that lacks only its blank line.
fn guard<S>(
    body: S,
    idle: Duration,
    max_event: usize,
) -> impl Stream<Item = Result<Bytes, OpenAiError>> + Send
where
    S: Stream<Item = Result<Bytes, OpenAiError>> + Send + Unpin,
{
    struct State<S> {
        body: S,
        scanner: Scanner,
        idle: Duration,
        pending: Option<OpenAiError>,
        done: bool,
    }
    let state = State {
        body,
        scanner: Scanner::new(max_event),
        idle,
        pending: None,
        done: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        if let Some(e) = st.pending.take() {
            st.done = true;
            return Some((Err(e), st));
        }
        loop {
            match tokio::time::timeout(st.idle, st.body.next()).await {
                Err(_) => {
                    st.done = true;
                    return Some((Err(OpenAiError::IdleTimeout(st.idle)), st));
                }
                Ok(None) => {
                    st.done = true;
                    return match st.scanner.finish() {
                        Ok(Some(tail)) => Some((Ok(tail), st)),
                        Ok(None) => None,
                        Err(e) => Some((Err(e), st)),
                    };
                }
                Ok(Some(Err(e))) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
                Ok(Some(Ok(chunk))) => match st.scanner.feed(chunk) {
                    Ok((pass, error)) => {
                        st.pending = error;
                        if pass.is_empty() && st.pending.is_none() {
                            continue;
                        }
                        return Some((Ok(pass), st));
                    }
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                },
            }
        }
    })
}

/// Line bookkeeping over the raw bytes (`\n`, `\r` and `\r\n` end a line; an empty line ends an
/// event), done before the SSE parser sees them.
struct Scanner {
    max_event: usize,
    /// Bytes of the current event so far (line terminators not counted).
    event_len: usize,
    /// Bytes of the current line so far.
    line_len: usize,
    /// The previous byte was `\r` (a following `\n` belongs to the same terminator).
    after_cr: bool,
    /// The first bytes of the current line, enough to recognise `error:`.
    head: Vec<u8>,
    /// The value of an `error:` line being read.
    capture: Option<Vec<u8>>,
    /// An incomplete UTF-8 sequence at the end of the last chunk.
    utf8_tail: Vec<u8>,
}

const ERROR_FIELD: &[u8] = b"error:";

impl Scanner {
    fn new(max_event: usize) -> Self {
        Scanner {
            max_event,
            event_len: 0,
            line_len: 0,
            after_cr: false,
            head: Vec::with_capacity(ERROR_FIELD.len()),
            capture: None,
            utf8_tail: Vec::new(),
        }
    }

    /// Checks `chunk` and returns the bytes to pass on, and an error to report after them.
    fn feed(&mut self, chunk: Bytes) -> Result<(Bytes, Option<OpenAiError>), OpenAiError> {
        let buf = if self.utf8_tail.is_empty() {
            chunk
        } else {
            let mut joined = BytesMut::with_capacity(self.utf8_tail.len() + chunk.len());
            joined.extend_from_slice(&self.utf8_tail);
            joined.extend_from_slice(&chunk);
            self.utf8_tail.clear();
            joined.freeze()
        };
        let valid = match std::str::from_utf8(&buf) {
            Ok(_) => buf.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(e) => {
                return Err(OpenAiError::MalformedSse(format!(
                    "the stream is not valid UTF-8 ({e})"
                )))
            }
        };
        self.utf8_tail.extend_from_slice(&buf[valid..]);
        let buf = buf.slice(..valid);
        for (i, &b) in buf.iter().enumerate() {
            if b == b'\n' && self.after_cr {
                self.after_cr = false;
                continue;
            }
            self.after_cr = b == b'\r';
            if b == b'\n' || b == b'\r' {
                if self.line_len == 0 {
                    self.event_len = 0;
                } else if let Some(message) = self.end_line() {
                    return Ok((buf.slice(..=i), Some(OpenAiError::InStream(message))));
                }
                continue;
            }
            self.line_len += 1;
            self.event_len += 1;
            if self.event_len > self.max_event {
                return Err(OpenAiError::EventTooLarge {
                    limit: self.max_event,
                });
            }
            if let Some(capture) = &mut self.capture {
                if capture.len() < MAX_ERROR_BODY_BYTES {
                    capture.push(b);
                }
            } else if self.head.len() < ERROR_FIELD.len() {
                self.head.push(b);
                if self.head == ERROR_FIELD {
                    self.capture = Some(Vec::new());
                }
            }
        }
        Ok((buf, None))
    }

    /// Ends the current (non-empty) line; returns the message when it was an `error:` field.
    fn end_line(&mut self) -> Option<String> {
        self.line_len = 0;
        self.head.clear();
        let value = self.capture.take()?;
        let value = String::from_utf8_lossy(&value);
        let value = value.strip_prefix(' ').unwrap_or(&value);
        let message = match serde_json::from_str::<serde_json::Value>(value) {
            Ok(v) => json_error_message(&v).unwrap_or_else(|| v.to_string()),
            Err(_) => value.to_string(),
        };
        Some(truncate(&message, MAX_MESSAGE_CHARS))
    }

    /// At the end of the body: bytes that complete a last event whose lines all ended but which
    /// lacks its blank line, or an error for a body cut inside a character or an `error:` line.
    fn finish(&mut self) -> Result<Option<Bytes>, OpenAiError> {
        if !self.utf8_tail.is_empty() {
            return Err(OpenAiError::MalformedSse(
                "the stream ends inside a UTF-8 character".into(),
            ));
        }
        if self.line_len > 0 {
            if let Some(message) = self.end_line() {
                return Err(OpenAiError::InStream(message));
            }
            return Ok(None);
        }
        if self.event_len > 0 {
            return Ok(Some(Bytes::from_static(b"\r\n")));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(scanner: &mut Scanner, parts: &[&[u8]]) -> Result<Vec<u8>, OpenAiError> {
        let mut out = Vec::new();
        for part in parts {
            let (pass, error) = scanner.feed(Bytes::copy_from_slice(part))?;
            out.extend_from_slice(&pass);
            if let Some(e) = error {
                return Err(e);
            }
        }
        Ok(out)
    }

    #[test]
    fn utf8_split_across_chunks_is_joined() {
        let text = "data: héllo\n\n".as_bytes();
        let split = text.iter().position(|&b| b == 0xC3).unwrap() + 1;
        let mut s = Scanner::new(MAX_EVENT_BYTES);
        let out = feed_all(&mut s, &[&text[..split], &text[split..]]).unwrap();
        assert_eq!(out, text);
        assert!(s.finish().unwrap().is_none());
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let mut s = Scanner::new(MAX_EVENT_BYTES);
        assert!(matches!(
            feed_all(&mut s, &[b"data: \xff\xfe\n\n"]),
            Err(OpenAiError::MalformedSse(_))
        ));
        let mut s = Scanner::new(MAX_EVENT_BYTES);
        feed_all(&mut s, &[b"data: \xc3"]).unwrap();
        assert!(matches!(s.finish(), Err(OpenAiError::MalformedSse(_))));
    }

    #[test]
    fn event_size_resets_at_blank_lines_with_any_terminator() {
        let mut s = Scanner::new(10);
        // Three events of 8 bytes each, with LF, CRLF (split between chunks) and CR endings.
        feed_all(
            &mut s,
            &[
                b"data: ab\n\ndata: cd\r",
                b"\n\r\ndata: ef\r\r",
                b": 1234567\n\n",
            ],
        )
        .unwrap();
        let mut s = Scanner::new(10);
        assert!(matches!(
            feed_all(&mut s, &[b"data: ab\n", b"data: cd\n\n"]),
            Err(OpenAiError::EventTooLarge { limit: 10 })
        ));
    }

    #[test]
    fn an_error_field_stops_after_the_bytes_before_it() {
        let mut s = Scanner::new(MAX_EVENT_BYTES);
        let (pass, error) = s
            .feed(Bytes::from_static(
                b"data: {\"a\":1}\n\nerror: {\"code\":500,\"message\":\"boom\",\"type\":\"server_error\"}\n\ndata: [DONE]\n\n",
            ))
            .unwrap();
        assert!(pass.starts_with(b"data: {\"a\":1}\n\nerror: "));
        assert!(!pass.ends_with(b"[DONE]\n\n"));
        match error {
            Some(OpenAiError::InStream(m)) => assert_eq!(m, "boom"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_last_event_without_its_blank_line_is_completed() {
        let mut s = Scanner::new(MAX_EVENT_BYTES);
        feed_all(&mut s, &[b"data: [DONE]\n"]).unwrap();
        assert_eq!(s.finish().unwrap().as_deref(), Some(&b"\r\n"[..]));
        // A line cut off mid-way is not completed.
        let mut s = Scanner::new(MAX_EVENT_BYTES);
        feed_all(&mut s, &[b"data: {\"choi"]).unwrap();
        assert!(s.finish().unwrap().is_none());
    }

    #[test]
    fn error_messages_are_found_in_the_usual_shapes() {
        let m = |s: &str| json_error_message(&serde_json::from_str(s).unwrap());
        assert_eq!(
            m(r#"{"error":{"message":"bad key","type":"invalid_request_error"}}"#).as_deref(),
            Some("bad key")
        );
        assert_eq!(
            m(r#"{"error":"model not found"}"#).as_deref(),
            Some("model not found")
        );
        assert_eq!(
            m(r#"{"object":"error","message":"too long","code":400}"#).as_deref(),
            Some("too long")
        );
        assert_eq!(m(r#"{"detail":"Not Found"}"#).as_deref(), Some("Not Found"));
        assert_eq!(m(r#"{"choices":[]}"#), None);
    }

    #[test]
    fn truncation_is_by_characters() {
        assert_eq!(truncate("  héllo  ", 10), "héllo");
        assert_eq!(truncate("ééééé", 3), "ééé…");
    }

    #[test]
    fn endpoints_are_validated_and_shown_without_credentials() {
        assert_eq!(
            endpoint_url("http://localhost:11434/v1/").unwrap().as_str(),
            "http://localhost:11434/v1/chat/completions"
        );
        assert_eq!(
            endpoint_url("https://x.test/v1/chat/completions")
                .unwrap()
                .as_str(),
            "https://x.test/v1/chat/completions"
        );
        assert!(matches!(
            endpoint_url("localhost:8080"),
            Err(OpenAiError::InvalidBaseUrl(_))
        ));
        assert!(matches!(
            endpoint_url("ftp://x.test/v1"),
            Err(OpenAiError::InvalidBaseUrl(_))
        ));
        assert!(matches!(
            endpoint_url("not a url"),
            Err(OpenAiError::InvalidBaseUrl(_))
        ));
        assert_eq!(
            endpoint_url("https://x.test/openai/v1?api-version=2")
                .unwrap()
                .as_str(),
            "https://x.test/openai/v1/chat/completions?api-version=2"
        );
        assert_eq!(
            endpoint_url("http://127.0.0.1:8080").unwrap().as_str(),
            "http://127.0.0.1:8080/chat/completions"
        );
        let agent = OpenAiAgent::text_only(OpenAiConfig::new("https://user:pw@x.test/v1?k=1", "m"))
            .unwrap();
        assert_eq!(agent.endpoint(), "https://x.test/v1/chat/completions");
        assert!(is_loopback(&endpoint_url("http://localhost:1/v1").unwrap()));
        assert!(is_loopback(&endpoint_url("http://[::1]:1/v1").unwrap()));
        assert!(!is_loopback(&endpoint_url("http://10.0.0.2:1/v1").unwrap()));
    }
}

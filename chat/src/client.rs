//! The client side: connect, send a turn, read its reply as a stream of typed events.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use unimic_codec::grid::fill_region;
use unimic_codec::part::CodecConfig;
use unimic_codec::text::{O200k, TextTokenizer};
use unimic_protocol::ErrorFrame as ErrorFrameInfo;
use unimic_transport::tls::{CertHash, ClientTls, Roots};
use unimic_transport::SessionError;
use unimic_transport::{
    ChunkData, Client, ClientConfig, ContextKey, ErrorCode, IncomingMessage, MessageEvent,
    MessageStats, ModelChoice, OutgoingMessage, OutgoingPart, PartKind, QuicConfig, ReceivedPart,
    RecvError, Role, Session, SessionConfig, TokenGrid, TokenizerInfo,
};

use crate::context::{Kind, Tracker};
use crate::error::ChatError;
use crate::text::TextDecoder;

/// How a [`Chat`] connects and codes its turns. [`ChatConfig::pinned`] gives the defaults:
/// the o200k text tokenizer, context reuse on, images with the generic transformer when the
/// server holds it, a 60 s limit on waiting for each part of a reply.
#[derive(Clone)]
#[non_exhaustive]
pub struct ChatConfig {
    /// How the server is verified: its certificate's SHA-256 pinned (development mode;
    /// `unimic serve` prints it) or a WebPKI chain to given roots with the name checked.
    pub tls: ClientTls,
    /// The name the client asks for (SNI) and, with WebPKI verification, the name the
    /// certificate must be valid for (`localhost`).
    pub server_name: String,
    /// Bearer token for the server, if it asks for one.
    pub token: Option<Bytes>,
    /// Session settings: tokenizers (add the image tokenizer), codec, limits.
    pub session: SessionConfig,
    /// QUIC settings (idle timeout: a server gone silent ends the session after it).
    pub quic: QuicConfig,
    /// The text tokenizer (o200k_base).
    pub text: Arc<dyn TextTokenizer>,
    /// Code every turn against the conversation so far (on): each text part references the
    /// recent text parts both ends hold, each adaptive-coded image the recent images.
    pub context_reuse: bool,
    /// Code images with the generic transformer when the session negotiated it (on).
    pub transformer_images: bool,
    /// Longest wait for the next event of a reply (60 s); `None` waits as long as the session
    /// lives.
    pub reply_timeout: Option<Duration>,
    /// Longest time for connecting and the handshake (10 s).
    pub connect_timeout: Duration,
    #[cfg(feature = "pixels")]
    /// The image tokenizer for pixels ([`Prompt::with_image`]).
    pub pixels: Option<Arc<dyn unimic_codec::tokenizer::ImageTokenizer + Send + Sync>>,
    #[cfg(feature = "pixels")]
    /// The same tokenizer with its codes chosen for the generic model's bits
    /// ([`unimic_codec::rdo::RdoTokenizer`]), used instead of `pixels` when the session codes
    /// images with that model ([`ChatConfig::with_generic_pixels`], which checks that both have
    /// one identity; set directly, that is the caller's to keep).
    pub generic_pixels: Option<Arc<dyn unimic_codec::tokenizer::ImageTokenizer + Send + Sync>>,
}

impl std::fmt::Debug for ChatConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatConfig")
            .field("tls", &self.tls.verification)
            .field("server_name", &self.server_name)
            .field("context_reuse", &self.context_reuse)
            .field("reply_timeout", &self.reply_timeout)
            .finish_non_exhaustive()
    }
}

impl ChatConfig {
    /// Defaults, verifying the server by the SHA-256 of its certificate.
    pub fn pinned(pin: CertHash) -> Self {
        Self::with_tls(ClientTls::pinned(pin))
    }

    /// Defaults, verifying the server's certificate chain against `roots` (for example the CA
    /// that signed the PEM certificate `unimic serve --cert` was given) and its name against
    /// [`ChatConfig::server_name`] (`localhost` unless [`ChatConfig::with_server_name`] sets it).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use unimic_chat::{Chat, ChatConfig};
    /// use unimic_transport::tls::Roots;
    /// let roots = Roots::from_pem_file("ca.pem".as_ref())?;
    /// let config = ChatConfig::webpki(roots).with_server_name("chat.example.com");
    /// let chat = Chat::connect("192.0.2.7:4433".parse()?, config).await?;
    /// # Ok(()) }
    /// ```
    pub fn webpki(roots: Roots) -> Self {
        Self::with_tls(ClientTls::webpki(roots))
    }

    /// Defaults with `tls` as the client's TLS settings (verification, client certificate).
    pub fn with_tls(tls: ClientTls) -> Self {
        Self {
            tls,
            server_name: "localhost".into(),
            token: None,
            session: SessionConfig::default(),
            quic: QuicConfig::default().with_idle_timeout(Duration::from_secs(15)),
            text: Arc::new(O200k::new()),
            context_reuse: true,
            transformer_images: true,
            reply_timeout: Some(Duration::from_secs(60)),
            connect_timeout: Duration::from_secs(10),
            #[cfg(feature = "pixels")]
            pixels: None,
            #[cfg(feature = "pixels")]
            generic_pixels: None,
        }
    }

    /// Sets the server name (SNI, and the name a WebPKI-verified certificate must carry).
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    /// Sends this bearer token.
    pub fn with_token(mut self, token: impl Into<Bytes>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Offers an image tokenizer (what grids are named by; see [`crate::image_tokenizer_info`]).
    pub fn with_image_tokenizer(mut self, info: TokenizerInfo) -> Self {
        self.session = self.session.with_tokenizer(info);
        self
    }

    /// Sets the codec configuration (for example with the transformer entropy models).
    pub fn with_codec(mut self, codec: CodecConfig) -> Self {
        self.session = self.session.with_codec(codec);
        self
    }

    /// Turns context reuse on or off.
    pub fn with_context_reuse(mut self, on: bool) -> Self {
        self.context_reuse = on;
        self
    }

    /// Sets the longest wait for each reply event.
    pub fn with_reply_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.reply_timeout = timeout;
        self
    }

    /// Sets the QUIC idle timeout: a server that sends nothing for this long is taken as gone.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.quic = self.quic.with_idle_timeout(timeout);
        self
    }

    /// Uses `tokenizer` for images given as pixels, and offers it in the handshake.
    #[cfg(feature = "pixels")]
    pub fn with_pixels(
        mut self,
        tokenizer: Arc<dyn unimic_codec::tokenizer::ImageTokenizer + Send + Sync>,
    ) -> Result<Self, ChatError> {
        let info = crate::tokenizer_info(tokenizer.as_ref())?;
        // A tokenizer for the generic model given before, of another identity, no longer fits.
        if let Some(g) = &self.generic_pixels {
            if crate::tokenizer_info(g.as_ref())? != info {
                self.generic_pixels = None;
            }
        }
        self.session = self.session.with_tokenizer(info);
        self.pixels = Some(tokenizer);
        Ok(self)
    }

    /// Uses `tokenizer` for images given as pixels when the session codes images with the
    /// generic model, and the [`with_pixels`](Self::with_pixels) one otherwise: for a tokenizer
    /// that chooses its codes for that model's bits
    /// ([`RdoTokenizer`](unimic_codec::rdo::RdoTokenizer)), which would trade a little
    /// distance for nothing with a server that does not hold the model. It must be the
    /// `with_pixels` tokenizer's identity (the same tokens' meaning; call that first), else
    /// `ChatError::Content`.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::Arc;
    /// use unimic_chat::ChatConfig;
    /// use unimic_codec::rdo::{RdoConfig, RdoTokenizer};
    /// use unimic_codec::shipped;
    /// use unimic_codec::tokenizer::Taef2Tokenizer;
    ///
    /// let plain = Arc::new(Taef2Tokenizer::from_dir(&Taef2Tokenizer::default_dir())?);
    /// let codec = shipped::codec_config(&shipped::entropy_dir(None))?;
    /// let generic = codec.generic.clone().ok_or("the generic model is not shipped here")?;
    /// let rdo = RdoTokenizer::new(plain.clone(), generic, RdoConfig::default())?;
    /// let pin = unimic_transport::tls::CertHash([0; 32]); // the server's
    /// let config = ChatConfig::pinned(pin)
    ///     .with_codec(codec)
    ///     .with_pixels(plain)?
    ///     .with_generic_pixels(Arc::new(rdo))?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "pixels")]
    pub fn with_generic_pixels(
        mut self,
        tokenizer: Arc<dyn unimic_codec::tokenizer::ImageTokenizer + Send + Sync>,
    ) -> Result<Self, ChatError> {
        let info = crate::tokenizer_info(tokenizer.as_ref())?;
        let plain = self
            .pixels
            .as_deref()
            .map(|t| crate::tokenizer_info(t))
            .transpose()?;
        if plain.as_ref() != Some(&info) {
            return Err(ChatError::Content(format!(
                "the tokenizer for the generic model ({:?}) is not the pixels tokenizer ({}): \
                 give both the same identity, with_pixels first",
                tokenizer.id().name,
                self.pixels
                    .as_ref()
                    .map_or("none given".to_string(), |t| format!("{:?}", t.id().name)),
            )));
        }
        self.generic_pixels = Some(tokenizer);
        Ok(self)
    }

    /// The tokenizer for images given as pixels in a session that codes images with the generic
    /// model (`generic`) or not.
    #[cfg(feature = "pixels")]
    fn pixels_for(
        &self,
        generic: bool,
    ) -> Option<Arc<dyn unimic_codec::tokenizer::ImageTokenizer + Send + Sync>> {
        match (generic, &self.generic_pixels) {
            (true, Some(t)) => Some(t.clone()),
            _ => self.pixels.clone(),
        }
    }
}

/// One piece of a [`Prompt`].
#[derive(Debug, Clone)]
enum PromptPart {
    Text(String),
    Grid(TokenGrid),
    /// An image as a quality ladder: the base grid, then refinement levels.
    Levels(Vec<TokenGrid>),
    Request(unimic_agents::request::Request),
    #[cfg(feature = "pixels")]
    Pixels(image::RgbImage, usize),
}

/// A user turn to send: text and images, in order.
///
/// ```
/// use unimic_chat::Prompt;
/// use unimic_transport::TokenGrid;
/// let grid = TokenGrid::new(2, 2, 1024, vec![1, 2, 3, 4]).unwrap();
/// let prompt = Prompt::text("What is this?").with_grid(grid);
/// assert_eq!(prompt.len(), 2);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    parts: Vec<PromptPart>,
}

impl Prompt {
    /// A prompt of one text part.
    pub fn text(text: impl Into<String>) -> Self {
        Self::default().with_text(text)
    }

    /// Appends a text part.
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.parts.push(PromptPart::Text(text.into()));
        self
    }

    /// Appends an image already tokenized.
    pub fn with_grid(mut self, grid: TokenGrid) -> Self {
        self.parts.push(PromptPart::Grid(grid));
        self
    }

    /// Appends an image already tokenized as a quality ladder: `levels[0]` is the base grid,
    /// the others refinement levels 2, 3, … of the same shape (from
    /// `ImageTokenizer::encode_levels`). The base goes as an image part, each further level as
    /// a part that refines the one before ([`OutgoingPart::refinement_of_part`]); the server's
    /// agent sees them as one [`Content::ImageLevels`](unimic_agents::Content::ImageLevels). A
    /// session that did not negotiate the ladder's models refuses the turn
    /// ([`ChatError::Send`]).
    ///
    /// ```
    /// use unimic_chat::Prompt;
    /// use unimic_transport::TokenGrid;
    /// let base = TokenGrid::new(2, 2, 1024, vec![1, 2, 3, 4]).unwrap();
    /// let level2 = TokenGrid::new(2, 2, 1024, vec![9, 9, 0, 1]).unwrap();
    /// let prompt = Prompt::text("What is this?").with_grid_levels(vec![base, level2]);
    /// assert_eq!(prompt.len(), 2);
    /// ```
    pub fn with_grid_levels(mut self, levels: Vec<TokenGrid>) -> Self {
        self.parts.push(PromptPart::Levels(levels));
        self
    }

    /// Appends a request for a token-native agent (inpaint, outpaint, generate, vary), sent as a
    /// raw part of media type
    /// [`REQUEST_MEDIA_TYPE`](unimic_agents::request::REQUEST_MEDIA_TYPE); edits and variations
    /// apply to the conversation's most recent image.
    ///
    /// ```
    /// use unimic_agents::request::{Request, Task};
    /// use unimic_chat::Prompt;
    /// let prompt = Prompt::text("a red bird on a branch")
    ///     .with_request(Request::new(Task::Generate { height: 16, width: 16 }).with_seed(1));
    /// assert_eq!(prompt.len(), 2);
    /// ```
    pub fn with_request(mut self, request: unimic_agents::request::Request) -> Self {
        self.parts.push(PromptPart::Request(request));
        self
    }

    /// Appends an image as pixels, tokenized with the chat's image tokenizer when sent
    /// ([`ChatConfig::with_pixels`]).
    #[cfg(feature = "pixels")]
    pub fn with_image(mut self, image: image::RgbImage) -> Self {
        self.parts.push(PromptPart::Pixels(image, 1));
        self
    }

    /// Appends an image as pixels sent with `levels` levels of the tokenizer's quality ladder
    /// (1: the base grid alone, as [`with_image`](Self::with_image); more: sharper, more bytes;
    /// see [`with_grid_levels`](Self::with_grid_levels)). More levels than the tokenizer has is
    /// an error when the turn is sent.
    #[cfg(feature = "pixels")]
    pub fn with_image_levels(mut self, image: image::RgbImage, levels: usize) -> Self {
        self.parts.push(PromptPart::Pixels(image, levels));
        self
    }

    /// Number of parts.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    /// Whether it has no part.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }
}

/// What the router hands a turn's [`Reply`].
#[derive(Debug)]
enum Routed {
    Message(IncomingMessage),
    Error(ErrorFrameInfo),
    Closed(String),
}

#[derive(Debug)]
struct Route {
    tx: mpsc::UnboundedSender<Routed>,
    replied: bool,
}

/// Turns waiting for replies, and replies that arrived before their turn was registered.
#[derive(Debug, Default)]
struct Routes {
    pending: BTreeMap<u64, Route>,
    early: VecDeque<(u64, Routed)>,
    closed: Option<String>,
}

/// Replies kept for turns not registered yet (a reply can overtake the end of its turn's send).
const MAX_EARLY: usize = 64;

struct Inner {
    session: Session,
    routes: Mutex<Routes>,
    tracker: Mutex<Tracker>,
    config: ChatConfig,
    generic: bool,
}

impl Inner {
    fn routes(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A conversation with a unimic server: send turns ([`Chat::send`]), read each reply as a
/// stream of events ([`Reply::next`]).
///
/// Replies are matched to turns by their `IN_REPLY_TO` (PROTOCOL.md §5.3), so several turns may
/// be outstanding; a reply without one (from a server that predates it) goes to the oldest turn
/// still waiting. Every turn is coded against the conversation so far unless
/// [`ChatConfig::context_reuse`] is off.
///
/// ```no_run
/// use unimic_chat::{Chat, ChatConfig, Prompt, ReplyEvent};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let (addr, pin) = ("127.0.0.1:4433".parse()?, "00".repeat(32).parse()?);
/// let chat = Chat::connect(addr, ChatConfig::pinned(pin)).await?;
/// let mut reply = chat.send(Prompt::text("Hello!")).await?;
/// while let Some(event) = reply.next().await {
///     if let ReplyEvent::Text(delta) = event? {
///         print!("{delta}");
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub struct Chat {
    inner: Arc<Inner>,
    _router: AbortOnDrop,
    client: Client,
}

impl std::fmt::Debug for Chat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chat")
            .field("remote", &self.inner.session.remote_address())
            .finish_non_exhaustive()
    }
}

impl Chat {
    /// Connects to the server at `addr` and runs the handshake (within
    /// [`ChatConfig::connect_timeout`]).
    pub async fn connect(addr: SocketAddr, config: ChatConfig) -> Result<Chat, ChatError> {
        let bind = if addr.is_ipv6() {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
        };
        let mut session_config = config.session.clone();
        session_config = session_config.with_handshake_timeout(config.connect_timeout);
        let mut client_config = ClientConfig::new(config.tls.clone())
            .with_bind(bind)
            .with_quic(config.quic.clone())
            .with_session(session_config);
        if let Some(t) = &config.token {
            client_config = client_config.with_token(t.clone());
        }
        let client = Client::new(client_config)?;
        let session = client.connect(addr, &config.server_name).await?;
        Ok(Self::from_session(session, client, config))
    }

    fn from_session(session: Session, client: Client, config: ChatConfig) -> Chat {
        let generic = config.transformer_images && crate::serve::has_generic(&session);
        let inner = Arc::new(Inner {
            session,
            routes: Mutex::new(Routes::default()),
            tracker: Mutex::new(Tracker::default()),
            config,
            generic,
        });
        let router = tokio::spawn(route(inner.clone()));
        Chat {
            inner,
            _router: AbortOnDrop(router),
            client,
        }
    }

    /// The session underneath (statistics, negotiated models, context).
    pub fn session(&self) -> &Session {
        &self.inner.session
    }

    /// Whether this chat codes the images it sends with the generic transformer (the session
    /// negotiated it and [`ChatConfig::transformer_images`] is on): then codes chosen for that
    /// model's bits ([`unimic_codec::rdo`]) pay off; otherwise the nearest codes are as cheap.
    pub fn images_use_generic(&self) -> bool {
        self.inner.generic
    }

    /// Codes and sends a user turn; returns its reply, to read with [`Reply::next`].
    pub async fn send(&self, prompt: Prompt) -> Result<Reply, ChatError> {
        if let Some(reason) = self.inner.routes().closed.clone() {
            return Err(ChatError::Closed(reason));
        }
        let inner = &self.inner;
        let reuse = inner.config.context_reuse;
        let mut message = OutgoingMessage::new(Role::User);
        let mut kinds = Vec::new();
        // The images' grids (by part index), kept for edits a reply may stream against them.
        let mut base_grids = Vec::new();
        let (text_refs, image_refs) = if reuse {
            let t = inner.tracker();
            (
                t.refs(&inner.session, Kind::Text),
                t.refs(&inner.session, Kind::Image),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        for part in prompt.parts {
            // The image's grids: the base, then any refinement levels.
            let grids = match part {
                PromptPart::Text(text) => {
                    let ids = inner.config.text.encode(&text);
                    message =
                        message.with_part(OutgoingPart::text(ids).with_context(text_refs.clone()));
                    kinds.push(Some(Kind::Text));
                    continue;
                }
                PromptPart::Request(request) => {
                    // Raw parts do not enter the context.
                    message = message.with_part(OutgoingPart::raw(
                        unimic_agents::request::REQUEST_MEDIA_TYPE,
                        request.to_json(),
                    ));
                    kinds.push(None);
                    continue;
                }
                PromptPart::Grid(grid) => vec![grid],
                PromptPart::Levels(levels) => levels,
                #[cfg(feature = "pixels")]
                PromptPart::Pixels(image, levels) => {
                    let tok = inner.config.pixels_for(inner.generic).ok_or_else(|| {
                        ChatError::Content(
                            "an image given as pixels needs ChatConfig::with_pixels".into(),
                        )
                    })?;
                    tokio::task::spawn_blocking(move || tok.encode_levels(&image, levels))
                        .await
                        .map_err(|e| ChatError::Content(e.to_string()))?
                        .map_err(|e| ChatError::Content(format!("tokenizing the image: {e}")))?
                }
            };
            let mut levels = grids.into_iter();
            let grid = levels.next().ok_or_else(|| {
                ChatError::Content("an image given as levels needs at least the base grid".into())
            })?;
            let base = kinds.len() as u64;
            base_grids.push((base, Arc::new(grid.clone())));
            let part = if inner.generic {
                OutgoingPart::image(grid).with_model(ModelChoice::Generic)
            } else {
                OutgoingPart::image(grid).with_context(image_refs.clone())
            };
            message = message.with_part(part);
            kinds.push(Some(Kind::Image));
            for (i, level) in levels.enumerate() {
                // Level 2 refines the base, each later level the one before.
                let below = base + i as u64;
                message =
                    message.with_part(OutgoingPart::refinement_of_part(level, below, i as u32 + 2));
                // Residual codes: not an image later turns are coded against.
                kinds.push(None);
            }
        }
        let started = Instant::now();
        let sent = inner.session.send(message).await?;
        let turn = sent.message_id;
        {
            let mut t = inner.tracker();
            for (i, kind) in kinds.into_iter().enumerate() {
                let key = ContextKey::new(turn, i as u64);
                match (kind, base_grids.iter().find(|(b, _)| *b == i as u64)) {
                    (Some(Kind::Image), Some((_, grid))) => t.record_image(key, grid.clone()),
                    (Some(kind), _) => t.record(key, kind),
                    (None, _) => {}
                }
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut routes = inner.routes();
            let mut replied = false;
            let early = std::mem::take(&mut routes.early);
            for (id, routed) in early {
                if id == turn {
                    replied |= matches!(routed, Routed::Message(_));
                    let _ = tx.send(routed);
                } else {
                    routes.early.push_back((id, routed));
                }
            }
            if let Some(reason) = routes.closed.clone() {
                let _ = tx.send(Routed::Closed(reason));
            }
            routes.pending.insert(turn, Route { tx, replied });
        }
        Ok(Reply {
            inner: inner.clone(),
            turn,
            rx: Some(rx),
            message: None,
            text: TextDecoder::default(),
            text_part: None,
            image_part: None,
            edit_rows: None,
            sent,
            started,
            done: false,
        })
    }

    /// Ends the conversation gracefully (go-away, then close), within `grace`.
    pub async fn close(self, grace: Duration) {
        self.inner.session.go_away("bye").await;
        let _ = tokio::time::timeout(grace, self.inner.session.closed()).await;
    }

    /// Like [`close`](Self::close), through a shared reference (for a `Chat` kept in an `Arc`),
    /// and then closes the client endpoint and waits, within the same `grace`, until its
    /// connection has drained: once the last handle to this `Chat` is dropped, its UDP socket
    /// and tasks are gone. Replies still waiting end with [`ChatError::Closed`]; later
    /// [`send`](Self::send)s fail with it.
    pub async fn shutdown(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        self.inner.session.go_away("bye").await;
        let _ = tokio::time::timeout_at(deadline, self.inner.session.closed()).await;
        self.client.close();
        let _ = tokio::time::timeout_at(deadline, self.client.wait_idle()).await;
    }
}

/// Hands every incoming message and every error about a turn to that turn's [`Reply`].
async fn route(inner: Arc<Inner>) {
    let mut errors_open = true;
    let reason = loop {
        tokio::select! {
            m = inner.session.recv() => match m {
                Ok(Some(msg)) => {
                    let mut routes = inner.routes();
                    let key = msg.in_reply_to().or_else(|| {
                        routes.pending.iter().find(|(_, r)| !r.replied).map(|(k, _)| *k)
                    });
                    let Some(key) = key else {
                        tracing::debug!(id = msg.message_id(), "a message that answers no turn");
                        continue;
                    };
                    match routes.pending.get_mut(&key) {
                        Some(route) if !route.replied => {
                            route.replied = true;
                            let _ = route.tx.send(Routed::Message(msg));
                        }
                        Some(_) => tracing::debug!(turn = key, "a further reply to a turn; ignored"),
                        None => {
                            if routes.early.len() >= MAX_EARLY {
                                routes.early.pop_front();
                            }
                            routes.early.push_back((key, Routed::Message(msg)));
                        }
                    }
                }
                Ok(None) => break "the server closed the session".to_string(),
                Err(e) => break closed_reason(&e),
            },
            e = inner.session.next_peer_error(), if errors_open => match e {
                Some(frame) => {
                    let Some(id) = frame.message_id.map(|m| m.into_inner()) else {
                        tracing::warn!(code = %frame.code, reason = %frame.reason, "the server reported an error");
                        continue;
                    };
                    let mut routes = inner.routes();
                    let routed = Routed::Error(frame);
                    match routes.pending.get(&id) {
                        Some(route) => { let _ = route.tx.send(routed); }
                        None => {
                            if routes.early.len() >= MAX_EARLY {
                                routes.early.pop_front();
                            }
                            routes.early.push_back((id, routed));
                        }
                    }
                }
                None => errors_open = false,
            },
        }
    };
    let mut routes = inner.routes();
    for route in routes.pending.values() {
        let _ = route.tx.send(Routed::Closed(reason.clone()));
    }
    routes.closed = Some(reason);
}

fn closed_reason(e: &SessionError) -> String {
    e.to_string()
}

/// An edit being received: the image it edits, its region, the redrawn cells so far.
struct EditRows {
    index: u64,
    base: Arc<TokenGrid>,
    region: Vec<bool>,
    cells: Vec<u32>,
    /// Rows complete at the last event.
    rows: usize,
}

impl EditRows {
    /// `None` when the region does not fit the base (the part will be refused anyway).
    fn new(index: u64, base: Arc<TokenGrid>, region: Vec<bool>) -> Option<Self> {
        (region.len() == base.len()).then_some(Self {
            index,
            base,
            region,
            cells: Vec::new(),
            rows: 0,
        })
    }

    /// Takes the next redrawn cells; the rows complete so far if that is more than before.
    fn push(&mut self, ids: &[u32]) -> Option<ReplyEvent> {
        self.cells.extend_from_slice(ids);
        let w = self.base.width() as usize;
        // Rows whose redrawn cells have all come.
        let (mut rows, mut need) = (0, 0);
        for row in self.region.chunks(w.max(1)) {
            need += row.iter().filter(|&&r| r).count();
            if need > self.cells.len() {
                break;
            }
            rows += 1;
        }
        if rows <= self.rows {
            return None;
        }
        self.rows = rows;
        let ids = fill_region(&self.base.ids()[..rows * w], &self.region, &self.cells);
        Some(ReplyEvent::ImageRows {
            height: self.base.height(),
            width: self.base.width(),
            rows: rows as u32,
            ids,
        })
    }
}

/// One event of a reply, in order.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ReplyEvent {
    /// The next piece of the reply's text (valid UTF-8, possibly several tokens).
    Text(String),
    /// An image of the reply still arriving: the server streams an image an agent makes row by
    /// row as it goes, and each chunk that arrives before the last gives the image's first rows
    /// (`ids` holds `rows × width` tokens, row-major; for an edit, the edited image's rows with
    /// the redrawn cells in, once the client still holds the image it edits).
    /// [`Image`](Self::Image) follows with the whole grid. Decode the rows with the image
    /// tokenizer to show the picture as it grows.
    ImageRows {
        /// The image's height in tokens.
        height: u32,
        /// Its width in tokens.
        width: u32,
        /// Rows complete so far.
        rows: u32,
        /// Their tokens, row-major.
        ids: Vec<u32>,
    },
    /// An image of the reply, whole, as a token grid (decode it with the image tokenizer).
    Image(TokenGrid),
    /// Refinement level `level` (2, 3, …) of the reply's last [`Image`](Self::Image): residual
    /// codes to decode together with the levels before it (`ImageTokenizer::decode_levels`).
    Refinement {
        /// The ladder level.
        level: u32,
        /// Its residual codes, the image's shape.
        grid: TokenGrid,
    },
    /// The reply is complete.
    End(ReplyStats),
}

/// What a turn and its reply cost.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ReplyStats {
    /// The turn's message id.
    pub turn: u64,
    /// The reply's message id.
    pub reply: u64,
    /// The turn as sent: bytes of its message stream, tokens, per part.
    pub sent: MessageStats,
    /// The reply as received.
    pub received: MessageStats,
    /// From sending the turn to the reply's end.
    pub elapsed: Duration,
}

/// The reply to one turn: pull its events with [`next`](Self::next), or its whole text with
/// [`text`](Self::text). Dropping it stops waiting (the reply, if any, is still decoded to keep
/// the context in step); [`cancel`](Self::cancel) also stops the server.
pub struct Reply {
    inner: Arc<Inner>,
    turn: u64,
    rx: Option<mpsc::UnboundedReceiver<Routed>>,
    message: Option<IncomingMessage>,
    text: TextDecoder,
    /// Index of the text part being received.
    text_part: Option<u64>,
    /// The image part being received (not an edit or refinement): index, shape, tokens so far.
    image_part: Option<(u64, u32, u32, Vec<u32>)>,
    /// The edit being received, drawn on the image it edits.
    edit_rows: Option<EditRows>,
    sent: MessageStats,
    started: Instant,
    done: bool,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("turn", &self.turn)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.inner.routes().pending.remove(&self.turn);
    }
}

fn agent_error(frame: ErrorFrameInfo) -> ChatError {
    ChatError::Agent {
        code: frame.code,
        reason: frame.reason,
    }
}

impl Reply {
    /// The turn's message id.
    pub fn turn(&self) -> u64 {
        self.turn
    }

    /// The turn as sent.
    pub fn sent(&self) -> &MessageStats {
        &self.sent
    }

    /// The next event: text deltas and images as they arrive, then [`ReplyEvent::End`]; `None`
    /// after the end or an error. Each wait is bounded by [`ChatConfig::reply_timeout`].
    ///
    /// Cancel safety: safe.
    pub async fn next(&mut self) -> Option<Result<ReplyEvent, ChatError>> {
        if self.done {
            return None;
        }
        let r = match self.inner.config.reply_timeout {
            Some(t) => match tokio::time::timeout(t, self.step()).await {
                Ok(r) => r,
                Err(_) => Err(ChatError::Timeout(t)),
            },
            None => self.step().await,
        };
        if matches!(r, Ok(ReplyEvent::End(_)) | Err(_)) {
            self.done = true;
        }
        Some(r)
    }

    /// The next event (no timeout).
    async fn step(&mut self) -> Result<ReplyEvent, ChatError> {
        loop {
            let Some(message) = self.message.as_mut() else {
                let routed = match self.rx.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => None,
                };
                match routed {
                    Some(Routed::Message(m)) => self.message = Some(m),
                    Some(Routed::Error(e)) => return Err(agent_error(e)),
                    Some(Routed::Closed(reason)) => return Err(ChatError::Closed(reason)),
                    None => return Err(ChatError::Closed("the chat was dropped".into())),
                }
                continue;
            };
            let ev = tokio::select! {
                biased;
                ev = message.next() => ev,
                routed = recv_some(&mut self.rx) => match routed {
                    Routed::Error(e) => return Err(agent_error(e)),
                    // The message (if still alive) will tell.
                    Routed::Closed(_) | Routed::Message(_) => continue,
                },
            };
            match ev {
                None => return Err(ChatError::Closed("the reply ended early".into())),
                Some(Err(RecvError::Reset(code))) if code == ErrorCode::AGENT_FAILED => {
                    // The reason travels in an ERROR frame on the control stream; take it if
                    // it is there already.
                    let reason = self
                        .rx
                        .as_mut()
                        .and_then(|rx| rx.try_recv().ok())
                        .and_then(|r| match r {
                            Routed::Error(e) => Some(e.reason),
                            _ => None,
                        })
                        .unwrap_or_else(|| "the agent failed".into());
                    return Err(ChatError::Agent { code, reason });
                }
                Some(Err(RecvError::Reset(code) | RecvError::Protocol { code, .. }))
                    if code == ErrorCode::CANCELLED =>
                {
                    return Err(ChatError::Cancelled)
                }
                Some(Err(RecvError::Cancelled)) => return Err(ChatError::Cancelled),
                Some(Err(e)) => return Err(ChatError::Recv(e)),
                Some(Ok(ev)) => {
                    if let Some(out) = self.on_event(ev)? {
                        return Ok(out);
                    }
                }
            }
        }
    }

    fn on_event(&mut self, ev: MessageEvent) -> Result<Option<ReplyEvent>, ChatError> {
        let tok = self.inner.config.text.clone();
        let content = |e: unimic_codec::text::TextError| ChatError::Content(e.to_string());
        Ok(match ev {
            MessageEvent::PartStart(info) => {
                self.text_part = matches!(info.kind, PartKind::Text { .. }).then_some(info.index);
                self.image_part = match info.kind {
                    PartKind::Image { height, width, .. }
                        if info.region.is_none() && info.level == 1 =>
                    {
                        Some((info.index, height, width, Vec::new()))
                    }
                    _ => None,
                };
                // An edit: its rows are those of the image it edits (the first image it
                // references, PROTOCOL.md §6.3) with the redrawn cells in.
                self.edit_rows = match (&info.kind, &info.region) {
                    (PartKind::Image { .. }, Some(region)) => {
                        let t = self.inner.tracker();
                        info.context
                            .iter()
                            .find_map(|k| t.grid(*k))
                            .and_then(|base| EditRows::new(info.index, base, region.clone()))
                    }
                    _ => None,
                };
                None
            }
            MessageEvent::Chunk {
                part_index,
                fin: false,
                data: ChunkData::Tokens { ids, .. },
                ..
            } if self
                .edit_rows
                .as_ref()
                .is_some_and(|e| e.index == part_index) =>
            {
                self.edit_rows.as_mut().and_then(|e| e.push(&ids))
            }
            MessageEvent::Chunk {
                part_index,
                fin: false,
                data: ChunkData::Tokens { ids, .. },
                ..
            } if self.image_part.as_ref().is_some_and(|p| p.0 == part_index) => {
                let Some((_, height, width, got)) = self.image_part.as_mut() else {
                    return Ok(None);
                };
                let before = got.len() / (*width).max(1) as usize;
                got.extend_from_slice(&ids);
                let rows = got.len() / (*width).max(1) as usize;
                (rows > before).then(|| ReplyEvent::ImageRows {
                    height: *height,
                    width: *width,
                    rows: rows as u32,
                    ids: got[..rows * *width as usize].to_vec(),
                })
            }
            MessageEvent::Chunk {
                part_index,
                data: ChunkData::Tokens { ids, .. },
                ..
            } if self.text_part == Some(part_index) => {
                let delta = self.text.push(tok.as_ref(), &ids).map_err(content)?;
                (!delta.is_empty()).then_some(ReplyEvent::Text(delta))
            }
            MessageEvent::PartEnd { index, part, .. } => {
                let id = self.message.as_ref().map_or(0, |m| m.message_id());
                let key = ContextKey::new(id, index);
                match part {
                    ReceivedPart::Text(_) => {
                        self.inner.tracker().record(key, Kind::Text);
                        self.text_part = None;
                        let rest = self.text.finish(tok.as_ref()).map_err(content)?;
                        (!rest.is_empty()).then_some(ReplyEvent::Text(rest))
                    }
                    ReceivedPart::Image(grid) => {
                        self.inner
                            .tracker()
                            .record_image(key, Arc::new(grid.clone()));
                        self.edit_rows = None;
                        Some(ReplyEvent::Image(grid))
                    }
                    ReceivedPart::Refinement { level, grid, .. } => {
                        Some(ReplyEvent::Refinement { level, grid })
                    }
                    _ => None,
                }
            }
            MessageEvent::End(received) => Some(ReplyEvent::End(ReplyStats {
                turn: self.turn,
                reply: received.message_id,
                sent: self.sent.clone(),
                received,
                elapsed: self.started.elapsed(),
            })),
            _ => None,
        })
    }

    /// Reads the whole reply and returns its text (images are skipped).
    pub async fn text(mut self) -> Result<String, ChatError> {
        let mut out = String::new();
        while let Some(ev) = self.next().await {
            match ev? {
                ReplyEvent::Text(t) => out.push_str(&t),
                ReplyEvent::End(_) => return Ok(out),
                _ => {}
            }
        }
        Err(ChatError::Closed("the reply ended early".into()))
    }

    /// Cancels the reply: the server stops its agent (a CANCEL naming the turn, PROTOCOL.md
    /// §5.3) and the reply's stream, if it has started, is stopped.
    pub async fn cancel(mut self) {
        self.done = true;
        self.inner.session.cancel_replies(self.turn).await;
        if let Some(m) = self.message.take() {
            m.cancel();
        }
    }
}

/// The next routed item; pending forever once the channel is closed (so a `select!` branch on it
/// never spins).
async fn recv_some(rx: &mut Option<mpsc::UnboundedReceiver<Routed>>) -> Routed {
    if let Some(r) = rx.as_mut() {
        if let Some(routed) = r.recv().await {
            return routed;
        }
    }
    *rx = None;
    std::future::pending().await
}

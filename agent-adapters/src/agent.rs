//! The [`Agent`] trait and the types it is called with.

use std::future::Future;
use std::pin::Pin;

use thiserror::Error;
use unimic_codec::grid::TokenGrid;

/// Who spoke a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The edge user.
    User,
    /// The agent.
    Assistant,
}

/// One piece of a turn's content, as decoded by the transport.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Content {
    /// Text, with the token ids it was sent as when it arrived as tokens.
    Text {
        /// The text (detokenized when it arrived as ids).
        text: String,
        /// The tokenizer's ids, when known (token-native agents use them directly).
        ids: Option<Vec<u32>>,
    },
    /// An image as a grid of VQ codebook indices. Pixel-based agents detokenize it with the
    /// session's image tokenizer; token-native agents consume the ids.
    Image(TokenGrid),
    /// An image sent as a quality ladder (docs/PROTOCOL.md §6.3, mode 5): level 1 (the base
    /// grid, what token-native agents consume) first, then the refinement levels that have
    /// arrived, in order (residual codes of the same shape). Pixel-based agents decode all of
    /// them with `ImageTokenizer::decode_levels` for a sharper picture. A refinement that arrives
    /// in a later turn is added here, to the image it refines.
    ImageLevels(Vec<TokenGrid>),
    /// An opaque attachment the caller chose to send raw.
    Raw {
        /// IANA media type, e.g. `image/png`.
        media_type: String,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// A request for a token-native agent to make something (inpaint, outpaint, generate,
    /// vary); it travels as a raw part of media type
    /// [`REQUEST_MEDIA_TYPE`](crate::request::REQUEST_MEDIA_TYPE).
    Request(crate::request::Request),
}

impl Content {
    /// The base grid of an image ([`Content::Image`], or level 1 of [`Content::ImageLevels`]).
    pub fn base_image(&self) -> Option<&TokenGrid> {
        match self {
            Content::Image(g) => Some(g),
            Content::ImageLevels(levels) => levels.first(),
            _ => None,
        }
    }

    /// Every level of an image, base first (one for a [`Content::Image`]).
    ///
    /// ```
    /// use unimic_agents::Content;
    /// use unimic_codec::grid::TokenGrid;
    /// let g = TokenGrid::new(1, 1, 4, vec![3]).unwrap();
    /// let levels = Content::ImageLevels(vec![g.clone(), g.clone()]);
    /// assert_eq!(levels.image_levels().map(<[_]>::len), Some(2));
    /// assert_eq!(Content::Image(g.clone()).base_image(), Some(&g));
    /// ```
    pub fn image_levels(&self) -> Option<&[TokenGrid]> {
        match self {
            Content::Image(g) => Some(std::slice::from_ref(g)),
            Content::ImageLevels(levels) => Some(levels),
            _ => None,
        }
    }

    /// The content of a raw part: a [`Content::Request`] when it is a readable request part,
    /// otherwise [`Content::Raw`] (an unreadable request stays raw, and an agent that takes
    /// requests reports why with [`Request::from_json`](crate::request::Request::from_json)).
    pub fn from_raw(media_type: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        let (media_type, bytes) = (media_type.into(), bytes.into());
        if media_type == crate::request::REQUEST_MEDIA_TYPE {
            if let Ok(r) = crate::request::Request::from_json(&bytes) {
                return Content::Request(r);
            }
        }
        Content::Raw { media_type, bytes }
    }

    /// Text content without ids.
    pub fn text(text: impl Into<String>) -> Self {
        Content::Text {
            text: text.into(),
            ids: None,
        }
    }
}

/// One turn of the conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// Who spoke.
    pub role: Role,
    /// What was said, in order.
    pub content: Vec<Content>,
}

/// The conversation so far, oldest turn first; the last turn is the one to answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conversation {
    /// The turns.
    pub turns: Vec<Turn>,
}

/// What an agent can take and produce. Defaults are conservative: text in, text out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// Accepts images (as pixels or tokens).
    pub image_input: bool,
    /// Emits image token grids.
    pub image_output: bool,
    /// Streams its output in deltas rather than all at once.
    pub streaming: bool,
}

/// The receiver stopped taking output (for example the turn was cancelled).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("reply sink closed: {0}")]
pub struct SinkError(pub String);

/// The future a [`ReplySink`] method returns: it completes once the output has been taken (for
/// a sink that sends over a network, once it is written to the connection, so an agent that
/// awaits every call is paced by the receiver: backpressure).
pub type SinkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>>;

/// The future [`ReplySink::begin_edit`] returns.
pub type BoolFuture<'a> = Pin<Box<dyn Future<Output = Result<bool, SinkError>> + Send + 'a>>;

/// Where an agent writes its reply as it produces it. Each call is awaited before the next one;
/// an error means the receiver stopped taking output (the turn was cancelled or the connection
/// is gone) and the agent should return it. An image begun with [`image_tokens`](Self::image_tokens)
/// or an edit begun with [`begin_edit`](Self::begin_edit) must be completed before the agent
/// returns: the serving glue fails a reply left with half an image (`AGENT_FAILED`).
pub trait ReplySink: Send {
    /// Appends a text delta to the reply.
    fn text_delta<'a>(&'a mut self, delta: &'a str) -> SinkFuture<'a>;
    /// Appends a chunk of image token ids (row-major) to the reply's image of the given shape
    /// `(height, width)`; `last` marks the final chunk, after which the chunks of the image hold
    /// exactly `height × width` ids.
    fn image_tokens<'a>(
        &'a mut self,
        shape: (u32, u32),
        ids: &'a [u32],
        last: bool,
    ) -> SinkFuture<'a>;

    /// Appends an image that equals the conversation's image at `base` outside `region`
    /// (row-major over `grid`, `true` = changed cell; same shape as the base image). A sink that
    /// can send edits (the serving glue, when the session negotiated the masked model and both
    /// ends still hold the base) sends only the region's cells; the receiver gets the whole
    /// grid either way. The default sends the whole grid as one [`Self::image_tokens`] chunk.
    fn image_edit<'a>(
        &'a mut self,
        base: ImageRef,
        grid: &'a TokenGrid,
        region: &'a [bool],
    ) -> SinkFuture<'a> {
        let _ = (base, region);
        self.image_tokens((grid.height(), grid.width()), grid.ids(), true)
    }

    /// Starts an edit of the conversation's image at `base` (whose tokens are `base_grid`;
    /// `region` row-major over them, `true` = redrawn) whose redrawn cells come later, as they
    /// are made, with [`edit_tokens`](Self::edit_tokens): a sink that sends over a network can
    /// stream them, so the receiver sees the edit grow. Returns `false` if this sink takes edits
    /// only whole (the default, and a sink that cannot send this one as an edit): send it with
    /// [`image_edit`](Self::image_edit) instead.
    fn begin_edit<'a>(
        &'a mut self,
        base: ImageRef,
        base_grid: &'a TokenGrid,
        region: &'a [bool],
    ) -> BoolFuture<'a> {
        let _ = (base, base_grid, region);
        Box::pin(std::future::ready(Ok(false)))
    }

    /// The next redrawn cells of the edit started with [`begin_edit`](Self::begin_edit), in
    /// row-major order of the region's cells; `last` marks the final piece, after which the
    /// pieces hold every cell of the region. The default refuses (no edit can have begun).
    fn edit_tokens<'a>(&'a mut self, ids: &'a [u32], last: bool) -> SinkFuture<'a> {
        let _ = (ids, last);
        Box::pin(std::future::ready(Err(SinkError(
            "this sink takes edits only whole".into(),
        ))))
    }
}

/// Where an image sits in a [`Conversation`]: `turns[turn].content[content]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Index of the turn.
    pub turn: usize,
    /// Index of the image within the turn's content.
    pub content: usize,
}

impl Conversation {
    /// The most recent image of the conversation (of either side), with where it sits: its base
    /// grid (level 1 of an image sent as a quality ladder).
    pub fn last_image(&self) -> Option<(ImageRef, &TokenGrid)> {
        self.turns.iter().enumerate().rev().find_map(|(t, turn)| {
            turn.content
                .iter()
                .enumerate()
                .rev()
                .find_map(|(c, content)| {
                    content.base_image().map(|g| {
                        (
                            ImageRef {
                                turn: t,
                                content: c,
                            },
                            g,
                        )
                    })
                })
        })
    }
}

/// A [`ReplySink`] that collects everything in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CollectSink {
    /// All text deltas, concatenated.
    pub text: String,
    /// Image token chunks received, with their declared shapes and final flags (an edit
    /// arrives here as its whole grid in one chunk, as the default [`ReplySink::image_edit`]
    /// sends it).
    pub image_chunks: Vec<((u32, u32), Vec<u32>, bool)>,
    /// The base and region of every image sent as an edit.
    pub edits: Vec<(ImageRef, Vec<bool>)>,
}

impl ReplySink for CollectSink {
    fn text_delta<'a>(&'a mut self, delta: &'a str) -> SinkFuture<'a> {
        self.text.push_str(delta);
        Box::pin(std::future::ready(Ok(())))
    }

    fn image_tokens<'a>(
        &'a mut self,
        shape: (u32, u32),
        ids: &'a [u32],
        last: bool,
    ) -> SinkFuture<'a> {
        self.image_chunks.push((shape, ids.to_vec(), last));
        Box::pin(std::future::ready(Ok(())))
    }

    fn image_edit<'a>(
        &'a mut self,
        base: ImageRef,
        grid: &'a TokenGrid,
        region: &'a [bool],
    ) -> SinkFuture<'a> {
        self.edits.push((base, region.to_vec()));
        self.image_tokens((grid.height(), grid.width()), grid.ids(), true)
    }
}

/// Why an agent could not answer.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The conversation has no turn to answer.
    #[error("the conversation is empty")]
    EmptyConversation,
    /// The agent cannot take this content (see [`Capabilities`]).
    #[error("unsupported content: {0}")]
    Unsupported(String),
    /// The reply sink refused output.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The model or its server failed.
    #[error("backend error: {0}")]
    Backend(String),
}

/// The future an [`Agent`] returns.
pub type AgentFuture<'a> = Pin<Box<dyn Future<Output = Result<(), AgentError>> + Send + 'a>>;

/// An LMM on the receiving side of a session.
///
/// The server calls [`Agent::respond`] once per incoming turn. The agent streams its reply into
/// `sink` (awaiting each call) and returns when done; dropping the future cancels the turn (the
/// server does so when the client cancels).
///
/// ```
/// use unimic_agents::{Agent, AgentError, AgentFuture, Content, Conversation, ReplySink};
///
/// /// Answers every turn with its text in capitals.
/// struct Shout;
///
/// impl Agent for Shout {
///     fn respond<'a>(&'a self, c: &'a Conversation, sink: &'a mut dyn ReplySink) -> AgentFuture<'a> {
///         Box::pin(async move {
///             let turn = c.turns.last().ok_or(AgentError::EmptyConversation)?;
///             for content in &turn.content {
///                 if let Content::Text { text, .. } = content {
///                     sink.text_delta(&text.to_uppercase()).await?;
///                 }
///             }
///             Ok(())
///         })
///     }
/// }
/// ```
pub trait Agent: Send + Sync {
    /// What this agent accepts and produces.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Answers the last turn of `conversation`, writing the reply into `sink`.
    fn respond<'a>(
        &'a self,
        conversation: &'a Conversation,
        sink: &'a mut dyn ReplySink,
    ) -> AgentFuture<'a>;
}

//! unimic-agents: the [`Agent`] trait that plugs a large multimodal model (LMM) into the receiving
//! side of a unimic session, and its implementations.
//!
//! An agent is called once per incoming turn with the conversation so far and a [`ReplySink`] that
//! takes streamed output (text deltas and image token chunks; each call is awaited, which paces
//! the agent by the receiver). Agents never see QUIC or the wire format: the serving glue
//! (`unimic-chat`'s `serve`) decodes parts into [`Content`] before calling them, and codes what
//! they emit.
//!
//! Implementations here: [`echo::Echo`] (returns what it was sent; for tests and demos) and
//! [`local::LocalAgent`] (token-native: inpainting, outpainting, variations and text-to-image
//! sampled with the project's entropy models, no network). What a user asks a token-native agent
//! to make travels as a [`request::Request`]. [`conformance::run`] checks that an agent keeps
//! the contract of [`Agent::respond`] (every agent here passes it).
//! With the `openai` feature, `openai::OpenAiAgent` streams replies from OpenAI-compatible servers.
//!
//! ```
//! use unimic_agents::{Agent, Content, Conversation, Role, Turn, CollectSink, echo::Echo};
//! # let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
//! # rt.block_on(async {
//! let conversation = Conversation {
//!     turns: vec![Turn { role: Role::User, content: vec![Content::text("hello")] }],
//! };
//! let mut sink = CollectSink::default();
//! Echo::default().respond(&conversation, &mut sink).await.unwrap();
//! assert_eq!(sink.text, "hello");
//! # });
//! ```
#![warn(missing_docs)]

mod agent;
pub mod conformance;
pub mod echo;
pub mod local;
#[cfg(feature = "openai")]
pub mod openai;
pub mod request;

pub use agent::{
    Agent, AgentError, AgentFuture, BoolFuture, Capabilities, CollectSink, Content, Conversation,
    ImageRef, ReplySink, Role, SinkError, SinkFuture, Turn,
};

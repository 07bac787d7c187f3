//! Runnable unimic examples; see `examples/examples/` and `examples/README.md`.
//!
//! - `text_session`: a two-turn text session without a network: tokenize, entropy-code with
//!   session context, frame as protocol messages, parse, verify the context digest, decode.
//! - `chat_server`: a unimic server answering with an agent of your own (`unimic_chat::serve`).
//! - `chat_client`: connect, send a photo and a question, print the streamed reply
//!   (`unimic_chat::Chat`).

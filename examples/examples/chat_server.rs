//! A unimic server whose agent is your own code: it answers every turn with its text in capitals
//! and says which images it got. Run it, then point `chat_client` (or `unimic chat`) at the
//! address and pin it prints:
//!
//! ```text
//! cargo run -p unimic-examples --example chat_server
//! ```
use unimic_agents::{Agent, AgentError, AgentFuture, Content, Conversation, ReplySink};
use unimic_codec::tokenizer::Vq;

struct Shout;

impl Agent for Shout {
    fn respond<'a>(&'a self, c: &'a Conversation, sink: &'a mut dyn ReplySink) -> AgentFuture<'a> {
        Box::pin(async move {
            for part in &c.turns.last().ok_or(AgentError::EmptyConversation)?.content {
                match part {
                    Content::Text { text, .. } => sink.text_delta(&text.to_uppercase()).await?,
                    Content::Image(g) => {
                        sink.text_delta(&format!(" [A {}x{} IMAGE]", g.width(), g.height()))
                            .await?
                    }
                    _ => {}
                }
            }
            Ok(())
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vq = unimic_chat::tokenizer_info(&Vq::default_model()?)?; // so that clients may send images
    let server = unimic_chat::bind_dev("127.0.0.1:4433".parse()?, [vq])?;
    println!(
        "listening on {} with pin {}",
        server.local_addr()?,
        server.cert_hash()
    );
    unimic_chat::serve(server, Shout).await;
    Ok(())
}

//! [`Echo`]: an agent that replies with the content of the turn it was sent.

use crate::{Agent, AgentError, AgentFuture, Capabilities, Content, Conversation, ReplySink};

/// Replies with the last turn's text (concatenated) and images (token for token, in one chunk
/// each). Raw attachments are refused. Useful for tests and demos of the full path.
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

impl Agent for Echo {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            image_input: true,
            image_output: true,
            streaming: true,
        }
    }

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
            for content in &turn.content {
                match content {
                    Content::Text { text, .. } => sink.text_delta(text).await?,
                    Content::Image(grid) => {
                        sink.image_tokens((grid.height(), grid.width()), grid.ids(), true)
                            .await?
                    }
                    // The base grid: a reply image has one level.
                    Content::ImageLevels(levels) => {
                        if let Some(grid) = levels.first() {
                            sink.image_tokens((grid.height(), grid.width()), grid.ids(), true)
                                .await?
                        }
                    }
                    Content::Raw { media_type, .. } => {
                        return Err(AgentError::Unsupported(format!(
                            "echo does not return raw attachments ({media_type})"
                        )))
                    }
                    Content::Request(_) => {
                        return Err(AgentError::Unsupported(
                            "echo does not take requests (the local agent does)".into(),
                        ))
                    }
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CollectSink, Role, SinkError, SinkFuture, Turn};
    use unimic_codec::grid::TokenGrid;

    fn run(
        agent: &Echo,
        conversation: &Conversation,
        sink: &mut dyn ReplySink,
    ) -> Result<(), AgentError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(agent.respond(conversation, sink))
    }

    #[test]
    fn echoes_text_and_images_of_the_last_turn() {
        let grid = TokenGrid::new(2, 2, 16, vec![1, 2, 3, 15]).unwrap();
        let conversation = Conversation {
            turns: vec![
                Turn {
                    role: Role::User,
                    content: vec![Content::text("first")],
                },
                Turn {
                    role: Role::User,
                    content: vec![
                        Content::text("a "),
                        Content::Image(grid),
                        Content::text("b"),
                    ],
                },
            ],
        };
        let mut sink = CollectSink::default();
        run(&Echo, &conversation, &mut sink).unwrap();
        assert_eq!(sink.text, "a b");
        assert_eq!(sink.image_chunks, vec![((2, 2), vec![1, 2, 3, 15], true)]);
    }

    #[test]
    fn empty_conversation_and_raw_parts_are_errors() {
        let mut sink = CollectSink::default();
        assert!(matches!(
            run(&Echo, &Conversation::default(), &mut sink),
            Err(AgentError::EmptyConversation)
        ));
        let conversation = Conversation {
            turns: vec![Turn {
                role: Role::User,
                content: vec![Content::Raw {
                    media_type: "image/png".into(),
                    bytes: vec![1],
                }],
            }],
        };
        assert!(matches!(
            run(&Echo, &conversation, &mut sink),
            Err(AgentError::Unsupported(_))
        ));
    }

    #[test]
    fn a_closed_sink_stops_the_reply() {
        struct Closed;
        impl ReplySink for Closed {
            fn text_delta<'a>(&'a mut self, _: &'a str) -> SinkFuture<'a> {
                Box::pin(async { Err(SinkError("cancelled".into())) })
            }
            fn image_tokens<'a>(
                &'a mut self,
                _: (u32, u32),
                _: &'a [u32],
                _: bool,
            ) -> SinkFuture<'a> {
                Box::pin(async { Err(SinkError("cancelled".into())) })
            }
        }
        let conversation = Conversation {
            turns: vec![Turn {
                role: Role::User,
                content: vec![Content::text("x")],
            }],
        };
        assert!(matches!(
            run(&Echo, &conversation, &mut Closed),
            Err(AgentError::Sink(_))
        ));
    }
}

//! The `Agent` conformance suite: what every agent must do, whatever model sits behind it.
//!
//! [`run`] calls an agent with a fixed set of conversations and sinks and checks the contract of
//! [`Agent::respond`]:
//!
//! | check | the agent must |
//! | --- | --- |
//! | `empty_conversation` | return [`AgentError::EmptyConversation`], writing nothing |
//! | `empty_turn` | answer a turn with no content, or refuse it with a typed error |
//! | `text_turn` | answer a plain text turn (some output, or a typed refusal if it takes no text) |
//! | `unsupported_content` | refuse what it cannot take with [`AgentError::Unsupported`] (an image when its capabilities say `image_input: false`; an unknown raw attachment) or answer it, never fail with a backend error |
//! | `sink_refuses` | stop at the first refused sink call and return [`AgentError::Sink`], with no call after it |
//! | `cancelled` | survive its future being dropped mid-reply, and answer the next turn |
//! | `large_turn` | take a 100 KB text turn and a 64×64 image without panicking or hanging (answer or typed error) |
//! | `concurrent` | answer two conversations at once (agents are shared between sessions) |
//! | `paced` | keep working when every sink call is slow (backpressure): output arrives complete |
//! | `images_well_formed` | (agents with `image_output`) send image chunks whose sizes add up to the declared shape, the last one marked |
//!
//! Every call runs under a time bound, so an agent that hangs fails its check instead of the
//! suite. A panic inside the agent fails the check too (the suite runs each call in a task).
//!
//! ```
//! use unimic_agents::conformance::{run, Options};
//! use unimic_agents::echo::Echo;
//! # let rt = tokio::runtime::Runtime::new().unwrap();
//! # rt.block_on(async {
//! let report = run(std::sync::Arc::new(Echo), &Options::default()).await;
//! assert!(report.passed(), "{report}");
//! # });
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use unimic_codec::grid::TokenGrid;

use crate::{
    Agent, AgentError, CollectSink, Content, Conversation, ImageRef, ReplySink, Role, SinkError,
    SinkFuture, Turn,
};

/// How the suite talks to the agent.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// Codebook size of the image grids in the conversations (the agent's tokenizer's).
    pub codebook_size: u32,
    /// Longest a single call may take before its check fails as a hang.
    pub timeout: Duration,
    /// A text turn the agent can answer (for example a question for an LMM).
    pub prompt: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            codebook_size: 1024,
            timeout: Duration::from_secs(60),
            prompt: "Say hello in three words.".into(),
        }
    }
}

impl Options {
    /// Sets the codebook size of the test images.
    pub fn with_codebook_size(mut self, k: u32) -> Self {
        self.codebook_size = k.max(1);
        self
    }

    /// Sets the time bound of each call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The check's name (see the module docs).
    pub name: &'static str,
    /// `Ok` with what was seen, or why it failed.
    pub outcome: Result<String, String>,
}

/// Every check's outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// In the order run.
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.outcome.is_ok())
    }

    /// The checks that failed.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.outcome.is_err())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            match &c.outcome {
                Ok(seen) => writeln!(f, "pass {}: {seen}", c.name)?,
                Err(why) => writeln!(f, "FAIL {}: {why}", c.name)?,
            }
        }
        Ok(())
    }
}

fn user(content: Vec<Content>) -> Conversation {
    Conversation {
        turns: vec![Turn {
            role: Role::User,
            content,
        }],
    }
}

fn image(k: u32, side: u32, seed: u32) -> TokenGrid {
    let ids = (0..side * side)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) % k)
        .collect();
    // The shape and ids are valid by construction.
    TokenGrid::new(side, side, k, ids).unwrap_or_else(|_| unreachable!())
}

/// What a sink saw, and the order of calls.
#[derive(Debug, Default)]
struct Recording {
    sink: CollectSink,
    calls: usize,
}

/// A sink that records, optionally waits before taking each call, and optionally refuses from
/// call number `refuse_from` on (counting from 0), noting calls made after a refusal.
struct TestSink {
    rec: Recording,
    delay: Option<Duration>,
    refuse_from: Option<usize>,
    after_refusal: usize,
}

impl TestSink {
    fn new() -> Self {
        Self {
            rec: Recording::default(),
            delay: None,
            refuse_from: None,
            after_refusal: 0,
        }
    }

    async fn take(&mut self) -> Result<(), SinkError> {
        let n = self.rec.calls;
        self.rec.calls += 1;
        if let Some(r) = self.refuse_from {
            if n > r {
                self.after_refusal += 1;
            }
            if n >= r {
                return Err(SinkError("the conformance suite refused output".into()));
            }
        }
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        Ok(())
    }
}

impl ReplySink for TestSink {
    fn text_delta<'a>(&'a mut self, delta: &'a str) -> SinkFuture<'a> {
        Box::pin(async move {
            self.take().await?;
            self.rec.sink.text.push_str(delta);
            Ok(())
        })
    }

    fn image_tokens<'a>(
        &'a mut self,
        shape: (u32, u32),
        ids: &'a [u32],
        last: bool,
    ) -> SinkFuture<'a> {
        Box::pin(async move {
            self.take().await?;
            self.rec.sink.image_chunks.push((shape, ids.to_vec(), last));
            Ok(())
        })
    }

    fn image_edit<'a>(
        &'a mut self,
        base: ImageRef,
        grid: &'a TokenGrid,
        region: &'a [bool],
    ) -> SinkFuture<'a> {
        Box::pin(async move {
            self.take().await?;
            self.rec.sink.edits.push((base, region.to_vec()));
            self.rec.sink.image_chunks.push((
                (grid.height(), grid.width()),
                grid.ids().to_vec(),
                true,
            ));
            Ok(())
        })
    }
}

/// Runs `agent` on `conversation` into `sink` in its own task, under `timeout`.
async fn call(
    agent: &Arc<dyn Agent>,
    conversation: Conversation,
    mut sink: TestSink,
    timeout: Duration,
) -> Result<(Result<(), AgentError>, TestSink), String> {
    let agent = Arc::clone(agent);
    let mut task = tokio::spawn(async move {
        let r = agent.respond(&conversation, &mut sink).await;
        (r, sink)
    });
    match tokio::time::timeout(timeout, &mut task).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.is_panic() => Err("the agent panicked".into()),
        Ok(Err(e)) => Err(format!("the agent's task failed: {e}")),
        Err(_) => {
            // Cancel the hung call (drops the agent's future) rather than leave it running.
            task.abort();
            Err(format!("no answer within {timeout:?} (hang)"))
        }
    }
}

/// Output or a typed refusal is fine; a backend failure or a sink error is not.
fn answered_or_refused(r: &Result<(), AgentError>, sink: &TestSink) -> Result<String, String> {
    match r {
        Ok(()) => Ok(format!(
            "answered ({} characters, {} image chunks)",
            sink.rec.sink.text.chars().count(),
            sink.rec.sink.image_chunks.len()
        )),
        Err(e @ (AgentError::Unsupported(_) | AgentError::EmptyConversation)) => {
            Ok(format!("refused: {e}"))
        }
        Err(e) => Err(format!("failed: {e}")),
    }
}

/// Checks that every image in the sink is well formed.
fn images_ok(sink: &CollectSink) -> Result<usize, String> {
    let mut images = 0;
    let mut current: Option<((u32, u32), usize)> = None;
    for (shape, ids, last) in &sink.image_chunks {
        let (s, n) = current.get_or_insert((*shape, 0));
        if s != shape {
            return Err(format!(
                "an image's chunks declare two shapes, {s:?} and {shape:?}"
            ));
        }
        *n += ids.len();
        if *last {
            let want = shape.0 as usize * shape.1 as usize;
            if *n != want {
                return Err(format!(
                    "an image of shape {shape:?} ended after {n} ids, not {want}"
                ));
            }
            images += 1;
            current = None;
        }
    }
    if current.is_some() {
        return Err("an image's last chunk was never marked".into());
    }
    Ok(images)
}

/// Runs every check on `agent` (see the module docs).
pub async fn run(agent: Arc<dyn Agent>, options: &Options) -> Report {
    let caps = agent.capabilities();
    let k = options.codebook_size;
    let t = options.timeout;
    let mut report = Report::default();
    let mut check = |name: &'static str, outcome: Result<String, String>| {
        report.checks.push(Check { name, outcome });
    };

    // empty_conversation
    check(
        "empty_conversation",
        match call(&agent, Conversation::default(), TestSink::new(), t).await {
            Ok((Err(AgentError::EmptyConversation), s)) if s.rec.calls == 0 => {
                Ok("EmptyConversation".into())
            }
            Ok((r, s)) => Err(format!(
                "expected EmptyConversation and no output, got {r:?} after {} sink calls",
                s.rec.calls
            )),
            Err(e) => Err(e),
        },
    );

    // empty_turn
    check(
        "empty_turn",
        match call(&agent, user(Vec::new()), TestSink::new(), t).await {
            Ok((r, s)) => answered_or_refused(&r, &s),
            Err(e) => Err(e),
        },
    );

    // text_turn
    let text = user(vec![Content::text(options.prompt.clone())]);
    check(
        "text_turn",
        match call(&agent, text.clone(), TestSink::new(), t).await {
            Ok((r, s)) => answered_or_refused(&r, &s),
            Err(e) => Err(e),
        },
    );

    // unsupported_content
    let mut outcome = Ok(String::new());
    let raw = user(vec![
        Content::text("What is this?"),
        Content::Raw {
            media_type: "application/x-unimic-conformance".into(),
            bytes: vec![0, 1, 2, 3],
        },
    ]);
    let pic = user(vec![
        Content::text("What is this?"),
        Content::Image(image(k, 8, 1)),
    ]);
    for (what, conversation) in [("unknown raw attachment", raw), ("image", pic)] {
        let seen = match call(&agent, conversation, TestSink::new(), t).await {
            Ok((Err(AgentError::Unsupported(m)), _)) => Ok(format!("{what}: Unsupported ({m})")),
            Ok((Ok(()), _)) if what == "image" && !caps.image_input => Err(
                "answered an image although its capabilities say image_input: false".to_string(),
            ),
            Ok((r, s)) => answered_or_refused(&r, &s).map(|m| format!("{what}: {m}")),
            Err(e) => Err(e),
        };
        outcome = match (outcome, seen) {
            (Ok(a), Ok(b)) => Ok(if a.is_empty() { b } else { format!("{a}; {b}") }),
            (Err(a), _) | (_, Err(a)) => Err(a),
        };
    }
    check("unsupported_content", outcome);

    // sink_refuses: the first call is refused.
    let mut sink = TestSink::new();
    sink.refuse_from = Some(0);
    check(
        "sink_refuses",
        match call(&agent, text.clone(), sink, t).await {
            Ok((Err(AgentError::Sink(_)), s)) if s.after_refusal == 0 => {
                Ok("stopped with AgentError::Sink at the first refusal".into())
            }
            Ok((Err(AgentError::Sink(_)), s)) => Err(format!(
                "returned Sink but made {} more calls after the refusal",
                s.after_refusal
            )),
            // An agent that writes nothing for this turn never meets the refusal.
            Ok((r, s)) if s.rec.calls == 0 => {
                answered_or_refused(&r, &s).map(|m| format!("wrote nothing, so never refused: {m}"))
            }
            Ok((r, s)) => Err(format!(
                "expected AgentError::Sink after the refused call, got {r:?} ({} calls)",
                s.rec.calls
            )),
            Err(e) => Err(e),
        },
    );

    // cancelled: drop the future after the first sink call, then answer again.
    let cancelled = {
        let agent2 = Arc::clone(&agent);
        let conversation = text.clone();
        let first = tokio::spawn(async move {
            let mut sink = TestSink::new();
            sink.delay = Some(Duration::from_millis(50));
            let fut = agent2.respond(&conversation, &mut sink);
            // Dropped after 20 ms: mid-reply for any agent that writes at all.
            let _ = tokio::time::timeout(Duration::from_millis(20), fut).await;
        });
        match tokio::time::timeout(t, first).await {
            Ok(Ok(())) => match call(&agent, text.clone(), TestSink::new(), t).await {
                Ok((r, s)) => answered_or_refused(&r, &s)
                    .map(|m| format!("the next turn after a dropped one: {m}")),
                Err(e) => Err(e),
            },
            Ok(Err(e)) if e.is_panic() => Err("the agent panicked when dropped".into()),
            Ok(Err(e)) => Err(format!("{e}")),
            Err(_) => Err("dropping the reply did not return (hang)".into()),
        }
    };
    check("cancelled", cancelled);

    // large_turn
    let big = user(vec![
        Content::text("lorem ipsum ".repeat(100_000 / 12)),
        Content::Image(image(k, 64, 2)),
    ]);
    check(
        "large_turn",
        match call(&agent, big, TestSink::new(), t).await {
            Ok((r, s)) => answered_or_refused(&r, &s),
            Err(e) => Err(e),
        },
    );

    // concurrent
    let (a, b) = tokio::join!(
        call(&agent, text.clone(), TestSink::new(), t),
        call(&agent, text.clone(), TestSink::new(), t)
    );
    check(
        "concurrent",
        match (a, b) {
            (Ok((ra, sa)), Ok((rb, sb))) => answered_or_refused(&ra, &sa)
                .and_then(|x| answered_or_refused(&rb, &sb).map(|y| format!("{x}; {y}"))),
            (Err(e), _) | (_, Err(e)) => Err(e),
        },
    );

    // paced: every sink call takes 5 ms; the reply must still be complete and well formed.
    let mut slow = TestSink::new();
    slow.delay = Some(Duration::from_millis(5));
    let mut fast_text = None;
    if let Ok((Ok(()), s)) = call(&agent, text.clone(), TestSink::new(), t).await {
        fast_text = Some(s.rec.sink.text.clone());
    }
    check(
        "paced",
        match call(&agent, text.clone(), slow, t).await {
            Ok((Ok(()), s)) => match images_ok(&s.rec.sink) {
                Err(e) => Err(e),
                // Deterministic agents give the same text at any pace; others just complete.
                Ok(_) if fast_text.as_deref().is_some_and(|f| f == s.rec.sink.text) => {
                    Ok(format!("{} sink calls, same text as unpaced", s.rec.calls))
                }
                Ok(_) => Ok(format!("{} sink calls, complete", s.rec.calls)),
            },
            Ok((r, s)) => answered_or_refused(&r, &s),
            Err(e) => Err(e),
        },
    );

    // images_well_formed: an image turn for agents that produce images.
    if caps.image_output {
        let pic = user(vec![
            Content::text("Here is an image."),
            Content::Image(image(k, 8, 3)),
        ]);
        check(
            "images_well_formed",
            match call(&agent, pic, TestSink::new(), t).await {
                Ok((Ok(()), s)) => images_ok(&s.rec.sink).map(|n| format!("{n} images")),
                Ok((r, s)) => answered_or_refused(&r, &s),
                Err(e) => Err(e),
            },
        );
    }
    report
}

//! The local token-native agent on the shipped masked and text-conditioned models.

use std::path::PathBuf;

use unimic_agents::local::LocalAgent;
use unimic_agents::request::{Border, CellRect, Request, Task, REQUEST_MEDIA_TYPE};
use unimic_agents::{
    Agent, AgentError, CollectSink, Content, Conversation, ImageRef, ReplySink, Role, SinkError,
    SinkFuture, Turn,
};
use unimic_codec::grid::TokenGrid;
use unimic_codec::shipped;

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/entropy")
}

fn agent() -> LocalAgent {
    let m = models();
    LocalAgent::load(
        &shipped::manifest_path(&m, shipped::MASKED_ID),
        &shipped::manifest_path(&m, shipped::TEXT_ID),
    )
    .expect("the shipped models load")
}

/// A 16×16 grid with some structure (not constant).
fn photo() -> TokenGrid {
    let ids = (0..256u32)
        .map(|i| (i * 37 + (i / 16) * 11) % 1024)
        .collect();
    TokenGrid::new(16, 16, 1024, ids).unwrap()
}

fn turn(content: Vec<Content>) -> Turn {
    Turn {
        role: Role::User,
        content,
    }
}

fn with_image(request: Request) -> Conversation {
    Conversation {
        turns: vec![
            turn(vec![Content::text("here"), Content::Image(photo())]),
            Turn {
                role: Role::Assistant,
                content: vec![Content::text("ok")],
            },
            turn(vec![Content::Request(request)]),
        ],
    }
}

fn run(agent: &LocalAgent, c: &Conversation) -> Result<CollectSink, AgentError> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut sink = CollectSink::default();
    rt.block_on(agent.respond(c, &mut sink))?;
    Ok(sink)
}

/// The reply's image: streamed one chunk per row with only the last one marked, or (an edit in
/// place) sent whole as an edit of the conversation's image.
fn image_of(sink: &CollectSink) -> TokenGrid {
    let chunks = &sink.image_chunks;
    assert!(!chunks.is_empty(), "no image in the reply: {:?}", sink.text);
    let (h, w) = chunks[0].0;
    if sink.edits.is_empty() {
        assert_eq!(chunks.len(), h as usize, "one chunk per row");
    } else {
        assert_eq!(chunks.len(), 1, "an edit is sent whole");
    }
    for (i, (shape, ids, last)) in chunks.iter().enumerate() {
        assert_eq!(*shape, (h, w));
        assert_eq!(ids.len() * chunks.len(), (h * w) as usize);
        assert_eq!(*last, i + 1 == chunks.len());
    }
    let ids = chunks.iter().flat_map(|c| c.1.iter().copied()).collect();
    TokenGrid::new(h, w, 1024, ids).unwrap()
}

/// Where `with_image` puts the photo.
const PHOTO: ImageRef = ImageRef {
    turn: 0,
    content: 1,
};

#[test]
fn inpainting_redraws_only_the_region_and_is_seeded() {
    let a = agent();
    let region = CellRect {
        x0: 4,
        y0: 5,
        x1: 12,
        y1: 11,
    };
    let req = Request::new(Task::Inpaint { region }).with_seed(11);
    let one = run(&a, &with_image(req)).unwrap();
    assert!(
        one.text.starts_with("Inpainted cells x 4..12, y 5..11"),
        "{}",
        one.text
    );
    let out = image_of(&one);
    let src = photo();
    let mut changed = 0;
    for r in 0..16 {
        for c in 0..16 {
            if region.contains(r, c) {
                changed += usize::from(out.get(r, c) != src.get(r, c));
            } else {
                assert_eq!(out.get(r, c), src.get(r, c), "kept cell ({r}, {c}) changed");
            }
        }
    }
    assert!(
        changed > 24,
        "only {changed} of 48 region cells were redrawn"
    );
    let region_mask: Vec<bool> = (0..256).map(|i| region.contains(i / 16, i % 16)).collect();
    assert_eq!(
        one.edits,
        [(PHOTO, region_mask)],
        "sent as an edit of the photo"
    );
    assert_eq!(
        image_of(&run(&a, &with_image(req)).unwrap()),
        out,
        "same seed, same tokens"
    );
    let other = image_of(&run(&a, &with_image(req.with_seed(12))).unwrap());
    assert_ne!(other, out, "another seed, other tokens");
}

#[test]
fn outpainting_keeps_the_centre() {
    let a = agent();
    let border = Border {
        top: 2,
        right: 4,
        bottom: 0,
        left: 1,
    };
    let req = Request::new(Task::Outpaint { border })
        .with_seed(3)
        .with_top_k(50);
    let out = image_of(&run(&a, &with_image(req)).unwrap());
    assert_eq!((out.height(), out.width()), (18, 21));
    let src = photo();
    for r in 0..16 {
        for c in 0..16 {
            assert_eq!(out.get(r + 2, c + 1), src.get(r, c));
        }
    }
}

#[test]
fn variation_strength_sets_how_much_changes() {
    let a = agent();
    let src = photo();
    let same = image_of(
        &run(
            &a,
            &with_image(Request::new(Task::Variation { strength: 0.0 })),
        )
        .unwrap(),
    );
    assert_eq!(same, src);
    let req = Request::new(Task::Variation { strength: 0.5 }).with_seed(5);
    let sink = run(&a, &with_image(req)).unwrap();
    let out = image_of(&sink);
    let diff = out
        .ids()
        .iter()
        .zip(src.ids())
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        (60..=160).contains(&diff),
        "{diff} of 256 cells changed at strength 0.5"
    );
    assert_eq!(sink.edits.len(), 1);
    assert_eq!(sink.edits[0].0, PHOTO);
    let redrawn = sink.edits[0].1.iter().filter(|&&u| u).count();
    assert!(
        redrawn >= diff && (90..=166).contains(&redrawn),
        "{redrawn}"
    );
    assert!(sink.text.contains("cells redrawn"), "{}", sink.text);
}

#[test]
fn text_to_image_follows_the_prompt_and_the_seed() {
    let a = agent();
    let ask = |prompt: &str, seed: u64| {
        let req = Request::new(Task::Generate {
            height: 8,
            width: 12,
        })
        .with_seed(seed)
        .with_temperature(0.9);
        let c = Conversation {
            turns: vec![turn(vec![Content::text(prompt), Content::Request(req)])],
        };
        let sink = run(&a, &c).unwrap();
        assert!(
            sink.text.contains(&format!("{:?}", prompt)),
            "{}",
            sink.text
        );
        image_of(&sink)
    };
    let dog = ask("a dog runs on the beach", 1);
    assert_eq!((dog.height(), dog.width()), (8, 12));
    assert_eq!(ask("a dog runs on the beach", 1), dog);
    assert_ne!(ask("a dog runs on the beach", 2), dog);
    assert_ne!(ask("two children play in the snow", 1), dog);
}

#[test]
fn a_turn_without_a_request_says_what_the_agent_is() {
    let a = agent();
    let c = Conversation {
        turns: vec![turn(vec![
            Content::text("What is in this photo?"),
            Content::Image(photo()),
        ])],
    };
    let sink = run(&a, &c).unwrap();
    assert!(sink.image_chunks.is_empty());
    assert!(sink.text.contains("not a language model"), "{}", sink.text);
    assert!(
        sink.text.contains("a 16×16 grid of image tokens"),
        "{}",
        sink.text
    );
    assert!(sink.text.contains(shipped::MASKED_ID), "{}", sink.text);
}

#[test]
fn impossible_requests_are_unsupported_not_panics() {
    let a = agent();
    let unsupported = |c: &Conversation| match run(&a, c) {
        Err(AgentError::Unsupported(m)) => m,
        other => panic!("expected Unsupported, got {other:?}"),
    };
    let inpaint = |x1, y1| {
        Request::new(Task::Inpaint {
            region: CellRect {
                x0: 0,
                y0: 0,
                x1,
                y1,
            },
        })
    };
    // No image to edit.
    let c = Conversation {
        turns: vec![turn(vec![Content::Request(inpaint(2, 2))])],
    };
    assert!(unsupported(&c).contains("no image"));
    // Outside the image, empty, too large, wrong codebook.
    assert!(unsupported(&with_image(inpaint(17, 2))).contains("outside"));
    assert!(unsupported(&with_image(inpaint(0, 2))).contains("empty"));
    let huge = Request::new(Task::Outpaint {
        border: Border {
            top: 60,
            ..Border::default()
        },
    });
    assert!(unsupported(&with_image(huge)).contains("larger"));
    let gen = Request::new(Task::Generate {
        height: 0,
        width: 4,
    });
    assert!(unsupported(&with_image(gen)).contains("empty"));
    let small = TokenGrid::new(2, 2, 16, vec![1, 2, 3, 4]).unwrap();
    let c = Conversation {
        turns: vec![turn(vec![
            Content::Image(small),
            Content::Request(inpaint(1, 1)),
        ])],
    };
    assert!(unsupported(&c).contains("codes per token"));
    // A request part the server could not read.
    let c = Conversation {
        turns: vec![turn(vec![Content::from_raw(
            REQUEST_MEDIA_TYPE,
            br#"{"task":{"paint":{}}}"#.to_vec(),
        )])],
    };
    assert!(unsupported(&c).contains("invalid agent request"));
    assert!(matches!(
        run(&a, &Conversation::default()),
        Err(AgentError::EmptyConversation)
    ));
}

/// Takes the text and `rows` image chunks, then refuses.
struct Refuses {
    rows: usize,
}

impl ReplySink for Refuses {
    fn text_delta<'a>(&'a mut self, _: &'a str) -> SinkFuture<'a> {
        Box::pin(async { Ok(()) })
    }
    fn image_tokens<'a>(&'a mut self, _: (u32, u32), _: &'a [u32], _: bool) -> SinkFuture<'a> {
        Box::pin(async move {
            if self.rows == 0 {
                return Err(SinkError("cancelled".into()));
            }
            self.rows -= 1;
            Ok(())
        })
    }
}

#[test]
fn a_refusing_sink_stops_the_sampling() {
    let a = agent();
    let req = Request::new(Task::Generate {
        height: 64,
        width: 64,
    });
    let c = Conversation {
        turns: vec![turn(vec![Content::text("a cat"), Content::Request(req)])],
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt.block_on(a.respond(&c, &mut Refuses { rows: 2 }));
    assert!(matches!(r, Err(AgentError::Sink(_))), "{r:?}");
}

/// A sink that streams edits: it records the base and region it was given and each piece of
/// redrawn cells (`image_edit` must not be called).
#[derive(Default)]
struct EditStreamer {
    begun: Option<(ImageRef, TokenGrid, Vec<bool>)>,
    pieces: Vec<(Vec<u32>, bool)>,
    whole: bool,
}

impl ReplySink for EditStreamer {
    fn text_delta<'a>(&'a mut self, _: &'a str) -> SinkFuture<'a> {
        Box::pin(async { Ok(()) })
    }
    fn image_tokens<'a>(&'a mut self, _: (u32, u32), _: &'a [u32], _: bool) -> SinkFuture<'a> {
        self.whole = true;
        Box::pin(async { Ok(()) })
    }
    fn begin_edit<'a>(
        &'a mut self,
        base: ImageRef,
        base_grid: &'a TokenGrid,
        region: &'a [bool],
    ) -> unimic_agents::BoolFuture<'a> {
        self.begun = Some((base, base_grid.clone(), region.to_vec()));
        Box::pin(async { Ok(true) })
    }
    fn edit_tokens<'a>(&'a mut self, ids: &'a [u32], last: bool) -> SinkFuture<'a> {
        self.pieces.push((ids.to_vec(), last));
        Box::pin(async { Ok(()) })
    }
}

/// With a sink that streams edits, an inpainting (and a variation) sends only the redrawn cells,
/// a row's worth at a time as they are sampled, the last piece marked; the cells are those of
/// the same request sent whole.
#[test]
fn edits_stream_their_redrawn_cells_row_by_row() {
    let a = agent();
    let region = CellRect {
        x0: 3,
        y0: 2,
        x1: 9,
        y1: 7,
    };
    for req in [
        Request::new(Task::Inpaint { region }).with_seed(5),
        Request::new(Task::Variation { strength: 0.3 }).with_seed(6),
    ] {
        let whole = run(&a, &with_image(req)).unwrap();
        let (base, mask) = whole.edits[0].clone();
        let expected: Vec<u32> = image_of(&whole)
            .ids()
            .iter()
            .zip(&mask)
            .filter(|(_, &m)| m)
            .map(|(&id, _)| id)
            .collect();

        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut sink = EditStreamer::default();
        rt.block_on(a.respond(&with_image(req), &mut sink)).unwrap();
        assert!(!sink.whole, "nothing went as a whole image");
        let (b, g, m) = sink.begun.clone().expect("the edit was begun");
        assert_eq!((b, &g, &m), (base, &photo(), &mask));
        let rows_with_cells = (0..16).filter(|r| mask[r * 16..(r + 1) * 16].contains(&true));
        assert_eq!(
            sink.pieces.len(),
            rows_with_cells.count(),
            "a piece per row"
        );
        let lasts: Vec<bool> = sink.pieces.iter().map(|p| p.1).collect();
        assert_eq!(lasts.iter().filter(|&&l| l).count(), 1);
        assert_eq!(lasts.last(), Some(&true));
        let got: Vec<u32> = sink.pieces.iter().flat_map(|p| p.0.clone()).collect();
        assert_eq!(got, expected, "the same cells as sent whole");
    }
}

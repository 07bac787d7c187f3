//! The golden payloads of docs/CODING.md §8: one part per built-in entropy model (uniform, static,
//! adaptive grid and text, and the shipped generic, masked and text-conditioned transformers),
//! coded through the part layer from the inputs §8 describes. Each is re-encoded and compared
//! byte for byte with the hex in the document, and the document's bytes decode back to the
//! input, so the text and the code cannot drift apart.
//!
//! A vector is a fenced block preceded by `<!-- golden: NAME -->`; on each line, text after `#`
//! is a comment and the rest is hex bytes.

use std::path::PathBuf;
use std::sync::Arc;

use unimic_codec::context::{ContextKey, Sequence, SessionContext};
use unimic_codec::entropy::generic::Generic;
use unimic_codec::entropy::masked::Masked;
use unimic_codec::entropy::text_cond::TextCond;
use unimic_codec::entropy::{Static, TextPrior};
use unimic_codec::grid::TokenGrid;
use unimic_codec::part::{
    CodecConfig, DecodedPart, ModelChoice, PartCodec, PartShape, PartSpec, PartTokens,
};
use unimic_codec::shipped;

const SPEC: &str = include_str!("../../docs/CODING.md");

/// The bytes of the golden block `name`.
fn golden(name: &str) -> Option<Vec<u8>> {
    let marker = format!("<!-- golden: {name} -->");
    let start = SPEC.find(&marker)? + marker.len();
    let rest = &SPEC[start..];
    let open = rest.find("```")?;
    let body_start = open + rest[open..].find('\n')? + 1;
    let body_len = rest[body_start..].find("```")?;
    let mut digits = String::new();
    for line in rest[body_start..body_start + body_len].lines() {
        let data = line.split('#').next().unwrap_or("");
        digits.extend(data.chars().filter(|c| !c.is_whitespace()));
    }
    assert!(
        digits.len() % 2 == 0,
        "golden {name}: odd number of hex digits"
    );
    Some(
        (0..digits.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex"))
            .collect(),
    )
}

/// Hex in 16-byte lines, for pasting into the document.
fn dump(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text of §8: o200k ids (the last one is the largest id of the space).
const TEXT: [u32; 5] = [13_225, 11, 2_375, 0, 200_018];

/// The 4 × 4 grid of §8 (codebook 1024), row-major.
const GRID: [u32; 16] = [
    17, 17, 301, 301, 17, 42, 42, 301, 999, 42, 0, 0, 999, 999, 0, 1023,
];

/// The masked edit of §8: cells 5, 6, 9 and 10 of `GRID` replaced.
const REGION: [usize; 4] = [5, 6, 9, 10];
const EDIT: [u32; 4] = [7, 8, 9, 10];

/// The text prior of the static text model in §8.
const PRIOR: [(u32, u32); 4] = [(0, 1), (11, 5), (2_375, 2), (13_225, 3)];

fn grid() -> TokenGrid {
    TokenGrid::new(4, 4, 1024, GRID.to_vec()).unwrap()
}

fn edited() -> TokenGrid {
    let mut ids = GRID.to_vec();
    for (&cell, &id) in REGION.iter().zip(&EDIT) {
        ids[cell] = id;
    }
    TokenGrid::new(4, 4, 1024, ids).unwrap()
}

fn prior_file() -> Vec<u8> {
    let mut out = b"UMTXTPRI".to_vec();
    for v in [1u32, 200_019, PRIOR.len() as u32] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for (id, count) in PRIOR {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
    }
    out
}

fn models() -> PathBuf {
    shipped::source_models_dir().join("entropy")
}

/// The codec of §8: every built-in model, the shipped files.
fn codec_config() -> CodecConfig {
    let dir = models();
    let (generic, _) = Generic::load(&shipped::manifest_path(&dir, shipped::GENERIC_ID)).unwrap();
    let (masked, _) = Masked::load(&shipped::manifest_path(&dir, shipped::MASKED_ID)).unwrap();
    let (text, _) = TextCond::load(&shipped::manifest_path(&dir, shipped::TEXT_ID)).unwrap();
    let ladder = std::fs::read(dir.join("unimic-entropy-ladder-l2-v1.umstatic")).unwrap();
    CodecConfig::default()
        .with_generic(Arc::new(generic))
        .with_masked(Arc::new(masked))
        .with_text_cond(Arc::new(text))
        .with_static_grid(Arc::new(Static::from_bytes(&ladder).unwrap()))
        .with_text_prior(
            Arc::new(TextPrior::from_bytes(&prior_file()).unwrap()),
            false,
        )
}

/// The context of §8: the text as part (0, 0), the grid as part (0, 1).
fn context() -> SessionContext {
    let mut ctx = SessionContext::new(1 << 20);
    ctx.insert(ContextKey::new(0, 0), Sequence::text(TEXT.to_vec()))
        .unwrap();
    ctx.insert(ContextKey::new(0, 1), Sequence::grid(&grid()))
        .unwrap();
    ctx
}

enum Input {
    Text,
    Grid,
    Edit,
}

/// Every vector: its name, the model, the tokens, the references.
fn vectors() -> Vec<(&'static str, ModelChoice, Input, Vec<ContextKey>)> {
    use ModelChoice::*;
    let text_ref = vec![ContextKey::new(0, 0)];
    let grid_ref = vec![ContextKey::new(0, 1)];
    vec![
        ("payload_uniform_text", Uniform, Input::Text, vec![]),
        ("payload_uniform_grid", Uniform, Input::Grid, vec![]),
        ("payload_static_text", Static, Input::Text, vec![]),
        ("payload_static_grid", Static, Input::Grid, vec![]),
        ("payload_adaptive_text", Adaptive, Input::Text, vec![]),
        ("payload_adaptive_grid", Adaptive, Input::Grid, vec![]),
        ("payload_generic", Generic, Input::Grid, vec![]),
        ("payload_masked", Masked, Input::Edit, grid_ref),
        ("payload_text_conditioned", TextCond, Input::Grid, text_ref),
    ]
}

#[test]
fn the_prior_file_of_section_8_is_the_documented_one() {
    assert_eq!(
        golden("text_prior_file"),
        Some(prior_file()),
        "the prior file is:\n{}",
        dump(&prior_file())
    );
}

#[test]
fn golden_payloads_of_every_built_in_model() {
    let ctx = context();
    let mut codec = PartCodec::new(codec_config());
    let mut problems = Vec::new();
    for (name, model, input, refs) in vectors() {
        let (g, e) = (grid(), edited());
        let mut spec = PartSpec::new(model).with_refs(refs);
        let tokens = match input {
            Input::Text => PartTokens::Text(&TEXT),
            Input::Grid => PartTokens::Grid(&g),
            Input::Edit => {
                spec = spec.with_region((0..16).map(|i| REGION.contains(&i)).collect());
                PartTokens::Grid(&e)
            }
        };
        let part = codec.encode(&ctx, tokens, &spec).unwrap();
        assert_eq!(part.chunks.len(), 1, "{name}: one chunk");
        let payload = &part.chunks[0].payload;
        match golden(name) {
            None => problems.push(format!("missing golden {name}:\n{}", dump(payload))),
            Some(want) if &want != payload => problems.push(format!(
                "golden {name} differs; the code encodes:\n{}",
                dump(payload)
            )),
            Some(want) => {
                // The document's bytes decode to the input.
                let shape = match input {
                    Input::Text => PartShape::Text {
                        count: TEXT.len() as u64,
                    },
                    _ => PartShape::Grid {
                        height: 4,
                        width: 4,
                        codebook_size: 1024,
                    },
                };
                let dec = codec
                    .decoder(&ctx, shape, &spec, &part.digest, &part.model)
                    .unwrap();
                let back = dec.decode_all([want.as_slice()]).unwrap();
                let expected = match input {
                    Input::Text => DecodedPart::Text(TEXT.to_vec()),
                    Input::Grid => DecodedPart::Grid(g.clone()),
                    Input::Edit => DecodedPart::Grid(e.clone()),
                };
                assert_eq!(
                    back, expected,
                    "{name}: the golden bytes decode to the input"
                );
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// §8's transformer parts in chunks (§7.9): the generic part of `G` in chunks of 6 tokens (6, 6
/// and 4) and the masked edit's 4 region cells in chunks of 2; each chunk is its own golden
/// block (`<name>_<i>`), and the blocks decode, in order, back to the input.
#[test]
fn golden_chunked_transformer_payloads() {
    let ctx = context();
    let mut codec = PartCodec::new(codec_config());
    let mut problems = Vec::new();
    let (g, e) = (grid(), edited());
    let region: Vec<bool> = (0..16).map(|i| REGION.contains(&i)).collect();
    let cases = [
        (
            "payload_generic_chunks",
            PartSpec::new(ModelChoice::Generic).with_chunk_tokens(6),
            &g,
            3,
        ),
        (
            "payload_masked_chunks",
            PartSpec::new(ModelChoice::Masked)
                .with_refs(vec![ContextKey::new(0, 1)])
                .with_region(region)
                .with_chunk_tokens(2),
            &e,
            2,
        ),
    ];
    for (name, spec, input, count) in cases {
        let part = codec.encode(&ctx, PartTokens::Grid(input), &spec).unwrap();
        assert_eq!(part.chunks.len(), count, "{name}");
        let mut wanted = Vec::new();
        for (i, chunk) in part.chunks.iter().enumerate() {
            let block = format!("{name}_{i}");
            match golden(&block) {
                None => problems.push(format!("missing golden {block}:\n{}", dump(&chunk.payload))),
                Some(want) if want != chunk.payload => problems.push(format!(
                    "golden {block} differs; the code encodes:\n{}",
                    dump(&chunk.payload)
                )),
                Some(want) => wanted.push(want),
            }
        }
        if wanted.len() == count {
            let shape = PartShape::Grid {
                height: 4,
                width: 4,
                codebook_size: 1024,
            };
            let dec = codec
                .decoder(&ctx, shape, &spec, &part.digest, &part.model)
                .unwrap();
            let back = dec.decode_all(wanted.iter().map(|w| w.as_slice())).unwrap();
            assert_eq!(back, DecodedPart::Grid(input.clone()), "{name}");
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

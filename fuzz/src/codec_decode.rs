//! Target `codec_decode`: the algorithmic entropy decoders behind unimic-codec's `PartCodec`
//! (uniform, adaptive, and the shipped static model) on multi-chunk payloads.
//!
//! Input layout ([`Input::parse`], written by [`Input::to_bytes`]; missing bytes read as 0):
//! - byte 0: bits 0-1 the model (0 uniform, 1 adaptive, 2 static: the shipped ladder model
//!   `unimic-entropy-ladder-l2-v1`, K = 1024, grids only; 3 adaptive); bit 2: a grid (else text);
//!   bits 3-4: a grid's codebook size, `[1024, 2, 16_384, 65_536]`; bits 5-7 are ignored;
//! - bytes 1-2: a grid's height and width, `b % 64 + 1` each (up to 64×64, the tokenizers'
//!   4,096 tokens); for text, the token count, big-endian `u16 % 4097`;
//! - bytes 3-4: tokens per chunk, big-endian `u16` (0: one chunk);
//! - then one payload per chunk, in chunk order: a big-endian `u16` length and that many bytes
//!   (a length past the end takes what is left; a chunk past the end of the input gets an
//!   empty payload).
//!
//! Each chunk has its own payload, so an honest input is a real multi-chunk part: the seeds
//! named `ok-*` are real encodes of shipped data (the default tokenizer's tokens, o200k ids of
//! captions) with the shipped models, written by `tests/seeds.rs` (`codec_decode_seeds`), and
//! libFuzzer mutates from there instead of from a few header bytes.
//!
//! Checks: a decoder is set up for every valid shape (the static model refuses codebooks other
//! than its own, with an error); each chunk decodes on its own to an error or exactly its token
//! count, all inside the id space; and when every chunk decodes, the tokens re-encode and decode
//! back to themselves.

use std::sync::{Arc, OnceLock};

use unimic_codec::context::{SequenceKind, SessionContext};
use unimic_codec::entropy::Static;
use unimic_codec::grid::TokenGrid;
use unimic_codec::part::{
    CodecConfig, DecodedPart, ModelChoice, PartCodec, PartShape, PartSpec, PartTokens,
};

/// The shipped static model: the quality ladder's level-2 order-0 model (K = 1024).
const STATIC_MODEL: &[u8] =
    include_bytes!("../../models/entropy/unimic-entropy-ladder-l2-v1.umstatic");

/// Grid codebook sizes byte 0 selects (1024: the shipped tokenizers').
const CODEBOOKS: [u32; 4] = [1024, 2, 16_384, 65_536];

/// Most text tokens one input asks for.
const MAX_TEXT: u16 = 4096;

/// The codec every input decodes with: the default configuration (o200k text) plus the shipped
/// static grid model.
fn codec() -> PartCodec {
    static CONFIG: OnceLock<CodecConfig> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let model = Static::from_bytes(STATIC_MODEL).expect("the shipped static model loads");
        CodecConfig::default().with_static_grid(Arc::new(model))
    });
    PartCodec::new(config.clone())
}

/// What a part is: its model, shape and chunking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Uniform, Static or Adaptive.
    pub model: ModelChoice,
    /// Text (count) or grid (height, width, codebook size).
    pub shape: PartShape,
    /// Tokens per chunk (0: one chunk).
    pub chunk_tokens: u16,
}

/// A parsed input: the part's header and one payload per chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The part.
    pub header: Header,
    /// Payloads in chunk order (fewer than the chunks: the rest are empty).
    pub payloads: Vec<Vec<u8>>,
}

impl Input {
    /// Parses `data` (see the module docs); never fails.
    pub fn parse(data: &[u8]) -> Input {
        let b = |i: usize| data.get(i).copied().unwrap_or(0);
        let model = match b(0) & 3 {
            0 => ModelChoice::Uniform,
            2 => ModelChoice::Static,
            _ => ModelChoice::Adaptive,
        };
        let shape = if b(0) & 4 != 0 {
            PartShape::Grid {
                height: u32::from(b(1) % 64) + 1,
                width: u32::from(b(2) % 64) + 1,
                codebook_size: CODEBOOKS[usize::from((b(0) >> 3) & 3)],
            }
        } else {
            PartShape::Text {
                count: u64::from(u16::from_be_bytes([b(1), b(2)]) % (MAX_TEXT + 1)),
            }
        };
        let chunk_tokens = u16::from_be_bytes([b(3), b(4)]);
        let mut rest = data.get(5..).unwrap_or_default();
        let mut payloads = Vec::new();
        while !rest.is_empty() {
            let len = match rest {
                [hi, lo, ..] => usize::from(u16::from_be_bytes([*hi, *lo])),
                _ => 0,
            };
            let body = rest.get(2..).unwrap_or_default();
            let len = len.min(body.len());
            payloads.push(body[..len].to_vec());
            rest = &body[len..];
        }
        Input {
            header: Header {
                model,
                shape,
                chunk_tokens,
            },
            payloads,
        }
    }

    /// The bytes that [`Input::parse`] reads back as `self`, for a header that it can express
    /// (grid sides 1..=64, a codebook of [`CODEBOOKS`], at most 4,096 text tokens, payloads of at
    /// most 65,535 bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let h = &self.header;
        let model = match h.model {
            ModelChoice::Uniform => 0,
            ModelChoice::Static => 2,
            _ => 1,
        };
        let (flags, a, b) = match h.shape {
            PartShape::Grid {
                height,
                width,
                codebook_size,
            } => {
                let k = CODEBOOKS
                    .iter()
                    .position(|&c| c == codebook_size)
                    .expect("a codebook the layout can express") as u8;
                (4 | (k << 3), (height - 1) as u8, (width - 1) as u8)
            }
            PartShape::Text { count } => {
                let [a, b] = u16::try_from(count).expect("text count fits").to_be_bytes();
                (0, a, b)
            }
        };
        let mut out = vec![model | flags, a, b];
        out.extend_from_slice(&h.chunk_tokens.to_be_bytes());
        for p in &self.payloads {
            out.extend_from_slice(&u16::try_from(p.len()).expect("payload fits").to_be_bytes());
            out.extend_from_slice(p);
        }
        out
    }
}

/// How far an input got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No decoder for this header (the static model and another codebook, or a model the codec
    /// does not hold for text).
    NoDecoder,
    /// At least one chunk failed to decode (the others were still checked).
    ChunkFailed,
    /// Every chunk decoded and the tokens round-tripped.
    RoundTrip {
        /// Chunks of the part.
        chunks: u64,
        /// Whether re-encoding the decoded tokens gave exactly the input's payloads (an honest
        /// input: a real encode).
        honest: bool,
    },
}

/// Runs one input.
pub fn run(data: &[u8]) {
    outcome(data);
}

/// Runs one input (panicking when an invariant breaks) and says how far it got.
pub fn outcome(data: &[u8]) -> Outcome {
    let Input { header, payloads } = Input::parse(data);
    let kind = match header.shape {
        PartShape::Text { .. } => SequenceKind::Text,
        PartShape::Grid { .. } => SequenceKind::Grid,
    };
    let mut codec = codec();
    let ctx = SessionContext::new(1 << 16);
    let spec = PartSpec::new(header.model).with_chunk_tokens(u32::from(header.chunk_tokens));
    let Ok(identity) = codec.identity(header.model, kind) else {
        // Only the static model for text: no text prior is configured.
        assert_eq!(
            (header.model, kind),
            (ModelChoice::Static, SequenceKind::Text)
        );
        return Outcome::NoDecoder;
    };
    let digest = ctx.digest(&[]).expect("the empty reference list digests");
    let dec = match codec.decoder(&ctx, header.shape, &spec, &digest, &identity) {
        Ok(dec) => dec,
        Err(e) => {
            let own_codebook = matches!(header.shape, PartShape::Grid { codebook_size, .. } if codebook_size == 1024);
            assert!(
                header.model == ModelChoice::Static && !own_codebook,
                "a valid header was refused: {header:?}: {e}"
            );
            return Outcome::NoDecoder;
        }
    };
    let space = match header.shape {
        PartShape::Text { .. } => unimic_codec::text::O200K_VOCAB,
        PartShape::Grid { codebook_size, .. } => codebook_size,
    };
    // Each chunk decodes on its own from its own payload: a failed one loses only itself.
    let mut ids = Vec::new();
    let mut failed = false;
    for i in 0..dec.chunks() {
        let (start, end) = dec.chunk_range(i).expect("chunk index in range");
        let payload = payloads.get(i as usize).map_or(&[][..], Vec::as_slice);
        match dec.decode_chunk(i, payload) {
            Ok(got) => {
                assert_eq!(got.len() as u64, end - start, "wrong token count");
                assert!(got.iter().all(|&t| t < space), "id outside the id space");
                ids.extend(got);
            }
            Err(_) => failed = true,
        }
    }
    if failed {
        return Outcome::ChunkFailed;
    }
    let tokens = match header.shape {
        PartShape::Text { .. } => DecodedPart::Text(ids),
        PartShape::Grid {
            height,
            width,
            codebook_size,
        } => DecodedPart::Grid(
            TokenGrid::new(height, width, codebook_size, ids).expect("decoded ids fit the shape"),
        ),
    };
    let part = match &tokens {
        DecodedPart::Text(ids) => codec.encode(&ctx, PartTokens::Text(ids), &spec),
        DecodedPart::Grid(g) => codec.encode(&ctx, PartTokens::Grid(g), &spec),
    }
    .expect("decoded tokens re-encode");
    assert_eq!(part.chunks.len() as u64, dec.chunks(), "chunk count");
    let back = dec
        .decode_all(part.chunks.iter().map(|c| c.payload.as_slice()))
        .expect("re-encoded part decodes");
    assert_eq!(back, tokens, "round trip of decoded tokens");
    let honest = payloads.len() == part.chunks.len()
        && part
            .chunks
            .iter()
            .zip(&payloads)
            .all(|(c, p)| c.payload == *p);
    Outcome::RoundTrip {
        chunks: dec.chunks(),
        honest,
    }
}

/// An honest input: `tokens` coded with `model` in chunks of `chunk_tokens` by the codec this
/// target decodes with (for the seeds).
pub fn honest_input(model: ModelChoice, tokens: PartTokens<'_>, chunk_tokens: u16) -> Vec<u8> {
    let mut codec = codec();
    let ctx = SessionContext::new(1 << 16);
    let spec = PartSpec::new(model).with_chunk_tokens(u32::from(chunk_tokens));
    let shape = match tokens {
        PartTokens::Text(ids) => PartShape::Text {
            count: ids.len() as u64,
        },
        PartTokens::Grid(g) => PartShape::Grid {
            height: g.height(),
            width: g.width(),
            codebook_size: g.codebook_size(),
        },
    };
    let part = codec
        .encode(&ctx, tokens, &spec)
        .expect("the tokens encode");
    Input {
        header: Header {
            model,
            shape,
            chunk_tokens,
        },
        payloads: part.chunks.into_iter().map(|c| c.payload).collect(),
    }
    .to_bytes()
}

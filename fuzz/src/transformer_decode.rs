//! Target `transformer_decode`: the transformer decoders of unimic-codec (generic, masked with
//! an edit region, text-conditioned) behind [`PartCodec`], on arbitrary payloads, shapes,
//! regions and contexts.
//!
//! Tiny synthetic models (`tiny(16)`: codebook 16, largest side 16) stand in for the shipped
//! ones: the code paths are the same, only the weights differ.
//!
//! Input layout (missing bytes read as 0):
//! - byte 0: bits 0-1 the model (0 generic, 1 masked, 2 text-conditioned, 3 masked with a
//!   region of the wrong length); bit 2: a reference to a part the context does not hold;
//!   bit 3: a chunk size (byte 4) in the spec; bit 4: the masked reference has another shape;
//!   bit 5: the text-conditioned part has no text reference; bit 6: another model identity
//!   (the generic model's identity for every part);
//! - bytes 1, 2: height and width, `b % 19` (0, and up to 18, beyond the models' side of 16);
//! - byte 3: the codebook size: `[16, 16, 16, 16, 2, 17, 1024, 65_536][b % 8]` (16 is the
//!   models');
//! - byte 4: the chunk size (with bit 3 of byte 0);
//! - byte 5: the number of text ids (`b % 12`), two bytes each (little-endian, times 7 to
//!   reach o200k's range), for the text-conditioned reference;
//! - then, for masked parts, `ceil(h * w / 8)` region bytes (bit `i` = cell `i`, row-major);
//!   for the reference grid `h * w` bytes are taken from a seeded generator, not the input;
//! - the rest is the payload: with one chunk, all of it; with several (a chunk size below the
//!   part's token count), each chunk but the last is a length byte and that many bytes, and the
//!   last chunk takes what is left.
//!
//! Checks: setting up the decoder and decoding never panic and fail with typed errors; a
//! decoder that is set up has the expected token count (the region's cells for a masked part)
//! split into chunks of the spec's size; chunks decode in order only (one out of order is
//! refused with `ChunkOrder` and does not disturb the run), each to exactly its count of ids,
//! all inside the codebook; the assembled grid keeps the reference outside a masked region; and
//! whatever decodes re-encodes and decodes back to itself.

use std::sync::{Arc, OnceLock};

use unimic_codec::context::{ContextKey, Sequence, SessionContext};
use unimic_codec::entropy::generic::{Generic, GenericConfig};
use unimic_codec::entropy::masked::{Masked, MaskedConfig};
use unimic_codec::entropy::text_cond::{TextCond, TextCondConfig};
use unimic_codec::grid::TokenGrid;
use unimic_codec::part::{
    CodecConfig, DecodedPart, ModelChoice, PartCodec, PartError, PartShape, PartSpec, PartTokens,
};

/// Codebook size of the tiny models.
const K: u32 = 16;

struct Models {
    generic: Arc<Generic>,
    masked: Arc<Masked>,
    text_cond: Arc<TextCond>,
}

fn models() -> &'static Models {
    static MODELS: OnceLock<Models> = OnceLock::new();
    MODELS.get_or_init(|| Models {
        generic: Arc::new(
            Generic::synthetic(&GenericConfig::tiny(K as usize), 1).expect("tiny generic"),
        ),
        masked: Arc::new(
            Masked::synthetic(&MaskedConfig::tiny(K as usize), 1).expect("tiny masked"),
        ),
        text_cond: Arc::new(
            TextCond::synthetic(&TextCondConfig::tiny(K as usize), 1).expect("tiny text-cond"),
        ),
    })
}

/// Reads the input front to back; bytes past the end read as 0.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }
}

/// `n` pseudo-random ids below `k` from `seed`.
fn ids(n: usize, k: u32, seed: u64) -> Vec<u32> {
    let mut z = seed;
    (0..n)
        .map(|_| {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((x ^ (x >> 31)) % u64::from(k)) as u32
        })
        .collect()
}

/// What an input asks for, parsed from its header (see the [module docs](self)).
struct Setup<'a> {
    flags: u8,
    model: ModelChoice,
    ctx: SessionContext,
    refs: Vec<ContextKey>,
    spec: PartSpec,
    height: u32,
    width: u32,
    codebook_size: u32,
    payload: &'a [u8],
}

fn setup(data: &[u8]) -> Setup<'_> {
    let mut input = Input { data };
    let flags = input.byte();
    let height = u32::from(input.byte() % 19);
    let width = u32::from(input.byte() % 19);
    let codebook_size = [16, 16, 16, 16, 2, 17, 1024, 65_536][usize::from(input.byte() % 8)];
    let chunk = input.byte();
    let text_len = usize::from(input.byte() % 12);
    let model = match flags & 3 {
        0 => ModelChoice::Generic,
        2 => ModelChoice::TextCond,
        _ => ModelChoice::Masked,
    };
    let cells = height as usize * width as usize;

    // The context: text (0, 0), reference grid (0, 1), possibly of another shape.
    let mut ctx = SessionContext::new(1 << 20);
    let text: Vec<u32> = input
        .take(2 * text_len)
        .chunks(2)
        .map(|b| u32::from(u16::from_le_bytes([b[0], *b.get(1).unwrap_or(&0)])) * 7)
        .collect();
    if !text.is_empty() {
        ctx.insert(ContextKey::new(0, 0), Sequence::text(text))
            .expect("a short text fits the context");
    }
    let (ref_h, ref_w) = if flags & 16 != 0 {
        (width.max(1), height.max(1) + 1)
    } else {
        (height, width)
    };
    if let Ok(reference) = TokenGrid::new(
        ref_h,
        ref_w,
        K,
        ids(ref_h as usize * ref_w as usize, K, u64::from(flags)),
    ) {
        ctx.insert(ContextKey::new(0, 1), Sequence::grid(&reference))
            .expect("a small grid fits the context");
    }

    let mut refs = match model {
        ModelChoice::TextCond if flags & 32 == 0 => vec![ContextKey::new(0, 0)],
        ModelChoice::TextCond => vec![ContextKey::new(0, 1)],
        _ => vec![ContextKey::new(0, 0), ContextKey::new(0, 1)],
    };
    refs.retain(|k| ctx.get(*k).is_some());
    if flags & 4 != 0 {
        refs.push(ContextKey::new(9, 9));
    }
    let mut spec = PartSpec::new(model).with_refs(refs.clone());
    if flags & 8 != 0 {
        spec = spec.with_chunk_tokens(u32::from(chunk));
    }
    if model == ModelChoice::Masked {
        let bytes = input.take(cells.div_ceil(8));
        let mut region: Vec<bool> = (0..cells)
            .map(|i| bytes.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1))
            .collect();
        if flags & 3 == 3 {
            region.push(true);
        }
        spec = spec.with_region(region);
    }
    Setup {
        flags,
        model,
        ctx,
        refs,
        spec,
        height,
        width,
        codebook_size,
        payload: input.data,
    }
}

fn codec() -> PartCodec {
    let m = models();
    PartCodec::new(
        CodecConfig::default()
            .with_generic(m.generic.clone())
            .with_masked(m.masked.clone())
            .with_text_cond(m.text_cond.clone()),
    )
}

/// How far an input got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The decoder was refused (typed error: shape, model, context, region, chunking).
    Refused,
    /// The payload failed to decode (typed error).
    Corrupt,
    /// The payload decoded, and the tokens re-encoded and decoded back to themselves.
    RoundTrip,
}

/// `header` (an input without its payload) followed by the honest payload of a grid drawn from
/// `seed` (for a masked part: the reference with the region's cells drawn), when the sender's
/// codec accepts the part the header describes. For making seeds.
pub fn honest_input(header: &[u8], seed: u64) -> Option<Vec<u8>> {
    let s = setup(header);
    let cells = s.height as usize * s.width as usize;
    let fresh = ids(cells, K, seed);
    let grid_ids = match (&s.spec.region, s.ctx.get(ContextKey::new(0, 1))) {
        (Some(region), Some(reference)) if reference.ids().len() == cells => reference
            .ids()
            .iter()
            .zip(&fresh)
            .zip(region)
            .map(|((&r, &f), &coded)| if coded { f } else { r })
            .collect(),
        _ => fresh,
    };
    let grid = TokenGrid::new(s.height, s.width, K, grid_ids).ok()?;
    let part = codec()
        .encode(&s.ctx, PartTokens::Grid(&grid), &s.spec)
        .ok()?;
    let mut out = header.to_vec();
    let last = part.chunks.len() - 1;
    for (i, chunk) in part.chunks.iter().enumerate() {
        if i < last {
            out.push(u8::try_from(chunk.payload.len()).ok()?);
        }
        out.extend_from_slice(&chunk.payload);
    }
    Some(out)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    outcome(data);
}

/// Runs one input; returns how far it got (panics when an invariant breaks).
pub fn outcome(data: &[u8]) -> Outcome {
    let Setup {
        flags,
        model,
        ctx,
        refs,
        spec,
        height,
        width,
        codebook_size,
        payload,
    } = setup(data);
    let cells = height as usize * width as usize;
    let shape = PartShape::Grid {
        height,
        width,
        codebook_size,
    };
    let mut codec = codec();
    let identity_of = if flags & 64 != 0 {
        ModelChoice::Generic
    } else {
        model
    };
    let Ok(identity) = codec.identity(identity_of, unimic_codec::context::SequenceKind::Grid)
    else {
        panic!("every configured transformer has an identity");
    };
    // The digest the sender computes for the references (references the context lacks are
    // refused before any digest comparison).
    let digest = ctx.digest(&refs).unwrap_or([0; 32]);

    let dec = match codec.decoder(&ctx, shape, &spec, &digest, &identity) {
        Ok(d) => d,
        Err(
            PartError::Context(_)
            | PartError::ModelMismatch { .. }
            | PartError::ModelUnavailable { .. }
            | PartError::Grid(_)
            | PartError::RegionRequired
            | PartError::RegionSize { .. }
            | PartError::MissingReference { .. }
            | PartError::ReferenceShape { .. }
            | PartError::Transformer(_)
            | PartError::TooLarge { .. },
        ) => return Outcome::Refused,
        Err(e) => panic!("unexpected refusal of a decoder: {e:?}"),
    };
    let expected = match model {
        ModelChoice::Masked => spec
            .region
            .as_ref()
            .map_or(0, |r| r.iter().filter(|&&c| c).count() as u64),
        _ => cells as u64,
    };
    let c = spec.chunk_tokens.map_or(expected.max(1), u64::from);
    let chunks = expected.div_ceil(c).max(1);
    assert_eq!(dec.chunks(), chunks, "chunks of the part");
    assert_eq!(dec.tokens(), expected, "tokens of the part");
    assert!(dec.chunk_range(chunks).is_err(), "no chunk past the last");
    assert!(
        dec.decode_chunk(chunks, payload).is_err(),
        "no chunk past the last"
    );

    // The chunks' payloads: length-prefixed but for the last.
    let mut rest = payload;
    let mut got = Vec::new();
    for i in 0..chunks {
        let this = if i + 1 < chunks {
            let mut input = Input { data: rest };
            let len = usize::from(input.byte());
            let this = input.take(len);
            rest = input.data;
            this
        } else {
            rest
        };
        if i + 1 < chunks {
            // Out of order: refused, and the run is where it was.
            assert!(
                matches!(
                    dec.decode_chunk(i + 1, this),
                    Err(PartError::ChunkOrder { expected, got }) if expected == i && got == i + 1
                ),
                "a later chunk first"
            );
        }
        let ids = match dec.decode_chunk(i, this) {
            Ok(ids) => ids,
            Err(PartError::Code(_) | PartError::Transformer(_)) => return Outcome::Corrupt,
            Err(e) => panic!("unexpected decode error: {e:?}"),
        };
        let (lo, hi) = dec.chunk_range(i).expect("a chunk of the part");
        assert_eq!(
            ids.len() as u64,
            hi - lo,
            "decoded token count of chunk {i}"
        );
        got.extend(ids);
    }
    assert_eq!(got.len() as u64, expected, "decoded token count");
    assert!(
        got.iter().all(|&id| id < K),
        "decoded id outside the codebook"
    );
    let grid = match dec.assemble(got) {
        Ok(DecodedPart::Grid(g)) => g,
        other => panic!("a grid part assembles to a grid: {other:?}"),
    };
    assert_eq!((grid.height(), grid.width()), (height, width));
    if let (ModelChoice::Masked, Some(region)) = (model, &spec.region) {
        let reference = ctx
            .get(ContextKey::new(0, 1))
            .expect("a masked part decoded against the reference");
        for (i, ((&a, &b), &coded)) in grid
            .ids()
            .iter()
            .zip(reference.ids())
            .zip(region)
            .enumerate()
        {
            assert!(coded || a == b, "cell {i} outside the region differs");
        }
    }

    // Round trip of whatever came out (on a fresh decoder: this one's run is over).
    let part = codec
        .encode(&ctx, PartTokens::Grid(&grid), &spec)
        .expect("decoded tokens re-encode");
    assert_eq!(part.chunks.len() as u64, chunks);
    let back = codec
        .decoder(&ctx, shape, &spec, &digest, &identity)
        .expect("the same decoder again")
        .decode_all(part.chunks.iter().map(|c| c.payload.as_slice()))
        .expect("re-encoded part decodes");
    assert_eq!(
        back,
        DecodedPart::Grid(grid),
        "round trip of decoded tokens"
    );
    Outcome::RoundTrip
}

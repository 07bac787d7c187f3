//! Target `codec_decode`: the entropy decoder of unimic-codec on arbitrary payloads.
//!
//! The first bytes choose a model (uniform / adaptive), a part kind (text / grid), a shape and a
//! chunk size; the rest is the payload. Decoding must return an error or exactly the chunk's
//! token count, never panic; and whatever it decodes must re-encode and decode back to itself
//! (the round trip holds for arbitrary token sequences, including ones a corrupt payload yields).

use unimic_codec::context::{SequenceKind, SessionContext};
use unimic_codec::grid::TokenGrid;
use unimic_codec::part::{DecodedPart, ModelChoice, PartCodec, PartShape, PartSpec, PartTokens};

/// Runs one input.
pub fn run(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let (head, payload) = data.split_at(4);
    let model = if head[0] & 1 == 0 {
        ModelChoice::Uniform
    } else {
        ModelChoice::Adaptive
    };
    let chunk = u32::from(head[3] % 64);
    let shape = if head[0] & 2 == 0 {
        PartShape::Text {
            count: u64::from(head[1]) * 2,
        }
    } else {
        let codebook_size = [2, 1024, 16_384, 65_536][usize::from(head[0] >> 2) % 4];
        PartShape::Grid {
            height: u32::from(head[1] % 24) + 1,
            width: u32::from(head[2] % 24) + 1,
            codebook_size,
        }
    };
    let kind = match shape {
        PartShape::Text { .. } => SequenceKind::Text,
        PartShape::Grid { .. } => SequenceKind::Grid,
    };
    let ctx = SessionContext::new(1 << 16);
    let spec = PartSpec::new(model).with_chunk_tokens(chunk);
    let mut codec = PartCodec::default();
    let Ok(identity) = codec.identity(model, kind) else {
        return;
    };
    let Ok(digest) = ctx.digest(&[]) else {
        return;
    };
    let dec = codec
        .decoder(&ctx, shape, &spec, &digest, &identity)
        .expect("a valid shape and the right digest are accepted");
    // Every chunk gets the same payload: each must fail cleanly or yield its token count.
    let mut ids = Vec::new();
    for i in 0..dec.chunks() {
        let (start, end) = dec.chunk_range(i).expect("chunk index in range");
        match dec.decode_chunk(i, payload) {
            Ok(got) => {
                assert_eq!(got.len() as u64, end - start, "wrong token count");
                ids.extend(got);
            }
            Err(_) => return,
        }
    }
    // Round trip of whatever came out.
    let tokens = match shape {
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
    let back = dec
        .decode_all(part.chunks.iter().map(|c| c.payload.as_slice()))
        .expect("re-encoded part decodes");
    assert_eq!(back, tokens, "round trip of decoded tokens");
}

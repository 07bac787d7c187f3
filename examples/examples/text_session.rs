//! A two-turn text session without any network: the sender tokenizes each prompt (o200k),
//! entropy-codes it with the adaptive text model conditioned on the earlier turn, wraps it in a
//! protocol message and serializes it; the receiver parses the bytes, verifies the context digest,
//! decodes and detokenizes. Both ends keep a `SessionContext` in step.
//!
//! Run: `cargo run -p unimic-examples --example text_session`

use bytes::Bytes;
use unimic_codec::context::{ContextKey, Sequence, SessionContext};
use unimic_codec::part::{DecodedPart, ModelChoice, PartCodec, PartShape, PartSpec, PartTokens};
use unimic_codec::text::{O200k, TextTokenizer};
use unimic_protocol::{
    CodedPart, CodingMode, ContextRef, Decode, Encode, Limits, Message, MessageHeader, Part,
    PartBody, PartChunk, PartHeader, Role, Shape, VarInt,
};

fn main() -> anyhow::Result<()> {
    let text = O200k::new();
    let prompts = [
        "What breed is the dog running on the beach in this photo?",
        "And is the dog on the beach running toward the water or away from it?",
    ];
    let (mut tx_ctx, mut rx_ctx) = (SessionContext::default(), SessionContext::default());
    let (mut tx_codec, mut rx_codec) = (PartCodec::default(), PartCodec::default());
    for (turn, prompt) in prompts.iter().enumerate() {
        let message_id = 2 * turn as u64; // client messages use even ids
                                          // Condition on every earlier turn of the session.
        let refs: Vec<ContextKey> = (0..turn as u64)
            .map(|t| ContextKey::new(2 * t, 0))
            .collect();
        let spec = PartSpec::new(ModelChoice::Adaptive).with_refs(refs.clone());

        // --- sender ---
        let ids = text.encode(prompt);
        let coded = tx_codec.encode(&tx_ctx, PartTokens::Text(&ids), &spec)?;
        let message = Message {
            header: MessageHeader {
                message_id: VarInt::from_u64(message_id)?,
                role: Role::User,
            },
            in_reply_to: None,
            parts: vec![Part {
                header: PartHeader {
                    index: VarInt::from_u32(0),
                    body: PartBody::Text(CodedPart {
                        tokenizer: VarInt::from_u32(0),
                        entropy_model: VarInt::from_u32(0),
                        shape: Shape {
                            rows: VarInt::from_u32(1),
                            cols: VarInt::from_u64(ids.len() as u64)?,
                        },
                        token_count: VarInt::from_u64(ids.len() as u64)?,
                        mode: CodingMode::Generic,
                        context: refs
                            .iter()
                            .map(|k| -> anyhow::Result<ContextRef> {
                                Ok(ContextRef {
                                    message_id: VarInt::from_u64(k.message_id)?,
                                    part_index: VarInt::from_u64(k.part_index)?,
                                })
                            })
                            .collect::<anyhow::Result<_>>()?,
                        context_digest: coded.digest,
                    }),
                },
                chunks: vec![PartChunk {
                    part_index: VarInt::from_u32(0),
                    seq: VarInt::from_u32(0),
                    fin: true,
                    token_count: VarInt::from_u64(ids.len() as u64)?,
                    payload: Bytes::from(coded.chunks[0].payload.clone()),
                }],
            }],
        };
        let wire = message.to_bytes();
        tx_ctx.insert(ContextKey::new(message_id, 0), Sequence::text(ids.clone()))?;

        // --- receiver ---
        let received = Message::decode_exact(&wire, &Limits::default())?;
        let part = &received.parts[0];
        let PartBody::Text(header) = &part.header.body else {
            anyhow::bail!("expected a text part");
        };
        let refs: Vec<ContextKey> = header
            .context
            .iter()
            .map(|r| ContextKey::new(r.message_id.into_inner(), r.part_index.into_inner()))
            .collect();
        let spec = PartSpec::new(ModelChoice::Adaptive).with_refs(refs);
        let shape = PartShape::Text {
            count: header.token_count.into_inner(),
        };
        // The receiver checks the model identity and the context digest before decoding.
        let decoder =
            rx_codec.decoder(&rx_ctx, shape, &spec, &header.context_digest, &coded.model)?;
        let DecodedPart::Text(got) =
            decoder.decode_all(part.chunks.iter().map(|c| &c.payload[..]))?
        else {
            anyhow::bail!("expected text");
        };
        rx_ctx.insert(
            ContextKey::new(received.header.message_id.into_inner(), 0),
            Sequence::text(got.clone()),
        )?;
        let decoded = text.decode(&got)?;
        assert_eq!(decoded, *prompt);

        let json = format!("{{\"role\":\"user\",\"content\":{:?}}}", prompt);
        println!(
            "turn {turn}: {} tokens → {} payload bytes ({:.2} bits/token), {} bytes on the stream; \
             UTF-8 {} bytes, minimal JSON {} bytes; decoded: {decoded:?}",
            ids.len(),
            coded.chunks[0].payload.len(),
            coded.bits as f64 / ids.len() as f64,
            wire.len(),
            prompt.len(),
            json.len(),
        );
    }
    assert_eq!(tx_ctx, rx_ctx, "both ends hold the same session context");
    println!("both ends hold the same session context");
    Ok(())
}

//! Message parsing: whatever parses re-encodes to identical bytes (but for the empty context's
//! digest, which senders leave out) and parses equal again.

use unimic_protocol::{message, Decode, Encode, Limits, Message, VarInt};

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let limits = Limits {
        max_frame_bytes: VarInt::from_u32(4096),
        max_message_bytes: VarInt::from_u32(16_384),
        max_grid_height: VarInt::from_u32(16),
        max_grid_width: VarInt::from_u32(16),
        max_context_bytes: VarInt::from_u32(4096),
        ..Limits::default()
    };
    let parsed = Message::decode_exact(data, &limits);

    // The event reader, fed in one piece, must agree with Message::decode.
    let mut reader = message::Reader::new(limits);
    reader.push(data);
    let mut extensions = false;
    let mut reader_result = Ok(());
    loop {
        match reader.next_event() {
            Ok(Some(message::Event::Extension { .. })) => extensions = true,
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                reader_result = Err(e);
                break;
            }
        }
        if reader.is_done() {
            break;
        }
    }

    let Ok(message) = parsed else {
        return;
    };
    assert!(
        reader_result.is_ok() && reader.is_done(),
        "reader disagrees: {reader_result:?}"
    );
    let bytes = message.to_bytes();
    // A part header may carry the empty context's digest, which senders leave out
    // (PROTOCOL.md §6.2): the re-encoding is then shorter by 32 bytes or more per such part.
    let explicit_digests = message
        .parts
        .iter()
        .filter_map(|p| p.header.body.coded())
        .filter(|c| !c.digest_on_wire())
        .count();
    if !extensions && bytes[..] != *data {
        assert!(
            explicit_digests > 0 && bytes.len() + 32 <= data.len(),
            "re-encoding differs"
        );
    }
    let again = Message::decode_exact(&bytes, &limits).expect("re-encoded message must parse");
    assert_eq!(again, message);
}

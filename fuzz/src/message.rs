//! Message parsing: whatever parses re-encodes to identical bytes (but for the empty context's
//! digest, which senders leave out) and parses equal again.

use unimic_protocol::{frame, message, Decode, Encode, Limits, Message, VarInt};

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
    if !extensions && bytes[..] != *data {
        // Frame by frame, the only difference allowed: a part header that carried the empty
        // context's digest, which senders leave out (PROTOCOL.md §6.2).
        let mut original = frame::Decoder::new(limits);
        original.push(data);
        let mut again = frame::Decoder::new(limits);
        again.push(&bytes);
        loop {
            let (a, b) = (original.consumed(), again.consumed());
            match (original.next_frame(), again.next_frame()) {
                (Ok(Some(f)), Ok(Some(g))) => {
                    assert_eq!(f, g, "frames differ");
                    let was = &data[a as usize..original.consumed() as usize];
                    let now = &bytes[b as usize..again.consumed() as usize];
                    if was != now {
                        assert_eq!(
                            crate::frame_stream::with_empty_digest(&g, now).as_deref(),
                            Some(was),
                            "re-encoding differs for {g:?}"
                        );
                    }
                }
                (Ok(None), Ok(None)) => break,
                other => panic!("the frames of the message and its re-encoding differ: {other:?}"),
            }
        }
    }
    let again = Message::decode_exact(&bytes, &limits).expect("re-encoded message must parse");
    assert_eq!(again, message);
}

//! Sends a photo and a question to a unimic server and prints the streamed reply:
//!
//! ```text
//! cargo run -p unimic-examples --example chat_client -- ADDR PIN [IMAGE]
//! ```
//!
//! (`ADDR` and `PIN` as `chat_server` or `unimic serve` print them; the image defaults to the
//! committed sample.)
use std::sync::Arc;

use unimic_chat::{Chat, ChatConfig, Prompt, ReplyEvent};
use unimic_codec::tokenizer::Vq;

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../samples/kodim23.png");

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: chat_client ADDR PIN [IMAGE]";
    let (addr, pin) = (
        args.first().ok_or(usage)?.parse()?,
        args.get(1).ok_or(usage)?.parse()?,
    );
    let photo = image::open(args.get(2).map_or(SAMPLE, String::as_str))?.to_rgb8();
    let config = ChatConfig::pinned(pin).with_pixels(Arc::new(Vq::default_model()?))?;
    let chat = Chat::connect(addr, config).await?;
    let mut reply = chat
        .send(Prompt::text("What is in this photo?").with_image(photo))
        .await?;
    while let Some(event) = reply.next().await {
        match event? {
            ReplyEvent::Text(delta) => print!("{delta}"),
            // An image the server streams as its agent draws it: its first rows so far.
            ReplyEvent::ImageRows { rows, height, .. } => println!("[{rows} of {height} rows]"),
            ReplyEvent::Image(grid) => {
                println!("[an image, {}x{} tokens]", grid.width(), grid.height())
            }
            ReplyEvent::End(s) => println!(
                "\n[{} bytes sent, {} received]",
                s.sent.wire_bytes, s.received.wire_bytes
            ),
            _ => {}
        }
    }
    Ok(())
}

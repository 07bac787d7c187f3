//! [`LocalAgent`]: a token-native agent that does the token tasks with the project's own entropy
//! models, with no network and no language model.
//!
//! It answers a turn that carries a [`Request`] (a raw part of media type
//! [`REQUEST_MEDIA_TYPE`]) by sampling:
//!
//! - **inpainting** ([`Task::Inpaint`]) and **outpainting** ([`Task::Outpaint`]) with the masked
//!   model (every redrawn cell sees the kept cells on all sides),
//! - **variations** ([`Task::Variation`]) with the masked model over a seeded random subset of
//!   cells,
//! - **text-to-image** ([`Task::Generate`]) with the text-conditioned model, prompted by the
//!   turn's text,
//!
//! on the conversation's most recent image (for all but generation). The reply is one text line
//! saying what was done, then the image's tokens streamed row by row as they are sampled (each row
//! goes to the sink as soon as it is complete, so a receiver can show the image grow); an edit in
//! place (inpainting, a variation) streams only its redrawn cells, a row's worth at a time, where
//! the sink takes edits so ([`ReplySink::begin_edit`]), else goes whole as an edit. Sampling is
//! seeded: the same request, image and models give the same tokens. It runs on a blocking thread;
//! dropping the reply future stops it at the next cell.
//!
//! A turn without a request gets a plain text answer that says what this agent is: it does not
//! understand images or text, and says so instead of pretending; it lists what it received and
//! what it can do.
//!
//! The images these small compression models sample are textures and colour layouts in the
//! style of the training photos, not coherent objects: the models were trained to code tokens,
//! and the agent exists to exercise the token path end to end (edits that travel as regions,
//! replies that stream) with no external service.
//!
//! ```
//! use unimic_agents::local::LocalAgent;
//! use unimic_agents::request::{Request, Task};
//! use unimic_agents::{Agent, CollectSink, Content, Conversation, Role, Turn};
//! use unimic_codec::entropy::masked::{Masked, MaskedConfig};
//! use unimic_codec::entropy::text_cond::{TextCond, TextCondConfig};
//! # let rt = tokio::runtime::Runtime::new().unwrap();
//! # rt.block_on(async {
//! // The shipped models load with `LocalAgent::load`; tiny random ones show the API.
//! let agent = LocalAgent::new(
//!     Masked::synthetic(&MaskedConfig::tiny(16), 1).unwrap(),
//!     TextCond::synthetic(&TextCondConfig::tiny(16), 2).unwrap(),
//! );
//! let request = Request::new(Task::Generate { height: 4, width: 4 }).with_seed(9);
//! let conversation = Conversation {
//!     turns: vec![Turn { role: Role::User, content: vec![Content::text("a red bird"), Content::Request(request)] }],
//! };
//! let mut sink = CollectSink::default();
//! agent.respond(&conversation, &mut sink).await.unwrap();
//! assert_eq!(sink.image_chunks.len(), 4); // one chunk per row
//! assert!(sink.image_chunks[3].2); // the last one is marked
//! # });
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use unimic_codec::entropy::masked::Masked;
use unimic_codec::entropy::sample::Sampler;
use unimic_codec::entropy::text_cond::TextCond;
use unimic_codec::grid::TokenGrid;
use unimic_codec::nn::model::ModelError;
use unimic_codec::text::{O200k, TextTokenizer};

use crate::request::{Request, RequestError, Task, REQUEST_MEDIA_TYPE};
use crate::{
    Agent, AgentError, AgentFuture, Capabilities, Content, Conversation, ImageRef, ReplySink,
};

/// Rows buffered between the sampling thread and the sink.
const ROW_BUFFER: usize = 4;

/// The token-native agent (see the [module docs](self)).
#[derive(Clone)]
pub struct LocalAgent {
    masked: Arc<Masked>,
    text_cond: Arc<TextCond>,
    names: (String, String),
}

impl std::fmt::Debug for LocalAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalAgent")
            .field("masked", &self.names.0)
            .field("text_cond", &self.names.1)
            .finish()
    }
}

impl LocalAgent {
    /// An agent over a masked model (inpainting, outpainting, variations) and a text-conditioned
    /// model (text-to-image) of the same codebook.
    pub fn new(masked: Masked, text_cond: TextCond) -> Self {
        Self {
            masked: Arc::new(masked),
            text_cond: Arc::new(text_cond),
            names: ("masked".into(), "text-conditioned".into()),
        }
    }

    /// Loads the two models from their manifests (for example the shipped
    /// `models/entropy/unimic-entropy-masked-v10.json` and `unimic-entropy-text-v7.json`; their ids
    /// are `unimic_codec::shipped::MASKED_ID` and `TEXT_ID`).
    pub fn load(masked_manifest: &Path, text_manifest: &Path) -> Result<Self, ModelError> {
        let (masked, m) = Masked::load(masked_manifest)?;
        let (text_cond, t) = TextCond::load(text_manifest)?;
        if masked.config().codebook_size != text_cond.config().codebook_size {
            return Err(ModelError::Manifest(format!(
                "{} codes {} tokens but {} codes {}",
                m.id,
                masked.config().codebook_size,
                t.id,
                text_cond.config().codebook_size
            )));
        }
        let mut agent = Self::new(masked, text_cond);
        agent.names = (m.id, t.id);
        Ok(agent)
    }

    /// Codebook size of the image tokens this agent reads and writes.
    pub fn codebook_size(&self) -> u32 {
        self.masked.config().codebook_size as u32
    }

    /// Largest grid side the models take.
    pub fn max_side(&self) -> u32 {
        self.masked
            .config()
            .max_side
            .min(self.text_cond.config().max_side) as u32
    }

    /// Builds the job a request asks for, checking it against the conversation and the models.
    fn plan(&self, request: &Request, conversation: &Conversation) -> Result<Job, AgentError> {
        let max = self.max_side();
        let k = self.codebook_size();
        let last_image = || {
            let (at, g) = conversation.last_image().ok_or_else(|| {
                AgentError::Unsupported("there is no image in the conversation to edit".into())
            })?;
            if g.codebook_size() != k {
                return Err(AgentError::Unsupported(format!(
                    "the image has {} codes per token, the local models {k}",
                    g.codebook_size()
                )));
            }
            Ok((at, g.clone()))
        };
        let too_big = |h: u32, w: u32| {
            AgentError::Unsupported(format!(
                "a {w}×{h} grid (width × height) is larger than the models' {max}×{max}"
            ))
        };
        Ok(match request.task {
            Task::Inpaint { region } => {
                let (at, g) = last_image()?;
                let (h, w) = (g.height(), g.width());
                if !region.fits(h, w) {
                    return Err(AgentError::Unsupported(format!(
                        "region x {}..{}, y {}..{} is empty or outside the {w}×{h} image (width × height in cells)",
                        region.x0, region.x1, region.y0, region.y1
                    )));
                }
                if h > max || w > max {
                    return Err(too_big(h, w));
                }
                let unknown = (0..h * w).map(|i| region.contains(i / w, i % w)).collect();
                Job::Masked {
                    height: h,
                    width: w,
                    known: g.into_ids(),
                    unknown,
                    base: Some(at),
                    what: format!(
                        "Inpainted cells x {}..{}, y {}..{} of the {w}×{h} image",
                        region.x0, region.x1, region.y0, region.y1
                    ),
                }
            }
            Task::Outpaint { border } => {
                let (_, g) = last_image()?;
                let h = g
                    .height()
                    .saturating_add(border.top)
                    .saturating_add(border.bottom);
                let w = g
                    .width()
                    .saturating_add(border.left)
                    .saturating_add(border.right);
                if h > max || w > max {
                    return Err(too_big(h, w));
                }
                if (h, w) == (g.height(), g.width()) {
                    return Err(AgentError::Unsupported("the border is empty".into()));
                }
                let mut known = vec![0u32; (h * w) as usize];
                let mut unknown = vec![true; (h * w) as usize];
                for r in 0..g.height() {
                    for c in 0..g.width() {
                        let i = ((r + border.top) * w + c + border.left) as usize;
                        known[i] = g.get(r, c);
                        unknown[i] = false;
                    }
                }
                Job::Masked {
                    height: h,
                    width: w,
                    known,
                    unknown,
                    base: None,
                    what: format!(
                        "Outpainted the {}×{} image to {w}×{h} (top {}, right {}, bottom {}, left {})",
                        g.width(),
                        g.height(),
                        border.top,
                        border.right,
                        border.bottom,
                        border.left
                    ),
                }
            }
            Task::Variation { strength } => {
                let (at, g) = last_image()?;
                let (h, w) = (g.height(), g.width());
                if h > max || w > max {
                    return Err(too_big(h, w));
                }
                // The cells to redraw: a seeded draw, independent of the token sampler's stream.
                let mut cells = Sampler::new(request.seed ^ 0x5EED_CE11_5A3D_0F1E);
                let unknown: Vec<bool> = (0..h * w)
                    .map(|_| cells.uniform() < f64::from(strength))
                    .collect();
                let n = unknown.iter().filter(|&&u| u).count();
                Job::Masked {
                    height: h,
                    width: w,
                    known: g.into_ids(),
                    unknown,
                    base: Some(at),
                    what: format!(
                        "A variation of the {w}×{h} image: {n} of {} cells redrawn",
                        h * w
                    ),
                }
            }
            Task::Generate { height, width } => {
                if height == 0 || width == 0 {
                    return Err(AgentError::Unsupported(
                        "an empty grid was asked for".into(),
                    ));
                }
                if height > max || width > max {
                    return Err(too_big(height, width));
                }
                let turn = conversation
                    .turns
                    .last()
                    .ok_or(AgentError::EmptyConversation)?;
                let mut ids = Vec::new();
                let mut prompt = String::new();
                for c in &turn.content {
                    if let Content::Text { text, ids: known } = c {
                        match known {
                            Some(known) => ids.extend_from_slice(known),
                            None => ids.extend(O200k::new().encode(text)),
                        }
                        prompt.push_str(text);
                    }
                }
                Job::Text {
                    height,
                    width,
                    prompt: ids,
                    what: format!("Generated a {width}×{height} image for {:?}", prompt.trim()),
                }
            }
        })
    }

    /// Runs `job` on a blocking thread. Every image streams into the sink row by row as it is
    /// sampled: an edit in place (inpainting, variation) as an edit of its base image (only the
    /// redrawn cells, [`ReplySink::begin_edit`]) where the sink streams edits, else whole once
    /// sampled ([`ReplySink::image_edit`]); other images as rows of tokens.
    async fn run(
        &self,
        job: Job,
        sampler: Sampler,
        sink: &mut dyn ReplySink,
    ) -> Result<(), AgentError> {
        let (height, width) = job.shape();
        let masked = Arc::clone(&self.masked);
        let text_cond = Arc::clone(&self.text_cond);
        // Dropping the reply future (a cancelled turn) stops the sampler at its next cell.
        let stop = StopOnDrop::default();
        let flag = Arc::clone(&stop.0);
        let edit = match &job {
            Job::Masked {
                base: Some(base),
                known,
                unknown,
                ..
            } => Some((*base, known.clone(), unknown.clone())),
            _ => None,
        };
        let mut streamed_edit = None;
        if let Some((base, known, region)) = edit {
            let base_grid = TokenGrid::new(height, width, self.codebook_size(), known)
                .map_err(|e| AgentError::Backend(format!("the image to edit: {e}")))?;
            if sink.begin_edit(base, &base_grid, &region).await? {
                streamed_edit = Some(region);
            } else {
                let worker = tokio::task::spawn_blocking(move || {
                    job.sample(&masked, &text_cond, sampler, None, &flag)
                });
                let grid = match worker.await {
                    Ok(Ok(grid)) => grid,
                    Ok(Err(e)) => return Err(AgentError::Backend(format!("sampling failed: {e}"))),
                    Err(e) => {
                        return Err(AgentError::Backend(format!(
                            "the sampling thread failed: {e}"
                        )))
                    }
                };
                sink.image_edit(base, &grid, &region).await?;
                return Ok(());
            }
        }
        let (tx, mut rx) = mpsc::channel::<Vec<u32>>(ROW_BUFFER);
        let worker = tokio::task::spawn_blocking(move || {
            job.sample(&masked, &text_cond, sampler, Some(tx), &flag)
        });
        // An edit sends the redrawn cells of each row; other images whole rows.
        let cells = streamed_edit
            .as_ref()
            .map(|r| r.iter().filter(|&&c| c).count());
        let (mut rows, mut sent) = (0, 0);
        while let Some(row) = rx.recv().await {
            let r = match (&streamed_edit, cells) {
                (Some(region), Some(total)) => {
                    let w = width as usize;
                    let inside: Vec<u32> = row
                        .iter()
                        .zip(&region[rows * w..(rows + 1) * w])
                        .filter(|(_, &c)| c)
                        .map(|(&id, _)| id)
                        .collect();
                    sent += inside.len();
                    if inside.is_empty() {
                        Ok(())
                    } else {
                        sink.edit_tokens(&inside, sent == total).await
                    }
                }
                _ => {
                    sink.image_tokens((height, width), &row, rows + 1 == height as usize)
                        .await
                }
            };
            rows += 1;
            if let Err(e) = r {
                // Stop the sampler (its next row finds the channel closed) and wait for it, so
                // nothing runs on after the reply ended.
                drop(rx);
                let _ = worker.await;
                return Err(e.into());
            }
        }
        if cells == Some(0) && rows == height as usize {
            // An edit that redraws nothing: its one, empty, piece.
            sink.edit_tokens(&[], true).await?;
        }
        match worker.await {
            Ok(Ok(_)) if rows == height as usize => Ok(()),
            Ok(Ok(_)) => Err(AgentError::Backend(format!(
                "sampling produced {rows} of {height} rows"
            ))),
            Ok(Err(e)) => Err(AgentError::Backend(format!("sampling failed: {e}"))),
            Err(e) => Err(AgentError::Backend(format!(
                "the sampling thread failed: {e}"
            ))),
        }
    }

    /// The answer to a turn without a request.
    fn describe(&self, conversation: &Conversation) -> Result<String, AgentError> {
        let turn = conversation
            .turns
            .last()
            .ok_or(AgentError::EmptyConversation)?;
        let mut received = Vec::new();
        for c in &turn.content {
            match c {
                Content::Text { text, ids } => received.push(format!(
                    "{} characters of text{}",
                    text.chars().count(),
                    ids.as_ref()
                        .map(|i| format!(" ({} tokens)", i.len()))
                        .unwrap_or_default()
                )),
                Content::Image(g) => received.push(format!(
                    "a {}×{} grid of image tokens",
                    g.width(),
                    g.height()
                )),
                Content::ImageLevels(levels) => {
                    if let Some(g) = levels.first() {
                        received.push(format!(
                            "a {}×{} grid of image tokens in {} quality levels",
                            g.width(),
                            g.height(),
                            levels.len()
                        ))
                    }
                }
                Content::Raw { media_type, bytes } => received.push(format!(
                    "a {} attachment of {} bytes",
                    media_type,
                    bytes.len()
                )),
                Content::Request(_) => {}
            }
        }
        let received = if received.is_empty() {
            "nothing".to_string()
        } else {
            received.join(", ")
        };
        Ok(format!(
            "I am unimic's local token-native agent: I run the project's entropy models ({} and {}) \
             on this machine, not a language model, so I cannot tell what is in your pictures or \
             answer questions about them. This turn I received {received}. I can inpaint or \
             outpaint the last image, make a variation of it, or draw a new token grid from a \
             prompt: send a request part (in `unimic chat`: /edit, /outpaint, /vary, /gen).",
            self.names.0, self.names.1
        ))
    }
}

/// Sampling work, ready to run on a blocking thread.
enum Job {
    Masked {
        height: u32,
        width: u32,
        known: Vec<u32>,
        unknown: Vec<bool>,
        /// The image this edits in place (same shape): the reply is sent as an edit of it.
        base: Option<ImageRef>,
        what: String,
    },
    Text {
        height: u32,
        width: u32,
        prompt: Vec<u32>,
        what: String,
    },
}

impl Job {
    fn shape(&self) -> (u32, u32) {
        match self {
            Job::Masked { height, width, .. } | Job::Text { height, width, .. } => {
                (*height, *width)
            }
        }
    }

    fn what(&self) -> &str {
        match self {
            Job::Masked { what, .. } | Job::Text { what, .. } => what,
        }
    }

    /// Samples the grid, sending each row to `tx` (if any) once every cell of it is known;
    /// stops with [`ModelError::Stopped`] when `stop` is set.
    fn sample(
        self,
        masked: &Masked,
        text_cond: &TextCond,
        mut sampler: Sampler,
        tx: Option<mpsc::Sender<Vec<u32>>>,
        stop: &AtomicBool,
    ) -> Result<TokenGrid, ModelError> {
        let (height, width) = self.shape();
        let (h, w) = (height as usize, width as usize);
        let cells = match &self {
            Job::Masked { known, .. } => known.clone(),
            Job::Text { .. } => vec![0; h * w],
        };
        let mut rows = RowStream {
            cells,
            width: w,
            sent: 0,
            tx,
        };
        let mut pick = |t: usize, weights: &[u64]| {
            if stop.load(Ordering::Relaxed) {
                return Err(ModelError::Stopped);
            }
            let id = sampler.pick(weights);
            rows.set(t, id)?;
            Ok(id)
        };
        let grid: TokenGrid = match &self {
            Job::Masked { known, unknown, .. } => {
                masked.generate(height, width, known, unknown, &mut pick)?
            }
            Job::Text { prompt, .. } => text_cond.generate(prompt, height, width, &mut pick)?,
        };
        rows.cells.copy_from_slice(grid.ids());
        rows.flush(h)?;
        Ok(grid)
    }
}

/// Sets its flag when dropped.
#[derive(Default)]
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The cells sampled so far and how many rows have gone out.
struct RowStream {
    cells: Vec<u32>,
    width: usize,
    sent: usize,
    tx: Option<mpsc::Sender<Vec<u32>>>,
}

impl RowStream {
    /// Records cell `t` (cells are decided in raster order, so every cell up to `t` is now
    /// known) and sends the rows it completes.
    fn set(&mut self, t: usize, id: u32) -> Result<(), ModelError> {
        if self.tx.is_none() {
            return Ok(());
        }
        self.cells[t] = id;
        self.flush((t + 1) / self.width)
    }

    /// Sends rows up to (not including) `upto`.
    fn flush(&mut self, upto: usize) -> Result<(), ModelError> {
        let Some(tx) = &self.tx else { return Ok(()) };
        while self.sent < upto {
            let row = self.cells[self.sent * self.width..(self.sent + 1) * self.width].to_vec();
            tx.blocking_send(row).map_err(|_| ModelError::Stopped)?;
            self.sent += 1;
        }
        Ok(())
    }
}

impl Agent for LocalAgent {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            image_input: true,
            image_output: true,
            streaming: true,
        }
    }

    fn respond<'a>(
        &'a self,
        conversation: &'a Conversation,
        sink: &'a mut dyn ReplySink,
    ) -> AgentFuture<'a> {
        Box::pin(async move {
            let turn = conversation
                .turns
                .last()
                .ok_or(AgentError::EmptyConversation)?;
            let mut request = None;
            for c in &turn.content {
                match c {
                    Content::Request(r) => request = Some(*r),
                    Content::Raw { media_type, bytes } if media_type == REQUEST_MEDIA_TYPE => {
                        // The serving glue hands over requests it could not read as raw parts.
                        let e = Request::from_json(bytes).err().unwrap_or_else(|| {
                            RequestError("the request was not decoded by the server".into())
                        });
                        return Err(AgentError::Unsupported(e.to_string()));
                    }
                    _ => {}
                }
            }
            let Some(request) = request else {
                let text = self.describe(conversation)?;
                sink.text_delta(&text).await?;
                return Ok(());
            };
            let job = self.plan(&request, conversation)?;
            let sampler = Sampler::new(request.seed)
                .with_temperature(request.temperature)
                .with_top_k(request.top_k as usize);
            let line = format!(
                "{} (seed {}, temperature {}, top-k {}).\n",
                job.what(),
                request.seed,
                sampler.temperature(),
                if request.top_k == 0 {
                    "off".to_string()
                } else {
                    request.top_k.to_string()
                }
            );
            sink.text_delta(&line).await?;
            self.run(job, sampler, sink).await
        })
    }
}

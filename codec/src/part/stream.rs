//! A grid part coded as its tokens arrive: [`GridStream`].

use super::*;

/// A grid part coded as its tokens arrive, for example a reply image sent row by row while an
/// agent samples it. Made by [`PartCodec::grid_stream`] with the part's spec, whose chunk size
/// it codes in (all tokens in one chunk without one); [`push`](Self::push) takes the next tokens
/// in the part's coding order (row-major; a masked part's region cells only) and returns the
/// chunks they complete. The chunks are byte for byte those [`PartCodec::encode`] makes of the
/// whole grid with the same spec and context: a transformer model runs once over the part (its
/// run carried from chunk to chunk, each chunk one batched pass), the other models code each
/// chunk from the state after the references.
///
/// ```
/// use unimic_codec::context::SessionContext;
/// use unimic_codec::grid::TokenGrid;
/// use unimic_codec::part::{ModelChoice, PartCodec, PartSpec, PartTokens};
///
/// let ctx = SessionContext::default();
/// let spec = PartSpec::new(ModelChoice::Adaptive).with_chunk_tokens(4);
/// let mut codec = PartCodec::default();
/// let mut stream = codec.grid_stream(&ctx, 3, 4, 16, &spec).unwrap();
/// let mut chunks = Vec::new();
/// for row in [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]] {
///     chunks.extend(stream.push(&row).unwrap()); // a chunk as each row completes one
/// }
/// let grid = stream.into_grid().unwrap();
/// let whole = codec.encode(&ctx, PartTokens::Grid(&grid), &spec).unwrap();
/// assert_eq!(chunks, whole.chunks);
/// ```
#[derive(Debug)]
pub struct GridStream {
    state: State,
    height: u32,
    width: u32,
    codebook_size: u32,
    chunk: usize,
    /// Tokens pushed, in coding order.
    tokens: Vec<u32>,
    /// The grid's cells, row-major, for the models that read neighbours (zeros not pushed yet).
    cells: Vec<u32>,
    /// Tokens already in chunks, and whether the last chunk is out.
    coded: usize,
    ended: bool,
    total: usize,
    run: Option<Cursor>,
    digest: [u8; 32],
    model: ModelIdentity,
    cross_entropy_bits: f64,
    bytes: u64,
}

impl PartCodec {
    /// Starts a `height × width` grid part coded as its tokens arrive ([`GridStream`]): checks
    /// and digests the references and sets up the model as [`encode`](Self::encode) does for a
    /// whole grid (a masked part's known cells and a text-conditioned part's prompt are run
    /// now).
    pub fn grid_stream(
        &mut self,
        ctx: &SessionContext,
        height: u32,
        width: u32,
        codebook_size: u32,
        spec: &PartSpec,
    ) -> Result<GridStream, PartError> {
        if height == 0 || width == 0 {
            return Err(GridError::Empty { height, width }.into());
        }
        if codebook_size == 0 || codebook_size > crate::grid::MAX_CODEBOOK {
            return Err(GridError::BadCodebook(codebook_size).into());
        }
        let shape = PartShape::Grid {
            height,
            width,
            codebook_size,
        };
        self.check_size(shape.tokens())?;
        let digest = ctx.digest(&spec.refs)?;
        let model = self.identity(spec.model, SequenceKind::Grid)?;
        let state = self.state(ctx, spec, &shape)?;
        let run = start_run(&state, &shape)?;
        let cells = height as usize * width as usize;
        let (total, cells) = match &state {
            State::Masked { known, unknown, .. } => {
                (unknown.iter().filter(|&&u| u).count(), known.clone())
            }
            _ => (cells, vec![0; cells]),
        };
        Ok(GridStream {
            state,
            height,
            width,
            codebook_size,
            chunk: spec.chunk_tokens.map_or(total, |c| c as usize).max(1),
            tokens: Vec::with_capacity(total),
            cells,
            coded: 0,
            ended: false,
            total,
            run,
            digest,
            model,
            cross_entropy_bits: 0.0,
            bytes: 0,
        })
    }
}

impl GridStream {
    /// The digest of the part's references (its header's `context_digest`).
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// The identity of the model coding the part.
    pub fn model(&self) -> ModelIdentity {
        self.model
    }

    /// Tokens the part codes: every cell, or a masked part's region cells.
    pub fn total(&self) -> u64 {
        self.total as u64
    }

    /// Tokens pushed so far.
    pub fn pushed(&self) -> u64 {
        self.tokens.len() as u64
    }

    /// Whether every token is pushed and coded (the last chunk is out).
    pub fn is_done(&self) -> bool {
        self.ended
    }

    /// `Σ -log2 p` of the tokens coded so far.
    pub fn cross_entropy_bits(&self) -> f64 {
        self.cross_entropy_bits
    }

    /// Payload bytes of the chunks made so far.
    pub fn payload_bytes(&self) -> u64 {
        self.bytes
    }

    /// Takes the next `tokens` (in coding order) and returns the chunks they complete: every
    /// chunk of the spec's size, and the last (shorter) one once the part is complete. Pushing
    /// past the part's tokens, or an id outside the codebook, is refused and changes nothing.
    pub fn push(&mut self, tokens: &[u32]) -> Result<Vec<Chunk>, PartError> {
        let left = self.total - self.tokens.len();
        if tokens.len() > left {
            return Err(PartError::TokenCount {
                got: (self.tokens.len() + tokens.len()) as u64,
                expected: self.total as u64,
            });
        }
        if let Some((index, &id)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &id)| id >= self.codebook_size)
        {
            return Err(GridError::IdOutOfRange {
                index: self.tokens.len() + index,
                id,
                codebook_size: self.codebook_size,
            }
            .into());
        }
        self.tokens.extend_from_slice(tokens);
        let mut out = Vec::new();
        loop {
            let ready = self.tokens.len() - self.coded;
            let complete = self.tokens.len() == self.total;
            if self.ended || !(ready >= self.chunk || complete) {
                break;
            }
            let end = (self.coded + self.chunk).min(self.tokens.len());
            out.push(self.code(self.coded, end)?);
            self.coded = end;
            self.ended = end == self.total;
        }
        Ok(out)
    }

    /// Codes tokens `start..end` (of the coding order) as one chunk.
    fn code(&mut self, start: usize, end: usize) -> Result<Chunk, PartError> {
        let chunk = &self.tokens[start..end];
        let mut enc = Encoder::new();
        match (&mut self.state, &mut self.run) {
            (State::Generic(m), Some(c)) => {
                let w = m.advance_known(c, chunk);
                return self.finish_chunk(w, start, end);
            }
            (State::Masked { model: m, .. }, Some(c)) => {
                let w = m.advance_known(c, chunk);
                return self.finish_chunk(w, start, end);
            }
            (State::TextCond { model: m, .. }, Some(c)) => {
                let w = m.advance_known(c, chunk);
                return self.finish_chunk(w, start, end);
            }
            (State::Uniform, _) => {
                let u = Uniform::new(self.codebook_size);
                for &s in chunk {
                    enc.encode(s, &u)?;
                }
            }
            (State::Static(m), _) => {
                for &s in chunk {
                    enc.encode(s, m.distribution())?;
                }
            }
            (State::Grid(g), _) => {
                self.cells[start..end].copy_from_slice(chunk);
                // Every chunk codes from the state after the references.
                g.clone()
                    .encode(&mut enc, &self.cells, self.width, start..end)?;
            }
            _ => {
                return Err(PartError::ModelUnavailable {
                    model: ModelChoice::Adaptive,
                    kind: SequenceKind::Grid,
                })
            }
        }
        self.cross_entropy_bits += enc.cross_entropy_bits();
        let payload = enc.finish();
        self.bytes += payload.len() as u64;
        Ok(Chunk {
            payload,
            tokens: (end - start) as u32,
        })
    }

    fn finish_chunk(
        &mut self,
        weights: Result<Vec<Vec<u64>>, crate::nn::model::ModelError>,
        start: usize,
        end: usize,
    ) -> Result<Chunk, PartError> {
        let weights = weights.map_err(|e| PartError::Transformer(e.to_string()))?;
        let (payload, bits) = code_chunk(weights, &self.tokens[start..end])?;
        self.cross_entropy_bits += bits;
        self.bytes += payload.len() as u64;
        Ok(Chunk {
            payload,
            tokens: (end - start) as u32,
        })
    }

    /// The part's grid once every token is pushed: the pushed tokens, or for a masked part the
    /// reference outside the region and the pushed cells inside (what both ends commit).
    pub fn into_grid(self) -> Result<TokenGrid, PartError> {
        if !self.ended {
            return Err(PartError::TokenCount {
                got: self.tokens.len() as u64,
                expected: self.total as u64,
            });
        }
        let ids = match self.run {
            Some(c) if matches!(self.state, State::Masked { .. }) => c.ids().to_vec(),
            _ => self.tokens,
        };
        Ok(TokenGrid::new(
            self.height,
            self.width,
            self.codebook_size,
            ids,
        )?)
    }
}

/// Starts a transformer model's run over a grid part (`None` for the other models): the
/// masked model's known cells and the text model's prompt are run now.
pub(super) fn start_run(state: &State, shape: &PartShape) -> Result<Option<Cursor>, PartError> {
    let transformer = |e: crate::nn::model::ModelError| PartError::Transformer(e.to_string());
    let PartShape::Grid { height, width, .. } = *shape else {
        return Ok(None);
    };
    Ok(match state {
        State::Generic(m) => Some(m.cursor(height, width).map_err(transformer)?),
        State::Masked {
            model: m,
            known,
            unknown,
        } => Some(
            m.cursor(height, width, known, unknown)
                .map_err(transformer)?,
        ),
        State::TextCond { model: m, prompt } => {
            Some(m.cursor(prompt, height, width).map_err(transformer)?)
        }
        _ => None,
    })
}

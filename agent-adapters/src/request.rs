//! [`Request`]: what a user asks a token-native agent to make (inpaint, outpaint, generate, vary),
//! and how it travels: a raw part of media type [`REQUEST_MEDIA_TYPE`] holding the request as
//! JSON (docs/PROTOCOL.md, "Agent requests").
//!
//! ```
//! use unimic_agents::request::{CellRect, Request, Task};
//! let r = Request::new(Task::Inpaint { region: CellRect { x0: 4, y0: 4, x1: 12, y1: 10 } })
//!     .with_seed(7)
//!     .with_temperature(0.9);
//! let json = r.to_json();
//! assert_eq!(
//!     String::from_utf8(json.clone()).unwrap(),
//!     r#"{"task":{"inpaint":{"region":{"x0":4,"y0":4,"x1":12,"y1":10}}},"seed":7,"temperature":0.9}"#
//! );
//! assert_eq!(Request::from_json(&json).unwrap(), r);
//! // Fields at their defaults (seed 0, temperature 1, top-k 0) are left out.
//! let plain = Request::new(Task::Generate { height: 16, width: 16 });
//! assert_eq!(plain.to_json(), br#"{"task":{"generate":{"height":16,"width":16}}}"#);
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Media type of a raw part that carries a [`Request`] as JSON.
pub const REQUEST_MEDIA_TYPE: &str = "application/vnd.unimic.request+json";

/// Largest request JSON accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// A rectangle of grid cells: columns `x0..x1`, rows `y0..y1` (end exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellRect {
    /// First column.
    pub x0: u32,
    /// First row.
    pub y0: u32,
    /// One past the last column.
    pub x1: u32,
    /// One past the last row.
    pub y1: u32,
}

impl CellRect {
    /// Whether the rectangle is non-empty and lies inside a `height × width` grid.
    pub fn fits(&self, height: u32, width: u32) -> bool {
        self.x0 < self.x1 && self.y0 < self.y1 && self.x1 <= width && self.y1 <= height
    }

    /// Whether cell `(row, col)` is inside.
    pub fn contains(&self, row: u32, col: u32) -> bool {
        (self.y0..self.y1).contains(&row) && (self.x0..self.x1).contains(&col)
    }
}

/// Cells added on each side of an image (outpainting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Border {
    /// Rows added above.
    pub top: u32,
    /// Columns added on the right.
    pub right: u32,
    /// Rows added below.
    pub bottom: u32,
    /// Columns added on the left.
    pub left: u32,
}

/// What to make. Every task but [`Task::Generate`] works on the conversation's most recent image
/// (sent by either side).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Task {
    /// Redraw the cells of `region`, keeping the rest of the image.
    Inpaint {
        /// The cells to redraw.
        region: CellRect,
    },
    /// Extend the image by `border` cells on each side.
    Outpaint {
        /// How far to extend.
        border: Border,
    },
    /// Draw a new `height × width` grid from the turn's text.
    Generate {
        /// Rows of cells.
        height: u32,
        /// Columns of cells.
        width: u32,
    },
    /// Redraw a seeded random `strength` fraction (0 to 1) of the image's cells.
    Variation {
        /// The fraction of cells redrawn.
        strength: f32,
    },
}

/// A request to a token-native agent: the task and how to sample it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// What to make.
    pub task: Task,
    /// Seed of the sampler: the same seed, image and models give the same tokens.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub seed: u64,
    /// Sampling temperature (1: the model's distribution; 0: the most likely token).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens at each cell (0: no cut).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub top_k: u32,
}

fn one() -> f32 {
    1.0
}

// Fields at their default (PROTOCOL.md §6.5.1) are left out of the JSON: every byte of a request
// travels raw.
fn is_one(v: &f32) -> bool {
    *v == 1.0
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// A request part that could not be read.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("invalid agent request: {0}")]
pub struct RequestError(pub String);

impl Request {
    /// A request for `task` with seed 0, temperature 1 and no top-k cut.
    pub fn new(task: Task) -> Self {
        Self {
            task,
            seed: 0,
            temperature: 1.0,
            top_k: 0,
        }
    }

    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the temperature.
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Sets the top-k cut.
    pub fn with_top_k(mut self, top_k: u32) -> Self {
        self.top_k = top_k;
        self
    }

    /// The request as the JSON body of a [`REQUEST_MEDIA_TYPE`] part, without the fields that
    /// are at their defaults.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain structs of numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a [`REQUEST_MEDIA_TYPE`] part: at most [`MAX_REQUEST_BYTES`], no unknown fields, a
    /// finite temperature in `0..=10`, a variation strength in `0..=1`.
    pub fn from_json(bytes: &[u8]) -> Result<Self, RequestError> {
        if bytes.len() > MAX_REQUEST_BYTES {
            return Err(RequestError(format!(
                "{} bytes (at most {MAX_REQUEST_BYTES})",
                bytes.len()
            )));
        }
        let r: Request = serde_json::from_slice(bytes).map_err(|e| RequestError(e.to_string()))?;
        if !(r.temperature.is_finite() && (0.0..=10.0).contains(&r.temperature)) {
            return Err(RequestError(format!(
                "temperature {} is not in 0..=10",
                r.temperature
            )));
        }
        if let Task::Variation { strength } = r.task {
            if !(strength.is_finite() && (0.0..=1.0).contains(&strength)) {
                return Err(RequestError(format!("strength {strength} is not in 0..=1")));
            }
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_round_trips_and_defaults_apply() {
        for task in [
            Task::Inpaint {
                region: CellRect {
                    x0: 0,
                    y0: 1,
                    x1: 2,
                    y1: 3,
                },
            },
            Task::Outpaint {
                border: Border {
                    top: 1,
                    right: 2,
                    bottom: 3,
                    left: 4,
                },
            },
            Task::Generate {
                height: 16,
                width: 16,
            },
            Task::Variation { strength: 0.25 },
        ] {
            let r = Request::new(task).with_seed(3).with_top_k(40);
            assert_eq!(Request::from_json(&r.to_json()).unwrap(), r);
            // At the defaults, only the task travels, and it reads back the same.
            let d = Request::new(task);
            let json = String::from_utf8(d.to_json()).unwrap();
            assert!(
                json.starts_with(r#"{"task":"#) && !json.contains("seed"),
                "{json}"
            );
            assert!(
                !json.contains("temperature") && !json.contains("top_k"),
                "{json}"
            );
            assert_eq!(Request::from_json(json.as_bytes()).unwrap(), d);
            // Temperature 0 (greedy) is not the default: it is written.
            let g = Request::new(task).with_temperature(0.0);
            assert!(String::from_utf8(g.to_json())
                .unwrap()
                .contains(r#""temperature":0.0"#));
            assert_eq!(Request::from_json(&g.to_json()).unwrap(), g);
        }
        let r = Request::from_json(br#"{"task":{"generate":{"height":8,"width":4}}}"#).unwrap();
        assert_eq!((r.seed, r.temperature, r.top_k), (0, 1.0, 0));
    }

    #[test]
    fn bad_requests_are_typed_errors() {
        for bad in [
            &b"not json"[..],
            br#"{"task":{"paint":{}}}"#,
            br#"{"task":{"generate":{"height":8,"width":4}},"extra":1}"#,
            br#"{"task":{"generate":{"height":8,"width":4}},"temperature":-1}"#,
            br#"{"task":{"variation":{"strength":2.0}}}"#,
            br#"{"task":{"inpaint":{"region":{"x0":-1,"y0":0,"x1":1,"y1":1}}}}"#,
        ] {
            assert!(
                Request::from_json(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(Request::from_json(&big).unwrap_err().0.contains("bytes"));
    }

    #[test]
    fn rect_fits_and_contains() {
        let r = CellRect {
            x0: 2,
            y0: 1,
            x1: 4,
            y1: 3,
        };
        assert!(r.fits(3, 4) && !r.fits(2, 4) && !r.fits(3, 3));
        assert!(r.contains(1, 2) && r.contains(2, 3) && !r.contains(3, 2) && !r.contains(1, 4));
        let empty = CellRect { x1: 2, ..r };
        assert!(!empty.fits(16, 16));
    }
}

#[cfg(test)]
mod spec {
    use super::*;

    const SPEC: &str = include_str!("../../docs/PROTOCOL.md");

    /// The JSON of the spec's golden request block `name`.
    fn golden(name: &str) -> &'static str {
        let marker = format!("<!-- golden-json: {name} -->");
        let start = SPEC.find(&marker).expect("the golden block is in the spec") + marker.len();
        let rest = &SPEC[start..];
        let body = &rest[rest.find("```json\n").expect("a json block") + 8..];
        body[..body.find("```").expect("the block ends")].trim()
    }

    #[test]
    fn the_spec_example_reads_and_writes_byte_for_byte() {
        let json = golden("agent_request");
        let r = Request::from_json(json.as_bytes()).unwrap();
        assert_eq!(
            r,
            Request::new(Task::Inpaint {
                region: CellRect {
                    x0: 5,
                    y0: 5,
                    x1: 11,
                    y1: 11
                }
            })
            .with_seed(4)
            .with_temperature(0.9)
            .with_top_k(50)
        );
        assert_eq!(String::from_utf8(r.to_json()).unwrap(), json);
    }
}

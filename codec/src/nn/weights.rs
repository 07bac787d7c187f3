//! [`Weights`]: named f32 tensors read from (and written to) safetensors without candle, plus the
//! deterministic synthetic initialisation used by tests and golden vectors.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

use super::NnError;

/// One named tensor: its shape and row-major f32 data.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub data: Vec<f32>,
}

/// A set of named f32 tensors (a model checkpoint), ordered by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
}

/// The SplitMix64 step: the project's documented pseudo-random function (integer only, identical on
/// every platform). Returns the next output for state `x` (callers pass the previous output).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a 64-bit hash of a byte string (used to derive a per-tensor seed from its name).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

impl Weights {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a safetensors file. Every tensor must be F32 (little-endian); the header's sizes are
    /// checked by the `safetensors` parser before anything is copied.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, NnError> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| NnError::Format(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(NnError::Format(format!(
                    "tensor {name} has dtype {:?}, only F32 is supported",
                    view.dtype()
                )));
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.insert(
                name,
                Tensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        Ok(Self { tensors })
    }

    /// Serialises to safetensors bytes (deterministic: tensors sorted by name, no metadata).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, NnError> {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(n, t)| {
                let b: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                (n.clone(), t.shape.clone(), b)
            })
            .collect();
        let mut views = Vec::with_capacity(bytes.len());
        for (n, s, b) in &bytes {
            let v = TensorView::new(Dtype::F32, s.clone(), b)
                .map_err(|e| NnError::Format(e.to_string()))?;
            views.push((n.clone(), v));
        }
        safetensors::serialize(views, None).map_err(|e| NnError::Format(e.to_string()))
    }

    /// Adds or replaces a tensor. Fails if `data.len()` is not the product of `shape`.
    pub fn insert(&mut self, name: &str, shape: &[usize], data: Vec<f32>) -> Result<(), NnError> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(NnError::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: vec![data.len()],
            });
        }
        self.tensors.insert(
            name.to_string(),
            Tensor {
                shape: shape.to_vec(),
                data,
            },
        );
        Ok(())
    }

    /// The tensor called `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Names and tensors, ordered by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Total number of values (parameters).
    pub fn num_values(&self) -> usize {
        self.tensors.values().map(|t| t.data.len()).sum()
    }

    /// Removes and returns the data of `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, NnError> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| NnError::Missing(name.to_string()))?;
        if t.shape != shape {
            return Err(NnError::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: t.shape,
            });
        }
        Ok(t.data)
    }

    /// Fails if any tensor is left (a checkpoint with unexpected extra tensors is refused).
    pub fn finish(self) -> Result<(), NnError> {
        match self.tensors.keys().next() {
            Some(n) => Err(NnError::Unexpected(n.clone())),
            None => Ok(()),
        }
    }

    /// Deterministic synthetic weights for the given `(name, shape)` list: tensors whose name ends
    /// in `norm.weight` or `norm1.weight` etc. (any name containing `norm`) are all ones, biases
    /// (`.bias`) are uniform in `±0.02`, all other values uniform in `±scale / sqrt(last_dim)`.
    /// Value `i` of tensor `name` is
    /// `u(splitmix64(fnv1a64(name) ^ seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))` where
    /// `u(z) = ((z >> 40) as f32 * 2^-24 - 0.5) * 2 * bound`: integer arithmetic and exact
    /// conversions only, so the weights are identical on every platform.
    pub fn synthetic(shapes: &[(String, Vec<usize>)], seed: u64, scale: f32) -> Self {
        let mut w = Self::new();
        for (name, shape) in shapes {
            let n: usize = shape.iter().product();
            let last = *shape.last().unwrap_or(&1) as f32;
            let data: Vec<f32> = if name.contains("norm") {
                vec![1.0; n]
            } else {
                let bound = if name.ends_with(".bias") {
                    0.02
                } else {
                    scale / last.sqrt()
                };
                let base = fnv1a64(name.as_bytes()) ^ seed;
                (0..n as u64)
                    .map(|i| {
                        let z = splitmix64(base ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                        ((z >> 40) as f32 * (1.0 / 16_777_216.0) - 0.5) * 2.0 * bound
                    })
                    .collect()
            };
            w.tensors.insert(
                name.clone(),
                Tensor {
                    shape: shape.clone(),
                    data,
                },
            );
        }
        w
    }
}

/// Lower-case hex SHA-256 of `bytes`: the content hash that names a model file in manifests and in
/// the handshake.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip() {
        let shapes = vec![
            ("a.weight".to_string(), vec![3, 4]),
            ("a.bias".to_string(), vec![3]),
            ("norm.weight".to_string(), vec![4]),
        ];
        let w = Weights::synthetic(&shapes, 7, 1.0);
        let bytes = w.to_safetensors().unwrap();
        let back = Weights::from_safetensors(&bytes).unwrap();
        assert_eq!(w, back);
        assert_eq!(bytes, back.to_safetensors().unwrap());
        assert!(Weights::from_safetensors(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn take_checks_shape_and_leftovers() {
        let shapes = vec![("x".to_string(), vec![2, 2]), ("y".to_string(), vec![1])];
        let mut w = Weights::synthetic(&shapes, 1, 1.0);
        assert!(w.take("x", &[4]).is_err());
        let mut w = Weights::synthetic(&shapes, 1, 1.0);
        assert_eq!(w.take("x", &[2, 2]).unwrap().len(), 4);
        assert!(matches!(w.clone().finish(), Err(NnError::Unexpected(_))));
        w.take("y", &[1]).unwrap();
        w.finish().unwrap();
    }
}

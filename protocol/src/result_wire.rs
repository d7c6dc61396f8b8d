//! A `result`'s bytes written straight, without serde.
//!
//! A worker writes one `result` per item, so on a fast model encoding answers is a visible
//! share of its cost per item: through serde each key and value passes the serializer's
//! plumbing and several small writes (about 2.7k instructions per answer, `scripts/
//! profile-worker.sh`). This writes the same bytes, byte for byte (a test holds it to
//! [`super::message`]'s serde path, which stays the definition), with each fixed key written
//! as one slice.

use std::io::Write;

use rmp::encode::{self, ValueWriteError};

use crate::message::{key, InferResult};
use crate::tensor::Tensor;

/// Writes `result` as the one MessagePack map [`crate::Message::write_msgpack`] writes for it.
pub(crate) fn write_result<W: Write>(
    result: &InferResult,
    out: &mut W,
) -> Result<(), ValueWriteError> {
    let present = [
        result.queue_us.is_some(),
        result.infer_us.is_some(),
        result.batch_size.is_some(),
        result.worker.is_some(),
    ];
    // type, id and outputs are always there.
    let len = 3 + present.iter().filter(|p| **p).count();
    encode::write_map_len(out, len as u32)?;
    fixed(out, key::TYPE)?;
    fixed(out, "result")?;
    fixed(out, key::ID)?;
    encode::write_uint(out, result.id)?;
    fixed(out, key::OUTPUTS)?;
    encode::write_map_len(out, map_len(result.outputs.len())?)?;
    for (name, tensor) in &result.outputs {
        encode::write_str(out, name)?;
        write_tensor(out, tensor)?;
    }
    if let Some(v) = result.queue_us {
        fixed(out, key::QUEUE_US)?;
        encode::write_uint(out, v)?;
    }
    if let Some(v) = result.infer_us {
        fixed(out, key::INFER_US)?;
        encode::write_uint(out, v)?;
    }
    if let Some(v) = result.batch_size {
        fixed(out, key::BATCH_SIZE)?;
        encode::write_uint(out, u64::from(v))?;
    }
    if let Some(worker) = &result.worker {
        fixed(out, key::WORKER)?;
        encode::write_str(out, worker)?;
    }
    Ok(())
}

/// A tensor as serde writes it in struct-map mode: `dtype`, `shape`, `data`.
fn write_tensor<W: Write>(out: &mut W, tensor: &Tensor) -> Result<(), ValueWriteError> {
    encode::write_map_len(out, 3)?;
    fixed(out, "dtype")?;
    fixed(out, tensor.dtype().as_str())?;
    fixed(out, "shape")?;
    encode::write_array_len(out, map_len(tensor.shape().len())?)?;
    for &d in tensor.shape() {
        encode::write_uint(out, d as u64)?;
    }
    fixed(out, "data")?;
    encode::write_bin(out, tensor.data())
}

/// A length MessagePack can carry (every frame is far below 4 GiB; a longer one would be a bug
/// the frame limit catches first, so it is reported, never truncated).
fn map_len(len: usize) -> Result<u32, ValueWriteError> {
    u32::try_from(len).map_err(|_| {
        ValueWriteError::InvalidDataWrite(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "more than 2^32 entries",
        ))
    })
}

/// A short fixed string (a key, a type or dtype name) as one write: MessagePack's fixstr,
/// a marker byte holding the length, then the bytes.
fn fixed<W: Write>(out: &mut W, s: &str) -> Result<(), ValueWriteError> {
    const MAX: usize = 31;
    if s.len() > MAX {
        return encode::write_str(out, s);
    }
    let mut buf = [0u8; MAX + 1];
    buf[0] = 0xa0 | s.len() as u8;
    buf[1..=s.len()].copy_from_slice(s.as_bytes());
    out.write_all(&buf[..=s.len()])
        .map_err(ValueWriteError::InvalidDataWrite)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::message::{Message, Tensors};
    use crate::tensor::DType;

    /// The serde path's bytes, which this file must reproduce.
    fn serde_bytes(result: &InferResult) -> Vec<u8> {
        let mut out = Vec::new();
        crate::message::write_with_serde(&Message::Result(result.clone()), &mut out).unwrap();
        out
    }

    fn straight(result: &InferResult) -> Vec<u8> {
        let mut out = Vec::new();
        write_result(result, &mut out).unwrap();
        out
    }

    fn tensor(dtype: DType, shape: Vec<usize>, fill: u8) -> Tensor {
        let len = shape.iter().product::<usize>() * dtype.size();
        Tensor::new(dtype, shape, Bytes::from(vec![fill; len])).unwrap()
    }

    #[test]
    fn every_combination_of_fields_matches_the_serde_bytes() {
        let dtypes = [DType::F32, DType::I64, DType::Bool, DType::U8, DType::Bf16];
        // Ids and times across MessagePack's integer widths; shapes and data across str,
        // array and bin lengths (fix, 8, 16 and 32 bit).
        let numbers = [
            0u64,
            1,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u32::MAX as u64 + 1,
            u64::MAX,
        ];
        let shapes = [
            vec![],
            vec![10],
            vec![0, 3],
            vec![2, 300],
            vec![70_000],
            vec![1; 17],
        ];
        let long_name = "y".repeat(40);
        for (i, &id) in numbers.iter().enumerate() {
            for mask in 0..16u8 {
                let mut outputs = Tensors::new();
                let shape = shapes[i % shapes.len()].clone();
                outputs.insert("logits".into(), tensor(dtypes[i % dtypes.len()], shape, 7));
                if i % 2 == 0 {
                    outputs.insert(long_name.clone(), tensor(DType::F64, vec![1], 1));
                }
                let result = InferResult {
                    id,
                    outputs,
                    queue_us: (mask & 1 != 0).then_some(numbers[(i + 1) % numbers.len()]),
                    infer_us: (mask & 2 != 0).then_some(numbers[(i + 3) % numbers.len()]),
                    batch_size: (mask & 4 != 0).then_some([1, 64, 200, 70_000, u32::MAX][i % 5]),
                    worker: (mask & 8 != 0).then(|| "w".repeat([1, 31, 32, 300][i % 4])),
                };
                assert_eq!(straight(&result), serde_bytes(&result), "{result:?}");
            }
        }
    }

    #[test]
    fn no_outputs_is_an_empty_map() {
        let result = InferResult {
            id: 9,
            outputs: Tensors::new(),
            queue_us: None,
            infer_us: None,
            batch_size: None,
            worker: None,
        };
        assert_eq!(straight(&result), serde_bytes(&result));
        let decoded = Message::decode(&Bytes::from(straight(&result))).unwrap();
        assert_eq!(decoded, Message::Result(result));
    }
}

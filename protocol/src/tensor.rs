//! [`Tensor`]: typed, shaped bytes that travel without being decoded.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use ndarray::{ArrayView, ArrayViewD, CowArray, IxDyn};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The element type of a tensor, written on the wire as a short lowercase string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary64.
    F64,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16: the upper half of a binary32.
    Bf16,
    /// Signed 8-bit integer.
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 8-bit integer.
    U8,
    /// Unsigned 16-bit integer.
    U16,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 64-bit integer.
    U64,
    /// One byte per element, 0 or 1.
    Bool,
}

impl DType {
    /// Every dtype, in the order the protocol lists them.
    pub const ALL: [DType; 13] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::Bf16,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::Bool,
    ];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::F16 | DType::Bf16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// The wire name (`"f32"`, `"bool"`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::Bool => "bool",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| Error::UnknownDType {
                id: None,
                dtype: s.to_owned(),
            })
    }
}

/// A Rust element type that has a [`DType`] and a plain little-endian byte layout.
///
/// Implemented for the numeric types whose in-memory form is their wire form on a
/// little-endian machine, which is what lets [`Tensor::view`] borrow instead of copy.
pub trait Element: bytemuck::Pod + fmt::Debug {
    /// The dtype that names this element type on the wire.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(impl Element for $t { const DTYPE: DType = DType::$d; })*
    };
}
element!(f32 => F32, f64 => F64, i8 => I8, i16 => I16, i32 => I32, i64 => I64,
         u8 => U8, u16 => U16, u32 => U32, u64 => U64);

#[cfg(not(target_endian = "little"))]
compile_error!("tidepool-protocol reinterprets little-endian tensor bytes in place and needs a little-endian target");

/// One tensor: a dtype, a shape and the elements as little-endian row-major bytes.
///
/// Invariant: `data.len() == shape.iter().product() * dtype.size()`, checked by every
/// constructor, so code holding a `Tensor` never re-checks it. The data is a [`Bytes`]
/// handle: cloning or forwarding a tensor never copies its elements.
#[derive(Clone, PartialEq, Eq)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Bytes,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

impl Tensor {
    /// Builds a tensor, checking that `data` holds exactly `product(shape)` elements.
    pub fn new(dtype: DType, shape: Vec<usize>, data: Bytes) -> Result<Self, Error> {
        let expected = expected_len(dtype, &shape);
        if expected != Some(data.len()) {
            return Err(Error::TensorLength {
                id: None,
                name: None,
                dtype,
                shape,
                expected,
                actual: data.len(),
            });
        }
        Ok(Tensor { dtype, shape, data })
    }

    /// Copies an ndarray view into a new tensor (the one copy needed to own the bytes).
    pub fn from_array<T: Element, D: ndarray::Dimension>(array: ArrayView<'_, T, D>) -> Self {
        let shape = array.shape().to_vec();
        let data = match array.as_slice() {
            Some(slice) => Bytes::copy_from_slice(bytemuck::cast_slice(slice)),
            None => {
                let owned: Vec<T> = array.iter().copied().collect();
                Bytes::from(bytemuck::allocation::cast_vec::<T, u8>(owned))
            }
        };
        Tensor {
            dtype: T::DTYPE,
            shape,
            data,
        }
    }

    /// Builds a tensor from owned elements without copying them again.
    pub fn from_vec<T: Element>(shape: Vec<usize>, values: Vec<T>) -> Result<Self, Error> {
        let data = match bytemuck::allocation::try_cast_vec::<T, u8>(values) {
            Ok(bytes) => Bytes::from(bytes),
            // Vec<T> with align > 1 cannot become Vec<u8> in place; copy once.
            Err((_, values)) => Bytes::copy_from_slice(bytemuck::cast_slice(&values)),
        };
        Tensor::new(T::DTYPE, shape, data)
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape, without any batch dimension.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw little-endian bytes.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Takes the tensor apart.
    pub fn into_parts(self) -> (DType, Vec<usize>, Bytes) {
        (self.dtype, self.shape, self.data)
    }

    /// Borrows the elements as an ndarray view when the bytes are suitably aligned.
    ///
    /// Bytes cut out of a read buffer may sit at any offset; use [`Tensor::to_array`]
    /// when a copy in that case is acceptable.
    pub fn view<T: Element>(&self) -> Result<ArrayViewD<'_, T>, Error> {
        self.check_dtype::<T>()?;
        let slice: &[T] = bytemuck::try_cast_slice(&self.data)
            .map_err(|_| Error::Misaligned { dtype: self.dtype })?;
        Ok(ArrayView::from_shape(IxDyn(&self.shape), slice)
            .expect("length checked at construction"))
    }

    /// The elements as an array: borrowed when aligned, copied once otherwise.
    pub fn to_array<T: Element>(&self) -> Result<CowArray<'_, T, IxDyn>, Error> {
        self.check_dtype::<T>()?;
        match bytemuck::try_cast_slice::<u8, T>(&self.data) {
            Ok(slice) => Ok(CowArray::from(
                ArrayView::from_shape(IxDyn(&self.shape), slice)
                    .expect("length checked at construction"),
            )),
            Err(_) => {
                let values: Vec<T> = bytemuck::pod_collect_to_vec(&self.data);
                Ok(CowArray::from(
                    ndarray::Array::from_shape_vec(IxDyn(&self.shape), values)
                        .expect("length checked at construction"),
                ))
            }
        }
    }

    /// The elements copied into a `Vec`, whatever the alignment.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, Error> {
        self.check_dtype::<T>()?;
        Ok(match bytemuck::try_cast_slice::<u8, T>(&self.data) {
            Ok(slice) => slice.to_vec(),
            Err(_) => bytemuck::pod_collect_to_vec(&self.data),
        })
    }

    fn check_dtype<T: Element>(&self) -> Result<(), Error> {
        if self.dtype == T::DTYPE {
            Ok(())
        } else {
            Err(Error::DTypeMismatch {
                expected: T::DTYPE,
                actual: self.dtype,
            })
        }
    }
}

/// `product(shape) * dtype.size()`, or `None` when that overflows.
pub(crate) fn expected_len(dtype: DType, shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &dim| acc.checked_mul(dim))
}

/// The tensor as MessagePack writes it: a map with `dtype`, `shape` and `data` (bin).
impl Serialize for Tensor {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a> {
            dtype: DType,
            shape: &'a [usize],
            #[serde(with = "serde_bytes")]
            data: &'a [u8],
        }
        Wire {
            dtype: self.dtype,
            shape: &self.shape,
            data: &self.data,
        }
        .serialize(serializer)
    }
}

/// A tensor as decoded, its bytes still borrowed from the frame.
#[derive(Deserialize)]
pub(crate) struct WireTensor<'a> {
    #[serde(borrow)]
    pub(crate) dtype: Cow<'a, str>,
    pub(crate) shape: Vec<u64>,
    #[serde(borrow, with = "serde_bytes")]
    pub(crate) data: Cow<'a, [u8]>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_length() {
        assert!(Tensor::new(DType::F32, vec![2, 3], Bytes::from(vec![0u8; 24])).is_ok());
        let err = Tensor::new(DType::F32, vec![2, 3], Bytes::from(vec![0u8; 23])).unwrap_err();
        assert!(matches!(
            err,
            Error::TensorLength {
                actual: 23,
                expected: Some(24),
                ..
            }
        ));
        let overflow = Tensor::new(DType::F64, vec![usize::MAX, 2], Bytes::new()).unwrap_err();
        assert!(matches!(
            overflow,
            Error::TensorLength { expected: None, .. }
        ));
    }

    #[test]
    fn array_round_trip_and_unaligned_view() {
        let a = ndarray::arr2(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        let t = Tensor::from_array(a.view());
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(
            t.to_array::<f32>()
                .unwrap()
                .into_dimensionality::<ndarray::Ix2>()
                .unwrap(),
            a
        );
        // An odd offset into a buffer: the view refuses, the copy works.
        let mut buf = vec![0u8];
        buf.extend_from_slice(t.data());
        let shifted = Bytes::from(buf).slice(1..);
        let u = Tensor::new(DType::F32, vec![2, 3], shifted).unwrap();
        if u.view::<f32>().is_ok() {
            // the allocator happened to align it; nothing more to check
        }
        assert_eq!(
            u.to_vec::<f32>().unwrap(),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        assert!(matches!(
            u.to_vec::<i32>(),
            Err(Error::DTypeMismatch { .. })
        ));
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.as_str().parse::<DType>().unwrap(), d);
        }
        assert!("complex64".parse::<DType>().is_err());
    }
}

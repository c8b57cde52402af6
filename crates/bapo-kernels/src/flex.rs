//! Recognising Flex tensors by type, and reading and making their `f32` buffers.

use std::any::Any;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use burn_flex::FlexTensor;

/// `T` as `U` when they are the same type, else `T` back.
pub(crate) fn cast<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    let mut slot = Some(t);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        Some(u) => Ok(u.take().expect("just filled")),
        None => Err(slot.expect("not taken")),
    }
}

/// `t` as `U`, for two types the caller knows are the same (a tensor of the backend it has
/// just recognised, converted back).
pub(crate) fn same<T: 'static, U: 'static>(t: T) -> U {
    cast(t).unwrap_or_else(|_| unreachable!("one backend, two names"))
}

/// Runs `f` on the `f32` elements of `t` in row-major order (a strided view is made
/// contiguous first).
pub(crate) fn with_f32<R>(t: &FlexTensor, f: impl FnOnce(&[f32]) -> R) -> R {
    match t.as_slice::<f32>() {
        Some(x) => f(x),
        None => f(t.to_contiguous().as_slice::<f32>().expect("contiguous f32")),
    }
}

/// A contiguous `f32` Flex tensor of `shape` owning `data`.
pub(crate) fn tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// An int tensor's values as `i64` (any int dtype).
pub(crate) fn ints(t: Tensor<Flex, 1, Int>) -> Vec<i64> {
    t.into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("i64 after convert")
}

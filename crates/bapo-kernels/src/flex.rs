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

#[cfg(test)]
mod tests {
    use super::*;

    /// The vendored burn-flex's strided copy (patch 4: rank >= 3 views copied by blocks of the
    /// last two dims, on rayon's threads from 64 K elements) gives the elements of the view in
    /// row-major order, computed here from the permutation by index arithmetic: permuted views
    /// (contiguous last dim and not, below and above 64 K elements) and a narrowed one.
    #[test]
    fn strided_views_copy_to_their_elements_in_order() {
        let cases: [([usize; 4], [usize; 4]); 4] = [
            ([2, 5, 3, 4], [0, 2, 1, 3]),
            ([3, 4, 5, 6], [0, 2, 3, 1]),
            ([4, 40, 9, 64], [0, 2, 1, 3]),
            ([2, 3, 80, 140], [1, 0, 3, 2]),
        ];
        for (shape, perm) in cases {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let t = Tensor::<Flex, 4>::from_data(
                TensorData::new(data, shape.to_vec()),
                &Default::default(),
            );
            let strides = [
                shape[1] * shape[2] * shape[3],
                shape[2] * shape[3],
                shape[3],
                1,
            ];
            let pshape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
            // Element `idx` (row-major over `pshape`, from `start` in dim 1) of the permuted view.
            let expect = |dims: [usize; 4], start: usize| -> Vec<f32> {
                let mut v = Vec::new();
                for a in 0..dims[0] {
                    for b in 0..dims[1] {
                        for c in 0..dims[2] {
                            for d in 0..dims[3] {
                                let ix = [a, b + start, c, d];
                                let off: usize = (0..4).map(|j| ix[j] * strides[perm[j]]).sum();
                                v.push(off as f32);
                            }
                        }
                    }
                }
                v
            };
            let p = t.permute(perm.map(|x| x as isize));
            let full: Vec<f32> = p.clone().into_data().into_vec().expect("f32");
            let dims = [pshape[0], pshape[1], pshape[2], pshape[3]];
            assert_eq!(full, expect(dims, 0), "shape {shape:?} perm {perm:?}");
            let narrowed: Vec<f32> = p.narrow(1, 1, 1).into_data().into_vec().expect("f32");
            let dims = [pshape[0], 1, pshape[2], pshape[3]];
            assert_eq!(
                narrowed,
                expect(dims, 1),
                "narrowed: shape {shape:?} perm {perm:?}"
            );
        }
    }

    /// The layouts patch 4 must leave to upstream's element walk or handle with zero strides:
    /// a rank-9 view (above burn-flex's collapse rank: the patch once took it with an empty
    /// block and panicked) and a broadcast view (stride 0) above 64 K elements.
    #[test]
    fn rank_9_and_broadcast_views_copy_to_their_elements() {
        let d = Default::default();
        let data: Vec<f32> = (0..512).map(|i| i as f32).collect();
        let t = Tensor::<Flex, 9>::from_data(TensorData::new(data, vec![2; 9]), &d);
        let got: Vec<f32> = t.swap_dims(0, 1).into_data().into_vec().expect("f32");
        // Swapping the two leading dims swaps the two leading bits of the row-major index.
        let want: Vec<f32> = (0..512usize)
            .map(|i| ((i & 0x7f) | ((i >> 8) & 1) << 7 | ((i >> 7) & 1) << 8) as f32)
            .collect();
        assert_eq!(got, want);

        let data: Vec<f32> = (0..4 * 300).map(|i| i as f32).collect();
        let t = Tensor::<Flex, 3>::from_data(TensorData::new(data, vec![4, 1, 300]), &d);
        let got: Vec<f32> = t.expand([4, 70, 300]).into_data().into_vec().expect("f32");
        let want: Vec<f32> = (0..4 * 70 * 300usize)
            .map(|i| ((i / (70 * 300)) * 300 + i % 300) as f32)
            .collect();
        assert_eq!(got, want);
    }

    /// The vendored gemm-common (patch: a strided lhs block is packed on every thread, not
    /// only the calling one) gives a linear layer's input gradient `dy · wᵀ` the same bits as
    /// the same product with `wᵀ` stored contiguously (no packing of that kind), and both
    /// match an f64 product within float rounding.
    #[test]
    fn transposed_weight_products_match_the_contiguous_ones_bit_for_bit() {
        use burn::tensor::Distribution;
        let d = Default::default();
        // 576 rows: SmolLM2's q/o projections (9 full 64-row panels on AVX-512); 112 rows: a
        // short last panel on AVX-512 (64 + 48) and prepacked on AVX2 too, with as many dy rows
        // as keep the product as large (so as parallel).
        for (rows, n) in [(576, 300), (112, 1536)] {
            let dy = Tensor::<Flex, 2>::random([n, 1536], Distribution::Default, &d);
            let w = Tensor::<Flex, 2>::random([rows, 1536], Distribution::Default, &d);
            let wt = Tensor::<Flex, 2>::from_data(w.clone().transpose().into_data(), &d);
            let strided: Vec<f32> = dy
                .clone()
                .matmul(w.clone().transpose())
                .into_data()
                .into_vec()
                .expect("f32");
            let contiguous: Vec<f32> = dy.clone().matmul(wt).into_data().into_vec().expect("f32");
            assert_eq!(strided, contiguous, "{rows} rows");
            let a: Vec<f32> = dy.into_data().into_vec().expect("f32");
            let b: Vec<f32> = w.into_data().into_vec().expect("f32");
            for (i, j) in [(0, 0), (17, rows / 2), (299, rows - 1), (150, 48)] {
                let want: f64 = (0..1536)
                    .map(|k| a[i * 1536 + k] as f64 * b[j * 1536 + k] as f64)
                    .sum();
                let got = strided[i * rows + j] as f64;
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{rows} rows ({i}, {j}): {got} vs {want}"
                );
            }
        }
    }
}

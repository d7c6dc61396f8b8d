//! Copying a row-major block of elements into a block of another shape: how an item is padded
//! into a batch and how its answer is sliced back out.
//!
//! Both directions are one operation: copy the region the two shapes have in common (the
//! smaller length along each axis), one contiguous run of the last axis at a time. Padding an
//! item copies it into a larger block already filled with the pad value; slicing an answer
//! copies the item's own lengths out of the padded block.

/// Copies the region `src` and `dst` have in common (per axis, the smaller length) from `src`
/// (row-major, shape `src_shape`) into `dst` (row-major, shape `dst_shape`); elements are
/// `elem` bytes. Elements of `dst` outside that region are left as they are. The shapes must
/// have the same rank and the slices the sizes their shapes say.
pub(crate) fn copy_block(
    src: &[u8],
    src_shape: &[usize],
    dst: &mut [u8],
    dst_shape: &[usize],
    elem: usize,
) {
    debug_assert_eq!(src_shape.len(), dst_shape.len());
    if src_shape == dst_shape {
        dst[..src.len()].copy_from_slice(src);
        return;
    }
    let rank = src_shape.len();
    let common: Vec<usize> = src_shape
        .iter()
        .zip(dst_shape)
        .map(|(&a, &b)| a.min(b))
        .collect();
    if common.contains(&0) {
        return;
    }
    let strides = |shape: &[usize]| {
        let mut strides = vec![0; rank];
        let mut acc = elem;
        for axis in (0..rank).rev() {
            strides[axis] = acc;
            acc *= shape[axis];
        }
        strides
    };
    let (src_strides, dst_strides) = (strides(src_shape), strides(dst_shape));
    let run = common[rank - 1] * elem;
    // The index over every axis but the last, which is copied as one run.
    let mut index = vec![0usize; rank - 1];
    loop {
        let offset =
            |strides: &[usize]| -> usize { index.iter().zip(strides).map(|(i, s)| i * s).sum() };
        let (from, to) = (offset(&src_strides), offset(&dst_strides));
        dst[to..to + run].copy_from_slice(&src[from..from + run]);
        let mut axis = rank - 1;
        loop {
            if axis == 0 {
                return;
            }
            axis -= 1;
            index[axis] += 1;
            if index[axis] < common[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
}

/// Fills `dst` with copies of one element's bytes.
pub(crate) fn fill(dst: &mut [u8], element: &[u8]) {
    if element.iter().all(|&b| b == 0) {
        dst.fill(0);
        return;
    }
    for chunk in dst.chunks_exact_mut(element.len()) {
        chunk.copy_from_slice(element);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(values: &[u8]) -> Vec<u8> {
        values.to_vec()
    }

    #[test]
    fn pads_a_matrix_into_a_larger_one_and_slices_it_back() {
        // [[1, 2], [3, 4]] into a 3 x 4 block of 9s.
        let item = bytes(&[1, 2, 3, 4]);
        let mut block = vec![9u8; 12];
        copy_block(&item, &[2, 2], &mut block, &[3, 4], 1);
        assert_eq!(block, vec![1, 2, 9, 9, 3, 4, 9, 9, 9, 9, 9, 9]);
        let mut back = vec![0u8; 4];
        copy_block(&block, &[3, 4], &mut back, &[2, 2], 1);
        assert_eq!(back, item);
    }

    #[test]
    fn multi_byte_elements_move_whole() {
        let item: Vec<u8> = [1u16, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut block = vec![0u8; 10];
        fill(&mut block, &7u16.to_le_bytes());
        copy_block(&item, &[3], &mut block, &[5], 2);
        let values: Vec<u16> = block
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(values, vec![1, 2, 3, 7, 7]);
    }

    #[test]
    fn three_axes_and_scalars_and_empty_items() {
        // 2 x 1 x 2 into 2 x 2 x 3.
        let item = bytes(&[1, 2, 3, 4]);
        let mut block = vec![0u8; 12];
        copy_block(&item, &[2, 1, 2], &mut block, &[2, 2, 3], 1);
        assert_eq!(block, vec![1, 2, 0, 0, 0, 0, 3, 4, 0, 0, 0, 0]);
        let mut scalar = vec![0u8; 1];
        copy_block(&[5], &[], &mut scalar, &[], 1);
        assert_eq!(scalar, vec![5]);
        let mut untouched = vec![8u8; 3];
        copy_block(&[], &[0], &mut untouched, &[3], 1);
        assert_eq!(untouched, vec![8, 8, 8]);
    }
}

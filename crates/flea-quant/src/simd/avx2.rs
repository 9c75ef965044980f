//! AVX2 + FMA + F16C kernels.

use crate::{DotFn, GgmlType};

pub(crate) fn kernel(_weight: GgmlType) -> Option<DotFn> {
    None
}

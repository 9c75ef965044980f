//! AVX-512 (F/BW/VL/VNNI) kernels for the hottest types.

use crate::{DotFn, GgmlType};

pub(crate) fn kernel(_weight: GgmlType) -> Option<DotFn> {
    None
}

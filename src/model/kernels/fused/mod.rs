//! The fused CPU kernels: each op of the seam as one candle custom op (`CustomOp1/2/3`) over f32
//! slices, with a `bwd` that computes its input gradients in one pass instead of the half-dozen
//! elementwise ops, reductions and copies autograd records for the composed reference.
//!
//! Matrix products go to AMX tiles where the CPU has them (`amx`, f32-like through three bf16
//! products), else to the `gemm` crate (the one candle's matmul uses), with strides that read
//! transposed operands in place. Elementwise loops are plain Rust, compiled three times
//! ([`multiversion!`]: AVX-512, AVX2+FMA, portable) and picked at run time from the CPU's features,
//! so the compiler vectorises them for the widest registers the machine has. Work is spread
//! over rayon's threads: rows for LayerNorm, chunks for GELU and dropout, batch x heads for
//! attention.
//!
//! Every kernel takes contiguous f32 CPU tensors; the seam routes anything else to the reference.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
pub(super) mod amx_packed;
mod attention;
mod bert_layer;
mod dropout;
mod gelu;
mod layer_norm;
mod linear;
mod linear_gelu;
mod math;
#[cfg(test)]
mod tests;

pub(super) use attention::attention;
pub(super) use bert_layer::bert_layer;
pub(super) use dropout::dropout;
pub(crate) use gelu::in_place as gelu_in_place;
pub(super) use layer_norm::layer_norm;
pub(super) use linear::linear;
pub(super) use linear_gelu::linear_gelu;
pub(crate) use math::{exp, max};

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout, Result, Storage, StorageRef, Tensor, bail};
use rayon::prelude::*;

/// Elements per rayon task in elementwise kernels: large enough that scheduling costs nothing,
/// small enough that 2-16 threads all get work on a `[4096, 384]` activation.
pub(super) const CHUNK: usize = 1 << 14;

/// Compiles a function body for AVX-512, for AVX2+FMA and portably, and calls the best one the
/// CPU supports. The body must be safe code; `#[inline(always)]` helpers it calls are compiled
/// into each version, so their loops vectorise at that version's width.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? { portable($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? { portable($($arg),*) }
                if $crate::model::kernels::has_avx512() {
                    // SAFETY: the CPU supports every feature `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports every feature `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Whether products may run on AMX tiles: the CPU has them and `RAGD_MATMUL` does not opt out.
#[cfg(target_arch = "x86_64")]
pub(super) fn amx_available() -> bool {
    MatmulEngine::selected() == MatmulEngine::Bf16x3
}

/// Whether the CPU has the AVX-512 subsets the kernels are compiled for.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
}

/// `len` f32 computed in parallel chunks of `chunk` elements by `fill(chunk_index, chunk)`,
/// into a buffer that is not zeroed first (for outputs of tens of MB, a pass through memory).
///
/// # Safety
/// `fill` must write every element of each chunk it is given.
unsafe fn filled(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, c)| fill(i, c));
    // SAFETY: the chunks cover `len` elements, each written by `fill`, by the caller.
    unsafe { out.set_len(len) };
    out
}

/// The f32 elements a custom op's input covers, which must be contiguous.
fn input<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("the fused `{op}` kernel takes contiguous inputs"),
    }
}

/// Read access to a contiguous f32 CPU tensor's elements (for `bwd`, which gets tensors).
pub(super) struct Read<'a> {
    storage: StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> Read<'a> {
    pub(super) fn new(tensor: &'a Tensor) -> Self {
        let (storage, layout) = tensor.storage_and_layout();
        Self { storage, layout }
    }

    pub(super) fn slice(&self, op: &str) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(cpu) => input(cpu, self.layout, op),
            _ => bail!("the fused `{op}` kernel runs on the CPU only"),
        }
    }
}

/// A raw pointer that rayon tasks share to write disjoint parts of one output buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);

impl SharedMut {
    /// The pointer (a method, so closures capture the `Send` wrapper rather than its field).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: every user writes only elements no other task touches, and the buffer outlives the
// parallel section.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

/// A strided matrix operand for [`matmul`]: element `(r, c)` is at `ptr + r * rows + c * cols`.
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    rows: isize,
    cols: isize,
}

// SAFETY: an operand is only read, and [`matmul`]'s caller keeps it alive and unwritten.
unsafe impl Send for Operand {}
// SAFETY: as above.
unsafe impl Sync for Operand {}

/// Which engine multiplies f32 matrices on the CPU, from `RAGD_MATMUL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MatmulEngine {
    /// The `gemm` crate, f32 throughout (AVX-512 or AVX2 FMA).
    F32,
    /// AMX tiles (where the CPU has them): three bf16 products per f32 product, f32-like.
    Bf16x3,
}

impl MatmulEngine {
    /// The engine in use: AMX where the CPU has it, unless `RAGD_MATMUL=f32`.
    pub(crate) fn selected() -> Self {
        static SELECTED: std::sync::OnceLock<MatmulEngine> = std::sync::OnceLock::new();
        *SELECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if amx::available() {
                return match std::env::var("RAGD_MATMUL").as_deref() {
                    Ok("f32") => Self::F32,
                    _ => Self::Bf16x3,
                };
            }
            Self::F32
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32 (gemm crate)",
            Self::Bf16x3 => "AMX bf16x3",
        }
    }
}

/// Products smaller than this on any side stay on the `gemm` crate: packing for AMX would cost
/// more than it saves (the per-head attention products are 32 wide).
const AMX_MIN_SIDE: usize = 64;

/// `dst = bias + scale * lhs · rhs` for `lhs` `[m, k]` and `rhs` `[k, n]`, strides as given (a
/// transposed operand is a stride swap, read in place); `bias` (`[n]`, added to every row) is a
/// linear layer's, zeros without. `dst` is only written.
///
/// # Safety
/// Every pointer must be valid for the elements its strides and sizes reach, and `dst` must not
/// overlap the operands or be written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    shape: (usize, usize, usize),
    dst: *mut f32,
    dst_strides: (isize, isize),
    bias: Option<&[f32]>,
    lhs: Operand,
    rhs: Operand,
    scale: f32,
    parallel: bool,
) {
    let product = Product {
        shape,
        dst,
        dst_strides,
        bias,
        lhs,
        rhs,
        scale,
        parallel,
    };
    // SAFETY: forwarded from the caller.
    unsafe { matmul_then(product, Epilogue::None) };
}

/// The arguments of [`matmul`].
struct Product<'a> {
    shape: (usize, usize, usize),
    dst: *mut f32,
    dst_strides: (isize, isize),
    bias: Option<&'a [f32]>,
    lhs: Operand,
    rhs: Operand,
    scale: f32,
    parallel: bool,
}

/// What a product does to each finished block of its output, while the block is in cache.
#[derive(Clone, Copy)]
enum Epilogue {
    None,
    /// GELU of the output, in place.
    Gelu,
    /// GELU of the output into this buffer, laid out as the output, which keeps the product.
    GeluInto(SharedMut),
}

impl Epilogue {
    /// Applies to rows `i..i + rows` and columns `j..j + cols` of `dst`, whose rows are
    /// `row_stride` apart and columns contiguous.
    ///
    /// # Safety
    /// The block must be within `dst` (and the `GeluInto` buffer), already written, and written
    /// by no one else meanwhile.
    unsafe fn finish(
        self,
        dst: *mut f32,
        row_stride: usize,
        (i, j): (usize, usize),
        (rows, cols): (usize, usize),
    ) {
        /// Rows per call of a multiversioned kernel.
        const GROUP: usize = 32;
        for first in (i..i + rows).step_by(GROUP) {
            let count = GROUP.min(i + rows - first);
            let at = |r: usize| (first + r) * row_stride + j;
            match self {
                Self::None => return,
                Self::Gelu => {
                    let mut rows: [&mut [f32]; GROUP] = std::array::from_fn(|r| {
                        if r < count {
                            // SAFETY: row `first + r` of the block, by the caller.
                            unsafe { std::slice::from_raw_parts_mut(dst.add(at(r)), cols) }
                        } else {
                            Default::default()
                        }
                    });
                    gelu::rows_in_place(&mut rows[..count]);
                }
                Self::GeluInto(out) => {
                    let rows: [&[f32]; GROUP] = std::array::from_fn(|r| {
                        if r < count {
                            // SAFETY: row `first + r` of the block, by the caller.
                            unsafe { std::slice::from_raw_parts(dst.add(at(r)), cols) }
                        } else {
                            Default::default()
                        }
                    });
                    let mut outs: [&mut [MaybeUninit<f32>]; GROUP] = std::array::from_fn(|r| {
                        if r < count {
                            // SAFETY: as above, in the output buffer.
                            unsafe {
                                std::slice::from_raw_parts_mut(out.ptr().add(at(r)).cast(), cols)
                            }
                        } else {
                            Default::default()
                        }
                    });
                    gelu::rows_into(&rows[..count], &mut outs[..count]);
                }
            }
        }
    }
}

/// [`matmul`], then `epilogue` on every block of the output; an epilogue needs `dst`'s columns
/// contiguous.
///
/// # Safety
/// As [`matmul`]; and the `GeluInto` buffer of `epilogue` must be valid for `dst`'s elements.
unsafe fn matmul_then(product: Product, epilogue: Epilogue) {
    let Product {
        shape: (m, n, k),
        dst,
        dst_strides: (dst_rows, dst_cols),
        bias,
        lhs,
        rhs,
        scale,
        parallel,
    } = product;
    #[cfg(target_arch = "x86_64")]
    if m.min(n).min(k) >= AMX_MIN_SIDE && MatmulEngine::selected() == MatmulEngine::Bf16x3 {
        // SAFETY: forwarded from the caller; `selected` chose AMX only where available.
        unsafe {
            amx::matmul(
                (m, n, k),
                dst,
                (dst_rows, dst_cols),
                bias,
                lhs,
                rhs,
                scale,
                parallel,
                epilogue,
            );
        }
        return;
    }
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(candle_core::utils::get_num_threads())
    } else {
        gemm::Parallelism::None
    };
    if let Some(bias) = bias {
        // The product adds onto the bias. Rows in parallel: one thread writing a [4096, 1536]
        // output (25 MB) left the other cores idle.
        let out = SharedMut(dst);
        let fill = |i: usize| {
            // SAFETY: row `i` is within `dst`, by the caller, and only this task writes it.
            let row = unsafe { out.ptr().offset(i as isize * dst_rows) };
            if dst_cols == 1 {
                // SAFETY: as above; the row's `n` elements are contiguous.
                unsafe { std::slice::from_raw_parts_mut(row, n) }.copy_from_slice(&bias[..n]);
            } else {
                for (j, &b) in bias[..n].iter().enumerate() {
                    // SAFETY: as above.
                    unsafe { *row.offset(j as isize * dst_cols) = b };
                }
            }
        };
        if parallel {
            (0..m).into_par_iter().with_min_len(64).for_each(fill);
        } else {
            (0..m).for_each(fill);
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cols,
            dst_rows,
            bias.is_some(),
            lhs.ptr,
            lhs.cols,
            lhs.rows,
            rhs.ptr,
            rhs.cols,
            rhs.rows,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    if !matches!(epilogue, Epilogue::None) {
        let dst = SharedMut(dst);
        let finish = |group: usize| {
            let rows = 32.min(m - 32 * group);
            // SAFETY: the product wrote every row; each group is its own 32 rows.
            unsafe { epilogue.finish(dst.ptr(), dst_rows as usize, (32 * group, 0), (rows, n)) };
        };
        if parallel {
            (0..m.div_ceil(32)).into_par_iter().for_each(finish);
        } else {
            (0..m.div_ceil(32)).for_each(finish);
        }
    }
}

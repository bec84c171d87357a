//! mimalloc as the global allocator: per-request allocations are small and short-lived, and
//! a short request costs 12% fewer instructions with it than with glibc's malloc.
//!
//! The `mimalloc` crate's allocator asks for every block through `mi_malloc_aligned`, which
//! checks the alignment on each call (about 55 instructions, 8 times per keep-alive request);
//! nearly all of ours need no more than mimalloc's blocks have anyway, so they take
//! `mi_malloc`, as the standard library's System allocator takes `malloc`.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The global allocator (`#[global_allocator]` in the binary).
pub struct Mimalloc;

/// True when a plain allocation of this layout is aligned enough: mimalloc's blocks are all
/// 8-aligned, and those of a multiple of 16 bytes 16-aligned (each page starts 16-aligned).
fn plain(align: usize, size: usize) -> bool {
    align <= 8 || (align <= 16 && size.is_multiple_of(16))
}

// SAFETY: mimalloc returns blocks of at least the requested size and alignment (plain ones
// only for layouts `plain` accepts), or null; `mi_free` takes blocks of either kind.
unsafe impl GlobalAlloc for Mimalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= 8 {
            mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_has_its_layout_alignment() {
        let a = Mimalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 128] {
            for size in (align..=1024).step_by(align) {
                let layout = Layout::from_size_align(size, align).unwrap();
                // A few at once, so they do not all come from the same freed slot.
                let blocks: Vec<*mut u8> = (0..4).map(|_| unsafe { a.alloc(layout) }).collect();
                for &p in &blocks {
                    assert!(
                        !p.is_null() && (p as usize).is_multiple_of(align),
                        "{size}/{align}"
                    );
                }
                let grown = unsafe { a.realloc(blocks[0], layout, size + align) };
                assert!(
                    (grown as usize).is_multiple_of(align),
                    "realloc {size}/{align}"
                );
                unsafe { a.dealloc(grown, Layout::from_size_align(size + align, align).unwrap()) };
                for &p in &blocks[1..] {
                    unsafe { a.dealloc(p, layout) };
                }
            }
        }
    }
}

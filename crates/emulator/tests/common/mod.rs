//! Helpers shared by the emulator's integration tests.

#![allow(dead_code)]

use std::alloc::{alloc_zeroed, dealloc, Layout};

/// A host buffer aligned to 256 bytes, as `cudaMalloc` aligns device memory: wmma
/// loads and stores need 32-byte aligned pointers, which a `Vec<u16>` does not
/// guarantee.
pub struct DevBuf<T: Copy> {
    ptr: *mut T,
    len: usize,
    layout: Layout,
}

impl<T: Copy> DevBuf<T> {
    /// A copy of `data` in 256-byte aligned memory.
    pub fn from_slice(data: &[T]) -> Self {
        let bytes = std::mem::size_of_val(data).max(1);
        let layout = Layout::from_size_align(bytes, 256).expect("layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) } as *mut T;
        assert!(!ptr.is_null(), "allocation failed");
        // SAFETY: fresh allocation of at least data.len() elements.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len()) };
        DevBuf {
            ptr,
            len: data.len(),
            layout,
        }
    }

    /// `len` copies of `value`.
    pub fn filled(value: T, len: usize) -> Self {
        Self::from_slice(&vec![value; len])
    }

    pub fn as_ptr(&self) -> *const T {
        self.ptr
    }

    pub fn as_mut_ptr(&mut self) -> *mut T {
        self.ptr
    }

    pub fn to_vec(&self) -> Vec<T> {
        // SAFETY: len initialised elements.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec()
    }
}

impl<T: Copy> Drop for DevBuf<T> {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { dealloc(self.ptr as *mut u8, self.layout) }
    }
}

//! The kernels' temporary buffers, reused across calls: each thread keeps the buffers its
//! calls returned and hands them out again, so a decode step's kernels allocate nothing
//! once the first steps have sized them.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Buffers larger than this are freed when done rather than kept: one long prompt's
/// temporaries should not stay resident on every thread.
const KEEP_BYTES: usize = 64 << 20;

/// An element type with a per-thread pool of buffers.
pub(crate) trait Pooled: Copy + Default + 'static {
    /// Runs `f` on this thread's pool of this type (`None` on a thread being torn down,
    /// whose pool is gone).
    fn with_pool<R>(f: impl FnOnce(&RefCell<Vec<Vec<Self>>>) -> R) -> Option<R>;
}

macro_rules! pooled {
    ($($t:ty),*) => {$(
        impl Pooled for $t {
            fn with_pool<R>(f: impl FnOnce(&RefCell<Vec<Vec<Self>>>) -> R) -> Option<R> {
                thread_local! {
                    static POOL: RefCell<Vec<Vec<$t>>> = const { RefCell::new(Vec::new()) };
                }
                POOL.try_with(f).ok()
            }
        }
    )*};
}
pooled!(f32, u8, i8, i32, usize);

/// A buffer of `len` elements taken from this thread's pool (or allocated when the pool
/// has none), returned to the pool of the thread that drops it. Taking and returning hold
/// the pool only for a push or a pop, so a kernel that runs another kernel's work while
/// it waits (rayon's work stealing) simply takes another buffer.
pub(crate) struct Scratch<T: Pooled> {
    buf: Vec<T>,
}

impl<T: Pooled> Scratch<T> {
    /// `len` elements, each `value`.
    pub(crate) fn filled(len: usize, value: T) -> Self {
        let mut scratch = Self::taken();
        scratch.buf.clear();
        scratch.buf.resize(len, value);
        scratch
    }

    /// `len` elements whose values are whatever an earlier call left (zeros where the
    /// buffer grew): for a buffer the caller writes in full before reading, without
    /// clearing it first.
    pub(crate) fn overwritten(len: usize) -> Self {
        let mut scratch = Self::taken();
        scratch.buf.resize(len, T::default());
        scratch
    }

    /// A buffer from this thread's pool, or a new empty one.
    fn taken() -> Self {
        let buf = T::with_pool(|pool| pool.try_borrow_mut().ok()?.pop())
            .flatten()
            .unwrap_or_default();
        Scratch { buf }
    }

    /// `len` elements, each the type's zero.
    pub(crate) fn zeroed(len: usize) -> Self {
        Self::filled(len, T::default())
    }
}

impl<T: Pooled> Deref for Scratch<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.buf
    }
}

impl<T: Pooled> DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf
    }
}

impl<T: Pooled> Drop for Scratch<T> {
    fn drop(&mut self) {
        if self.buf.capacity() * std::mem::size_of::<T>() <= KEEP_BYTES {
            let buf = std::mem::take(&mut self.buf);
            T::with_pool(|pool| {
                if let Ok(mut pool) = pool.try_borrow_mut() {
                    pool.push(buf);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returned_buffer_is_handed_out_again_and_refilled() {
        let first = {
            let mut a = Scratch::<f32>::zeroed(100);
            a[5] = 3.0;
            a.buf.as_ptr()
        };
        let b = Scratch::<f32>::filled(50, 1.0);
        assert_eq!(b.buf.as_ptr(), first, "the pool's buffer was not reused");
        assert!(b.iter().all(|&x| x == 1.0));
        // Two at once: the second is another buffer.
        let c = Scratch::<f32>::zeroed(10);
        assert_ne!(c.buf.as_ptr(), b.buf.as_ptr());
        assert!(c.iter().all(|&x| x == 0.0));
    }
}

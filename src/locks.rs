//! One answer to a poisoned lock, used by every `std::sync` lock in the relay.
//!
//! A `Mutex` or `RwLock` is poisoned when a thread panicked while holding it. The relay keeps
//! going after such a panic (a session or delivery task that panics is one task, not the
//! process), and every structure guarded by these locks is a cache, a counter or a schedule
//! whose every update is one statement under the lock: the data a panicking holder left is as
//! usable as before. So a poisoned lock is taken as if it were not, in one place, instead of
//! each call site spelling out `unwrap_or_else(|e| e.into_inner())`.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// [`Mutex::lock`] that takes a poisoned lock as it is (see the module docs).
pub trait MutexExt<T: ?Sized> {
    /// Locks, ignoring poisoning.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> MutexExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// [`RwLock::read`] and [`RwLock::write`] that take a poisoned lock as it is (see the module
/// docs).
pub trait RwLockExt<T: ?Sized> {
    /// Locks for reading, ignoring poisoning.
    fn read_locked(&self) -> RwLockReadGuard<'_, T>;
    /// Locks for writing, ignoring poisoning.
    fn write_locked(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_locked(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_taken_as_it_is() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let l = std::sync::Arc::new(RwLock::new(2));
        let (m2, l2) = (m.clone(), l.clone());
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            let _w = l2.write().unwrap();
            panic!("poison both");
        })
        .join();
        assert!(m.is_poisoned() && l.is_poisoned());
        *m.locked() += 1;
        *l.write_locked() += 1;
        assert_eq!((*m.locked(), *l.read_locked()), (2, 3));
    }
}

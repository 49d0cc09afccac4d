//! Caller-owned byte storage: the ring buffers behind every connection.
//!
//! A connection's memory is lent by the application as two buffers of any type that derefs to a
//! byte slice (`[u8; 2048]` in firmware, `&'static mut [u8]`, a `Box<[u8]>` or `Vec<u8>` in a
//! daemon). `core` never allocates: it only moves bytes within what it was given, and hands
//! the buffers back when the connection is released so they can be recycled.

/// The two buffers of one connection: `rx` holds bytes received from the peer that the
/// application has not read yet (its free space is the window we advertise); `tx` holds bytes the
/// application wrote that the peer's window has not admitted yet.
#[derive(Debug)]
pub struct Buffers<B> {
    /// Receive storage; its length bounds the advertised window.
    pub rx: B,
    /// Transmit storage; its length bounds how much `send` accepts before the peer acks.
    pub tx: B,
}

impl<B> Buffers<B> {
    /// Pairs a receive and a transmit buffer.
    pub const fn new(rx: B, tx: B) -> Self {
        Buffers { rx, tx }
    }
}

/// A FIFO of bytes over caller storage.
///
/// `enqueue_slice`/`dequeue_slice` copy; the zero-copy pair `get_allocated` /
/// `dequeue_allocated` lets a reader (e.g. `poll_transmit`) look at queued bytes in place, and
/// `get_unallocated` / `enqueue_unallocated` lets a writer fill free space in place.
#[derive(Debug)]
pub struct RingBuffer<B> {
    storage: B,
    read_at: usize,
    length: usize,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> RingBuffer<B> {
    /// An empty ring over `storage`; its capacity is `storage.as_ref().len()`.
    pub fn new(storage: B) -> Self {
        RingBuffer {
            storage,
            read_at: 0,
            length: 0,
        }
    }

    /// Gives the storage back (its contents are unspecified).
    pub fn into_inner(self) -> B {
        self.storage
    }

    /// Total bytes the ring can hold.
    pub fn capacity(&self) -> usize {
        self.storage.as_ref().len()
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.length
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// No free space.
    pub fn is_full(&self) -> bool {
        self.length == self.capacity()
    }

    /// Free space in bytes.
    pub fn window(&self) -> usize {
        self.capacity() - self.length
    }

    /// Drops everything queued.
    pub fn clear(&mut self) {
        self.read_at = 0;
        self.length = 0;
    }

    /// The longest contiguous run of queued bytes starting `offset` bytes after the read
    /// position, at most `size` long (shorter at the wrap point: call again for the rest).
    pub fn get_allocated(&self, offset: usize, size: usize) -> &[u8] {
        let cap = self.capacity();
        if offset >= self.length || cap == 0 {
            return &[];
        }
        let start = (self.read_at + offset) % cap;
        let avail = self.length - offset;
        let until_wrap = cap - start;
        let n = size.min(avail).min(until_wrap);
        &self.storage.as_ref()[start..start + n]
    }

    /// Removes up to `size` bytes from the front without copying them; returns how many.
    pub fn dequeue_allocated(&mut self, size: usize) -> usize {
        let n = size.min(self.length);
        let cap = self.capacity();
        if n > 0 {
            self.read_at = (self.read_at + n) % cap;
            self.length -= n;
        }
        if self.length == 0 {
            // Keeps the next writes contiguous.
            self.read_at = 0;
        }
        n
    }

    /// The longest contiguous run of free space at the write position, at most `size` long.
    pub fn get_unallocated(&mut self, size: usize) -> &mut [u8] {
        let cap = self.capacity();
        if self.length == cap {
            return &mut [];
        }
        let write_at = (self.read_at + self.length) % cap;
        let until_wrap = cap - write_at;
        let n = size.min(cap - self.length).min(until_wrap);
        &mut self.storage.as_mut()[write_at..write_at + n]
    }

    /// Marks `size` bytes written through `get_unallocated` as queued; returns how many
    /// (clamped to the free space).
    pub fn enqueue_unallocated(&mut self, size: usize) -> usize {
        let n = size.min(self.window());
        self.length += n;
        n
    }

    /// Copies as much of `data` as fits; returns how many bytes were queued.
    pub fn enqueue_slice(&mut self, data: &[u8]) -> usize {
        let mut done = 0;
        while done < data.len() {
            let dst = self.get_unallocated(data.len() - done);
            if dst.is_empty() {
                break;
            }
            let n = dst.len();
            dst.copy_from_slice(&data[done..done + n]);
            self.enqueue_unallocated(n);
            done += n;
        }
        done
    }

    /// Copies up to `buf.len()` queued bytes out and removes them; returns how many.
    pub fn dequeue_slice(&mut self, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let src = self.get_allocated(0, buf.len() - done);
            if src.is_empty() {
                break;
            }
            let n = src.len();
            buf[done..done + n].copy_from_slice(src);
            self.dequeue_allocated(n);
            done += n;
        }
        done
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn wraps_and_preserves_order() {
        let mut r = RingBuffer::new([0u8; 8]);
        assert_eq!(r.enqueue_slice(b"abcdef"), 6);
        let mut out = [0u8; 4];
        assert_eq!(r.dequeue_slice(&mut out), 4);
        assert_eq!(&out, b"abcd");
        assert_eq!(r.enqueue_slice(b"ghijklmn"), 6);
        assert!(r.is_full());
        assert_eq!(r.get_allocated(0, 100), b"efgh");
        assert_eq!(r.get_allocated(4, 100), b"ijkl");
        let mut out = [0u8; 8];
        assert_eq!(r.dequeue_slice(&mut out), 8);
        assert_eq!(&out, b"efghijkl");
        assert!(r.is_empty());
    }

    #[test]
    fn zero_capacity_is_harmless() {
        let mut r = RingBuffer::new([0u8; 0]);
        assert_eq!(r.enqueue_slice(b"x"), 0);
        assert_eq!(r.dequeue_slice(&mut [0u8; 1]), 0);
        assert!(r.get_allocated(0, 1).is_empty());
        assert!(r.get_unallocated(1).is_empty());
        assert_eq!(r.dequeue_allocated(3), 0);
    }

    #[test]
    fn unallocated_pair_writes_in_place() {
        let mut r = RingBuffer::new(vec![0u8; 4]);
        let w = r.get_unallocated(10);
        assert_eq!(w.len(), 4);
        w[..3].copy_from_slice(b"xyz");
        assert_eq!(r.enqueue_unallocated(3), 3);
        assert_eq!(r.enqueue_unallocated(9), 1);
        assert_eq!(r.len(), 4);
        assert_eq!(r.get_allocated(0, 3), b"xyz");
    }
}

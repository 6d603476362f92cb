//! Packets packed one after another in one buffer allocated once: what the data path reads into,
//! splits into and decrypts into, so that no packet allocates.

/// A byte buffer and the spans of the packets in it, both of fixed capacity.
pub struct Arena {
    buf: Vec<u8>,
    /// `(start, len)` of each packet, in the order they were added.
    spans: Vec<(u32, u32)>,
    max_packets: usize,
    used: usize,
}

impl Arena {
    /// An arena of `bytes` (at most 4 GiB) for at most `max_packets` packets.
    pub fn new(bytes: usize, max_packets: usize) -> Arena {
        assert!(bytes <= u32::MAX as usize, "an arena's offsets are 32-bit");
        Arena {
            buf: vec![0; bytes],
            spans: Vec::with_capacity(max_packets),
            max_packets,
            used: 0,
        }
    }

    pub fn clear(&mut self) {
        self.spans.clear();
        self.used = 0;
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Whether one more packet of up to `bytes` fits.
    pub fn has_room(&self, bytes: usize) -> bool {
        self.spans.len() < self.max_packets && self.buf.len() - self.used >= bytes
    }

    /// The free space to write the next packet into (at most `bytes` of it), or `None` when the
    /// arena is full; [`Arena::commit`] then keeps what was written.
    pub fn room(&mut self, bytes: usize) -> Option<&mut [u8]> {
        if !self.has_room(bytes) {
            return None;
        }
        Some(&mut self.buf[self.used..self.used + bytes])
    }

    /// Keeps the first `len` bytes of the space [`Arena::room`] gave as the next packet.
    pub fn commit(&mut self, len: usize) {
        assert!(self.has_room(len), "commit beyond the arena's room");
        self.spans.push((self.used as u32, len as u32));
        self.used += len;
    }

    /// Adds a copy of `packet`; `false` (nothing added) when it does not fit.
    pub fn push(&mut self, packet: &[u8]) -> bool {
        match self.room(packet.len()) {
            Some(room) => {
                room.copy_from_slice(packet);
                self.commit(packet.len());
                true
            }
            None => false,
        }
    }

    /// Where the free space starts: a slice the caller wrote into through [`Arena::room`] is at
    /// this offset of the buffer.
    pub fn room_start(&self) -> usize {
        self.used
    }

    /// Keeps `len` bytes starting `skip` bytes into the free space as the next packet (for a
    /// writer, such as a decryptor, that does not put its output at the very start).
    pub fn commit_at(&mut self, skip: usize, len: usize) {
        assert!(self.has_room(skip + len), "commit beyond the arena's room");
        self.spans.push(((self.used + skip) as u32, len as u32));
        self.used += skip + len;
    }

    pub fn get(&self, i: usize) -> &[u8] {
        let (start, len) = self.spans[i];
        &self.buf[start as usize..(start + len) as usize]
    }

    pub fn get_mut(&mut self, i: usize) -> &mut [u8] {
        let (start, len) = self.spans[i];
        &mut self.buf[start as usize..(start + len) as usize]
    }

    /// Every packet, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.len()).map(|i| self.get(i))
    }
}

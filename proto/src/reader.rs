//! A bounds-checked cursor over untrusted bytes, shared by the certificate and control-protocol
//! decoders. Every read names the field it was for, so a truncation error says what was cut.

/// Bytes ran out while reading `field` at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated {
    pub field: &'static str,
    pub offset: usize,
}

pub struct Reader<'a> {
    buf: &'a [u8],
    pub off: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], off: usize) -> Self {
        Reader { buf, off }
    }

    pub fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], Truncated> {
        let end = self.off.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or(Truncated {
            field,
            offset: self.off,
        })?;
        let s = &self.buf[self.off..end];
        self.off = end;
        Ok(s)
    }

    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], Truncated> {
        Ok(self
            .take(field, N)?
            .try_into()
            .expect("take returned N bytes"))
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, Truncated> {
        Ok(self.take(field, 1)?[0])
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16, Truncated> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64, Truncated> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.off
    }
}

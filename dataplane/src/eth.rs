//! Checked view of an Ethernet frame: only the fields the edge switches on.

use std::fmt;

/// Ethernet header length.
pub const ETH_HDR_LEN: usize = 14;

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Broadcast or multicast (group bit set).
    pub fn is_group(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Destination and source MAC of a frame, or `None` when it is shorter than a header.
pub fn macs(frame: &[u8]) -> Option<(Mac, Mac)> {
    if frame.len() < ETH_HDR_LEN {
        return None;
    }
    let mut d = [0u8; 6];
    let mut s = [0u8; 6];
    d.copy_from_slice(&frame[0..6]);
    s.copy_from_slice(&frame[6..12]);
    Some((Mac(d), Mac(s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses() {
        let mut f = [0u8; 14];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        let (d, s) = macs(&f).unwrap();
        assert!(d.is_group());
        assert!(!s.is_group());
        assert_eq!(s.to_string(), "02:00:00:00:00:01");
        assert!(macs(&f[..13]).is_none());
    }
}

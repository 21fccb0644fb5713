//! WireGuard's four messages on the wire (all integers little-endian).
//!
//! ```text
//!  initiation   148: type 1 | 3 zero | sender 4 | ephemeral 32 | static 32+16 | timestamp 12+16 | mac1 16 | mac2 16
//!  response      92: type 2 | 3 zero | sender 4 | receiver 4 | ephemeral 32 | empty 0+16 | mac1 16 | mac2 16
//!  cookie reply  64: type 3 | 3 zero | receiver 4 | nonce 24 | cookie 16+16
//!  data        >=32: type 4 | 3 zero | receiver 4 | counter 8 | packet (padded to 16) + 16
//! ```

use super::WgError;

/// Message type of a handshake initiation.
pub const INITIATION: u8 = 1;
/// Message type of a handshake response.
pub const RESPONSE: u8 = 2;
/// Message type of a cookie reply.
pub const COOKIE_REPLY: u8 = 3;
/// Message type of a data packet.
pub const DATA: u8 = 4;

/// Length of a handshake initiation.
pub const INITIATION_LEN: usize = 148;
/// Length of a handshake response.
pub const RESPONSE_LEN: usize = 92;
/// Length of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 64;
/// Length of a data packet's header (type, receiver, counter).
pub const DATA_HEADER_LEN: usize = 16;
/// Length of a keepalive: a data packet with nothing inside.
pub const KEEPALIVE_LEN: usize = DATA_HEADER_LEN + super::crypto::TAG_LEN;

/// Where mac1 starts in an initiation (it covers everything before).
pub const INITIATION_MAC1: usize = 116;
/// Where mac1 starts in a response.
pub const RESPONSE_MAC1: usize = 60;

/// A received datagram, checked for type and length.
#[derive(Debug, Clone, Copy)]
pub enum Message<'a> {
    /// A handshake initiation.
    Initiation(&'a [u8; INITIATION_LEN]),
    /// A handshake response.
    Response(&'a [u8; RESPONSE_LEN]),
    /// A cookie reply.
    CookieReply(&'a [u8; COOKIE_REPLY_LEN]),
    /// A data packet (or keepalive).
    Data(Data<'a>),
}

/// A data packet's fields.
#[derive(Debug, Clone, Copy)]
pub struct Data<'a> {
    /// Our index of the session it was sealed with.
    pub receiver: u32,
    /// Its counter (nonce).
    pub counter: u64,
    /// Ciphertext and tag.
    pub sealed: &'a [u8],
}

impl<'a> Message<'a> {
    /// Checks a datagram's type and length; the rest is checked by whoever
    /// opens it.
    pub fn parse(datagram: &'a [u8]) -> Result<Message<'a>, WgError> {
        let Some(head) = datagram.get(..4) else { return Err(WgError::Malformed) };
        if head[1..] != [0, 0, 0] {
            return Err(WgError::Malformed);
        }
        match head[0] {
            INITIATION => datagram.try_into().map(Message::Initiation).map_err(|_| WgError::Malformed),
            RESPONSE => datagram.try_into().map(Message::Response).map_err(|_| WgError::Malformed),
            COOKIE_REPLY => datagram.try_into().map(Message::CookieReply).map_err(|_| WgError::Malformed),
            DATA if datagram.len() >= KEEPALIVE_LEN => Ok(Message::Data(Data {
                receiver: le32(&datagram[4..8]),
                counter: u64::from_le_bytes(datagram[8..16].try_into().expect("eight bytes")),
                sealed: &datagram[DATA_HEADER_LEN..],
            })),
            _ => Err(WgError::Malformed),
        }
    }

    /// The index a response, cookie reply or data packet is addressed to
    /// (ours); `None` for an initiation, which names its sender by key.
    pub fn receiver(&self) -> Option<u32> {
        match self {
            Message::Initiation(_) => None,
            Message::Response(m) => Some(le32(&m[8..12])),
            Message::CookieReply(m) => Some(le32(&m[4..8])),
            Message::Data(d) => Some(d.receiver),
        }
    }
}

/// A little-endian u32 from four bytes.
pub(crate) fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("four bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_and_lengths_are_checked() {
        let mut init = [0u8; INITIATION_LEN];
        init[0] = INITIATION;
        assert!(matches!(Message::parse(&init), Ok(Message::Initiation(_))));
        assert!(Message::parse(&init[..147]).is_err(), "a short initiation");
        init[2] = 1;
        assert!(Message::parse(&init).is_err(), "reserved bytes must be zero");

        let mut data = [0u8; 40];
        data[0] = DATA;
        data[4..8].copy_from_slice(&0x0102_0304u32.to_le_bytes());
        data[8..16].copy_from_slice(&7u64.to_le_bytes());
        let Ok(Message::Data(d)) = Message::parse(&data) else { panic!("a data packet") };
        assert_eq!((d.receiver, d.counter, d.sealed.len()), (0x0102_0304, 7, 24));
        assert_eq!(Message::parse(&data).unwrap().receiver(), Some(0x0102_0304));
        assert!(Message::parse(&data[..31]).is_err(), "shorter than a keepalive");

        for junk in [&[][..], &[4, 0, 0], &[5, 0, 0, 0], &[0; 64]] {
            assert!(Message::parse(junk).is_err(), "{junk:?}");
        }
    }
}

//! Arbitrary bytes as a stream of WireGuard userspace API requests, read one
//! after another with `weft_uapi::read_request`, as a connection does.
//!
//! Invariants: nothing panics; every call makes progress or ends the stream;
//! no request reads past `MAX_REQUEST_BYTES`; an accepted request and a
//! refusal that keeps the connection both end on a blank line (or the end of
//! the input), so the next request starts where a client's would; every
//! refusal carries a positive errno; an accepted set written back with
//! `format_set` reads back the same and is a fixed point; the get reply
//! built from it is key=value lines ending in `errno=0` and a blank line.

use std::io::Cursor;

use weft_uapi::{
    format_get, format_set, read_request, DeviceStatus, PeerStatus, Request, SetRequest, MAX_REQUEST_BYTES,
};

/// Requests read from one input at most: enough for many small requests,
/// bounded so that one input cannot run long.
const MAX_REQUESTS: usize = 256;

/// What a device holding exactly this request's settings would report.
fn status_of(req: &SetRequest) -> DeviceStatus {
    DeviceStatus {
        private_key: req.private_key.flatten(),
        listen_port: req.listen_port.unwrap_or(0),
        fwmark: req.fwmark,
        peers: req
            .peers
            .iter()
            .filter(|p| !p.remove)
            .map(|p| PeerStatus {
                public_key: p.public_key,
                preshared_key: p.preshared_key.flatten(),
                endpoint: p.endpoint,
                persistent_keepalive: p.persistent_keepalive.unwrap_or(0),
                allowed_ips: p.allowed_ips.clone(),
                ..Default::default()
            })
            .collect(),
    }
}

fn check_set(req: &SetRequest) {
    let text = format_set(req);
    let again = match read_request(&mut Cursor::new(text.as_bytes())) {
        Ok(Some(Request::Set(r))) => r,
        other => panic!("format_set output {text:?} read back as {other:?}"),
    };
    assert_eq!(&again, req, "set round trip");
    assert_eq!(format_set(&again), text, "format_set is a fixed point");

    let reply = format_get(&status_of(req));
    let body = reply.strip_suffix("errno=0\n\n").expect("get reply ends with errno=0 and a blank line");
    for line in body.lines() {
        assert!(line.split_once('=').is_some_and(|(k, v)| !k.is_empty() && !v.is_empty()), "{line:?}");
    }
}

/// Whether the bytes consumed, `data[start..end]`, end with a blank line.
fn ends_on_blank_line(data: &[u8], start: usize, end: usize) -> bool {
    end > start && data[end - 1] == b'\n' && (end - 1 == start || data[end - 2] == b'\n')
}

/// Runs one input through the invariants above; panics on a broken one.
pub fn run(data: &[u8]) {
    let mut stream = Cursor::new(data);
    for _ in 0..MAX_REQUESTS {
        let start = stream.position() as usize;
        let result = read_request(&mut stream);
        let end = stream.position() as usize;
        assert!(end - start <= MAX_REQUEST_BYTES, "read {} bytes for one request", end - start);
        match result {
            Ok(None) => {
                assert_eq!(start, data.len(), "clean end of stream only at the end");
                return;
            }
            Ok(Some(req)) => {
                assert!(ends_on_blank_line(data, start, end), "accepted request not ended by a blank line");
                if let Request::Set(set) = &req {
                    check_set(set);
                }
            }
            Err(e) => {
                assert!(e.errno() > 0, "{e}");
                if e.is_fatal() {
                    return;
                }
                assert!(end > start, "a refusal consumed nothing");
                assert!(
                    end == data.len() || ends_on_blank_line(data, start, end),
                    "refusal {e} did not consume its request through the blank line"
                );
            }
        }
    }
}

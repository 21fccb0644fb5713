//! weft-uapi: the cross-platform WireGuard userspace API
//! (<https://www.wireguard.com/xplatform/>), so that the real `wg` tool
//! (`wg show`, `wg showconf`, `wg set`) configures and inspects weft as it
//! does wireguard-go.
//!
//! ```text
//!  wg(8) ── /var/run/wireguard/<iface>.sock ──> accept thread ──> one thread per connection
//!                                                                  │ read_request (bounded)
//!          "get=1\n\n"                 <── format_get(status())  <─┤ Device::status
//!          "set=1\n<key=value>...\n\n" <── "errno=0\n\n"         <─┘ Device::apply
//! ```
//!
//! Two modules, imports running one way (`server` -> `proto`):
//!
//! - `proto`, the protocol ([`read_request`], [`format_get`], [`format_set`],
//!   [`format_errno`], [`DeviceStatus::apply_set`]) and the WireGuard key
//!   type [`Key`]: pure, bytes in, typed requests out, text back; no
//!   sockets, no threads, no clock.
//! - `server` ([`serve`]): owns the socket and its threads and hands each
//!   parsed request to a [`Device`], which decides what applying it means.
//!
//! A set request is parsed whole before anything is applied, so a refused
//! request changes nothing (wireguard-go applies line by line and may stop
//! half way).
//!
//! Refused, each with an errno reply and the connection kept: an unknown
//! operation, a line without `=`, an unknown key, a device key after the first
//! `public_key` or a peer key before it, bad hex, a bad number, endpoint or
//! prefix, a boolean other than `true`, `protocol_version` other than 1, text
//! that is not UTF-8, and a line over [`MAX_LINE_BYTES`]. Refused and then
//! disconnected, because the request's end can no longer be found: a request
//! over [`MAX_REQUEST_BYTES`], a stream that ends or stalls ([`READ_TIMEOUT`])
//! inside a request. Never printed: private and preshared keys (their `Debug`
//! shows a fingerprint or `<secret>`, and refusals do not echo their values).
//!
//! What it refuses to do: it has no packet I/O and knows nothing of
//! datastores, leases or the engine; it depends on no weft crate. [`Key`]
//! (32 bytes, hex on the wire, base64 in `wg`'s files) lives here because
//! the protocol is where WireGuard keys are spelled; `weft-control` (key
//! files, lease data) depends on this crate for it, never the other way.
//!
//! Everything public is re-exported here: `weft_uapi::Key`,
//! `weft_uapi::serve`.

#![forbid(unsafe_code)]

mod proto;
mod server;

pub use proto::{
    format_errno, format_get, format_set, read_request, DeviceStatus, Key, PeerConfig, PeerStatus, Request, SetRequest,
    UapiError, MAX_LINE_BYTES, MAX_REQUEST_BYTES,
};
pub use server::{serve, socket_path, Device, ServerHandle, MAX_CONNECTIONS, READ_TIMEOUT, SOCKET_DIR, WRITE_TIMEOUT};

//! Route lookup cost: longest-prefix match over pod subnets, with 10, 1 000
//! and 100 000 prefixes (a small cluster, a large one, and far more nodes
//! than any cluster has), IPv4 /24s and IPv6 /64s, plus a table that mixes
//! prefix lengths (the case where a lookup probes more than one level).
//!
//! Each iteration looks up a fixed pseudo-random sequence of addresses, a
//! few of them outside every prefix, so caches see a realistic spread.
//! Run with `cargo bench --bench route` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use weft_engine::route::RouteTable;

const SIZES: [usize; 3] = [10, 1_000, 100_000];
/// Addresses looked up per iteration.
const LOOKUPS: usize = 1024;

/// The `i`-th IPv4 /24 of 10.0.0.0/8 (up to 65 536 of them), then of 11.0.0.0/8.
fn v4_net(i: usize) -> Ipv4Net {
    let base = if i < 65_536 { 10u32 << 24 } else { 11u32 << 24 };
    Ipv4Net::new(Ipv4Addr::from(base | (((i % 65_536) as u32) << 8)), 24).unwrap()
}

/// The `i`-th IPv6 /64 of fd00::/48.
fn v6_net(i: usize) -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::from((0xfd00u128 << 112) | ((i as u128) << 64)), 64).unwrap()
}

/// xorshift: a fixed pseudo-random sequence, no dependency.
fn sequence(n: usize, modulo: usize) -> impl Iterator<Item = usize> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % modulo as u64) as usize
    })
}

/// Destinations: hosts inside the table's prefixes, one in 16 outside all.
fn targets(n: usize, v6: bool) -> Vec<IpAddr> {
    sequence(LOOKUPS, n * 16 / 15 + 1)
        .map(|i| match v6 {
            false => IpAddr::V4(Ipv4Addr::from(u32::from(v4_net(i).network()) | 7)),
            true => IpAddr::V6(Ipv6Addr::from(u128::from(v6_net(i).network()) | 7)),
        })
        .collect()
}

fn table(n: usize, v6: bool) -> RouteTable<usize> {
    let mut t = RouteTable::new();
    for i in 0..n {
        let net = if v6 { IpNet::V6(v6_net(i)) } else { IpNet::V4(v4_net(i)) };
        t.insert(net, i);
    }
    t
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    g.throughput(Throughput::Elements(LOOKUPS as u64));
    for v6 in [false, true] {
        let family = if v6 { "ipv6_64" } else { "ipv4_24" };
        for n in SIZES {
            let (t, dst) = (table(n, v6), targets(n, v6));
            let expected_hits = dst.iter().filter(|a| t.lookup(**a).is_some()).count();
            assert!(expected_hits > LOOKUPS / 2 && expected_hits < LOOKUPS, "{family} {n}: {expected_hits} hits");
            g.bench_with_input(BenchmarkId::new(family, n), &n, |b, _| {
                b.iter(|| dst.iter().filter(|a| t.lookup(black_box(**a)).is_some()).count())
            });
        }
    }
    // Mixed lengths: /16 cluster routes under /24 node routes and /32 hosts,
    // so a miss at /32 falls through to /24 and /16.
    let mut t = table(1_000, false);
    t.insert("10.0.0.0/16".parse().unwrap(), usize::MAX);
    for i in 0..100 {
        t.insert(IpNet::V4(Ipv4Net::new(Ipv4Addr::from(u32::from(v4_net(i).network()) | 9), 32).unwrap()), i);
    }
    let dst = targets(1_000, false);
    g.bench_function("ipv4_mixed_16_24_32/1100", |b| {
        b.iter(|| dst.iter().filter(|a| t.lookup(black_box(**a)).is_some()).count())
    });
    g.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);

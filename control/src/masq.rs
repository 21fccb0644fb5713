//! Masquerade (source NAT) of pod traffic leaving the cluster, with Flannel's
//! rule semantics, in an nftables table of weft's own.
//!
//! ```text
//!   table inet weft
//!     chain postrouting  (type nat, hook postrouting, priority srcnat = 100)
//!       meta mark & 0x4000 == 0x4000        return      kube-proxy masquerades it
//!       saddr <pod subnet> daddr <cluster>  return      pod -> pod: true source
//!       saddr <cluster> daddr <pod subnet>  return      pod -> pod: true source
//!       saddr != <cluster> daddr <pod subnet> return    outside -> our pods: untouched
//!       saddr <cluster> daddr != <multicast> masquerade fully-random   pods -> outside
//!       saddr != <cluster> daddr <cluster>  masquerade fully-random   host -> remote pods
//! ```
//!
//! These are the rules of Flannel's `MasqRules`/`MasqIP6Rules` (iptables,
//! chain FLANNEL-POSTRTG), one set per masqueraded family, with IPv6's
//! multicast `ff00::/8` in place of `224.0.0.0/4`. Flannel's nftables
//! manager differs in one rule (`saddr != <pod subnet> daddr <cluster>
//! return`, which leaves its last rule dead); weft follows the iptables set,
//! the one K3s nodes have run for years.
//!
//! What to install is computed in pure code ([`plan`], [`ruleset`]); the
//! whole table is then submitted to `nft -j -f -` as one transaction that
//! creates, deletes and recreates the table, so the kernel swaps old for new
//! atomically: a restart (even after `kill -9`) replaces the table and never
//! adds to it. This module does not touch any table but its own.

use std::borrow::Cow;
use std::collections::HashSet;

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{BinaryOperation, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Match, NATFlag, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::error::MasqError;

/// weft's table (family `inet`: one table for both address families).
pub const TABLE: &str = "weft";
/// Its only chain.
pub const CHAIN: &str = "postrouting";
/// The chain's priority: `srcnat`, where Flannel's chain sits too.
pub const PRIORITY: i32 = 100;
/// The bit kube-proxy marks packets with that it masquerades itself
/// (`KUBE-MARK-MASQ`); Flannel returns them so they are not NATed twice.
pub const KUBE_PROXY_MARK: u32 = 0x4000;

/// A source or destination address test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrMatch {
    /// The network.
    pub net: IpNet,
    /// Whether the rule matches addresses outside it (`!=`).
    pub negated: bool,
}

impl AddrMatch {
    fn is(net: IpNet) -> Self {
        AddrMatch { net, negated: false }
    }

    fn not(net: IpNet) -> Self {
        AddrMatch { net, negated: true }
    }

    /// Whether `addr` passes the test (an address of the other family never does).
    pub fn matches(&self, addr: std::net::IpAddr) -> bool {
        if addr.is_ipv6() != self.net.addr().is_ipv6() {
            return false;
        }
        self.net.contains(&addr) != self.negated
    }
}

/// What a rule does to a packet it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Leave the chain: no NAT.
    Return,
    /// Source NAT to the outgoing interface's address, random ports.
    Masquerade,
}

/// One rule of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasqRule {
    /// Packets carrying [`KUBE_PROXY_MARK`] (any family).
    KubeProxyMark,
    /// Packets of the source and destination tests' family.
    Addrs {
        /// Source test.
        src: AddrMatch,
        /// Destination test.
        dst: AddrMatch,
        /// What to do.
        verdict: Verdict,
    },
}

/// One family to masquerade: the cluster network and this node's subnet in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasqNet {
    /// The pod network of the cluster (`cluster-cidr`, Flannel's `Network`).
    pub cluster: IpNet,
    /// This node's pod subnet (its lease).
    pub subnet: IpNet,
}

/// The chain's rules for `nets` (pure); empty when there is nothing to
/// masquerade, and then no table is installed at all.
pub fn plan(nets: &[MasqNet]) -> Vec<MasqRule> {
    if nets.is_empty() {
        return Vec::new();
    }
    let mut rules = vec![MasqRule::KubeProxyMark];
    let rule = |src, dst, verdict| MasqRule::Addrs { src, dst, verdict };
    for n in nets {
        let multicast: IpNet = if n.cluster.addr().is_ipv4() {
            IpNet::V4(ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(224, 0, 0, 0), 4).expect("/4 is a valid prefix"))
        } else {
            IpNet::V6(
                ipnet::Ipv6Net::new(std::net::Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8)
                    .expect("/8 is a valid prefix"),
            )
        };
        let (cluster, subnet) = (n.cluster.trunc(), n.subnet.trunc());
        rules.extend([
            rule(AddrMatch::is(subnet), AddrMatch::is(cluster), Verdict::Return),
            rule(AddrMatch::is(cluster), AddrMatch::is(subnet), Verdict::Return),
            rule(AddrMatch::not(cluster), AddrMatch::is(subnet), Verdict::Return),
            rule(AddrMatch::is(cluster), AddrMatch::not(multicast), Verdict::Masquerade),
            rule(AddrMatch::not(cluster), AddrMatch::is(cluster), Verdict::Masquerade),
        ]);
    }
    rules
}

/// What the chain does to a packet (pure, the kernel's first-match walk):
/// `None` when no rule matches (the packet leaves un-NATed).
pub fn verdict(rules: &[MasqRule], src: std::net::IpAddr, dst: std::net::IpAddr, mark: u32) -> Option<Verdict> {
    rules.iter().find_map(|r| match r {
        MasqRule::KubeProxyMark => (mark & KUBE_PROXY_MARK == KUBE_PROXY_MARK).then_some(Verdict::Return),
        MasqRule::Addrs { src: s, dst: d, verdict } => (s.matches(src) && d.matches(dst)).then_some(*verdict),
    })
}

/// The nftables transaction that installs `rules` as weft's whole table,
/// replacing whatever table of that name is there (pure). With no rules it
/// only removes the table.
pub fn ruleset(rules: &[MasqRule]) -> Nftables<'static> {
    let mut batch = Batch::new();
    // `add` of an existing table is a no-op and `delete` of a missing one an
    // error: adding first makes the delete always succeed, in the same
    // transaction that recreates the table.
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    if rules.is_empty() {
        return batch.to_nftables();
    }
    batch.add(NfListObject::Table(table()));
    batch.add(NfListObject::Chain(Chain {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: CHAIN.into(),
        _type: Some(NfChainType::NAT),
        hook: Some(NfHook::Postrouting),
        prio: Some(PRIORITY),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }));
    for r in rules {
        batch.add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: TABLE.into(),
            chain: CHAIN.into(),
            expr: Cow::Owned(statements(r)),
            comment: Some("weft masq".into()),
            ..Rule::default()
        }));
    }
    batch.to_nftables()
}

/// Installs `rules` as weft's table in one `nft` transaction (replacing an
/// old one), or removes the table when `rules` is empty.
pub fn apply(rules: &[MasqRule]) -> Result<(), MasqError> {
    nftables::helper::apply_ruleset(&ruleset(rules)).map_err(MasqError::from)
}

/// Removes weft's table, if there is one.
pub fn remove() -> Result<(), MasqError> {
    apply(&[])
}

fn table() -> Table<'static> {
    Table { family: NfFamily::INet, name: TABLE.into(), handle: None }
}

fn statements(r: &MasqRule) -> Vec<Statement<'static>> {
    match r {
        MasqRule::KubeProxyMark => vec![
            Statement::Match(Match {
                left: Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                    Expression::Named(NamedExpression::Meta(Meta { key: MetaKey::Mark })),
                    Expression::Number(KUBE_PROXY_MARK),
                ))),
                right: Expression::Number(KUBE_PROXY_MARK),
                op: Operator::EQ,
            }),
            Statement::Return(None),
        ],
        MasqRule::Addrs { src, dst, verdict } => {
            let last = match verdict {
                Verdict::Return => Statement::Return(None),
                Verdict::Masquerade => Statement::Masquerade(Some(NAT {
                    addr: None,
                    family: None,
                    port: None,
                    flags: Some(HashSet::from([NATFlag::FullyRandom])),
                })),
            };
            vec![addr_match("saddr", src), addr_match("daddr", dst), last]
        }
    }
}

fn addr_match(field: &'static str, m: &AddrMatch) -> Statement<'static> {
    let protocol = if m.net.addr().is_ipv6() { "ip6" } else { "ip" };
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        }))),
        right: Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(Expression::String(m.net.network().to_string().into())),
            len: m.net.prefix_len() as u32,
        })),
        op: if m.negated { Operator::NEQ } else { Operator::EQ },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn v4() -> MasqNet {
        MasqNet { cluster: "10.42.0.0/16".parse().unwrap(), subnet: "10.42.1.0/24".parse().unwrap() }
    }

    fn v6() -> MasqNet {
        MasqNet { cluster: "2001:cafe:42::/56".parse().unwrap(), subnet: "2001:cafe:42:1::/64".parse().unwrap() }
    }

    #[test]
    fn pods_leaving_the_cluster_are_masqueraded_and_nothing_else() {
        let rules = plan(&[v4()]);
        let masq = Some(Verdict::Masquerade);
        let ret = Some(Verdict::Return);
        // Our pod to the outside world, to another node's underlay address.
        assert_eq!(verdict(&rules, ip("10.42.1.2"), ip("203.0.113.1"), 0), masq);
        assert_eq!(verdict(&rules, ip("10.42.1.2"), ip("192.168.77.2"), 0), masq);
        // A pod elsewhere in the cluster, routed through us to the outside.
        assert_eq!(verdict(&rules, ip("10.42.3.2"), ip("203.0.113.1"), 0), masq);
        // Pod to pod, both ways, keeps its true source.
        assert_eq!(verdict(&rules, ip("10.42.1.2"), ip("10.42.2.2"), 0), ret);
        assert_eq!(verdict(&rules, ip("10.42.2.2"), ip("10.42.1.2"), 0), ret);
        assert_eq!(verdict(&rules, ip("10.42.1.2"), ip("10.42.1.3"), 0), ret);
        // Traffic from outside arriving at our pods is not touched.
        assert_eq!(verdict(&rules, ip("203.0.113.1"), ip("10.42.1.2"), 0), ret);
        // Multicast from pods is not NATed.
        assert_eq!(verdict(&rules, ip("10.42.1.2"), ip("239.1.1.1"), 0), None);
        // The host reaching another node's pods is masqueraded (to the TUN
        // address, inside our subnet, so the peer's source check accepts it).
        assert_eq!(verdict(&rules, ip("192.168.77.1"), ip("10.42.2.2"), 0), masq);
        // The host to the outside: not ours to touch.
        assert_eq!(verdict(&rules, ip("192.168.77.1"), ip("203.0.113.1"), 0), None);
        // kube-proxy's marked packets are left to kube-proxy.
        assert_eq!(verdict(&rules, ip("10.42.1.2"), ip("203.0.113.1"), 0x4000), ret);
        assert_eq!(verdict(&rules, ip("10.42.1.2"), ip("203.0.113.1"), 0xc001), ret);
        assert_eq!(verdict(&rules, ip("10.42.1.2"), ip("203.0.113.1"), 0x8000), masq);
        // IPv6 is not masqueraded unless asked for.
        assert_eq!(verdict(&rules, ip("2001:cafe:42:1::2"), ip("2001:db8::1"), 0), None);
    }

    #[test]
    fn ipv6_follows_the_same_rules_with_its_multicast() {
        let rules = plan(&[v4(), v6()]);
        assert_eq!(rules.len(), 1 + 5 + 5);
        let masq = Some(Verdict::Masquerade);
        assert_eq!(verdict(&rules, ip("2001:cafe:42:1::2"), ip("2001:db8:77::1"), 0), masq);
        assert_eq!(verdict(&rules, ip("2001:cafe:42:1::2"), ip("2001:cafe:42:2::2"), 0), Some(Verdict::Return));
        assert_eq!(verdict(&rules, ip("2001:db8:77::1"), ip("2001:cafe:42:1::2"), 0), Some(Verdict::Return));
        assert_eq!(verdict(&rules, ip("2001:cafe:42:1::2"), ip("ff02::1"), 0), None);
        assert_eq!(verdict(&rules, ip("10.42.1.2"), ip("203.0.113.1"), 0), masq, "IPv4 too");
        // Only IPv6 (an IPv6-only cluster).
        let rules = plan(&[v6()]);
        assert_eq!(verdict(&rules, ip("10.42.1.2"), ip("203.0.113.1"), 0), None);
        assert_eq!(verdict(&rules, ip("2001:cafe:42:1::2"), ip("2001:db8:77::1"), 0), masq);
    }

    #[test]
    fn unnormalised_networks_are_matched_by_their_prefix() {
        let n = MasqNet { cluster: "10.42.7.9/16".parse().unwrap(), subnet: "10.42.1.5/24".parse().unwrap() };
        let rules = plan(&[n]);
        assert_eq!(plan(&[v4()]), rules);
    }

    #[test]
    fn nothing_to_masquerade_installs_nothing() {
        assert!(plan(&[]).is_empty());
        let json = serde_json::to_value(ruleset(&[])).unwrap();
        let cmds = json["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 2, "add then delete the table: {json}");
        assert!(cmds[0]["add"]["table"].is_object() && cmds[1]["delete"]["table"].is_object(), "{json}");
    }

    #[test]
    fn the_transaction_replaces_the_whole_table() {
        let json = serde_json::to_value(ruleset(&plan(&[v4()]))).unwrap();
        let cmds = json["nftables"].as_array().unwrap();
        // add, delete, add table, the chain, then the six rules: one batch.
        assert_eq!(cmds.len(), 4 + 6, "{json}");
        assert_eq!(cmds[0]["add"]["table"]["name"], TABLE);
        assert_eq!(cmds[1]["delete"]["table"]["family"], "inet");
        assert_eq!(cmds[2]["add"]["table"]["name"], TABLE);
        let chain = &cmds[3]["add"]["chain"];
        assert_eq!((chain["type"].as_str(), chain["hook"].as_str()), (Some("nat"), Some("postrouting")));
        assert_eq!(chain["prio"], PRIORITY);
        let mark = &cmds[4]["add"]["rule"]["expr"];
        assert_eq!(mark[0]["match"]["left"]["&"][0]["meta"]["key"], "mark", "{mark}");
        assert_eq!(mark[0]["match"]["right"], KUBE_PROXY_MARK);
        let masq = &cmds[8]["add"]["rule"]["expr"];
        assert_eq!(masq[0]["match"]["left"]["payload"]["field"], "saddr");
        assert_eq!(masq[0]["match"]["right"]["prefix"]["addr"], "10.42.0.0");
        assert_eq!(masq[0]["match"]["right"]["prefix"]["len"], 16);
        assert_eq!(masq[1]["match"]["op"], "!=");
        assert_eq!(masq[1]["match"]["right"]["prefix"]["addr"], "224.0.0.0");
        assert_eq!(masq[2]["masquerade"]["flags"], serde_json::json!(["fully-random"]), "{masq}");
    }
}

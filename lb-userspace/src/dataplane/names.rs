//! Every map's name, as the eBPF object and the pin directory spell it: the one list that
//! loading, pinning and adoption use (a map is added here, and in `ALL`).
pub const SERVICES: &str = "services";
pub const VIP_FILTER: &str = "vip_filter";
pub const BACKENDS: &str = "backends";
pub const BACKEND_STATE: &str = "backend_state";
pub const BACKEND_HOPS: &str = "backend_hops";
pub const MAGLEV: &str = "maglev";
pub const CONNTRACK: &str = "conntrack";
pub const NAT_REVERSE: &str = "nat_reverse";
pub const PORT_TABLES: &str = "port_tables";
pub const CONFIG: &str = "config";
pub const IFACE_ADDRS: &str = "iface_addrs";
pub const FIB_CACHE: &str = "fib_cache";
pub const FLOOD: &str = "flood";
pub const SYN_WINDOW: &str = "syn_window";
pub const COOKIE_STATS: &str = "cookie_stats";
pub const SERVICE_STATS: &str = "service_stats";
pub const BACKEND_STATS: &str = "backend_stats";
pub const DROPS: &str = "drops";

/// Every map lb pins (the per-CPU scratch space holds nothing between packets, and is not).
pub const ALL: [&str; 18] = [
    SERVICES,
    VIP_FILTER,
    BACKENDS,
    BACKEND_STATE,
    BACKEND_HOPS,
    MAGLEV,
    CONNTRACK,
    NAT_REVERSE,
    PORT_TABLES,
    CONFIG,
    IFACE_ADDRS,
    FIB_CACHE,
    FLOOD,
    SYN_WINDOW,
    COOKIE_STATS,
    SERVICE_STATS,
    BACKEND_STATS,
    DROPS,
];

#[cfg(test)]
mod tests {
    /// Every map of the object but the scratch space is in `ALL`, and nothing else is.
    #[test]
    fn all_is_every_map_of_the_object() {
        let object = aya_obj::Object::parse(super::super::EBPF_OBJECT).expect("object");
        let mut in_object: Vec<&str> = object
            .maps
            .keys()
            .map(String::as_str)
            .filter(|n| *n != "scratch" && !n.starts_with('.'))
            .collect();
        in_object.sort_unstable();
        let mut all = super::ALL.to_vec();
        all.sort_unstable();
        assert_eq!(in_object, all);
    }
}

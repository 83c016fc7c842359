//! `aya::Pod` for every shared type, so the daemon can read and write them in BPF maps.
use crate::{
    config::*, flood::*, flow::*, flowtab::FlowSlot, hash::SipKey, ports::*, service::*, stats::*,
};

macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: `#[repr(C)]`, every field is plain data and padding is explicit.
        unsafe impl aya::Pod for $t {}
    )* };
}
pod!(
    SipKey,
    SynOptions,
    PortTableKey,
    PortTable,
    BackendState,
    Flood,
    SynWindow,
    ServiceKey,
    ServiceInfo,
    FilterSlot,
    Backend,
    FlowKey,
    Conn,
    FlowSlot,
    NatReverse,
    Config,
    IfaceAddrs,
    FibKey,
    NextHop,
    Counters
);

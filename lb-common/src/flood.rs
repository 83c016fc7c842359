//! SYN flood defence: when lb answers SYNs itself with cookies, and what it counted.
use crate::assert_layout;

/// Value of the one-entry `flood` array: whether cookie mode is on, and why.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flood {
    /// 1 while lb answers new SYNs with cookies.
    pub cookies: u32,
    /// 1 while the last sweep found a backend's SNAT ports above `Config::cookie_occupancy`.
    pub occupancy_high: u32,
    /// Jiffies when cookie mode last turned on or off.
    pub since: u64,
    /// Times cookie mode turned on, and off.
    pub entered: u64,
    pub left: u64,
    /// New SYNs a second over all CPUs, as last measured.
    pub syn_rate: u64,
    /// Per mille: the fullest backend's SNAT ports in use, as of the last sweep.
    pub occupancy: u32,
    /// Sweeps run so far; a backend's port counts are current when their `sweep` is this.
    pub sweeps: u32,
}
assert_layout!(Flood, size = 48, align = 8);

/// Value of the per-CPU `syn_window`: new SYNs this CPU saw since `start`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynWindow {
    /// Jiffies.
    pub start: u64,
    pub count: u64,
}
assert_layout!(SynWindow, size = 16, align = 8);

/// How long the SYN rate is measured over before cookie mode is reconsidered, in
/// milliseconds.
pub const SYN_WINDOW_MS: u32 = 100;
/// Cookie mode, once on, stays on at least this long (seconds), and turns off when the
/// rate falls below half its threshold: no flapping at the edge.
pub const COOKIE_MODE_MIN_S: u32 = 2;

/// Index into the per-CPU `cookie_stats` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CookieStat {
    /// SYN-ACKs lb answered with a cookie.
    Sent = 0,
    /// ACKs whose cookie checked: lb opened the backend side.
    Valid = 1,
    /// ACKs of no tracked flow whose cookie did not check (dropped as `unknown_flow`).
    Invalid = 2,
}

impl CookieStat {
    pub const COUNT: u32 = 3;
    pub const ALL: [CookieStat; Self::COUNT as usize] = [Self::Sent, Self::Valid, Self::Invalid];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Valid => "valid",
            Self::Invalid => "invalid",
        }
    }
}

//! TCP options: read where a handshake needs them (the options of a SYN, the timestamp of
//! a closing segment) and rewritten in the flows lb opened behind a SYN cookie.
use core::ffi::c_void;

use aya_ebpf::{bindings::xdp_md, helpers::generated::bpf_loop, programs::XdpContext};
use lb_common::{
    csum::{apply, diff_addr, diff_u16},
    flow::{SYN_SACK, SYN_TIMESTAMPS, SYN_WSCALE},
};

use crate::parse::{L4_OFF, Packet, TCP_HDR_LEN};

const NOP: u8 = 1;
const MSS: u8 = 2;
const WSCALE: u8 = 3;
const SACK_PERM: u8 = 4;
const SACK: u8 = 5;
const TIMESTAMPS: u8 = 8;
/// The most option bytes a header can carry.
const MAX_OPTION_BYTES: usize = 40;

/// What a segment's options say, and where its timestamp and SACK blocks lie (offsets
/// from the start of the TCP header; 0 when absent).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Options {
    pub mss: u16,
    pub wscale: u8,
    /// `SYN_*` of the options present.
    pub flags: u8,
    pub tsval: u32,
    pub tsecr: u32,
    pub ts_off: u32,
    pub sack_off: u32,
    /// SACK blocks (8 bytes each).
    pub sack_blocks: u32,
}

impl Options {
    #[inline(always)]
    pub fn has_ts(&self) -> bool {
        self.flags & SYN_TIMESTAMPS != 0
    }
    #[inline(always)]
    pub fn wscale(&self) -> Option<u8> {
        (self.flags & SYN_WSCALE != 0).then_some(self.wscale)
    }
}

/// A byte of the TCP header at `off` (bounded to the largest header), if the packet holds it.
#[inline(always)]
fn byte_at(ctx: &XdpContext, off: u32) -> Option<u8> {
    let p = crate::parse::data(ctx) + L4_OFF + (off as usize & 63);
    if p + 1 > crate::parse::data_end(ctx) {
        return None;
    }
    // SAFETY: one byte, checked against data_end above (the verifier does too).
    Some(unsafe { *(p as *const u8) })
}

#[inline(always)]
fn be16_at(ctx: &XdpContext, off: u32) -> Option<u16> {
    let p = crate::parse::data(ctx) + L4_OFF + (off as usize & 63);
    if p + 2 > crate::parse::data_end(ctx) {
        return None;
    }
    // SAFETY: two bytes, checked against data_end above; an unaligned read.
    Some(u16::from_be_bytes(unsafe {
        (p as *const [u8; 2]).read_unaligned()
    }))
}

#[inline(always)]
fn be32_at(ctx: &XdpContext, off: u32) -> Option<u32> {
    let p = crate::parse::data(ctx) + L4_OFF + (off as usize & 63);
    if p + 4 > crate::parse::data_end(ctx) {
        return None;
    }
    // SAFETY: four bytes, checked against data_end above; an unaligned read.
    Some(u32::from_be_bytes(unsafe {
        (p as *const [u8; 4]).read_unaligned()
    }))
}

/// What the option walk carries from one step to the next.
#[repr(C)]
struct Walk {
    ctx: *const XdpContext,
    /// The next option's offset from the TCP header, and the header's end.
    off: u32,
    end: u32,
    o: Options,
}

/// One step of the walk: the option at `w.off`. 1 ends the walk.
extern "C" fn step(_i: u32, w: *mut c_void) -> i64 {
    // SAFETY: `bpf_loop` passes back the `Walk` that `lb_tcp_options` gave it, alive on its
    // stack for the loop.
    let w = unsafe { &mut *(w as *mut Walk) };
    // SAFETY: `w.ctx` points at the `XdpContext` on `lb_tcp_options`'s stack, alive for the
    // loop.
    let ctx = unsafe { &*w.ctx };
    let off = w.off;
    if off >= w.end {
        return 1;
    }
    let Some(kind) = byte_at(ctx, off) else {
        return 1;
    };
    if kind == 0 {
        return 1;
    }
    if kind == NOP {
        w.off = off + 1;
        return 0;
    }
    let Some(len) = byte_at(ctx, off + 1) else {
        return 1;
    };
    let len = len as u32;
    if len < 2 || off + len > w.end {
        return 1;
    }
    let o = &mut w.o;
    match (kind, len) {
        (MSS, 4) => {
            if let Some(v) = be16_at(ctx, off + 2) {
                o.mss = v;
            }
        }
        (WSCALE, 3) => {
            if let Some(v) = byte_at(ctx, off + 2) {
                o.wscale = if v > 14 { 14 } else { v };
                o.flags |= SYN_WSCALE;
            }
        }
        (SACK_PERM, 2) => o.flags |= SYN_SACK,
        (TIMESTAMPS, 10) => {
            if let (Some(v), Some(e)) = (be32_at(ctx, off + 2), be32_at(ctx, off + 6)) {
                o.tsval = v;
                o.tsecr = e;
                o.ts_off = off;
                o.flags |= SYN_TIMESTAMPS;
            }
        }
        (SACK, _) if len >= 10 && (len - 2).is_multiple_of(8) => {
            o.sack_off = off;
            o.sack_blocks = (len - 2) / 8;
        }
        _ => {}
    }
    w.off = off + len;
    0
}

/// Walks the options of `pkt` (a TCP packet). Malformed options end the walk: what was
/// read before stands.
#[inline(always)]
pub fn read(ctx: &XdpContext, pkt: &Packet) -> Options {
    let mut o = Options::default();
    if pkt.l4_hdr_len as usize > TCP_HDR_LEN {
        lb_tcp_options(ctx.ctx, pkt.l4_hdr_len as u32, &mut o);
    }
    o
}

/// The option walk, as a global function: the verifier checks it once, on its own, rather
/// than at every call and for every state the caller may be in (which, inlined into the
/// packet path, made the program too complex to verify). `end` is the TCP header's length.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_tcp_options(ctx: *mut xdp_md, end: u32, out: *mut Options) -> i32 {
    if out.is_null() || ctx.is_null() {
        return -1;
    }
    let ctx = XdpContext::new(ctx);
    let mut w = Walk {
        ctx: &ctx,
        off: TCP_HDR_LEN as u32,
        end: if end > 60 { 60 } else { end },
        o: Options::default(),
    };
    // SAFETY: a BPF helper call with arguments of the types it documents (`step`, and `w`,
    // which outlives the loop); `out` is non-null, and the verifier checks its size.
    unsafe {
        bpf_loop(
            MAX_OPTION_BYTES as u32,
            step as *mut c_void,
            core::ptr::from_mut(&mut w).cast(),
            0,
        );
        *out = w.o;
    }
    0
}

/// Adds `delta` to the 32-bit field at `off` from the TCP header; its checksum change.
#[inline(always)]
fn add32(ctx: &XdpContext, off: u32, delta: u32) -> u32 {
    let p = crate::parse::data(ctx) + L4_OFF + (off as usize & 63);
    if p + 4 > crate::parse::data_end(ctx) {
        return 0;
    }
    let p = p as *mut [u8; 4];
    // SAFETY: four bytes, checked against data_end above; an unaligned read.
    let old = unsafe { p.read_unaligned() };
    let new = u32::from_be_bytes(old).wrapping_add(delta).to_be_bytes();
    // SAFETY: the bytes just read.
    unsafe { p.write_unaligned(new) };
    diff_addr(old, new)
}

/// Translates a segment of a cookie-opened flow in place: `seq_add` to the sequence
/// number, `ack_add` to the acknowledgement number and SACK edges, `tsval_add` and
/// `tsecr_add` to the timestamp; the window rescaled from `1 << ws_from` to `1 << ws_to`.
/// The TCP checksum follows.
#[inline(always)]
pub fn translate(ctx: &XdpContext, opts: &Options, t: &Translation) {
    let mut diff = 0u32;
    if t.seq_add != 0 {
        diff += add32(ctx, 4, t.seq_add);
    }
    if t.ack_add != 0 {
        diff += add32(ctx, 8, t.ack_add);
        for i in 0..4u32 {
            if i >= opts.sack_blocks {
                break;
            }
            let at = opts.sack_off + 2 + i * 8;
            diff += add32(ctx, at, t.ack_add);
            diff += add32(ctx, at + 4, t.ack_add);
        }
    }
    if opts.ts_off != 0 {
        if t.tsval_add != 0 {
            diff += add32(ctx, opts.ts_off + 2, t.tsval_add);
        }
        if t.tsecr_add != 0 {
            diff += add32(ctx, opts.ts_off + 6, t.tsecr_add);
        }
    }
    // The fixed header afresh from the context: after the option walk (a global function
    // given the context) the verifier no longer trusts the parse's pointers' ranges.
    let hdr = crate::parse::data(ctx) + L4_OFF;
    if hdr + TCP_HDR_LEN > crate::parse::data_end(ctx) {
        return;
    }
    let window = (hdr + 14) as *mut [u8; 2];
    let check = (hdr + 16) as *mut u16;
    if t.ws_from != t.ws_to {
        // SAFETY: the fixed TCP header was checked against data_end above; an unaligned
        // read.
        let old = u16::from_be_bytes(unsafe { window.read_unaligned() });
        let wide = (old as u32) << (t.ws_from & 15);
        let mut new = wide >> (t.ws_to & 15);
        if new > 0xffff {
            new = 0xffff;
        }
        if new == 0 && old != 0 {
            new = 1;
        }
        let new = new as u16;
        // SAFETY: the bytes just read.
        unsafe { window.write_unaligned(new.to_be_bytes()) };
        diff += diff_u16(
            u16::from_ne_bytes(old.to_be_bytes()),
            u16::from_ne_bytes(new.to_be_bytes()),
        );
    }
    if diff != 0 {
        // SAFETY: the checksum is in the fixed header checked above; unaligned accesses.
        unsafe {
            let c = check.read_unaligned();
            check.write_unaligned(apply(c, diff));
        }
    }
}

/// What [`translate`] changes.
#[derive(Clone, Copy, Default)]
pub struct Translation {
    pub seq_add: u32,
    pub ack_add: u32,
    pub tsval_add: u32,
    pub tsecr_add: u32,
    pub ws_from: u8,
    pub ws_to: u8,
}

/// The 20 option bytes of a segment lb writes itself: MSS, SACK permitted, timestamps and
/// window scale as given, NOPs elsewhere (so every such header is 40 bytes long).
#[inline(always)]
pub fn build(mss: Option<u16>, sack: bool, ts: Option<(u32, u32)>, wscale: Option<u8>) -> [u8; 20] {
    let mut o = [NOP; 20];
    if let Some(m) = mss {
        let m = m.to_be_bytes();
        o[0] = MSS;
        o[1] = 4;
        o[2] = m[0];
        o[3] = m[1];
    }
    if sack {
        o[4] = SACK_PERM;
        o[5] = 2;
    }
    if let Some((val, ecr)) = ts {
        let (v, e) = (val.to_be_bytes(), ecr.to_be_bytes());
        o[6] = TIMESTAMPS;
        o[7] = 10;
        o[8] = v[0];
        o[9] = v[1];
        o[10] = v[2];
        o[11] = v[3];
        o[12] = e[0];
        o[13] = e[1];
        o[14] = e[2];
        o[15] = e[3];
    }
    if let Some(w) = wscale {
        o[17] = WSCALE;
        o[18] = 3;
        o[19] = w;
    }
    o
}

/// A SYN's timestamp value and whether it has one: read where Linux puts it (after MSS and
/// SACK permitted), else by walking the options.
#[inline(always)]
pub fn syn_tsval(ctx: &XdpContext, pkt: &Packet) -> (u32, bool) {
    if pkt.l4_hdr_len as usize <= TCP_HDR_LEN {
        return (0, false);
    }
    if pkt.l4_hdr_len >= 36
        && byte_at(ctx, 26) == Some(TIMESTAMPS)
        && byte_at(ctx, 27) == Some(10)
        && let Some(v) = be32_at(ctx, 28)
    {
        return (v, true);
    }
    let o = read(ctx, pkt);
    (o.tsval, o.has_ts())
}

//! The fault matrix: every fault the simulator injects (`usbmux_sim::faults`), in each
//! direction where it applies, against the real `usbmuxd` binary with two phones and several
//! connections open.
//!
//! Each case runs its own daemon (TCP 127.0.0.1, `usbmux_tests::hostile::Rig`) with phone A,
//! whose first plug carries the fault, and phone B, which is healthy. Phone A starts unplugged:
//! the daemon's fd count and RSS with only B attached are the baseline. A is then plugged in,
//! and while the fault fires these run at once:
//!
//! - on A, the *victim*: 2 MiB through the echo service (port 7; port-filtered faults aim
//!   here — the digest service for faults on the phone's pure window updates, the source
//!   service read after a stall for the window overrun and for faults on the daemon's window
//!   updates: the daemon hands the phone's bytes straight to a client that keeps up, so its
//!   acks ride on its own data and pure updates come when a client has fallen behind), and
//!   the *bystander*: 2 MiB through the other of echo and digest;
//! - on B: 2 MiB through echo and 2 MiB through digest, checked byte for byte and by SHA-256.
//!
//! Then every case checks: the outcome below for A's connections (with the reason in the
//! daemon's log where the daemon gives one), B's connections byte-exact, a fresh ListDevices
//! answered within 100 ms, phone A usable again (a new echo connection), the fault really fired
//! (the injector's record), the daemon alive; and after A is unplugged again, the daemon's open
//! fds exactly at the baseline and its peak RSS (VmHWM) at most [`RSS_BOUND_KIB`] above it.
//!
//! # Expected outcomes
//!
//! "Reset" means: the connection's TCP client socket is reset (ECONNRESET, the daemon's
//! `SO_LINGER` 0 close), having received only a prefix of what it sent back; "dropped" means the
//! daemon logs the device gone, resets every connection to it, and the phone re-handshakes on its
//! next plug (a new DeviceID); "refused" means the Connect is answered with CONNREFUSED (3).
//! OUT = host → phone, IN = phone → host (the daemon's core session is the host).
//!
//! | fault | OUT | IN |
//! |---|---|---|
//! | `Drop` a data packet | victim reset | victim reset (log: "unexpected sequence number") |
//! | `Drop` the SYN / the SYN\|ACK | victim refused after the 5 s connect timeout | same |
//! | `Drop` a window update (pure ACK) | intact | intact |
//! | `Drop` one VERSION | intact (VERSION resent after 1 s) | intact |
//! | `Drop` every VERSION ("never answers") | — | A never listed; handshake fails after 3 s (log: "handshake failed"), the next plug works |
//! | `Drop` SETUP | intact | — |
//! | `Duplicate` a data packet | victim reset | victim reset (log: "unexpected sequence number") |
//! | `Duplicate` a pure ACK | intact | intact |
//! | `Duplicate` the SYN / the SYN\|ACK | intact | victim reset or refused (log: "unexpected TCP flags") |
//! | `Reorder` within the victim | victim reset | victim reset |
//! | `SetLength` nonsense (5) | victim reset; the phone's CONTROL error logged ("device says") | victim reset |
//! | `SetLength` plausible but wrong | victim reset | victim reset; the bystander may lose its next packet (reset) |
//! | `SetMagic` | victim reset | victim reset |
//! | `SetProtocol` unknown | victim reset | victim reset |
//! | `MuxSeqOffset` | intact | intact |
//! | `SeqOffset` | victim reset | victim reset (log: "unexpected sequence number") |
//! | `AckOffset` | victim reset | victim reset (log: "ack beyond data sent") |
//! | `OverrunWindow` ("ignores the window") | victim reset | victim reset (log: "window overflow", or "unexpected sequence number" when the padding stays inside a window update still on its way: taken up to the edge, the next packet is then out of sequence) |
//! | `SetFlags` FIN\|ACK on data | victim reset | victim reset (log: "FIN") |
//! | `SetWindow(0)` on a window update | intact | intact |
//! | `SetWindow(0)` on the SYN\|ACK | — | intact |
//! | `InjectRst` "amnesia" | victim reset | victim reset (log: "amnesia") |
//! | `InjectControl` | intact (the phone ignores it) | intact (log: "device says") |
//! | `AnswerVersion(1)` | intact (a v1 session) | A listed, but every Connect refused after the connect timeout |
//! | `AnswerVersion(3)` | intact | handshake fails at once; the next plug works |
//! | `Split` (1000-byte pieces) | victim reset | intact |
//! | `Pack` (3 packets) | victim reset; the bystander may be hit too | intact |
//! | `OmitZlp` | victim reset; the bystander may be hit too | intact |
//! | `Unplug` mid-packet | A dropped | A dropped |
//! | `StopReading` 300 ms | intact | intact |
//! | `SlowLink` 4 MB/s | intact | intact |
//!
//! The named scenarios of issue 8 have tests of their own below: unplug during 50 simultaneous
//! transfers, a phone that never answers the version (on every plug), a phone that floods
//! CONTROL messages, a phone that ignores the window on every connection, and 10 rapid
//! plug/unplug cycles. The same table, shortened, is in `firmware-sim/README.md`.
//!
//! `cargo test -p usbmux-tests --test fault_matrix` runs all; `FAULT_CASE=substring` limits the
//! matrix to the cases whose names contain it.

use std::io::{self, Read, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use usbmux_sim::faults::{Action, Direction, Faults, Filter, PacketKind, Rule};
use usbmux_tests::client::ClientStream;
use usbmux_tests::faulty::PhoneSpec;
use usbmux_tests::hostile::{self, Rig, DIGEST, ECHO};

/// How far the daemon's peak RSS may rise above its baseline (B attached, no clients) during a
/// case: four 2 MiB transfers at once cost 4 × 384 KiB of connection buffers, the churn of A's
/// device thread and allocator arenas the rest.
const RSS_BOUND_KIB: u64 = 48 * 1024;
/// Port of the simulated phone's source service (an endless deterministic stream).
const SOURCE: u16 = usbmux_sim::service::SOURCE;
/// Bytes each transfer of a case moves.
const TRANSFER: usize = 2 << 20;

const OUT: Direction = Direction::HostToDevice;
const IN: Direction = Direction::DeviceToHost;

/// What a case expects for phone A.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Both of A's connections byte-exact.
    Intact,
    /// The victim reset, the bystander intact; the log contains the text.
    Reset(&'static str),
    /// The victim reset; the bystander intact or reset (never corrupted); the log contains the
    /// text.
    ResetMaybeBystander(&'static str),
    /// The victim reset or refused; the bystander intact.
    ResetOrRefused(&'static str),
    /// The victim's Connect answered CONNREFUSED; the bystander intact or refused as well.
    Refused,
    /// A dropped (every connection reset) and back with a new DeviceID.
    Dropped,
    /// A's first plug never finishes the handshake; the log contains the text; the second plug
    /// works.
    HandshakeFails(&'static str),
}

/// How the victim moves its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// [`TRANSFER`] bytes as fast as they go.
    Stream,
    /// The source service (port 19), not read for a second: the phone fills every buffer up
    /// to the daemon's window for the connection, which closes (what a window overrun needs);
    /// then up to 32 MiB are read and checked against the source's pattern.
    StalledSource,
    /// 200 rounds of 476 bytes, each echoed before the next: every packet is exactly 512
    /// bytes (36 of headers), the only ones that need a ZLP — the daemon avoids such sizes in
    /// bulk (49 151-byte packets), so this is how `OmitZlp` finds one.
    PingPong,
}

struct FaultCase {
    name: &'static str,
    faults: Faults,
    expect: Expect,
    /// More text the log must contain.
    log: Option<&'static str>,
    /// The victim's port on A (echo unless the fault needs the digest service, whose phone
    /// side only receives and so sends pure window updates).
    victim: u16,
    mode: Mode,
    /// No bystander on A (a reorder then certainly stays within the victim's connection).
    solo: bool,
}

fn case(name: &'static str, rule: Rule, expect: Expect) -> FaultCase {
    FaultCase {
        name,
        faults: Faults::one(rule),
        expect,
        log: None,
        victim: ECHO,
        mode: Mode::Stream,
        solo: false,
    }
}

impl FaultCase {
    fn victim(mut self, port: u16) -> FaultCase {
        self.victim = port;
        self
    }

    fn mode(mut self, mode: Mode) -> FaultCase {
        self.mode = mode;
        self
    }

    fn solo(mut self) -> FaultCase {
        self.solo = true;
        self
    }

    fn log(mut self, text: &'static str) -> FaultCase {
        self.log = Some(text);
        self
    }
}

fn on7(kind: PacketKind) -> Filter {
    Filter::on_port(kind, ECHO)
}

fn at(n: u64, dir: Direction, filter: Filter, action: Action) -> Rule {
    Rule::at_packet(n, dir, filter, action)
}

fn every(dir: Direction, filter: Filter, action: Action) -> Rule {
    Rule::always(dir, filter, 1_000_000, action)
}

fn cases() -> Vec<FaultCase> {
    use Action as A;
    use Expect::*;
    use PacketKind as K;
    let data = on7(K::Data);
    let seq = "unexpected sequence number";
    let ended = "connection to port 7 ended";
    let mut v = vec![
        case("drop_data_out", at(3, OUT, data, A::Drop), Reset(ended)),
        case("drop_data_in", at(3, IN, data, A::Drop), Reset(seq)),
        case("drop_syn_out", at(0, OUT, on7(K::Syn), A::Drop), Refused),
        case(
            "drop_synack_in",
            at(0, IN, on7(K::SynAck), A::Drop),
            Refused,
        ),
        case(
            "drop_window_update_out",
            at(2, OUT, Filter::on_port(K::PureAck, SOURCE), A::Drop),
            Intact,
        )
        .victim(SOURCE)
        .mode(Mode::StalledSource),
        case(
            "drop_window_update_in",
            at(2, IN, Filter::on_port(K::PureAck, DIGEST), A::Drop),
            Intact,
        )
        .victim(DIGEST),
        case(
            "drop_one_version_out",
            at(0, OUT, Filter::kind(K::Version), A::Drop),
            Intact,
        ),
        case(
            "drop_one_version_in",
            at(0, IN, Filter::kind(K::Version), A::Drop),
            Intact,
        ),
        case(
            "drop_every_version_in",
            every(IN, Filter::kind(K::Version), A::Drop),
            HandshakeFails("handshake failed"),
        ),
        case(
            "drop_setup_out",
            at(0, OUT, Filter::kind(K::Setup), A::Drop),
            Intact,
        ),
        case(
            "duplicate_data_out",
            at(3, OUT, data, A::Duplicate),
            Reset(ended),
        ),
        case(
            "duplicate_data_in",
            at(3, IN, data, A::Duplicate),
            Reset(seq),
        ),
        case(
            "duplicate_ack_out",
            at(2, OUT, Filter::on_port(K::PureAck, SOURCE), A::Duplicate),
            Intact,
        )
        .victim(SOURCE)
        .mode(Mode::StalledSource),
        case(
            "duplicate_ack_in",
            at(2, IN, Filter::on_port(K::PureAck, DIGEST), A::Duplicate),
            Intact,
        )
        .victim(DIGEST),
        case(
            "duplicate_syn_out",
            at(0, OUT, on7(K::Syn), A::Duplicate),
            Intact,
        ),
        case(
            "duplicate_synack_in",
            at(0, IN, on7(K::SynAck), A::Duplicate),
            ResetOrRefused("unexpected flags"),
        ),
        case(
            "reorder_data_out",
            at(
                3,
                OUT,
                data,
                A::Reorder {
                    after: 1,
                    max_hold_micros: 200_000,
                },
            ),
            Reset(ended),
        )
        .solo(),
        case(
            "reorder_data_in",
            at(
                3,
                IN,
                data,
                A::Reorder {
                    after: 1,
                    max_hold_micros: 200_000,
                },
            ),
            Reset(seq),
        )
        .solo(),
        case(
            "length_nonsense_out",
            at(3, OUT, data, A::SetLength(5)),
            Reset(ended),
        ),
        case(
            "length_nonsense_in",
            at(3, IN, data, A::SetLength(5)),
            Reset(ended),
        ),
        case(
            "length_plausible_out",
            at(3, OUT, data, A::SetLength(1000)),
            Reset(ended),
        ),
        case(
            "length_plausible_in",
            at(3, IN, data, A::SetLength(1000)),
            ResetMaybeBystander(ended),
        ),
        case(
            "magic_out",
            at(3, OUT, data, A::SetMagic(0xdead)),
            Reset(ended),
        ),
        case("magic_in", at(3, IN, data, A::SetMagic(0xdead)), Reset(seq)),
        case(
            "protocol_out",
            at(3, OUT, data, A::SetProtocol(77)),
            Reset(ended),
        ),
        case(
            "protocol_in",
            at(3, IN, data, A::SetProtocol(77)),
            Reset(seq),
        ),
        case("mux_seq_out", at(3, OUT, data, A::MuxSeqOffset(9)), Intact),
        case("mux_seq_in", at(3, IN, data, A::MuxSeqOffset(9)), Intact),
        case(
            "tcp_seq_out",
            at(3, OUT, data, A::SeqOffset(100)),
            Reset(ended),
        ),
        case("tcp_seq_in", at(3, IN, data, A::SeqOffset(100)), Reset(seq)),
        case(
            "ack_beyond_out",
            at(3, OUT, on7(K::Tcp), A::AckOffset(1 << 20)),
            Reset(ended),
        ),
        case(
            "ack_beyond_in",
            at(3, IN, on7(K::Tcp), A::AckOffset(1 << 20)),
            Reset("beyond data sent"),
        ),
        case(
            "overrun_window_out",
            // The first data packet the overrun can apply to: it applies only where the window
            // left is under one packet, which a phone that keeps up leaves rarely — a CI run
            // under load once saw fewer than four such packets in the 2 MiB.
            at(0, OUT, data, A::OverrunWindow { extra: 100 }),
            Reset(ended),
        ),
        case(
            "overrun_window_in",
            at(
                0,
                IN,
                Filter::on_port(K::Data, SOURCE),
                A::OverrunWindow { extra: 100 },
            ),
            Reset("window overflow|unexpected sequence number|connection to port 19 ended"),
        )
        .victim(SOURCE)
        .mode(Mode::StalledSource),
        case(
            "fin_on_data_out",
            at(3, OUT, data, A::SetFlags(0x11)),
            Reset(ended),
        ),
        case(
            "fin_on_data_in",
            at(3, IN, data, A::SetFlags(0x11)),
            Reset("FIN"),
        ),
        case(
            "zero_window_update_out",
            at(2, OUT, Filter::on_port(K::PureAck, SOURCE), A::SetWindow(0)),
            Intact,
        )
        .victim(SOURCE)
        .mode(Mode::StalledSource),
        case(
            "zero_window_update_in",
            at(2, IN, Filter::on_port(K::PureAck, DIGEST), A::SetWindow(0)),
            Intact,
        )
        .victim(DIGEST),
        case(
            "zero_window_synack_in",
            at(0, IN, on7(K::SynAck), A::SetWindow(0)),
            Intact,
        ),
        case(
            "inject_rst_out",
            at(
                3,
                OUT,
                data,
                A::InjectRst {
                    text: "amnesia".into(),
                },
            ),
            Reset(ended),
        ),
        case(
            "inject_rst_in",
            at(
                3,
                IN,
                data,
                A::InjectRst {
                    text: "amnesia".into(),
                },
            ),
            Reset("amnesia"),
        ),
        case(
            "inject_control_out",
            at(
                3,
                OUT,
                data,
                A::InjectControl {
                    kind: 3,
                    text: "hello from the matrix".into(),
                },
            ),
            Intact,
        ),
        case(
            "inject_control_in",
            at(
                3,
                IN,
                data,
                A::InjectControl {
                    kind: 3,
                    text: "hello from the matrix".into(),
                },
            ),
            Intact,
        )
        .log("hello from the matrix"),
        case(
            "answer_version_1_out",
            at(0, OUT, Filter::kind(K::Version), A::AnswerVersion(1)),
            Intact,
        ),
        case(
            "answer_version_1_in",
            at(0, IN, Filter::kind(K::Version), A::AnswerVersion(1)),
            Refused,
        ),
        case(
            "answer_version_3_out",
            at(0, OUT, Filter::kind(K::Version), A::AnswerVersion(3)),
            Intact,
        ),
        case(
            "answer_version_3_in",
            at(0, IN, Filter::kind(K::Version), A::AnswerVersion(3)),
            HandshakeFails("handshake failed"),
        ),
        case(
            "split_out",
            at(3, OUT, data, A::Split { max_len: 1000 }),
            Reset(ended),
        ),
        case(
            "split_in",
            at(3, IN, data, A::Split { max_len: 1000 }),
            Intact,
        ),
        case(
            "pack_out",
            at(
                3,
                OUT,
                data,
                A::Pack {
                    count: 3,
                    max_hold_micros: 100_000,
                },
            ),
            ResetMaybeBystander(ended),
        ),
        case(
            "pack_in",
            at(
                3,
                IN,
                data,
                A::Pack {
                    count: 3,
                    max_hold_micros: 100_000,
                },
            ),
            Intact,
        ),
        case(
            "omit_zlp_out",
            at(1, OUT, data, A::OmitZlp),
            ResetMaybeBystander(ended),
        )
        .mode(Mode::PingPong),
        case("omit_zlp_in", at(1, IN, data, A::OmitZlp), Intact).mode(Mode::PingPong),
        case("unplug_out", at(5, OUT, data, A::Unplug), Dropped),
        case("unplug_in", at(5, IN, data, A::Unplug), Dropped),
        case(
            "stop_reading_out",
            at(3, OUT, data, A::StopReading { micros: 300_000 }),
            Intact,
        ),
        case(
            "stop_reading_in",
            at(3, IN, data, A::StopReading { micros: 300_000 }),
            Intact,
        ),
        case(
            "slow_link_out",
            at(
                3,
                OUT,
                data,
                A::SlowLink {
                    bytes_per_sec: 4_000_000,
                },
            ),
            Intact,
        ),
        case(
            "slow_link_in",
            at(
                3,
                IN,
                data,
                A::SlowLink {
                    bytes_per_sec: 4_000_000,
                },
            ),
            Intact,
        ),
    ];
    if let Ok(filter) = std::env::var("FAULT_CASE") {
        v.retain(|c| c.name.contains(&filter));
    }
    v
}

/// One transfer's end: Ok, or the error kind and how many bytes came back first.
#[derive(Debug)]
enum End {
    Ok,
    /// The Connect was refused.
    Refused,
    /// The connection ended early; what came back was a correct prefix.
    Cut(io::ErrorKind, #[allow(dead_code)] usize),
    /// Wrong bytes came back (always a failure).
    Corrupt(String),
}

/// Connects to `port` of `device_id` and moves [`TRANSFER`] bytes (echo: compared; digest:
/// hashed) the way `mode` says.
fn transfer(address: &str, device_id: u32, port: u16, seed: u64, mode: Mode) -> End {
    let s = match hostile::connect(address, device_id, port) {
        Ok(s) => s,
        Err(usbmux_host::proto::ResultCode::ConnectionRefused) => return End::Refused,
        Err(e) => return End::Corrupt(format!("Connect answered {e:?}")),
    };
    let data = usbmux_tests::net::pattern(seed, TRANSFER);
    match (port, mode) {
        (DIGEST, _) => {
            let mut msg = (data.len() as u64).to_be_bytes().to_vec();
            msg.extend_from_slice(&data);
            let hash = Sha256::digest(&data);
            pipe(&s, &msg, &hash, false)
        }
        (_, Mode::PingPong) => ping_pong(s, &data[..476 * 200]),
        (_, Mode::StalledSource) => stalled_source(s),
        (_, _) => pipe(&s, &data, &data, false),
    }
}

/// Reads the source service after a stall of one second (see [`Mode::StalledSource`]).
fn stalled_source(mut s: ClientStream) -> End {
    std::thread::sleep(Duration::from_secs(1));
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    while got < 32 << 20 {
        match s.read(&mut buf) {
            Ok(0) => return End::Cut(io::ErrorKind::UnexpectedEof, got as usize),
            Ok(n) => {
                let bad = buf[..n]
                    .iter()
                    .enumerate()
                    .position(|(i, b)| *b != usbmux_sim::service::source_byte(got + i as u64));
                if let Some(i) = bad {
                    return End::Corrupt(format!("source byte {} differs", got + i as u64));
                }
                got += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return End::Cut(e.kind(), got as usize),
        }
    }
    End::Ok
}

/// Echo, one 476-byte chunk at a time.
fn ping_pong(mut s: ClientStream, data: &[u8]) -> End {
    let mut back = [0u8; 476];
    for (i, chunk) in data.chunks(476).enumerate() {
        if let Err(e) = s.write_all(chunk) {
            return End::Cut(e.kind(), i * 476);
        }
        if let Err(e) = s.read_exact(&mut back) {
            return End::Cut(e.kind(), i * 476);
        }
        if back[..] != *chunk {
            return End::Corrupt(format!("chunk {i} differs"));
        }
    }
    End::Ok
}

/// Writes `data` while reading `expect` back, with a prefix check of whatever comes back before
/// an error. A reset seen by the writer counts as the connection's end when the reader then
/// sees EOF (the kernel reports a reset once, to whichever call comes first). A slow reader
/// shrinks its receive buffer and starts reading after a second, so the daemon's window for
/// the connection closes.
fn pipe(s: &ClientStream, data: &[u8], expect: &[u8], slow_reader: bool) -> End {
    let (Ok(mut reader), Ok(mut writer)) = (s.try_clone(), s.try_clone()) else {
        return End::Cut(io::ErrorKind::Other, 0);
    };
    std::thread::scope(|sc| {
        let w = sc.spawn(move || {
            for chunk in data.chunks(64 * 1024) {
                if let Err(e) = writer.write_all(chunk) {
                    return Some(e.kind());
                }
            }
            None
        });
        if slow_reader {
            if let ClientStream::Tcp(t) = s {
                let _ = nix::sys::socket::setsockopt(t, nix::sys::socket::sockopt::RcvBuf, &4096);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        let end = loop {
            if got == expect.len() {
                break End::Ok;
            }
            let want = buf.len().min(expect.len() - got);
            match reader.read(&mut buf[..want]) {
                Ok(0) => break End::Cut(io::ErrorKind::UnexpectedEof, got),
                Ok(n) => {
                    if buf[..n] != expect[got..got + n] {
                        break End::Corrupt(format!(
                            "reply differs within bytes {got}..{}",
                            got + n
                        ));
                    }
                    got += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break End::Cut(e.kind(), got),
            }
        };
        if !matches!(end, End::Ok) {
            // Unblock the writer (it may wait on a full socket).
            if let ClientStream::Tcp(t) = s {
                let _ = t.shutdown(std::net::Shutdown::Both);
            }
        }
        let writer_saw = w.join().ok().flatten();
        match (end, writer_saw) {
            (End::Cut(io::ErrorKind::UnexpectedEof, got), Some(io::ErrorKind::ConnectionReset)) => {
                End::Cut(io::ErrorKind::ConnectionReset, got)
            }
            (end, _) => end,
        }
    })
}

fn is_reset(e: &End) -> bool {
    matches!(e, End::Cut(k, _) if matches!(k, io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe))
}

/// Runs one case; `Err` describes what went wrong.
fn run_case(c: &FaultCase) -> Result<String, String> {
    let phones = vec![
        PhoneSpec::faulty(1, c.faults.clone()).unplugged(),
        PhoneSpec::healthy(2),
    ];
    let Some(rig) = Rig::start_with(true, phones) else {
        return Ok("skipped: no usbmuxd binary".into());
    };
    let a = rig.phones.phone(0).clone();
    // A starts unplugged: the baseline is B alone.
    let b_id = rig.wait_devices(&[rig.phones.phone(1).udid()])[0].device_id as u32;
    let fds0 = rig.stable_fds();
    let (rss0, _) = rig.rss_kib();
    a.plug_in();
    let fail = |what: String| {
        Err(format!(
            "{what}\n--- daemon log (tail):\n{}",
            rig.log_tail()
        ))
    };

    // A's id (or, for handshake failures, the proof that A stays away until its second plug).
    let a_id = match c.expect {
        Expect::HandshakeFails(_) => {
            // A is listed only from its second plug on: the first never finishes the
            // handshake (which may fail at once or after the 3 s of VERSION retries).
            let Some(id) =
                usbmux_tests::net::poll_until(Duration::from_secs(15), || rig.device_id(0))
            else {
                return fail(format!("A never came back (plugs {})", a.plugs()));
            };
            if a.plugs() < 2
                || a.history()
                    .first()
                    .is_none_or(|p| p.end != "daemon unplugged")
            {
                return fail(format!(
                    "A was listed on its first plug (plugs {}, {:?})",
                    a.plugs(),
                    a.history()
                ));
            }
            id
        }
        _ => {
            let Some(id) =
                usbmux_tests::net::poll_until(Duration::from_secs(10), || rig.device_id(0))
            else {
                return fail("A was never listed".into());
            };
            id
        }
    };

    // The four transfers at once.
    let addr = rig.address().to_owned();
    let (victim, bystander, b_echo, b_digest) = std::thread::scope(|s| {
        let other = if c.victim == ECHO { DIGEST } else { ECHO };
        let v = s.spawn(|| transfer(&addr, a_id, c.victim, 1, c.mode));
        let addr_y = &addr;
        let y = s.spawn(move || {
            if c.solo {
                End::Ok
            } else {
                transfer(addr_y, a_id, other, 2, Mode::Stream)
            }
        });
        let be = s.spawn(|| transfer(&addr, b_id, ECHO, 3, Mode::Stream));
        let bd = s.spawn(|| transfer(&addr, b_id, DIGEST, 4, Mode::Stream));
        let j = |h: std::thread::ScopedJoinHandle<'_, End>| {
            h.join().unwrap_or(End::Corrupt("thread panicked".into()))
        };
        (j(v), j(y), j(be), j(bd))
    });
    let ends = format!("victim {victim:?}, bystander {bystander:?}");
    if !matches!((&b_echo, &b_digest), (End::Ok, End::Ok)) {
        return fail(format!(
            "phone B was affected: echo {b_echo:?}, digest {b_digest:?} ({ends})"
        ));
    }
    for e in [&victim, &bystander] {
        if let End::Corrupt(what) = e {
            return fail(format!("corrupted bytes reached a client: {what} ({ends})"));
        }
    }
    // The fault really fired (on the first plug).
    let fired = match a.history().first() {
        Some(first) => first.fired.clone(),
        None => a.fired_now(),
    };
    if fired.is_empty() {
        return fail(format!("the fault never fired ({ends})"));
    }
    // `a|b`: either text.
    let log_has = |t: &str| {
        usbmux_tests::net::poll_until(Duration::from_secs(3), || {
            let log = rig.log();
            t.split('|').any(|t| log.contains(t)).then_some(())
        })
        .is_some()
    };
    match c.expect {
        Expect::Intact | Expect::HandshakeFails(_) => {
            if !matches!((&victim, &bystander), (End::Ok, End::Ok)) {
                return fail(format!("expected intact: {ends}"));
            }
        }
        Expect::Reset(t) | Expect::ResetMaybeBystander(t) | Expect::ResetOrRefused(t) => {
            let victim_ok = is_reset(&victim)
                || matches!(c.expect, Expect::ResetOrRefused(_)) && matches!(victim, End::Refused);
            if !victim_ok {
                return fail(format!("expected the victim reset: {ends}"));
            }
            let by_ok = matches!(bystander, End::Ok)
                || matches!(c.expect, Expect::ResetMaybeBystander(_)) && is_reset(&bystander);
            if !by_ok {
                return fail(format!("expected the bystander intact: {ends}"));
            }
            if !log_has(t) {
                return fail(format!("the log does not say {t:?} ({ends})"));
            }
        }
        Expect::Refused => {
            if !matches!(victim, End::Refused) || !matches!(bystander, End::Ok | End::Refused) {
                return fail(format!("expected the victim refused: {ends}"));
            }
        }
        Expect::Dropped => {
            if !is_reset(&victim) || !is_reset(&bystander) {
                return fail(format!("expected both of A's connections reset: {ends}"));
            }
            if !log_has("gone") {
                return fail("the log does not say the device is gone".into());
            }
        }
    }
    if let Expect::HandshakeFails(t) = c.expect {
        if !log_has(t) {
            return fail(format!("the log does not say {t:?}"));
        }
    }
    if let Some(t) = c.log {
        if !log_has(t) {
            return fail(format!("the log does not say {t:?}"));
        }
    }
    // A usable again (after a re-plug where it was dropped), the daemon responsive.
    let a_now = match usbmux_tests::net::poll_until(Duration::from_secs(10), || {
        rig.device_id(0)
            .filter(|id| !matches!(c.expect, Expect::Dropped) || *id != a_id)
    }) {
        Some(id) => id,
        None => return fail("A is not listed (again) after the fault".into()),
    };
    if !matches!(c.expect, Expect::Refused) {
        let again = transfer(rig.address(), a_now, ECHO, 9, Mode::PingPong);
        if !matches!(again, End::Ok) {
            return fail(format!("A unusable after the fault: {again:?}"));
        }
    }
    let latency = rig.assert_responsive();
    // Back to the baseline: A unplugged, every client gone.
    a.unplug();
    if usbmux_tests::net::poll_until(Duration::from_secs(10), || {
        rig.device_id(0).is_none().then_some(())
    })
    .is_none()
    {
        return fail("A still listed after the unplug".into());
    }
    let fds_ok = usbmux_tests::net::poll_until(Duration::from_secs(10), || {
        (rig.fds() == fds0).then_some(())
    });
    if fds_ok.is_none() {
        return fail(format!(
            "fds {} did not return to the baseline {fds0}: {}",
            rig.fds(),
            hostile::fd_listing(rig.pid())
        ));
    }
    let (_, hwm) = rig.rss_kib();
    if hwm > rss0 + RSS_BOUND_KIB {
        return fail(format!("peak RSS {hwm} KiB, baseline {rss0} KiB"));
    }
    rig.stop();
    Ok(format!(
        "{ends}; ListDevices {latency:?}; fds {fds0}; RSS {rss0} -> peak {hwm} KiB"
    ))
}

#[test]
fn fault_matrix() {
    let cases = cases();
    assert!(!cases.is_empty(), "no case matches FAULT_CASE");
    let queue = Mutex::new(cases.iter().collect::<Vec<_>>());
    let failures = Mutex::new(Vec::new());
    let t0 = Instant::now();
    // Most of a case is waiting (timeouts, settling): several run at once, each on its own
    // daemon, so they cannot disturb each other's fd counts.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let Some(c) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
                    return;
                };
                let t = Instant::now();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(c)))
                    .unwrap_or_else(|_| Err("panicked".into()));
                match r {
                    Ok(summary) => {
                        eprintln!("case {:<24} ok in {:>5.1?}: {summary}", c.name, t.elapsed())
                    }
                    Err(e) => {
                        eprintln!("case {:<24} FAILED: {e}", c.name);
                        failures
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(c.name);
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_else(|e| e.into_inner());
    eprintln!("{} cases in {:?}", cases.len(), t0.elapsed());
    assert!(failures.is_empty(), "failed cases: {failures:?}");
}

// ---- the named scenarios ----

/// A rig whose phone A (index 0, `a_spec`) starts unplugged, with the baseline (B alone)
/// taken: (rig, B's DeviceID, fds, RSS KiB).
fn scenario(a_spec: PhoneSpec) -> Option<(Rig, u32, usize, u64)> {
    let rig = Rig::start_with(true, vec![a_spec.unplugged(), PhoneSpec::healthy(2)])?;
    let b_id = rig.wait_devices(&[rig.phones.phone(1).udid()])[0].device_id as u32;
    let fds0 = rig.stable_fds();
    let (rss0, _) = rig.rss_kib();
    Some((rig, b_id, fds0, rss0))
}

/// The end of every scenario: responsive, A unplugged, fds exactly at the baseline, peak RSS
/// within `bound_kib` of it, a clean exit.
fn scenario_end(rig: Rig, fds0: usize, rss0: u64, bound_kib: u64) {
    let latency = rig.assert_responsive();
    rig.phones.phone(0).unplug();
    let gone = usbmux_tests::net::poll_until(Duration::from_secs(10), || {
        rig.device_id(0).is_none().then_some(())
    });
    assert!(gone.is_some(), "A still listed after the unplug");
    rig.assert_fds_return(fds0, Duration::from_secs(10));
    let (_, hwm) = rig.rss_kib();
    eprintln!("ListDevices {latency:?}; fds {fds0}; RSS {rss0} KiB -> peak {hwm} KiB");
    assert!(
        hwm <= rss0 + bound_kib,
        "peak RSS {hwm} KiB, baseline {rss0} KiB, bound {bound_kib} KiB"
    );
    rig.stop();
}

/// B's two transfers, run while `during` runs; both must be byte-exact.
fn with_b_traffic<T>(rig: &Rig, b_id: u32, during: impl FnOnce() -> T) -> T {
    let addr = rig.address().to_owned();
    std::thread::scope(|s| {
        let be = s.spawn(|| transfer(&addr, b_id, ECHO, 30, Mode::Stream));
        let bd = s.spawn(|| transfer(&addr, b_id, DIGEST, 31, Mode::Stream));
        let r = during();
        let be = be.join().unwrap_or(End::Corrupt("panicked".into()));
        let bd = bd.join().unwrap_or(End::Corrupt("panicked".into()));
        assert!(
            matches!((&be, &bd), (End::Ok, End::Ok)),
            "phone B affected: echo {be:?}, digest {bd:?}\n{}",
            rig.log_tail()
        );
        r
    })
}

fn wait_a(rig: &Rig, not: Option<u32>) -> u32 {
    usbmux_tests::net::poll_until(Duration::from_secs(10), || {
        rig.device_id(0).filter(|id| Some(*id) != not)
    })
    .unwrap_or_else(|| panic!("A not listed (again)\n{}", rig.log_tail()))
}

#[test]
fn unplug_during_50_simultaneous_transfers() {
    let Some((rig, b_id, fds0, rss0)) = scenario(PhoneSpec::healthy(1)) else {
        return;
    };
    let a = rig.phones.phone(0).clone();
    a.plug_in();
    let a_id = wait_a(&rig, None);
    let data = usbmux_tests::net::pattern(7, 8 << 20);
    let started = std::sync::atomic::AtomicUsize::new(0);
    let ends = with_b_traffic(&rig, b_id, || {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..50)
                .map(|i| {
                    let (data, started, addr) = (&data, &started, rig.address());
                    s.spawn(move || {
                        let port = if i % 2 == 0 { ECHO } else { DIGEST };
                        let Ok(c) = hostile::connect(addr, a_id, port) else {
                            return End::Refused;
                        };
                        started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        // No bytes until all 50 are connected (on a loaded machine the first
                        // could otherwise finish before the last one connects).
                        let _ = usbmux_tests::net::poll_until(Duration::from_secs(20), || {
                            (started.load(std::sync::atomic::Ordering::SeqCst) == 50).then_some(())
                        });
                        if port == DIGEST {
                            let mut msg = (data.len() as u64).to_be_bytes().to_vec();
                            msg.extend_from_slice(data);
                            pipe(&c, &msg, &Sha256::digest(data), false)
                        } else {
                            pipe(&c, data, data, false)
                        }
                    })
                })
                .collect();
            let all = usbmux_tests::net::poll_until(Duration::from_secs(20), || {
                (started.load(std::sync::atomic::Ordering::SeqCst) == 50).then_some(())
            });
            assert!(all.is_some(), "not all 50 connections opened");
            std::thread::sleep(Duration::from_millis(50));
            a.unplug_for(Duration::from_millis(200));
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(End::Corrupt("panicked".into())))
                .collect::<Vec<_>>()
        })
    });
    let reset = ends.iter().filter(|e| is_reset(e)).count();
    assert_eq!(reset, 50, "every transfer on A must be reset: {ends:?}");
    assert!(rig.wait_log("gone", Duration::from_secs(3)));
    let again = wait_a(&rig, Some(a_id));
    assert!(matches!(
        transfer(rig.address(), again, ECHO, 8, Mode::PingPong),
        End::Ok
    ));
    scenario_end(rig, fds0, rss0, 64 * 1024);
}

#[test]
fn phone_that_never_answers_the_version() {
    // Every plug of A drops every VERSION reply: each attempt fails after the host's 3 s of
    // retries, the daemon's watcher plugs A in again, and A is never listed; B is served
    // throughout and nothing accumulates.
    let never = Faults::one(every(IN, Filter::kind(PacketKind::Version), Action::Drop));
    let Some((rig, b_id, fds0, rss0)) = scenario(PhoneSpec::always_faulty(1, never)) else {
        return;
    };
    let a = rig.phones.phone(0).clone();
    a.plug_in();
    let t = Instant::now();
    with_b_traffic(&rig, b_id, || {
        while t.elapsed() < Duration::from_secs(7) {
            assert!(rig.device_id(0).is_none(), "A was listed");
            rig.assert_responsive();
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    assert!(
        a.plugs() >= 2,
        "the daemon tried only {} time(s)",
        a.plugs()
    );
    let failures = rig.log().matches("handshake failed").count();
    assert!(failures >= 2, "{failures} handshake failures logged");
    scenario_end(rig, fds0, rss0, 32 * 1024);
}

#[test]
fn phone_that_floods_control_messages() {
    // After every packet A sends, a CONTROL error; and 2000 more at 1 ms intervals. The daemon
    // logs 10 a second and counts the rest, and carries on: A's transfers and B's are intact.
    let mut flood = Faults::one(every(
        IN,
        Filter::ANY,
        Action::InjectControl {
            kind: 3,
            text: "flood".into(),
        },
    ));
    for i in 0..2000u64 {
        flood = flood.with(Rule::at_time(
            200_000 + i * 1000,
            IN,
            Filter::ANY,
            Action::InjectControl {
                kind: 5,
                text: format!("flood {i}"),
            },
        ));
    }
    let Some((rig, b_id, fds0, rss0)) = scenario(PhoneSpec::faulty(1, flood)) else {
        return;
    };
    let a = rig.phones.phone(0).clone();
    a.plug_in();
    let a_id = wait_a(&rig, None);
    let addr = rig.address().to_owned();
    let (e, d) = with_b_traffic(&rig, b_id, || {
        std::thread::scope(|s| {
            let e = s.spawn(|| transfer(&addr, a_id, ECHO, 40, Mode::Stream));
            let d = s.spawn(|| transfer(&addr, a_id, DIGEST, 41, Mode::Stream));
            std::thread::sleep(Duration::from_millis(2500));
            // One more after the flood's second is over, which reports the suppressed ones.
            let _ = transfer(&addr, a_id, ECHO, 42, Mode::PingPong);
            (e.join(), d.join())
        })
    });
    assert!(matches!((e, d), (Ok(End::Ok), Ok(End::Ok))));
    let fired = a.fired_now().len();
    assert!(fired > 2000, "only {fired} CONTROL messages were injected");
    assert!(rig.log().contains("flood"));
    // The daemon logs at most 10 of them per second (and says how many it left out).
    let log = rig.log();
    let says = log.matches("device says").count();
    eprintln!("{fired} CONTROL messages, {says} logged");
    assert!(
        (1..=60).contains(&says),
        "{says} CONTROL messages logged for {fired} received"
    );
    assert!(log.contains("more device messages not logged"));
    scenario_end(rig, fds0, rss0, 32 * 1024);
}

#[test]
fn phone_that_ignores_the_window() {
    // A pads every data packet it can past the host's window: each of A's stalled readers is
    // reset with "window overflow", A stays attached, B is intact.
    let rude = Faults::one(every(
        IN,
        Filter::kind(PacketKind::Data),
        Action::OverrunWindow { extra: 1000 },
    ));
    let Some((rig, b_id, fds0, rss0)) = scenario(PhoneSpec::faulty(1, rude)) else {
        return;
    };
    let a = rig.phones.phone(0).clone();
    a.plug_in();
    let a_id = wait_a(&rig, None);
    let addr = rig.address().to_owned();
    let ends = with_b_traffic(&rig, b_id, || {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|i| {
                    let addr = &addr;
                    s.spawn(move || transfer(addr, a_id, SOURCE, 50 + i, Mode::StalledSource))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or(End::Corrupt("panicked".into())))
                .collect::<Vec<_>>()
        })
    });
    assert!(ends.iter().all(is_reset), "{ends:?}");
    // Padding that reaches past the window the host last advertised but not past the one it
    // has already decided (its update still on the way) is taken as data up to the edge, and
    // the phone's next packet is then out of sequence (on a loaded machine, where updates
    // travel slowly, that is the usual case): each of the four connections ends with one of the
    // two reasons logged.
    let log = rig.log();
    let reasons: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("connection to port 19 ended: ").nth(1))
        .collect();
    assert!(
        reasons.len() >= 4
            && reasons
                .iter()
                .all(|r| r.starts_with("window overflow") || r.starts_with("unexpected sequence")),
        "reasons logged: {reasons:?}; ends {ends:?}"
    );
    assert_eq!(rig.device_id(0), Some(a_id), "A must stay attached");
    scenario_end(rig, fds0, rss0, 48 * 1024);
}

#[test]
fn ten_rapid_plug_unplug_cycles() {
    // A is unplugged as soon as it is listed, ten times, each time with a transfer in flight;
    // every replug gets a new DeviceID, B's transfers span all ten.
    let Some((rig, b_id, fds0, rss0)) = scenario(PhoneSpec::healthy(1)) else {
        return;
    };
    let a = rig.phones.phone(0).clone();
    a.plug_in();
    let mut ids = vec![wait_a(&rig, None)];
    with_b_traffic(&rig, b_id, || {
        for _ in 0..10 {
            let id = *ids.last().expect("an id");
            let c = hostile::connect(rig.address(), id, ECHO).expect("connect");
            let (mut w, data) = (
                c.try_clone().expect("clone"),
                usbmux_tests::net::pattern(1, 1 << 20),
            );
            let writer = std::thread::spawn(move || w.write_all(&data).is_ok());
            a.unplug_for(Duration::ZERO);
            let mut r = c;
            let end = usbmux_tests::net::read_until_closed(&mut r);
            assert!(
                end.is_ok(),
                "the connection was not closed by the unplug: {end:?}"
            );
            let _ = writer.join();
            ids.push(wait_a(&rig, Some(id)));
        }
    });
    assert!(ids.windows(2).all(|w| w[1] > w[0]), "DeviceIDs {ids:?}");
    assert!(a.plugs() >= 11);
    assert!(matches!(
        transfer(
            rig.address(),
            *ids.last().expect("id"),
            ECHO,
            9,
            Mode::PingPong
        ),
        End::Ok
    ));
    scenario_end(rig, fds0, rss0, 32 * 1024);
}

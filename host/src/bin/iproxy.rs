//! `iproxy`: forwards local TCP ports to TCP ports on a device, through usbmuxd.
//!
//! The interface of libusbmuxd's `iproxy`, so scripts keep working. Each accepted local
//! connection looks the device up again (a replugged phone has a new DeviceID) and gets its own
//! usbmuxd connection; many run in parallel, each on its own pair of copying threads.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use usbmux_host::client::Client;
use usbmux_host::tools::{pump_with, CopyMethod, DeviceFilter};

const ABOUT: &str = "Forward local TCP ports to TCP ports on a device, through usbmuxd.

Each LOCAL_PORT:DEVICE_PORT pair listens on LOCAL_PORT (loopback only unless -s names another
address) and connects every accepted connection to DEVICE_PORT on the device.

usbmux cannot forward the other way: a service on the device cannot connect to a port of this
computer. Only the computer opens connections.";

/// Forward local TCP ports to a device's ports.
#[derive(Parser, Debug)]
#[command(name = "iproxy", version, about = ABOUT, disable_version_flag = true)]
struct Cli {
    /// LOCAL_PORT:DEVICE_PORT pairs, or the legacy form LOCAL_PORT DEVICE_PORT.
    #[arg(required = true, value_name = "LOCAL_PORT:DEVICE_PORT")]
    pairs: Vec<String>,
    /// Target the device with this UDID.
    #[arg(short = 'u', long = "udid")]
    udid: Option<String>,
    /// Connect to network devices only.
    #[arg(short = 'n', long = "network", conflicts_with = "local")]
    network: bool,
    /// Connect to USB devices only.
    #[arg(short = 'l', long = "local")]
    local: bool,
    /// Listen on this address instead of loopback (IPv4 127.0.0.1 and IPv6 ::1). Binding all
    /// interfaces exposes the device to the network: say so explicitly with -s 0.0.0.0.
    #[arg(short = 's', long = "source", value_name = "ADDR")]
    source: Option<IpAddr>,
    /// Print debug output to standard error.
    #[arg(short = 'd', long = "debug")]
    debug: bool,
    /// The usbmuxd socket (default: USBMUXD_SOCKET_ADDRESS, else /var/run/usbmuxd).
    #[arg(long = "socket", value_name = "ADDR")]
    socket: Option<String>,
    /// How to copy between the sockets: "buffer" (read/write through a 256 KiB buffer) or
    /// "splice" (Linux splice(2) through a pipe). BENCHMARKS.md has the measurements.
    #[arg(long = "copy", value_name = "METHOD", default_value = "buffer",
          value_parser = ["buffer", "splice"])]
    copy: String,
    /// Print the version.
    #[arg(short = 'v', long = "version", action = clap::ArgAction::Version)]
    version: (),
}

/// Parses the port pairs: `L:D ...` or the legacy `L D`.
fn parse_pairs(args: &[String]) -> Result<Vec<(u16, u16)>, String> {
    let port = |s: &str| {
        s.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("invalid port {s:?}"))
    };
    if args.len() == 2 && !args[0].contains(':') && !args[1].contains(':') {
        return Ok(vec![(port(&args[0])?, port(&args[1])?)]);
    }
    args.iter()
        .map(|a| {
            let (l, d) = a
                .split_once(':')
                .ok_or_else(|| format!("expected LOCAL_PORT:DEVICE_PORT, got {a:?}"))?;
            Ok((port(l)?, port(d)?))
        })
        .collect()
}

struct Ctx {
    client: Client,
    filter: DeviceFilter,
    debug: bool,
    copy: CopyMethod,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iproxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let pairs = parse_pairs(&cli.pairs)?;
    let client = usbmux_host::tools::client(cli.socket.as_deref(), "iproxy")?;
    let ctx = Arc::new(Ctx {
        client,
        filter: DeviceFilter {
            udid: cli.udid.clone(),
            usb_only: cli.local,
            network_only: cli.network,
        },
        debug: cli.debug,
        copy: if cli.copy == "splice" {
            CopyMethod::Splice
        } else {
            CopyMethod::Buffer
        },
    });
    let addrs: Vec<IpAddr> = match cli.source {
        Some(a) => vec![a],
        None => vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ],
    };
    let mut threads = Vec::new();
    for (local, device) in pairs {
        let mut bound = 0;
        for ip in &addrs {
            match TcpListener::bind(SocketAddr::new(*ip, local)) {
                Ok(l) => {
                    bound += 1;
                    println!("Creating listening port {local} for device port {device} on {ip}");
                    let ctx = ctx.clone();
                    threads.push(std::thread::spawn(move || serve(l, device, ctx)));
                }
                // No IPv6 on this host: the IPv4 loopback suffices.
                Err(e) if cli.source.is_none() && ip.is_ipv6() => {
                    if cli.debug {
                        eprintln!("iproxy: not listening on [{ip}]:{local}: {e}");
                    }
                }
                Err(e) => return Err(format!("cannot listen on {ip} port {local}: {e}")),
            }
        }
        if bound == 0 {
            return Err(format!("cannot listen on port {local}"));
        }
    }
    println!("Waiting for connection");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn serve(listener: TcpListener, device_port: u16, ctx: Arc<Ctx>) {
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                let ctx = ctx.clone();
                std::thread::spawn(move || handle(s, device_port, &ctx));
            }
            Err(e) => eprintln!("iproxy: accept: {e}"),
        }
    }
}

/// One local connection: look the device up, connect, copy both ways.
fn handle(local: TcpStream, device_port: u16, ctx: &Ctx) {
    let peer = local
        .peer_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    let _ = local.set_nodelay(true);
    let device = match ctx.filter.pick(&ctx.client) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("iproxy: {peer}: {e}");
            return;
        }
    };
    let remote = match ctx.client.connect(device.device_id, device_port) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "iproxy: {peer}: cannot connect to port {device_port} of {}: {e}",
                device.udid
            );
            reset(&local);
            return;
        }
    };
    if ctx.debug {
        eprintln!("iproxy: {peer} -> {} port {device_port}", device.udid);
    }
    let (Ok(mut local_r), Ok(mut remote_w)) = (local.try_clone(), remote.try_clone()) else {
        return;
    };
    let copy = ctx.copy;
    let up = std::thread::spawn(move || {
        let r = pump_with(copy, &mut local_r, &mut remote_w);
        // The local client is done sending: end the device connection (usbmux has no
        // half-close; the daemon delivers what was written, then resets).
        let _ = remote_w.shutdown(Shutdown::Write);
        r
    });
    let mut remote_r = remote;
    let mut local_w = local;
    let down = pump_with(copy, &mut remote_r, &mut local_w);
    // The device ended first (usbmux has no FIN: the phone reset it): pass the reset on.
    if !up.is_finished() {
        reset(&local_w);
    } else {
        let _ = local_w.shutdown(Shutdown::Both);
    }
    let up = up
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("copy thread panicked")));
    if ctx.debug {
        eprintln!(
            "iproxy: {peer} closed ({:?} up, {:?} down)",
            up.ok(),
            down.ok()
        );
    }
}

/// Arranges for the local connection to end with an RST (SO_LINGER 0: the close that follows
/// when the last handle is dropped sends a reset, not a FIN), and stops our reading side so the
/// other copying thread lets go of its handle.
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
    let _ = s.shutdown(Shutdown::Read);
}

#[cfg(test)]
mod test {
    use super::parse_pairs;

    #[test]
    fn port_pairs() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_pairs(&s(&["2222:22"])), Ok(vec![(2222, 22)]));
        assert_eq!(parse_pairs(&s(&["2222", "22"])), Ok(vec![(2222, 22)]));
        assert_eq!(parse_pairs(&s(&["1:2", "3:4"])), Ok(vec![(1, 2), (3, 4)]));
        assert!(parse_pairs(&s(&["0:22"])).is_err());
        assert!(parse_pairs(&s(&["2222:x"])).is_err());
        assert!(parse_pairs(&s(&["2222"])).is_err());
        assert!(parse_pairs(&s(&["70000:1"])).is_err());
    }
}

//! `usbmuxctl`: look at and use a running usbmuxd (ours, libimobiledevice's or Apple's) from a
//! shell: devices, events, the SystemBUID, listeners, pair records, a raw connection.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;
use usbmux_host::client::{ConnectionType, Device, DeviceEvent};
use usbmux_host::tools::{pump, DeviceFilter};

/// Inspect and use a running usbmuxd.
#[derive(Parser, Debug)]
#[command(name = "usbmuxctl", version)]
struct Cli {
    /// The usbmuxd socket (default: USBMUXD_SOCKET_ADDRESS, else /var/run/usbmuxd).
    #[arg(long = "socket", value_name = "ADDR", global = true)]
    socket: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List the connected devices.
    List {
        /// One JSON array of objects instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print device events as they happen (attached, detached, paired) until interrupted.
    Listen {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Print the daemon's SystemBUID.
    Buid,
    /// List the clients in Listen mode.
    Listeners,
    /// Read, save or delete a device's pair record.
    PairRecord {
        #[command(subcommand)]
        op: PairOp,
    },
    /// Connect standard input and output to PORT on the device UDID (like inetcat).
    Connect {
        /// The device's UDID (either form).
        udid: String,
        /// The TCP port on the device.
        port: u16,
    },
}

#[derive(Subcommand, Debug)]
enum PairOp {
    /// Print the record (or write it to FILE).
    Read {
        /// The device's UDID.
        udid: String,
        /// Where to write it (default: standard output).
        file: Option<PathBuf>,
    },
    /// Store a record read from FILE (default: standard input).
    Save {
        /// The device's UDID.
        udid: String,
        /// The record, an XML or binary plist.
        file: Option<PathBuf>,
    },
    /// Delete the record.
    Delete {
        /// The device's UDID.
        udid: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usbmuxctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn conn_type(d: &Device) -> String {
    match &d.connection_type {
        ConnectionType::Usb => "USB".into(),
        ConnectionType::Network => "Network".into(),
        ConnectionType::Other(s) => s.clone(),
    }
}

fn device_json(d: &Device) -> serde_json::Value {
    json!({
        "device_id": d.device_id,
        "udid": usbmux_host::plist_msg::display_udid(&d.udid),
        "product_id": d.product_id,
        "location_id": d.location_id,
        "speed": d.connection_speed,
        "connection_type": conn_type(d),
    })
}

fn run(cli: Cli) -> Result<(), String> {
    let client = usbmux_host::tools::client(cli.socket.as_deref(), "usbmuxctl")?;
    let err = |e: usbmux_host::client::ClientError| e.to_string();
    match cli.command {
        Command::List { json } => {
            let devices = client.list_devices().map_err(err)?;
            if json {
                let v: Vec<_> = devices.iter().map(device_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<6} {:<42} {:<8} {:<10} {:<12} TYPE",
                    "ID", "UDID", "PRODUCT", "LOCATION", "SPEED"
                );
                for d in &devices {
                    println!(
                        "{:<6} {:<42} {:<8} {:<10} {:<12} {}",
                        d.device_id,
                        usbmux_host::plist_msg::display_udid(&d.udid),
                        format!("{:#06x}", d.product_id),
                        format!("{:#x}", d.location_id),
                        d.connection_speed
                            .map_or_else(|| "-".into(), |s| s.to_string()),
                        conn_type(d)
                    );
                }
            }
        }
        Command::Listen { json } => {
            let mut known: HashMap<u32, String> = HashMap::new();
            let stdout = io::stdout();
            for ev in client.listen().map_err(err)? {
                let (event, id, udid) = match ev.map_err(err)? {
                    DeviceEvent::Attached(d) => {
                        let u = usbmux_host::plist_msg::display_udid(&d.udid).into_owned();
                        known.insert(d.device_id, u.clone());
                        ("attached", d.device_id, u)
                    }
                    // Remembered: a detached device can no longer be asked who it was.
                    DeviceEvent::Detached { device_id } => (
                        "detached",
                        device_id,
                        known.remove(&device_id).unwrap_or_default(),
                    ),
                    DeviceEvent::Paired { device_id } => (
                        "paired",
                        device_id,
                        known.get(&device_id).cloned().unwrap_or_default(),
                    ),
                };
                let mut out = stdout.lock();
                let line = if json {
                    json!({"event": event, "device_id": id, "udid": udid}).to_string()
                } else {
                    format!("{event} {id} {udid}")
                };
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return Ok(());
                }
            }
        }
        Command::Buid => println!("{}", client.read_buid().map_err(err)?),
        Command::Listeners => {
            for l in client.list_listeners().map_err(err)? {
                println!(
                    "{} {} {}",
                    l.id_string.as_deref().unwrap_or("-"),
                    l.prog_name.as_deref().unwrap_or("-"),
                    l.lib_usbmux_version
                        .map_or_else(|| "-".into(), |v| v.to_string())
                );
            }
        }
        Command::PairRecord { op } => match op {
            PairOp::Read { udid, file } => {
                let data = client.read_pair_record(&udid).map_err(err)?;
                match file {
                    Some(f) => {
                        std::fs::write(&f, &data).map_err(|e| format!("{}: {e}", f.display()))?
                    }
                    None => io::stdout().write_all(&data).map_err(|e| e.to_string())?,
                }
            }
            PairOp::Save { udid, file } => {
                let data = match file {
                    Some(f) => std::fs::read(&f).map_err(|e| format!("{}: {e}", f.display()))?,
                    None => {
                        let mut v = Vec::new();
                        io::stdin().read_to_end(&mut v).map_err(|e| e.to_string())?;
                        v
                    }
                };
                client.save_pair_record(&udid, &data).map_err(err)?;
            }
            PairOp::Delete { udid } => client.delete_pair_record(&udid).map_err(err)?,
        },
        Command::Connect { udid, port } => {
            let filter = DeviceFilter {
                udid: Some(udid.clone()),
                ..DeviceFilter::default()
            };
            let d = filter.pick(&client).map_err(|e| e.to_string())?;
            let s = client
                .connect(d.device_id, port)
                .map_err(|e| format!("port {port} of {udid}: {e}"))?;
            let mut w = s.try_clone().map_err(|e| e.to_string())?;
            std::thread::spawn(move || {
                let _ = pump(&mut io::stdin().lock(), &mut w);
            });
            let mut r = s;
            pump(&mut r, &mut io::stdout().lock()).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

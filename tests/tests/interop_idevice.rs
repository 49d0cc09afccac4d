//! Interoperability with Debian 12's libimobiledevice-utils 1.3.0 (`idevice_id`, `ideviceinfo`,
//! `idevicepair`, `idevicesyslog`) on libusbmuxd 2.0.2, run against our in-process daemon with
//! simulated phones (`shared/PROTOCOL.md` §10.3 describes what each tool sends and prints).
//!
//! Each test has its own daemon, socket, config dir and phones; the tools find the daemon through
//! `USBMUXD_SOCKET_ADDRESS`. A missing tool fails the test under CI and skips it elsewhere.

use std::path::Path;
use std::time::Duration;

use usbmux_sim::PhoneConfig;
use usbmux_tests::client::wait_for_listener;
use usbmux_tests::daemon::{phones_from_toml, sim_udid, TestDaemon};
use usbmux_tests::net::{poll_until, SETTLE_TIMEOUT};
use usbmux_tests::tools::{require_tool, run_tool, ChildGuard, ToolOutput};

const IMD: &str = "libimobiledevice-utils";

/// A pre-A12 phone with a legacy 40-hex-digit UDID (lower case: tools must show it verbatim).
const LEGACY_UDID: &str = "0123456789abcdef0123456789abcdef01234567";

fn legacy_phone() -> PhoneConfig {
    phones_from_toml(&format!(
        "[[phone]]\nudid = \"{LEGACY_UDID}\"\nlocation_id = 0x00140000\ndevice_name = \"Legacy iPhone\"\n"
    ))
    .remove(0)
}

fn sim(k: u32) -> PhoneConfig {
    PhoneConfig::simulated(k)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort_unstable();
    v
}

/// `idevice_id -l` on `d`: exit 0, nothing on stderr; its lines, sorted.
fn idevice_id_list(d: &TestDaemon) -> Vec<String> {
    let out = run_tool(d.command("idevice_id").arg("-l"));
    assert_eq!(out.code(), Some(0), "idevice_id -l failed: {out:?}");
    assert_eq!(out.stderr, "", "idevice_id -l complained: {out:?}");
    sorted(out.stdout_lines().into_iter().map(str::to_owned).collect())
}

/// Runs `idevice_id -l` until it prints exactly `want` (any order), at most [`SETTLE_TIMEOUT`]:
/// plugging and unplugging take effect a little later.
fn wait_for_idevice_id(d: &TestDaemon, want: &[&str]) {
    let want = sorted(want.iter().map(|s| (*s).to_owned()).collect());
    let mut last = Vec::new();
    let ok = poll_until(SETTLE_TIMEOUT, || {
        last = idevice_id_list(d);
        (last == want).then_some(())
    });
    assert!(
        ok.is_some(),
        "idevice_id -l never printed {want:?}; last: {last:?}"
    );
}

#[test]
fn idevice_id_lists_exactly_the_plugged_phones_and_follows_plug_events() {
    if !require_tool("idevice_id", IMD) {
        return;
    }
    let (u1, u2) = (sim_udid(1), sim_udid(2));
    let d = TestDaemon::start(vec![sim(1), legacy_phone()]);
    d.wait_for_devices(&[&u1, LEGACY_UDID]);
    // New-style UDID with its hyphen, legacy one verbatim (lower case kept): §10.4.
    assert_eq!(
        idevice_id_list(&d),
        sorted(vec![u1.clone(), LEGACY_UDID.to_owned()])
    );

    d.detach(&u1);
    wait_for_idevice_id(&d, &[LEGACY_UDID]);
    d.attach(sim(2));
    wait_for_idevice_id(&d, &[&u2, LEGACY_UDID]);
    d.attach(sim(1));
    wait_for_idevice_id(&d, &[&u1, &u2, LEGACY_UDID]);
    d.detach(LEGACY_UDID);
    wait_for_idevice_id(&d, &[&u1, &u2]);
    d.detach(&u1);
    d.detach(&u2);
    wait_for_idevice_id(&d, &[]);
}

/// The top-level keys `ideviceinfo -s` prints for a locked, unpaired phone: the 25-key global
/// dictionary of PROTOCOL.md §10.6.1, sorted as lockdown sends them.
const GLOBAL_KEYS: [&str; 25] = [
    "BasebandCertId",
    "BasebandKeyHashInformation",
    "BasebandSerialNumber",
    "BasebandVersion",
    "BoardId",
    "BuildVersion",
    "CPUArchitecture",
    "ChipID",
    "DeviceClass",
    "DeviceColor",
    "DeviceName",
    "DieID",
    "HardwareModel",
    "HasSiDP",
    "PartitionType",
    "ProductName",
    "ProductType",
    "ProductVersion",
    "ProductionSOC",
    "ProtocolVersion",
    "SupportedDeviceFamilies",
    "TelephonyCapability",
    "UniqueChipID",
    "UniqueDeviceID",
    "WiFiAddress",
];

/// `ideviceinfo -s -u udid`: exit 0, and its output with every expected line present and the
/// top-level keys exactly [`GLOBAL_KEYS`].
fn check_simple_info(d: &TestDaemon, udid: &str, lines: &[String]) -> ToolOutput {
    let out = run_tool(d.command("ideviceinfo").args(["-s", "-u", udid]));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(out.stderr, "", "{out:?}");
    let printed = out.stdout_lines();
    for want in lines {
        assert!(
            printed.contains(&want.as_str()),
            "ideviceinfo -s -u {udid}: no line {want:?} in\n{}",
            out.stdout
        );
    }
    let keys: Vec<&str> = printed
        .iter()
        .filter(|l| !l.starts_with(' '))
        .map(|l| l.split(['[', ':']).next().unwrap_or_default())
        .collect();
    assert_eq!(keys, GLOBAL_KEYS, "top-level keys of\n{}", out.stdout);
    out
}

#[test]
fn ideviceinfo_simple_prints_the_simulators_values() {
    if !require_tool("ideviceinfo", IMD) {
        return;
    }
    let (u1, u2) = (sim_udid(1), sim_udid(2));
    let d = TestDaemon::start(vec![sim(1), sim(2), legacy_phone()]);
    d.wait_for_devices(&[&u1, &u2, LEGACY_UDID]);

    // New-style phones: iPhone 11, iOS 16.6 (PROTOCOL.md §10.9), with their own names and UDIDs.
    for (k, udid) in [(1, &u1), (2, &u2)] {
        let out = check_simple_info(
            &d,
            udid,
            &[
                format!("DeviceName: Simulated iPhone {k}"),
                format!("UniqueDeviceID: {udid}"),
                "ProductType: iPhone12,1".into(),
                "ProductVersion: 16.6".into(),
                "BuildVersion: 20G75".into(),
                "CPUArchitecture: arm64e".into(),
                "ChipID: 32816".into(),
                "DeviceClass: iPhone".into(),
                "HardwareModel: N104AP".into(),
                "ProductName: iPhone OS".into(),
                "ProtocolVersion: 2".into(),
                "WiFiAddress: a4:c3:f0:12:34:56".into(),
                "BasebandSerialNumber: EjRWeA==".into(),
                "TelephonyCapability: true".into(),
            ],
        );
        // Nested values are printed indented under their key (§10.9).
        assert!(
            out.stdout.contains("SupportedDeviceFamilies[1]: \n 0: 1\n"),
            "{}",
            out.stdout
        );
        assert!(
            out.stdout
                .contains("BasebandKeyHashInformation: \n AKeyStatus: 2\n"),
            "{}",
            out.stdout
        );
    }
    // The legacy phone: iPhone X values consistent with its 40-hex UDID (§10.10).
    check_simple_info(
        &d,
        LEGACY_UDID,
        &[
            "DeviceName: Legacy iPhone".into(),
            format!("UniqueDeviceID: {LEGACY_UDID}"),
            "ProductType: iPhone10,3".into(),
            "ProductVersion: 13.3.1".into(),
            "CPUArchitecture: arm64".into(),
            "ChipID: 32789".into(),
            "HardwareModel: D22AP".into(),
        ],
    );
    // Without -u the tool takes the first device of the list: one of ours, complete.
    let out = run_tool(d.command("ideviceinfo").arg("-s"));
    assert_eq!(out.code(), Some(0), "{out:?}");
    let udid_line = out
        .stdout_lines()
        .into_iter()
        .find(|l| l.starts_with("UniqueDeviceID: "))
        .map(str::to_owned);
    assert!(
        [&u1, &u2, LEGACY_UDID]
            .iter()
            .any(|u| udid_line == Some(format!("UniqueDeviceID: {u}"))),
        "{out:?}"
    );
}

#[test]
fn ideviceinfo_key_prints_exactly_the_configured_value() {
    if !require_tool("ideviceinfo", IMD) {
        return;
    }
    let phones = phones_from_toml(
        r#"
[[phone]]
udid = "00008101-000A1B2C3D4E5F60"
device_name = "Configured phone"
[phone.lockdown]
ProductVersion = "17.5"
ProductType = "iPhone13,2"
"#,
    );
    let udid = "00008101-000A1B2C3D4E5F60";
    let d = TestDaemon::start(phones);
    d.wait_for_devices(&[udid]);
    for (key, value) in [
        ("ProductVersion", "17.5"),
        ("ProductType", "iPhone13,2"),
        ("DeviceName", "Configured phone"),
        ("UniqueDeviceID", udid),
    ] {
        let out = run_tool(d.command("ideviceinfo").args(["-s", "-k", key]));
        assert_eq!(out.code(), Some(0), "-k {key}: {out:?}");
        assert_eq!(out.stdout, format!("{value}\n"), "-k {key}: {out:?}");
        assert_eq!(out.stderr, "", "-k {key}: {out:?}");
    }
    // A key that needs a session: lockdown answers MissingValue, the tool prints nothing and
    // exits 0 (§10.3: on the -s path errors are silent).
    let out = run_tool(d.command("ideviceinfo").args(["-s", "-k", "SerialNumber"]));
    assert_eq!((out.code(), out.stdout.as_str()), (Some(0), ""), "{out:?}");
}

#[test]
fn idevice_id_udid_prints_the_device_name() {
    if !require_tool("idevice_id", IMD) {
        return;
    }
    let (u1, u2) = (sim_udid(1), sim_udid(2));
    let d = TestDaemon::start(vec![sim(1), sim(2), legacy_phone()]);
    d.wait_for_devices(&[&u1, &u2, LEGACY_UDID]);
    for (udid, name) in [
        (u1.as_str(), "Simulated iPhone 1"),
        (u2.as_str(), "Simulated iPhone 2"),
        (LEGACY_UDID, "Legacy iPhone"),
    ] {
        let out = run_tool(d.command("idevice_id").arg(udid));
        assert_eq!(out.code(), Some(0), "idevice_id {udid}: {out:?}");
        assert_eq!(
            out.stdout,
            format!("{name}\n"),
            "idevice_id {udid}: {out:?}"
        );
    }
    // A UDID nobody plugged in: no name, an error naming it, a failure code.
    let absent = sim_udid(9);
    let out = run_tool(d.command("idevice_id").arg(&absent));
    assert_eq!(out.stdout, "", "{out:?}");
    assert_ne!(out.code(), Some(0), "{out:?}");
    assert!(out.stderr.contains(&absent), "{out:?}");
}

#[test]
fn ideviceinfo_with_pairing_is_refused_by_the_locked_phone() {
    if !require_tool("ideviceinfo", IMD) {
        return;
    }
    let refusing = "00008030-00000000000000AA";
    let mut phones = vec![sim(1)];
    phones.extend(phones_from_toml(&format!(
        "[[phone]]\nudid = \"{refusing}\"\nlocation_id = 0x00150000\n[phone.lockdown]\npair_refusal = \"UserDeniedPairing\"\n"
    )));
    let u1 = sim_udid(1);
    let d = TestDaemon::start(phones);
    d.wait_for_devices(&[&u1, refusing]);

    // Plain ideviceinfo takes the handshake path (QueryType, GetValue, ReadPairRecord, ReadBUID,
    // Pair): the default phone refuses Pair with PasswordProtected (§10.3).
    let out = run_tool(d.command("ideviceinfo").args(["-u", &u1]));
    assert_eq!(out.code(), Some(255), "{out:?}");
    assert_eq!(out.stdout, "", "{out:?}");
    assert!(
        out.stderr
            .lines()
            .any(|l| l == "ERROR: Could not connect to lockdownd: Password protected (-17)"),
        "{out:?}"
    );
    // A phone configured to refuse as "Don't Trust" does.
    let out = run_tool(d.command("ideviceinfo").args(["-u", refusing]));
    assert_eq!(out.code(), Some(255), "{out:?}");
    assert!(
        out.stderr
            .lines()
            .any(|l| l == "ERROR: Could not connect to lockdownd: User denied pairing (-18)"),
        "{out:?}"
    );
    // The tool saved nothing: no pair record appeared in the config dir.
    let records: Vec<_> = std::fs::read_dir(d.config_dir())
        .expect("config dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "SystemConfiguration.plist")
        .collect();
    assert!(
        records.is_empty(),
        "unexpected files in the config dir: {records:?}"
    );
}

/// What idevicesyslog 1.3.0 prints on stderr when lockdown refuses to pair with it.
fn logger_refused(udid: &str) -> String {
    format!("ERROR: Could not connect to lockdownd: -17\nCould not start logger for udid {udid}\n")
}

#[test]
fn idevicesyslog_finds_the_phone_through_listen_and_is_refused() {
    if !require_tool("idevicesyslog", IMD) {
        return;
    }
    let u1 = sim_udid(1);
    let d = TestDaemon::start(vec![sim(1)]);
    d.wait_for_devices(&[&u1]);
    // Without -u: ListDevices, then Listen; the Attached event of the phone starts the logger,
    // whose lockdown handshake is refused (§10.3). The tool then keeps listening.
    let mut tool = ChildGuard::spawn_captured(d.command("idevicesyslog").arg("--no-colors"))
        .expect("spawn idevicesyslog");
    let want = logger_refused(&u1);
    assert!(
        tool.wait_for_output(SETTLE_TIMEOUT, |_, err| err.contains(&want)),
        "idevicesyslog printed\n{}\n(stdout: {:?})",
        tool.stderr_text(),
        tool.stdout_text()
    );
    assert_eq!(tool.stderr_text(), want);
    wait_for_listener(d.address(), "idevicesyslog");
    assert!(
        tool.try_wait().expect("try_wait").is_none(),
        "idevicesyslog exited early"
    );
    tool.terminate().expect("SIGTERM");
    let out = tool.finish(Duration::from_secs(10));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, "", "{out:?}");
    assert_eq!(out.stderr, format!("{want}\nExiting...\n"), "{out:?}");
}

#[test]
fn idevicesyslog_with_udid_waits_for_the_phone_to_be_plugged() {
    if !require_tool("idevicesyslog", IMD) {
        return;
    }
    let (u1, u3) = (sim_udid(1), sim_udid(3));
    let d = TestDaemon::start(vec![sim(1)]);
    d.wait_for_devices(&[&u1]);
    // Phone 3 is not there yet: the tool only subscribes (Listen) and waits in silence.
    let mut tool =
        ChildGuard::spawn_captured(d.command("idevicesyslog").args(["--no-colors", "-u", &u3]))
            .expect("spawn idevicesyslog");
    wait_for_listener(d.address(), "idevicesyslog");
    assert_eq!(tool.stderr_text(), "", "before the phone is plugged");
    // Plugging it in reaches the tool as an Attached event on its Listen socket.
    d.attach(sim(3));
    let want = logger_refused(&u3);
    assert!(
        tool.wait_for_output(SETTLE_TIMEOUT, |_, err| err.contains(&want)),
        "idevicesyslog printed\n{}",
        tool.stderr_text()
    );
    assert!(
        tool.try_wait().expect("try_wait").is_none(),
        "idevicesyslog exited early"
    );
    tool.terminate().expect("SIGTERM");
    let out = tool.finish(Duration::from_secs(10));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(out.stderr, format!("{want}\nExiting...\n"), "{out:?}");
}

/// The SystemBUID in `<config_dir>/SystemConfiguration.plist`.
fn stored_buid(config_dir: &Path) -> String {
    let path = config_dir.join("SystemConfiguration.plist");
    let value =
        plist::Value::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    value
        .as_dictionary()
        .and_then(|d| d.get("SystemBUID"))
        .and_then(plist::Value::as_string)
        .unwrap_or_else(|| panic!("no SystemBUID string in {value:?}"))
        .to_owned()
}

#[test]
fn idevicepair_systembuid_prints_the_stored_buid() {
    if !require_tool("idevicepair", IMD) {
        return;
    }
    // A fresh config dir: the daemon makes up a SystemBUID and keeps it in the file.
    let d = TestDaemon::start(vec![sim(1)]);
    let out = run_tool(d.command("idevicepair").arg("systembuid"));
    assert_eq!(out.code(), Some(0), "{out:?}");
    let buid = stored_buid(d.config_dir());
    assert_eq!(out.stdout, format!("{buid}\n"));
    let again = run_tool(d.command("idevicepair").arg("systembuid"));
    assert_eq!(again.stdout, out.stdout, "the SystemBUID changed");

    // A config dir that already has one (as /var/lib/lockdown would): that one is used.
    const KNOWN: &str = "8A9B1C2D-3E4F-5061-7283-94A5B6C7D8E9";
    let d = TestDaemon::start_with(false, vec![sim(1)], |dir| {
        let mut dict = plist::Dictionary::new();
        dict.insert("SystemBUID".into(), KNOWN.into());
        plist::Value::Dictionary(dict)
            .to_file_xml(dir.join("SystemConfiguration.plist"))
            .expect("write SystemConfiguration.plist");
    });
    let out = run_tool(d.command("idevicepair").arg("systembuid"));
    assert_eq!(
        (out.code(), out.stdout.as_str()),
        (Some(0), "8A9B1C2D-3E4F-5061-7283-94A5B6C7D8E9\n"),
        "{out:?}"
    );
    assert_eq!(stored_buid(d.config_dir()), KNOWN);
}

#[test]
fn tools_reach_a_daemon_on_tcp() {
    if !require_tool("idevice_id", IMD) || !require_tool("ideviceinfo", IMD) {
        return;
    }
    let (u1, u2) = (sim_udid(1), sim_udid(2));
    let d = TestDaemon::start_tcp(vec![sim(1), sim(2)]);
    // USBMUXD_SOCKET_ADDRESS=127.0.0.1:PORT (§3.7).
    let port = d
        .address()
        .strip_prefix("127.0.0.1:")
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("not a 127.0.0.1 address: {}", d.address()));
    assert_ne!(port, 0);
    d.wait_for_devices(&[&u1, &u2]);
    assert_eq!(idevice_id_list(&d), sorted(vec![u1.clone(), u2.clone()]));
    let out = run_tool(
        d.command("ideviceinfo")
            .args(["-s", "-u", &u2, "-k", "DeviceName"]),
    );
    assert_eq!(
        (out.code(), out.stdout.as_str()),
        (Some(0), "Simulated iPhone 2\n"),
        "{out:?}"
    );
}

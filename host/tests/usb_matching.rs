//! The configuration/interface choice on captured and synthetic descriptor fixtures
//! (`tests/fixtures/usb/`, described in its README).

use usbmux_host::usb::matching::{
    choose_interface, parse_hex_dump, AppleDeviceKind, DeviceDescriptorInfo, EndpointProblem,
    Rejection, TransferKind, UsbmuxInterface,
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/usb");

fn load(name: &str) -> DeviceDescriptorInfo {
    let path = format!("{FIXTURES}/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let bytes = parse_hex_dump(&text).unwrap_or_else(|t| panic!("{path}: bad hex token {t:?}"));
    DeviceDescriptorInfo::parse(&bytes).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// (configuration, interface, IN, OUT, wMaxPacketSize) of a choice.
fn summary(choice: &UsbmuxInterface) -> (u8, u8, u8, u8, u16) {
    (
        choice.configuration,
        choice.interface,
        choice.ep_in,
        choice.ep_out,
        choice.max_packet_size,
    )
}

enum Expect {
    Chosen(AppleDeviceKind, (u8, u8, u8, u8, u16)),
    Rejected(Rejection),
}

fn expectations() -> Vec<(&'static str, Expect)> {
    use AppleDeviceKind::*;
    use Expect::*;
    vec![
        ("iphone-12a8.hex", Chosen(Mobile, (4, 1, 0x85, 0x04, 512))),
        ("ipad-12ab.hex", Chosen(Mobile, (5, 1, 0x85, 0x04, 512))),
        (
            "ipad-pro-superspeed-12ab.hex",
            Chosen(Mobile, (2, 1, 0x85, 0x04, 1024)),
        ),
        ("t2-8600.hex", Chosen(T2, (1, 1, 0x83, 0x04, 512))),
        ("valeria-12a8.hex", Chosen(Mobile, (2, 2, 0x85, 0x04, 512))),
        (
            "decoy-ff-fe-01.hex",
            Chosen(Mobile, (1, 1, 0x85, 0x04, 512)),
        ),
        (
            "swapped-endpoints.hex",
            Chosen(Mobile, (1, 0, 0x81, 0x02, 512)),
        ),
        (
            "lenovo-mtp-17ef-78ae.hex",
            Rejected(Rejection::NotApple { vendor_id: 0x17ef }),
        ),
        (
            "apple-headphone-adapter-110a.hex",
            Rejected(Rejection::UnsupportedProduct { product_id: 0x110a }),
        ),
        (
            "iphone-ptp-only-12a8.hex",
            Rejected(Rejection::NoUsbmuxInterface),
        ),
        (
            "mux-three-endpoints.hex",
            Rejected(Rejection::BadEndpoints {
                configuration: 1,
                interface: 1,
                problem: EndpointProblem::Count(3),
            }),
        ),
    ]
}

#[test]
fn every_fixture_gets_the_expected_choice() {
    for (name, expect) in expectations() {
        let device = load(name);
        let got = choose_interface(&device);
        match expect {
            Expect::Chosen(kind, want) => {
                let choice = got.unwrap_or_else(|r| panic!("{name}: rejected: {r}"));
                assert_eq!(choice.kind, kind, "{name}");
                assert_eq!(summary(&choice), want, "{name}");
                assert_eq!(choice.alt_setting, 0, "{name}");
                assert_eq!(
                    choice.in_max_packet_size, choice.max_packet_size,
                    "{name}: IN and OUT sizes"
                );
            }
            Expect::Rejected(want) => assert_eq!(got, Err(want), "{name}"),
        }
    }
}

#[test]
fn every_fixture_file_has_an_expectation() {
    let known: Vec<&str> = expectations().iter().map(|(n, _)| *n).collect();
    let mut files: Vec<String> = std::fs::read_dir(FIXTURES)
        .expect("fixture directory")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".hex"))
        .collect();
    files.sort();
    for file in &files {
        assert!(known.contains(&file.as_str()), "{file} has no expectation");
    }
    assert_eq!(files.len(), known.len());
}

#[test]
fn iphone_fixture_parses_as_captured() {
    let d = load("iphone-12a8.hex");
    assert_eq!(
        (d.vendor_id, d.product_id, d.usb_version),
        (0x05ac, 0x12a8, 0x0200)
    );
    assert_eq!(d.serial_index, 3);
    let values: Vec<u8> = d.configurations.iter().map(|c| c.value).collect();
    assert_eq!(values, [1, 2, 3, 4]);
    let config2 = &d.configurations[1];
    // Audio control, streaming alt 0 and 1, HID: class-specific descriptors skipped.
    assert_eq!(config2.interfaces.len(), 4);
    assert_eq!(
        config2.interfaces[2].endpoints[0].transfer,
        TransferKind::Isochronous
    );
    assert_eq!(config2.interfaces[2].endpoints[0].max_packet_size, 192);
    let config4 = &d.configurations[3];
    // PTP, usbmux, and three alternate settings of the Ethernet interface.
    assert_eq!(config4.interfaces.len(), 5);
    assert_eq!(
        config4
            .interfaces
            .iter()
            .map(|i| (i.number, i.alt_setting, i.endpoints.len()))
            .collect::<Vec<_>>(),
        [(0, 0, 3), (1, 0, 2), (2, 0, 0), (2, 1, 2), (2, 2, 2)]
    );
}

#[test]
fn superspeed_companions_are_skipped() {
    let d = load("ipad-pro-superspeed-12ab.hex");
    assert_eq!(d.usb_version, 0x0320);
    for config in &d.configurations {
        for intf in &config.interfaces {
            for ep in &intf.endpoints {
                if ep.transfer == TransferKind::Bulk {
                    assert_eq!(ep.packet_size(), 1024);
                }
            }
        }
    }
}

/// usbmuxd's candidate test as PROTOCOL.md §2.1 describes it (class OR subclass OR protocol,
/// two endpoints one IN one OUT), to show the decoy fixtures really are decoys.
fn usbmuxd_or_rule(device: &DeviceDescriptorInfo) -> Option<(u8, u8)> {
    let mut configs: Vec<_> = device.configurations.iter().collect();
    configs.sort_by_key(|c| std::cmp::Reverse(c.value));
    for config in configs {
        for intf in config.interfaces.iter().filter(|i| i.alt_setting == 0) {
            let candidate = intf.class == 0xff || intf.subclass == 0xfe || intf.protocol == 0x02;
            let eps = &intf.endpoints;
            if candidate && eps.len() == 2 && eps[0].is_in() != eps[1].is_in() {
                return Some((config.value, intf.number));
            }
        }
    }
    None
}

#[test]
fn decoys_would_fool_the_or_rule_but_not_us() {
    for name in ["valeria-12a8.hex", "decoy-ff-fe-01.hex"] {
        let device = load(name);
        let ours = choose_interface(&device).expect(name);
        let theirs = usbmuxd_or_rule(&device).expect(name);
        assert_ne!((ours.configuration, ours.interface), theirs, "{name}");
    }
    // On a plain iPhone both rules agree.
    let device = load("iphone-12a8.hex");
    let ours = choose_interface(&device).expect("iphone");
    assert_eq!(
        Some((ours.configuration, ours.interface)),
        usbmuxd_or_rule(&device)
    );
}

#[test]
fn truncated_fixtures_fail_cleanly() {
    let text = std::fs::read_to_string(format!("{FIXTURES}/iphone-12a8.hex")).expect("fixture");
    let bytes = parse_hex_dump(&text).expect("hex");
    for n in 0..bytes.len() {
        assert!(
            DeviceDescriptorInfo::parse(&bytes[..n]).is_err(),
            "prefix of {n} bytes parsed"
        );
    }
    assert!(DeviceDescriptorInfo::parse(&bytes).is_ok());
}

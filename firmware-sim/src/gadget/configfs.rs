//! A configfs USB gadget around one FunctionFS function: what `usbmux-sim --functionfs DIR
//! --configfs NAME` sets up so a Linux device controller (UDC) presents the simulated phone.
//!
//! The steps, in order (each undone by [`ConfigfsGadget::remove`], in reverse):
//!
//! 1. `mkdir ROOT/NAME`, write `idVendor`, `idProduct`, `bcdUSB`, `bcdDevice`, and
//!    `strings/0x409/{manufacturer,product,serialnumber}`;
//! 2. one configuration `configs/c.1` with `MaxPower`, `bmAttributes` and its name;
//! 3. the function `functions/ffs.NAME`, linked into the configuration;
//! 4. `mount -t functionfs NAME DIR` ([`ConfigfsGadget::mount_functionfs`]);
//! 5. after the program has written its descriptors to `DIR/ep0`: write the UDC's name to
//!    `UDC` ([`ConfigfsGadget::bind`]) — the device appears on the host. Writing a newline
//!    ([`ConfigfsGadget::unbind`]) pulls the cable.
//!
//! `ROOT` is normally [`CONFIGFS_GADGETS`]; tests pass a scratch directory, where the same
//! writes produce plain files.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::identity::Identity;
use crate::lockdown::global_values;

/// Where configfs keeps USB gadgets.
pub const CONFIGFS_GADGETS: &str = "/sys/kernel/config/usb_gadget";
/// Where the kernel lists the device controllers.
pub const UDC_CLASS: &str = "/sys/class/udc";

/// Apple's USB vendor id.
pub const APPLE_VENDOR_ID: u16 = 0x05ac;
/// `bcdDevice` of the simulated phone (an iPhone reports its hardware revision here; hosts do
/// not look at it).
pub const BCD_DEVICE: u16 = 0x1101;
/// `bcdUSB`: USB 2.0, as iPhones report.
pub const BCD_USB: u16 = 0x0200;

/// What the host reads from the device descriptor and the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GadgetSpec {
    /// `idVendor`.
    pub vendor_id: u16,
    /// `idProduct`.
    pub product_id: u16,
    /// `bcdUSB`.
    pub bcd_usb: u16,
    /// `bcdDevice`.
    pub bcd_device: u16,
    /// Manufacturer string.
    pub manufacturer: String,
    /// Product string.
    pub product: String,
    /// Serial number string: hosts take the UDID from it.
    pub serial: String,
    /// The configuration's name.
    pub configuration: String,
    /// `MaxPower` in mA.
    pub max_power_ma: u16,
    /// `bmAttributes` of the configuration (bit 7 must be set; 0x40 = self powered).
    pub attributes: u8,
}

impl GadgetSpec {
    /// The identity of a simulated phone as a gadget: Apple's vendor id, the phone's product id,
    /// "Apple Inc.", the lockdown `DeviceClass` ("iPhone") as product, the UDID without its
    /// hyphen as serial (what `usbmuxd` reads), one self-powered 500 mA configuration.
    pub fn from_identity(identity: &Identity) -> GadgetSpec {
        let product = global_values(identity)
            .get("DeviceClass")
            .and_then(|v| v.as_string())
            .unwrap_or("iPhone")
            .to_owned();
        GadgetSpec {
            vendor_id: APPLE_VENDOR_ID,
            product_id: identity.product_id,
            bcd_usb: BCD_USB,
            bcd_device: BCD_DEVICE,
            manufacturer: "Apple Inc.".into(),
            product,
            serial: identity.usb_serial(),
            configuration: "PTP + Apple Mobile Device".into(),
            max_power_ma: 500,
            attributes: 0xc0,
        }
    }
}

/// A configfs step that failed: which path, and the system's error.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct ConfigfsError {
    /// The file or directory concerned.
    pub path: PathBuf,
    /// What the kernel said.
    #[source]
    pub source: io::Error,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> ConfigfsError + '_ {
    move |source| ConfigfsError {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), ConfigfsError> {
    fs::write(path, value).map_err(at(path))
}

/// A gadget this process created under a configfs root. Removing it is explicit
/// ([`ConfigfsGadget::remove`]); dropping it leaves it in place.
#[derive(Debug)]
pub struct ConfigfsGadget {
    dir: PathBuf,
    name: String,
    mountpoint: Option<PathBuf>,
    udc: Option<String>,
}

/// The function's directory name under `functions/` and its link name in the configuration.
fn function_name(name: &str) -> String {
    format!("ffs.{name}")
}

impl ConfigfsGadget {
    /// Creates gadget `name` under `root` with `spec` and a FunctionFS function `ffs.NAME`
    /// linked into its one configuration. Fails if the gadget exists already (a leftover of a
    /// killed run, or another user of the name): remove it, or pick another name. A partly
    /// created gadget is removed again before the error is returned.
    pub fn create(
        root: &Path,
        name: &str,
        spec: &GadgetSpec,
    ) -> Result<ConfigfsGadget, ConfigfsError> {
        if name.is_empty() || name.contains(['/', '\0', '\n']) || name.starts_with('.') {
            return Err(ConfigfsError {
                path: root.join(name),
                source: io::Error::new(io::ErrorKind::InvalidInput, "bad gadget name"),
            });
        }
        let dir = root.join(name);
        fs::create_dir(&dir).map_err(at(&dir))?;
        let gadget = ConfigfsGadget {
            dir,
            name: name.to_owned(),
            mountpoint: None,
            udc: None,
        };
        match gadget.fill(spec) {
            Ok(()) => Ok(gadget),
            Err(e) => {
                gadget.remove();
                Err(e)
            }
        }
    }

    fn fill(&self, spec: &GadgetSpec) -> Result<(), ConfigfsError> {
        let d = &self.dir;
        write(&d.join("idVendor"), &format!("{:#06x}", spec.vendor_id))?;
        write(&d.join("idProduct"), &format!("{:#06x}", spec.product_id))?;
        write(&d.join("bcdUSB"), &format!("{:#06x}", spec.bcd_usb))?;
        write(&d.join("bcdDevice"), &format!("{:#06x}", spec.bcd_device))?;
        let strings = d.join("strings/0x409");
        fs::create_dir_all(&strings).map_err(at(&strings))?;
        write(&strings.join("manufacturer"), &spec.manufacturer)?;
        write(&strings.join("product"), &spec.product)?;
        write(&strings.join("serialnumber"), &spec.serial)?;
        let config = d.join("configs/c.1");
        let config_strings = config.join("strings/0x409");
        fs::create_dir_all(&config_strings).map_err(at(&config_strings))?;
        write(&config_strings.join("configuration"), &spec.configuration)?;
        write(&config.join("MaxPower"), &spec.max_power_ma.to_string())?;
        write(
            &config.join("bmAttributes"),
            &format!("{:#04x}", spec.attributes),
        )?;
        let function = d.join("functions").join(function_name(&self.name));
        fs::create_dir_all(&function).map_err(at(&function))?;
        let link = config.join(function_name(&self.name));
        std::os::unix::fs::symlink(&function, &link).map_err(at(&link))?;
        Ok(())
    }

    /// The gadget's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The gadget's name (also the FunctionFS instance's device name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The UDC bound by [`ConfigfsGadget::bind`], if any.
    pub fn udc(&self) -> Option<&str> {
        self.udc.as_deref()
    }

    /// Mounts the function's FunctionFS instance at `dir` (created if missing).
    #[cfg(target_os = "linux")]
    pub fn mount_functionfs(&mut self, dir: &Path) -> Result<(), ConfigfsError> {
        use nix::mount::{mount, MsFlags};
        fs::create_dir_all(dir).map_err(at(dir))?;
        mount(
            Some(self.name.as_str()),
            dir,
            Some("functionfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| ConfigfsError {
            path: dir.to_path_buf(),
            source: io::Error::from(e),
        })?;
        self.mountpoint = Some(dir.to_path_buf());
        Ok(())
    }

    /// Plugs the gadget into the host through device controller `udc`. The FunctionFS program
    /// must have written its descriptors first, or the kernel refuses.
    pub fn bind(&mut self, udc: &str) -> Result<(), ConfigfsError> {
        write(&self.dir.join("UDC"), udc)?;
        self.udc = Some(udc.to_owned());
        Ok(())
    }

    /// Pulls the cable: the host sees the device go, the function gets DISABLE and UNBIND.
    pub fn unbind(&mut self) -> Result<(), ConfigfsError> {
        // An empty write stores nothing in configfs; a lone newline clears the UDC.
        write(&self.dir.join("UDC"), "\n")?;
        self.udc = None;
        Ok(())
    }

    /// Best effort: unbinds, unmounts the FunctionFS instance (lazily: our endpoint files may
    /// still be open), and removes the link, directories and the gadget itself, innermost first.
    /// Returns the steps that failed (none when everything went).
    pub fn remove(mut self) -> Vec<ConfigfsError> {
        let mut failed = Vec::new();
        if self.udc.is_some() {
            if let Err(e) = self.unbind() {
                failed.push(e);
            }
        }
        #[cfg(target_os = "linux")]
        if let Some(dir) = self.mountpoint.take() {
            use nix::mount::{umount2, MntFlags};
            if let Err(e) = umount2(&dir, MntFlags::MNT_DETACH) {
                failed.push(ConfigfsError {
                    path: dir.clone(),
                    source: io::Error::from(e),
                });
            }
        }
        let d = &self.dir;
        let f = function_name(&self.name);
        let link = d.join("configs/c.1").join(&f);
        if fs::symlink_metadata(&link).is_ok() {
            if let Err(e) = fs::remove_file(&link) {
                failed.push(ConfigfsError {
                    path: link,
                    source: e,
                });
            }
        }
        for sub in [
            "configs/c.1/strings/0x409".to_owned(),
            "configs/c.1".to_owned(),
            format!("functions/{f}"),
            "strings/0x409".to_owned(),
            String::new(),
        ] {
            let p = if sub.is_empty() {
                d.clone()
            } else {
                d.join(&sub)
            };
            if p.exists() {
                if let Err(e) = fs::remove_dir(&p) {
                    failed.push(ConfigfsError { path: p, source: e });
                }
            }
        }
        failed
    }
}

/// The device controllers under `udc_class` (normally [`UDC_CLASS`]) that no gadget under
/// `gadgets` (normally [`CONFIGFS_GADGETS`]) is bound to, in name order with numbers compared
/// as numbers (`dummy_udc.2` before `dummy_udc.10`).
pub fn free_udcs(udc_class: &Path, gadgets: &Path) -> io::Result<Vec<String>> {
    let mut used = Vec::new();
    if let Ok(entries) = fs::read_dir(gadgets) {
        for e in entries.flatten() {
            if let Ok(s) = fs::read_to_string(e.path().join("UDC")) {
                let s = s.trim();
                if !s.is_empty() {
                    used.push(s.to_owned());
                }
            }
        }
    }
    let mut free: Vec<String> = fs::read_dir(udc_class)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !used.contains(n))
        .collect();
    free.sort_by_key(|n| natural_key(n));
    Ok(free)
}

/// A sort key that orders the trailing number numerically.
fn natural_key(name: &str) -> (String, u64, String) {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (head, tail) = name.split_at(name.len() - digits);
    (head.to_owned(), tail.parse().unwrap_or(0), name.to_owned())
}

#[cfg(test)]
mod test {
    use super::*;

    struct Scratch(PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let p = std::env::temp_dir()
                .join(format!("usbmux-sim-configfs-{}-{tag}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).expect("scratch dir");
            Scratch(p)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn read(p: PathBuf) -> String {
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn spec_from_identity() {
        let id = Identity::simulated(3);
        let s = GadgetSpec::from_identity(&id);
        assert_eq!(s.vendor_id, 0x05ac);
        assert_eq!(s.product_id, 0x12a8);
        assert_eq!(s.serial, "000080300000000000000003");
        assert_eq!(s.product, "iPhone");
        assert_eq!(s.manufacturer, "Apple Inc.");
    }

    #[test]
    fn create_writes_the_identity() {
        let root = Scratch::new("create");
        let spec = GadgetSpec::from_identity(&Identity::simulated(1));
        let mut g = ConfigfsGadget::create(&root.0, "sim1", &spec).expect("create");
        let d = root.0.join("sim1");
        assert_eq!(read(d.join("idVendor")), "0x05ac");
        assert_eq!(read(d.join("idProduct")), "0x12a8");
        assert_eq!(read(d.join("bcdUSB")), "0x0200");
        assert_eq!(
            read(d.join("strings/0x409/serialnumber")),
            "000080300000000000000001"
        );
        assert_eq!(read(d.join("strings/0x409/product")), "iPhone");
        assert_eq!(read(d.join("configs/c.1/MaxPower")), "500");
        assert_eq!(read(d.join("configs/c.1/bmAttributes")), "0xc0");
        let link = fs::read_link(d.join("configs/c.1/ffs.sim1")).expect("link");
        assert_eq!(link, d.join("functions/ffs.sim1"));
        g.bind("dummy_udc.0").expect("bind");
        assert_eq!(read(d.join("UDC")), "dummy_udc.0");
        assert_eq!(g.udc(), Some("dummy_udc.0"));
        // The same name again is refused.
        assert!(ConfigfsGadget::create(&root.0, "sim1", &spec).is_err());
        assert!(ConfigfsGadget::create(&root.0, "../x", &spec).is_err());
        assert!(ConfigfsGadget::create(&root.0, "", &spec).is_err());
        g.unbind().expect("unbind");
        assert_eq!(read(d.join("UDC")), "\n");
    }

    #[test]
    fn udc_choice_skips_bound_ones() {
        let root = Scratch::new("udc");
        let class = root.0.join("class");
        let gadgets = root.0.join("gadgets");
        for u in ["dummy_udc.10", "dummy_udc.2", "dummy_udc.0", "dummy_udc.1"] {
            fs::create_dir_all(class.join(u)).expect("udc");
        }
        fs::create_dir_all(gadgets.join("a")).expect("gadget");
        fs::create_dir_all(gadgets.join("b")).expect("gadget");
        fs::write(gadgets.join("a/UDC"), "dummy_udc.0\n").expect("write");
        fs::write(gadgets.join("b/UDC"), "\n").expect("write");
        assert_eq!(
            free_udcs(&class, &gadgets).expect("list"),
            vec!["dummy_udc.1", "dummy_udc.2", "dummy_udc.10"]
        );
        assert!(free_udcs(&root.0.join("none"), &gadgets).is_err());
    }
}

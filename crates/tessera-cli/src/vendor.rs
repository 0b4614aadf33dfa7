//! Offline vendor tooling: `tessera vendor init` and `tessera vendor issue`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use jiff::{Timestamp, ToSpan};
use tessera_core::{LicenseKey, LicenseKeyPayload, SecretKey};
use tessera_server::data_dir::write_private;
use tessera_server::ids::random_bytes;

pub const VENDOR_KEY: &str = "vendor.key";
pub const VENDOR_PUB: &str = "vendor.pub";

#[derive(Subcommand)]
pub enum VendorCommand {
    /// Create the vendor root key pair: DIR/vendor.key (0600) and DIR/vendor.pub.
    Init {
        /// The vendor directory to create the key pair in.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a signed license key file.
    Issue(IssueArgs),
}

#[derive(clap::Args)]
pub struct IssueArgs {
    /// The vendor directory (made by `vendor init`): signs with its vendor.key.
    #[arg(long)]
    pub dir: PathBuf,
    /// The customer's name, written into the key.
    #[arg(long)]
    pub customer: String,
    /// Comma-separated component names, e.g. cad,cam.
    #[arg(long, value_delimiter = ',')]
    pub components: Vec<String>,
    /// How many stations may use the key at once.
    #[arg(long)]
    pub licenses: u32,
    /// Valid for this many days (from now, or from --valid-from).
    #[arg(long)]
    pub valid_days: u32,
    /// Valid from this time (RFC 3339, e.g. a renewal bought in advance that starts when the
    /// key it renews ends); default: now.
    #[arg(long)]
    pub valid_from: Option<Timestamp>,
    /// The license server ID the key is issued to; without it any server may use the key.
    #[arg(long)]
    pub server_id: Option<String>,
    /// The key this one renews.
    #[arg(long)]
    pub renews: Option<String>,
    /// Applications accept leases of this key only from a license server the vendor
    /// certified (as for a key issued to a server ID).
    #[arg(long)]
    pub certified_server_required: bool,
    /// Stations may borrow a license of this key for up to this many days (0: never).
    #[arg(long, default_value_t = 0)]
    pub max_borrow_days: u32,
    /// Applications keep running this many minutes past a lease's end while no server can
    /// be reached (0: none).
    #[arg(long, default_value_t = 0)]
    pub grace_minutes: u32,
    /// Key id; a random one if not given.
    #[arg(long)]
    pub key_id: Option<String>,
    /// The key file to write.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(command: VendorCommand) -> anyhow::Result<()> {
    match command {
        VendorCommand::Init { dir } => {
            let public = init(&dir)?;
            println!(
                "vendor key created in {} (fingerprint {})",
                dir.display(),
                public
            );
            Ok(())
        }
        VendorCommand::Issue(args) => {
            let key = issue(&args, Timestamp::now())?;
            println!("{}", key.key_id());
            Ok(())
        }
    }
}

/// Creates the vendor key pair; refuses to overwrite an existing one.
pub fn init(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let secret_path = dir.join(VENDOR_KEY);
    if secret_path.exists() {
        bail!(
            "{} already exists: refusing to replace a vendor key",
            secret_path.display()
        );
    }
    let secret = SecretKey::from_seed(random_bytes()?);
    write_private(&secret_path, &secret.to_file_text())?;
    std::fs::write(dir.join(VENDOR_PUB), secret.public_key().to_file_text())?;
    Ok(secret.public_key().fingerprint())
}

pub fn load_secret(dir: &Path) -> anyhow::Result<SecretKey> {
    let path = dir.join(VENDOR_KEY);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (run `tessera vendor init` first)",
            path.display()
        )
    })?;
    SecretKey::from_file_text(&text).with_context(|| format!("{}", path.display()))
}

pub fn issue(args: &IssueArgs, now: Timestamp) -> anyhow::Result<LicenseKey> {
    let vendor = load_secret(&args.dir)?;
    if args.valid_days == 0 {
        bail!("--valid-days must be at least 1");
    }
    let now = Timestamp::from_second(now.as_second())?;
    let from = match args.valid_from {
        Some(from) => Timestamp::from_second(from.as_second())?,
        None => now,
    };
    let key_id = match &args.key_id {
        Some(id) => id.clone(),
        None => format!("K-{}", hex::encode(&random_bytes()?[..6]).to_uppercase()),
    };
    let payload = LicenseKeyPayload {
        key_id,
        customer: args.customer.clone(),
        components: args
            .components
            .iter()
            .map(|c| c.trim().to_string())
            .collect(),
        licenses: args.licenses,
        valid_from: from,
        valid_until: from.checked_add((i64::from(args.valid_days) * 24).hours())?,
        server_id: args.server_id.clone(),
        renews: args.renews.clone(),
        certified_server_required: args.certified_server_required,
        max_borrow_days: args.max_borrow_days,
        grace_minutes: args.grace_minutes,
        issued_at: now,
    };
    let key = LicenseKey::sign(payload, &vendor)?;
    std::fs::write(&args.out, key.to_json_pretty())
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    Ok(key)
}

//! The command line, as DESIGN.md's external contract gives it.

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "georelay",
    version,
    about = "Multi-region failover ingestion backend"
)]
#[command(
    after_help = "Environment: DATABASE_URL (postgres://…), GEORELAY_MASTER_KEY (base64 of 32 bytes), RUST_LOG"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply database migrations (safe to run again)
    Migrate,
    /// Manage namespaces, groups and devices; move senders; show status
    #[command(subcommand)]
    Admin(Admin),
}

#[derive(Debug, Subcommand)]
pub enum Admin {
    /// Regional queue namespaces (the "triplets")
    #[command(subcommand)]
    Namespace(NamespaceCmd),
    /// Routing groups: devices, senders, worker and queue
    #[command(subcommand)]
    Group(GroupCmd),
    /// Plug computer devices and their keys
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Move a group's senders to another namespace (planned failover or failback)
    Failover(FailoverArgs),
    /// Groups, their trail and namespaces at a glance
    Status,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TransportArg {
    Nats,
    Servicebus,
}

#[derive(Debug, Subcommand)]
pub enum NamespaceCmd {
    /// Register a namespace
    Add(NamespaceAdd),
    /// List namespaces by priority
    List,
    /// Put a namespace back into rotation
    Enable(NameArg),
    /// Take a namespace out of rotation (senders are never moved to it)
    Disable(NameArg),
}

#[derive(Debug, Args)]
pub struct NamespaceAdd {
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub region: String,
    #[arg(long, value_enum)]
    pub transport: TransportArg,
    /// nats://host:port, or the Service Bus namespace (https://NAME.servicebus.windows.net)
    #[arg(long)]
    pub endpoint: String,
    /// Lower is preferred
    #[arg(long, allow_negative_numbers = true)]
    pub priority: i32,
    /// SAS policy (issuer) name
    #[arg(long, requires = "key")]
    pub key_name: Option<String>,
    /// SAS (issuer) key, stored sealed with the master key; `-` reads it from stdin
    #[arg(long, requires = "key_name")]
    pub key: Option<String>,
}

#[derive(Debug, Args)]
pub struct NameArg {
    #[arg(long)]
    pub name: String,
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Create a group whose senders start on NAMESPACE
    Add(GroupAdd),
    /// List groups with their epoch and namespaces
    List,
}

#[derive(Debug, Args)]
pub struct GroupAdd {
    #[arg(long)]
    pub name: String,
    /// Queue (Service Bus) or stream (NATS) name, the same in every namespace
    #[arg(long)]
    pub queue: String,
    /// Where the senders start
    #[arg(long)]
    pub namespace: String,
}

#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// Register a device; prints its new key (base64) once
    Add(DeviceAdd),
    /// List devices
    List(DeviceList),
    /// Refuse a device's records from now on
    Disable(DeviceIdArg),
}

#[derive(Debug, Args)]
pub struct DeviceAdd {
    #[arg(long)]
    pub id: String,
    #[arg(long)]
    pub group: String,
}

#[derive(Debug, Args)]
pub struct DeviceList {
    /// Only this group's devices
    #[arg(long)]
    pub group: Option<String>,
}

#[derive(Debug, Args)]
pub struct DeviceIdArg {
    #[arg(long)]
    pub id: String,
}

#[derive(Debug, Args)]
pub struct FailoverArgs {
    #[arg(long)]
    pub group: String,
    /// The namespace to move the senders to
    #[arg(long)]
    pub to: String,
    /// Recorded in failover_events
    #[arg(long)]
    pub reason: Option<String>,
}

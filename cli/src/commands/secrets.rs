//! `gpufleet secrets`: a tenant's registry credentials for image jobs
//! (`--registry-secret NAME` on `gpufleet jobs submit`). The password is
//! read from stdin, never from a flag, so it stays out of shell history
//! and process listings; it is never shown again.

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use gpufleet_proto::v1::secrets_client::SecretsClient;
use gpufleet_proto::v1::{
    DeleteRegistrySecretRequest, ListRegistrySecretsRequest, PutRegistrySecretRequest,
};

use crate::client;
use crate::output::{self, Format};

/// Largest password read from stdin (the controller's limit is 8 KiB).
const PASSWORD_READ_BYTES: u64 = 16 * 1024;

#[derive(Debug, Args)]
pub struct SecretsArgs {
    #[command(subcommand)]
    command: SecretsCommand,
}

#[derive(Debug, Subcommand)]
enum SecretsCommand {
    /// Store (or replace) a registry credential; the password or access token is read from stdin.
    Put {
        /// Its name, as jobs give it to --registry-secret.
        name: String,
        /// Registry host, e.g. ghcr.io.
        #[arg(long)]
        registry: String,
        #[arg(long)]
        username: String,
        /// Tenant [default: the token's].
        #[arg(long)]
        tenant: Option<String>,
    },
    /// List registry credentials (never their passwords).
    List {
        /// Tenant [default: the token's].
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Delete a registry credential.
    Delete {
        name: String,
        /// Tenant [default: the token's].
        #[arg(long)]
        tenant: Option<String>,
    },
}

pub async fn run(address: &str, format: Format, args: SecretsArgs) -> anyhow::Result<ExitCode> {
    let mut secrets = SecretsClient::new(client::channel(address).await?);
    match args.command {
        SecretsCommand::Put {
            name,
            registry,
            username,
            tenant,
        } => {
            let mut password = String::new();
            std::io::stdin()
                .take(PASSWORD_READ_BYTES)
                .read_to_string(&mut password)
                .context("cannot read the password from stdin")?;
            let password = password.trim_end_matches(['\n', '\r']).to_string();
            let info = secrets
                .put_registry_secret(PutRegistrySecretRequest {
                    tenant: tenant.unwrap_or_default(),
                    name,
                    registry,
                    username,
                    password,
                })
                .await?
                .into_inner();
            if format == Format::Json {
                output::print_json(&info, true)?;
            } else {
                say!(
                    "registry secret {} stored for tenant {} ({} as {})",
                    output::safe(&info.name),
                    output::safe(&info.tenant),
                    output::safe(&info.registry),
                    output::safe(&info.username)
                );
            }
        }
        SecretsCommand::List { tenant } => {
            let response = secrets
                .list_registry_secrets(ListRegistrySecretsRequest {
                    tenant: tenant.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if format == Format::Json {
                output::print_json(&response, true)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut table = output::table(&["TENANT", "NAME", "REGISTRY", "USERNAME", "UPDATED"]);
            for s in &response.secrets {
                table.add_row(vec![
                    s.tenant.clone(),
                    s.name.clone(),
                    s.registry.clone(),
                    s.username.clone(),
                    output::time(s.updated_at.as_ref()),
                ]);
            }
            output::print_table(&table);
        }
        SecretsCommand::Delete { name, tenant } => {
            let info = secrets
                .delete_registry_secret(DeleteRegistrySecretRequest {
                    tenant: tenant.unwrap_or_default(),
                    name,
                })
                .await?
                .into_inner();
            if format == Format::Json {
                output::print_json(&info, true)?;
            } else {
                say!(
                    "registry secret {} of tenant {} deleted",
                    output::safe(&info.name),
                    output::safe(&info.tenant)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use gpufleet_proto::v1::tokens_client::TokensClient;
use gpufleet_proto::v1::{
    CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, Role, TokenInfo, WhoAmIRequest,
};

use crate::client;
use crate::output::{self, Format};

#[derive(Debug, Args)]
pub struct TokensArgs {
    #[command(subcommand)]
    command: TokensCommand,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    /// Reads jobs, logs and usage of its tenant; fleet, telemetry, market.
    Viewer,
    /// Also submits and cancels its tenant's jobs.
    Submitter,
    /// Also cordons, drains and uncordons.
    Operator,
    /// Also manages tokens and node identities.
    Admin,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::Viewer => Role::Viewer,
            RoleArg::Submitter => Role::Submitter,
            RoleArg::Operator => Role::Operator,
            RoleArg::Admin => Role::Admin,
        }
    }
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Create a token; its secret is printed once (admin).
    Create {
        /// A name to recognise it by, e.g. ci-team-a.
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The tenant it acts for, or "*" for every tenant.
        #[arg(long)]
        tenant: String,
        /// Lifetime, e.g. 30d; never expires when not given.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// List tokens (admin).
    List {
        /// Include revoked tokens.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a token by id; it is refused from the next call on (admin).
    Revoke { id: String },
    /// Show the token this command runs with.
    Whoami,
}

pub async fn run(address: &str, format: Format, args: TokensArgs) -> anyhow::Result<ExitCode> {
    let mut tokens = TokensClient::new(client::channel(address).await?);
    match args.command {
        TokensCommand::Create {
            name,
            role,
            tenant,
            ttl,
        } => {
            let ttl_seconds = match ttl {
                None => 0,
                Some(text) => humantime::parse_duration(&text)
                    .with_context(|| format!("--ttl {text:?} is not a duration like 30d or 12h"))?
                    .as_secs()
                    .max(1),
            };
            let response = tokens
                .create_token(CreateTokenRequest {
                    name,
                    role: Role::from(role) as i32,
                    tenant,
                    ttl_seconds,
                })
                .await?
                .into_inner();
            if format == Format::Json {
                output::print_json(&response, true)?;
                return Ok(ExitCode::SUCCESS);
            }
            let info = response.info.unwrap_or_default();
            eprintln!(
                "created token {} ({}, role {}, tenant {}); this is the only time its secret is shown:",
                info.id,
                info.name,
                role_label(info.role()),
                info.tenant
            );
            say!("{}", response.token);
        }
        TokensCommand::List { all } => {
            let response = tokens
                .list_tokens(ListTokensRequest {
                    include_revoked: all,
                })
                .await?
                .into_inner();
            if format == Format::Json {
                output::print_json(&response, true)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut table = output::table(&["ID", "NAME", "ROLE", "TENANT", "CREATED", "STATUS"]);
            for token in &response.tokens {
                table.add_row(row(token));
            }
            output::print_table(&table);
        }
        TokensCommand::Revoke { id } => {
            let info = tokens
                .revoke_token(RevokeTokenRequest { id })
                .await?
                .into_inner();
            if format == Format::Json {
                output::print_json(&info, true)?;
                return Ok(ExitCode::SUCCESS);
            }
            say!("token {} ({}) revoked", info.id, info.name);
        }
        TokensCommand::Whoami => {
            let info = tokens.who_am_i(WhoAmIRequest {}).await?.into_inner();
            if format == Format::Json {
                output::print_json(&info, true)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut table = output::table(&["ID", "NAME", "ROLE", "TENANT", "CREATED", "STATUS"]);
            table.add_row(row(&info));
            output::print_table(&table);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn role_label(role: Role) -> String {
    output::enum_label(role.as_str_name(), "ROLE_")
}

fn row(token: &TokenInfo) -> Vec<String> {
    let status = if token.revoked_at.is_some() {
        format!("revoked {} ago", output::age(token.revoked_at.as_ref()))
    } else if let Some(expires) = &token.expires_at {
        format!("expires {}", output::time(Some(expires)))
    } else {
        "active".to_string()
    };
    vec![
        token.id.clone(),
        token.name.clone(),
        role_label(token.role()),
        token.tenant.clone(),
        output::time(token.created_at.as_ref()),
        status,
    ]
}

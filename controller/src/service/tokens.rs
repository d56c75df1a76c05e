use std::time::Duration;

use gpufleet_proto::v1::tokens_server::Tokens;
use gpufleet_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, ListTokensRequest, ListTokensResponse,
    RevokeTokenRequest, Role, TokenInfo, WhoAmIRequest,
};
use prost_types::Timestamp;
use tonic::{Request, Response, Status};

use super::{caller, to_status};
use crate::auth::{Action, TokenRecord};
use crate::limits;
use crate::state::Controller;
use crate::validate;

/// Longest token lifetime accepted: ten years.
const MAX_TTL_SECS: u64 = 10 * 366 * 86_400;

pub struct TokensService {
    controller: Controller,
}

impl TokensService {
    pub fn new(controller: Controller) -> Self {
        Self { controller }
    }
}

fn timestamp(unix: u64) -> Option<Timestamp> {
    (unix != 0).then(|| Timestamp {
        seconds: i64::try_from(unix).unwrap_or(i64::MAX),
        nanos: 0,
    })
}

/// A token as served; a name stored before names were bounded is clipped.
fn info(record: &TokenRecord) -> TokenInfo {
    let mut name = record.name.clone();
    gpufleet_core::limits::clip(&mut name, limits::NAME_BYTES);
    TokenInfo {
        id: record.id.clone(),
        name,
        role: record.role,
        tenant: record.tenant.clone(),
        created_at: timestamp(record.created_unix),
        revoked_at: timestamp(record.revoked_unix),
        expires_at: timestamp(record.expires_unix),
    }
}

#[tonic::async_trait]
impl Tokens for TokensService {
    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let who = caller(&self.controller, &request, Action::Administer)?;
        let r = request.into_inner();
        limits::check_name("name", &r.name).map_err(to_status)?;
        validate::label_filter("tenant", &r.tenant).map_err(to_status)?;
        // An admin of one tenant makes tokens for that tenant only.
        who.check_tenant(&r.tenant, "a token for that tenant")
            .map_err(to_status)?;
        let role = Role::try_from(r.role).map_err(|_| {
            Status::invalid_argument(format!(
                "role: {} is not a role; accepted: viewer, submitter, operator, admin",
                r.role
            ))
        })?;
        if r.tenant.is_empty() {
            return Err(Status::invalid_argument(
                "tenant: is required: a tenant name, or \"*\" for every tenant",
            ));
        }
        if r.ttl_seconds > MAX_TTL_SECS {
            return Err(Status::invalid_argument(format!(
                "ttl_seconds: at most {MAX_TTL_SECS} (ten years); 0 = never expires"
            )));
        }
        let ttl = (r.ttl_seconds > 0).then(|| Duration::from_secs(r.ttl_seconds));
        let (record, token) = self
            .controller
            .create_token(&r.name, role, &r.tenant, ttl)
            .map_err(to_status)?;
        tracing::info!(id = %record.id, name = %record.name, tenant = %record.tenant, role = r.role, "token created");
        Ok(Response::new(CreateTokenResponse {
            info: Some(info(&record)),
            token,
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let who = caller(&self.controller, &request, Action::Administer)?;
        let r = request.into_inner();
        let tokens = self
            .controller
            .auth()
            .list_tokens(r.include_revoked)
            .iter()
            .filter(|t| who.all_tenants() || t.tenant == who.tenant)
            .map(info)
            .collect();
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<TokenInfo>, Status> {
        let who = caller(&self.controller, &request, Action::Administer)?;
        let r = request.into_inner();
        validate::id_filter("id", &r.id).map_err(to_status)?;
        if let Some(target) = self.controller.auth().token(&r.id) {
            who.check_tenant(&target.tenant, &format!("token {}", target.id))
                .map_err(to_status)?;
        }
        let record = self.controller.revoke_token(&r.id).map_err(to_status)?;
        tracing::info!(id = %record.id, name = %record.name, "token revoked");
        Ok(Response::new(info(&record)))
    }

    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<TokenInfo>, Status> {
        let who = caller(&self.controller, &request, Action::WhoAmI)?;
        let record = self
            .controller
            .auth()
            .token(&who.token_id)
            .filter(|t| t.revoked_unix == 0)
            .ok_or_else(|| Status::unauthenticated("the token was revoked during this call"))?;
        Ok(Response::new(info(&record)))
    }
}

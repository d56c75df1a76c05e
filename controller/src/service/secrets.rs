//! The `Secrets` service: tenants' registry credentials (the domain is
//! `secrets.rs`). Putting and deleting needs the submitter role for the
//! tenant, listing the viewer role; a password is never answered.

use gpufleet_proto::v1::secrets_server::Secrets;
use gpufleet_proto::v1::{
    DeleteRegistrySecretRequest, ListRegistrySecretsRequest, ListRegistrySecretsResponse,
    PutRegistrySecretRequest, RegistrySecret,
};
use tonic::{Request, Response, Status};

use super::{caller, to_status};
use crate::auth::{Action, Principal};
use crate::state::Controller;

pub struct SecretsService {
    controller: Controller,
}

impl SecretsService {
    pub fn new(controller: Controller) -> Self {
        Self { controller }
    }
}

#[tonic::async_trait]
impl Secrets for SecretsService {
    async fn put_registry_secret(
        &self,
        request: Request<PutRegistrySecretRequest>,
    ) -> Result<Response<RegistrySecret>, Status> {
        let who = caller(&self.controller, &request, Action::SubmitJobs)?;
        let r = request.into_inner();
        let tenant = secret_tenant(&who, &r.tenant)?;
        let info = self
            .controller
            .put_registry_secret(&tenant, &r.name, &r.registry, &r.username, &r.password)
            .map_err(to_status)?;
        // The name and the registry only: never the credential.
        tracing::info!(tenant = %info.tenant, name = %info.name, registry = %info.registry, "registry secret stored");
        Ok(Response::new(info))
    }

    async fn list_registry_secrets(
        &self,
        request: Request<ListRegistrySecretsRequest>,
    ) -> Result<Response<ListRegistrySecretsResponse>, Status> {
        let who = caller(&self.controller, &request, Action::ReadJobs)?;
        let r = request.into_inner();
        let tenant = who.tenant_filter(&r.tenant).map_err(to_status)?;
        let secrets = self
            .controller
            .list_registry_secrets((!tenant.is_empty()).then_some(tenant.as_str()));
        Ok(Response::new(ListRegistrySecretsResponse { secrets }))
    }

    async fn delete_registry_secret(
        &self,
        request: Request<DeleteRegistrySecretRequest>,
    ) -> Result<Response<RegistrySecret>, Status> {
        let who = caller(&self.controller, &request, Action::SubmitJobs)?;
        let r = request.into_inner();
        let tenant = secret_tenant(&who, &r.tenant)?;
        let info = self
            .controller
            .delete_registry_secret(&tenant, &r.name)
            .map_err(to_status)?;
        tracing::info!(tenant = %info.tenant, name = %info.name, "registry secret deleted");
        Ok(Response::new(info))
    }
}

/// The tenant a secret is written under: the caller's own, or the one an
/// admin names; `default` when none applies.
fn secret_tenant(who: &Principal, requested: &str) -> Result<String, Status> {
    let tenant = who.submit_tenant(requested).map_err(to_status)?;
    Ok(if tenant.is_empty() {
        "default".to_string()
    } else {
        tenant
    })
}
